//! The console (issue 17) on real services.
//!
//! * `console_in_a_real_browser`: `recap run` with seeded conversations (summarized through the LLM test server; one
//!   user's window dead-lettered by failing LLM replies), driven in headless Chromium through chromedriver
//!   (WebDriver over HTTP): log in with the token, read the overview (and compare it with `recap status --json`), find
//!   a user by the beginning of their id, open their timeline and a window, see its messages (from Qdrant) and its
//!   summary, retry the dead window and see it summarized. A PNG of each page goes to `target/artifacts/console/`.
//! * `console_refuses_without_token_and_csrf`: on a non-loopback listener without `CONSOLE_TOKEN` every console URL
//!   answers 401; with a token, every URL answers 401 without the session, and a POST without (or with a wrong) CSRF
//!   token is refused (403) and changes nothing.

use crate::common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn set(envs: &mut Vec<(String, String)>, k: &str, v: &str) {
    envs.retain(|(key, _)| key != k);
    envs.push((k.to_string(), v.to_string()));
}

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts/console");
    std::fs::create_dir_all(&d).expect("artifacts dir");
    d
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Waits until recap answers /healthz on `port`.
async fn wait_http(port: u16, log: &std::path::Path) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = http()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "recap did not serve HTTP on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

// ------------------------------------------------------------------------------------------------ WebDriver

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (apt-get install chromium chromium-driver; scripts/services install does)");
    let d = Driver {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http().get(format!("{}/status", d.base)).send().await
            && r.status().is_success()
        {
            return d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One WebDriver session (W3C protocol).
struct Browser {
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a page may take to show what a step waits for. Generous: a wait ends as soon as the page is there, and CI
/// runs this beside five other tests on two cores.
const PATIENCE: Duration = Duration::from_secs(30);

impl Browser {
    async fn new(driver: &Driver) -> Browser {
        let binary = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"]}}}});
        let v = raw(
            reqwest::Method::POST,
            &format!("{}/session", driver.base),
            Some(caps),
        )
        .await
        .expect("new WebDriver session");
        Browser {
            session: format!(
                "{}/session/{}",
                driver.base,
                v["sessionId"].as_str().expect("sessionId")
            ),
        }
    }

    async fn cmd(&self, m: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        raw(m, &format!("{}{path}", self.session), body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching `css` (waiting up to `PATIENCE` for it: a page under CI's load, with a cold
    /// chromium, can take seconds); fails the test with the page's text if there is none.
    async fn find(&self, css: &str) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.find_all(css).await.into_iter().next() {
                return e;
            }
            if t0.elapsed() > PATIENCE {
                panic!(
                    "no element {css} on {}:\n{}",
                    self.url().await,
                    self.body_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The elements matching `css` once there are `n` of them (waiting up to `PATIENCE`, as the page may still be
    /// loading after a click); fails the test with the page's text if the count never reaches `n`.
    async fn find_n(&self, css: &str, n: usize) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let all = self.find_all(css).await;
            if all.len() == n {
                return all;
            }
            if t0.elapsed() > PATIENCE {
                panic!(
                    "{} element(s) {css} on {}, not {n}:\n{}",
                    all.len(),
                    self.url().await,
                    self.body_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, el: &str) -> String {
        self.cmd(reqwest::Method::GET, &format!("/element/{el}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A DOM property of an element (e.g. `textContent`, which WebDriver's text leaves out for SVG titles).
    async fn property(&self, el: &str, name: &str) -> String {
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{el}/property/{name}"),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn text_of(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.text(&el).await
    }

    async fn body_text(&self) -> String {
        match self.find_all("body").await.first() {
            Some(b) => self.text(b).await,
            None => String::new(),
        }
    }

    async fn click(&self, el: &str) {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, el: &str, text: &str) {
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::write(artifacts().join(format!("{name}.png")), png).expect("write screenshot");
    }

    async fn quit(&self) {
        let _ = raw(reqwest::Method::DELETE, &self.session, None).await;
    }
}

async fn raw(m: reqwest::Method, url: &str, body: Option<Value>) -> Result<Value, String> {
    let mut req = http().request(m, url);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

// ------------------------------------------------------------------------------------------------ data

/// Points of one user (12-message session, 8 messages 3 h later, and a 4-message too-short one when `short`),
/// sorted by time.
fn user_points(user: &str, base: i64, short: bool) -> Vec<TestPoint> {
    let mut p = conversation(user, base, 6, 2 * MIN, false);
    p.extend(conversation(user, base + 3 * 60 * MIN, 4, 5 * MIN, false));
    if short {
        p.extend(conversation(user, base + 8 * 60 * MIN, 2, MIN, false));
    }
    p
}

fn by_time(mut p: Vec<TestPoint>) -> Vec<TestPoint> {
    p.sort_by_key(|x| (x.ts_ms, x.id.clone()));
    p
}

fn status_json(envs: &[(String, String)]) -> Value {
    let (code, out, err) = run_recap(&["status", "--json"], envs);
    assert_eq!(code, 0, "status --json: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

fn state_count(st: &Value, state: &str) -> i64 {
    st["windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == state)
        .map(|p| p[1].as_i64().unwrap())
        .sum()
}

fn card(text: &str) -> i64 {
    text.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches('≈')
        .replace(',', "")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count in {text:?}"))
}

// ------------------------------------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread")]
async fn console_in_a_real_browser() {
    let _shared = common::shared().await;
    let t_start = Instant::now();
    let db = fresh_db().await;
    db.migrate().await;
    let ns = nats_ns();
    let js = ns.ensure().await;
    let bot = format!("bot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let (ua, ub, uc) = (
        "720000000000000001",
        "720000000000000002",
        "720000000000000003",
    );
    let phase1 = by_time(
        [
            user_points(ua, T0, true),
            user_points(ub, T0 + 7 * MIN, false),
        ]
        .concat(),
    );
    // user C: one session, two days later, summarized while the LLM answers garbage: dead
    let phase2 = conversation(uc, T0 + 2 * 24 * 60 * MIN, 6, 2 * MIN, false);
    upsert(&q, &collection, &[phase1.clone(), phase2.clone()].concat()).await;

    let llm = LlmServer::start();
    let port = free_port();
    let console_token = format!("console-{}-{}", token(), token());
    let mut envs = recap_env(&db, Some(&ns));
    for (k, v) in [
        ("COLLECTION_PATTERNS", collection.as_str()),
        ("COLLECTION_MAP", &format!("{collection}={bot}")),
        ("LOOKBACK_DAYS", "3650"),
        ("SUMMARIZER", "llm"),
        ("LLM_API_KEY", "sk-test-key"),
        ("LLM_BASE_URL", &llm.api_base()),
        ("LLM_MAX_ATTEMPTS", "1"),
        ("LLM_DAILY_BUDGET_USD", "0.5"),
        ("HTTP_ADDR", &format!("127.0.0.1:{port}")),
        ("CONSOLE_TOKEN", &console_token),
    ] {
        set(&mut envs, k, v);
    }
    let log = log_path("console");
    let mut recap = spawn_recap(&["run"], &envs, &log);
    wait_http(port, &log).await;

    // one event that is not JSON: a dead letter
    let subject = format!("{}.{bot}", ns.prefix);
    let bad = b"not json: a broken publisher".to_vec();
    assert_eq!(ns.publish_raw(&js, vec![(subject, None, bad)]).await, 1);
    ns.publish(&js, &bot, &collection, &phase1).await;
    let s = wait_settled(&db.pool, 5, Duration::from_secs(60)).await;
    assert_eq!(
        (s.get("done"), s.get("too_short")),
        (Some(&4), Some(&1)),
        "{s:?}"
    );
    llm.control(json!({"fail_modes": ["nonjson"], "fail_rate": 1.0}))
        .await;
    ns.publish(&js, &bot, &collection, &phase2).await;
    let s = wait_settled(&db.pool, 6, Duration::from_secs(60)).await;
    assert_eq!(s.get("dead"), Some(&1), "{s:?}");
    llm.control(json!({"fail_rate": 0.0})).await;
    let seeded = t_start.elapsed();

    let driver = start_driver().await;
    let b = Browser::new(&driver).await;
    let base = format!("http://127.0.0.1:{port}");

    // 1. log in
    b.goto(&format!("{base}/console")).await;
    let field = b.find("#token").await;
    b.screenshot("1-login").await;
    b.type_into(&field, &console_token).await;
    let button = b.find("#login-button").await;
    b.click(&button).await;

    // 2. the overview, with the numbers `recap status --json` gives
    let states = b.text_of("#states").await;
    let st = status_json(&envs);
    let cards: std::collections::HashMap<String, i64> = {
        let mut m = std::collections::HashMap::new();
        for el in b.find_all("#states .card").await {
            let t = b.text(&el).await;
            let label = t.lines().nth(1).unwrap_or("").trim().to_lowercase();
            m.insert(label, card(&t));
        }
        m
    };
    assert_eq!(
        cards.get("done"),
        Some(&state_count(&st, "done")),
        "{states}"
    );
    assert_eq!(cards.get("done"), Some(&4), "{states}");
    assert_eq!(cards.get("too short"), Some(&1), "{states}");
    assert_eq!(
        cards.get("dead"),
        Some(&state_count(&st, "dead")),
        "{states}"
    );
    assert_eq!(cards.get("dead"), Some(&1), "{states}");
    // ... and /metrics (its gauges come from the same snapshot)
    let metrics = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (label, state) in [
        ("done", "done"),
        ("too short", "too_short"),
        ("dead", "dead"),
    ] {
        let prefix = format!("recap_windows_by_state{{state=\"{state}\"}} ");
        let v: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix}in /metrics:\n{metrics}"));
        assert_eq!(Some(&(v as i64)), cards.get(label), "{state}");
    }
    assert_eq!(
        card(&b.text_of("#dead-letters").await),
        st["dead_letters"].as_i64().unwrap()
    );
    assert_eq!(st["dead_letters"], 1, "{st}");
    let spend = b.text_of("#spend-today").await;
    assert_eq!(
        spend,
        recap::console::view::usd(st["llm_spend_today_usd"].as_f64().unwrap())
    );
    assert_ne!(spend, "$0", "the LLM test server's calls cost something");
    assert!(!b.find_all("#chart-hourly rect").await.is_empty());
    let bars = b.find_n("#chart-spend rect", 14).await;
    // today's bar is the spend ledger's figure, the one the snapshot shows
    let today = b.property(&bars[13], "textContent").await;
    assert!(
        today.ends_with(&format!(": {spend}")),
        "today's spend bar {today:?}, snapshot {spend}"
    );
    assert_eq!(
        b.find_all("#chart-spend .limit").await.len(),
        1,
        "budget line"
    );
    let checkpoints = b.text_of("#checkpoints").await;
    assert!(checkpoints.contains("nats:"), "{checkpoints}");
    assert!(
        b.text_of("#instances").await.contains("ingest leader"),
        "the leader is listed"
    );
    b.screenshot("2-overview").await;

    // 3. find a user by the beginning of the id, open their timeline
    b.goto(&format!("{base}/console/conversations")).await;
    let user_field = b.find("#user").await;
    b.type_into(&user_field, "72000000000000000").await;
    let search = b.find("#search").await;
    b.click(&search).await;
    let users = b.text_of("#users").await;
    assert!(
        users.contains(ua) && users.contains(ub) && users.contains(uc),
        "{users}"
    );
    let link = b.find("#users a").await;
    b.click(&link).await;
    assert_eq!(b.text_of("#timeline-user").await, ua);
    let timeline = b.text_of("#timeline").await;
    // two summarized + one too short
    let windows = b.find_n("#timeline a.window-link", 3).await;
    assert!(timeline.contains("llm"), "summarizer column: {timeline}");
    b.screenshot("3-timeline").await;

    // 4. a window: messages from Qdrant beside the summary, and its coverage
    let last = windows.last().unwrap().clone(); // oldest first window (12 messages)
    b.click(&last).await;
    b.find_n("#messages .msg", 12).await;
    let messages = b.text_of("#messages").await;
    let first_text = &phase1
        .iter()
        .find(|p| p.user_id == ua)
        .expect("a message of A")
        .content;
    assert!(messages.contains(first_text.as_str()), "{messages}");
    assert!(!b.text_of("#summary").await.trim().is_empty());
    let coverage = b.text_of("#coverage").await;
    assert!(
        coverage.contains("covers exactly these 12 messages"),
        "{coverage}"
    );
    b.screenshot("4-window").await;

    // 5. dead windows: retry one, see it summarized
    b.goto(&format!("{base}/console/dead")).await;
    let dead = b.text_of("#dead-windows").await;
    assert!(dead.contains(uc), "{dead}");
    assert!(dead.contains("no valid JSON summary"), "the reason: {dead}");
    let letters = b.text_of("#dead-letters").await;
    assert!(
        letters.contains("not json: a broken publisher") && letters.contains("nats"),
        "the dead letter's body and source: {letters}"
    );
    b.screenshot("5-dead").await;
    let retry = b.find("#dead-windows button.retry").await;
    b.click(&retry).await;
    assert!(
        b.text_of("#retry-result")
            .await
            .contains("1 dead window(s) put back to due")
    );
    let t0 = Instant::now();
    loop {
        let state = b.text_of("#window-state").await;
        if state == "done" && !b.find_all("#summary").await.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "the retried window was not summarized: {state}\n{}",
            b.body_text().await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let url = b.url().await;
        b.goto(&url).await;
    }
    b.find_n("#messages .msg", 12).await;
    b.screenshot("6-retried").await;
    b.quit().await;
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE state = 'done'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(done, 5);
    terminate(&mut recap);
    eprintln!(
        "CONSOLE browser test: seeded in {:.1}s, whole test {:.1}s; screenshots in {}",
        seeded.as_secs_f64(),
        t_start.elapsed().as_secs_f64(),
        artifacts().display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn console_refuses_without_token_and_csrf() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let dead_id: i64 = sqlx::query_scalar(
        "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, last_error)
         VALUES ('b', 'u', now() - interval '2 hours', now() - interval '1 hour', 'dead', 7, 'boom') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM recap_windows WHERE id = $1")
            .bind(dead_id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let urls = [
        "/console".to_string(),
        "/console/".into(),
        "/console/conversations?user=u".into(),
        format!("/console/window/{dead_id}"),
        "/console/dead".into(),
        "/console/login".into(),
        "/console/nothing/here".into(),
    ];
    let posts = ["/console/dead/retry", "/console/login", "/console/logout"];
    let start = |console_token: Option<&str>| {
        let port = free_port();
        let mut envs = recap_env(&db, None);
        set(&mut envs, "HTTP_ADDR", &format!("0.0.0.0:{port}"));
        // a non-loopback listener needs the recall API's token too (recap refuses to start without it)
        set(
            &mut envs,
            "RECALL_TOKEN",
            "recall-token-for-the-console-test",
        );
        set(
            &mut envs,
            "COLLECTION_PATTERNS",
            &format!("none_{}_*", token()),
        );
        if let Some(t) = console_token {
            set(&mut envs, "CONSOLE_TOKEN", t);
        }
        let log = log_path("console-auth");
        (spawn_recap(&["run"], &envs, &log), port, log)
    };
    let c = http();

    // no token, listener on every address: the console is off
    let (mut off, port, log) = start(None);
    wait_http(port, &log).await;
    let base = format!("http://127.0.0.1:{port}");
    for u in &urls {
        let r = c.get(format!("{base}{u}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "GET {u} with the console off");
    }
    for u in posts {
        let r = c
            .post(format!("{base}{u}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("window={dead_id}&token=x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "POST {u} with the console off");
    }
    terminate(&mut off);
    assert_eq!(state().await, "dead");

    // a token: 401 without a session, a wrong token does not log in, the right one does
    let secret = format!("tok-{}-{}", token(), token());
    let (mut on, port, log) = start(Some(&secret));
    wait_http(port, &log).await;
    let base = format!("http://127.0.0.1:{port}");
    for u in &urls {
        let r = c.get(format!("{base}{u}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "GET {u} without a session");
        let r = c
            .get(format!("{base}{u}"))
            .header("cookie", "recap_console=forged")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "GET {u} with a forged session");
    }
    let form = |body: String| {
        c.post(format!("{base}/console/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let r = form("token=wrong-token-of-some-length".into())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = form(format!("token={secret}")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = c
        .get(format!("{base}/console/dead"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let csrf = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a CSRF field on the page")
        .to_string();
    let retry = |body: String| {
        c.post(format!("{base}/console/dead/retry"))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    };
    for body in [
        format!("window={dead_id}"),
        format!("window={dead_id}&csrf="),
        format!("window={dead_id}&csrf={}", "0".repeat(csrf.len())),
    ] {
        let r = retry(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 403, "retry with {body:?}");
        assert_eq!(state().await, "dead", "a refused POST changed nothing");
    }
    // a cross-site POST is refused even with the token
    let r = retry(format!("window={dead_id}&csrf={csrf}"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(state().await, "dead");
    // with it: the same path as `recap retry`
    let r = retry(format!("window={dead_id}&csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers().get("location").unwrap(),
        &format!("/console/window/{dead_id}?retried=1")
    );
    assert_ne!(state().await, "dead");
    terminate(&mut on);
}
