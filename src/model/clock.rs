//! The clock the ingest shell reads for the tracker, and the sweep for its cycles' start and checkpoints. Production reads the system clock; tests drive a [`ManualClock`]
//! so that minutes of production timing (idle gaps, lateness) run in milliseconds, deterministically.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Wall-clock time in milliseconds since the Unix epoch, and a monotonic instant for intervals and back-offs.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> i64;

    /// A monotonic instant (the system's; a virtual clock's moves with its time).
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// The system clock (production).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A virtual clock that moves only when told to; clones share the same time. Its instants start at the moment it was
/// made and move with its time (never back).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Manual>);

#[derive(Debug)]
struct Manual {
    ms: AtomicI64,
    start_ms: i64,
    base: Instant,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl ManualClock {
    pub fn new(start_ms: i64) -> ManualClock {
        ManualClock(Arc::new(Manual {
            ms: AtomicI64::new(start_ms),
            start_ms,
            base: Instant::now(),
        }))
    }

    pub fn set(&self, ms: i64) {
        self.0.ms.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.ms.load(Ordering::SeqCst)
    }

    fn instant(&self) -> Instant {
        let moved = (self.now_ms() - self.0.start_ms).max(0) as u64;
        self.0.base + Duration::from_millis(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = ManualClock::new(1_000);
        let d = c.clone();
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(60));
        assert_eq!(d.now_ms(), 61_000);
        d.set(5);
        assert_eq!(c.now_ms(), 5);
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let t = chrono::Utc::now().timestamp_millis();
        assert!((SystemClock.now_ms() - t).abs() < 5_000);
    }
}
