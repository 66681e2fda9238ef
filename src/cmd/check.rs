//! `recap check`: one line per service in plain words; non-zero exit when anything is wrong.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(5);

/// One checked thing: its name, whether it is fine, and the line to print.
pub struct Line {
    pub ok: bool,
    pub text: String,
}

fn line(ok: bool, text: String) -> Line {
    Line { ok, text }
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(plain_cause(&e.to_string())),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// Turns library error text into the cause an operator recognises.
fn plain_cause(e: &str) -> String {
    let l = e.to_lowercase();
    if l.contains("connection refused") {
        "connection refused".into()
    } else if l.contains("password authentication failed") {
        "password authentication failed".into()
    } else if l.contains("does not exist") {
        e.lines().next().unwrap_or(e).to_string()
    } else if l.contains("timed out") || l.contains("timeout") {
        "no answer (timed out)".into()
    } else {
        e.lines().next().unwrap_or(e).to_string()
    }
}

pub async fn run_checks(cfg: &Config, llm: bool) -> Vec<Line> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut out = Vec::new();
    // Postgres
    let pg = cfg.postgres_display();
    match cfg.pg_connect_options() {
        Err(e) => out.push(line(false, format!("Postgres: {e}"))),
        // One plain connection: a pool would retry a refused connection until its acquire timeout.
        Ok(opts) => match timed(<sqlx::PgConnection as sqlx::Connection>::connect_with(&opts)).await {
            Ok(mut conn) => {
                let migrated: Result<Option<String>, _> =
                    sqlx::query_scalar("SELECT to_regclass('recap_windows')::text").fetch_one(&mut conn).await;
                let schema = match migrated {
                    Ok(Some(_)) => "schema up to date".to_string(),
                    _ => "recap tables missing — run `recap migrate`".to_string(),
                };
                out.push(line(true, format!("Postgres {pg}: reachable; {schema}")));
            }
            Err(cause) => {
                out.push(line(false, format!("Postgres {pg}: {cause} — is it running? set DATABASE_URL or POSTGRES_HOST/POSTGRES_PORT")))
            }
        },
    }
    // Qdrant
    let url = cfg.qdrant_grpc_url();
    match super::points(cfg) {
        Err(e) => out.push(line(false, format!("Qdrant {url}: {e}"))),
        Ok(points) => match timed(points.collections(true)).await {
            Ok(colls) => {
                let mapped: Vec<String> =
                    colls.iter().filter_map(|c| cfg.bot_for_collection(c).map(|b| format!("{c} -> {b}"))).collect();
                out.push(line(true, format!("Qdrant {url}: reachable; {} collection(s)", colls.len())));
                if mapped.is_empty() {
                    out.push(line(
                        false,
                        format!(
                            "Qdrant collections: none maps to a bot ({} seen) — set COLLECTION_PATTERNS or COLLECTION_MAP",
                            colls.len()
                        ),
                    ));
                } else {
                    let shown = mapped.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
                    let more = mapped.len().saturating_sub(10);
                    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                    out.push(line(true, format!("Qdrant collections: {shown}{more}")));
                }
            }
            Err(cause) => out.push(line(
                false,
                format!("Qdrant {url}: {cause} — is it running? set QDRANT_URL (gRPC, e.g. http://host:6334) or QDRANT_HOST/QDRANT_GRPC_PORT"),
            )),
        },
    }
    // NATS
    match &cfg.nats.nats_url {
        None => out.push(line(
            true,
            "NATS: not configured (NATS_URL unset) — recap runs on the Qdrant sweep alone".into(),
        )),
        Some(_) => {
            let nats_url = cfg.nats_url_redacted().unwrap_or_default();
            let s = cfg.nats_settings();
            match timed(crate::source::nats::connect(&s, false)).await {
                Err(cause) => out.push(line(
                    false,
                    format!("NATS {nats_url}: {cause} — is it running? set NATS_URL"),
                )),
                Ok(client) => {
                    out.push(line(true, format!("NATS {nats_url}: reachable")));
                    let js = async_nats::jetstream::new(client);
                    match timed(js.get_stream(&s.stream)).await {
                        Err(cause) => out.push(line(
                            false,
                            format!("NATS stream {}: {cause} — `recap run` creates it", s.stream),
                        )),
                        Ok(stream) => match timed(stream.consumer_info(&s.consumer)).await {
                            Ok(info) => out.push(line(
                                true,
                                format!(
                                    "NATS stream {} and consumer {}: present, {} pending",
                                    s.stream, s.consumer, info.num_pending
                                ),
                            )),
                            Err(cause) => out.push(line(
                                false,
                                format!(
                                    "NATS consumer {}: {cause} — `recap run` creates it",
                                    s.consumer
                                ),
                            )),
                        },
                    }
                }
            }
        }
    }
    if llm {
        out.push(match super::llm_probe(cfg).await {
            Ok(text) => line(
                true,
                format!("LLM {}: answered ({text})", cfg.llm.llm_base_url),
            ),
            // a missing model names LLM_MODEL already; anything else points at the endpoint and the key
            Err(cause) if cause.contains("(LLM_MODEL)") => {
                line(false, format!("LLM {}: {cause}", cfg.llm.llm_base_url))
            }
            Err(cause) => line(
                false,
                format!(
                    "LLM {}: {cause} — check LLM_BASE_URL and LLM_API_KEY/OPENROUTER_API_KEY",
                    cfg.llm.llm_base_url
                ),
            ),
        });
    }
    out
}

pub async fn check(cfg: &Config, llm: bool) -> anyhow::Result<ExitCode> {
    let lines = run_checks(cfg, llm).await;
    for l in &lines {
        println!("{} {}", if l.ok { "ok  " } else { "FAIL" }, l.text);
    }
    Ok(if lines.iter().all(|l| l.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
