//! recap: turns chat-bot conversations stored in Qdrant into time-windowed summaries in PostgreSQL.
//!
//! # Layout
//! Data flows one way: [`source`] -> [`tracker`] -> [`fetch`] -> [`summarize`] -> [`sink`].
//! * [`model`]: domain types every stage shares (at the bottom: it imports none of recap's), e.g. [`model::WindowState`].
//! * [`event`]: the `message stored` wire type and its validation (the contract in `nats/README.md`).
//! * [`source`]: JetStream events ([`source::nats`]) and the Qdrant sweep ([`source::sweep`]).
//! * [`tracker`]: the pure window state machine (no IO, no clock).
//! * [`fetch`]: a window's points from Qdrant, mapped from the bots' payloads.
//! * [`summarize`]: the `Summarizer` trait, extractive and LLM implementations.
//! * [`sink`]: all Postgres state and the transactions that make effects atomic.
//! * [`pipeline`]: the shell that drives the stages (ingest loop, window workers).
//! * [`rollup`]: day -> week -> month summaries built from the window summaries.
//! * [`running`]: running summaries of open windows (when due, which window, still valid), the pure core.
//! * [`config`], [`http`], [`cmd`]: configuration, operations endpoint, subcommands.
//! * [`status`]: the one status snapshot (`recap status`, `/metrics` gauges, the console); [`console`]: the web page.
//! * [`recall`]: the read path for bots (recall by time, search, forget a user).
//! * [`vectors`]: summary vectors in recap's Qdrant collection, kept in step with the rows (worker sync, repair, drift).
//!
//! The module order (lowest first, no module refers to a later one) is in ARCHITECTURE.md, checked by `tests/it/layers.rs`.
//! * [`telemetry`]: every metric's name, kind and help, registered at zero at start.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the invariants.

pub mod budget;
pub mod cmd;
pub mod config;
pub mod console;
pub mod event;
pub mod fetch;
pub mod http;
pub mod model;
pub mod pipeline;
pub mod recall;
pub mod rollup;
pub mod running;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
pub mod summarize;
pub mod telemetry;
pub mod tracker;
pub mod vectors;
