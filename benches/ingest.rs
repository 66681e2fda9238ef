//! Ingest vs raw JetStream (issue 9, part 2). In one run: the same events (the recap event shape, 8 bots, 10,000
//! users in sessions, unique `Nats-Msg-Id`) are published into two fresh streams (recap's stream definition), then
//! consumed
//!   (a) by a bare async-nats pull consumer that only acknowledges (`consumer.stream().max_messages_per_batch(500)`),
//!   (b) by recap: `NatsSource` + `Ingest::apply` (parse, tracker, one Postgres transaction per batch with the
//!       messages, the windows closed, watermarks and the stream position, then the acks) into a fresh migrated
//!       database.
//! Reported: msgs/s of both and the ratio b/a (target >= 0.7), publish rate, windows closed.
//!
//! Needs NATS_URL, DATABASE_URL and QDRANT_URL (`eval "$(scripts/services up)"`); QDRANT_URL is only used to build
//! recap's `Context` (ingest does not read Qdrant).
//! `cargo bench --bench ingest`. Environment: `BENCH_EVENTS` (default 200,000), `BENCH_RUNS` (default 3).
//! Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`, one per run.
#![allow(clippy::type_complexity)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use recap::event::StoredEvent;
use recap::pipeline::{Ingest, now_ms};
use recap::source::Source;
use recap::source::nats::{NatsSettings, NatsSource, consumer_config, stream_config};
use tokio_util::sync::CancellationToken;

mod common;
use common::{BOTS, Columns, MIN, Rng, drop_db, emit, env, env_usize, fresh_db, summary, token};

/// recap's config for reading stream `s` with durable `consumer` into the database at `db_url` (extractive
/// summarizer; INGEST_BATCH_SIZE from `BENCH_INGEST_BATCH`, default recap's own default), plus `extra` arguments.
fn config(db_url: &str, s: &NatsSettings, consumer: &str, extra: &[&str]) -> recap::config::Config {
    let batch = env_usize("BENCH_INGEST_BATCH", 500).to_string();
    let nats = [
        "--nats-url",
        &s.url,
        "--nats-stream",
        &s.stream,
        "--nats-consumer",
        consumer,
        "--nats-subject-prefix",
        &s.subject_prefix,
        "--summarizer",
        "extractive",
        "--ingest-batch-size",
        &batch,
    ];
    let args: Vec<&str> = nats.iter().chain(extra).copied().collect();
    common::config(db_url, &env("QDRANT_URL"), &args)
}

const SUMMARY: Columns = Columns {
    label: 28,
    value: 12,
    decimals: 2,
};

/// `n` events: 10,000 users of 8 bots in sessions of 2..40 messages 5 s..5 min apart, sessions hours apart, over the
/// last days (so windows close by event time while they stream in, as in a backfill or after an outage), published in
/// time order with up to 60 s of jitter. Every event has its own point id (UUID).
fn events(n: usize) -> Vec<StoredEvent> {
    let mut rng = Rng(0x1e57);
    let users = 10_000usize.min(n.max(1));
    let start = now_ms() - 4 * 24 * 60 * MIN;
    let mut out: Vec<(i64, StoredEvent)> = Vec::with_capacity(n);
    for u in 0..users {
        let user = format!(
            "{}",
            100_000_000_000_000_000u64
                + (u as u64).wrapping_mul(7_919_000_013) % 800_000_000_000_000_000
        );
        let bot = BOTS[rng.below(BOTS.len() as u64) as usize];
        let mut t = start + rng.below(24 * 60) as i64 * MIN;
        let mut left = n / users + usize::from(u < n % users);
        let mut user_turn = true;
        while left > 0 {
            let len = (2 + rng.below(39) as usize).min(left);
            for _ in 0..len {
                t += 5_000 + rng.below(5 * MIN as u64) as i64;
                let e = StoredEvent {
                    v: 1,
                    bot: bot.to_string(),
                    collection: Some(format!("whisperengine_memory_{bot}_7d")),
                    point_id: uuid::Uuid::new_v4().to_string(),
                    user_id: user.clone(),
                    role: Some(if user_turn { "user" } else { "assistant" }.to_string()),
                    ts: chrono::DateTime::from_timestamp_millis(t).expect("time"),
                };
                user_turn = !user_turn;
                out.push((t + rng.below(60_000) as i64, e));
            }
            left -= len;
            t += (60 + rng.below(11 * 60) as i64) * MIN;
        }
    }
    out.sort_by_key(|(arrival, _)| *arrival);
    out.into_iter().map(|(_, e)| e).collect()
}

fn settings(url: &str, stream: &str, consumer: &str, prefix: &str) -> NatsSettings {
    NatsSettings {
        url: url.to_string(),
        stream: stream.to_string(),
        consumer: consumer.to_string(),
        subject_prefix: prefix.to_string(),
        max_age: Duration::from_secs(7 * 86400),
        batch_size: 500,
        ..Default::default()
    }
}

/// Publishes every event (body + `Nats-Msg-Id`) with up to 1,024 acks in flight; returns msgs/s.
async fn publish(
    js: &jetstream::Context,
    prefix: &str,
    bodies: &[(String, Vec<u8>)],
    evs: &[StoredEvent],
) -> f64 {
    let t = Instant::now();
    let mut acks = VecDeque::with_capacity(1100);
    for ((subject, body), e) in bodies.iter().zip(evs) {
        let m = jetstream::message::PublishMessage::build()
            .payload(body.clone().into())
            .message_id(e.point_id.clone());
        acks.push_back(
            js.send_publish(format!("{prefix}.{subject}"), m)
                .await
                .expect("publish"),
        );
        if acks.len() >= 1024 {
            let a = acks.pop_front().unwrap().await.expect("puback");
            assert!(!a.duplicate);
        }
    }
    for a in acks {
        assert!(!a.await.expect("puback").duplicate);
    }
    bodies.len() as f64 / t.elapsed().as_secs_f64()
}

/// (a) A bare pull consumer on recap's consumer definition that only acknowledges. Returns msgs/s.
async fn raw_consume(url: &str, s: &NatsSettings, n: usize) -> f64 {
    let client = async_nats::connect(url).await.expect("nats");
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&s.stream).await.expect("stream");
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(consumer_config(s).expect("consumer config"))
        .await
        .expect("consumer");
    let t = Instant::now();
    let mut msgs = consumer
        .stream()
        .max_messages_per_batch(500)
        .messages()
        .await
        .expect("pull");
    let mut got = 0;
    while got < n {
        let m = msgs.next().await.expect("stream ended").expect("message");
        m.ack().await.expect("ack");
        got += 1;
    }
    client.flush().await.expect("flush");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(msgs);
    rate
}

/// (b) recap's ingest: NatsSource + Ingest::apply until all `n` events are committed and acknowledged.
/// Returns (msgs/s, windows closed, batches).
async fn recap_consume(db_url: &str, s: &NatsSettings, n: usize) -> (f64, usize, usize) {
    let cfg = config(db_url, s, &s.consumer, &["--instance-id", "bench-ingest"]);
    cfg.validate().expect("config");
    let store = common::store(&cfg).await;
    let ctx = common::context(
        &cfg,
        &store,
        recap::cmd::points(&cfg).expect("points"),
        Arc::new(recap::summarize::extractive::Extractive),
    );
    let shutdown = CancellationToken::new();
    let mut ingest = Ingest::start(ctx, &shutdown)
        .await
        .expect("leader")
        .expect("ingest");
    let mut source = NatsSource::start(cfg.nats_settings())
        .await
        .expect("source");
    let (mut done, mut batches) = (0usize, 0usize);
    let mut phase = [Duration::ZERO; 3];
    let t = Instant::now();
    // The ingest loop's shape (`pipeline::run_ingest_with`): batches into memory, a durable checkpoint every
    // CHECKPOINT_INTERVAL or CHECKPOINT_MESSAGES, then the acks of everything it covers.
    while done < n {
        let p0 = Instant::now();
        let batch = source.next_batch().await.expect("batch");
        let got = batch.messages.len() + batch.ignored + batch.dead_letters.len();
        let p1 = Instant::now();
        ingest
            .step(&mut source, &batch, now_ms())
            .await
            .expect("step");
        done += got;
        if done >= n {
            // the end of the run: what was read is durable and acknowledged
            ingest.checkpoint().await.expect("checkpoint");
            // the last sealed checkpoint's group, then what was handed out after it (nothing left unacknowledged)
            source.commit().await.expect("ack");
            source.commit().await.expect("ack");
        }
        phase[1] += p1.elapsed();
        phase[0] += p1 - p0;
        batches += usize::from(got > 0);
        assert_eq!(batch.dead_letters.len(), 0, "no malformed events");
    }
    let windows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM recap_windows")
        .fetch_one(store.pool())
        .await
        .expect("windows") as usize;
    let wall = t.elapsed();
    let rate = n as f64 / wall.as_secs_f64();
    eprintln!(
        "    recap phases: next_batch (pull + parse) {:.2}s, step (state, checkpoints, acks) {:.2}s, final {:.2}s of {:.2}s",
        phase[0].as_secs_f64(),
        phase[1].as_secs_f64(),
        phase[2].as_secs_f64(),
        wall.as_secs_f64()
    );
    for (name, d) in ["next_batch", "apply", "ack"].iter().zip(phase) {
        emit(
            &format!("ingest_recap_{name}_share"),
            d.as_secs_f64() / wall.as_secs_f64(),
            "x",
        );
    }
    ingest.release().await;
    // Every event is in a closed window's coverage or an open window's snapshot, once.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_messages")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(stored as usize, n, "every event stored once");
    store.pool().close().await;
    let rows = rows_written(db_url).await;
    eprintln!(
        "    Postgres rows written: {rows} for {n} events = {:.3} per event ({windows} windows stored)",
        rows as f64 / n as f64
    );
    emit("ingest_rows_per_msg", rows as f64 / n as f64, "rows");
    (rate, windows, batches)
}

/// Rows inserted, updated and deleted in recap's tables of the database at `db_url`, after its backends ended
/// (`pg_stat_user_tables`; backends flush their counts when they exit).
async fn rows_written(db_url: &str) -> i64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pool = sqlx::PgPool::connect(db_url).await.expect("connect");
    let rows: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::int8 FROM pg_stat_user_tables
         WHERE relname LIKE 'recap_%'",
    )
    .fetch_one(&pool)
    .await
    .expect("stats");
    pool.close().await;
    rows
}

/// Restart time: `BENCH_RESTORE_KEYS` (default 1,000,000) open windows of 3 messages each stored as checkpoint
/// snapshots, then `pipeline::restore_state` (what a replica does when it takes ingest over) timed.
async fn restore(admin: &str) -> f64 {
    let keys = env_usize("BENCH_RESTORE_KEYS", 1_000_000);
    let (db_url, db_name) = fresh_db(admin).await;
    let s = settings("nats://unused", "R", "r", "r.stored");
    let cfg = config(&db_url, &s, "r", &[]);
    let store = common::store(&cfg).await;
    let t0 = now_ms() - 10 * MIN;
    sqlx::query(
        "INSERT INTO recap_open_windows (bot_name, user_id, part, layout, point_ids, point_ts)
         SELECT 'bot' || (i % 8), 'user' || i, 0, '1',
                ARRAY[md5(i::text || 'a')::uuid::text, md5(i::text || 'b')::uuid::text, md5(i::text || 'c')::uuid::text],
                ARRAY[to_timestamp($2 / 1000.0), to_timestamp($2 / 1000.0 + 60), to_timestamp($2 / 1000.0 + 120)]
         FROM generate_series(1, $1) AS i",
    )
    .bind(keys as i64)
    .bind(t0 as f64)
    .execute(store.pool())
    .await
    .expect("snapshots");
    let t = Instant::now();
    let state =
        recap::pipeline::restore_state(&store, cfg.tracker_config(), (0, 1), Default::default())
            .await
            .expect("restore");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(state.open_keys(), keys);
    eprintln!("  restore: {keys} open windows (3 messages each) loaded in {secs:.2} s");
    drop(state);
    store.pool().close().await;
    drop_db(admin, &db_name).await;
    secs
}

async fn run(url: &str, admin: &str, evs: &[StoredEvent], run: usize) -> (f64, f64, f64) {
    let n = evs.len();
    let t = token();
    let a = settings(
        url,
        &format!("BENCHA_{t}"),
        &format!("bencha_{t}"),
        &format!("bencha{t}.stored"),
    );
    let b = settings(
        url,
        &format!("BENCHB_{t}"),
        &format!("benchb_{t}"),
        &format!("benchb{t}.stored"),
    );
    let client = async_nats::connect(url).await.expect("nats");
    let js = jetstream::new(client.clone());
    for s in [&a, &b] {
        js.create_stream(stream_config(s).expect("stream config"))
            .await
            .expect("create stream");
    }
    // subject suffix (the bot) and body are the same for both streams
    let bodies: Vec<(String, Vec<u8>)> = evs.iter().map(|e| (e.bot.clone(), e.to_body())).collect();
    let avg = bodies.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / n as f64;
    let pa = publish(&js, &a.subject_prefix, &bodies, evs).await;
    let pb = publish(&js, &b.subject_prefix, &bodies, evs).await;
    client.flush().await.expect("flush");
    eprintln!(
        "  run {run}: published {n} events ({avg:.0} B bodies) twice: {pa:.0} and {pb:.0} msgs/s"
    );
    let (db_url, db_name) = fresh_db(admin).await;
    // alternate the order so neither side always runs on a warmer machine
    let (raw, (rec, windows, batches)) = if run.is_multiple_of(2) {
        let raw = raw_consume(url, &a, n).await;
        (raw, recap_consume(&db_url, &b, n).await)
    } else {
        let r = recap_consume(&db_url, &b, n).await;
        (raw_consume(url, &a, n).await, r)
    };
    eprintln!(
        "  run {run}: raw pull+ack {raw:.0} msgs/s; recap source+tracker+commit {rec:.0} msgs/s ({batches} batches, {windows} windows closed); b/a = {:.3}",
        rec / raw
    );
    for s in [&a, &b] {
        let _ = js.delete_stream(&s.stream).await;
    }
    drop_db(admin, &db_name).await;
    ((pa + pb) / 2.0, raw, rec)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = env("NATS_URL");
    let admin = env("DATABASE_URL");
    let n = env_usize("BENCH_EVENTS", 200_000);
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let evs = events(n);
    println!("ingest benchmark: {n} events, {runs} runs");
    let (mut pubs, mut raws, mut recs, mut ratios) = (vec![], vec![], vec![], vec![]);
    for r in 0..runs {
        let (p, raw, rec) = run(&url, &admin, &evs, r).await;
        emit("ingest_publish_msgs_per_sec", p, "msgs/s");
        emit("ingest_raw_msgs_per_sec", raw, "msgs/s");
        emit("ingest_recap_msgs_per_sec", rec, "msgs/s");
        emit("ingest_ratio", rec / raw, "x");
        pubs.push(p);
        raws.push(raw);
        recs.push(rec);
        ratios.push(rec / raw);
    }
    summary(&SUMMARY, "publish", "msgs/s", pubs);
    summary(&SUMMARY, "(a) raw pull + ack", "msgs/s", raws);
    summary(&SUMMARY, "(b) recap ingest", "msgs/s", recs);
    summary(&SUMMARY, "ratio b/a", "x", ratios);
    let secs = restore(&admin).await;
    emit("ingest_restore_1m_open_windows_s", secs, "s");
}
