//! The recall API on real services: recall by time (RFC 3339, relative forms, zones, type), search by vector / text /
//! both (on windows with one topic each, summarized by recap itself), summary vectors and their repair, forgetting a
//! user, bad input and auth (the Python client: tests/python_client.rs).

use crate::common;
use crate::common::topics::{DIM, center, noisy};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as CDuration, TimeZone, Utc};
use common::*;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, Filter, PointStruct, UpsertPointsBuilder, Value,
};
use serde_json::{Value as Json, json};

const TOKEN: &str = "test-recall-token-0123456789";
const TOPICS: [&str; 10] = [
    "hiking",
    "guitar",
    "cooking",
    "chess",
    "astronomy",
    "gardening",
    "photography",
    "sailing",
    "pottery",
    "cycling",
];

struct Fixture {
    db: TestDb,
    bot: String,
    collection: String,
    /// (user, topic, window start ms)
    windows: Vec<(String, usize, i64)>,
}

const SLOT: i64 = 3 * 60 * MIN;

/// One bot, `users` users, each with one window per topic (in a per-user order), summarized by `recap sweep --once`.
async fn fixture(users: usize) -> Fixture {
    let db = fresh_db().await;
    db.migrate().await;
    let bot = format!("rbot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let mut points = Vec::new();
    let mut windows = Vec::new();
    let mut seed = 1u64;
    for u in 0..users {
        let user = format!("user-{u}-{}", token());
        for slot in 0..TOPICS.len() {
            let topic = (slot * 3 + u) % TOPICS.len();
            let start = T0 + (slot as i64) * SLOT + u as i64 * MIN;
            windows.push((user.clone(), topic, start));
            for i in 0..4 {
                let t = start + i * 2 * MIN;
                let word = TOPICS[topic];
                for (role, text, dt) in [
                    (
                        "user",
                        format!("I spent the weekend {word} again, {word} keeps me calm ({i})"),
                        0,
                    ),
                    (
                        "assistant",
                        format!("Tell me more about your {word}, what did you enjoy most?"),
                        1,
                    ),
                ] {
                    seed += 1;
                    let mut payload: HashMap<String, Value> = HashMap::new();
                    payload.insert("user_id".into(), user.clone().into());
                    payload.insert("content".into(), text.into());
                    payload.insert("role".into(), role.into());
                    payload.insert("memory_type".into(), "conversation".into());
                    let naive = chrono::DateTime::from_timestamp_millis(t + dt)
                        .unwrap()
                        .naive_utc();
                    payload.insert(
                        "timestamp".into(),
                        naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string().into(),
                    );
                    payload.insert("timestamp_unix".into(), ((t + dt) as f64 / 1000.0).into());
                    payload.insert("emotional_context".into(), "joy".into());
                    let vectors: HashMap<String, Vec<f32>> = [
                        ("content".to_string(), noisy(topic, seed)),
                        ("emotion".to_string(), noisy(0, seed + 7)),
                        ("semantic".to_string(), noisy(1, seed + 9)),
                    ]
                    .into();
                    points.push(PointStruct::new(
                        uuid::Uuid::new_v4().to_string(),
                        vectors,
                        payload,
                    ));
                }
            }
        }
    }
    for chunk in points.chunks(500) {
        q.upsert_points(UpsertPointsBuilder::new(&collection, chunk.to_vec()).wait(true))
            .await
            .expect("upsert");
    }
    let f = Fixture {
        db,
        bot,
        collection,
        windows,
    };
    // A window whose fetch failed under load waits for a retry time; bring it forward and sweep again.
    let t0 = Instant::now();
    loop {
        let (code, out, err) = run_recap(&["sweep", "--once"], &f.env_without_nats());
        assert_eq!(code, 0, "sweep --once failed: {out}{err}");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_summaries")
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
        if rows as usize >= f.windows.len() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "only {rows} rows: {out}{err}"
        );
        sqlx::query("UPDATE recap_windows SET not_before = now() WHERE state = 'due'")
            .execute(&f.db.pool)
            .await
            .unwrap();
    }
    f
}

impl Fixture {
    fn env_without_nats(&self) -> Vec<(String, String)> {
        let mut v = recap_env(&self.db, None);
        v.push(("COLLECTION_PATTERNS".into(), self.collection.clone()));
        v.push((
            "COLLECTION_MAP".into(),
            format!("{}={}", self.collection, self.bot),
        ));
        v.push(("LOOKBACK_DAYS".into(), "3650".into()));
        v
    }

    /// `recap run` (sweep only) with the recall API on a free port.
    async fn serve(&self, extra: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut envs = self.env_without_nats();
        envs.retain(|(k, _)| k != "HTTP_ADDR");
        envs.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        envs.push(("RECALL_TOKEN".into(), TOKEN.into()));
        envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let child = spawn_recap(&["run"], &envs, &log_path("recall"));
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::new()
            },
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

    /// The row id of a window (by its start).
    async fn row_of(&self, user: &str, start_ms: i64) -> i32 {
        let start = DateTime::from_timestamp_millis(start_ms)
            .unwrap()
            .naive_utc();
        sqlx::query_scalar(
            "SELECT id FROM conversation_summaries WHERE bot_name = $1 AND user_id = $2
             AND start_timestamp <= $3 AND end_timestamp >= $3",
        )
        .bind(&self.bot)
        .bind(user)
        .bind(start)
        .fetch_one(&self.db.pool)
        .await
        .unwrap_or_else(|e| panic!("no row for {user} at {start}: {e}"))
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
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Json>,
        token: Option<&str>,
    ) -> (u16, Json) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "DELETE" => self.http.delete(url),
            _ => unreachable!(),
        };
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request");
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Json::String(text)),
        )
    }
    async fn get(&self, path: &str) -> (u16, Json) {
        self.call("GET", path, None, Some(TOKEN)).await
    }
    async fn post(&self, body: Json) -> (u16, Json) {
        self.call("POST", "/v1/recall/search", Some(body), Some(TOKEN))
            .await
    }
}

fn ids(v: &Json) -> Vec<i64> {
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {v}"))
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn insert_row(
    db: &TestDb,
    bot: &str,
    user: &str,
    start: DateTime<Utc>,
    hours: i64,
    kind: &str,
) -> i32 {
    sqlx::query_scalar(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp,
            end_timestamp, message_count, key_topics, emotional_tone)
         VALUES ($1, $2, 'text', $3, $4, $5, 6, ARRAY['t'], 'neutral') RETURNING id",
    )
    .bind(user)
    .bind(bot)
    .bind(kind)
    .bind(start.naive_utc())
    .bind((start + CDuration::hours(hours)).naive_utc())
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn summary_points(bot: &str, user: Option<&str>) -> u64 {
    let q = qdrant().await;
    let mut must = vec![Condition::matches("bot", bot.to_string())];
    if let Some(u) = user {
        must.push(Condition::matches("user_id", u.to_string()));
    }
    q.count(
        CountPointsBuilder::new(recap::recall::vectors::COLLECTION)
            .filter(Filter::must(must))
            .exact(true),
    )
    .await
    .expect("count")
    .result
    .unwrap()
    .count
}

#[tokio::test(flavor = "multi_thread")]
async fn recall_search_vectors_and_auth() {
    let _shared = common::shared().await;
    let f = fixture(3).await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversation_summaries WHERE bot_name = $1")
            .bind(&f.bot)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    let states: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT user_id, state, message_count, start_ts::text FROM recap_windows ORDER BY user_id, start_ts",
    )
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows as usize,
        f.windows.len(),
        "one row per window: {states:#?}"
    );
    // every row has its vector, in step (the worker's hook)
    assert_eq!(summary_points(&f.bot, None).await, f.windows.len() as u64);
    let (code, out, err) = run_recap(&["status", "--json"], &f.env_without_nats());
    assert_eq!(code, 0, "{out}{err}");
    let status: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(
        status["summary_vector_drift"],
        json!({"missing": 0, "stale": 0}),
        "{status}"
    );

    // repair: lose two vectors and one sync record, make one stale; the pass in `recap run` restores them
    let q = qdrant().await;
    let (u0, t0w, s0) = f.windows[0].clone();
    let (u1, _, s1) = f.windows[1].clone();
    let (r0, r1) = (f.row_of(&u0, s0).await, f.row_of(&u1, s1).await);
    q.delete_points(
        qdrant_client::qdrant::DeletePointsBuilder::new(recap::recall::vectors::COLLECTION)
            .points(qdrant_client::qdrant::PointsIdsList {
                ids: vec![
                    recap::recall::vectors::point_id(&f.bot, &u0, r0).into(),
                    recap::recall::vectors::point_id(&f.bot, &u1, r1).into(),
                ],
            })
            .wait(true),
    )
    .await
    .unwrap();
    sqlx::query("DELETE FROM recap_summary_vectors WHERE summary_id = ANY($1)")
        .bind(vec![r0, r1])
        .execute(&f.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE conversation_summaries SET revision = revision + 1 WHERE id = (SELECT max(id) FROM conversation_summaries)")
        .execute(&f.db.pool)
        .await
        .unwrap();
    let drift = recap::recall::vectors::drift(&recap::sink::Store::connect_lazy(
        f.db.url.parse().unwrap(),
        1,
    ))
    .await
    .unwrap();
    assert_eq!((drift.missing, drift.stale), (2, 1));

    let s = f.serve(&[("RECALL_REPAIR_INTERVAL", "1s")]).await;
    let t = Instant::now();
    loop {
        let (code, out, _) = run_recap(&["status", "--json"], &f.env_without_nats());
        assert_eq!(code, 0);
        let st: Json = serde_json::from_str(&out).unwrap();
        if st["summary_vector_drift"] == json!({"missing": 0, "stale": 0}) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "repair did not catch up: {st}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(summary_points(&f.bot, None).await, f.windows.len() as u64);
    eprintln!(
        "RECALL repair restored 2 missing + 1 stale vectors in {:?}",
        t.elapsed()
    );

    // ---- recall by time ----
    let (code, v) = s
        .get(&format!(
            "/v1/recall?bot={}&user_id={}&limit=200",
            f.bot,
            enc(&u0)
        ))
        .await;
    assert_eq!(code, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), TOPICS.len());
    let starts: Vec<&str> = items.iter().map(|i| i["start"].as_str().unwrap()).collect();
    assert!(
        starts.windows(2).all(|w| w[0] > w[1]),
        "newest first: {starts:?}"
    );
    let first = &items[items.len() - 1];
    assert!(
        first["text"].as_str().unwrap().contains(TOPICS[t0w])
            || first["key_topics"].to_string().contains(TOPICS[t0w]),
        "{first}"
    );
    for k in [
        "key_topics",
        "emotional_tone",
        "end",
        "message_count",
        "revision",
        "summary_type",
    ] {
        assert!(first.get(k).is_some(), "{k} missing: {first}");
    }
    // RFC 3339 range: slots 2..=4 overlap [start of slot 2, start of slot 5)
    let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339();
    let (code, v) = s
        .get(&format!(
            "/v1/recall?bot={}&user_id={}&since={}&until={}",
            f.bot,
            enc(&u0),
            enc(&at(T0 + 2 * SLOT)),
            enc(&at(T0 + 5 * SLOT - 60 * MIN))
        ))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(ids(&v).len(), 3, "{v}");
    let (_, v) = s
        .get(&format!(
            "/v1/recall?bot={}&user_id={}&limit=2",
            f.bot,
            enc(&u0)
        ))
        .await;
    assert_eq!(ids(&v).len(), 2);

    // relative forms and zones, on rows relative to now
    let now = Utc::now();
    let ru = format!("rel-{}", token());
    let tokyo: chrono_tz::Tz = "Asia/Tokyo".parse().unwrap();
    let today_tokyo = now.with_timezone(&tokyo).date_naive();
    let y_noon = tokyo
        .from_local_datetime(
            &(today_tokyo - CDuration::days(1))
                .and_hms_opt(12, 0, 0)
                .unwrap(),
        )
        .unwrap()
        .with_timezone(&Utc);
    let r_y = insert_row(&f.db, &f.bot, &ru, y_noon, 1, "time_window").await;
    let r_3d = insert_row(
        &f.db,
        &f.bot,
        &ru,
        now - CDuration::days(3),
        1,
        "time_window",
    )
    .await;
    let r_20d = insert_row(
        &f.db,
        &f.bot,
        &ru,
        now - CDuration::days(20),
        1,
        "time_window",
    )
    .await;
    let r_day = insert_row(&f.db, &f.bot, &ru, now - CDuration::days(40), 24, "day").await;
    let q = |params: &str| format!("/v1/recall?bot={}&user_id={}&{params}", f.bot, ru);
    let (_, v) = s.get(&q("since=7d")).await;
    let mut got = ids(&v);
    got.sort();
    assert_eq!(got, vec![r_y as i64, r_3d as i64], "since=7d: {v}");
    let (_, v) = s
        .get(&q("since=yesterday&until=yesterday&tz=Asia%2FTokyo"))
        .await;
    assert_eq!(ids(&v), vec![r_y as i64], "yesterday in Tokyo: {v}");
    let (_, v) = s.get(&q("since=30d&until=7d")).await;
    assert_eq!(ids(&v), vec![r_20d as i64], "{v}");
    let (_, v) = s.get(&q("type=day")).await;
    assert_eq!(ids(&v), vec![r_day as i64], "{v}");
    let (_, v) = s
        .get(&q("since=last%20week&until=now&type=time_window"))
        .await;
    assert!(
        ids(&v).contains(&(r_3d as i64)) || ids(&v).contains(&(r_y as i64)),
        "{v}"
    );
    let (_, v) = s.get(&q("since=this%20month&tz=America%2FNew_York")).await;
    assert!(!ids(&v).contains(&(r_day as i64)), "{v}");

    // ---- search ----
    let mut expected: Vec<(String, usize, i64, i32)> = Vec::new();
    for (u, t, st) in &f.windows {
        expected.push((u.clone(), *t, *st, f.row_of(u, *st).await));
    }
    let (mut vec_top3, mut text_top3, mut both_top1) = (0usize, 0usize, 0usize);
    let searches = expected.iter().enumerate().map(|(i, (u, t, _, row))| {
        let s = &s;
        let bot = f.bot.clone();
        async move {
            let v = noisy(*t, 900_000 + i as u64);
            let (c1, by_vec) = s.post(json!({"bot": bot, "user_id": u, "vector": v, "limit": 3})).await;
            let (c2, by_text) = s.post(json!({"bot": bot, "user_id": u, "text": format!("do you remember my {}?", TOPICS[*t]), "limit": 3})).await;
            let (c3, both) = s
                .post(json!({"bot": bot, "user_id": u, "vector": v, "text": TOPICS[*t], "limit": 5}))
                .await;
            assert_eq!((c1, c2, c3), (200, 200, 200), "{by_vec} {by_text} {both}");
            let row = *row as i64;
            (ids(&by_vec).contains(&row), ids(&by_text).contains(&row), ids(&both).first() == Some(&row))
        }
    });
    for (a, b, c) in futures::future::join_all(searches).await {
        vec_top3 += a as usize;
        text_top3 += b as usize;
        both_top1 += c as usize;
    }
    let n = expected.len();
    eprintln!(
        "RECALL search over {n} windows: vector top-3 {vec_top3}, text top-3 {text_top3}, fused top-1 {both_top1}"
    );
    assert!(vec_top3 * 100 >= n * 95, "vector top-3 {vec_top3}/{n}");
    assert!(text_top3 * 100 >= n * 90, "text top-3 {text_top3}/{n}");
    assert!(both_top1 * 100 >= n * 95, "fused top-1 {both_top1}/{n}");
    // scores are present and other users' windows never appear
    let (_, v) = s
        .post(json!({"bot": f.bot, "user_id": u0, "vector": center(0), "limit": 100}))
        .await;
    assert_eq!(ids(&v).len(), TOPICS.len());
    assert!(
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["user_id"] == u0.as_str() && i["score"].is_number())
    );
    // search within a time range
    let (_, v) = s
        .post(json!({"bot": f.bot, "user_id": u0, "vector": center(0), "since": at(T0 + 2 * SLOT), "until": at(T0 + 5 * SLOT - 60 * MIN)}))
        .await;
    assert_eq!(ids(&v).len(), 3, "{v}");

    // ---- bad input: a 4xx naming the field, never a 500 ----
    let b = &f.bot;
    let gets = [
        ("/v1/recall?user_id=u".to_string(), "bot"),
        (format!("/v1/recall?bot={b}"), "user_id"),
        ("/v1/recall?bot=no%20such&user_id=u".to_string(), "bot"),
        ("/v1/recall?bot=nosuchbot&user_id=u".to_string(), "bot"),
        (format!("/v1/recall?bot={b}&user_id=u&since=soon"), "since"),
        (
            format!("/v1/recall?bot={b}&user_id=u&until=2026-13-01"),
            "until",
        ),
        (
            format!("/v1/recall?bot={b}&user_id=u&since=1d&until=7d"),
            "until",
        ),
        (format!("/v1/recall?bot={b}&user_id=u&limit=0"), "limit"),
        (
            format!("/v1/recall?bot={b}&user_id=u&limit=100000"),
            "limit",
        ),
        (format!("/v1/recall?bot={b}&user_id=u&limit=ten"), "limit"),
        (
            format!("/v1/recall?bot={b}&user_id=u&tz=Mars%2FOlympus"),
            "tz",
        ),
        (format!("/v1/recall?bot={b}&user_id=u&type=a%20b"), "type"),
        (format!("/v1/recall?bot={b}&user_id=u&colour=red"), "query"),
        (format!("/v1/recall?bot={b}&user_id=u&user_id=v"), "user_id"),
        (format!("/v1/recall?bot={b}&user_id="), "user_id"),
    ];
    for (path, field) in gets {
        let (code, v) = s.get(&path).await;
        assert!((400..500).contains(&code), "{path}: {code} {v}");
        assert_eq!(v["field"], field, "{path}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(field) || field == "query",
            "{path}: {v}"
        );
    }
    let posts = [
        (json!({"user_id": "u", "text": "x"}), "bot"),
        (json!({"bot": b, "text": "x"}), "user_id"),
        (
            json!({"bot": "nosuchbot", "user_id": "u", "text": "x"}),
            "bot",
        ),
        (json!({"bot": b, "user_id": "u"}), "vector"),
        (
            json!({"bot": b, "user_id": "u", "vector": [1.0, 2.0]}),
            "vector",
        ),
        (json!({"bot": b, "user_id": "u", "vector": []}), "vector"),
        (json!({"bot": b, "user_id": "u", "vector": "abc"}), "vector"),
        (
            json!({"bot": b, "user_id": "u", "vector": [1, "x"]}),
            "vector",
        ),
        (
            json!({"bot": b, "user_id": "u", "vector": vec![0.0; DIM]}),
            "vector",
        ),
        (json!({"bot": b, "user_id": "u", "text": "?!"}), "text"),
        (json!({"bot": b, "user_id": "u", "text": 5}), "text"),
        (
            json!({"bot": b, "user_id": "u", "text": "x", "limit": 0}),
            "limit",
        ),
        (
            json!({"bot": b, "user_id": "u", "text": "x", "limit": 1.5}),
            "limit",
        ),
        (
            json!({"bot": b, "user_id": "u", "text": "x", "since": "later"}),
            "since",
        ),
        (
            json!({"bot": b, "user_id": "u", "text": "x", "tz": "Nowhere"}),
            "tz",
        ),
        (
            json!({"bot": b, "user_id": "u", "text": "x", "colour": 1}),
            "body",
        ),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in posts {
        let (code, v) = s.post(body.clone()).await;
        assert!((400..500).contains(&code), "{body}: {code} {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (code, v) = s.call("POST", "/v1/recall/search", None, Some(TOKEN)).await;
    assert!(
        (400..500).contains(&code) && v["field"] == "body",
        "{code} {v}"
    );
    let (code, v) = s
        .call("DELETE", "/v1/users/bad%20bot/u", None, Some(TOKEN))
        .await;
    assert!(code == 400 && v["field"] == "bot", "{code} {v}");

    // ---- auth ----
    let path = format!("/v1/recall?bot={}&user_id={}", f.bot, enc(&u0));
    for token in [None, Some("wrong"), Some("")] {
        let (code, v) = s.call("GET", &path, None, token).await;
        assert_eq!(code, 401, "{token:?}: {v}");
        let (code, _) = s
            .call("POST", "/v1/recall/search", Some(json!({})), token)
            .await;
        assert_eq!(code, 401);
        let (code, _) = s
            .call(
                "DELETE",
                &format!("/v1/users/{}/{}", f.bot, enc(&u0)),
                None,
                token,
            )
            .await;
        assert_eq!(code, 401);
    }
    assert_eq!(
        s.http
            .get(format!("{}/healthz", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("recap_recall_requests_total"), "metrics");

    // forget u1 (the Python client's own tests are in tests/python_client.rs)
    let (code, body) = s
        .call(
            "DELETE",
            &format!("/v1/users/{}/{}", f.bot, enc(&u1)),
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    // nothing of u1's is left
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversation_summaries WHERE user_id = $1")
            .bind(&u1)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    assert_eq!(summary_points(&f.bot, Some(&u1)).await, 0);
}

/// Every table and column holding a user's state, as (table, row as text) of one (bot, user).
async fn state_of(db: &TestDb, bot: &str, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    for table in recap::recall::USER_TABLES {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM {table} t WHERE bot_name = $1 AND user_id = $2 ORDER BY t::text"
        )))
        .bind(bot)
        .bind(user)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT encode(raw, 'escape') FROM recap_dead_letters WHERE position(convert_to($1, 'UTF8') IN raw) > 0 ORDER BY id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    out.extend(dead.into_iter().map(|r| format!("recap_dead_letters: {r}")));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn forgetting_a_user_leaves_nothing_of_theirs_and_touches_no_one_else() {
    let _shared = common::shared().await;
    let f = fixture(2).await;
    let (a, b) = (f.windows[0].0.clone(), f.windows[TOPICS.len()].0.clone());
    assert_ne!(a, b);
    // a dead letter of each user (their malformed events)
    for u in [&a, &b] {
        // with its key, as every writer stores a letter (migration 0017)
        sqlx::query("INSERT INTO recap_dead_letters (source, raw, reason, bot_name, user_id) VALUES ('nats', $1, 'bad timestamp', $2, $3)")
            .bind(serde_json::to_vec(&json!({"bot": f.bot, "user_id": u, "timestamp": "never"})).unwrap())
            .bind(&f.bot)
            .bind(u)
            .execute(&f.db.pool)
            .await
            .unwrap();
    }
    // day/week/month rollups of both users, so that forget has rollup rows and state to delete
    let rollups = recap::rollup::shell::Rollups {
        store: recap::sink::Store::connect_lazy(f.db.url.parse().unwrap(), 2),
        summarizer: std::sync::Arc::new(recap::summarize::extractive::Extractive),
        owner: "recall-test".into(),
        settings: Default::default(),
    };
    let built = rollups
        .round(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert!(built.written > 0, "no rollup built: {built:?}");
    // an open window of the user to forget, as an ingest checkpoint stores it, and its running summary (both users
    // have one), so that forget has open state to delete
    for u in [&a] {
        sqlx::query(
            "INSERT INTO recap_open_windows (bot_name, user_id, point_ids, point_ts)
             VALUES ($1, $2, ARRAY[gen_random_uuid()::text], ARRAY[now()])",
        )
        .bind(&f.bot)
        .bind(u)
        .execute(&f.db.pool)
        .await
        .unwrap();
        // and a closed point of theirs that was stamped ahead of the clock (migration 0016)
        sqlx::query(
            "INSERT INTO recap_clamped_points (bot_name, user_id, point_id, stored_ts)
             VALUES ($1, $2, gen_random_uuid()::text, now())",
        )
        .bind(&f.bot)
        .bind(u)
        .execute(&f.db.pool)
        .await
        .unwrap();
    }
    for u in [&a, &b] {
        sqlx::query(
            "INSERT INTO recap_running_summaries
                 (bot_name, user_id, window_start, point_ids, covers_until, message_count, summary, key_topics)
             VALUES ($1, $2, now(), ARRAY[gen_random_uuid()::text], now(), 1, 'a running summary', ARRAY['topic'])",
        )
        .bind(&f.bot)
        .bind(u)
        .execute(&f.db.pool)
        .await
        .unwrap();
    }
    let tables: Vec<String> = sqlx::query_scalar(
        // tables, not views (the view recap_messages reads recap_open_windows and recap_windows)
        "SELECT c.table_name::text FROM information_schema.columns c
         JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
         WHERE c.table_schema = 'public' AND c.column_name = 'user_id' AND t.table_type = 'BASE TABLE'",
    )
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    for t in &tables {
        assert!(
            recap::recall::USER_TABLES.contains(&t.as_str()),
            "table {t} holds user ids but forget does not cover it"
        );
    }
    let before_a = state_of(&f.db, &f.bot, &a).await;
    let before_b = state_of(&f.db, &f.bot, &b).await;
    assert!(before_a.iter().any(|r| r.starts_with("recap_dead_letters")));
    for t in recap::recall::USER_TABLES {
        assert!(
            before_a.iter().any(|r| r.starts_with(&format!("{t}:"))),
            "no {t} rows to forget"
        );
    }
    let points_b = summary_points(&f.bot, Some(&b)).await;
    assert!(summary_points(&f.bot, Some(&a)).await > 0 && points_b > 0);

    let rollup_rows_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_summaries WHERE bot_name = $1 AND user_id = $2 AND summary_type <> 'time_window'",
    )
    .bind(&f.bot)
    .bind(&a)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert!(rollup_rows_a > 0);
    let s = f.serve(&[]).await;
    let (code, v) = s
        .call(
            "DELETE",
            &format!("/v1/users/{}/{}", f.bot, enc(&a)),
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["deleted"]["conversation_summaries"],
        TOPICS.len() as i64 + rollup_rows_a,
        "{v}"
    );
    assert_eq!(v["deleted"]["recap_dead_letters"], 1, "{v}");

    // the running recap's leader was fenced and re-reads its sweep overlap, which still holds the user's points in
    // the bot's collection: nothing of theirs may come back
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        state_of(&f.db, &f.bot, &a).await,
        Vec::<String>::new(),
        "state of the forgotten user left"
    );
    assert_eq!(
        summary_points(&f.bot, Some(&a)).await,
        0,
        "vectors of the forgotten user left"
    );
    assert_eq!(
        state_of(&f.db, &f.bot, &b).await,
        before_b,
        "another user's state changed"
    );
    assert_eq!(summary_points(&f.bot, Some(&b)).await, points_b);
    // the bot's own collection is never touched
    let bot_points = qdrant()
        .await
        .count(
            CountPointsBuilder::new(&f.collection)
                .filter(Filter::must([Condition::matches("user_id", a.clone())]))
                .exact(true),
        )
        .await
        .unwrap()
        .result
        .unwrap()
        .count;
    assert_eq!(bot_points, (TOPICS.len() * 8) as u64);
    // recall of the forgotten user is empty, forgetting again is fine, and the log has no user id
    let (_, v) = s
        .get(&format!("/v1/recall?bot={}&user_id={}", f.bot, enc(&a)))
        .await;
    assert_eq!(ids(&v), Vec::<i64>::new());
    let (code, v) = s
        .call(
            "DELETE",
            &format!("/v1/users/{}/{}", f.bot, enc(&a)),
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(
        (code, &v["deleted"]["conversation_summaries"]),
        (200, &json!(0)),
        "{v}"
    );
}

#[test]
fn recall_token_is_required_beyond_loopback() {
    let _shared = common::shared_blocking();
    let envs = vec![
        (
            "DATABASE_URL".to_string(),
            "postgres://u:p@127.0.0.1:1/db".to_string(),
        ),
        ("QDRANT_URL".to_string(), "http://127.0.0.1:1".to_string()),
        ("HTTP_ADDR".to_string(), "0.0.0.0:0".to_string()),
    ];
    let (code, out, err) = run_recap(&["run"], &envs);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("RECALL_TOKEN"), "{err}");
    let mut with = envs.clone();
    with.push(("RECALL_TOKEN".into(), "   ".into()));
    let (code, _, err) = run_recap(&["check"], &with);
    assert_ne!(code, 0);
    assert!(
        err.contains("RECALL_TOKEN"),
        "a blank token counts as unset: {err}"
    );
}
