//! Issue 26: forgetting a user, completely, whatever runs at the same time.
//!
//! One test per race: the forget runs while a checkpoint of that user is in its transaction, while a worker's finish
//! of that user's window is in its transaction, and between a vector sync's read of its rows and its upsert. Each
//! pauses the other writer at a fixed point with a lock held by the test (polling `pg_stat_activity`, no sleeps),
//! starts the forget, lets the writer go, and then checks every table of `recall::USER_TABLES`, the view
//! `recap_messages`, the dead letters and the Qdrant collection `recap_summaries`. Another checks the dead
//! letters' key columns (migration 0017) on the shapes stored before it; the last, that a window begun after a forget
//! never takes the points it listed.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use qdrant_client::qdrant::{Condition, CountPointsBuilder, Filter};
use recap::config::Config;
use recap::model::{Position, SourceCheckpoint, StreamSeq};
use recap::pipeline::{Context, Ingest};
use recap::sink::{DeadLetter, NewMessage, WindowOutcome};
use recap::source::Batch;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    c: Config,
}

async fn context(db: &TestDb) -> Context {
    let q = env("QDRANT_URL");
    let args = [
        "t",
        "--database-url",
        db.url.as_str(),
        "--qdrant-url",
        q.as_str(),
        "--idle-gap-minutes",
        "10",
        "--min-messages-for-summary",
        "2",
    ];
    let mut cfg = Args::parse_from(args).c;
    cfg.normalize();
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let points =
        Arc::new(recap::fetch::Points::new(&q, None, cfg.payload_mapping()).expect("points"));
    Context {
        store,
        points,
        summarizer: Arc::new(recap::summarize::extractive::Extractive),
        instance: format!("forget-{}", token()),
        cfg: Arc::new(cfg),
    }
}

async fn ingest(ctx: &Context) -> Ingest {
    Ingest::start(ctx.clone(), &CancellationToken::new())
        .await
        .expect("leader")
        .expect("ingest")
}

const T: i64 = T0;
const SEC: i64 = 1_000;

fn msg(bot: &str, user: &str, id: &str, ts_ms: i64) -> NewMessage {
    NewMessage {
        bot: bot.into(),
        user_id: user.into(),
        point_id: id.into(),
        ts_ms,
    }
}

/// A malformed event of `user` (escaped non-ASCII in its JSON), as the NATS source dead-letters it.
fn letter(bot: &str, user: &str, seq: u64) -> DeadLetter {
    let body = serde_json::to_string(
        &serde_json::json!({"v": 1, "bot": bot, "user_id": user, "ts": "never"}),
    )
    .unwrap();
    // escape every non-ASCII character, as some publishers do
    let raw: String = body
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\u{:04x}", c as u32)
            }
        })
        .collect();
    let (b, u) = DeadLetter::key_of_json(raw.as_bytes());
    DeadLetter {
        source: "nats",
        subject: Some(format!("recap.{bot}")),
        stream_seq: Some(seq),
        raw: raw.into_bytes(),
        reason: "bad ts".into(),
        bot: b,
        user_id: u,
    }
}

/// The messages of one batch: `gone`'s old conversation (closes at `now`), an open message of theirs, and `kept`'s.
fn conversation_batch(bot: &str, gone: &str, kept: &str, position: Option<&str>) -> (Batch, i64) {
    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push(msg(bot, gone, &format!("{gone}-old-{i}"), T + i * SEC));
        messages.push(msg(bot, kept, &format!("{kept}-old-{i}"), T + i * SEC));
    }
    let now = T + 3_600 * SEC;
    messages.push(msg(bot, gone, &format!("{gone}-open"), now - SEC));
    messages.push(msg(bot, kept, &format!("{kept}-open"), now - SEC));
    let batch = Batch {
        messages,
        dead_letters: vec![letter(bot, gone, 7), letter(bot, kept, 8)],
        caught_up: true,
        checkpoint: position.map(|p| SourceCheckpoint {
            name: p.to_string(),
            position: Position::Stream(StreamSeq(1)),
            points_read: 8,
        }),
        ..Batch::default()
    };
    (batch, now)
}

/// A validated extractive summary saying `text`, about `topic`.
fn summary(text: &str, topic: &str) -> recap::summarize::Summary {
    recap::summarize::Summary {
        text: text.into(),
        key_topics: vec![topic.into()],
        emotional_tone: "neutral".into(),
        confidence: 0.9,
        kind: recap::summarize::SummarizerKind::Extractive,
        usage: None,
    }
    .validate()
    .unwrap()
}

/// Everything Postgres and the summary collection hold of one (bot, user), as lines (empty: nothing).
async fn remains(pool: &PgPool, bot: &str, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    for table in recap::recall::USER_TABLES {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM {table} t WHERE bot_name = $1 AND user_id = $2 ORDER BY t::text"
        )))
        .bind(bot)
        .bind(user)
        .fetch_all(pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    let view: Vec<String> = sqlx::query_scalar(
        "SELECT point_id FROM recap_messages WHERE bot_name = $1 AND user_id = $2 ORDER BY point_id",
    )
    .bind(bot)
    .bind(user)
    .fetch_all(pool)
    .await
    .unwrap();
    out.extend(view.into_iter().map(|p| format!("recap_messages: {p}")));
    // dead letters by their raw bytes too (the user id as text, or JSON-escaped), whatever their key columns say
    let escaped: String = user
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\u{:04x}", c as u32)
            }
        })
        .collect();
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT encode(raw, 'escape') FROM recap_dead_letters
         WHERE position(convert_to($1, 'UTF8') IN raw) > 0 OR position(convert_to($2, 'UTF8') IN raw) > 0",
    )
    .bind(user)
    .bind(&escaped)
    .fetch_all(pool)
    .await
    .unwrap();
    out.extend(
        dead.into_iter()
            .map(|r| format!("recap_dead_letters (raw): {r}")),
    );
    let vectors = summary_vectors(bot, user).await;
    if vectors > 0 {
        out.push(format!("recap_summaries: {vectors} vectors"));
    }
    out
}

async fn summary_vectors(bot: &str, user: &str) -> u64 {
    let q = qdrant().await;
    if !q.collection_exists("recap_summaries").await.unwrap() {
        return 0;
    }
    q.count(
        CountPointsBuilder::new("recap_summaries")
            .filter(Filter::must([
                Condition::matches("bot", bot.to_string()),
                Condition::matches("user_id", user.to_string()),
            ]))
            .exact(true),
    )
    .await
    .unwrap()
    .result
    .unwrap()
    .count
}

/// Waits until `n` backends of this database wait for a lock (the paused writer, then the forget).
async fn wait_for_lock_waiters(pool: &PgPool, n: i64) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "{waiting} of {n} lock waiters after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A forget while a checkpoint of that user is in its transaction (its window, its open snapshot row and its dead
/// letter written, not committed). Before issue 26 the forget deleted what it could see, then waited for the leader
/// row: the checkpoint's rows survived it (or the two deadlocked, a 503).
#[tokio::test(flavor = "multi_thread")]
async fn a_forget_during_a_checkpoint_of_that_user_leaves_nothing() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let (bot, gone, kept) = ("ck", "g\u{e9}rald-1", "kept-1");
    let mut ing = ingest(&ctx).await;
    // the checkpoint's last statement (its source position) waits for this lock
    sqlx::query(
        "INSERT INTO recap_checkpoints (name, position, points_read) VALUES ('race', 0, 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM recap_checkpoints WHERE name = 'race' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (batch, now) = conversation_batch(bot, gone, kept, Some("race"));
    let (b, _) = conversation_batch(bot, gone, kept, Some("race"));
    let checkpoint = tokio::spawn(async move {
        let r = ing.apply(&b, now).await;
        (ing, r)
    });
    wait_for_lock_waiters(&db.pool, 1).await;
    let store = ctx.store.clone();
    let forget =
        tokio::spawn(
            async move { recap::recall::forget_rows(&store, bot, gone, 0, &[], &[]).await },
        );
    wait_for_lock_waiters(&db.pool, 2).await;
    blocker.rollback().await.unwrap();
    let (mut ing, applied) = checkpoint.await.unwrap();
    applied.expect("the checkpoint commits (before the forget)");
    forget.await.unwrap().expect("the forget commits");
    assert_eq!(
        remains(&db.pool, bot, gone).await,
        Vec::<String>::new(),
        "the forgotten user is back"
    );
    let kept_rows = remains(&db.pool, bot, kept).await;
    assert!(
        kept_rows.iter().any(|r| r.starts_with("recap_windows"))
            && kept_rows
                .iter()
                .any(|r| r.starts_with("recap_open_windows"))
            && kept_rows
                .iter()
                .any(|r| r.starts_with("recap_dead_letters")),
        "another user's state is missing: {kept_rows:?}"
    );
    // the leader was fenced: it restores (tombstones applied) and reads the same batch again (the source rewinds)
    let r = ing.apply(&Batch::default(), now + SEC).await;
    assert!(
        matches!(r, Err(recap::sink::StoreError::LostLeadership(_))),
        "the leader was not fenced: {r:?}"
    );
    let mut ing = ingest(&ctx).await;
    ing.apply(&batch, now + 2 * SEC).await.unwrap();
    let left = remains(&db.pool, bot, gone).await;
    // the dead letter comes again by its stream sequence: stored once per sequence, it is a new letter of theirs
    // (the stream keeps the malformed event); nothing else may come back
    assert!(
        left.iter().all(|r| r.starts_with("recap_dead_letters")),
        "the forgotten user came back from the re-read batch: {left:?}"
    );
    // a message of theirs after the forget starts fresh
    ing.apply(
        &Batch {
            messages: vec![msg(bot, gone, "new-after", now + 3 * SEC)],
            ..Batch::default()
        },
        now + 3 * SEC,
    )
    .await
    .unwrap();
    let left = remains(&db.pool, bot, gone).await;
    assert!(
        left.iter().any(|r| r == "recap_messages: new-after"),
        "{left:?}"
    );
}

/// A forget while a worker's finish of that user's window is in its transaction (window locked, its summary row
/// about to be inserted). Before issue 26 the forget's delete of the summary rows ran before the finish inserted
/// one, and the row survived.
#[tokio::test(flavor = "multi_thread")]
async fn a_forget_during_a_worker_finish_of_that_users_window_leaves_nothing() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let (bot, gone, kept) = ("wk", "gone-2", "kept-2");
    let mut ing = ingest(&ctx).await;
    let (batch, now) = conversation_batch(bot, gone, kept, None);
    ing.apply(&batch, now).await.unwrap();
    let claimed = ctx
        .store
        .claim_due("worker", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2, "one due window per user");
    let outcomes: Vec<WindowOutcome> = claimed
        .iter()
        .map(|w| WindowOutcome::Summarized {
            summary: summary(
                &format!("{} talked about the mountains", w.user_id),
                "mountains",
            ),
            covered: (0..3).map(|i| format!("{}-old-{i}", w.user_id)).collect(),
            extra: Vec::new(),
            message_count: 3,
            text_chars: 40,
            span: (T, T + 2 * SEC),
            centroid: None,
            words: "mountains talk".into(),
        })
        .collect();
    // the finish's insert of the forgotten user's summary row waits for this (uncommitted) row of the same window key
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp, message_count)
         VALUES ($1, $2, 'blocker', to_timestamp($3::float8 / 1000) AT TIME ZONE 'UTC',
                 to_timestamp($4::float8 / 1000) AT TIME ZONE 'UTC', 1)",
    )
    .bind(gone)
    .bind(bot)
    .bind(T as f64)
    .bind((T + 2 * SEC) as f64)
    .execute(&mut *blocker)
    .await
    .unwrap();
    let store = ctx.store.clone();
    let finish = tokio::spawn(async move {
        let batch: Vec<_> = claimed.iter().zip(&outcomes).collect();
        store.finish_windows("worker", &batch).await
    });
    wait_for_lock_waiters(&db.pool, 1).await;
    let store = ctx.store.clone();
    let forget =
        tokio::spawn(
            async move { recap::recall::forget_rows(&store, bot, gone, 0, &[], &[]).await },
        );
    wait_for_lock_waiters(&db.pool, 2).await;
    blocker.rollback().await.unwrap();
    let finished = finish.await.unwrap().expect("the finish commits");
    assert_eq!(finished.len(), 2);
    forget.await.unwrap().expect("the forget commits");
    assert_eq!(
        remains(&db.pool, bot, gone).await,
        Vec::<String>::new(),
        "the forgotten user is back"
    );
    let kept_rows = remains(&db.pool, bot, kept).await;
    assert!(
        kept_rows
            .iter()
            .any(|r| r.starts_with("conversation_summaries")),
        "another user's summary is missing: {kept_rows:?}"
    );
}

/// A forget between a vector sync's read of its rows and its upsert (the sync writes the vector of a row the forget
/// deleted, after the forget deleted the user's vectors). Before issue 26 that vector stayed in `recap_summaries`.
#[tokio::test(flavor = "multi_thread")]
async fn a_forget_during_a_vector_sync_leaves_no_vector() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let bot = format!("vs{}", token());
    let (gone, kept) = ("gone-3", "kept-3");
    let mut refs = Vec::new();
    for user in [gone, kept] {
        let row: (i32, chrono::NaiveDateTime, chrono::NaiveDateTime) = sqlx::query_as(
            "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp,
                 message_count, revision, summary_type)
             VALUES ($1, $2, 'a summary', now() - interval '1 hour', now(), 4, 1, 'time_window')
             RETURNING id, start_timestamp, end_timestamp",
        )
        .bind(user)
        .bind(&bot)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        // what the sync read of the row (`vectors::on_summarized_many`, `repair`), before the forget
        refs.push((
            recap::recall::vectors::SummaryRef {
                id: row.0,
                bot: bot.clone(),
                user_id: user.to_string(),
                start: row.1,
                end: row.2,
                revision: 1,
                summary_type: "time_window".into(),
            },
            embed(user, 3),
        ));
    }
    let deleted = recap::recall::forget_user(
        &ctx.store,
        &ctx.points,
        &recap::recall::ForgetScope::default(),
        &bot,
        gone,
    )
    .await
    .unwrap();
    assert!(
        deleted.contains(&("conversation_summaries".to_string(), 1)),
        "{deleted:?}"
    );
    // the sync's upsert, after the forget
    recap::recall::vectors::upsert_many(&ctx.store, ctx.points.client(), refs)
        .await
        .unwrap();
    assert_eq!(
        remains(&db.pool, &bot, gone).await,
        Vec::<String>::new(),
        "the forgotten user is back"
    );
    assert_eq!(
        summary_vectors(&bot, kept).await,
        1,
        "another user's vector is missing"
    );
}

/// Dead letters carry their key (migration 0017): written with it by every writer, and parsed from what was stored
/// before (JSON with escaped non-ASCII ids, a body cut at 4 KiB, ingest's `bot/user/point/ts`, the sweep's
/// `point/user`), so the forget finds each of a user's letters and no one else's.
#[tokio::test(flavor = "multi_thread")]
async fn the_forget_finds_every_dead_letter_of_the_user_and_only_theirs() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let (bot, gone, kept) = ("dl", "\u{c9}lodie", "Zo\u{e9}");
    let coll = "whisperengine_memory_dl";
    for user in [gone, kept] {
        let json = letter(bot, user, 0).raw;
        let mut cut = format!(
            r#"{{"bot":"{bot}","user_id":"{user}","content":"{}"}}"#,
            "x".repeat(5000)
        )
        .into_bytes();
        cut.truncate(4096);
        let rows: [(&str, Option<&str>, Vec<u8>); 4] = [
            ("nats", Some("recap.dl"), json),
            ("nats", Some("recap.dl"), cut),
            (
                "ingest",
                Some(bot),
                format!("{bot}/{user}/p-1/99999999999999").into_bytes(),
            ),
            ("sweep", Some(coll), format!("123/{user}").into_bytes()),
        ];
        // stored as before migration 0017: no key columns
        for (source, subject, raw) in rows {
            sqlx::query("INSERT INTO recap_dead_letters (source, subject, raw, reason) VALUES ($1, $2, $3, 'x')")
                .bind(source)
                .bind(subject)
                .bind(raw)
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
    // the migration's backfill, run again over them
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    use sqlx::{Connection, Executor};
    conn.execute(sqlx::raw_sql(include_str!(
        "../../migrations/0017_forget_complete.sql"
    )))
    .await
    .unwrap();
    let keyed: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT source, bot_name, user_id FROM recap_dead_letters ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (i, user) in [gone, kept].into_iter().enumerate() {
        let expected = [
            ("nats", Some(bot), Some(user)),
            ("nats", Some(bot), Some(user)),
            ("ingest", Some(bot), Some(user)),
            ("sweep", None, Some(user)),
        ];
        for (j, (source, b, u)) in expected.into_iter().enumerate() {
            let k = &keyed[i * 4 + j];
            assert_eq!(
                (k.0.as_str(), k.1.as_deref(), k.2.as_deref()),
                (source, b, u),
                "letter {j} of {user}"
            );
        }
    }
    let deleted = recap::recall::forget_rows(&ctx.store, bot, gone, 0, &[], &[coll.to_string()])
        .await
        .unwrap();
    assert!(
        deleted.contains(&("recap_dead_letters".to_string(), 4)),
        "{deleted:?}"
    );
    assert_eq!(remains(&db.pool, bot, gone).await, Vec::<String>::new());
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_dead_letters WHERE user_id = $1")
            .bind(kept)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 4, "another user's letters were deleted");
}

/// A forget fences only the ingest partition that owns the key (by bot: the bot's; by user: the key's), so the
/// other partitions keep their leaders and their in-memory state.
#[tokio::test(flavor = "multi_thread")]
async fn a_forget_fences_only_the_partition_that_owns_the_key() {
    let _shared = common::shared().await;
    use recap::source::nats::{PartitionBy, owner};
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let n = 4u32;
    for part in 0..n as i32 {
        ctx.store
            .try_acquire_partition("leader", Duration::from_secs(60), part)
            .await
            .unwrap()
            .expect("lease");
    }
    let epochs = || async {
        sqlx::query_as::<_, (i32, i64)>("SELECT id - 1, epoch FROM recap_leader ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    for by in [PartitionBy::Bot, PartitionBy::User] {
        let scope = recap::recall::ForgetScope {
            by,
            partitions: n,
            ..recap::recall::ForgetScope::default()
        };
        for user in ["u-1", "u-2", "u-3", "u-4", "u-5"] {
            let before = epochs().await;
            recap::recall::forget_user(&ctx.store, &ctx.points, &scope, "fence", user)
                .await
                .unwrap();
            let after = epochs().await;
            let owner = owner(by, n, "fence", user) as i32;
            for ((part, e0), (_, e1)) in before.iter().zip(&after) {
                let bumped = u32::from(*part == owner) as i64;
                assert_eq!(e1 - e0, bumped, "{by:?}: partition {part}, owner {owner}");
            }
        }
    }
}

/// The deadlock seen on main (a forget answering 503): a checkpoint holding the leader row is about to merge a late
/// message into the user's stored window while the forget, which locked the user's rows first, waits for the leader
/// row. With one lock order the forget waits at the leader row instead: both commit, and nothing of the user is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_forget_and_a_checkpoint_merging_into_the_users_window_do_not_deadlock() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let (bot, gone, kept) = ("dd", "gone-5", "kept-5");
    let mut ing = ingest(&ctx).await;
    let (first, now) = conversation_batch(bot, gone, kept, None);
    ing.apply(&first, now).await.unwrap();
    // the checkpoint's first statement after its fence (its dead letter, stream sequence 99) waits for this one
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO recap_dead_letters (source, stream_seq, raw, reason) VALUES ('nats', 99, 'x', 'blocker')",
    )
    .execute(&mut *blocker)
    .await
    .unwrap();
    let now = now + 10 * SEC;
    let race = Batch {
        messages: vec![
            // late: merged into the stored window T..T+2s (its row locked by the checkpoint)
            msg(bot, gone, "gone-late", T + 3 * SEC),
            msg(bot, gone, "gone-open-2", now - SEC),
            msg(bot, kept, "kept-open-2", now - SEC),
        ],
        dead_letters: vec![letter(bot, gone, 99)],
        caught_up: true,
        ..Batch::default()
    };
    let checkpoint = tokio::spawn(async move {
        let r = ing.apply(&race, now).await;
        (ing, r)
    });
    wait_for_lock_waiters(&db.pool, 1).await;
    let store = ctx.store.clone();
    let forget =
        tokio::spawn(
            async move { recap::recall::forget_rows(&store, bot, gone, 0, &[], &[]).await },
        );
    wait_for_lock_waiters(&db.pool, 2).await;
    blocker.rollback().await.unwrap();
    let (_, applied) = checkpoint.await.unwrap();
    let forgot = forget.await.unwrap();
    assert!(
        applied.is_ok() && forgot.is_ok(),
        "checkpoint: {applied:?}, forget: {forgot:?}"
    );
    assert_eq!(
        remains(&db.pool, bot, gone).await,
        Vec::<String>::new(),
        "the forgotten user is back"
    );
    let kept_rows = remains(&db.pool, bot, kept).await;
    assert!(
        kept_rows.iter().any(|r| r == "recap_messages: kept-open-2"),
        "another user's state is missing: {kept_rows:?}"
    );
}

/// A user forgotten mid-conversation who goes on talking (found by the simulation of issue 24, seeds 839 and 919):
/// the bot's collection still holds the points the forget listed, and a window of theirs begun after the forget can
/// span those points' times, so its scroll finds them. Neither the workers' check of what a scroll found nor the
/// finish's coverage insert takes them (`sink::ingest::taken` asks the tombstone); a point no window has and no
/// tombstone lists is taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_begun_after_a_forget_never_takes_the_points_it_listed() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let ctx = context(&db).await;
    let (bot, user) = ("fa", "talks-on");
    let listed: Vec<String> = vec!["9001".into(), "9002".into()];
    recap::recall::forget_rows(&ctx.store, bot, user, 0, &listed, &[])
        .await
        .expect("forget");
    // after the forget: two new messages, at T and T + 5 s (the listed points' times, T + 1 s and T + 2 s, between)
    let mut ing = ingest(&ctx).await;
    let batch = Batch {
        messages: vec![
            msg(bot, user, "9101", T),
            msg(bot, user, "9102", T + 5 * SEC),
        ],
        caught_up: true,
        ..Batch::default()
    };
    ing.apply(&batch, T + 3_600 * SEC).await.unwrap();
    let claimed = ctx
        .store
        .claim_due("worker", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "the new conversation's window is due");
    let w = &claimed[0];
    // what the window's scroll found besides its own points: the two listed ones and one no one has
    let found = [(w, "9001"), (w, "9002"), (w, "9103")];
    let taken = ctx.store.covered_elsewhere(&found).await.unwrap();
    let mut taken: Vec<&str> = taken.iter().map(|(_, p)| p.as_str()).collect();
    taken.sort();
    assert_eq!(
        taken,
        ["9001", "9002"],
        "the forgotten points are left out, only they"
    );
    // a finish handed a listed point as found by the scroll does not store it in the window's coverage
    let outcome = WindowOutcome::Summarized {
        summary: summary("they talked on about the sea", "sea"),
        covered: vec!["9101".into(), "9102".into(), "9103".into()],
        extra: vec![
            msg(bot, user, "9002", T + 2 * SEC),
            msg(bot, user, "9103", T + 3 * SEC),
        ],
        message_count: 3,
        text_chars: 40,
        span: (T, T + 5 * SEC),
        centroid: None,
        words: "sea talk".into(),
    };
    ctx.store
        .finish_windows("worker", &[(w, &outcome)])
        .await
        .expect("finish");
    let coverage: Vec<String> =
        sqlx::query_scalar("SELECT point_ids FROM recap_windows WHERE id = $1")
            .bind(w.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        coverage,
        ["9101", "9103", "9102"], // in time order
        "the window's coverage holds a forgotten point, or lost a found one"
    );
}
