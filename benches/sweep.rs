//! Sweep vs raw scroll (issue 9, part 3), on one collection of 100,000 WhisperEngine-shaped points (payload + a small
//! 4-d `content` vector; `BENCH_SWEEP_POINTS` sets the count; the test Qdrant server loads about 11k points/s, and
//! the whole bench takes about 75 s on 2 cores), with a float index on `timestamp_unix` as the bots' collections have:
//!   (a) raw: qdrant-client scroll, filter `timestamp_unix >= start`, no vectors, the same payload fields recap reads,
//!       pages of 1000, offset paging, one request at a time;
//!   (a2) for context: the raw scroll in recap's own query shape (`order_by` on `timestamp_unix` with `start_from`,
//!       paging by the last value seen), one request at a time;
//!   (b0) for context: recap's `SweepSource` alone (pages mapped into batches, nothing done with them);
//!   (b) recap: `SweepSource` (a stored checkpoint, so the steady-state ranged path, `order_by` on the index) feeding
//!       the pure tracker (observe every message, drain what closed) through `sweep_once`. The source prefetches one
//!       page ahead (the next page's request goes out as soon as a page arrives), so its round trips overlap the
//!       mapping, tracking and committing of the page before;
//!   (b') for information: the same cycle through `Ingest::apply` (the Postgres transaction per page), run 0 only.
//! Ratio b/a (target >= 0.9); b/a2 for context: on the test server an `order_by` page costs more than an offset page,
//! which bounds b/a at about a2/a.
//! Then points read per cycle as history grows 10x with a constant number of new points per cycle: a collection
//! with H old points; each cycle adds H old points (history, older than the checkpoint) and K new points spread over
//! the sweep interval (timestamps advancing 5 minutes per cycle); one cycle through `Ingest::apply` (so checkpoints
//! are committed) and its points read are printed. Flat = the last cycle reads no more than 1.25x the first one.
//!
//! Needs DATABASE_URL and QDRANT_URL. `cargo bench --bench sweep`. Environment: `BENCH_SWEEP_POINTS` (100,000),
//! `BENCH_SWEEP_HISTORY` (H, 5,000), `BENCH_SWEEP_NEW` (K, 1,000), `BENCH_RUNS` (3).
//! Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`.
#![allow(clippy::type_complexity)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    Condition, FieldType, Filter, PayloadIncludeSelector, PointId, PointStruct, Range,
    ScrollPointsBuilder,
};
use recap::model::{Position, SourceCheckpoint, SweepPos};
use recap::pipeline::{Ingest, now_ms};
use recap::source::Batch;
use recap::source::sweep::{SweepSource, sweep_once};
use recap::tracker::Tracker;
use tokio_util::sync::CancellationToken;

mod common;
use common::{
    Columns, Rng, create_collection, drop_db, emit, env, env_usize, fresh_db, summary, token,
    upsert, we_point,
};

const SUMMARY: Columns = Columns {
    label: 34,
    value: 10,
    decimals: 2,
};

/// The payload fields recap reads (the raw scrolls ask for the same).
const FIELDS: [&str; 7] = [
    "user_id",
    "content",
    "role",
    "memory_type",
    "timestamp",
    "timestamp_unix",
    "source",
];

const TEXTS: &[&str] = &[
    "I have been learning to play the guitar every evening after work",
    "my sister is visiting next weekend and we plan a hiking trip in the mountains",
    "the new job at the bakery starts on monday and I am nervous about it",
    "That sounds wonderful, tell me more about the trip and who is coming along",
    "we talked about marine biology and the coral reefs near the coast",
    "training for the marathon is going well, my knee feels better",
];

/// `n` WhisperEngine-shaped points with times in `[from_ms, to_ms)`: exchanges of a user message, the bot's reply and a
/// `conversation_pair` point, 2,000 users; a 4-d `content` vector.
fn points(n: usize, from_ms: i64, to_ms: i64, seed: u64) -> Vec<PointStruct> {
    let mut rng = Rng(seed | 1);
    let span = (to_ms - from_ms).max(1) as u64;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let user = format!(
            "{}",
            200_000_000_000_000_000u64 + rng.below(2_000) * 1_000_003
        );
        let t = from_ms + rng.below(span) as i64;
        let k = rng.below(TEXTS.len() as u64) as usize;
        for (role, dt) in [("user", 0), ("assistant", 1), ("conversation_pair", 0)] {
            if out.len() == n {
                break;
            }
            let ts = (t + dt).min(to_ms - 1);
            let v: Vec<f32> = (0..4).map(|_| (rng.below(1000) as f32) / 1000.0).collect();
            out.push(we_point(
                uuid::Uuid::new_v4().to_string(),
                &user,
                role,
                &format!("{} ({user})", TEXTS[k]),
                ts,
                "joy",
                v,
            ));
        }
    }
    out
}

/// A collection shaped like the bots' ones: a 4-d `content` vector, `user_id` and `timestamp_unix` indexed.
async fn create(q: &Qdrant, coll: &str) {
    let indexes = [
        ("user_id", FieldType::Keyword),
        ("timestamp_unix", FieldType::Float),
    ];
    create_collection(q, coll, 4, &indexes).await;
}

/// (a) The raw scroll: `timestamp_unix >= start`, the payload fields recap reads, no vectors, pages of 1000.
async fn raw_scroll(q: &Qdrant, coll: &str, start_secs: f64) -> usize {
    let fields: Vec<String> = FIELDS.map(String::from).into();
    let mut offset: Option<PointId> = None;
    let mut read = 0;
    loop {
        let mut req = ScrollPointsBuilder::new(coll)
            .filter(Filter::must([Condition::range(
                "timestamp_unix",
                Range {
                    gte: Some(start_secs),
                    ..Default::default()
                },
            )]))
            .limit(1000)
            .with_payload(PayloadIncludeSelector {
                fields: fields.clone(),
            })
            .with_vectors(false);
        if let Some(o) = offset.take() {
            req = req.offset(o);
        }
        let page = q.scroll(req).await.expect("scroll");
        read += page.result.len();
        match page.next_page_offset {
            Some(o) => offset = Some(o),
            None => break,
        }
    }
    read
}

/// (a2) The raw scroll in the shape recap's ordered path uses: `order_by timestamp_unix` ascending with `start_from`
/// (inclusive; no range condition), the next page from the last value seen minus the ids already returned at that
/// value; one request at a time (no prefetch).
async fn raw_ordered_scroll(q: &Qdrant, coll: &str, start_secs: f64) -> usize {
    use qdrant_client::qdrant::{Direction, OrderByBuilder, order_value, start_from};
    let fields: Vec<String> = FIELDS.map(String::from).into();
    let (mut from, mut seen): (f64, Vec<PointId>) = (start_secs, Vec::new());
    let mut read = 0;
    loop {
        let mut req = ScrollPointsBuilder::new(coll);
        if !seen.is_empty() {
            req = req.filter(Filter::must_not([Condition::has_id(seen.clone())]));
        }
        let req = req
            .limit(1000)
            .with_payload(PayloadIncludeSelector {
                fields: fields.clone(),
            })
            .with_vectors(false)
            .order_by(
                OrderByBuilder::new("timestamp_unix")
                    .direction(Direction::Asc as i32)
                    .start_from(start_from::Value::Float(from)),
            );
        let page = q.scroll(req).await.expect("scroll");
        read += page.result.len();
        if page.result.len() < 1000 {
            break;
        }
        let val = |p: &qdrant_client::qdrant::RetrievedPoint| match p
            .order_value
            .as_ref()
            .and_then(|v| v.variant.as_ref())
        {
            Some(order_value::Variant::Float(f)) => *f,
            Some(order_value::Variant::Int(i)) => *i as f64,
            None => f64::NAN,
        };
        let last = val(page.result.last().expect("page"));
        let at_last = page
            .result
            .iter()
            .filter(|p| val(p) == last)
            .filter_map(|p| p.id.clone());
        seen = if last == from {
            seen.into_iter().chain(at_last).collect()
        } else {
            at_last.collect()
        };
        from = last;
    }
    read
}

/// recap's config, store (fresh database) and sweep settings reading only `coll` (as bot `bot`).
async fn setup(
    admin: &str,
    qdrant: &str,
    coll: &str,
    bot: &str,
) -> (
    recap::config::Config,
    recap::sink::Store,
    recap::source::sweep::SweepSettings,
    String,
) {
    let (db_url, db_name) = fresh_db(admin).await;
    let cfg = common::config(
        &db_url,
        qdrant,
        &["--summarizer", "extractive", "--instance-id", "bench-sweep"],
    );
    let store = common::store(&cfg).await;
    let mut settings = recap::cmd::sweep_settings(&cfg);
    let (c, b) = (coll.to_string(), bot.to_string());
    settings.bot_for_collection = Arc::new(move |name: &str| (name == c).then(|| b.clone()));
    (cfg, store, settings, db_name)
}

/// Stores the sweep checkpoint of `coll` so the next cycle starts at `start_secs` (steady state, not a first sweep).
async fn set_checkpoint(
    store: &recap::sink::Store,
    coll: &str,
    start_secs: f64,
    overlap: Duration,
) {
    let fence = store
        .try_acquire_leader("bench-checkpoint", Duration::from_secs(5))
        .await
        .expect("leader")
        .expect("free");
    let mut tx = store.begin_ingest(&fence).await.expect("begin");
    tx.save_checkpoint(&SourceCheckpoint {
        name: format!("sweep:{coll}"),
        position: Position::Sweep(SweepPos(start_secs + overlap.as_secs_f64())),
        points_read: 0,
    })
    .await
    .expect("checkpoint");
    tx.commit().await.expect("commit");
    store.release_leader(&fence).await.expect("release");
}

/// (b) recap's sweep feeding the pure tracker. Returns (points read, messages fed, windows closed).
async fn recap_sweep(
    points: Arc<recap::fetch::Points>,
    store: recap::sink::Store,
    settings: recap::source::sweep::SweepSettings,
    cfg: &recap::config::Config,
) -> (u64, usize, usize) {
    let mut source = SweepSource::new(points, store, settings);
    let mut tracker = Tracker::new(cfg.tracker_config());
    let (mut msgs, mut closed) = (0usize, 0usize);
    let report = sweep_once(&mut source, async |b: &Batch| {
        for m in &b.messages {
            tracker.observe(&m.bot, &m.user_id, &m.point_id, m.ts_ms);
        }
        msgs += b.messages.len();
        closed += tracker.drain_closed().len();
        Ok::<(), std::io::Error>(())
    })
    .await
    .expect("sweep");
    (report.points_read(), msgs, closed)
}

/// (b0) recap's sweep source alone (pages mapped into batches, nothing done with them). Returns points read.
async fn recap_sweep_source_only(
    points: Arc<recap::fetch::Points>,
    store: recap::sink::Store,
    settings: recap::source::sweep::SweepSettings,
) -> u64 {
    let mut source = SweepSource::new(points, store, settings);
    let report = sweep_once(&mut source, async |_b: &Batch| Ok::<(), std::io::Error>(()))
        .await
        .expect("sweep");
    report.points_read()
}

/// (b') the same cycle through `Ingest::apply` (Postgres transaction per page, checkpoints stored).
async fn recap_sweep_ingest(
    cfg: &recap::config::Config,
    store: &recap::sink::Store,
    points: Arc<recap::fetch::Points>,
    settings: recap::source::sweep::SweepSettings,
) -> recap::source::sweep::SweepReport {
    let ctx = common::context(
        cfg,
        store,
        points.clone(),
        Arc::new(recap::summarize::extractive::Extractive),
    );
    let mut ingest = Ingest::start(ctx, &CancellationToken::new())
        .await
        .expect("leader")
        .expect("ingest");
    let mut source = SweepSource::new(points, store.clone(), settings);
    let r = sweep_once(&mut source, async |b: &Batch| {
        ingest.apply(b, now_ms()).await.map(drop)
    })
    .await
    .expect("sweep");
    ingest.release().await;
    r
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin = env("DATABASE_URL");
    let qdrant_url = env("QDRANT_URL");
    let n = env_usize("BENCH_SWEEP_POINTS", 100_000);
    let hist = env_usize("BENCH_SWEEP_HISTORY", 5_000);
    let new = env_usize("BENCH_SWEEP_NEW", 1_000);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let q = common::qdrant(&qdrant_url, Duration::from_secs(300));
    println!(
        "sweep benchmark: {n} points, {runs} runs; growth: history {hist} -> {} points, {new} new points per cycle",
        hist * 10
    );

    // ---- (a) vs (b) ----
    let bot = format!("bs{}", token());
    let coll = format!("whisperengine_memory_{bot}_7d");
    let now = now_ms();
    let (from, to) = (now - 10 * 86_400_000, now - 3_600_000);
    create(&q, &coll).await;
    let t = Instant::now();
    upsert(&q, &coll, points(n, from, to, 0xabc), 1000).await;
    eprintln!(
        "  loaded {n} points into {coll} in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let start_secs = (from as f64 / 1000.0) - 1.0;
    let mut agg: Vec<(&str, &str, Vec<f64>)> = vec![
        ("(a) raw scroll (offset paging)", "points/s", vec![]),
        ("(a2) raw scroll (order_by paging)", "points/s", vec![]),
        ("(b0) sweep source alone", "points/s", vec![]),
        ("(b) sweep -> tracker", "points/s", vec![]),
        ("ratio b/a", "x", vec![]),
        ("ratio b/a2", "x", vec![]),
    ];
    for r in 0..runs {
        let (cfg, store, settings, db) = setup(&admin, &qdrant_url, &coll, &bot).await;
        set_checkpoint(&store, &coll, start_secs, settings.overlap).await;
        let points = recap::cmd::points(&cfg).expect("points");
        let mut rate = [0f64; 4];
        // alternate the order of the four measurements between runs
        let order: [usize; 4] = if r % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        let (mut msgs, mut closed) = (0, 0);
        for i in order {
            let t = Instant::now();
            let got = match i {
                0 => raw_scroll(&q, &coll, start_secs).await as u64,
                1 => raw_ordered_scroll(&q, &coll, start_secs).await as u64,
                2 => recap_sweep_source_only(points.clone(), store.clone(), settings.clone()).await,
                _ => {
                    let (read, m, c) =
                        recap_sweep(points.clone(), store.clone(), settings.clone(), &cfg).await;
                    (msgs, closed) = (m, c);
                    read
                }
            };
            rate[i] = got as f64 / t.elapsed().as_secs_f64();
            assert_eq!(got as usize, n, "every point read once (measurement {i})");
        }
        eprintln!(
            "  run {r}: raw {:.0} / raw ordered {:.0} / sweep source {:.0} / sweep -> tracker {:.0} points/s ({msgs} messages, {closed} windows closed); b/a = {:.3}, b/a2 = {:.3}",
            rate[0],
            rate[1],
            rate[2],
            rate[3],
            rate[3] / rate[0],
            rate[3] / rate[1]
        );
        emit("sweep_raw_points_per_sec", rate[0], "points/s");
        emit("sweep_raw_ordered_points_per_sec", rate[1], "points/s");
        emit("sweep_source_points_per_sec", rate[2], "points/s");
        emit("sweep_recap_points_per_sec", rate[3], "points/s");
        emit("sweep_ratio", rate[3] / rate[0], "x");
        emit("sweep_ratio_vs_ordered", rate[3] / rate[1], "x");
        for (k, v) in [
            rate[0],
            rate[1],
            rate[2],
            rate[3],
            rate[3] / rate[0],
            rate[3] / rate[1],
        ]
        .into_iter()
        .enumerate()
        {
            agg[k].2.push(v);
        }
        if r == 0 {
            let t = Instant::now();
            let rep = recap_sweep_ingest(&cfg, &store, points.clone(), settings.clone()).await;
            let ing = rep.points_read() as f64 / t.elapsed().as_secs_f64();
            eprintln!(
                "  run {r}: for information, sweep -> Ingest::apply (Postgres transaction per page): {ing:.0} points/s"
            );
            emit("sweep_ingest_points_per_sec", ing, "points/s");
        }
        store.pool().close().await;
        drop_db(&admin, &db).await;
    }
    for (m, u, v) in agg {
        summary(&SUMMARY, m, u, v);
    }
    let _ = q.delete_collection(&coll).await;

    // ---- points read per cycle as history grows 10x ----
    let bot = format!("bg{}", token());
    let coll = format!("whisperengine_memory_{bot}_7d");
    create(&q, &coll).await;
    let (cfg, store, settings, db) = setup(&admin, &qdrant_url, &coll, &bot).await;
    let points_api = recap::cmd::points(&cfg).expect("points");
    let interval = settings.interval.as_millis() as i64;
    let cycles = 10usize;
    let now = now_ms();
    // cycle c's new points lie in the c-th sweep interval of the last `cycles` intervals; history is older than all
    let new_base = now - cycles as i64 * interval;
    let old = |c: u64| {
        points(
            hist,
            now - 20 * 86_400_000,
            new_base - 3_600_000,
            0x1000 + c,
        )
    };
    upsert(&q, &coll, old(0), 1000).await;
    let rep = recap_sweep_ingest(&cfg, &store, points_api.clone(), settings.clone()).await;
    println!(
        "  points read per cycle (overlap {}s, interval {}s; cycle 0 = first sweep of {hist} points):",
        settings.overlap.as_secs(),
        settings.interval.as_secs()
    );
    println!(
        "    {:>5} {:>10} {:>8} {:>12} {:>9} {:>9}",
        "cycle", "in coll.", "new", "points read", "read/new", "cycle ms"
    );
    println!(
        "    {:>5} {:>10} {:>8} {:>12} {:>9} {:>9.0}",
        0,
        hist,
        hist,
        rep.points_read(),
        "",
        rep.duration.as_secs_f64() * 1000.0
    );
    let mut reads = Vec::new();
    for c in 1..cycles {
        upsert(&q, &coll, old(c as u64), 1000).await;
        let lo = new_base + (c as i64 - 1) * interval;
        upsert(
            &q,
            &coll,
            points(new, lo, lo + interval, 0x2000 + c as u64),
            1000,
        )
        .await;
        let rep = recap_sweep_ingest(&cfg, &store, points_api.clone(), settings.clone()).await;
        let read = rep.points_read();
        println!(
            "    {:>5} {:>10} {:>8} {:>12} {:>9.2} {:>9.0}",
            c,
            hist * (c + 1) + new * c,
            new,
            read,
            read as f64 / new as f64,
            rep.duration.as_secs_f64() * 1000.0
        );
        emit(
            &format!("sweep_cycle{c}_points_read"),
            read as f64,
            "points",
        );
        reads.push(read as f64);
    }
    // the overlap re-reads the last cycles' points: flat once the overlap is full (from cycle 3 on with the defaults)
    let steady = &reads[2.min(reads.len() - 1)..];
    let (lo, hi) = steady
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
    let growth = hi / lo.max(1.0);
    let size = hist * cycles + new * (cycles - 1);
    println!(
        "  steady cycles (3..): points read {lo:.0}..{hi:.0}, max/min {growth:.2}, while the collection grew from {hist} to {size} points ({:.1}x)",
        size as f64 / hist as f64
    );
    emit("sweep_collection_growth", size as f64 / hist as f64, "x");
    emit("sweep_points_read_growth", growth, "x");
    emit("sweep_points_read_per_new_point", hi / new as f64, "x");
    store.pool().close().await;
    drop_db(&admin, &db).await;
    let _ = q.delete_collection(&coll).await;
}
