//! The route consumer: with more than one partition, the stream partitions one subject shape (`<prefix>.<bot>` by
//! bot, `<prefix>.<bot>.<user>` by user; `source::nats::stream_config`) and stores the other as published. Those
//! events (a publisher that sends the user token while recap partitions by bot, or an old publisher while it
//! partitions by user) are re-published here on the configured shape, so NATS puts them in the partition that owns
//! their key, and only then acknowledged.
//!
//! Every replica runs one on the same durable consumer `<NATS_CONSUMER>-route` (explicit acks, so the replicas share
//! its messages safely). A re-publish carries `Nats-Msg-Id` `route:<stream sequence>`: a crash between the publish
//! and the ack publishes again, the stream drops the copy within its duplicate window, and after it the ingest's own
//! de-duplication (open state, closed windows' coverage) does. A body that does not parse goes on unchanged, to the
//! partition of its subject's bot, where it becomes a dead letter like any malformed event.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::batch::SourceError;
/// In `nats.rs` (issue 27: `nats` needs it too; here it closed a circle nats -> route -> nats).
pub use super::nats::route_consumer_name;
use super::nats::{NatsSettings, PartitionBy, connect, consumer_config};
use crate::event::{StoredEvent, user_token};

/// Most events re-published before their acks are awaited.
const ROUTE_BATCH: usize = 256;

fn err(e: impl std::fmt::Display) -> SourceError {
    SourceError::Nats(e.to_string())
}

/// How far back the route consumer starts when it is first made: events of the other shape from before it (already
/// read by the consumers of the previous layout) are not re-published, those since a restart a few seconds ago are.
const ROUTE_START_BACK: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// The route consumer: durable `<NATS_CONSUMER>-route` on the unpartitioned shape, explicit acks (replicas share it),
/// starting `ROUTE_START_BACK` before it is first made.
pub fn route_consumer_config(
    s: &NatsSettings,
) -> Result<jetstream::consumer::pull::Config, SourceError> {
    let ack_wait = consumer_config(s)?.ack_wait;
    let start = chrono::Utc::now() - ROUTE_START_BACK;
    let v = serde_json::json!({
        "durable_name": route_consumer_name(s),
        "name": route_consumer_name(s),
        "description": "recap: events on the subject shape the partitions do not use, re-published (nats/README.md)",
        "deliver_policy": "by_start_time",
        "opt_start_time": start.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "ack_policy": "explicit",
        "ack_wait": ack_wait.as_nanos() as u64,
        "max_deliver": -1,
        "max_ack_pending": ROUTE_BATCH * 4,
        "filter_subject": s.route_subject(),
        "replay_policy": "instant",
    });
    serde_json::from_value(v).map_err(|e| err(format!("route consumer: {e}")))
}

/// Where an event received on `subject` (the route consumer's shape) goes: the configured shape for its key.
pub fn route_target(s: &NatsSettings, subject: &str, body: &[u8]) -> Option<String> {
    let rest = subject.strip_prefix(&s.subject_prefix)?.strip_prefix('.')?;
    let mut tokens = rest.split('.');
    let bot = tokens.next()?;
    match s.partition_by {
        // `<prefix>.<bot>.<user>` -> `<prefix>.<bot>`
        PartitionBy::Bot => Some(format!("{}.{bot}", s.subject_prefix)),
        // `<prefix>.<bot>` -> `<prefix>.<bot>.<user token>`; an unreadable body keeps a placeholder token (it is a
        // dead letter wherever it goes)
        PartitionBy::User => {
            let user = match StoredEvent::parse(body) {
                Ok(e) => user_token(&e.user_id).into_owned(),
                Err(_) => "_".to_string(),
            };
            Some(format!("{}.{bot}.{user}", s.subject_prefix))
        }
    }
}

/// Runs the route consumer until `shutdown` (errors are logged and retried: it must outlive NATS restarts).
pub async fn run_route(settings: NatsSettings, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(e) = route(&settings, &shutdown).await {
            warn!(error = %e, "the route consumer failed; starting again");
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

async fn route(s: &NatsSettings, shutdown: &CancellationToken) -> Result<(), SourceError> {
    let client = connect(s, true).await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&s.stream).await.map_err(err)?;
    let consumer: jetstream::consumer::PullConsumer =
        match stream.create_consumer(route_consumer_config(s)?).await {
            Ok(c) => c,
            Err(create) => stream
                .get_consumer(&route_consumer_name(s))
                .await
                .map_err(|_| err(create))?,
        };
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(ROUTE_BATCH)
        .expires(Duration::from_secs(5))
        .heartbeat(Duration::from_secs(2))
        .messages()
        .await
        .map_err(err)?;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let mut taken = match first {
            Some(m) => vec![m.map_err(err)?],
            None => return Err(err("the route pull stream ended")),
        };
        while taken.len() < ROUTE_BATCH {
            match messages.next().now_or_never() {
                Some(Some(m)) => taken.push(m.map_err(err)?),
                _ => break,
            }
        }
        let mut acks = Vec::with_capacity(taken.len());
        for m in &taken {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
            match route_target(s, m.subject.as_str(), &m.payload) {
                Some(target) => {
                    let publish = jetstream::message::PublishMessage::build()
                        .payload(m.payload.clone())
                        .message_id(format!("route:{seq}"));
                    acks.push(Some(js.send_publish(target, publish).await.map_err(err)?));
                }
                // not under the prefix: nothing recap could read (acknowledged, dropped)
                None => acks.push(None),
            }
        }
        for (m, ack) in taken.iter().zip(acks) {
            if let Some(ack) = ack {
                ack.await.map_err(err)?;
                metrics::counter!("recap_events_rerouted_total").increment(1);
            }
            m.ack_with(AckKind::Ack).await.map_err(err)?;
        }
        debug!(
            events = taken.len(),
            "re-published on the partitioned subject"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_to_the_configured_shape() {
        let mut s = NatsSettings {
            subject_prefix: "recap.stored".into(),
            consumer: "recap".into(),
            partitions: 8,
            ..NatsSettings::default()
        };
        let body = br#"{"v":1,"bot":"elena","point_id":"7","user_id":"12.34","ts":"2026-11-20T14:03:11Z"}"#;
        assert_eq!(s.route_subject(), "recap.stored.*.*");
        assert_eq!(
            route_target(&s, "recap.stored.elena.1234", body).as_deref(),
            Some("recap.stored.elena")
        );
        s.partition_by = PartitionBy::User;
        assert_eq!(s.route_subject(), "recap.stored.*");
        let token = user_token("12.34");
        assert!(token.starts_with('~'));
        assert_eq!(
            route_target(&s, "recap.stored.elena", body),
            Some(format!("recap.stored.elena.{token}"))
        );
        assert_eq!(
            route_target(&s, "recap.stored.elena", b"{not json").as_deref(),
            Some("recap.stored.elena._")
        );
        assert_eq!(route_target(&s, "other.elena", body), None);
        let c = route_consumer_config(&s).unwrap();
        assert_eq!(c.durable_name.as_deref(), Some("recap-route"));
        assert_eq!(c.filter_subject, "recap.stored.*");
        assert_eq!(c.ack_policy, jetstream::consumer::AckPolicy::Explicit);
        assert_eq!(c.ack_wait, Duration::from_secs(30), "consumer.json's");
        match c.deliver_policy {
            jetstream::consumer::DeliverPolicy::ByStartTime { start_time } => {
                let back = chrono::Utc::now().timestamp() - start_time.unix_timestamp();
                assert!((590..=601).contains(&back), "{back} s back");
            }
            other => panic!("starts at {other:?}"),
        }
    }
}
