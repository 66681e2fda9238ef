//! The JetStream source (`NatsSource`, see `source::nats`) and the parse of one message into a batch (`accept`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use tracing::{debug, warn};

use super::consumer::{
    ReplayFrom, connect, consumer_config, ensure_stream, replay_consumer_config,
};
use super::{BACKLOG_LINGER, NatsSettings, err};
use crate::event::StoredEvent;
use crate::model::{Position, SourceCheckpoint, StreamSeq};
use crate::sink::{DeadLetter, Lease, NewMessage, Store, StoreError};
use crate::source::batch::{Batch, Source, SourceError};

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
    max_seq: Option<StreamSeq>,
    /// A durable consumer (the ingest loop's), rewound to the stored position when ingest restores its state; a
    /// replay's ephemeral consumer is not.
    durable: bool,
    /// The consumer sequence of the last message received from this consumer. Each delivery takes the next one, so
    /// a jump means a delivery never reached this process (sent to a pull request the client dropped after an error
    /// or lost in a reconnect): with `ack_policy` all, acknowledging anything after it would acknowledge it unread.
    last_delivery: Option<u64>,
    /// After such a jump: where the consumer is recreated before the next read (the first stream sequence not handed
    /// out; `None` inside: the stream's start).
    restart_at: Option<Option<StreamSeq>>,
    /// Where the consumer was last created to start (`None`: the stream's start): a jump before anything was handed
    /// out since restarts it there.
    start_from: Option<StreamSeq>,
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
    /// Drops the pull stream, as an error does; the next call opens another (its deliveries may have been lost).
    pub fn drop_pull_stream(&mut self) {
        self.stream = None;
    }

    /// Deletes the durable consumer and creates it again, starting at stream sequence `next` (from the start when the
    /// stream no longer reaches it). Deliveries are counted again from 1.
    async fn recreate_consumer(&mut self, next: Option<StreamSeq>) -> Result<(), SourceError> {
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
            Some(next) if next.0 > last.saturating_add(1) => {
                warn!(
                    next = next.0,
                    last,
                    "stored stream position is past the stream's end (stream recreated?); reading it from the start"
                );
                self.start_from = None;
            }
            Some(next) => {
                self.start_from = Some(next);
                config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next.0,
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
                            Some(StreamSeq(i.stream_sequence)),
                            Some(i.pending),
                            Some(i.consumer_sequence),
                        )
                    })
                    .unwrap_or((None, None, None));
                if let (true, Some(d), Some(last)) = (self.durable, delivery, self.last_delivery)
                    && d != last + 1
                {
                    let next = self.max_seq.map(StreamSeq::next).or(self.start_from);
                    // A delivery between these two never arrived: this message and the rest of the batch are left
                    // unacknowledged, and the consumer starts again after the last message handed out.
                    warn!(
                        delivery = d,
                        expected = last + 1,
                        next = next.map(|n| n.0),
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
                accept(&mut batch, m.subject.as_str(), seq.map(|s| s.0), &m.payload);
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
            batch.checkpoint = Some(SourceCheckpoint {
                name: self.checkpoint_name(),
                position: Position::Stream(seq),
                points_read: 0,
            });
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

    /// How long an empty `next_batch` waits for the first event (500 ms by default; the hybrid source waits less
    /// between the pages of a sweep cycle).
    fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    fn seal(&mut self) {
        // One group per seal, empty ones included: a checkpoint sealed while nothing was in flight (due by time, or
        // by a sweep page in hybrid mode) must not let its commit take the deliveries handed out after it, which no
        // committed checkpoint covers yet (found by the simulation, tests/it/sim_shell.rs).
        self.sealed.push_back(std::mem::take(&mut self.in_flight));
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
        let Some(position) = store.stream_position(&self.checkpoint_name()).await? else {
            // Nothing stored yet: nothing was ever acknowledged, but a leader before this one may have taken events
            // and never committed (a partition handed back before its first checkpoint). Left as it is, the consumer
            // would redeliver them only after ack_wait, behind newer events whose ack-all acknowledges them unread:
            // recreate it from the start of the stream (its `deliver_policy` all), so everything comes again in order.
            return self.recreate_consumer(None).await;
        };
        // The consumer may have delivered past the stored position (to this process before a failed checkpoint, to
        // a crashed replica) and would redeliver that only after ack_wait, behind newer messages: recreate it at the
        // position, so the stream comes again in order from there.
        self.recreate_consumer(Some(position.next())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
