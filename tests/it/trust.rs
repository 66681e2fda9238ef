//! Safe by default and monitoring that can fire (issue 26):
//! * `metrics_are_registered_at_zero_with_help`: `/metrics` right after start has every counter of
//!   `recap::telemetry::METRICS` at 0 (each known label value) with its HELP line.
//! * `open_mode_answers_only_loopback_hosts`: without tokens (loopback listener) the console and the recall API answer
//!   421 to a `Host` that is not loopback, and serve loopback names.
//! * `hostile_inputs_get_a_4xx_naming_the_field`: NUL bytes, dates Postgres cannot store, vector components that
//!   overflow f32 and ids over the column sizes, on every route: a 4xx naming the field, never a 5xx.
//! * `store_errors_are_503_only_when_the_store_is_down`: a value Postgres refuses is a 400, the read pool's statement
//!   timeout and a dead pool are 503.
//! * `console_cookie_and_login_throttle`: the `__Host-` Secure cookie behind TLS, 429 after five attempts.
//! * `reads_are_limited_and_time_out`: `RECALL_CONCURRENCY` makes a request wait for a slot; a read blocked past
//!   `RECALL_STATEMENT_TIMEOUT` is a 503.
//! * `alert_rules_pass_promtool`: docs/alerts.yml against docs/alerts.test.yml.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "trust-test-recall-token-0123";
const CONSOLE: &str = "trust-test-console-token-0123";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Recap {
    child: std::process::Child,
    port: u16,
    http: reqwest::Client,
}

impl Drop for Recap {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

impl Recap {
    async fn start(db: &TestDb, extra: &[(&str, &str)], name: &str) -> Recap {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = free_port();
        let mut envs = recap_env(db, None);
        envs.retain(|(k, _)| k != "HTTP_ADDR");
        envs.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        envs.push(("COLLECTION_PATTERNS".into(), format!("none_{}_*", token())));
        envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let log = log_path(name);
        let child = spawn_recap(&["run"], &envs, &log);
        let r = Recap {
            child,
            port,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        let t0 = Instant::now();
        while r.http.get(r.url("/healthz")).send().await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "recap did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = self.url(path);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "DELETE" => self.http.delete(url),
            _ => unreachable!(),
        }
        .header("authorization", format!("Bearer {TOKEN}"));
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
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test]
async fn metrics_are_registered_at_zero_with_help() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let r = Recap::start(&db, &[], "trust-metrics").await;
    let text = r
        .http
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut wrong = Vec::new();
    let mut zero_series = 0;
    for m in recap::telemetry::METRICS {
        if m.kind != recap::telemetry::Kind::Counter {
            continue;
        }
        let series = recap::telemetry::combinations(m.labels);
        if series.is_empty() {
            continue; // a label with open values: its series appear with their first increment
        }
        if !text.contains(&format!("# HELP {} {}", m.name, m.help)) {
            wrong.push(format!("no HELP for {}", m.name));
        }
        if !text.contains(&format!("# TYPE {} counter", m.name)) {
            wrong.push(format!("no TYPE counter for {}", m.name));
        }
        for labels in series {
            let name = if labels.is_empty() {
                m.name.to_string()
            } else {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{}{{{}}}", m.name, l.join(","))
            };
            zero_series += 1;
            let value = text
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name} ")))
                .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
            // a sweep-only recap starts its first cycle (and checkpoint) at once: those may have moved already
            let may_move =
                ["recap_sweep_cycles_total", "recap_checkpoints_total"].contains(&m.name);
            match value {
                Some(v) if v == 0.0 || (may_move && v >= 0.0) => {}
                other => wrong.push(format!("{name}: {other:?}, want 0")),
            }
        }
    }
    // the counters the alert rules read are among them
    for name in [
        "recap_windows_closed_total",
        "recap_windows_summarized_total",
        "recap_windows_dead_total",
        "recap_events_consumed_total",
        "recap_fetch_errors_total",
    ] {
        if !text.lines().any(|l| l == format!("{name} 0")) {
            wrong.push(format!("{name} (read by docs/alerts.yml) is not at 0"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n/metrics:\n{text}");
    assert!(
        !text.contains("_latency_seconds") && !text.contains("recap_windows_open "),
        "renamed or removed metrics are gone"
    );
    eprintln!("TRUST /metrics at start: {zero_series} counter series at 0 with HELP");
}

#[tokio::test]
async fn open_mode_answers_only_loopback_hosts() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let r = Recap::start(&db, &[], "trust-hosts").await;
    let get = |path: &str, host: &str| {
        let req = r.http.get(r.url(path)).header("host", host.to_string());
        async move {
            let resp = req.send().await.unwrap();
            let code = resp.status().as_u16();
            (code, resp.text().await.unwrap())
        }
    };
    let recall = "/v1/recall?bot=nosuchbot&user_id=u";
    for host in [
        "evil.example",
        &format!("evil.example:{}", r.port),
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "10.0.0.1",
        "[::2]",
    ] {
        for path in ["/console", "/console/dead", recall] {
            let (code, body) = get(path, host).await;
            assert_eq!(code, 421, "{path} with Host {host}: {code} {body}");
            assert!(body.contains("TOKEN"), "names the setting: {body}");
        }
        // the operations endpoints stay reachable (Prometheus scrapes by address)
        assert_eq!(get("/healthz", host).await.0, 200);
    }
    for host in [
        format!("localhost:{}", r.port),
        format!("127.0.0.1:{}", r.port),
        "127.0.0.1".to_string(),
        "LOCALHOST".to_string(),
        format!("[::1]:{}", r.port),
    ] {
        let (code, body) = get("/console", &host).await;
        assert_eq!(code, 200, "/console with Host {host}: {body}");
        let (code, body) = get(recall, &host).await;
        assert_eq!(
            code, 404,
            "{recall} with Host {host}: an unknown bot, {body}"
        );
    }
}

#[tokio::test]
async fn hostile_inputs_get_a_4xx_naming_the_field() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let bot = format!("trustbot_{}", token());
    // the configured token is trimmed as the presented one is (pasted with spaces and a newline, it still matches)
    let padded = format!("  {TOKEN}\n");
    let r = Recap::start(&db, &[("RECALL_TOKEN", &padded)], "trust-hostile").await;
    // a known bot (recall answers 404 for bots it has nothing of)
    let t0 = Instant::now();
    while sqlx::query("INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp, message_count, key_topics)
         VALUES ('u1', $1, 'we talked about hiking', now() - interval '2 hours', now() - interval '1 hour', 4, ARRAY['hiking'])")
        .bind(&bot)
        .execute(&db.pool)
        .await
        .is_err()
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "schema not migrated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, v) = r
        .call("GET", &format!("/v1/recall?bot={bot}&user_id=u1"), None)
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");

    let long = "x".repeat(256);
    let long_bot = "b".repeat(101);
    let gets = [
        (format!("/v1/recall?bot={bot}&user_id=%00"), "user_id"),
        (format!("/v1/recall?bot={bot}&user_id=u%001"), "user_id"),
        (format!("/v1/recall?bot={bot}&user_id={long}"), "user_id"),
        (format!("/v1/recall?bot={long_bot}&user_id=u1"), "bot"),
        ("/v1/recall?bot=a%00b&user_id=u1".to_string(), "bot"),
        (
            format!("/v1/recall?bot={bot}&user_id=u1&since=5000000d"),
            "since",
        ),
        (
            format!("/v1/recall?bot={bot}&user_id=u1&until=5000000d"),
            "until",
        ),
        (
            format!("/v1/recall?bot={bot}&user_id=u1&since=99999999999d"),
            "since",
        ),
        (
            format!("/v1/recall?bot={bot}&user_id=u1&since=%00"),
            "since",
        ),
        (format!("/v1/recall?bot={bot}&user_id=u1&tz=UTC%00"), "tz"),
        (format!("/v1/recall?bot={bot}&user_id=u1&type=a%00"), "type"),
        (
            format!("/v1/recall?bot={bot}&user_id=u1&limit=1%00"),
            "limit",
        ),
    ];
    let mut wrong = Vec::new();
    for (path, field) in &gets {
        let (code, v) = r.call("GET", path, None).await;
        if !(400..500).contains(&code) || v["field"] != *field {
            wrong.push(format!(
                "GET {path}: {code} {v} (want a 4xx naming {field})"
            ));
        }
    }
    let mut big = vec![0.1f64; 8];
    big[3] = 1e39;
    let posts = [
        (
            json!({"bot": bot, "user_id": "\u{0}", "text": "hiking"}),
            "user_id",
        ),
        (
            json!({"bot": bot, "user_id": long, "text": "hiking"}),
            "user_id",
        ),
        (
            json!({"bot": long_bot, "user_id": "u1", "text": "hiking"}),
            "bot",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "text": "hik\u{0}ing"}),
            "text",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "vector": big}),
            "vector",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "vector": [1e39]}),
            "vector",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "vector": [-3.5e38, 1.0]}),
            "vector",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "text": "hiking", "since": "5000000d"}),
            "since",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "text": "hiking", "until": "10000-01-01T00:00:00Z"}),
            "until",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "text": "hiking", "tz": "\u{0}"}),
            "tz",
        ),
        (
            json!({"bot": bot, "user_id": "u1", "text": "hiking", "since": "1d\u{0}"}),
            "since",
        ),
    ];
    for (body, field) in &posts {
        let (code, v) = r
            .call("POST", "/v1/recall/search", Some(body.clone()))
            .await;
        if !(400..500).contains(&code) || v["field"] != *field {
            wrong.push(format!(
                "POST {body}: {code} {v} (want a 4xx naming {field})"
            ));
        }
    }
    let deletes = [
        (format!("/v1/users/{bot}/%00"), "user_id"),
        (format!("/v1/users/{bot}/a%0Ab"), "user_id"),
        (format!("/v1/users/{bot}/{long}"), "user_id"),
        (format!("/v1/users/{long_bot}/u1"), "bot"),
        ("/v1/users/elena/%00".to_string(), "user_id"),
    ];
    for (path, field) in &deletes {
        let (code, v) = r.call("DELETE", path, None).await;
        if !(400..500).contains(&code) || v["field"] != *field {
            wrong.push(format!(
                "DELETE {path}: {code} {v} (want a 4xx naming {field})"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // nothing was deleted by the refused forgets, and the valid requests still work
    let (code, v) = r
        .call(
            "POST",
            "/v1/recall/search",
            Some(json!({"bot": bot, "user_id": "u1", "text": "hiking", "since": "30d"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");
    let (code, v) = r
        .call(
            "GET",
            &format!("/v1/recall?bot={bot}&user_id=u1&since=3650d&until=now"),
            None,
        )
        .await;
    assert_eq!(
        (code, v["items"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );
    eprintln!(
        "TRUST hostile inputs: {} requests, each a 4xx naming its field",
        gets.len() + posts.len() + deletes.len()
    );
}

#[tokio::test]
async fn store_errors_are_503_only_when_the_store_is_down() {
    let _shared = common::shared().await;
    use axum::response::IntoResponse;
    use recap::recall::api::store_error;
    let db = fresh_db().await;
    let opts: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    // a value Postgres refuses (a NUL in text): a 400, not "postgres is unavailable"
    let store = recap::sink::Store::connect_lazy(opts.clone(), 1);
    let e = sqlx::query("SELECT $1::text")
        .bind("a\u{0}b")
        .execute(store.pool())
        .await
        .expect_err("Postgres refuses a NUL");
    let resp = store_error(recap::sink::StoreError::Db(e)).into_response();
    assert_eq!(resp.status(), 400);
    // a date out of its range (SQLSTATE 22008): 400 too
    let e = sqlx::query("SELECT '294277-01-01'::timestamp")
        .execute(store.pool())
        .await
        .expect_err("out of range");
    assert_eq!(
        store_error(recap::sink::StoreError::Db(e))
            .into_response()
            .status(),
        400
    );
    // the read pool's statement timeout (as `recap run` sets it): 503, the store is overloaded
    let read =
        recap::sink::Store::connect_lazy(opts.clone().options([("statement_timeout", "100")]), 1);
    let e = sqlx::query("SELECT pg_sleep(2)")
        .execute(read.pool())
        .await
        .expect_err("cancelled by statement_timeout");
    assert_eq!(
        store_error(recap::sink::StoreError::Db(e))
            .into_response()
            .status(),
        503
    );
    // a Postgres that is not there: 503
    let gone = recap::sink::Store::connect_lazy(opts.port(free_port()), 1);
    let e = sqlx::query("SELECT 1")
        .execute(gone.pool())
        .await
        .expect_err("nothing listens");
    assert_eq!(
        store_error(recap::sink::StoreError::Db(e))
            .into_response()
            .status(),
        503
    );
    // an error in recap's own SQL: a 500 (a bug, not an outage and not the caller's fault)
    let e = sqlx::query("SELECT no_such_column FROM conversation_summaries")
        .execute(store.pool())
        .await
        .expect_err("undefined");
    assert_eq!(
        store_error(recap::sink::StoreError::Db(e))
            .into_response()
            .status(),
        500
    );
}

#[tokio::test]
async fn console_cookie_and_login_throttle() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let r = Recap::start(&db, &[("CONSOLE_TOKEN", CONSOLE)], "trust-console").await;
    let login = |token: &str, tls: bool| {
        let mut req = r
            .http
            .post(r.url("/console/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"));
        if tls {
            req = req.header("x-forwarded-proto", "https");
        }
        async move {
            let resp = req.send().await.unwrap();
            let cookie = resp
                .headers()
                .get("set-cookie")
                .map(|v| v.to_str().unwrap().to_string());
            let retry = resp.headers().get("retry-after").is_some();
            (resp.status().as_u16(), cookie, retry)
        }
    };
    // behind a TLS proxy: Secure, __Host- name, path /
    let (code, cookie, _) = login(CONSOLE, true).await;
    assert_eq!(code, 303);
    let cookie = cookie.expect("a session cookie");
    assert!(
        cookie.starts_with("__Host-recap_console=")
            && cookie.contains("; Path=/;")
            && cookie.contains("Secure")
            && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // the session works through the proxy
    let id = cookie.split(';').next().unwrap();
    let page = r
        .http
        .get(r.url("/console"))
        .header("x-forwarded-proto", "https")
        .header("cookie", id)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // plain HTTP: no Secure, the plain name
    let (code, cookie, _) = login(CONSOLE, false).await;
    assert_eq!(code, 303);
    let cookie = cookie.unwrap();
    assert!(
        cookie.starts_with("recap_console=") && !cookie.contains("Secure"),
        "{cookie}"
    );
    // five attempts per address, then 429 with Retry-After, even for the right token
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(login("not-the-console-token", false).await.0);
    }
    assert_eq!(codes, [401, 401, 401]);
    let (code, _, retry) = login("not-the-console-token", false).await;
    assert_eq!((code, retry), (429, true));
    let (code, cookie, _) = login(CONSOLE, false).await;
    assert_eq!(code, 429, "throttled before the token is compared");
    assert!(cookie.is_none());
    let metrics = r
        .http
        .get(r.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "recap_console_logins_throttled_total 2"),
        "{metrics}"
    );
}

#[test]
fn alert_rules_pass_promtool() {
    let _shared = common::shared_blocking();
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
    let Ok(out) = std::process::Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(docs)
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing in CI: scripts/services install installs it (Debian package prometheus)"
        );
        eprintln!(
            "SKIPPED alert_rules_pass_promtool: promtool not found (apt-get install prometheus, or scripts/services install)"
        );
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool test rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    // every recap metric the rules read is one recap exports
    let rules = std::fs::read_to_string(format!("{docs}/alerts.yml")).unwrap();
    let names: Vec<&str> = recap::telemetry::METRICS.iter().map(|m| m.name).collect();
    let mut unknown = Vec::new();
    for (i, _) in rules.match_indices("recap_") {
        let end = rules[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(rules.len(), |e| i + e);
        let mut name = &rules[i..end];
        for suffix in ["_bucket", "_count", "_sum"] {
            if let Some(base) = name.strip_suffix(suffix)
                && names.contains(&base)
            {
                name = base;
            }
        }
        if !names.contains(&name) && name != "recap_llm_cost_usd_total" {
            unknown.push(name.to_string());
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/alerts.yml reads metrics recap does not export: {unknown:?}"
    );
    // operate.md points at the file rather than keeping a second copy
    let operate = std::fs::read_to_string(format!("{docs}/operate.md")).unwrap();
    assert!(operate.contains("docs/alerts.yml") && !operate.contains("alert: RecapNoSummaries"));
}

/// The read path's limits, end to end: with `RECALL_CONCURRENCY=1` a second request waits for the first's slot, and
/// a read blocked past `RECALL_STATEMENT_TIMEOUT` (here by a table lock) is cancelled by Postgres and answered 503.
#[tokio::test]
async fn reads_are_limited_and_time_out() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    let bot = format!("trustbot_{}", token());
    let r = Recap::start(
        &db,
        &[
            ("RECALL_TOKEN", TOKEN),
            ("RECALL_CONCURRENCY", "1"),
            ("RECALL_STATEMENT_TIMEOUT", "2s"),
        ],
        "trust-limits",
    )
    .await;
    let t0 = Instant::now();
    while sqlx::query("INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp, message_count, key_topics)
         VALUES ('u1', $1, 'hiking', now() - interval '2 hours', now() - interval '1 hour', 4, ARRAY['hiking'])")
        .bind(&bot)
        .execute(&db.pool)
        .await
        .is_err()
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "schema not migrated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recall = format!("/v1/recall?bot={bot}&user_id=u1");
    assert_eq!(
        r.call("GET", &recall, None).await.0,
        200,
        "the bot is known (and cached)"
    );
    // a writer holds the table: the next read blocks in Postgres
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE conversation_summaries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = Instant::now();
    // (bounded: without a statement timeout the blocked read would wait for the lock, and the lock for this join)
    let both = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::join!(
            async {
                let (code, v) = r.call("GET", &recall, None).await;
                (code, v, started.elapsed())
            },
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                // needs no store at all (a bad limit), yet waits for the one slot
                let (code, v) = r.call("GET", &format!("{recall}&limit=0"), None).await;
                (code, v, started.elapsed())
            }
        )
    })
    .await;
    tx.rollback().await.unwrap();
    let (blocked, waiting) =
        both.expect("the blocked read was not cancelled by RECALL_STATEMENT_TIMEOUT");
    let (code, v, blocked_for) = blocked;
    assert_eq!(code, 503, "cancelled by the statement timeout: {v}");
    assert!(
        blocked_for >= Duration::from_millis(1900) && blocked_for < Duration::from_secs(10),
        "{blocked_for:?}"
    );
    let (code, v, waited) = waiting;
    assert_eq!((code, &v["field"]), (400, &json!("limit")), "{v}");
    assert!(
        waited >= blocked_for,
        "the second request was served only after the first left its slot: {waited:?} < {blocked_for:?}"
    );
    // and reads work again once the lock is gone
    assert_eq!(r.call("GET", &recall, None).await.0, 200);
    eprintln!(
        "TRUST read limits: a read blocked by a lock answered 503 after {:.2} s (RECALL_STATEMENT_TIMEOUT=2s); a second request waited {:.2} s for the one slot",
        blocked_for.as_secs_f64(),
        waited.as_secs_f64() - 0.3
    );
}
