//! The ingest loop's shell, in process against real Postgres: shutdown interrupts its back-off sleep, and (with a
//! virtual clock) windows close exactly at their idle deadline plus lateness, never before.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use recap::config::Config;
use recap::pipeline::{Context, IngestLoop, run_ingest_with};
use recap::source::{Batch, Source, SourceError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: Config,
}

async fn context(db: &TestDb, extra: &[&str]) -> Context {
    let q = env("QDRANT_URL");
    let base = [
        "t",
        "--database-url",
        db.url.as_str(),
        "--qdrant-url",
        q.as_str(),
    ];
    let mut cfg = Args::parse_from(base.iter().chain(extra)).c;
    cfg.normalize();
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let points =
        Arc::new(recap::fetch::Points::new(&q, None, cfg.payload_mapping()).expect("points"));
    Context {
        store,
        points,
        summarizer: Arc::new(recap::summarize::extractive::Extractive),
        instance: format!("test-{}", token()),
        cfg: Arc::new(cfg),
    }
}

/// A source that is always unavailable, and says when it was first asked.
struct Down(Option<tokio::sync::oneshot::Sender<()>>);

impl Source for Down {
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
        Err(SourceError::Nats("unreachable (test)".into()))
    }
    async fn commit(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    async fn abandon(&mut self) {}
}

/// Shutdown ends the ingest loop's back-off sleep at once, although the back-off is 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_interrupts_the_ingest_backoff() {
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shutdown = CancellationToken::new();
    let opts = IngestLoop {
        backoff_min: Duration::from_secs(30),
        backoff_max: Duration::from_secs(60),
    };
    let task = tokio::spawn(run_ingest_with(ctx, Down(Some(tx)), shutdown.clone(), opts));
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the source was asked for a batch")
        .unwrap();
    // let the loop enter its back-off sleep
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("ingest returned within 1 s of shutdown")
        .unwrap()
        .unwrap();
    eprintln!("ingest stopped {:?} after shutdown", t0.elapsed());
}
