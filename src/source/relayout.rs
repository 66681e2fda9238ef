//! A change of the partition layout (`NATS_PARTITIONS`, `NATS_PARTITION_BY`) at start, before any consumer reads
//! (issue 24, case 13).
//!
//! The stream stores each event under its layout's subject (`<prefix>.p.<k>.<bot>` ...), so after a change the
//! unread backlog sits under subjects the new partitions' consumers do not read, or read as the wrong partition, and
//! the route consumer filters the old shape. Under the lock of the stream's layout row (`recap_nats_layout`), the
//! first replica to start with the new layout:
//!
//! 1. applies the new stream config (new events go to the new layout's subjects) and notes the stream's last
//!    sequence `L`;
//! 2. re-publishes every event up to `L` that its old-layout reader had not applied (after the stored position of
//!    its old partition's consumer, or the old route consumer's ack floor) on its unpartitioned subject, where the
//!    new subject transform (or the new route consumer) puts it in the partition that owns its key now, and waits
//!    for every PubAck (`Nats-Msg-Id` `relayout:<L>:<sequence>`, so a retry within the duplicate window stores
//!    nothing twice);
//! 3. deletes the old layout's consumers and makes the route consumer again on the new shape, from `L + 1`;
//! 4. in one transaction: the new layout's consumer positions move to `L` (each leader's rewind recreates its
//!    consumer after it), every partition's leader epoch is bumped, and the layout is recorded.
//!
//! So every event is read once, by the partition that owns its key: an applied one is not re-published, an unread
//! one is read only as its re-published copy (ingest's de-duplication by point id covers a crash between 2 and 4,
//! which re-publishes again).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::info;

use super::batch::SourceError;
use super::nats::{NatsSettings, PartitionBy, connect, layout, stream_config};
use super::route::{route_consumer_config, route_consumer_name, route_target};
use crate::sink::Store;

fn err(e: impl std::fmt::Display) -> SourceError {
    SourceError::Nats(e.to_string())
}

/// The layout a stream config stores events in: its subject transform's `partition(n, 1)` (by bot) or
/// `partition(n, 1, 2)` (by user), else unpartitioned.
pub fn layout_of_stream(c: &jetstream::stream::Config) -> String {
    let Some(t) = &c.subject_transform else {
        return layout(PartitionBy::Bot, 1);
    };
    let d = &t.destination;
    let Some(start) = d.find("partition(") else {
        return layout(PartitionBy::Bot, 1);
    };
    let args: Vec<&str> = d[start + "partition(".len()..]
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let n = args.first().and_then(|n| n.parse().ok()).unwrap_or(1);
    let by = if args.len() > 2 {
        PartitionBy::User
    } else {
        PartitionBy::Bot
    };
    layout(by, n)
}

/// `(by, n)` of a layout string ([`layout`]).
pub fn parse_layout(l: &str) -> Option<(PartitionBy, u32)> {
    match l.split_once('/') {
        None if l == "1" => Some((PartitionBy::Bot, 1)),
        Some(("bot", n)) => Some((PartitionBy::Bot, n.parse().ok()?)),
        Some(("user", n)) => Some((PartitionBy::User, n.parse().ok()?)),
        _ => None,
    }
}

/// Who read an event stored on `subject` under the layout of `old`: `Some(k)` partition k's consumer (the only
/// consumer when unpartitioned: `Some(0)`), `None` the route consumer; and the subject to re-publish it on (the
/// unpartitioned one). `None` for a subject outside the prefix.
pub fn old_reader(old: &NatsSettings, subject: &str) -> Option<(Option<u32>, String)> {
    let prefix = &old.subject_prefix;
    let rest = subject.strip_prefix(prefix.as_str())?.strip_prefix('.')?;
    if old.partitions <= 1 {
        return Some((Some(0), subject.to_string()));
    }
    let tokens: Vec<&str> = rest.split('.').collect();
    let shape = match old.partition_by {
        PartitionBy::Bot => 1,
        PartitionBy::User => 2,
    };
    if tokens.len() == 2 + shape
        && tokens[0] == "p"
        && let Ok(k) = tokens[1].parse::<u32>()
        && k < old.partitions
    {
        return Some((Some(k), format!("{prefix}.{}", tokens[2..].join("."))));
    }
    Some((None, subject.to_string()))
}

/// The subject an event whose unpartitioned subject is `subject` is re-published on: the new layout's partitioned
/// shape (the route consumer's target, so it takes no second hop), or `subject` itself.
fn new_subject(s: &NatsSettings, subject: String, body: &[u8]) -> String {
    let tokens = subject
        .strip_prefix(s.subject_prefix.as_str())
        .and_then(|r| r.strip_prefix('.'))
        .map_or(0, |r| r.split('.').count());
    let route_shape = match s.partition_by {
        PartitionBy::Bot => 2,
        PartitionBy::User => 1,
    };
    if s.partitions > 1 && tokens == route_shape {
        route_target(s, &subject, body).unwrap_or(subject)
    } else {
        subject
    }
}

/// The consumer that reads the backlog at a layout change: `<NATS_CONSUMER>-relayout`.
fn reader_name(s: &NatsSettings) -> String {
    format!("{}-relayout", s.consumer)
}

/// The checkpoint name of the consumer `s` describes (as `NatsSource` stores it).
fn position_name(s: &NatsSettings) -> String {
    format!("nats:{}:{}", s.stream, s.consumer_name())
}

/// Applies the stream config of `s`, and when the stream's events are in another layout, moves its unread backlog to
/// the new one first (see the module docs). Returns how many events were re-published.
pub async fn apply(s: &NatsSettings, store: &Store) -> Result<u64, SourceError> {
    let new = layout(s.partition_by, s.partitions);
    let lock = store.lock_layout(&s.stream).await?;
    let client = connect(s, true).await?;
    let js = jetstream::new(client.clone());
    let current = match js.get_stream(&s.stream).await {
        Ok(mut st) => Some(st.info().await.map_err(err)?.config.clone()),
        Err(e) if e.to_string().contains("not found") => None,
        Err(e) => return Err(err(e)),
    };
    let old = match (&lock.recorded, &current) {
        (_, None) => new.clone(),
        (Some(l), _) => l.clone(),
        (None, Some(c)) => layout_of_stream(c),
    };
    let Some((old_by, old_n)) = parse_layout(&old).filter(|_| old != new) else {
        js.create_or_update_stream(stream_config(s)?)
            .await
            .map_err(err)?;
        lock.finish(&new, None).await?;
        return Ok(0);
    };
    info!(from = %old, to = %new, stream = %s.stream, "partition layout changed: moving the unread backlog");
    let old_s = NatsSettings {
        partitions: old_n,
        partition_by: old_by,
        partition: None,
        ..s.clone()
    };
    // What each old reader applied: partition k's stored position, the route consumer's ack floor.
    let mut floors: HashMap<Option<u32>, u64> = HashMap::new();
    for k in 0..old_n.max(1) {
        let pos = store
            .stream_position(&position_name(&old_s.for_partition(k)))
            .await?;
        floors.insert(Some(k), pos.map_or(0, |p| p.0));
    }
    let mut stream = js.get_stream(&s.stream).await.map_err(err)?;
    let route_floor = if old_n > 1 {
        match stream.consumer_info(route_consumer_name(&old_s)).await {
            Ok(i) => i.ack_floor.stream_sequence,
            Err(_) => 0,
        }
    } else {
        0
    };
    floors.insert(None, route_floor);
    // From here new events go to the new layout's subjects; `last` is the old layout's end.
    js.create_or_update_stream(stream_config(s)?)
        .await
        .map_err(err)?;
    let last = stream.info().await.map_err(err)?.state.last_sequence;
    let first = floors.values().copied().min().unwrap_or(0) + 1;
    let mut moved = 0u64;
    if first <= last {
        let reader = stream
            .create_consumer(consumer::pull::Config {
                // named, so the grants of the partitioned consumers (`RECAP.*`) cover it; gone when unused a minute
                name: Some(reader_name(s)),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: first,
                },
                ack_policy: consumer::AckPolicy::None,
                filter_subject: format!("{}.>", s.subject_prefix),
                inactive_threshold: Duration::from_secs(60),
                description: Some("recap: partition layout change".into()),
                ..Default::default()
            })
            .await
            .map_err(err)?;
        let mut messages = reader
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await
            .map_err(err)?;
        let mut acks = Vec::new();
        loop {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(m)) => m.map_err(err)?,
                Ok(None) => return Err(err("the layout change's reader ended")),
                Err(_) => return Err(err("the layout change's reader stalled")),
            };
            let seq = m.info().map_err(err)?.stream_sequence;
            if seq > last {
                break;
            }
            if let Some((who, target)) = old_reader(&old_s, m.subject.as_str())
                && seq > floors.get(&who).copied().unwrap_or(0)
            {
                let target = new_subject(s, target, &m.payload);
                let publish = jetstream::message::PublishMessage::build()
                    .payload(m.payload.clone())
                    .message_id(format!("relayout:{last}:{seq}"));
                acks.push(js.send_publish(target, publish).await.map_err(err)?);
                moved += 1;
                if acks.len() >= 1024 {
                    for a in acks.drain(..) {
                        a.await.map_err(err)?;
                    }
                }
            }
            if seq == last {
                break;
            }
        }
        for a in acks {
            a.await.map_err(err)?;
        }
        drop(messages);
        let _ = stream.delete_consumer(&reader_name(s)).await;
    }
    metrics::counter!("recap_events_relayout_total").increment(moved);
    // The old layout's consumers go; the route consumer is made again on the new shape, after `last`.
    let mut names: Vec<String> = (0..old_n.max(1))
        .map(|k| old_s.for_partition(k).consumer_name())
        .collect();
    names.push(route_consumer_name(&old_s));
    for name in &names {
        match stream.delete_consumer(name).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(err(e)),
        }
    }
    if s.partitions > 1 {
        let mut route = route_consumer_config(s)?;
        route.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: last + 1,
        };
        stream.create_consumer(route).await.map_err(err)?;
    }
    let positions: Vec<String> = (0..s.partitions.max(1))
        .map(|k| position_name(&s.for_partition(k)))
        .collect();
    lock.finish(&new, Some((last, &positions))).await?;
    info!(from = %old, to = %new, moved, since = last, "partition layout changed");
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_readers_by_layout() {
        let mut s = NatsSettings {
            subject_prefix: "recap.stored".into(),
            consumer: "recap".into(),
            stream: "RECAP".into(),
            partitions: 2,
            ..NatsSettings::default()
        };
        assert_eq!(
            old_reader(&s, "recap.stored.p.1.elena"),
            Some((Some(1), "recap.stored.elena".into()))
        );
        assert_eq!(
            old_reader(&s, "recap.stored.elena.~abc"),
            Some((None, "recap.stored.elena.~abc".into()))
        );
        assert_eq!(old_reader(&s, "other.elena"), None);
        s.partition_by = PartitionBy::User;
        assert_eq!(
            old_reader(&s, "recap.stored.p.0.elena.42"),
            Some((Some(0), "recap.stored.elena.42".into()))
        );
        assert_eq!(
            old_reader(&s, "recap.stored.elena"),
            Some((None, "recap.stored.elena".into()))
        );
        s.partitions = 1;
        assert_eq!(
            old_reader(&s, "recap.stored.elena"),
            Some((Some(0), "recap.stored.elena".into()))
        );
        for (by, n) in [
            (PartitionBy::Bot, 1),
            (PartitionBy::Bot, 8),
            (PartitionBy::User, 4),
        ] {
            let s = NatsSettings {
                partitions: n,
                partition_by: by,
                ..s.clone()
            };
            let l = layout(by, n);
            assert_eq!(layout_of_stream(&stream_config(&s).unwrap()), l);
            assert_eq!(parse_layout(&l).map(|(b, n)| layout(b, n)), Some(l));
        }
        assert_eq!(position_name(&s), "nats:RECAP:recap");
        let body =
            br#"{"v":1,"bot":"elena","point_id":"7","user_id":"42","ts":"2026-11-20T14:03:11Z"}"#;
        let by_user = NatsSettings {
            partitions: 4,
            partition_by: PartitionBy::User,
            ..s.clone()
        };
        assert_eq!(
            new_subject(&by_user, "recap.stored.elena".into(), body),
            "recap.stored.elena.42"
        );
        assert_eq!(
            new_subject(&by_user, "recap.stored.elena.42".into(), body),
            "recap.stored.elena.42"
        );
        let by_bot = NatsSettings {
            partition_by: PartitionBy::Bot,
            ..by_user
        };
        assert_eq!(
            new_subject(&by_bot, "recap.stored.elena.42".into(), body),
            "recap.stored.elena"
        );
        assert_eq!(
            new_subject(&s, "recap.stored.elena.42".into(), body),
            "recap.stored.elena.42",
            "unpartitioned: as it is"
        );
    }
}
