//! Recall API latency (issue 15): p50/p99 of `GET /v1/recall` and `POST /v1/recall/search` through HTTP with
//! concurrent clients, at a large row count, with the recall query's plan.
//!
//! Setup (not timed): a fresh migrated database with `BENCH_RECALL_ROWS` summary rows (default 1,000,000: one bot,
//! 100 rows per user, inserted set-based by `generate_series`), then ANALYZE; `BENCH_RECALL_VECTORS` summary vectors
//! (default 1,000,000, 384-d, ten topic clusters) in the Qdrant collection `recap_summaries`, for the rows of the first
//! users, with recap's own payload and point ids. The recall router runs in this process on 127.0.0.1 (the same
//! `recall::api::router` that `recap run` mounts, with a bearer token), and `BENCH_RECALL_CLIENTS` (default 8)
//! clients send `BENCH_RECALL_REQUESTS` (default 4,000) requests per endpoint over keep-alive connections, each
//! timed from send to the last body byte.
//!
//! The Qdrant test server (Qdrant's engine behind a Python gRPC layer) loads about 8,500 vectors/s on 2 cores, so
//! the default 1,000,000 vectors take about two minutes to load.
//!
//! `GET /v1/context` (issue 23) on the same rows: `BENCH_CONTEXT_OPEN` (default 100,000) open windows in
//! `recap_open_windows` (users `u0..`, the first 1% of them also having the summary rows above), 12 messages each in
//! the last 40 minutes, a running summary covering the first 9 (so 3 are verbatim, read from Qdrant by id), and for
//! every tenth user one more point stored after the checkpoint (found by the scroll). The bot's collection holds the
//! points the endpoint reads (3 per window + the newer ones; 4-d vectors, the endpoint reads none). Requests ask for
//! `max_tokens=800` for a random open user.
//!
//! Needs DATABASE_URL and QDRANT_URL. `cargo bench --bench recall`. Lines `BENCH<TAB>metric<TAB>value<TAB>unit`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qdrant_client::qdrant::{FieldType, PointStruct, Value};
use recap::recall::{api, vectors};
use sqlx::Row;

mod common;
use common::{drop_db, emit, env, env_usize, fresh_db, token};

const TOKEN: &str = "bench-token-0123456789";
const DIM: usize = 384;
const PER_USER: usize = 100;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() % 20_000) as f32 / 10_000.0 - 1.0
    }
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
    v.into_iter().map(|x| x / n).collect()
}

fn topic_vector(topic: u64, rng: &mut Rng) -> Vec<f32> {
    let mut c = Rng(0x9E37_79B9 + topic * 7919);
    unit((0..DIM).map(|_| c.f() + 0.9 * rng.f()).collect())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = env("DATABASE_URL");
    let qdrant_url = env("QDRANT_URL");
    let rows = env_usize("BENCH_RECALL_ROWS", 1_000_000);
    let nvec = env_usize("BENCH_RECALL_VECTORS", 1_000_000).min(rows);
    let clients = env_usize("BENCH_RECALL_CLIENTS", 8).max(1);
    let requests = env_usize("BENCH_RECALL_REQUESTS", 4_000).max(clients);
    let users = rows.div_ceil(PER_USER);
    println!(
        "recall benchmark: {rows} rows ({users} users x {PER_USER}), {nvec} vectors, {clients} clients, {requests} requests per endpoint"
    );
    let bot = format!("rb{}", token());
    let (db_url, db_name) = fresh_db(&admin).await;
    let cfg = common::config(&db_url, &qdrant_url, &[]);
    let store = common::store(&cfg).await;

    // ---- rows
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp,
            end_timestamp, message_count, key_topics, emotional_tone, revision)
         SELECT 'u' || ((g - 1) / $3), $1,
                'The user talked about ' || (ARRAY['hiking','guitar','cooking','chess','astronomy','gardening',
                    'photography','sailing','pottery','cycling'])[1 + g % 10] || ' and how the week went.',
                'time_window',
                timestamp '2026-01-01' + ((g - 1) % $3) * interval '3 hours',
                timestamp '2026-01-01' + ((g - 1) % $3) * interval '3 hours' + interval '40 minutes',
                12, ARRAY[(ARRAY['hiking','guitar','cooking','chess','astronomy','gardening','photography','sailing',
                    'pottery','cycling'])[1 + g % 10], 'week'], 'neutral', 1
         FROM generate_series(1, $2) g",
    )
    .bind(&bot)
    .bind(rows as i32)
    .bind(PER_USER as i32)
    .execute(store.pool())
    .await
    .expect("insert rows");
    sqlx::query("ANALYZE conversation_summaries")
        .execute(store.pool())
        .await
        .unwrap();
    eprintln!(
        "  inserted {rows} rows in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // ---- vectors (row g belongs to user (g-1)/PER_USER; ids are 1..rows in a fresh database)
    let q = common::qdrant(&qdrant_url, Duration::from_secs(300));
    vectors::ensure_collection(&q, DIM as u64)
        .await
        .expect("collection");
    let t = Instant::now();
    let mut rng = Rng(42);
    let mut pts = Vec::with_capacity(nvec);
    for g in 1..=nvec as i64 {
        let user = format!("u{}", (g - 1) / PER_USER as i64);
        let payload: std::collections::HashMap<String, Value> = [
            ("summary_id", Value::from(g)),
            ("bot", bot.clone().into()),
            ("user_id", user.clone().into()),
            ("start", 0i64.into()),
            ("end", 0i64.into()),
            ("revision", 1i64.into()),
            ("summary_type", "time_window".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        pts.push(PointStruct::new(
            vectors::point_id(&bot, &user, g as i32),
            topic_vector(g as u64 % 10, &mut rng),
            payload,
        ));
    }
    common::upsert(&q, vectors::COLLECTION, pts, 1000).await;
    eprintln!(
        "  loaded {nvec} vectors in {:.1}s ({:.0}/s)",
        t.elapsed().as_secs_f64(),
        nvec as f64 / t.elapsed().as_secs_f64()
    );

    // ---- the query plan of GET /v1/recall
    let mut plan_sql = String::from("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ");
    plan_sql.push_str(&recap::recall::recall_sql());
    let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(plan_sql))
        .bind(&bot)
        .bind(format!("u{}", users / 2))
        .bind(20i64)
        .bind(Some(
            chrono::NaiveDate::from_ymd_opt(2026, 1, 3)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        ))
        .bind(None::<chrono::NaiveDateTime>)
        .bind(None::<String>)
        .fetch_all(store.pool())
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!("query plan of GET /v1/recall (since=2026-01-03, limit 20):");
    for l in &plan {
        println!("    {l}");
    }
    let plan_text = plan.join("\n");
    assert!(
        // (bot, user, start) or (user, bot, start, end): either serves the newest first without a sort
        plan_text.contains("Index Scan Backward") && !plan_text.contains("Sort"),
        "the recall query is not an index scan without sort"
    );

    // ---- open windows, running summaries and the bot's collection for GET /v1/context
    let open = env_usize("BENCH_CONTEXT_OPEN", 100_000).max(1);
    let collection = format!("whisperengine_memory_{bot}_7d");
    let now_ms = chrono::Utc::now().timestamp_millis();
    let base_ms = now_ms - 40 * 60_000; // message i (1..=12) at base + i minutes
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO recap_open_windows (bot_name, user_id, part, point_ids, point_ts)
         SELECT $1, 'u' || g, 0,
                ARRAY(SELECT (g::bigint * 100 + i)::text FROM generate_series(1, 12) i ORDER BY i),
                ARRAY(SELECT to_timestamp(($3 + i * 60000) / 1000.0) FROM generate_series(1, 12) i ORDER BY i)
         FROM generate_series(0, $2 - 1) g",
    )
    .bind(&bot)
    .bind(open as i32)
    .bind(base_ms as f64)
    .execute(store.pool())
    .await
    .expect("open windows");
    sqlx::query(
        "INSERT INTO recap_running_summaries (bot_name, user_id, window_start, point_ids, covers_until, message_count,
            summary, key_topics)
         SELECT $1, 'u' || g, to_timestamp(($3 + 60000) / 1000.0),
                ARRAY(SELECT (g::bigint * 100 + i)::text FROM generate_series(1, 9) i ORDER BY i),
                to_timestamp(($3 + 9 * 60000) / 1000.0), 9,
                'So far the user has talked about ' || (ARRAY['hiking','guitar','cooking','chess','astronomy'])[1 + g % 5]
                    || ', a trip they are planning with their sister, and how work has been busy this week; they sound '
                    || 'tired but hopeful and asked for advice on keeping a routine.',
                ARRAY['routine', 'family']
         FROM generate_series(0, $2 - 1) g",
    )
    .bind(&bot)
    .bind(open as i32)
    .bind(base_ms as f64)
    .execute(store.pool())
    .await
    .expect("running summaries");
    sqlx::query("ANALYZE recap_open_windows")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("ANALYZE recap_running_summaries")
        .execute(store.pool())
        .await
        .unwrap();
    eprintln!(
        "  inserted {open} open windows and running summaries in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    common::create_collection(
        &q,
        &collection,
        4,
        &[
            ("user_id", FieldType::Keyword),
            ("timestamp_unix", FieldType::Float),
        ],
    )
    .await;
    let mut tail = Vec::with_capacity(open * 3 + open / 10 + 1);
    for g in 0..open as u64 {
        let user = format!("u{g}");
        for i in 10..=13u64 {
            if i == 13 && g % 10 != 0 {
                continue; // one point after the checkpoint for every tenth user
            }
            let ts = base_ms + i as i64 * 60_000;
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            tail.push(common::we_point(
                (g * 100 + i).to_string(),
                &user,
                role,
                "I finally booked the cabin for the weekend, do you think the weather will hold up for a hike?",
                ts,
                "joy",
                vec![0.5, 0.5, 0.5, 0.5],
            ));
        }
    }
    let ntail = tail.len();
    for p in &mut tail {
        // integer ids, as some bots store them
        if let Some(id) = p.id.as_mut()
            && let Some(qdrant_client::qdrant::point_id::PointIdOptions::Uuid(u)) =
                id.point_id_options.clone()
            && let Ok(n) = u.parse::<u64>()
        {
            *id = n.into();
        }
    }
    common::upsert(&q, &collection, tail, 1000).await;
    eprintln!(
        "  loaded {ntail} message points in {:.1}s ({:.0}/s)",
        t.elapsed().as_secs_f64(),
        ntail as f64 / t.elapsed().as_secs_f64()
    );

    // ---- quiet before measuring: Qdrant's optimizers done with what was loaded, Postgres' tables vacuumed (the
    // visibility map for index-only scans, no autovacuum of the fresh million rows during the run)
    let t = Instant::now();
    let waited = common::wait_green(&q, vectors::COLLECTION, Duration::from_secs(1800)).await
        + common::wait_green(&q, &collection, Duration::from_secs(1800)).await;
    for table in [
        "conversation_summaries",
        "recap_open_windows",
        "recap_running_summaries",
        "recap_windows",
    ] {
        // one statement per query: VACUUM cannot run in the implicit transaction of a multi-statement query
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(store.pool())
            .await
            .expect("vacuum");
    }
    // and the dirty pages of the load written out now, not by a checkpoint during the first endpoint's run
    sqlx::raw_sql("CHECKPOINT")
        .execute(store.pool())
        .await
        .expect("checkpoint");
    eprintln!(
        "  quiet after {:.1}s (Qdrant optimizers {waited:.1}s, then VACUUM ANALYZE, CHECKPOINT)",
        t.elapsed().as_secs_f64()
    );

    // ---- the HTTP server: on a runtime of its own (2 worker threads named `recap-srv`, with its own pool and Qdrant
    // client), as `recap run` would be, so its CPU is told apart from the clients'
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (db_url, qdrant_url, collection, bot) = (
            db_url.clone(),
            qdrant_url.clone(),
            collection.clone(),
            bot.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("recap-srv")
                .enable_all()
                .build()
                .expect("server runtime");
            rt.block_on(async move {
                // what `recap run` serves: its read pool (RECALL_POOL_SIZE, statement timeout), concurrency limit and
                // context settings (the bench's collection mapped to its bot)
                let map = format!("{collection}={bot}");
                let cfg = common::config(
                    &db_url,
                    &qdrant_url,
                    &["--recall-token", TOKEN, "--collection-map", &map],
                );
                let writer = common::store(&cfg).await;
                let points = Arc::new(
                    recap::fetch::Points::new(
                        &qdrant_url,
                        None,
                        recap::fetch::PayloadMapping::default(),
                    )
                    .expect("qdrant client"),
                );
                let read = recap::cmd::read_store(&cfg).expect("read pool");
                let state = recap::cmd::recall_state(&cfg, read, writer, points);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, api::router(state)).await
            })
        });
    }
    let base = format!("http://{}", rx.recv().expect("server address"));
    let tick_us = 1e6 / common::cpu::clk_tck();
    let (pg_pid, qd_pid) = (
        common::cpu::service_pid("postgres"),
        common::cpu::service_pid("qdrant"),
    );
    let cpu_now = || {
        (
            common::cpu::tree_ticks(std::process::id()),
            common::cpu::thread_ticks("recap-srv"),
            pg_pid.map(common::cpu::tree_ticks),
            qd_pid.map(common::cpu::tree_ticks),
        )
    };

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    // what the context requests read: a running summary, the verbatim tail from Qdrant (and for u0 the point after
    // the checkpoint and its earlier recaps)
    let v: serde_json::Value = http
        .get(format!(
            "{base}/v1/context?bot={bot}&user_id=u0&max_tokens=800"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("context")
        .json()
        .await
        .expect("context json");
    let c = &v["conversation"];
    assert_eq!(c["summary"]["message_count"], 9, "{v}");
    assert_eq!(c["messages"].as_array().map(Vec::len), Some(4), "{v}");
    assert_eq!(c["messages"][3]["point_id"], "13", "{v}");
    assert!(v["tokens"].as_u64().unwrap() <= 800, "{v}");
    assert!(!v["earlier"].as_array().unwrap().is_empty(), "{v}");
    let vec_users = nvec.div_ceil(PER_USER).max(1);
    for (name, endpoint) in [
        ("recall", 0u8),
        ("search_vector", 1),
        ("search_text", 2),
        ("search_both", 3),
        ("context", 4),
    ] {
        let started = Instant::now();
        let cpu0 = cpu_now();
        let per_client = requests / clients;
        let tasks = (0..clients).map(|c| {
            let (http, base, bot) = (http.clone(), base.clone(), bot.clone());
            tokio::spawn(async move {
                let mut rng = Rng(1000 + c as u64 * 7 + endpoint as u64);
                let mut lat = Vec::with_capacity(per_client);
                for i in 0..per_client + 20 {
                    let req = match endpoint {
                        0 => {
                            let user = format!("u{}", rng.next() % users as u64);
                            http.get(format!(
                                "{base}/v1/recall?bot={bot}&user_id={user}&since=2026-01-03T00:00:00Z&limit=20"
                            ))
                        }
                        4 => {
                            let user = format!("u{}", rng.next() % open as u64);
                            http.get(format!("{base}/v1/context?bot={bot}&user_id={user}&max_tokens=800"))
                        }
                        _ => {
                            let user = format!("u{}", rng.next() % vec_users as u64);
                            let topic = rng.next() % 10;
                            let words = ["hiking", "guitar", "cooking", "chess", "astronomy", "gardening",
                                "photography", "sailing", "pottery", "cycling"];
                            let body = match endpoint {
                                1 => serde_json::json!({"bot": bot, "user_id": user, "vector": topic_vector(topic, &mut rng), "limit": 10}),
                                2 => serde_json::json!({"bot": bot, "user_id": user, "text": format!("remember the {}?", words[topic as usize]), "limit": 10}),
                                _ => serde_json::json!({"bot": bot, "user_id": user, "vector": topic_vector(topic, &mut rng), "text": words[topic as usize], "limit": 10}),
                            };
                            http.post(format!("{base}/v1/recall/search"))
                                .header("content-type", "application/json")
                                .body(body.to_string())
                        }
                    };
                    let t = Instant::now();
                    let resp = req.bearer_auth(TOKEN).send().await.expect("request");
                    let status = resp.status();
                    let body = resp.bytes().await.expect("body");
                    let el = t.elapsed().as_secs_f64() * 1000.0;
                    assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
                    if i >= 20 {
                        lat.push(el); // the first 20 warm connections and caches
                    }
                }
                lat
            })
        });
        let mut lat: Vec<f64> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .flat_map(|r| r.unwrap())
            .collect();
        let wall = started.elapsed().as_secs_f64();
        let cpu1 = cpu_now();
        let (p50, p99) = (pct(&mut lat, 0.50), pct(&mut lat, 0.99));
        println!(
            "  {name:<14} p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  ({} requests, {:.0} req/s)",
            lat.len(),
            lat.len() as f64 / wall
        );
        emit(&format!("recall_{name}_p50"), p50, "ms");
        emit(&format!("recall_{name}_p99"), p99, "ms");
        // where the CPU went, per request (the 20 warm-up requests per client included)
        let n = (per_client + 20) as f64 * clients as f64;
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 * tick_us / n;
        let server = per(cpu0.1, cpu1.1);
        let clients_us = per(cpu0.0, cpu1.0) - server;
        let pg = cpu0.2.zip(cpu1.2).map(|(a, b)| per(a, b));
        let qd = cpu0.3.zip(cpu1.3).map(|(a, b)| per(a, b));
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "  {:<14} CPU per request, us: server {server:.0}, clients {clients_us:.0}, PostgreSQL {}, Qdrant {}",
            "",
            show(pg),
            show(qd)
        );
        emit(
            &format!("recall_{name}_server_cpu_per_request"),
            server,
            "us",
        );
        if let Some(v) = pg {
            emit(&format!("recall_{name}_postgres_cpu_per_request"), v, "us");
        }
        if let Some(v) = qd {
            emit(&format!("recall_{name}_qdrant_cpu_per_request"), v, "us");
        }
    }
    // leave the shared collection as we found it
    let _ = q
        .delete_points(
            qdrant_client::qdrant::DeletePointsBuilder::new(vectors::COLLECTION)
                .points(qdrant_client::qdrant::Filter::must([
                    qdrant_client::qdrant::Condition::matches("bot", bot.clone()),
                ]))
                .wait(true),
        )
        .await;
    let _ = q.delete_collection(&collection).await;
    drop_db(&admin, &db_name).await;
}
