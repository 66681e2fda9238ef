//! Events and the sweep in one source (`recap run` with NATS_URL and a sweep interval).

use super::batch::{Batch, Source, SourceError};
use super::{nats, sweep};
use crate::sink::Store;

/// Events and the sweep together (`recap run` with NATS_URL): the sweep runs a cycle every
/// ENRICHMENT_INTERVAL_SECONDS and catches what events missed. Both feed the same ingest transaction path, so a
/// message seen by both is counted once. The first cycle runs one interval after start.
///
/// * A cycle never starves events: while it runs, its pages alternate with event batches (an event batch then waits
///   at most [`EVENT_WAIT_IN_CYCLE`] for input, so an idle stream slows the cycle little).
/// * Only event batches tick the wall clock, with their own fresh caught-up flag, and only while no cycle is under way
///   (its remaining pages may belong to open windows): a sweep page never ticks.
pub struct Hybrid<E: Source = nats::NatsSource> {
    events: E,
    sweep: sweep::SweepSource,
    last_from_sweep: bool,
    /// After a sweep error (Qdrant unreachable) the sweep waits until then; events keep flowing meanwhile.
    sweep_paused_until: Option<std::time::Instant>,
}

/// How long an event batch waits for input between two pages of a sweep cycle.
pub const EVENT_WAIT_IN_CYCLE: std::time::Duration = std::time::Duration::from_millis(50);
/// How long an event batch waits for input otherwise.
const EVENT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl<E: Source> Hybrid<E> {
    /// `events`: the NATS source in production (the simulation gives its model of it).
    pub fn new(events: E, sweep: sweep::SweepSource) -> Hybrid<E> {
        Hybrid {
            events,
            sweep: sweep.delay_first_cycle(),
            last_from_sweep: false,
            sweep_paused_until: None,
        }
    }

    /// The sweep inside (tests: its prefetch).
    pub fn sweep(&self) -> &sweep::SweepSource {
        &self.sweep
    }
}

impl<E: Source> Source for Hybrid<E> {
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
        // Everything handed out is durable: a sweep page still pending moves its cursor, events are acknowledged.
        self.sweep.commit().await?;
        self.events.commit().await
    }

    fn seal(&mut self) {
        self.events.seal();
    }

    async fn advance(&mut self) {
        if self.last_from_sweep {
            self.sweep.advance().await
        }
    }

    async fn abandon(&mut self) {
        self.sweep.abandon().await;
        self.events.abandon().await;
    }

    fn lead(&mut self, lease: Option<crate::sink::Lease>) {
        self.events.lead(lease);
    }

    async fn probe(&mut self) -> Result<(), SourceError> {
        self.events.probe().await
    }

    async fn rewind(&mut self, store: &Store) -> Result<(), SourceError> {
        self.sweep.rewind(store).await?;
        self.events.rewind(store).await
    }
}
