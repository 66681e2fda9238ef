//! Service settings: the HTTP server (console, recall API), instance identity and leases,
//! shutdown, logging, ingest batches and rollups.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    ConfigError, H_SVC, Secret, at_least, bad, norm_secret, norm_str, parse_bool, parse_duration,
    set_secret, set_str,
};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether the console's session cookie is `Secure` (see `console::auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecureCookie {
    /// Secure when a TLS-terminating proxy says the request came over HTTPS (X-Forwarded-Proto / Forwarded).
    Auto,
    /// Always Secure: recap is reached only through HTTPS.
    On,
    /// Never Secure (plain HTTP on a private network).
    Off,
}

/// Service settings.
#[derive(clap::Args, Clone, Debug)]
pub struct ServiceConfig {
    /// Address of the HTTP server (/healthz, /readyz, /metrics)
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:9464", help_heading = H_SVC)]
    pub http_addr: SocketAddr,

    /// Token that logs in to the web console at /console; without it the console is served only on a loopback
    /// HTTP_ADDR
    #[arg(long, env = "CONSOLE_TOKEN", hide_env_values = true, help_heading = H_SVC)]
    pub console_token: Option<Secret>,

    /// Console session cookie `Secure` with a `__Host-` name: auto (when a TLS proxy sends X-Forwarded-Proto: https or
    /// Forwarded: proto=https), on (always; recap is reached only over HTTPS) or off
    #[arg(long, env = "CONSOLE_SECURE_COOKIE", value_enum, ignore_case = true, default_value = "auto", help_heading = H_SVC)]
    pub console_secure_cookie: SecureCookie,

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

    /// How often ingest writes a checkpoint of its open windows, closed windows and stream position (then acks)
    #[arg(long, env = "CHECKPOINT_INTERVAL", default_value = "1s", value_parser = parse_duration, help_heading = H_SVC)]
    pub checkpoint_interval: Duration,

    /// Events read before a checkpoint is written, whichever of this and CHECKPOINT_INTERVAL comes first
    #[arg(long, env = "CHECKPOINT_MESSAGES", default_value_t = 50_000, help_heading = H_SVC)]
    pub checkpoint_messages: usize,

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

    /// Postgres connections of the recall API and the console (their own pool, so reads never take ingest's)
    #[arg(long, env = "RECALL_POOL_SIZE", default_value_t = 4, help_heading = H_SVC)]
    pub recall_pool_size: u32,

    /// Longest a recall or console statement may run (Postgres statement_timeout on the read pool), e.g. 5s
    #[arg(long, env = "RECALL_STATEMENT_TIMEOUT", default_value = "5s", value_parser = parse_duration, help_heading = H_SVC)]
    pub recall_statement_timeout: Duration,

    /// Recall API requests served at once; more wait for a free slot
    #[arg(long, env = "RECALL_CONCURRENCY", default_value_t = 16, help_heading = H_SVC)]
    pub recall_concurrency: usize,

    /// How often the summary-vector repair pass runs (e.g. 60s)
    #[arg(long, env = "RECALL_REPAIR_INTERVAL", default_value = "60s", value_parser = parse_duration, help_heading = H_SVC)]
    pub recall_repair_interval: Duration,
}

/// The machine's host name (gethostname(2) through `whoami`; in a container, the container's).
fn hostname() -> String {
    whoami::hostname()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

impl ServiceConfig {
    pub(super) fn normalize(&mut self) {
        norm_str(&mut self.instance_id);
        norm_secret(&mut self.recall_token);
        norm_secret(&mut self.console_token);
    }

    /// Who may reach the HTTP server (checked first): CONSOLE_TOKEN, RECALL_TOKEN,
    /// RECALL_REPAIR_INTERVAL.
    pub(super) fn validate_access(&self) -> Result<(), ConfigError> {
        if set_secret(&self.console_token).is_some_and(|t| t.expose().trim().len() < 16) {
            return bad(
                "CONSOLE_TOKEN",
                "CONSOLE_TOKEN must be at least 16 characters (set CONSOLE_TOKEN=$(openssl rand -hex 16))",
            );
        }
        if set_secret(&self.recall_token).is_some_and(|t| t.expose().trim().len() < 16) {
            return bad(
                "RECALL_TOKEN",
                "RECALL_TOKEN must be at least 16 characters (set RECALL_TOKEN=$(openssl rand -hex 16))",
            );
        }
        if !self.http_addr.ip().is_loopback() && set_secret(&self.recall_token).is_none() {
            return bad(
                "RECALL_TOKEN",
                format!(
                    "RECALL_TOKEN is not set but HTTP_ADDR {} is not loopback: the recall API would be open (set RECALL_TOKEN=<a long random string>, or HTTP_ADDR=127.0.0.1:9464)",
                    self.http_addr
                ),
            );
        }
        at_least(self.recall_pool_size, 1, "RECALL_POOL_SIZE", "4")?;
        at_least(self.recall_concurrency, 1, "RECALL_CONCURRENCY", "16")?;
        if self.recall_statement_timeout < Duration::from_millis(100) {
            return bad(
                "RECALL_STATEMENT_TIMEOUT",
                "RECALL_STATEMENT_TIMEOUT must be at least 100ms (set RECALL_STATEMENT_TIMEOUT=5s)",
            );
        }
        if self.recall_repair_interval < Duration::from_secs(1) {
            return bad(
                "RECALL_REPAIR_INTERVAL",
                "RECALL_REPAIR_INTERVAL must be at least 1s (set RECALL_REPAIR_INTERVAL=60s)",
            );
        }
        Ok(())
    }

    /// The rest of the service settings (checked last).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = set_str(&self.instance_id)
            && (id.len() > 200 || id.chars().any(char::is_control))
        {
            return bad(
                "INSTANCE_ID",
                "INSTANCE_ID must be 1 to 200 printable characters (or unset it for hostname:pid)",
            );
        }
        at_least(self.lease_seconds, 2, "LEASE_SECONDS", "120")?;
        at_least(self.leader_lease_seconds, 2, "LEADER_LEASE_SECONDS", "15")?;
        at_least(self.ingest_batch_size, 1, "INGEST_BATCH_SIZE", "500")?;
        at_least(self.checkpoint_messages, 1, "CHECKPOINT_MESSAGES", "50000")?;
        if self.checkpoint_interval.is_zero() {
            return bad(
                "CHECKPOINT_INTERVAL",
                "CHECKPOINT_INTERVAL must be above 0 (set CHECKPOINT_INTERVAL=1s)",
            );
        }
        if self.rollup_interval < Duration::from_secs(1) {
            return bad(
                "ROLLUP_INTERVAL",
                "ROLLUP_INTERVAL must be at least 1s (set ROLLUP_INTERVAL=60s)",
            );
        }
        Ok(())
    }

    /// This instance's id: INSTANCE_ID, else `hostname:pid`.
    pub fn instance_id(&self) -> String {
        match set_str(&self.instance_id) {
            Some(id) => id.to_owned(),
            None => format!("{}:{}", hostname(), std::process::id()),
        }
    }
}
