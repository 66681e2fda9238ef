//! Text search over what was said (issue 23) on real services: windows whose subject word is said in the
//! conversation but is not in their summary (extractive, written by `recap sweep --once`) are found by that word
//! through `POST /v1/recall/search`; a summary match ranks before a said-word match; the words are replaced when the
//! window is summarized again, go with their row, and are forgotten with the user.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use qdrant_client::qdrant::{PointStruct, UpsertPointsBuilder, Value};
use serde_json::{Value as Json, json};

const TOKEN: &str = "test-words-token-0123456789";
/// One per window: said once by the user (and echoed by the bot), never a topic, never quoted.
const SUBJECTS: [&str; 40] = [
    "kayaking",
    "violin",
    "sourdough",
    "origami",
    "telescope",
    "volleyball",
    "calligraphy",
    "beekeeping",
    "snorkeling",
    "juggling",
    "crochet",
    "archery",
    "fencing",
    "bouldering",
    "karaoke",
    "skateboarding",
    "ceramics",
    "birdwatching",
    "taxidermy",
    "woodcarving",
    "embroidery",
    "podcasting",
    "geocaching",
    "ventriloquism",
    "skydiving",
    "surfing",
    "mahjong",
    "sudoku",
    "harmonica",
    "accordion",
    "trombone",
    "saxophone",
    "ukulele",
    "banjo",
    "harp",
    "cello",
    "clarinet",
    "bagpipes",
    "didgeridoo",
    "xylophone",
];
/// What each window is mostly about: three words repeated in every filler message (the summary's topics).
const THEMES: [[&str; 3]; 4] = [
    ["weekend", "plans", "friends"],
    ["office", "meeting", "deadline"],
    ["garden", "tomatoes", "watering"],
    ["dinner", "recipe", "kitchen"],
];
const USERS: usize = 4;
const SLOT: i64 = 3 * 60 * MIN;
const DIM: usize = 384;

/// A unit vector along axis `axis` with a little deterministic noise.
fn vector(axis: usize, seed: u64) -> Vec<f32> {
    let mut h = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..DIM)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            ((h % 1000) as f32 / 1000.0 - 0.5) * 0.1
        })
        .collect();
    v[axis] += 1.0;
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn point(user: &str, role: &str, text: String, ts: i64, axis: usize, seed: u64) -> PointStruct {
    let mut payload: HashMap<String, Value> = HashMap::new();
    payload.insert("user_id".into(), user.into());
    payload.insert("content".into(), text.into());
    payload.insert("role".into(), role.into());
    payload.insert("memory_type".into(), "conversation".into());
    let naive = chrono::DateTime::from_timestamp_millis(ts)
        .unwrap()
        .naive_utc();
    payload.insert(
        "timestamp".into(),
        naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string().into(),
    );
    payload.insert("timestamp_unix".into(), (ts as f64 / 1000.0).into());
    payload.insert("emotional_context".into(), "neutral".into());
    let vectors: HashMap<String, Vec<f32>> = [
        ("content".to_string(), vector(axis, seed)),
        ("emotion".to_string(), vector(7, seed + 1)),
        ("semantic".to_string(), vector(9, seed + 2)),
    ]
    .into();
    PointStruct::new(uuid::Uuid::new_v4().to_string(), vectors, payload)
}

/// One seeded window: its user, start and the word said in it but not summarized (`None`: the ranking window).
struct Seeded {
    user: String,
    start: i64,
    subject: Option<&'static str>,
}

/// A window's points: eight exchanges about `theme`, the fourth user message about `subject` (once, far from the
/// others' vectors, so the extractive summary neither quotes it nor makes it a topic).
fn window(
    user: &str,
    start: i64,
    theme: [&str; 3],
    subject: Option<&str>,
    seed: &mut u64,
) -> Vec<PointStruct> {
    let [a, b, c] = theme;
    let mut out = Vec::new();
    for i in 0..8i64 {
        let t = start + i * 2 * MIN;
        *seed += 3;
        let (text, axis) = match subject {
            Some(s) if i == 3 => (
                format!("Oh and I finally tried {s} for the first time, no idea why"),
                1,
            ),
            _ => (
                format!("The {a} {b} with {c} came up again, {a} and {b} and {c} all day ({i})"),
                0,
            ),
        };
        out.push(point(user, "user", text, t, axis, *seed));
        let reply = match subject {
            Some(s) if i == 3 => format!("Oh, {s}? How was it?"),
            _ => format!("Tell me more about the {a} and the {c}."),
        };
        out.push(point(user, "assistant", reply, t + 1000, axis, *seed + 1));
    }
    out
}

struct Setup {
    db: TestDb,
    bot: String,
    collection: String,
    windows: Vec<Seeded>,
}

impl Setup {
    fn env(&self) -> Vec<(String, String)> {
        let mut v = recap_env(&self.db, None);
        v.push(("COLLECTION_PATTERNS".into(), self.collection.clone()));
        v.push((
            "COLLECTION_MAP".into(),
            format!("{}={}", self.collection, self.bot),
        ));
        v.push(("LOOKBACK_DAYS".into(), "3650".into()));
        v
    }

    /// `recap sweep --once` until every window has its row (a fetch that failed under load is retried).
    async fn summarize(&self, rows: usize) {
        let t0 = Instant::now();
        loop {
            let (code, out, err) = run_recap(&["sweep", "--once"], &self.env());
            assert_eq!(code, 0, "sweep --once failed: {out}{err}");
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM recap_windows WHERE state = 'done' AND summary_id IS NOT NULL",
            )
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
            if done as usize >= rows {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "only {done} of {rows} windows done: {out}{err}"
            );
            sqlx::query("UPDATE recap_windows SET not_before = now() WHERE state = 'due'")
                .execute(&self.db.pool)
                .await
                .unwrap();
        }
    }

    /// The row of a window (by its start) and its summary text and topics, lowercased.
    async fn row(&self, user: &str, start: i64) -> (i64, String) {
        let start = chrono::DateTime::from_timestamp_millis(start)
            .unwrap()
            .naive_utc();
        let (id, text): (i32, String) = sqlx::query_as(
            "SELECT id, lower(summary_text || ' ' || array_to_string(key_topics, ' ')) FROM conversation_summaries
             WHERE bot_name = $1 AND user_id = $2 AND start_timestamp <= $3 AND end_timestamp >= $3",
        )
        .bind(&self.bot)
        .bind(user)
        .bind(start)
        .fetch_one(&self.db.pool)
        .await
        .unwrap_or_else(|e| panic!("no row at {start}: {e}"));
        (id as i64, text)
    }

    async fn serve(&self) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut envs = self.env();
        envs.retain(|(k, _)| k != "HTTP_ADDR");
        envs.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        envs.push(("RECALL_TOKEN".into(), TOKEN.into()));
        let child = spawn_recap(&["run"], &envs, &log_path("words"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let t0 = Instant::now();
        while s
            .http
            .get(format!("{}/healthz", s.base))
            .send()
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "recap did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    }
}

struct Server {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

impl Server {
    /// Text search: the ids found, best first, and their scores.
    async fn search(&self, bot: &str, user: &str, text: &str) -> Vec<(i64, f64)> {
        let resp = self
            .http
            .post(format!("{}/v1/recall/search", self.base))
            .bearer_auth(TOKEN)
            .json(&json!({"bot": bot, "user_id": user, "text": text, "limit": 5}))
            .send()
            .await
            .expect("search");
        assert_eq!(resp.status().as_u16(), 200);
        let v: Json = resp.json().await.unwrap();
        v["items"]
            .as_array()
            .unwrap_or_else(|| panic!("no items: {v}"))
            .iter()
            .map(|i| (i["id"].as_i64().unwrap(), i["score"].as_f64().unwrap()))
            .collect()
    }
}

/// Four users with ten windows each, one subject word per window said but not summarized; the first user has one
/// more window whose summary is about the first window's subject word (the ranking check).
async fn setup() -> Setup {
    let db = fresh_db().await;
    db.migrate().await;
    let bot = format!("wbot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let (mut points, mut windows, mut seed) = (Vec::new(), Vec::new(), 1u64);
    for u in 0..USERS {
        let user = format!("user-{u}-{}", token());
        for k in 0..SUBJECTS.len() / USERS {
            let subject = SUBJECTS[u * (SUBJECTS.len() / USERS) + k];
            let start = T0 + k as i64 * SLOT + u as i64 * MIN;
            points.extend(window(
                &user,
                start,
                THEMES[(u + k) % THEMES.len()],
                Some(subject),
                &mut seed,
            ));
            windows.push(Seeded {
                user: user.clone(),
                start,
                subject: Some(subject),
            });
        }
    }
    // The first user's first subject word as the theme of a later window: there it is in the summary.
    let (user, start) = (windows[0].user.clone(), T0 + 20 * SLOT);
    points.extend(window(
        &user,
        start,
        [SUBJECTS[0], "paddle", "river"],
        None,
        &mut seed,
    ));
    windows.push(Seeded {
        user,
        start,
        subject: None,
    });
    for chunk in points.chunks(500) {
        q.upsert_points(UpsertPointsBuilder::new(&collection, chunk.to_vec()).wait(true))
            .await
            .expect("upsert");
    }
    let s = Setup {
        db,
        bot,
        collection,
        windows,
    };
    s.summarize(s.windows.len()).await;
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_is_found_by_a_word_said_in_it_that_its_summary_does_not_repeat() {
    let _shared = common::shared().await;
    let s = setup().await;
    let server = s.serve().await;
    let (mut found, mut first, mut total) = (0, 0, 0);
    let mut missed = Vec::new();
    for w in s.windows.iter() {
        let Some(subject) = w.subject else { continue };
        let (id, summary) = s.row(&w.user, w.start).await;
        assert!(
            !summary.contains(subject),
            "the summary repeats {subject}, the test needs one that does not: {summary}"
        );
        total += 1;
        let hits = server.search(&s.bot, &w.user, subject).await;
        if hits.iter().any(|h| h.0 == id) {
            found += 1;
        } else {
            missed.push(subject);
        }
        if hits.first().map(|h| h.0) == Some(id) {
            first += 1;
        }
    }
    let ratio = found as f64 / total as f64;
    println!(
        "said-word search: {found} of {total} windows found ({:.1}%), {first} ranked first; missed: {missed:?}",
        ratio * 100.0
    );
    assert!(
        ratio >= 0.95,
        "only {found} of {total} windows found by a word said in them; missed {missed:?}"
    );

    // A summary match ranks before a said-word match: the ranking window is about SUBJECTS[0], which the first
    // window only mentions.
    let rank_window = s.windows.last().unwrap();
    let (rank_id, rank_summary) = s.row(&rank_window.user, rank_window.start).await;
    assert!(rank_summary.contains(SUBJECTS[0]), "{rank_summary}");
    let (first_id, _) = s.row(&s.windows[0].user, s.windows[0].start).await;
    let hits = server.search(&s.bot, &s.windows[0].user, SUBJECTS[0]).await;
    let ids: Vec<i64> = hits.iter().map(|h| h.0).collect();
    assert_eq!(ids, vec![rank_id, first_id], "{hits:?}");
    assert!(
        hits[0].1 > 1.0 && hits[1].1 > 0.0 && hits[1].1 < 1.0,
        "{hits:?}"
    );
    // a word nobody said finds nothing
    assert!(
        server
            .search(&s.bot, &s.windows[0].user, "zeppelin")
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn said_words_are_bounded_replaced_on_a_new_revision_gone_with_their_row_and_forgotten() {
    let _shared = common::shared().await;
    let s = setup().await;
    let pool = &s.db.pool;
    // one words row per window row, none for anything else
    let (rows, words, orphans): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversation_summaries),
                (SELECT count(*) FROM recap_window_words),
                (SELECT count(*) FROM recap_window_words w JOIN conversation_summaries s ON s.id = w.summary_id
                  WHERE s.bot_name <> w.bot_name OR s.user_id <> w.user_id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((rows, words, orphans), (s.windows.len() as i64, rows, 0));
    // stripped: no positions, each lexeme once (a window's filler says its theme words eight times)
    let (id, _) = s.row(&s.windows[0].user, s.windows[0].start).await;
    let stored: String =
        sqlx::query_scalar("SELECT words::text FROM recap_window_words WHERE summary_id = $1")
            .bind(id as i32)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(
        stored.contains("'kayak'") && !stored.contains(':'),
        "{stored}"
    );

    // Summarized again (`recap resummarize`, the way rows written before migration 0014 get their words): the
    // words are replaced, not added to.
    sqlx::query("UPDATE recap_window_words SET words = to_tsvector('english', 'stale zeppelin')")
        .execute(pool)
        .await
        .unwrap();
    let (code, out, err) = run_recap(
        &["resummarize", "--from", "extractive", "--since", "3650d"],
        &s.env(),
    );
    assert_eq!(code, 0, "{out}{err}");
    s.summarize(s.windows.len()).await;
    let (revision, stale, with_subject): (i32, i64, i64) = sqlx::query_as(
        "SELECT (SELECT min(revision) FROM conversation_summaries),
                (SELECT count(*) FROM recap_window_words WHERE words @@ to_tsquery('english', 'zeppelin')),
                (SELECT count(*) FROM recap_window_words WHERE words @@ to_tsquery('english', 'kayaking'))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((revision, stale), (2, 0));
    assert!(with_subject >= 1);

    // A row deleted (as a merge deletes the later window's row) takes its words along.
    sqlx::query("DELETE FROM conversation_summaries WHERE id = $1")
        .bind(id as i32)
        .execute(pool)
        .await
        .unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM recap_window_words WHERE summary_id = $1")
            .bind(id as i32)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(left, 0);

    // Forget: the user's words are deleted, another user's stay.
    let (a, b) = (
        s.windows[0].user.clone(),
        s.windows[SUBJECTS.len() / USERS].user.clone(),
    );
    assert_ne!(a, b);
    let bot = s.bot.clone();
    let count = |u: String| {
        let bot = bot.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM recap_window_words WHERE bot_name = $1 AND user_id = $2",
            )
            .bind(bot)
            .bind(u)
            .fetch_one(pool)
            .await
            .unwrap()
        }
    };
    let (before_a, before_b) = (count(a.clone()).await, count(b.clone()).await);
    assert!(before_a > 0 && before_b > 0);
    let server = s.serve().await;
    let resp = server
        .http
        .delete(format!("{}/v1/users/{}/{}", server.base, s.bot, a))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Json = resp.json().await.unwrap();
    assert_eq!(v["deleted"]["recap_window_words"], json!(before_a), "{v}");
    assert_eq!(count(a.clone()).await, 0);
    assert_eq!(count(b).await, before_b);
    assert!(server.search(&s.bot, &a, SUBJECTS[1]).await.is_empty());
}

/// A summarized outcome of the points as the worker builds it (extractive summary, said words).
fn outcome(bot: &str, user: &str, pts: &[TestPoint]) -> recap::sink::WindowOutcome {
    let messages: Vec<recap::summarize::Message> = pts
        .iter()
        .map(|p| recap::summarize::Message {
            point_id: p.id.clone(),
            role: p.role.clone(),
            text: p.content.clone(),
            ts_ms: p.ts_ms,
            emotion: None,
            vector: vec![],
        })
        .collect();
    let input = recap::summarize::WindowInput {
        bot: bot.into(),
        user_id: user.into(),
        start_ms: pts[0].ts_ms,
        end_ms: pts[pts.len() - 1].ts_ms,
        messages,
    };
    recap::sink::WindowOutcome::Summarized {
        summary: recap::summarize::extractive::summarize_window(&input).unwrap(),
        covered: pts.iter().map(|p| p.id.clone()).collect(),
        extra: vec![],
        message_count: pts.len() as i32,
        text_chars: input.text_chars(),
        span: (input.start_ms, input.end_ms),
        centroid: None,
        words: recap::sink::words::said(&input.messages),
    }
}

/// Both finish paths (the batch's set-based one and the one-window fallback) write the words with the row, and a
/// window summarized again replaces them.
#[tokio::test(flavor = "multi_thread")]
async fn both_finish_paths_write_the_words_and_a_revision_replaces_them() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let store = recap::sink::Store::connect_lazy(db.url.parse().unwrap(), 2);
    let (bot, user) = ("fbot", "fuser");
    let mk = |i: i64, text: &str| TestPoint {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.into(),
        role: "user".into(),
        content: text.into(),
        ts_ms: T0 + i * MIN,
        emotion: "neutral".into(),
        memory_type: "conversation".into(),
    };
    let first = [
        mk(0, "the weekend plans with friends"),
        mk(1, "weekend plans, friends again"),
        mk(2, "I tried kayaking once"),
    ];
    let second = [
        mk(100, "the office meeting deadline"),
        mk(101, "office meeting and the deadline"),
        mk(102, "my violin lesson was fun"),
    ];
    let a = insert_due_window(&db.pool, bot, user, &first.iter().collect::<Vec<_>>()).await;
    let b = insert_due_window(&db.pool, bot, user, &second.iter().collect::<Vec<_>>()).await;
    let claimed = store
        .claim_due("w", Duration::from_secs(60), 10)
        .await
        .unwrap();
    let wa = claimed.iter().find(|w| w.id == a).unwrap().clone();
    let wb = claimed.iter().find(|w| w.id == b).unwrap().clone();
    let (oa, ob) = (outcome(bot, user, &first), outcome(bot, user, &second));
    // a: the batch path; b: the one-window path
    store.finish_windows("w", &[(&wa, &oa)]).await.unwrap();
    store.finish_window("w", &wb, &ob).await.unwrap();
    let said = |word: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT min(w.id) FROM recap_windows w JOIN recap_window_words ww ON ww.summary_id = w.summary_id
                 WHERE ww.words @@ to_tsquery('english', $1)",
            )
            .bind(word)
            .fetch_one(&pool)
            .await
            .map(|id| id.unwrap_or(0))
            .unwrap()
        }
    };
    assert_eq!((said("kayaking").await, said("violin").await), (a, b));

    // b summarized again from other messages (a revision): its words are replaced, through the batch path
    sqlx::query("UPDATE recap_windows SET state = 'due', version = version + 1 WHERE id = $1")
        .bind(b)
        .execute(&db.pool)
        .await
        .unwrap();
    let claimed = store
        .claim_due("w", Duration::from_secs(60), 10)
        .await
        .unwrap();
    let wb2 = claimed.iter().find(|w| w.id == b).unwrap().clone();
    assert!(wb2.summary_id.is_some());
    let third = [
        second[0].clone(),
        second[1].clone(),
        mk(103, "the cello is better"),
    ];
    let ob2 = outcome(bot, user, &third);
    store.finish_windows("w", &[(&wb2, &ob2)]).await.unwrap();
    assert_eq!((said("cello").await, said("violin").await), (b, 0));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_window_words")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}
