//! The pure part of `GET /v1/context`: which messages make up the user's conversation, which running summary covers
//! part of it, and what fits under the token budget. No IO, no clock: every input is passed in.
//!
//! Token counting (documented in README "Context"): every part is estimated with the summarizer's estimator
//! ([`estimate_tokens`], `ceil(chars / 4)`) over the characters a prompt would show of it:
//! * a message: `role + ": " + text`;
//! * the conversation's summary: its text plus its key topics joined by `", "`;
//! * an earlier recap: its text plus its key topics joined by `", "`.
//!
//! `tokens` is the sum over the parts returned (each part rounded up on its own); JSON syntax, field names, times and
//! ids are not counted.

use std::collections::HashSet;

use crate::summarize::llm::estimate_tokens;
use crate::tracker::{Millis, TrackerConfig, canonical_windows};

/// Smallest `max_tokens` accepted: below it not even a short message and its summary fit.
pub const MIN_MAX_TOKENS: usize = 64;

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Tokens of one verbatim message (`role: text`).
pub fn message_tokens(role: &str, text: &str) -> usize {
    estimate_tokens(chars(role) + 2 + chars(text))
}

/// Tokens of a summary (the conversation's or an earlier recap): text plus the topics joined by ", ".
pub fn summary_tokens(text: &str, key_topics: &[String]) -> usize {
    let topics: usize =
        key_topics.iter().map(|t| chars(t)).sum::<usize>() + 2 * key_topics.len().saturating_sub(1);
    estimate_tokens(chars(text) + topics)
}

/// The messages of the conversation the latest message is in: `points` are `(point id, stored time)` of every
/// candidate message (open messages of the checkpoint plus points stored after it), in any order and possibly with
/// repeats; the window definition (`canonical_windows`: idle gap, span, tumbling) splits them and the last window
/// is returned, oldest first (ties by id). Empty when there is no candidate.
pub fn latest_window(cfg: &TrackerConfig, points: &[(String, Millis)]) -> Vec<(String, Millis)> {
    let mut sorted: Vec<(String, Millis)> = points.to_vec();
    sorted.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    sorted.dedup_by(|a, b| a.0 == b.0);
    // a point seen twice with different times (checkpoint vs Qdrant) keeps its first (earliest) time
    let mut seen = HashSet::new();
    sorted.retain(|p| seen.insert(p.0.clone()));
    let times: Vec<Millis> = sorted.iter().map(|p| p.1).collect();
    let windows = canonical_windows(cfg, &times);
    let Some(&(_, _, n, _)) = windows.last() else {
        return Vec::new();
    };
    sorted.split_off(sorted.len() - n as usize)
}

/// Whether a running summary with coverage `covered` (point ids) and `covers_until` is usable for a conversation of
/// `conversation` points `(id, stored time)`: its ids are a subset of the conversation's and every conversation point
/// stored at or before `covers_until` is one of them. An empty coverage is never usable.
pub fn running_usable(
    conversation: &[(String, Millis)],
    covered: &[String],
    covers_until: Millis,
) -> bool {
    if covered.is_empty() {
        return false;
    }
    let ids: HashSet<&str> = conversation.iter().map(|p| p.0.as_str()).collect();
    let cov: HashSet<&str> = covered.iter().map(String::as_str).collect();
    cov.iter().all(|c| ids.contains(c))
        && conversation
            .iter()
            .filter(|p| p.1 <= covers_until)
            .all(|p| cov.contains(p.0.as_str()))
}

/// A verbatim message as the response shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub point_id: String,
    pub role: String,
    pub text: String,
    pub ts_ms: Millis,
    /// Set when the text was cut to fit the budget (only ever the latest message, alone over the budget).
    pub truncated: bool,
}

impl Msg {
    pub fn tokens(&self) -> usize {
        message_tokens(&self.role, &self.text)
    }
}

/// What the budget is applied to: the conversation's summary cost (with the messages it covers), its verbatim
/// messages oldest first, and the earlier recaps' costs in preference order (newest or most relevant first).
#[derive(Debug, Clone)]
pub struct Budgeted {
    /// Tokens of the summary and how many messages it covers.
    pub summary: Option<(usize, usize)>,
    pub messages: Vec<Msg>,
    pub earlier: Vec<usize>,
}

/// What fits: whether the summary stays, the messages kept (a suffix of the given ones, the latest possibly cut), the
/// number of earlier recaps kept (a prefix), the messages left out (`omitted`: verbatim messages dropped, plus the
/// summary's messages when it is dropped), and the tokens of what is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub summary: bool,
    pub messages: Vec<Msg>,
    pub earlier: usize,
    pub omitted: usize,
    pub tokens: usize,
}

/// Fits a conversation and earlier recaps under `max_tokens`. The order in which things give way: earlier recaps
/// (from the least preferred), then the oldest verbatim messages, then the summary; the latest message stays, cut
/// (and marked) only when it alone is over the budget. Never more than `max_tokens`.
pub fn fit(input: Budgeted, max_tokens: usize) -> Fitted {
    let Budgeted {
        summary,
        mut messages,
        earlier,
    } = input;
    let costs: Vec<usize> = messages.iter().map(Msg::tokens).collect();
    let s_cost = summary.map_or(0, |s| s.0);
    let conv: usize = s_cost + costs.iter().sum::<usize>();
    if conv <= max_tokens {
        let mut tokens = conv;
        let mut kept = 0;
        for e in &earlier {
            if tokens + e > max_tokens {
                break;
            }
            tokens += e;
            kept += 1;
        }
        return Fitted {
            summary: summary.is_some(),
            messages,
            earlier: kept,
            omitted: 0,
            tokens,
        };
    }
    // No earlier recap. The summary stays if it fits beside the latest message; then the newest messages that fit
    // (the oldest verbatim messages go first).
    let latest = costs.last().copied().unwrap_or(0);
    let keep_summary = summary.is_some() && s_cost + latest <= max_tokens;
    let mut tokens = if keep_summary { s_cost } else { 0 };
    let mut keep = 0;
    for c in costs.iter().rev() {
        if keep > 0 && tokens + c > max_tokens {
            break;
        }
        tokens += c;
        keep += 1;
    }
    let drop = messages.len() - keep;
    let mut omitted = drop;
    if !keep_summary {
        omitted += summary.map_or(0, |s| s.1);
    }
    let mut kept = messages.split_off(drop);
    if tokens > max_tokens
        && let Some(last) = kept.last_mut()
    {
        // Alone over the budget: keep the start of its text, as many characters as fit.
        let overhead = chars(&last.role) + 2;
        let room = (max_tokens * 4).saturating_sub(overhead);
        last.text = last.text.chars().take(room).collect();
        last.truncated = true;
        tokens = last.tokens();
    }
    Fitted {
        summary: keep_summary,
        messages: kept,
        earlier: 0,
        omitted,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::Mode;
    use proptest::prelude::*;

    fn msg(i: usize, len: usize) -> Msg {
        Msg {
            point_id: format!("p{i}"),
            role: "user".into(),
            text: "x".repeat(len),
            ts_ms: i as Millis,
            truncated: false,
        }
    }

    fn cfg() -> TrackerConfig {
        TrackerConfig {
            mode: Mode::Session,
            idle_gap_ms: 100,
            max_span_ms: 10_000,
            lateness_ms: 0,
        }
    }

    #[test]
    fn the_estimator_is_the_summarizers() {
        assert_eq!(message_tokens("user", ""), 2); // "user: "
        assert_eq!(message_tokens("user", "ab"), 2);
        assert_eq!(message_tokens("user", "abc"), 3);
        assert_eq!(summary_tokens("abcd", &["x".into(), "y".into()]), 2); // "abcd" + "x, y"
        assert_eq!(summary_tokens("", &[]), 0);
    }

    #[test]
    fn the_latest_window_is_the_one_after_the_last_idle_gap() {
        let pts: Vec<(String, Millis)> = [("a", 0), ("b", 50), ("c", 400), ("d", 450), ("c", 400)]
            .iter()
            .map(|(i, t)| (i.to_string(), *t))
            .collect();
        let w = latest_window(&cfg(), &pts);
        assert_eq!(w, vec![("c".into(), 400), ("d".into(), 450)]);
        assert!(latest_window(&cfg(), &[]).is_empty());
        let tumbling = TrackerConfig {
            mode: Mode::Tumbling,
            max_span_ms: 1000,
            ..cfg()
        };
        let pts: Vec<(String, Millis)> = [("a", 10), ("b", 990), ("c", 1001)]
            .iter()
            .map(|(i, t)| (i.to_string(), *t))
            .collect();
        assert_eq!(latest_window(&tumbling, &pts), vec![("c".into(), 1001)]);
    }

    #[test]
    fn a_running_summary_is_usable_only_for_a_prefix_it_covers() {
        let conv: Vec<(String, Millis)> = (0..5).map(|i| (format!("p{i}"), i * 10)).collect();
        let ids = |v: &[usize]| v.iter().map(|i| format!("p{i}")).collect::<Vec<_>>();
        assert!(running_usable(&conv, &ids(&[0, 1, 2]), 20));
        assert!(!running_usable(&conv, &ids(&[0, 2]), 20), "a gap");
        assert!(!running_usable(&conv, &ids(&[0, 1, 9]), 20), "not a subset");
        assert!(!running_usable(&conv, &[], 0));
        // covers_until before a covered point's time (display value stale) still needs the points up to it
        assert!(running_usable(&conv, &ids(&[0, 1, 2]), 15));
    }

    #[test]
    fn everything_fits_under_a_large_budget() {
        let f = fit(
            Budgeted {
                summary: Some((10, 4)),
                messages: (0..3).map(|i| msg(i, 8)).collect(),
                earlier: vec![5, 5, 100],
            },
            1000,
        );
        assert!(f.summary);
        assert_eq!(f.messages.len(), 3);
        assert_eq!(f.earlier, 3);
        assert_eq!(f.tokens, 10 + 3 * 4 + 110);
    }

    #[test]
    fn earlier_recaps_go_before_any_message() {
        let f = fit(
            Budgeted {
                summary: Some((10, 4)),
                messages: (0..3).map(|i| msg(i, 8)).collect(),
                earlier: vec![5, 5],
            },
            27,
        );
        assert_eq!((f.earlier, f.messages.len(), f.omitted), (1, 3, 0));
        assert_eq!(f.tokens, 27);
        let f = fit(
            Budgeted {
                summary: Some((10, 4)),
                messages: (0..3).map(|i| msg(i, 8)).collect(),
                earlier: vec![5, 5],
            },
            21,
        );
        assert_eq!((f.earlier, f.messages.len(), f.omitted), (0, 2, 1));
        assert_eq!(f.messages[0].point_id, "p1");
    }

    #[test]
    fn the_latest_message_alone_over_the_budget_is_cut_and_marked() {
        let f = fit(
            Budgeted {
                summary: Some((10, 4)),
                messages: vec![msg(0, 8), msg(1, 1000)],
                earlier: vec![5],
            },
            64,
        );
        assert!(!f.summary);
        assert_eq!(f.omitted, 5);
        assert_eq!(f.messages.len(), 1);
        assert!(f.messages[0].truncated);
        assert_eq!(f.messages[0].point_id, "p1");
        assert!(f.tokens <= 64 && f.tokens >= 63, "{}", f.tokens);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Never over the budget; the latest message always last; what is kept plus what is omitted is the whole
        /// conversation (exhaustive); messages are a suffix; earlier recaps only when the whole conversation fits.
        #[test]
        fn fit_keeps_the_rules(
            lens in proptest::collection::vec(0usize..400, 1..40),
            summary in proptest::option::of((0usize..300, 1usize..50)),
            earlier in proptest::collection::vec(1usize..200, 0..10),
            max_tokens in 64usize..2000,
        ) {
            let messages: Vec<Msg> = lens.iter().enumerate().map(|(i, l)| msg(i, *l)).collect();
            let n = messages.len();
            let total = n + summary.map_or(0, |s| s.1);
            let f = fit(Budgeted { summary, messages: messages.clone(), earlier: earlier.clone() }, max_tokens);
            prop_assert!(f.tokens <= max_tokens);
            let last = f.messages.last().unwrap();
            prop_assert_eq!(&last.point_id, &format!("p{}", n - 1));
            let covered = if f.summary { summary.unwrap().1 } else { 0 };
            prop_assert_eq!(covered + f.messages.len() + f.omitted, total);
            let tail = &messages[n - f.messages.len()..];
            for (k, t) in f.messages.iter().zip(tail) {
                prop_assert_eq!(&k.point_id, &t.point_id);
                if !k.truncated { prop_assert_eq!(&k.text, &t.text); }
            }
            let counted: usize = f.messages.iter().map(Msg::tokens).sum::<usize>()
                + if f.summary { summary.unwrap().0 } else { 0 }
                + earlier[..f.earlier].iter().sum::<usize>();
            prop_assert_eq!(f.tokens, counted);
            if f.omitted > 0 { prop_assert_eq!(f.earlier, 0); }
            // nothing more could have been kept: the next older message (or the next recap) would not fit
            if f.omitted == 0 && f.earlier < earlier.len() {
                prop_assert!(f.tokens + earlier[f.earlier] > max_tokens);
            }
            if f.messages.len() < n {
                let next = &messages[n - f.messages.len() - 1];
                prop_assert!(f.tokens + next.tokens() > max_tokens);
            }
            if let Some((s_cost, _)) = summary && !f.summary {
                prop_assert!(s_cost + messages[n - 1].tokens() > max_tokens, "the summary was dropped though it fit");
            }
            prop_assert_eq!(f.messages.iter().filter(|m| m.truncated).count() <= 1, true);
        }

        /// The conversation found is the canonical last window of the points, whatever their order.
        #[test]
        fn latest_window_is_order_free(
            mut times in proptest::collection::vec(0i64..5000, 1..60),
            seed in any::<u64>(),
        ) {
            let pts: Vec<(String, Millis)> = times.iter().enumerate().map(|(i, t)| (format!("p{i}"), *t)).collect();
            let mut shuffled = pts.clone();
            let k = shuffled.len();
            shuffled.rotate_left((seed as usize) % k);
            let a = latest_window(&cfg(), &pts);
            let b = latest_window(&cfg(), &shuffled);
            prop_assert_eq!(&a, &b);
            times.sort();
            let w = canonical_windows(&cfg(), &times);
            prop_assert_eq!(a.len(), w.last().unwrap().2 as usize);
            prop_assert_eq!(a.last().unwrap().1, *times.last().unwrap());
        }
    }
}
