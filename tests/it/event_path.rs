//! The event path end to end on real services: JetStream -> tracker -> Qdrant fetch -> summary rows.

use crate::common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn events_become_exactly_the_expected_windows_once() {
    let _shared = common::shared().await;
    let s = scenario(4).await;
    let js = s.nats.ensure().await;
    let stored = s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    assert_eq!(stored, s.points.len());
    let expected = expected_rows(&s.bot, &s.points, 5);
    assert_eq!(expected.len(), 8, "two summarizable windows per user");
    let (rows, _) = run_until(&s, expected.len(), &[]).await;
    assert_eq!(rows, expected);
    assert_one_row_per_window(&s.db.pool).await;
    let too_short: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE state = 'too_short'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        too_short, 4,
        "each user's 4-message window is recorded as too short, with no row"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let _shared = common::shared().await;
    let s = scenario(40).await; // 40 users x 24 messages (+ pair events) = 1,200 points
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let mut envs = recap_env(&s.db, Some(&s.nats));
    envs.push(("NATS_ACK_WAIT".into(), "2s".into()));
    envs.push(("INGEST_BATCH_SIZE".into(), "50".into()));
    let log = log_path("crash");
    let mut seed = recap::tracker::point_hash(&token());
    let mut kills = 0;
    for _ in 0..20 {
        let mut child = spawn_recap(&["run"], &envs, &log);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 1500)).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
        assert_one_row_per_window(&s.db.pool).await;
    }
    assert_eq!(kills, 20);
    let mut child = spawn_recap(&["run"], &envs, &log);
    let rows = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(120)).await;
    terminate(&mut child);
    assert_eq!(
        rows, expected,
        "table after 20 SIGKILLs differs from the uninterrupted definition"
    );
    assert_one_row_per_window(&s.db.pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_produce_the_same_table_as_one() {
    let _shared = common::shared().await;
    let s = scenario(12).await;
    // an LLM that takes longer than a lease lasts for a batch worked two at a time: calls are counted where they are
    // made, at the server
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"latency_ms": 600})).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let mut envs = recap_env(&s.db, Some(&s.nats));
    envs.retain(|(k, _)| k != "SUMMARIZER");
    envs.extend(
        [
            ("SUMMARIZER", "llm".to_string()),
            ("LLM_BASE_URL", llm.api_base()),
            ("LLM_API_KEY", "sk-test-key".into()),
            ("LLM_REQUESTS_PER_SECOND", "50".into()),
            ("LLM_CONCURRENCY", "2".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let (log_a, log_b) = (log_path("replica-a"), log_path("replica-b"));
    let mut a_env = envs.clone();
    a_env.push(("INSTANCE_ID".into(), "replica-a".into()));
    let mut b_env = envs;
    b_env.push(("INSTANCE_ID".into(), "replica-b".into()));
    let mut a = spawn_recap(&["run"], &a_env, &log_a);
    let mut b = spawn_recap(&["run"], &b_env, &log_b);
    let rows = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // a call still in flight would be counted
    terminate(&mut a);
    terminate(&mut b);
    assert_eq!(rows, expected);
    let st = llm.stats().await;
    assert_eq!(
        st["calls_total"].as_u64().unwrap(),
        expected.len() as u64,
        "each window summarized exactly once (LLM calls counted at the server): {st}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_message_updates_the_same_row_with_revision_2() {
    let _shared = common::shared().await;
    let s = scenario(2).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    let expected = expected_rows(&s.bot, &s.points, 5);
    let envs = recap_env(&s.db, Some(&s.nats));
    let log = log_path("late");
    let mut child = spawn_recap(&["run"], &envs, &log);
    let before = wait_for_rows(&s.db.pool, expected.len(), Duration::from_secs(90)).await;
    assert_eq!(before, expected);
    // a message stored late, inside the first window of the first user
    let first = &expected[0];
    let mut late = conversation(
        &first.user,
        first.start.and_utc().timestamp_millis() + 30_000,
        1,
        MIN,
        false,
    );
    late.truncate(1);
    upsert(&qdrant().await, &s.collection, &late).await;
    s.nats.publish(&js, &s.bot, &s.collection, &late).await;
    let t0 = std::time::Instant::now();
    let updated = loop {
        let r = rows(&s.db.pool).await;
        if r.iter().any(|r| r.revision == 2) || t0.elapsed() > Duration::from_secs(60) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    terminate(&mut child);
    assert_eq!(updated.len(), expected.len(), "still one row per window");
    let row = updated
        .iter()
        .find(|r| r.user == first.user && r.start == first.start)
        .expect("same row");
    assert_eq!(row.revision, 2);
    assert_eq!(row.count, first.count + 1);
    assert_eq!(
        row.end, first.end,
        "the late message lies inside the window"
    );
    assert_one_row_per_window(&s.db.pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_publishes_and_redeliveries_change_nothing() {
    let _shared = common::shared().await;
    let s = scenario(3).await;
    let js = s.nats.ensure().await;
    s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    // the same publishes again: JetStream drops them by Nats-Msg-Id
    let again = s.nats.publish(&js, &s.bot, &s.collection, &s.points).await;
    assert_eq!(again, 0, "duplicate publishes are dropped by the stream");
    // re-sent with fresh message ids (a bot retrying after the duplicate window): the stream keeps them, recap must not
    let resend = s
        .points
        .iter()
        .map(|p| {
            let e = p.event(&s.bot, &s.collection);
            (
                e.subject(&s.nats.prefix),
                Some(format!("{}-again", p.id)),
                e.to_body(),
            )
        })
        .collect();
    assert_eq!(s.nats.publish_raw(&js, resend).await, s.points.len());
    let expected = expected_rows(&s.bot, &s.points, 5);
    let (rows, _) = run_until(&s, expected.len(), &[]).await;
    assert_eq!(rows, expected);
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_messages")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let distinct = s
        .points
        .iter()
        .filter(|p| p.role != "conversation_pair")
        .count() as i64;
    assert_eq!(messages, distinct);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_hostile_events_are_dead_lettered_and_the_stream_flows() {
    let _shared = common::shared().await;
    let s = scenario(4).await;
    let js = s.nats.ensure().await;
    // The valid events go out in time order, as live bots publish them (see `NatsNs::publish`): in `s.points` order
    // one user's session 8 h later comes before the next user's first one, far beyond the allowed lateness, so the
    // per-bot watermark closes a window split by a batch boundary from part of its messages (its late rest then
    // reopens it: revision 2 whenever the worker summarized the part first, a race the CPU load decides).
    let mut valid = s.points.clone();
    valid.sort_by_key(|p| p.ts_ms);
    let mut items: Vec<(String, Option<String>, Vec<u8>)> = Vec::new();
    let subject = format!("{}.{}", s.nats.prefix, s.bot);
    for i in 0..1000 {
        let body: Vec<u8> = match i % 8 {
            0 => vec![0xff, 0xfe, 0xfd, b'{'],
            1 => br#"{"v":1,"bot":"#.to_vec(),
            2 => format!(r#"{{"v":2,"bot":"{}","point_id":"p{i}","user_id":"u","ts":"2025-11-20T12:00:00Z"}}"#, s.bot).into_bytes(),
            3 => format!(r#"{{"v":1,"bot":"{}","point_id":"p{i}","user_id":"x'); DROP TABLE conversation_summaries;--\u0007","ts":"2025-11-20T12:00:00Z"}}"#, s.bot).into_bytes(),
            4 => format!(r#"{{"v":1,"bot":"{}","point_id":"p{i}","user_id":"u","ts":"0001-01-01T00:00:00Z"}}"#, s.bot).into_bytes(),
            5 => vec![b'x'; 8000],
            6 => format!(r#"{{"v":1,"bot":"{}","point_id":{i},"user_id":"u","ts":"2025-11-20T12:00:00Z"}}"#, s.bot).into_bytes(),
            _ => r#"{"v":1,"bot":"someone_else","point_id":"p","user_id":"u","ts":"2025-11-20T12:00:00Z"}"#.as_bytes().to_vec(),
        };
        items.push((subject.clone(), Some(format!("bad-{i}")), body));
    }
    // interleave: hostile events between valid ones
    let mut mixed = Vec::new();
    let mut bad = items.into_iter();
    for p in &valid {
        let e = p.event(&s.bot, &s.collection);
        mixed.push((e.subject(&s.nats.prefix), Some(p.id.clone()), e.to_body()));
        for b in bad.by_ref().take(10) {
            mixed.push(b);
        }
    }
    mixed.extend(bad);
    s.nats.publish_raw(&js, mixed).await;
    let expected = expected_rows(&s.bot, &valid, 5);
    let (rows, _) = run_until(&s, expected.len(), &[]).await;
    assert_eq!(rows, expected);
    // Deterministic, whatever the timing: no window was closed before all its messages were read (a late message
    // bumps `version`), so the table above cannot depend on when the worker got to a window.
    let reopened: Vec<(String, chrono::DateTime<chrono::Utc>, i32)> = sqlx::query_as(
        "SELECT user_id, start_ts, version FROM recap_windows WHERE version > 1 ORDER BY user_id, start_ts",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert!(
        reopened.is_empty(),
        "windows closed from part of their messages and reopened by late ones: {reopened:?}"
    );
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT split_part(reason, ':', 1), count(*) FROM recap_dead_letters GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let total: i64 = dead.iter().map(|d| d.1).sum();
    assert_eq!(
        total, 1000,
        "every hostile event is a dead letter: {dead:?}"
    );
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_summaries")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(tables as usize, expected.len());
}

/// A delivery that never reaches recap (a pull request dropped after a stream error, a reconnect): with `ack_policy`
/// all, acknowledging a later message would acknowledge it unread. `NatsSource` sees the jump in delivery numbers,
/// leaves the rest unacknowledged and starts the consumer again after the last message it handed out, so every event
/// is handed out and none is acknowledged unread. (Here the pull stream is dropped and another client takes one
/// delivery from the durable consumer and drops it.)
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_delivery_is_read_again_not_acknowledged_unread() {
    let _shared = common::shared().await;
    use futures::StreamExt;
    use recap::source::Source;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let bot = format!("b{}", token());
    let event = |i: usize| {
        let e = recap::event::StoredEvent {
            v: 1,
            bot: bot.clone(),
            collection: None,
            point_id: format!("{}", 1000 + i),
            user_id: "u".into(),
            role: Some("user".into()),
            ts: chrono::Utc::now(),
        };
        (e.subject(&ns.prefix), Some(e.point_id.clone()), e.to_body())
    };
    let mut settings = ns.settings();
    settings.batch_size = 10;
    let mut source = recap::source::nats::NatsSource::start(settings.clone())
        .await
        .unwrap();
    let mut handed = std::collections::BTreeSet::new();
    let take = async |source: &mut recap::source::nats::NatsSource,
                      handed: &mut std::collections::BTreeSet<String>| {
        let b = source.next_batch().await.unwrap();
        handed.extend(b.messages.iter().map(|m| m.point_id.clone()));
        source.seal();
        source.commit().await.unwrap(); // as after the checkpoint
    };
    ns.publish_raw(&js, (1..=3).map(event).collect()).await;
    while handed.len() < 3 {
        take(&mut source, &mut handed).await;
    }
    // the pull stream goes (as on an error); another client takes event 4 from the consumer and drops it
    source.drop_pull_stream();
    ns.publish_raw(&js, vec![event(4)]).await;
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&ns.stream)
        .await
        .unwrap()
        .get_consumer(&ns.consumer)
        .await
        .unwrap();
    let mut thief = consumer.fetch().max_messages(1).messages().await.unwrap();
    // Event 4 goes to the thief, or (when the server still holds the dropped stream's pull request) into that
    // request's inbox: either way a delivery recap never receives.
    if let Some(Ok(stolen)) = thief.next().await {
        assert_eq!(stolen.info().unwrap().stream_sequence, 4);
    }
    drop(thief);
    ns.publish_raw(&js, (5..=6).map(event).collect()).await;
    let t0 = std::time::Instant::now();
    while handed.len() < 6 && t0.elapsed() < Duration::from_secs(10) {
        take(&mut source, &mut handed).await;
    }
    let want: std::collections::BTreeSet<String> =
        (1..=6).map(|i| format!("{}", 1000 + i)).collect();
    assert_eq!(handed, want, "every event handed out");
    // acks reach the server asynchronously (this reads from another connection): poll a little
    let t0 = std::time::Instant::now();
    let mut info = consumer_info(&js, &ns).await;
    while (info.num_pending, info.num_ack_pending) != (0, 0)
        && t0.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = consumer_info(&js, &ns).await;
    }
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "all read and acknowledged"
    );
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

/// Issue 24, case 14: a partition handed over before its first checkpoint. The leader before took events from the
/// durable consumer and never committed (nothing acknowledged, nothing stored); the next leader, with no stored
/// position, must read them again now, not after `ack_wait` behind newer events (where its ack-all of a later event
/// would acknowledge them unread).
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_before_the_first_checkpoint_hands_its_deliveries_on() {
    let _shared = common::shared().await;
    use recap::source::Source;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let db = fresh_db().await;
    db.migrate().await;
    let store = recap::sink::Store::connect(db.url.parse().unwrap(), 2)
        .await
        .unwrap();
    let bot = format!("b{}", token());
    let event = |i: usize| {
        let e = recap::event::StoredEvent {
            v: 1,
            bot: bot.clone(),
            collection: None,
            point_id: format!("{}", 2000 + i),
            user_id: "u".into(),
            role: Some("user".into()),
            ts: chrono::Utc::now(),
        };
        (e.subject(&ns.prefix), Some(e.point_id.clone()), e.to_body())
    };
    let mut settings = ns.settings();
    settings.batch_size = 10;
    // the first leader: takes events 1-3, never checkpoints, hands the partition back
    let mut first = recap::source::nats::NatsSource::start(settings.clone())
        .await
        .unwrap();
    first.rewind(&store).await.unwrap();
    ns.publish_raw(&js, (1..=3).map(event).collect()).await;
    let mut taken = 0;
    let t0 = std::time::Instant::now();
    while taken < 3 && t0.elapsed() < Duration::from_secs(10) {
        taken += first.next_batch().await.unwrap().messages.len();
    }
    assert_eq!(taken, 3, "the first leader received events 1-3");
    drop(first);
    ns.publish_raw(&js, (4..=5).map(event).collect()).await;
    // the next leader: nothing stored yet
    let mut next = recap::source::nats::NatsSource::start(settings)
        .await
        .unwrap();
    next.rewind(&store).await.unwrap();
    let mut handed = Vec::new();
    let t0 = std::time::Instant::now();
    while handed.len() < 5 && t0.elapsed() < Duration::from_secs(10) {
        let b = next.next_batch().await.unwrap();
        handed.extend(b.messages.iter().map(|m| m.point_id.clone()));
    }
    let want: Vec<String> = (1..=5).map(|i| format!("{}", 2000 + i)).collect();
    assert_eq!(
        handed, want,
        "the next leader reads every event, in order, before ack_wait"
    );
}
