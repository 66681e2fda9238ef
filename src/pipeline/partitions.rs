//! Ingest partitions shared between replicas (`NATS_PARTITIONS`): each replica runs one ingest loop per partition
//! ([`super::ingest::run_partition`]); a loop leads its partition only while the replica holds less than its fair
//! share, `ceil(partitions / live replicas)`, and hands a partition back (checkpoint, acks, lease released) when it
//! holds more. Live replicas are the ones whose heartbeat (`recap_ingest_members`) is younger than the lease and says
//! they can ingest (a source of theirs works), so a dead replica's partitions are free, and taken, within
//! `LEADER_LEASE_SECONDS` plus a third of it, and a replica that cannot reach NATS holds no share (issue 24, case 11).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Context, IngestLoop, run_partition, sleep_or_shutdown};
use crate::sink::{Fence, StoreError};
use crate::source::{Source, SourceError};

/// This replica's share of the partitions: how many it should lead, and which it leads.
#[derive(Debug)]
pub struct Share {
    partitions: usize,
    target: AtomicUsize,
    /// The replicas the last heartbeat counted (this one and the others alive that can ingest).
    live: AtomicUsize,
    held: Mutex<BTreeSet<u32>>,
    /// Per partition, whether its source was last seen working (`true`: opened, read or probed; `false`: failing long
    /// enough that its lease was handed back; absent: not known). The replica can ingest while one is `true`.
    health: Mutex<BTreeMap<u32, bool>>,
    /// Serializes this replica's takes, so two loops never both take the last place of the share.
    gate: tokio::sync::Mutex<()>,
}

impl Share {
    pub fn new(partitions: u32) -> Share {
        let partitions = partitions.max(1) as usize;
        Share {
            partitions,
            target: AtomicUsize::new(partitions),
            live: AtomicUsize::new(1),
            held: Mutex::new(BTreeSet::new()),
            health: Mutex::new(BTreeMap::new()),
            gate: tokio::sync::Mutex::new(()),
        }
    }

    /// The live replicas (this one included) changed: the fair share is `ceil(partitions / live)`.
    pub fn set_live(&self, live: usize) {
        self.live.store(live.max(1), Ordering::Relaxed);
        let target = self.partitions.div_ceil(live.max(1));
        let old = self.target.swap(target, Ordering::Relaxed);
        if old != target {
            info!(live, target, "ingest share");
        }
    }

    /// Another replica that can ingest is alive (one could lead what this one hands back).
    pub fn others_can_ingest(&self) -> bool {
        self.live.load(Ordering::Relaxed) > 1
    }

    pub fn target(&self) -> usize {
        self.target.load(Ordering::Relaxed)
    }

    /// Partitions this replica leads.
    pub fn held(&self) -> Vec<u32> {
        self.held.lock().expect("share").iter().copied().collect()
    }

    /// Partition `part`'s source works (it opened, read a batch, or answered a probe).
    pub fn source_ok(&self, part: u32) {
        self.health.lock().expect("share").insert(part, true);
    }

    /// Partition `part`'s source kept failing (its lease is handed back). What the other partitions' sources that
    /// this replica does not lead were last seen doing is no longer known: until one of its sources works again the
    /// replica cannot ingest, takes no partition and is not counted in the others' fair share.
    pub fn source_failed(&self, part: u32) {
        let held = self.held.lock().expect("share").clone();
        let mut health = self.health.lock().expect("share");
        health.retain(|p, _| held.contains(p));
        health.insert(part, false);
    }

    /// Whether partition `part`'s source is known to work.
    pub fn source_is_ok(&self, part: u32) -> bool {
        self.health.lock().expect("share").get(&part) == Some(&true)
    }

    /// Whether this replica can ingest: one of its sources works (what its heartbeat says, issue 24 case 11).
    pub fn can_ingest(&self) -> bool {
        self.health.lock().expect("share").values().any(|ok| *ok)
    }

    /// Takes partition `part`'s lease if this replica can ingest and is under its share (or leads it already) and the
    /// lease is free.
    pub async fn try_take(
        &self,
        ctx: &Context,
        part: u32,
        ttl: Duration,
    ) -> Result<Option<Fence>, StoreError> {
        let _gate = self.gate.lock().await;
        {
            let held = self.held.lock().expect("share");
            if !self.can_ingest() || (!held.contains(&part) && held.len() >= self.target()) {
                return Ok(None);
            }
        }
        let fence = ctx
            .store
            .try_acquire_partition(&ctx.instance, ttl, part as i32)
            .await?;
        if fence.is_some() {
            self.held.lock().expect("share").insert(part);
        }
        Ok(fence)
    }

    /// The partition's lease was given back or lost.
    pub fn released(&self, part: u32) {
        self.held.lock().expect("share").remove(&part);
    }

    /// This replica leads more than its share and `part` is the one to hand back (the highest it leads).
    pub fn must_give_back(&self, part: u32) -> bool {
        let held = self.held.lock().expect("share");
        held.len() > self.target() && held.last() == Some(&part)
    }
}

/// Runs ingest on this replica's share of `partitions` until `shutdown`: a heartbeat that keeps the share fair, and
/// one loop per partition over the source `make_source(k)` builds (JetStream partition k's consumer, plus in hybrid
/// mode a sweep of partition k's bots).
pub async fn run_partitioned<S, F, Fut>(
    ctx: Context,
    partitions: u32,
    make_source: F,
    shutdown: CancellationToken,
    opts: IngestLoop,
) -> anyhow::Result<()>
where
    S: Source + 'static,
    F: Fn(u32) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, SourceError>> + Send + 'static,
{
    let share = std::sync::Arc::new(Share::new(partitions));
    let ttl = Duration::from_secs(ctx.cfg.service.leader_lease_seconds.into());
    // First count the replicas, so a replica starting beside others does not take every partition first. (Its own
    // sources are not open yet: the others count it once they are, at its next heartbeat.)
    match ctx
        .store
        .ingest_heartbeat(&ctx.instance, ttl, share.can_ingest())
        .await
    {
        Ok(live) => share.set_live(live),
        Err(e) => warn!(error = %e, "ingest heartbeat failed"),
    }
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (ctx, share, stop) = (ctx.clone(), share.clone(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                if sleep_or_shutdown(&stop, ttl / 3).await {
                    break;
                }
                match ctx
                    .store
                    .ingest_heartbeat(&ctx.instance, ttl, share.can_ingest())
                    .await
                {
                    Ok(live) => share.set_live(live),
                    Err(e) => warn!(error = %e, "ingest heartbeat failed"),
                }
            }
            Ok(())
        });
    }
    for k in 0..partitions.max(1) {
        let make_source = make_source.clone();
        let (ctx, share, stop, opts) = (ctx.clone(), share.clone(), shutdown.clone(), opts.clone());
        tasks.spawn(async move {
            let source = loop {
                match make_source(k).await {
                    Ok(s) => {
                        share.source_ok(k);
                        break s;
                    }
                    Err(e) => {
                        warn!(partition = k, error = %e, "cannot open the partition's source; retrying");
                        if sleep_or_shutdown(&stop, Duration::from_secs(2)).await {
                            return Ok(());
                        }
                    }
                }
            };
            run_partition(ctx, k, Some(&share), source, stop, opts).await
        });
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "ingest partition loop ended");
                result = Err(e);
            }
            Err(e) => result = Err(e.into()),
        }
    }
    if let Err(e) = ctx.store.ingest_leave(&ctx.instance).await {
        warn!(error = %e, "could not leave ingest (the heartbeat expires by itself)");
    }
    result
}
