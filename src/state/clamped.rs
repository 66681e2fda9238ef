//! The memory of closed points that were stamped ahead of the clock when read (issue 24, cases 1 and 15).
//!
//! A point stamped ahead of the wall clock (a bot host whose clock is fast) is windowed at its arrival time
//! (`tracker::effective_time`). Read again once its window closed (the sweep's overlap, a replay, the sweep after the
//! events in hybrid mode), it would be windowed a second time: at its arrival again while still ahead of the clock,
//! or at its own stamp once the clock passed it. Both are duplicates, so every read of a remembered point is one,
//! whatever the clock says then.
//!
//! Lookups are by bot, then point id (no scan, no allocation); entries expire a day after their stored time (a
//! point read later than that is a dead letter by `MAX_FUTURE_MS`, or, at its stamp, a day past its arrival) through
//! a heap ordered by expiry, and at most [`CAPACITY`] are kept (the earliest to expire go first). So the cost per
//! message is O(log n) amortized, whatever the number of entries: `work` counts the entries touched, for the tests.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::tracker::{Millis, Mode, TrackerConfig};

type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How long after its stored time a closed point stamped ahead of the clock is remembered (`MAX_FUTURE_MS`: one later
/// than that is a dead letter anyway).
pub const MEMORY_MS: Millis = 24 * 3_600_000;

/// At most this many points are remembered (about 100 bytes each). A host a few ms fast clamps every message it
/// writes; their re-reads then fall back to the sink's coverage check, which finds them near in time (see
/// [`escapes_time_probe`]).
pub const CAPACITY: usize = 500_000;

/// Whether a point windowed at `eff` (its arrival) but stamped `stored` would, read again at its stamp, form a window
/// that the sink's merge-candidate probe (stored windows within the idle gap; tumbling: the same bucket) does not
/// relate to the one holding it: then only this memory (and its stored rows, `recap_clamped_points`) knows it is a
/// duplicate. Session mode keeps half the gap as margin.
pub fn escapes_time_probe(cfg: &TrackerConfig, eff: Millis, stored: Millis) -> bool {
    match cfg.mode {
        Mode::Session => stored.saturating_sub(eff).saturating_mul(2) >= cfg.idle_gap_ms,
        Mode::Tumbling => {
            let span = cfg.max_span_ms.max(1);
            eff.div_euclid(span) != stored.div_euclid(span)
        }
    }
}

/// (expires at, bot, point id).
type Expiry = (Millis, Arc<str>, Arc<str>);

#[derive(Debug, Default)]
pub struct ClampedMemory {
    /// bot -> point id -> stored time.
    by_bot: Fast<Arc<str>, Fast<Arc<str>, Millis>>,
    /// (expires at, bot, point id), earliest first.
    expiry: BinaryHeap<Reverse<Expiry>>,
    len: usize,
    capacity: usize,
    /// Entries touched by lookups, inserts and expiry (cost accounting for tests).
    work: u64,
}

impl ClampedMemory {
    pub fn new() -> ClampedMemory {
        ClampedMemory::with_capacity(CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> ClampedMemory {
        ClampedMemory {
            capacity: capacity.max(1),
            ..ClampedMemory::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn work(&self) -> u64 {
        self.work
    }

    /// Remembers a closed point (bot, id) stored at `stored`.
    pub fn remember(&mut self, bot: &Arc<str>, id: &str, stored: Millis) {
        self.work += 1;
        let ids = self.by_bot.entry(bot.clone()).or_default();
        if let Some(t) = ids.get_mut(id) {
            *t = (*t).max(stored);
            return;
        }
        let id: Arc<str> = Arc::from(id);
        ids.insert(id.clone(), stored);
        self.expiry
            .push(Reverse((stored.saturating_add(MEMORY_MS), bot.clone(), id)));
        self.len += 1;
        while self.len > self.capacity {
            self.pop_earliest();
        }
    }

    /// Forgets what expired by `now`.
    pub fn expire(&mut self, now: Millis) {
        while self.expiry.peek().is_some_and(|Reverse(e)| e.0 <= now) {
            self.pop_earliest();
        }
    }

    fn pop_earliest(&mut self) {
        let Some(Reverse((at, bot, id))) = self.expiry.pop() else {
            return;
        };
        self.work += 1;
        let Some(ids) = self.by_bot.get_mut(&bot) else {
            return;
        };
        // A later stored time for the same id (remembered again) keeps it until then.
        if ids
            .get(&id)
            .is_some_and(|t| t.saturating_add(MEMORY_MS) <= at)
        {
            ids.remove(&id);
            self.len -= 1;
            if ids.is_empty() {
                self.by_bot.remove(&bot);
            }
        } else if let Some(t) = ids.get(&id) {
            let again = Reverse((t.saturating_add(MEMORY_MS), bot.clone(), id.clone()));
            self.expiry.push(again);
        }
    }

    pub fn contains(&mut self, bot: &str, id: &str) -> bool {
        self.work += 1;
        self.by_bot.get(bot).is_some_and(|ids| ids.contains_key(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_points_expire_a_day_after_their_stored_time_and_the_capacity_holds() {
        let bot: Arc<str> = Arc::from("b");
        let mut m = ClampedMemory::with_capacity(3);
        m.remember(&bot, "p1", 0);
        m.remember(&bot, "p2", 10);
        assert!(m.contains("b", "p1") && m.contains("b", "p2"));
        assert!(!m.contains("b", "p3") && !m.contains("other", "p1"));
        m.expire(MEMORY_MS);
        assert!(!m.contains("b", "p1"), "expired");
        assert!(m.contains("b", "p2"));
        for i in 0..5 {
            m.remember(&bot, &format!("q{i}"), 100 + i);
        }
        assert_eq!(m.len(), 3, "bounded");
        assert!(!m.contains("b", "p2") && !m.contains("b", "q0") && !m.contains("b", "q1"));
        assert!(m.contains("b", "q4"));
    }

    #[test]
    fn a_point_escapes_the_sinks_time_probe_only_when_its_stamp_is_far_from_its_arrival() {
        let session = TrackerConfig {
            idle_gap_ms: 60_000,
            ..TrackerConfig::default()
        };
        assert!(!escapes_time_probe(&session, 0, 5));
        assert!(escapes_time_probe(&session, 0, 90_000));
        let tumbling = TrackerConfig {
            mode: Mode::Tumbling,
            max_span_ms: 3_600_000,
            ..TrackerConfig::default()
        };
        assert!(!escapes_time_probe(&tumbling, 10, 3_599_999));
        assert!(escapes_time_probe(&tumbling, 3_599_999, 3_600_001));
    }
}
