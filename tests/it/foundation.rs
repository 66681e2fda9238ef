//! Issue 3's foundation, proven on real services: the schema (empty database and an existing WhisperEngine
//! database with rows), `recap migrate` / `recap check` in plain words (including dead services and config errors,
//! never leaking a password), and idempotent JetStream stream/consumer creation.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;

// ------------------------------------------------------------------------------------------------ schema helpers

/// (column, data_type, max length, nullable, default) of `conversation_summaries`, in column order.
type Column = (String, String, Option<i32>, bool, Option<String>);

/// The raw information_schema row: name, data_type, udt_name, max length, is_nullable, default.
type ColumnRow = (String, String, String, Option<i32>, String, Option<String>);

async fn columns(pool: &PgPool) -> Vec<Column> {
    let rows: Vec<ColumnRow> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, udt_name::text, character_maximum_length::int,
                is_nullable::text, column_default::text
         FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = 'conversation_summaries'
         ORDER BY ordinal_position",
    )
    .fetch_all(pool)
    .await
    .expect("columns");
    rows.into_iter()
        .map(|(name, ty, udt, len, nullable, default)| {
            // ARRAY says nothing about the element type: `_text` is text[].
            let ty = if ty == "ARRAY" {
                format!("ARRAY {udt}")
            } else {
                ty
            };
            (name, ty, len, nullable == "YES", default)
        })
        .collect()
}

/// The columns exactly as ../shared/whisperengine-data.md describes them.
fn documented_columns() -> Vec<Column> {
    let c = |name: &str, ty: &str, len: Option<i32>, nullable: bool, default: Option<&str>| {
        (
            name.to_string(),
            ty.to_string(),
            len,
            nullable,
            default.map(str::to_string),
        )
    };
    let ts = "timestamp without time zone";
    vec![
        c(
            "id",
            "integer",
            None,
            false,
            Some("nextval('conversation_summaries_id_seq'::regclass)"),
        ),
        c("user_id", "character varying", Some(255), false, None),
        c("bot_name", "character varying", Some(100), false, None),
        c("summary_text", "text", None, false, None),
        c(
            "summary_type",
            "character varying",
            Some(50),
            true,
            Some("'time_window'::character varying"),
        ),
        c("start_timestamp", ts, None, false, None),
        c("end_timestamp", ts, None, false, None),
        c("message_count", "integer", None, false, None),
        c("key_topics", "ARRAY _text", None, true, None),
        c("emotional_tone", "character varying", Some(50), true, None),
        c("compression_ratio", "double precision", None, true, None),
        c(
            "confidence_score",
            "double precision",
            None,
            true,
            Some("0.5"),
        ),
        c(
            "enrichment_version",
            "character varying",
            Some(20),
            true,
            Some("'v1.0'::character varying"),
        ),
        c("created_at", ts, None, true, Some("now()")),
        c("updated_at", ts, None, true, Some("now()")),
    ]
}

/// (index name, access method, columns in order) on `conversation_summaries`.
async fn indexes(pool: &PgPool) -> Vec<(String, String, Vec<String>)> {
    sqlx::query_as(
        "SELECT i.relname::text, am.amname::text, array_agg(a.attname::text ORDER BY k.ord)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_am am ON am.oid = i.relam
         CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = 'conversation_summaries'::regclass
         GROUP BY i.relname, am.amname
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("indexes")
}

/// (constraint name, definition) on `conversation_summaries`.
async fn constraints(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'conversation_summaries'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("constraints")
}

async fn tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("tables")
}

/// Everything the migrations could change, as text: columns, constraints, indexes, tables, applied migrations.
async fn schema_snapshot(pool: &PgPool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    out.extend(columns(pool).await.iter().map(|c| format!("column {c:?}")));
    out.extend(
        constraints(pool)
            .await
            .iter()
            .map(|c| format!("constraint {c:?}")),
    );
    let defs: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY indexname",
    )
    .fetch_all(pool)
    .await
    .expect("index defs");
    out.extend(defs.into_iter().map(|d| format!("index {d}")));
    out.extend(tables(pool).await.into_iter().map(|t| format!("table {t}")));
    let applied: Vec<(i64, String, Vec<u8>, String)> = sqlx::query_as(
        "SELECT version, description, checksum, installed_on::text FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .expect("_sqlx_migrations");
    out.extend(applied.into_iter().map(|m| format!("migration {m:?}")));
    out
}

fn has_index(idx: &[(String, String, Vec<String>)], method: &str, cols: &[&str]) -> bool {
    idx.iter()
        .any(|(_, m, c)| m == method && c.iter().map(String::as_str).eq(cols.iter().copied()))
}

const RECAP_TABLES: &[&str] = &[
    "recap_windows",
    "recap_messages",
    "recap_watermarks",
    "recap_checkpoints",
    "recap_dead_letters",
    "recap_leader",
];

// ------------------------------------------------------------------------------------------------ migrations

#[tokio::test]
async fn migrations_create_the_documented_table_on_an_empty_database() {
    let _shared = common::shared().await;
    let db = fresh_db().await;
    assert!(
        tables(&db.pool).await.is_empty(),
        "fresh database is not empty"
    );
    recap::sink::MIGRATOR
        .run(&db.pool)
        .await
        .expect("migrations on an empty database");

    // Every documented column, in the documented order, with its exact type, nullability and default.
    let cols = columns(&db.pool).await;
    let documented = documented_columns();
    assert_eq!(
        &cols[..documented.len()],
        &documented[..],
        "conversation_summaries differs from the shared doc"
    );
    // Anything recap adds comes after, and is nullable or defaulted: the old worker's INSERTs keep working.
    for (name, ty, _, nullable, default) in &cols[documented.len()..] {
        assert!(
            *nullable || default.is_some(),
            "added column {name} {ty} is NOT NULL without a default: old writers would fail"
        );
    }
    assert!(
        cols.iter()
            .any(|c| c.0 == "revision" && c.4.as_deref() == Some("1")),
        "{cols:?}"
    );

    let cons = constraints(&db.pool).await;
    assert!(
        cons.contains(&(
            "uq_conversation_summaries_window".to_string(),
            "UNIQUE (user_id, bot_name, start_timestamp, end_timestamp)".to_string()
        )),
        "{cons:?}"
    );
    assert!(
        cons.iter().any(|(_, d)| d == "PRIMARY KEY (id)"),
        "{cons:?}"
    );

    let idx = indexes(&db.pool).await;
    for (method, cols) in [
        ("btree", &["user_id", "bot_name"][..]),
        ("btree", &["start_timestamp", "end_timestamp"][..]),
        ("btree", &["created_at"][..]),
        ("gin", &["key_topics"][..]),
    ] {
        assert!(
            has_index(&idx, method, cols),
            "no {method} index on {cols:?}: {idx:?}"
        );
    }

    let t = tables(&db.pool).await;
    for want in RECAP_TABLES {
        assert!(t.iter().any(|x| x == want), "{want} missing: {t:?}");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, recap::sink::MIGRATOR.iter().count());

    // The readers' query (the bots) works and the window constraint holds.
    let insert = "INSERT INTO conversation_summaries
        (user_id, bot_name, summary_text, start_timestamp, end_timestamp, message_count, key_topics)
        VALUES ('u1', 'elena', 's', '2026-11-20 10:00', '2026-11-20 11:00', 6, ARRAY['cats'])";
    sqlx::query(insert).execute(&db.pool).await.unwrap();
    let dup = sqlx::query(insert).execute(&db.pool).await.unwrap_err();
    assert!(
        dup.to_string().contains("uq_conversation_summaries_window"),
        "{dup}"
    );
    let (st, conf, ver, rev): (Option<String>, Option<f64>, Option<String>, i32) = sqlx::query_as(
        "SELECT summary_type, confidence_score, enrichment_version, revision FROM conversation_summaries
         WHERE user_id = 'u1' AND bot_name = 'elena' ORDER BY end_timestamp DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (st.as_deref(), conf, ver.as_deref(), rev),
        (Some("time_window"), Some(0.5), Some("v1.0"), 1)
    );
}

/// The table as WhisperEngine's Python enrichment worker created it (shared doc), with its own index names.
const OLD_WORKER_TABLE: &str = "
CREATE TABLE conversation_summaries (
    id SERIAL PRIMARY KEY,
    user_id VARCHAR(255) NOT NULL,
    bot_name VARCHAR(100) NOT NULL,
    summary_text TEXT NOT NULL,
    summary_type VARCHAR(50) DEFAULT 'time_window',
    start_timestamp TIMESTAMP NOT NULL,
    end_timestamp TIMESTAMP NOT NULL,
    message_count INTEGER NOT NULL,
    key_topics TEXT[],
    emotional_tone VARCHAR(50),
    compression_ratio FLOAT,
    confidence_score FLOAT DEFAULT 0.5,
    enrichment_version VARCHAR(20) DEFAULT 'v1.0',
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
    {CONSTRAINT}
);
CREATE INDEX idx_summaries_user_bot ON conversation_summaries (user_id, bot_name);
CREATE INDEX idx_summaries_time_range ON conversation_summaries (start_timestamp, end_timestamp);
CREATE INDEX idx_summaries_created ON conversation_summaries (created_at);
CREATE INDEX idx_summaries_topics ON conversation_summaries USING GIN (key_topics);
";

/// The old worker's placeholder rows (what production holds), with a few NULLs and odd values.
const OLD_WORKER_ROWS: &str = "
INSERT INTO conversation_summaries
    (user_id, bot_name, summary_text, summary_type, start_timestamp, end_timestamp, message_count, key_topics,
     emotional_tone, compression_ratio, confidence_score, enrichment_version, created_at, updated_at)
SELECT
    (100000000000000000 + g % 7)::text,
    (ARRAY['elena', 'marcus', 'dream_of_the_endless'])[1 + g % 3],
    'Summary of ' || g || ' messages: placeholder (LLM call was not awaited)',
    CASE WHEN g % 5 = 0 THEN 'daily' ELSE 'time_window' END,
    timestamp '2026-10-01 00:00:00' + g * interval '1 day' + g * interval '1.123456 second',
    timestamp '2026-10-01 00:00:00' + g * interval '1 day' + interval '23 hours',
    5 + g,
    CASE WHEN g % 4 = 0 THEN NULL ELSE ARRAY['topic ' || g, 'cats', 'work'] END,
    CASE WHEN g % 6 = 0 THEN NULL ELSE 'neutral' END,
    CASE WHEN g % 9 = 0 THEN NULL ELSE 1.0 / (g + 2) END,
    0.5 + (g % 5) / 10.0,
    'v1.0',
    timestamp '2026-11-01 12:00:00' + g * interval '1 minute',
    timestamp '2026-11-02 12:00:00' + g * interval '1 minute'
FROM generate_series(1, 50) AS g;
";

const OLD_COLUMNS: &str = "id, user_id, bot_name, summary_text, summary_type, start_timestamp, end_timestamp, \
    message_count, key_topics, emotional_tone, compression_ratio, confidence_score, enrichment_version, created_at, \
    updated_at";

/// Every old row, every old column, as Postgres prints the record (exact: timestamps to the microsecond, floats).
async fn old_rows(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ({OLD_COLUMNS})::text FROM conversation_summaries ORDER BY id"
    )))
    .fetch_all(pool)
    .await
    .expect("old rows")
}

async fn upgrade_existing(with_constraint: bool) {
    let db = fresh_db().await;
    let constraint = if with_constraint {
        ", CONSTRAINT uq_conversation_summaries_window UNIQUE (user_id, bot_name, start_timestamp, end_timestamp)"
    } else {
        ""
    };
    let ddl = OLD_WORKER_TABLE.replace("{CONSTRAINT}", constraint);
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&db.pool)
        .await
        .expect("old worker's table");
    sqlx::raw_sql(OLD_WORKER_ROWS)
        .execute(&db.pool)
        .await
        .expect("old rows");
    let before = old_rows(&db.pool).await;
    assert_eq!(before.len(), 50);
    let cols_before = columns(&db.pool).await;
    assert_eq!(
        cols_before,
        documented_columns(),
        "seed table as documented"
    );
    let idx_before = indexes(&db.pool).await;

    recap::sink::MIGRATOR
        .run(&db.pool)
        .await
        .expect("migrations on an existing database");

    // Every old row intact: same ids, same values in every old column.
    assert_eq!(old_rows(&db.pool).await, before);
    // Old columns unchanged (type, nullability, default); the old worker's indexes kept.
    let cols = columns(&db.pool).await;
    assert_eq!(&cols[..cols_before.len()], &cols_before[..]);
    let idx = indexes(&db.pool).await;
    for i in &idx_before {
        assert!(idx.contains(i), "index {i:?} lost: {idx:?}");
    }
    // New columns exist with their defaults on the old rows.
    let (n, rev1, summarizer_null): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE revision = 1), count(*) FILTER (WHERE summarizer IS NULL)
         FROM conversation_summaries",
    )
    .fetch_one(&db.pool)
    .await
    .expect("new columns");
    assert_eq!((n, rev1, summarizer_null), (50, 50, 50));
    // The window constraint is there either way (added when the old table lacked it).
    assert!(
        constraints(&db.pool)
            .await
            .iter()
            .any(|(name, _)| name == "uq_conversation_summaries_window")
    );
    let t = tables(&db.pool).await;
    for want in RECAP_TABLES {
        assert!(t.iter().any(|x| x == want), "{want} missing: {t:?}");
    }
    // The serial goes on after the old ids; the old worker's INSERT (no new columns) still works.
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, start_timestamp, end_timestamp,
            message_count) VALUES ('u', 'elena', 'x', '2027-01-01', '2027-01-02', 5) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("old-style insert");
    assert_eq!(id, 51);
    sqlx::query("DELETE FROM conversation_summaries WHERE id = 51")
        .execute(&db.pool)
        .await
        .unwrap();

    // A second run is a no-op: same schema, same applied migrations, same rows.
    let snap = schema_snapshot(&db.pool).await;
    let rows_after = old_rows(&db.pool).await;
    recap::sink::MIGRATOR
        .run(&db.pool)
        .await
        .expect("second migration run");
    assert_eq!(schema_snapshot(&db.pool).await, snap);
    assert_eq!(old_rows(&db.pool).await, rows_after);
    assert_eq!(rows_after, before);
    let dupes: Vec<_> = idx
        .iter()
        .filter(|(name, m, c)| {
            idx.iter()
                .any(|(n2, m2, c2)| n2 != name && m2 == m && c2 == c)
        })
        .map(|(n, _, _)| n.clone())
        .collect();
    if !dupes.is_empty() {
        eprintln!("note: indexes with identical columns after the upgrade: {dupes:?}");
    }
}

#[tokio::test]
async fn migrations_upgrade_the_old_workers_table_in_place() {
    let _shared = common::shared().await;
    upgrade_existing(true).await;
}

#[tokio::test]
async fn migrations_add_the_window_constraint_to_an_old_table_without_it() {
    let _shared = common::shared().await;
    upgrade_existing(false).await;
}

// ------------------------------------------------------------------------------------------------ the binary

/// A port nothing listens on: bound, then closed.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// The real services, a per-test NATS namespace whose stream exists, and a collection that maps to a bot.
struct CheckSetup {
    db: TestDb,
    nats: NatsNs,
    collection: String,
}

impl CheckSetup {
    async fn new() -> CheckSetup {
        let db = fresh_db().await;
        let nats = nats_ns();
        nats.ensure().await;
        let collection = format!("whisperengine_memory_chk{}", token());
        create_collection(&qdrant().await, &collection, true).await;
        CheckSetup {
            db,
            nats,
            collection,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.db.url.clone()),
            ("QDRANT_URL".into(), env("QDRANT_URL")),
            ("NATS_URL".into(), self.nats.url.clone()),
            ("NATS_STREAM".into(), self.nats.stream.clone()),
            ("NATS_CONSUMER".into(), self.nats.consumer.clone()),
            ("NATS_SUBJECT_PREFIX".into(), self.nats.prefix.clone()),
        ]
    }

    async fn cleanup(self) {
        let _ = qdrant().await.delete_collection(&self.collection).await;
        let js = async_nats::jetstream::new(
            async_nats::connect(&self.nats.url)
                .await
                .expect("nats connect"),
        );
        let _ = js.delete_stream(&self.nats.stream).await;
    }
}

fn with(mut envs: Vec<(String, String)>, k: &str, v: &str) -> Vec<(String, String)> {
    envs.retain(|(name, _)| name != k);
    envs.push((k.to_string(), v.to_string()));
    envs
}

fn without(mut envs: Vec<(String, String)>, k: &str) -> Vec<(String, String)> {
    envs.retain(|(name, _)| name != k);
    envs
}

/// The password inside a postgres:// URL.
fn url_password(url: &str) -> String {
    let (_, rest) = url.split_once("://").expect("url");
    let userinfo = rest.split('@').next().unwrap();
    userinfo
        .split_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap_or_default()
}

/// Runs `recap <args>`, asserts no secret leaks, returns (code, stdout, stderr, seconds).
fn recap(args: &[&str], envs: &[(String, String)], secrets: &[&str]) -> (i32, String, String, f64) {
    let t = Instant::now();
    let (code, out, err) = run_recap(args, envs);
    let secs = t.elapsed().as_secs_f64();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        assert!(
            !out.contains(s) && !err.contains(s),
            "a password leaked in `recap {}`:\nstdout:\n{out}\nstderr:\n{err}",
            args.join(" ")
        );
    }
    eprintln!(
        "recap {} -> exit {code} in {secs:.2}s\n{out}{err}",
        args.join(" ")
    );
    (code, out, err, secs)
}

/// The check lines as (ok, text).
fn check_lines(out: &str) -> Vec<(bool, String)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            if let Some(t) = l.strip_prefix("ok") {
                (true, t.trim().to_string())
            } else if let Some(t) = l.strip_prefix("FAIL") {
                (false, t.trim().to_string())
            } else {
                panic!(
                    "check line is neither ok nor FAIL (a library printing to stdout?): {l:?}\n{out}"
                )
            }
        })
        .collect()
}

fn lines_of<'a>(lines: &'a [(bool, String)], service: &str) -> Vec<&'a (bool, String)> {
    lines
        .iter()
        .filter(|(_, t)| t.starts_with(service))
        .collect()
}

#[tokio::test]
async fn migrate_then_check_reports_every_service_ok() {
    let _shared = common::shared().await;
    let s = CheckSetup::new().await;
    let pw = url_password(&s.db.url);
    let envs = s.env();
    let (code, _, _, _) = recap(&["migrate"], &envs, &[&pw]);
    assert_eq!(code, 0, "recap migrate failed");
    let (code, out, _, secs) = recap(&["check"], &envs, &[&pw]);
    let lines = check_lines(&out);
    assert_eq!(code, 0, "recap check failed:\n{out}");
    assert!(lines.iter().all(|(ok, _)| *ok), "{out}");
    for service in ["Postgres", "Qdrant", "NATS"] {
        assert!(
            !lines_of(&lines, service).is_empty(),
            "no line for {service}:\n{out}"
        );
    }
    assert!(out.contains("schema up to date"), "{out}");
    assert!(out.contains(&s.nats.stream), "{out}");
    assert!(secs < 10.0, "recap check took {secs:.1}s");
    s.cleanup().await;
}

/// Asserts that only `service`'s lines FAIL, that they say `connection refused` and name `var`.
fn assert_only_failing(out: &str, code: i32, service: &str, var: &str) {
    assert_ne!(code, 0, "recap check exited 0 with {service} down:\n{out}");
    let lines = check_lines(out);
    let failing: Vec<_> = lines.iter().filter(|(ok, _)| !ok).collect();
    assert!(!failing.is_empty(), "{out}");
    for (_, text) in &failing {
        assert!(
            text.starts_with(service),
            "a line other than {service}'s failed:\n{out}"
        );
        assert!(
            text.contains("connection refused"),
            "no plain cause:\n{out}"
        );
        assert!(text.contains(var), "{var} not named:\n{out}");
    }
    for other in ["Postgres", "Qdrant", "NATS"]
        .into_iter()
        .filter(|o| *o != service)
    {
        let ls = lines_of(&lines, other);
        assert!(
            !ls.is_empty() && ls.iter().all(|(ok, _)| *ok),
            "{other} should be ok:\n{out}"
        );
    }
}

#[tokio::test]
async fn check_names_a_dead_postgres_and_never_prints_its_password() {
    let _shared = common::shared().await;
    let s = CheckSetup::new().await;
    let envs = s.env();
    let port = dead_port();
    let secret = "Pg-s3cret-Hunter2";

    let url = format!("postgres://recap:{secret}@127.0.0.1:{port}/db");
    let (code, out, _, secs) = recap(
        &["check"],
        &with(envs.clone(), "DATABASE_URL", &url),
        &[secret],
    );
    assert_only_failing(&out, code, "Postgres", "DATABASE_URL");
    assert!(secs < 8.0, "took {secs:.1}s");

    // The same through the WhisperEngine variables.
    let pg_env = without(envs.clone(), "DATABASE_URL");
    let pg_env = [
        ("POSTGRES_HOST", "127.0.0.1".to_string()),
        ("POSTGRES_PORT", port.to_string()),
        ("POSTGRES_USER", "recap".to_string()),
        ("POSTGRES_DB", "whisperengine_db".to_string()),
        ("POSTGRES_PASSWORD", secret.to_string()),
    ]
    .iter()
    .fold(pg_env, |e, (k, v)| with(e, k, v));
    let (code, out, _, _) = recap(&["check"], &pg_env, &[secret]);
    assert_only_failing(&out, code, "Postgres", "POSTGRES_HOST");
    s.cleanup().await;
}

#[tokio::test]
async fn check_names_a_dead_qdrant() {
    let _shared = common::shared().await;
    let s = CheckSetup::new().await;
    let pw = url_password(&s.db.url);
    let mut envs = s.env();
    let (code, _, _, _) = recap(&["migrate"], &envs, &[&pw]);
    assert_eq!(code, 0);
    envs = with(
        envs,
        "QDRANT_URL",
        &format!("http://127.0.0.1:{}", dead_port()),
    );
    let (code, out, _, secs) = recap(&["check"], &envs, &[&pw]);
    assert_only_failing(&out, code, "Qdrant", "QDRANT_URL");
    assert!(secs < 8.0, "took {secs:.1}s");
    s.cleanup().await;
}

#[tokio::test]
async fn check_names_a_dead_nats() {
    let _shared = common::shared().await;
    let s = CheckSetup::new().await;
    let pw = url_password(&s.db.url);
    let mut envs = s.env();
    let (code, _, _, _) = recap(&["migrate"], &envs, &[&pw]);
    assert_eq!(code, 0);
    envs = with(
        envs,
        "NATS_URL",
        &format!("nats://127.0.0.1:{}", dead_port()),
    );
    let (code, out, _, secs) = recap(&["check"], &envs, &[&pw]);
    assert_only_failing(&out, code, "NATS", "NATS_URL");
    assert!(secs < 8.0, "took {secs:.1}s");
    s.cleanup().await;
}

#[test]
fn config_errors_are_one_line_naming_the_variable() {
    let _shared = common::shared_blocking();
    let secret = "Cfg-s3cret-Hunter2";
    let base = vec![
        (
            "DATABASE_URL".to_string(),
            format!("postgres://recap:{secret}@127.0.0.1:{}/db", dead_port()),
        ),
        ("POSTGRES_PASSWORD".to_string(), format!("{secret}-2")),
        ("QDRANT_URL".to_string(), "http://127.0.0.1:1".to_string()),
    ];
    let secret2 = format!("{secret}-2");
    for (var, value) in [
        ("IDLE_GAP_MINUTES", "abc"),
        ("QDRANT_URL", "ftp://x"),
        ("NATS_URL", "http://nats.example"),
        ("STREAM_MAX_AGE", "soon"),
    ] {
        let envs = with(base.clone(), var, value);
        let (code, out, err, secs) = recap(&["check"], &envs, &[secret, &secret2]);
        assert_ne!(code, 0, "{var}={value} accepted");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{var}={value}: not one line:\n{err}");
        assert!(lines[0].contains(var), "{var} not named: {}", lines[0]);
        assert!(out.trim().is_empty(), "{var}={value}: stdout {out:?}");
        assert!(secs < 3.0, "{var}={value}: {secs:.1}s");
    }
}

// ------------------------------------------------------------------------------------------------ JetStream

#[tokio::test]
async fn stream_and_consumer_creation_is_idempotent() {
    let _shared = common::shared().await;
    use async_nats::jetstream::{consumer::AckPolicy, stream::StorageType};
    use futures::StreamExt;

    let ns = nats_ns();
    let settings = ns.settings();
    let js = async_nats::jetstream::new(async_nats::connect(&ns.url).await.expect("connect"));

    let consumer = recap::source::nats::ensure_stream(&js, &settings)
        .await
        .expect("first ensure");
    let stream = js.get_stream(&ns.stream).await.expect("stream");
    let s1 = stream.get_info().await.expect("stream info");
    let c1 = consumer.get_info().await.expect("consumer info");

    // What nats/stream.json and nats/consumer.json say, with this namespace's names.
    let filter = format!("{}.>", ns.prefix);
    assert_eq!(s1.config.name, ns.stream);
    assert_eq!(s1.config.subjects, vec![filter.clone()]);
    assert_eq!(s1.config.storage, StorageType::File);
    assert_eq!(s1.config.max_age, Duration::from_secs(7 * 86_400));
    assert_eq!(s1.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(
        c1.config.durable_name.as_deref(),
        Some(ns.consumer.as_str())
    );
    assert_eq!(c1.config.ack_policy, AckPolicy::All);
    assert_eq!(c1.config.filter_subject, filter);

    // Messages in between; three delivered and acked (confirmed), so the consumer has a position.
    let items: Vec<_> = (0..5)
        .map(|i| {
            (
                format!("{}.elena", ns.prefix),
                Some(format!("p{i}")),
                format!(r#"{{"n":{i}}}"#).into_bytes(),
            )
        })
        .collect();
    assert_eq!(ns.publish_raw(&js, items).await, 5);
    let mut batch = consumer
        .fetch()
        .max_messages(3)
        .messages()
        .await
        .expect("fetch");
    let mut got = 0;
    while let Some(m) = batch.next().await {
        m.expect("message").double_ack().await.expect("ack");
        got += 1;
    }
    assert_eq!(got, 3);
    let mid_s = stream.get_info().await.unwrap();
    let mid_c = consumer.get_info().await.unwrap();

    // Second call: same config, same consumer (created time), same position.
    let consumer2 = recap::source::nats::ensure_stream(&js, &settings)
        .await
        .expect("second ensure");
    let s2 = stream.get_info().await.unwrap();
    let c2 = consumer2.get_info().await.unwrap();
    assert_eq!(s2.config, s1.config, "stream config changed");
    assert_eq!(s2.created, s1.created, "stream re-created");
    assert_eq!(c2.config, c1.config, "consumer config changed");
    assert_eq!(c2.created, c1.created, "consumer re-created");
    assert_eq!(s2.state.messages, 5);
    assert_eq!(s2.state.messages, mid_s.state.messages);
    assert_eq!(
        (
            c2.delivered.stream_sequence,
            c2.delivered.consumer_sequence,
            c2.ack_floor.stream_sequence,
            c2.num_pending,
            c2.num_ack_pending
        ),
        (
            mid_c.delivered.stream_sequence,
            mid_c.delivered.consumer_sequence,
            mid_c.ack_floor.stream_sequence,
            mid_c.num_pending,
            mid_c.num_ack_pending
        ),
        "consumer position moved"
    );
    assert_eq!(
        (
            c2.delivered.stream_sequence,
            c2.ack_floor.stream_sequence,
            c2.num_pending
        ),
        (3, 3, 2)
    );
    // And the next message delivered is the 4th, not the 1st again.
    let mut next = consumer2
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let m = next.next().await.expect("a message").expect("message");
    assert_eq!(m.info().expect("info").stream_sequence, 4);
    m.double_ack().await.expect("ack");

    js.delete_stream(&ns.stream).await.expect("delete stream");
}
