//! PostgreSQL settings: where recap writes summaries (DATABASE_URL or the POSTGRES_* parts).

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::secret::{scrub, url_secrets};
use super::{
    ConfigError, H_PG, RedactedUrl, Secret, at_least, bad, bracket_host, non_empty, norm_secret,
    norm_str, norm_url, redact_url, set_secret, set_str, set_url,
};

/// PostgreSQL settings.
#[derive(clap::Args, Clone, Debug)]
pub struct PostgresConfig {
    /// PostgreSQL URL (postgres://user:password@host:5432/db?sslmode=require). When set, the
    /// POSTGRES_HOST/PORT/DB/USER/PASSWORD settings are ignored
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, help_heading = H_PG)]
    pub database_url: Option<RedactedUrl>,

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
}

const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

fn is_postgres_url(u: &str) -> bool {
    u.starts_with("postgres://") || u.starts_with("postgresql://")
}

fn bad_sslmode(mode: &str) -> ConfigError {
    ConfigError::invalid(
        "POSTGRES_SSLMODE",
        format!(
            "POSTGRES_SSLMODE {mode:?} is not one of {} (set POSTGRES_SSLMODE=prefer)",
            SSL_MODES.join("|")
        ),
    )
}

impl PostgresConfig {
    pub(super) fn normalize(&mut self) {
        norm_url(&mut self.database_url);
        norm_secret(&mut self.postgres_password);
        norm_str(&mut self.postgres_sslmode);
        for s in [
            &mut self.postgres_host,
            &mut self.postgres_db,
            &mut self.postgres_user,
        ] {
            *s = s.trim().to_owned();
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = set_url(&self.database_url) {
            if !is_postgres_url(u) {
                return bad(
                    "DATABASE_URL",
                    "DATABASE_URL must start with postgres:// or postgresql:// (set DATABASE_URL=postgres://user:password@host:5432/db, or unset it and use POSTGRES_HOST etc.)",
                );
            }
        } else {
            non_empty(&self.postgres_host, "POSTGRES_HOST", "localhost")?;
            at_least(self.postgres_port, 1, "POSTGRES_PORT", "5432")?;
            non_empty(&self.postgres_db, "POSTGRES_DB", "whisperengine_db")?;
            non_empty(&self.postgres_user, "POSTGRES_USER", "postgres")?;
        }
        if let Some(mode) = set_str(&self.postgres_sslmode)
            && !SSL_MODES.contains(&mode.to_ascii_lowercase().as_str())
        {
            return Err(bad_sslmode(mode));
        }
        self.connect_options()?;
        at_least(self.db_max_connections, 1, "DB_MAX_CONNECTIONS", "10")
    }

    /// Postgres connection options: from DATABASE_URL when set (used as is, except that
    /// POSTGRES_SSLMODE applies when the URL has no `sslmode`), else from POSTGRES_HOST, _PORT,
    /// _DB, _USER, _PASSWORD and _SSLMODE (unset values fall back to libpq's PG* variables and
    /// ~/.pgpass). Sets `application_name=recap` unless the URL names one.
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let sslmode = match set_str(&self.postgres_sslmode) {
            Some(m) => Some(PgSslMode::from_str(m).map_err(|_| bad_sslmode(m))?),
            None => None,
        };
        let mut opts = if let Some(u) = set_url(&self.database_url) {
            if !is_postgres_url(u) {
                return Err(ConfigError::invalid(
                    "DATABASE_URL",
                    "DATABASE_URL must start with postgres:// or postgresql:// (set DATABASE_URL=postgres://user:password@host:5432/db)",
                ));
            }
            let opts = PgConnectOptions::from_str(u).map_err(|e| {
                let mut secrets = url_secrets(u);
                secrets.push(u.to_owned());
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
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
            let url_has_sslmode = url::Url::parse(u).is_ok_and(|url| {
                url.query_pairs()
                    .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
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

    /// Where Postgres is, without credentials: `host:port/db`.
    pub fn display(&self) -> String {
        if let Some(u) = set_url(&self.database_url) {
            return match PgConnectOptions::from_str(u) {
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
}
