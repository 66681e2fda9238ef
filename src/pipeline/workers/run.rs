//! The claim loop of the window workers (`run_workers`, `drain_due`) and the heartbeat that renews the leases of the
//! windows in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pipeline::{Context, loop_backoff, sleep_or_shutdown};
use crate::sink::{Claim, ClaimedWindow, HeldWindow, StoreError};
use crate::summarize::SummarizerKind;

use super::finish::Finisher;
use super::{process_claimed, process_claimed_in};

/// How long a worker waits after a claim found nothing due, unless this process's ingest commits due windows
/// meanwhile ([`crate::sink::Store::windows_due`]).
const IDLE_POLL: Duration = Duration::from_millis(300);

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
                let now: Vec<HeldWindow> = lock(&held)
                    .iter()
                    .map(|(&id, &version)| HeldWindow { id, version })
                    .collect();
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
            let Claim {
                windows: claimed,
                point_ids: points,
            } = ctx
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
    // With the LLM summarizer a batch's slots are free when its calls returned, so its finish can wait for a group
    // (`Finisher`); an extractive batch holds its slots until it is finished, and its three batches in flight finish
    // concurrently, each in its own transaction, as before.
    let (finisher, finisher_task) = match llm {
        true => {
            let (f, t) = Finisher::start(&ctx, lease);
            (Some(f), Some(t))
        }
        false => (None, None),
    };
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
            Ok(c) => (c, std::time::Instant::now()),
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
        let (
            Claim {
                windows: claimed,
                point_ids: mut points,
            },
            claimed_at,
        ) = claimed;
        if claimed.is_empty() {
            // No window due: the free slots build due running summaries of open windows (CONTEXT_SUMMARY_EVERY);
            // window work keeps priority, since they are claimed only after an empty window claim.
            if ctx.cfg.windows.context_summary_every > 0 {
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    if let Err(e) = crate::pipeline::running::run_due_running(&ctx, permits.len()).await {
                        warn!(error = %e, "running summaries not finished; their leases will expire");
                    }
                    drop(permits);
                });
            } else {
                drop(permits);
            }
            // until the next poll, or until this process's ingest commits due windows
            let stop = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = ctx.store.due_now(IDLE_POLL) => false,
            };
            if stop {
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
        let (ctx, heartbeat, finisher) = (ctx.clone(), heartbeat.clone(), finisher.clone());
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
            let r = process_claimed_in(
                &ctx,
                mine,
                Some(points),
                &release,
                Some(claimed_at),
                finisher.as_ref(),
            )
            .await;
            if let Err(e) = r {
                warn!(windows = ids.len(), error = %e, "windows not finished; their leases will expire and they will be retried");
            }
            for id in ids {
                heartbeat.remove(id);
            }
            drop(held);
        });
    }
    // the batches, then the finisher (the last group's transaction and vectors)
    drop(finisher);
    let abort = finisher_task.as_ref().map(|t| t.abort_handle());
    tokio::select! {
        _ = async {
            while tasks.join_next().await.is_some() {}
            if let Some(t) = finisher_task {
                let _ = t.await;
            }
        } => {}
        _ = hard_stop.cancelled() => {
            tasks.abort_all();
            if let Some(a) = abort {
                a.abort();
            }
        }
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
