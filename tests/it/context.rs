//! `GET /v1/context` on real services (Postgres, the Qdrant test server, and for the live tests `recap run` with
//! NATS and the LLM test server).
//!
//! The state-driven tests run the recall router in this process over state written as ingest writes it (checkpoint
//! rows in `recap_open_windows`, closed windows with their coverage and summary rows, running summaries as task A's
//! workers write them) and points in a Qdrant collection, at wall-clock times: budgets, exhaustiveness, the window
//! definition, the latest message before its event is ingested, running-summary validity, the closed-window case,
//! `query=`, 4xx, 401, `null` for an unknown user. `sweep_only_recap_run_serves_the_open_conversation` runs `recap run`
//! without NATS. `live_running_summaries_mid_conversation` is the live test (event mode, LLM test server,
//! CONTEXT_SUMMARY_EVERY=10).

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;
use qdrant_client::Qdrant;
use recap::recall::api;
use recap::recall::context::ContextSettings;
use recap::tracker::{Mode, TrackerConfig};
use serde_json::Value as Json;

const TOKEN: &str = "test-context-token-0123456789";

struct Fx {
    db: TestDb,
    bot: String,
    collection: String,
    q: Qdrant,
    base: String,
    http: reqwest::Client,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn point(user: &str, role: &str, text: String, ts_ms: i64) -> TestPoint {
    TestPoint {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: user.into(),
        role: role.into(),
        content: text,
        ts_ms,
        emotion: "neutral".into(),
        memory_type: "conversation".into(),
    }
}

/// `n` messages of `user`, alternating user / assistant, `spacing_ms` apart from `start_ms`.
fn talk(user: &str, start_ms: i64, n: usize, spacing_ms: i64, words: &str) -> Vec<TestPoint> {
    (0..n)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            point(
                user,
                role,
                format!("message {i} about {words}: {}", "la ".repeat(10 + i % 7)),
                start_ms + i as i64 * spacing_ms,
            )
        })
        .collect()
}

async fn fx(tracker: TrackerConfig) -> Fx {
    let db = fresh_db().await;
    db.migrate().await;
    let bot = format!("cbot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let store = recap::sink::Store::connect(db.url.parse().unwrap(), 4)
        .await
        .expect("store");
    let points = Arc::new(
        recap::fetch::Points::new(
            &env("QDRANT_URL"),
            None,
            recap::fetch::PayloadMapping::default(),
        )
        .expect("qdrant client"),
    );
    let (c, b) = (collection.clone(), bot.clone());
    let state = api::RecallState::new(store, points, Some(&recap::config::Secret::new(TOKEN)))
        .with_context(ContextSettings {
            tracker,
            bot_for_collection: Arc::new(move |n: &str| (n == c).then(|| b.clone())),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    let _ = rustls::crypto::ring::default_provider().install_default();
    Fx {
        db,
        bot,
        collection,
        q,
        base,
        http: reqwest::Client::new(),
    }
}

fn tracker() -> TrackerConfig {
    TrackerConfig {
        mode: Mode::Session,
        idle_gap_ms: 30 * MIN,
        max_span_ms: 24 * 60 * MIN,
        lateness_ms: 2 * MIN,
    }
}

impl Fx {
    async fn get(&self, query: &str, token: Option<&str>) -> (u16, Json) {
        get(&self.http, &self.base, query, token).await
    }

    async fn context(&self, user: &str, extra: &str) -> Json {
        let (status, body) = self
            .get(
                &format!("bot={}&user_id={user}{extra}", self.bot),
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The key's open messages as a checkpoint stores them.
    async fn checkpoint_open(&self, user: &str, pts: &[&TestPoint]) {
        let ids: Vec<String> = pts.iter().map(|p| p.id.clone()).collect();
        let ts: Vec<DateTime<Utc>> = pts.iter().map(|p| at(p.ts_ms)).collect();
        sqlx::query(
            "INSERT INTO recap_open_windows (bot_name, user_id, part, point_ids, point_ts) VALUES ($1, $2, 0, $3, $4)
             ON CONFLICT (bot_name, user_id) DO UPDATE SET point_ids = $3, point_ts = $4",
        )
        .bind(&self.bot)
        .bind(user)
        .bind(&ids)
        .bind(&ts)
        .execute(&self.db.pool)
        .await
        .expect("open window");
    }

    /// A closed, summarized window: its `recap_windows` row (done, with coverage) and its summary row. Returns the
    /// summary row's id.
    async fn closed(&self, user: &str, pts: &[&TestPoint], text: &str, topics: &[&str]) -> i32 {
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp,
                end_timestamp, message_count, key_topics, emotional_tone)
             VALUES ($1, $2, $3, 'time_window', $4, $5, $6, $7, 'neutral') RETURNING id",
        )
        .bind(user)
        .bind(&self.bot)
        .bind(text)
        .bind(at(pts[0].ts_ms).naive_utc())
        .bind(at(pts.last().unwrap().ts_ms).naive_utc())
        .bind(pts.len() as i32)
        .bind(topics.iter().map(|t| t.to_string()).collect::<Vec<_>>())
        .fetch_one(&self.db.pool)
        .await
        .expect("summary row");
        let wid = insert_due_window(&self.db.pool, &self.bot, user, pts).await;
        sqlx::query("UPDATE recap_windows SET state = 'done', summary_id = $1 WHERE id = $2")
            .bind(id)
            .bind(wid)
            .execute(&self.db.pool)
            .await
            .expect("done");
        id
    }

    /// A running summary as task A's workers store it.
    async fn running(&self, user: &str, pts: &[&TestPoint], covers_until_ms: i64, text: &str) {
        let ids: Vec<String> = pts.iter().map(|p| p.id.clone()).collect();
        sqlx::query(
            "INSERT INTO recap_running_summaries (bot_name, user_id, window_start, point_ids, covers_until,
                message_count, summary, key_topics)
             VALUES ($1, $2, $3, $4, $5, $6, $7, ARRAY['running'])
             ON CONFLICT (bot_name, user_id) DO UPDATE SET point_ids = $4, covers_until = $5, message_count = $6,
                summary = $7",
        )
        .bind(&self.bot)
        .bind(user)
        .bind(at(pts[0].ts_ms))
        .bind(&ids)
        .bind(at(covers_until_ms))
        .bind(ids.len() as i32)
        .bind(text)
        .execute(&self.db.pool)
        .await
        .expect("running summary");
    }
}

async fn get(http: &reqwest::Client, base: &str, query: &str, token: Option<&str>) -> (u16, Json) {
    let mut req = http.get(format!("{base}/v1/context?{query}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

fn ids(v: &Json) -> Vec<String> {
    v["conversation"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["point_id"].as_str().unwrap().to_string())
        .collect()
}

fn of(pts: &[&TestPoint]) -> Vec<String> {
    pts.iter().map(|p| p.id.clone()).collect()
}

/// The rules every answer keeps: tokens within the budget and equal to the estimator over what is returned; the
/// latest message last (when there is one); covered + verbatim + omitted = the conversation's messages.
fn check_answer(v: &Json, total: usize, latest: Option<&str>) {
    let max = v["max_tokens"].as_u64().unwrap() as usize;
    let tokens = v["tokens"].as_u64().unwrap() as usize;
    assert!(tokens <= max, "tokens {tokens} over max_tokens {max}: {v}");
    let c = &v["conversation"];
    let msgs = c["messages"].as_array().unwrap();
    let mut counted = 0;
    for m in msgs {
        counted += recap::recall::context::fit::message_tokens(
            m["role"].as_str().unwrap(),
            m["text"].as_str().unwrap(),
        );
    }
    let topics = |x: &Json| -> Vec<String> {
        x["key_topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let covered = if c["summary"].is_null() {
        0
    } else {
        counted += recap::recall::context::fit::summary_tokens(
            c["summary"]["text"].as_str().unwrap(),
            &topics(&c["summary"]),
        );
        c["summary"]["message_count"].as_u64().unwrap() as usize
    };
    for e in v["earlier"].as_array().unwrap() {
        counted +=
            recap::recall::context::fit::summary_tokens(e["text"].as_str().unwrap(), &topics(e));
    }
    assert_eq!(
        tokens, counted,
        "tokens is the estimator over what is returned: {v}"
    );
    let omitted = v["omitted"].as_u64().unwrap() as usize;
    assert_eq!(covered + msgs.len() + omitted, total, "not exhaustive: {v}");
    if let Some(l) = latest {
        assert_eq!(
            msgs.last().unwrap()["point_id"],
            l,
            "latest message not last: {v}"
        );
    }
    // oldest first, no repeat
    let ts: Vec<DateTime<Utc>> = msgs
        .iter()
        .map(|m| m["ts"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "not oldest first: {v}");
    let distinct: HashSet<&str> = msgs
        .iter()
        .map(|m| m["point_id"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), msgs.len());
}

#[tokio::test]
async fn open_conversation_is_exhaustive_and_fits_every_budget() {
    let _shared = common::shared().await;
    let f = fx(tracker()).await;
    let user = "user-open";
    let now = now_ms();
    // an earlier, closed conversation (5 h ago) and its summary; an older open message 2 h ago (before an idle gap)
    let earlier = talk(user, now - 5 * 60 * MIN, 6, MIN, "sailing");
    let stale = point(
        user,
        "user",
        "a lone message two hours ago".into(),
        now - 120 * MIN,
    );
    // the conversation: 14 messages checkpointed, 3 more stored after the checkpoint (events not ingested yet)
    let conv = talk(user, now - 40 * MIN, 17, 2 * MIN, "pottery");
    let mut all: Vec<TestPoint> = earlier.clone();
    all.push(stale.clone());
    all.extend(conv.iter().cloned());
    upsert(&f.q, &f.collection, &all).await;
    let sid = f
        .closed(
            user,
            &earlier.iter().collect::<Vec<_>>(),
            "The user went sailing with a friend.",
            &["sailing"],
        )
        .await;
    let mut open: Vec<&TestPoint> = vec![&stale];
    open.extend(conv[..14].iter());
    f.checkpoint_open(user, &open).await;

    let v = f.context(user, "&max_tokens=100000").await;
    let c = &v["conversation"];
    assert_eq!(c["open"], true, "{v}");
    assert!(c["summary"].is_null());
    assert_eq!(
        ids(&v),
        of(&conv.iter().collect::<Vec<_>>()),
        "the window after the idle gap, checkpoint + newer points"
    );
    assert_eq!(
        c["start"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        at(conv[0].ts_ms)
    );
    assert_eq!(v["omitted"], 0);
    assert_eq!(v["earlier"].as_array().unwrap().len(), 1);
    assert_eq!(v["earlier"][0]["id"], sid);
    assert_eq!(
        v["earlier"][0]["text"],
        "The user went sailing with a friend."
    );
    check_answer(&v, conv.len(), Some(&conv.last().unwrap().id));

    // A valid running summary of the first 8: summary + the other 9 verbatim.
    let first8: Vec<&TestPoint> = conv[..8].iter().collect();
    f.running(
        user,
        &first8,
        conv[7].ts_ms,
        "The user talks about pottery classes.",
    )
    .await;
    let v = f.context(user, "&max_tokens=100000").await;
    let c = &v["conversation"];
    assert_eq!(
        c["summary"]["text"], "The user talks about pottery classes.",
        "{v}"
    );
    assert_eq!(c["summary"]["message_count"], 8);
    assert_eq!(ids(&v), of(&conv[8..].iter().collect::<Vec<_>>()));
    check_answer(&v, conv.len(), Some(&conv.last().unwrap().id));

    // Budgets from the minimum up: never over, the latest last, exhaustive; the earlier recap goes first, then the
    // oldest messages.
    let full = f.context(user, "&max_tokens=100000").await;
    let full_tokens = full["tokens"].as_u64().unwrap();
    for max in [
        64,
        80,
        100,
        150,
        200,
        300,
        400,
        600,
        1000,
        full_tokens - 1,
        full_tokens,
    ] {
        let v = f.context(user, &format!("&max_tokens={max}")).await;
        check_answer(&v, conv.len(), Some(&conv.last().unwrap().id));
        if !v["earlier"].as_array().unwrap().is_empty() {
            assert_eq!(
                v["omitted"], 0,
                "a recap kept while messages were dropped: {v}"
            );
        }
    }
    // one token short of everything: the earlier recap goes, every message stays
    let v = f
        .context(user, &format!("&max_tokens={}", full_tokens - 1))
        .await;
    assert!(v["earlier"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!((v["omitted"].as_u64(), ids(&v).len()), (Some(0), 9));
    assert!(!v["conversation"]["summary"].is_null());
    let v = f.context(user, &format!("&max_tokens={full_tokens}")).await;
    assert_eq!(v["earlier"].as_array().unwrap().len(), 1);
    let tight = f.context(user, "&max_tokens=150").await;
    assert!(
        tight["omitted"].as_u64().unwrap() > 0,
        "150 tokens cannot hold 9 messages and the summary: {tight}"
    );
    assert!(tight["earlier"].as_array().unwrap().is_empty());
    // the oldest verbatim messages go first: what is kept is the newest
    let kept = ids(&tight);
    assert_eq!(
        kept,
        of(&conv[conv.len() - kept.len()..].iter().collect::<Vec<_>>())
    );

    // A running summary with a gap (one early point not covered) is not used: everything verbatim.
    let gap: Vec<&TestPoint> = conv[..8].iter().filter(|p| p.id != conv[3].id).collect();
    f.running(user, &gap, conv[7].ts_ms, "stale").await;
    let v = f.context(user, "&max_tokens=100000").await;
    assert!(v["conversation"]["summary"].is_null(), "{v}");
    assert_eq!(ids(&v).len(), conv.len());
    // ... nor one covering a point that is not in the conversation (another window's)
    let mut foreign: Vec<&TestPoint> = conv[..8].iter().collect();
    foreign.push(&stale);
    f.running(user, &foreign, conv[7].ts_ms, "stale").await;
    let v = f.context(user, "&max_tokens=100000").await;
    assert!(v["conversation"]["summary"].is_null(), "{v}");
    check_answer(&v, conv.len(), Some(&conv.last().unwrap().id));

    // The latest message stored now (its event not ingested) is there at once.
    let newest = point(
        user,
        "user",
        "and one more thing about the kiln".into(),
        now_ms(),
    );
    upsert(&f.q, &f.collection, std::slice::from_ref(&newest)).await;
    let v = f.context(user, "&max_tokens=100000").await;
    assert_eq!(ids(&v).last().unwrap(), &newest.id);
    check_answer(&v, conv.len() + 1, Some(&newest.id));
}

#[tokio::test]
async fn a_latest_message_alone_over_the_budget_is_cut_and_marked() {
    let _shared = common::shared().await;
    let f = fx(tracker()).await;
    let user = "user-long";
    let now = now_ms();
    let mut conv = talk(user, now - 10 * MIN, 4, MIN, "chess");
    conv.push(point(user, "user", "x".repeat(2000), now - MIN));
    upsert(&f.q, &f.collection, &conv).await;
    f.checkpoint_open(user, &conv.iter().collect::<Vec<_>>())
        .await;
    let v = f.context(user, "&max_tokens=64").await;
    check_answer(&v, 5, Some(&conv[4].id));
    let msgs = v["conversation"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["truncated"], true);
    assert!(msgs[0]["text"].as_str().unwrap().len() < 2000);
    assert_eq!(v["omitted"], 4);
    // with room it is whole and unmarked
    let v = f.context(user, "&max_tokens=5000").await;
    let msgs = v["conversation"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 5);
    assert!(msgs.iter().all(|m| m.get("truncated").is_none()));
}

#[tokio::test]
async fn with_none_open_the_conversation_is_the_last_closed_window() {
    let _shared = common::shared().await;
    let f = fx(tracker()).await;
    let user = "user-closed";
    let now = now_ms();
    let first = talk(user, now - 9 * 60 * MIN, 6, MIN, "astronomy telescopes");
    let second = talk(user, now - 3 * 60 * MIN, 6, MIN, "gardening tomatoes");
    let all: Vec<TestPoint> = first.iter().chain(second.iter()).cloned().collect();
    upsert(&f.q, &f.collection, &all).await;
    let a = f
        .closed(
            user,
            &first.iter().collect::<Vec<_>>(),
            "The user bought a telescope for astronomy.",
            &["astronomy"],
        )
        .await;
    let b = f
        .closed(
            user,
            &second.iter().collect::<Vec<_>>(),
            "The user grows tomatoes in the garden.",
            &["gardening"],
        )
        .await;
    let v = f.context(user, "").await;
    let c = &v["conversation"];
    assert_eq!(c["open"], false, "{v}");
    assert_eq!(
        c["summary"]["text"],
        "The user grows tomatoes in the garden."
    );
    assert_eq!(c["summary"]["message_count"], 6);
    assert!(c["messages"].as_array().unwrap().is_empty());
    let earlier: Vec<i64> = v["earlier"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        earlier,
        vec![i64::from(a)],
        "the conversation is not repeated in earlier: {v}"
    );
    assert_ne!(earlier[0], i64::from(b));
    check_answer(&v, 6, None);

    // query= ranks earlier recaps by the text search (the conversation stays the last window)
    let third = talk(user, now - 2 * 60 * MIN, 6, MIN, "cycling");
    upsert(&f.q, &f.collection, &third).await;
    let c3 = f
        .closed(
            user,
            &third.iter().collect::<Vec<_>>(),
            "The user cycled to the lake.",
            &["cycling"],
        )
        .await;
    let v = f.context(user, "&query=telescope%20astronomy").await;
    assert_eq!(
        v["conversation"]["summary"]["text"],
        "The user cycled to the lake."
    );
    assert_eq!(v["earlier"][0]["id"], a, "the most relevant first: {v}");
    assert!(
        v["earlier"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != c3)
    );

    // A closed window not summarized yet is shown verbatim (open: false), so nothing closed looks open.
    let fourth = talk(user, now - 60 * MIN, 4, MIN, "baking");
    upsert(&f.q, &f.collection, &fourth).await;
    insert_due_window(&f.db.pool, &f.bot, user, &fourth.iter().collect::<Vec<_>>()).await;
    let v = f.context(user, "").await;
    assert_eq!(v["conversation"]["open"], false, "{v}");
    assert_eq!(ids(&v), of(&fourth.iter().collect::<Vec<_>>()));
    check_answer(&v, 4, Some(&fourth[3].id));
}

#[tokio::test]
async fn bad_input_auth_and_unknown_users() {
    let _shared = common::shared().await;
    let f = fx(tracker()).await;
    let now = now_ms();
    let pts = talk("known", now - 60 * MIN, 6, MIN, "music");
    upsert(&f.q, &f.collection, &pts).await;
    f.closed(
        "known",
        &pts.iter().collect::<Vec<_>>(),
        "Music.",
        &["music"],
    )
    .await;
    let bot = &f.bot;
    for (q, field) in [
        (format!("bot={bot}&user_id=u&max_tokens=0"), "max_tokens"),
        (format!("bot={bot}&user_id=u&max_tokens=63"), "max_tokens"),
        (format!("bot={bot}&user_id=u&max_tokens=-5"), "max_tokens"),
        (format!("bot={bot}&user_id=u&max_tokens=lots"), "max_tokens"),
        (
            format!("bot={bot}&user_id=u&max_tokens=99999999999"),
            "max_tokens",
        ),
        (format!("bot={bot}&max_tokens=100"), "user_id"),
        ("user_id=u&max_tokens=100".to_string(), "bot"),
        ("bot=no%20such&user_id=u".to_string(), "bot"),
        (format!("bot={bot}&user_id=u&query=%20%2C%21"), "query"),
        (format!("bot={bot}&user_id=u&limit=3"), "query"),
        (format!("bot={bot}&user_id=u&user_id=v"), "user_id"),
    ] {
        let (status, body) = f.get(&q, Some(TOKEN)).await;
        assert!((400..500).contains(&status), "{q}: {status} {body}");
        assert_eq!(body["field"], field, "{q}: {body}");
    }
    let (status, body) = f
        .get(&format!("bot={bot}&user_id=u&max_tokens=0"), Some(TOKEN))
        .await;
    assert!(
        body["error"].as_str().unwrap().contains("max_tokens"),
        "{status} {body}"
    );
    // unknown bot: 404 naming bot (as recall); unknown user of a known bot: 200 with null
    let (status, body) = f.get("bot=neverseen&user_id=u", Some(TOKEN)).await;
    assert_eq!((status, body["field"].as_str()), (404, Some("bot")));
    let v = f.context("nobody-here", "&max_tokens=500").await;
    assert!(v["conversation"].is_null(), "{v}");
    assert!(v["earlier"].as_array().unwrap().is_empty());
    assert_eq!(
        (v["tokens"].as_u64(), v["omitted"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(v["max_tokens"], 500);
    assert_eq!(v["user_id"], "nobody-here");
    // auth: none or wrong is 401
    for t in [None, Some("wrong")] {
        let (status, _) = f.get(&format!("bot={bot}&user_id=known"), t).await;
        assert_eq!(status, 401);
    }
}

#[tokio::test]
async fn tumbling_windows_split_the_conversation_at_the_bucket() {
    let _shared = common::shared().await;
    let hour = 60 * MIN;
    let f = fx(TrackerConfig {
        mode: Mode::Tumbling,
        idle_gap_ms: 30 * MIN,
        max_span_ms: hour,
        lateness_ms: 2 * MIN,
    })
    .await;
    let user = "user-tumbling";
    let now = now_ms();
    let bucket = now.div_euclid(hour) * hour;
    // messages one minute apart across the bucket start (no idle gap): only those in the current bucket are the
    // conversation
    let before: Vec<TestPoint> = (1..=3)
        .map(|i| point(user, "user", format!("before {i}"), bucket - i * MIN))
        .collect();
    let after = point(
        user,
        "user",
        "in this hour".into(),
        bucket + (now - bucket) / 2,
    );
    let mut all = before.clone();
    all.push(after.clone());
    upsert(&f.q, &f.collection, &all).await;
    f.checkpoint_open(user, &all.iter().collect::<Vec<_>>())
        .await;
    let v = f.context(user, "").await;
    assert_eq!(ids(&v), vec![after.id.clone()], "{v}");
}

// ---------------------------------------------------------------------------------------------------------------
// `recap run` on real services

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_http(http: &reqwest::Client, base: &str) {
    let t0 = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "recap did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /v1/context` until `ok` holds; panics with the last answer after `timeout`.
async fn poll_context(
    http: &reqwest::Client,
    base: &str,
    query: &str,
    timeout: Duration,
    ok: impl Fn(&Json) -> bool,
) -> Json {
    let t0 = Instant::now();
    loop {
        let (status, v) = get(http, base, query, Some(TOKEN)).await;
        if status == 200 && ok(&v) {
            return v;
        }
        assert!(t0.elapsed() < timeout, "timed out: {status} {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn sweep_only_recap_run_serves_the_open_conversation() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let bot = format!("sbot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let user = "sweep-user";
    let now = now_ms();
    // a closed conversation 3 h ago, and an open one of 8 messages in the last 10 minutes
    let closed = talk(user, now - 180 * MIN, 6, MIN, "hiking boots");
    let open = talk(user, now - 10 * MIN, 8, MIN, "guitar lessons");
    let all: Vec<TestPoint> = closed.iter().chain(open.iter()).cloned().collect();
    upsert(&q, &collection, &all).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut envs = recap_env(&db, None);
    envs.retain(|(k, _)| k != "HTTP_ADDR");
    envs.extend(
        [
            ("HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("RECALL_TOKEN", TOKEN.to_string()),
            ("COLLECTION_PATTERNS", collection.clone()),
            ("COLLECTION_MAP", format!("{collection}={bot}")),
            ("LOOKBACK_DAYS", "2".into()),
            ("ENRICHMENT_INTERVAL_SECONDS", "2".into()),
            ("ALLOWED_LATENESS_SECONDS", "1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path("context-sweep"));
    let http = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    };
    wait_http(&http, &base).await;
    let query = format!("bot={bot}&user_id={user}&max_tokens=4000");
    // the earlier conversation is summarized by the sweep; the open one is read from the checkpoint + Qdrant
    let v = poll_context(&http, &base, &query, Duration::from_secs(60), |v| {
        v["earlier"].as_array().is_some_and(|e| e.len() == 1)
    })
    .await;
    let c = &v["conversation"];
    assert_eq!(c["open"], true, "{v}");
    assert_eq!(ids(&v), of(&open.iter().collect::<Vec<_>>()));
    assert_eq!(v["earlier"][0]["message_count"], 6);
    check_answer(&v, open.len(), Some(&open[7].id));
    let checkpointed: Option<i32> = sqlx::query_scalar(
        "SELECT cardinality(point_ids) FROM recap_open_windows WHERE bot_name = $1 AND user_id = $2",
    )
    .bind(&bot)
    .bind(user)
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        checkpointed,
        Some(8),
        "the sweep checkpointed the open messages"
    );
    // a message stored now is the latest at once, before any sweep reads it
    let newest = point(user, "user", "my new guitar arrived".into(), now_ms());
    upsert(&q, &collection, std::slice::from_ref(&newest)).await;
    let (status, v) = get(&http, &base, &query, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&v).last().unwrap(), &newest.id, "{v}");
    check_answer(&v, open.len() + 1, Some(&newest.id));
    terminate(&mut child);
}

/// The live test: event mode, the LLM summarizer on the LLM test server, `CONTEXT_SUMMARY_EVERY=10`. One user
/// had an earlier conversation (closed and summarized), then talks 52 messages without a pause at the wall clock;
/// mid-conversation the context holds a running summary of the earlier part and the rest verbatim, exhaustively, the
/// earlier recap in `earlier`, within budgets of 600 and 150 tokens with the latest message last; `max_tokens=0` is a
/// 4xx naming it and no token a 401. Needs the running summaries of task A (branch `running`).
#[tokio::test]
async fn live_running_summaries_mid_conversation() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let nats = nats_ns();
    let js = nats.ensure().await;
    let bot = format!("lbot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let llm = LlmServer::start();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut envs = recap_env(&db, Some(&nats));
    envs.retain(|(k, _)| k != "HTTP_ADDR" && k != "SUMMARIZER");
    envs.extend(
        [
            ("HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("RECALL_TOKEN", TOKEN.to_string()),
            ("SUMMARIZER", "llm".into()),
            ("LLM_BASE_URL", llm.api_base()),
            ("LLM_API_KEY", "sk-test-key".into()),
            ("LLM_MODEL", "test/model".into()),
            ("LLM_REQUESTS_PER_SECOND", "50".into()),
            ("CONTEXT_SUMMARY_EVERY", "10".into()),
            ("IDLE_GAP", "60s".into()),
            ("ALLOWED_LATENESS_SECONDS", "1".into()),
            ("COLLECTION_PATTERNS", collection.clone()),
            ("COLLECTION_MAP", format!("{collection}={bot}")),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path("context-live"));
    let http = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    };
    wait_http(&http, &base).await;
    let user = "live-user";
    let say = |pts: Vec<TestPoint>| {
        let (q, nats, js, bot, collection) = (&q, &nats, &js, &bot, &collection);
        async move {
            upsert(q, collection, &pts).await;
            nats.publish(js, bot, collection, &pts).await;
        }
    };

    // The earlier conversation, three hours ago: closed at once (the watermark follows the wall clock) and summarized.
    let earlier = talk(user, now_ms() - 180 * MIN, 6, 20_000, "the sailing trip"); // within IDLE_GAP=60s
    say(earlier.clone()).await;
    let query = format!("bot={bot}&user_id={user}");
    let v = poll_context(&http, &base, &query, Duration::from_secs(60), |v| {
        v["conversation"]["open"] == false && !v["conversation"]["summary"].is_null()
    })
    .await;
    assert_eq!(v["conversation"]["summary"]["message_count"], 6, "{v}");

    // 52 messages without a pause: 35 first, then the context mid-conversation.
    let mut said: Vec<TestPoint> = Vec::new();
    for i in 0..52usize {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        said.push(point(
            user,
            role,
            format!(
                "live message {i}: the pottery class, the kiln and my sister's visit {}",
                "ok ".repeat(i % 5)
            ),
            now_ms(),
        ));
        say(vec![said[i].clone()]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if i + 1 == 35 {
            // the running summary due at 30 messages (after 10 and 20) is written by the workers: every message then
            // but the latest, so 29 at least
            let v = poll_context(
                &http,
                &base,
                &format!("{query}&max_tokens=100000"),
                Duration::from_secs(45),
                |v| {
                    v["conversation"]["summary"]["message_count"]
                        .as_u64()
                        .unwrap_or(0)
                        >= 29
                },
            )
            .await;
            let c = &v["conversation"];
            assert_eq!(c["open"], true, "{v}");
            let covered = c["summary"]["message_count"].as_u64().unwrap() as usize;
            let verbatim = ids(&v);
            assert_eq!(covered + verbatim.len(), 35, "exhaustive: {v}");
            assert_eq!(
                verbatim,
                of(&said[covered..35].iter().collect::<Vec<_>>()),
                "{v}"
            );
            assert!(!c["summary"]["text"].as_str().unwrap().is_empty());
            assert_eq!(v["earlier"].as_array().unwrap().len(), 1, "{v}");
            assert_eq!(v["earlier"][0]["message_count"], 6);
            check_answer(&v, 35, Some(&said[34].id));
            for max in [600, 150] {
                let (status, v) = get(
                    &http,
                    &base,
                    &format!("{query}&max_tokens={max}"),
                    Some(TOKEN),
                )
                .await;
                assert_eq!(status, 200, "{v}");
                assert!(v["tokens"].as_u64().unwrap() <= max, "{v}");
                assert_eq!(ids(&v).last().unwrap(), &said[34].id, "{v}");
                check_answer(&v, 35, Some(&said[34].id));
                eprintln!(
                    "CONTEXT max_tokens={max} tokens={} summary={} verbatim={} omitted={} earlier={}",
                    v["tokens"],
                    v["conversation"]["summary"]["message_count"],
                    ids(&v).len(),
                    v["omitted"],
                    v["earlier"].as_array().unwrap().len()
                );
            }
            let (status, v) =
                get(&http, &base, &format!("{query}&max_tokens=0"), Some(TOKEN)).await;
            assert!((400..500).contains(&status), "{status} {v}");
            assert_eq!(v["field"], "max_tokens");
            let (status, _) = get(&http, &base, &format!("{query}&max_tokens=600"), None).await;
            assert_eq!(status, 401);
        }
    }
    // All 52: the running summary grows (49 at least: due at 50, built from every message but the latest), the rest
    // verbatim, the latest last.
    let v = poll_context(
        &http,
        &base,
        &format!("{query}&max_tokens=100000"),
        Duration::from_secs(45),
        |v| {
            v["conversation"]["summary"]["message_count"]
                .as_u64()
                .unwrap_or(0)
                >= 49
        },
    )
    .await;
    // A running summary leaves the latest message out (`pipeline::running`): it is always there verbatim, last.
    check_answer(&v, 52, Some(said[51].id.as_str()));
    assert_eq!(ids(&v).last(), Some(&said[51].id), "{v}");
    eprintln!(
        "CONTEXT after 52: summary={} verbatim={}",
        v["conversation"]["summary"]["message_count"],
        ids(&v).len()
    );
    let stats = llm.stats().await;
    // The cost rule (at most floor(n / CONTEXT_SUMMARY_EVERY) running-summary calls) is tests/running.rs' to check;
    // here the calls by purpose are only reported.
    eprintln!(
        "CONTEXT live: calls by purpose {}",
        stats["calls_by_purpose"]
    );
    terminate(&mut child);
}
