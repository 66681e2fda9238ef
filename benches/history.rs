//! Window throughput over a history (issue 18, "Window throughput"): a history of 36,000 WhisperEngine-shaped points
//! (3 bots x 200 users x 5 sessions x 12 messages = 3,000 windows) and `recap run` in sweep-only mode (no NATS_URL)
//! with the extractive summarizer; timed from the process' start to the last `conversation_summaries` row.
//! Target: under 4 s on real Qdrant (was 6.1 s before window batching; the old Python worker 39.9 s).
//!
//! Per run (not timed): 3 fresh collections `whisperengine_memory_<tag>_<bot>_7d` (the 384-d `content` vector;
//! `user_id` and `memory_type` keyword indexes, a float index on `timestamp_unix`, as the bots' collections have),
//! loaded with the history: per user and bot 5 sessions 12 hours apart within the last 3 days, a session = 12 messages
//! alternating user/assistant 20-60 s apart (one window each: the idle gap is 30 min); and a fresh migrated database.
//! Then Qdrant's optimizers are waited for (status green), as a history stored long ago is indexed.
//! Timed: the real binary (`recap run`, built with the bench) with COLLECTION_PATTERNS naming only this run's
//! collections, LOOKBACK_DAYS 7 (the first sweep starts at once), SUMMARIZER extractive; the bench polls the row count
//! every 20 ms. Then it asserts every window has its row (`time_window`, 12 messages, no placeholder text).
//!
//! Where the time goes: CPU seconds over the timed span of recap (`/proc/<pid>/stat` utime+stime before it is
//! stopped), of the Qdrant test server (its process tree) and of PostgreSQL (the postmaster's tree: live backends plus
//! the reaped ones' time in the postmaster's cutime/cstime), the pids from `$RECAP_SERVICES_DIR/*.pid`
//! (`scripts/services`). The PostgreSQL figure includes the bench's own 20 ms count query. The same CPU figures are
//! also taken at the first row, splitting the span into the sweep (reading the history, closing windows) and the
//! window workers after it (the two overlap a little), and the test server's CPU / wall says how busy it was.
//!
//! LLM mode (`BENCH_HISTORY_SUMMARIZER=llm`, issue 25): the same history with SUMMARIZER llm against the LLM test
//! server of `scripts/services` (`LLM_BASE_URL`; it answers in about 1 ms), `LLM_CONCURRENCY` 8, no request rate limit
//! and a daily budget far above the run's spend (so every call goes through the shared budget's reservation, as in
//! production). Before each run the server's counters are reset; after it, `/stats` gives the LLM calls per window
//! (`calls_by_purpose.window` / windows), which must be 1.00. Its figures are `history_llm_*`.
//!
//! Needs DATABASE_URL, QDRANT_URL and RECAP_SERVICES_DIR (`eval "$(scripts/services up)"`; QDRANT_URL may be a real
//! Qdrant, then its CPU is not reported). `cargo bench --bench history`. Environment: `BENCH_HISTORY_USERS` (200),
//! `BENCH_HISTORY_BOTS` (3), `BENCH_HISTORY_SESSIONS` (5), `BENCH_HISTORY_MESSAGES` (12), `BENCH_RUNS` (3),
//! `BENCH_HISTORY_SUMMARIZER` (`extractive`, or `llm`: needs LLM_BASE_URL), `RECAP_QDRANT_KIND` (printed: `real` or
//! `test`, as `scripts/services` says), `BENCH_RECAP_LOG` (recap's `RUST_LOG`, default `warn`; its log
//! `$TMPDIR/recap-bench-history-<tag>.log` is kept then), `BENCH_RECAP_ENV` (more settings for
//! recap, `K=V` separated by spaces), `BENCH_RECAP_BIN` (another `recap` binary to time, e.g. a baseline build run
//! alternately with this one; default the one built with the bench).
//! Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qdrant_client::qdrant::{FieldType, PointStruct};
use recap::pipeline::now_ms;
use sqlx::postgres::PgPoolOptions;

mod common;
use common::cpu::{clk_tck, proc_stat, service_pid, tree_ticks};
use common::{
    BOTS, Columns, MIN, Rng, TOPICS, create_collection, drop_db, embed, emit, env, env_usize,
    fresh_db, summary, token, upsert, we_point,
};

const SUMMARY: Columns = Columns {
    label: 40,
    value: 8,
    decimals: 2,
};

const BOT_TEXTS: &[&str] = &[
    "That sounds wonderful, tell me more about how it is going",
    "What a lovely plan, which trail are you thinking of taking",
    "It is normal to feel nervous at the start, you will do great",
    "Pepper is a perfect name, how is the kitten settling in",
    "The reefs are fascinating, did you know corals are animals",
    "Good to hear about your knee, keep the long runs easy",
];
const EMOTIONS: &[&str] = &["joy", "neutral", "excitement", "anxiety", "gratitude"];

struct Shape {
    users: usize,
    bots: usize,
    sessions: usize,
    messages: usize,
}

impl Shape {
    fn windows(&self) -> usize {
        self.bots * self.users * self.sessions
    }
    fn points(&self) -> usize {
        self.windows() * self.messages
    }
}

/// One bot's history: per user `sessions` sessions 12 hours apart within the last 3 days (all closed), each of
/// `messages` messages alternating user/assistant 20-60 s apart.
fn history(bot_ix: usize, shape: &Shape, now: i64, seed: u64) -> Vec<PointStruct> {
    let mut rng = Rng(seed | 1);
    let base = now - 3 * 24 * 60 * MIN;
    let mut out = Vec::with_capacity(shape.users * shape.sessions * shape.messages);
    for u in 0..shape.users {
        let user = format!("{}", 400_000_000_000_000_000u64 + u as u64 * 1_000_003);
        for s in 0..shape.sessions {
            let mut t = base
                + s as i64 * 12 * 60 * MIN
                + (u % 97) as i64 * 5 * MIN
                + bot_ix as i64 * 3 * MIN;
            for m in 0..shape.messages {
                let k = (u + s + m / 2) % TOPICS.len();
                let (role, text) = if m % 2 == 0 {
                    ("user", format!("{} ({user} #{s}.{m})", TOPICS[k]))
                } else {
                    ("assistant", format!("{} (#{s}.{m})", BOT_TEXTS[k]))
                };
                let v = embed(&text, seed);
                out.push(we_point(
                    rng.uuid(),
                    &user,
                    role,
                    &text,
                    t,
                    EMOTIONS[(u + m) % EMOTIONS.len()],
                    v,
                ));
                t += 20_000 + rng.below(40_001) as i64;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------

/// The LLM test server of `scripts/services` (LLM mode).
struct LlmServer {
    /// The API base (`LLM_BASE_URL`, `.../v1`).
    base: String,
    /// The server root (`/stats`, `/control/reset`).
    root: String,
    http: reqwest::Client,
}

impl LlmServer {
    fn from_env() -> LlmServer {
        let base = env("LLM_BASE_URL").trim_end_matches('/').to_string();
        let root = base.trim_end_matches("/v1").to_string();
        LlmServer {
            base,
            root,
            http: reqwest::Client::new(),
        }
    }

    async fn reset(&self) {
        let r = self
            .http
            .post(format!("{}/control/reset", self.root))
            .send()
            .await
            .expect("reset the LLM test server");
        assert!(
            r.status().is_success(),
            "LLM test server reset: {}",
            r.status()
        );
    }

    /// The window calls the server counted (`calls_by_purpose.window`), once none is in flight.
    async fn window_calls(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .http
                .get(format!("{}/stats", self.root))
                .send()
                .await
                .expect("LLM test server /stats");
            let v: serde_json::Value =
                serde_json::from_slice(&r.bytes().await.expect("/stats body"))
                    .expect("/stats JSON");
            if v["in_flight"].as_u64() == Some(0) || Instant::now() > deadline {
                return v["calls_by_purpose"]["window"].as_u64().unwrap_or(0);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct Recap(Child);

impl Drop for Recap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct RunResult {
    /// LLM mode: the window calls the LLM test server counted
    window_calls: Option<u64>,
    seconds: f64,
    first_row: f64,
    recap_cpu: f64,
    /// recap, Qdrant and PostgreSQL CPU seconds up to the first row
    first_cpu: [Option<f64>; 3],
    qdrant_cpu: Option<f64>,
    postgres_cpu: Option<f64>,
    /// The LLM test server's CPU seconds over the timed span (LLM mode; its pid from `scripts/services`).
    llm_cpu: Option<f64>,
}

async fn run(
    admin: &str,
    qdrant_url: &str,
    shape: &Shape,
    r: usize,
    q: &std::sync::Arc<qdrant_client::Qdrant>,
    llm: Option<&LlmServer>,
) -> RunResult {
    // ---- setup (not timed)
    let tag = format!("hb{}", token());
    let bots: Vec<&str> = BOTS.iter().cycle().take(shape.bots).copied().collect();
    let now = now_ms();
    let t = Instant::now();
    let indexes = [
        ("user_id", FieldType::Keyword),
        ("memory_type", FieldType::Keyword),
        ("timestamp_unix", FieldType::Float),
    ];
    let mut colls = Vec::new();
    for (i, bot) in bots.iter().enumerate() {
        // unique per run (a repeated name in BOTS gets its index)
        let name = if bots[..i].contains(bot) {
            format!("{bot}{i}")
        } else {
            bot.to_string()
        };
        let coll = format!("whisperengine_memory_{tag}_{name}_7d");
        create_collection(q, &coll, 384, &indexes).await;
        let pts = history(i, shape, now, 0x5eed + (r * 16 + i) as u64);
        upsert(q, &coll, pts, 500).await;
        colls.push(coll);
    }
    let loaded = t.elapsed().as_secs_f64();
    // A bot's history has been indexed long ago: Qdrant's optimizers (the vector index of what was just loaded) must
    // not run beside the timed span, where their CPU would count as serving recap's requests.
    let mut optimizing = 0.0;
    for c in &colls {
        optimizing += common::wait_green(q, c, Duration::from_secs(600)).await;
    }
    eprintln!(
        "  run {r}: loaded {} points into {} collections in {loaded:.1}s, Qdrant's optimizers done {optimizing:.1}s later",
        shape.points(),
        colls.len(),
    );
    let (db_url, db_name) = fresh_db(admin).await;
    let cfg = common::config(&db_url, qdrant_url, &[]);
    common::store(&cfg).await.pool().close().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db_url)
        .await
        .expect("connect");

    // ---- timed: `recap run`, sweep-only, until the last row
    let log = std::env::temp_dir().join(format!("recap-bench-history-{tag}.log"));
    // BENCH_RECAP_LOG: recap's RUST_LOG (a timeline in the log file named above; default warn)
    let rust_log = std::env::var("BENCH_RECAP_LOG").unwrap_or_else(|_| "warn".into());
    let mut envs = vec![
        ("DATABASE_URL", db_url.as_str()),
        ("QDRANT_URL", qdrant_url),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("SUMMARIZER", "extractive"),
        ("INSTANCE_ID", "bench-history"),
        ("LOOKBACK_DAYS", "7"),
        ("RUST_LOG", rust_log.as_str()),
    ];
    if let Some(llm) = llm {
        llm.reset().await;
        envs[3].1 = "llm";
        envs.extend([
            ("LLM_BASE_URL", llm.base.as_str()),
            ("LLM_API_KEY", "bench-history-key"),
            ("LLM_CONCURRENCY", "8"),
            ("LLM_REQUESTS_PER_SECOND", "100000"),
            ("LLM_DAILY_BUDGET_USD", "100000"),
        ]);
    }
    // BENCH_RECAP_ENV: more settings for recap, `K=V` separated by spaces (experiments; none by default)
    let extra = std::env::var("BENCH_RECAP_ENV").unwrap_or_default();
    envs.extend(extra.split_whitespace().filter_map(|kv| kv.split_once('=')));
    let pattern = format!("whisperengine_memory_{tag}_*");
    let (qdrant_pid, pg_pid) = (service_pid("qdrant"), service_pid("postgres"));
    let (q0, p0) = (qdrant_pid.map(tree_ticks), pg_pid.map(tree_ticks));
    let llm_pid = llm.and_then(|_| service_pid("llm"));
    let l0 = llm_pid.map(tree_ticks);
    let out = std::fs::File::create(&log).expect("log file");
    let t = Instant::now();
    // BENCH_RECAP_BIN: another recap binary (e.g. a baseline build, run alternately with this one)
    let bin =
        std::env::var("BENCH_RECAP_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_recap").into());
    let child = Command::new(bin)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs)
        .env("COLLECTION_PATTERNS", &pattern)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("spawn recap");
    let mut recap = Recap(child);
    let pid = recap.0.id();
    let expected = shape.windows() as i64;
    let mut first_row = None;
    let mut first_cpu = [None; 3];
    let (seconds, recap_ticks) = loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_summaries WHERE summary_type = 'time_window'",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        if n > 0 && first_row.is_none() {
            first_row = Some(t.elapsed().as_secs_f64());
            // CPU up to the first row: mostly the sweep (reading the history, closing the windows)
            first_cpu = [
                proc_stat(pid).map(|s| s.1),
                qdrant_pid.map(tree_ticks),
                pg_pid.map(tree_ticks),
            ];
        }
        if n >= expected {
            let secs = t.elapsed().as_secs_f64();
            break (secs, proc_stat(pid).map(|s| s.1).unwrap_or(0));
        }
        if let Ok(Some(st)) = recap.0.try_wait() {
            panic!(
                "recap exited ({st}) with {n}/{expected} rows; log {}",
                log.display()
            );
        }
        if t.elapsed() > Duration::from_secs(600) {
            panic!("{n}/{expected} rows after 600 s; log {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (q1, p1) = (qdrant_pid.map(tree_ticks), pg_pid.map(tree_ticks));
    let l1 = llm_pid.map(tree_ticks);
    drop(recap);
    let window_calls = match llm {
        Some(llm) => Some(llm.window_calls().await),
        None => None,
    };
    let tck = clk_tck();

    // ---- checks (not timed)
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT summary_text, message_count FROM conversation_summaries WHERE summary_type = 'time_window'",
    )
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(rows.len() as i64, expected, "one row per window");
    let placeholders = rows
        .iter()
        .filter(|(text, _)| recap::summarize::looks_like_placeholder(text))
        .count();
    assert_eq!(placeholders, 0, "no placeholder rows");
    let wrong = rows
        .iter()
        .filter(|(_, c)| *c as usize != shape.messages)
        .count();
    assert_eq!(
        wrong, 0,
        "every window holds its session's {} messages",
        shape.messages
    );
    pool.close().await;
    drop_db(admin, &db_name).await;
    for c in &colls {
        let _ = q.delete_collection(c).await;
    }
    if std::env::var_os("BENCH_RECAP_LOG").is_none() {
        let _ = std::fs::remove_file(&log);
    }
    RunResult {
        window_calls,
        seconds,
        first_row: first_row.unwrap_or(seconds),
        recap_cpu: recap_ticks as f64 / tck,
        first_cpu: [
            first_cpu[0].map(|v| v as f64 / tck),
            first_cpu[1]
                .zip(q0)
                .map(|(b, a)| b.saturating_sub(a) as f64 / tck),
            first_cpu[2]
                .zip(p0)
                .map(|(b, a)| b.saturating_sub(a) as f64 / tck),
        ],
        qdrant_cpu: q0.zip(q1).map(|(a, b)| b.saturating_sub(a) as f64 / tck),
        postgres_cpu: p0.zip(p1).map(|(a, b)| b.saturating_sub(a) as f64 / tck),
        llm_cpu: l0.zip(l1).map(|(a, b)| b.saturating_sub(a) as f64 / tck),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = env("DATABASE_URL");
    let qdrant_url = env("QDRANT_URL");
    let shape = Shape {
        users: env_usize("BENCH_HISTORY_USERS", 200).max(1),
        bots: env_usize("BENCH_HISTORY_BOTS", 3).max(1),
        sessions: env_usize("BENCH_HISTORY_SESSIONS", 5).max(1),
        messages: env_usize("BENCH_HISTORY_MESSAGES", 12).max(5),
    };
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let llm = match std::env::var("BENCH_HISTORY_SUMMARIZER").as_deref() {
        Ok("llm") => Some(LlmServer::from_env()),
        Ok("extractive") | Ok("") | Err(_) => None,
        Ok(other) => panic!("BENCH_HISTORY_SUMMARIZER={other}: use extractive or llm"),
    };
    let (mode, prefix) = match llm {
        Some(_) => ("LLM (test server, LLM_CONCURRENCY 8)", "history_llm"),
        None => ("extractive", "history"),
    };
    let qdrant_kind = std::env::var("RECAP_QDRANT_KIND").unwrap_or_else(|_| "unknown".into());
    let metric = |m: &str| format!("{prefix}_{m}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "history benchmark: {} points ({} bots x {} users x {} sessions x {} messages), {} windows, `recap run` sweep-only, {mode}, {runs} runs, {cores} cores, Qdrant: {qdrant_kind}",
        shape.points(),
        shape.bots,
        shape.users,
        shape.sessions,
        shape.messages,
        shape.windows()
    );
    let q = common::qdrant(&qdrant_url, Duration::from_secs(300));
    let mut agg: Vec<(&str, &str, Vec<f64>)> = vec![
        ("seconds to the last row", "s", vec![]),
        ("seconds to the first row", "s", vec![]),
        ("windows/s", "windows/s", vec![]),
        ("recap CPU", "s", vec![]),
        ("Qdrant test server CPU", "s", vec![]),
        ("PostgreSQL CPU", "s", vec![]),
        ("idle (cores x wall - CPU above)", "s", vec![]),
        ("Qdrant test server CPU / wall", "x", vec![]),
    ];
    for r in 0..runs {
        let res = run(&admin, &qdrant_url, &shape, r, &q, llm.as_ref()).await;
        let wps = shape.windows() as f64 / res.seconds;
        let (qc, pc) = (
            res.qdrant_cpu.unwrap_or(0.0),
            res.postgres_cpu.unwrap_or(0.0),
        );
        let idle = cores as f64 * res.seconds - res.recap_cpu - qc - pc;
        let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2} s"));
        eprintln!(
            "  run {r}: last row after {:.2} s (first {:.2} s), {wps:.0} windows/s; CPU recap {:.2} s, Qdrant test server {}, PostgreSQL {} (wall x {cores} cores = {:.2} s)",
            res.seconds,
            res.first_row,
            res.recap_cpu,
            opt(res.qdrant_cpu),
            opt(res.postgres_cpu),
            res.seconds * cores as f64
        );
        emit(&metric("seconds"), res.seconds, "s");
        emit(&metric("first_row_seconds"), res.first_row, "s");
        emit(&metric("windows_per_sec"), wps, "windows/s");
        let [fr, fq, fp] = res.first_cpu;
        eprintln!(
            "  run {r}: CPU up to the first row (the sweep): recap {}, Qdrant test server {}, PostgreSQL {}; after it (the windows): recap {}, Qdrant test server {}, PostgreSQL {}",
            opt(fr),
            opt(fq),
            opt(fp),
            opt(fr.map(|v| res.recap_cpu - v)),
            opt(fq.zip(res.qdrant_cpu).map(|(a, b)| b - a)),
            opt(fp.zip(res.postgres_cpu).map(|(a, b)| b - a)),
        );
        emit(&metric("recap_cpu_s"), res.recap_cpu, "s");
        if let Some(calls) = res.window_calls {
            let per_window = calls as f64 / shape.windows() as f64;
            eprintln!(
                "  run {r}: {calls} window calls at the LLM test server for {} windows: {per_window:.2} per window",
                shape.windows()
            );
            emit(&metric("calls_per_window"), per_window, "calls");
            if let Some(v) = res.llm_cpu {
                eprintln!(
                    "  run {r}: CPU of the LLM test server {v:.2} s ({:.2} of one core over the span)",
                    v / res.seconds
                );
                emit(&metric("llm_server_cpu_s"), v, "s");
            }
            assert_eq!(
                calls,
                shape.windows() as u64,
                "one LLM call per window (counted at the LLM test server)"
            );
        }
        agg[0].2.push(res.seconds);
        agg[1].2.push(res.first_row);
        agg[2].2.push(wps);
        agg[3].2.push(res.recap_cpu);
        if let Some(v) = res.qdrant_cpu {
            emit(&metric("qdrant_cpu_s"), v, "s");
            emit(&metric("qdrant_busy_share"), v / res.seconds, "x");
            agg[4].2.push(v);
            agg[7].2.push(v / res.seconds);
        }
        if let Some(v) = res.postgres_cpu {
            emit(&metric("postgres_cpu_s"), v, "s");
            agg[5].2.push(v);
        }
        agg[6].2.push(idle);
    }
    for (m, u, v) in agg {
        if !v.is_empty() {
            summary(&SUMMARY, m, u, v);
        }
    }
}
