//! The console's overview with 1,000,000 summary rows (issue 17: under 200 ms server time).
//!
//! A fresh database gets `BENCH_CONSOLE_ROWS` (1,000,000) rows in `conversation_summaries`, one every 31 s over the
//! last year (about 39,000 in the last 14 days, which the spend chart reads), each with its `recap_windows` row
//! (every 20th too short), plus 500 due windows (100 of them leased), 50 dead ones, 2,000 open messages, 40
//! checkpoints and 200 dead letters; then `VACUUM ANALYZE` (what autovacuum does to a table that size). Measured:
//! (a) `console::overview_html` itself (status snapshot + chart queries + rendering), `BENCH_CONSOLE_RUNS` (20) times after
//! two warm-up runs; (b) `GET /console` over HTTP on a loopback listener, its `Server-Timing` and the client's time;
//! (c) for context, what the overview avoids: an exact `count(*) ... GROUP BY state` over every window.
//!
//! Needs DATABASE_URL. `cargo bench --bench console`. Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`.

use std::time::Instant;

mod common;
use common::*;

const COLS: Columns = Columns {
    label: 34,
    value: 8,
    decimals: 1,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = env("DATABASE_URL");
    let rows = env_usize("BENCH_CONSOLE_ROWS", 1_000_000) as i64;
    let runs = env_usize("BENCH_CONSOLE_RUNS", 20).max(1);
    let (url, name) = fresh_db(&admin).await;
    let qdrant = std::env::var("QDRANT_URL").unwrap_or_else(|_| "http://127.0.0.1:6334".into());
    let cfg = config(
        &url,
        &qdrant,
        &["--http-addr", "127.0.0.1:0", "--llm-daily-budget-usd", "20"],
    );
    let store = store(&cfg).await;
    let pool = store.pool();

    let t0 = Instant::now();
    for sql in [
        // windows and their rows: one every 31 s back from now
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, revision, summary_id,
             closed_at, updated_at)
         SELECT 'bot' || (i % 5), 'user' || (i % 50000), now() - i * interval '31 seconds',
             now() - i * interval '31 seconds' + interval '20 minutes',
             CASE WHEN i % 20 = 0 THEN 'too_short' ELSE 'done' END, 8, 1, i, now() - i * interval '31 seconds',
             now() - i * interval '31 seconds'
         FROM generate_series(1, $1) i",
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp,
             message_count, key_topics, emotional_tone, summarizer, model, prompt_tokens, completion_tokens, cost_usd,
             coverage, created_at, updated_at)
         SELECT 'user' || (i % 50000), 'bot' || (i % 5), repeat('A summary of the conversation. ', 8),
             (now() AT TIME ZONE 'UTC') - i * interval '31 seconds',
             (now() AT TIME ZONE 'UTC') - i * interval '31 seconds' + interval '20 minutes', 8,
             ARRAY['guitar', 'hiking'], 'joy', 'llm', 'model', 900, 120, 0.0045, 'c',
             (now() AT TIME ZONE 'UTC') - i * interval '31 seconds', (now() AT TIME ZONE 'UTC') - i * interval '31 seconds'
         FROM generate_series(1, $1) i",
    ] {
        sqlx::query(sql).bind(rows).execute(pool).await.expect("seed");
    }
    for sql in [
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, lease_owner, lease_until)
         SELECT 'bot1', 'due' || i, now() - interval '1 hour', now() - interval '50 minutes', 'due', 9,
             CASE WHEN i <= 100 THEN 'worker-' || (i % 3) END,
             CASE WHEN i <= 100 THEN now() + interval '10 minutes' END
         FROM generate_series(1, 500) i",
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, attempts, last_error)
         SELECT 'bot2', 'dead' || i, now() - interval '2 hours', now() - interval '100 minutes', 'dead', 9, 5, 'boom'
         FROM generate_series(1, 50) i",
        // 2,000 open messages of 300 keys (checkpointed state: one row per key, its points in time order)
        "INSERT INTO recap_open_windows (bot_name, user_id, point_ids, point_ts)
         SELECT 'bot' || (i % 5), 'open' || (i % 300), array_agg('p' || i ORDER BY i DESC),
             array_agg(now() - i * interval '1 second' ORDER BY i DESC)
         FROM generate_series(1, 2000) i GROUP BY 1, 2",
        "INSERT INTO recap_checkpoints (name, position, points_read)
         SELECT 'sweep:whisperengine_memory_bot' || i, 1.7e9, 1000 * i FROM generate_series(1, 40) i",
        "INSERT INTO recap_dead_letters (source, subject, stream_seq, raw, reason)
         SELECT 'nats', 'recap.stored.bot', i, convert_to(repeat('x', 300), 'UTF8'), 'not JSON'
         FROM generate_series(1, 200) i",
        "INSERT INTO recap_watermarks (bot_name, watermark) SELECT 'bot' || i, now() FROM generate_series(0, 4) i",
        "INSERT INTO recap_leader (id, owner, epoch, lease_until) VALUES (1, 'worker-0', 3, now() + interval '1 hour')",
        "VACUUM ANALYZE recap_windows",
        "VACUUM ANALYZE conversation_summaries",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .expect("seed");
    }
    println!(
        "console: seeded {rows} summary rows and windows in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let points = recap::cmd::points(&cfg).expect("points");
    let console = recap::console::Console::new(
        std::sync::Arc::new(cfg.clone()),
        store.clone(),
        points,
        None,
    );

    // (a) the handler's work
    let mut direct = Vec::new();
    for i in 0..runs + 2 {
        let t = Instant::now();
        let html = recap::console::overview_html(&console, None)
            .await
            .expect("overview");
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert!(html.contains("≈"), "done is estimated at this size");
        if i >= 2 {
            direct.push(ms);
        }
    }

    // (b) over HTTP
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = recap::console::router(console.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    let (mut server, mut total) = (Vec::new(), Vec::new());
    for i in 0..runs + 2 {
        let t = Instant::now();
        let r = client
            .get(format!("http://127.0.0.1:{port}/console"))
            .send()
            .await
            .expect("GET /console");
        assert_eq!(r.status(), 200);
        let st: f64 = r
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("app;dur="))
            .and_then(|v| v.parse().ok())
            .expect("Server-Timing");
        let _ = r.text().await;
        if i >= 2 {
            server.push(st);
            total.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // (c) what it avoids
    let mut full = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let _: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM recap_windows GROUP BY state")
                .fetch_all(pool)
                .await
                .unwrap();
        full.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    println!("console overview, {rows} summary rows, {runs} runs:");
    let median = |v: &Vec<f64>| {
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let (d, s, t, f) = (
        median(&direct),
        median(&server),
        median(&total),
        median(&full),
    );
    summary(&COLS, "(a) overview_html", "ms", direct);
    summary(&COLS, "(b) GET /console, Server-Timing", "ms", server);
    summary(&COLS, "(b) GET /console, client", "ms", total);
    summary(&COLS, "(c) exact count(*) by state", "ms", full);
    emit("console_overview_ms", d, "ms");
    emit("console_overview_server_timing_ms", s, "ms");
    emit("console_overview_http_ms", t, "ms");
    emit("console_exact_state_count_ms", f, "ms");
    println!(
        "console overview median {s:.1} ms server time (target < 200 ms): {}",
        if s < 200.0 { "PASS" } else { "FAIL" }
    );
    drop(store);
    drop_db(&admin, &name).await;
}
