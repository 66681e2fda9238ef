//! Issue 14, the ingest half: how time moves the watermark (skewed clocks, sweep cycles, hybrid interleaving), fetch
//! by stored points, leader renewal, sweep validation, the merge-candidate probe, far-future / bridging windows and a
//! checkpoint's windows stored in bulk as one by one.
//! Each test drives the ingest shell in process (`Ingest::apply` with an explicit wall clock) against real Postgres
//! (and Qdrant / NATS where the source is under test), so it runs in seconds.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use recap::config::Config;
use recap::pipeline::{Context, Ingest, now_ms};
use recap::sink::NewMessage;
use recap::source::sweep::{SweepSettings, SweepSource};
use recap::source::{Batch, Source};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: Config,
}

fn config(db: &TestDb, extra: &[&str]) -> Config {
    let q = env("QDRANT_URL");
    let base = [
        "t",
        "--database-url",
        db.url.as_str(),
        "--qdrant-url",
        q.as_str(),
    ];
    let mut c = Args::parse_from(base.iter().chain(extra)).c;
    c.normalize();
    c
}

async fn context(db: &TestDb, extra: &[&str]) -> Context {
    let cfg = config(db, extra);
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let points = Arc::new(
        recap::fetch::Points::new(&env("QDRANT_URL"), None, cfg.payload_mapping()).expect("points"),
    );
    Context {
        store,
        points,
        summarizer: Arc::new(recap::summarize::extractive::Extractive),
        instance: format!("test-{}", token()),
        cfg: Arc::new(cfg),
    }
}

async fn ingest(ctx: &Context) -> Ingest {
    Ingest::start(ctx.clone(), &CancellationToken::new())
        .await
        .expect("leader")
        .expect("ingest")
}

/// A 3 s idle gap, 1 s lateness, windows of one message summarized: sweep tests that close windows in seconds.
const SHORT_GAP: &[&str] = &[
    "--idle-gap",
    "3s",
    "--allowed-lateness-seconds",
    "1",
    "--min-messages-for-summary",
    "1",
];

/// A sweep over `ctx`'s Qdrant and store (overlap 15 s, no index created, every user kept).
fn sweep_source(
    ctx: &Context,
    interval: Duration,
    lookback: Duration,
    page_size: u32,
    bot_for_collection: recap::source::sweep::BotForCollection,
) -> SweepSource {
    SweepSource::new(
        ctx.points.clone(),
        ctx.store.clone(),
        SweepSettings {
            interval,
            lookback,
            overlap: Duration::from_secs(15),
            page_size,
            bot_for_collection,
            create_index: false,
            checkpoint_prefix: "sweep".into(),
            keep_user: None,
        },
    )
}

/// Collection `c` is bot `b`'s; no other is read.
fn single_bot(c: &str) -> recap::source::sweep::BotForCollection {
    let c = c.to_string();
    Arc::new(move |n: &str| (n == c).then(|| "b".to_string()))
}

fn msg(bot: &str, user: &str, ts_ms: i64) -> NewMessage {
    NewMessage {
        bot: bot.into(),
        user_id: user.into(),
        point_id: uuid::Uuid::new_v4().to_string(),
        ts_ms,
    }
}

fn batch(messages: Vec<NewMessage>) -> Batch {
    Batch {
        messages,
        caught_up: true,
        ..Batch::default()
    }
}

/// (message_count, version) of every stored window of a user, oldest first.
async fn windows_of(pool: &sqlx::PgPool, user: &str) -> Vec<(i32, i32)> {
    sqlx::query_as(
        "SELECT message_count, version FROM recap_windows WHERE user_id = $1 ORDER BY start_ts",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap()
}

const SEC: i64 = 1000;

/// Defect 1: one host of a bot whose clock is 20 minutes fast. Its message must neither close another user's open
/// window early nor make that user's next message (just under the idle gap) late.
#[tokio::test(flavor = "multi_thread")]
async fn a_fast_clock_closes_no_other_window() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(
        &db,
        &[
            "--idle-gap-minutes",
            "10",
            "--allowed-lateness-seconds",
            "60",
        ],
    )
    .await;
    let mut ing = ingest(&ctx).await;
    let t = now_ms();
    ing.apply(&batch(vec![msg("b", "alice", t)]), t + 100)
        .await
        .unwrap();
    // the fast host: its clock says t + 20 min
    let fast = ing
        .apply(&batch(vec![msg("b", "fast", t + 20 * MIN)]), t + SEC)
        .await
        .unwrap();
    assert_eq!(fast.closed, 0, "the fast message closed a window");
    // alice again, just under the idle gap
    let a2 = ing
        .apply(
            &batch(vec![msg("b", "alice", t + 9 * MIN)]),
            t + 9 * MIN + 100,
        )
        .await
        .unwrap();
    assert_eq!(
        a2.late, 0,
        "alice's message just under the gap counted late"
    );
    // the wall clock passes alice's deadline: one window, both messages, never reopened
    ing.apply(&batch(vec![]), t + 20 * MIN).await.unwrap();
    assert_eq!(windows_of(&db.pool, "alice").await, vec![(2, 1)]);
    // the fast host's own later messages are not late either, and its window closes by the wall clock
    let f2 = ing
        .apply(
            &batch(vec![msg("b", "fast", t + 20 * MIN + 30 * SEC)]),
            t + 20 * MIN + SEC,
        )
        .await
        .unwrap();
    assert_eq!(f2.late, 0);
    ing.apply(&batch(vec![]), t + 40 * MIN).await.unwrap();
    // its messages are windowed by arrival (20 minutes apart here: two windows), none reopened
    assert_eq!(windows_of(&db.pool, "fast").await, vec![(1, 1), (1, 1)]);
}

/// Defect 11 (far future): a point more than a day ahead, read again by every sweep cycle, is one dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn a_far_future_point_is_dead_lettered_once() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let mut ing = ingest(&ctx).await;
    let t = now_ms();
    let m = msg("b", "u", t + 3 * 24 * 60 * MIN);
    for _ in 0..3 {
        ing.apply(&batch(vec![m.clone()]), t).await.unwrap();
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        n, 1,
        "one dead letter for one point, however often it is read"
    );
}

/// Defect 11 (bridge): a late message between two stored windows of a user, within the idle gap of both, joins them:
/// one window row remains, with every message.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_message_bridging_two_windows_leaves_one() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(
        &db,
        &[
            "--idle-gap-minutes",
            "10",
            "--allowed-lateness-seconds",
            "60",
        ],
    )
    .await;
    let mut ing = ingest(&ctx).await;
    let t = now_ms() - 5 * 60 * MIN;
    let first = vec![msg("b", "u", t), msg("b", "u", t + MIN)];
    let second = vec![msg("b", "u", t + 19 * MIN), msg("b", "u", t + 20 * MIN)];
    ing.apply(&batch(first), t + 2 * MIN).await.unwrap();
    ing.apply(&batch(second), t + 60 * MIN).await.unwrap();
    assert_eq!(windows_of(&db.pool, "u").await.len(), 2);
    // t + 10 min: 9 minutes after the first window's end and 9 before the second's start
    ing.apply(&batch(vec![msg("b", "u", t + 10 * MIN)]), t + 61 * MIN)
        .await
        .unwrap();
    let ws = windows_of(&db.pool, "u").await;
    assert_eq!(ws.len(), 1, "the bridged windows are one: {ws:?}");
    assert_eq!(ws[0].0, 5);
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recap_messages m WHERE NOT EXISTS (SELECT 1 FROM recap_windows w WHERE w.id = m.window_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0, "every message belongs to the remaining window");
}

/// Defect 10: the merge-candidate lookup of a closing window is one index probe, whatever the user's history:
/// EXPLAIN ANALYZE of the lookup on a user with 20 000 stored windows reads a handful of buffers, not the history.
#[tokio::test(flavor = "multi_thread")]
async fn the_merge_candidate_lookup_is_one_probe() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let _ctx = context(&db, &[]).await;
    sqlx::query(
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count)
         SELECT 'b', 'u', t, t + interval '10 minutes', 'done', 5
         FROM generate_series(now() - interval '20000 hours', now() - interval '2 hours', interval '1 hour') AS t",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE recap_windows")
        .execute(&db.pool)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let lo = now - chrono::TimeDelta::minutes(40);
    let hi = now + chrono::TimeDelta::minutes(30);
    for (name, sql) in [
        ("close_windows", recap::sink::MERGE_CANDIDATE_PROBE_SQL),
        ("close_window", recap::sink::MERGE_CANDIDATES_SQL),
    ] {
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}");
        let plan: serde_json::Value = match name {
            "close_windows" => sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
                .bind(vec!["b"])
                .bind(vec!["u"])
                .bind(vec![hi])
                .bind(vec![lo])
                .fetch_one(&db.pool)
                .await
                .unwrap(),
            _ => {
                // close_window locks its rows (FOR UPDATE): run it inside a transaction
                let mut tx = db.pool.begin().await.unwrap();
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
                    .bind("b")
                    .bind("u")
                    .bind(hi)
                    .bind(lo);
                if sql.contains("$5") {
                    // the earliest start a candidate may have (the window's start minus the longest span)
                    query = query.bind(lo - chrono::TimeDelta::hours(24));
                }
                let p = query.fetch_one(&mut *tx).await.unwrap();
                tx.rollback().await.unwrap();
                p
            }
        };
        let buffers = |p: &serde_json::Value| {
            p[0]["Plan"]["Shared Hit Blocks"].as_i64().unwrap_or(0)
                + p[0]["Plan"]["Shared Read Blocks"].as_i64().unwrap_or(0)
        };
        println!("{name}: {} buffers\n{plan:#}", buffers(&plan));
        assert!(
            buffers(&plan) <= 12,
            "{name} read {} buffers for one user's lookup (a scan of the history): {plan:#}",
            buffers(&plan)
        );
    }
}

/// Defect 9 (sweep part): a swept point whose payload an event could not carry (user id over 255 bytes, a control
/// character) is a dead letter with its reason, never a message.
#[tokio::test(flavor = "multi_thread")]
async fn sweep_payloads_are_validated_like_events() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let q = qdrant().await;
    let coll = format!("ingest_time_{}", token());
    create_collection(&q, &coll, true).await;
    let t = now_ms() - 10 * MIN;
    let mut pts = conversation("good", t, 2, MIN, false);
    pts.extend(conversation(&"x".repeat(300), t, 1, MIN, false));
    pts.extend(conversation("nul\u{0}user", t, 1, MIN, false));
    upsert(&q, &coll, &pts).await;
    let mut sweep = sweep_source(
        &ctx,
        Duration::from_secs(3600),
        Duration::from_secs(86_400),
        100,
        single_bot(&coll),
    );
    let (mut messages, mut letters) = (Vec::new(), Vec::new());
    loop {
        let b = sweep.next_batch().await.unwrap();
        messages.extend(b.messages.iter().map(|m| m.user_id.clone()));
        letters.extend(b.dead_letters.iter().map(|d| d.reason.clone()));
        sweep.commit().await.unwrap();
        if b.caught_up {
            break;
        }
    }
    assert!(messages.iter().all(|u| u == "good"), "{messages:?}");
    assert_eq!(messages.len(), 4);
    assert_eq!(letters.len(), 4, "{letters:?}");
    assert!(letters.iter().any(|r| r.contains("255")), "{letters:?}");
    assert!(letters.iter().any(|r| r.contains("control")), "{letters:?}");
    let _ = q.delete_collection(&coll).await;
}

/// Defect 2: in sweep-only mode the watermark may not pass what the last cycle could have seen. A user writes again
/// just under the idle gap after a cycle started; between cycles the wall clock passes the window's deadline; the
/// window must wait for the next cycle and close once, with both messages.
#[tokio::test(flavor = "multi_thread")]
async fn sweep_only_waits_for_the_cycle_that_can_see_the_next_message() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, SHORT_GAP).await;
    let mut ing = ingest(&ctx).await;
    let q = qdrant().await;
    let coll = format!("ingest_time_{}", token());
    create_collection(&q, &coll, true).await;
    let mut sweep = sweep_source(
        &ctx,
        Duration::from_secs(4),
        Duration::from_secs(3600),
        100,
        single_bot(&coll),
    );
    let t0 = now_ms();
    let m1 = conversation("pauser", t0, 1, 0, false)[..1].to_vec();
    upsert(&q, &coll, &m1).await;
    // cycle 1 reads m1
    loop {
        let b = sweep.next_batch().await.unwrap();
        ing.apply(&b, now_ms()).await.unwrap();
        sweep.commit().await.unwrap();
        if sweep.cycles_completed() == 1 {
            break;
        }
    }
    // m2, 2.5 s after m1 (under the 3 s gap), written after cycle 1 started
    tokio::time::sleep(until_ms(t0 + 2500)).await;
    let mut m2 = conversation("pauser", now_ms(), 1, 0, false)[..1].to_vec();
    m2[0].content = "and one more thing".into();
    upsert(&q, &coll, &m2).await;
    // between cycles the wall clock moves past m1's deadline (here: 5 s ahead, as a longer interval would)
    let b = sweep.next_batch().await.unwrap();
    assert!(b.messages.is_empty());
    ing.apply(&b, now_ms() + 5 * SEC).await.unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while windows_of(&db.pool, "pauser").await.is_empty() {
        assert!(Instant::now() < until, "the window never closed");
        let b = sweep.next_batch().await.unwrap();
        ing.apply(&b, now_ms()).await.unwrap();
        sweep.commit().await.unwrap();
    }
    // a few more cycles: nothing reopens it
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        let b = sweep.next_batch().await.unwrap();
        ing.apply(&b, now_ms()).await.unwrap();
        sweep.commit().await.unwrap();
    }
    assert_eq!(windows_of(&db.pool, "pauser").await, vec![(2, 1)]);
    let _ = q.delete_collection(&coll).await;
}

/// Issue 25: the windows a swept collection closed are stored when that collection's last page is stepped (a
/// checkpoint is due then, `Batch::flush`), and the workers of the process hear of it at once
/// (`Store::windows_due`), before the sweep reads the next collection: on a first sweep over many bots the first
/// recaps come after the first bot's collection, not after all of them. Without either, nothing rings here until the
/// cycle ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_swept_collections_windows_are_stored_before_the_next_collection_is_read() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, SHORT_GAP).await;
    let mut ing = ingest(&ctx).await;
    let q = qdrant().await;
    let tag = token();
    let colls = [
        (format!("ingest_time_{tag}_a"), "bota", "usera"),
        (format!("ingest_time_{tag}_b"), "botb", "userb"),
    ];
    // per collection one user with two messages a minute apart: the first one's window closes on the collection's
    // own page (its time moves the bot's watermark past the 3 s gap)
    let t0 = now_ms() - 3_600_000;
    for (c, _, user) in &colls {
        create_collection(&q, c, true).await;
        let mut p = conversation(user, t0, 1, 0, false)[..1].to_vec();
        p.extend(conversation(user, t0 + 60_000, 1, 0, false)[..1].to_vec());
        upsert(&q, c, &p).await;
    }
    let map = colls.clone();
    let mut sweep = sweep_source(
        &ctx,
        Duration::from_secs(3600),
        Duration::from_secs(7200),
        100,
        Arc::new(move |n: &str| {
            map.iter()
                .find(|(c, _, _)| c == n)
                .map(|(_, b, _)| b.to_string())
        }),
    );
    // step pages until the first collection ends
    let first = loop {
        let b = sweep.next_batch().await.unwrap();
        assert!(!b.caught_up, "the cycle ended before a collection did");
        ing.step(&mut sweep, &b, now_ms()).await.unwrap();
        if b.flush {
            let bot = &b.messages.first().expect("the collection's page").bot;
            break colls.iter().find(|(_, b, _)| b == bot).unwrap().clone();
        }
    };
    // the checkpoint goes on in the background; it rings when its windows are committed
    tokio::time::timeout(
        Duration::from_secs(20),
        ctx.store.due_now(Duration::from_secs(3600)),
    )
    .await
    .expect("the collection's checkpoint did not ring the workers");
    let other = colls.iter().find(|(c, _, _)| *c != first.0).unwrap();
    assert_eq!(windows_of(&db.pool, first.2).await, vec![(1, 1)]);
    assert!(
        windows_of(&db.pool, other.2).await.is_empty(),
        "the next collection is not read yet"
    );
    let due: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE state = 'due'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(due, 1, "the window is due for the workers");
    for (c, _, _) in &colls {
        let _ = q.delete_collection(c).await;
    }
}

/// The time from now until the wall-clock time `t` (ms).
fn until_ms(t: i64) -> Duration {
    Duration::from_millis((t - now_ms()).max(0) as u64)
}

/// Defect 3: in hybrid mode a sweep cycle does not starve events (event batches come between its pages), and a
/// sweep page never ticks the wall clock with a "caught up" flag taken before the cycle.
#[tokio::test(flavor = "multi_thread")]
async fn hybrid_interleaves_sweep_pages_with_events() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let q = qdrant().await;
    let coll = format!("ingest_time_{}", token());
    create_collection(&q, &coll, true).await;
    let t = now_ms() - 30 * MIN;
    // 20 points for the sweep (10 pages of 2)
    let swept: Vec<TestPoint> = (0..10)
        .flat_map(|i| conversation(&format!("s{i}"), t + i * MIN, 1, MIN, false))
        .collect();
    upsert(&q, &coll, &swept).await;
    let swept_ids: std::collections::HashSet<String> = swept.iter().map(|p| p.id.clone()).collect();
    let sweep = sweep_source(
        &ctx,
        Duration::from_millis(500),
        Duration::from_secs(86_400),
        2,
        single_bot(&coll),
    );
    let events = recap::source::nats::NatsSource::start(ns.settings())
        .await
        .expect("nats");
    let mut hybrid = recap::source::Hybrid::new(events, sweep);
    // drain the (empty) stream once, then wait for the cycle to be due
    let b = hybrid.next_batch().await.unwrap();
    hybrid.commit().await.unwrap();
    assert!(b.messages.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    // events arrive while the cycle runs: one published before each batch is read
    let mut order = Vec::new(); // 'S' sweep page, 'E' event batch (non-empty batches only)
    let mut ticked_during_sweep = false;
    let until = Instant::now() + Duration::from_secs(30);
    let mut swept_seen = 0;
    let mut published = 0;
    while swept_seen < swept.len() {
        assert!(Instant::now() < until, "timed out: {order:?}");
        let p = conversation(&format!("e{published}"), now_ms(), 1, 0, false);
        ns.publish(&js, "b", &coll, &p[..1]).await;
        published += 1;
        let b = hybrid.next_batch().await.unwrap();
        hybrid.commit().await.unwrap();
        let from_sweep = b.messages.iter().any(|m| swept_ids.contains(&m.point_id));
        if from_sweep {
            swept_seen += b.messages.len();
            order.push('S');
            ticked_during_sweep |= b.caught_up;
        } else if !b.messages.is_empty() {
            order.push('E');
        }
    }
    let order: String = order.into_iter().collect();
    println!("batches: {order}");
    assert!(
        !order.contains("SSS"),
        "the sweep cycle starved events: {order}"
    );
    assert!(
        !ticked_during_sweep,
        "a sweep page ticked with a stale caught-up flag: {order}"
    );
    let _ = q.delete_collection(&coll).await;
}

/// A source whose batches take longer than the leader lease (a slow scroll).
struct SlowSource(Duration);

impl Source for SlowSource {
    async fn next_batch(&mut self) -> Result<Batch, recap::source::SourceError> {
        tokio::time::sleep(self.0).await;
        Ok(Batch::default())
    }
    async fn commit(&mut self) -> Result<(), recap::source::SourceError> {
        Ok(())
    }
    async fn abandon(&mut self) {}
}

/// Defect 8: the leader lease is renewed while a long step (here a slow scroll) is under way, so another replica
/// never takes it from a live leader.
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_lease_is_renewed_during_a_slow_step() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &["--leader-lease-seconds", "2"]).await;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(recap::pipeline::run_ingest(
        ctx.clone(),
        SlowSource(Duration::from_secs(5)),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let other = ctx
            .store
            .try_acquire_leader("other-replica", Duration::from_secs(2))
            .await
            .unwrap();
        assert!(
            other.is_none(),
            "another replica took the lease from a live leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    let _ = run.await;
}

/// Defect 4: a window's messages are the points its events named, whatever their stored time: with `ts` stamped
/// at publish (a few ms after the point's stored time), no message is dropped.
#[tokio::test(flavor = "multi_thread")]
async fn fetch_keeps_the_named_points_whatever_their_stored_time() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &[]).await;
    let q = qdrant().await;
    let coll = format!("ingest_time_{}", token());
    create_collection(&q, &coll, false).await;
    let t = now_ms() - 10 * MIN;
    let pts = conversation("u", t, 3, 10 * SEC, false);
    upsert(&q, &coll, &pts).await;
    let ids: Vec<String> = pts.iter().map(|p| p.id.clone()).collect();
    // the events' times: 7 ms after each stored time
    let first = pts.iter().map(|p| p.ts_ms).min().unwrap() + 7;
    let last = pts.iter().map(|p| p.ts_ms).max().unwrap() + 7;
    let (msgs, _) = ctx
        .points
        .fetch_window(std::slice::from_ref(&coll), &ids, "u", (first, last))
        .await
        .unwrap();
    assert_eq!(msgs.len(), pts.len(), "a named point was dropped");
    let _ = q.delete_collection(&coll).await;
}

/// Forgetting a user (the recall API's `DELETE /v1/users/...`) while the ingest leader holds their open messages in
/// memory: the leader's next transaction fails its fence, the tracker it rebuilds holds nothing of theirs, and a later
/// message of theirs starts a fresh window.
#[tokio::test(flavor = "multi_thread")]
async fn forgetting_a_user_resets_the_leaders_open_state() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db, &["--idle-gap-minutes", "10"]).await;
    let mut ing = ingest(&ctx).await;
    let t = now_ms();
    let kept = msg("b", "kept", t);
    let gone_first = msg("b", "gone", t);
    ing.apply(
        &batch(vec![gone_first.clone(), msg("b", "gone", t + SEC), kept]),
        t + 2 * SEC,
    )
    .await
    .unwrap();
    assert_eq!(ing.tracker().open_messages(), 3);
    // (no collection here: the tombstone lists the points recap's rows held)
    recap::recall::forget_rows(&ctx.store, "b", "gone", 0, &[], &[])
        .await
        .unwrap();
    let later = msg("b", "kept", t + 3 * SEC);
    let r = ing.apply(&batch(vec![later.clone()]), t + 4 * SEC).await;
    assert!(
        matches!(r, Err(recap::sink::StoreError::LostLeadership(_))),
        "the leader kept its in-memory state after a forget: {r:?}"
    );
    let mut ing = ingest(&ctx).await;
    assert_eq!(
        ing.tracker().open_messages(),
        1,
        "the rebuilt tracker holds the forgotten user's messages"
    );
    // the failed batch comes back, with a new message of the forgotten user
    ing.apply(
        &batch(vec![later, msg("b", "gone", t + 5 * SEC)]),
        t + 6 * SEC,
    )
    .await
    .unwrap();
    assert_eq!(ing.tracker().open_messages(), 3);
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE user_id = 'gone'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "the forgotten user's old messages came back");
    // the bot's collection still holds the old messages: read again (sweep overlap, replay) they are not new, even
    // stamped later than the forget (a fast host's clock)
    let mut old = gone_first;
    old.ts_ms = t + 7 * SEC;
    let again = ing.apply(&batch(vec![old]), t + 7 * SEC).await.unwrap();
    assert_eq!(again.new, 0, "a forgotten message came back: {again:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE user_id = 'gone'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
    let tombstone: String = sqlx::query_scalar("SELECT user_key FROM recap_forgotten")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        !tombstone.contains("gone"),
        "the tombstone holds the user id"
    );
}

/// A checkpoint's closed windows go in bulk unless they may merge with a stored window or with another window of their
/// key in the same checkpoint. Whatever the mix (several windows per key, some within the idle gap of each other, some
/// inside an earlier one, some hours apart), storing them in one `close_windows` leaves the same rows as closing them
/// one by one in order.
#[tokio::test(flavor = "multi_thread")]
async fn one_checkpoint_stores_its_windows_as_one_by_one_would() {
    let _shared = common::shared().await;
    use recap::state::Closed;
    use recap::tracker::{ClosedWindow, TrackerConfig};
    let cfg = TrackerConfig::default();
    let gap = cfg.idle_gap_ms;
    let t0 = now_ms() - 30 * 24 * 60 * MIN;
    let mut rng = 0x5eed_u64;
    let mut next = |n: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n
    };
    let mut windows: Vec<Closed> = Vec::new();
    let mut id = 0u64;
    for k in 0..12 {
        let user = format!("u{k}");
        let mut t = t0 + next(1000) as i64 * MIN;
        let mut earlier: Vec<(i64, i64)> = Vec::new();
        for _ in 0..(1 + next(5)) {
            // a window inside an earlier one (a late message), or after the last: within the gap or hours apart
            let (start, end) = match (next(4), earlier.first()) {
                (0, Some(&(s, e))) => {
                    let at = s + next((e - s + 1) as u64) as i64;
                    (at, at)
                }
                (1, _) => (t + gap / 2, t + gap / 2 + next(20) as i64 * MIN),
                _ => (t + 3 * gap, t + 3 * gap + next(20) as i64 * MIN),
            };
            t = t.max(end);
            earlier.push((start, end));
            let mut points: Vec<(i64, String)> = [start, end, (start + end) / 2]
                .into_iter()
                .take(1 + next(3) as usize)
                .map(|ts| {
                    id += 1;
                    (ts, id.to_string())
                })
                .collect();
            points.sort();
            points.dedup_by_key(|p| p.0);
            let (start, end) = (points[0].0, points[points.len() - 1].0);
            windows.push(Closed {
                window: ClosedWindow {
                    bot: "b".into(),
                    user: user.as_str().into(),
                    start_ms: start,
                    end_ms: end,
                    count: points.len() as u32,
                },
                points,
                clamped: false,
            });
        }
    }
    // Both stores start with a stored window some of the first windows belong to.
    let mut rows = Vec::new();
    for together in [true, false] {
        let db = fresh_db().await;
        let ctx = context(&db, &[]).await;
        let fence = ctx
            .store
            .try_acquire_leader("merge-test", Duration::from_secs(600))
            .await
            .unwrap()
            .expect("free lease");
        let mut tx = ctx.store.begin_ingest(&fence).await.unwrap();
        tx.close_windows(&cfg, &windows[..2], 2).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = ctx.store.begin_ingest(&fence).await.unwrap();
        if together {
            tx.close_windows(&cfg, &windows[2..], 2).await.unwrap();
        } else {
            for w in &windows[2..] {
                tx.close_window(&cfg, w, 2).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
        let got: Vec<(String, i64, i64, i32, String, Vec<String>)> = sqlx::query_as(
            "SELECT user_id, (extract(epoch FROM start_ts) * 1000)::int8, (extract(epoch FROM end_ts) * 1000)::int8,
                    message_count, state, point_ids
             FROM recap_windows ORDER BY user_id, start_ts",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        rows.push(got);
    }
    assert!(
        rows[0].len() < windows.len(),
        "some windows merged ({} rows of {} windows)",
        rows[0].len(),
        windows.len()
    );
    assert!(rows[0].len() > 12, "keys with several windows");
    assert_eq!(rows[0], rows[1], "one checkpoint = one by one");
}
