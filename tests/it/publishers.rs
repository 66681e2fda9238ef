//! The bots' publishers, run as the bots would run them: `examples/publish.rs` (built once here) and
//! `examples/publish.py` (nats-py), against the real NATS. Fire-and-forget: events land in the stream with
//! `Nats-Msg-Id` = point id (so duplicates are dropped), and NATS being down, silent or stream-less never makes the
//! publisher fail or wait longer than its timeout.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use recap::event::StoredEvent;

/// The examples' per-publish timeout (both use 0.5 s).
const TIMEOUT: f64 = 0.5;

/// `target/.../examples/publish`, built once per test run (cargo test builds examples only with --all-targets).
fn rust_example() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        // Drop what cargo set for this test process (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...): build scripts watch
        // some of them (ring: rerun-if-env-changed), and a different value would rebuild the whole shared target dir.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "CARGO"
                || k == "OUT_DIR"
                || k == "RUST_RECURSION_COUNT"
                || [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_BIN_",
                    "CARGO_CRATE_",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "CARGO_CFG_",
                ]
                .iter()
                .any(|p| k.starts_with(p))
            {
                cargo.env_remove(k.as_ref());
            }
        }
        let out = cargo
            .args([
                "build",
                "--example",
                "publish",
                // the profile `cargo test` built the dependencies in: no second build of them in the dev profile
                "--profile",
                "test",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build --example publish");
        assert!(out.status.success(), "cargo build --example publish failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "publish")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no executable for the publish example")
    })
}

fn python() -> String {
    std::env::var("RECAP_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a publisher with NATS_URL set; returns (exit code, stdout, stderr, seconds).
fn run(program: &Path, args: &[&str], nats_url: &str) -> (i32, String, String, f64) {
    let t = Instant::now();
    let out = Command::new(program)
        .args(args)
        .env("NATS_URL", nats_url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let secs = t.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    eprintln!(
        "{} {} -> exit {:?} in {secs:.3}s\nstdout: {stdout}stderr: {stderr}",
        program.display(),
        args.join(" "),
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), stdout, stderr, secs)
}

fn run_rust(args: &[&str], nats_url: &str) -> (i32, String, String, f64) {
    run(rust_example(), args, nats_url)
}

fn run_python(args: &[&str], nats_url: &str) -> (i32, String, String, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/publish.py");
    let mut full = vec![script.to_str().unwrap()];
    full.extend_from_slice(args);
    run(Path::new(&python()), &full, nats_url)
}

/// A port nothing listens on: bound, then closed.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

async fn js(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.expect("nats connect"))
}

/// Reads every message of the namespace's stream through its consumer and checks each one against the contract.
async fn read_stream(ns: &NatsNs, bot: &str, user: &str, n: usize) -> Vec<StoredEvent> {
    read_stream_on(ns, &format!("{}.{bot}", ns.prefix), bot, user, n).await
}

/// [`read_stream`] for events published on `subject`.
async fn read_stream_on(
    ns: &NatsNs,
    subject: &str,
    bot: &str,
    user: &str,
    n: usize,
) -> Vec<StoredEvent> {
    let js = js(&ns.url).await;
    let consumer = recap::source::nats::ensure_stream(&js, &ns.settings())
        .await
        .expect("consumer");
    let mut msgs = consumer
        .batch()
        .max_messages(n + 10)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("pull");
    let mut events = Vec::new();
    while let Some(Ok(m)) = msgs.next().await {
        let e = StoredEvent::parse_on_subject(m.subject.as_str(), &m.payload)
            .unwrap_or_else(|err| panic!("event on {} rejected: {err}", m.subject));
        assert_eq!(m.subject.as_str(), subject);
        assert_eq!((e.bot.as_str(), e.user_id.as_str()), (bot, user));
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string());
        assert_eq!(id.as_deref(), Some(e.point_id.as_str()), "Nats-Msg-Id");
        assert!(m.payload.len() < 1024, "{} bytes", m.payload.len());
        m.ack().await.expect("ack");
        events.push(e);
    }
    events
}

async fn stream_messages(ns: &NatsNs) -> u64 {
    js(&ns.url)
        .await
        .get_stream(&ns.stream)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}

async fn drop_stream(ns: &NatsNs) {
    let _ = js(&ns.url).await.delete_stream(&ns.stream).await;
}

// ------------------------------------------------------------------------------------------------ Rust

#[tokio::test]
async fn rust_example_publishes_events_that_land_in_the_stream() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("b{}", token());
    let n = 50;
    let (code, out, _, secs) = run_rust(
        &[
            "--count",
            &n.to_string(),
            "--bot",
            &bot,
            "--user",
            "123456789012345678",
            "--prefix",
            &ns.prefix,
        ],
        &ns.url,
    );
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "{n} of {n} events acknowledged on {}.{bot}",
            ns.prefix
        )),
        "{out}"
    );
    assert_eq!(stream_messages(&ns).await, n as u64);
    let events = read_stream(&ns, &bot, "123456789012345678", n).await;
    assert_eq!(events.len(), n);
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.point_id.clone()).collect();
    assert_eq!(ids.len(), n, "point ids are distinct");
    assert!(events.iter().all(|e| e.collection.as_deref()
        == Some(format!("whisperengine_memory_{bot}").as_str())
        && e.role.as_deref() == Some("user")));
    eprintln!(
        "FIGURE rust example: {n} events published and acknowledged in {secs:.3}s wall (process included)"
    );
    drop_stream(&ns).await;
}

/// `--by-user`: the Rust publisher's subject carries the user token recap computes (`event::user_token`), for an id
/// that is no subject token too, and recap accepts the events.
#[tokio::test]
async fn rust_example_by_user_publishes_on_the_user_token_recap_computes() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("b{}", token());
    let user = "user.7@example.com";
    let subject = format!("{}.{bot}.{}", ns.prefix, recap::event::user_token(user));
    assert!(subject.contains(".~"), "a hashed token: {subject}");
    let (code, out, _, _) = run_rust(
        &[
            "--count",
            "3",
            "--bot",
            &bot,
            "--user",
            user,
            "--prefix",
            &ns.prefix,
            "--by-user",
        ],
        &ns.url,
    );
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("3 of 3 events acknowledged on {subject}")),
        "{out}"
    );
    assert_eq!(read_stream_on(&ns, &subject, &bot, user, 3).await.len(), 3);
    drop_stream(&ns).await;
}

#[tokio::test]
async fn rust_example_duplicate_point_ids_are_dropped() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("b{}", token());
    let point = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        // three publishes of one point per run (a retrying bot), and a second run (a re-publish after a restart)
        let (code, out, _, _) = run_rust(
            &[
                "--count",
                "3",
                "--bot",
                &bot,
                "--user",
                "u1",
                "--prefix",
                &ns.prefix,
                "--point-id",
                &point,
            ],
            &ns.url,
        );
        assert_eq!(code, 0);
        assert!(out.contains("3 of 3 events acknowledged"), "{out}");
    }
    assert_eq!(stream_messages(&ns).await, 1, "duplicates were stored");
    let events = read_stream(&ns, &bot, "u1", 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].point_id, point);
    drop_stream(&ns).await;
}

#[tokio::test]
async fn rust_example_with_nats_down_exits_at_once() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    let url = format!("nats://127.0.0.1:{}", dead_port());
    let (code, out, _, secs) = run_rust(&["--count", "5"], &url);
    assert_eq!(code, 0);
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!("FIGURE rust example, NATS port closed: exit 0 in {secs:.3}s");
}

#[tokio::test]
async fn rust_example_with_a_silent_server_gives_up_after_its_connect_timeout() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    // Listening but never accepting: the TCP handshake succeeds, no INFO ever comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let (code, out, _, secs) = run_rust(&["--count", "5"], &url);
    assert_eq!(code, 0);
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!("FIGURE rust example, silent server: exit 0 in {secs:.3}s");
    drop(silent);
}

#[tokio::test]
async fn rust_example_without_a_stream_does_not_fail_or_block() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    let prefix = format!("nostream{}.stored", token());
    let (code, out, _, secs) = run_rust(
        &["--count", "5", "--bot", "elena", "--prefix", &prefix],
        &env("NATS_URL"),
    );
    assert_eq!(code, 0);
    assert!(out.contains("0 of 5 events acknowledged"), "{out}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!("FIGURE rust example, no stream (no responders): 5 publishes in {secs:.3}s");
}

/// A core subscriber on the subject that never answers: the PubAck never comes, each publish gives up after 0.5 s.
#[tokio::test]
async fn rust_example_gives_up_on_a_missing_puback_within_its_timeout() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    rust_example(); // built before the subscriber waits
    let prefix = format!("noack{}.stored", token());
    let client = async_nats::connect(env("NATS_URL")).await.expect("connect");
    let mut sub = client
        .subscribe(format!("{prefix}.elena"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let counter = tokio::spawn(async move {
        let mut n = 0;
        while tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            n += 1;
            if n == 3 {
                break;
            }
        }
        n
    });
    let url = env("NATS_URL");
    let (code, out, _, secs) = tokio::task::spawn_blocking(move || {
        run_rust(
            &["--count", "3", "--bot", "elena", "--prefix", &prefix],
            &url,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("0 of 3 events acknowledged"), "{out}");
    assert_eq!(counter.await.unwrap(), 3, "the publishes were sent");
    // 3 publishes, each bounded by the timeout (plus process start-up and the connect).
    assert!(
        secs < 3.0 * TIMEOUT + 1.0,
        "took {secs:.3}s for 3 unacknowledged publishes"
    );
    assert!(
        secs >= 3.0 * TIMEOUT * 0.9,
        "took only {secs:.3}s: did it wait at all?"
    );
    eprintln!(
        "FIGURE rust example, PubAck never comes: 3 publishes in {secs:.3}s (timeout {TIMEOUT}s each)"
    );
}

// ------------------------------------------------------------------------------------------------ Python

#[test]
fn python_example_with_nats_down_exits_at_once() {
    let _exclusive = common::exclusive_blocking(); // wall-clock bounds: run on a quiet machine
    let url = format!("nats://127.0.0.1:{}", dead_port());
    let (code, out, err, secs) = run_python(&["--count", "5"], &url);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(!err.contains("Traceback"), "{err}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!(
        "FIGURE python example, NATS port closed: exit 0 in {secs:.3}s (interpreter start included)"
    );
}

#[test]
fn python_example_with_a_silent_server_exits_quickly() {
    let _exclusive = common::exclusive_blocking(); // wall-clock bounds: run on a quiet machine
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let (code, out, err, secs) = run_python(&["--count", "5"], &url);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(secs < 2.5, "took {secs:.3}s");
    eprintln!("FIGURE python example, silent server: exit 0 in {secs:.3}s");
    drop(silent);
}

/// publish.py has no subject-prefix flag: it always publishes on `recap.stored.<bot>`. So no per-test stream can
/// take its events; instead a core subscriber on the test's own bot subject plays JetStream (answers with a PubAck)
/// and checks what arrives. Skipped when a stream on the shared server already captures that subject (a real
/// `recap.stored.>` stream would store our events in someone else's stream).
#[tokio::test]
async fn python_example_sends_contract_events_with_msg_id() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    let url = env("NATS_URL");
    let bot = format!("py{}", token());
    let subject = format!("recap.stored.{bot}");
    let client = async_nats::connect(&url).await.expect("connect");
    if let Ok(stream) = js(&url).await.stream_by_subject(subject.clone()).await {
        eprintln!(
            "SKIPPED: stream {stream} on this server captures {subject}; publish.py has no --prefix"
        );
        return;
    }

    // No stream, no subscriber: "no responders" at once, nothing raised.
    let (code, out, err, secs) = tokio::task::spawn_blocking({
        let (url, bot) = (url.clone(), bot.clone());
        move || run_python(&["--count", "3", "--bot", &bot], &url)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 of 3 events acknowledged"), "{out}");
    assert!(!err.contains("Traceback"), "{err}");
    assert!(secs < 3.0, "took {secs:.3}s");

    // A stand-in JetStream that acknowledges and records.
    let mut sub = client.subscribe(subject.clone()).await.expect("subscribe");
    client.flush().await.expect("flush");
    let n = 5;
    let acker = tokio::spawn({
        let client = client.clone();
        async move {
            let mut got = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), sub.next()).await
            {
                let seq = got.len() + 1;
                if let Some(reply) = m.reply.clone() {
                    client
                        .publish(
                            reply,
                            format!(r#"{{"stream":"STANDIN","seq":{seq}}}"#).into(),
                        )
                        .await
                        .expect("puback");
                    client.flush().await.expect("flush");
                }
                got.push(m);
                if got.len() == n {
                    break;
                }
            }
            got
        }
    });
    let (code, out, err, secs) = tokio::task::spawn_blocking({
        let (url, bot) = (url.clone(), bot.clone());
        move || {
            run_python(
                &[
                    "--count",
                    &n.to_string(),
                    "--bot",
                    &bot,
                    "--user",
                    "987654321098765432",
                ],
                &url,
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{n} of {n} events acknowledged on {subject}")),
        "{out}"
    );
    let got = acker.await.unwrap();
    assert_eq!(got.len(), n);
    for m in &got {
        let e = StoredEvent::parse_on_subject(m.subject.as_str(), &m.payload)
            .unwrap_or_else(|err| panic!("publish.py event rejected by recap: {err}"));
        assert_eq!(e.bot, bot);
        assert_eq!(e.user_id, "987654321098765432");
        assert_eq!(
            e.collection.as_deref(),
            Some(format!("whisperengine_memory_{bot}").as_str())
        );
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string());
        assert_eq!(id.as_deref(), Some(e.point_id.as_str()), "Nats-Msg-Id");
        assert!(m.payload.len() < 1024);
    }
    eprintln!(
        "FIGURE python example: {n} events acknowledged in {secs:.3}s wall (interpreter start included)"
    );
}

/// `publish.py --by-user` publishes on `recap.stored.<bot>.<user token>` with the token recap computes
/// (`event::user_token`), for a plain id and one that is no subject token (hashed), and recap accepts the subject.
#[tokio::test]
async fn python_example_by_user_sends_the_user_token_recap_computes() {
    let _shared = common::shared().await;
    let url = env("NATS_URL");
    let bot = format!("pyu{}", token());
    let client = async_nats::connect(&url).await.expect("connect");
    if js(&url)
        .await
        .stream_by_subject(format!("recap.stored.{bot}.x"))
        .await
        .is_ok()
    {
        eprintln!("SKIPPED: a stream on this server captures recap.stored.{bot}.*");
        return;
    }
    for user in ["987654321098765432", "user.7@example.com"] {
        let token = recap::event::user_token(user).into_owned();
        let mut sub = client
            .subscribe(format!("recap.stored.{bot}.>"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let acker = tokio::spawn({
            let client = client.clone();
            async move {
                let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .expect("an event")
                    .expect("subscription open");
                if let Some(reply) = m.reply.clone() {
                    client
                        .publish(reply, r#"{"stream":"STANDIN","seq":1}"#.into())
                        .await
                        .expect("puback");
                    client.flush().await.expect("flush");
                }
                m
            }
        });
        let (code, out, err, _) = tokio::task::spawn_blocking({
            let (url, bot) = (url.clone(), bot.clone());
            move || run_python(&["--by-user", "--bot", &bot, "--user", user], &url)
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{err}");
        let m = acker.await.unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("recap.stored.{bot}.{token}"),
            "{user}"
        );
        assert!(
            out.contains(&format!(
                "1 of 1 events acknowledged on recap.stored.{bot}.{token}"
            )),
            "{out}"
        );
        let e = StoredEvent::parse_on_subject(m.subject.as_str(), &m.payload)
            .unwrap_or_else(|err| panic!("publish.py --by-user event rejected by recap: {err}"));
        assert_eq!(e.user_id, user);
    }
}

/// The same stand-in that never answers: each publish gives up after its 0.5 s timeout and nothing is raised.
#[tokio::test]
async fn python_example_gives_up_on_a_missing_puback_within_its_timeout() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    let url = env("NATS_URL");
    let bot = format!("py{}", token());
    let subject = format!("recap.stored.{bot}");
    if let Ok(stream) = js(&url).await.stream_by_subject(subject.clone()).await {
        eprintln!(
            "SKIPPED: stream {stream} on this server captures {subject}; publish.py has no --prefix"
        );
        return;
    }
    let client = async_nats::connect(&url).await.expect("connect");
    let _sub = client.subscribe(subject).await.expect("subscribe");
    client.flush().await.expect("flush");
    let (code, out, err, secs) =
        tokio::task::spawn_blocking(move || run_python(&["--count", "3", "--bot", &bot], &url))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 of 3 events acknowledged"), "{out}");
    assert!(!err.contains("Traceback"), "{err}");
    assert!(
        secs < 3.0 * TIMEOUT + 1.5,
        "took {secs:.3}s for 3 unacknowledged publishes"
    );
    eprintln!(
        "FIGURE python example, PubAck never comes: 3 publishes in {secs:.3}s (timeout {TIMEOUT}s each)"
    );
}

// ------------------------------------------------------------------------------------------------ TypeScript (Node)

/// `examples/ts/dist/publish.js`: `npm ci` (when node_modules is missing or older than the lock file), then `tsc`,
/// once per test run. Needs node and npm (20+; Debian: `apt-get install nodejs npm`).
fn ts_example() -> &'static Path {
    static JS: OnceLock<PathBuf> = OnceLock::new();
    JS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ts");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let installed = modified(&dir.join("node_modules/.package-lock.json"));
        if installed.is_none() || installed < modified(&dir.join("package-lock.json")) {
            let st = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .status()
                .unwrap_or_else(|e| {
                    panic!("npm ci in examples/ts: {e} (install node 20+ and npm)")
                });
            assert!(st.success(), "npm ci in examples/ts failed");
        }
        let st = Command::new("node")
            .args(["node_modules/typescript/bin/tsc", "-p", "."])
            .current_dir(&dir)
            .status()
            .unwrap_or_else(|e| panic!("node: {e} (install node 20+)"));
        assert!(st.success(), "tsc -p examples/ts failed");
        dir.join("dist/publish.js")
    })
}

fn run_ts(args: &[&str], nats_url: &str) -> (i32, String, String, f64) {
    let script = ts_example().to_str().unwrap().to_string();
    let mut full = vec![script.as_str()];
    full.extend_from_slice(args);
    run(Path::new("node"), &full, nats_url)
}

#[tokio::test]
async fn ts_example_publishes_events_recap_accepts() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("t{}", token());
    let n = 20;
    let (url, prefix, b) = (ns.url.clone(), ns.prefix.clone(), bot.clone());
    let (code, out, err, secs) = tokio::task::spawn_blocking(move || {
        run_ts(
            &[
                "--count",
                &n.to_string(),
                "--bot",
                &b,
                "--user",
                "123456789012345678",
                "--prefix",
                &prefix,
            ],
            &url,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "{n} of {n} events acknowledged on {}.{bot}",
            ns.prefix
        )),
        "{out}"
    );
    assert_eq!(stream_messages(&ns).await, n as u64);
    // read_stream checks each event with recap's own parser and the Nats-Msg-Id header
    let events = read_stream(&ns, &bot, "123456789012345678", n).await;
    assert_eq!(events.len(), n);
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.point_id.clone()).collect();
    assert_eq!(ids.len(), n, "point ids are distinct");
    assert!(events.iter().all(|e| e.collection.as_deref()
        == Some(format!("whisperengine_memory_{bot}").as_str())
        && e.role.as_deref() == Some("user")));
    eprintln!(
        "FIGURE ts example: {n} events published and acknowledged in {secs:.3}s wall (node start included)"
    );
    drop_stream(&ns).await;
}

/// `--by-user`: the TypeScript publisher's subject carries the user token recap computes (`event::user_token`), for an
/// id that is no subject token too (FNV-1a 64 in BigInt), and recap accepts the events.
#[tokio::test]
async fn ts_example_by_user_publishes_on_the_user_token_recap_computes() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("t{}", token());
    for user in ["123456789012345678", "user.7@example.com"] {
        let subject = format!("{}.{bot}.{}", ns.prefix, recap::event::user_token(user));
        let (url, prefix, b) = (ns.url.clone(), ns.prefix.clone(), bot.clone());
        let (code, out, err, _) = tokio::task::spawn_blocking(move || {
            run_ts(
                &[
                    "--count",
                    "2",
                    "--bot",
                    &b,
                    "--user",
                    user,
                    "--prefix",
                    &prefix,
                    "--by-user",
                ],
                &url,
            )
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("2 of 2 events acknowledged on {subject}")),
            "{out}"
        );
        assert_eq!(read_stream_on(&ns, &subject, &bot, user, 2).await.len(), 2);
    }
    drop_stream(&ns).await;
}

#[tokio::test]
async fn ts_example_duplicate_point_ids_are_dropped() {
    let _shared = common::shared().await;
    let ns = nats_ns();
    ns.ensure().await;
    let bot = format!("t{}", token());
    let point = uuid::Uuid::new_v4().to_string();
    let (url, prefix, b, p) = (
        ns.url.clone(),
        ns.prefix.clone(),
        bot.clone(),
        point.clone(),
    );
    let (code, out, err, _) = tokio::task::spawn_blocking(move || {
        run_ts(
            &[
                "--count",
                "3",
                "--bot",
                &b,
                "--user",
                "u1",
                "--prefix",
                &prefix,
                "--point-id",
                &p,
            ],
            &url,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 of 3 events acknowledged"), "{out}");
    assert_eq!(stream_messages(&ns).await, 1, "duplicates were stored");
    let events = read_stream(&ns, &bot, "u1", 1).await;
    assert_eq!(events[0].point_id, point);
    drop_stream(&ns).await;
}

#[test]
fn ts_example_with_nats_down_exits_at_once() {
    let _exclusive = common::exclusive_blocking(); // wall-clock bounds: run on a quiet machine
    let url = format!("nats://127.0.0.1:{}", dead_port());
    let (code, out, err, secs) = run_ts(&["--count", "5"], &url);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!("FIGURE ts example, NATS port closed: exit 0 in {secs:.3}s (node start included)");
}

#[test]
fn ts_example_with_a_silent_server_gives_up_after_its_connect_timeout() {
    let _exclusive = common::exclusive_blocking(); // wall-clock bounds: run on a quiet machine
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let (code, out, err, secs) = run_ts(&["--count", "5"], &url);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("publishing skipped"), "{out}");
    assert!(secs < 2.5, "took {secs:.3}s");
    eprintln!("FIGURE ts example, silent server: exit 0 in {secs:.3}s");
    drop(silent);
}

#[test]
fn ts_example_without_a_stream_does_not_fail_or_block() {
    let _exclusive = common::exclusive_blocking(); // wall-clock bounds: run on a quiet machine
    let prefix = format!("nostream{}.stored", token());
    let (code, out, err, secs) = run_ts(
        &["--count", "5", "--bot", "elena", "--prefix", &prefix],
        &env("NATS_URL"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 of 5 events acknowledged"), "{out}");
    assert!(secs < 2.0, "took {secs:.3}s");
    eprintln!("FIGURE ts example, no stream (no responders): 5 publishes in {secs:.3}s");
}

/// A core subscriber on the subject that never answers: each publish gives up after its 0.5 s timeout.
#[tokio::test]
async fn ts_example_gives_up_on_a_missing_puback_within_its_timeout() {
    let _exclusive = common::exclusive().await; // wall-clock bounds: run on a quiet machine
    ts_example(); // built before the subscriber waits
    let prefix = format!("noack{}.stored", token());
    let client = async_nats::connect(env("NATS_URL")).await.expect("connect");
    let _sub = client
        .subscribe(format!("{prefix}.elena"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let url = env("NATS_URL");
    let (code, out, err, secs) = tokio::task::spawn_blocking(move || {
        run_ts(
            &["--count", "3", "--bot", "elena", "--prefix", &prefix],
            &url,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 of 3 events acknowledged"), "{out}");
    assert!(
        secs < 3.0 * TIMEOUT + 1.0,
        "took {secs:.3}s for 3 unacknowledged publishes"
    );
    assert!(
        secs >= 3.0 * TIMEOUT * 0.9,
        "took only {secs:.3}s: did it wait at all?"
    );
    eprintln!(
        "FIGURE ts example, PubAck never comes: 3 publishes in {secs:.3}s (timeout {TIMEOUT}s each)"
    );
}

// ------------------------------------------------------------------------------------------------ all three

/// The snippets are what a bot pastes: none depends on recap (the Rust one has its own serde struct), and
/// nats/README.md lists each of them.
#[test]
fn publisher_snippets_stand_alone_and_are_listed() {
    let _shared = common::shared_blocking();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rust = std::fs::read_to_string(root.join("examples/publish.rs")).unwrap();
    assert!(
        !rust.contains("recap::"),
        "examples/publish.rs uses recap's own code; a bot has its own event struct"
    );
    assert!(
        rust.contains("serde::Serialize"),
        "the Rust snippet serializes its own struct"
    );
    let ts = std::fs::read_to_string(root.join("examples/ts/publish.ts")).unwrap();
    for line in ts.lines().filter(|l| l.starts_with("import ")) {
        let from = line.rsplit(['"', '\'']).nth(1).unwrap_or("");
        assert!(
            from.starts_with("@nats-io/") || from.starts_with("node:"),
            "publish.ts imports {from}"
        );
    }
    let py = std::fs::read_to_string(root.join("examples/publish.py")).unwrap();
    assert!(!py.contains("import recap") && !py.contains("from recap"));
    let readme = std::fs::read_to_string(root.join("nats/README.md")).unwrap();
    for f in [
        "examples/publish.py",
        "examples/publish.rs",
        "examples/ts/publish.ts",
    ] {
        assert!(readme.contains(f), "nats/README.md does not list {f}");
    }
}
