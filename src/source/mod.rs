//! Source stage: where messages enter recap. Both sources produce the same [`Batch`] for the tracker:
//! [`nats`] (JetStream events, the main path) and [`crate::sweep`] (a Qdrant scroll that catches what events missed).
//!
//! A source hands out one batch at a time and learns, through [`Source::commit`], that the batch's effects are durable;
//! only then does it acknowledge (NATS) or move on. A batch that was not committed is delivered again.

pub mod nats;

use std::future::Future;

use crate::sink::{DeadLetter, NewMessage};

/// One batch of input for one ingest transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<NewMessage>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events that are valid but not messages of any window (`conversation_pair`).
    pub ignored: usize,
    /// Source position to store with the batch: (checkpoint name, position, points read).
    pub checkpoint: Option<(String, f64, i64)>,
    /// The source has nothing more right now: the tracker may advance watermarks by the wall clock.
    pub caught_up: bool,
    /// With `caught_up`: the wall-clock time (ms) up to which the source has seen every message, when that is
    /// earlier than now. The sweep's is the start of its last completed cycle (points written after it are unread);
    /// `None` means now (events: nothing undelivered). Watermarks move to at most `horizon - lateness`.
    pub horizon: Option<i64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.dead_letters.is_empty() && self.ignored == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("qdrant: {0}")]
    Qdrant(#[from] crate::fetch::FetchError),
}

/// A source of message batches.
pub trait Source: Send {
    /// The next batch (possibly empty, with `caught_up` set, after waiting a short while for input).
    fn next_batch(&mut self) -> impl Future<Output = Result<Batch, SourceError>> + Send;
    /// The last batch is committed: acknowledge it.
    fn commit(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// The last batch was not committed: it must come again.
    fn abandon(&mut self) -> impl Future<Output = ()> + Send;
}

/// Events and the sweep together (`recap run` with NATS_URL): the sweep runs a cycle every
/// ENRICHMENT_INTERVAL_SECONDS and catches what events missed. Both feed the same ingest transaction path, so a
/// message seen by both is counted once. The first cycle runs one interval after start.
///
/// * A cycle never starves events: while it runs, its pages alternate with event batches (an event batch then waits
///   at most [`EVENT_WAIT_IN_CYCLE`] for input, so an idle stream slows the cycle little).
/// * Only event batches tick the wall clock, with their own fresh caught-up flag, and only while no cycle is under way
///   (its remaining pages may belong to open windows): a sweep page never ticks.
pub struct Hybrid {
    events: nats::NatsSource,
    sweep: crate::sweep::SweepSource,
    last_from_sweep: bool,
    /// After a sweep error (Qdrant unreachable) the sweep waits until then; events keep flowing meanwhile.
    sweep_paused_until: Option<std::time::Instant>,
}

/// How long an event batch waits for input between two pages of a sweep cycle.
pub const EVENT_WAIT_IN_CYCLE: std::time::Duration = std::time::Duration::from_millis(50);
/// How long an event batch waits for input otherwise.
const EVENT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl Hybrid {
    pub fn new(events: nats::NatsSource, sweep: crate::sweep::SweepSource) -> Hybrid {
        Hybrid {
            events,
            sweep: sweep.delay_first_cycle(),
            last_from_sweep: false,
            sweep_paused_until: None,
        }
    }
}

impl Source for Hybrid {
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        let paused = self
            .sweep_paused_until
            .is_some_and(|t| std::time::Instant::now() < t);
        // Alternate while a cycle runs: after a sweep page, an event batch.
        let events_turn = self.last_from_sweep && self.sweep.in_cycle();
        if !paused && !events_turn && self.sweep.wants_batch() {
            match self.sweep.next_batch().await {
                Ok(mut b) => {
                    self.last_from_sweep = true;
                    b.caught_up = false;
                    b.horizon = None;
                    return Ok(b);
                }
                Err(e) => {
                    // The sweep is the safety net: its outage must not hold up events. It resumes from its
                    // committed position later.
                    tracing::warn!(error = %e, "sweep unavailable; events continue, sweep retries in 10 s");
                    self.sweep.abandon().await;
                    self.sweep_paused_until =
                        Some(std::time::Instant::now() + std::time::Duration::from_secs(10));
                }
            }
        }
        self.last_from_sweep = false;
        self.events.set_wait(if self.sweep.in_cycle() {
            EVENT_WAIT_IN_CYCLE
        } else {
            EVENT_WAIT
        });
        let mut b = self.events.next_batch().await?;
        b.caught_up &= !self.sweep.in_cycle();
        Ok(b)
    }

    async fn commit(&mut self) -> Result<(), SourceError> {
        if self.last_from_sweep {
            self.sweep.commit().await
        } else {
            self.events.commit().await
        }
    }

    async fn abandon(&mut self) {
        if self.last_from_sweep {
            self.sweep.abandon().await
        } else {
            self.events.abandon().await
        }
    }
}
