//! The ingest shell: leader lease (taken, renewed during long steps, released), the tracker fed batch by batch, and
//! each batch's closed windows stored in the same transaction before the source acknowledges.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Clock, Context, SystemClock, loop_backoff, restore_tracker, sleep_or_shutdown};
use crate::sink::{DeadLetter, Fence, NewMessage, Store, StoreError};
use crate::source::{Batch, Source};
use crate::tracker::{Observed, Tracker};

/// How far ahead of the wall clock a message time may be (clock skew between bots and recap).
pub const MAX_FUTURE_MS: i64 = 24 * 3_600_000;

/// The wall-clock time a caught-up batch lets the tracker tick to: `now`, or the source's horizon when earlier.
fn tick_time(batch: &Batch, now: i64) -> i64 {
    batch.horizon.map_or(now, |h| h.min(now))
}

/// Runs `fut` while renewing the leader lease every third of its term, so a long step (a tracker rebuild, a slow
/// scroll) never lets the lease lapse. Returns `Err` only when the lease was lost; a renewal that fails for an outage
/// is logged and tried again at the next period (the ingest transaction is the fence in any case).
pub async fn renewing<T>(
    store: &Store,
    fence: &Fence,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    tokio::pin!(fut);
    let period = (fence.ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep(period) => match store.renew_leader(fence).await {
                Ok(()) => {}
                Err(e @ StoreError::LostLeadership(_)) => return Err(e),
                Err(e) => warn!(error = %e, "could not renew the ingest lease; retrying"),
            },
        }
    }
}

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
        let ttl = Duration::from_secs(ctx.cfg.service.leader_lease_seconds.into());
        loop {
            match ctx.store.try_acquire_leader(&ctx.instance, ttl).await {
                Ok(Some(fence)) => {
                    info!(epoch = fence.epoch, "ingest leader");
                    let tracker = renewing(
                        &ctx.store,
                        &fence,
                        restore_tracker(&ctx.store, ctx.tracker_config()),
                    )
                    .await??;
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
            self.tracker = renewing(
                &self.ctx.store,
                &self.fence,
                restore_tracker(&self.ctx.store, self.ctx.tracker_config()),
            )
            .await??;
            self.stale = false;
        }
        let tick_due = batch.caught_up
            && self
                .tracker
                .poll_timeout()
                .is_some_and(|t| t <= tick_time(batch, now));
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
        // A message stamped ahead of the wall clock (a host whose clock is fast) is tracked, and stored, at its
        // arrival time (`tracker::effective_time`): it cannot drag its bot's watermark past the wall clock. More than
        // a day ahead it is a dead letter, not a message (recorded once however often a sweep reads it again).
        // (Copied only when a batch holds such a message; the usual batch is used as it is.)
        let in_time = |m: &NewMessage| m.ts_ms <= now.saturating_add(MAX_FUTURE_MS);
        let (messages, future): (Cow<[NewMessage]>, Vec<&NewMessage>) =
            if batch.messages.iter().all(|m| m.ts_ms <= now) {
                (Cow::Borrowed(&batch.messages), Vec::new())
            } else {
                let (ok, future): (Vec<&NewMessage>, Vec<&NewMessage>) =
                    batch.messages.iter().partition(|m| in_time(m));
                (
                    Cow::Owned(
                        ok.into_iter()
                            .map(|m| NewMessage {
                                ts_ms: crate::tracker::effective_time(m.ts_ms, now),
                                ..m.clone()
                            })
                            .collect::<Vec<_>>(),
                    ),
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
            self.tracker.tick(tick_time(batch, now));
        }
        let tcfg = *self.tracker.config();
        let min = self.ctx.cfg.windows.min_messages_for_summary;
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

/// How the ingest loop waits and retries: a jittered exponential back-off between `backoff_min` and `backoff_max`
/// while the source or Postgres is unavailable (shutdown ends any wait at once), and the clock it reads for the
/// tracker.
#[derive(Debug, Clone)]
pub struct IngestLoop {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The wall clock handed to [`Ingest::apply`]: the only place the ingest loop reads the time for the tracker.
    pub clock: Arc<dyn Clock>,
}

impl Default for IngestLoop {
    fn default() -> Self {
        IngestLoop {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Runs ingest from `source` until `shutdown`: batches in, transactions committed, then acks.
pub async fn run_ingest<S: Source>(
    ctx: Context,
    source: S,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_ingest_with(ctx, source, shutdown, IngestLoop::default()).await
}

/// [`run_ingest`] with explicit loop settings (tests: a long back-off that shutdown must interrupt).
pub async fn run_ingest_with<S: Source>(
    ctx: Context,
    mut source: S,
    shutdown: CancellationToken,
    opts: IngestLoop,
) -> anyhow::Result<()> {
    let new_backoff = || loop_backoff(opts.backoff_min, opts.backoff_max);
    let mut backoff = new_backoff();
    let next_wait =
        move |b: &mut dyn Iterator<Item = Duration>| b.next().unwrap_or(opts.backoff_max);
    'lead: loop {
        let mut ingest = match Ingest::start(ctx.clone(), &shutdown).await {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(()),
            Err(e) => {
                let wait = next_wait(&mut backoff);
                warn!(error = %e, wait_ms = wait.as_millis() as u64, "cannot rebuild the tracker from Postgres; retrying");
                if sleep_or_shutdown(&shutdown, wait).await {
                    return Ok(());
                }
                continue 'lead;
            }
        };
        loop {
            let next = renewing(&ctx.store, &ingest.fence, source.next_batch());
            let batch = tokio::select! {
                _ = shutdown.cancelled() => {
                    ingest.release().await;
                    return Ok(());
                }
                b = next => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "lost the ingest lease while waiting for a batch; stepping down");
                    source.abandon().await;
                    continue 'lead;
                }
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    let wait = next_wait(&mut backoff);
                    warn!(error = %e, wait_ms = wait.as_millis() as u64, "source unavailable; retrying");
                    if sleep_or_shutdown(&shutdown, wait).await {
                        ingest.release().await;
                        return Ok(());
                    }
                    continue;
                }
            };
            match ingest.apply(&batch, opts.clock.now_ms()).await {
                Ok(_) => {
                    backoff = new_backoff();
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
                    let wait = next_wait(&mut backoff);
                    warn!(error = %e, wait_ms = wait.as_millis() as u64, "batch not committed; it will be redelivered");
                    if sleep_or_shutdown(&shutdown, wait).await {
                        return Ok(());
                    }
                    if e.is_connection() {
                        continue 'lead;
                    }
                }
            }
        }
    }
}
