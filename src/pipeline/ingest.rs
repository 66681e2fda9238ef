//! The ingest shell: leader lease (taken, renewed during long steps, released), the tracker fed batch by batch, and
//! each batch's closed windows stored in the same transaction before the source acknowledges.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Clock, Context, Share, SystemClock, loop_backoff, sleep_or_shutdown};
use crate::sink::{Closing, DeadLetter, Fence, Lease, Store, StoreError};
use crate::source::nats::PartitionBy;
use crate::source::{Batch, Source, SourceError};
use crate::state::{Checkpoint, State};
use crate::tracker::{Millis, Observed, Tracker, TrackerConfig};

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
    lease: &Lease,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    tokio::pin!(fut);
    let period = (lease.fence().ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep(period) => match lease.renew().await {
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
    /// Closed windows recorded as too short to summarize (no worker ever sees them); counted by the checkpoint that
    /// stores them.
    pub too_short: usize,
}

/// The ingest side: the operator state (tracker + open points, `crate::state`) and the leader fence.
pub struct Ingest {
    pub ctx: Context,
    state: State,
    fence: Fence,
    /// The same lease as this process knows it (its own clock's end of the term; deposed): the source reads under it.
    lease: Lease,
    /// Dead letters read since the last checkpoint (stored with it).
    letters: Vec<DeadLetter>,
    /// Events read since the last checkpoint (messages, ignored events and dead letters).
    read: usize,
    last_checkpoint: Instant,
    /// The state may differ from Postgres (a checkpoint failed): restore it before anything else.
    stale: bool,
    /// A checkpoint being written while the next batches are read (one at a time, in order).
    writing: Option<Writing>,
}

/// A checkpoint transaction running in the background.
struct Writing {
    task: tokio::task::JoinHandle<Result<Closing, StoreError>>,
    started: Instant,
}

impl Ingest {
    /// Becomes the leader (waits until the lease is free) and restores the state from the last checkpoint.
    pub async fn start(
        ctx: Context,
        shutdown: &CancellationToken,
    ) -> Result<Option<Ingest>, StoreError> {
        Ingest::start_partition(ctx, 0, None, shutdown).await
    }

    /// Takes the lease of ingest partition `part` (waits until it is free and, with a `share`, until this replica
    /// holds less than its fair share) and restores the partition's state from its last checkpoint.
    pub async fn start_partition(
        ctx: Context,
        part: u32,
        share: Option<&Share>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Ingest>, StoreError> {
        let ttl = Duration::from_secs(ctx.cfg.service.leader_lease_seconds.into());
        loop {
            let sent = Instant::now();
            let taken = match share {
                Some(share) => share.try_take(&ctx, part, ttl).await,
                None => {
                    ctx.store
                        .try_acquire_partition(&ctx.instance, ttl, part as i32)
                        .await
                }
            };
            match taken {
                Ok(Some(fence)) => {
                    info!(partition = part, epoch = fence.epoch, "ingest leader");
                    let lease = Lease::new(ctx.store.clone(), fence.clone(), sent);
                    let restored = restore_fenced(&ctx, &lease).await;
                    let state = match restored {
                        Ok(Ok(state)) => state,
                        Ok(Err(e)) | Err(e) => {
                            if let Some(share) = share {
                                share.released(part);
                            }
                            return Err(e);
                        }
                    };
                    return Ok(Some(Ingest {
                        ctx,
                        state,
                        fence,
                        lease,
                        letters: Vec::new(),
                        read: 0,
                        last_checkpoint: Instant::now(),
                        stale: false,
                        writing: None,
                    }));
                }
                Ok(None) => debug!(
                    partition = part,
                    "another replica leads this partition, or this one has its share"
                ),
                Err(e) => warn!(error = %e, "cannot reach Postgres to take the ingest lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(ttl / 3) => {}
            }
        }
    }

    /// The ingest partition this leads.
    pub fn partition(&self) -> u32 {
        self.fence.part as u32
    }

    /// The tracker (read-only: tests and benches inspect it).
    pub fn tracker(&self) -> &Tracker {
        self.state.tracker()
    }

    /// Applies one batch and writes a checkpoint: when this returns `Ok`, the batch's effects are durable (one-shot
    /// commands and tests; the ingest loop checkpoints every `CHECKPOINT_INTERVAL` instead, see [`Ingest::absorb`]).
    pub async fn apply(&mut self, batch: &Batch, now: i64) -> Result<Applied, StoreError> {
        let mut a = self.absorb(batch, now).await?;
        let written = self.checkpoint().await?;
        a.too_short = written.too_short;
        // messages read again after their window closed were not new after all (de-duplicated at merge time)
        let again = written.already_stored.min(a.new);
        a.new -= again;
        a.duplicates += again;
        Ok(a)
    }

    /// Applies one batch to the in-memory state only: new messages, closed windows, watermarks and the source
    /// position wait for the next [`Ingest::checkpoint`], and the source may acknowledge only after it.
    pub async fn absorb(&mut self, batch: &Batch, now: i64) -> Result<Applied, StoreError> {
        if self.stale {
            self.state = restore_fenced(&self.ctx, &self.lease).await??;
            self.letters.clear();
            self.read = 0;
            self.stale = false;
        }
        let mut applied = Applied::default();
        self.read += batch.messages.len() + batch.ignored + batch.dead_letters.len();
        self.letters.extend(batch.dead_letters.iter().cloned());
        // A message stamped ahead of the wall clock (a host whose clock is fast) is tracked, and stored, at its
        // arrival time (`tracker::effective_time`): it cannot drag its bot's watermark past the wall clock. More than
        // a day ahead it is a dead letter, not a message (recorded once however often a sweep reads it again).
        for m in &batch.messages {
            if m.ts_ms > now.saturating_add(MAX_FUTURE_MS) {
                metrics::counter!("recap_events_malformed_total", "reason" => "future_timestamp")
                    .increment(1);
                self.letters.push(DeadLetter {
                    source: "ingest",
                    bot: Some(m.bot.clone()),
                    user_id: Some(m.user_id.clone()),
                    subject: Some(m.bot.clone()),
                    stream_seq: None,
                    raw: format!("{}/{}/{}/{}", m.bot, m.user_id, m.point_id, m.ts_ms).into_bytes(),
                    reason: format!(
                        "timestamp {} is more than a day in the future",
                        crate::sink::to_utc(m.ts_ms).to_rfc3339()
                    ),
                });
                continue;
            }
            match self.state.observe_from(
                &m.bot,
                &m.user_id,
                &m.point_id,
                m.ts_ms,
                now,
                !batch.swept,
            ) {
                Some(Observed::Accepted { late }) => {
                    applied.new += 1;
                    applied.late += usize::from(late);
                }
                Some(Observed::Duplicate) | None => applied.duplicates += 1,
            }
        }
        if batch.caught_up {
            if batch.held_back.is_empty() {
                self.state.tick(tick_time(batch, now));
            } else {
                self.state.tick_except(tick_time(batch, now), |b| {
                    batch.held_back.iter().any(|h| h == b)
                });
            }
        }
        applied.closed = self.state.close_due();
        if let Some((name, pos, read)) = &batch.checkpoint {
            self.state.set_position(name, *pos, *read);
        }
        metrics::counter!("recap_events_duplicate_total").increment(applied.duplicates as u64);
        metrics::counter!("recap_events_ignored_total").increment(batch.ignored as u64);
        metrics::counter!("recap_events_late_total").increment(applied.late as u64);
        metrics::counter!("recap_windows_closed_total").increment(applied.closed as u64);
        Ok(applied)
    }

    /// A checkpoint is due after a batch: with something to store, when the source is caught up (nothing more is
    /// waiting: store it now, as fresh as it gets) or `CHECKPOINT_INTERVAL` passed since the last one; or when
    /// `CHECKPOINT_MESSAGES` events were read; or when the lease needs renewing. Under a backlog that makes one
    /// transaction per interval (or per `CHECKPOINT_MESSAGES`), however many batches it covers.
    pub fn checkpoint_due(&self, caught_up: bool) -> bool {
        let cfg = &self.ctx.cfg.service;
        let every = cfg.checkpoint_interval.min(self.fence.ttl / 3);
        let elapsed = self.last_checkpoint.elapsed();
        let pending = self.state.is_dirty() || !self.letters.is_empty() || self.read > 0;
        self.read >= cfg.checkpoint_messages
            || (pending && (caught_up || elapsed >= every))
            || elapsed > self.fence.ttl / 3
    }

    /// Nothing read or changed since the last checkpoint, and none being written.
    pub fn is_clean(&self) -> bool {
        !self.state.is_dirty()
            && self.letters.is_empty()
            && self.read == 0
            && self.writing.is_none()
    }

    /// One turn of the ingest loop after a batch arrived: the batch into memory; the checkpoint being written
    /// collected when it is done (its messages acknowledged), or waited for when the source is idle or the next one
    /// is due; the next checkpoint started when due (in the background while a backlog is read; at once, and waited
    /// for, when the source is caught up). `Err` means the state must be restored (and the source rewound).
    pub async fn step<S: Source>(
        &mut self,
        source: &mut S,
        batch: &Batch,
        now: i64,
    ) -> Result<(), StoreError> {
        self.absorb(batch, now).await?;
        source.advance().await;
        let due = self.checkpoint_due(batch.caught_up);
        if self.is_writing() && (self.write_finished() || batch.caught_up || due) {
            self.finish_checkpoint()
                .await
                .unwrap_or(Ok(Closing::default()))?;
            ack(source).await;
        }
        if !self.is_writing() && due {
            source.seal();
            self.begin_checkpoint()?;
            if batch.caught_up {
                self.finish_checkpoint()
                    .await
                    .unwrap_or(Ok(Closing::default()))?;
                ack(source).await;
            }
        } else if self.is_clean() {
            // Nothing read since the last checkpoint: all that was handed out is durable already.
            ack(source).await;
        }
        Ok(())
    }

    /// Writes a checkpoint in one transaction (durably: `synchronous_commit` on): the snapshots of the keys changed
    /// since the last, the windows closed since (merged into stored ones where they belong), dead letters, watermarks
    /// and source positions; the leader lease is renewed in it (the fence). Returns the windows recorded as too short.
    /// After a failure the state is restored from the store before the next batch (and the source must rewind).
    pub async fn checkpoint(&mut self) -> Result<Closing, StoreError> {
        if let Some(r) = self.finish_checkpoint().await {
            r?;
        }
        self.begin_checkpoint()?;
        self.finish_checkpoint()
            .await
            .unwrap_or(Ok(Closing::default()))
    }

    /// Takes a checkpoint of the state (in memory: what changed since the last) and starts writing it in the
    /// background; the caller seals the source ([`Source::seal`]) at the same point. At most one is written at a
    /// time: wait for the last with [`Ingest::finish_checkpoint`] first.
    pub fn begin_checkpoint(&mut self) -> Result<(), StoreError> {
        if self.stale {
            return Err(StoreError::Invariant(
                "checkpoint of a state that must be restored first",
            ));
        }
        if self.writing.is_some() {
            return Err(StoreError::Invariant(
                "a checkpoint is being written already",
            ));
        }
        let c = self.state.take_checkpoint();
        let letters = std::mem::take(&mut self.letters);
        self.read = 0;
        self.last_checkpoint = Instant::now();
        let (store, lease, tcfg) = (
            self.ctx.store.clone(),
            self.lease.clone(),
            *self.state.config(),
        );
        let min = self.ctx.cfg.windows.min_messages_for_summary;
        let nats = &self.ctx.cfg.nats;
        let layout = crate::source::nats::layout(nats.nats_partition_by, nats.nats_partitions);
        let task =
            tokio::spawn(
                async move { write(&store, &lease, &layout, &tcfg, min, &c, &letters).await },
            );
        self.writing = Some(Writing {
            task,
            started: Instant::now(),
        });
        Ok(())
    }

    /// A checkpoint is being written.
    pub fn is_writing(&self) -> bool {
        self.writing.is_some()
    }

    /// The checkpoint being written has finished (committed or failed).
    pub fn write_finished(&self) -> bool {
        self.writing.as_ref().is_some_and(|w| w.task.is_finished())
    }

    /// Waits for the checkpoint being written, if any: `Ok` with the windows it recorded as too short once it
    /// committed (the source may acknowledge what it covers). After a failure the state is restored from the last
    /// committed checkpoint before the next batch (and the source must rewind).
    pub async fn finish_checkpoint(&mut self) -> Option<Result<Closing, StoreError>> {
        let w = self.writing.take()?;
        let r = match w.task.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Invariant(if e.is_panic() {
                "the checkpoint task panicked"
            } else {
                "the checkpoint task was cancelled"
            })),
        };
        Some(match r {
            Ok(done) => {
                metrics::counter!("recap_windows_too_short_total").increment(done.too_short as u64);
                metrics::counter!("recap_events_duplicate_total")
                    .increment(done.already_stored as u64);
                metrics::counter!("recap_checkpoints_total").increment(1);
                metrics::histogram!("recap_checkpoint_duration_seconds")
                    .record(w.started.elapsed().as_secs_f64());
                Ok(done)
            }
            Err(e) => {
                warn!(error = %e, "checkpoint failed; the state will be restored from the last one");
                self.stale = true;
                Err(e)
            }
        })
    }

    /// Gives up the leader lease (graceful shutdown).
    pub async fn release(&self) {
        // From here the source must not act as the leader (pull, recreate its consumer), whatever its clock says.
        self.lease.deposed();
        if let Err(e) = self.ctx.store.release_leader(&self.fence).await {
            warn!(error = %e, "could not release the ingest lease (it expires by itself)");
        }
    }

    /// Checkpoints what was read, acknowledges it and gives the lease back (shutdown, or a partition handed to
    /// another replica).
    pub async fn hand_back<S: Source>(&mut self, source: &mut S) {
        if let Some(Ok(_)) = self.finish_checkpoint().await {
            ack(source).await;
        }
        if !self.stale {
            source.seal();
            if self.checkpoint().await.is_ok() {
                ack(source).await;
            }
        }
        // Stop reading before the lease goes: the next leader rewinds the source to this checkpoint.
        source.abandon().await;
        self.release().await;
    }
}

/// Acknowledges what the oldest committed checkpoint covers ([`Source::commit`]); a failure only logs: the messages
/// come again and are skipped (the stored position, or the redelivery check).
async fn ack<S: Source>(source: &mut S) {
    if let Err(e) = source.commit().await {
        warn!(error = %e, "acknowledging the checkpoint failed; it will be redelivered and skipped");
    }
}

/// Writes one checkpoint in one transaction (durably: `synchronous_commit` on), renewing the lease in it (the fence):
/// the closed windows (merged where they belong), the changed keys' snapshots, dead letters, watermarks and source
/// positions. Returns the windows recorded as too short.
async fn write(
    store: &Store,
    lease: &Lease,
    layout: &str,
    tcfg: &TrackerConfig,
    min: u32,
    c: &Checkpoint,
    letters: &[DeadLetter],
) -> Result<Closing, StoreError> {
    let sent = Instant::now();
    let r = write_tx(store, lease.fence(), layout, tcfg, min, c, letters).await;
    match &r {
        Ok(_) => lease.renewed(sent),
        Err(StoreError::LostLeadership(_)) => lease.deposed(),
        Err(_) => {}
    }
    r
}

async fn write_tx(
    store: &Store,
    fence: &Fence,
    layout: &str,
    tcfg: &TrackerConfig,
    min: u32,
    c: &Checkpoint,
    letters: &[DeadLetter],
) -> Result<Closing, StoreError> {
    let mut tx = store.begin_ingest(fence).await?;
    tx.dead_letters(letters).await?;
    let done = tx.close_windows(tcfg, &c.closed, min).await?;
    tx.save_snapshots(&c.snapshots, fence.part, layout).await?;
    tx.save_watermarks(&c.watermarks, fence.part).await?;
    tx.save_clamped(&c.clamped).await?;
    for (name, pos, read) in &c.positions {
        tx.save_checkpoint(name, *pos, *read).await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// Restores the state of the partition `fence` leads, renewing its lease meanwhile (`Err` outside: the lease was
/// lost).
async fn restore_fenced(
    ctx: &Context,
    lease: &Lease,
) -> Result<Result<State, StoreError>, StoreError> {
    let part = (
        lease.fence().part as u32,
        ctx.cfg.nats.nats_partitions.max(1),
    );
    renewing(
        lease,
        restore_state(
            &ctx.store,
            ctx.tracker_config(),
            part,
            ctx.cfg.nats.nats_partition_by,
        ),
    )
    .await
}

/// Restores the operator state of partition `(k, n)` (`(0, 1)`: unpartitioned) from its last checkpoint: its
/// watermarks (by bot: of its bots, whichever partition wrote them last; by user: its own), its open keys'
/// snapshots, tombstones.
pub async fn restore_state(
    store: &Store,
    cfg: TrackerConfig,
    (part, partitions): (u32, u32),
    by: PartitionBy,
) -> Result<State, StoreError> {
    let started = Instant::now();
    let mine = |bot: &str, p: i32| match by {
        _ if partitions <= 1 => true,
        PartitionBy::Bot => crate::source::nats::partition_of(bot, partitions) == part,
        PartitionBy::User => p == part as i32,
    };
    let mut marks: HashMap<String, Millis> = HashMap::new();
    for (bot, p, w) in store.load_watermarks().await? {
        if mine(&bot, p) {
            let m = marks.entry(bot).or_insert(w);
            *m = (*m).max(w);
        }
    }
    let watermarks: Vec<(String, Millis)> = marks.into_iter().collect();
    let layout = crate::source::nats::layout(by, partitions);
    let open: Vec<_> = store
        .load_open_state(part as i32, &layout)
        .await?
        .into_iter()
        .filter(|(s, current)| {
            *current || crate::source::nats::owner(by, partitions, &s.bot, &s.user) == part
        })
        .map(|(s, _)| s)
        .collect();
    // Tombstones (a forget's listed points, `recall::forget`): by bot only this partition's bots' (the others' keys
    // never reach it); by user every bot's (a tombstone names no user id, so its partition is unknown). Loaded here,
    // at every restore, which every forget of a key this partition owns forces by bumping its epoch.
    let tombstones = store.load_forgotten().await?.into_iter().filter(|t| {
        partitions <= 1
            || by == PartitionBy::User
            || crate::source::nats::partition_of(&t.bot, partitions) == part
    });
    let mut state = State::restore_forgetting(cfg, watermarks, open, tombstones);
    state.remember_clamped(
        store
            .load_clamped()
            .await?
            .into_iter()
            .filter(|(bot, user, _, _)| {
                partitions <= 1 || crate::source::nats::owner(by, partitions, bot, user) == part
            })
            .map(|(bot, _, id, stored)| (bot, id, stored)),
    );
    info!(
        partition = part,
        open_keys = state.open_keys(),
        ms = started.elapsed().as_millis() as u64,
        "ingest state restored from the last checkpoint"
    );
    Ok(state)
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
