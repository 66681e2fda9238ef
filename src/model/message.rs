//! The messages every stage passes on: one entering the tracker ([`NewMessage`]), one fetched for a summary
//! ([`Message`]), and input recap could not use ([`DeadLetter`]).

use super::Millis;

/// One message entering the tracker from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub bot: String,
    pub user_id: String,
    pub point_id: String,
    pub ts_ms: Millis,
}

/// Input recap could not use.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: &'static str,
    pub subject: Option<String>,
    pub stream_seq: Option<u64>,
    pub raw: Vec<u8>,
    pub reason: String,
    /// The (bot, user) key the input names, when it names one (migration 0017): how forgetting a user finds it.
    pub bot: Option<String>,
    pub user_id: Option<String>,
}

impl DeadLetter {
    /// The key of a malformed event body: its `bot` and `user_id` fields (strings, or numbers as text) when it is a
    /// JSON object that has them; a body cut short or not JSON names none (what remains of it is matched by the
    /// forget through the subject).
    pub fn key_of_json(body: &[u8]) -> (Option<String>, Option<String>) {
        let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(body)
        else {
            return (None, None);
        };
        let field = |name: &str| match o.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        (field("bot"), field("user_id"))
    }

    /// A key part as a column can store it: text without NUL (Postgres refuses it in `TEXT`; an id with one cannot be
    /// forgotten through the API either).
    pub fn key_part(s: Option<String>) -> Option<String> {
        s.filter(|s| !s.contains('\0'))
    }
}

/// One message of a window, as fetched from Qdrant (payload fields already mapped).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Qdrant point id, as a string (UUID or integer).
    pub point_id: String,
    /// Speaker: `user`, `assistant`, or `unknown` when the payload has no usable speaker field.
    pub role: String,
    /// The message text (`content`).
    pub text: String,
    /// Message time, milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    /// `emotional_context` label (e.g. `joy`, `neutral`), if any.
    pub emotion: Option<String>,
    /// The `content` named vector (384-d in WhisperEngine data); empty when the point has none.
    pub vector: Vec<f32>,
}
