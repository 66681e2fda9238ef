//! The window workers: claim due windows with a lease, keep the leases alive while working, fetch, summarize and
//! finish them in batches (one claim, one Qdrant retrieve and scroll, one finish transaction for many windows).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Context, jittered, loop_backoff, now_ms, sleep_or_shutdown};
use crate::fetch::{FetchError, Fetched, SkipReason, WindowQuery};
use crate::sink::{ClaimedWindow, Finished, StoreError, StoredRunning, WindowOutcome};
use crate::summarize::{CallGate, Purpose, SummarizeError, SummarizerKind, WindowInput};

/// How long after its close a window whose named points Qdrant does not show yet waits for them (issue 24 case 9):
/// the bots store a point before publishing its event, so a named point missing this long after the window closed
/// is not a visibility delay (deleted, or written elsewhere); the window then proceeds with what is visible.
pub const MISSING_POINTS_WAIT: Duration = Duration::from_secs(30);
/// The delay before a window waiting for its named points is claimed again (jittered); so it is tried at most about
/// `MISSING_POINTS_WAIT / MISSING_POINTS_RETRY` times.
pub const MISSING_POINTS_RETRY: Duration = Duration::from_secs(2);

/// Back-off for a window that failed: 5 s, 10 s, 20 s ... capped at 10 minutes.
fn retry_delay(attempts: i32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1u64 << attempts.clamp(0, 7) as u32))
        .min(Duration::from_secs(600))
}

fn retry(ctx: &Context, error: String, delay: Duration, counts: bool) -> WindowOutcome {
    WindowOutcome::Retry {
        error,
        delay,
        counts,
        max_attempts: ctx.cfg.llm.llm_max_attempts as i32,
    }
}

/// A window the summarizer could not take now (LLM circuit open, budget spent): it waits, uncounted.
fn not_ready(ctx: &Context, e: impl std::fmt::Display) -> WindowOutcome {
    retry(ctx, e.to_string(), jittered(Duration::from_secs(5)), false)
}

/// Qdrant unreachable: the window waits, it is not failed for the outage; a missing collection or a request Qdrant
/// rejects counts.
fn fetch_failed(ctx: &Context, e: &FetchError) -> WindowOutcome {
    let counts = matches!(e, FetchError::NoCollection(_)) || e.is_invalid_request();
    metrics::counter!("recap_fetch_errors_total").increment(1);
    retry(ctx, e.to_string(), jittered(Duration::from_secs(5)), counts)
}

/// A claimed window after its fetch: its outcome already (too short, fetch failed), or what the summarizer gets.
enum Prepared {
    Outcome(WindowOutcome),
    Input {
        input: WindowInput,
        extra: Vec<crate::sink::NewMessage>,
        message_count: i32,
    },
}

/// From a window's fetched messages to what the summarizer gets.
fn prepare(ctx: &Context, w: &ClaimedWindow, ids: &[String], fetched: Fetched) -> Prepared {
    let (messages, skipped) = fetched;
    for (reason, n) in &skipped {
        metrics::counter!("recap_points_skipped_total", "reason" => reason.as_str())
            .increment(*n as u64);
    }
    // Named points Qdrant does not show (yet): wait for them a bounded time, then go on with what is visible.
    let missing = skipped.get(&SkipReason::NotFound).copied().unwrap_or(0);
    if missing > 0 {
        let since_close = Duration::from_millis((now_ms() - w.closed_at_ms).max(0) as u64);
        let span = window_span(w);
        let _e = span.enter();
        if since_close < MISSING_POINTS_WAIT {
            metrics::counter!("recap_window_points_missing_total", "outcome" => "waited")
                .increment(1);
            info!(
                missing,
                named = ids.len(),
                "named points not visible in Qdrant yet; the window waits for them"
            );
            return Prepared::Outcome(retry(
                ctx,
                format!(
                    "{missing} of the window's {} named points are not visible in Qdrant yet",
                    ids.len()
                ),
                jittered(MISSING_POINTS_RETRY),
                false,
            ));
        }
        metrics::counter!("recap_window_points_missing_total", "outcome" => "proceeded")
            .increment(1);
        warn!(
            missing,
            named = ids.len(),
            waited_s = MISSING_POINTS_WAIT.as_secs(),
            "named points still not visible in Qdrant; summarizing the window from the points that are"
        );
    }
    let known: HashSet<&str> = ids.iter().map(String::as_str).collect();
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
    if (messages.len() as u32) < ctx.cfg.windows.min_messages_for_summary {
        return Prepared::Outcome(WindowOutcome::TooShort { message_count });
    }
    // The window's bounds are its stored points' times (messages are sorted by time), not the events' times.
    let span = match (messages.first(), messages.last()) {
        (Some(f), Some(l)) => (f.ts_ms, l.ts_ms),
        _ => (w.start_ms, w.end_ms),
    };
    Prepared::Input {
        input: WindowInput {
            bot: w.bot.clone(),
            user_id: w.user_id.clone(),
            start_ms: span.0,
            end_ms: span.1,
            messages,
        },
        extra,
        message_count,
    }
}

/// Summarizes a prepared window. With the LLM summarizer the caller has extended the window's lease right before
/// (`extend_leases`, one statement per batch), and runs this under the window's [`LeaseGate`], so every attempt
/// after the first (a retry, the repair call) checks the lease and version again and none is sent for a window that
/// is no longer this worker's or changed. A lost lease or a changed window is written as nothing (the finish finds
/// it stale). The extractive summarizer costs no money and little time, and the finish checks the lease again.
async fn summarize_prepared(
    ctx: &Context,
    w: &ClaimedWindow,
    p: Prepared,
    running: Option<&StoredRunning>,
) -> Result<WindowOutcome, StoreError> {
    let (input, extra, message_count) = match p {
        Prepared::Outcome(o) => return Ok(o),
        Prepared::Input {
            input,
            extra,
            message_count,
        } => (input, extra, message_count),
    };
    let text_chars = input.text_chars();
    let span = (input.start_ms, input.end_ms);
    // From the window's valid running summary plus the messages since, when it has one (CONTEXT_SUMMARY_EVERY).
    let (result, from_running) = super::running::summarize_from(
        ctx.summarizer.as_ref(),
        running,
        &w.bot,
        &w.user_id,
        &input.messages,
        Purpose::Window,
    )
    .await;
    if from_running && result.is_ok() {
        metrics::counter!("recap_running_summaries_total", "outcome" => "used_at_close")
            .increment(1);
    }
    Ok(match result {
        Ok(summary) => WindowOutcome::Summarized {
            summary,
            covered: input.messages.iter().map(|m| m.point_id.clone()).collect(),
            extra,
            message_count,
            text_chars,
            span,
            centroid: crate::vectors::centroid(&input.messages),
            words: crate::sink::words::said(&input.messages),
        },
        Err(SummarizeError::Empty) => WindowOutcome::TooShort { message_count },
        Err(SummarizeError::Unavailable(e)) => {
            retry(ctx, e, jittered(Duration::from_secs(5)), false)
        }
        Err(e @ (SummarizeError::Failed(_) | SummarizeError::Invalid(_))) => {
            retry(ctx, e.to_string(), retry_delay(w.attempts), true)
        }
    })
}

/// Fetches and summarizes one claimed window; returns what to write.
pub async fn summarize_window(
    ctx: &Context,
    w: &ClaimedWindow,
) -> Result<WindowOutcome, StoreError> {
    // No fetch while the summarizer could not take the window (LLM circuit open, budget spent): it waits, uncounted.
    if let Err(e) = ctx.summarizer.ready().await {
        return Ok(not_ready(ctx, e));
    }
    let ids = ctx.store.window_points(w.id).await?;
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let bot_for = |c: &str| ctx.cfg.bot_for_collection(c);
    let fetched = match ctx.points.collections_for(&w.bot, &bot_for).await {
        Ok(colls) => {
            ctx.points
                .fetch_window(&colls, &ids, &w.user_id, (w.start_ms, w.end_ms))
                .await
        }
        Err(e) => Err(e),
    };
    let prepared = match fetched {
        Ok(f) => prepare(ctx, w, &ids, f),
        Err(e) => Prepared::Outcome(fetch_failed(ctx, &e)),
    };
    let running = running_of(ctx, std::slice::from_ref(w)).await?;
    if ctx.summarizer.kind() == SummarizerKind::Llm && matches!(prepared, Prepared::Input { .. }) {
        if !ctx.store.extend_lease(&ctx.instance, w, lease).await? {
            return Ok(lease_lost(ctx));
        }
        let gate = LeaseGate::for_window(ctx, w, lease);
        return crate::summarize::gated(
            gate,
            summarize_prepared(
                ctx,
                w,
                prepared,
                running.get(&(w.bot.clone(), w.user_id.clone())),
            ),
        )
        .await;
    }
    summarize_prepared(
        ctx,
        w,
        prepared,
        running.get(&(w.bot.clone(), w.user_id.clone())),
    )
    .await
}

/// A window whose lease was no longer this worker's (or that changed) before its LLM call: nothing is called; the
/// finish finds it stale.
fn lease_lost(ctx: &Context) -> WindowOutcome {
    metrics::counter!("recap_window_leases_lost_total").increment(1);
    retry(
        ctx,
        "lease lost or window changed before the summarizer call".into(),
        Duration::ZERO,
        false,
    )
}

/// The check before each LLM attempt of a window ([`CallGate`]): its lease extended while it is still this worker's,
/// due and at the claimed version (`Store::extend_lease`). The first attempt is admitted without a round trip: the
/// caller extended the lease right before (for a batch in one statement).
struct LeaseGate {
    store: crate::sink::Store,
    owner: String,
    window: ClaimedWindow,
    lease: Duration,
    checked: std::sync::atomic::AtomicBool,
}

impl LeaseGate {
    fn for_window(ctx: &Context, w: &ClaimedWindow, lease: Duration) -> Arc<dyn CallGate> {
        Arc::new(LeaseGate {
            store: ctx.store.clone(),
            owner: ctx.instance.clone(),
            window: w.clone(),
            lease,
            checked: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

impl CallGate for LeaseGate {
    fn admit(&self) -> futures::future::BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            if self
                .checked
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(true);
            }
            let ok = self
                .store
                .extend_lease(&self.owner, &self.window, self.lease)
                .await
                .map_err(|e| e.to_string())?;
            if !ok {
                metrics::counter!("recap_window_leases_lost_total").increment(1);
            }
            Ok(ok)
        })
    }
}

/// The stored running summaries of the windows' keys (none when CONTEXT_SUMMARY_EVERY is 0), in one query.
async fn running_of(
    ctx: &Context,
    windows: &[ClaimedWindow],
) -> Result<HashMap<(String, String), StoredRunning>, StoreError> {
    if ctx.cfg.windows.context_summary_every == 0 {
        return Ok(HashMap::new());
    }
    let keys: Vec<(&str, &str)> = windows
        .iter()
        .map(|w| (w.bot.as_str(), w.user_id.as_str()))
        .collect();
    ctx.store.running_summaries(&keys).await
}

/// Fetches many claimed windows: their point ids in one query, then per bot one [`crate::fetch::Points::fetch_windows`]
/// (one retrieve by id, one union-filter scroll), the bots concurrently. A request Qdrant rejects is tried again
/// window by window, so only the window that causes it counts a failure.
async fn fetch_batch(
    ctx: &Context,
    windows: &[ClaimedWindow],
    ids: Option<HashMap<i64, Vec<String>>>,
) -> Result<Vec<Prepared>, StoreError> {
    let ids = match ids {
        Some(ids) => ids,
        None => {
            let all: Vec<i64> = windows.iter().map(|w| w.id).collect();
            ctx.store.window_point_ids(&all).await?
        }
    };
    let none: Vec<String> = Vec::new();
    let ids_of = |w: &ClaimedWindow| ids.get(&w.id).unwrap_or(&none);
    let mut by_bot: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, w) in windows.iter().enumerate() {
        by_bot.entry(w.bot.as_str()).or_default().push(i);
    }
    let bot_for = |c: &str| ctx.cfg.bot_for_collection(c);
    let groups = by_bot.into_iter().map(|(bot, idx)| {
        let bot_for = &bot_for;
        async move {
            let colls = match ctx.points.collections_for(bot, bot_for).await {
                Ok(c) => c,
                Err(e) => {
                    let failed = idx
                        .iter()
                        .map(|_| Prepared::Outcome(fetch_failed(ctx, &e)))
                        .collect();
                    return (idx, failed);
                }
            };
            let queries: Vec<WindowQuery> = idx
                .iter()
                .map(|&i| WindowQuery {
                    ids: ids_of(&windows[i]),
                    user_id: &windows[i].user_id,
                    range_ms: (windows[i].start_ms, windows[i].end_ms),
                })
                .collect();
            let ready = |i: usize, f: Fetched| prepare(ctx, &windows[i], ids_of(&windows[i]), f);
            let results: Vec<Prepared> = match ctx.points.fetch_windows(&colls, &queries).await {
                Ok(r) => idx.iter().zip(r).map(|(&i, f)| ready(i, f)).collect(),
                Err(e) if e.is_invalid_request() && queries.len() > 1 => {
                    let mut one_by_one = Vec::with_capacity(queries.len());
                    for (&i, q) in idx.iter().zip(&queries) {
                        let r = ctx
                            .points
                            .fetch_window(&colls, q.ids, q.user_id, q.range_ms);
                        one_by_one.push(match r.await {
                            Ok(f) => ready(i, f),
                            Err(e) => Prepared::Outcome(fetch_failed(ctx, &e)),
                        });
                    }
                    one_by_one
                }
                Err(e) => queries
                    .iter()
                    .map(|_| Prepared::Outcome(fetch_failed(ctx, &e)))
                    .collect(),
            };
            (idx, results)
        }
    });
    let mut out: Vec<Option<Prepared>> = windows.iter().map(|_| None).collect();
    for (idx, results) in futures::future::join_all(groups).await {
        for (i, p) in idx.into_iter().zip(results) {
            out[i] = Some(p);
        }
    }
    out.into_iter()
        .map(|p| {
            p.ok_or(StoreError::Invariant(
                "a window of the batch was not fetched",
            ))
        })
        .collect()
}

/// Finishes one window on its own transaction. A result that cannot be stored for a reason that will not go away (a
/// NUL in text, a value too long for its column) counts as a failed attempt toward LLM_MAX_ATTEMPTS and the dead
/// state, instead of a new claim (and a new LLM call) forever. Returns what was written and how it ended.
async fn finish_one(
    ctx: &Context,
    w: &ClaimedWindow,
    outcome: WindowOutcome,
) -> Result<(WindowOutcome, Finished), StoreError> {
    match ctx.store.finish_window(&ctx.instance, w, &outcome).await {
        Err(e) if e.is_repeatable() => {
            warn!(window_id = w.id, error = %e, "the window's result cannot be stored; counted as a failed attempt");
            metrics::counter!("recap_window_write_errors_total").increment(1);
            let r = retry(
                ctx,
                format!("the result cannot be stored: {e}"),
                retry_delay(w.attempts),
                true,
            );
            let finished = ctx.store.finish_window(&ctx.instance, w, &r).await?;
            Ok((r, finished))
        }
        r => Ok((outcome, r?)),
    }
}

/// The span a window's work runs in (`window{window_id, bot, user_id, start}`), so every line about it, the LLM
/// client's retries included, names the window.
pub fn window_span(w: &ClaimedWindow) -> tracing::Span {
    info_span!("window", window_id = w.id, bot = %w.bot, user_id = %w.user_id, start = %crate::sink::to_utc(w.start_ms).to_rfc3339())
}

/// Metrics and log lines of a finished window.
fn report(w: &ClaimedWindow, outcome: &WindowOutcome, finished: Finished) {
    let span = window_span(w);
    let _e = span.enter();
    match (outcome, finished) {
        (WindowOutcome::Summarized { message_count, .. }, Finished::Done) => {
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
}

/// Processes claimed windows end to end as one batch: one point-id query, one Qdrant retrieve and one scroll per bot
/// ([`fetch_batch`]), the summarizer per window (LLM calls concurrently, at most LLM_CONCURRENCY; `release` is called
/// with a window's id when its summarizer call returned), one finish transaction for all
/// ([`crate::sink::Store::finish_windows`]: each window's lease and version are checked on their own, a stale one is
/// skipped), then the summary vectors of the summarized windows in one upsert. When the batch's transaction fails for
/// another reason than a lost connection (a row that cannot be stored, a deadlock), the windows are finished one by
/// one, so such a row fails only its own window. A window whose summarizer step failed on the database is left to
/// its lease. Returns each finished window's id and how it ended, in the order given.
pub async fn process_windows(
    ctx: &Context,
    windows: Vec<ClaimedWindow>,
    release: &(dyn Fn(i64) + Sync),
) -> Result<Vec<(i64, Finished)>, StoreError> {
    process_claimed(ctx, windows, None, release).await
}

/// [`process_windows`] with the windows' point ids when the claim read them already
/// ([`crate::sink::Store::claim_due_with_points`]). The round trips of a batch of n windows with the LLM summarizer:
/// the claim (with the point ids), the running summaries of the keys (when CONTEXT_SUMMARY_EVERY is on), Qdrant's
/// retrieve and scroll, one lease extension for all n right before their calls, the n calls (a budget reservation
/// only every LLM_CONCURRENCY calls: [`crate::budget`]), one finish transaction that also writes the calls' costs,
/// then the summary vectors. A retry or repair call adds one lease check each.
pub async fn process_claimed(
    ctx: &Context,
    windows: Vec<ClaimedWindow>,
    ids: Option<HashMap<i64, Vec<String>>>,
    release: &(dyn Fn(i64) + Sync),
) -> Result<Vec<(i64, Finished)>, StoreError> {
    if windows.is_empty() {
        return Ok(Vec::new());
    }
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let llm = ctx.summarizer.kind() == SummarizerKind::Llm;
    let mut prepared = match ctx.summarizer.ready().await {
        Ok(()) => fetch_batch(ctx, &windows, ids).await?,
        Err(e) => windows
            .iter()
            .map(|_| Prepared::Outcome(not_ready(ctx, &e)))
            .collect(),
    };
    // Right before the calls: the leases of the windows about to be sent, extended in one statement; a window no
    // longer this worker's or changed since the claim is not sent.
    if llm {
        let to_call: Vec<(i64, i32)> = windows
            .iter()
            .zip(&prepared)
            .filter(|(_, p)| matches!(p, Prepared::Input { .. }))
            .map(|(w, _)| (w.id, w.version))
            .collect();
        if !to_call.is_empty() {
            let held = ctx
                .store
                .extend_leases(&ctx.instance, &to_call, lease)
                .await?;
            for (w, p) in windows.iter().zip(prepared.iter_mut()) {
                if matches!(p, Prepared::Input { .. }) && !held.contains(&w.id) {
                    *p = Prepared::Outcome(lease_lost(ctx));
                }
            }
        }
    }
    let running = running_of(ctx, &windows).await?;
    // LLM_CONCURRENCY calls at once, in claim order (the semaphore is fair).
    let calls = tokio::sync::Semaphore::new(ctx.cfg.llm.llm_concurrency.max(1));
    let mut futs = Vec::with_capacity(windows.len());
    for (w, p) in windows.iter().zip(prepared) {
        let calls = &calls;
        let running = running.get(&(w.bot.clone(), w.user_id.clone()));
        let gate = (llm && matches!(p, Prepared::Input { .. }))
            .then(|| LeaseGate::for_window(ctx, w, lease));
        futs.push(
            async move {
                let _call = calls.acquire().await;
                let r = match gate {
                    Some(gate) => {
                        crate::summarize::gated(gate, summarize_prepared(ctx, w, p, running)).await
                    }
                    None => summarize_prepared(ctx, w, p, running).await,
                };
                release(w.id);
                r
            }
            .instrument(window_span(w)),
        );
    }
    let outcomes: Vec<Result<WindowOutcome, StoreError>> = futures::future::join_all(futs).await;
    let mut todo: Vec<(&ClaimedWindow, WindowOutcome)> = Vec::with_capacity(windows.len());
    for (w, r) in windows.iter().zip(outcomes) {
        match r {
            Ok(o) => todo.push((w, o)),
            Err(e) => {
                warn!(window_id = w.id, error = %e, "window not finished; its lease will expire and it will be retried")
            }
        }
    }
    let batch: Vec<(&ClaimedWindow, &WindowOutcome)> = todo.iter().map(|(w, o)| (*w, o)).collect();
    let finished: Vec<(&ClaimedWindow, WindowOutcome, Finished)> = match finish_batch(
        ctx, &batch, lease,
    )
    .await
    {
        Ok(f) => todo
            .into_iter()
            .zip(f)
            .map(|((w, o), f)| (w, o, f))
            .collect(),
        Err(e) if e.is_connection() => return Err(e),
        Err(e) => {
            debug!(error = %e, windows = todo.len(), "the batch cannot be finished at once; one by one");
            metrics::counter!("recap_window_batch_fallbacks_total").increment(1);
            let mut one_by_one = Vec::with_capacity(todo.len());
            for (w, o) in todo {
                match finish_one(ctx, w, o).await {
                    Ok((o, f)) => one_by_one.push((w, o, f)),
                    Err(e) if e.is_connection() => return Err(e),
                    Err(e) => {
                        warn!(window_id = w.id, error = %e, "window not finished; its lease will expire and it will be retried")
                    }
                }
            }
            one_by_one
        }
    };
    let vectors: Vec<(i64, Option<&[f32]>)> = finished
        .iter()
        .filter_map(|(w, o, f)| match (o, f) {
            (WindowOutcome::Summarized { centroid, .. }, Finished::Done) => {
                Some((w.id, centroid.as_deref()))
            }
            _ => None,
        })
        .collect();
    crate::vectors::on_summarized_many(&ctx.store, ctx.points.client(), &vectors).await;
    Ok(finished
        .iter()
        .map(|(w, o, f)| {
            report(w, o, *f);
            (w.id, *f)
        })
        .collect())
}

/// The batch's finish transaction, carrying the LLM spend settled since the last write (issue 25), and tried again
/// while Postgres cannot be reached (issue 24 case 8): the results are paid for, so they are kept and written once
/// Postgres is back, for at most a lease (`lease`, from the first failure; the heartbeat keeps renewing the leases
/// meanwhile, and the finish checks each window's lease and version, so a window taken over is skipped). Other
/// errors are returned at once (the caller finishes one by one).
async fn finish_batch(
    ctx: &Context,
    batch: &[(&ClaimedWindow, &WindowOutcome)],
    lease: Duration,
) -> Result<Vec<Finished>, StoreError> {
    use backon::{ExponentialBuilder, Retryable};
    let ledger = ctx.summarizer.ledger();
    let deadline = std::time::Instant::now() + lease;
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(usize::MAX)
        .with_jitter();
    (|| async {
        let settlement = ledger.as_ref().and_then(|l| l.take_pending());
        let r = ctx
            .store
            .finish_windows_settling(&ctx.instance, batch, settlement.as_ref())
            .await;
        if r.is_err()
            && let (Some(l), Some(s)) = (&ledger, settlement)
        {
            l.restore_pending(s);
        }
        r
    })
    .retry(backoff)
    .when(|e: &StoreError| e.is_connection() && std::time::Instant::now() < deadline)
    .notify(|e, wait| {
        metrics::counter!("recap_window_finish_retries_total").increment(1);
        warn!(windows = batch.len(), error = %e, retry_in_ms = wait.as_millis() as u64,
            "cannot write the finished windows (Postgres unreachable); keeping the results and retrying");
    })
    .await
}

/// Processes one claimed window end to end ([`process_windows`] for one window).
pub async fn process_window(ctx: &Context, w: ClaimedWindow) -> Result<Finished, StoreError> {
    let id = w.id;
    process_windows(ctx, vec![w], &|_| {})
        .await?
        .into_iter()
        .find(|(i, _)| *i == id)
        .map(|(_, f)| f)
        .ok_or(StoreError::Invariant("the window was not finished"))
}

/// How long a claim waits for more free LLM slots (see `run_workers`).
const CLAIM_GATHER: Duration = Duration::from_millis(10);

/// How a worker batches: windows per claim, and batches in flight at once. With the LLM summarizer a worker claims
/// only what it can start now (at most LLM_CONCURRENCY, ENRICHMENT_BATCH_SIZE caps it); with the extractive one
/// (CPU, no money) it claims ENRICHMENT_BATCH_SIZE windows at a time and keeps three batches in flight, so one batch's
/// Qdrant requests overlap the others' summarizing, finish transaction and vector upsert (three measured about 13%
/// more windows/s than two in the pipeline bench).
pub fn batch_shape(ctx: &Context) -> (usize, usize) {
    let batch = ctx.cfg.sweep.enrichment_batch_size.max(1) as usize;
    match ctx.summarizer.kind() {
        SummarizerKind::Llm => (batch.min(ctx.cfg.llm.llm_concurrency.max(1)), 1),
        SummarizerKind::Extractive => (batch, 3),
    }
}

/// The windows a worker is working on (id and claimed version), whose leases a background task renews every third
/// of the lease until the window is finished (so a window waiting for a slow LLM is never claimed by another
/// replica), as long as the window is still at that version (a changed window's result will be thrown away: its
/// lease is let go). The same task writes the LLM spend settled meanwhile (running summaries and rollups have no
/// finish transaction of their own to carry it).
struct Heartbeat {
    ids: Arc<std::sync::Mutex<HashMap<i64, i32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    fn start(ctx: &Context, lease: Duration) -> Heartbeat {
        let ids: Arc<std::sync::Mutex<HashMap<i64, i32>>> = Arc::default();
        let (store, owner, held) = (ctx.store.clone(), ctx.instance.clone(), ids.clone());
        let ledger = ctx.summarizer.ledger();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                if let Some(l) = &ledger
                    && let Err(e) = l.flush().await
                {
                    warn!(error = %e, "cannot write the LLM spend; retrying");
                }
                let now: Vec<(i64, i32)> = lock(&held).iter().map(|(k, v)| (*k, *v)).collect();
                if now.is_empty() {
                    continue;
                }
                match store.renew_leases(&owner, &now, lease).await {
                    Ok(kept) if kept.len() < now.len() => {
                        debug!(
                            lost = now.len() - kept.len(),
                            "window leases lost (finished meanwhile, or taken after expiring)"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot renew window leases; retrying"),
                }
            }
        });
        Heartbeat { ids, task }
    }

    /// Adds a window; false when it is being worked on here already.
    fn add(&self, w: &ClaimedWindow) -> bool {
        use std::collections::hash_map::Entry;
        match lock(&self.ids).entry(w.id) {
            Entry::Occupied(_) => false,
            Entry::Vacant(e) => {
                e.insert(w.version);
                true
            }
        }
    }

    fn remove(&self, id: i64) {
        lock(&self.ids).remove(&id);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Processes every due window that can be claimed now, then returns how many were finished (`sweep --once`,
/// `backfill`). Windows waiting for a retry time are left for a later run. `progress` is called after each batch with
/// the count so far. Claims batches as [`batch_shape`] says (so with the LLM summarizer only what runs at once), and
/// renews their leases while they run.
pub async fn drain_due(
    ctx: &Context,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<usize, StoreError> {
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let (limit, in_flight) = batch_shape(ctx);
    let heartbeat = Heartbeat::start(ctx, lease);
    let finished = std::sync::atomic::AtomicUsize::new(0);
    let lane = || async {
        loop {
            if ctx.summarizer.ready().await.is_err() {
                // the LLM is down or the budget spent: what is left waits for the service (or the next run)
                return Ok::<(), StoreError>(());
            }
            let (claimed, points) = ctx
                .store
                .claim_due_with_points(&ctx.instance, lease, limit as i64)
                .await?;
            if claimed.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = claimed.iter().map(|w| w.id).collect();
            for w in &claimed {
                heartbeat.add(w);
            }
            let r = process_claimed(ctx, claimed, Some(points), &|_| {}).await;
            for id in &ids {
                heartbeat.remove(*id);
            }
            let n = r?.len();
            let total = finished.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            progress(total);
        }
    };
    futures::future::try_join_all((0..in_flight).map(|_| lane())).await?;
    if let Some(l) = ctx.summarizer.ledger()
        && let Err(e) = l.flush().await
    {
        warn!(error = %e, "cannot write the LLM spend of the last calls");
    }
    Ok(finished.into_inner())
}

/// Claims and processes due windows until `shutdown`; in-flight windows get `grace` to finish, then their leases are
/// released.
///
/// Lease rules: a worker claims only as many windows as it has free slots, so every claimed window starts at once
/// (with the LLM summarizer LLM_CONCURRENCY slots, a slot free again when its window's call returned; with the
/// extractive one three batches of ENRICHMENT_BATCH_SIZE, see [`batch_shape`]); the windows of one claim are one batch
/// ([`process_windows`]); a heartbeat renews the leases of the windows it works on; right before an LLM call the
/// window's lease is extended, and a window whose lease is no longer this worker's is not sent. While the summarizer
/// is not ready (LLM circuit open, budget spent) nothing is claimed or fetched, with a jittered back-off that shutdown
/// interrupts.
pub async fn run_workers(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let (batch, in_flight) = batch_shape(&ctx);
    let llm = ctx.summarizer.kind() == SummarizerKind::Llm;
    let slots = Arc::new(tokio::sync::Semaphore::new(batch * in_flight));
    let heartbeat = Arc::new(Heartbeat::start(&ctx, lease));
    let hard_stop = CancellationToken::new();
    let grace = ctx.cfg.service.shutdown_grace;
    {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            hard_stop.cancel();
        });
    }
    let new_backoff = || loop_backoff(Duration::from_millis(300), Duration::from_secs(30));
    let mut backoff = new_backoff();
    let mut tasks = tokio::task::JoinSet::new();
    while !shutdown.is_cancelled() {
        while let Some(r) = tasks.try_join_next() {
            if let Err(e) = r {
                warn!(error = %e, "a window task panicked; its lease will expire and it will be retried");
            }
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the worker semaphore is never closed"),
        };
        if let Err(e) = ctx.summarizer.ready().await {
            drop(first);
            let wait = backoff.next().unwrap_or(Duration::from_secs(30));
            debug!(error = %e, wait_ms = wait.as_millis() as u64, "summarizer not ready; claiming nothing");
            if sleep_or_shutdown(&shutdown, wait).await {
                break;
            }
            continue;
        }
        let mut permits = vec![first];
        // With the LLM summarizer slots come free one call at a time: a claim waits a little (CLAIM_GATHER) for half
        // a batch of them, so windows are claimed, fetched, leased and finished in batches, not one by one.
        let gather_until = tokio::time::Instant::now() + CLAIM_GATHER;
        let enough = if llm { batch.div_ceil(2) } else { 1 };
        loop {
            while permits.len() < batch {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            if permits.len() >= enough || tokio::time::Instant::now() >= gather_until {
                break;
            }
            match tokio::time::timeout_at(gather_until, slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => permits.push(p),
                _ => break,
            }
        }
        let claimed = match ctx
            .store
            .claim_due_with_points(&ctx.instance, lease, permits.len() as i64)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                drop(permits);
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(error = %e, wait_ms = wait.as_millis() as u64, "cannot claim windows; retrying");
                if sleep_or_shutdown(&shutdown, wait).await {
                    break;
                }
                continue;
            }
        };
        backoff = new_backoff();
        let (claimed, mut points) = claimed;
        if claimed.is_empty() {
            // No window due: the free slots build due running summaries of open windows (CONTEXT_SUMMARY_EVERY);
            // window work keeps priority, since they are claimed only after an empty window claim.
            if ctx.cfg.windows.context_summary_every > 0 {
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    if let Err(e) = super::running::run_due_running(&ctx, permits.len()).await {
                        warn!(error = %e, "running summaries not finished; their leases will expire");
                    }
                    drop(permits);
                });
            } else {
                drop(permits);
            }
            if sleep_or_shutdown(&shutdown, Duration::from_millis(300)).await {
                break;
            }
            continue;
        }
        let mut held = HashMap::new();
        let mut mine = Vec::with_capacity(claimed.len());
        for (w, permit) in claimed.into_iter().zip(permits) {
            if !heartbeat.add(&w) {
                points.remove(&w.id);
                continue; // already being worked on here (its lease had expired): one worker per window
            }
            held.insert(w.id, permit);
            mine.push(w);
        }
        if mine.is_empty() {
            continue;
        }
        let (ctx, heartbeat) = (ctx.clone(), heartbeat.clone());
        tasks.spawn(async move {
            let ids: Vec<i64> = mine.iter().map(|w| w.id).collect();
            let held = std::sync::Mutex::new(held);
            // An LLM slot is free again when its window's call returned; an extractive batch holds its slots until
            // it is finished.
            let release = |id: i64| {
                if llm {
                    lock(&held).remove(&id);
                }
            };
            if let Err(e) = process_claimed(&ctx, mine, Some(points), &release).await {
                warn!(windows = ids.len(), error = %e, "windows not finished; their leases will expire and they will be retried");
            }
            for id in ids {
                heartbeat.remove(id);
            }
            drop(held);
        });
    }
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = hard_stop.cancelled() => tasks.abort_all(),
    }
    drop(heartbeat);
    if let Some(l) = ctx.summarizer.ledger()
        && let Err(e) = l.flush().await
    {
        warn!(error = %e, "cannot write the LLM spend of the last calls");
    }
    if let Err(e) = ctx.store.release_running_leases(&ctx.instance).await {
        warn!(error = %e, "could not release running-summary leases (they expire by themselves)");
    }
    match ctx.store.release_leases(&ctx.instance).await {
        Ok(n) if n > 0 => info!(released = n, "released window leases"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not release window leases (they expire by themselves)"),
    }
    Ok(())
}
