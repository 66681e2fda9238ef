//! Unit tests of the configuration (parsing, defaults, validation, redaction).
use std::net::SocketAddr;

use sqlx::postgres::PgSslMode;

use super::sweep::glob_match;
use super::*;
use clap::{CommandFactory, FromArgMatches, Parser};

#[derive(Parser, Debug)]
#[command(name = "recap")]
struct T {
    #[command(flatten)]
    c: Config,
}

/// The command with every `env` removed, so the process environment cannot leak in.
fn hermetic() -> clap::Command {
    T::command().mut_args(|a| a.env(None))
}

fn try_parse(args: &[&str]) -> Result<Config, clap::Error> {
    let argv = std::iter::once("recap").chain(args.iter().copied());
    let m = hermetic().try_get_matches_from(argv)?;
    let mut c = T::from_arg_matches(&m)?.c;
    c.normalize();
    Ok(c)
}

fn parse(args: &[&str]) -> Config {
    try_parse(args).unwrap_or_else(|e| panic!("parse {args:?}: {e}"))
}

fn invalid(args: &[&str]) -> ConfigError {
    parse(args)
        .validate()
        .expect_err(&format!("{args:?} should be invalid"))
}

#[test]
fn idle_gap_is_a_duration_and_idle_gap_minutes_still_works() {
    let c = parse(&["--idle-gap-minutes", "7"]);
    assert_eq!(c.tracker_config().idle_gap_ms, 7 * 60_000);
    let c = parse(&["--idle-gap", "45s", "--idle-gap-minutes", "7"]);
    assert_eq!(c.tracker_config().idle_gap_ms, 45_000, "IDLE_GAP wins");
    assert_eq!(c.idle_gap(), chrono::TimeDelta::seconds(45));
    assert_eq!(
        parse(&["--idle-gap", "1h 30m"])
            .tracker_config()
            .idle_gap_ms,
        90 * 60_000
    );
    assert!(parse(&["--idle-gap", "45s"]).validate().is_ok());
    let e = invalid(&["--idle-gap", "500ms"]);
    assert!(e.to_string().contains("IDLE_GAP"), "{e}");
    assert!(try_parse(&["--idle-gap", "soon"]).is_err());
}

#[test]
fn command_is_well_formed() {
    T::command().debug_assert();
    let help = T::command().render_long_help().to_string();
    assert!(help.contains("IDLE_GAP_MINUTES"));
    assert!(help.contains("OPENROUTER_API_KEY"));
}

#[test]
fn defaults_match_the_table() {
    let c = parse(&[]);
    assert_eq!(c.nats.nats_url, None);
    assert_eq!(c.nats.nats_stream, "RECAP");
    assert_eq!(c.nats.nats_consumer, "recap");
    assert_eq!(c.nats.nats_subject_prefix, "recap.stored");
    assert_eq!(c.nats.stream_max_age, Duration::from_secs(7 * 86_400));
    assert!(
        c.nats.nats_token.is_none() && c.nats.nats_user.is_none() && c.nats.nats_password.is_none()
    );
    assert!(
        c.nats.nats_creds_file.is_none()
            && c.nats.nats_nkey_seed.is_none()
            && c.nats.nats_tls_ca.is_none()
    );
    assert!(!c.nats.nats_tls_required);
    assert_eq!(c.nats.nats_ack_wait, None);
    assert_eq!(c.qdrant.qdrant_url, None);
    assert_eq!(c.qdrant.qdrant_host, "localhost");
    assert_eq!(c.qdrant.qdrant_port, 6333);
    assert_eq!(c.qdrant.qdrant_grpc_port, None);
    assert!(c.qdrant.qdrant_api_key.is_none());
    assert!(c.postgres.database_url.is_none());
    assert_eq!(c.postgres.postgres_host, "localhost");
    assert_eq!(c.postgres.postgres_port, 5432);
    assert_eq!(c.postgres.postgres_db, "whisperengine_db");
    assert_eq!(c.postgres.postgres_user, "postgres");
    assert!(c.postgres.postgres_password.is_none());
    assert_eq!(c.postgres.postgres_sslmode, None);
    assert_eq!(c.postgres.db_max_connections, 10);
    assert_eq!(c.llm.llm_base_url, "https://openrouter.ai/api/v1");
    assert_eq!(c.llm.llm_model, "anthropic/claude-sonnet-4.6");
    assert!(c.llm.openrouter_api_key.is_none() && c.llm.llm_api_key.is_none());
    assert_eq!(c.llm.summarizer, SummarizerChoice::Auto);
    assert_eq!(c.llm.llm_concurrency, 4);
    assert_eq!(c.llm.llm_requests_per_second, 5.0);
    assert_eq!(c.llm.llm_timeout, Duration::from_secs(60));
    assert_eq!(c.llm.llm_max_attempts, 5);
    assert_eq!(c.llm.llm_max_retries, 4);
    assert_eq!(c.llm.llm_max_input_tokens, 6000);
    assert_eq!(c.llm.llm_breaker_failures, 5);
    assert_eq!(c.llm.llm_breaker_cooldown, Duration::from_secs(30));
    assert_eq!(c.llm.llm_price_prompt_per_mtok, 3.0);
    assert_eq!(c.llm.llm_price_completion_per_mtok, 15.0);
    assert_eq!(c.llm.llm_daily_budget_usd, None);
    assert_eq!(c.llm.over_budget, OverBudget::Wait);
    assert_eq!(c.windows.window_mode, WindowMode::Session);
    assert_eq!(c.windows.idle_gap_minutes, 30);
    assert_eq!(c.windows.time_window_hours, 24);
    assert_eq!(c.windows.allowed_lateness_seconds, 120);
    assert_eq!(c.windows.min_messages_for_summary, 5);
    assert_eq!(c.sweep.enrichment_interval_seconds, 300);
    assert_eq!(c.sweep.enrichment_batch_size, 50);
    assert_eq!(c.sweep.lookback_days, 30);
    assert_eq!(c.sweep.sweep_page_size, 1000);
    assert_eq!(c.sweep.sweep_overlap_seconds, 600);
    assert_eq!(
        c.sweep.collection_patterns,
        vec!["whisperengine_memory_*", "chat_memories_*"]
    );
    assert!(c.sweep.collection_map.is_empty());
    assert!(!c.sweep.sweep_create_index);
    assert_eq!(c.payload.payload_user_field, "user_id");
    assert_eq!(c.payload.payload_content_field, "content");
    assert_eq!(c.payload.payload_role_field, "role");
    assert_eq!(c.payload.payload_memory_type_field, "memory_type");
    assert_eq!(c.payload.payload_timestamp_field, "timestamp");
    assert_eq!(c.payload.payload_timestamp_unix_field, "timestamp_unix");
    assert_eq!(c.payload.payload_emotion_field, "emotional_context");
    assert_eq!(c.payload.content_vector_name, "content");
    assert_eq!(c.payload.memory_types, vec!["conversation"]);
    assert_eq!(
        c.service.http_addr,
        "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.service.instance_id, None);
    assert_eq!(c.service.lease_seconds, 120);
    assert_eq!(c.service.leader_lease_seconds, 15);
    assert_eq!(c.service.shutdown_grace, Duration::from_secs(20));
    assert_eq!(c.service.log_format, LogFormat::Text);
    assert_eq!(c.service.ready_max_lag, 10_000);
    assert_eq!(c.service.ingest_batch_size, 500);
    assert_eq!(c.service.checkpoint_interval, Duration::from_secs(1));
    assert_eq!(c.service.checkpoint_messages, 50_000);
    assert_eq!(c.nats.nats_partitions, 1);
    assert_eq!(
        c.nats.nats_partition_by,
        crate::source::nats::PartitionBy::Bot
    );
    assert!(!c.service.rollups);
    assert_eq!(c.service.rollup_interval, Duration::from_secs(60));

    c.validate().expect("defaults are valid");
    assert!(!c.use_llm());
    assert_eq!(c.idle_gap(), chrono::TimeDelta::minutes(30));
    assert_eq!(c.time_window(), chrono::TimeDelta::hours(24));
    assert_eq!(c.allowed_lateness(), chrono::TimeDelta::seconds(120));
    assert_eq!(c.postgres_display(), "localhost:5432/whisperengine_db");
    assert!(c.nats_url_redacted().is_none());
}

#[test]
fn values_parse() {
    let c = parse(&[
        "--stream-max-age",
        "36h",
        "--llm-timeout",
        "90",
        "--summarizer",
        "extractive",
        "--window-mode",
        "tumbling",
        "--log-format",
        "json",
        "--over-budget",
        "extractive",
        "--nats-tls-required",
        "--sweep-create-index",
        "yes",
        "--collection-patterns",
        " a_* , ,b_* ",
        "--memory-types",
        "conversation,chat",
        "--collection-map",
        "x=elena, y = marcus",
        "--nats-url",
        " tls://u:pw@b:4222 ",
        "--http-addr",
        "0.0.0.0:8080",
        "--recall-token",
        "a-token",
    ]);
    assert_eq!(c.nats.stream_max_age, Duration::from_secs(36 * 3600));
    assert_eq!(c.llm.llm_timeout, Duration::from_secs(90));
    assert_eq!(c.llm.summarizer, SummarizerChoice::Extractive);
    assert_eq!(c.windows.window_mode, WindowMode::Tumbling);
    assert_eq!(c.service.log_format, LogFormat::Json);
    assert_eq!(c.llm.over_budget, OverBudget::Extractive);
    assert!(c.nats.nats_tls_required && c.sweep.sweep_create_index);
    assert_eq!(c.sweep.collection_patterns, vec!["a_*", "b_*"]);
    assert_eq!(c.payload.memory_types, vec!["conversation", "chat"]);
    assert_eq!(
        c.sweep.collection_map,
        vec![
            ("x".to_owned(), "elena".to_owned()),
            ("y".to_owned(), "marcus".to_owned())
        ]
    );
    assert_eq!(c.nats.nats_url.as_deref(), Some("tls://u:pw@b:4222"));
    assert_eq!(c.nats_url_redacted().as_deref(), Some("tls://u:***@b:4222"));
    c.validate().unwrap();
    assert_eq!(SummarizerChoice::Auto.to_string(), "auto");
    assert_eq!(WindowMode::Tumbling.to_string(), "tumbling");
}

#[test]
fn blank_values_count_as_unset() {
    let c = parse(&[
        "--nats-url",
        "",
        "--openrouter-api-key",
        " ",
        "--postgres-password",
        "",
        "--database-url",
        "",
        "--instance-id",
        "",
        "--collection-map",
        "",
        "--nats-creds-file",
        "",
    ]);
    assert!(c.nats.nats_url.is_none() && c.llm.openrouter_api_key.is_none());
    assert!(c.postgres.postgres_password.is_none() && c.postgres.database_url.is_none());
    assert!(c.service.instance_id.is_none() && c.nats.nats_creds_file.is_none());
    assert!(c.sweep.collection_map.is_empty());
    c.validate().unwrap();
    assert!(!c.use_llm());
}

#[test]
fn qdrant_grpc_url_rules() {
    assert_eq!(parse(&[]).qdrant_grpc_url(), "http://localhost:6334");
    assert_eq!(
        parse(&["--qdrant-host", "qdrant", "--qdrant-port", "6333"]).qdrant_grpc_url(),
        "http://qdrant:6334"
    );
    assert_eq!(
        parse(&["--qdrant-port", "7000"]).qdrant_grpc_url(),
        "http://localhost:7001"
    );
    assert_eq!(
        parse(&[
            "--qdrant-host",
            "q",
            "--qdrant-port",
            "6333",
            "--qdrant-grpc-port",
            "7334"
        ])
        .qdrant_grpc_url(),
        "http://q:7334"
    );
    assert_eq!(
        parse(&[
            "--qdrant-url",
            "https://x.cloud:6334",
            "--qdrant-grpc-port",
            "1",
            "--qdrant-host",
            "h"
        ])
        .qdrant_grpc_url(),
        "https://x.cloud:6334"
    );
    assert_eq!(
        parse(&["--qdrant-host", "::1"]).qdrant_grpc_url(),
        "http://[::1]:6334"
    );
}

#[test]
fn validation_errors_name_their_variable() {
    let cases: &[(&[&str], &str)] = &[
        (&["--idle-gap-minutes", "0"], "IDLE_GAP_MINUTES"),
        (&["--qdrant-url", "ftp://x"], "QDRANT_URL"),
        (&["--nats-url", "foo"], "NATS_URL"),
        (&["--nats-url", "nats://a:4222,nats://b:4222"], "NATS_URL"),
        (&["--llm-max-input-tokens", "10"], "LLM_MAX_INPUT_TOKENS"),
        (&["--summarizer", "llm"], "SUMMARIZER"),
        (&["--time-window-hours", "0"], "TIME_WINDOW_HOURS"),
        (&["--time-window-hours", "745"], "TIME_WINDOW_HOURS"),
        (
            &["--allowed-lateness-seconds", "86401"],
            "ALLOWED_LATENESS_SECONDS",
        ),
        (&["--collection-patterns", ""], "COLLECTION_PATTERNS"),
        (
            &["--collection-patterns", "exact_name"],
            "COLLECTION_PATTERNS",
        ),
        (&["--collection-map", "coll=bad.bot"], "COLLECTION_MAP"),
        (&["--collection-map", "coll=a,coll=b"], "COLLECTION_MAP"),
        (&["--database-url", "mysql://u:p@h/db"], "DATABASE_URL"),
        (&["--postgres-sslmode", "sometimes"], "POSTGRES_SSLMODE"),
        (
            &["--min-messages-for-summary", "0"],
            "MIN_MESSAGES_FOR_SUMMARY",
        ),
        (&["--context-summary-every", "1"], "CONTEXT_SUMMARY_EVERY"),
        (
            &["--context-summary-every", "100001"],
            "CONTEXT_SUMMARY_EVERY",
        ),
        (
            &["--enrichment-interval-seconds", "0"],
            "ENRICHMENT_INTERVAL_SECONDS",
        ),
        (&["--enrichment-batch-size", "0"], "ENRICHMENT_BATCH_SIZE"),
        (&["--lookback-days", "0"], "LOOKBACK_DAYS"),
        (&["--sweep-page-size", "0"], "SWEEP_PAGE_SIZE"),
        (&["--db-max-connections", "0"], "DB_MAX_CONNECTIONS"),
        (&["--llm-concurrency", "0"], "LLM_CONCURRENCY"),
        (
            &["--llm-requests-per-second", "0"],
            "LLM_REQUESTS_PER_SECOND",
        ),
        (&["--llm-timeout", "0s"], "LLM_TIMEOUT"),
        (&["--llm-max-attempts", "0"], "LLM_MAX_ATTEMPTS"),
        (&["--llm-breaker-failures", "0"], "LLM_BREAKER_FAILURES"),
        (&["--llm-daily-budget-usd=-1"], "LLM_DAILY_BUDGET_USD"),
        (
            &["--llm-price-prompt-per-mtok=-1"],
            "LLM_PRICE_PROMPT_PER_MTOK",
        ),
        (&["--llm-base-url", "openrouter.ai"], "LLM_BASE_URL"),
        (&["--nats-stream", "a.b"], "NATS_STREAM"),
        (&["--nats-consumer", "a b"], "NATS_CONSUMER"),
        (&["--nats-subject-prefix", "recap.*"], "NATS_SUBJECT_PREFIX"),
        (&["--stream-max-age", "1s"], "STREAM_MAX_AGE"),
        (&["--nats-ack-wait", "0s"], "NATS_ACK_WAIT"),
        (&["--nats-user", "u"], "NATS_USER"),
        (
            &["--nats-token", "t", "--nats-nkey-seed", "SUxyz"],
            "NATS_TOKEN",
        ),
        (
            &["--nats-creds-file", "/nonexistent/x.creds"],
            "NATS_CREDS_FILE",
        ),
        (&["--qdrant-host", "http://qdrant"], "QDRANT_HOST"),
        (&["--qdrant-port", "0"], "QDRANT_PORT"),
        (&["--qdrant-port", "65535"], "QDRANT_GRPC_PORT"),
        (&["--postgres-db", " "], "POSTGRES_DB"),
        (&["--payload-user-field", ""], "PAYLOAD_USER_FIELD"),
        (&["--memory-types", ""], "MEMORY_TYPES"),
        (&["--lease-seconds", "1"], "LEASE_SECONDS"),
        (&["--leader-lease-seconds", "0"], "LEADER_LEASE_SECONDS"),
        (&["--ingest-batch-size", "0"], "INGEST_BATCH_SIZE"),
        (&["--checkpoint-messages", "0"], "CHECKPOINT_MESSAGES"),
        (&["--checkpoint-interval", "0s"], "CHECKPOINT_INTERVAL"),
        (&["--nats-partitions", "0"], "NATS_PARTITIONS"),
        (&["--nats-partitions", "257"], "NATS_PARTITIONS"),
        (&["--console-token", "too-short"], "CONSOLE_TOKEN"),
    ];
    for (args, var) in cases {
        let e = invalid(args);
        let msg = e.to_string();
        assert_eq!(e.var(), *var, "{args:?}: {msg}");
        assert!(msg.contains(var), "{args:?}: {msg}");
        assert!(!msg.contains('\n'), "{args:?}: {msg}");
    }
    assert_eq!(
        invalid(&["--idle-gap-minutes", "0"]).to_string(),
        "IDLE_GAP_MINUTES must be at least 1 (set IDLE_GAP_MINUTES=30)"
    );
    assert_eq!(
        invalid(&["--qdrant-url", "ftp://x"]).to_string(),
        "QDRANT_URL \"ftp://x\" is not an http(s) URL (set QDRANT_URL=http://host:6334)"
    );
    assert!(
        invalid(&["--nats-url", "foo"])
            .to_string()
            .starts_with("NATS_URL \"foo\" is not a nats:// or tls:// URL")
    );
    assert!(
        invalid(&["--summarizer", "llm"])
            .to_string()
            .starts_with("SUMMARIZER=llm needs an API key (set LLM_API_KEY or OPENROUTER_API_KEY")
    );
    // With a key, SUMMARIZER=llm is fine.
    parse(&["--summarizer", "llm", "--openrouter-api-key", "k"])
        .validate()
        .unwrap();
}

#[test]
fn secrets_never_leak() {
    const PW: &str = "hunter2-Sup3rSecret";
    let url = format!("postgres://recap:{PW}@db.internal:5433/whisper?sslmode=require");
    let with_url = parse(&[
        "--database-url",
        &url,
        "--qdrant-api-key",
        PW,
        "--llm-api-key",
        PW,
        "--nats-url",
        &format!("nats://u:{PW}@n:4222"),
    ]);
    let with_pw = parse(&[
        "--postgres-password",
        PW,
        "--postgres-host",
        "pg",
        "--nats-token",
        PW,
        "--console-token",
        PW,
    ]);
    for c in [&with_url, &with_pw] {
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(PW), "{dbg}");
        assert!(!c.postgres_display().contains(PW));
        assert!(c.warnings().iter().all(|w| !w.contains(PW)));
    }
    assert_eq!(with_url.postgres_display(), "db.internal:5433/whisper");
    assert_eq!(with_pw.postgres_display(), "pg:5432/whisperengine_db");
    assert_eq!(
        with_url.database_url_redacted().unwrap(),
        "postgres://recap:***@db.internal:5433/whisper?sslmode=require"
    );
    assert!(format!("{with_url:?}").contains("postgres://recap:***@db.internal:5433/whisper"));
    with_url.validate().unwrap();
    with_pw.validate().unwrap();

    // Errors built while secrets are set.
    let errs = [
        invalid(&["--database-url", &url, "--postgres-sslmode", "bogus"]),
        invalid(&["--database-url", &format!("mysql://u:{PW}@h/db")]),
        invalid(&["--database-url", &format!("postgres://u:{PW}@h:99999/db")]),
        invalid(&[
            "--database-url",
            &format!("postgres://u:{PW}@h/db?sslmode={PW}"),
        ]),
        invalid(&[
            "--database-url",
            &format!("postgres://u:{PW}@h/db?password={PW}&port=x"),
        ]),
        invalid(&["--postgres-password", PW, "--postgres-sslmode", "bogus"]),
        invalid(&["--nats-url", &format!("ftp://u:{PW}@h")]),
        invalid(&["--nats-url", &format!("nats://{PW}@h:x")]),
        invalid(&["--qdrant-url", &format!("ftp://u:{PW}@h")]),
        invalid(&["--nats-password", PW]),
    ];
    for e in errs {
        assert!(!e.to_string().contains(PW), "{e}");
        assert!(!format!("{e:?}").contains(PW), "{e:?}");
    }
    let s = Secret::new(PW);
    assert_eq!(format!("{s}"), "***");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.expose(), PW);
    // --help never shows secret env values.
    let help = T::command().render_long_help().to_string();
    assert!(!help.contains(PW));
}

#[test]
fn pg_connect_options_from_both_sources() {
    let c = parse(&[
        "--postgres-host",
        "pg",
        "--postgres-port",
        "6543",
        "--postgres-db",
        "d",
        "--postgres-user",
        "u",
        "--postgres-password",
        "p",
        "--postgres-sslmode",
        "require",
    ]);
    let o = c.pg_connect_options().unwrap();
    assert_eq!(
        (
            o.get_host(),
            o.get_port(),
            o.get_database(),
            o.get_username()
        ),
        ("pg", 6543, Some("d"), "u")
    );
    assert!(matches!(o.get_ssl_mode(), PgSslMode::Require));
    assert_eq!(o.get_application_name(), Some("recap"));

    let c = parse(&[
        "--database-url",
        "postgresql://a:b@h:1234/x",
        "--postgres-sslmode",
        "verify-full",
        "--postgres-host",
        "ignored",
    ]);
    let o = c.pg_connect_options().unwrap();
    assert_eq!(
        (
            o.get_host(),
            o.get_port(),
            o.get_database(),
            o.get_username()
        ),
        ("h", 1234, Some("x"), "a")
    );
    assert!(matches!(o.get_ssl_mode(), PgSslMode::VerifyFull));
    // sslmode in the URL wins over POSTGRES_SSLMODE.
    let c = parse(&[
        "--database-url",
        "postgres://a@h/x?sslmode=disable",
        "--postgres-sslmode",
        "require",
    ]);
    assert!(matches!(
        c.pg_connect_options().unwrap().get_ssl_mode(),
        PgSslMode::Disable
    ));
    assert_eq!(c.postgres_display(), "h:5432/x");
    assert_eq!(
        c.database_url_redacted().unwrap(),
        "postgres://a@h/x?sslmode=disable"
    );
}

#[test]
fn bots_from_collection_names() {
    let c = parse(&[]);
    assert_eq!(
        c.bot_for_collection("whisperengine_memory_elena_7d")
            .as_deref(),
        Some("elena")
    );
    assert_eq!(
        c.bot_for_collection("whisperengine_memory_elena")
            .as_deref(),
        Some("elena")
    );
    assert_eq!(
        c.bot_for_collection("chat_memories_marcus").as_deref(),
        Some("marcus")
    );
    assert_eq!(
        c.bot_for_collection("whisperengine_memory_dream_of_the_endless")
            .as_deref(),
        Some("dream_of_the_endless")
    );
    assert_eq!(c.bot_for_collection("other_thing"), None);
    assert_eq!(c.bot_for_collection("whisperengine_memory_"), None);
    assert_eq!(c.bot_for_collection("whisperengine_memory__7d"), None);
    assert_eq!(c.bot_for_collection("whisperengine_memory_el.na"), None);
    assert_eq!(c.bot_for_collection("xwhisperengine_memory_elena"), None);

    let c = parse(&[
        "--collection-map",
        "whisperengine_memory_elena_7d=elena2,legacy=gabriel",
        "--collection-patterns",
        "whisperengine_memory_*,bot_*_mem",
    ]);
    c.validate().unwrap();
    assert_eq!(
        c.bot_for_collection("whisperengine_memory_elena_7d")
            .as_deref(),
        Some("elena2")
    );
    assert_eq!(
        c.bot_for_collection("whisperengine_memory_elena")
            .as_deref(),
        Some("elena")
    );
    assert_eq!(c.bot_for_collection("legacy").as_deref(), Some("gabriel"));
    assert_eq!(
        c.bot_for_collection("bot_jake_mem").as_deref(),
        Some("jake")
    );
    assert_eq!(c.bot_for_collection("chat_memories_marcus"), None);

    assert!(glob_match("a*b*c", "axxbyyc") && glob_match("*", "") && !glob_match("a*", "ba"));
}

#[test]
fn clap_errors_become_one_line_naming_the_env_var() {
    let cmd = T::command();
    let e = try_parse(&["--idle-gap-minutes", "abc"]).unwrap_err();
    assert_eq!(
        one_line_clap_error(&e, &cmd),
        "invalid value \"abc\" for IDLE_GAP_MINUTES (--idle-gap-minutes): invalid digit found in string"
    );
    let e = try_parse(&["--summarizer", "gpt"]).unwrap_err();
    assert_eq!(
        one_line_clap_error(&e, &cmd),
        "invalid value \"gpt\" for SUMMARIZER (--summarizer): expected one of auto, llm, extractive"
    );
    let e = try_parse(&["--nats-partition-by", "team"]).unwrap_err();
    assert_eq!(
        one_line_clap_error(&e, &cmd),
        "invalid value \"team\" for NATS_PARTITION_BY (--nats-partition-by): expected one of bot, user"
    );
    assert_eq!(
        parse(&["--nats-partition-by", "user"])
            .nats
            .nats_partition_by,
        crate::source::nats::PartitionBy::User
    );
    let e = try_parse(&["--stream-max-age", "soon"]).unwrap_err();
    let line = one_line_clap_error(&e, &cmd);
    assert!(
        line.starts_with("invalid value \"soon\" for STREAM_MAX_AGE (--stream-max-age): "),
        "{line}"
    );
    let e = try_parse(&["--nats-tls-required=maybe"]).unwrap_err();
    assert!(one_line_clap_error(&e, &cmd).contains("NATS_TLS_REQUIRED (--nats-tls-required)"));
    let e = try_parse(&["--collection-map", "nobot"]).unwrap_err();
    assert!(
        one_line_clap_error(&e, &cmd)
            .contains("COLLECTION_MAP (--collection-map): expected collection=bot")
    );
    let e = try_parse(&["--qdrant-port", "70000"]).unwrap_err();
    let line = one_line_clap_error(&e, &cmd);
    assert!(
        line.starts_with("invalid value \"70000\" for QDRANT_PORT (--qdrant-port): "),
        "{line}"
    );
    let e = try_parse(&["--no-such-flag"]).unwrap_err();
    let line = one_line_clap_error(&e, &cmd);
    assert!(
        line.starts_with("unexpected argument '--no-such-flag'"),
        "{line}"
    );
    {
        let e = e;
        assert!(!one_line_clap_error(&e, &cmd).contains('\n'));
    }

    // Flattened into a subcommand, as main.rs does.
    #[derive(Parser, Debug)]
    enum Cli {
        Run {
            #[command(flatten)]
            c: Config,
        },
    }
    let sub = Cli::command();
    let e = sub
        .clone()
        .mut_subcommand("run", |s| s.mut_args(|a| a.env(None)))
        .try_get_matches_from(["recap", "run", "--time-window-hours=-3"])
        .unwrap_err();
    assert_eq!(
        one_line_clap_error(&e, &sub),
        "invalid value \"-3\" for TIME_WINDOW_HOURS (--time-window-hours): -3 is not in 0..=4294967295"
    );
}

#[test]
fn adapters_for_other_modules() {
    let c = parse(&[
        "--window-mode",
        "tumbling",
        "--idle-gap-minutes",
        "10",
        "--time-window-hours",
        "2",
        "--allowed-lateness-seconds",
        "5",
        "--nats-url",
        "nats://n:4222",
        "--nats-token",
        "t",
        "--payload-role-field",
        "source",
        "--memory-types",
        "conversation,chat",
    ]);
    let t = c.tracker_config();
    assert!(matches!(t.mode, crate::tracker::Mode::Tumbling));
    assert_eq!(
        (t.idle_gap_ms, t.max_span_ms, t.lateness_ms),
        (600_000, 7_200_000, 5_000)
    );
    let n = c.nats_settings();
    assert_eq!(
        (n.url.as_str(), n.stream.as_str(), n.consumer.as_str()),
        ("nats://n:4222", "RECAP", "recap")
    );
    assert_eq!(
        (n.token.as_deref(), n.batch_size, n.max_age),
        (Some("t"), 500, Duration::from_secs(7 * 86_400))
    );
    assert!(n.ack_wait.is_zero());
    let m = c.payload_mapping();
    assert_eq!(
        (m.role.as_str(), m.memory_types.len(), m.emotion.as_str()),
        ("source", 2, "emotional_context")
    );
    assert_eq!(m.timestamp_unix, "timestamp_unix");
}

#[test]
fn llm_key_and_instance_id() {
    let c = parse(&["--openrouter-api-key", "or", "--llm-api-key", "direct"]);
    assert_eq!(c.llm_api_key().unwrap().expose(), "direct");
    assert!(c.use_llm());
    let c = parse(&["--openrouter-api-key", "or"]);
    assert_eq!(c.llm_api_key().unwrap().expose(), "or");
    assert!(!parse(&["--openrouter-api-key", "or", "--summarizer", "extractive"]).use_llm());

    let id = parse(&[]).instance_id();
    assert!(id.ends_with(&format!(":{}", std::process::id())), "{id}");
    assert_eq!(
        parse(&["--instance-id", "recap-0"]).instance_id(),
        "recap-0"
    );
}

#[test]
fn warnings_point_at_likely_mistakes() {
    let w = parse(&["--qdrant-url", "http://q:6333"])
        .warnings()
        .join("\n");
    assert!(
        w.contains("6333") && w.contains("NATS_URL is not set"),
        "{w}"
    );
    assert!(
        parse(&["--nats-url", "nats://n:4222", "--openrouter-api-key", "k"])
            .warnings()
            .is_empty()
    );
}

#[test]
fn default_instance_id_is_the_host_name_and_pid() {
    let id = parse(&[]).instance_id();
    let host = whoami::hostname().expect("gethostname");
    assert_eq!(id, format!("{}:{}", host.trim(), std::process::id()));
    assert!(!id.starts_with("unknown-host"), "{id}");
}

#[test]
fn redaction_helpers() {
    assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
    assert_eq!(redact_url("nats://u:p@h:4222"), "nats://u:***@h:4222");
    assert_eq!(redact_url("postgres://u:p/w@h/db"), "postgres://u:***@h/db");
    assert_eq!(
        redact_url("postgres://h/db?user=u&password=x"),
        "postgres://h/db?user=u&password=***"
    );
    assert_eq!(redact_url("plain"), "plain");
    assert_eq!(redact_url("u:p@h"), "***");
}

#[test]
fn url_settings_parse_as_their_clients_do_and_print_masked() {
    // NATS_URL: what async-nats' ServerAddr accepts, one server, the scheme written out.
    for ok in [
        "nats://h:4222",
        "tls://u:p@h:4222",
        "ws://h:80",
        "wss://h",
        "nats://[::1]:4222",
    ] {
        parse(&["--nats-url", ok])
            .validate()
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "h:4222",
        "http://h:4222",
        "nats://",
        "nats://h:0",
        "nats://h:99999",
    ] {
        assert_eq!(invalid(&["--nats-url", bad]).var(), "NATS_URL", "{bad}");
    }
    // RedactedUrl: Debug and Display mask, the raw text is there for the client.
    let u: RedactedUrl = "nats://u:pw@h:4222".parse().unwrap();
    assert_eq!(format!("{u}"), "nats://u:***@h:4222");
    assert_eq!(format!("{u:?}"), "\"nats://u:***@h:4222\"");
    assert_eq!(u.expose(), "nats://u:pw@h:4222");
    let plain: RedactedUrl = "https://openrouter.ai/api/v1".parse().unwrap();
    assert_eq!(
        plain.to_string(),
        "https://openrouter.ai/api/v1",
        "nothing to mask: unchanged"
    );
    let c = parse(&["--qdrant-url", "https://k:s3cr3t-key@q.cloud:6334"]);
    assert!(!format!("{c:?}").contains("s3cr3t-key"));
}
