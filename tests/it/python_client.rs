//! The Python client (`clients/python`) as its users get it: pip-installed into a fresh virtualenv, `mypy --strict`
//! clean, and its pytest suite run against a live `recap run` with seeded, summarized data (recall, search, forget,
//! context, and the error paths: 401, 4xx naming the field, a closed port, a server that never answers).
//!
//! The virtualenv is made once per (pyproject.toml, interpreter) under `target/tmp/pyclient-venv-<key>` (with the
//! client's dependencies and its `test` extra: pytest, mypy, numpy); every run then re-installs the client itself from
//! a copy of `clients/python`, so the tested code is always the tree's. Interpreter: `RECAP_PYTHON`, else `python3`.

use crate::common;
use crate::common::topics::{center, noisy};

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use qdrant_client::qdrant::{PointStruct, UpsertPointsBuilder, Value};

const TOKEN: &str = "test-pyclient-token-0123456789";
const TOPICS: [&str; 6] = [
    "hiking",
    "guitar",
    "cooking",
    "chess",
    "astronomy",
    "gardening",
];
const SLOT: i64 = 3 * 60 * MIN;
/// The topic whose vector the client searches with: not the user's last window (which `context` shows as the
/// conversation, not among the earlier recaps).
const SEARCHED: usize = 1;

fn point(user: &str, role: &str, text: String, ts_ms: i64, topic: usize, seed: u64) -> PointStruct {
    let mut payload: HashMap<String, Value> = HashMap::new();
    payload.insert("user_id".into(), user.into());
    payload.insert("content".into(), text.into());
    payload.insert("role".into(), role.into());
    payload.insert("memory_type".into(), "conversation".into());
    let naive = chrono::DateTime::from_timestamp_millis(ts_ms)
        .unwrap()
        .naive_utc();
    payload.insert(
        "timestamp".into(),
        naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string().into(),
    );
    payload.insert("timestamp_unix".into(), (ts_ms as f64 / 1000.0).into());
    payload.insert("emotional_context".into(), "joy".into());
    let vectors: HashMap<String, Vec<f32>> = [
        ("content".to_string(), noisy(topic, seed)),
        ("emotion".to_string(), noisy(0, seed + 7)),
        ("semantic".to_string(), noisy(1, seed + 9)),
    ]
    .into();
    PointStruct::new(uuid::Uuid::new_v4().to_string(), vectors, payload)
}

/// The seeded recap: two users with one closed window per topic (in 2025), one user talking right now.
struct Seeded {
    db: TestDb,
    bot: String,
    collection: String,
    reader: String,
    forgotten: String,
    open_user: String,
    open_texts: Vec<String>,
}

impl Seeded {
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
}

async fn seed() -> Seeded {
    let db = fresh_db().await;
    db.migrate().await;
    let bot = format!("pybot{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let (reader, forgotten) = (
        format!("reader-{}", token()),
        format!("forgotten-{}", token()),
    );
    let mut points = Vec::new();
    let mut seed = 1u64;
    for (u, user) in [&reader, &forgotten].into_iter().enumerate() {
        for (slot, word) in TOPICS.iter().enumerate() {
            let start = T0 + slot as i64 * SLOT + u as i64 * MIN;
            for i in 0..4 {
                let t = start + i * 2 * MIN;
                seed += 2;
                points.push(point(
                    user,
                    "user",
                    format!("I spent the weekend {word} again, {word} keeps me calm ({i})"),
                    t,
                    slot,
                    seed,
                ));
                points.push(point(
                    user,
                    "assistant",
                    format!("Tell me more about your {word}, what did you enjoy most?"),
                    t + 1000,
                    slot,
                    seed + 1,
                ));
            }
        }
    }
    // the open conversation: six messages over the last twelve minutes (the idle gap is 30)
    let open_user = format!("talking-{}", token());
    let now = Utc::now().timestamp_millis();
    let mut open_texts = Vec::new();
    for i in 0..6i64 {
        let (role, text) = if i % 2 == 0 {
            (
                "user",
                format!(
                    "Message {i}: I am planning a long bicycle tour along the river next summer, with my sister and two friends from school, and I wonder which bags to take along."
                ),
            )
        } else {
            (
                "assistant",
                format!(
                    "Message {i}: A tour along the river sounds lovely; panniers on a rear rack carry the most, and a small bar bag keeps the snacks and the map within reach."
                ),
            )
        };
        seed += 1;
        points.push(point(
            &open_user,
            role,
            text.clone(),
            now - (12 - 2 * i) * MIN,
            2,
            seed,
        ));
        open_texts.push(text);
    }
    q.upsert_points(UpsertPointsBuilder::new(&collection, points).wait(true))
        .await
        .expect("upsert");
    let s = Seeded {
        db,
        bot,
        collection,
        reader,
        forgotten,
        open_user,
        open_texts,
    };
    // A window whose fetch failed under load waits for a retry time; bring it forward and sweep again.
    let want = 2 * TOPICS.len() as i64;
    let t0 = Instant::now();
    loop {
        let (code, out, err) = run_recap(&["sweep", "--once"], &s.env());
        assert_eq!(code, 0, "sweep --once failed: {out}{err}");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_summaries")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
        if rows >= want {
            assert_eq!(rows, want, "only the closed windows have rows");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "only {rows} rows: {out}{err}"
        );
        sqlx::query("UPDATE recap_windows SET not_before = now() WHERE state = 'due'")
            .execute(&s.db.pool)
            .await
            .unwrap();
    }
    s
}

/// Runs `cmd`, panicking with its output (and `hint`) unless it succeeds; returns stdout + stderr.
fn run(cmd: &mut Command, what: &str, hint: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}. {hint}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}\n{hint}",
        out.status
    );
    text
}

/// A copy of `clients/python` (sources, tests, metadata; no build output), so installing it leaves the tree clean.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if name_s == "__pycache__"
            || name_s == "build"
            || name_s.ends_with(".egg-info")
            || name_s.starts_with('.')
        {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The cached virtualenv's interpreter, made on first use: `python3 -m venv` (no system site packages), then the
/// client with its dependencies and its `test` extra from a pip install.
fn venv(client: &Path) -> PathBuf {
    let python = std::env::var("RECAP_PYTHON").unwrap_or_else(|_| "python3".into());
    let hint = "scripts/services install sets up python3 with venv and pip (Debian: python3-venv); \
                pip needs the package index";
    let version = run(
        Command::new(&python).args(["-c", "import sys; print(sys.version)"]),
        "python3",
        hint,
    );
    let mut h = DefaultHasher::new();
    std::fs::read(client.join("pyproject.toml"))
        .unwrap()
        .hash(&mut h);
    version.hash(&mut h);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pyclient-venv-{:016x}", h.finish()));
    let py = dir.join("bin").join("python");
    let stamp = dir.join("recap-ready");
    if stamp.exists() {
        return py;
    }
    let _ = std::fs::remove_dir_all(&dir); // a half-made one from an interrupted run
    let t = Instant::now();
    run(
        Command::new(&python).args(["-m", "venv"]).arg(&dir),
        "python3 -m venv",
        hint,
    );
    run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "setuptools>=70.1",
            ])
            .arg(format!("{}[test]", client.display())),
        "pip install of the client with its test extra into the fresh virtualenv",
        hint,
    );
    std::fs::write(&stamp, "").unwrap();
    eprintln!(
        "python client: virtualenv {} made in {:.1} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    py
}

#[tokio::test(flavor = "multi_thread")]
async fn python_client_from_a_fresh_virtualenv_against_a_live_recap() {
    let _shared = common::shared().await;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let copy = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pyclient-src-{}", token()));
    copy_tree(&repo.join("clients/python"), &copy);
    let py = venv(&copy);
    let hint =
        "the virtualenv is cached under target/tmp/pyclient-venv-*: delete it to make it again";
    // the client as this tree has it, over whatever an earlier run installed
    run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "--force-reinstall",
            ])
            .arg(&copy),
        "pip install of clients/python",
        hint,
    );
    // the installed package (not the source tree) and the tests, as a user's mypy sees them (its cache, of the
    // dependencies' stubs mostly, lives in the virtualenv)
    for target in [["-p", "recap_client"], ["--", "tests"]] {
        let typed = run(
            Command::new(&py)
                .current_dir(&copy)
                .args(["-m", "mypy", "--strict", "--cache-dir"])
                .arg(py.parent().unwrap().parent().unwrap().join("mypy-cache"))
                .args(target),
            "mypy --strict",
            hint,
        );
        assert!(typed.contains("Success: no issues found"), "{typed}");
    }

    let s = seed().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut envs = s.env();
    envs.retain(|(k, _)| k != "HTTP_ADDR");
    envs.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    envs.push(("RECALL_TOKEN".into(), TOKEN.into()));
    let mut child = spawn_recap(&["run"], &envs, &log_path("pyclient"));
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "recap did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = Command::new(&py)
        .current_dir(&copy)
        .args([
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests",
        ])
        .env("RECAP_URL", &base)
        .env("RECAP_TOKEN", TOKEN)
        .env("RECAP_BOT", &s.bot)
        .env("RECAP_USER", &s.reader)
        .env("RECAP_FORGET_USER", &s.forgotten)
        .env("RECAP_WINDOWS", TOPICS.len().to_string())
        .env(
            "RECAP_VECTOR",
            serde_json::to_string(&center(SEARCHED)).unwrap(),
        )
        .env("RECAP_TOPIC", TOPICS[SEARCHED])
        .env("RECAP_OPEN_USER", &s.open_user)
        .env(
            "RECAP_OPEN_TEXTS",
            serde_json::to_string(&s.open_texts).unwrap(),
        )
        .output()
        .expect("pytest");
    terminate(&mut child);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{text}"
    );
    assert!(text.contains(" passed"), "pytest ran no test:\n{text}");

    // the client forgot one user: nothing of theirs is left, the other user is whole
    for (user, want) in [(&s.forgotten, 0), (&s.reader, TOPICS.len() as i64)] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_summaries WHERE bot_name = $1 AND user_id = $2",
        )
        .bind(&s.bot)
        .bind(user)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        assert_eq!(n, want, "{user}");
    }
    let _ = std::fs::remove_dir_all(&copy);
}
