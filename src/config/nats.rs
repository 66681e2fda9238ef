//! NATS settings: the event stream recap consumes (URL, stream, consumer, subjects, auth, TLS).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::{
    ConfigError, H_NATS, RedactedUrl, Secret, bad, norm_path, norm_secret, norm_str, norm_url,
    parse_bool, parse_duration, parse_path, redact_url, set_secret, set_str, set_url,
};

pub use crate::source::nats::PartitionBy;

/// NATS settings.
#[derive(clap::Args, Clone, Debug)]
pub struct NatsConfig {
    /// NATS server URL (nats://host:4222 or tls://host:4222). Unset: no event stream, recap runs
    /// sweep-only
    #[arg(long, env = "NATS_URL", hide_env_values = true, help_heading = H_NATS)]
    pub nats_url: Option<RedactedUrl>,

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

    /// Ingest partitions: above 1, the stream stores `<prefix>.<bot>` as `<prefix>.p.<k>.<bot>` (NATS partition()
    /// mapping by bot) and replicas share the partitions, each with its own lease, state and durable consumer
    #[arg(long, env = "NATS_PARTITIONS", default_value_t = 1, help_heading = H_NATS)]
    pub nats_partitions: u32,

    /// What the partition is a hash of, above one partition: `bot` (`<prefix>.<bot>`, what every bot publishes) or
    /// `user` (`<prefix>.<bot>.<user>`: one bot's users spread over the partitions). Events on the other subject are
    /// accepted still: recap re-publishes them on the configured one (`<NATS_CONSUMER>-route`)
    #[arg(long, env = "NATS_PARTITION_BY", value_enum, default_value_t = PartitionBy::Bot, help_heading = H_NATS)]
    pub nats_partition_by: PartitionBy,

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
}

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

/// One server URL as async-nats itself parses it ([`async_nats::ServerAddr`]: a `nats`, `tls`,
/// `ws` or `wss` URL), with what recap adds: the scheme written out (async-nats would read
/// `foo` as `nats://foo`), a host, a non-zero port, and a single server (no comma list).
fn is_server_url(url: &str) -> bool {
    url.contains("://")
        && !url.contains(',')
        && async_nats::ServerAddr::from_str(url).is_ok_and(|a| {
            let u = a.into_inner();
            u.host_str().is_some_and(|h| !h.is_empty()) && u.port() != Some(0)
        })
}

impl NatsConfig {
    pub(super) fn normalize(&mut self) {
        norm_url(&mut self.nats_url);
        norm_str(&mut self.nats_user);
        for s in [
            &mut self.nats_token,
            &mut self.nats_password,
            &mut self.nats_nkey_seed,
        ] {
            norm_secret(s);
        }
        norm_path(&mut self.nats_creds_file);
        norm_path(&mut self.nats_tls_ca);
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = set_url(&self.nats_url)
            && !is_server_url(url)
        {
            return bad(
                "NATS_URL",
                format!(
                    "NATS_URL {:?} is not a nats:// or tls:// URL (set NATS_URL=nats://host:4222 (one server), or unset it for sweep-only)",
                    redact_url(url)
                ),
            );
        }
        if !(1..=256).contains(&self.nats_partitions) {
            return bad(
                "NATS_PARTITIONS",
                format!(
                    "NATS_PARTITIONS {} is not between 1 and 256 (set NATS_PARTITIONS=1, or 8 to share ingest between replicas)",
                    self.nats_partitions
                ),
            );
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
                "STREAM_MAX_AGE must be at least 1m (set STREAM_MAX_AGE=7d)",
            );
        }
        if self
            .nats_ack_wait
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return bad(
                "NATS_ACK_WAIT",
                "NATS_ACK_WAIT must be at least 1s (set NATS_ACK_WAIT=30s, or unset it)",
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
        Ok(())
    }

    /// Settings for [`crate::source::nats`]; `batch_size` is INGEST_BATCH_SIZE.
    pub(super) fn settings(&self, batch_size: usize) -> crate::source::nats::NatsSettings {
        let secret = |s: &Option<Secret>| set_secret(s).map(|s| s.expose().to_owned());
        crate::source::nats::NatsSettings {
            url: set_url(&self.nats_url).unwrap_or_default().to_owned(),
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
            batch_size,
            ack_wait: self.nats_ack_wait.unwrap_or(Duration::ZERO),
            partitions: self.nats_partitions,
            partition_by: self.nats_partition_by,
            partition: None,
        }
    }
}
