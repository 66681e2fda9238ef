//! recap's configuration: one typed [`Config`] built by clap from command-line flags and
//! environment variables, checked once at start by [`Config::validate`].
//!
//! Every setting has a flag (`--idle-gap-minutes`) and an environment variable
//! (`IDLE_GAP_MINUTES`); a flag wins over the variable. The variables WhisperEngine operators
//! already set (`QDRANT_HOST`, `QDRANT_PORT`, `POSTGRES_*`, `ENRICHMENT_INTERVAL_SECONDS`,
//! `ENRICHMENT_BATCH_SIZE`, `LLM_MODEL`, `OPENROUTER_API_KEY`, `MIN_MESSAGES_FOR_SUMMARY`,
//! `TIME_WINDOW_HOURS`, `LOOKBACK_DAYS`) keep their meaning and defaults.
//!
//! [`Config`] composes one section per concern (clap `#[command(flatten)]`), each in its own
//! file owning its flags, defaults, normalization and validation: [`NatsConfig`],
//! [`QdrantConfig`], [`PostgresConfig`], [`LlmConfig`], [`WindowConfig`], [`SweepConfig`],
//! [`PayloadConfig`], [`ServiceConfig`]. Read a setting as `cfg.<section>.<field>`
//! (`cfg.windows.idle_gap_minutes`).
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
use std::path::PathBuf;
use std::time::Duration;

mod builders;
mod clap_error;
mod llm;
mod nats;
mod payload;
mod postgres;
mod qdrant;
mod secret;
mod service;
mod sweep;
mod windows;

#[cfg(test)]
mod tests;

pub use builders::{llm_settings, sweep_settings, sweep_settings_for_partition};
pub use clap_error::one_line_clap_error;
pub use llm::{LlmConfig, OverBudget, SummarizerChoice};
pub use nats::NatsConfig;
pub use payload::PayloadConfig;
pub use postgres::PostgresConfig;
pub use qdrant::QdrantConfig;
pub use secret::{RedactedUrl, Secret};
pub use service::{LogFormat, SecureCookie, ServiceConfig};
pub use sweep::{SweepConfig, is_valid_bot_name};
pub use windows::{WindowConfig, WindowMode};

use secret::redact_url;

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

/// `Err` naming `var` with the one-line `message`.
fn bad(var: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::invalid(var, message))
}

/// `{var} must be at least {min} (set {var}={default})`.
fn at_least<T: PartialOrd + fmt::Display>(
    value: T,
    min: T,
    var: &'static str,
    default: &str,
) -> Result<(), ConfigError> {
    if value < min {
        return bad(
            var,
            format!("{var} must be at least {min} (set {var}={default})"),
        );
    }
    Ok(())
}

/// `{var} must be at most {max} (got {value}; set {var}={default})`.
fn at_most<T: PartialOrd + fmt::Display>(
    value: T,
    max: T,
    var: &'static str,
    default: &str,
) -> Result<(), ConfigError> {
    if value > max {
        return bad(
            var,
            format!("{var} must be at most {max} (got {value}; set {var}={default})"),
        );
    }
    Ok(())
}

/// `{var} is empty (set {var}={default})` for a blank value.
fn non_empty(value: &str, var: &'static str, default: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return bad(var, format!("{var} is empty (set {var}={default})"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Value parsers and blank-means-unset helpers shared by the sections
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

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "no" | "n" | "off" | "" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

/// `Some` only for a non-blank value.
fn set_str(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn set_secret(v: &Option<Secret>) -> Option<&Secret> {
    v.as_ref().filter(|s| !s.is_blank())
}

/// `Some` only for a non-blank URL, trimmed.
fn set_url(v: &Option<RedactedUrl>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn norm_str(v: &mut Option<String>) {
    if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
        *v = None;
    } else if let Some(s) = v {
        *s = s.trim().to_owned();
    }
}

fn norm_url(v: &mut Option<RedactedUrl>) {
    if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
        *v = None;
    } else if let Some(s) = v
        && s.trim().len() != s.len()
    {
        *s = RedactedUrl::from(s.trim().to_owned());
    }
}

fn norm_secret(v: &mut Option<Secret>) {
    if v.as_ref().is_some_and(Secret::is_blank) {
        *v = None;
    }
}

fn norm_path(v: &mut Option<PathBuf>) {
    if v.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        *v = None;
    }
}

fn norm_list(v: &mut Vec<String>) {
    v.iter_mut().for_each(|s| *s = s.trim().to_owned());
    v.retain(|s| !s.is_empty());
}

fn bracket_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
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
    doc = "All of recap's settings (flattened into each subcommand), one section per concern. \
           Parse with clap, then call [`Config::normalize`] and [`Config::validate`]. `Debug` \
           shows no secret: [`Secret`]s print `***`, [`RedactedUrl`]s mask their credentials."
)]
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub qdrant: QdrantConfig,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub llm: LlmConfig,
    #[command(flatten)]
    pub windows: WindowConfig,
    #[command(flatten)]
    pub sweep: SweepConfig,
    #[command(flatten)]
    pub payload: PayloadConfig,
    #[command(flatten)]
    pub service: ServiceConfig,
}

impl Config {
    /// Treats empty values as unset: `NATS_URL=` (as compose files often write) becomes `None`,
    /// blank secrets become `None`, and list entries are trimmed with empty ones dropped
    /// (`COLLECTION_PATTERNS=a,,b` → `[a, b]`). Call once after parsing, before [`validate`].
    /// (The other methods already treat blank values as unset.)
    ///
    /// [`validate`]: Config::validate
    pub fn normalize(&mut self) {
        self.nats.normalize();
        self.qdrant.normalize();
        self.postgres.normalize();
        self.llm.normalize();
        self.sweep.normalize();
        self.payload.normalize();
        self.service.normalize();
    }

    /// Checks every setting; the first problem comes back as one line naming the variable and
    /// what to set (e.g. `IDLE_GAP_MINUTES must be at least 1 (set IDLE_GAP_MINUTES=30)`).
    /// Never includes a secret. Checks that NATS_CREDS_FILE / NATS_TLS_CA exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.service.validate_access()?;
        self.nats.validate()?;
        self.qdrant.validate()?;
        self.postgres.validate()?;
        self.llm.validate()?;
        self.windows.validate()?;
        self.sweep.validate()?;
        self.payload.validate()?;
        self.service.validate()
    }

    /// Things that are allowed but probably not meant, one line each, for logging at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if set_url(&self.nats.nats_url).is_none() {
            w.push(format!(
                "NATS_URL is not set: running sweep-only (new messages are picked up every {}s, ENRICHMENT_INTERVAL_SECONDS)",
                self.sweep.enrichment_interval_seconds
            ));
        }
        if self.llm.summarizer == SummarizerChoice::Auto && self.llm.llm_api_key().is_none() {
            w.push("no LLM API key (LLM_API_KEY or OPENROUTER_API_KEY): using the extractive summarizer".to_owned());
        }
        w.extend(self.qdrant.warnings());
        if set_url(&self.postgres.database_url).is_some()
            && set_secret(&self.postgres.postgres_password).is_some()
        {
            w.push(
                "DATABASE_URL is set, so POSTGRES_HOST/PORT/DB/USER/PASSWORD are ignored"
                    .to_owned(),
            );
        }
        if u64::from(self.service.lease_seconds) <= self.llm.llm_timeout.as_secs() {
            w.push(format!(
                "LEASE_SECONDS ({}) is not longer than LLM_TIMEOUT ({}s): a window may be re-claimed while its summary is still being written",
                self.service.lease_seconds,
                self.llm.llm_timeout.as_secs()
            ));
        }
        w.extend(self.windows.warnings());
        w
    }

    /// NATS_URL with credentials masked (`nats://user:***@host`), for messages; `None` when unset.
    pub fn nats_url_redacted(&self) -> Option<String> {
        set_url(&self.nats.nats_url).map(redact_url)
    }

    /// Settings for [`crate::source::nats`]: NATS_URL (empty string when unset: check
    /// `nats_url` first), stream, consumer, subjects, auth, TLS; `batch_size` is
    /// INGEST_BATCH_SIZE; `ack_wait` zero keeps the value in `nats/consumer.json`.
    pub fn nats_settings(&self) -> crate::source::nats::NatsSettings {
        self.nats.settings(self.service.ingest_batch_size)
    }

    /// The window settings for [`crate::tracker`]: WINDOW_MODE, IDLE_GAP_MINUTES,
    /// TIME_WINDOW_HOURS (window length / longest session) and ALLOWED_LATENESS_SECONDS in ms.
    pub fn tracker_config(&self) -> crate::tracker::TrackerConfig {
        self.windows.tracker_config()
    }

    /// The payload field names (PAYLOAD_*_FIELD, CONTENT_VECTOR_NAME, MEMORY_TYPES) for
    /// [`crate::fetch`].
    pub fn payload_mapping(&self) -> crate::fetch::PayloadMapping {
        self.payload.mapping()
    }

    /// Qdrant's gRPC endpoint (see [`QdrantConfig::grpc_url`]).
    pub fn qdrant_grpc_url(&self) -> String {
        self.qdrant.grpc_url()
    }

    /// Postgres connection options (see [`PostgresConfig::connect_options`]).
    pub fn pg_connect_options(&self) -> Result<sqlx::postgres::PgConnectOptions, ConfigError> {
        self.postgres.connect_options()
    }

    /// Where Postgres is, without credentials: `host:port/db` (for messages such as
    /// `Postgres 127.0.0.1:5432/whisperengine_db: connection refused`).
    pub fn postgres_display(&self) -> String {
        self.postgres.display()
    }

    /// DATABASE_URL with its password (and password-like query values) replaced by `***`;
    /// `None` when unset.
    pub fn database_url_redacted(&self) -> Option<String> {
        set_url(&self.postgres.database_url).map(redact_url)
    }

    /// The LLM API key: LLM_API_KEY, else OPENROUTER_API_KEY (blank values count as unset).
    pub fn llm_api_key(&self) -> Option<&Secret> {
        self.llm.llm_api_key()
    }

    /// Whether summaries come from the LLM: SUMMARIZER=llm, or auto with an API key.
    pub fn use_llm(&self) -> bool {
        self.llm.use_llm()
    }

    /// The bot a Qdrant collection belongs to, or `None` if recap should not read it
    /// (see [`SweepConfig::bot_for_collection`]).
    pub fn bot_for_collection(&self, name: &str) -> Option<String> {
        self.sweep.bot_for_collection(name)
    }

    /// This instance's id: INSTANCE_ID, else `hostname:pid`.
    pub fn instance_id(&self) -> String {
        self.service.instance_id()
    }

    /// The idle gap (IDLE_GAP, else IDLE_GAP_MINUTES) as a duration.
    pub fn idle_gap(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::milliseconds(self.windows.idle_gap_ms())
    }

    /// The idle gap in milliseconds: IDLE_GAP when set (whole milliseconds), else IDLE_GAP_MINUTES.
    pub fn idle_gap_ms(&self) -> i64 {
        self.windows.idle_gap_ms()
    }

    /// TIME_WINDOW_HOURS as a duration.
    pub fn time_window(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::hours(i64::from(self.windows.time_window_hours))
    }

    /// ALLOWED_LATENESS_SECONDS as a duration.
    pub fn allowed_lateness(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::seconds(i64::from(self.windows.allowed_lateness_seconds))
    }
}
