//! The ingest loop of a partition: leads it when it can, batches into memory, checkpoints, acks, hands it back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Ingest;
use super::leader::renewing;
use crate::pipeline::{Clock, Context, Share, SystemClock, loop_backoff, sleep_or_shutdown};
use crate::sink::StoreError;
use crate::source::{Source, SourceError};

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
    source: S,
    shutdown: CancellationToken,
    opts: IngestLoop,
) -> anyhow::Result<()> {
    run_partition(ctx, 0, None, source, shutdown, opts).await
}

/// The ingest loop of partition `part`: leads it whenever it can (within this replica's `share`, if any), batches
/// into memory, checkpoints, acks; gives the partition back when the share says so, or on shutdown.
pub async fn run_partition<S: Source>(
    ctx: Context,
    part: u32,
    share: Option<&Share>,
    mut source: S,
    shutdown: CancellationToken,
    opts: IngestLoop,
) -> anyhow::Result<()> {
    // This partition's lease went (given back or lost): it no longer counts towards this replica's share.
    let released = || {
        if let Some(share) = share {
            share.released(part);
        }
    };
    let new_backoff = || loop_backoff(opts.backoff_min, opts.backoff_max);
    let mut backoff = new_backoff();
    let next_wait =
        move |b: &mut dyn Iterator<Item = Duration>| b.next().unwrap_or(opts.backoff_max);
    let ttl = Duration::from_secs(ctx.cfg.service.leader_lease_seconds.into());
    'lead: loop {
        // A partition handed back because its source kept failing is taken again only once the source answers.
        if let Some(share) = share
            && !share.source_is_ok(part)
        {
            match source.probe().await {
                Ok(()) => share.source_ok(part),
                Err(e) => {
                    let wait = next_wait(&mut backoff);
                    debug!(partition = part, error = %e, "the partition's source is still unavailable");
                    if sleep_or_shutdown(&shutdown, wait).await {
                        return Ok(());
                    }
                    continue 'lead;
                }
            }
        }
        let mut ingest = match Ingest::start_partition(ctx.clone(), part, share, &shutdown).await {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(()),
            Err(e) => {
                let wait = next_wait(&mut backoff);
                warn!(error = %e, wait_ms = wait.as_millis() as u64, "cannot restore the ingest state from Postgres; retrying");
                if sleep_or_shutdown(&shutdown, wait).await {
                    return Ok(());
                }
                continue 'lead;
            }
        };
        // The state is the last checkpoint's: the source goes back to the position stored with it (under this lease).
        source.lead(Some(ingest.lease.clone()));
        if let Err(e) = source.rewind(&ctx.store).await {
            let wait = next_wait(&mut backoff);
            warn!(error = %e, wait_ms = wait.as_millis() as u64, "cannot rewind the source to the checkpoint; retrying");
            ingest.release().await;
            released();
            if sleep_or_shutdown(&shutdown, wait).await {
                return Ok(());
            }
            continue 'lead;
        }
        let mut failing_since: Option<Instant> = None;
        loop {
            let next = renewing(&ingest.lease, source.next_batch());
            let batch = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Graceful: what was read is checkpointed and acknowledged before the lease goes back.
                    ingest.hand_back(&mut source).await;
                    released();
                    return Ok(());
                }
                b = next => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "lost the ingest lease while waiting for a batch; stepping down");
                    source.abandon().await;
                    released();
                    continue 'lead;
                }
            };
            let batch = match batch {
                Ok(b) => b,
                Err(SourceError::Deposed) => {
                    // Its own clock says the lease ran out (a pause past it), or another epoch leads: it stopped
                    // pulling already; what it read is not acknowledged (the next leader reads it again).
                    warn!(
                        partition = part,
                        "no longer the partition's leader; stepping down"
                    );
                    metrics::counter!("recap_partitions_handed_back_total", "reason" => "deposed")
                        .increment(1);
                    source.abandon().await;
                    released();
                    continue 'lead;
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if let Some(share) = share
                        && since.elapsed() >= ttl / 3
                        && share.others_can_ingest()
                    {
                        // A leader that cannot read its partition hands it back (what it read is checkpointed),
                        // and the replica counts in nobody's share until a source of its works again: another
                        // replica leads the partition meanwhile (issue 24, case 11). Alone, it keeps it and retries.
                        warn!(partition = part, error = %e, "the partition's source keeps failing: handing it back");
                        metrics::counter!("recap_partitions_handed_back_total", "reason" => "source").increment(1);
                        ingest.hand_back(&mut source).await;
                        share.source_failed(part);
                        released();
                        continue 'lead;
                    }
                    let wait = next_wait(&mut backoff);
                    warn!(error = %e, wait_ms = wait.as_millis() as u64, "source unavailable; retrying");
                    if sleep_or_shutdown(&shutdown, wait).await {
                        ingest.release().await;
                        released();
                        return Ok(());
                    }
                    continue;
                }
            };
            failing_since = None;
            let result = ingest.step(&mut source, &batch, opts.clock.now_ms()).await;
            match result {
                Ok(()) => {
                    backoff = new_backoff();
                    if let Some(share) = share {
                        share.source_ok(part);
                    }
                    if let Some(share) = share
                        && share.must_give_back(part)
                    {
                        info!(
                            partition = part,
                            "more partitions than the fair share: handing this one back"
                        );
                        ingest.hand_back(&mut source).await;
                        share.released(part);
                        // Long enough for a replica under its share to take it (they look every third of the lease).
                        if sleep_or_shutdown(&shutdown, ingest.fence.ttl).await {
                            return Ok(());
                        }
                        continue 'lead;
                    }
                }
                Err(StoreError::LostLeadership(epoch)) => {
                    warn!(epoch, "lost the ingest lease; stepping down");
                    source.abandon().await;
                    released();
                    continue 'lead;
                }
                Err(e) => {
                    // The state is restored from the last checkpoint and the source rewound to it, by whichever
                    // replica leads the partition next: the lease is given back (it may be gone already, expired
                    // while Postgres was away) and the partition leaves this replica's share at once, so the share
                    // never counts a partition this replica does not lead (issue 24, case 10).
                    source.abandon().await;
                    ingest.release().await;
                    released();
                    metrics::counter!("recap_partitions_handed_back_total", "reason" => "checkpoint")
                        .increment(1);
                    let wait = next_wait(&mut backoff);
                    warn!(error = %e, wait_ms = wait.as_millis() as u64, "checkpoint not committed; restoring the last one");
                    if sleep_or_shutdown(&shutdown, wait).await {
                        return Ok(());
                    }
                    continue 'lead;
                }
            }
        }
    }
}
