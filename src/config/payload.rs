//! Payload mapping: the field names of the bots' Qdrant points recap reads.

use super::{ConfigError, H_PAYLOAD, bad, non_empty, norm_list, parse_trimmed};

/// Qdrant payload mapping settings.
#[derive(clap::Args, Clone, Debug)]
pub struct PayloadConfig {
    /// Payload field holding the user id
    #[arg(long, env = "PAYLOAD_USER_FIELD", default_value = "user_id", help_heading = H_PAYLOAD)]
    pub payload_user_field: String,

    /// Payload field holding the message text
    #[arg(long, env = "PAYLOAD_CONTENT_FIELD", default_value = "content", help_heading = H_PAYLOAD)]
    pub payload_content_field: String,

    /// Payload field naming the speaker (user/assistant; missing: "unknown")
    #[arg(long, env = "PAYLOAD_ROLE_FIELD", default_value = "role", help_heading = H_PAYLOAD)]
    pub payload_role_field: String,

    /// Payload field holding the memory type
    #[arg(long, env = "PAYLOAD_MEMORY_TYPE_FIELD", default_value = "memory_type", help_heading = H_PAYLOAD)]
    pub payload_memory_type_field: String,

    /// Payload field with the naive ISO-8601 UTC timestamp (fallback when the unix one is missing)
    #[arg(long, env = "PAYLOAD_TIMESTAMP_FIELD", default_value = "timestamp", help_heading = H_PAYLOAD)]
    pub payload_timestamp_field: String,

    /// Payload field with the float unix timestamp (used for range filters)
    #[arg(long, env = "PAYLOAD_TIMESTAMP_UNIX_FIELD", default_value = "timestamp_unix", help_heading = H_PAYLOAD)]
    pub payload_timestamp_unix_field: String,

    /// Payload field with the emotion label
    #[arg(long, env = "PAYLOAD_EMOTION_FIELD", default_value = "emotional_context", help_heading = H_PAYLOAD)]
    pub payload_emotion_field: String,

    /// Named vector holding the content embedding
    #[arg(long, env = "CONTENT_VECTOR_NAME", default_value = "content", help_heading = H_PAYLOAD)]
    pub content_vector_name: String,

    /// Memory types that are chat messages, comma-separated
    #[arg(long, env = "MEMORY_TYPES", value_delimiter = ',', value_parser = parse_trimmed,
          default_value = "conversation", help_heading = H_PAYLOAD)]
    pub memory_types: Vec<String>,
}

impl PayloadConfig {
    pub(super) fn normalize(&mut self) {
        norm_list(&mut self.memory_types);
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (value, var, default) in [
            (&self.payload_user_field, "PAYLOAD_USER_FIELD", "user_id"),
            (
                &self.payload_content_field,
                "PAYLOAD_CONTENT_FIELD",
                "content",
            ),
            (&self.payload_role_field, "PAYLOAD_ROLE_FIELD", "role"),
            (
                &self.payload_memory_type_field,
                "PAYLOAD_MEMORY_TYPE_FIELD",
                "memory_type",
            ),
            (
                &self.payload_timestamp_field,
                "PAYLOAD_TIMESTAMP_FIELD",
                "timestamp",
            ),
            (
                &self.payload_timestamp_unix_field,
                "PAYLOAD_TIMESTAMP_UNIX_FIELD",
                "timestamp_unix",
            ),
            (
                &self.payload_emotion_field,
                "PAYLOAD_EMOTION_FIELD",
                "emotional_context",
            ),
            (&self.content_vector_name, "CONTENT_VECTOR_NAME", "content"),
        ] {
            non_empty(value, var, default)?;
        }
        if self.memory_types.iter().all(|t| t.trim().is_empty()) {
            return bad(
                "MEMORY_TYPES",
                "MEMORY_TYPES is empty (set MEMORY_TYPES=conversation)",
            );
        }
        Ok(())
    }

    /// The payload field names (PAYLOAD_*_FIELD, CONTENT_VECTOR_NAME, MEMORY_TYPES) for
    /// [`crate::fetch`].
    pub fn mapping(&self) -> crate::fetch::PayloadMapping {
        let t = |s: &String| s.trim().to_owned();
        crate::fetch::PayloadMapping {
            user: t(&self.payload_user_field),
            content: t(&self.payload_content_field),
            role: t(&self.payload_role_field),
            memory_type: t(&self.payload_memory_type_field),
            timestamp: t(&self.payload_timestamp_field),
            timestamp_unix: t(&self.payload_timestamp_unix_field),
            emotion: t(&self.payload_emotion_field),
            content_vector: t(&self.content_vector_name),
            memory_types: self
                .memory_types
                .iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
        }
    }
}
