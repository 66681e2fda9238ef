//! Operations HTTP endpoint: `/healthz` (alive), `/readyz` (dependencies reachable, consumer caught up) and
//! `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::fetch::Points;
use crate::sink::Store;

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 1800.0,
                ])
                .expect("static buckets")
                .install_recorder()
                .expect("metrics recorder installs once");
            // every metric's help, every counter at 0 (so alerts over a counter that never moved can fire)
            crate::telemetry::register();
            handle
        })
        .clone()
}

/// The `metrics` registry's text plus what it cannot hold: the f64 counter `recap_llm_cost_usd_total` and
/// `recap_build_info{version,git} 1` (the crate version, and the commit from RECAP_GIT_COMMIT at build time).
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    use std::fmt::Write;
    let mut text = handle.render();
    let _ = write!(
        text,
        "# HELP recap_llm_cost_usd_total USD spent on LLM calls since start.\n\
         # TYPE recap_llm_cost_usd_total counter\n\
         recap_llm_cost_usd_total {}\n\
         # HELP recap_build_info The running recap's version and git commit.\n\
         # TYPE recap_build_info gauge\n\
         recap_build_info{{version=\"{}\",git=\"{}\"}} 1\n",
        crate::summarize::llm::cost_usd_total(),
        env!("CARGO_PKG_VERSION"),
        option_env!("RECAP_GIT_COMMIT").unwrap_or("unknown"),
    );
    text
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub store: Store,
    pub points: Arc<Points>,
    pub nats: Option<async_nats::Client>,
    /// Consumer lag (messages pending) above which recap is not ready.
    pub max_lag: u64,
    pub lag: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ReadyReport {
    pub ready: bool,
    pub postgres: String,
    pub qdrant: String,
    pub nats: String,
    pub consumer_lag: u64,
}

impl Readiness {
    pub async fn check(&self) -> ReadyReport {
        let timeout = Duration::from_secs(2);
        let postgres = match tokio::time::timeout(timeout, self.store.ping()).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => format!("unreachable: {e}"),
            Err(_) => "timeout".to_string(),
        };
        let qdrant = match tokio::time::timeout(timeout, self.points.client().health_check()).await
        {
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(e)) => format!("unreachable: {e}"),
            Err(_) => "timeout".to_string(),
        };
        let nats = match &self.nats {
            None => "not configured".to_string(),
            Some(c) => match c.connection_state() {
                async_nats::connection::State::Connected => "ok".to_string(),
                s => format!("{s:?}").to_lowercase(),
            },
        };
        let consumer_lag = self.lag.load(std::sync::atomic::Ordering::Relaxed);
        let ready = postgres == "ok"
            && qdrant == "ok"
            && (nats == "ok" || self.nats.is_none())
            && consumer_lag <= self.max_lag;
        ReadyReport {
            ready,
            postgres,
            qdrant,
            nats,
            consumer_lag,
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    ready: Readiness,
}

pub fn router(metrics: PrometheusHandle, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                let r = s.ready.check().await;
                let code = if r.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, Json(r))
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                // The status gauges come from the snapshot `recap status` and the console read.
                let snap = crate::status::snapshot(&s.ready.store, None);
                if let Ok(Ok(snap)) = tokio::time::timeout(Duration::from_secs(2), snap).await {
                    snap.publish_gauges();
                }
                render_metrics(&s.metrics)
            }),
        )
        .with_state(AppState { metrics, ready })
}

/// Serves until `shutdown`. Handlers see the client's address (`ConnectInfo<SocketAddr>`; the console's login
/// throttle is keyed by it).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// Whether a `Host` value names this machine's loopback: `localhost`, an address in 127.0.0.0/8 or `[::1]`, with or
/// without a port. Open (no token, loopback listener) access answers only such requests, so a DNS-rebinding page or a
/// reverse proxy under another name cannot reach the console or the recall API.
pub fn is_loopback_host(host: &str) -> bool {
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok) => {
                ip.parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|a| a.is_loopback())
            }
            _ => false,
        };
    }
    let name = match host.split_once(':') {
        Some((h, p)) if port_ok(p) => h,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// The request's host (`Host`, or the URI's authority for HTTP/2 and absolute-form requests) is loopback.
pub fn loopback_host(req: &axum::extract::Request) -> bool {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    host.is_some_and(is_loopback_host)
}

/// The 421 for a request to an open (loopback, no token) server under a name that is not loopback.
pub fn not_loopback_host(what: &str, token: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        StatusCode::MISDIRECTED_REQUEST,
        Json(serde_json::json!({
            "error": format!("without {token}, {what} answers only requests for localhost, 127.0.0.1 or [::1] (the Host header); set {token} to serve it under other names"),
            "field": "host",
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:9464",
            "127.0.0.1",
            "127.0.0.1:9464",
            "127.8.9.10:1",
            "[::1]",
            "[::1]:9464",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "128.0.0.1",
            "0.0.0.0",
            "10.0.0.1:9464",
            "[::2]",
            "[::1]x",
            "[::1]:",
            "localhost:",
            "localhost:94a",
            "::1",
            "[::ffff:7f00:1]",
            "127.0.0.1:9464:1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
