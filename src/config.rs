//! recap's configuration: one typed [`Config`] built by clap from command-line flags and
//! environment variables, checked once at start by [`Config::validate`].
//!
//! Every setting has a flag (`--idle-gap-minutes`) and an environment variable
//! (`IDLE_GAP_MINUTES`); a flag wins over the variable. The variables WhisperEngine operators
//! already set (`QDRANT_HOST`, `QDRANT_PORT`, `POSTGRES_*`, `ENRICHMENT_INTERVAL_SECONDS`,
//! `ENRICHMENT_BATCH_SIZE`, `LLM_MODEL`, `OPENROUTER_API_KEY`, `MIN_MESSAGES_FOR_SUMMARY`,
//! `TIME_WINDOW_HOURS`, `LOOKBACK_DAYS`) keep their meaning and defaults.
//!
//! Suggested start-up sequence (main.rs):
//!
//! ```ignore
//! let cli = Cli::try_parse().unwrap_or_else(|e| match e.kind() {
//!     clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => e.exit(),
//!     _ => { eprintln!("recap: {}", config::one_line_clap_error(&e, &Cli::command())); std::process::exit(2) }
//! });
//! let mut cfg = cli.config;
//! cfg.normalize();            // empty variables (`NATS_URL=`) count as unset
//! cfg.validate()?;            // one line naming the variable to fix
//! for w in cfg.warnings() { tracing::warn!("{w}") }
//! ```
//!
//! Secrets ([`Secret`], the password in `DATABASE_URL`, credentials inside `NATS_URL`) never
//! appear in `Debug` output, in `--help` (their environment values are hidden), or in a
//! [`ConfigError`].

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

// ---------------------------------------------------------------------------------------------
// Secret
// ---------------------------------------------------------------------------------------------

/// A string that must never be printed: `Debug` and `Display` both show `***`.
/// Read the value with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is empty or only whitespace (e.g. `OPENROUTER_API_KEY=` in a
    /// compose file); such a secret counts as unset.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

/// Which summarizer produces summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SummarizerChoice {
    /// The LLM when an API key is set, else the extractive summarizer.
    Auto,
    /// Always the LLM (an API key is required).
    Llm,
    /// Always the local extractive summarizer (no network, no cost).
    Extractive,
}

/// What to do when the daily LLM budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverBudget {
    /// Hold windows until the budget resets (next UTC day).
    Wait,
    /// Summarize with the extractive summarizer instead.
    Extractive,
}

/// How messages are grouped into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WindowMode {
    /// A window closes after IDLE_GAP_MINUTES without messages (capped at TIME_WINDOW_HOURS).
    Session,
    /// Fixed windows of TIME_WINDOW_HOURS aligned to UTC midnight.
    Tumbling,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

macro_rules! display_via_value_enum {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let v = clap::ValueEnum::to_possible_value(self).expect("no skipped variants");
                f.write_str(v.get_name())
            }
        }
    )*};
}
display_via_value_enum!(SummarizerChoice, OverBudget, WindowMode, LogFormat);

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration problem, as one line that names the variable and what to set.
/// The message never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value recap cannot use.
    #[error("{message}")]
    Invalid {
        /// The environment variable at fault (e.g. `IDLE_GAP_MINUTES`).
        var: &'static str,
        /// One line: what is wrong and what to set.
        message: String,
    },
}

impl ConfigError {
    fn invalid(var: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var,
            message: message.into(),
        }
    }

    /// The environment variable this error is about.
    pub fn var(&self) -> &'static str {
        match self {
            ConfigError::Invalid { var, .. } => var,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value parsers
// ---------------------------------------------------------------------------------------------

/// humantime durations ("30s", "5m", "36h", "7d", "1h 30m"); a bare number means seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 5m, 36h, 7d)"))
}

fn parse_trimmed(s: &str) -> Result<String, Infallible> {
    Ok(s.trim().to_owned())
}

/// Paths; an empty value is accepted here (and dropped by `normalize`) so `NATS_TLS_CA=` means unset.
fn parse_path(s: &str) -> Result<PathBuf, Infallible> {
    Ok(PathBuf::from(s.trim()))
}

fn parse_map_entry(s: &str) -> Result<(String, String), String> {
    let s = s.trim();
    if s.is_empty() {
        // `COLLECTION_MAP=` (empty) — dropped by `normalize`, ignored elsewhere.
        return Ok((String::new(), String::new()));
    }
    match s.split_once('=') {
        Some((c, b)) => Ok((c.trim().to_owned(), b.trim().to_owned())),
        None => Err(format!("expected collection=bot, got {s:?}")),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "no" | "n" | "off" | "" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

const H_NATS: &str = "NATS";
const H_QDRANT: &str = "Qdrant";
const H_PG: &str = "PostgreSQL";
const H_LLM: &str = "LLM";
const H_WIN: &str = "Windows";
const H_SWEEP: &str = "Sweep";
const H_PAYLOAD: &str = "Qdrant payload mapping";
const H_SVC: &str = "Service";

// The doc text is rustdoc-only: clap would otherwise show it as the `about` of any command
// that flattens Config without a doc comment of its own.
#[cfg_attr(
    doc,
    doc = "All of recap's settings (flattened into each subcommand). Parse with clap, then call \
           [`Config::normalize`] and [`Config::validate`]."
)]
#[derive(clap::Args, Clone)]
pub struct Config {
    // ----- NATS -----
    /// NATS server URL (nats://host:4222 or tls://host:4222). Unset: no event stream, recap runs
    /// sweep-only
    #[arg(long, env = "NATS_URL", hide_env_values = true, help_heading = H_NATS)]
    pub nats_url: Option<String>,

    /// JetStream stream recap reads "stored" events from (created if missing)
    #[arg(long, env = "NATS_STREAM", default_value = "RECAP", help_heading = H_NATS)]
    pub nats_stream: String,

    /// Durable consumer name on that stream (shared by all recap instances)
    #[arg(long, env = "NATS_CONSUMER", default_value = "recap", help_heading = H_NATS)]
    pub nats_consumer: String,

    /// Subject prefix of "message stored" events (`<prefix>.<bot>...`)
    #[arg(long, env = "NATS_SUBJECT_PREFIX", default_value = "recap.stored", help_heading = H_NATS)]
    pub nats_subject_prefix: String,

    /// Maximum age of events kept in the stream (e.g. 7d, 36h)
    #[arg(long, env = "STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration, help_heading = H_NATS)]
    pub stream_max_age: Duration,

    /// How long JetStream waits for recap's ack before redelivering (e.g. 30s); unset keeps nats/consumer.json
    #[arg(long, env = "NATS_ACK_WAIT", value_parser = parse_duration, help_heading = H_NATS)]
    pub nats_ack_wait: Option<Duration>,

    /// NATS auth token
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, help_heading = H_NATS)]
    pub nats_token: Option<Secret>,

    /// NATS user name (with NATS_PASSWORD)
    #[arg(long, env = "NATS_USER", help_heading = H_NATS)]
    pub nats_user: Option<String>,

    /// NATS password (with NATS_USER)
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, help_heading = H_NATS)]
    pub nats_password: Option<Secret>,

    /// NATS credentials file (.creds: JWT + nkey seed)
    #[arg(long, env = "NATS_CREDS_FILE", value_parser = parse_path, help_heading = H_NATS)]
    pub nats_creds_file: Option<PathBuf>,

    /// NATS nkey seed (SU...)
    #[arg(long, env = "NATS_NKEY_SEED", hide_env_values = true, help_heading = H_NATS)]
    pub nats_nkey_seed: Option<Secret>,

    /// PEM file of the CA that signed the NATS server certificate
    #[arg(long, env = "NATS_TLS_CA", value_parser = parse_path, help_heading = H_NATS)]
    pub nats_tls_ca: Option<PathBuf>,

    /// Require TLS to NATS even for nats:// URLs (true/false)
    #[arg(long, env = "NATS_TLS_REQUIRED", action = clap::ArgAction::Set, value_parser = parse_bool, default_missing_value = "true", num_args = 0..=1, default_value = "false", help_heading = H_NATS)]
    pub nats_tls_required: bool,

    // ----- Qdrant -----
    /// Qdrant gRPC endpoint, e.g. http://qdrant:6334. Wins over QDRANT_HOST/QDRANT_PORT/QDRANT_GRPC_PORT
    #[arg(long, env = "QDRANT_URL", help_heading = H_QDRANT)]
    pub qdrant_url: Option<String>,

    /// Qdrant host name (used when QDRANT_URL is unset)
    #[arg(long, env = "QDRANT_HOST", default_value = "localhost", help_heading = H_QDRANT)]
    pub qdrant_host: String,

    /// Qdrant REST port, as WhisperEngine sets it. recap speaks gRPC: unless QDRANT_GRPC_PORT is
    /// set it uses 6334 when this is 6333, else this port + 1
    #[arg(long, env = "QDRANT_PORT", default_value_t = 6333, help_heading = H_QDRANT)]
    pub qdrant_port: u16,

    /// Qdrant gRPC port (default: derived from QDRANT_PORT, see there)
    #[arg(long, env = "QDRANT_GRPC_PORT", help_heading = H_QDRANT)]
    pub qdrant_grpc_port: Option<u16>,

    /// Qdrant API key
    #[arg(long, env = "QDRANT_API_KEY", hide_env_values = true, help_heading = H_QDRANT)]
    pub qdrant_api_key: Option<Secret>,

    // ----- Postgres -----
    /// PostgreSQL URL (postgres://user:password@host:5432/db?sslmode=require). When set, the
    /// POSTGRES_HOST/PORT/DB/USER/PASSWORD settings are ignored
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, help_heading = H_PG)]
    pub database_url: Option<Secret>,

    /// PostgreSQL host (or a Unix socket directory starting with /)
    #[arg(long, env = "POSTGRES_HOST", default_value = "localhost", help_heading = H_PG)]
    pub postgres_host: String,

    /// PostgreSQL port
    #[arg(long, env = "POSTGRES_PORT", default_value_t = 5432, help_heading = H_PG)]
    pub postgres_port: u16,

    /// PostgreSQL database holding conversation_summaries
    #[arg(long, env = "POSTGRES_DB", default_value = "whisperengine_db", help_heading = H_PG)]
    pub postgres_db: String,

    /// PostgreSQL user (default as in WhisperEngine's enrichment worker)
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres", help_heading = H_PG)]
    pub postgres_user: String,

    /// PostgreSQL password (unset or empty: none, or ~/.pgpass / PGPASSWORD)
    #[arg(long, env = "POSTGRES_PASSWORD", hide_env_values = true, help_heading = H_PG)]
    pub postgres_password: Option<Secret>,

    /// TLS mode: disable, allow, prefer, require, verify-ca, verify-full (default: prefer, or
    /// the sslmode in DATABASE_URL)
    #[arg(long, env = "POSTGRES_SSLMODE", help_heading = H_PG)]
    pub postgres_sslmode: Option<String>,

    /// Maximum PostgreSQL connections per instance
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10, help_heading = H_PG)]
    pub db_max_connections: u32,

    // ----- LLM -----
    /// OpenAI-compatible API base URL
    #[arg(long, env = "LLM_BASE_URL", default_value = "https://openrouter.ai/api/v1", help_heading = H_LLM)]
    pub llm_base_url: String,

    /// Model name sent to the API
    #[arg(long, env = "LLM_MODEL", default_value = "anthropic/claude-sonnet-4.6", help_heading = H_LLM)]
    pub llm_model: String,

    /// OpenRouter API key (used when LLM_API_KEY is unset)
    #[arg(long, env = "OPENROUTER_API_KEY", hide_env_values = true, help_heading = H_LLM)]
    pub openrouter_api_key: Option<Secret>,

    /// API key for LLM_BASE_URL (wins over OPENROUTER_API_KEY)
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true, help_heading = H_LLM)]
    pub llm_api_key: Option<Secret>,

    /// Summarizer: auto (LLM when an API key is set, else extractive), llm, extractive
    #[arg(long, env = "SUMMARIZER", value_enum, ignore_case = true, default_value = "auto", help_heading = H_LLM)]
    pub summarizer: SummarizerChoice,

    /// Concurrent LLM calls per instance
    #[arg(long, env = "LLM_CONCURRENCY", default_value_t = 4, help_heading = H_LLM)]
    pub llm_concurrency: usize,

    /// LLM request rate limit per instance (requests per second, may be fractional)
    #[arg(long, env = "LLM_REQUESTS_PER_SECOND", default_value_t = 5.0, help_heading = H_LLM)]
    pub llm_requests_per_second: f64,

    /// Timeout of one LLM call (e.g. 60s, 2m)
    #[arg(long, env = "LLM_TIMEOUT", default_value = "60s", value_parser = parse_duration, help_heading = H_LLM)]
    pub llm_timeout: Duration,

    /// Attempts per window before it is dead-lettered
    #[arg(long, env = "LLM_MAX_ATTEMPTS", default_value_t = 5, help_heading = H_LLM)]
    pub llm_max_attempts: u32,

    /// Retries of one LLM call on transient errors (429, 5xx, timeouts)
    #[arg(long, env = "LLM_MAX_RETRIES", default_value_t = 4, help_heading = H_LLM)]
    pub llm_max_retries: usize,

    /// Maximum prompt size in tokens; longer windows are condensed first
    #[arg(long, env = "LLM_MAX_INPUT_TOKENS", default_value_t = 6000, help_heading = H_LLM)]
    pub llm_max_input_tokens: usize,

    /// Consecutive failed calls that open the circuit breaker
    #[arg(long, env = "LLM_BREAKER_FAILURES", default_value_t = 5, help_heading = H_LLM)]
    pub llm_breaker_failures: u32,

    /// How long the open breaker blocks calls (e.g. 30s)
    #[arg(long, env = "LLM_BREAKER_COOLDOWN", default_value = "30s", value_parser = parse_duration, help_heading = H_LLM)]
    pub llm_breaker_cooldown: Duration,

    /// Price of prompt tokens, USD per million (for cost metrics and the budget)
    #[arg(long, env = "LLM_PRICE_PROMPT_PER_MTOK", default_value_t = 3.0, help_heading = H_LLM)]
    pub llm_price_prompt_per_mtok: f64,

    /// Price of completion tokens, USD per million
    #[arg(long, env = "LLM_PRICE_COMPLETION_PER_MTOK", default_value_t = 15.0, help_heading = H_LLM)]
    pub llm_price_completion_per_mtok: f64,

    /// Daily LLM spending limit in USD (UTC day, across instances). Unset: no limit
    #[arg(long, env = "LLM_DAILY_BUDGET_USD", help_heading = H_LLM)]
    pub llm_daily_budget_usd: Option<f64>,

    /// When the budget is spent: wait (hold windows until tomorrow) or extractive
    #[arg(long, env = "OVER_BUDGET", value_enum, ignore_case = true, default_value = "wait", help_heading = H_LLM)]
    pub over_budget: OverBudget,

    // ----- Windows -----
    /// Window mode: session (closed by an idle gap) or tumbling (fixed TIME_WINDOW_HOURS)
    #[arg(long, env = "WINDOW_MODE", value_enum, ignore_case = true, default_value = "session", help_heading = H_WIN)]
    pub window_mode: WindowMode,

    /// Session mode: minutes of silence that close a window
    #[arg(long, env = "IDLE_GAP_MINUTES", default_value_t = 30, help_heading = H_WIN)]
    pub idle_gap_minutes: u32,

    /// Session mode: silence that closes a window, as a duration (e.g. 45s, 30m); wins over IDLE_GAP_MINUTES
    #[arg(long, env = "IDLE_GAP", value_parser = parse_duration, help_heading = H_WIN)]
    pub idle_gap: Option<Duration>,

    /// Window length in tumbling mode; longest window in session mode (hours, 1..=744)
    #[arg(long, env = "TIME_WINDOW_HOURS", default_value_t = 24, help_heading = H_WIN)]
    pub time_window_hours: u32,

    /// How late a message may arrive and still join its window (seconds, at most 86400)
    #[arg(long, env = "ALLOWED_LATENESS_SECONDS", default_value_t = 120, help_heading = H_WIN)]
    pub allowed_lateness_seconds: u32,

    /// Windows with fewer messages are not summarized
    #[arg(long, env = "MIN_MESSAGES_FOR_SUMMARY", default_value_t = 5, help_heading = H_WIN)]
    pub min_messages_for_summary: u32,

    // ----- Sweep -----
    /// Seconds between sweeps of Qdrant (and rounds of window claiming)
    #[arg(long, env = "ENRICHMENT_INTERVAL_SECONDS", default_value_t = 300, help_heading = H_SWEEP)]
    pub enrichment_interval_seconds: u64,

    /// Windows claimed per round
    #[arg(long, env = "ENRICHMENT_BATCH_SIZE", default_value_t = 50, help_heading = H_SWEEP)]
    pub enrichment_batch_size: u32,

    /// How far back the first sweep of a collection reads (days)
    #[arg(long, env = "LOOKBACK_DAYS", default_value_t = 30, help_heading = H_SWEEP)]
    pub lookback_days: u32,

    /// Points per Qdrant scroll page
    #[arg(long, env = "SWEEP_PAGE_SIZE", default_value_t = 1000, help_heading = H_SWEEP)]
    pub sweep_page_size: u32,

    /// Each sweep re-reads this many seconds before its last high-water mark (late writes)
    #[arg(long, env = "SWEEP_OVERLAP_SECONDS", default_value_t = 600, help_heading = H_SWEEP)]
    pub sweep_overlap_seconds: u32,

    /// Collections to read, comma-separated globs (* only). The bot is what * matched, minus a
    /// trailing _7d
    #[arg(long, env = "COLLECTION_PATTERNS", value_delimiter = ',', value_parser = parse_trimmed,
          default_value = "whisperengine_memory_*,chat_memories_*", help_heading = H_SWEEP)]
    pub collection_patterns: Vec<String>,

    /// Explicit collection=bot pairs, comma-separated; win over COLLECTION_PATTERNS (mapped
    /// collections are read even when no pattern matches them)
    #[arg(long, env = "COLLECTION_MAP", value_delimiter = ',', value_parser = parse_map_entry, help_heading = H_SWEEP)]
    pub collection_map: Vec<(String, String)>,

    /// Create the payload indexes recap needs (timestamp_unix...) in bots' collections when
    /// missing. Off by default: recap never changes bots' collections unless told
    #[arg(long, env = "SWEEP_CREATE_INDEX", action = clap::ArgAction::Set, value_parser = parse_bool, default_missing_value = "true", num_args = 0..=1, default_value = "false", help_heading = H_SWEEP)]
    pub sweep_create_index: bool,

    // ----- Payload mapping -----
    /// Payload field holding the user id
    #[arg(long, env = "PAYLOAD_USER_FIELD", default_value = "user_id", help_heading = H_PAYLOAD)]
    pub payload_user_field: String,

    /// Payload field holding the message text
    #[arg(long, env = "PAYLOAD_CONTENT_FIELD", default_value = "content", help_heading = H_PAYLOAD)]
    pub payload_content_field: String,

    /// Payload field naming the speaker (user/assistant; missing: "unknown")
    #[arg(long, env = "PAYLOAD_ROLE_FIELD", default_value = "role", help_heading = H_PAYLOAD)]
    pub payload_role_field: String,

    /// Payload field holding the memory type
    #[arg(long, env = "PAYLOAD_MEMORY_TYPE_FIELD", default_value = "memory_type", help_heading = H_PAYLOAD)]
    pub payload_memory_type_field: String,

    /// Payload field with the naive ISO-8601 UTC timestamp (fallback when the unix one is missing)
    #[arg(long, env = "PAYLOAD_TIMESTAMP_FIELD", default_value = "timestamp", help_heading = H_PAYLOAD)]
    pub payload_timestamp_field: String,

    /// Payload field with the float unix timestamp (used for range filters)
    #[arg(long, env = "PAYLOAD_TIMESTAMP_UNIX_FIELD", default_value = "timestamp_unix", help_heading = H_PAYLOAD)]
    pub payload_timestamp_unix_field: String,

    /// Payload field with the emotion label
    #[arg(long, env = "PAYLOAD_EMOTION_FIELD", default_value = "emotional_context", help_heading = H_PAYLOAD)]
    pub payload_emotion_field: String,

    /// Named vector holding the content embedding
    #[arg(long, env = "CONTENT_VECTOR_NAME", default_value = "content", help_heading = H_PAYLOAD)]
    pub content_vector_name: String,

    /// Memory types that are chat messages, comma-separated
    #[arg(long, env = "MEMORY_TYPES", value_delimiter = ',', value_parser = parse_trimmed,
          default_value = "conversation", help_heading = H_PAYLOAD)]
    pub memory_types: Vec<String>,

    // ----- Service -----
    /// Address of the HTTP server (/healthz, /readyz, /metrics)
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:9464", help_heading = H_SVC)]
    pub http_addr: SocketAddr,

    /// Token that logs in to the web console at /console; without it the console is served only on a loopback
    /// HTTP_ADDR
    #[arg(long, env = "CONSOLE_TOKEN", hide_env_values = true, help_heading = H_SVC)]
    pub console_token: Option<Secret>,

    /// Name of this instance in leases and logs (default: hostname:pid)
    #[arg(long, env = "INSTANCE_ID", help_heading = H_SVC)]
    pub instance_id: Option<String>,

    /// Seconds a claimed window stays leased to this instance
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 120, help_heading = H_SVC)]
    pub lease_seconds: u32,

    /// Seconds the leader (sweeper) lease lasts without renewal
    #[arg(long, env = "LEADER_LEASE_SECONDS", default_value_t = 15, help_heading = H_SVC)]
    pub leader_lease_seconds: u32,

    /// Time allowed for in-flight work on shutdown (e.g. 20s)
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration, help_heading = H_SVC)]
    pub shutdown_grace: Duration,

    /// Log format: text or json
    #[arg(long, env = "LOG_FORMAT", value_enum, ignore_case = true, default_value = "text", help_heading = H_SVC)]
    pub log_format: LogFormat,

    /// /readyz fails when more events than this are pending in the consumer
    #[arg(long, env = "READY_MAX_LAG", default_value_t = 10000, help_heading = H_SVC)]
    pub ready_max_lag: u64,

    /// Events fetched and written per ingest batch
    #[arg(long, env = "INGEST_BATCH_SIZE", default_value_t = 500, help_heading = H_SVC)]
    pub ingest_batch_size: usize,

    /// Day, week and month rollups of each user's window summaries (summary_type day/week/month): on or off.
    /// Off by default: readers that list a user's rows without filtering summary_type would see them too
    #[arg(long, env = "ROLLUPS", action = clap::ArgAction::Set, value_parser = parse_bool, default_missing_value = "true", num_args = 0..=1, default_value = "off", help_heading = H_SVC)]
    pub rollups: bool,

    /// Time between rollup rounds (scan for changed windows, build dirty rollups), e.g. 60s, 5m
    #[arg(long, env = "ROLLUP_INTERVAL", default_value = "60s", value_parser = parse_duration, help_heading = H_SVC)]
    pub rollup_interval: Duration,
    // ----- Recall API -----
    /// Bearer token for the recall API (/v1/recall, /v1/users); required when HTTP_ADDR is not loopback
    #[arg(long, env = "RECALL_TOKEN", hide_env_values = true, help_heading = H_SVC)]
    pub recall_token: Option<Secret>,

    /// How often the summary-vector repair pass runs (e.g. 60s)
    #[arg(long, env = "RECALL_REPAIR_INTERVAL", default_value = "60s", value_parser = parse_duration, help_heading = H_SVC)]
    pub recall_repair_interval: Duration,
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `Some` only for a non-blank value.
fn set_str(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn set_secret(v: &Option<Secret>) -> Option<&Secret> {
    v.as_ref().filter(|s| !s.is_blank())
}

/// A bot name usable as a NATS subject token and in Postgres: `[A-Za-z0-9_-]+`.
pub fn is_valid_bot_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `*`-only glob match (a `*` matches any run of characters, including none).
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

fn bracket_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The parts of `scheme://[userinfo@]host[:port][/path][?query]` (hand-rolled; no `url` crate).
struct UrlParts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    host: &'a str,
    port: Option<&'a str>,
}

fn split_url(s: &str) -> Option<UrlParts<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
    {
        return None;
    }
    // userinfo ends at the last '@' before any query/fragment (robust to '/' in passwords).
    let q = rest.find(['?', '#']).unwrap_or(rest.len());
    let (userinfo, after) = match rest[..q].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let hostport = &after[..end];
    let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
        let close = stripped.find(']')?;
        let host = &hostport[..close + 2];
        match &stripped[close + 1..] {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    Some(UrlParts {
        scheme,
        userinfo,
        host,
        port,
    })
}

/// The URL with credentials masked: the password in `user:password@`, a bare token in
/// `nats://token@`, and `password`/`token`/`key`-like query values. Not a URL: `"***"` if it
/// contains an `@` (could be credentials), else unchanged.
fn redact_url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return if s.contains('@') {
            "***".to_owned()
        } else {
            s.to_owned()
        };
    };
    let q = rest.find(['?', '#']).unwrap_or(rest.len());
    let (auth, tail) = match rest[..q].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let masked = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@"),
                None if matches!(scheme, "postgres" | "postgresql") => format!("{userinfo}@"),
                None => "***@".to_owned(),
            };
            (masked, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, frag) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            let mut out = format!("{path}?{}", pairs.join("&"));
            if let Some(f) = frag {
                out.push('#');
                out.push_str(f);
            }
            out
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{auth}{tail}")
}

fn is_secret_param(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "password", "passwd", "pass", "token", "key", "secret", "auth",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// Removes every occurrence of `secret` from `msg` (for errors built by other libraries).
fn scrub(msg: String, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 2)
        .fold(msg, |m, s| m.replace(s, "***"))
}

/// The password inside a Postgres URL (userinfo or `password=` query), for scrubbing.
fn url_password(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(parts) = split_url(s)
        && let Some((_, pw)) = parts.userinfo.and_then(|u| u.split_once(':'))
    {
        out.push(pw);
    }
    if let Some((_, query)) = s.split_once('?') {
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=')
                && is_secret_param(k)
            {
                out.push(v);
            }
        }
    }
    out
}

/// The machine's host name (gethostname(2) through `whoami`; in a container, the container's).
fn hostname() -> String {
    whoami::hostname()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

fn is_nats_name(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

fn is_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && !t
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '*' | '>'))
        })
}

fn is_local_host(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1")
}

// ---------------------------------------------------------------------------------------------
// Methods
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Treats empty values as unset: `NATS_URL=` (as compose files often write) becomes `None`,
    /// blank secrets become `None`, and list entries are trimmed with empty ones dropped
    /// (`COLLECTION_PATTERNS=a,,b` → `[a, b]`). Call once after parsing, before [`validate`].
    /// (The other methods already treat blank values as unset.)
    ///
    /// [`validate`]: Config::validate
    pub fn normalize(&mut self) {
        fn opt_str(v: &mut Option<String>) {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                *v = None;
            } else if let Some(s) = v {
                *s = s.trim().to_owned();
            }
        }
        fn opt_secret(v: &mut Option<Secret>) {
            if v.as_ref().is_some_and(Secret::is_blank) {
                *v = None;
            }
        }
        fn opt_path(v: &mut Option<PathBuf>) {
            if v.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *v = None;
            }
        }
        fn list(v: &mut Vec<String>) {
            v.iter_mut().for_each(|s| *s = s.trim().to_owned());
            v.retain(|s| !s.is_empty());
        }
        opt_str(&mut self.nats_url);
        opt_str(&mut self.nats_user);
        opt_str(&mut self.qdrant_url);
        opt_str(&mut self.postgres_sslmode);
        opt_str(&mut self.instance_id);
        for s in [
            &mut self.recall_token,
            &mut self.nats_token,
            &mut self.nats_password,
            &mut self.nats_nkey_seed,
            &mut self.qdrant_api_key,
            &mut self.database_url,
            &mut self.postgres_password,
            &mut self.openrouter_api_key,
            &mut self.llm_api_key,
            &mut self.console_token,
        ] {
            opt_secret(s);
        }
        if let Some(url) = &mut self.database_url {
            let trimmed = url.expose().trim();
            if trimmed.len() != url.expose().len() {
                *url = Secret::new(trimmed);
            }
        }
        opt_path(&mut self.nats_creds_file);
        opt_path(&mut self.nats_tls_ca);
        list(&mut self.collection_patterns);
        list(&mut self.memory_types);
        self.collection_map
            .retain(|(c, b)| !(c.is_empty() && b.is_empty()));
        for s in [
            &mut self.qdrant_host,
            &mut self.postgres_host,
            &mut self.postgres_db,
            &mut self.postgres_user,
            &mut self.llm_base_url,
            &mut self.llm_model,
        ] {
            *s = s.trim().to_owned();
        }
    }

    /// Checks every setting; the first problem comes back as one line naming the variable and
    /// what to set (e.g. `IDLE_GAP_MINUTES must be at least 1 (set IDLE_GAP_MINUTES=30)`).
    /// Never includes a secret. Checks that NATS_CREDS_FILE / NATS_TLS_CA exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |var: &'static str, msg: String| Err(ConfigError::invalid(var, msg));
        if set_secret(&self.console_token).is_some_and(|t| t.expose().trim().len() < 16) {
            return bad(
                "CONSOLE_TOKEN",
                "CONSOLE_TOKEN must be at least 16 characters (set CONSOLE_TOKEN=$(openssl rand -hex 16))".into(),
            );
        }
        macro_rules! at_least {
            ($field:expr, $min:expr, $var:literal, $default:literal) => {
                if $field < $min {
                    return bad(
                        $var,
                        format!(
                            concat!($var, " must be at least {} (set ", $var, "=", $default, ")"),
                            $min
                        ),
                    );
                }
            };
        }
        macro_rules! at_most {
            ($field:expr, $max:expr, $var:literal, $default:literal) => {
                if $field > $max {
                    return bad(
                        $var,
                        format!(
                            concat!(
                                $var,
                                " must be at most {} (got {}; set ",
                                $var,
                                "=",
                                $default,
                                ")"
                            ),
                            $max, $field
                        ),
                    );
                }
            };
        }
        macro_rules! non_empty {
            ($field:expr, $var:literal, $default:literal) => {
                if $field.trim().is_empty() {
                    return bad(
                        $var,
                        concat!($var, " is empty (set ", $var, "=", $default, ")").to_owned(),
                    );
                }
            };
        }

        // --- Recall API ---
        if !self.http_addr.ip().is_loopback() && set_secret(&self.recall_token).is_none() {
            return bad(
                "RECALL_TOKEN",
                format!(
                    "RECALL_TOKEN is not set but HTTP_ADDR {} is not loopback: the recall API would be open (set RECALL_TOKEN=<a long random string>, or HTTP_ADDR=127.0.0.1:9090)",
                    self.http_addr
                ),
            );
        }
        if self.recall_repair_interval < Duration::from_secs(1) {
            return bad(
                "RECALL_REPAIR_INTERVAL",
                "RECALL_REPAIR_INTERVAL must be at least 1s (set RECALL_REPAIR_INTERVAL=60s)"
                    .to_owned(),
            );
        }

        // --- NATS ---
        if let Some(url) = set_str(&self.nats_url) {
            let ok = !url.contains(',')
                && split_url(url).is_some_and(|p| {
                    matches!(p.scheme, "nats" | "tls" | "ws" | "wss")
                        && !p.host.is_empty()
                        && p.port
                            .is_none_or(|port| port.parse::<u16>().is_ok_and(|n| n > 0))
                });
            if !ok {
                return bad(
                    "NATS_URL",
                    format!(
                        "NATS_URL {:?} is not a nats:// or tls:// URL (set NATS_URL=nats://host:4222 (one server), or unset it for sweep-only)",
                        redact_url(url)
                    ),
                );
            }
        }
        if !is_nats_name(&self.nats_stream) {
            return bad(
                "NATS_STREAM",
                format!(
                    "NATS_STREAM {:?} is not a valid stream name (no spaces, '.', '*', '>', '/'; set NATS_STREAM=RECAP)",
                    self.nats_stream
                ),
            );
        }
        if !is_nats_name(&self.nats_consumer) {
            return bad(
                "NATS_CONSUMER",
                format!(
                    "NATS_CONSUMER {:?} is not a valid consumer name (no spaces, '.', '*', '>', '/'; set NATS_CONSUMER=recap)",
                    self.nats_consumer
                ),
            );
        }
        if !is_subject(&self.nats_subject_prefix) {
            return bad(
                "NATS_SUBJECT_PREFIX",
                format!(
                    "NATS_SUBJECT_PREFIX {:?} is not a subject prefix (dot-separated tokens, no spaces or wildcards; set NATS_SUBJECT_PREFIX=recap.stored)",
                    self.nats_subject_prefix
                ),
            );
        }
        if self.stream_max_age < Duration::from_secs(60) {
            return bad(
                "STREAM_MAX_AGE",
                "STREAM_MAX_AGE must be at least 1m (set STREAM_MAX_AGE=7d)".to_owned(),
            );
        }
        if self
            .nats_ack_wait
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return bad(
                "NATS_ACK_WAIT",
                "NATS_ACK_WAIT must be at least 1s (set NATS_ACK_WAIT=30s, or unset it)".to_owned(),
            );
        }
        let user = set_str(&self.nats_user).is_some();
        let password = set_secret(&self.nats_password).is_some();
        if user != password {
            let (var, missing) = if user {
                ("NATS_USER", "NATS_PASSWORD")
            } else {
                ("NATS_PASSWORD", "NATS_USER")
            };
            return bad(
                var,
                format!("{var} is set but {missing} is not (set both or neither)"),
            );
        }
        let methods: Vec<&str> = [
            (set_secret(&self.nats_token).is_some(), "NATS_TOKEN"),
            (user, "NATS_USER/NATS_PASSWORD"),
            (
                self.nats_creds_file
                    .as_ref()
                    .is_some_and(|p| !p.as_os_str().is_empty()),
                "NATS_CREDS_FILE",
            ),
            (set_secret(&self.nats_nkey_seed).is_some(), "NATS_NKEY_SEED"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if methods.len() > 1 {
            return bad(
                "NATS_TOKEN",
                format!(
                    "NATS auth: set only one of {} (they are alternatives)",
                    methods.join(", ")
                ),
            );
        }
        for (var, path) in [
            ("NATS_CREDS_FILE", &self.nats_creds_file),
            ("NATS_TLS_CA", &self.nats_tls_ca),
        ] {
            if let Some(p) = path.as_ref().filter(|p| !p.as_os_str().is_empty())
                && !p.is_file()
            {
                return bad(
                    var,
                    format!(
                        "{var} {} is not a readable file (fix the path or unset {var})",
                        p.display()
                    ),
                );
            }
        }

        // --- Qdrant ---
        if let Some(url) = set_str(&self.qdrant_url) {
            let ok = split_url(url).is_some_and(|p| {
                matches!(p.scheme, "http" | "https")
                    && !p.host.is_empty()
                    && p.port
                        .is_none_or(|port| port.parse::<u16>().is_ok_and(|n| n > 0))
            });
            if !ok {
                return bad(
                    "QDRANT_URL",
                    format!(
                        "QDRANT_URL {:?} is not an http(s) URL (set QDRANT_URL=http://host:6334)",
                        redact_url(url)
                    ),
                );
            }
        } else {
            let h = self.qdrant_host.trim();
            if h.is_empty() || h.contains("://") || h.contains('/') || h.contains('@') {
                return bad(
                    "QDRANT_HOST",
                    format!(
                        "QDRANT_HOST {:?} is not a host name (set QDRANT_HOST=localhost, or QDRANT_URL=http://host:6334)",
                        redact_url(h)
                    ),
                );
            }
            at_least!(self.qdrant_port, 1, "QDRANT_PORT", "6333");
            if let Some(p) = self.qdrant_grpc_port {
                at_least!(p, 1, "QDRANT_GRPC_PORT", "6334");
            } else if self.qdrant_port == u16::MAX {
                return bad(
                    "QDRANT_GRPC_PORT",
                    "QDRANT_PORT 65535 leaves no gRPC port at QDRANT_PORT+1 (set QDRANT_GRPC_PORT)"
                        .to_owned(),
                );
            }
        }

        // --- Postgres ---
        if let Some(url) = set_secret(&self.database_url) {
            let u = url.expose().trim();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return bad(
                    "DATABASE_URL",
                    "DATABASE_URL must start with postgres:// or postgresql:// (set DATABASE_URL=postgres://user:password@host:5432/db, or unset it and use POSTGRES_HOST etc.)".to_owned(),
                );
            }
        } else {
            non_empty!(self.postgres_host, "POSTGRES_HOST", "localhost");
            at_least!(self.postgres_port, 1, "POSTGRES_PORT", "5432");
            non_empty!(self.postgres_db, "POSTGRES_DB", "whisperengine_db");
            non_empty!(self.postgres_user, "POSTGRES_USER", "postgres");
        }
        if let Some(mode) = set_str(&self.postgres_sslmode)
            && !SSL_MODES.contains(&mode.to_ascii_lowercase().as_str())
        {
            return bad(
                "POSTGRES_SSLMODE",
                format!(
                    "POSTGRES_SSLMODE {mode:?} is not one of {} (set POSTGRES_SSLMODE=prefer)",
                    SSL_MODES.join("|")
                ),
            );
        }
        self.pg_connect_options()?;
        at_least!(self.db_max_connections, 1, "DB_MAX_CONNECTIONS", "10");

        // --- LLM ---
        let base_ok = split_url(self.llm_base_url.trim())
            .is_some_and(|p| matches!(p.scheme, "http" | "https") && !p.host.is_empty());
        if !base_ok {
            return bad(
                "LLM_BASE_URL",
                format!(
                    "LLM_BASE_URL {:?} is not an http(s) URL (set LLM_BASE_URL=https://openrouter.ai/api/v1)",
                    redact_url(self.llm_base_url.trim())
                ),
            );
        }
        non_empty!(self.llm_model, "LLM_MODEL", "anthropic/claude-sonnet-4.6");
        if self.summarizer == SummarizerChoice::Llm && self.llm_api_key().is_none() {
            return bad(
                "SUMMARIZER",
                "SUMMARIZER=llm needs an API key (set LLM_API_KEY or OPENROUTER_API_KEY, or SUMMARIZER=auto)".to_owned(),
            );
        }
        at_least!(self.llm_concurrency, 1, "LLM_CONCURRENCY", "4");
        if !(self.llm_requests_per_second.is_finite() && self.llm_requests_per_second > 0.0) {
            return bad(
                "LLM_REQUESTS_PER_SECOND",
                "LLM_REQUESTS_PER_SECOND must be a number greater than 0 (set LLM_REQUESTS_PER_SECOND=5)".to_owned(),
            );
        }
        if self.llm_timeout < Duration::from_secs(1) {
            return bad(
                "LLM_TIMEOUT",
                "LLM_TIMEOUT must be at least 1s (set LLM_TIMEOUT=60s)".to_owned(),
            );
        }
        at_least!(self.llm_max_attempts, 1, "LLM_MAX_ATTEMPTS", "5");
        at_most!(self.llm_max_retries, 20, "LLM_MAX_RETRIES", "4");
        at_least!(
            self.llm_max_input_tokens,
            500,
            "LLM_MAX_INPUT_TOKENS",
            "6000"
        );
        at_most!(
            self.llm_max_input_tokens,
            2_000_000,
            "LLM_MAX_INPUT_TOKENS",
            "6000"
        );
        at_least!(self.llm_breaker_failures, 1, "LLM_BREAKER_FAILURES", "5");
        if self.llm_breaker_cooldown < Duration::from_secs(1) {
            return bad(
                "LLM_BREAKER_COOLDOWN",
                "LLM_BREAKER_COOLDOWN must be at least 1s (set LLM_BREAKER_COOLDOWN=30s)"
                    .to_owned(),
            );
        }
        for (var, v, default) in [
            (
                "LLM_PRICE_PROMPT_PER_MTOK",
                self.llm_price_prompt_per_mtok,
                "3.0",
            ),
            (
                "LLM_PRICE_COMPLETION_PER_MTOK",
                self.llm_price_completion_per_mtok,
                "15.0",
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(
                    var,
                    format!("{var} must be a number >= 0 (set {var}={default})"),
                );
            }
        }
        if let Some(b) = self.llm_daily_budget_usd
            && !(b.is_finite() && b > 0.0)
        {
            return bad(
                    "LLM_DAILY_BUDGET_USD",
                    "LLM_DAILY_BUDGET_USD must be greater than 0 (set e.g. LLM_DAILY_BUDGET_USD=5, or unset it for no limit)".to_owned(),
                );
        }

        // --- Windows ---
        at_least!(self.idle_gap_minutes, 1, "IDLE_GAP_MINUTES", "30");
        at_most!(self.idle_gap_minutes, 7 * 24 * 60, "IDLE_GAP_MINUTES", "30");
        if let Some(g) = self.idle_gap
            && !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)).contains(&g)
        {
            return bad(
                "IDLE_GAP",
                "IDLE_GAP must be between 1s and 7d (set e.g. IDLE_GAP=30m)".to_owned(),
            );
        }
        at_least!(self.time_window_hours, 1, "TIME_WINDOW_HOURS", "24");
        at_most!(self.time_window_hours, 24 * 31, "TIME_WINDOW_HOURS", "24");
        at_most!(
            self.allowed_lateness_seconds,
            86_400,
            "ALLOWED_LATENESS_SECONDS",
            "120"
        );
        at_least!(
            self.min_messages_for_summary,
            1,
            "MIN_MESSAGES_FOR_SUMMARY",
            "5"
        );

        // --- Sweep ---
        at_least!(
            self.enrichment_interval_seconds,
            1,
            "ENRICHMENT_INTERVAL_SECONDS",
            "300"
        );
        at_least!(self.enrichment_batch_size, 1, "ENRICHMENT_BATCH_SIZE", "50");
        at_least!(self.lookback_days, 1, "LOOKBACK_DAYS", "30");
        at_most!(self.lookback_days, 3650, "LOOKBACK_DAYS", "30");
        at_least!(self.sweep_page_size, 1, "SWEEP_PAGE_SIZE", "1000");
        at_most!(self.sweep_page_size, 100_000, "SWEEP_PAGE_SIZE", "1000");
        at_most!(
            self.sweep_overlap_seconds,
            86_400,
            "SWEEP_OVERLAP_SECONDS",
            "600"
        );
        let patterns: Vec<&str> = self
            .collection_patterns
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        if patterns.is_empty() && self.collection_map.iter().all(|(c, _)| c.trim().is_empty()) {
            return bad(
                "COLLECTION_PATTERNS",
                "COLLECTION_PATTERNS is empty (set COLLECTION_PATTERNS=whisperengine_memory_*,chat_memories_*)".to_owned(),
            );
        }
        for p in &patterns {
            if !p.contains('*') && !self.collection_map.iter().any(|(c, _)| c.trim() == *p) {
                return bad(
                    "COLLECTION_PATTERNS",
                    format!(
                        "COLLECTION_PATTERNS entry {p:?} has no * so no bot name can be taken from it (use e.g. {p}_* or set COLLECTION_MAP={p}=<bot>)"
                    ),
                );
            }
        }
        for (i, (coll, bot)) in self.collection_map.iter().enumerate() {
            let (coll, bot) = (coll.trim(), bot.trim());
            if coll.is_empty() && bot.is_empty() {
                continue;
            }
            if coll.is_empty() || !is_valid_bot_name(bot) {
                return bad(
                    "COLLECTION_MAP",
                    format!(
                        "COLLECTION_MAP entry \"{coll}={bot}\" must be collection=bot with bot made of A-Z a-z 0-9 _ - (set e.g. COLLECTION_MAP=whisperengine_memory_elena_7d=elena)"
                    ),
                );
            }
            if let Some((_, other)) = self.collection_map[..i]
                .iter()
                .find(|(c, b)| c.trim() == coll && b.trim() != bot)
            {
                return bad(
                    "COLLECTION_MAP",
                    format!(
                        "COLLECTION_MAP maps {coll:?} to both {:?} and {bot:?} (keep one)",
                        other.trim()
                    ),
                );
            }
        }

        // --- Payload mapping ---
        non_empty!(self.payload_user_field, "PAYLOAD_USER_FIELD", "user_id");
        non_empty!(
            self.payload_content_field,
            "PAYLOAD_CONTENT_FIELD",
            "content"
        );
        non_empty!(self.payload_role_field, "PAYLOAD_ROLE_FIELD", "role");
        non_empty!(
            self.payload_memory_type_field,
            "PAYLOAD_MEMORY_TYPE_FIELD",
            "memory_type"
        );
        non_empty!(
            self.payload_timestamp_field,
            "PAYLOAD_TIMESTAMP_FIELD",
            "timestamp"
        );
        non_empty!(
            self.payload_timestamp_unix_field,
            "PAYLOAD_TIMESTAMP_UNIX_FIELD",
            "timestamp_unix"
        );
        non_empty!(
            self.payload_emotion_field,
            "PAYLOAD_EMOTION_FIELD",
            "emotional_context"
        );
        non_empty!(self.content_vector_name, "CONTENT_VECTOR_NAME", "content");
        if self.memory_types.iter().all(|t| t.trim().is_empty()) {
            return bad(
                "MEMORY_TYPES",
                "MEMORY_TYPES is empty (set MEMORY_TYPES=conversation)".to_owned(),
            );
        }

        // --- Service ---
        if let Some(id) = set_str(&self.instance_id)
            && (id.len() > 200 || id.chars().any(char::is_control))
        {
            return bad(
                "INSTANCE_ID",
                "INSTANCE_ID must be 1 to 200 printable characters (or unset it for hostname:pid)"
                    .to_owned(),
            );
        }
        at_least!(self.lease_seconds, 2, "LEASE_SECONDS", "120");
        at_least!(self.leader_lease_seconds, 2, "LEADER_LEASE_SECONDS", "15");
        at_least!(self.ingest_batch_size, 1, "INGEST_BATCH_SIZE", "500");
        if self.rollup_interval < Duration::from_secs(1) {
            return bad(
                "ROLLUP_INTERVAL",
                "ROLLUP_INTERVAL must be at least 1s (set ROLLUP_INTERVAL=60s)".to_owned(),
            );
        }
        Ok(())
    }

    /// Things that are allowed but probably not meant, one line each, for logging at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if set_str(&self.nats_url).is_none() {
            w.push(format!(
                "NATS_URL is not set: running sweep-only (new messages are picked up every {}s, ENRICHMENT_INTERVAL_SECONDS)",
                self.enrichment_interval_seconds
            ));
        }
        if self.summarizer == SummarizerChoice::Auto && self.llm_api_key().is_none() {
            w.push("no LLM API key (LLM_API_KEY or OPENROUTER_API_KEY): using the extractive summarizer".to_owned());
        }
        if let Some(url) = set_str(&self.qdrant_url) {
            if split_url(url).is_some_and(|p| p.port == Some("6333")) {
                w.push(format!(
                    "QDRANT_URL {:?} uses port 6333, Qdrant's REST port; recap speaks gRPC (usually port 6334)",
                    redact_url(url)
                ));
            }
        } else if self.qdrant_grpc_port == Some(6333) {
            w.push("QDRANT_GRPC_PORT is 6333, Qdrant's REST port; gRPC is usually 6334".to_owned());
        }
        if set_secret(&self.qdrant_api_key).is_some() {
            let url = self.qdrant_grpc_url();
            if let Some(p) = split_url(&url)
                && p.scheme == "http"
                && !is_local_host(p.host)
            {
                w.push(format!(
                    "QDRANT_API_KEY is sent unencrypted to {}:{} (use an https:// QDRANT_URL)",
                    p.host,
                    p.port.unwrap_or("")
                ));
            }
        }
        if set_secret(&self.database_url).is_some() && set_secret(&self.postgres_password).is_some()
        {
            w.push(
                "DATABASE_URL is set, so POSTGRES_HOST/PORT/DB/USER/PASSWORD are ignored"
                    .to_owned(),
            );
        }
        if u64::from(self.lease_seconds) <= self.llm_timeout.as_secs() {
            w.push(format!(
                "LEASE_SECONDS ({}) is not longer than LLM_TIMEOUT ({}s): a window may be re-claimed while its summary is still being written",
                self.lease_seconds,
                self.llm_timeout.as_secs()
            ));
        }
        if self.window_mode == WindowMode::Session
            && self.idle_gap_ms() >= i64::from(self.time_window_hours) * 3_600_000
        {
            w.push(format!(
                "IDLE_GAP ({}) is not shorter than TIME_WINDOW_HOURS ({}h): sessions are always cut at the maximum length",
                humantime::format_duration(Duration::from_millis(self.idle_gap_ms() as u64)),
                self.time_window_hours
            ));
        }
        w
    }

    /// NATS_URL with credentials masked (`nats://user:***@host`), for messages; `None` when unset.
    pub fn nats_url_redacted(&self) -> Option<String> {
        set_str(&self.nats_url).map(redact_url)
    }

    /// Settings for [`crate::source::nats`]: NATS_URL (empty string when unset: check
    /// `nats_url` first), stream, consumer, subjects, auth, TLS; `batch_size` is
    /// INGEST_BATCH_SIZE; `ack_wait` zero keeps the value in `nats/consumer.json`.
    pub fn nats_settings(&self) -> crate::source::nats::NatsSettings {
        let secret = |s: &Option<Secret>| set_secret(s).map(|s| s.expose().to_owned());
        crate::source::nats::NatsSettings {
            url: set_str(&self.nats_url).unwrap_or_default().to_owned(),
            stream: self.nats_stream.trim().to_owned(),
            consumer: self.nats_consumer.trim().to_owned(),
            subject_prefix: self.nats_subject_prefix.trim().to_owned(),
            max_age: self.stream_max_age,
            token: secret(&self.nats_token),
            user: set_str(&self.nats_user).map(str::to_owned),
            password: secret(&self.nats_password),
            creds_file: self
                .nats_creds_file
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            nkey_seed: secret(&self.nats_nkey_seed),
            tls_ca: self
                .nats_tls_ca
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            tls_required: self.nats_tls_required,
            batch_size: self.ingest_batch_size,
            ack_wait: self.nats_ack_wait.unwrap_or(Duration::ZERO),
        }
    }

    /// The window settings for [`crate::tracker`]: WINDOW_MODE, IDLE_GAP_MINUTES,
    /// TIME_WINDOW_HOURS (window length / longest session) and ALLOWED_LATENESS_SECONDS in ms.
    pub fn tracker_config(&self) -> crate::tracker::TrackerConfig {
        crate::tracker::TrackerConfig {
            mode: match self.window_mode {
                WindowMode::Session => crate::tracker::Mode::Session,
                WindowMode::Tumbling => crate::tracker::Mode::Tumbling,
            },
            idle_gap_ms: self.idle_gap_ms(),
            max_span_ms: i64::from(self.time_window_hours) * 3_600_000,
            lateness_ms: i64::from(self.allowed_lateness_seconds) * 1_000,
        }
    }

    /// The payload field names (PAYLOAD_*_FIELD, CONTENT_VECTOR_NAME, MEMORY_TYPES) for
    /// [`crate::fetch`].
    pub fn payload_mapping(&self) -> crate::fetch::PayloadMapping {
        let t = |s: &String| s.trim().to_owned();
        crate::fetch::PayloadMapping {
            user: t(&self.payload_user_field),
            content: t(&self.payload_content_field),
            role: t(&self.payload_role_field),
            memory_type: t(&self.payload_memory_type_field),
            timestamp: t(&self.payload_timestamp_field),
            timestamp_unix: t(&self.payload_timestamp_unix_field),
            emotion: t(&self.payload_emotion_field),
            content_vector: t(&self.content_vector_name),
            memory_types: self
                .memory_types
                .iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
        }
    }

    /// Qdrant's gRPC endpoint.
    ///
    /// QDRANT_URL when set. Otherwise `http://{QDRANT_HOST}:{port}` where port is
    /// QDRANT_GRPC_PORT when set; else 6334 when QDRANT_PORT is 6333 (Qdrant's REST default,
    /// which WhisperEngine deployments set); else QDRANT_PORT + 1 (Qdrant serves gRPC one
    /// above REST by default).
    pub fn qdrant_grpc_url(&self) -> String {
        if let Some(url) = set_str(&self.qdrant_url) {
            return url.trim_end_matches('/').to_owned();
        }
        let port = match self.qdrant_grpc_port {
            Some(p) => p,
            None if self.qdrant_port == 6333 => 6334,
            None => self.qdrant_port.checked_add(1).unwrap_or(6334),
        };
        format!("http://{}:{port}", bracket_host(self.qdrant_host.trim()))
    }

    /// Postgres connection options: from DATABASE_URL when set (used as is, except that
    /// POSTGRES_SSLMODE applies when the URL has no `sslmode`), else from POSTGRES_HOST, _PORT,
    /// _DB, _USER, _PASSWORD and _SSLMODE (unset values fall back to libpq's PG* variables and
    /// ~/.pgpass). Sets `application_name=recap` unless the URL names one.
    pub fn pg_connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let sslmode = match set_str(&self.postgres_sslmode) {
            Some(m) => Some(PgSslMode::from_str(m).map_err(|_| {
                ConfigError::invalid(
                    "POSTGRES_SSLMODE",
                    format!(
                        "POSTGRES_SSLMODE {m:?} is not one of {} (set POSTGRES_SSLMODE=prefer)",
                        SSL_MODES.join("|")
                    ),
                )
            })?),
            None => None,
        };
        let mut opts = if let Some(url) = set_secret(&self.database_url) {
            let u = url.expose().trim();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::invalid(
                    "DATABASE_URL",
                    "DATABASE_URL must start with postgres:// or postgresql:// (set DATABASE_URL=postgres://user:password@host:5432/db)",
                ));
            }
            let opts = PgConnectOptions::from_str(u).map_err(|e| {
                let mut secrets = url_password(u);
                secrets.push(u);
                ConfigError::invalid(
                    "DATABASE_URL",
                    scrub(
                        format!(
                            "DATABASE_URL {:?} is not a valid Postgres URL: {e} (set DATABASE_URL=postgres://user:password@host:5432/db)",
                            redact_url(u)
                        ),
                        &secrets,
                    )
                    .replace('\n', " "),
                )
            })?;
            let url_has_sslmode = u.split_once('?').is_some_and(|(_, q)| {
                q.split('&')
                    .any(|kv| kv.starts_with("sslmode=") || kv.starts_with("ssl-mode="))
            });
            match sslmode {
                Some(m) if !url_has_sslmode => opts.ssl_mode(m),
                _ => opts,
            }
        } else {
            let mut o = PgConnectOptions::new()
                .host(self.postgres_host.trim())
                .port(self.postgres_port)
                .database(self.postgres_db.trim())
                .username(self.postgres_user.trim());
            if let Some(pw) = set_secret(&self.postgres_password) {
                o = o.password(pw.expose());
            }
            if let Some(m) = sslmode {
                o = o.ssl_mode(m);
            }
            o
        };
        if opts.get_application_name().is_none() {
            opts = opts.application_name("recap");
        }
        Ok(opts)
    }

    /// Where Postgres is, without credentials: `host:port/db` (for messages such as
    /// `Postgres 127.0.0.1:5432/whisperengine_db: connection refused`).
    pub fn postgres_display(&self) -> String {
        if let Some(url) = set_secret(&self.database_url) {
            return match PgConnectOptions::from_str(url.expose().trim()) {
                Ok(o) => {
                    let host = match o.get_socket() {
                        Some(s) => s.display().to_string(),
                        None => bracket_host(o.get_host()),
                    };
                    format!(
                        "{host}:{}/{}",
                        o.get_port(),
                        o.get_database().unwrap_or(o.get_username())
                    )
                }
                Err(_) => "DATABASE_URL (unparseable)".to_owned(),
            };
        }
        format!(
            "{}:{}/{}",
            bracket_host(self.postgres_host.trim()),
            self.postgres_port,
            self.postgres_db.trim()
        )
    }

    /// DATABASE_URL with its password (and password-like query values) replaced by `***`;
    /// `None` when unset.
    pub fn database_url_redacted(&self) -> Option<String> {
        set_secret(&self.database_url).map(|u| redact_url(u.expose().trim()))
    }

    /// The LLM API key: LLM_API_KEY, else OPENROUTER_API_KEY (blank values count as unset).
    pub fn llm_api_key(&self) -> Option<&Secret> {
        set_secret(&self.llm_api_key).or_else(|| set_secret(&self.openrouter_api_key))
    }

    /// Whether summaries come from the LLM: SUMMARIZER=llm, or auto with an API key.
    pub fn use_llm(&self) -> bool {
        match self.summarizer {
            SummarizerChoice::Llm => true,
            SummarizerChoice::Extractive => false,
            SummarizerChoice::Auto => self.llm_api_key().is_some(),
        }
    }

    /// The bot a Qdrant collection belongs to, or `None` if recap should not read it.
    ///
    /// COLLECTION_MAP first; else the first COLLECTION_PATTERNS glob that matches: the bot is the
    /// text between the pattern's literal prefix (before the first `*`) and literal suffix (after
    /// the last `*`), minus a trailing `_7d`, and must be a valid bot name (`[A-Za-z0-9_-]+`).
    /// `whisperengine_memory_elena_7d` → `elena`, `chat_memories_marcus` → `marcus`.
    pub fn bot_for_collection(&self, name: &str) -> Option<String> {
        if let Some((_, bot)) = self
            .collection_map
            .iter()
            .find(|(c, b)| !c.trim().is_empty() && c.trim() == name && is_valid_bot_name(b.trim()))
        {
            return Some(bot.trim().to_owned());
        }
        for pattern in self.collection_patterns.iter().map(|p| p.trim()) {
            let (Some(first), Some(last)) = (pattern.find('*'), pattern.rfind('*')) else {
                continue;
            };
            if !glob_match(pattern, name) {
                continue;
            }
            let (prefix, suffix) = (&pattern[..first], &pattern[last + 1..]);
            if name.len() < prefix.len() + suffix.len() {
                continue;
            }
            let middle = &name[prefix.len()..name.len() - suffix.len()];
            let bot = middle.strip_suffix("_7d").unwrap_or(middle);
            if is_valid_bot_name(bot) {
                return Some(bot.to_owned());
            }
        }
        None
    }

    /// This instance's id: INSTANCE_ID, else `hostname:pid`.
    pub fn instance_id(&self) -> String {
        match set_str(&self.instance_id) {
            Some(id) => id.to_owned(),
            None => format!("{}:{}", hostname(), std::process::id()),
        }
    }

    /// The idle gap (IDLE_GAP, else IDLE_GAP_MINUTES) as a duration.
    pub fn idle_gap(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::milliseconds(self.idle_gap_ms())
    }

    /// The idle gap in milliseconds: IDLE_GAP when set (whole milliseconds), else IDLE_GAP_MINUTES.
    pub fn idle_gap_ms(&self) -> i64 {
        match self.idle_gap {
            Some(d) => d.as_millis().min(i64::MAX as u128) as i64,
            None => i64::from(self.idle_gap_minutes) * 60_000,
        }
    }

    /// TIME_WINDOW_HOURS as a duration.
    pub fn time_window(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::hours(i64::from(self.time_window_hours))
    }

    /// ALLOWED_LATENESS_SECONDS as a duration.
    pub fn allowed_lateness(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::seconds(i64::from(self.allowed_lateness_seconds))
    }
}

/// Debug without secrets: `Secret`s print `***`, URLs have their credentials masked.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Url<'a>(Option<&'a str>);
        impl fmt::Debug for Url<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Some(u) => write!(f, "Some({:?})", redact_url(u)),
                    None => f.write_str("None"),
                }
            }
        }
        struct UrlStr<'a>(&'a str);
        impl fmt::Debug for UrlStr<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", redact_url(self.0))
            }
        }
        struct Dur(Duration);
        impl fmt::Debug for Dur {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", humantime::format_duration(self.0))
            }
        }
        f.debug_struct("Config")
            .field("nats_url", &Url(self.nats_url.as_deref()))
            .field("nats_stream", &self.nats_stream)
            .field("nats_consumer", &self.nats_consumer)
            .field("nats_subject_prefix", &self.nats_subject_prefix)
            .field("stream_max_age", &Dur(self.stream_max_age))
            .field("nats_token", &self.nats_token)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &self.nats_password)
            .field("nats_creds_file", &self.nats_creds_file)
            .field("nats_nkey_seed", &self.nats_nkey_seed)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_required", &self.nats_tls_required)
            .field("nats_ack_wait", &self.nats_ack_wait.map(Dur))
            .field("qdrant_url", &Url(self.qdrant_url.as_deref()))
            .field("qdrant_host", &self.qdrant_host)
            .field("qdrant_port", &self.qdrant_port)
            .field("qdrant_grpc_port", &self.qdrant_grpc_port)
            .field("qdrant_api_key", &self.qdrant_api_key)
            .field(
                "database_url",
                &Url(self.database_url_redacted().as_deref()),
            )
            .field("postgres_host", &self.postgres_host)
            .field("postgres_port", &self.postgres_port)
            .field("postgres_db", &self.postgres_db)
            .field("postgres_user", &self.postgres_user)
            .field("postgres_password", &self.postgres_password)
            .field("postgres_sslmode", &self.postgres_sslmode)
            .field("db_max_connections", &self.db_max_connections)
            .field("llm_base_url", &UrlStr(&self.llm_base_url))
            .field("llm_model", &self.llm_model)
            .field("openrouter_api_key", &self.openrouter_api_key)
            .field("llm_api_key", &self.llm_api_key)
            .field("summarizer", &self.summarizer)
            .field("llm_concurrency", &self.llm_concurrency)
            .field("llm_requests_per_second", &self.llm_requests_per_second)
            .field("llm_timeout", &Dur(self.llm_timeout))
            .field("llm_max_attempts", &self.llm_max_attempts)
            .field("llm_max_retries", &self.llm_max_retries)
            .field("llm_max_input_tokens", &self.llm_max_input_tokens)
            .field("llm_breaker_failures", &self.llm_breaker_failures)
            .field("llm_breaker_cooldown", &Dur(self.llm_breaker_cooldown))
            .field("llm_price_prompt_per_mtok", &self.llm_price_prompt_per_mtok)
            .field(
                "llm_price_completion_per_mtok",
                &self.llm_price_completion_per_mtok,
            )
            .field("llm_daily_budget_usd", &self.llm_daily_budget_usd)
            .field("over_budget", &self.over_budget)
            .field("window_mode", &self.window_mode)
            .field("idle_gap_minutes", &self.idle_gap_minutes)
            .field("idle_gap", &self.idle_gap)
            .field("time_window_hours", &self.time_window_hours)
            .field("allowed_lateness_seconds", &self.allowed_lateness_seconds)
            .field("min_messages_for_summary", &self.min_messages_for_summary)
            .field(
                "enrichment_interval_seconds",
                &self.enrichment_interval_seconds,
            )
            .field("enrichment_batch_size", &self.enrichment_batch_size)
            .field("lookback_days", &self.lookback_days)
            .field("sweep_page_size", &self.sweep_page_size)
            .field("sweep_overlap_seconds", &self.sweep_overlap_seconds)
            .field("collection_patterns", &self.collection_patterns)
            .field("collection_map", &self.collection_map)
            .field("sweep_create_index", &self.sweep_create_index)
            .field("payload_user_field", &self.payload_user_field)
            .field("payload_content_field", &self.payload_content_field)
            .field("payload_role_field", &self.payload_role_field)
            .field("payload_memory_type_field", &self.payload_memory_type_field)
            .field("payload_timestamp_field", &self.payload_timestamp_field)
            .field(
                "payload_timestamp_unix_field",
                &self.payload_timestamp_unix_field,
            )
            .field("payload_emotion_field", &self.payload_emotion_field)
            .field("content_vector_name", &self.content_vector_name)
            .field("memory_types", &self.memory_types)
            .field("http_addr", &self.http_addr)
            .field("console_token", &self.console_token)
            .field("recall_token", &self.recall_token)
            .field("recall_repair_interval", &self.recall_repair_interval)
            .field("instance_id", &self.instance_id)
            .field("lease_seconds", &self.lease_seconds)
            .field("leader_lease_seconds", &self.leader_lease_seconds)
            .field("shutdown_grace", &Dur(self.shutdown_grace))
            .field("log_format", &self.log_format)
            .field("ready_max_lag", &self.ready_max_lag)
            .field("ingest_batch_size", &self.ingest_batch_size)
            .field("rollups", &self.rollups)
            .field("rollup_interval", &Dur(self.rollup_interval))
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// clap errors as one line
// ---------------------------------------------------------------------------------------------

/// Finds an argument by its long name (or value name) in `cmd` and all its subcommands.
fn find_arg<'a>(
    cmd: &'a clap::Command,
    long: Option<&str>,
    value_name: Option<&str>,
) -> Option<&'a clap::Arg> {
    let hit = cmd.get_arguments().find(|a| {
        long.is_some_and(|l| a.get_long() == Some(l))
            || (long.is_none()
                && value_name.is_some_and(|v| {
                    a.get_value_names()
                        .is_some_and(|names| names.iter().any(|n| n.as_str() == v))
                        || a.get_id().as_str().eq_ignore_ascii_case(v)
                }))
    });
    hit.or_else(|| {
        cmd.get_subcommands()
            .find_map(|sub| find_arg(sub, long, value_name))
    })
}

/// Turns a clap error into one line. For a bad value (from a flag or an environment variable)
/// it names the environment variable:
/// `invalid value "abc" for IDLE_GAP_MINUTES (--idle-gap-minutes): invalid digit found in string`.
/// Other kinds give the first line of clap's message without its `error: ` prefix. (Handle
/// `DisplayHelp`/`DisplayVersion` with `err.exit()` before calling this.) Values of arguments
/// whose environment values are hidden (secrets) are shown as `***`.
pub fn one_line_clap_error(err: &clap::Error, cmd: &clap::Command) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};

    let first_line = || {
        let text = err.to_string();
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_owned();
        line.strip_prefix("error: ")
            .map(str::to_owned)
            .unwrap_or(line)
    };
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return first_line();
    }
    let ctx_str = |k: ContextKind| match err.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::StyledStr(s)) => Some(s.to_string()),
        _ => None,
    };
    let Some(rendered) = ctx_str(ContextKind::InvalidArg) else {
        return first_line();
    };
    let value = ctx_str(ContextKind::InvalidValue).unwrap_or_default();
    // "--idle-gap-minutes <IDLE_GAP_MINUTES>" / "--flag" / "<NAME>"
    let long = rendered
        .strip_prefix("--")
        .map(|r| r.split([' ', '=']).next().unwrap_or(r).to_owned());
    let value_name = rendered
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(v, _)| v.to_owned());
    let arg = find_arg(cmd, long.as_deref(), value_name.as_deref());

    let env = arg
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    let hidden = arg.is_some_and(|a| a.is_hide_env_values_set());
    let value = if hidden { "***".to_owned() } else { value };
    let flag = long
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| rendered.clone());
    let target = match env {
        Some(env) => format!("{env} ({flag})"),
        None => flag,
    };
    let reason = match err.kind() {
        ErrorKind::InvalidValue => match err.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(v)) if !v.is_empty() => {
                format!("expected one of {}", v.join(", "))
            }
            _ if value.is_empty() => "a value is required".to_owned(),
            _ => "not an accepted value".to_owned(),
        },
        _ => std::error::Error::source(err)
            .map(|e| e.to_string())
            .unwrap_or_else(|| "invalid value".to_owned()),
    };
    let reason = reason.lines().next().unwrap_or("").trim().to_owned();
    let reason = if hidden {
        scrub(reason, &[&value])
    } else {
        reason
    };
    format!("invalid value {value:?} for {target}: {reason}")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
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
        assert_eq!(c.nats_url, None);
        assert_eq!(c.nats_stream, "RECAP");
        assert_eq!(c.nats_consumer, "recap");
        assert_eq!(c.nats_subject_prefix, "recap.stored");
        assert_eq!(c.stream_max_age, Duration::from_secs(7 * 86_400));
        assert!(c.nats_token.is_none() && c.nats_user.is_none() && c.nats_password.is_none());
        assert!(
            c.nats_creds_file.is_none() && c.nats_nkey_seed.is_none() && c.nats_tls_ca.is_none()
        );
        assert!(!c.nats_tls_required);
        assert_eq!(c.nats_ack_wait, None);
        assert_eq!(c.qdrant_url, None);
        assert_eq!(c.qdrant_host, "localhost");
        assert_eq!(c.qdrant_port, 6333);
        assert_eq!(c.qdrant_grpc_port, None);
        assert!(c.qdrant_api_key.is_none());
        assert!(c.database_url.is_none());
        assert_eq!(c.postgres_host, "localhost");
        assert_eq!(c.postgres_port, 5432);
        assert_eq!(c.postgres_db, "whisperengine_db");
        assert_eq!(c.postgres_user, "postgres");
        assert!(c.postgres_password.is_none());
        assert_eq!(c.postgres_sslmode, None);
        assert_eq!(c.db_max_connections, 10);
        assert_eq!(c.llm_base_url, "https://openrouter.ai/api/v1");
        assert_eq!(c.llm_model, "anthropic/claude-sonnet-4.6");
        assert!(c.openrouter_api_key.is_none() && c.llm_api_key.is_none());
        assert_eq!(c.summarizer, SummarizerChoice::Auto);
        assert_eq!(c.llm_concurrency, 4);
        assert_eq!(c.llm_requests_per_second, 5.0);
        assert_eq!(c.llm_timeout, Duration::from_secs(60));
        assert_eq!(c.llm_max_attempts, 5);
        assert_eq!(c.llm_max_retries, 4);
        assert_eq!(c.llm_max_input_tokens, 6000);
        assert_eq!(c.llm_breaker_failures, 5);
        assert_eq!(c.llm_breaker_cooldown, Duration::from_secs(30));
        assert_eq!(c.llm_price_prompt_per_mtok, 3.0);
        assert_eq!(c.llm_price_completion_per_mtok, 15.0);
        assert_eq!(c.llm_daily_budget_usd, None);
        assert_eq!(c.over_budget, OverBudget::Wait);
        assert_eq!(c.window_mode, WindowMode::Session);
        assert_eq!(c.idle_gap_minutes, 30);
        assert_eq!(c.time_window_hours, 24);
        assert_eq!(c.allowed_lateness_seconds, 120);
        assert_eq!(c.min_messages_for_summary, 5);
        assert_eq!(c.enrichment_interval_seconds, 300);
        assert_eq!(c.enrichment_batch_size, 50);
        assert_eq!(c.lookback_days, 30);
        assert_eq!(c.sweep_page_size, 1000);
        assert_eq!(c.sweep_overlap_seconds, 600);
        assert_eq!(
            c.collection_patterns,
            vec!["whisperengine_memory_*", "chat_memories_*"]
        );
        assert!(c.collection_map.is_empty());
        assert!(!c.sweep_create_index);
        assert_eq!(c.payload_user_field, "user_id");
        assert_eq!(c.payload_content_field, "content");
        assert_eq!(c.payload_role_field, "role");
        assert_eq!(c.payload_memory_type_field, "memory_type");
        assert_eq!(c.payload_timestamp_field, "timestamp");
        assert_eq!(c.payload_timestamp_unix_field, "timestamp_unix");
        assert_eq!(c.payload_emotion_field, "emotional_context");
        assert_eq!(c.content_vector_name, "content");
        assert_eq!(c.memory_types, vec!["conversation"]);
        assert_eq!(c.http_addr, "127.0.0.1:9464".parse::<SocketAddr>().unwrap());
        assert_eq!(c.instance_id, None);
        assert_eq!(c.lease_seconds, 120);
        assert_eq!(c.leader_lease_seconds, 15);
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.ready_max_lag, 10_000);
        assert_eq!(c.ingest_batch_size, 500);
        assert!(!c.rollups);
        assert_eq!(c.rollup_interval, Duration::from_secs(60));

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
        assert_eq!(c.stream_max_age, Duration::from_secs(36 * 3600));
        assert_eq!(c.llm_timeout, Duration::from_secs(90));
        assert_eq!(c.summarizer, SummarizerChoice::Extractive);
        assert_eq!(c.window_mode, WindowMode::Tumbling);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.over_budget, OverBudget::Extractive);
        assert!(c.nats_tls_required && c.sweep_create_index);
        assert_eq!(c.collection_patterns, vec!["a_*", "b_*"]);
        assert_eq!(c.memory_types, vec!["conversation", "chat"]);
        assert_eq!(
            c.collection_map,
            vec![
                ("x".to_owned(), "elena".to_owned()),
                ("y".to_owned(), "marcus".to_owned())
            ]
        );
        assert_eq!(c.nats_url.as_deref(), Some("tls://u:pw@b:4222"));
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
        assert!(c.nats_url.is_none() && c.openrouter_api_key.is_none());
        assert!(c.postgres_password.is_none() && c.database_url.is_none());
        assert!(c.instance_id.is_none() && c.nats_creds_file.is_none());
        assert!(c.collection_map.is_empty());
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
            invalid(&["--summarizer", "llm"]).to_string().starts_with(
                "SUMMARIZER=llm needs an API key (set LLM_API_KEY or OPENROUTER_API_KEY"
            )
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
}
