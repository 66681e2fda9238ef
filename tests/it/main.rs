//! recap's integration tests, one binary: a new test file is a module here (`mod name;` below), so the whole
//! suite links once and cargo runs its tests concurrently on its test threads. `common` holds the fixtures and
//! `common::exclusive` / `common::shared`: a test that disturbs what others share (stops Postgres or NATS, runs on a
//! quiet machine for timing) holds the exclusive guard, every other service-bound test a shared one.

mod common;
mod console;
mod context;
mod event_path;
mod fast_host;
mod faults;
mod forget;
mod foundation;
mod hard_cases;
mod ingest_cases;
mod ingest_loop;
mod ingest_time;
mod layers;
mod live_time;
mod live_workers;
mod llm_pipeline;
mod nemesis_cases;
mod ops;
mod partitions;
mod publishers;
mod python_client;
mod qdrant_conformance;
mod recall;
mod replay;
mod rollups;
mod running;
mod sim_ingest;
mod sim_shell;
mod sweep;
mod sweep_modes;
mod trust;
mod words;
mod worker_batch;
mod worker_cases;
