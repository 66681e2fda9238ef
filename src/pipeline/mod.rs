//! The shell around the pure core: the ingest loop (source -> tracker -> store) and the window workers
//! (store -> fetch -> summarize -> sink). The only place that reads the clock for the tracker.
//!
//! * Ingest runs on one replica at a time (the leader, fenced by epoch in every transaction): it feeds each batch's new
//!   messages to the tracker, stores what the tracker closed in the same transaction, and only then lets the source
//!   acknowledge. On any failure it rebuilds the tracker from Postgres, the truth.
//! * Workers run on every replica: they claim due windows with a lease (`FOR UPDATE SKIP LOCKED`), fetch, summarize
//!   and finish each window in one transaction.

mod backoff;
mod clock;
mod ingest;
mod workers;

use std::sync::Arc;

use crate::config::Config;
use crate::fetch::Points;
use crate::sink::{Store, StoreError};
use crate::summarize::Summarizer;
use crate::tracker::{Tracker, TrackerConfig};

pub use backoff::{jittered, loop_backoff, sleep_or_shutdown};
pub use clock::{Clock, ManualClock, SystemClock};
pub use ingest::{
    Applied, Ingest, IngestLoop, MAX_FUTURE_MS, renewing, run_ingest, run_ingest_with,
};
pub use workers::{
    batch_shape, drain_due, process_window, process_windows, run_workers, summarize_window,
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

/// Rebuilds the tracker from the store: watermarks first, then the open messages.
pub async fn restore_tracker(store: &Store, cfg: TrackerConfig) -> Result<Tracker, StoreError> {
    let mut t = Tracker::new(cfg);
    for (bot, wm) in store.load_watermarks().await? {
        t.restore_watermark(&bot, wm);
    }
    for m in store.load_open_messages().await? {
        t.observe(&m.bot, &m.user_id, &m.point_id, m.ts_ms);
    }
    // Anything closable was closed in the transaction that stored it; nothing should close here.
    let _ = t.take_watermark_changes();
    metrics::gauge!("recap_windows_open").set(t.open_keys() as f64);
    Ok(t)
}
