//! Input parsing for every recall route: each function checks one input and its error names the field.

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::{ApiError, DEFAULT_LIMIT, RecallState};
use crate::config::is_valid_bot_name;
use crate::recall::Range;
use crate::recall::timerange::{Bound, parse_tz, resolve};

/// A bot name: what ingest accepts (letters, digits, `_`, `-`), at most the column's 100.
pub fn check_bot(bot: &str) -> Result<(), ApiError> {
    if !is_valid_bot_name(bot) || bot.len() > 100 {
        return Err(ApiError::bad(
            "bot",
            format!("bot {bot:?} is not a bot name (letters, digits, '_' and '-'; at most 100)"),
        ));
    }
    Ok(())
}

/// A user id: non-empty, at most the column's 255 characters, no control characters (NUL included: ingest never
/// stores one, and Postgres cannot take a NUL in text).
pub fn check_user(user: &str) -> Result<(), ApiError> {
    if user.trim().is_empty() || user.chars().count() > 255 {
        return Err(ApiError::bad(
            "user_id",
            "user_id must be a non-empty string of at most 255 characters",
        ));
    }
    if user.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "user_id",
            "user_id contains a control character (NUL, newline, ...)",
        ));
    }
    Ok(())
}

/// A free-text parameter (`text`, `tz`, `since`, ...): no NUL byte, which Postgres cannot take in text.
pub fn check_no_nul(field: &'static str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::bad(field, format!("{field} contains a NUL byte")));
    }
    Ok(())
}

/// The times Postgres stores and every client reads: years 1 to 9999.
pub fn check_time(field: &'static str, t: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    use chrono::Datelike;
    if !(1..=9999).contains(&t.year()) {
        return Err(ApiError::bad(
            field,
            format!("{field} is out of range: it must lie between 0001-01-01 and 9999-12-31"),
        ));
    }
    Ok(t)
}

/// A query vector: 1 to 65536 numbers, each finite as an f32 (`1e39` is finite in JSON's f64 and infinite in f32),
/// not all zero. (That it is an array of numbers is the body's type: `body::search_body`.)
pub fn vector_of(v: Option<Vec<f64>>) -> Result<Option<Vec<f32>>, ApiError> {
    let Some(a) = v else {
        return Ok(None);
    };
    if a.is_empty() || a.len() > 65_536 {
        return Err(ApiError::bad(
            "vector",
            "vector must have between 1 and 65536 numbers",
        ));
    }
    let v = a
        .iter()
        .map(|x| Some(*x as f32).filter(|f| f.is_finite()))
        .collect::<Option<Vec<f32>>>()
        .ok_or_else(|| {
            ApiError::bad(
                "vector",
                "vector must be an array of numbers that are finite as 32-bit floats (|x| < 3.4e38)",
            )
        })?;
    if v.iter().all(|x| *x == 0.0) {
        return Err(ApiError::bad(
            "vector",
            "vector is all zeros (no direction to search in)",
        ));
    }
    Ok(Some(v))
}

pub(super) async fn known_bot(s: &RecallState, bot: &str) -> Result<(), ApiError> {
    check_bot(bot)?;
    if s.0.known_bots.contains(bot) {
        return Ok(());
    }
    if crate::recall::bot_known(&s.0.store, bot).await? {
        s.0.known_bots.insert(bot.to_owned());
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        field: Some("bot"),
        message: format!("unknown bot {bot:?}: recap has no summaries or windows for it"),
    })
}

pub fn limit_of(v: Option<i64>, max: i64) -> Result<i64, ApiError> {
    match v {
        None => Ok(DEFAULT_LIMIT.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad(
            "limit",
            format!("limit must be between 1 and {max} (got {n})"),
        )),
    }
}

pub fn type_of(v: Option<&str>) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(t)
            if !t.is_empty()
                && t.len() <= 50
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Ok(Some(t.to_owned()))
        }
        Some(t) => Err(ApiError::bad(
            "type",
            format!("type {t:?} is not a summary type (e.g. time_window, day, week, month)"),
        )),
    }
}

/// `since` / `until` (RFC 3339, a date or a relative form, in `tz`) and the summary type as a [`Range`].
pub fn range_of(
    since: Option<&str>,
    until: Option<&str>,
    tz: Option<&str>,
    summary_type: Option<String>,
) -> Result<Range, ApiError> {
    let tz: Tz = match tz {
        None => Tz::UTC,
        Some(z) => {
            check_no_nul("tz", z)?;
            parse_tz(z).map_err(|e| ApiError::bad("tz", format!("tz {e}")))?
        }
    };
    let now = Utc::now();
    let one = |v: Option<&str>,
               b: Bound,
               field: &'static str|
     -> Result<Option<DateTime<Utc>>, ApiError> {
        v.map(|e| {
            check_no_nul(field, e)?;
            let t =
                resolve(e, b, now, tz).map_err(|m| ApiError::bad(field, format!("{field} {m}")))?;
            check_time(field, t)
        })
        .transpose()
    };
    let since = one(since, Bound::Since, "since")?;
    let until = one(until, Bound::Until, "until")?;
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(ApiError::bad(
            "until",
            format!(
                "until ({}) must be after since ({})",
                u.to_rfc3339(),
                s.to_rfc3339()
            ),
        ));
    }
    Ok(Range {
        since,
        until,
        summary_type,
    })
}
