//! The shell around the pure core: the ingest loop (source -> tracker -> store) and the window workers
//! (store -> fetch -> summarize -> sink). The only place that reads the clock for the tracker.
//!
//! * Ingest runs on one replica at a time (the leader, fenced by epoch in every transaction): it feeds each batch's new
//!   messages to the tracker, stores what the tracker closed in the same transaction, and only then lets the source
//!   acknowledge. On any failure it rebuilds the tracker from Postgres, the truth.
//! * Workers run on every replica: they claim due windows with a lease (`FOR UPDATE SKIP LOCKED`), fetch, summarize
//!   and finish each window in one transaction.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::fetch::{FetchError, Points};
use crate::sink::{
    ClaimedWindow, DeadLetter, Fence, Finished, NewMessage, Store, StoreError, WindowOutcome,
};
use crate::source::{Batch, Source};
use crate::summarize::{SummarizeError, Summarizer, WindowInput};
use crate::tracker::{Observed, Tracker, TrackerConfig};

/// Everything the loops share.
#[derive(Clone)]
pub struct Context {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub points: Arc<Points>,
    pub summarizer: Arc<dyn Summarizer>,
    pub instance: String,
}

impl Context {
    pub fn tracker_config(&self) -> TrackerConfig {
        self.cfg.tracker_config()
    }
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Rebuilds the tracker from the store: watermarks first, then the open messages.
pub async fn restore_tracker(store: &Store, cfg: TrackerConfig) -> Result<Tracker, StoreError> {
    let mut t = Tracker::new(cfg);
    for (bot, wm) in store.load_watermarks().await? {
        t.restore_watermark(&bot, wm);
    }
    for m in store.load_open_messages().await? {
        t.observe(&m.bot, &m.user_id, &m.point_id, m.ts_ms);
    }
    // Anything closable was closed in the transaction that stored it; nothing should close here.
    let _ = t.take_watermark_changes();
    metrics::gauge!("recap_windows_open").set(t.open_keys() as f64);
    Ok(t)
}

/// How far ahead of the wall clock a message time may be (clock skew between bots and recap).
pub const MAX_FUTURE_MS: i64 = 24 * 3_600_000;

/// What one applied batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub new: usize,
    pub duplicates: usize,
    pub late: usize,
    pub closed: usize,
    /// Closed windows recorded as too short to summarize (no worker ever sees them).
    pub too_short: usize,
}

/// The ingest side: a tracker and the leader fence.
pub struct Ingest {
    pub ctx: Context,
    pub tracker: Tracker,
    fence: Fence,
    last_commit: Instant,
    /// The tracker may differ from Postgres (a transaction failed): rebuild it before the next batch.
    stale: bool,
}

impl Ingest {
    /// Becomes the leader (waits until the lease is free) and rebuilds the tracker.
    pub async fn start(
        ctx: Context,
        shutdown: &CancellationToken,
    ) -> Result<Option<Ingest>, StoreError> {
        let ttl = Duration::from_secs(ctx.cfg.leader_lease_seconds.into());
        loop {
            match ctx.store.try_acquire_leader(&ctx.instance, ttl).await {
                Ok(Some(fence)) => {
                    info!(epoch = fence.epoch, "ingest leader");
                    let tracker = restore_tracker(&ctx.store, ctx.tracker_config()).await?;
                    return Ok(Some(Ingest {
                        ctx,
                        tracker,
                        fence,
                        last_commit: Instant::now(),
                        stale: false,
                    }));
                }
                Ok(None) => debug!("another replica leads ingest; waiting"),
                Err(e) => warn!(error = %e, "cannot reach Postgres to take the ingest lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(ttl / 3) => {}
            }
        }
    }

    /// Applies one batch in one transaction. After a failed transaction the tracker is rebuilt from the store before
    /// anything else is applied (retried with the next batch while Postgres is unreachable).
    pub async fn apply(&mut self, batch: &Batch, now: i64) -> Result<Applied, StoreError> {
        if self.stale {
            self.tracker = restore_tracker(&self.ctx.store, self.ctx.tracker_config()).await?;
            self.stale = false;
        }
        let tick_due = batch.caught_up && self.tracker.poll_timeout().is_some_and(|t| t <= now);
        let renew_due = self.last_commit.elapsed() > self.fence.ttl / 3;
        if batch.is_empty() && batch.checkpoint.is_none() && !tick_due && !renew_due {
            return Ok(Applied::default());
        }
        match self.apply_inner(batch, now).await {
            Ok(a) => {
                self.last_commit = Instant::now();
                metrics::counter!("recap_events_duplicate_total").increment(a.duplicates as u64);
                metrics::counter!("recap_events_ignored_total").increment(batch.ignored as u64);
                metrics::counter!("recap_events_late_total").increment(a.late as u64);
                metrics::counter!("recap_windows_closed_total").increment(a.closed as u64);
                metrics::counter!("recap_windows_too_short_total").increment(a.too_short as u64);
                metrics::gauge!("recap_windows_open").set(self.tracker.open_keys() as f64);
                Ok(a)
            }
            Err(e) => {
                warn!(error = %e, "ingest transaction failed; the tracker will be rebuilt from Postgres");
                self.stale = true;
                Err(e)
            }
        }
    }

    async fn apply_inner(&mut self, batch: &Batch, now: i64) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        let mut tx = self.ctx.store.begin_ingest(&self.fence).await?;
        tx.dead_letters(&batch.dead_letters).await?;
        // A message from the future would drag its bot's watermark ahead and make every later message late: it is
        // a dead letter, not a message.
        // (Copied only when a batch holds such a message; the usual batch is used as it is.)
        let in_time = |m: &NewMessage| m.ts_ms <= now.saturating_add(MAX_FUTURE_MS);
        let (messages, future): (Cow<[NewMessage]>, Vec<&NewMessage>) =
            if batch.messages.iter().all(in_time) {
                (Cow::Borrowed(&batch.messages), Vec::new())
            } else {
                let (ok, future): (Vec<&NewMessage>, Vec<&NewMessage>) =
                    batch.messages.iter().partition(|m| in_time(m));
                (
                    Cow::Owned(ok.into_iter().cloned().collect::<Vec<_>>()),
                    future,
                )
            };
        if !future.is_empty() {
            metrics::counter!("recap_events_malformed_total", "reason" => "future_timestamp")
                .increment(future.len() as u64);
            let letters: Vec<DeadLetter> = future
                .iter()
                .map(|m| DeadLetter {
                    source: "ingest",
                    subject: Some(m.bot.clone()),
                    stream_seq: None,
                    raw: format!("{}/{}/{}/{}", m.bot, m.user_id, m.point_id, m.ts_ms).into_bytes(),
                    reason: format!(
                        "timestamp {} is more than a day in the future",
                        crate::sink::to_utc(m.ts_ms).to_rfc3339()
                    ),
                })
                .collect();
            tx.dead_letters(&letters).await?;
        }
        let new = tx.insert_messages(&messages).await?;
        for (m, is_new) in messages.iter().zip(new) {
            if !is_new {
                applied.duplicates += 1;
                continue;
            }
            match self
                .tracker
                .observe(&m.bot, &m.user_id, &m.point_id, m.ts_ms)
            {
                Observed::Accepted { late } => {
                    applied.new += 1;
                    applied.late += usize::from(late);
                }
                Observed::Duplicate => applied.duplicates += 1,
            }
        }
        if batch.caught_up {
            self.tracker.tick(now);
        }
        let tcfg = *self.tracker.config();
        let min = self.ctx.cfg.min_messages_for_summary;
        let closed = self.tracker.drain_closed();
        applied.too_short += tx.close_windows(&tcfg, &closed, min).await?;
        applied.closed += closed.len();
        tx.save_watermarks(&self.tracker.take_watermark_changes())
            .await?;
        if let Some((name, pos, read)) = &batch.checkpoint {
            tx.save_checkpoint(name, *pos, *read).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Gives up the leader lease (graceful shutdown).
    pub async fn release(&self) {
        if let Err(e) = self.ctx.store.release_leader(&self.fence).await {
            warn!(error = %e, "could not release the ingest lease (it expires by itself)");
        }
    }
}

/// Runs ingest from `source` until `shutdown`: batches in, transactions committed, then acks.
pub async fn run_ingest<S: Source>(
    ctx: Context,
    mut source: S,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    'lead: loop {
        let mut ingest = match Ingest::start(ctx.clone(), &shutdown).await {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(()),
            Err(e) => {
                warn!(error = %e, "cannot rebuild the tracker from Postgres; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'lead;
            }
        };
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => {
                    ingest.release().await;
                    return Ok(());
                }
                b = source.next_batch() => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "source unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            match ingest.apply(&batch, now_ms()).await {
                Ok(_) => {
                    backoff = Duration::from_millis(200);
                    if let Err(e) = source.commit().await {
                        // Committed but not acknowledged: redelivery is a no-op in the store.
                        warn!(error = %e, "acknowledging the batch failed; it will be redelivered and skipped");
                    }
                }
                Err(StoreError::LostLeadership(epoch)) => {
                    warn!(epoch, "lost the ingest lease; stepping down");
                    source.abandon().await;
                    continue 'lead;
                }
                Err(e) => {
                    source.abandon().await;
                    warn!(error = %e, "batch not committed; it will be redelivered");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if e.is_connection() {
                        continue 'lead;
                    }
                }
            }
        }
    }
}

/// Back-off for a window that failed: 5 s, 10 s, 20 s ... capped at 10 minutes.
fn retry_delay(attempts: i32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1u64 << attempts.clamp(0, 7) as u32))
        .min(Duration::from_secs(600))
}

/// Fetches and summarizes one claimed window; returns what to write.
pub async fn summarize_window(
    ctx: &Context,
    w: &ClaimedWindow,
) -> Result<WindowOutcome, StoreError> {
    let cfg = &ctx.cfg;
    let ids = ctx.store.window_points(w.id).await?;
    let bot_for = |c: &str| cfg.bot_for_collection(c);
    let fetched = match ctx.points.collections_for(&w.bot, &bot_for).await {
        Ok(colls) => ctx
            .points
            .fetch_window(&colls, &ids, &w.user_id, (w.start_ms, w.end_ms))
            .await
            .map(|r| (colls, r)),
        Err(e) => Err(e),
    };
    let (messages, skipped) = match fetched {
        Ok((_, r)) => r,
        Err(e) => {
            // Qdrant unreachable: the window waits, it is not failed for the outage.
            let counts = matches!(e, FetchError::NoCollection(_)) || e.is_invalid_request();
            metrics::counter!("recap_fetch_errors_total").increment(1);
            return Ok(WindowOutcome::Retry {
                error: e.to_string(),
                delay: Duration::from_secs(5),
                counts,
                max_attempts: cfg.llm_max_attempts as i32,
            });
        }
    };
    for (reason, n) in &skipped {
        metrics::counter!("recap_points_skipped_total", "reason" => reason.as_str())
            .increment(*n as u64);
    }
    let known: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let extra = messages
        .iter()
        .filter(|m| !known.contains(m.point_id.as_str()))
        .map(|m| crate::sink::NewMessage {
            bot: w.bot.clone(),
            user_id: w.user_id.clone(),
            point_id: m.point_id.clone(),
            ts_ms: m.ts_ms,
        })
        .collect::<Vec<_>>();
    let message_count = messages.len() as i32;
    if (messages.len() as u32) < cfg.min_messages_for_summary {
        return Ok(WindowOutcome::TooShort { message_count });
    }
    let input = WindowInput {
        bot: w.bot.clone(),
        user_id: w.user_id.clone(),
        start_ms: w.start_ms,
        end_ms: w.end_ms,
        messages,
    };
    let text_chars = input.text_chars();
    match ctx.summarizer.summarize(&input).await {
        Ok(summary) => Ok(WindowOutcome::Summarized {
            summary,
            covered: input.messages.iter().map(|m| m.point_id.clone()).collect(),
            extra,
            message_count,
            text_chars,
            centroid: crate::recall::vectors::centroid(&input.messages),
        }),
        Err(SummarizeError::Empty) => Ok(WindowOutcome::TooShort { message_count }),
        Err(SummarizeError::Unavailable(e)) => Ok(WindowOutcome::Retry {
            error: e,
            delay: Duration::from_secs(5),
            counts: false,
            max_attempts: cfg.llm_max_attempts as i32,
        }),
        Err(e @ (SummarizeError::Failed(_) | SummarizeError::Invalid(_))) => {
            Ok(WindowOutcome::Retry {
                error: e.to_string(),
                delay: retry_delay(w.attempts),
                counts: true,
                max_attempts: cfg.llm_max_attempts as i32,
            })
        }
    }
}

/// Processes one claimed window end to end, within a span naming it.
pub async fn process_window(ctx: &Context, w: ClaimedWindow) -> Result<Finished, StoreError> {
    let span = info_span!("window", id = w.id, bot = %w.bot, user = %w.user_id, start = %crate::sink::to_utc(w.start_ms).to_rfc3339());
    async move {
        let outcome = summarize_window(ctx, &w).await?;
        let finished = ctx.store.finish_window(&ctx.instance, &w, &outcome).await?;
        match (&outcome, finished) {
            (WindowOutcome::Summarized { message_count, centroid, .. }, Finished::Done) => {
                crate::recall::vectors::on_summarized(ctx, w.id, centroid.as_deref()).await;
                metrics::counter!("recap_windows_summarized_total").increment(1);
                metrics::histogram!("recap_window_close_to_row_seconds")
                    .record((now_ms() - w.closed_at_ms).max(0) as f64 / 1000.0);
                info!(messages = message_count, "window summarized");
            }
            (_, Finished::TooShort) => metrics::counter!("recap_windows_too_short_total").increment(1),
            (WindowOutcome::Retry { error, .. }, Finished::Dead) => {
                metrics::counter!("recap_windows_dead_total").increment(1);
                warn!(error = %error, "window dead-lettered");
            }
            (WindowOutcome::Retry { error, counts, .. }, Finished::Retrying) => {
                metrics::counter!("recap_windows_retried_total", "counted" => if *counts { "yes" } else { "no" }).increment(1);
                info!(error = %error, "window will be retried");
            }
            (_, Finished::Stale) => debug!("window changed or lease lost; it will be done again"),
            _ => {}
        }
        Ok(finished)
    }
    .instrument(span)
    .await
}

/// Processes every due window that can be claimed now, then returns how many were finished (`sweep --once`,
/// `backfill`). Windows waiting for a retry time are left for a later run. `progress` is called after each window.
pub async fn drain_due(
    ctx: &Context,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<usize, StoreError> {
    let lease = Duration::from_secs(ctx.cfg.lease_seconds.into());
    let limit = i64::from(ctx.cfg.enrichment_batch_size.max(1));
    let mut finished = 0usize;
    loop {
        let claimed = ctx.store.claim_due(&ctx.instance, lease, limit).await?;
        if claimed.is_empty() {
            return Ok(finished);
        }
        let results: Vec<Result<Finished, StoreError>> = futures::stream::iter(claimed)
            .map(|w| process_window(ctx, w))
            .buffer_unordered(ctx.cfg.llm_concurrency.max(1))
            .collect()
            .await;
        for r in results {
            r?;
            finished += 1;
            progress(finished);
        }
    }
}

/// Claims and processes due windows until `shutdown`; in-flight windows get `grace` to finish, then their leases are
/// released.
pub async fn run_workers(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lease = Duration::from_secs(ctx.cfg.lease_seconds.into());
    let limit = i64::from(ctx.cfg.enrichment_batch_size.max(1));
    let concurrency = ctx.cfg.llm_concurrency.max(1);
    let hard_stop = CancellationToken::new();
    let grace = ctx.cfg.shutdown_grace;
    {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            hard_stop.cancel();
        });
    }
    while !shutdown.is_cancelled() {
        let claimed = match ctx.store.claim_due(&ctx.instance, lease, limit).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot claim windows; retrying");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
            continue;
        }
        let work = futures::stream::iter(claimed).for_each_concurrent(concurrency, |w| {
            let ctx = &ctx;
            async move {
                let id = w.id;
                if let Err(e) = process_window(ctx, w).await {
                    warn!(window = id, error = %e, "window not finished; its lease will expire and it will be retried");
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = hard_stop.cancelled() => break,
        }
    }
    match ctx.store.release_leases(&ctx.instance).await {
        Ok(n) if n > 0 => info!(released = n, "released window leases"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not release window leases (they expire by themselves)"),
    }
    Ok(())
}
