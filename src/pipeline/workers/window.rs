//! One window: its fetched points prepared, summarized (with its running summary), the outcome of a failure, and
//! the `LeaseGate` every later call attempt asks first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::window_span;
use crate::fetch::{FetchError, Fetched, SkipReason};
use crate::pipeline::{Context, jittered, now_ms};
use crate::sink::{ClaimedWindow, StoreError, StoredRunning, WindowOutcome};
use crate::summarize::{CallGate, Purpose, SummarizeError, SummarizerKind, WindowInput};

/// How long after its close a window whose named points Qdrant does not show yet waits for them (issue 24 case 9):
/// the bots store a point before publishing its event, so a named point missing this long after the window closed
/// is not a visibility delay (deleted, or written elsewhere); the window then proceeds with what is visible.
pub const MISSING_POINTS_WAIT: Duration = Duration::from_secs(30);
/// The delay before a window waiting for its named points is claimed again (jittered); so it is tried at most about
/// `MISSING_POINTS_WAIT / MISSING_POINTS_RETRY` times.
pub const MISSING_POINTS_RETRY: Duration = Duration::from_secs(2);

/// Back-off for a window that failed: 5 s, 10 s, 20 s ... capped at 10 minutes.
pub(super) fn retry_delay(attempts: i32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1u64 << attempts.clamp(0, 7) as u32))
        .min(Duration::from_secs(600))
}

pub(super) fn retry(ctx: &Context, error: String, delay: Duration, counts: bool) -> WindowOutcome {
    WindowOutcome::Retry {
        error,
        delay,
        counts,
        max_attempts: ctx.cfg.llm.llm_max_attempts as i32,
    }
}

/// A window the summarizer could not take now (LLM circuit open, budget spent): it waits, uncounted.
pub(super) fn not_ready(ctx: &Context, e: impl std::fmt::Display) -> WindowOutcome {
    retry(ctx, e.to_string(), jittered(Duration::from_secs(5)), false)
}

/// Qdrant unreachable: the window waits, it is not failed for the outage; a missing collection or a request Qdrant
/// rejects counts.
pub(super) fn fetch_failed(ctx: &Context, e: &FetchError) -> WindowOutcome {
    let counts = matches!(e, FetchError::NoCollection(_)) || e.is_invalid_request();
    metrics::counter!("recap_fetch_errors_total").increment(1);
    retry(ctx, e.to_string(), jittered(Duration::from_secs(5)), counts)
}

/// A claimed window after its fetch: its outcome already (too short, fetch failed), or what the summarizer gets.
pub(super) enum Prepared {
    Outcome(WindowOutcome),
    Input {
        input: WindowInput,
        extra: Vec<crate::sink::NewMessage>,
        message_count: i32,
    },
}

/// From a window's fetched messages to what the summarizer gets.
pub(super) fn prepare(
    ctx: &Context,
    w: &ClaimedWindow,
    ids: &[String],
    fetched: Fetched,
) -> Prepared {
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
pub(super) async fn summarize_prepared(
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
    let (result, from_running) = crate::pipeline::running::summarize_from(
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
pub(super) fn lease_lost(ctx: &Context) -> WindowOutcome {
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
pub(super) struct LeaseGate {
    store: crate::sink::Store,
    owner: String,
    window: ClaimedWindow,
    lease: Duration,
    checked: std::sync::atomic::AtomicBool,
}

impl LeaseGate {
    pub(super) fn for_window(
        ctx: &Context,
        w: &ClaimedWindow,
        lease: Duration,
    ) -> Arc<dyn CallGate> {
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
pub(super) async fn running_of(
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
