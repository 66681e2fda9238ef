//! Partitioned ingest (issue 18): NATS' own `partition(n, bot)` mapping on the stream, one lease, state, durable
//! consumer and sweep per partition, replicas sharing the partitions.
//!
//! * The stream stores `<prefix>.<bot>` as `<prefix>.p.<k>.<bot>` with k = `source::nats::partition_of(bot, n)` (the
//!   sweep and the state restore rely on recap computing the same bucket as the server).
//! * Three replicas on eight partitions write the same table as one replica; `kill -9` of the replica leading the
//!   most partitions: each of them is led by another replica within LEADER_LEASE_SECONDS + 5 s, and no window is
//!   lost or written twice. Prints `PARTITIONS` lines with the figures.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use recap::source::nats::{NatsSettings, PartitionBy, partition_of};

const PARTITIONS: u32 = 8;

/// Publishes `{}` on `subject` and waits for the PubAck.
async fn publish_empty(js: &async_nats::jetstream::Context, subject: String) {
    js.publish(subject, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The stream's subject transform puts each bot where `partition_of` says.
#[tokio::test(flavor = "multi_thread")]
async fn the_stream_partitions_by_bot_as_recap_computes_it() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    let js = ns.ensure_partitioned(PARTITIONS).await;
    let bots: Vec<String> = (0..64).map(|i| format!("bot{i}-{}", token())).collect();
    for b in &bots {
        publish_empty(&js, format!("{}.{b}", ns.prefix)).await;
    }
    let stream = js.get_stream(&ns.stream).await.unwrap();
    let mut seen = BTreeMap::new();
    for seq in 1..=bots.len() as u64 {
        let m = stream.get_raw_message(seq).await.unwrap();
        let subject = m.subject.to_string();
        let rest = subject
            .strip_prefix(&format!("{}.p.", ns.prefix))
            .unwrap_or_else(|| panic!("{subject} carries no partition"));
        let (k, bot) = rest.split_once('.').unwrap();
        seen.insert(bot.to_string(), k.parse::<u32>().unwrap());
    }
    for b in &bots {
        assert_eq!(
            seen[b],
            partition_of(b, PARTITIONS),
            "{b}: NATS and recap disagree on the partition"
        );
    }
    let used: BTreeSet<u32> = seen.values().copied().collect();
    assert!(
        used.len() > 4,
        "64 bots over 8 partitions used only {used:?}"
    );
    let _ = js.delete_stream(&ns.stream).await;
}

/// By user (`NATS_PARTITION_BY=user`): the stream stores `<prefix>.<bot>.<user>` where `NatsSettings::owner` says
/// (user tokens from `event::user_token`, hashed ones included), and leaves `<prefix>.<bot>` for the route consumer.
#[tokio::test(flavor = "multi_thread")]
async fn the_stream_partitions_by_user_as_recap_computes_it() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    let js = ns
        .ensure_partitioned_by(PARTITIONS, PartitionBy::User)
        .await;
    let settings = NatsSettings {
        partitions: PARTITIONS,
        partition_by: PartitionBy::User,
        ..ns.settings()
    };
    let bot = format!("bot-{}", token());
    let users: Vec<String> = (0..64)
        .map(|i| match i % 4 {
            0 => format!("user.{i}@example.com"), // not a subject token: hashed
            _ => format!("{}", 100_000_000_000_000_000u64 + i * 7_919),
        })
        .collect();
    for u in &users {
        publish_empty(
            &js,
            format!("{}.{bot}.{}", ns.prefix, recap::event::user_token(u)),
        )
        .await;
    }
    publish_empty(&js, format!("{}.{bot}", ns.prefix)).await;
    let stream = js.get_stream(&ns.stream).await.unwrap();
    let mut used = BTreeSet::new();
    for (seq, u) in (1..).zip(&users) {
        let m = stream.get_raw_message(seq).await.unwrap();
        let want = settings.owner(&bot, u);
        assert_eq!(
            m.subject.to_string(),
            format!(
                "{}.p.{want}.{bot}.{}",
                ns.prefix,
                recap::event::user_token(u)
            ),
            "{u}: NATS and recap disagree on the partition"
        );
        used.insert(want);
    }
    assert!(used.len() > 4, "one bot's 64 users used only {used:?}");
    let legacy = stream
        .get_raw_message(users.len() as u64 + 1)
        .await
        .unwrap();
    assert_eq!(legacy.subject.as_str(), format!("{}.{bot}", ns.prefix));
    assert_eq!(settings.route_subject(), format!("{}.*", ns.prefix));
    let _ = js.delete_stream(&ns.stream).await;
}

/// A summary row as compared: (bot, user, start ms, end ms, message count).
type Win = (String, String, i64, i64, i32);

/// Idle gap of the live runs: sessions are 200 ms apart inside, 3 s apart between.
const GAP_MS: i64 = 1500;

/// A fleet of `bots` bots (one collection each) whose `users` users write at the wall clock: sessions of 6 and 5
/// messages 200 ms apart, 3 s between them, each point stored in Qdrant and then its event published (`ts` = now,
/// as publishers stamp it). Returns what was written: (bot, user, stored ms).
async fn write_live(
    ns: &NatsNs,
    js: &async_nats::jetstream::Context,
    bots: &[(String, String)],
    users: usize,
    mixed: bool,
) -> Vec<(String, String, i64)> {
    let mut tasks = Vec::new();
    for (b, (bot, collection)) in bots.iter().enumerate() {
        for u in 0..users {
            let (ns, js, bot, collection) =
                (ns.clone(), js.clone(), bot.clone(), collection.clone());
            tasks.push(tokio::spawn(async move {
                let q = qdrant().await;
                let user = match u {
                    // a user id that is no subject token (its token is a hash)
                    1 if mixed => format!("user.{b}@example.com"),
                    _ => format!("{}", 300_000_000_000_000_000u64 + (b * 100 + u) as u64),
                };
                // users start a little apart, so the partitions' loads interleave
                tokio::time::sleep(Duration::from_millis((b * 37 + u * 101) as u64 % 700)).await;
                let mut out = Vec::new();
                for (session, n) in [6, 5].into_iter().enumerate() {
                    if session > 0 {
                        tokio::time::sleep(Duration::from_millis(3000)).await;
                    }
                    for i in 0..n {
                        let p = TestPoint {
                            id: uuid::Uuid::new_v4().to_string(),
                            user_id: user.clone(),
                            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                            content: format!(
                                "{user} says message {i} of session {session} about the harbour"
                            ),
                            ts_ms: chrono::Utc::now().timestamp_millis(),
                            emotion: "neutral".into(),
                            memory_type: "conversation".into(),
                        };
                        upsert(&q, &collection, std::slice::from_ref(&p)).await;
                        let mut e = p.event(&bot, &collection);
                        e.ts = chrono::Utc::now();
                        // mixed: half the users' publishers send the user token, half the bot's subject only
                        let subject = if mixed && u % 2 == 0 {
                            e.user_subject(&ns.prefix)
                        } else {
                            e.subject(&ns.prefix)
                        };
                        ns.publish_raw(&js, vec![(subject, Some(p.id.clone()), e.to_body())])
                            .await;
                        out.push((bot.clone(), user.clone(), p.ts_ms));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                out
            }));
        }
    }
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    written
}

/// The windows the definition gives for what was written (stored times), with `MIN_MESSAGES_FOR_SUMMARY` 5:
/// (bot, user, start ms, end ms, count).
fn expected(written: &[(String, String, i64)]) -> Vec<Win> {
    let cfg = recap::tracker::TrackerConfig {
        idle_gap_ms: GAP_MS,
        ..recap::tracker::TrackerConfig::default()
    };
    let mut by_key: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    for (b, u, t) in written {
        by_key.entry((b, u)).or_default().push(*t);
    }
    let mut out = Vec::new();
    for ((b, u), mut times) in by_key {
        times.sort();
        for (start, end, n, _) in recap::tracker::canonical_windows(&cfg, &times) {
            if n >= 5 {
                out.push((b.to_string(), u.to_string(), start, end, n as i32));
            }
        }
    }
    out.sort();
    out
}

/// The table as (bot, user, start ms, end ms, count), and the highest revision.
fn table(rows: &[Row]) -> (Vec<Win>, i32) {
    let mut t: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.bot.clone(),
                r.user.clone(),
                r.start.and_utc().timestamp_millis(),
                r.end.and_utc().timestamp_millis(),
                r.count,
            )
        })
        .collect();
    t.sort();
    (t, rows.iter().map(|r| r.revision).max().unwrap_or(0))
}

/// Same windows, stored times within a millisecond (Qdrant keeps them as float seconds).
fn same(have: &[Win], want: &[Win]) -> bool {
    have.len() == want.len()
        && have.iter().zip(want).all(|(h, w)| {
            h.0 == w.0
                && h.1 == w.1
                && (h.2 - w.2).abs() <= 1
                && (h.3 - w.3).abs() <= 1
                && h.4 == w.4
        })
}

async fn fleet(n: usize, tag: &str) -> Vec<(String, String)> {
    let q = qdrant().await;
    let t = token();
    let mut bots = Vec::new();
    for b in 0..n {
        let bot = format!("{tag}{b}x{t}");
        let collection = format!("whisperengine_memory_{bot}_7d");
        create_collection(&q, &collection, true).await;
        bots.push((bot, collection));
    }
    bots
}

fn env(db: &TestDb, ns: &NatsNs, instance: &str) -> Vec<(String, String)> {
    let mut e = recap_env(db, Some(ns));
    e.push(("NATS_PARTITIONS".into(), PARTITIONS.to_string()));
    e.push(("INSTANCE_ID".into(), instance.into()));
    e.push(("IDLE_GAP".into(), format!("{GAP_MS}ms")));
    e.push(("ALLOWED_LATENESS_SECONDS".into(), "1".into()));
    e
}

/// Valid partition leases: partition -> owner.
async fn leaders(pool: &sqlx::PgPool) -> BTreeMap<i32, String> {
    sqlx::query_as::<_, (i32, String)>(
        "SELECT id - 1, owner FROM recap_leader WHERE lease_until >= now() ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

const BOTS: usize = 12;
const USERS: usize = 3;

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_on_eight_partitions_write_the_one_replica_table_and_survive_a_kill() {
    let _shared = common::shared().await;
    // One replica: the reference.
    let bots = fleet(BOTS, "solo").await;
    let (db1, ns1) = (fresh_db().await, nats_ns());
    db1.migrate().await;
    let js1 = ns1.ensure_partitioned(PARTITIONS).await;
    let mut one = spawn_recap(
        &["run"],
        &env(&db1, &ns1, "solo"),
        &log_path("partitions-solo"),
    );
    wait_leading(&db1.pool, PARTITIONS.into(), Duration::from_secs(30)).await; // up and leading
    let want1 = expected(&write_live(&ns1, &js1, &bots, USERS, false).await);
    let solo = wait_for_rows(&db1.pool, want1.len(), Duration::from_secs(60)).await;
    let solo_leads = leaders(&db1.pool).await;
    terminate(&mut one);
    let (solo_table, solo_rev) = table(&solo);
    assert!(
        same(&solo_table, &want1),
        "one replica: {solo_table:?}\nexpected {want1:?}"
    );
    assert_eq!(solo_rev, 1, "one replica wrote a window twice");
    assert_eq!(
        solo_leads.len(),
        PARTITIONS as usize,
        "one replica leads every partition: {solo_leads:?}"
    );

    // Three replicas, the same fleet writing live; kill -9 of the one leading the most partitions, mid-run.
    let bots = fleet(BOTS, "trio").await;
    let (db, ns) = (fresh_db().await, nats_ns());
    db.migrate().await;
    let js = ns.ensure_partitioned(PARTITIONS).await;
    let names = ["r0", "r1", "r2"];
    let mut children: Vec<std::process::Child> = names
        .iter()
        .map(|n| {
            spawn_recap(
                &["run"],
                &env(&db, &ns, n),
                &log_path(&format!("partitions-{n}")),
            )
        })
        .collect();
    let writers = {
        let (ns, js, bots) = (ns.clone(), js.clone(), bots.clone());
        tokio::spawn(async move { write_live(&ns, &js, &bots, USERS, false).await })
    };
    // the fair share: every partition led, by three replicas, none leading more than ceil(8 / 3)
    let t0 = Instant::now();
    let spread = loop {
        let l = leaders(&db.pool).await;
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for o in l.values() {
            *per.entry(o.as_str()).or_default() += 1;
        }
        if l.len() == PARTITIONS as usize && per.len() == 3 && per.values().all(|n| *n <= 3) {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "partitions never spread: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let converged = t0.elapsed();
    let victim = names
        .iter()
        .max_by_key(|n| spread.values().filter(|o| o == n).count())
        .copied()
        .unwrap();
    let orphaned: Vec<i32> = spread
        .iter()
        .filter(|(_, o)| *o == victim)
        .map(|(p, _)| *p)
        .collect();
    let i = names.iter().position(|n| *n == victim).unwrap();
    children[i].kill().expect("SIGKILL");
    let _ = children[i].wait();
    let killed = Instant::now();
    let stored_before_kill: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // each orphaned partition led by a live replica again
    let mut taken = BTreeMap::new();
    while taken.len() < orphaned.len() {
        let l = leaders(&db.pool).await;
        for p in &orphaned {
            if let Some(o) = l.get(p)
                && o != victim
            {
                taken.entry(*p).or_insert_with(|| killed.elapsed());
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "partitions {orphaned:?} of {victim} not taken over: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slowest = taken.values().max().copied().unwrap();
    let want = expected(&writers.await.unwrap());
    let trio = wait_for_rows(&db.pool, want.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // nothing more may come
    let after = rows(&db.pool).await;
    for (n, c) in names.iter().zip(children.iter_mut()) {
        if *n != victim {
            terminate(c);
        }
    }
    println!(
        "PARTITIONS partitions={PARTITIONS} replicas=3 converged_s={:.2} killed={victim} orphaned={} messages_stored_at_kill={stored_before_kill} takeover_max_s={:.2} windows={}",
        converged.as_secs_f64(),
        orphaned.len(),
        slowest.as_secs_f64(),
        trio.len()
    );
    let (trio_table, trio_rev) = table(&trio);
    assert!(
        same(&trio_table, &want),
        "three replicas and a kill: {trio_table:?}\nexpected {want:?}"
    );
    // the one-replica table, bot for bot and user for user (the fleets differ only in their names and times)
    let shape = |t: &[Win]| -> Vec<i32> {
        let mut v: Vec<i32> = t.iter().map(|r| r.4).collect();
        v.sort();
        v
    };
    assert_eq!(
        shape(&trio_table),
        shape(&solo_table),
        "the one-replica table's windows"
    );
    assert_eq!(trio_rev, 1, "a window was written twice");
    assert_eq!(
        table(&after),
        (trio_table, 1),
        "no row added or revised after settling"
    );
    assert_one_row_per_window(&db.pool).await;
    // LEADER_LEASE_SECONDS is 3 in the tests' environment
    assert!(
        slowest <= Duration::from_secs(3 + 5),
        "took {slowest:?} to take over {orphaned:?}"
    );
}

/// Two replicas on four partitions, one bot with 8 users, half of whose publishers send `<prefix>.<bot>.<user>` and
/// half `<prefix>.<bot>`, one user id that is no subject token: the events on the shape `by` does not partition are
/// re-published by the route consumer. The table equals the definition, no window is written twice, the bot's keys
/// were kept by the partitions `owner` names (each partition that held some wrote its own watermark of the bot), and
/// the route consumer is drained. Returns those partitions.
async fn two_replicas_from_both_subjects(by: PartitionBy, tag: &str) -> BTreeSet<i32> {
    const PARTS: u32 = 4;
    let bots = fleet(1, tag).await;
    let (db, ns) = (fresh_db().await, nats_ns());
    db.migrate().await;
    let js = ns.ensure_partitioned_by(PARTS, by).await;
    let by_name = match by {
        PartitionBy::Bot => "bot",
        PartitionBy::User => "user",
    };
    let env = |instance: &str| {
        let mut e = env(&db, &ns, instance);
        e.retain(|(k, _)| k != "NATS_PARTITIONS");
        e.push(("NATS_PARTITIONS".into(), PARTS.to_string()));
        e.push(("NATS_PARTITION_BY".into(), by_name.into()));
        e
    };
    let mut children: Vec<std::process::Child> = ["a", "b"]
        .iter()
        .map(|n| {
            let name = format!("{tag}-{n}");
            spawn_recap(
                &["run"],
                &env(&name),
                &log_path(&format!("partitions-{name}")),
            )
        })
        .collect();
    wait_leading(&db.pool, PARTS.into(), Duration::from_secs(30)).await; // up and leading
    let written = write_live(&ns, &js, &bots, 8, true).await;
    let want = expected(&written);
    let got = wait_for_rows(&db.pool, want.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // nothing more may come
    let after = rows(&db.pool).await;
    for c in children.iter_mut() {
        terminate(c);
    }
    let (t, rev) = table(&got);
    assert!(same(&t, &want), "by {by_name}: {t:?}\nexpected {want:?}");
    assert_eq!(rev, 1, "a window was written twice");
    assert_eq!(after.len(), got.len(), "rows appeared late");
    let settings = NatsSettings {
        partitions: PARTS,
        partition_by: by,
        ..ns.settings()
    };
    let (bot, _) = &bots[0];
    let owners: BTreeSet<i32> = written
        .iter()
        .map(|(b, u, _)| settings.owner(b, u) as i32)
        .collect();
    let marked: BTreeSet<i32> =
        sqlx::query_scalar("SELECT part FROM recap_watermarks WHERE bot_name = $1")
            .bind(bot)
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(marked, owners, "the partitions that kept the bot's keys");
    // every event of the other shape went through the route consumer, and none waits there
    let stream = js.get_stream(&ns.stream).await.unwrap();
    let route = stream
        .consumer_info(format!("{}-route", ns.consumer))
        .await
        .unwrap();
    let other_shape = written.len() / 2; // half the users' publishers
    assert!(
        route.delivered.consumer_sequence >= other_shape as u64
            && route.num_pending == 0
            && route.num_ack_pending == 0,
        "route consumer: {route:?}"
    );
    println!(
        "PARTITIONS by={by_name} partitions={PARTS} replicas=2 users=8 owners={owners:?} windows={} routed>={other_shape}",
        t.len()
    );
    owners
}

/// By user (`NATS_PARTITION_BY=user`): one bot's users spread over the partitions, old publishers included.
#[tokio::test(flavor = "multi_thread")]
async fn by_user_one_bot_spreads_over_the_partitions_from_both_subjects() {
    let _shared = common::shared().await;
    let owners = two_replicas_from_both_subjects(PartitionBy::User, "byuser").await;
    assert!(owners.len() > 1, "8 users over 4 partitions: {owners:?}");
}

/// By bot (the default): publishers that already send the user token reach their bot's one partition.
#[tokio::test(flavor = "multi_thread")]
async fn by_bot_user_subjects_reach_the_bots_partition() {
    let _shared = common::shared().await;
    let owners = two_replicas_from_both_subjects(PartitionBy::Bot, "bybot").await;
    assert_eq!(owners.len(), 1, "one bot, one partition: {owners:?}");
}

/// A change of NATS_PARTITIONS or NATS_PARTITION_BY moves keys between partitions: snapshot rows written under
/// another layout are restored by the partition that owns their key now, each by exactly one, and rows of the
/// current layout by their own partition only.
#[tokio::test(flavor = "multi_thread")]
async fn open_windows_follow_their_keys_when_the_layout_changes() {
    let _shared = common::shared().await;
    use recap::pipeline::restore_state;
    use recap::source::nats::{layout, owner};
    let db = fresh_db().await;
    db.migrate().await;
    let store = recap::sink::Store::connect(db.url.parse().unwrap(), 2)
        .await
        .unwrap();
    let t0 = chrono::Utc::now() - chrono::TimeDelta::minutes(5);
    // 200 keys of 2 bots: half written by bot over 2 partitions, half (ids > 100) under the current layout already
    let keys: Vec<(String, String)> = (0..200)
        .map(|i| (format!("bot{}", i % 2), format!("{}", 1_000 + i)))
        .collect();
    for (i, (b, u)) in keys.iter().enumerate() {
        let (part, lay) = if i < 100 {
            (
                owner(PartitionBy::Bot, 2, b, u),
                layout(PartitionBy::Bot, 2),
            )
        } else {
            (
                owner(PartitionBy::User, 4, b, u),
                layout(PartitionBy::User, 4),
            )
        };
        sqlx::query(
            "INSERT INTO recap_open_windows (bot_name, user_id, part, layout, point_ids, point_ts)
             VALUES ($1, $2, $3, $4, ARRAY[$5], ARRAY[$6::timestamptz])",
        )
        .bind(b)
        .bind(u)
        .bind(part as i32)
        .bind(lay)
        .bind(format!("{i}"))
        .bind(t0)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let cfg = recap::tracker::TrackerConfig::default();
    let now = chrono::Utc::now().timestamp_millis();
    let mut total = 0;
    for k in 0..4u32 {
        let mut state = restore_state(&store, cfg, (k, 4), PartitionBy::User)
            .await
            .unwrap();
        let mine: Vec<usize> = (0..keys.len())
            .filter(|i| owner(PartitionBy::User, 4, &keys[*i].0, &keys[*i].1) == k)
            .collect();
        assert_eq!(state.open_keys(), mine.len(), "partition {k}'s keys");
        for i in mine {
            let (b, u) = &keys[i];
            // the key's stored point is known to this partition: read again, it is a duplicate
            assert_eq!(
                state.observe(b, u, &format!("{i}"), t0.timestamp_millis(), now),
                Some(recap::tracker::Observed::Duplicate),
                "{b}/{u} restored by partition {k}"
            );
        }
        total += state.open_keys();
    }
    assert_eq!(total, keys.len(), "every key restored once");
}
