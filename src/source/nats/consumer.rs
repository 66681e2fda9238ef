//! Connecting to NATS, the stream and consumer definitions (`nats/*.json`), a replay's consumer, the lag probe.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};

use super::{CONSUMER_JSON, NatsSettings, PartitionBy, STREAM_JSON, err, route_consumer_name};
use crate::source::batch::SourceError;

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
