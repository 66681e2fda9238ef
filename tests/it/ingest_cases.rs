//! Issue 24's partition, share, consumer and layout cases (10-13), in process against real Postgres (and NATS where
//! the case is the consumer's): each test failed before its fix.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use recap::model::{Position, SourceCheckpoint, StreamSeq};
use recap::pipeline::{Context, IngestLoop, run_partitioned};
use recap::source::{Batch, Source, SourceError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: recap::config::Config,
}

/// Lease of the partition leaders in these tests (the smallest `LEADER_LEASE_SECONDS` allowed).
const LEASE_S: u64 = 2;

async fn context(db: &TestDb, instance: &str, extra: &[&str]) -> Context {
    let q = env("QDRANT_URL");
    let lease = LEASE_S.to_string();
    let base = [
        "t",
        "--database-url",
        db.url.as_str(),
        "--qdrant-url",
        q.as_str(),
        "--leader-lease-seconds",
        lease.as_str(),
    ];
    let mut cfg = Args::parse_from(base.iter().chain(extra)).c;
    cfg.normalize();
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let points =
        Arc::new(recap::fetch::Points::new(&q, None, cfg.payload_mapping()).expect("points"));
    Context {
        store,
        points,
        summarizer: Arc::new(recap::summarize::extractive::Extractive),
        instance: instance.to_string(),
        cfg: Arc::new(cfg),
    }
}

/// A source that always has one (ignored) event: every batch is caught up and asks for a checkpoint, whose position
/// is `fake:<instance>:<partition>`. While `down` is set it fails as NATS does when unreachable.
struct Fake {
    name: String,
    pos: u64,
    down: Arc<AtomicBool>,
}

impl Source for Fake {
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if self.down.load(Ordering::Relaxed) {
            return Err(SourceError::Nats("unreachable (test)".into()));
        }
        self.pos += 1;
        Ok(Batch {
            ignored: 1,
            caught_up: true,
            checkpoint: Some(SourceCheckpoint {
                name: self.name.clone(),
                position: Position::Stream(StreamSeq(self.pos)),
                points_read: 0,
            }),
            ..Default::default()
        })
    }
    async fn commit(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    async fn abandon(&mut self) {}
    async fn probe(&mut self) -> Result<(), SourceError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(SourceError::Nats("unreachable (test)".into()));
        }
        Ok(())
    }
}

/// One replica: `run_partitioned` over fake sources, until its token is cancelled.
struct Replica {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn replica(ctx: &Context, partitions: u32, down: Arc<AtomicBool>, opts: IngestLoop) -> Replica {
    let stop = CancellationToken::new();
    let instance = ctx.instance.clone();
    let make = move |k: u32| {
        let (name, down) = (format!("fake:{instance}:{k}"), down.clone());
        async move {
            if down.load(Ordering::Relaxed) {
                return Err(SourceError::Nats("unreachable (test)".into()));
            }
            Ok(Fake { name, pos: 0, down })
        }
    };
    let task = tokio::spawn(run_partitioned(
        ctx.clone(),
        partitions,
        make,
        stop.clone(),
        opts,
    ));
    Replica { stop, task }
}

impl Replica {
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Partition -> the instance whose lease on it is current.
async fn leaders(db: &TestDb) -> BTreeMap<i32, String> {
    sqlx::query_as::<_, (i32, String)>(
        "SELECT id - 1, owner FROM recap_leader WHERE lease_until > now() ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Polls until `ok` holds for the current leaders, or `timeout`: the last leaders seen, and whether it held.
async fn wait_leaders(
    db: &TestDb,
    timeout: Duration,
    ok: impl Fn(&BTreeMap<i32, String>) -> bool,
) -> (BTreeMap<i32, String>, bool) {
    let t0 = Instant::now();
    loop {
        let l = leaders(db).await;
        if ok(&l) {
            return (l, true);
        }
        if t0.elapsed() > timeout {
            return (l, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn led_by(l: &BTreeMap<i32, String>, who: &str) -> Vec<i32> {
    l.iter()
        .filter(|(_, o)| *o == who)
        .map(|(p, _)| *p)
        .collect()
}

/// Issue 24, case 10: a checkpoint fails (not for a lost lease: here a trigger refuses it) and its loop backs off
/// past the lease; another replica takes the partition. Before the fix the partition stayed in the failed replica's
/// share (`Share.held`), so when a third replica left, its partition was led by nobody: both survivors counted one
/// partition each. Now a partition leaves the share the moment its checkpoint fails (its lease is released).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_checkpoint_leaves_the_share_so_every_partition_is_led_again() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let extra = ["--nats-partitions", "2"];
    let (a, b, c) = (
        context(&db, "a", &extra).await,
        context(&db, "b", &extra).await,
        context(&db, "c", &extra).await,
    );
    // The first checkpoint of replica a's that names `fail:` fails, once (a sequence is not rolled back).
    sqlx::raw_sql(
        "CREATE SEQUENCE fail_once;
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.name LIKE 'fake:a:%' AND EXISTS (SELECT 1 FROM pg_class WHERE relname = 'fail_armed')
                AND nextval('fail_once') = 1 THEN
                 RAISE EXCEPTION 'checkpoint refused (test)';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_once BEFORE INSERT OR UPDATE ON recap_checkpoints
             FOR EACH ROW EXECUTE FUNCTION fail_once();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Three live replicas: a fair share of one partition each.
    let ttl = Duration::from_secs(LEASE_S);
    for ctx in [&a, &b, &c] {
        ctx.store
            .ingest_heartbeat(&ctx.instance, ttl, true)
            .await
            .unwrap();
    }
    // a's back-off after a failed checkpoint outlasts its lease (as a Postgres outage would)
    let slow = IngestLoop {
        backoff_min: ttl * 2,
        backoff_max: ttl * 2,
        ..IngestLoop::default()
    };
    let up = Arc::new(AtomicBool::new(false));
    let ra = replica(&a, 2, up.clone(), slow);
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| led_by(l, "a").len() == 1).await;
    assert!(ok, "a leads one partition: {l:?}");
    let rb = replica(&b, 2, up.clone(), IngestLoop::default());
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| l.len() == 2).await;
    assert!(ok, "a and b lead one each: {l:?}");
    let rc = replica(&c, 2, up.clone(), IngestLoop::default());
    let pa = led_by(&l, "a")[0];
    // a's next checkpoint fails; c takes a's partition while a backs off
    sqlx::query("CREATE TABLE fail_armed ()")
        .execute(&db.pool)
        .await
        .unwrap();
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| {
        l.get(&pa).map(String::as_str) == Some("c")
    })
    .await;
    assert!(ok, "c took a's partition {pa}: {l:?}");
    // b leaves: a and c remain, one partition each, and b's must be led again
    rb.stop().await;
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| {
        l.len() == 2 && l.values().all(|o| o != "b")
    })
    .await;
    assert!(
        ok,
        "b's partition is led again within 5 lease terms: {l:?} (a's share still counts partition {pa})"
    );
    ra.stop().await;
    rc.stop().await;
}

/// Issue 24, case 11: a replica that heartbeats but cannot open its sources (NATS unreachable, a missing grant) holds
/// no share: before the fix the other replica led only half of the partitions (its fair share of two replicas) and
/// the rest stayed unled.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_cannot_reach_nats_holds_no_share() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let extra = ["--nats-partitions", "4"];
    let (a, b) = (
        context(&db, "a", &extra).await,
        context(&db, "b", &extra).await,
    );
    let ttl = Duration::from_secs(LEASE_S);
    let ra = replica(
        &a,
        4,
        Arc::new(AtomicBool::new(true)),
        IngestLoop::default(),
    );
    // a heartbeats first (as a replica whose NATS is away does), then b starts
    let t0 = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM recap_ingest_members")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        == 0
    {
        assert!(t0.elapsed() < ttl * 3, "a never heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rb = replica(
        &b,
        4,
        Arc::new(AtomicBool::new(false)),
        IngestLoop::default(),
    );
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| led_by(l, "b").len() == 4).await;
    assert!(ok, "b leads all 4 partitions: {l:?}");
    ra.stop().await;
    rb.stop().await;
}

/// Issue 24, case 11: a leader whose NATS goes away hands its partitions back and stops counting in the fair share,
/// so the other replica leads every partition; before the fix its partitions stayed unled (their leases lapsed, and
/// the other replica was at its share of two).
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_loses_nats_hands_its_partitions_on() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let extra = ["--nats-partitions", "2"];
    let (a, b) = (
        context(&db, "a", &extra).await,
        context(&db, "b", &extra).await,
    );
    let ttl = Duration::from_secs(LEASE_S);
    let down = Arc::new(AtomicBool::new(false));
    for ctx in [&a, &b] {
        ctx.store
            .ingest_heartbeat(&ctx.instance, ttl, true)
            .await
            .unwrap();
    }
    let ra = replica(&a, 2, down.clone(), IngestLoop::default());
    let rb = replica(
        &b,
        2,
        Arc::new(AtomicBool::new(false)),
        IngestLoop::default(),
    );
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| {
        led_by(l, "a").len() == 1 && led_by(l, "b").len() == 1
    })
    .await;
    assert!(ok, "one partition each: {l:?}");
    down.store(true, Ordering::Relaxed);
    let (l, ok) = wait_leaders(&db, ttl * 5, |l| led_by(l, "b").len() == 2).await;
    assert!(
        ok,
        "b leads both partitions once a cannot read its own: {l:?}"
    );
    // a's NATS comes back: it counts again, and takes its share back
    down.store(false, Ordering::Relaxed);
    let (l, ok) = wait_leaders(&db, ttl * 8, |l| {
        led_by(l, "a").len() == 1 && led_by(l, "b").len() == 1
    })
    .await;
    assert!(ok, "one partition each again: {l:?}");
    ra.stop().await;
    rb.stop().await;
}

/// Events `ids` of bot `bot` for the stream of `ns` (subject, message id, body).
fn events(
    ns: &NatsNs,
    bot: &str,
    ids: std::ops::RangeInclusive<usize>,
) -> Vec<(String, Option<String>, Vec<u8>)> {
    ids.map(|i| {
        let e = recap::event::StoredEvent {
            v: 1,
            bot: bot.into(),
            collection: None,
            point_id: format!("{}", 1000 + i),
            user_id: "u".into(),
            role: Some("user".into()),
            ts: chrono::Utc::now(),
        };
        (e.subject(&ns.prefix), Some(e.point_id.clone()), e.to_body())
    })
    .collect()
}

async fn store_of(db: &TestDb) -> recap::sink::Store {
    db.migrate().await;
    recap::sink::Store::connect(db.url.parse().unwrap(), 2)
        .await
        .unwrap()
}

async fn consumer_info(
    js: &async_nats::jetstream::Context,
    ns: &NatsNs,
) -> async_nats::jetstream::consumer::Info {
    js.get_stream(&ns.stream)
        .await
        .unwrap()
        .consumer_info(&ns.consumer)
        .await
        .unwrap()
}

/// The consumer's (pending, ack pending), polled until both are 0 (acks reach the server asynchronously) or 5 s.
async fn drained(js: &async_nats::jetstream::Context, ns: &NatsNs) -> (u64, usize) {
    let t0 = Instant::now();
    loop {
        let info = consumer_info(js, ns).await;
        let got = (info.num_pending, info.num_ack_pending);
        if got == (0, 0) || t0.elapsed() > Duration::from_secs(5) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes batches (each committed, as after its checkpoint) until `n` distinct events were handed out or 10 s passed.
async fn take_until(
    source: &mut recap::source::nats::NatsSource,
    handed: &mut std::collections::BTreeSet<String>,
    n: usize,
) {
    let t0 = Instant::now();
    while handed.len() < n && t0.elapsed() < Duration::from_secs(10) {
        let b = source.next_batch().await.unwrap();
        handed.extend(b.messages.iter().map(|m| m.point_id.clone()));
        source.seal();
        source.commit().await.unwrap();
    }
}

/// Issue 24, case 12: right after the consumer is recreated (a rewind), a deposed leader's pull takes its first
/// delivery. Before the fix the lost-delivery check had no previous delivery to compare with, took delivery 2 as the
/// first, and the ack-all of the next commit acknowledged event 1 unread. Now a new consumer's first delivery must be
/// its sequence 1: the consumer is recreated where it started and event 1 is read.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_delivery_of_a_recreated_consumer_is_checked() {
    let _shared = common::shared().await;
    use futures::StreamExt;
    let db = fresh_db().await;
    let store = store_of(&db).await;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let bot = format!("b{}", token());
    let mut settings = ns.settings();
    settings.batch_size = 10;
    let mut source = recap::source::nats::NatsSource::start(settings)
        .await
        .unwrap();
    // a leader takes the partition: nothing stored yet, so the consumer is recreated from the stream's start
    source.rewind(&store).await.unwrap();
    ns.publish_raw(&js, events(&ns, &bot, 1..=3)).await;
    // a deposed leader's pull request takes delivery 1 (event 1) before this leader's first pull
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&ns.stream)
        .await
        .unwrap()
        .get_consumer(&ns.consumer)
        .await
        .unwrap();
    let mut thief = consumer.fetch().max_messages(1).messages().await.unwrap();
    let stolen = thief.next().await.unwrap().unwrap();
    assert_eq!(stolen.info().unwrap().stream_sequence, 1);
    drop(thief);
    let mut handed = std::collections::BTreeSet::new();
    take_until(&mut source, &mut handed, 3).await;
    let want: std::collections::BTreeSet<String> =
        (1..=3).map(|i| format!("{}", 1000 + i)).collect();
    assert_eq!(handed, want, "event 1 read, not acknowledged unread");
    assert_eq!(drained(&js, &ns).await, (0, 0), "all read and acknowledged");
}

/// Issue 24, case 12: a leader frozen past its lease (another replica leads the partition meanwhile) resumes. Before
/// the fix it kept pulling from the consumer the new leader recreated, and its rewind deleted and recreated that
/// consumer again. Now it learns it is deposed from its own clock and from Postgres: it pulls nothing and leaves the
/// consumer alone, and the new leader reads every event.
#[tokio::test(flavor = "multi_thread")]
async fn a_deposed_leader_neither_pulls_nor_recreates_the_consumer() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let store = store_of(&db).await;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let bot = format!("b{}", token());
    let mut settings = ns.settings();
    settings.batch_size = 10;
    let ttl = Duration::from_secs(LEASE_S);
    let lead = async |who: &str| {
        let sent = Instant::now();
        let fence = store
            .try_acquire_partition(who, ttl, 0)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{who} takes the lease"));
        recap::sink::Lease::new(store.clone(), fence, sent)
    };
    let mut a = recap::source::nats::NatsSource::start(settings.clone())
        .await
        .unwrap();
    a.lead(Some(lead("a").await));
    a.rewind(&store).await.unwrap();
    ns.publish_raw(&js, events(&ns, &bot, 1..=3)).await;
    let mut by_a = std::collections::BTreeSet::new();
    take_until(&mut a, &mut by_a, 3).await;
    assert_eq!(by_a.len(), 3, "a leads and reads");
    // a freezes past its lease; b takes the partition and recreates the consumer
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let mut b = recap::source::nats::NatsSource::start(settings.clone())
        .await
        .unwrap();
    b.lead(Some(lead("b").await));
    b.rewind(&store).await.unwrap();
    let created = consumer_info(&js, &ns).await.created;
    ns.publish_raw(&js, events(&ns, &bot, 4..=6)).await;
    // a resumes (and, as its ingest loop would, reads again after an error): its own clock says the lease is over
    let mut deposed = false;
    for _ in 0..5 {
        match a.next_batch().await {
            Err(recap::source::SourceError::Deposed) => {
                deposed = true;
                break;
            }
            Ok(batch) => assert!(
                batch.messages.is_empty(),
                "a deposed leader read {} events of the new leader's consumer",
                batch.messages.len()
            ),
            Err(_) => {}
        }
    }
    assert!(deposed, "a learnt it was deposed");
    // and Postgres says so: its rewind leaves the new leader's consumer alone
    assert!(a.rewind(&store).await.is_err(), "a deposed leader's rewind");
    let info = consumer_info(&js, &ns).await;
    assert_eq!(info.created, created, "the consumer was not recreated");
    assert_eq!(
        info.delivered.consumer_sequence, 0,
        "nothing pulled from it"
    );
    let mut by_b = std::collections::BTreeSet::new();
    take_until(&mut b, &mut by_b, 6).await;
    let want: std::collections::BTreeSet<String> =
        (1..=6).map(|i| format!("{}", 1000 + i)).collect();
    assert_eq!(
        by_b, want,
        "the new leader reads every event (nothing was committed before)"
    );
    assert_eq!(drained(&js, &ns).await, (0, 0), "all read and acknowledged");
}

/// Publishes the events of `points` (bot `bot`) in time order, each user's on one subject shape: users in `route`
/// on `<prefix>.<bot>.<user>`, the others on `<prefix>.<bot>`. Returns how many went on the user subject.
async fn publish_shapes(
    ns: &NatsNs,
    js: &async_nats::jetstream::Context,
    bot: &str,
    collection: &str,
    points: &[TestPoint],
    route: impl Fn(&str) -> bool,
) -> usize {
    let mut ordered: Vec<&TestPoint> = points.iter().collect();
    ordered.sort_by_key(|p| p.ts_ms);
    let mut on_user = 0;
    let items = ordered
        .into_iter()
        .map(|p| {
            let e = p.event(bot, collection);
            let subject = if route(&p.user_id) {
                on_user += 1;
                e.user_subject(&ns.prefix)
            } else {
                e.subject(&ns.prefix)
            };
            (subject, Some(p.id.clone()), e.to_body())
        })
        .collect();
    assert_eq!(ns.publish_raw(js, items).await, points.len());
    on_user
}

/// Issue 24, case 13: `NATS_PARTITIONS` 2 by bot -> 4 by user with a backlog. Bot 1's events were read under the old
/// layout; bot 2's (half on each subject shape) wait in the stream when the replicas restart with the new layout.
/// Before the fix the events stored under the old partition subjects (`<prefix>.p.<k>.<bot>`) were read by no
/// consumer of the new layout and the route consumer kept its old filter. Now the first replica re-publishes the
/// unread backlog (only it: bot 1's events are not read twice) on the new layout, and every message ends in exactly
/// one window.
#[tokio::test(flavor = "multi_thread")]
async fn a_layout_change_moves_the_unread_backlog_to_the_new_partitions() {
    let _shared = common::shared().await;
    use recap::source::nats::PartitionBy;
    let s = scenario(4).await;
    let q = qdrant().await;
    let bot2 = format!("bot{}", token());
    let col2 = format!("whisperengine_memory_{bot2}_7d");
    create_collection(&q, &col2, true).await;
    let mut points2 = Vec::new();
    for u in 0..4 {
        let user = format!("{}{u}", 200_000_000_000_000_000u64 + u as u64);
        let base = T0 + u as i64 * 7 * MIN;
        points2.extend(conversation(&user, base, 6, 2 * MIN, true));
        points2.extend(conversation(&user, base + 3 * 60 * MIN, 4, 5 * MIN, true));
    }
    upsert(&q, &col2, &points2).await;
    let mut envs: Vec<(String, String)> = s
        .env()
        .into_iter()
        .filter(|(k, _)| k != "COLLECTION_PATTERNS" && k != "COLLECTION_MAP")
        .collect();
    envs.extend([
        (
            "COLLECTION_PATTERNS".to_string(),
            format!("{},{col2}", s.collection),
        ),
        (
            "COLLECTION_MAP".to_string(),
            format!("{}={},{col2}={bot2}", s.collection, s.bot),
        ),
        // events only: the sweep would find the points in Qdrant whatever happened to their events
        (
            "ENRICHMENT_INTERVAL_SECONDS".to_string(),
            "3600".to_string(),
        ),
    ]);
    let with = |extra: &[(&str, &str)]| {
        let mut e = envs.clone();
        e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        e
    };
    let old = with(&[("NATS_PARTITIONS", "2"), ("NATS_PARTITION_BY", "bot")]);
    let new = with(&[("NATS_PARTITIONS", "4"), ("NATS_PARTITION_BY", "user")]);
    let js = s.nats.ensure_partitioned(2).await;
    let odd = |u: &str| u.ends_with(['1', '3']);
    // bot 1 under the old layout, read
    let r1 = publish_shapes(&s.nats, &js, &s.bot, &s.collection, &s.points, odd).await;
    let want1 = expected_rows(&s.bot, &s.points, 5);
    let mut child = spawn_recap(&["run"], &old, &log_path("layout-old"));
    wait_for_rows(&s.db.pool, want1.len(), Duration::from_secs(60)).await;
    terminate(&mut child);
    // bot 2's backlog, under the old layout, unread; then the new layout
    publish_shapes(&s.nats, &js, &bot2, &col2, &points2, odd).await;
    let log = log_path("layout-new");
    let mut child = spawn_recap(&["run"], &new, &log);
    let mut want = want1.clone();
    want.extend(expected_rows(&bot2, &points2, 5));
    want.sort_by(|a, b| (&a.bot, &a.user, a.start).cmp(&(&b.bot, &b.user, b.start)));
    let got = std::panic::AssertUnwindSafe(wait_for_rows(
        &s.db.pool,
        want.len(),
        Duration::from_secs(60),
    ));
    let got = futures::FutureExt::catch_unwind(got).await;
    terminate(&mut child);
    let got = got.unwrap_or_else(|_| {
        panic!(
            "bot 2's backlog never became its windows (log {})",
            log.display()
        )
    });
    assert_eq!(got, want);
    assert_one_row_per_window(&s.db.pool).await;
    // every message in exactly one window's coverage
    let messages: std::collections::BTreeSet<String> = s
        .points
        .iter()
        .chain(&points2)
        .filter(|p| p.role != "conversation_pair")
        .map(|p| p.id.clone())
        .collect();
    let covered: Vec<String> =
        sqlx::query_scalar("SELECT p FROM recap_windows, unnest(point_ids) p ORDER BY p")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    let distinct: std::collections::BTreeSet<String> = covered.iter().cloned().collect();
    assert_eq!(covered.len(), distinct.len(), "a message in two windows");
    assert_eq!(distinct, messages, "every message in a window");
    // only bot 2's events were re-published: the stream holds bot 1's events, their route copies, bot 2's events and
    // one copy each of them
    let mut stream = js.get_stream(&s.nats.stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages as usize;
    assert_eq!(
        stored,
        s.points.len() + r1 + 2 * points2.len(),
        "events in the stream"
    );
    let route = stream
        .consumer_info(format!("{}-route", s.nats.consumer))
        .await
        .unwrap();
    let settings = recap::source::nats::NatsSettings {
        partitions: 4,
        partition_by: PartitionBy::User,
        ..s.nats.settings()
    };
    assert_eq!(route.config.filter_subject, settings.route_subject());
    assert_eq!(route.config.filter_subject, format!("{}.*", s.nats.prefix));
    let recorded: String =
        sqlx::query_scalar("SELECT layout FROM recap_nats_layout WHERE stream = $1")
            .bind(&s.nats.stream)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, "user/4");
}
