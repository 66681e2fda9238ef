//! Window batches (issue 18, window throughput): the workers fetch, summarize and finish many windows at once
//! (`pipeline::process_windows`: one point-id query, one Qdrant retrieve and scroll, one finish transaction). The
//! per-window rules hold inside a batch: a window whose lease was taken or whose messages changed while the batch
//! ran is skipped on its own (the others are written), and a row that cannot be stored fails only its own window.
//! In process against real Postgres and Qdrant; runs in seconds.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::future::BoxFuture;
use recap::pipeline::{Context, process_windows};
use recap::sink::Finished;
use recap::summarize::{SummarizeError, Summarizer, SummarizerKind, Summary, WindowInput};

#[derive(Clone, Copy)]
enum Sabotage {
    /// Another worker takes the window's lease while the batch runs.
    TakeLease,
    /// A late message changes the window while the batch runs.
    BumpVersion,
}

/// The extractive summarizer, which also does to a window what another replica or the ingest would do meanwhile.
struct Meddling {
    pool: sqlx::PgPool,
    plan: Mutex<HashMap<String, (i64, Sabotage)>>,
}

impl Summarizer for Meddling {
    fn kind(&self) -> SummarizerKind {
        SummarizerKind::Extractive
    }
    fn summarize<'a>(
        &'a self,
        w: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(async move {
            let todo = self.plan.lock().unwrap().remove(&w.user_id);
            if let Some((id, what)) = todo {
                let sql = match what {
                    Sabotage::TakeLease => {
                        "UPDATE recap_windows SET lease_owner = 'another-replica' WHERE id = $1"
                    }
                    Sabotage::BumpVersion => {
                        "UPDATE recap_windows SET version = version + 1 WHERE id = $1"
                    }
                };
                sqlx::query(sql).bind(id).execute(&self.pool).await.unwrap();
            }
            recap::summarize::extractive::summarize_window(w)
        })
    }
}

fn ts(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap()
}

/// A due window of `user` with 3 exchanges stored in Qdrant and as the window's coverage; `unreported` more points in
/// Qdrant within its time range that no event named.
async fn due_window(s: &Scenario, user: &str, start: i64, unreported: usize) -> i64 {
    let pts = conversation(user, start, 3, MIN, true);
    let mut extra = conversation(user, start + 30_000, unreported, 1000, false);
    extra.retain(|p| p.role == "user");
    let q = qdrant().await;
    upsert(&q, &s.collection, &pts).await;
    upsert(&q, &s.collection, &extra).await;
    let msgs: Vec<&TestPoint> = pts
        .iter()
        .filter(|p| p.role != "conversation_pair")
        .collect();
    insert_due_window(&s.db.pool, &s.bot, user, &msgs).await
}

#[derive(Debug, sqlx::FromRow)]
struct WindowRow {
    state: String,
    revision: i32,
    attempts: i32,
    summary_id: Option<i32>,
    lease_owner: Option<String>,
    message_count: Option<i32>,
    coverage: Option<String>,
    last_error: Option<String>,
    waits: bool,
}

async fn window(pool: &sqlx::PgPool, id: i64) -> WindowRow {
    sqlx::query_as(
        "SELECT state, revision, attempts, summary_id, lease_owner, message_count, coverage, last_error,
                coalesce(not_before > now(), false) AS waits
         FROM recap_windows WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn rows_of(pool: &sqlx::PgPool, user: &str) -> Vec<(i32, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT id, revision, coverage FROM conversation_summaries WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_skips_or_fails_only_the_window_that_changed_or_cannot_be_stored() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let users: Vec<String> = (0..6).map(|i| format!("77000{i}")).collect();
    let long_user = "9".repeat(300); // longer than conversation_summaries.user_id VARCHAR(255)
    let [a, b, c, e, f] = [0, 1, 2, 4, 5].map(|i| users[i].as_str());
    let wa = due_window(&s, a, T0, 1).await;
    let wb = due_window(&s, b, T0, 0).await;
    let wc = due_window(&s, c, T0, 0).await;
    let wd = due_window(&s, &long_user, T0, 0).await;
    let we = due_window(&s, e, T0, 0).await;
    let wf = due_window(&s, f, T0, 0).await;
    // F has a row already (an earlier revision with other bounds): it is updated in place, by id.
    let old_row: i32 = sqlx::query_scalar(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp,
             message_count, revision, coverage)
         VALUES ($1, $2, 'earlier summary', $3, $4, 2, 1, 'old') RETURNING id",
    )
    .bind(f)
    .bind(&s.bot)
    .bind(ts(T0 - 60 * MIN).naive_utc())
    .bind(ts(T0 - 59 * MIN).naive_utc())
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE recap_windows SET revision = 1, summary_id = $2 WHERE id = $1")
        .bind(wf)
        .bind(old_row)
        .execute(&s.db.pool)
        .await
        .unwrap();

    let cfg = scenario_config(&s, &["--llm-max-attempts", "3"]);
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    let summarizer = Arc::new(Meddling {
        pool: s.db.pool.clone(),
        plan: Mutex::new(HashMap::from([
            (b.to_string(), (wb, Sabotage::TakeLease)),
            (c.to_string(), (wc, Sabotage::BumpVersion)),
        ])),
    });
    let ctx = Context {
        store: store.clone(),
        points: Arc::new(
            recap::fetch::Points::new(&env("QDRANT_URL"), None, cfg.payload_mapping())
                .expect("points"),
        ),
        summarizer,
        instance: format!("test-{}", token()),
        cfg: Arc::new(cfg),
    };
    let mut claimed = store
        .claim_due(&ctx.instance, Duration::from_secs(60), 10)
        .await
        .unwrap();
    claimed.sort_by_key(|w| w.id);
    assert_eq!(
        claimed.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![wa, wb, wc, wd, we, wf]
    );
    let second = claimed.split_off(3);

    // Batch 1: A is written; B (lease taken) and C (changed) are skipped on their own, in the batch's transaction.
    let r1 = process_windows(&ctx, claimed, &|_| {}).await.unwrap();
    assert_eq!(
        r1,
        vec![
            (wa, Finished::Done),
            (wb, Finished::Stale),
            (wc, Finished::Stale)
        ]
    );
    let (ra, rb, rc) = (
        window(&s.db.pool, wa).await,
        window(&s.db.pool, wb).await,
        window(&s.db.pool, wc).await,
    );
    eprintln!("A {ra:?}\nB {rb:?}\nC {rc:?}");
    assert_eq!((ra.state.as_str(), ra.revision), ("done", 1));
    assert_eq!(ra.lease_owner, None);
    // 6 named messages + 1 found by the window's scroll (recorded so it is not late later)
    assert_eq!(ra.message_count, Some(7));
    let a_points: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE window_id = $1")
            .bind(wa)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        a_points, 7,
        "the unreported point is stored with its window"
    );
    let a_rows = rows_of(&s.db.pool, a).await;
    assert_eq!(a_rows.len(), 1);
    assert_eq!((Some(a_rows[0].0), a_rows[0].1), (ra.summary_id, 1));
    assert_eq!(a_rows[0].2, ra.coverage);
    // B: untouched, the other replica's lease kept
    assert_eq!(
        (rb.state.as_str(), rb.revision, rb.summary_id),
        ("due", 0, None)
    );
    assert_eq!(rb.lease_owner.as_deref(), Some("another-replica"));
    assert!(rows_of(&s.db.pool, b).await.is_empty());
    // C: nothing written, its lease given back so it is claimed again at once
    assert_eq!(
        (rc.state.as_str(), rc.revision, rc.summary_id),
        ("due", 0, None)
    );
    assert_eq!(rc.lease_owner, None);
    assert!(rows_of(&s.db.pool, c).await.is_empty());

    // Batch 2: D's row cannot be stored (user id too long): the batch's transaction fails, the windows are finished
    // one by one, and only D counts a failed attempt; E is inserted, F's existing row updated in place.
    let r2 = process_windows(&ctx, second, &|_| {}).await.unwrap();
    assert_eq!(
        r2,
        vec![
            (wd, Finished::Retrying),
            (we, Finished::Done),
            (wf, Finished::Done)
        ]
    );
    let (rd, re, rf) = (
        window(&s.db.pool, wd).await,
        window(&s.db.pool, we).await,
        window(&s.db.pool, wf).await,
    );
    eprintln!("D {rd:?}\nE {re:?}\nF {rf:?}");
    assert_eq!((rd.state.as_str(), rd.attempts, rd.revision), ("due", 1, 0));
    assert!(rd.waits, "D waits for its retry time");
    assert_eq!(rd.lease_owner, None);
    assert!(
        rd.last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot be stored")),
        "{:?}",
        rd.last_error
    );
    assert!(rows_of(&s.db.pool, &long_user).await.is_empty());
    assert_eq!(
        (re.state.as_str(), re.revision, re.attempts),
        ("done", 1, 0)
    );
    assert_eq!(rows_of(&s.db.pool, e).await.len(), 1);
    assert_eq!((rf.state.as_str(), rf.revision), ("done", 2));
    assert_eq!(rf.summary_id, Some(old_row), "F keeps its row");
    let f_rows = rows_of(&s.db.pool, f).await;
    assert_eq!(f_rows.len(), 1);
    assert_eq!(f_rows[0].0, old_row);
    assert_eq!(f_rows[0].1, 2);
    assert_eq!(f_rows[0].2, rf.coverage);
    assert_ne!(rf.coverage.as_deref(), Some("old"));

    // The summary vectors of the three written windows were synced after their batch committed.
    let synced: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT v.summary_id, v.revision FROM recap_summary_vectors v ORDER BY v.summary_id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let mut expected = vec![
        (ra.summary_id.unwrap(), 1),
        (re.summary_id.unwrap(), 1),
        (old_row, 2),
    ];
    expected.sort();
    assert_eq!(synced, expected);

    // B and C are done by the next batch (B once the other replica's lease runs out).
    sqlx::query("UPDATE recap_windows SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(wb)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let mut again = store
        .claim_due(&ctx.instance, Duration::from_secs(60), 10)
        .await
        .unwrap();
    again.sort_by_key(|w| w.id);
    assert_eq!(again.iter().map(|w| w.id).collect::<Vec<_>>(), vec![wb, wc]);
    let r3 = process_windows(&ctx, again, &|_| {}).await.unwrap();
    assert_eq!(r3, vec![(wb, Finished::Done), (wc, Finished::Done)]);
    for u in [b, c] {
        let rows = rows_of(&s.db.pool, u).await;
        assert_eq!((rows.len(), rows[0].1), (1, 1), "{u}");
    }
}

/// The plan Postgres gives `sql` as a prepared statement under a generic plan (as a statement sqlx prepared once and
/// ran more than five times gets), as JSON text.
async fn generic_plan(pool: &sqlx::PgPool, sql: &str, params: &str, args: &str) -> String {
    let mut conn = pool.acquire().await.expect("connection");
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("plan_cache_mode");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE claim_plan({params}) AS {sql}"
    )))
    .execute(&mut *conn)
    .await
    .expect("prepare");
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) EXECUTE claim_plan({args})"
    )))
    .fetch_one(&mut *conn)
    .await
    .expect("explain");
    sqlx::raw_sql("DEALLOCATE claim_plan; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .expect("deallocate");
    plan.to_string()
}

/// Issue 27: the claim keeps `state = 'due'` a constant in its text (built from `WindowState` by `state_sql!`), so
/// even the generic plan of the prepared statement scans a partial index on `state` instead of the whole table. The
/// same statement with the state bound as `$4` is the control: its generic plan cannot use a partial index.
#[tokio::test(flavor = "multi_thread")]
async fn the_claim_uses_a_partial_index_of_the_due_windows_under_a_generic_plan() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    sqlx::query(
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count)
         SELECT 'b', 'u' || i, now() - i * interval '1 minute', now() - i * interval '1 minute' + interval '5 minutes',
                CASE WHEN i % 1000 = 0 THEN $1 ELSE $2 END, 5
         FROM generate_series(1, 50000) i",
    )
    .bind(recap::model::WindowState::Due)
    .bind(recap::model::WindowState::Done)
    .execute(&db.pool)
    .await
    .expect("windows");
    sqlx::query("ANALYZE recap_windows")
        .execute(&db.pool)
        .await
        .expect("analyze");
    let partial = ["idx_recap_windows_due", "idx_recap_windows_not_done"];
    let claim = recap::sink::claim_due_sql();
    let plan = generic_plan(&db.pool, claim, "text, float8, bigint", "'w', 1000, 16").await;
    assert!(
        partial.iter().any(|i| plan.contains(i)),
        "the claim scans no partial index: {plan}"
    );
    let due = format!("'{}'", recap::model::WindowState::Due.as_str());
    // one constant per scan of the due windows (retries whose time came, new ones)
    assert!(claim.matches(&due).count() >= 1, "{claim}");
    let bound = claim.replace(&due, "$4");
    let args = format!("'w', 1000, 16, {due}");
    let plan = generic_plan(&db.pool, &bound, "text, float8, bigint, text", &args).await;
    assert!(
        !partial.iter().any(|i| plan.contains(i)),
        "a bound state still scans a partial index (the control does not discriminate): {plan}"
    );
}

/// A context for the batch tests: the extractive summarizer (through [`Meddling`], with nothing planned).
async fn batch_ctx(s: &Scenario) -> Context {
    let cfg = scenario_config(s, &[]);
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    Context {
        store,
        points: Arc::new(
            recap::fetch::Points::new(&env("QDRANT_URL"), None, cfg.payload_mapping())
                .expect("points"),
        ),
        summarizer: Arc::new(Meddling {
            pool: s.db.pool.clone(),
            plan: Mutex::new(HashMap::new()),
        }),
        instance: format!("test-{}", token()),
        cfg: Arc::new(cfg),
    }
}

/// The group finish of `run_workers` (`pipeline::Finisher`, issue 25): batches finishing at the same time are written
/// in one transaction; when a row of the group cannot be stored, each batch is written on its own, so only the batch
/// holding that row fails (its caller then finishes it window by window) and the others are written; the summary
/// vectors of the written windows are synced after the rows are committed.
/// On the current-thread runtime both batches of a `join!` are sent before the finisher runs: they form one group.
#[tokio::test]
async fn a_group_finish_writes_batches_together_and_a_bad_row_fails_only_its_batch() {
    use recap::pipeline::{Finisher, summarize_window};
    use recap::sink::{ClaimedWindow, WindowOutcome};
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let users: Vec<String> = (0..3).map(|i| format!("77100{i}")).collect();
    let long_user = "9".repeat(300); // longer than conversation_summaries.user_id VARCHAR(255)
    let wa = due_window(&s, &users[0], T0, 0).await;
    let wb = due_window(&s, &users[1], T0, 0).await;
    let wc = due_window(&s, &users[2], T0, 0).await;
    let wd = due_window(&s, &long_user, T0, 0).await;
    let ctx = batch_ctx(&s).await;
    let mut claimed = ctx
        .store
        .claim_due(&ctx.instance, Duration::from_secs(60), 10)
        .await
        .unwrap();
    claimed.sort_by_key(|w| w.id);
    assert_eq!(
        claimed.iter().map(|w| w.id).collect::<Vec<_>>(),
        vec![wa, wb, wc, wd]
    );
    let mut outcomes = Vec::new();
    for w in &claimed {
        outcomes.push(summarize_window(&ctx, w).await.unwrap());
    }
    let pairs: Vec<(&ClaimedWindow, &WindowOutcome)> = claimed.iter().zip(&outcomes).collect();
    let (finisher, task) = Finisher::start(&ctx, Duration::from_secs(60));

    // A and B, two batches: one group, one transaction (their rows share the writing transaction's id).
    let (ra, rb) = tokio::join!(finisher.finish(&pairs[0..1]), finisher.finish(&pairs[1..2]));
    assert_eq!(ra.unwrap(), vec![Finished::Done]);
    assert_eq!(rb.unwrap(), vec![Finished::Done]);
    let xmins: Vec<String> = sqlx::query_scalar(
        "SELECT xmin::text FROM conversation_summaries WHERE user_id = ANY($1) ORDER BY id",
    )
    .bind(&users[0..2])
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(xmins.len(), 2);
    assert_eq!(xmins[0], xmins[1], "A and B written in one transaction");

    // C, and D whose row cannot be stored: the group fails, each batch is tried on its own: C is written, D's batch
    // fails (not as a lost connection: its caller goes window by window) and nothing of it is written.
    let (rc, rd) = tokio::join!(finisher.finish(&pairs[2..3]), finisher.finish(&pairs[3..4]));
    assert_eq!(rc.unwrap(), vec![Finished::Done]);
    let e = rd.unwrap_err();
    assert!(!e.is_connection(), "{e}");
    let c = window(&s.db.pool, wc).await;
    assert_eq!((c.state.as_str(), c.revision), ("done", 1));
    let d = window(&s.db.pool, wd).await;
    assert_eq!((d.state.as_str(), d.revision, d.attempts), ("due", 0, 0));
    assert_eq!(d.lease_owner.as_deref(), Some(ctx.instance.as_str()));
    assert!(rows_of(&s.db.pool, &long_user).await.is_empty());

    // The finisher ends once its handles are dropped, after syncing the vectors of A, B and C.
    drop(finisher);
    task.await.unwrap();
    let synced: Vec<i32> =
        sqlx::query_scalar("SELECT summary_id FROM recap_summary_vectors ORDER BY 1")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    let mut expected = Vec::new();
    for id in [wa, wb, wc] {
        expected.push(window(&s.db.pool, id).await.summary_id.unwrap());
    }
    expected.sort();
    assert_eq!(synced, expected);
}

/// The claim (issue 25: two index-ordered scans of the due index): due windows whose retry time came and new ones,
/// lowest ids first, up to the limit; never a window waiting for its retry time, leased by another worker, or
/// finished, however many finished windows the index still holds entries of.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_takes_the_lowest_due_ids_whose_time_came() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(due_window(&s, &format!("77200{i}"), T0, 0).await);
    }
    let set = |sql: &'static str, id: i64| {
        let pool = s.db.pool.clone();
        async move {
            sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
        }
    };
    set(
        "UPDATE recap_windows SET state = 'done' WHERE id = $1",
        ids[0],
    )
    .await;
    set(
        "UPDATE recap_windows SET state = 'done' WHERE id = $1",
        ids[1],
    )
    .await;
    set(
        "UPDATE recap_windows SET not_before = now() + interval '1 hour' WHERE id = $1",
        ids[2],
    )
    .await;
    set("UPDATE recap_windows SET not_before = now() - interval '1 second', attempts = 1 WHERE id = $1", ids[3]).await;
    set("UPDATE recap_windows SET lease_owner = 'another', lease_until = now() + interval '1 hour' WHERE id = $1", ids[4]).await;
    set("UPDATE recap_windows SET lease_owner = 'another', lease_until = now() - interval '1 second' WHERE id = $1", ids[5]).await;
    // a retry due later than a new window with a lower id: the lowest ids are claimed first either way
    set(
        "UPDATE recap_windows SET not_before = now() - interval '1 second' WHERE id = $1",
        ids[8],
    )
    .await;
    let store = batch_ctx(&s).await.store;
    let claim = |limit: i64| {
        let store = store.clone();
        async move {
            let mut c: Vec<i64> = store
                .claim_due("w", Duration::from_secs(60), limit)
                .await
                .unwrap()
                .iter()
                .map(|w| w.id)
                .collect();
            c.sort();
            c
        }
    };
    assert_eq!(claim(3).await, vec![ids[3], ids[5], ids[6]]);
    assert_eq!(claim(10).await, vec![ids[7], ids[8]]);
    assert_eq!(claim(10).await, Vec::<i64>::new());
}
