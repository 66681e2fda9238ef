//! A partition's operator state restored from its last checkpoint.

use std::collections::HashMap;
use std::time::Instant;

use tracing::info;

use super::leader::renewing;
use crate::pipeline::Context;
use crate::sink::{Lease, Store, StoreError};
use crate::source::nats::PartitionBy;
use crate::state::State;
use crate::tracker::{Millis, TrackerConfig};

/// Restores the state of the partition `fence` leads, renewing its lease meanwhile (`Err` outside: the lease was
/// lost).
pub(super) async fn restore_fenced(
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
    for w in store.load_watermarks().await? {
        if mine(&w.bot, w.part) {
            let m = marks.entry(w.bot).or_insert(w.watermark);
            *m = (*m).max(w.watermark);
        }
    }
    let watermarks: Vec<(String, Millis)> = marks.into_iter().collect();
    let layout = crate::source::nats::layout(by, partitions);
    let open: Vec<_> = store
        .load_open_state(part as i32, &layout)
        .await?
        .into_iter()
        .filter(|s| {
            s.current_layout
                || crate::source::nats::owner(by, partitions, &s.snapshot.bot, &s.snapshot.user)
                    == part
        })
        .map(|s| s.snapshot)
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
    state.remember_clamped(store.load_clamped().await?.into_iter().filter(|c| {
        partitions <= 1 || crate::source::nats::owner(by, partitions, &c.bot, &c.user) == part
    }));
    info!(
        partition = part,
        open_keys = state.open_keys(),
        ms = started.elapsed().as_millis() as u64,
        "ingest state restored from the last checkpoint"
    );
    Ok(state)
}
