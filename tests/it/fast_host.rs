//! Issue 24, case 1, live: a bot host whose clock runs 90 s fast (idle gap 60 s) writes a 6-message conversation at
//! the wall clock, points in Qdrant and their events on NATS (hybrid mode, the sweep every 2 s). recap windows the
//! messages at their arrival (their stamps are ahead of its clock); once the wall clock passes their stamps the sweep
//! still reads them (its overlap), now unclamped. They must stay one window, summarized once: one row at revision 1,
//! one `recap_windows` row, one LLM call at the LLM test server.
//!
//! Real timing (the skew and the gap are the point): about 2.5 minutes.

use crate::common;

use std::time::Duration;

use common::*;
use recap::pipeline::now_ms;

const SKEW_MS: i64 = 90_000;
const GAP_MS: i64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_90_s_fast_is_one_window_summarized_once() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let ns = nats_ns();
    let bot = format!("fast{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let js = ns.ensure().await;
    let llm = LlmServer::start();
    let mut envs = recap_env(&db, Some(&ns));
    envs.retain(|(k, _)| k != "SUMMARIZER");
    envs.extend(
        [
            ("SUMMARIZER", "llm".to_string()),
            ("LLM_BASE_URL", llm.api_base()),
            ("LLM_API_KEY", "sk-test-key".into()),
            ("LLM_MODEL", "test/model".into()),
            ("COLLECTION_PATTERNS", collection.clone()),
            ("COLLECTION_MAP", format!("{collection}={bot}")),
            ("IDLE_GAP", format!("{GAP_MS}ms")),
            ("ALLOWED_LATENESS_SECONDS", "1".into()),
            ("ENRICHMENT_INTERVAL_SECONDS", "2".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path("fast-host"));
    wait_leading(&db.pool, 1, Duration::from_secs(30)).await; // recap up and leading

    let mut last_stamp = 0;
    for i in 0..6 {
        let p = TestPoint {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: "fast".into(),
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("message {i} about the garden and the weather"),
            ts_ms: now_ms() + SKEW_MS,
            emotion: "neutral".into(),
            memory_type: "conversation".into(),
        };
        upsert(&q, &collection, std::slice::from_ref(&p)).await;
        let mut e = p.event(&bot, &collection);
        e.ts = chrono::Utc::now() + chrono::TimeDelta::milliseconds(SKEW_MS);
        ns.publish_raw(
            &js,
            vec![(e.subject(&ns.prefix), Some(p.id.clone()), e.to_body())],
        )
        .await;
        last_stamp = p.ts_ms;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // windowed at arrival: the row comes about a gap after the last write
    let got = wait_for_rows(&db.pool, 1, Duration::from_secs(120)).await;
    assert_eq!(got.len(), 1);
    // then the clock passes the stamps, and a window at the stamps would close a gap (plus lateness) later: wait for
    // that and a few sweep cycles more
    let until = last_stamp + GAP_MS + 1000 + 8000;
    while now_ms() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = rows(&db.pool).await;
    let windows: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT state, message_count, version FROM recap_windows")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let calls = llm.stats().await["calls_total"]
        .as_u64()
        .expect("calls_total");
    terminate(&mut child);
    let _ = q.delete_collection(&collection).await;
    println!("fast host: rows {after:?}, windows {windows:?}, LLM calls {calls}");
    assert_eq!(after.len(), 1, "one row: {after:?}");
    assert_eq!(after[0].count, 6);
    assert_eq!(after[0].revision, 1, "summarized once");
    assert_eq!(windows.len(), 1, "one window: {windows:?}");
    assert_eq!(windows[0].2, 1, "never reopened: {windows:?}");
    assert_eq!(calls, 1, "one summarizer call");
}

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    c: recap::config::Config,
}

fn batch(bot: &str, ids: &[String], stamps: &[i64], caught_up: bool) -> recap::source::Batch {
    recap::source::Batch {
        messages: ids
            .iter()
            .zip(stamps)
            .map(|(id, ts)| recap::sink::NewMessage {
                bot: bot.into(),
                user_id: "fast".into(),
                point_id: id.clone(),
                ts_ms: *ts,
            })
            .collect(),
        caught_up,
        ..Default::default()
    }
}

/// The same, in process against Postgres: after the window closed, a takeover (a new leader restores the state, as
/// `recap replay` does) reads the points at their stamps, past the clock: they are known from
/// `recap_clamped_points`, so no second window.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_leader_knows_a_fast_hosts_closed_points() {
    let _shared = common::shared().await;
    use clap::Parser;
    let db = fresh_db().await;
    let q = env("QDRANT_URL");
    let mut cfg = Args::parse_from([
        "t",
        "--database-url",
        db.url.as_str(),
        "--qdrant-url",
        q.as_str(),
        "--idle-gap",
        "60s",
    ])
    .c;
    cfg.normalize();
    cfg.windows.allowed_lateness_seconds = 1;
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let points = std::sync::Arc::new(
        recap::fetch::Points::new(&q, None, cfg.payload_mapping()).expect("points"),
    );
    let ctx = recap::pipeline::Context {
        store: store.clone(),
        points,
        summarizer: std::sync::Arc::new(recap::summarize::extractive::Extractive),
        instance: format!("test-{}", token()),
        cfg: std::sync::Arc::new(cfg),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let bot = "fastbot";
    let t0 = 1_800_000_000_000i64;
    let ids: Vec<String> = (0..6).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let stamps: Vec<i64> = (0..6).map(|i| t0 + i * 1000 + SKEW_MS).collect();
    let mut ingest = recap::pipeline::Ingest::start(ctx.clone(), &shutdown)
        .await
        .unwrap()
        .unwrap();
    // read at arrival (t0 + i s), then the clock moves on: the window closes by arrival
    for i in 0..6 {
        ingest
            .apply(
                &batch(bot, &ids[i..=i], &stamps[i..=i], true),
                t0 + i as i64 * 1000,
            )
            .await
            .unwrap();
    }
    ingest
        .apply(&batch(bot, &[], &[], true), t0 + 5000 + GAP_MS + 2000)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_windows")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "closed by arrival");
    ingest.release().await;
    drop(ingest);

    // a new leader: the points again, at their stamps, the clock past them, then past their would-be window
    let mut ingest = recap::pipeline::Ingest::start(ctx.clone(), &shutdown)
        .await
        .unwrap()
        .unwrap();
    let late = t0 + 5000 + SKEW_MS + 1000;
    let a = ingest
        .apply(&batch(bot, &ids, &stamps, true), late)
        .await
        .unwrap();
    assert_eq!((a.new, a.duplicates), (0, 6), "{a:?}");
    ingest
        .apply(&batch(bot, &[], &[], true), late + GAP_MS + 5000)
        .await
        .unwrap();
    let windows: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT state, message_count, version FROM recap_windows")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(windows.len(), 1, "one window: {windows:?}");
    assert_eq!(windows[0].1, 6);
    ingest.release().await;
}
