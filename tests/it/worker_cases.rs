//! Issue 24, the worker's cases: 4 (every LLM attempt re-checks the lease and version; the heartbeat renews only
//! leases of unchanged windows), 5 (the spend ledger counts every dollar: timed-out attempts, replies without
//! `usage`, CJK text), 8 (a Postgres outage at finish keeps the paid results and retries the finish) and 9 (a named
//! point not yet visible in Qdrant puts its window back, a bounded time, instead of dropping it).
//! In process against real Postgres and Qdrant and a private LLM test server per test; each runs in seconds.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use recap::budget::PgLedger;
use recap::config::Config;
use recap::pipeline::{Context, drain_due, process_windows};
use recap::sink::Finished;
use recap::summarize::llm::LlmSummarizer;
use recap::summarize::{SummarizeError, Summarizer, WindowInput};

/// recap's config for scenario `s` with the LLM summarizer against `llm`, plus `extra` flags.
fn config(s: &Scenario, db_url: &str, llm: &LlmServer, extra: &[&str]) -> Config {
    config_for(&s.collection, &s.bot, db_url, llm, extra)
}

fn config_for(
    collection: &str,
    bot: &str,
    db_url: &str,
    llm: &LlmServer,
    extra: &[&str],
) -> Config {
    let base = llm.api_base();
    let mut args: Vec<&str> = vec![
        "--summarizer",
        "llm",
        "--llm-base-url",
        base.as_str(),
        "--llm-api-key",
        "test-key-worker-cases",
        "--llm-requests-per-second",
        "1000",
        "--llm-daily-budget-usd",
        "100",
    ];
    args.extend_from_slice(extra);
    collection_config(collection, bot, db_url, &args)
}

async fn context(cfg: Config) -> Context {
    let store = recap::cmd::connect_store(&cfg).await.expect("store");
    let summarizer = recap::cmd::summarizer(&cfg, Some(&store))
        .await
        .expect("summarizer");
    let q = env("QDRANT_URL");
    Context {
        store,
        points: Arc::new(
            recap::fetch::Points::new(&q, None, cfg.payload_mapping()).expect("points"),
        ),
        summarizer,
        instance: format!("test-{}", token()),
        cfg: Arc::new(cfg),
    }
}

/// A due window of `user`: `exchanges` exchanges stored in Qdrant (all but the points `hidden` leaves out) and named
/// as the window's coverage. Returns the window id and the hidden points.
async fn due_window(
    s: &Scenario,
    user: &str,
    exchanges: usize,
    hidden: usize,
) -> (i64, Vec<TestPoint>) {
    let pts: Vec<TestPoint> = conversation(user, T0, exchanges, MIN, false);
    let (shown, hid) = pts.split_at(pts.len() - hidden);
    upsert(&qdrant().await, &s.collection, shown).await;
    let all: Vec<&TestPoint> = pts.iter().collect();
    let id = insert_due_window(&s.db.pool, &s.bot, user, &all).await;
    (id, hid.to_vec())
}

async fn window_calls(llm: &LlmServer) -> u64 {
    llm.stats().await["calls_by_purpose"]["window"]
        .as_u64()
        .unwrap_or(0)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state_of(pool: &sqlx::PgPool, id: i64) -> (String, Option<i32>, bool) {
    sqlx::query_as(
        "SELECT state, message_count, coalesce(not_before > now(), false) FROM recap_windows WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn summary_rows(pool: &sqlx::PgPool, user: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT message_count FROM conversation_summaries WHERE user_id = $1")
        .bind(user)
        .fetch_all(pool)
        .await
        .unwrap()
}

// ---- case 4 -----------------------------------------------------------------------------------------------------

/// A retry goes out only while the window is still ours and unchanged: the first attempt is rate limited (retry
/// after 1 s); meanwhile a late message changes the window; the retry is not sent.
#[tokio::test(flavor = "multi_thread")]
async fn case4_a_retry_is_not_sent_for_a_window_that_changed_meanwhile() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"fail_next": 1, "fail_modes": ["429"], "retry_after": 1}))
        .await;
    let user = "880000000000000001";
    let (id, _) = due_window(&s, user, 3, 0).await;
    let ctx = context(config(&s, &s.db.url, &llm, &[])).await;
    let claimed = ctx
        .store
        .claim_due(&ctx.instance, Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let run = {
        let ctx = ctx.clone();
        tokio::spawn(async move { process_windows(&ctx, claimed, &|_| {}).await })
    };
    wait_until("the first attempt", Duration::from_secs(10), || async {
        window_calls(&llm).await >= 1
    })
    .await;
    // a late message: the window's version changes while its retry waits
    sqlx::query("UPDATE recap_windows SET version = version + 1 WHERE id = $1")
        .bind(id)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let finished = run.await.unwrap().unwrap();
    assert_eq!(finished, vec![(id, Finished::Stale)]);
    assert_eq!(
        window_calls(&llm).await,
        1,
        "the retry of a changed window must not be sent"
    );
    assert!(summary_rows(&s.db.pool, user).await.is_empty());
}

/// The heartbeat renews only the leases of windows whose version is the one claimed: a window changed while its
/// (slow) call runs loses its lease when it ends, instead of being kept by a worker whose result is thrown away.
#[tokio::test(flavor = "multi_thread")]
async fn case4_the_heartbeat_does_not_renew_the_lease_of_a_changed_window() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"latency_ms": 6000})).await;
    let user = "880000000000000002";
    let (id, _) = due_window(&s, user, 3, 0).await;
    let ctx = context(config(&s, &s.db.url, &llm, &["--lease-seconds", "3"])).await;
    let run = {
        let ctx = ctx.clone();
        tokio::spawn(async move { drain_due(&ctx, &|_| {}).await })
    };
    wait_until("the call", Duration::from_secs(10), || async {
        llm.stats().await["in_flight"].as_u64() == Some(1)
    })
    .await;
    sqlx::query("UPDATE recap_windows SET version = version + 1 WHERE id = $1")
        .bind(id)
        .execute(&s.db.pool)
        .await
        .unwrap();
    // the heartbeat runs every second; the lease (3 s) must run out while the call still runs (6 s): poll for that
    // until 4.5 s after the change (a renewing heartbeat keeps it live past then)
    let deadline = Instant::now() + Duration::from_millis(4500);
    let leased = loop {
        let leased: bool = sqlx::query_scalar(
            "SELECT coalesce(lease_until > now(), false) FROM recap_windows WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        if !leased || Instant::now() >= deadline {
            break leased;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    run.abort();
    assert!(
        !leased,
        "the heartbeat renewed the lease of a window whose version changed"
    );
}

// ---- case 5 -----------------------------------------------------------------------------------------------------

fn window_input(user: &str, texts: &[&str]) -> WindowInput {
    WindowInput {
        bot: "bot".into(),
        user_id: user.into(),
        start_ms: T0,
        end_ms: T0 + texts.len() as i64 * 1000,
        messages: texts
            .iter()
            .enumerate()
            .map(|(i, t)| recap::summarize::Message {
                point_id: format!("{}", 1000 + i),
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                text: t.to_string(),
                ts_ms: T0 + i as i64 * 1000,
                emotion: None,
                vector: Vec::new(),
            })
            .collect(),
    }
}

const TEXTS: &[&str] = &[
    "I started training for the half marathon in the spring, the long runs are getting easier",
    "That sounds wonderful, how is your knee holding up on the long runs",
    "Much better since I switched shoes, and I am planning a trail run with my sister Anna",
    "A trail run with Anna sounds lovely, which trail are you thinking of",
];

/// An LLM summarizer with the Postgres ledger of `db` (owner `owner`), `tweak` applied to its settings.
async fn ledgered(
    db: &TestDb,
    llm: &LlmServer,
    owner: &str,
    tweak: impl FnOnce(&mut recap::summarize::llm::LlmSettings),
) -> (LlmSummarizer, Arc<PgLedger>) {
    let cfg = config_for("none", "bot", &db.url, llm, &[]);
    let mut settings = recap::cmd::llm_settings(&cfg).expect("settings");
    tweak(&mut settings);
    let ledger = Arc::new(PgLedger::new(db.pool.clone(), owner));
    let llm = LlmSummarizer::new(settings)
        .unwrap()
        .with_ledger(ledger.clone());
    (llm, ledger)
}

async fn spent(pool: &sqlx::PgPool) -> f64 {
    sqlx::query_scalar("SELECT coalesce(sum(spent_usd), 0)::float8 FROM recap_llm_spend")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Settles what the summarizer recorded locally (the ledger writes settlements in batches).
async fn flush(ledger: &PgLedger) {
    ledger.flush().await.expect("flush");
}

/// A call that timed out may still be billed (the provider may have answered after we stopped waiting): the ledger
/// counts it at its reserved estimate (prompt + a full MAX_OUTPUT_TOKENS completion), not at 0.
#[tokio::test(flavor = "multi_thread")]
async fn case5_a_timed_out_call_is_counted_in_the_spend() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let llm = LlmServer::start();
    llm.control(
        serde_json::json!({"fail_next": 1, "fail_modes": ["timeout"], "timeout_sleep_s": 3}),
    )
    .await;
    let (sum, ledger) = ledgered(&db, &llm, "case5-timeout", |s| {
        s.timeout = Duration::from_millis(500);
        s.max_retries = 0;
    })
    .await;
    let r = sum.summarize(&window_input("u1", TEXTS)).await;
    assert!(matches!(r, Err(SummarizeError::Unavailable(_))), "{r:?}");
    flush(&ledger).await;
    let completion_floor = f64::from(recap::summarize::llm::MAX_OUTPUT_TOKENS)
        * sum.settings().price_completion_per_mtok
        / 1e6;
    let usd = spent(&db.pool).await;
    assert!(
        usd >= completion_floor,
        "a timed-out call counted {usd} USD, less than its reserved estimate (>= {completion_floor})"
    );
}

/// A reply without `usage` is priced from the prompt and the reply text (the same token rule as the test server),
/// not counted as free.
#[tokio::test(flavor = "multi_thread")]
async fn case5_a_reply_without_usage_is_priced_from_its_text() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    db.migrate().await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"usage": false})).await;
    let (sum, ledger) = ledgered(&db, &llm, "case5-usage", |_| {}).await;
    let summary = sum.summarize(&window_input("u2", TEXTS)).await.unwrap();
    flush(&ledger).await;
    let st = llm.stats().await;
    let (pt, ct) = (
        st["prompt_tokens_total"].as_f64().unwrap(),
        st["completion_tokens_total"].as_f64().unwrap(),
    );
    let settings = sum.settings();
    let expected =
        (pt * settings.price_prompt_per_mtok + ct * settings.price_completion_per_mtok) / 1e6;
    assert!(expected > 0.0);
    let usd = spent(&db.pool).await;
    assert!(
        (usd - expected).abs() < 1e-9,
        "spend {usd} USD, expected {expected} (prompt {pt}, completion {ct} tokens at the configured prices)"
    );
    let u = summary.usage.expect("usage");
    assert_eq!(u.prompt_tokens as f64, pt);
    assert_eq!(u.completion_tokens as f64, ct);
    assert!((u.cost_usd.unwrap_or(0.0) - expected).abs() < 1e-9);
}

/// CJK text is about one token per character, not one per four: the reservation estimate must not undercount it
/// (it bounds the budget's overshoot).
#[test]
fn case5_cjk_text_is_estimated_at_about_a_token_per_character() {
    let settings = recap::summarize::llm::LlmSettings {
        base_url: "http://127.0.0.1:9/v1".into(),
        api_key: "k".into(),
        model: "m".into(),
        price_prompt_per_mtok: 3.0,
        price_completion_per_mtok: 15.0,
        ..Default::default()
    };
    let llm = LlmSummarizer::new(settings).unwrap();
    let cjk: String = "我上周开始为半程马拉松训练长跑越来越轻松了".repeat(50); // 1,050 characters
    let base = llm.estimate_cost("", "");
    let tokens = (llm.estimate_cost("", &cjk) - base) * 1e6 / 3.0;
    assert!(
        tokens >= cjk.chars().count() as f64 * 0.9,
        "{} CJK characters estimated at {tokens:.0} tokens",
        cjk.chars().count()
    );
    let latin = "a".repeat(1000);
    let latin_tokens = (llm.estimate_cost("", &latin) - base) * 1e6 / 3.0;
    assert!(
        (latin_tokens - 250.0).abs() < 1.0,
        "Latin text stays at 4 characters a token: {latin_tokens}"
    );
    assert_eq!(recap::summarize::llm::estimate_text_tokens("你好世界"), 4);
    assert_eq!(recap::summarize::llm::estimate_text_tokens("abcdefgh"), 2);
}

// ---- case 8 -----------------------------------------------------------------------------------------------------

/// A TCP proxy to Postgres that can cut every connection and refuse new ones for a while (a short outage: its port
/// is closed meanwhile, so connecting fails as with a Postgres that is down).
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<Option<Instant>>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let (cut, cuts) = tokio::sync::watch::channel(None::<Instant>);
        tokio::spawn(async move {
            let mut listener = Some(first);
            let mut down = cuts.clone();
            loop {
                let l = match listener.take() {
                    Some(l) => l,
                    None => match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => l,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                tokio::select! {
                    a = l.accept() => {
                        let Ok((mut inbound, _)) = a else { return };
                        listener = Some(l);
                        let mut cuts = cuts.clone();
                        cuts.borrow_and_update(); // only cuts from now on end this connection
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = cuts.changed() => {}
                            }
                        });
                    }
                    _ = down.changed() => {
                        // down: the port is closed until the outage ends
                        drop(l);
                        let until = *down.borrow_and_update();
                        if let Some(until) = until {
                            tokio::time::sleep_until(until.into()).await;
                        }
                    }
                }
            }
        });
        Proxy { port, cut }
    }

    /// Cuts every connection and refuses new ones for `d`.
    fn outage(&self, d: Duration) {
        let _ = self.cut.send(Some(Instant::now() + d));
    }
}

/// A Postgres outage between a paid call and its finish: the worker keeps the summary and retries the finish, so
/// the row is written with one LLM call, not thrown away and paid again after the lease.
#[tokio::test(flavor = "multi_thread")]
async fn case8_a_postgres_outage_at_finish_keeps_the_paid_summary() {
    let _shared = common::shared().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("recap=debug")
        .with_test_writer()
        .try_init();
    let s = scenario(0).await;
    let llm = LlmServer::start();
    llm.control(serde_json::json!({"latency_ms": 1000})).await;
    let user = "880000000000000008";
    let (id, _) = due_window(&s, user, 3, 0).await;
    let url = reqwest::Url::parse(&s.db.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    let mut proxied = url.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy.port)).unwrap();
    let ctx = context(config(
        &s,
        proxied.as_str(),
        &llm,
        &["--lease-seconds", "30"],
    ))
    .await;
    let claimed = ctx
        .store
        .claim_due(&ctx.instance, Duration::from_secs(30), 10)
        .await
        .unwrap();
    let run = {
        let ctx = ctx.clone();
        tokio::spawn(async move { process_windows(&ctx, claimed, &|_| {}).await })
    };
    wait_until("the call", Duration::from_secs(10), || async {
        llm.stats().await["in_flight"].as_u64() == Some(1)
    })
    .await;
    // Postgres unreachable from the worker from now until 7 s later: the call returns (1 s) into the outage, and
    // the finish's wait for a connection (the pool's 5 s acquire timeout) ends in it
    proxy.outage(Duration::from_secs(7));
    let finished = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("process_windows returns")
        .unwrap();
    assert_eq!(
        finished.expect("the finish is retried until Postgres is back"),
        vec![(id, Finished::Done)]
    );
    assert_eq!(summary_rows(&s.db.pool, user).await, vec![6]);
    assert_eq!(window_calls(&llm).await, 1, "one paid call for the window");
}

// ---- case 9 -----------------------------------------------------------------------------------------------------

/// A window naming a point Qdrant does not show yet is put back (a short delay), not summarized without it; once
/// the point is visible it is summarized whole. A point that stays missing past the wait is given up on: the window
/// proceeds with what is visible.
#[tokio::test(flavor = "multi_thread")]
async fn case9_a_named_point_not_yet_visible_puts_the_window_back() {
    let _shared = common::shared().await;
    let s = scenario(0).await;
    let user = "880000000000000009";
    let (id, hidden) = due_window(&s, user, 3, 1).await; // 6 named, 5 visible
    let cfg = scenario_config(&s, &["--summarizer", "extractive"]);
    let ctx = context(cfg).await;
    let claim = |ctx: Context| async move {
        ctx.store
            .claim_due(&ctx.instance, Duration::from_secs(60), 10)
            .await
            .unwrap()
    };
    let first = process_windows(&ctx, claim(ctx.clone()).await, &|_| {})
        .await
        .unwrap();
    assert_eq!(first, vec![(id, Finished::Retrying)]);
    let (state, _, waits) = state_of(&s.db.pool, id).await;
    assert_eq!(
        (state.as_str(), waits),
        ("due", true),
        "put back for a while"
    );
    assert!(summary_rows(&s.db.pool, user).await.is_empty());

    // the point becomes visible: once the delay has passed the window is summarized with all six messages
    upsert(&qdrant().await, &s.collection, &hidden).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let claimed = claim(ctx.clone()).await;
        if !claimed.is_empty() {
            break process_windows(&ctx, claimed, &|_| {}).await.unwrap();
        }
        assert!(Instant::now() < deadline, "the window was not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done, vec![(id, Finished::Done)]);
    assert_eq!(summary_rows(&s.db.pool, user).await, vec![6]);

    // a point that never shows: past the wait (closed long ago) the window proceeds with the visible five
    let user2 = "880000000000000010";
    let (id2, _) = due_window(&s, user2, 3, 1).await;
    sqlx::query("UPDATE recap_windows SET closed_at = now() - interval '1 hour' WHERE id = $1")
        .bind(id2)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let r = process_windows(&ctx, claim(ctx.clone()).await, &|_| {})
        .await
        .unwrap();
    assert_eq!(r, vec![(id2, Finished::Done)]);
    assert_eq!(summary_rows(&s.db.pool, user2).await, vec![5]);
}
