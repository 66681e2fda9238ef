//! The LLM summarizer inside the running service, against the repo's OpenAI-compatible test server with faults.

use crate::common;

use std::time::Duration;

use common::*;

fn llm_env(s: &Scenario, llm: &LlmServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut envs = recap_env(&s.db, Some(&s.nats));
    envs.retain(|(k, _)| k != "SUMMARIZER");
    envs.push(("SUMMARIZER".into(), "llm".into()));
    envs.push(("LLM_BASE_URL".into(), llm.api_base()));
    envs.push(("LLM_API_KEY".into(), "sk-test-key".into()));
    envs.push(("LLM_MODEL".into(), "test/model".into()));
    envs.push(("LLM_REQUESTS_PER_SECOND".into(), "50".into()));
    envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    envs
}

async fn placeholders(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM conversation_summaries WHERE length(trim(summary_text)) = 0 OR summary_text ILIKE '%coroutine%'
         OR summarizer IS DISTINCT FROM 'llm'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_percent_faults_end_summarized_or_dead_lettered_within_limits() {
    let _shared = common::shared().await;
    let s = scenario(10).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"fail_rate": 0.3, "fail_modes": ["429", "500", "nonjson"], "retry_after": 1, "seed": 11}))
        .await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let envs = llm_env(
        &s,
        &llm,
        &[
            ("LLM_CONCURRENCY", "3"),
            ("LLM_MAX_ATTEMPTS", "2"),
            ("LLM_BREAKER_FAILURES", "50"),
        ],
    );
    let log = log_path("llm-faults");
    let mut child = spawn_recap(&["run"], &envs, &log);
    let states = wait_settled(
        &s.db.pool,
        expected.len() as i64 + 10,
        Duration::from_secs(150),
    )
    .await;
    terminate(&mut child);
    let done = states.get("done").copied().unwrap_or(0);
    let dead = states.get("dead").copied().unwrap_or(0);
    assert_eq!(
        done + dead,
        expected.len() as i64,
        "every window ends summarized or dead-lettered: {states:?}"
    );
    let no_reason: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recap_windows WHERE state = 'dead' AND coalesce(last_error, '') = ''",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(no_reason, 0, "dead windows carry their last error");
    assert_eq!(placeholders(&s.db.pool).await, 0);
    assert_eq!(rows(&s.db.pool).await.len() as i64, done);
    let stats = llm.stats().await;
    eprintln!("LLM server stats: {stats}");
    assert!(
        stats["max_concurrency_observed"].as_u64().unwrap() <= 3,
        "concurrency above LLM_CONCURRENCY: {stats}"
    );
    assert_eq!(
        stats["early_retries"].as_u64().unwrap(),
        0,
        "a retry came sooner than its Retry-After"
    );
    let failed: u64 = stats["calls_failed_by_mode"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(failed > 0, "the faults were injected");
    // each retry's log line names its window (the summarizer call runs in the window's span)
    let text = std::fs::read_to_string(&log).unwrap();
    let retries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("LLM call failed; retrying"))
        .collect();
    assert!(!retries.is_empty(), "no retry was logged");
    let unnamed: Vec<&&str> = retries
        .iter()
        .filter(|l| !(l.contains("window{window_id=") && l.contains("user_id=")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "retry lines without their window: {unnamed:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_cost_on_every_row_match_the_servers_counts() {
    let _shared = common::shared().await;
    let s = scenario(4).await;
    let llm = LlmServer::start();
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let mut child = spawn_recap(&["run"], &llm_env(&s, &llm, &[]), &log_path("llm-cost"));
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    terminate(&mut child);
    assert_eq!(got, expected);
    let (prompt, completion, cost, missing): (i64, i64, f64, i64) = sqlx::query_as(
        "SELECT sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, sum(cost_usd),
                count(*) FILTER (WHERE model IS NULL OR prompt_tokens IS NULL OR completion_tokens IS NULL OR cost_usd IS NULL
                                 OR llm_latency_ms IS NULL)
         FROM conversation_summaries",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        missing, 0,
        "every LLM row records model, tokens, cost and latency"
    );
    let stats = llm.stats().await;
    assert_eq!(
        stats["calls_ok"].as_i64().unwrap(),
        expected.len() as i64,
        "one call per window"
    );
    assert_eq!(prompt, stats["prompt_tokens_total"].as_i64().unwrap());
    assert_eq!(
        completion,
        stats["completion_tokens_total"].as_i64().unwrap()
    );
    assert!(
        (cost - stats["cost_total"].as_f64().unwrap()).abs() < 1e-9,
        "cost {cost} vs {stats}"
    );
    let model: String = sqlx::query_scalar("SELECT DISTINCT model FROM conversation_summaries")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(model, "test/model");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_outage_opens_the_breaker_and_dead_letters_nothing() {
    let _shared = common::shared().await;
    let s = scenario(6).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"down": true})).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let envs = llm_env(
        &s,
        &llm,
        &[
            ("LLM_MAX_ATTEMPTS", "1"),
            ("LLM_BREAKER_FAILURES", "3"),
            ("LLM_BREAKER_COOLDOWN", "3s"),
            ("LLM_MAX_RETRIES", "1"),
        ],
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path("llm-down"));
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage).await;
    let during = window_states(&s.db.pool).await;
    let calls_during = llm.stats().await["calls_total"].as_u64().unwrap();
    llm.control(serde_json::json!({"down": false})).await;
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    terminate(&mut child);
    assert_eq!(
        during.get("dead"),
        None,
        "nothing dead-lettered for the outage: {during:?}"
    );
    assert_eq!(
        during.get("done"),
        None,
        "nothing summarized while the endpoint was down: {during:?}"
    );
    // Without a breaker every due window would call (with retries) every 5 s: 12 windows x 2 calls x 6 rounds.
    assert!(
        calls_during < 60,
        "the breaker kept calls down during the outage: {calls_during} calls"
    );
    assert_eq!(
        got, expected,
        "all windows summarized after the endpoint came back"
    );
    assert_eq!(window_states(&s.db.pool).await.get("dead"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_key_the_sample_data_gets_real_extractive_summaries() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let nats = nats_ns();
    let suffix = format!("t{}", token());
    let repo = env!("CARGO_MANIFEST_DIR");
    let nats_stream = nats.ensure().await;
    drop(nats_stream);
    let out = std::process::Command::new("python3")
        .arg(format!("{repo}/scripts/demo_load.py"))
        .args([
            "--qdrant",
            &env("QDRANT_URL"),
            "--nats",
            &nats.url,
            "--prefix",
            &nats.prefix,
            "--bot-suffix",
            &suffix,
        ])
        .output()
        .expect("demo loader");
    assert!(
        out.status.success(),
        "demo loader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("expected window count");
    let mut envs = recap_env(&db, Some(&nats));
    envs.retain(|(k, _)| k != "SUMMARIZER"); // no key and no SUMMARIZER: auto picks extractive
    let mut child = spawn_recap(&["run"], &envs, &log_path("sample"));
    wait_for_rows(&db.pool, expected, Duration::from_secs(90)).await;
    terminate(&mut child);
    // every key topic of every summary occurs in its window's text (read back from Qdrant through recap's fetch)
    let points = recap::fetch::Points::new(&env("QDRANT_URL"), None, Default::default()).unwrap();
    type Utc = chrono::DateTime<chrono::Utc>;
    type WindowRow = (i64, String, String, Utc, Utc, Vec<String>, String, String);
    let windows: Vec<WindowRow> =
        sqlx::query_as(
            "SELECT w.id, w.bot_name, w.user_id, w.start_ts, w.end_ts, s.key_topics, s.summary_text, s.summarizer
             FROM recap_windows w JOIN conversation_summaries s ON s.id = w.summary_id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(windows.len(), expected);
    for (id, bot, user, start, end, topics, text, kind) in windows {
        assert_eq!(kind, "extractive");
        assert!(
            !recap::summarize::looks_like_placeholder(&text) && text.len() > 40,
            "a real summary: {text}"
        );
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT point_id FROM recap_messages WHERE window_id = $1")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let colls: Vec<String> = points
            .collections(true)
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.contains(&bot))
            .collect();
        let (msgs, _) = points
            .fetch_window(
                &colls,
                &ids,
                &user,
                (start.timestamp_millis(), end.timestamp_millis()),
            )
            .await
            .unwrap();
        let window_text = msgs
            .iter()
            .map(|m| m.text.to_lowercase())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!topics.is_empty());
        for t in &topics {
            assert!(
                window_text.contains(&t.to_lowercase()),
                "topic {t:?} not in the window's text"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn extractive_rows_are_upgraded_by_an_llm_pass_in_place() {
    let _shared = common::shared().await;
    let s = scenario(3).await;
    let llm = LlmServer::start();
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    // first pass: no key, extractive
    let (first, _) = run_until(&s, expected.len(), &[]).await;
    assert_eq!(first, expected);
    let ids_before: Vec<i32> =
        sqlx::query_scalar("SELECT id FROM conversation_summaries ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    let envs = llm_env(&s, &llm, &[]);
    let (code, out, err) = run_recap(
        &["resummarize", "--from", "extractive", "--since", "3650d"],
        &envs,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{} window(s)", expected.len())),
        "{out}"
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path("resummarize"));
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let llm_rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_summaries WHERE summarizer = 'llm'",
        )
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        if llm_rows == expected.len() as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    terminate(&mut child);
    let after = rows(&s.db.pool).await;
    assert!(
        after.iter().all(|r| r.revision == 2),
        "same rows, revision 2: {after:?}"
    );
    let ids_after: Vec<i32> =
        sqlx::query_scalar("SELECT id FROM conversation_summaries ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        ids_before, ids_after,
        "rows are updated in place, never duplicated"
    );
    assert_eq!(
        placeholders(&s.db.pool).await,
        0,
        "every row is now an LLM row"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_windows_come_back_with_retry() {
    let _shared = common::shared().await;
    let s = scenario(2).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"fail_rate": 1.0, "fail_modes": ["nonjson"]}))
        .await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let envs = llm_env(&s, &llm, &[("LLM_MAX_ATTEMPTS", "1")]);
    let mut child = spawn_recap(&["run"], &envs, &log_path("retry"));
    let states = wait_settled(&s.db.pool, expected.len() as i64, Duration::from_secs(60)).await;
    assert_eq!(
        states.get("dead").copied(),
        Some(expected.len() as i64),
        "replies that are never JSON dead-letter: {states:?}"
    );
    let reason: String =
        sqlx::query_scalar("SELECT last_error FROM recap_windows WHERE state = 'dead' LIMIT 1")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(
        reason.to_lowercase().contains("json"),
        "the reason names the failure: {reason}"
    );
    assert!(
        rows(&s.db.pool).await.is_empty(),
        "no row without a valid summary"
    );
    llm.control(serde_json::json!({"fail_rate": 0.0})).await;
    let (code, out, _) = run_recap(&["retry", "--all"], &envs);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{} dead window(s)", expected.len())),
        "{out}"
    );
    let got = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(60)).await;
    terminate(&mut child);
    assert_eq!(got, expected);
}
