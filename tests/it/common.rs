//! Shared test helpers: real services from `scripts/services up` (addresses from the environment, never fixed
//! ports), a fresh database per test, unique Qdrant collections and NATS subjects per test, WhisperEngine-shaped data,
//! and the recap binary as a child process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, Distance, FieldType, PointStruct,
    UpsertPointsBuilder, Value, VectorParamsBuilder, VectorsConfigBuilder,
};
use sqlx::{Connection, Executor, PgConnection, PgPool};

/// The suite runs as one binary, its tests on several threads at once. A test that disturbs what the others share
/// (stops or crashes the shared PostgreSQL or nats-server, or times itself against the wall clock) holds [`exclusive`]; every other test that uses a service
/// holds [`shared`] (or [`shared_blocking`] outside a runtime) for its whole run. tokio's lock is fair: a waiting
/// exclusive test is not starved by a stream of shared ones, and a failing test releases its guard as it unwinds.
static EXCLUSIVE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The guard of a test that uses the shared services without disturbing them.
pub async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().await
}

/// [`shared`] for a test without a runtime.
pub fn shared_blocking() -> tokio::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.blocking_read()
}

/// The guard of a test that stops, crashes or otherwise disturbs a shared service, or asserts wall-clock bounds that
/// need a quiet machine: no other test runs meanwhile.
pub async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().await
}

/// [`exclusive`] for a test without a runtime.
pub fn exclusive_blocking() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.blocking_write()
}

/// A PostgreSQL cluster and a nats-server of one test's own (`scripts/services up` in a state directory of its
/// own, beside the suite's Qdrant): a test that stops or crashes them disturbs no other test, so it holds
/// [`shared`], not [`exclusive`]. `scripts/services down` on drop, however the test ends.
pub struct OwnServices {
    /// The state directory (`RECAP_SERVICES_DIR` of `scripts/services stop|start NAME` for these).
    pub dir: std::path::PathBuf,
    pub database_url: String,
    pub nats_url: String,
}

impl OwnServices {
    pub async fn up(name: &str) -> OwnServices {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("services-{name}-{}", token()));
        let out = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || own_services(&dir, "up"))
                .await
                .expect("scripts/services task")
        };
        // dropped (and so stopped) from here on, whatever fails below
        let mut own = OwnServices {
            dir,
            database_url: String::new(),
            nats_url: String::new(),
        };
        assert!(
            out.status.success(),
            "scripts/services up for {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                match k {
                    "DATABASE_URL" => own.database_url = v.to_string(),
                    "NATS_URL" => own.nats_url = v.to_string(),
                    _ => {}
                }
            }
        }
        assert!(
            !own.database_url.is_empty() && !own.nats_url.is_empty(),
            "scripts/services up printed no DATABASE_URL or NATS_URL: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        own
    }

    /// `scripts/services <cmd> <name>` for these services (`stop`, `start`).
    pub fn services(&self, cmd: &str, name: &str) -> std::process::Output {
        own_services(&self.dir, &format!("{cmd} {name}"))
    }

    pub async fn fresh_db(&self) -> TestDb {
        fresh_db_at(&self.database_url).await
    }

    pub fn nats_ns(&self) -> NatsNs {
        nats_ns_at(&self.nats_url)
    }
}

impl Drop for OwnServices {
    fn drop(&mut self) {
        let out = own_services(&self.dir, "down");
        if !out.status.success() {
            eprintln!(
                "scripts/services down in {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `scripts/services <args>` in `dir`, with the suite's Qdrant (none started there).
pub fn own_services(dir: &std::path::Path, args: &str) -> std::process::Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services"))
        .args(args.split(' '))
        .env("RECAP_SERVICES_DIR", dir)
        .env("QDRANT_URL", env("QDRANT_URL"))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/services")
}

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the services with `eval \"$(scripts/services up)\"` (or run scripts/test)")
    })
}

/// A short random token for unique names.
pub fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

pub async fn fresh_db() -> TestDb {
    fresh_db_at(&env("DATABASE_URL")).await
}

/// [`fresh_db`] on the PostgreSQL server of `admin` (a URL of any database there).
pub async fn fresh_db_at(admin: &str) -> TestDb {
    let admin = admin.to_string();
    let name = format!("recap_t_{}", token());
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect to DATABASE_URL");
    let create = format!("CREATE DATABASE {name}");
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(create)))
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("DATABASE_URL has a database");
    let url = format!("{base}/{name}");
    let pool = PgPool::connect(&url)
        .await
        .expect("connect to test database");
    TestDb { url, pool }
}

impl TestDb {
    pub async fn migrate(&self) {
        recap::sink::MIGRATOR
            .run(&self.pool)
            .await
            .expect("migrations");
    }
}

pub async fn qdrant() -> Qdrant {
    Qdrant::from_url(&env("QDRANT_URL"))
        .build()
        .expect("qdrant client")
}

/// A deterministic pseudo-embedding (unit length) for a text.
pub fn embed(text: &str, salt: u64) -> Vec<f32> {
    let mut h = recap::tracker::point_hash(text) ^ salt;
    let mut v: Vec<f32> = (0..384)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h % 2000) as f32 / 1000.0) - 1.0
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

pub async fn create_collection(q: &Qdrant, name: &str, float_index: bool) {
    let mut vc = VectorsConfigBuilder::default();
    for v in ["content", "emotion", "semantic"] {
        vc.add_named_vector_params(v, VectorParamsBuilder::new(384, Distance::Cosine));
    }
    q.create_collection(CreateCollectionBuilder::new(name).vectors_config(vc))
        .await
        .expect("create collection");
    q.create_field_index(
        CreateFieldIndexCollectionBuilder::new(name, "user_id", FieldType::Keyword).wait(true),
    )
    .await
    .expect("keyword index");
    q.create_field_index(
        CreateFieldIndexCollectionBuilder::new(name, "memory_type", FieldType::Keyword).wait(true),
    )
    .await
    .expect("keyword index");
    if float_index {
        q.create_field_index(
            CreateFieldIndexCollectionBuilder::new(name, "timestamp_unix", FieldType::Float)
                .wait(true),
        )
        .await
        .expect("float index");
    }
}

/// One stored point, WhisperEngine-shaped.
#[derive(Debug, Clone)]
pub struct TestPoint {
    pub id: String,
    pub user_id: String,
    pub role: String,
    pub content: String,
    pub ts_ms: i64,
    pub emotion: String,
    pub memory_type: String,
}

impl TestPoint {
    pub fn to_point(&self) -> PointStruct {
        let mut payload: HashMap<String, Value> = HashMap::new();
        payload.insert("user_id".into(), self.user_id.clone().into());
        payload.insert("content".into(), self.content.clone().into());
        payload.insert("role".into(), self.role.clone().into());
        payload.insert("source".into(), self.role.clone().into());
        payload.insert("memory_type".into(), self.memory_type.clone().into());
        let naive = chrono::DateTime::from_timestamp_millis(self.ts_ms)
            .unwrap()
            .naive_utc();
        payload.insert(
            "timestamp".into(),
            naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string().into(),
        );
        payload.insert("timestamp_unix".into(), (self.ts_ms as f64 / 1000.0).into());
        payload.insert("emotional_context".into(), self.emotion.clone().into());
        let vectors: HashMap<String, Vec<f32>> =
            [("content", 1u64), ("emotion", 2), ("semantic", 3)]
                .iter()
                .map(|(n, s)| (n.to_string(), embed(&self.content, *s)))
                .collect();
        PointStruct::new(self.id.clone(), vectors, payload)
    }

    /// The event a bot publishes for this point.
    pub fn event(&self, bot: &str, collection: &str) -> recap::event::StoredEvent {
        recap::event::StoredEvent {
            v: 1,
            bot: bot.into(),
            collection: Some(collection.into()),
            point_id: self.id.clone(),
            user_id: self.user_id.clone(),
            role: Some(self.role.clone()),
            ts: chrono::DateTime::from_timestamp_millis(self.ts_ms).unwrap(),
        }
    }
}

const TOPICS: &[&str] = &[
    "I have been learning to play the guitar every evening after work",
    "my sister is visiting next weekend and we plan a hiking trip in the mountains",
    "the new job at the bakery starts on monday and I am nervous about it",
    "I adopted a small grey kitten called Pepper from the shelter",
    "we talked about marine biology and the coral reefs near the coast",
    "training for the marathon is going well, my knee feels better",
];
const EMOTIONS: &[&str] = &[
    "joy",
    "neutral",
    "excitement",
    "anxiety",
    "neutral",
    "gratitude",
];

/// A conversation: `exchanges` user messages, each answered 1 ms later by the bot, `spacing_ms` apart, plus a
/// `conversation_pair` point per exchange when `pairs`.
pub fn conversation(
    user: &str,
    start_ms: i64,
    exchanges: usize,
    spacing_ms: i64,
    pairs: bool,
) -> Vec<TestPoint> {
    let mut out = Vec::new();
    for i in 0..exchanges {
        let t = start_ms + i as i64 * spacing_ms;
        let k = (recap::tracker::point_hash(user) as usize + i) % TOPICS.len();
        let text = format!("{} ({} #{i})", TOPICS[k], user);
        let mk = |role: &str, content: String, ts: i64| TestPoint {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: user.into(),
            role: role.into(),
            content,
            ts_ms: ts,
            emotion: EMOTIONS[k].into(),
            memory_type: "conversation".into(),
        };
        out.push(mk("user", text.clone(), t));
        out.push(mk(
            "assistant",
            format!(
                "That sounds wonderful, tell me more about {}",
                &TOPICS[k][..30]
            ),
            t + 1,
        ));
        if pairs {
            out.push(mk("conversation_pair", format!("{text} || reply"), t));
        }
    }
    out
}

pub async fn upsert(q: &Qdrant, collection: &str, points: &[TestPoint]) {
    for chunk in points.chunks(500) {
        let ps: Vec<PointStruct> = chunk.iter().map(TestPoint::to_point).collect();
        q.upsert_points(UpsertPointsBuilder::new(collection, ps).wait(true))
            .await
            .expect("upsert");
    }
}

/// A per-test NATS namespace (stream, consumer and subject prefix), so tests sharing one server never interfere.
#[derive(Clone, Debug)]
pub struct NatsNs {
    pub url: String,
    pub stream: String,
    pub consumer: String,
    pub prefix: String,
}

pub fn nats_ns() -> NatsNs {
    nats_ns_at(&env("NATS_URL"))
}

/// [`nats_ns`] on the nats-server at `url`.
pub fn nats_ns_at(url: &str) -> NatsNs {
    let t = token();
    NatsNs {
        url: url.to_string(),
        stream: format!("RECAP_{t}"),
        consumer: format!("recap_{t}"),
        prefix: format!("recap{t}.stored"),
    }
}

impl NatsNs {
    pub fn settings(&self) -> recap::source::nats::NatsSettings {
        recap::source::nats::NatsSettings {
            url: self.url.clone(),
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            subject_prefix: self.prefix.clone(),
            max_age: Duration::from_secs(7 * 86400),
            batch_size: 500,
            ..Default::default()
        }
    }

    /// Creates the stream (as recap would) so publishes before recap starts are kept.
    pub async fn ensure(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.url).await.expect("nats connect");
        let js = async_nats::jetstream::new(client);
        recap::source::nats::ensure_stream(&js, &self.settings())
            .await
            .expect("stream");
        js
    }

    /// Creates the stream with `partitions` ingest partitions (as recap would with NATS_PARTITIONS), so publishes
    /// before recap starts are kept, in their partitions.
    pub async fn ensure_partitioned(&self, partitions: u32) -> async_nats::jetstream::Context {
        self.ensure_partitioned_by(partitions, Default::default())
            .await
    }

    /// The stream partitioned `partitions` ways by `by` (NATS_PARTITION_BY).
    pub async fn ensure_partitioned_by(
        &self,
        partitions: u32,
        by: recap::source::nats::PartitionBy,
    ) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.url).await.expect("nats connect");
        let js = async_nats::jetstream::new(client);
        let settings = recap::source::nats::NatsSettings {
            partitions,
            partition_by: by,
            ..self.settings()
        };
        js.create_or_update_stream(recap::source::nats::stream_config(&settings).expect("config"))
            .await
            .expect("stream");
        js
    }

    /// Publishes raw bodies with `Nats-Msg-Id`, many acks in flight; returns how many the server stored.
    pub async fn publish_raw(
        &self,
        js: &async_nats::jetstream::Context,
        items: Vec<(String, Option<String>, Vec<u8>)>,
    ) -> usize {
        let mut acks = Vec::new();
        for (subject, id, body) in items {
            let mut m =
                async_nats::jetstream::message::PublishMessage::build().payload(body.into());
            if let Some(id) = id {
                m = m.message_id(id);
            }
            acks.push(js.send_publish(subject, m).await.expect("publish"));
        }
        let mut stored = 0;
        for a in acks {
            if !a.await.expect("puback").duplicate {
                stored += 1;
            }
        }
        stored
    }

    pub async fn publish(
        &self,
        js: &async_nats::jetstream::Context,
        bot: &str,
        collection: &str,
        points: &[TestPoint],
    ) -> usize {
        // in time order, as live bots publish (within the tracker's lateness bound)
        let mut ordered: Vec<&TestPoint> = points.iter().collect();
        ordered.sort_by_key(|p| p.ts_ms);
        let items = ordered
            .into_iter()
            .map(|p| {
                let e = p.event(bot, collection);
                (e.subject(&self.prefix), Some(p.id.clone()), e.to_body())
            })
            .collect();
        self.publish_raw(js, items).await
    }
}

/// Environment for a recap child process.
pub fn recap_env(db: &TestDb, nats: Option<&NatsNs>) -> Vec<(String, String)> {
    let mut v = vec![
        ("DATABASE_URL".to_string(), db.url.clone()),
        ("QDRANT_URL".to_string(), env("QDRANT_URL")),
        ("HTTP_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ("LEASE_SECONDS".to_string(), "3".to_string()),
        ("LEADER_LEASE_SECONDS".to_string(), "3".to_string()),
        ("SUMMARIZER".to_string(), "extractive".to_string()),
        ("RUST_LOG".to_string(), "info,sqlx=warn".to_string()),
    ];
    if let Some(n) = nats {
        v.push(("NATS_URL".into(), n.url.clone()));
        v.push(("NATS_STREAM".into(), n.stream.clone()));
        v.push(("NATS_CONSUMER".into(), n.consumer.clone()));
        v.push(("NATS_SUBJECT_PREFIX".into(), n.prefix.clone()));
    }
    v
}

/// Starts `recap <args>` with exactly the given environment (plus PATH), logs to a file.
pub fn spawn_recap(args: &[&str], envs: &[(String, String)], log: &std::path::Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn recap")
}

/// Runs `recap <args>` to completion; returns (exit code, stdout, stderr).
pub fn run_recap(args: &[&str], envs: &[(String, String)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run recap");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// One summary row, the columns the tests compare.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Row {
    pub bot: String,
    pub user: String,
    pub start: chrono::NaiveDateTime,
    pub end: chrono::NaiveDateTime,
    pub count: i32,
    pub revision: i32,
}

pub async fn rows(pool: &PgPool) -> Vec<Row> {
    let rows: Vec<(String, String, chrono::NaiveDateTime, chrono::NaiveDateTime, i32, i32)> = sqlx::query_as(
        "SELECT bot_name, user_id, start_timestamp, end_timestamp, message_count, revision FROM conversation_summaries
         ORDER BY bot_name, user_id, start_timestamp",
    )
    .fetch_all(pool)
    .await
    .expect("rows");
    rows.into_iter()
        .map(|(bot, user, start, end, count, revision)| Row {
            bot,
            user,
            start,
            end,
            count,
            revision,
        })
        .collect()
}

/// Waits until `rows` has `n` rows and no window is due; panics with the state after `timeout`.
pub async fn wait_for_rows(pool: &PgPool, n: usize, timeout: Duration) -> Vec<Row> {
    let t0 = Instant::now();
    loop {
        let r = rows(pool).await;
        let due: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE state = 'due'")
            .fetch_one(pool)
            .await
            .unwrap_or(1);
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE window_id IS NULL")
                .fetch_one(pool)
                .await
                .unwrap_or(1);
        if r.len() >= n && due == 0 && open == 0 {
            return r;
        }
        if t0.elapsed() > timeout {
            panic!(
                "timed out waiting for {n} rows: have {} rows, {due} due windows, {open} open messages",
                r.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The windows the tracker's definition gives for these points (session mode, default gap/span), as rows.
pub fn expected_rows(bot: &str, points: &[TestPoint], min_messages: usize) -> Vec<Row> {
    let cfg = recap::tracker::TrackerConfig::default();
    let mut by_user: HashMap<&str, Vec<i64>> = HashMap::new();
    for p in points.iter().filter(|p| p.role != "conversation_pair") {
        by_user.entry(&p.user_id).or_default().push(p.ts_ms);
    }
    let mut out = Vec::new();
    for (user, mut times) in by_user {
        times.sort();
        for (s, e, n, _) in recap::tracker::canonical_windows(&cfg, &times) {
            if n as usize >= min_messages {
                out.push(Row {
                    bot: bot.into(),
                    user: user.into(),
                    start: chrono::DateTime::from_timestamp_millis(s)
                        .unwrap()
                        .naive_utc(),
                    end: chrono::DateTime::from_timestamp_millis(e)
                        .unwrap()
                        .naive_utc(),
                    count: n as i32,
                    revision: 1,
                });
            }
        }
    }
    out.sort();
    out
}

/// A private OpenAI-compatible test server (testsupport/llm_server.py) for one test, so fault settings never leak
/// between tests. Killed on drop.
pub struct LlmServer {
    child: Child,
    pub base: String,
}

/// One of the repo's Python test servers (`script` relative to the repo) on a free port, for one test: it prints
/// `READY port=N` once it serves. Killed on drop.
pub struct PyServer {
    child: Child,
    pub base: String,
}

impl PyServer {
    pub fn start(script: &str) -> PyServer {
        let (child, base) = start_py_server(script);
        PyServer { child, base }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_py_server(script: &str) -> (Child, String) {
    use std::io::BufRead;
    let repo = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("python3")
        .arg(format!("{repo}/{script}"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("READY line");
    let port = line
        .trim()
        .strip_prefix("READY port=")
        .unwrap_or_else(|| panic!("{script} printed {line:?}, not READY port=N"))
        .to_string();
    (child, format!("http://127.0.0.1:{port}"))
}

impl LlmServer {
    pub fn start() -> LlmServer {
        let (child, base) = start_py_server("testsupport/llm_server.py");
        LlmServer { child, base }
    }

    pub fn api_base(&self) -> String {
        format!("{}/v1", self.base)
    }

    pub async fn control(&self, body: serde_json::Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::Client::new()
            .post(format!("{}/control", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("control");
        assert!(
            r.status().is_success(),
            "control rejected: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn stats(&self) -> serde_json::Value {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::Client::new()
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .expect("stats");
        serde_json::from_str(&r.text().await.expect("stats body")).expect("stats json")
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Window counts by state.
/// Polls until `partitions` ingest partitions have a live leader (`recap_leader`): a `recap run` just started is up
/// and leading (instead of a fixed sleep after the start).
pub async fn wait_leading(pool: &PgPool, partitions: i64, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let led: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM recap_leader WHERE lease_until > now()")
                .fetch_one(pool)
                .await
                .ok();
        if led.is_some_and(|l| l >= partitions) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{partitions} partition leaders not up within {timeout:?} (live: {led:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn window_states(pool: &PgPool) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM recap_windows GROUP BY state")
            .fetch_all(pool)
            .await
            .expect("states");
    rows.into_iter().collect()
}

/// Waits until no window is due and no message is open (everything closed and finished one way or another).
pub async fn wait_settled(
    pool: &PgPool,
    min_windows: i64,
    timeout: Duration,
) -> HashMap<String, i64> {
    let t0 = Instant::now();
    loop {
        let s = window_states(pool).await;
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE window_id IS NULL")
                .fetch_one(pool)
                .await
                .unwrap_or(1);
        let total: i64 = s.values().sum();
        if total >= min_windows && s.get("due").copied().unwrap_or(0) == 0 && open == 0 {
            return s;
        }
        if t0.elapsed() > timeout {
            panic!("timed out waiting for windows to settle: {s:?}, {open} open messages");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---- a standard scenario: one bot, several users, WhisperEngine-shaped data, events published by the test ----

pub const T0: i64 = 1_763_640_000_000; // 2025-11-20T12:00:00Z: all test data lies in the past
pub const MIN: i64 = 60_000;

pub struct Scenario {
    pub db: TestDb,
    pub nats: NatsNs,
    pub bot: String,
    pub collection: String,
    pub points: Vec<TestPoint>,
}

#[derive(clap::Parser)]
struct ConfigArgs {
    #[command(flatten)]
    c: recap::config::Config,
}

/// recap's config (normalized) for the database `db_url`, the test Qdrant and `collection` mapped to `bot`, plus
/// `extra` flags.
pub fn collection_config(
    collection: &str,
    bot: &str,
    db_url: &str,
    extra: &[&str],
) -> recap::config::Config {
    use clap::Parser;
    let q = env("QDRANT_URL");
    let map = format!("{collection}={bot}");
    let mut args: Vec<&str> = vec![
        "t",
        "--database-url",
        db_url,
        "--qdrant-url",
        q.as_str(),
        "--collection-patterns",
        collection,
        "--collection-map",
        map.as_str(),
    ];
    args.extend_from_slice(extra);
    let mut cfg = ConfigArgs::parse_from(args).c;
    cfg.normalize();
    cfg
}

/// [`collection_config`] for a scenario's database and collection.
pub fn scenario_config(s: &Scenario, extra: &[&str]) -> recap::config::Config {
    collection_config(&s.collection, &s.bot, s.db.url.as_str(), extra)
}

/// Several users of one bot: a long session, two sessions split by the idle gap, and a too-short one.
pub async fn scenario(users: usize) -> Scenario {
    scenario_on(users, fresh_db().await, nats_ns()).await
}

/// [`scenario`] in the database `db` (migrated here) and on the NATS of `nats` (e.g. a test's [`OwnServices`]).
pub async fn scenario_on(users: usize, db: TestDb, nats: NatsNs) -> Scenario {
    db.migrate().await;
    let bot = format!("bot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let mut points = Vec::new();
    for u in 0..users {
        let user = format!("{}{u}", 100_000_000_000_000_000u64 + u as u64);
        let base = T0 + u as i64 * 7 * MIN;
        points.extend(conversation(&user, base, 6, 2 * MIN, true)); // 12 messages
        points.extend(conversation(&user, base + 3 * 60 * MIN, 4, 5 * MIN, true)); // 8 messages, 3 h later
        points.extend(conversation(&user, base + 8 * 60 * MIN, 2, MIN, false)); // 4 messages: too short
    }
    upsert(&q, &collection, &points).await;
    Scenario {
        db,
        nats,
        bot,
        collection,
        points,
    }
}

pub fn log_path(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("{name}-{}.log", token()))
}

pub async fn run_until(
    s: &Scenario,
    expected: usize,
    extra_env: &[(&str, &str)],
) -> (Vec<Row>, std::path::PathBuf) {
    let mut envs = recap_env(&s.db, Some(&s.nats));
    envs.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let log = log_path("recap");
    let mut child = spawn_recap(&["run"], &envs, &log);
    let rows = wait_for_rows(&s.db.pool, expected, Duration::from_secs(90)).await;
    terminate(&mut child);
    (rows, log)
}

pub fn terminate(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Scenario {
    /// recap's environment for this scenario, with the sweep limited to this scenario's collection (the Qdrant test
    /// server is shared by every test).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v = recap_env(&self.db, Some(&self.nats));
        v.push(("COLLECTION_PATTERNS".into(), self.collection.clone()));
        v.push((
            "COLLECTION_MAP".into(),
            format!("{}={}", self.collection, self.bot),
        ));
        v.push(("LOOKBACK_DAYS".into(), "3650".into()));
        v
    }
}

/// Every window has one row, and no row is empty or a placeholder.
pub async fn assert_one_row_per_window(pool: &sqlx::PgPool) {
    let dups: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT bot_name, user_id, start_timestamp FROM conversation_summaries
         GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(dups, 0, "a window has more than one row");
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_summaries WHERE length(trim(summary_text)) = 0 OR summary_text ILIKE '%coroutine%'
         OR key_topics IS NULL OR cardinality(key_topics) = 0",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(bad, 0, "empty or placeholder summaries");
}

/// A due window of `bot` and `user` stored as ingest stores one: its coverage (the points' ids and stored times) on
/// the `recap_windows` row, bounds from the first and last point. Returns its id.
pub async fn insert_due_window(pool: &PgPool, bot: &str, user: &str, pts: &[&TestPoint]) -> i64 {
    let ts = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
    let ids: Vec<String> = pts.iter().map(|p| p.id.clone()).collect();
    let times: Vec<chrono::DateTime<chrono::Utc>> = pts.iter().map(|p| ts(p.ts_ms)).collect();
    sqlx::query_scalar(
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, point_ids, point_ts)
         VALUES ($1, $2, $3, $4, 'due', $5, $6, $7) RETURNING id",
    )
    .bind(bot)
    .bind(user)
    .bind(ts(pts.first().expect("points").ts_ms))
    .bind(ts(pts.last().expect("points").ts_ms))
    .bind(pts.len() as i32)
    .bind(&ids)
    .bind(&times)
    .fetch_one(pool)
    .await
    .expect("window")
}

/// Topic vectors for the recall tests: a fixed center per topic and a bot's embedding of a message on it (the center
/// plus noise of about the same length), 384-d.
pub mod topics {
    pub const DIM: usize = 384;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut h = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h % 20_000) as f32 / 10_000.0) - 1.0
        }
    }

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
        v.into_iter().map(|x| x / n).collect()
    }

    pub fn center(topic: usize) -> Vec<f32> {
        let mut r = rng(1000 + topic as u64);
        unit((0..DIM).map(|_| r()).collect())
    }

    pub fn noisy(topic: usize, seed: u64) -> Vec<f32> {
        let c = center(topic);
        let mut r = rng(seed);
        let noise = unit((0..DIM).map(|_| r()).collect());
        unit(c.iter().zip(noise).map(|(a, b)| a + 0.9 * b).collect())
    }
}

/// xorshift64*: a small seeded generator (the schedule is a function of the seed).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
}
