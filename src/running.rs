//! Running summaries of open windows (issue 23), the pure core: when one is due, which of a key's open points form
//! its current window, and whether a stored running summary is still valid for a window (and which messages it does
//! not cover). No IO: the SQL is in `sink/running.rs`, the worker in `pipeline/running.rs`.
//!
//! A running summary covers a *prefix by stored time* of its window: its coverage (`point_ids`) is a subset of the
//! window's points and every window point stored at or before `covers_until` is in it. Only then may a summary that
//! starts from it ([`crate::summarize::Summarizer::summarize_incremental`]) add just the messages after
//! `covers_until`: a late message stored before `covers_until`, a merge or a new window breaks the rule and the
//! running summary is discarded (the next one, or the final summary, is built from the whole window).

use std::collections::HashSet;

use crate::summarize::Message;
use crate::tracker::{Millis, TrackerConfig, canonical_windows};

/// Whether a window of `count` messages needs a new running summary when the last one covers `covered` messages
/// (0 without one): when `count` crossed a multiple of `every` since. `every == 0` turns running summaries off.
pub fn is_due(every: u32, count: usize, covered: usize) -> bool {
    every > 0 && count / every as usize > covered / every as usize
}

/// How many of a key's open points (sorted by time) belong to its current (last) window, by the tracker's
/// definition of windows ([`canonical_windows`]): the open points of a key may still hold the end of a window that
/// has not closed yet (within the allowed lateness) before the current one.
pub fn current_window_len(cfg: &TrackerConfig, sorted_times: &[Millis]) -> usize {
    canonical_windows(cfg, sorted_times)
        .last()
        .map_or(0, |w| w.2 as usize)
}

/// A stored running summary's coverage, as far as validity is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage<'a> {
    pub point_ids: &'a [String],
    /// Stored time of the last covered message (ms).
    pub covers_until_ms: Millis,
}

/// The messages of a window (sorted by stored time) that a running summary does not cover, when the running summary
/// is valid for the window: its coverage is non-empty, a subset of the window's messages, and holds every message
/// stored at or before `covers_until`. `None` when it is not valid (discard it: the window changed under it).
pub fn uncovered<'m>(cov: &Coverage<'_>, messages: &'m [Message]) -> Option<Vec<&'m Message>> {
    if cov.point_ids.is_empty() {
        return None;
    }
    let covered: HashSet<&str> = cov.point_ids.iter().map(String::as_str).collect();
    let mut found = 0usize;
    let mut rest = Vec::new();
    for m in messages {
        if covered.contains(m.point_id.as_str()) {
            found += 1;
        } else if m.ts_ms <= cov.covers_until_ms {
            return None; // a message before covers_until that the summary does not know
        } else {
            rest.push(m);
        }
    }
    (found == covered.len()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(i: usize, ts: Millis) -> Message {
        Message {
            point_id: format!("p{i}"),
            role: "user".into(),
            text: format!("message {i}"),
            ts_ms: ts,
            emotion: None,
            vector: Vec::new(),
        }
    }

    #[test]
    fn due_at_each_multiple_and_never_when_off() {
        assert!(!is_due(0, 100, 0));
        assert!(!is_due(20, 19, 0));
        assert!(is_due(20, 20, 0));
        assert!(!is_due(20, 39, 20));
        assert!(is_due(20, 40, 20));
        assert!(is_due(20, 45, 21));
        assert!(is_due(20, 60, 20), "a skipped multiple is one run, not two");
    }

    #[test]
    fn the_current_window_is_the_last_session() {
        let cfg = TrackerConfig {
            mode: crate::tracker::Mode::Session,
            idle_gap_ms: 1_000,
            max_span_ms: 1_000_000,
            lateness_ms: 0,
        };
        assert_eq!(current_window_len(&cfg, &[]), 0);
        assert_eq!(current_window_len(&cfg, &[0, 500, 900]), 3);
        assert_eq!(current_window_len(&cfg, &[0, 500, 5_000, 5_100]), 2);
    }

    #[test]
    fn late_message_before_covers_until_invalidates() {
        let ms: Vec<Message> = (0..6).map(|i| msg(i, i as i64 * 10)).collect();
        let ids: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
        let cov = Coverage {
            point_ids: &ids,
            covers_until_ms: 30,
        };
        let rest = uncovered(&cov, &ms).unwrap();
        assert_eq!(
            rest.iter().map(|m| m.point_id.as_str()).collect::<Vec<_>>(),
            ["p4", "p5"]
        );
        // a message stored at 15 that the summary does not cover
        let mut late = ms.clone();
        late.insert(2, msg(9, 15));
        assert_eq!(uncovered(&cov, &late), None);
        // a covered point missing from the window (a merge moved it, a forget removed it)
        assert_eq!(uncovered(&cov, &ms[1..]), None);
    }

    proptest! {
        /// `uncovered` accepts exactly the prefixes by stored time, and then returns the rest in order.
        #[test]
        fn valid_iff_a_prefix_by_stored_time(
            times in proptest::collection::vec(0i64..1_000, 1..40),
            pick in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let mut times = times;
            times.sort_unstable();
            let ms: Vec<Message> = times.iter().enumerate().map(|(i, &t)| msg(i, t)).collect();
            let ids: Vec<String> = ms.iter().zip(&pick).filter(|(_, p)| **p).map(|(m, _)| m.point_id.clone()).collect();
            prop_assume!(!ids.is_empty());
            let until = ms.iter().filter(|m| ids.contains(&m.point_id)).map(|m| m.ts_ms).max().unwrap();
            let cov = Coverage { point_ids: &ids, covers_until_ms: until };
            let prefix = ms.iter().all(|m| ids.contains(&m.point_id) || m.ts_ms > until);
            match uncovered(&cov, &ms) {
                Some(rest) => {
                    prop_assert!(prefix);
                    prop_assert_eq!(rest.len() + ids.len(), ms.len());
                    prop_assert!(rest.iter().all(|m| m.ts_ms > until && !ids.contains(&m.point_id)));
                }
                None => prop_assert!(!prefix),
            }
        }

        /// Each crossing of a multiple is due once: counting up one message at a time and summarizing whenever due,
        /// a window of n messages gets exactly floor(n / every) running summaries.
        #[test]
        fn at_most_floor_n_over_every_runs(every in 2u32..30, n in 0usize..300) {
            let mut covered = 0;
            let mut runs = 0;
            for count in 1..=n {
                if is_due(every, count, covered) {
                    runs += 1;
                    covered = count;
                }
            }
            prop_assert_eq!(runs, n / every as usize);
        }
    }
}
