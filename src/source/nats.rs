//! The JetStream source: a durable pull consumer on the stream defined in `nats/`.
//!
//! Stream and consumer definitions are the JSON files in `nats/` (the format `nats stream add --config` takes),
//! compiled in and applied at start, idempotently. Malformed events become dead letters and are acknowledged with the
//! batch, so they never block the stream. Acks are sent only after the ingest transaction committed; a batch that
//! was not committed is left for redelivery (`ack_wait`), and redelivered events are no-ops in the store.

//!
//! Files: `nats.rs` the settings; `nats/partition.rs` the partition layout (which partition owns a key);
//! `nats/consumer.rs` connecting, the stream and consumer definitions, the lag probe; `nats/source.rs` the
//! source (`NatsSource`) and the parse of one message (`accept`).

mod consumer;
mod partition;
mod source;

use std::path::PathBuf;
use std::time::Duration;

use super::batch::SourceError;

pub use consumer::{
    LagProbe, ReplayFrom, connect, consumer_config, ensure_stream, replay_consumer_config,
    stream_config,
};
pub use partition::{layout, owner, partition_of, partition_of_tokens};
pub use source::{DEAD_LETTER_BODY_MAX, NatsSource, accept};

pub const STREAM_JSON: &str = include_str!("../../nats/stream.json");
pub const CONSUMER_JSON: &str = include_str!("../../nats/consumer.json");

/// While the stream reports more messages pending, how long a batch waits for the next one before it is handed on.
const BACKLOG_LINGER: Duration = Duration::from_millis(50);

/// How to reach NATS and which stream to read.
#[derive(Clone, Default)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub consumer: String,
    pub subject_prefix: String,
    pub max_age: Duration,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub nkey_seed: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_required: bool,
    pub batch_size: usize,
    /// How long JetStream waits for an ack before redelivering (the redelivery delay after a crash).
    pub ack_wait: Duration,
    /// NATS_PARTITIONS: the stream's subjects carry a partition when above 1 (see [`stream_config`]).
    pub partitions: u32,
    /// NATS_PARTITION_BY: what the partition is a hash of.
    pub partition_by: PartitionBy,
    /// The partition this source reads (`None`: all, through one consumer; unpartitioned or a replay).
    pub partition: Option<u32>,
}

/// What an event's partition is a hash of (`NATS_PARTITION_BY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionBy {
    /// The bot: `<prefix>.<bot>`, partition `p` of `partition(n, 1)`.
    #[default]
    Bot,
    /// The bot and the user: `<prefix>.<bot>.<user>` ([`crate::event::user_token`]), `partition(n, 1, 2)`.
    User,
}

impl NatsSettings {
    /// The same settings for partition `k`'s source.
    pub fn for_partition(&self, k: u32) -> NatsSettings {
        NatsSettings {
            partition: (self.partitions > 1).then_some(k),
            ..self.clone()
        }
    }

    /// The durable consumer's name: `NATS_CONSUMER`, or `<NATS_CONSUMER>-p<k>` for partition k.
    pub fn consumer_name(&self) -> String {
        match self.partition {
            Some(k) => format!("{}-p{k}", self.consumer),
            None => self.consumer.clone(),
        }
    }

    /// What the consumer reads: every subject, or partition k's (`<prefix>.p.<k>.*`, by user `<prefix>.p.<k>.*.*`).
    pub fn filter_subject(&self) -> String {
        match (self.partition, self.partition_by) {
            (Some(k), PartitionBy::Bot) => format!("{}.p.{k}.*", self.subject_prefix),
            (Some(k), PartitionBy::User) => format!("{}.p.{k}.*.*", self.subject_prefix),
            (None, _) => format!("{}.>", self.subject_prefix),
        }
    }

    /// The partition that owns a (bot, user) key: the one NATS stores its events in. Above one partition only
    /// this partition's leader keeps the key's state, sweeps its points and stores its windows.
    pub fn owner(&self, bot: &str, user: &str) -> u32 {
        owner(self.partition_by, self.partitions, bot, user)
    }

    /// The subjects the partitioned stream leaves untransformed (the other subject shape: `<prefix>.<bot>.<user>`
    /// by bot, `<prefix>.<bot>` by user), which the route consumer re-publishes on the configured shape.
    pub fn route_subject(&self) -> String {
        match self.partition_by {
            PartitionBy::Bot => format!("{}.*.*", self.subject_prefix),
            PartitionBy::User => format!("{}.*", self.subject_prefix),
        }
    }
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> SourceError {
    SourceError::Nats(e.to_string())
}

/// The route consumer's name (`route.rs`): `<NATS_CONSUMER>-route`. Here, beside the partitions' consumer names, so
/// `nats` does not import `route` (which imports `nats`; issue 27).
pub fn route_consumer_name(s: &NatsSettings) -> String {
    format!("{}-route", s.consumer)
}
