//! Helpers shared by the bench binaries (`mod common;` in each): environment, `BENCH` lines and summaries, a
//! deterministic generator, recap's config, fresh databases, pseudo-embeddings and WhisperEngine-shaped Qdrant points.
//! Not every bench uses every helper.
#![allow(dead_code)]

pub mod cpu;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CollectionStatus, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, Distance,
    FieldType, PointStruct, UpsertPointsBuilder, Value, VectorParamsBuilder, VectorsConfigBuilder,
};
use recap::config::Config;
use recap::pipeline::Context;
use recap::sink::Store;
use recap::summarize::Summarizer;
use recap::tracker::point_hash;
use sqlx::{Connection, Executor, PgConnection};

// ---------------------------------------------------------------------------------------------------------------
// Environment and output

/// A required variable; exits with a hint when it is not set.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!(
            "{name} is not set: run `eval \"$(scripts/services up)\"` first (or use scripts/bench)"
        );
        std::process::exit(2)
    })
}

/// A count from the environment (`_` separators allowed), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// One machine-readable result line: `BENCH<TAB>metric<TAB>value<TAB>unit`.
pub fn emit(metric: &str, value: f64, unit: &str) {
    println!("BENCH\t{metric}\t{value:.3}\t{unit}");
}

/// Column layout of a bench's `summary` lines: label width, value width and decimals.
pub struct Columns {
    pub label: usize,
    pub value: usize,
    pub decimals: usize,
}

/// The human-readable min/median/max line of a measurement over the runs.
pub fn summary(cols: &Columns, metric: &str, unit: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let (l, w, d) = (cols.label, cols.value, cols.decimals);
    println!(
        "  {metric:<l$} min {:>w$.d$}  median {:>w$.d$}  max {:>w$.d$}  {unit}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    );
}

/// A short random name part for streams, collections and databases.
pub fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// Data

pub const MIN: i64 = 60_000;

/// What the benches' users talk about (one topic a session).
pub const TOPICS: &[&str] = &[
    "I have been learning to play the guitar every evening after work",
    "my sister is visiting next weekend and we plan a hiking trip in the mountains",
    "the new job at the bakery starts on monday and I am nervous about it",
    "I adopted a small grey kitten called Pepper from the shelter",
    "we talked about marine biology and the coral reefs near the coast",
    "training for the marathon is going well, my knee feels better",
];

pub const BOTS: &[&str] = &[
    "elena", "marcus", "jake", "ryan", "gabriel", "sophia", "dream", "aethys",
];

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }
}

/// A deterministic pseudo-embedding (unit length, 384-d) of a text, as the tests and the demo loader make them.
pub fn embed(text: &str, salt: u64) -> Vec<f32> {
    let mut h = point_hash(text) ^ salt;
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

// ---------------------------------------------------------------------------------------------------------------
// recap: config, store, context

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: Config,
}

/// recap's `Config` from command-line style arguments (the first one is the program name).
pub fn parse_config<I, T>(args: I) -> Config
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Args::parse_from(args).c
}

/// recap's normalized `Config` for a database and a Qdrant, plus `extra` arguments.
pub fn config(db_url: &str, qdrant: &str, extra: &[&str]) -> Config {
    let mut cfg = parse_config(
        ["bench", "--database-url", db_url, "--qdrant-url", qdrant]
            .iter()
            .chain(extra),
    );
    cfg.normalize();
    cfg
}

/// recap's store for `cfg`, migrated.
pub async fn store(cfg: &Config) -> Store {
    let store = recap::cmd::connect_store(cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    store
}

/// A pipeline `Context` for `cfg` over `store` and `points`.
pub fn context(
    cfg: &Config,
    store: &Store,
    points: Arc<recap::fetch::Points>,
    summarizer: Arc<dyn Summarizer>,
) -> Context {
    Context {
        store: store.clone(),
        points,
        summarizer,
        instance: cfg.instance_id(),
        cfg: Arc::new(cfg.clone()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Databases

/// A fresh database on the DATABASE_URL server (`admin`); returns its URL and name.
pub async fn fresh_db(admin: &str) -> (String, String) {
    let name = format!("recap_bench_{}", token());
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("connect to DATABASE_URL");
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name}"
    ))))
    .await
    .expect("create database");
    let (base, _) = admin.rsplit_once('/').expect("DATABASE_URL has a database");
    (format!("{base}/{name}"), name)
}

/// Drops a database made by `fresh_db` (errors ignored).
pub async fn drop_db(admin: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin).await {
        let _ = conn
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            ))))
            .await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Qdrant

/// A Qdrant client with the given request timeout.
pub fn qdrant(url: &str, timeout: Duration) -> Arc<Qdrant> {
    Arc::new(
        Qdrant::from_url(url)
            .timeout(timeout)
            .build()
            .expect("qdrant"),
    )
}

/// A collection with one named `content` vector of `dim` dimensions (cosine) and the given payload indexes.
pub async fn create_collection(q: &Qdrant, coll: &str, dim: u64, indexes: &[(&str, FieldType)]) {
    let mut vc = VectorsConfigBuilder::default();
    vc.add_named_vector_params("content", VectorParamsBuilder::new(dim, Distance::Cosine));
    q.create_collection(CreateCollectionBuilder::new(coll).vectors_config(vc))
        .await
        .expect("create collection");
    for &(field, ty) in indexes {
        q.create_field_index(CreateFieldIndexCollectionBuilder::new(coll, field, ty).wait(true))
            .await
            .expect("index");
    }
}

/// Waits (at most `limit`) until Qdrant has no optimization running or pending on `coll` (status green), so what is
/// measured next does not share the cores with index building and segment merges. Returns the seconds waited.
#[allow(dead_code)] // not every bench loads a collection
pub async fn wait_green(q: &Qdrant, coll: &str, limit: Duration) -> f64 {
    let t = std::time::Instant::now();
    loop {
        let info = q.collection_info(coll).await.expect("collection info");
        let status = info.result.map_or(-1, |r| r.status);
        if status == CollectionStatus::Green as i32 {
            break;
        }
        if t.elapsed() > limit {
            eprintln!(
                "  {coll}: still not green (status {status}) after {limit:?}; measuring anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    t.elapsed().as_secs_f64()
}

/// Upserts `pts` in chunks of `chunk`, two requests in flight, each waiting for the write.
pub async fn upsert(q: &Arc<Qdrant>, coll: &str, pts: Vec<PointStruct>, chunk: usize) {
    let mut chunks = Vec::new();
    let mut it = pts.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(chunk).collect::<Vec<_>>());
    }
    futures::stream::iter(chunks)
        .for_each_concurrent(2, |ps| {
            let q = q.clone();
            async move {
                q.upsert_points(UpsertPointsBuilder::new(coll, ps).wait(true))
                    .await
                    .expect("upsert");
            }
        })
        .await;
}

/// A WhisperEngine-shaped point: the payload fields recap reads and the `content` vector.
pub fn we_point(
    id: String,
    user: &str,
    role: &str,
    text: &str,
    ts: i64,
    emotion: &str,
    vector: Vec<f32>,
) -> PointStruct {
    let mut payload: HashMap<String, Value> = HashMap::new();
    payload.insert("user_id".into(), user.into());
    payload.insert("content".into(), text.into());
    payload.insert("role".into(), role.into());
    payload.insert("source".into(), role.into());
    payload.insert("memory_type".into(), "conversation".into());
    let naive = chrono::DateTime::from_timestamp_millis(ts)
        .unwrap()
        .naive_utc();
    payload.insert(
        "timestamp".into(),
        naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string().into(),
    );
    payload.insert("timestamp_unix".into(), (ts as f64 / 1000.0).into());
    payload.insert("emotional_context".into(), emotion.into());
    let vectors: HashMap<String, Vec<f32>> = [("content".to_string(), vector)].into();
    PointStruct::new(id, vectors, payload)
}
