//! Pipeline overhead (issue 9, part 4; batched in issue 18): per window, the time from its claim to its summary row
//! committed (`pipeline::process_windows`: the batch's point ids from Postgres, collection lookup, one Qdrant retrieve
//! by id + one union-filter user/time scroll, summarize, the batch's finish transaction, the summary vectors), p50/p99
//! over many windows, and windows/s, with
//!   * the extractive summarizer (all of it is recap's work), and
//!   * the LLM summarizer against the LLM test server answering at once (`testsupport/llm_server.py`, latency 0);
//!     the LLM's own latency (recap's `usage.latency_ms` of the window's calls) is subtracted per window.
//!
//! Target: p99 < 50 ms beyond the LLM's own latency; >= 1,000 windows/s with the extractive summarizer.
//!
//! Setup (not timed): one collection of WhisperEngine-shaped points (payload + the 384-d `content` vector that fetch
//! reads; the `emotion`/`semantic` vectors are left out to keep loading fast), 6 messages + 3 `conversation_pair`
//! points per window; per run and summarizer a fresh migrated database where recap's own ingest transaction
//! (`IngestTx::insert_messages` + `close_window`) stores the windows as due. Then windows are claimed and processed
//! as the workers do (`pipeline::batch_shape`): extractive, batches of ENRICHMENT_BATCH_SIZE (50), three batches in
//! flight; LLM, batches of LLM_CONCURRENCY (4), one at a time. A window's time is its batch's, from the claim to the
//! commit (the claim query's time is also reported on its own).
//!
//! Needs DATABASE_URL and QDRANT_URL; starts its own LLM test server. `cargo bench --bench pipeline`.
//! Environment: `BENCH_WINDOWS` (default 10,000), `BENCH_RUNS` (default 3), `BENCH_CONCURRENCY` (default 4).
//! Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`.
#![allow(clippy::type_complexity)]

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{FieldType, PointStruct};
use recap::pipeline::{batch_shape, process_windows};
use recap::sink::{Finished, NewMessage, Store};
use recap::summarize::{SummarizeError, Summarizer, SummarizerKind, Summary, WindowInput};
use recap::tracker::ClosedWindow;

mod common;
use common::{
    Columns, MIN, TOPICS, create_collection, drop_db, embed, emit, env, env_usize, fresh_db,
    summary, token, upsert, we_point,
};

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

const SUMMARY: Columns = Columns {
    label: 40,
    value: 9,
    decimals: 2,
};

// ---------------------------------------------------------------------------------------------------------------
// Data

const T0: i64 = 1_763_640_000_000; // 2025-11-20T12:00:00Z: in the past

const EMOTIONS: &[&str] = &[
    "joy",
    "neutral",
    "excitement",
    "anxiety",
    "neutral",
    "gratitude",
];

struct P {
    id: String,
    user: String,
    role: &'static str,
    text: String,
    ts: i64,
    emotion: &'static str,
}

impl P {
    fn point(&self) -> PointStruct {
        we_point(
            self.id.clone(),
            &self.user,
            self.role,
            &self.text,
            self.ts,
            self.emotion,
            embed(&self.text, 1),
        )
    }
}

/// One window: its user, time range and message points (the pair point is in `points` only).
struct Win {
    user: String,
    start: i64,
    end: i64,
    messages: Vec<NewMessage>,
}

/// `n` windows: n/5 users with 5 sessions each, 3 hours apart; a session = 3 exchanges 2 minutes apart (user message,
/// bot reply 1 ms later, and a conversation_pair point).
fn data(bot: &str, n: usize) -> (Vec<P>, Vec<Win>) {
    let mut points = Vec::with_capacity(n * 7);
    let mut wins = Vec::with_capacity(n);
    for w in 0..n {
        let (u, s) = (w / 5, w % 5);
        let user = format!("{}", 300_000_000_000_000_000u64 + u as u64 * 1_000_003);
        let start = T0 + (u % 97) as i64 * 7 * MIN + s as i64 * 180 * MIN;
        let mut msgs = Vec::new();
        for i in 0..3usize {
            let t = start + i as i64 * 2 * MIN;
            let k = (u + s + i) % TOPICS.len();
            let text = format!("{} ({user} #{s}.{i})", TOPICS[k]);
            let reply = format!(
                "That sounds wonderful, tell me more about {}",
                &TOPICS[k][..30]
            );
            for (role, text, ts) in [
                ("user", text.clone(), t),
                ("assistant", reply.clone(), t + 1),
                ("conversation_pair", format!("{text} || {reply}"), t),
            ] {
                let p = P {
                    id: uuid::Uuid::new_v4().to_string(),
                    user: user.clone(),
                    role,
                    text,
                    ts,
                    emotion: EMOTIONS[k],
                };
                if role != "conversation_pair" {
                    msgs.push(NewMessage {
                        bot: bot.to_string(),
                        user_id: user.clone(),
                        point_id: p.id.clone(),
                        ts_ms: ts,
                    });
                }
                points.push(p);
            }
        }
        wins.push(Win {
            user,
            start,
            end: start + 4 * MIN + 1,
            messages: msgs,
        });
    }
    (points, wins)
}

async fn load_points(q: &Arc<Qdrant>, coll: &str, points: &[P]) {
    let indexes = [
        ("user_id", FieldType::Keyword),
        ("memory_type", FieldType::Keyword),
        ("timestamp_unix", FieldType::Float),
    ];
    create_collection(q, coll, 384, &indexes).await;
    upsert(q, coll, points.iter().map(P::point).collect(), 500).await;
}

// ---------------------------------------------------------------------------------------------------------------
// A summarizer wrapper that records, per window, how long the summarizer took and the LLM latency it reported.

#[derive(Default)]
struct Timings(Mutex<HashMap<(String, i64), (Duration, u64)>>);

struct Timed {
    inner: Arc<dyn Summarizer>,
    timings: Arc<Timings>,
}

impl Summarizer for Timed {
    fn kind(&self) -> SummarizerKind {
        self.inner.kind()
    }
    fn summarize<'a>(
        &'a self,
        w: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.summarize(w).await;
            let llm = r
                .as_ref()
                .ok()
                .and_then(|s| s.usage.as_ref())
                .map(|u| u.latency_ms)
                .unwrap_or(0);
            self.timings
                .0
                .lock()
                .unwrap()
                .insert((w.user_id.clone(), w.start_ms), (t.elapsed(), llm));
            r
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------

struct LlmServer(Child, String);

impl LlmServer {
    fn start() -> LlmServer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/testsupport/llm_server.py");
        let mut child = Command::new("python3")
            .args([script, "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the LLM test server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("READY line");
        let port = line
            .trim()
            .strip_prefix("READY port=")
            .expect("READY port=N")
            .to_string();
        LlmServer(child, format!("http://127.0.0.1:{port}/v1"))
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stores the windows as recap's ingest would: messages and the closed window in one transaction (200 windows each).
async fn prepare(store: &Store, cfg: &recap::config::Config, bot: &str, wins: &[Win]) {
    let fence = store
        .try_acquire_leader("bench-prepare", Duration::from_secs(600))
        .await
        .expect("leader")
        .expect("lease free");
    let tcfg = cfg.tracker_config();
    let botarc: Arc<str> = Arc::from(bot);
    for chunk in wins.chunks(200) {
        let mut tx = store.begin_ingest(&fence).await.expect("begin");
        for w in chunk {
            let cw = recap::state::Closed {
                window: ClosedWindow {
                    bot: botarc.clone(),
                    user: Arc::from(w.user.as_str()),
                    start_ms: w.start,
                    end_ms: w.end,
                    count: w.messages.len() as u32,
                },
                points: w
                    .messages
                    .iter()
                    .map(|m| (m.ts_ms, m.point_id.clone()))
                    .collect(),
                clamped: false,
            };
            tx.close_window(&tcfg, &cw, cfg.windows.min_messages_for_summary)
                .await
                .expect("close");
        }
        tx.commit().await.expect("commit");
    }
    store.release_leader(&fence).await.expect("release");
}

struct RunResult {
    total_ms: Vec<f64>,
    overhead_ms: Vec<f64>,
    llm_ms: Vec<f64>,
    claim_ms: Vec<f64>,
    windows_per_sec: f64,
}

async fn run_mode(
    admin: &str,
    qdrant: &str,
    llm: Option<&str>,
    bot: &str,
    wins: &[Win],
    concurrency: usize,
) -> RunResult {
    let (db_url, db_name) = fresh_db(admin).await;
    let llm_concurrency = concurrency.to_string();
    let mut args = vec![
        "--instance-id",
        "bench-pipeline",
        "--llm-concurrency",
        &llm_concurrency,
        "--db-max-connections",
        "10",
    ];
    match llm {
        Some(base) => args.extend([
            "--summarizer",
            "llm",
            "--llm-base-url",
            base,
            "--llm-api-key",
            "bench-key",
            "--llm-requests-per-second",
            "100000",
            "--llm-model",
            "recap-test-model",
        ]),
        None => args.extend(["--summarizer", "extractive"]),
    }
    let cfg = common::config(&db_url, qdrant, &args);
    cfg.validate().expect("config");
    let store = common::store(&cfg).await;
    let t = Instant::now();
    prepare(&store, &cfg, bot, wins).await;
    eprintln!(
        "    {} windows stored as due in {:.1}s",
        wins.len(),
        t.elapsed().as_secs_f64()
    );
    let timings = Arc::new(Timings::default());
    let inner = recap::cmd::summarizer(&cfg, None)
        .await
        .expect("summarizer");
    assert_eq!(
        inner.kind(),
        if llm.is_some() {
            SummarizerKind::Llm
        } else {
            SummarizerKind::Extractive
        }
    );
    let ctx = common::context(
        &cfg,
        &store,
        recap::cmd::points(&cfg).expect("points"),
        Arc::new(Timed {
            inner,
            timings: timings.clone(),
        }),
    );
    let lease = Duration::from_secs(cfg.service.lease_seconds.into());
    let (limit, in_flight) = batch_shape(&ctx);
    let per_window: Arc<Mutex<Vec<(String, i64, Duration, Finished)>>> = Arc::default();
    let claim_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let t = Instant::now();
    // As `drain_due`: `in_flight` lanes, each claiming a batch and processing it as one (`process_windows`); a
    // window's time is its batch's, from the claim to the commit.
    let lane = || async {
        loop {
            let c0 = Instant::now();
            let claimed = ctx
                .store
                .claim_due(&ctx.instance, lease, limit as i64)
                .await
                .expect("claim");
            if claimed.is_empty() {
                break;
            }
            claim_ms
                .lock()
                .unwrap()
                .push(c0.elapsed().as_secs_f64() * 1000.0 / claimed.len() as f64);
            let keys: HashMap<i64, (String, i64)> = claimed
                .iter()
                .map(|w| (w.id, (w.user_id.clone(), w.start_ms)))
                .collect();
            let done = process_windows(&ctx, claimed, &|_| {})
                .await
                .expect("process");
            let d = c0.elapsed();
            let mut pw = per_window.lock().unwrap();
            for (id, f) in done {
                let (user, start) = keys[&id].clone();
                pw.push((user, start, d, f));
            }
        }
    };
    futures::future::join_all((0..in_flight).map(|_| lane())).await;
    let mut claim_ms = std::mem::take(&mut *claim_ms.lock().unwrap());
    let wall = t.elapsed().as_secs_f64();
    let per_window = std::mem::take(&mut *per_window.lock().unwrap());
    let timings = std::mem::take(&mut *timings.0.lock().unwrap());
    let done = per_window.iter().filter(|w| w.3 == Finished::Done).count();
    assert_eq!(
        done,
        wins.len(),
        "every window summarized: {:?}",
        per_window
            .iter()
            .filter(|w| w.3 != Finished::Done)
            .take(3)
            .map(|w| w.3)
            .collect::<Vec<_>>()
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_summaries")
        .fetch_one(store.pool())
        .await
        .expect("rows");
    assert_eq!(rows as usize, wins.len(), "one row per window");
    let (mut total_ms, mut overhead_ms, mut llm_ms) = (vec![], vec![], vec![]);
    for (user, start, d, _) in &per_window {
        let (_summ, llm_lat) = timings
            .get(&(user.clone(), *start))
            .copied()
            .unwrap_or_default();
        let total = d.as_secs_f64() * 1000.0;
        total_ms.push(total);
        llm_ms.push(llm_lat as f64);
        overhead_ms.push(total - llm_lat as f64);
    }
    for v in [&mut total_ms, &mut overhead_ms, &mut llm_ms, &mut claim_ms] {
        v.sort_by(f64::total_cmp);
    }
    store.pool().close().await;
    drop_db(admin, &db_name).await;
    RunResult {
        total_ms,
        overhead_ms,
        llm_ms,
        claim_ms,
        windows_per_sec: wins.len() as f64 / wall,
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = env("DATABASE_URL");
    let qdrant_url = env("QDRANT_URL");
    let n = env_usize("BENCH_WINDOWS", 10_000);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let concurrency = env_usize("BENCH_CONCURRENCY", 4).max(1);
    println!("pipeline benchmark: {n} windows, concurrency {concurrency}, {runs} runs");
    let bot = format!("bp{}", token());
    let coll = format!("whisperengine_memory_{bot}_7d");
    let (points, wins) = data(&bot, n);
    let q = common::qdrant(&qdrant_url, Duration::from_secs(120));
    let t = Instant::now();
    load_points(&q, &coll, &points).await;
    eprintln!(
        "  loaded {} points into {coll} in {:.1}s",
        points.len(),
        t.elapsed().as_secs_f64()
    );
    let llm = LlmServer::start();
    let mut agg: HashMap<String, Vec<f64>> = HashMap::new();
    let mut put = |k: &str, unit: &str, v: f64| {
        emit(k, v, unit);
        agg.entry(format!("{k}\t{unit}")).or_default().push(v);
    };
    let mut pooled: HashMap<&str, Vec<f64>> = HashMap::new();
    for r in 0..runs {
        for (mode, base) in [("extractive", None), ("llm", Some(llm.1.as_str()))] {
            let res = run_mode(&admin, &qdrant_url, base, &bot, &wins, concurrency).await;
            pooled.entry(mode).or_default().extend(if base.is_some() {
                &res.overhead_ms
            } else {
                &res.total_ms
            });
            eprintln!(
                "  run {r} {mode}: {:.0} windows/s; claim->commit p50 {:.2} p99 {:.2} max {:.2} ms; LLM latency p50 {:.0} p99 {:.0} ms; beyond LLM p50 {:.2} p99 {:.2} ms; claim query {:.3} ms/window",
                res.windows_per_sec,
                pct(&res.total_ms, 50.0),
                pct(&res.total_ms, 99.0),
                pct(&res.total_ms, 100.0),
                pct(&res.llm_ms, 50.0),
                pct(&res.llm_ms, 99.0),
                pct(&res.overhead_ms, 50.0),
                pct(&res.overhead_ms, 99.0),
                pct(&res.claim_ms, 50.0),
            );
            put(
                &format!("pipeline_{mode}_p50_ms"),
                "ms",
                pct(&res.total_ms, 50.0),
            );
            put(
                &format!("pipeline_{mode}_p99_ms"),
                "ms",
                pct(&res.total_ms, 99.0),
            );
            if base.is_some() {
                put("pipeline_llm_latency_p50_ms", "ms", pct(&res.llm_ms, 50.0));
                put("pipeline_llm_latency_p99_ms", "ms", pct(&res.llm_ms, 99.0));
                put(
                    "pipeline_llm_overhead_p50_ms",
                    "ms",
                    pct(&res.overhead_ms, 50.0),
                );
                put(
                    "pipeline_llm_overhead_p99_ms",
                    "ms",
                    pct(&res.overhead_ms, 99.0),
                );
            }
            put(
                &format!("pipeline_{mode}_windows_per_sec"),
                "windows/s",
                res.windows_per_sec,
            );
        }
    }
    for (mode, what) in [
        ("extractive", "claim->commit"),
        ("llm", "claim->commit beyond the LLM's latency"),
    ] {
        let mut v = pooled.remove(mode).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        println!(
            "  {mode}, all {} windows of all runs pooled, {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            v.len(),
            pct(&v, 50.0),
            pct(&v, 99.0),
            pct(&v, 100.0)
        );
        emit(
            &format!("pipeline_{mode}_pooled_p50_ms"),
            pct(&v, 50.0),
            "ms",
        );
        emit(
            &format!("pipeline_{mode}_pooled_p99_ms"),
            pct(&v, 99.0),
            "ms",
        );
        emit(
            &format!("pipeline_{mode}_pooled_windows"),
            v.len() as f64,
            "windows",
        );
    }
    let mut keys: Vec<_> = agg.keys().cloned().collect();
    keys.sort();
    for k in keys {
        let (m, u) = k.split_once('\t').unwrap();
        summary(&SUMMARY, m, u, agg[&k].clone());
    }
    let _ = q.delete_collection(&coll).await;
}
