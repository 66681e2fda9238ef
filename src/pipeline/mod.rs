//! The shell around the pure core: the ingest loop (source -> tracker -> store) and the window workers
//! (store -> fetch -> summarize -> sink). The only place that reads the clock for the tracker.
//!
//! * Ingest runs on one replica at a time (the leader, fenced by epoch in every transaction): it feeds each batch to
//!   the in-memory operator state (`crate::state`), writes a checkpoint (changed open keys, closed windows with their
//!   coverage, watermarks, positions) every `CHECKPOINT_INTERVAL` / `CHECKPOINT_MESSAGES` or when the source is caught
//!   up, and only then lets the source acknowledge. On any failure it restores the state from the last checkpoint and
//!   rewinds the source to the position stored with it.
//! * Workers run on every replica: they claim due windows with a lease (`FOR UPDATE SKIP LOCKED`), fetch, summarize
//!   and finish each window in one transaction.

mod backoff;
mod ingest;
mod partitions;
mod running;
mod workers;

use std::sync::Arc;

use crate::config::Config;
use crate::fetch::Points;
use crate::sink::Store;
use crate::summarize::Summarizer;
use crate::tracker::TrackerConfig;

pub use crate::model::{Clock, ManualClock, SystemClock};
pub use backoff::{jittered, loop_backoff, sleep_or_shutdown};
pub use ingest::{
    Applied, Ingest, IngestLoop, MAX_FUTURE_MS, renewing, restore_state, run_ingest,
    run_ingest_with, run_partition,
};
pub use partitions::{Share, run_partitioned};
pub use running::{run_due_running, summarize_from};
pub use workers::Finisher;
pub use workers::{
    batch_shape, drain_due, process_claimed, process_window, process_windows, run_workers,
    summarize_window,
};

/// Everything the loops share.
#[derive(Clone)]
pub struct Context {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub points: Arc<Points>,
    pub summarizer: Arc<dyn Summarizer>,
    pub instance: String,
}

impl Context {
    pub fn tracker_config(&self) -> TrackerConfig {
        self.cfg.tracker_config()
    }
}

/// The system clock's time in ms (subcommands that apply batches once: `sweep --once`, `replay`). The ingest loop
/// reads its [`Clock`] instead ([`IngestLoop::clock`]).
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}
