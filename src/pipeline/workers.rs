//! The window workers: claim due windows with a lease, keep the leases alive while working, fetch, summarize and
//!
//! Files: `workers.rs` a claimed batch (fetch, summarize, finish: `process_claimed`); `workers/window.rs` one
//! window's points into its summary (`summarize_window`, the retry outcomes, `LeaseGate`); `workers/run.rs` the claim
//! loop and the lease heartbeat (`run_workers`, `drain_due`).
//! finish them in batches (one claim, one Qdrant retrieve and scroll, one finish transaction for many windows).

mod finish;
mod run;
mod window;

pub use finish::Finisher;
pub use run::{batch_shape, drain_due, run_workers};
pub use window::summarize_window;
use window::{
    LeaseGate, Prepared, fetch_failed, lease_lost, not_ready, prepare, retry, retry_delay,
    running_of, summarize_prepared,
};

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::{Instrument, debug, info, info_span, warn};

use super::{Context, now_ms};
use crate::fetch::{Fetched, WindowQuery};
use crate::sink::{ClaimedWindow, Finished, HeldWindow, StoreError, WindowOutcome};
use crate::summarize::SummarizerKind;

/// A window of a batch after the fetch: its points, or already its outcome (the fetch failed).
enum Got {
    Fetched(Fetched),
    Done(Prepared),
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
                        .map(|_| Got::Done(Prepared::Outcome(fetch_failed(ctx, &e))))
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
            let ready = |_: usize, f: Fetched| Got::Fetched(f);
            let results: Vec<Got> = match ctx.points.fetch_windows(&colls, &queries).await {
                Ok(r) => idx.iter().zip(r).map(|(&i, f)| ready(i, f)).collect(),
                Err(e) if e.is_invalid_request() && queries.len() > 1 => {
                    let mut one_by_one = Vec::with_capacity(queries.len());
                    for (&i, q) in idx.iter().zip(&queries) {
                        let r = ctx
                            .points
                            .fetch_window(&colls, q.ids, q.user_id, q.range_ms);
                        one_by_one.push(match r.await {
                            Ok(f) => ready(i, f),
                            Err(e) => Got::Done(Prepared::Outcome(fetch_failed(ctx, &e))),
                        });
                    }
                    one_by_one
                }
                Err(e) => queries
                    .iter()
                    .map(|_| Got::Done(Prepared::Outcome(fetch_failed(ctx, &e))))
                    .collect(),
            };
            (idx, results)
        }
    });
    let mut out: Vec<Option<Got>> = windows.iter().map(|_| None).collect();
    for (idx, results) in futures::future::join_all(groups).await {
        for (i, p) in idx.into_iter().zip(results) {
            out[i] = Some(p);
        }
    }
    // Points a scroll found that no event named, but that another window of the key covers (issue 24, case 1).
    let mut extra: Vec<(&ClaimedWindow, &str)> = Vec::new();
    for (w, f) in windows.iter().zip(&out) {
        if let Some(Got::Fetched((messages, _))) = f {
            let named: HashSet<&str> = ids_of(w).iter().map(String::as_str).collect();
            extra.extend(
                messages
                    .iter()
                    .filter(|m| !named.contains(m.point_id.as_str()))
                    .map(|m| (w, m.point_id.as_str())),
            );
        }
    }
    let elsewhere = ctx.store.covered_elsewhere(&extra).await?;
    windows
        .iter()
        .zip(out)
        .map(|(w, f)| match f {
            Some(Got::Fetched((mut messages, skipped))) => {
                if !elsewhere.is_empty() {
                    messages.retain(|m| !elsewhere.contains(&(w.id, m.point_id.clone())));
                }
                Ok(prepare(ctx, w, ids_of(w), (messages, skipped)))
            }
            Some(Got::Done(p)) => Ok(p),
            None => Err(StoreError::Invariant(
                "a window of the batch was not fetched",
            )),
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
/// retrieve and scroll, one lease extension for all n right before their calls (none after a fresh claim in
/// `run_workers`, see [`process_claimed_in`]), the n calls (a budget reservation only every LLM_CONCURRENCY calls:
/// [`crate::budget`]), one finish transaction that also writes the calls' costs (in `run_workers` a group's, shared
/// with the batches finishing at the same time), then the summary vectors. A retry or repair call adds one lease
/// check each.
pub async fn process_claimed(
    ctx: &Context,
    windows: Vec<ClaimedWindow>,
    ids: Option<HashMap<i64, Vec<String>>>,
    release: &(dyn Fn(i64) + Sync),
) -> Result<Vec<(i64, Finished)>, StoreError> {
    process_claimed_in(ctx, windows, ids, release, None, None).await
}

/// A claim younger than this (and than a tenth of the lease) needs no lease extension before its calls: the claim
/// set the lease and read the version itself (see [`process_claimed_in`]).
const FRESH_CLAIM: Duration = Duration::from_secs(1);

/// [`process_claimed`] as `run_workers` calls it: `claimed_at` is when the claim statement returned (a claim still
/// fresh right before the calls counts as their lease extension: its lease is as long, its versions as recent as
/// the extension's would be, so the extension's round trip is left out), and `finisher` finishes the batch in a
/// group with the others waiting and syncs the summary vectors afterwards ([`finish::Finisher`]).
pub(super) async fn process_claimed_in(
    ctx: &Context,
    windows: Vec<ClaimedWindow>,
    ids: Option<HashMap<i64, Vec<String>>>,
    release: &(dyn Fn(i64) + Sync),
    claimed_at: Option<std::time::Instant>,
    finisher: Option<&finish::Finisher>,
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
    let fresh = claimed_at.is_some_and(|t| t.elapsed() < FRESH_CLAIM.min(lease / 10));
    if llm && !fresh {
        let to_call: Vec<HeldWindow> = windows
            .iter()
            .zip(&prepared)
            .filter(|(_, p)| matches!(p, Prepared::Input { .. }))
            .map(|(w, _)| HeldWindow {
                id: w.id,
                version: w.version,
            })
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
    let mut synced = finisher.is_some();
    let result = match finisher {
        Some(f) => f.finish(&batch).await,
        None => finish_batch(ctx, &batch, lease).await,
    };
    let finished: Vec<(&ClaimedWindow, WindowOutcome, Finished)> = match result {
        Ok(f) => todo
            .into_iter()
            .zip(f)
            .map(|((w, o), f)| (w, o, f))
            .collect(),
        Err(e) if e.is_connection() => return Err(e),
        Err(e) => {
            debug!(error = %e, windows = todo.len(), "the batch cannot be finished at once; one by one");
            synced = false;
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
    if !synced {
        crate::vectors::on_summarized_many(&ctx.store, ctx.points.client(), &vectors).await;
    }
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
