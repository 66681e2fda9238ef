//! The window workers: claim due windows with a lease, keep the leases alive while working, fetch, summarize and
//! finish each window in one transaction.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Context, jittered, loop_backoff, now_ms, sleep_or_shutdown};
use crate::fetch::FetchError;
use crate::sink::{ClaimedWindow, Finished, StoreError, WindowOutcome};
use crate::summarize::{SummarizeError, WindowInput};

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
    // No fetch while the summarizer could not take the window (LLM circuit open, budget spent): it waits, uncounted.
    if let Err(e) = ctx.summarizer.ready().await {
        return Ok(WindowOutcome::Retry {
            error: e.to_string(),
            delay: jittered(Duration::from_secs(5)),
            counts: false,
            max_attempts: cfg.llm.llm_max_attempts as i32,
        });
    }
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
                delay: jittered(Duration::from_secs(5)),
                counts,
                max_attempts: cfg.llm.llm_max_attempts as i32,
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
    if (messages.len() as u32) < cfg.windows.min_messages_for_summary {
        return Ok(WindowOutcome::TooShort { message_count });
    }
    // The window's bounds are its stored points' times (messages are sorted by time), not the events' times.
    let span = match (messages.first(), messages.last()) {
        (Some(f), Some(l)) => (f.ts_ms, l.ts_ms),
        _ => (w.start_ms, w.end_ms),
    };
    let input = WindowInput {
        bot: w.bot.clone(),
        user_id: w.user_id.clone(),
        start_ms: span.0,
        end_ms: span.1,
        messages,
    };
    let text_chars = input.text_chars();
    // Never call the LLM for a lease that is not ours any more: extend it right before the call (the heartbeat keeps
    // it while the call runs). A lost lease or a changed window is written as nothing (`finish_window` finds it stale).
    let lease = Duration::from_secs(cfg.service.lease_seconds.into());
    if !ctx.store.extend_lease(&ctx.instance, w, lease).await? {
        metrics::counter!("recap_window_leases_lost_total").increment(1);
        return Ok(WindowOutcome::Retry {
            error: "lease lost or window changed before the summarizer call".into(),
            delay: Duration::ZERO,
            counts: false,
            max_attempts: cfg.llm.llm_max_attempts as i32,
        });
    }
    match ctx.summarizer.summarize(&input).await {
        Ok(summary) => Ok(WindowOutcome::Summarized {
            summary,
            covered: input.messages.iter().map(|m| m.point_id.clone()).collect(),
            extra,
            message_count,
            text_chars,
            span,
            centroid: crate::recall::vectors::centroid(&input.messages),
        }),
        Err(SummarizeError::Empty) => Ok(WindowOutcome::TooShort { message_count }),
        Err(SummarizeError::Unavailable(e)) => Ok(WindowOutcome::Retry {
            error: e,
            delay: jittered(Duration::from_secs(5)),
            counts: false,
            max_attempts: cfg.llm.llm_max_attempts as i32,
        }),
        Err(e @ (SummarizeError::Failed(_) | SummarizeError::Invalid(_))) => {
            Ok(WindowOutcome::Retry {
                error: e.to_string(),
                delay: retry_delay(w.attempts),
                counts: true,
                max_attempts: cfg.llm.llm_max_attempts as i32,
            })
        }
    }
}

/// Processes one claimed window end to end, within a span naming it. A result that cannot be stored for a reason
/// that will not go away (a NUL in text, a value too long for its column) counts as a failed attempt toward
/// LLM_MAX_ATTEMPTS and the dead state, instead of a new claim (and a new LLM call) forever.
pub async fn process_window(ctx: &Context, w: ClaimedWindow) -> Result<Finished, StoreError> {
    let span = info_span!("window", id = w.id, bot = %w.bot, user = %w.user_id, start = %crate::sink::to_utc(w.start_ms).to_rfc3339());
    async move {
        let outcome = summarize_window(ctx, &w).await?;
        let (outcome, finished) = match ctx.store.finish_window(&ctx.instance, &w, &outcome).await {
            Err(e) if e.is_repeatable() => {
                warn!(error = %e, "the window's result cannot be stored; counted as a failed attempt");
                metrics::counter!("recap_window_write_errors_total").increment(1);
                let retry = WindowOutcome::Retry {
                    error: format!("the result cannot be stored: {e}"),
                    delay: retry_delay(w.attempts),
                    counts: true,
                    max_attempts: ctx.cfg.llm.llm_max_attempts as i32,
                };
                let finished = ctx.store.finish_window(&ctx.instance, &w, &retry).await?;
                (retry, finished)
            }
            r => (outcome, r?),
        };
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

/// The windows a worker is working on, whose leases a background task renews every third of the lease until the
/// window is finished (so a window waiting for a slow LLM is never claimed by another replica).
struct Heartbeat {
    ids: Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    fn start(ctx: &Context, lease: Duration) -> Heartbeat {
        let ids: Arc<std::sync::Mutex<std::collections::HashSet<i64>>> = Arc::default();
        let (store, owner, held) = (ctx.store.clone(), ctx.instance.clone(), ids.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let now: Vec<i64> = lock(&held).iter().copied().collect();
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
    fn add(&self, id: i64) -> bool {
        lock(&self.ids).insert(id)
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
/// `backfill`). Windows waiting for a retry time are left for a later run. `progress` is called after each window.
/// Claims only as many windows as run at once, and renews their leases while they run.
pub async fn drain_due(
    ctx: &Context,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<usize, StoreError> {
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let concurrency = ctx.cfg.llm.llm_concurrency.max(1);
    let limit = i64::from(ctx.cfg.sweep.enrichment_batch_size.max(1)).min(concurrency as i64);
    let heartbeat = Heartbeat::start(ctx, lease);
    let mut finished = 0usize;
    loop {
        if ctx.summarizer.ready().await.is_err() {
            // the LLM is down or the budget spent: what is left waits for the service (or the next run)
            return Ok(finished);
        }
        let claimed = ctx.store.claim_due(&ctx.instance, lease, limit).await?;
        if claimed.is_empty() {
            return Ok(finished);
        }
        for w in &claimed {
            heartbeat.add(w.id);
        }
        let results: Vec<Result<Finished, StoreError>> = futures::stream::iter(claimed)
            .map(|w| {
                let hb = &heartbeat;
                async move {
                    let id = w.id;
                    let r = process_window(ctx, w).await;
                    hb.remove(id);
                    r
                }
            })
            .buffer_unordered(concurrency)
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
///
/// Lease rules: a worker claims only as many windows as it has free slots (LLM_CONCURRENCY), so every claimed window
/// starts at once; a heartbeat renews the leases of the windows it works on; right before the LLM call the lease is
/// extended, and a window whose lease is no longer this worker's is not sent. While the summarizer is not ready (LLM
/// circuit open, budget spent) nothing is claimed or fetched, with a jittered back-off that shutdown interrupts.
pub async fn run_workers(ctx: Context, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let batch = ctx.cfg.sweep.enrichment_batch_size.max(1) as usize;
    let concurrency = ctx.cfg.llm.llm_concurrency.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
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
        while permits.len() < batch {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let claimed = match ctx
            .store
            .claim_due(&ctx.instance, lease, permits.len() as i64)
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
        if claimed.is_empty() {
            drop(permits);
            if sleep_or_shutdown(&shutdown, Duration::from_millis(300)).await {
                break;
            }
            continue;
        }
        for (w, permit) in claimed.into_iter().zip(permits) {
            if !heartbeat.add(w.id) {
                continue; // already being worked on here (its lease had expired): one worker per window
            }
            let (ctx, heartbeat) = (ctx.clone(), heartbeat.clone());
            tasks.spawn(async move {
                let id = w.id;
                if let Err(e) = process_window(&ctx, w).await {
                    warn!(window = id, error = %e, "window not finished; its lease will expire and it will be retried");
                }
                heartbeat.remove(id);
                drop(permit);
            });
        }
    }
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        _ = hard_stop.cancelled() => tasks.abort_all(),
    }
    drop(heartbeat);
    match ctx.store.release_leases(&ctx.instance).await {
        Ok(n) if n > 0 => info!(released = n, "released window leases"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not release window leases (they expire by themselves)"),
    }
    Ok(())
}
