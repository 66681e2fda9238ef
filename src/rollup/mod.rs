//! Rollups: day -> week -> month summaries per (bot, user), built from the finer summaries, never from messages.
//!
//! * A **day** is built from the user's `time_window` rows whose `start_timestamp` falls in that UTC day (a window that
//!   runs past midnight belongs to the day it started, so every window is in exactly one day).
//! * A **week** (ISO, Monday 00:00 UTC) and a **month** (the 1st, 00:00 UTC) are both built from their **days** (weeks
//!   straddle months, days never do). Their coverage (`covered_ids`, the window summary ids) is the union of their
//!   days' coverage.
//! * Rows: `conversation_summaries` with `summary_type` = `day` | `week` | `month`, `start_timestamp` = the period's
//!   start, `end_timestamp` = the period's end minus one microsecond ([`row_end`]). Window rows carry millisecond
//!   times (the tracker's unit), so a rollup's end (`…23:59:59.999999`) can never equal a window's end: a 24 h
//!   tumbling window `[d, d + 24 h]` and the day `d` never meet on `uq_conversation_summaries_window`; nor do
//!   periods of different kinds (a day, a week and a month never have the same length).
//! * State: `recap_rollups`, one row per (bot, user, period, start): `dirty` while the finer summaries changed since
//!   it was built, the inputs (`summary id:revision`) of its current revision and its coverage.
//! * Changes are detected by reading window rows by `updated_at` (a keyset scan with an overlap, see
//!   [`shell::Rollups::scan`]): a window whose (id, revision) is not in its day's inputs makes the day dirty, and a
//!   day that covered a window which now starts on another day is dirty too ([`dirty_days`]). A day written (or
//!   removed) makes its week and month dirty in the same transaction. A rollup is written only if the inputs it was
//!   built from are still the current ones when it commits (else it stays dirty and is built again): so a rollup's
//!   revision only ever reflects a consistent set of finer summaries, and its revision grows by one per change.
//!
//! This module is the pure core (period arithmetic, dirtiness, the summarizer's input); [`shell`] does the IO.

pub mod shell;

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

use crate::summarize::{Message, WindowInput};

/// A rollup's granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub const ALL: [Period; 3] = [Period::Day, Period::Week, Period::Month];

    /// The `summary_type` and `recap_rollups.period` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The period containing `t`: `[start, end)` in UTC.
    pub fn bounds(self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let d = t.date_naive();
        let (start, end) = match self {
            Period::Day => (d, d + Duration::days(1)),
            Period::Week => {
                let monday = d - Duration::days(i64::from(d.weekday().num_days_from_monday()));
                (monday, monday + Duration::days(7))
            }
            Period::Month => {
                let first = NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d);
                let next = if d.month() == 12 {
                    NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
                }
                .unwrap_or(first + Duration::days(31));
                (first, next)
            }
        };
        (midnight(start), midnight(end))
    }

    /// The coarser periods a finer one feeds: a day feeds its week and its month.
    pub fn parents(self) -> &'static [Period] {
        match self {
            Period::Day => &[Period::Week, Period::Month],
            Period::Week | Period::Month => &[],
        }
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// The `end_timestamp` of a rollup row: the period's end minus one microsecond (see the module docs).
pub fn row_end(period_end: DateTime<Utc>) -> DateTime<Utc> {
    period_end - Duration::microseconds(1)
}

/// One rollup: (bot, user, period, start). Ordered, so a batch locks rows in one order on every replica.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeriodKey {
    pub bot: String,
    pub user_id: String,
    pub period: Period,
    pub start: DateTime<Utc>,
}

impl PeriodKey {
    pub fn of(bot: &str, user_id: &str, period: Period, t: DateTime<Utc>) -> PeriodKey {
        PeriodKey {
            bot: bot.to_string(),
            user_id: user_id.to_string(),
            period,
            start: period.bounds(t).0,
        }
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.period.bounds(self.start).1
    }

    /// The week and month this (day) feeds.
    pub fn parents(&self) -> Vec<PeriodKey> {
        self.period
            .parents()
            .iter()
            .map(|p| PeriodKey::of(&self.bot, &self.user_id, *p, self.start))
            .collect()
    }
}

/// A window row written since the last scan, with the day rollups that already cover it.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowChange {
    pub bot: String,
    pub user_id: String,
    pub summary_id: i64,
    pub revision: i32,
    pub start: DateTime<Utc>,
    /// Day rollups whose coverage holds this window: (day start, whether they were built from this revision).
    pub covered_by: Vec<(DateTime<Utc>, bool)>,
}

/// The days that must be rebuilt for these changed windows: the window's day unless that day was built from this
/// very revision, and any other day that still covers the window (it moved: a late message changed its start).
pub fn dirty_days(changes: &[WindowChange]) -> BTreeSet<PeriodKey> {
    let mut out = BTreeSet::new();
    for c in changes {
        let day = PeriodKey::of(&c.bot, &c.user_id, Period::Day, c.start);
        if !c
            .covered_by
            .iter()
            .any(|(d, same_rev)| *d == day.start && *same_rev)
        {
            out.insert(day.clone());
        }
        for (d, _) in &c.covered_by {
            if *d != day.start {
                out.insert(PeriodKey::of(&c.bot, &c.user_id, Period::Day, *d));
            }
        }
    }
    out
}

/// A finer summary a rollup is built from (a window row for a day; a day row for a week or a month).
#[derive(Debug, Clone, PartialEq)]
pub struct FinerSummary {
    pub id: i64,
    pub revision: i32,
    pub text: String,
    pub key_topics: Vec<String>,
    pub tone: Option<String>,
    pub message_count: i32,
    pub start: DateTime<Utc>,
    /// The window ids it covers (itself for a window row; a day's `covered_ids`).
    pub covered_ids: Vec<i64>,
}

/// `id:revision` of each input, sorted: what a rollup was built from.
pub fn inputs_of(rows: &[FinerSummary]) -> Vec<String> {
    let mut v: Vec<String> = rows
        .iter()
        .map(|r| format!("{}:{}", r.id, r.revision))
        .collect();
    v.sort();
    v
}

/// The union of the inputs' coverage, sorted and without duplicates.
pub fn covered_of(rows: &[FinerSummary]) -> Vec<i64> {
    let set: BTreeSet<i64> = rows
        .iter()
        .flat_map(|r| r.covered_ids.iter().copied())
        .collect();
    set.into_iter().collect()
}

/// The part of a summary worth re-summarizing: the text after an extractive head's `Key messages: ` /
/// `Highlights: ` label when there is one (the head only repeats topics and counts), else the whole text.
pub fn summary_body(text: &str) -> &str {
    for label in ["Key messages: ", "Highlights: "] {
        if let Some(i) = text.find(label) {
            let rest = text[i + label.len()..].trim();
            if !rest.is_empty() {
                return rest;
            }
        }
    }
    text.trim()
}

/// The summarizer's input for a rollup: one message per finer summary, in time order; its role says what it
/// summarizes (`conversation summary` for a window row, `day summary` for a day: both summarizers show the role, and
/// the extractive one words its head by it), its text is the finer summary's body ([`summary_body`]), its emotion the
/// finer summary's tone.
pub fn rollup_input(key: &PeriodKey, rows: &[FinerSummary]) -> WindowInput {
    let mut rows: Vec<&FinerSummary> = rows.iter().collect();
    rows.sort_by_key(|r| (r.start, r.id));
    let role = match key.period {
        Period::Day => CONVERSATION_ROLE,
        Period::Week | Period::Month => DAY_ROLE,
    };
    WindowInput {
        bot: key.bot.clone(),
        user_id: key.user_id.clone(),
        start_ms: key.start.timestamp_millis(),
        end_ms: key.end().timestamp_millis(),
        messages: rows
            .iter()
            .map(|r| Message {
                point_id: format!("summary:{}", r.id),
                role: role.to_string(),
                text: summary_body(&r.text).to_string(),
                ts_ms: r.start.timestamp_millis(),
                emotion: r.tone.clone(),
                vector: Vec::new(),
            })
            .collect(),
    }
}

/// The role of a window's summary in a day's input.
pub const CONVERSATION_ROLE: &str = "conversation summary";
/// The role of a day's summary in a week's or a month's input.
pub const DAY_ROLE: &str = "day summary";

/// Delay before the next attempt of a rollup that failed `attempts` times: 30 s doubling, at most an hour.
pub fn retry_delay(attempts: i32) -> std::time::Duration {
    let secs = 30u64.saturating_mul(1u64 << attempts.clamp(0, 7));
    std::time::Duration::from_secs(secs.min(3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bounds_of_each_period() {
        let x = t("2026-11-27T18:20:00Z"); // a Friday
        assert_eq!(
            Period::Day.bounds(x),
            (t("2026-11-27T00:00:00Z"), t("2026-11-28T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(x),
            (t("2026-11-23T00:00:00Z"), t("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(x),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(t("2026-12-31T23:59:59Z")),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(t("2028-02-29T12:00:00Z")).1,
            t("2028-03-01T00:00:00Z")
        );
        assert_eq!(
            row_end(t("2026-11-28T00:00:00Z")).to_rfc3339(),
            "2026-11-27T23:59:59.999999+00:00"
        );
        for p in Period::ALL {
            assert_eq!(Period::parse(p.as_str()), Some(p));
        }
    }

    #[test]
    fn dirty_days_for_new_revised_and_moved_windows() {
        let d1 = t("2026-11-26T00:00:00Z");
        let d2 = t("2026-11-27T00:00:00Z");
        let change = |start: &str, covered_by: Vec<(DateTime<Utc>, bool)>| WindowChange {
            bot: "elena".into(),
            user_id: "u".into(),
            summary_id: 7,
            revision: 2,
            start: t(start),
            covered_by,
        };
        let days = |c: &[WindowChange]| -> Vec<DateTime<Utc>> {
            dirty_days(c).into_iter().map(|k| k.start).collect()
        };
        // new window: its day
        assert_eq!(days(&[change("2026-11-27T10:00:00Z", vec![])]), vec![d2]);
        // revised (day built from an older revision): its day
        assert_eq!(
            days(&[change("2026-11-27T10:00:00Z", vec![(d2, false)])]),
            vec![d2]
        );
        // already built from this revision (an overlapping rescan): nothing
        assert!(days(&[change("2026-11-27T10:00:00Z", vec![(d2, true)])]).is_empty());
        // moved to the day before (a late message): both days
        assert_eq!(
            days(&[change("2026-11-26T23:50:00Z", vec![(d2, true)])]),
            vec![d1, d2]
        );
    }

    #[test]
    fn body_and_input() {
        assert_eq!(
            summary_body(
                "The user talked about coral over 5 messages (tone: positive). Key messages: \"reef\""
            ),
            "\"reef\""
        );
        assert_eq!(summary_body("  An LLM summary.  "), "An LLM summary.");
        let key = PeriodKey::of("elena", "u", Period::Day, t("2026-11-27T10:00:00Z"));
        let row = |id, start: &str| FinerSummary {
            id,
            revision: 1,
            text: format!("summary {id} about the coral reef"),
            key_topics: vec!["coral".into(), "reef".into()],
            tone: Some("positive".into()),
            message_count: 5,
            start: t(start),
            covered_ids: vec![id],
        };
        let w = rollup_input(
            &key,
            &[
                row(9, "2026-11-27T12:00:00Z"),
                row(3, "2026-11-27T08:00:00Z"),
            ],
        );
        assert_eq!(w.messages.len(), 2);
        assert_eq!(w.messages[0].point_id, "summary:3");
        assert_eq!(w.messages[0].text, "summary 3 about the coral reef");
        assert_eq!(w.messages[0].role, CONVERSATION_ROLE);
        assert_eq!(w.start_ms, t("2026-11-27T00:00:00Z").timestamp_millis());
        assert_eq!(w.end_ms, t("2026-11-28T00:00:00Z").timestamp_millis());
        let s = crate::summarize::extractive::summarize_window(&w).unwrap();
        assert!(
            s.key_topics.contains(&"coral".to_string()),
            "{:?}",
            s.key_topics
        );
        assert!(
            s.text
                .starts_with("Across 2 conversations the user talked about coral"),
            "{}",
            s.text
        );
    }

    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        // 2000-01-01 .. 2100-01-01, millisecond resolution (the tracker's unit)
        (946_684_800_000i64..4_102_444_800_000i64)
            .prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap())
    }

    proptest! {
        /// A period contains its instant, periods tile time (the next one starts where this one ends), a day lies in
        /// its week and its month, and a rollup row's end is never on a millisecond (so it never equals a window's).
        #[test]
        fn periods_tile_and_nest(x in any_time()) {
            for p in Period::ALL {
                let (s, e) = p.bounds(x);
                prop_assert!(s <= x && x < e);
                prop_assert_eq!(p.bounds(e).0, e);
                prop_assert_eq!(p.bounds(s), (s, e));
                prop_assert!(!row_end(e).timestamp_subsec_micros().is_multiple_of(1000));
                let days = (e - s).num_days();
                match p {
                    Period::Day => prop_assert_eq!(days, 1),
                    Period::Week => prop_assert_eq!(days, 7),
                    Period::Month => prop_assert!((28..=31).contains(&days)),
                }
            }
            let (ds, de) = Period::Day.bounds(x);
            for p in [Period::Week, Period::Month] {
                let (s, e) = p.bounds(x);
                prop_assert!(s <= ds && de <= e);
            }
            // the three rows of one instant never share (start, end), and none shares a window's millisecond end
            let rows: BTreeSet<_> = Period::ALL
                .iter()
                .map(|p| {
                    let (s, e) = p.bounds(x);
                    (s, row_end(e))
                })
                .collect();
            prop_assert_eq!(rows.len(), 3);
        }

        /// Every changed window makes its own day dirty unless that day already holds its revision, and every other
        /// day covering it; nothing else.
        #[test]
        fn dirty_days_model(
            starts in proptest::collection::vec((any_time(), proptest::collection::vec((0i64..3, any::<bool>()), 0..3)), 0..12)
        ) {
            let changes: Vec<WindowChange> = starts.iter().enumerate().map(|(i, (s, cov))| {
                let day = Period::Day.bounds(*s).0;
                WindowChange {
                    bot: "b".into(),
                    user_id: format!("u{}", i % 3),
                    summary_id: i as i64,
                    revision: 1,
                    start: *s,
                    covered_by: cov.iter().map(|(off, same)| (day + Duration::days(*off - 1), *same)).collect(),
                }
            }).collect();
            let dirty = dirty_days(&changes);
            for c in &changes {
                let day = PeriodKey::of(&c.bot, &c.user_id, Period::Day, c.start);
                let built = c.covered_by.iter().any(|(d, same)| *d == day.start && *same);
                if !built { prop_assert!(dirty.contains(&day)); }
                for (d, _) in &c.covered_by {
                    prop_assert!(dirty.contains(&PeriodKey::of(&c.bot, &c.user_id, Period::Day, *d)) || *d == day.start);
                }
            }
            for k in &dirty {
                prop_assert_eq!(k.period, Period::Day);
                prop_assert!(changes.iter().any(|c| c.user_id == k.user_id
                    && (Period::Day.bounds(c.start).0 == k.start || c.covered_by.iter().any(|(d, _)| *d == k.start))));
            }
        }
    }
}
