//! The ingest loop's shell, in process against real Postgres: shutdown interrupts its back-off sleep, and (with a
//! virtual clock, issue 14's "inject the clock into the pipeline shell") windows close exactly at their idle deadline plus lateness, never before.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use recap::config::Config;
use recap::pipeline::{Context, IngestLoop, ManualClock, run_ingest_with};
use recap::sink::NewMessage;
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
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shutdown = CancellationToken::new();
    let opts = IngestLoop {
        backoff_min: Duration::from_secs(30),
        backoff_max: Duration::from_secs(60),
        ..IngestLoop::default()
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

/// A source fed by the test, batch by batch; it reports each batch the loop committed.
struct Fed {
    rx: tokio::sync::mpsc::Receiver<Batch>,
    done: tokio::sync::mpsc::Sender<()>,
}

impl Source for Fed {
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        match self.rx.recv().await {
            Some(b) => Ok(b),
            None => std::future::pending().await,
        }
    }
    async fn commit(&mut self) -> Result<(), SourceError> {
        let _ = self.done.send(()).await;
        Ok(())
    }
    async fn abandon(&mut self) {}
}

/// Drives the ingest loop: each step sets the virtual clock, hands the loop one caught-up batch (as an event source
/// does when it has nothing more) and waits until the loop committed it.
struct Driver {
    clock: ManualClock,
    tx: tokio::sync::mpsc::Sender<Batch>,
    done: tokio::sync::mpsc::Receiver<()>,
    pool: sqlx::PgPool,
}

impl Driver {
    async fn at(&mut self, t: i64, messages: Vec<NewMessage>) {
        self.clock.set(t);
        let b = Batch {
            messages,
            caught_up: true,
            ..Batch::default()
        };
        self.tx.send(b).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.done.recv())
            .await
            .expect("the loop committed the batch")
            .unwrap();
    }

    /// Closed windows of each user, by name.
    async fn closed(&self, users: &[&str]) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for u in users {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE user_id = $1")
                    .bind(u)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            out.push((u.to_string(), n));
        }
        out
    }
}

fn msg(user: &str, ts_ms: i64) -> NewMessage {
    NewMessage {
        bot: "b".into(),
        user_id: user.into(),
        point_id: uuid::Uuid::new_v4().to_string(),
        ts_ms,
    }
}

const SEC: i64 = 1000;

/// Production timing (idle gap 1 min, lateness 5 s) on the virtual clock, in milliseconds of real time: each window
/// closes exactly when the clock reaches its last message + idle gap + lateness, not one millisecond before, and a
/// message from a host whose clock is 20 minutes fast closes no one else's window.
#[tokio::test(flavor = "multi_thread")]
async fn windows_close_at_the_idle_deadline_plus_lateness_on_a_virtual_clock() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(
        &db,
        &["--idle-gap-minutes", "1", "--allowed-lateness-seconds", "5"],
    )
    .await;
    // a fixed virtual start, an hour in the past (the store checks nothing against the real clock)
    let t0 = (chrono::Utc::now().timestamp_millis() / 60_000 - 60) * 60_000;
    let clock = ManualClock::new(t0);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let (done_tx, done) = tokio::sync::mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let opts = IngestLoop {
        clock: Arc::new(clock.clone()),
        ..IngestLoop::default()
    };
    let started = Instant::now();
    let task = tokio::spawn(run_ingest_with(
        ctx,
        Fed { rx, done: done_tx },
        shutdown.clone(),
        opts,
    ));
    let mut d = Driver {
        clock,
        tx,
        done,
        pool: db.pool.clone(),
    };
    let users = ["alice", "bob", "fast"];
    let closed = |a: i64, b: i64, f: i64| {
        vec![
            ("alice".to_string(), a),
            ("bob".to_string(), b),
            ("fast".to_string(), f),
        ]
    };

    d.at(t0, vec![msg("alice", t0), msg("bob", t0)]).await;
    // alice writes again 50 s later (under the gap); bob is silent
    d.at(t0 + 50 * SEC, vec![msg("alice", t0 + 50 * SEC)]).await;
    // a host 20 minutes fast: its message is taken at its arrival time and moves no watermark past the clock
    d.at(
        t0 + 51 * SEC,
        vec![msg("fast", t0 + 51 * SEC + 20 * 60 * SEC)],
    )
    .await;
    assert_eq!(
        d.closed(&users).await,
        closed(0, 0, 0),
        "the fast host closed a window"
    );
    // bob's deadline: t0 + 60 s idle + 5 s lateness
    d.at(t0 + 65 * SEC - 1, vec![]).await;
    assert_eq!(
        d.closed(&users).await,
        closed(0, 0, 0),
        "bob's window closed 1 ms early"
    );
    d.at(t0 + 65 * SEC, vec![]).await;
    assert_eq!(
        d.closed(&users).await,
        closed(0, 1, 0),
        "bob's window at its deadline"
    );
    // alice's: t0 + 50 s + 65 s; the fast host's: its arrival (t0 + 51 s) + 65 s
    d.at(t0 + 115 * SEC - 1, vec![]).await;
    assert_eq!(
        d.closed(&users).await,
        closed(0, 1, 0),
        "alice's window closed 1 ms early"
    );
    d.at(t0 + 115 * SEC, vec![]).await;
    assert_eq!(d.closed(&users).await, closed(1, 1, 0));
    d.at(t0 + 116 * SEC - 1, vec![]).await;
    assert_eq!(d.closed(&users).await, closed(1, 1, 0));
    d.at(t0 + 116 * SEC, vec![]).await;
    assert_eq!(d.closed(&users).await, closed(1, 1, 1));
    // the stored windows span the messages' times (alice: two messages 50 s apart)
    let (n, span): (i32, f64) = sqlx::query_as(
        "SELECT message_count, EXTRACT(EPOCH FROM end_ts - start_ts)::float8 FROM recap_windows WHERE user_id = 'alice'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((n, span), (2, 50.0));

    shutdown.cancel();
    task.await.unwrap().unwrap();
    let took = started.elapsed();
    eprintln!("116 s of virtual time ran in {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
