//! Sweep-only mode, hybrid mode (events + sweep) and backfill, end to end on real services.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

fn without_nats(envs: Vec<(String, String)>, db: &TestDb) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = envs
        .into_iter()
        .filter(|(k, _)| !k.starts_with("NATS_") && k != "DATABASE_URL")
        .collect();
    v.push(("DATABASE_URL".into(), db.url.clone()));
    v
}

/// Rows without the revision (hybrid and late paths may legitimately revise a window).
fn windows(
    rows: &[Row],
) -> Vec<(
    String,
    String,
    chrono::NaiveDateTime,
    chrono::NaiveDateTime,
    i32,
)> {
    rows.iter()
        .map(|r| (r.bot.clone(), r.user.clone(), r.start, r.end, r.count))
        .collect()
}

async fn duplicates(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM conversation_summaries GROUP BY bot_name, user_id, start_timestamp HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sweep_only_produces_the_same_table_as_events() {
    let _shared = common::shared().await;
    let s = scenario(6).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    // event mode
    let mut child = spawn_recap(&["run"], &s.env(), &log_path("events"));
    let by_events = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    terminate(&mut child);
    assert_eq!(by_events, expected);
    // sweep-only, one cycle (cron)
    let db_once = fresh_db().await;
    let (code, out, err) = run_recap(&["sweep", "--once"], &without_nats(s.env(), &db_once));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{} window(s) finished",
            expected.len() + s.points.len() / 60
        )) || !out.is_empty()
    );
    assert_eq!(
        rows(&db_once.pool).await,
        expected,
        "sweep --once differs from event mode"
    );
    // sweep-only service (NATS_URL unset)
    let db_run = fresh_db().await;
    db_run.migrate().await;
    let mut child = spawn_recap(
        &["run"],
        &without_nats(s.env(), &db_run),
        &log_path("sweep-run"),
    );
    let by_sweep = wait_for_rows(&db_run.pool, expected.len(), Duration::from_secs(90)).await;
    terminate(&mut child);
    assert_eq!(by_sweep, expected, "sweep-only run differs from event mode");
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_with_ten_percent_of_events_dropped_loses_nothing() {
    let _shared = common::shared().await;
    let s = scenario(10).await;
    let js = s.nats.ensure().await;
    // drop 10% of the events at random (deterministic per run)
    let mut seed = recap::tracker::point_hash(&s.bot);
    let kept: Vec<TestPoint> = s
        .points
        .iter()
        .filter(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            !seed.is_multiple_of(10)
        })
        .cloned()
        .collect();
    let dropped = s.points.len() - kept.len();
    assert!(
        dropped > s.points.len() / 20,
        "about 10% dropped: {dropped}"
    );
    s.nats.publish(&js, &s.bot, &s.collection, &kept).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let mut envs = s.env();
    envs.push(("ENRICHMENT_INTERVAL_SECONDS".into(), "3".into()));
    let mut child = spawn_recap(&["run"], &envs, &log_path("hybrid"));
    let t0 = Instant::now();
    let got = loop {
        let r = rows(&s.db.pool).await;
        let due = window_states(&s.db.pool)
            .await
            .get("due")
            .copied()
            .unwrap_or(0);
        if (windows(&r) == windows(&expected) && due == 0) || t0.elapsed() > Duration::from_secs(90)
        {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = t0.elapsed();
    terminate(&mut child);
    assert_eq!(
        windows(&got),
        windows(&expected),
        "every window appears, with all its messages"
    );
    assert_eq!(duplicates(&s.db.pool).await, 0);
    eprintln!(
        "hybrid: {dropped} of {} events dropped; all {} windows complete after {took:?}",
        s.points.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_backfill_resumes_to_the_same_table() {
    let _shared = common::shared().await;
    let s = scenario(100).await; // 3,600 points
    let expected = expected_rows(&s.bot, &s.points, 5);
    let base = without_nats(s.env(), &s.db);
    // uninterrupted
    let (code, out, err) = run_recap(&["backfill", "--since", "3650d"], &base);
    assert_eq!(code, 0, "{out}{err}");
    let whole = rows(&s.db.pool).await;
    assert_eq!(whole, expected);
    // interrupted with SIGKILL mid-way, then run again
    let db = fresh_db().await;
    let envs = without_nats(s.env(), &db);
    let mut child = spawn_recap(
        &["backfill", "--since", "3650d"],
        &envs,
        &log_path("backfill"),
    );
    let t0 = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_messages")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0);
        if n > 0 || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        partial > 0 && partial < (s.points.len() * 2 / 3) as i64,
        "killed mid-way: {partial} messages stored"
    );
    let (code, out, err) = run_recap(&["backfill", "--since", "3650d"], &envs);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        rows(&db.pool).await,
        whole,
        "resumed backfill differs from one uninterrupted run"
    );
    assert_eq!(duplicates(&db.pool).await, 0);
}
