//! The JetStream source: a durable pull consumer on the stream defined in `nats/`.
//!
//! Stream and consumer definitions are the JSON files in `nats/` (the format `nats stream add --config` takes),
//! compiled in and applied at start, idempotently. Malformed events become dead letters and are acknowledged with the
//! batch, so they never block the stream. Acks are sent only after the ingest transaction committed; a batch that
//! was not committed is left for redelivery (`ack_wait`), and redelivered events are no-ops in the store.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::{FutureExt, StreamExt};

use super::batch::{Batch, Source, SourceError};
use crate::event::StoredEvent;
use crate::sink::{DeadLetter, Lease, NewMessage, Store, StoreError};
use tracing::{debug, warn};

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

/// Connects with the configured auth and TLS. With `wait`, keeps trying until NATS answers (the service); without it,
/// fails at once (`recap check`). Once connected, the client reconnects by itself forever.
pub async fn connect(s: &NatsSettings, wait: bool) -> Result<async_nats::Client, SourceError> {
    let mut o = async_nats::ConnectOptions::new()
        .name("recap")
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|ev| async move {
            tracing::info!(event = %ev, "nats connection event");
        });
    if wait {
        o = o.retry_on_initial_connect();
    }
    if let Some(t) = &s.token {
        o = o.token(t.clone());
    }
    if let (Some(u), Some(p)) = (&s.user, &s.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(path) = &s.creds_file {
        o = o.credentials_file(path).await.map_err(|e| {
            err(format!(
                "cannot read NATS_CREDS_FILE {}: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(seed) = &s.nkey_seed {
        o = o.nkey(seed.clone());
    }
    if let Some(ca) = &s.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if s.tls_required {
        o = o.require_tls(true);
    }
    o.connect(&s.url).await.map_err(err)
}

/// The stream config from `nats/stream.json`, with the configured name, subjects and max age.
pub fn stream_config(s: &NatsSettings) -> Result<stream::Config, SourceError> {
    let mut c: stream::Config =
        serde_json::from_str(STREAM_JSON).map_err(|e| err(format!("nats/stream.json: {e}")))?;
    c.name = s.stream.clone();
    c.subjects = vec![format!("{}.>", s.subject_prefix)];
    c.max_age = s.max_age;
    if s.partitions > 1 {
        // NATS' own deterministic mapping: `<prefix>.<bot>` is stored as `<prefix>.p.<k>.<bot>`, k = the bot's bucket
        // (FNV-1a 32 of the token, mod n: `partition_of`); by user `<prefix>.<bot>.<user>` as
        // `<prefix>.p.<k>.<bot>.<user>` (FNV-1a 32 of both tokens).
        let (p, n) = (&s.subject_prefix, s.partitions);
        c.subject_transform = Some(match s.partition_by {
            PartitionBy::Bot => stream::SubjectTransform {
                source: format!("{p}.*"),
                destination: format!("{p}.p.{{{{partition({n},1)}}}}.{{{{wildcard(1)}}}}"),
            },
            PartitionBy::User => stream::SubjectTransform {
                source: format!("{p}.*.*"),
                destination: format!(
                    "{p}.p.{{{{partition({n},1,2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
                ),
            },
        });
    }
    Ok(c)
}

/// The partition NATS stores a bot's events in (`partition(n, 1)` of the stream's subject transform): FNV-1a 32 of
/// the bot name, mod `n`. The sweep and the state restore use it to take only their partition's bots.
pub fn partition_of(bot: &str, n: u32) -> u32 {
    partition_of_tokens(&[bot], n)
}

/// The partition of `n` that owns a (bot, user) key when partitioned by `by` (see [`NatsSettings::owner`]).
pub fn owner(by: PartitionBy, n: u32, bot: &str, user: &str) -> u32 {
    match by {
        PartitionBy::Bot => partition_of(bot, n),
        PartitionBy::User => partition_of_tokens(&[bot, &crate::event::user_token(user)], n),
    }
}

/// The partition layout a snapshot row is written under: `1` unpartitioned, else `bot/<n>` or `user/<n>`. Rows of
/// another layout are re-assigned by key at restore.
pub fn layout(by: PartitionBy, n: u32) -> String {
    match by {
        _ if n <= 1 => "1".to_string(),
        PartitionBy::Bot => format!("bot/{n}"),
        PartitionBy::User => format!("user/{n}"),
    }
}

/// NATS' `partition(n, i, j, ...)`: FNV-1a 32 of the tokens one after the other, mod `n`.
pub fn partition_of_tokens(tokens: &[&str], n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in tokens.iter().flat_map(|t| t.as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % n
}

/// The consumer config from `nats/consumer.json`, with the configured name; with partitions, partition k's durable
/// consumer `<consumer>-p<k>` on `<prefix>.p.<k>.*`.
pub fn consumer_config(s: &NatsSettings) -> Result<jetstream::consumer::pull::Config, SourceError> {
    let mut c: jetstream::consumer::pull::Config =
        serde_json::from_str(CONSUMER_JSON).map_err(|e| err(format!("nats/consumer.json: {e}")))?;
    c.durable_name = Some(s.consumer_name());
    c.name = Some(s.consumer_name());
    c.filter_subject = s.filter_subject();
    if !s.ack_wait.is_zero() {
        c.ack_wait = s.ack_wait;
    }
    Ok(c)
}

/// Where a replay starts.
#[derive(Debug, Clone)]
pub enum ReplayFrom {
    Sequence(u64),
    Time(chrono::DateTime<chrono::Utc>),
}

/// An ephemeral pull consumer that re-reads the stream from `from` (`recap replay`); the durable consumer is untouched.
pub fn replay_consumer_config(
    s: &NatsSettings,
    from: &ReplayFrom,
) -> Result<jetstream::consumer::pull::Config, SourceError> {
    let mut v = serde_json::json!({
        "ack_policy": "explicit",
        "ack_wait": 30_000_000_000u64,
        "filter_subject": s.filter_subject(),
        "inactive_threshold": 60_000_000_000u64,
        "description": "recap replay",
        "replay_policy": "instant",
    });
    match from {
        ReplayFrom::Sequence(seq) => {
            v["deliver_policy"] = "by_start_sequence".into();
            v["opt_start_seq"] = (*seq).max(1).into();
        }
        ReplayFrom::Time(t) => {
            v["deliver_policy"] = "by_start_time".into();
            v["opt_start_time"] = t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true).into();
        }
    }
    serde_json::from_value(v).map_err(|e| err(format!("replay consumer: {e}")))
}

/// Creates or updates the stream and the durable consumer (idempotent).
pub async fn ensure_stream(
    js: &jetstream::Context,
    s: &NatsSettings,
) -> Result<PullConsumer, SourceError> {
    js.create_or_update_stream(stream_config(s)?)
        .await
        .map_err(err)?;
    let stream = js.get_stream(&s.stream).await.map_err(err)?;
    match stream.create_consumer(consumer_config(s)?).await {
        Ok(c) => Ok(c),
        // The consumer exists with a start position set by a rewind (`Source::rewind`), which an update may not
        // change: it is the one to use.
        Err(create) => stream
            .get_consumer(&s.consumer_name())
            .await
            .map_err(|_| err(create)),
    }
}

/// How much of a malformed event's body the dead-letter table keeps.
pub const DEAD_LETTER_BODY_MAX: usize = 4096;

/// Parses one JetStream message into the batch.
pub fn accept(batch: &mut Batch, subject: &str, stream_seq: Option<u64>, body: &[u8]) {
    match StoredEvent::parse_on_subject(subject, body) {
        Ok(e) if e.is_conversation_pair() => batch.ignored += 1,
        Ok(e) => batch.messages.push(NewMessage {
            bot: e.bot,
            user_id: e.user_id,
            point_id: e.point_id,
            ts_ms: e.ts.timestamp_millis(),
        }),
        Err(e) => {
            tracing::warn!(subject, stream_seq, reason = %e, "malformed event sent to the dead-letter table");
            metrics::counter!("recap_events_malformed_total", "reason" => e.kind()).increment(1);
            let (bot, user_id) = DeadLetter::key_of_json(body);
            batch.dead_letters.push(DeadLetter {
                source: "nats",
                bot,
                user_id,
                subject: Some(subject.chars().take(255).collect()),
                stream_seq,
                // A flood of 1 MiB bodies must not fill the database: the first 4 KiB tell what it was (the whole
                // body stays in the stream, by `stream_seq`, until it ages out).
                raw: body[..body.len().min(DEAD_LETTER_BODY_MAX)].to_vec(),
                reason: if body.len() > DEAD_LETTER_BODY_MAX {
                    format!(
                        "{e} (body of {} bytes, first {DEAD_LETTER_BODY_MAX} kept)",
                        body.len()
                    )
                } else {
                    e.to_string()
                },
            })
        }
    }
}

/// Reads the consumer lag: of the durable consumer, or summed over every partition's.
#[derive(Clone)]
pub struct LagProbe {
    stream: jetstream::stream::Stream,
    consumers: Vec<String>,
}

impl LagProbe {
    /// Connects and makes sure the stream exists (it is the one recap applies); `lag` reads all partitions.
    pub async fn start(
        settings: &NatsSettings,
    ) -> Result<(async_nats::Client, LagProbe), SourceError> {
        let client = connect(settings, true).await?;
        let js = jetstream::new(client.clone());
        js.create_or_update_stream(stream_config(settings)?)
            .await
            .map_err(err)?;
        let stream = js.get_stream(&settings.stream).await.map_err(err)?;
        let consumers = if settings.partitions > 1 {
            (0..settings.partitions)
                .map(|k| settings.for_partition(k).consumer_name())
                .chain([route_consumer_name(settings)])
                .collect()
        } else {
            vec![settings.consumer_name()]
        };
        Ok((client, LagProbe { stream, consumers }))
    }

    /// Messages not yet delivered plus delivered but not acknowledged.
    pub async fn lag(&self) -> Result<u64, SourceError> {
        let mut total = 0;
        for name in &self.consumers {
            match self.stream.consumer_info(name).await {
                Ok(info) => total += info.num_pending + info.num_ack_pending as u64,
                // a partition whose consumer no replica created yet: nothing delivered, all pending in the stream
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(total)
    }
}

/// The JetStream source (see the module docs).
pub struct NatsSource {
    client: async_nats::Client,
    consumer: PullConsumer,
    settings: NatsSettings,
    /// Messages handed out since the last commit (acknowledged by it).
    in_flight: Vec<jetstream::Message>,
    /// Messages covered by checkpoints being written ([`Source::seal`]), oldest first: each group is acknowledged
    /// when its checkpoint committed.
    sealed: std::collections::VecDeque<Vec<jetstream::Message>>,
    /// The highest stream sequence handed out since the last rewind: a message at or below it is a redelivery of
    /// one already applied (its ack was still waiting for the checkpoint) and is only acknowledged again.
    max_seq: Option<u64>,
    /// A durable consumer (the ingest loop's), rewound to the stored position when ingest restores its state; a
    /// replay's ephemeral consumer is not.
    durable: bool,
    /// The consumer sequence of the last message received from this consumer. Each delivery takes the next one, so
    /// a jump means a delivery never reached this process (sent to a pull request the client dropped after an error
    /// or lost in a reconnect): with `ack_policy` all, acknowledging anything after it would acknowledge it unread.
    last_delivery: Option<u64>,
    /// After such a jump: where the consumer is recreated before the next read (the first stream sequence not handed
    /// out; `None` inside: the stream's start).
    restart_at: Option<Option<u64>>,
    /// Where the consumer was last created to start (`None`: the stream's start): a jump before anything was handed
    /// out since restarts it there.
    start_from: Option<u64>,
    /// The partition lease this process reads under (set by the ingest loop, [`Source::lead`]): without a current
    /// one it neither pulls nor deletes or recreates the consumer (issue 24, case 12).
    lease: Option<Lease>,
    /// The pull stream: it keeps pull requests outstanding, so the next messages arrive while the current batch is
    /// being committed. Dropped on any error and opened again by the next call.
    stream: Option<jetstream::consumer::pull::Stream>,
    wait: Duration,
}

impl NatsSource {
    fn new(
        client: async_nats::Client,
        consumer: PullConsumer,
        settings: NatsSettings,
    ) -> NatsSource {
        let delivered = consumer.cached_info().delivered.consumer_sequence;
        NatsSource {
            client,
            consumer,
            settings,
            in_flight: Vec::new(),
            sealed: std::collections::VecDeque::new(),
            max_seq: None,
            durable: true,
            // the next delivery of the consumer as found takes the next consumer sequence
            last_delivery: Some(delivered),
            restart_at: None,
            start_from: None,
            lease: None,
            stream: None,
            wait: Duration::from_millis(500),
        }
    }

    pub async fn start(settings: NatsSettings) -> Result<NatsSource, SourceError> {
        let client = connect(&settings, true).await?;
        let js = jetstream::new(client.clone());
        let consumer = ensure_stream(&js, &settings).await?;
        Ok(NatsSource::new(client, consumer, settings))
    }

    /// A source over an ephemeral consumer that re-reads the stream from `from` (see [`replay_consumer_config`]).
    pub async fn start_replay(
        settings: NatsSettings,
        from: &ReplayFrom,
    ) -> Result<NatsSource, SourceError> {
        let client = connect(&settings, false).await?;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(&settings.stream).await.map_err(err)?;
        let consumer = stream
            .create_consumer(replay_consumer_config(&settings, from)?)
            .await
            .map_err(err)?;
        let settings = NatsSettings {
            consumer: "replay".into(),
            ..settings
        };
        let mut source = NatsSource::new(client, consumer, settings);
        source.durable = false;
        Ok(source)
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn checkpoint_name(&self) -> String {
        format!(
            "nats:{}:{}",
            self.settings.stream,
            self.settings.consumer_name()
        )
    }
}

impl NatsSource {
    async fn stream(&mut self) -> Result<&mut jetstream::consumer::pull::Stream, SourceError> {
        if self.stream.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(self.settings.batch_size.max(1))
                .expires(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
                .map_err(err)?;
            self.stream = Some(stream);
        }
        Ok(self.stream.as_mut().expect("just set"))
    }
}

impl NatsSource {
    /// How long an empty `next_batch` waits for the first event (500 ms by default; the hybrid source waits less
    /// between the pages of a sweep cycle).
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    /// Drops the pull stream, as an error does; the next call opens another (its deliveries may have been lost).
    pub fn drop_pull_stream(&mut self) {
        self.stream = None;
    }

    /// Deletes the durable consumer and creates it again, starting at stream sequence `next` (from the start when the
    /// stream no longer reaches it). Deliveries are counted again from 1.
    async fn recreate_consumer(&mut self, next: Option<u64>) -> Result<(), SourceError> {
        self.stream = None;
        // Only the leader may replace the consumer: a deposed one would take the new leader's deliveries away.
        if let Some(lease) = &self.lease {
            lease.confirm().await.map_err(|e| match e {
                StoreError::LostLeadership(_) => SourceError::Deposed,
                e => SourceError::Store(e),
            })?;
        }
        let js = jetstream::new(self.client.clone());
        let mut stream = js.get_stream(&self.settings.stream).await.map_err(err)?;
        let last = stream.info().await.map_err(err)?.state.last_sequence;
        let mut config = consumer_config(&self.settings)?;
        match next {
            Some(next) if next > last + 1 => {
                warn!(
                    next,
                    last,
                    "stored stream position is past the stream's end (stream recreated?); reading it from the start"
                );
                self.start_from = None;
            }
            Some(next) => {
                self.start_from = Some(next);
                config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                };
            }
            None => self.start_from = None,
        }
        match stream.delete_consumer(&self.settings.consumer_name()).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(err(e)),
        }
        self.consumer = stream.create_consumer(config).await.map_err(err)?;
        // A new consumer's first delivery is its sequence 1: one that comes with a later sequence means the ones
        // before went elsewhere (a deposed leader's pull request), and ack-all must not cover them.
        self.last_delivery = Some(0);
        debug!(?next, "consumer recreated");
        Ok(())
    }
}

impl Source for NatsSource {
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        // Messages handed out before are still held (acknowledged together by the commit after the next checkpoint).
        if let Some(lease) = &self.lease
            && !lease.is_current()
        {
            // Deposed (or frozen past the lease): no pull request may stay outstanding.
            self.stream = None;
            return Err(SourceError::Deposed);
        }
        if let Some(next) = self.restart_at {
            self.recreate_consumer(next).await?;
            self.restart_at = None;
        }
        let mut batch = Batch::default();
        let max = self.settings.batch_size.max(1);
        let wait = self.wait;
        let mut last_seq = None;
        let mut pending = None;
        let mut failed = None;
        let mut gap_at = None;
        let mut got = 0usize;
        {
            let stream = self.stream().await?;
            // Wait (up to `wait`) for the first message; then, while the stream holds more (the last message's
            // `pending`), fill the batch up to its size; once nothing more is pending, take only what has already
            // arrived: batches are full while there is a backlog and a lone event is not held back.
            let mut taken: Vec<jetstream::Message> = Vec::new();
            while taken.len() < max {
                let more = taken
                    .last()
                    .and_then(|m| m.info().ok())
                    .is_some_and(|i| i.pending > 0);
                let next = if taken.is_empty() || more {
                    let limit = if taken.is_empty() {
                        wait
                    } else {
                        BACKLOG_LINGER
                    };
                    match tokio::time::timeout(limit, stream.next()).await {
                        Ok(n) => n,
                        Err(_) => break,
                    }
                } else {
                    match stream.next().now_or_never() {
                        Some(n) => n,
                        None => break, // nothing more ready
                    }
                };
                match next {
                    Some(Ok(m)) => taken.push(m),
                    Some(Err(e)) => {
                        failed = Some(err(e));
                        break;
                    }
                    None => {
                        failed = Some(err("the pull stream ended"));
                        break;
                    }
                }
            }
            for m in taken {
                let (seq, pend, delivery) = m
                    .info()
                    .map(|i| {
                        (
                            Some(i.stream_sequence),
                            Some(i.pending),
                            Some(i.consumer_sequence),
                        )
                    })
                    .unwrap_or((None, None, None));
                if let (true, Some(d), Some(last)) = (self.durable, delivery, self.last_delivery)
                    && d != last + 1
                {
                    let next = self.max_seq.map(|m| m + 1).or(self.start_from);
                    // A delivery between these two never arrived: this message and the rest of the batch are left
                    // unacknowledged, and the consumer starts again after the last message handed out.
                    warn!(
                        delivery = d,
                        expected = last + 1,
                        next,
                        "a delivery from the consumer was lost; reading again from the first message not handed out"
                    );
                    metrics::counter!("recap_consumer_restarts_total").increment(1);
                    gap_at = Some(next);
                    break;
                }
                self.last_delivery = delivery.or(self.last_delivery);
                pending = pend;
                if let (Some(s), Some(max)) = (seq, self.max_seq)
                    && s <= max
                {
                    // Redelivered while its first delivery waited for the checkpoint: applied already.
                    metrics::counter!("recap_events_redelivered_total").increment(1);
                    self.in_flight.push(m);
                    got += 1;
                    continue;
                }
                last_seq = seq.or(last_seq);
                self.max_seq = seq.max(self.max_seq);
                accept(&mut batch, m.subject.as_str(), seq, &m.payload);
                self.in_flight.push(m);
                got += 1;
            }
        }
        if let Some(next) = gap_at {
            self.stream = None;
            self.restart_at = Some(next);
            // What was handed out before is applied and waits for its checkpoint; its acknowledgements would go to
            // the recreated consumer (same name) and are not needed: the old one is gone.
            self.in_flight.clear();
            self.sealed.iter_mut().for_each(Vec::clear);
            if let Err(e) = self.recreate_consumer(next).await {
                debug!(error = %e, "consumer restart failed; tried again by the next call");
            } else {
                self.restart_at = None;
            }
        }
        if let Some(e) = failed {
            self.stream = None; // opened again by the next call
            if got == 0 {
                return Err(e);
            }
            tracing::debug!(error = %e, "pull stream failed after part of a batch; handing that part on");
        }
        metrics::counter!("recap_events_consumed_total").increment(got as u64);
        // Caught up means nothing left anywhere: no undelivered messages and none delivered (to us, still buffered
        // in the pull stream, or to a crashed process) and unacknowledged — those belong to windows still open.
        // The last message tells how many were undelivered when it was sent; only when that is 0 (or nothing came)
        // is the consumer asked.
        if got == 0 || pending == Some(0) {
            // The batch holds messages already: if the consumer info cannot be read, hand the batch on as not
            // caught up rather than fail it (a failed next_batch must not leave delivered messages behind).
            batch.caught_up = match self.consumer.get_info().await {
                Ok(info) => {
                    let held =
                        self.in_flight.len() + self.sealed.iter().map(Vec::len).sum::<usize>();
                    info.num_pending == 0 && info.num_ack_pending <= held
                }
                Err(e) if got > 0 => {
                    tracing::debug!(error = %e, "consumer info unavailable; batch not caught up");
                    false
                }
                Err(e) => return Err(err(e)),
            };
        }
        if let Some(seq) = last_seq {
            batch.checkpoint = Some((self.checkpoint_name(), seq as f64, 0));
        }
        if let Some(p) = pending {
            metrics::gauge!("recap_consumer_pending").set(p as f64);
        }
        Ok(batch)
    }

    async fn commit(&mut self) -> Result<(), SourceError> {
        let group = match self.sealed.pop_front() {
            Some(g) => g,
            None => std::mem::take(&mut self.in_flight),
        };
        if group.is_empty() {
            return Ok(());
        }
        if self.consumer.cached_info().config.ack_policy == jetstream::consumer::AckPolicy::All {
            // One ack for the group: it acknowledges every message up to its sequence.
            let last = group
                .iter()
                .max_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0))
                .expect("a non-empty group");
            last.ack().await.map_err(err)?;
        } else {
            for m in &group {
                m.ack().await.map_err(err)?;
            }
        }
        self.client.flush().await.map_err(err)?;
        Ok(())
    }

    fn seal(&mut self) {
        if !self.in_flight.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.in_flight));
        }
    }

    async fn abandon(&mut self) {
        self.sealed.clear();
        // Not acknowledged: JetStream redelivers after ack_wait (or the rewind that follows re-reads them). A NAK
        // would redeliver sooner, but during an outage that only spins; ack_wait is the back-off.
        self.in_flight.clear();
        self.max_seq = None;
        self.last_delivery = None;
        self.restart_at = None;
        // No pull request may stay outstanding: a replica that stopped leading this consumer would otherwise keep
        // taking its messages from the one that leads it now.
        self.stream = None;
    }

    fn lead(&mut self, lease: Option<Lease>) {
        self.lease = lease;
    }

    async fn probe(&mut self) -> Result<(), SourceError> {
        // The stream's consumer list is what a leader needs first (its rewind recreates the consumer): a request
        // that fails without a connection or a grant, and reads no message.
        let js = jetstream::new(self.client.clone());
        let mut stream = js.get_stream(&self.settings.stream).await.map_err(err)?;
        stream.info().await.map_err(err)?;
        match stream.consumer_info(&self.settings.consumer_name()).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    async fn rewind(&mut self, store: &Store) -> Result<(), SourceError> {
        self.sealed.clear();
        self.in_flight.clear();
        self.max_seq = None;
        self.stream = None;
        self.restart_at = None;
        if !self.durable {
            return Ok(());
        }
        let Some(position) = store.checkpoint(&self.checkpoint_name()).await? else {
            // Nothing stored yet: nothing was ever acknowledged, but a leader before this one may have taken events
            // and never committed (a partition handed back before its first checkpoint). Left as it is, the consumer
            // would redeliver them only after ack_wait, behind newer events whose ack-all acknowledges them unread:
            // recreate it from the start of the stream (its `deliver_policy` all), so everything comes again in order.
            return self.recreate_consumer(None).await;
        };
        // The consumer may have delivered past the stored position (to this process before a failed checkpoint, to
        // a crashed replica) and would redeliver that only after ack_wait, behind newer messages: recreate it at the
        // position, so the stream comes again in order from there.
        self.recreate_consumer(Some(position as u64 + 1)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load of the busiest partition over the mean (1.0 = even), for `(key, messages)` over `n` partitions.
    fn skew<'a>(load: impl IntoIterator<Item = (&'a str, f64)>, n: u32) -> f64 {
        let mut per = vec![0.0; n as usize];
        for (k, m) in load {
            per[partition_of(k, n) as usize] += m;
        }
        let total: f64 = per.iter().sum();
        per.iter().copied().fold(0.0, f64::max) / (total / f64::from(n))
    }

    /// The measurement behind partitioning by bot (ARCHITECTURE.md, "Scaling past one machine"): the skew of the
    /// busiest of 8 partitions for a WhisperEngine-like fleet of 10 bots, even and with one bot taking half the
    /// messages, by bot (what bots publish today) and by bot + user (a user token in the subject), 1,000 users a bot.
    #[test]
    fn partition_skew_by_bot_and_by_user() {
        let bots = [
            "elena", "marcus", "jake", "ryan", "gabriel", "sophia", "dream", "aethys", "aetheris",
            "dotty",
        ];
        let even = |_: usize| 1.0;
        let dominant = |i: usize| if i == 0 { 9.0 } else { 1.0 };
        for (name, weight) in [
            ("even", &even as &dyn Fn(usize) -> f64),
            ("one bot at 50%", &dominant),
        ] {
            let by_bot = skew(bots.iter().enumerate().map(|(i, b)| (*b, weight(i))), 8);
            let keys: Vec<(String, f64)> = bots
                .iter()
                .enumerate()
                .flat_map(|(i, b)| (0..1000).map(move |u| (format!("{b}{u}"), weight(i) / 1000.0)))
                .collect();
            let by_user = skew(keys.iter().map(|(k, w)| (k.as_str(), *w)), 8);
            println!(
                "SKEW fleet={name} partitions=8 by_bot={by_bot:.2} by_bot_and_user={by_user:.2}"
            );
            assert!(by_user < 1.2, "1,000 users a bot spread evenly: {by_user}");
            assert!(by_bot >= by_user);
        }
    }

    #[test]
    fn a_malformed_body_is_dead_lettered_with_at_most_4_kib_kept() {
        let mut batch = Batch::default();
        let big = vec![b'x'; 1 << 20];
        accept(&mut batch, "recap.stored.bot", Some(7), &big);
        accept(&mut batch, "recap.stored.bot", Some(8), b"{not json");
        assert_eq!(batch.messages.len(), 0);
        let [a, b] = &batch.dead_letters[..] else {
            panic!("two dead letters: {:?}", batch.dead_letters.len())
        };
        assert_eq!(a.raw.len(), DEAD_LETTER_BODY_MAX);
        assert_eq!(a.stream_seq, Some(7));
        assert!(a.reason.contains("body of 1048576 bytes"), "{}", a.reason);
        assert_eq!(b.raw, b"{not json");
        assert!(!b.reason.contains("body of"), "{}", b.reason);
    }
}
