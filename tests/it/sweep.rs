//! The sweep source against real services: PostgreSQL (`DATABASE_URL`, a superuser: one fresh database per test) and
//! Qdrant over gRPC (`QDRANT_URL`). Start them with `eval "$(scripts/services up)"`.
//!
//! Each test uses its own collections, named with a random tag, and a `bot_for_collection` that maps only those (the
//! Qdrant server is shared with the other tests running at the same time). Batches are applied by [`MiniIngest`], the
//! minimal form of `pipeline::Ingest::apply`: messages, tracker, closed windows, watermarks and the sweep checkpoint in
//! one transaction.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, Distance, FieldType, PointStruct,
    UpsertPointsBuilder, Value, VectorParamsBuilder, VectorsConfigBuilder,
};
use recap::fetch::{PayloadMapping, Points};
use recap::sink::{Fence, MIGRATOR, Store, StoreError};
use recap::source::sweep::{BotForCollection, SweepReport, SweepSettings, SweepSource, sweep_once};
use recap::source::{Batch, Source};
use recap::state::State;
use recap::tracker::TrackerConfig;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

const DAY: f64 = 86_400.0;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests need the real services; start them with `eval \"$(scripts/services up)\"`")
    })
}

fn now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// A fresh database with recap's schema.
async fn fresh_store() -> Store {
    let opts: PgConnectOptions = env("DATABASE_URL")
        .parse()
        .expect("DATABASE_URL is not a Postgres URL");
    let admin = Store::connect(opts.clone(), 1)
        .await
        .expect("connect to DATABASE_URL");
    let db = format!("recap_test_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.pool().close().await;
    let store = Store::connect(opts.database(&db), 4)
        .await
        .expect("connect to the test database");
    MIGRATOR.run(store.pool()).await.expect("migrations");
    store
}

fn qdrant() -> Qdrant {
    Qdrant::from_url(&env("QDRANT_URL"))
        .build()
        .expect("QDRANT_URL")
}

fn points() -> Arc<Points> {
    Arc::new(Points::new(&env("QDRANT_URL"), None, PayloadMapping::default()).expect("QDRANT_URL"))
}

fn tag() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// The default collection mapping (`whisperengine_memory_<bot>[_7d]`, `chat_memories_<bot>`), limited to one test's tag.
fn bot_for(tag: &str) -> BotForCollection {
    let tag = tag.to_string();
    Arc::new(move |c: &str| {
        let rest = c
            .strip_prefix("whisperengine_memory_")
            .or_else(|| c.strip_prefix("chat_memories_"))?;
        let bot = rest.strip_suffix("_7d").unwrap_or(rest);
        bot.starts_with(&tag).then(|| bot.to_string())
    })
}

fn settings(tag: &str, page_size: u32, overlap_secs: u64, create_index: bool) -> SweepSettings {
    SweepSettings {
        interval: Duration::from_secs(3600),
        lookback: Duration::from_secs(30 * 86_400),
        overlap: Duration::from_secs(overlap_secs),
        page_size,
        bot_for_collection: bot_for(tag),
        create_index,
        checkpoint_prefix: "sweep".into(),
        keep_user: None,
    }
}

/// A collection as WhisperEngine makes it: three named 384-d cosine vectors, keyword indexes on user_id and
/// memory_type, and (optionally) a float index on timestamp_unix.
async fn create_collection(q: &Qdrant, name: &str, ts_index: bool) {
    let mut vectors = VectorsConfigBuilder::default();
    for v in ["content", "emotion", "semantic"] {
        vectors.add_named_vector_params(v, VectorParamsBuilder::new(384, Distance::Cosine));
    }
    q.create_collection(CreateCollectionBuilder::new(name).vectors_config(vectors))
        .await
        .expect("create collection");
    let mut indexes = vec![
        ("user_id", FieldType::Keyword),
        ("memory_type", FieldType::Keyword),
    ];
    if ts_index {
        indexes.push(("timestamp_unix", FieldType::Float));
    }
    for (field, kind) in indexes {
        q.create_field_index(CreateFieldIndexCollectionBuilder::new(name, field, kind).wait(true))
            .await
            .expect("create index");
    }
}

async fn has_ts_index(q: &Qdrant, name: &str) -> bool {
    q.collection_info(name)
        .await
        .expect("collection info")
        .result
        .expect("info")
        .payload_schema
        .contains_key("timestamp_unix")
}

/// One point to write: its id, time (seconds), whether `timestamp_unix` is written, and the rest of its payload.
#[derive(Clone, Debug)]
struct P {
    id: String,
    user: String,
    ts: f64,
    dated: bool,
    role: &'static str,
    memory_type: &'static str,
}

impl P {
    fn new(user: &str, ts: f64, role: &'static str) -> P {
        P {
            id: Uuid::new_v4().to_string(),
            user: user.into(),
            ts,
            dated: true,
            role,
            memory_type: "conversation",
        }
    }
    /// A message recap must count (not a conversation_pair, a fact, ...).
    fn is_message(&self) -> bool {
        self.role != "conversation_pair" && self.memory_type == "conversation"
    }
    fn ts_ms(&self) -> i64 {
        (self.ts * 1000.0).floor() as i64
    }
    fn point(&self, n: usize) -> PointStruct {
        let s = |v: &str| Value::from(v.to_string());
        let iso = DateTime::from_timestamp_micros((self.ts * 1e6).round() as i64)
            .unwrap()
            .naive_utc()
            .format("%Y-%m-%dT%H:%M:%S%.6f");
        let mut payload: HashMap<String, Value> = [
            ("user_id", s(&self.user)),
            ("content", s(&format!("message {n} from {}", self.role))),
            ("role", s(self.role)),
            (
                "source",
                s(match self.role {
                    "user" => "user_message",
                    "assistant" => "bot_response",
                    r => r,
                }),
            ),
            ("memory_type", s(self.memory_type)),
            ("timestamp", s(&iso.to_string())),
            ("emotional_context", s("neutral")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if self.dated {
            payload.insert("timestamp_unix".into(), Value::from(self.ts));
        }
        if self.role == "conversation_pair" {
            payload.insert("user_message".into(), s("the user's text"));
            payload.insert("bot_response".into(), s("the bot's text"));
        }
        let mut v = vec![0.01f32; 384];
        v[n % 384] = 1.0;
        let vectors: HashMap<String, Vec<f32>> = ["content", "emotion", "semantic"]
            .into_iter()
            .map(|k| (k.to_string(), v.clone()))
            .collect();
        PointStruct::new(self.id.clone(), vectors, payload)
    }
}

/// One exchange: the user's message at `t`, the bot's reply at `t` + 1 ms, and (newer bots) a conversation_pair point.
fn exchange(user: &str, t: f64, pair: bool) -> Vec<P> {
    let mut out = vec![
        P::new(user, t, "user"),
        P::new(user, t + 0.001, "assistant"),
    ];
    if pair {
        out.push(P::new(user, t + 0.001, "conversation_pair"));
    }
    out
}

async fn upsert(q: &Qdrant, name: &str, ps: &[P]) {
    for (i, chunk) in ps.chunks(500).enumerate() {
        let pts: Vec<PointStruct> = chunk
            .iter()
            .enumerate()
            .map(|(j, p)| p.point(i * 500 + j))
            .collect();
        q.upsert_points(UpsertPointsBuilder::new(name, pts).wait(true))
            .await
            .expect("upsert");
    }
}

/// The minimal `pipeline::Ingest::apply`: one checkpoint per batch.
struct MiniIngest {
    store: Store,
    fence: Fence,
    state: State,
    ignored: usize,
}

impl MiniIngest {
    async fn new(store: &Store) -> MiniIngest {
        let fence = store
            .try_acquire_leader("sweep-test", Duration::from_secs(600))
            .await
            .expect("lease")
            .expect("free lease");
        MiniIngest {
            store: store.clone(),
            fence,
            state: State::new(TrackerConfig::default()),
            ignored: 0,
        }
    }

    async fn apply(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        for m in &batch.messages {
            self.state
                .observe(&m.bot, &m.user_id, &m.point_id, m.ts_ms, now);
        }
        if batch.caught_up {
            self.state.tick(chrono::Utc::now().timestamp_millis());
        }
        self.state.close_due();
        if let Some(c) = &batch.checkpoint {
            self.state.set_position(c);
        }
        let c = self.state.take_checkpoint();
        let mut tx = self.store.begin_ingest(&self.fence).await?;
        tx.close_windows(self.state.config(), &c.closed, 5).await?;
        tx.save_snapshots(&c.snapshots, 0, "1").await?;
        tx.save_watermarks(&c.watermarks, 0).await?;
        for p in &c.positions {
            tx.save_checkpoint(p).await?;
        }
        tx.commit().await?;
        self.ignored += batch.ignored;
        Ok(())
    }

    async fn cycle(&mut self, source: &mut SweepSource) -> SweepReport {
        sweep_once(source, async |b| self.apply(b).await)
            .await
            .expect("sweep cycle")
    }
}

/// The messages stored for a bot: (user, point id, time in ms).
async fn stored(store: &Store, bot: &str) -> BTreeSet<(String, String, i64)> {
    let rows: Vec<(String, String, DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT user_id, point_id, ts FROM recap_messages WHERE bot_name = $1")
            .bind(bot)
            .fetch_all(store.pool())
            .await
            .expect("query");
    rows.into_iter()
        .map(|(u, p, t)| (u, p, t.timestamp_millis()))
        .collect()
}

fn expected(ps: &[P], since: f64) -> BTreeSet<(String, String, i64)> {
    ps.iter()
        .filter(|p| p.is_message() && p.ts >= since)
        .map(|p| (p.user.clone(), p.id.clone(), p.ts_ms()))
        .collect()
}

/// 1. Points read per cycle ≈ points added since the last cycle (plus the overlap), not the history.
#[tokio::test]
async fn points_read_per_cycle_follow_the_points_added() {
    let _shared = crate::common::shared().await;
    let (store, q, tag) = (fresh_store().await, qdrant(), tag());
    let coll = format!("whisperengine_memory_{tag}_7d");
    create_collection(&q, &coll, true).await;
    let overlap = 60.0;
    // History: 2,000 points over 19 days ending a day ago (half the exchanges with a conversation_pair point).
    let t0 = now() - 20.0 * DAY;
    let mut all: Vec<P> = (0..800)
        .flat_map(|i| {
            exchange(
                &format!("u{}", i % 10),
                t0 + i as f64 * (19.0 * DAY / 800.0),
                i % 2 == 0,
            )
        })
        .collect();
    assert_eq!(all.len(), 2000);
    upsert(&q, &coll, &all).await;

    let mut ingest = MiniIngest::new(&store).await;
    let mut source = SweepSource::new(
        points(),
        store.clone(),
        settings(&tag, 256, overlap as u64, false),
    );
    let r = ingest.cycle(&mut source).await;
    let mut rows = vec![(0usize, all.len(), r.points_read(), r.duration)];
    assert_eq!(r.points_read(), 2000, "the first sweep reads the lookback");
    assert!(r.collections[0].ordered);

    // Then cycles of 100 new points each (40 exchanges 7 s apart, one cycle every 300 s, half with a pair point); the last adds nothing.
    let live = now() - DAY;
    for cycle in 1..=6usize {
        let checkpoint = store
            .checkpoint(&format!("sweep:{coll}"))
            .await
            .unwrap()
            .expect("checkpoint stored");
        let new: Vec<P> = if cycle <= 5 {
            (0..40)
                .flat_map(|j| {
                    exchange(
                        &format!("u{}", j % 10),
                        live + (cycle - 1) as f64 * 300.0 + j as f64 * 7.0,
                        j % 2 == 0,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        upsert(&q, &coll, &new).await;
        all.extend(new.iter().cloned());
        let r = ingest.cycle(&mut source).await;
        assert_eq!(source.last_cycle_points_read(), r.points_read());
        // exactly the points at or after checkpoint - overlap: the new ones and the overlap's
        let expect = all.iter().filter(|p| p.ts >= checkpoint - overlap).count() as u64;
        assert_eq!(r.points_read(), expect, "cycle {cycle}");
        assert!(
            r.points_read() <= new.len() as u64 + 25,
            "cycle {cycle} read {} for {} added",
            r.points_read(),
            new.len()
        );
        rows.push((cycle, new.len(), r.points_read(), r.duration));
    }

    println!(
        "\npoints read per sweep cycle (history 2,000 points; overlap {overlap} s; page size 256; ordered path)"
    );
    println!(
        "{:>5} {:>12} {:>11} {:>11} {:>9}",
        "cycle", "points added", "points read", "read/added", "ms"
    );
    for (c, added, read, d) in &rows {
        let ratio = if *added > 0 {
            format!("{:.2}", *read as f64 / *added as f64)
        } else {
            "-".into()
        };
        println!(
            "{c:>5} {added:>12} {read:>11} {ratio:>11} {:>9.1}",
            d.as_secs_f64() * 1000.0
        );
    }
    // Every user and bot message once, no conversation_pair point.
    assert_eq!(stored(&store, &tag).await, expected(&all, 0.0));
}

/// 2. Collection names map to bots; conversation_pair points (and other memory types) are not messages.
#[tokio::test]
async fn collections_map_to_bots_and_pairs_are_not_messages() {
    let _shared = crate::common::shared().await;
    let (store, q, tag) = (fresh_store().await, qdrant(), tag());
    let names = [
        (
            format!("whisperengine_memory_{tag}elena_7d"),
            format!("{tag}elena"),
        ),
        (format!("chat_memories_{tag}marcus"), format!("{tag}marcus")),
        (
            format!("whisperengine_memory_{tag}gabriel"),
            format!("{tag}gabriel"),
        ),
    ];
    let unrelated = format!("other_memories_{tag}x");
    let t0 = now() - 3600.0;
    let mut data = Vec::new();
    for (coll, _) in names.iter().chain([&(unrelated.clone(), String::new())]) {
        create_collection(&q, coll, true).await;
        let mut ps: Vec<P> = (0..10)
            .flat_map(|i| exchange("u1", t0 + i as f64 * 60.0, true))
            .collect();
        for i in 0..2 {
            ps.push(P {
                memory_type: "fact",
                ..P::new("u1", t0 + i as f64, "user")
            });
        }
        upsert(&q, coll, &ps).await;
        data.push(ps);
    }

    let mut ingest = MiniIngest::new(&store).await;
    let mut source = SweepSource::new(points(), store.clone(), settings(&tag, 7, 60, false));
    let r = ingest.cycle(&mut source).await;
    let seen: Vec<(&str, &str)> = r
        .collections
        .iter()
        .map(|c| (c.collection.as_str(), c.bot.as_str()))
        .collect();
    let want: Vec<(&str, &str)> = {
        let mut w: Vec<(&str, &str)> = names
            .iter()
            .map(|(c, b)| (c.as_str(), b.as_str()))
            .collect();
        w.sort();
        w
    };
    assert_eq!(
        seen, want,
        "the three WhisperEngine collections, each with its bot; {unrelated} not read"
    );
    for ((_, bot), ps) in names.iter().zip(&data) {
        let got = stored(&store, bot).await;
        assert_eq!(
            got.len(),
            20,
            "{bot}: 10 exchanges = 20 messages (no pair, no fact)"
        );
        assert_eq!(got, expected(ps, 0.0));
    }
    assert_eq!(
        ingest.ignored, 30,
        "one conversation_pair point per exchange, ignored"
    );
    assert_eq!(r.messages(), 60);
    assert_eq!(r.points_read(), 3 * 32);
}

/// 3. Ordered (index on timestamp_unix), unordered (no index) and create_index give the same messages.
#[tokio::test]
async fn ordered_and_unordered_sweeps_find_the_same_messages() {
    let _shared = crate::common::shared().await;
    let (store, q, tag) = (fresh_store().await, qdrant(), tag());
    let [a, b, c] = ["a", "b", "c"].map(|s| format!("whisperengine_memory_{tag}{s}"));
    create_collection(&q, &a, true).await;
    create_collection(&q, &b, false).await;
    create_collection(&q, &c, false).await;
    let t0 = now() - 2.0 * DAY;
    let mut ps: Vec<P> = (0..20)
        .flat_map(|i| exchange(&format!("u{}", i % 3), t0 + i as f64 * 90.0, true))
        .collect();
    // 12 messages at exactly the same timestamp_unix (more than a page of 5): paging by value must not lose them.
    let same = t0 + 600.0;
    ps.extend((0..12).map(|i| P::new(&format!("u{}", i % 3), same, "user")));
    // Old data without timestamp_unix (dated by the ISO string), one of them older than the lookback.
    ps.extend((0..3).map(|i| P {
        dated: false,
        ..P::new("u0", t0 - 3600.0 + i as f64, "user")
    }));
    ps.push(P {
        dated: false,
        ..P::new("u0", now() - 40.0 * DAY, "user")
    });
    ps.push(P::new("u0", now() - 41.0 * DAY, "user"));
    for coll in [&a, &b, &c] {
        upsert(&q, coll, &ps).await;
    }

    let mut ingest = MiniIngest::new(&store).await;
    // One source without create_index over a and b, one with it over c.
    let mut plain = {
        let (a, b, f) = (a.clone(), b.clone(), bot_for(&tag));
        let mut s = settings(&tag, 5, 60, false);
        s.bot_for_collection = Arc::new(move |n: &str| if n == a || n == b { f(n) } else { None });
        SweepSource::new(points(), store.clone(), s)
    };
    let mut indexing = {
        let (c, f) = (c.clone(), bot_for(&tag));
        let mut s = settings(&tag, 5, 60, true);
        s.bot_for_collection = Arc::new(move |n: &str| if n == c { f(n) } else { None });
        SweepSource::new(points(), store.clone(), s)
    };

    let check = async |ingest: &mut MiniIngest,
                       plain: &mut SweepSource,
                       indexing: &mut SweepSource,
                       ps: &[P]| {
        let r1 = ingest.cycle(plain).await;
        let r2 = ingest.cycle(indexing).await;
        let paths: Vec<(String, bool)> = r1
            .collections
            .iter()
            .chain(&r2.collections)
            .map(|c| (c.collection.clone(), c.ordered))
            .collect();
        assert_eq!(
            paths,
            vec![(a.clone(), true), (b.clone(), false), (c.clone(), true)]
        );
        let want = expected(ps, now() - 30.0 * DAY);
        let (sa, sb, sc) = (
            stored(&store, &format!("{tag}a")).await,
            stored(&store, &format!("{tag}b")).await,
            stored(&store, &format!("{tag}c")).await,
        );
        assert_eq!(sa, want, "ordered");
        assert_eq!(sb, want, "unordered");
        assert_eq!(sc, want, "index created by the sweep");
        (r1, r2)
    };
    let (r1, _) = check(&mut ingest, &mut plain, &mut indexing, &ps).await;
    assert_eq!(
        r1.collections[0].points_read, r1.collections[1].points_read,
        "first sweeps read the same points"
    );
    assert!(
        !has_ts_index(&q, &b).await,
        "recap never creates an index unless told to"
    );
    assert!(
        has_ts_index(&q, &c).await,
        "create_index creates the float index"
    );

    // Second cycle: new exchanges, a point written late (30 s before the checkpoint, inside the overlap), and one
    // more undated point — which, as documented, later sweeps do not find (it is left out of `want`).
    let max = ps
        .iter()
        .filter(|p| p.dated)
        .map(|p| p.ts)
        .fold(f64::MIN, f64::max);
    let mut more: Vec<P> = (0..6)
        .flat_map(|i| exchange("u1", max + 10.0 + i as f64 * 60.0, i % 2 == 0))
        .collect();
    more.push(P::new("u2", max - 30.0, "user"));
    let undated_later = P {
        dated: false,
        ..P::new("u2", max + 5.0, "user")
    };
    for coll in [&a, &b, &c] {
        upsert(
            &q,
            coll,
            &[more.clone(), vec![undated_later.clone()]].concat(),
        )
        .await;
    }
    ps.extend(more);
    check(&mut ingest, &mut plain, &mut indexing, &ps).await;
}

/// 4. An abandoned page is read again; committed pages are not — neither in the cycle nor after a restart.
#[tokio::test]
async fn abandoned_pages_are_reread_and_committed_ones_are_not() {
    let _shared = crate::common::shared().await;
    for ordered in [true, false] {
        let (store, q, tag) = (fresh_store().await, qdrant(), tag());
        let coll = format!("whisperengine_memory_{tag}");
        create_collection(&q, &coll, ordered).await;
        let t0 = now() - 3600.0;
        let ps: Vec<P> = (0..30)
            .map(|i| P::new("u1", t0 + i as f64 * 10.0, "user"))
            .collect();
        upsert(&q, &coll, &ps).await;
        let ids = |b: &Batch| {
            b.messages
                .iter()
                .map(|m| m.point_id.clone())
                .collect::<Vec<_>>()
        };
        let checkpoint = async || store.checkpoint(&format!("sweep:{coll}")).await.unwrap();

        let mut ingest = MiniIngest::new(&store).await;
        let mut source = SweepSource::new(points(), store.clone(), settings(&tag, 10, 15, false));
        // The first sweep of a collection starts with the pass over points without timestamp_unix (none here).
        let undated = source.next_batch().await.unwrap();
        assert!(undated.messages.is_empty() && undated.checkpoint.is_none() && !undated.caught_up);
        ingest.apply(&undated).await.unwrap();
        source.commit().await.unwrap();

        let mut committed: Vec<String> = Vec::new();
        let p1 = source.next_batch().await.unwrap();
        assert_eq!(p1.messages.len(), 10);
        ingest.apply(&p1).await.unwrap();
        source.commit().await.unwrap();
        committed.extend(ids(&p1));
        let after_p1 = checkpoint().await.unwrap();

        let p2 = source.next_batch().await.unwrap();
        assert_eq!(p2.messages.len(), 10);
        assert!(
            ids(&p2).iter().all(|i| !committed.contains(i)),
            "page 2 is not page 1"
        );
        source.abandon().await;
        assert_eq!(
            checkpoint().await.unwrap(),
            after_p1,
            "nothing stored for the abandoned page"
        );
        let again = source.next_batch().await.unwrap();
        assert_eq!(ids(&again), ids(&p2), "the abandoned page comes again");
        assert_eq!(again.checkpoint, p2.checkpoint);
        ingest.apply(&again).await.unwrap();
        source.commit().await.unwrap();
        committed.extend(ids(&again));
        loop {
            let b = source.next_batch().await.unwrap();
            ingest.apply(&b).await.unwrap();
            source.commit().await.unwrap();
            committed.extend(ids(&b));
            if b.caught_up {
                break;
            }
        }
        let mut sorted = committed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            committed.len(),
            "no committed page read twice ({})",
            if ordered { "ordered" } else { "unordered" }
        );
        assert_eq!(sorted.len(), 30);
        assert_eq!(source.cycles_completed(), 1);
        assert_eq!(
            source.last_cycle_points_read(),
            40,
            "30 points + the abandoned page read again"
        );
        if ordered {
            assert_eq!(
                after_p1, ps[9].ts,
                "ordered: each page stores its largest timestamp_unix"
            );
        }
        // (unordered: the payload's value, which may differ from the indexed one in the last bit)
        assert!((checkpoint().await.unwrap() - ps[29].ts).abs() < 1e-5);

        // A new process resumes from the stored checkpoint: only the overlap (15 s: the last two points) is read again.
        let mut restarted =
            SweepSource::new(points(), store.clone(), settings(&tag, 10, 15, false));
        let r = ingest.cycle(&mut restarted).await;
        assert_eq!(r.points_read(), 2);
    }
}

/// Moved from `src/source/sweep.rs` (they need the services, so `cargo test --lib` runs without them); they look into
/// the source through `SweepSource::prefetch_probe` and `SweepSource::is_failing`.
mod from_src {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use qdrant_client::qdrant::{CreateFieldIndexCollectionBuilder, FieldType, Value};
    use recap::fetch::Points;
    use recap::sink::Store;
    use recap::source::Batch;
    use recap::source::Source;
    use recap::source::sweep::{PrefetchProbe, SweepSettings, SweepSource};
    use tokio::time::Instant;

    fn now_secs() -> f64 {
        chrono::Utc::now().timestamp_micros() as f64 / 1e6
    }

    // ---- with the services (DATABASE_URL, QDRANT_URL: `eval "$(scripts/services up)"`)

    fn env(name: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: this test needs the real services; start them with `eval \"$(scripts/services up)\"`")
        })
    }

    /// A fresh database with recap's schema; returns it and its name (to drop it).
    async fn fresh_store() -> (Store, String) {
        let opts: sqlx::postgres::PgConnectOptions =
            env("DATABASE_URL").parse().expect("DATABASE_URL");
        let admin = Store::connect(opts.clone(), 1).await.expect("connect");
        let db = format!("recap_unit_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(admin.pool())
            .await
            .expect("create database");
        admin.pool().close().await;
        let store = Store::connect(opts.database(&db), 2)
            .await
            .expect("connect");
        store.migrate().await.expect("migrations");
        (store, db)
    }

    async fn drop_db(store: Store, db: &str) {
        store.pool().close().await;
        let opts: sqlx::postgres::PgConnectOptions =
            env("DATABASE_URL").parse().expect("DATABASE_URL");
        let admin = Store::connect(opts, 1).await.expect("connect");
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(admin.pool())
        .await;
    }

    /// A message point with an integer id (so its place in id order is known).
    fn message(id: u64, ts: f64) -> qdrant_client::qdrant::PointStruct {
        let s = |v: &str| Value::from(v.to_string());
        let iso = chrono::DateTime::from_timestamp_micros((ts * 1e6).round() as i64)
            .unwrap()
            .naive_utc()
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string();
        let payload: HashMap<String, Value> = [
            ("user_id", s("u1")),
            ("content", s(&format!("message {id}"))),
            ("role", s("user")),
            ("source", s("user_message")),
            ("memory_type", s("conversation")),
            ("timestamp", s(&iso)),
            ("timestamp_unix", Value::from(ts)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        qdrant_client::qdrant::PointStruct::new(id, vec![0.5f32, 0.5], payload)
    }

    async fn upsert(points: &Points, coll: &str, ps: Vec<qdrant_client::qdrant::PointStruct>) {
        points
            .client()
            .upsert_points(qdrant_client::qdrant::UpsertPointsBuilder::new(coll, ps).wait(true))
            .await
            .expect("upsert");
    }

    fn prefetch_of(source: &SweepSource) -> Option<PrefetchProbe> {
        source.prefetch_probe()
    }

    /// Waits until the prefetch (there must be one) has its page.
    async fn prefetch_arrived(source: &SweepSource) {
        let until = Instant::now() + Duration::from_secs(10);
        while !prefetch_of(source).expect("a prefetch").arrived {
            assert!(Instant::now() < until, "the prefetch never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn ids(b: &Batch) -> Vec<String> {
        b.messages.iter().map(|m| m.point_id.clone()).collect()
    }

    /// With prefetch on, an abandoned page is read again exactly and the cycle goes on from it: no point lost, none
    /// delivered twice. Both when the page read again is unchanged (the prefetched next page is used) and when a
    /// point was added to it meanwhile (its next page starts elsewhere: the prefetched one is discarded, counted as
    /// read, never delivered) — on the ordered and the unordered path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_page_is_read_again_exactly_with_prefetch() {
        let _shared = crate::common::shared().await;
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let points = Arc::new(
            Points::new(
                &env("QDRANT_URL"),
                None,
                recap::fetch::PayloadMapping::default(),
            )
            .expect("QDRANT_URL"),
        );
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        for ordered in [true, false] {
            for changed in [false, true] {
                let coll = format!("sweep_unit_{tag}_{ordered}_{changed}");
                points
                    .client()
                    .create_collection(
                        CreateCollectionBuilder::new(&coll)
                            .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
                    )
                    .await
                    .expect("create collection");
                if ordered {
                    points
                        .client()
                        .create_field_index(
                            CreateFieldIndexCollectionBuilder::new(
                                &coll,
                                "timestamp_unix",
                                FieldType::Float,
                            )
                            .wait(true),
                        )
                        .await
                        .expect("index");
                }
                // 30 points: ids 100, 110, ... and times t0, t0 + 10 s, ...: id order is time order
                let t0 = now_secs() - 3600.0;
                let at = |i: u64| (100 + 10 * i, t0 + 10.0 * i as f64);
                upsert(
                    &points,
                    &coll,
                    (0..30).map(|i| message(at(i).0, at(i).1)).collect(),
                )
                .await;
                let c = coll.clone();
                let settings = SweepSettings {
                    interval: Duration::from_secs(3600),
                    lookback: Duration::from_secs(86_400),
                    overlap: Duration::from_secs(15),
                    page_size: 10,
                    bot_for_collection: Arc::new(move |n: &str| (n == c).then(|| "b".to_string())),
                    create_index: false,
                    checkpoint_prefix: "sweep".into(),
                    keep_user: None,
                };
                let mut source = SweepSource::new(points.clone(), store.clone(), settings);
                let what = format!("ordered={ordered} changed={changed}");
                let expect_ids = |r: std::ops::Range<u64>| -> Vec<String> {
                    r.map(|i| at(i).0.to_string()).collect()
                };

                let undated = source.next_batch().await.unwrap();
                assert!(undated.messages.is_empty() && !undated.caught_up, "{what}");
                source.commit().await.unwrap();
                let mut committed = Vec::new();
                let p1 = source.next_batch().await.unwrap();
                assert_eq!(ids(&p1), expect_ids(0..10), "{what}");
                source.commit().await.unwrap();
                committed.extend(ids(&p1));

                let p2 = source.next_batch().await.unwrap();
                assert_eq!(ids(&p2), expect_ids(10..20), "{what}");
                prefetch_arrived(&source).await; // page 3 is here, not handed out
                let page3 = prefetch_of(&source).unwrap().cursor.clone();
                source.abandon().await;
                if changed {
                    // a point inside page 2, in time and in id order
                    upsert(&points, &coll, vec![message(255, t0 + 155.0)]).await;
                }
                let again = source.next_batch().await.unwrap();
                let next = prefetch_of(&source).expect("a prefetch").cursor.clone();
                if changed {
                    let mut want = expect_ids(10..16);
                    want.push("255".into());
                    want.extend(expect_ids(16..19));
                    assert_eq!(ids(&again), want, "{what}: page 2 as it is now");
                    assert_ne!(next, page3, "{what}: the prefetched page 3 was discarded");
                } else {
                    assert_eq!(
                        ids(&again),
                        ids(&p2),
                        "{what}: the abandoned page comes again"
                    );
                    assert_eq!(again.checkpoint, p2.checkpoint, "{what}");
                    assert_eq!(next, page3, "{what}: the prefetched page 3 is kept");
                }
                source.commit().await.unwrap();
                committed.extend(ids(&again));
                loop {
                    let b = source.next_batch().await.unwrap();
                    source.commit().await.unwrap();
                    committed.extend(ids(&b));
                    if b.caught_up {
                        break;
                    }
                }
                let mut want = expect_ids(0..30);
                if changed {
                    want.insert(16, "255".into());
                }
                if ordered {
                    assert_eq!(committed, want, "{what}: every point once, in time order");
                } else {
                    let mut sorted = committed.clone();
                    sorted.sort_by_key(|i| i.parse::<u64>().unwrap());
                    assert_eq!(sorted, want, "{what}: every point once");
                }
                assert_eq!(source.cycles_completed(), 1, "{what}");
                // 30 (or 31) points + page 2 read again (+ the discarded page 3)
                let read = if changed { 31 + 10 + 10 } else { 30 + 10 };
                assert_eq!(source.last_cycle_points_read(), read, "{what}");
                let _ = points.client().delete_collection(&coll).await;
            }
        }
        drop_db(store, &db).await;
    }

    /// Issue 24, case 3: an unordered sweep (no `timestamp_unix` range index) whose scroll takes longer than the
    /// overlap stores a checkpoint from which the next cycle still reads a point written during the scroll with an id
    /// below the cursor (this cycle could not see it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unordered_sweep_never_checkpoints_past_a_point_written_behind_its_cursor() {
        let _shared = crate::common::shared().await;
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let points = Arc::new(
            Points::new(
                &env("QDRANT_URL"),
                None,
                recap::fetch::PayloadMapping::default(),
            )
            .expect("QDRANT_URL"),
        );
        let coll = format!(
            "sweep_unit_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        points
            .client()
            .create_collection(
                CreateCollectionBuilder::new(&coll)
                    .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
            )
            .await
            .expect("create collection");
        let t0 = now_secs() - 60.0;
        upsert(
            &points,
            &coll,
            (0..30u64)
                .map(|i| message(100 + 10 * i, t0 + i as f64 * 0.1))
                .collect(),
        )
        .await;
        let c = coll.clone();
        let overlap = Duration::from_secs(1);
        let settings = SweepSettings {
            interval: Duration::from_secs(3600),
            lookback: Duration::from_secs(86_400),
            overlap,
            page_size: 10,
            bot_for_collection: Arc::new(move |n: &str| (n == c).then(|| "b".to_string())),
            create_index: false,
            checkpoint_prefix: "sweep".into(),
            keep_user: None,
        };
        let mut source = SweepSource::new(points.clone(), store.clone(), settings);
        let mut read = Vec::new();
        loop {
            let b = source.next_batch().await.unwrap();
            source.commit().await.unwrap();
            read.extend(ids(&b));
            if read.len() >= 10 {
                break;
            }
        }
        // written during the scroll, behind its cursor; then the scroll goes on for longer than the overlap and reads
        // a newer point
        let x_ts = now_secs();
        upsert(&points, &coll, vec![message(5, x_ts)]).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        upsert(&points, &coll, vec![message(1000, now_secs())]).await;
        let last = loop {
            let b = source.next_batch().await.unwrap();
            source.commit().await.unwrap();
            read.extend(ids(&b));
            if b.caught_up {
                break b;
            }
        };
        assert!(!read.contains(&"5".to_string()), "behind the cursor");
        assert!(read.contains(&"1000".to_string()));
        let position = last.checkpoint.expect("a checkpoint").position.to_column();
        assert!(
            position - overlap.as_secs_f64() <= x_ts,
            "the next cycle starts at {} and never reads the point written at {x_ts}",
            position - overlap.as_secs_f64()
        );
        let _ = points.client().delete_collection(&coll).await;
        drop_db(store, &db).await;
    }

    /// A TCP proxy to Qdrant that cuts every connection on which a request names `poison` (a collection): that
    /// collection's requests fail as a broken collection's would, the others pass.
    async fn poisoning_proxy(target: String, poison: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, poison) = (target.clone(), poison.clone());
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = out.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = ri.read(&mut buf).await {
                        if n == 0
                            || buf[..n]
                                .windows(poison.len())
                                .any(|w| w == poison.as_bytes())
                        {
                            break;
                        }
                        if wo.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    back.abort();
                });
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    /// Issue 24, case 6: a collection whose every request fails is skipped with a back-off; the others are read and
    /// the cycle completes (its horizon, and in hybrid mode the event-time ticks, go on), holding back only the
    /// failing collection's bot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_collection_is_skipped_and_the_cycle_goes_on() {
        let _shared = crate::common::shared().await;
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let direct = Points::new(
            &env("QDRANT_URL"),
            None,
            recap::fetch::PayloadMapping::default(),
        )
        .expect("QDRANT_URL");
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let (bad, good) = (
            format!("sweep_unit_{tag}_a_bad"),
            format!("sweep_unit_{tag}_b_good"),
        );
        for coll in [&bad, &good] {
            direct
                .client()
                .create_collection(
                    CreateCollectionBuilder::new(coll)
                        .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
                )
                .await
                .expect("create collection");
            let t0 = now_secs() - 60.0;
            upsert(
                &direct,
                coll,
                (0..5u64).map(|i| message(100 + i, t0 + i as f64)).collect(),
            )
            .await;
        }
        let target = env("QDRANT_URL").trim_start_matches("http://").to_string();
        let url = poisoning_proxy(target, bad.clone()).await;
        let points = Arc::new(
            Points::new(&url, None, recap::fetch::PayloadMapping::default()).expect("proxy url"),
        );
        let (b2, g2) = (bad.clone(), good.clone());
        let settings = SweepSettings {
            interval: Duration::from_secs(3600),
            lookback: Duration::from_secs(86_400),
            overlap: Duration::from_secs(15),
            page_size: 10,
            bot_for_collection: Arc::new(move |n: &str| {
                if n == b2 {
                    Some("badbot".to_string())
                } else if n == g2 {
                    Some("goodbot".to_string())
                } else {
                    None
                }
            }),
            create_index: false,
            checkpoint_prefix: "sweep".into(),
            keep_user: None,
        };
        let mut source = SweepSource::new(points.clone(), store.clone(), settings);
        let mut read: Vec<String> = Vec::new();
        let mut last = None;
        for _ in 0..20 {
            match source.next_batch().await {
                Ok(b) => {
                    source.commit().await.unwrap();
                    read.extend(b.messages.iter().map(|m| m.bot.clone()));
                    if b.caught_up {
                        last = Some(b);
                        break;
                    }
                }
                Err(e) => {
                    source.abandon().await;
                    println!("sweep error: {e}");
                }
            }
        }
        let last = last.expect("the cycle completes despite the failing collection");
        assert_eq!(source.cycles_completed(), 1);
        assert_eq!(
            read,
            vec!["goodbot".to_string(); 5],
            "the good collection is read"
        );
        assert!(last.horizon.is_some());
        assert_eq!(
            last.held_back,
            vec!["badbot".to_string()],
            "only the failing bot held back"
        );
        assert!(source.is_failing(&bad));
        for coll in [&bad, &good] {
            let _ = direct.client().delete_collection(coll).await;
        }
        drop_db(store, &db).await;
    }
}
