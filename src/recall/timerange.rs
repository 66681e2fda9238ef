//! Time ranges for recall: RFC 3339 instants, dates, and relative forms resolved in an IANA zone.
//!
//! Pure functions: the caller passes `now`. A named period (`today`, `yesterday`, `this week`, `last week`,
//! `this month`, `last month`) given as `since` means the period's start, given as `until` its end, so
//! `since=last week&until=last week` is exactly last week. A duration (`30m`, `12h`, `7d`, `2w`) means that long
//! before `now`; `now` is now; `2026-11-20` is that day's start (as `since`) or end (as `until`) in the zone.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Which end of a range an expression is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Since,
    Until,
}

/// Parses an IANA zone name (`Europe/Berlin`, `UTC`).
pub fn parse_tz(s: &str) -> Result<Tz, String> {
    s.trim().parse::<Tz>().map_err(|_| {
        format!("{s:?} is not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)")
    })
}

/// Resolves one bound of a range.
pub fn resolve(
    expr: &str,
    bound: Bound,
    now: DateTime<Utc>,
    tz: Tz,
) -> Result<DateTime<Utc>, String> {
    let e = expr.trim().to_ascii_lowercase();
    let e = e.split_whitespace().collect::<Vec<_>>().join(" ");
    if e.is_empty() {
        return Err("is empty".into());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(expr.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(&e, "%Y-%m-%d") {
        return period(d, d.succ_opt().ok_or("date out of range")?, bound, tz);
    }
    if e == "now" {
        return Ok(now);
    }
    if let Some(d) = duration(&e) {
        return now
            .checked_sub_signed(d?)
            .ok_or_else(|| "is too far in the past".to_string());
    }
    let today = now.with_timezone(&tz).date_naive();
    let week_start = today - Duration::days(today.weekday().num_days_from_monday().into());
    let month_start = today.with_day(1).expect("day 1 exists");
    let next_month = |d: NaiveDate| {
        if d.month() == 12 {
            NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
        }
        .expect("first of a month exists")
    };
    let prev_month = |d: NaiveDate| {
        if d.month() == 1 {
            NaiveDate::from_ymd_opt(d.year() - 1, 12, 1)
        } else {
            NaiveDate::from_ymd_opt(d.year(), d.month() - 1, 1)
        }
        .expect("first of a month exists")
    };
    let (from, to) = match e.as_str() {
        "today" => (today, today + Duration::days(1)),
        "yesterday" => (today - Duration::days(1), today),
        "this week" => (week_start, week_start + Duration::days(7)),
        "last week" => (week_start - Duration::days(7), week_start),
        "this month" => (month_start, next_month(month_start)),
        "last month" => (prev_month(month_start), month_start),
        _ => {
            return Err(format!(
                "{expr:?} is not a time: use RFC 3339 (2026-11-20T10:00:00Z), a date (2026-11-20), a duration ago \
                 (30m, 12h, 7d, 2w), now, today, yesterday, this week, last week, this month or last month"
            ));
        }
    };
    period(from, to, bound, tz)
}

/// `30m`, `12h`, `7d`, `2w` (also with a space or long unit names: `7 days`). `None`: not a duration at all.
fn duration(e: &str) -> Option<Result<Duration, String>> {
    let digits = e.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let n: i64 = match e[..digits].parse() {
        Ok(n) => n,
        Err(_) => return Some(Err("duration is too large".into())),
    };
    let unit = e[digits..].trim();
    let d = match unit {
        "m" | "min" | "mins" | "minute" | "minutes" => Duration::try_minutes(n),
        "h" | "hour" | "hours" => Duration::try_hours(n),
        "d" | "day" | "days" => Duration::try_days(n),
        "w" | "week" | "weeks" => Duration::try_weeks(n),
        _ => return None,
    };
    Some(d.ok_or_else(|| "duration is too large".into()))
}

/// The start (`Since`) or end (`Until`) of the local-date period `[from, to)` in `tz`.
fn period(from: NaiveDate, to: NaiveDate, bound: Bound, tz: Tz) -> Result<DateTime<Utc>, String> {
    let day = match bound {
        Bound::Since => from,
        Bound::Until => to,
    };
    local_midnight(day, tz)
}

/// The first instant of `day` in `tz` (a DST gap at midnight moves it to the first existing instant).
pub fn local_midnight(day: NaiveDate, tz: Tz) -> Result<DateTime<Utc>, String> {
    let naive: NaiveDateTime = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    for shift in 0..=3 {
        let t = naive + Duration::hours(shift);
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return Ok(x.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, _) => return Ok(a.with_timezone(&Utc)),
            LocalResult::None => continue,
        }
    }
    Err("has no local midnight in this zone".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    // Friday 2026-11-27 10:30 UTC
    const NOW: &str = "2026-11-27T10:30:00Z";

    #[test]
    fn relative_forms_in_utc() {
        let now = at(NOW);
        let r = |e, b| resolve(e, b, now, Tz::UTC).unwrap();
        assert_eq!(r("7d", Bound::Since), at("2026-11-20T10:30:00Z"));
        assert_eq!(r("12h", Bound::Since), at("2026-11-26T22:30:00Z"));
        assert_eq!(r("2 weeks", Bound::Since), at("2026-11-13T10:30:00Z"));
        assert_eq!(r("now", Bound::Until), now);
        assert_eq!(r("yesterday", Bound::Since), at("2026-11-26T00:00:00Z"));
        assert_eq!(r("yesterday", Bound::Until), at("2026-11-27T00:00:00Z"));
        assert_eq!(r("today", Bound::Since), at("2026-11-27T00:00:00Z"));
        assert_eq!(r("this week", Bound::Since), at("2026-11-23T00:00:00Z"));
        assert_eq!(r("Last  Week", Bound::Since), at("2026-11-16T00:00:00Z"));
        assert_eq!(r("last week", Bound::Until), at("2026-11-23T00:00:00Z"));
        assert_eq!(r("this month", Bound::Since), at("2026-11-01T00:00:00Z"));
        assert_eq!(r("this month", Bound::Until), at("2026-12-01T00:00:00Z"));
        assert_eq!(r("last month", Bound::Since), at("2026-10-01T00:00:00Z"));
        assert_eq!(r("2026-11-20", Bound::Until), at("2026-11-21T00:00:00Z"));
        assert_eq!(
            r("2026-11-20T12:00:00+02:00", Bound::Since),
            at("2026-11-20T10:00:00Z")
        );
    }

    #[test]
    fn zones_move_the_day() {
        // 10:30 UTC is already Saturday in Tokyo and still Thursday... no: Friday 05:30 in New York.
        let now = at("2026-11-27T20:00:00Z"); // Saturday 05:00 in Tokyo
        let tokyo = parse_tz("Asia/Tokyo").unwrap();
        assert_eq!(
            resolve("today", Bound::Since, now, tokyo).unwrap(),
            at("2026-11-27T15:00:00Z")
        );
        let ny = parse_tz("America/New_York").unwrap();
        assert_eq!(
            resolve("yesterday", Bound::Since, now, ny).unwrap(),
            at("2026-11-26T05:00:00Z")
        );
        // A month across a DST change: October in Berlin starts at +02:00.
        let berlin = parse_tz("Europe/Berlin").unwrap();
        assert_eq!(
            resolve("last month", Bound::Since, now, berlin).unwrap(),
            at("2026-09-30T22:00:00Z")
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let now = at(NOW);
        for e in [
            "",
            "soon",
            "7x",
            "last decade",
            "99999999999999999999d",
            "2026-13-01",
        ] {
            assert!(resolve(e, Bound::Since, now, Tz::UTC).is_err(), "{e}");
        }
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
