//! Running summaries of open windows (issue 23) in the running service, on real services (Postgres, NATS, the Qdrant
//! test server) and the LLM test server, which counts calls by purpose (`X-Recap-Purpose`) and records each call's
//! prompt: the cost per window, the final summary that starts from the running summary, and the discard of a running
//! summary whose window changed under it (a late message stored before `covers_until`).

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const EVERY: usize = 10;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `n` messages of `user`, alternating user / assistant, stamped from `start_ms` 1 ms apart, each with a marker
/// (`<user>-m<i>`) that identifies it in a prompt.
fn messages(user: &str, from: usize, n: usize, start_ms: i64) -> Vec<TestPoint> {
    const SAID: &[&str] = &[
        "I repotted the tomato seedlings on the balcony this morning",
        "the pottery class finally taught me how to center the clay",
        "my brother is moving to Lisbon for his new engineering job",
        "I keep thinking about the marathon training plan for spring",
        "we cooked a lentil curry with far too much ginger in it",
    ];
    (from..from + n)
        .map(|i| TestPoint {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: user.into(),
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("{} ({user}-m{i})", SAID[i % SAID.len()]),
            ts_ms: start_ms + (i - from) as i64,
            emotion: "joy".into(),
            memory_type: "conversation".into(),
        })
        .collect()
}

struct Run {
    db: TestDb,
    nats: NatsNs,
    js: async_nats::jetstream::Context,
    q: qdrant_client::Qdrant,
    bot: String,
    collection: String,
}

impl Run {
    async fn new() -> Run {
        let db = fresh_db().await;
        db.migrate().await;
        let nats = nats_ns();
        let js = nats.ensure().await;
        let bot = format!("bot{}", token());
        let collection = format!("whisperengine_memory_{bot}_7d");
        let q = qdrant().await;
        create_collection(&q, &collection, true).await;
        Run {
            db,
            nats,
            js,
            q,
            bot,
            collection,
        }
    }

    fn env(&self, llm: &LlmServer) -> Vec<(String, String)> {
        let mut v = recap_env(&self.db, Some(&self.nats));
        v.retain(|(k, _)| k != "SUMMARIZER");
        for (k, val) in [
            ("SUMMARIZER", "llm".to_string()),
            ("LLM_BASE_URL", llm.api_base()),
            ("LLM_API_KEY", "sk-test-key".into()),
            ("LLM_MODEL", "test/model".into()),
            ("LLM_REQUESTS_PER_SECOND", "50".into()),
            ("CONTEXT_SUMMARY_EVERY", EVERY.to_string()),
            ("IDLE_GAP", "8s".into()),
            ("ALLOWED_LATENESS_SECONDS", "1".into()),
            ("COLLECTION_PATTERNS", self.collection.clone()),
            (
                "COLLECTION_MAP",
                format!("{}={}", self.collection, self.bot),
            ),
        ] {
            v.push((k.into(), val));
        }
        v
    }

    /// Stores the points in Qdrant, then publishes their events (as bots do).
    async fn say(&self, points: &[TestPoint]) {
        upsert(&self.q, &self.collection, points).await;
        self.nats
            .publish(&self.js, &self.bot, &self.collection, points)
            .await;
    }

    /// The running summary of `user`: (message_count, covers_until ms) once one with at least `n` messages is stored.
    async fn wait_running(&self, user: &str, n: usize) -> (i32, i64) {
        let t0 = Instant::now();
        loop {
            let row: Option<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                "SELECT message_count, covers_until FROM recap_running_summaries
                 WHERE bot_name = $1 AND user_id = $2 AND summary IS NOT NULL AND message_count >= $3",
            )
            .bind(&self.bot)
            .bind(user)
            .bind(n as i32)
            .fetch_optional(&self.db.pool)
            .await
            .unwrap();
            if let Some((c, t)) = row {
                return (c, t.timestamp_millis());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(40),
                "no running summary of {n}+ messages for {user}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The final summary row of `user`: its message_count, once written.
    async fn wait_row(&self, user: &str) -> i32 {
        let t0 = Instant::now();
        loop {
            let n: Option<i32> = sqlx::query_scalar(
                "SELECT message_count FROM conversation_summaries WHERE bot_name = $1 AND user_id = $2",
            )
            .bind(&self.bot)
            .bind(user)
            .fetch_optional(&self.db.pool)
            .await
            .unwrap();
            if let Some(n) = n {
                return n;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no summary row for {user}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn running_left(&self, user: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM recap_running_summaries WHERE bot_name = $1 AND user_id = $2 AND summary IS NOT NULL",
        )
        .bind(&self.bot)
        .bind(user)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }
}

/// The LLM test server's per-call records (purpose, prompt).
async fn calls(llm: &LlmServer) -> Vec<Value> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::Client::new()
        .get(format!("{}/stats?calls=1", llm.base))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    v["calls"].as_array().cloned().unwrap_or_default()
}

/// The calls about `user` (the prompt names the user), by purpose.
fn of<'a>(calls: &'a [Value], user: &str, purpose: &str) -> Vec<&'a str> {
    let needle = format!("user {user} and the bot");
    calls
        .iter()
        .filter(|c| c["purpose"] == purpose)
        .filter_map(|c| c["prompt"].as_str())
        .filter(|p| p.contains(&needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn running_summaries_cost_at_most_one_per_multiple_and_the_close_starts_from_them() {
    let _shared = common::shared().await;
    let run = Run::new().await;
    let llm = LlmServer::start();
    let tag = token();
    let (long, short, late) = (
        format!("long{tag}"),
        format!("short{tag}"),
        format!("late{tag}"),
    );
    let mut child = spawn_recap(&["run"], &run.env(&llm), &log_path("running"));

    // below CONTEXT_SUMMARY_EVERY: one call at close, as before
    run.say(&messages(&short, 0, 7, now_ms())).await;
    // the late case: 12 messages, a running summary of them, then a message stored before its covers_until
    let late_first = messages(&late, 0, 12, now_ms());
    run.say(&late_first).await;

    // the long window: 35 messages in chunks, waiting for each multiple's running summary
    let mut sent = 0;
    let mut long_points = Vec::new();
    for chunk in [10, 10, 10, 5] {
        let ps = messages(&long, sent, chunk, now_ms());
        run.say(&ps).await;
        long_points.extend(ps);
        sent += chunk;
        if sent % EVERY == 0 {
            // every message but the latest (which context shows verbatim)
            let (count, _) = run.wait_running(&long, sent - 1).await;
            assert_eq!(count as usize, sent - 1);
        }
    }

    let (covered, covers_until) = run.wait_running(&late, EVERY).await;
    assert_eq!(
        covered, 11,
        "the running summary covers what was open but the latest message"
    );
    // stored before covers_until (at the time of the fourth message)
    let straggler = messages(&late, 99, 1, late_first[3].ts_ms);
    assert!(straggler[0].ts_ms < covers_until);
    run.say(&straggler).await;

    assert_eq!(run.wait_row(&short).await, 7);
    assert_eq!(run.wait_row(&long).await, 35);
    assert_eq!(run.wait_row(&late).await, 13);
    // the running summary is consumed when its window's final summary commits
    let t0 = Instant::now();
    while run.running_left(&long).await > 0 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        run.running_left(&long).await,
        0,
        "running summary left after close"
    );
    terminate(&mut child);

    let calls = calls(&llm).await;
    let stats = llm.stats().await;
    eprintln!("calls by purpose: {}", stats["calls_by_purpose"]);
    // below N: exactly one call, at close
    assert_eq!(of(&calls, &short, "running").len(), 0);
    assert_eq!(of(&calls, &short, "window").len(), 1);
    // n = 35, N = 10: at most floor(35 / 10) = 3 running calls plus one at close (here exactly: we waited for each)
    let long_running = of(&calls, &long, "running");
    assert!(
        (1..=35 / EVERY).contains(&long_running.len()),
        "{} running calls",
        long_running.len()
    );
    assert_eq!(of(&calls, &long, "window").len(), 1);
    // each running call after the first starts from the previous one and carries only the messages since
    for (i, p) in long_running.iter().enumerate().skip(1) {
        assert!(p.contains("Summary so far:"), "running call {i}: {p}");
        assert!(
            !p.contains(&format!("({long}-m0)")),
            "running call {i} resent m0"
        );
    }
    // the final summary starts from the running summary: the prompt holds it, and only the 6 messages it leaves out
    let close = of(&calls, &long, "window")[0];
    assert!(close.contains("Summary so far:"), "{close}");
    assert!(close.contains("covers the first 29 messages"), "{close}");
    for i in 0..29 {
        assert!(
            !close.contains(&format!("({long}-m{i})")),
            "m{i} sent again at close: {close}"
        );
    }
    for i in 29..35 {
        assert!(
            close.contains(&format!("({long}-m{i})")),
            "m{i} missing at close"
        );
    }
    // the late message stored before covers_until discarded the running summary: the close summarizes everything
    assert_eq!(of(&calls, &late, "running").len(), 1);
    let close = of(&calls, &late, "window");
    assert_eq!(close.len(), 1);
    assert!(!close[0].contains("Summary so far:"), "{}", close[0]);
    for i in (0..12).chain([99]) {
        assert!(close[0].contains(&format!("({late}-m{i})")), "m{i} missing");
    }
    // purposes reach the test server's counters
    assert_eq!(
        stats["calls_by_purpose"]["window"].as_u64(),
        Some(3),
        "{stats}"
    );
    assert!(stats["calls_by_purpose"]["running"].as_u64().unwrap_or(0) >= 2);
}
