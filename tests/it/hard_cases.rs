//! Issue 24's hard cases that the shell's ingest path shows in process against Postgres (the live fast host is
//! `tests/fast_host.rs`; the sweep's own cases are unit tests in `src/source/sweep.rs`).

use crate::common;

use std::sync::Arc;

use clap::Parser;
use common::*;
use recap::pipeline::{Context, Ingest};
use recap::sink::NewMessage;
use recap::source::Batch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: recap::config::Config,
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

fn page(bot: &str, msgs: &[(&str, &str, i64)]) -> Batch {
    Batch {
        messages: msgs
            .iter()
            .map(|(user, id, ts)| NewMessage {
                bot: bot.into(),
                user_id: (*user).into(),
                point_id: (*id).into(),
                ts_ms: *ts,
            })
            .collect(),
        swept: true,
        ..Default::default()
    }
}

/// Issue 24, case 2: a sweep page with a bot's recent point (another collection of the bot, an unordered page, the
/// first cycle's backfill) comes before pages with its older points. Those pages move no watermark, so the older
/// conversation is neither closed early from part of its messages nor its rest counted late: it closes once, whole,
/// when the cycle completes (its horizon).
#[tokio::test(flavor = "multi_thread")]
async fn sweep_pages_move_no_watermark_past_points_the_cycle_has_not_read() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(
        &db,
        &["--idle-gap", "60s", "--allowed-lateness-seconds", "1"],
    )
    .await;
    let shutdown = CancellationToken::new();
    let mut ingest = Ingest::start(ctx, &shutdown).await.unwrap().unwrap();
    let now = recap::pipeline::now_ms();
    let old = now - 30 * MIN;
    // page 1: collection 1 of the bot, a recent message of user a
    let a = ingest
        .apply(&page("b", &[("a", "1", now - 2000)]), now)
        .await
        .unwrap();
    assert_eq!(a.closed, 0);
    // pages 2 and 3: collection 2, an older conversation of user o, on two pages
    let a = ingest
        .apply(&page("b", &[("o", "2", old)]), now)
        .await
        .unwrap();
    assert_eq!(
        (a.late, a.closed),
        (0, 0),
        "not late, nothing closed before the cycle read the rest"
    );
    let a = ingest
        .apply(&page("b", &[("o", "3", old + 30_000)]), now)
        .await
        .unwrap();
    assert_eq!((a.late, a.closed), (0, 0));
    // the cycle completes: its horizon closes the older conversation, whole
    let end = Batch {
        caught_up: true,
        horizon: Some(now),
        swept: true,
        ..Default::default()
    };
    let a = ingest.apply(&end, now + 1000).await.unwrap();
    assert_eq!(a.closed, 1);
    let windows: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT user_id, message_count, version FROM recap_windows ORDER BY user_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        windows,
        vec![("o".to_string(), 2, 1)],
        "one window, whole, never reopened"
    );
    ingest.release().await;
}

/// Issue 24, case 6 (the ingest side): a completed cycle that skipped a failing collection ticks every bot but the
/// held-back one, whose window stays open until its collection is read again.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_back_bot_is_not_ticked_by_the_sweeps_horizon() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(
        &db,
        &["--idle-gap", "60s", "--allowed-lateness-seconds", "1"],
    )
    .await;
    let shutdown = CancellationToken::new();
    let mut ingest = Ingest::start(ctx, &shutdown).await.unwrap().unwrap();
    let now = recap::pipeline::now_ms();
    let old = now - 30 * MIN;
    ingest
        .apply(&page("good", &[("u", "1", old)]), now)
        .await
        .unwrap();
    ingest
        .apply(&page("bad", &[("u", "2", old)]), now)
        .await
        .unwrap();
    let end = Batch {
        caught_up: true,
        horizon: Some(now),
        held_back: vec!["bad".into()],
        ..Default::default()
    };
    let a = ingest.apply(&end, now + 1000).await.unwrap();
    assert_eq!(a.closed, 1, "only the good bot's window");
    let bots: Vec<String> = sqlx::query_scalar("SELECT bot_name FROM recap_windows")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(bots, vec!["good".to_string()]);
    ingest.release().await;
}
