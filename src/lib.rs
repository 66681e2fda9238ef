//! recap: turns chat-bot conversations stored in Qdrant into time-windowed summaries in PostgreSQL.
//!
//! # Layout
//! Data flows one way: `source` -> `tracker` -> `fetch` -> `summarize` -> `sink`.
//! * [`event`]: the `message stored` wire type and its validation.
//! * [`tracker`]: the pure window state machine (no IO, no clock).
//! * [`summarize`]: the `Summarizer` trait, extractive and LLM implementations.
//! * [`config`]: the one typed configuration (CLI flags and environment).
//!
//! See ARCHITECTURE.md for the bird's-eye view and the invariants.

// pub mod config; (being written)
pub mod event;
pub mod summarize;
pub mod tracker;
