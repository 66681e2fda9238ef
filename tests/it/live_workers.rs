//! Workers at production timing (issue 14): replicas sharing the work while the LLM takes seconds, one daily budget
//! across replicas, LLM replies with aliased fields, and windows whose result cannot be stored. Every LLM call is
//! counted at the LLM test server, never in log lines.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

fn llm_env(s: &Scenario, llm: &LlmServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut envs = recap_env(&s.db, Some(&s.nats));
    envs.retain(|(k, _)| k != "SUMMARIZER");
    envs.push(("SUMMARIZER".into(), "llm".into()));
    envs.push(("LLM_BASE_URL".into(), llm.api_base()));
    envs.push(("LLM_API_KEY".into(), "sk-test-key".into()));
    envs.push(("LLM_MODEL".into(), "test/model".into()));
    envs.push(("LLM_REQUESTS_PER_SECOND".into(), "50".into()));
    // the test server's prices, so a reservation estimates what the server will charge
    envs.push(("LLM_PRICE_PROMPT_PER_MTOK".into(), "1".into()));
    envs.push(("LLM_PRICE_COMPLETION_PER_MTOK".into(), "5".into()));
    for (k, v) in extra {
        envs.retain(|(e, _)| e != k);
        envs.push((k.to_string(), v.to_string()));
    }
    envs
}

fn replica(envs: &[(String, String)], name: &str) -> std::process::Child {
    let mut e = envs.to_vec();
    e.push(("INSTANCE_ID".into(), name.into()));
    spawn_recap(&["run"], &e, &log_path(name))
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Two replicas, an LLM that takes 1.5 s, leases of 8 s, 2 calls at a time and batches of 50: a replica claims only
/// what it can start, renews its leases while working and never calls the LLM for a lease it lost, so every window
/// costs exactly one call (counted at the server).
#[tokio::test(flavor = "multi_thread")]
async fn two_slow_replicas_call_the_llm_exactly_once_per_window() {
    let _shared = common::shared().await;
    let s = scenario(18).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"latency_ms": 1500})).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let envs = llm_env(
        &s,
        &llm,
        &[
            ("LEASE_SECONDS", "8"),
            ("LLM_CONCURRENCY", "2"),
            ("ENRICHMENT_BATCH_SIZE", "50"),
        ],
    );
    let t0 = Instant::now();
    let mut a = replica(&envs, "replica-a");
    let mut b = replica(&envs, "replica-b");
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(80)).await;
    let took = t0.elapsed();
    // a call answered after the last row would still be counted: give stragglers a moment
    tokio::time::sleep(Duration::from_millis(1800)).await;
    terminate(&mut a);
    terminate(&mut b);
    assert_eq!(got, expected);
    let st = llm.stats().await;
    let calls = u(&st, "calls_total");
    eprintln!(
        "2 replicas, LLM 1.5 s, lease 8 s, concurrency 2, batch 50: {calls} LLM calls for {} windows = {:.2} per window \
         (distinct prompts {}, most calls for one prompt {}, max concurrency at the server {}), rows in {took:?}",
        expected.len(),
        calls as f64 / expected.len() as f64,
        st["distinct_prompts"],
        st["max_calls_one_prompt"],
        st["max_concurrency_observed"],
    );
    assert_eq!(
        calls,
        expected.len() as u64,
        "LLM calls per window must be exactly 1.00: {st}"
    );
    assert_eq!(u(&st, "max_calls_one_prompt"), 1, "{st}");
    assert!(u(&st, "max_concurrency_observed") <= 4, "{st}");
}

/// LLM_DAILY_BUDGET_USD is one number for all replicas, kept in Postgres: two replicas together spend at most the
/// budget plus one call's cost, and the ledger records what the server charged.
#[tokio::test(flavor = "multi_thread")]
async fn the_daily_budget_holds_across_two_replicas() {
    let _shared = common::shared().await;
    let s = scenario(8).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"latency_ms": 300})).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let budget = 0.004;
    let envs = llm_env(
        &s,
        &llm,
        &[
            ("LLM_DAILY_BUDGET_USD", "0.004"),
            ("OVER_BUDGET", "wait"),
            ("LLM_CONCURRENCY", "2"),
        ],
    );
    let mut a = replica(&envs, "budget-a");
    let mut b = replica(&envs, "budget-b");
    // spending stops: no new call for 4 s (both replicas wait for tomorrow), or everything is done
    let t0 = Instant::now();
    let (mut last, mut since) = (u64::MAX, Instant::now());
    let st = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let st = llm.stats().await;
        let calls = u(&st, "calls_total");
        if calls != last || u(&st, "in_flight") > 0 {
            (last, since) = (calls, Instant::now());
        }
        let done = rows(&s.db.pool).await.len();
        if (calls > 0 && since.elapsed() > Duration::from_secs(4)) || done == expected.len() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "spending never stopped: {st}"
        );
    };
    // Over budget, due windows are left alone: no claim, no Qdrant fetch, no retry write (only a window that gets
    // an LLM call may be touched).
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let touched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recap_windows WHERE state <> 'too_short' AND updated_at > $1",
    )
    .bind(since)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let full = reqwest_stats(&llm).await;
    let calls_meanwhile = u(&full, "calls_total") - u(&st, "calls_total");
    eprintln!(
        "over budget for 6 s: {touched} windows claimed or rewritten, {calls_meanwhile} LLM calls"
    );
    assert!(
        touched as u64 <= calls_meanwhile,
        "workers kept claiming and fetching windows while the budget was spent: {touched} windows touched in 6 s"
    );
    terminate(&mut a);
    terminate(&mut b);
    let spent = full["cost_total"].as_f64().unwrap();
    let one_call = full["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cost"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let done = rows(&s.db.pool).await.len();
    let ledger: f64 =
        sqlx::query_scalar("SELECT coalesce(sum(spent_usd), 0)::float8 FROM recap_llm_spend")
            .fetch_one(&s.db.pool)
            .await
            .unwrap_or(-1.0);
    eprintln!(
        "budget {budget} USD across 2 replicas: spent {spent:.6} USD at the server ({} calls, one call <= {one_call:.6}), \
         ledger {ledger:.6}, {done} of {} windows summarized",
        full["calls_total"],
        expected.len()
    );
    assert!(
        done < expected.len(),
        "the scenario must cost more than the budget"
    );
    assert!(
        spent <= budget + one_call + 1e-9,
        "two replicas spent {spent} with a budget of {budget} (one call {one_call})"
    );
    assert!(
        (ledger - spent).abs() < 1e-9,
        "the ledger records what the server charged: {ledger} vs {spent}"
    );
}

async fn reqwest_stats(llm: &LlmServer) -> serde_json::Value {
    let r = reqwest::Client::new()
        .get(format!("{}/stats?calls=1", llm.base))
        .send()
        .await
        .expect("stats");
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// A model that answers each field next to its alias, inside a code fence, with keys nobody asked for: the reply is
/// accepted (one call per window, no repair) and what is stored is clean.
#[tokio::test(flavor = "multi_thread")]
async fn replies_with_aliases_side_by_side_are_accepted() {
    let _shared = common::shared().await;
    let s = scenario(3).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"reply_style": "aliases"}))
        .await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let mut child = spawn_recap(&["run"], &llm_env(&s, &llm, &[]), &log_path("aliases"));
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(40)).await;
    terminate(&mut child);
    assert_eq!(got, expected);
    let st = llm.stats().await;
    assert_eq!(u(&st, "calls_total"), expected.len() as u64, "{st}");
    let unclean: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_summaries WHERE summary_text LIKE '%`%' OR summary_text LIKE '%{%'
         OR summarizer IS DISTINCT FROM 'llm' OR cardinality(key_topics) = 0",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(unclean, 0);
}

/// A window put into `recap_windows` as an older recap (or a sweep) left it: `n` messages of `user` stored in Qdrant.
async fn stored_window(s: &Scenario, user: &str, text: Option<&str>, start: i64) -> i64 {
    let mut pts = conversation(user, start, 3, MIN, false);
    if let Some(t) = text {
        for p in &mut pts {
            p.content = format!("{t} {}", p.content);
        }
    }
    upsert(&qdrant().await, &s.collection, &pts).await;
    // the window as ingest stores it: its coverage (point ids and stored times) on the row
    let refs: Vec<&TestPoint> = pts.iter().collect();
    insert_due_window(&s.db.pool, &s.bot, user, &refs).await
}

async fn window(pool: &sqlx::PgPool, id: i64) -> (String, i32) {
    sqlx::query_as("SELECT state, attempts FROM recap_windows WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_state(
    pool: &sqlx::PgPool,
    id: i64,
    until: &[&str],
    timeout: Duration,
) -> (String, i32) {
    let t0 = Instant::now();
    loop {
        let w = window(pool, id).await;
        if until.contains(&w.0.as_str()) || t0.elapsed() > timeout {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A result that cannot be stored (a user id longer than the table's VARCHAR(255)) is an attempt: after
/// LLM_MAX_ATTEMPTS the window is dead, with exactly that many LLM calls. A NUL in a message is stripped from what is
/// stored, so that window gets its row.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_that_cannot_be_stored_counts_as_an_attempt() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let long_user = "9".repeat(300);
    let long = stored_window(&s, &long_user, None, T0).await;
    let nul = stored_window(&s, "4242", Some("nul\u{0}byte"), T0 + 60 * MIN).await;
    // no NATS; the sweep looks back one day only, so these year-old points are read by id, never swept
    let mut base = s.env();
    base.retain(|(k, _)| !k.starts_with("NATS_") && k != "LOOKBACK_DAYS");
    base.push(("LOOKBACK_DAYS".into(), "1".into()));
    let llm = LlmServer::start();
    let mut envs = base.clone();
    envs.retain(|(k, _)| k != "SUMMARIZER");
    envs.extend(
        [
            ("SUMMARIZER", "llm".to_string()),
            ("LLM_BASE_URL", llm.api_base()),
            ("LLM_API_KEY", "sk-test-key".into()),
            ("LLM_MAX_ATTEMPTS", "2".into()),
            ("LLM_REQUESTS_PER_SECOND", "50".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut child = spawn_recap(&["run", "--no-nats"], &envs, &log_path("write-error"));
    // the first failure waits retry_delay(0) = 5 s before the second attempt
    let (state, attempts) = wait_state(&s.db.pool, long, &["dead"], Duration::from_secs(30)).await;
    let st = llm.stats().await;
    let calls_at_dead = u(&st, "calls_total");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let calls_later = u(&llm.stats().await, "calls_total");
    terminate(&mut child);
    eprintln!(
        "unstorable window: state {state}, {attempts} attempts, {calls_at_dead} LLM calls ({calls_later} 6 s later)"
    );
    assert_eq!(state, "dead", "the window is dead after LLM_MAX_ATTEMPTS");
    assert_eq!(attempts, 2);
    // the long window twice, the NUL window once
    assert_eq!(calls_at_dead, 3, "{st}");
    assert_eq!(calls_later, calls_at_dead, "no LLM call for a dead window");
    assert_eq!(window(&s.db.pool, nul).await.0, "done");

    // the extractive summarizer quotes message text: the NUL must not reach Postgres
    let nul2 = stored_window(&s, "4343", Some("more\u{0}nul"), T0 + 120 * MIN).await;
    let mut child = spawn_recap(&["run", "--no-nats"], &base, &log_path("nul-extractive"));
    let (state, _) = wait_state(&s.db.pool, nul2, &["done", "dead"], Duration::from_secs(20)).await;
    terminate(&mut child);
    assert_eq!(state, "done", "the NUL is stripped from what is stored");
}

/// The ledger under contention: 4 replicas x 8 calls at a time reserving against one budget spend at most the budget
/// plus one call, and use it up.
#[tokio::test(flavor = "multi_thread")]
async fn the_spend_ledger_admits_at_most_the_budget_plus_one_call() {
    let _shared = common::shared().await;
    use recap::budget::{PgLedger, Reserve, SpendLedger};
    let db = fresh_db().await;
    db.migrate().await;
    let (budget, estimate) = (0.1, 0.01);
    let ledgers: Vec<std::sync::Arc<PgLedger>> = (0..4)
        .map(|i| std::sync::Arc::new(PgLedger::new(db.pool.clone(), format!("replica-{i}"))))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, l) in ledgers.iter().enumerate() {
        for j in 0..8u64 {
            let l = l.clone();
            tasks.spawn(async move {
                let (mut calls, mut refused) = (0u64, 0);
                loop {
                    match l
                        .reserve(estimate, budget, Duration::from_secs(60))
                        .await
                        .unwrap()
                    {
                        Reserve::Granted { usd } => {
                            tokio::time::sleep(Duration::from_millis(5 + (i as u64 * 8 + j) % 7))
                                .await;
                            // actual costs between 20% and 100% of the estimate
                            let actual =
                                estimate * (0.2 + 0.8 * (((calls * 7 + j) % 5) as f64) / 4.0);
                            l.settle(Some(usd), actual).await.unwrap();
                            calls += 1;
                            refused = 0;
                        }
                        // like a worker: over budget (or everything reserved) it comes back later
                        Reserve::Over { .. } if refused < 20 => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Reserve::Over { .. } => return calls,
                    }
                }
            });
        }
    }
    let mut calls = 0;
    while let Some(n) = tasks.join_next().await {
        calls += n.unwrap();
    }
    // settlements are written in batches (the next reservation, a finish transaction, a flush)
    for l in &ledgers {
        l.flush().await.unwrap();
    }
    let (spent, recorded): (f64, i64) =
        sqlx::query_as("SELECT spent_usd, calls FROM recap_llm_spend")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let reserved: f64 =
        sqlx::query_scalar("SELECT coalesce(sum(usd), 0)::float8 FROM recap_llm_reservations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    eprintln!(
        "ledger: {calls} calls by 4 x 8 workers, spent {spent:.4} of a {budget} budget, {reserved:.6} left reserved"
    );
    assert_eq!(recorded as u64, calls);
    assert!(spent <= budget + estimate + 1e-9, "spent {spent}");
    assert!(
        spent >= budget - estimate,
        "the budget was not used: {spent}"
    );
    assert!(reserved.abs() < 1e-9, "reservations left: {reserved}");
}
