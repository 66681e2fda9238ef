//! Payload mapping: a bot's Qdrant point into a [`Message`] (`PayloadMapping`, `map_point`, the payload's time), the
//! Qdrant-typed point-id helpers, and the de-duplication of repeated messages.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use qdrant_client::qdrant::{
    PointId, RetrievedPoint, Value, point_id::PointIdOptions, value::Kind, vector_output,
    vectors_output::VectorsOptions,
};

use crate::model::canonical_point_id;
use crate::summarize::Message;
use crate::tracker::Millis;

/// Which payload fields carry what (configurable: bot versions differ).
#[derive(Debug, Clone)]
pub struct PayloadMapping {
    pub user: String,
    pub content: String,
    pub role: String,
    pub memory_type: String,
    pub timestamp: String,
    pub timestamp_unix: String,
    pub emotion: String,
    pub content_vector: String,
    /// `memory_type` values that are chat messages.
    pub memory_types: Vec<String>,
}

impl Default for PayloadMapping {
    fn default() -> Self {
        PayloadMapping {
            user: "user_id".into(),
            content: "content".into(),
            role: "role".into(),
            memory_type: "memory_type".into(),
            timestamp: "timestamp".into(),
            timestamp_unix: "timestamp_unix".into(),
            emotion: "emotional_context".into(),
            content_vector: "content".into(),
            memory_types: vec!["conversation".into()],
        }
    }
}

/// Why a point is not a message of any window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    NoTimestamp,
    NoUser,
    NotConversation,
    ConversationPair,
    NoContent,
    /// A stored point id Qdrant cannot parse (not a UUID or an unsigned integer): never asked for.
    BadPointId,
    /// A point the window names that no collection returned (not visible yet, or deleted).
    NotFound,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoTimestamp => "no_timestamp",
            SkipReason::NoUser => "no_user",
            SkipReason::NotConversation => "not_conversation",
            SkipReason::ConversationPair => "conversation_pair",
            SkipReason::NoContent => "no_content",
            SkipReason::BadPointId => "bad_point_id",
            SkipReason::NotFound => "not_found",
        }
    }
}

/// A point read as a chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedPoint {
    pub user_id: String,
    pub message: Message,
}

pub fn point_id_string(id: &PointId) -> String {
    match &id.point_id_options {
        Some(PointIdOptions::Uuid(u)) => canonical_point_id(u).unwrap_or_else(|| u.clone()),
        Some(PointIdOptions::Num(n)) => n.to_string(),
        None => String::new(),
    }
}

/// A point id as Qdrant takes it: integers stay integers, anything else is a UUID string.
pub fn point_id_from_str(id: &str) -> PointId {
    match id.parse::<u64>() {
        Ok(n) => PointId::from(n),
        Err(_) => PointId::from(id.to_string()),
    }
}

fn as_str(v: Option<&Value>) -> Option<&str> {
    match v?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

pub(super) fn as_f64(v: Option<&Value>) -> Option<f64> {
    match v?.kind.as_ref()? {
        Kind::DoubleValue(d) => Some(*d),
        Kind::IntegerValue(i) => Some(*i as f64),
        Kind::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

/// Parses the bots' naive ISO timestamp (written in UTC), or an RFC 3339 one, to milliseconds.
pub fn parse_naive_iso(s: &str) -> Option<Millis> {
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_millis());
    }
    [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .map(|dt| dt.and_utc().timestamp_millis())
}

/// The message time of a payload: `timestamp_unix` (float seconds), else the naive ISO `timestamp` (UTC).
pub fn payload_time(m: &PayloadMapping, payload: &HashMap<String, Value>) -> Option<Millis> {
    if let Some(secs) = as_f64(payload.get(&m.timestamp_unix)) {
        // NaN, infinities and absurd years are not times.
        if secs.is_finite() && (946_684_800.0..7_258_118_400.0).contains(&secs) {
            return Some((secs * 1000.0).floor() as Millis);
        }
        return None;
    }
    as_str(payload.get(&m.timestamp)).and_then(parse_naive_iso)
}

/// Maps one Qdrant point to a chat message, or says why it is not one.
pub fn map_point(m: &PayloadMapping, p: &RetrievedPoint) -> Result<MappedPoint, SkipReason> {
    let payload = &p.payload;
    let role = as_str(payload.get(&m.role)).or_else(|| as_str(payload.get("source")));
    if role == Some("conversation_pair") {
        return Err(SkipReason::ConversationPair);
    }
    if let Some(kind) = as_str(payload.get(&m.memory_type))
        && !m.memory_types.iter().any(|t| t == kind)
    {
        return Err(SkipReason::NotConversation);
    }
    let user_id = match payload.get(&m.user).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) if !s.is_empty() => s.clone(),
        Some(Kind::IntegerValue(i)) => i.to_string(),
        _ => return Err(SkipReason::NoUser),
    };
    let ts_ms = payload_time(m, payload).ok_or(SkipReason::NoTimestamp)?;
    let text = as_str(payload.get(&m.content))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(SkipReason::NoContent)?;
    let role = match role {
        Some("user") | Some("user_message") => "user",
        Some("assistant") | Some("bot") | Some("bot_response") => "assistant",
        _ => "unknown",
    };
    Ok(MappedPoint {
        user_id,
        message: Message {
            point_id: p.id.as_ref().map(point_id_string).unwrap_or_default(),
            role: role.to_string(),
            text: text.to_string(),
            ts_ms,
            emotion: as_str(payload.get(&m.emotion)).map(str::to_string),
            vector: content_vector(p, &m.content_vector),
        },
    })
}

pub(super) fn content_vector(p: &RetrievedPoint, name: &str) -> Vec<f32> {
    let out = match p.vectors.as_ref().and_then(|v| v.vectors_options.as_ref()) {
        Some(VectorsOptions::Vectors(named)) => named.vectors.get(name),
        Some(VectorsOptions::Vector(v)) => Some(v),
        None => None,
    };
    #[allow(deprecated)]
    match out {
        Some(v) => match &v.vector {
            Some(vector_output::Vector::Dense(d)) => d.data.clone(),
            _ => v.data.clone(),
        },
        None => Vec::new(),
    }
}

/// Sorts by time and drops repeated messages (same point, or the same speaker, time and text stored twice).
pub fn dedupe_messages(mut msgs: Vec<Message>) -> Vec<Message> {
    msgs.sort_by(|a, b| (a.ts_ms, &a.point_id).cmp(&(b.ts_ms, &b.point_id)));
    let mut ids = HashSet::new();
    let mut same = HashSet::new();
    msgs.retain(|m| {
        ids.insert(m.point_id.clone()) && same.insert((m.ts_ms, m.role.clone(), m.text.clone()))
    });
    msgs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24, case 7: an event naming its point as `uuid4().hex` (or upper case, or an integer with leading zeros)
    /// and the sweep reading the same point from Qdrant name one message: both come out in one canonical form. (Here,
    /// not in `event`: it needs the Qdrant-typed `point_id_string` and the state, both above `event`.)
    #[test]
    fn an_events_point_id_is_the_form_the_sweep_reads() {
        let u = uuid::Uuid::new_v4();
        let swept = point_id_string(&qdrant_client::qdrant::PointId::from(u.to_string()));
        for written in [
            u.simple().to_string(),
            u.simple().to_string().to_uppercase(),
            u.hyphenated().to_string().to_uppercase(),
            format!("{{{}}}", u.hyphenated()),
            format!("urn:uuid:{}", u.hyphenated()),
        ] {
            let body = format!(
                r#"{{"v":1,"bot":"elena","point_id":"{written}","user_id":"u","ts":"2026-11-20T14:03:11Z"}}"#
            );
            let e = crate::event::StoredEvent::parse(body.as_bytes()).expect("valid");
            assert_eq!(e.point_id, swept, "{written}");
        }
        let swept = point_id_string(&qdrant_client::qdrant::PointId::from(7u64));
        let e = crate::event::StoredEvent::parse(
            br#"{"v":1,"bot":"elena","point_id":"007","user_id":"u","ts":"2026-11-20T14:03:11Z"}"#,
        )
        .expect("valid");
        assert_eq!(e.point_id, swept);
        // so the state sees one message
        let mut s = crate::state::State::new(crate::tracker::TrackerConfig::default());
        let hex = crate::event::StoredEvent::parse(
            format!(
                r#"{{"v":1,"bot":"b","point_id":"{}","user_id":"u","ts":"2026-11-20T14:03:11Z"}}"#,
                u.simple()
            )
            .as_bytes(),
        )
        .expect("valid");
        s.observe("b", "u", &hex.point_id, 1000, 1000);
        let sweep = point_id_string(&qdrant_client::qdrant::PointId::from(u.to_string()));
        assert_eq!(
            s.observe("b", "u", &sweep, 1000, 1000),
            Some(crate::tracker::Observed::Duplicate)
        );
    }

    fn v_str(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }
    fn v_f64(f: f64) -> Value {
        Value {
            kind: Some(Kind::DoubleValue(f)),
        }
    }

    fn point(pairs: &[(&str, Value)]) -> RetrievedPoint {
        RetrievedPoint {
            id: Some(PointId::from(
                "6f1c2d9e-8a55-4c0e-9a43-1f7f1b2a9c10".to_string(),
            )),
            payload: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn maps_a_whisperengine_point() {
        let m = PayloadMapping::default();
        let p = point(&[
            ("user_id", v_str("123")),
            ("content", v_str("hello there")),
            ("role", v_str("user")),
            ("memory_type", v_str("conversation")),
            ("timestamp", v_str("2026-11-20T14:03:11.512000")),
            ("timestamp_unix", v_f64(1_763_647_391.512)),
            ("emotional_context", v_str("joy")),
        ]);
        let mp = map_point(&m, &p).unwrap();
        assert_eq!(mp.user_id, "123");
        assert_eq!(mp.message.ts_ms, 1_763_647_391_512);
        assert_eq!(mp.message.role, "user");
        assert_eq!(mp.message.emotion.as_deref(), Some("joy"));
    }

    #[test]
    fn falls_back_to_the_naive_timestamp_and_unknown_speaker() {
        let m = PayloadMapping::default();
        let p = point(&[
            ("user_id", v_str("u")),
            ("content", v_str("x")),
            ("timestamp", v_str("2026-11-20T14:03:11.512000")),
        ]);
        let mp = map_point(&m, &p).unwrap();
        assert_eq!(mp.message.ts_ms, 1_795_183_391_512);
        assert_eq!(mp.message.role, "unknown");
    }

    #[test]
    fn skips_what_is_not_a_message() {
        let m = PayloadMapping::default();
        let base = [
            ("user_id", v_str("u")),
            ("content", v_str("x")),
            ("timestamp_unix", v_f64(1_763_647_391.0)),
        ];
        let with = |extra: (&str, Value)| {
            let mut v = base.to_vec();
            v.push(extra);
            point(&v)
        };
        assert_eq!(
            map_point(&m, &with(("role", v_str("conversation_pair")))),
            Err(SkipReason::ConversationPair)
        );
        assert_eq!(
            map_point(&m, &with(("memory_type", v_str("fact")))),
            Err(SkipReason::NotConversation)
        );
        assert_eq!(
            map_point(&m, &point(&[("content", v_str("x"))])),
            Err(SkipReason::NoUser)
        );
        assert_eq!(
            map_point(
                &m,
                &point(&[("user_id", v_str("u")), ("content", v_str("x"))])
            ),
            Err(SkipReason::NoTimestamp)
        );
        let nan = point(&[
            ("user_id", v_str("u")),
            ("content", v_str("x")),
            ("timestamp_unix", v_f64(f64::NAN)),
        ]);
        assert_eq!(map_point(&m, &nan), Err(SkipReason::NoTimestamp));
    }

    #[test]
    fn dedupes_repeated_messages() {
        let msg = |id: &str, ts| Message {
            point_id: id.into(),
            role: "user".into(),
            text: "hi".into(),
            ts_ms: ts,
            emotion: None,
            vector: vec![],
        };
        let out = dedupe_messages(vec![msg("b", 2), msg("a", 1), msg("a", 1), msg("c", 1)]);
        assert_eq!(
            out.iter().map(|m| m.point_id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
    }
}
