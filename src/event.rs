//! The one wire type for the `message stored` event (see `nats/README.md`), and its validation.
//!
//! A bot publishes it on `recap.stored.<bot>` with header `Nats-Msg-Id` = the point id after it has written the point
//! to Qdrant. Everything that reads events goes through [`StoredEvent::parse`], so the contract lives here only.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The only event version recap understands.
pub const EVENT_VERSION: u32 = 1;
/// Bodies above this are rejected unread (the event is well under 1 KiB).
pub const MAX_EVENT_BYTES: usize = 4096;
/// Longest accepted bot name / user id / point id / collection name.
const MAX_FIELD_LEN: usize = 255;

/// A bot stored a message as a Qdrant point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub v: u32,
    pub bot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    pub point_id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// RFC 3339 with a zone, e.g. `2026-11-20T14:03:11.512Z`.
    pub ts: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event body is {0} bytes, over the {MAX_EVENT_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("event body is not UTF-8")]
    NotUtf8,
    #[error("event is not valid JSON for the v1 contract: {0}")]
    Json(String),
    #[error("event version {0} is not supported (this recap reads v{EVENT_VERSION})")]
    UnknownVersion(u64),
    #[error("event field `{field}` is invalid: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("subject {subject:?} names bot {subject_bot:?} but the event says {event_bot:?}")]
    SubjectMismatch {
        subject: String,
        subject_bot: String,
        event_bot: String,
    },
}

impl EventError {
    /// A short, stable label for metrics (`reason` label).
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::TooLarge(_) => "too_large",
            EventError::NotUtf8 => "not_utf8",
            EventError::Json(_) => "json",
            EventError::UnknownVersion(_) => "unknown_version",
            EventError::Field { .. } => "field",
            EventError::SubjectMismatch { .. } => "subject_mismatch",
        }
    }
}

/// A bot name must be one NATS subject token and safe everywhere recap uses it.
pub fn is_valid_bot(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The subject token that stands for a user (`<prefix>.<bot>.<user>`): the user id itself when it is printable ASCII
/// without `.`, `*` and `>` (Discord ids are digits), else `~` and the 16 hex digits of its FNV-1a 64 hash. Publishers
/// compute the same (`clients/python`: `recap_client.user_token`); only the partition depends on it.
pub fn user_token(user_id: &str) -> std::borrow::Cow<'_, str> {
    let plain = !user_id.is_empty()
        && user_id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'));
    if plain {
        return std::borrow::Cow::Borrowed(user_id);
    }
    std::borrow::Cow::Owned(format!("~{:016x}", fnv1a64(user_id.as_bytes())))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn check_text(field: &'static str, value: &str) -> Result<(), EventError> {
    let bad = |reason: &str| {
        Err(EventError::Field {
            field,
            reason: reason.to_string(),
        })
    };
    if value.is_empty() {
        return bad("empty");
    }
    if value.len() > MAX_FIELD_LEN {
        return bad("longer than 255 bytes");
    }
    if value.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

/// The checks every message's identifying fields pass, whatever its source (events and the sweep): the bot name, a
/// Qdrant point id, and a user id of 1-255 bytes without control characters (NUL included).
pub fn check_message(bot: &str, point_id: &str, user_id: &str) -> Result<(), EventError> {
    if !is_valid_bot(bot) {
        return Err(EventError::Field {
            field: "bot",
            reason: "must be 1-100 of [A-Za-z0-9_-]".into(),
        });
    }
    check_text("point_id", point_id)?;
    if !crate::model::is_point_id(point_id) {
        return Err(EventError::Field {
            field: "point_id",
            reason: "not a UUID or an unsigned integer".into(),
        });
    }
    check_text("user_id", user_id)
}

impl StoredEvent {
    /// Parses and validates one event body. Unknown fields are ignored; an unknown `v` is rejected.
    pub fn parse(body: &[u8]) -> Result<StoredEvent, EventError> {
        if body.len() > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge(body.len()));
        }
        let text = std::str::from_utf8(body).map_err(|_| EventError::NotUtf8)?;
        // The usual event parses straight into the struct (no intermediate JSON value: a third of the parse's cost).
        // Anything else takes the path below, which tells a v2 event or a shape error apart exactly as before.
        if let Ok(event) = serde_json::from_str::<StoredEvent>(text)
            && event.v == EVENT_VERSION
        {
            event.validate()?;
            return Ok(event.canonical());
        }
        // Read the version first so a v2 event is reported as such, not as a shape error.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
        match value.get("v").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(EVENT_VERSION) => {}
            Some(v) => return Err(EventError::UnknownVersion(v)),
            None => return Err(EventError::Json("missing or non-integer field `v`".into())),
        }
        let event: StoredEvent =
            serde_json::from_value(value).map_err(|e| EventError::Json(e.to_string()))?;
        event.validate()?;
        Ok(event.canonical())
    }

    /// The event with its point id in the one form recap compares and stores (`model::canonical_point_id`): an event
    /// naming `uuid4().hex` and the sweep reading the same point (hyphenated) name one message.
    fn canonical(mut self) -> StoredEvent {
        if let Some(id) = crate::model::canonical_point_id(&self.point_id) {
            self.point_id = id;
        }
        self
    }

    /// Field checks shared by every producer of events (NATS and tests).
    pub fn validate(&self) -> Result<(), EventError> {
        if !is_valid_bot(&self.bot) {
            return Err(EventError::Field {
                field: "bot",
                reason: "must be 1-100 of [A-Za-z0-9_-]".into(),
            });
        }
        check_text("point_id", &self.point_id)?;
        // A Qdrant point id is a UUID or an unsigned integer; anything else can never be fetched.
        if !crate::model::is_point_id(&self.point_id) {
            return Err(EventError::Field {
                field: "point_id",
                reason: "not a UUID or an unsigned integer".into(),
            });
        }
        check_text("user_id", &self.user_id)?;
        if let Some(c) = &self.collection {
            check_text("collection", c)?;
        }
        if let Some(r) = &self.role {
            check_text("role", r)?;
        }
        let year = chrono::Datelike::year(&self.ts);
        if !(2000..=2200).contains(&year) {
            return Err(EventError::Field {
                field: "ts",
                reason: format!("year {year} is out of range"),
            });
        }
        Ok(())
    }

    /// Parses an event received on `subject` and checks that the subject names the body's bot: as its last token
    /// (`<prefix>.<bot>`, partitioned `<prefix>.p.<k>.<bot>`), or followed by the body's user token
    /// (`<prefix>.<bot>.<user>`, partitioned `<prefix>.p.<k>.<bot>.<user>`; [`user_token`]).
    pub fn parse_on_subject(subject: &str, body: &[u8]) -> Result<StoredEvent, EventError> {
        let event = StoredEvent::parse(body)?;
        if !subject.contains('.') {
            return Ok(event);
        }
        let mut tokens = subject.rsplit('.');
        let last = tokens.next().unwrap_or_default();
        if last == event.bot {
            return Ok(event);
        }
        let before = tokens.next().unwrap_or_default();
        if before == event.bot && last == user_token(&event.user_id) {
            return Ok(event);
        }
        Err(EventError::SubjectMismatch {
            subject: subject.to_string(),
            subject_bot: if before == event.bot { before } else { last }.to_string(),
            event_bot: event.bot,
        })
    }

    /// The subject this event is published on: `<prefix>.<bot>`.
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}", self.bot)
    }

    /// The subject with the user token, `<prefix>.<bot>.<user>`: what lets `NATS_PARTITION_BY=user` spread one bot's
    /// users over the partitions. Either subject is accepted whatever recap's setting.
    pub fn user_subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.bot, user_token(&self.user_id))
    }

    /// The serialized body (compact JSON).
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("event serializes")
    }

    /// True for the WhisperEngine duplicate point that carries both sides of an exchange.
    pub fn is_conversation_pair(&self) -> bool {
        self.role.as_deref() == Some("conversation_pair")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"v":1, "bot":"elena", "collection":"whisperengine_memory_elena_7d",
        "point_id":"6f1c2d9e-8a55-4c0e-9a43-1f7f1b2a9c10", "user_id":"123456789012345678", "role":"user",
        "ts":"2026-11-20T14:03:11.512Z"}"#;

    #[test]
    fn accepts_the_documented_event() {
        let e = StoredEvent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(e.bot, "elena");
        assert_eq!(e.user_id, "123456789012345678");
        assert_eq!(e.role.as_deref(), Some("user"));
        assert_eq!(e.ts.timestamp_millis(), 1_795_183_391_512);
        assert!(GOOD.len() < 1024);
    }

    #[test]
    fn optional_fields_may_be_absent_and_unknown_fields_are_ignored() {
        let body = r#"{"v":1,"bot":"marcus","point_id":"42","user_id":"u","ts":"2026-11-20T14:03:11+02:00","extra":[1,2]}"#;
        let e = StoredEvent::parse(body.as_bytes()).unwrap();
        assert_eq!(e.collection, None);
        assert_eq!(e.role, None);
        assert_eq!(e.ts.to_rfc3339(), "2026-11-20T12:03:11+00:00");
    }

    #[test]
    fn round_trips() {
        let e = StoredEvent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(StoredEvent::parse(&e.to_body()).unwrap(), e);
    }

    fn err(body: &[u8]) -> EventError {
        StoredEvent::parse(body).unwrap_err()
    }

    #[test]
    fn rejects_truncated_json() {
        let e = err(&GOOD.as_bytes()[..40]);
        assert_eq!(e.kind(), "json");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }

    #[test]
    fn rejects_oversized_bodies() {
        let big = format!(
            r#"{{"v":1,"bot":"elena","point_id":"7","user_id":"{}","ts":"2026-11-20T14:03:11Z"}}"#,
            "x".repeat(5000)
        );
        assert!(matches!(err(big.as_bytes()), EventError::TooLarge(n) if n > MAX_EVENT_BYTES));
    }

    #[test]
    fn rejects_wrong_types() {
        let e = err(
            br#"{"v":1,"bot":"elena","point_id":42,"user_id":"u","ts":"2026-11-20T14:03:11Z"}"#,
        );
        assert!(
            e.to_string().contains("point_id") || e.to_string().contains("string"),
            "{e}"
        );
        let e = err(br#"{"v":1,"bot":"elena","point_id":"7","user_id":"u","ts":1763647391}"#);
        assert_eq!(e.kind(), "json");
        // a naive timestamp (no zone) is not RFC 3339
        let e = err(br#"{"v":1,"bot":"elena","point_id":"7","user_id":"u","ts":"2026-11-20T14:03:11.512000"}"#);
        assert_eq!(e.kind(), "json");
    }

    #[test]
    fn rejects_unknown_versions() {
        let e = err(
            br#"{"v":2,"bot":"elena","point_id":"7","user_id":"u","ts":"2026-11-20T14:03:11Z"}"#,
        );
        assert_eq!(e, EventError::UnknownVersion(2));
        assert!(e.to_string().contains("version 2"));
        assert_eq!(err(br#"{"bot":"elena"}"#).kind(), "json");
    }

    #[test]
    fn rejects_hostile_fields() {
        assert_eq!(err(&[0xff, 0xfe, b'{']).kind(), "not_utf8");
        let bad_bot =
            br#"{"v":1,"bot":"el.ena","point_id":"7","user_id":"u","ts":"2026-11-20T14:03:11Z"}"#;
        assert!(matches!(
            err(bad_bot),
            EventError::Field { field: "bot", .. }
        ));
        let ctl = br#"{"v":1,"bot":"elena","point_id":"7","user_id":"u\u0000x","ts":"2026-11-20T14:03:11Z"}"#;
        assert!(matches!(
            err(ctl),
            EventError::Field {
                field: "user_id",
                ..
            }
        ));
        let year1 =
            br#"{"v":1,"bot":"elena","point_id":"7","user_id":"u","ts":"0001-01-01T00:00:00Z"}"#;
        assert!(matches!(err(year1), EventError::Field { field: "ts", .. }));
        let empty =
            br#"{"v":1,"bot":"elena","point_id":"","user_id":"u","ts":"2026-11-20T14:03:11Z"}"#;
        assert!(matches!(
            err(empty),
            EventError::Field {
                field: "point_id",
                ..
            }
        ));
    }

    #[test]
    fn subject_must_name_the_same_bot() {
        assert!(StoredEvent::parse_on_subject("recap.stored.elena", GOOD.as_bytes()).is_ok());
        let e = StoredEvent::parse_on_subject("recap.stored.marcus", GOOD.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), "subject_mismatch");
        // the user token after the bot, partitioned or not
        for ok in [
            "recap.stored.elena.123456789012345678",
            "recap.stored.p.3.elena.123456789012345678",
            "recap.stored.p.3.elena",
        ] {
            assert!(
                StoredEvent::parse_on_subject(ok, GOOD.as_bytes()).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "recap.stored.elena.999",
            "recap.stored.marcus.123456789012345678",
        ] {
            let e = StoredEvent::parse_on_subject(bad, GOOD.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), "subject_mismatch", "{bad}");
        }
        let e: StoredEvent = serde_json::from_str(GOOD).unwrap();
        assert_eq!(
            e.user_subject("recap.stored"),
            "recap.stored.elena.123456789012345678"
        );
    }

    #[test]
    fn user_tokens_are_the_id_or_its_hash() {
        assert_eq!(user_token("123456789012345678"), "123456789012345678");
        assert_eq!(user_token("alice@example"), "alice@example");
        assert!(
            user_token("alice@example.com").starts_with('~'),
            "a dot is a token separator"
        );
        // FNV-1a 64 (reference vectors) of the bytes
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(user_token("a.b"), format!("~{:016x}", fnv1a64(b"a.b")));
        for odd in ["a b", "a*", ">", "x.y", "é", ""] {
            let t = user_token(odd);
            assert!(t.starts_with('~') && t.len() == 17, "{odd:?} -> {t}");
        }
        assert_ne!(user_token("x.y"), user_token("x.z"));
    }
}
