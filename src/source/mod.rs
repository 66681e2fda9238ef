//! Source stage: where messages enter recap. Both sources produce the same [`Batch`] for the tracker:
//! [`nats`] (JetStream events, the main path) and [`sweep`] (a Qdrant scroll that catches what events missed).
//!
//! A source hands out one batch at a time and learns, through [`Source::commit`], that the batch's effects are durable;
//! only then does it acknowledge (NATS) or move on. A batch that was not committed is delivered again.

mod batch;
mod hybrid;
pub mod nats;
pub mod relayout;
pub mod route;
pub mod sweep;

pub use batch::{Batch, Source, SourceError};
pub use hybrid::{EVENT_WAIT_IN_CYCLE, Hybrid};
