//! The ingest shell: leader lease (taken, renewed during long steps, released), the tracker fed batch by batch, and
//! each batch's closed windows stored in the same transaction before the source acknowledges.
//!
//! Files: `ingest.rs` the batch -> state -> checkpoint step (`Ingest`); `ingest/run.rs` the loop (`run_partition`,
//! `IngestLoop`); `ingest/restore.rs` the state restored from the last checkpoint; `ingest/leader.rs` the lease
//! renewed during long steps (`renewing`).

mod leader;
mod restore;
mod run;

pub use leader::renewing;
use restore::restore_fenced;
pub use restore::restore_state;
pub use run::{IngestLoop, run_ingest, run_ingest_with, run_partition};

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Context, Share};
use crate::sink::{Closing, DeadLetter, Fence, Lease, Store, StoreError};
use crate::source::{Batch, Source};
use crate::state::{Checkpoint, State};
use crate::tracker::{Observed, Tracker, TrackerConfig};

/// How far ahead of the wall clock a message time may be (clock skew between bots and recap).
pub const MAX_FUTURE_MS: i64 = 24 * 3_600_000;

/// The wall-clock time a caught-up batch lets the tracker tick to: `now`, or the source's horizon when earlier.
fn tick_time(batch: &Batch, now: i64) -> i64 {
    batch.horizon.map_or(now, |h| h.min(now))
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

    /// The lease this leads under (its fence, and whether this process still counts it current).
    pub fn lease(&self) -> &Lease {
        &self.lease
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
        if let Some(c) = &batch.checkpoint {
            self.state.set_position(c);
        }
        metrics::counter!("recap_events_duplicate_total").increment(applied.duplicates as u64);
        metrics::counter!("recap_events_ignored_total").increment(batch.ignored as u64);
        metrics::counter!("recap_events_late_total").increment(applied.late as u64);
        metrics::counter!("recap_windows_closed_total").increment(applied.closed as u64);
        Ok(applied)
    }

    /// A checkpoint is due after a batch: with something to store, when the source is caught up (nothing more is
    /// waiting: store it now, as fresh as it gets) or at the end of one of its units (`caught_up` is passed true
    /// then too: [`Batch::flush`], a swept collection) or `CHECKPOINT_INTERVAL` passed since the last one; or when
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
        let due = self.checkpoint_due(batch.caught_up || batch.flush);
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
    for p in &c.positions {
        tx.save_checkpoint(p).await?;
    }
    tx.commit().await?;
    if !c.closed.is_empty() {
        store.windows_due(); // this process's workers claim them now, not at their next poll
    }
    Ok(done)
}
