//! Qdrant settings: where the bots' conversation collections are (gRPC endpoint, API key).

use url::Url;

use super::{
    ConfigError, H_QDRANT, RedactedUrl, Secret, at_least, bad, bracket_host, norm_secret, norm_url,
    redact_url, set_secret, set_url,
};

/// Qdrant settings.
#[derive(clap::Args, Clone, Debug)]
pub struct QdrantConfig {
    /// Qdrant gRPC endpoint, e.g. http://qdrant:6334. Wins over QDRANT_HOST/QDRANT_PORT/QDRANT_GRPC_PORT
    #[arg(long, env = "QDRANT_URL", help_heading = H_QDRANT)]
    pub qdrant_url: Option<RedactedUrl>,

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
}

/// An `http`/`https` URL with a host (and, when written, a non-zero port).
pub(super) fn is_http_url(s: &str) -> bool {
    Url::parse(s).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some_and(|h| !h.is_empty())
            && u.port() != Some(0)
    })
}

fn is_local_host(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1")
}

impl QdrantConfig {
    pub(super) fn normalize(&mut self) {
        norm_url(&mut self.qdrant_url);
        norm_secret(&mut self.qdrant_api_key);
        self.qdrant_host = self.qdrant_host.trim().to_owned();
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = set_url(&self.qdrant_url) {
            if !is_http_url(url) {
                return bad(
                    "QDRANT_URL",
                    format!(
                        "QDRANT_URL {:?} is not an http(s) URL (set QDRANT_URL=http://host:6334)",
                        redact_url(url)
                    ),
                );
            }
            return Ok(());
        }
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
        at_least(self.qdrant_port, 1, "QDRANT_PORT", "6333")?;
        if let Some(p) = self.qdrant_grpc_port {
            at_least(p, 1, "QDRANT_GRPC_PORT", "6334")?;
        } else if self.qdrant_port == u16::MAX {
            return bad(
                "QDRANT_GRPC_PORT",
                "QDRANT_PORT 65535 leaves no gRPC port at QDRANT_PORT+1 (set QDRANT_GRPC_PORT)",
            );
        }
        Ok(())
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(url) = set_url(&self.qdrant_url) {
            if Url::parse(url).is_ok_and(|u| u.port() == Some(6333)) {
                w.push(format!(
                    "QDRANT_URL {:?} uses port 6333, Qdrant's REST port; recap speaks gRPC (usually port 6334)",
                    redact_url(url)
                ));
            }
        } else if self.qdrant_grpc_port == Some(6333) {
            w.push("QDRANT_GRPC_PORT is 6333, Qdrant's REST port; gRPC is usually 6334".to_owned());
        }
        if set_secret(&self.qdrant_api_key).is_some()
            && let Ok(u) = Url::parse(&self.grpc_url())
            && u.scheme() == "http"
            && let Some(host) = u.host_str()
            && !is_local_host(host)
        {
            w.push(format!(
                "QDRANT_API_KEY is sent unencrypted to {host}:{} (use an https:// QDRANT_URL)",
                u.port().map(|p| p.to_string()).unwrap_or_default()
            ));
        }
        w
    }

    /// Qdrant's gRPC endpoint.
    ///
    /// QDRANT_URL when set. Otherwise `http://{QDRANT_HOST}:{port}` where port is
    /// QDRANT_GRPC_PORT when set; else 6334 when QDRANT_PORT is 6333 (Qdrant's REST default,
    /// which WhisperEngine deployments set); else QDRANT_PORT + 1 (Qdrant serves gRPC one
    /// above REST by default).
    pub fn grpc_url(&self) -> String {
        if let Some(url) = set_url(&self.qdrant_url) {
            return url.trim_end_matches('/').to_owned();
        }
        let port = match self.qdrant_grpc_port {
            Some(p) => p,
            None if self.qdrant_port == 6333 => 6334,
            None => self.qdrant_port.checked_add(1).unwrap_or(6334),
        };
        format!("http://{}:{port}", bracket_host(self.qdrant_host.trim()))
    }
}
