//! Subcommands. Each file is one command; `dispatch` is the only entry point the binary calls.

mod check;
mod replay;
mod run;
pub use run::{read_store, recall_state};
mod status;
mod sweep;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::fetch::Points;
use crate::sink::Store;
use crate::summarize::Summarizer;

#[derive(Parser, Debug)]
#[command(
    name = "recap",
    version,
    about = "Summarizes chat-bot conversations from Qdrant into PostgreSQL, driven by NATS JetStream events."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the service: consume events (or sweep only without NATS_URL), close windows, write summaries.
    Run {
        #[command(flatten)]
        cfg: Config,
        /// Ignore NATS_URL and run on the Qdrant sweep alone.
        #[arg(long)]
        no_nats: bool,
    },
    /// Check every configured service and say in plain words what is wrong. Exits non-zero on any failure.
    Check {
        #[command(flatten)]
        cfg: Config,
        /// Also make one tiny call to the LLM endpoint.
        #[arg(long)]
        llm: bool,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        cfg: Config,
    },
    /// Windows by state, oldest due window, dead letters, checkpoints.
    Status {
        #[command(flatten)]
        cfg: Config,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Summarize again, with the configured summarizer, the windows whose row another summarizer wrote (an LLM pass
    /// over rows the extractive fallback wrote). The running service does the work; rows keep their id.
    Resummarize {
        #[command(flatten)]
        cfg: Config,
        /// Rows written by this summarizer are redone.
        #[arg(long, default_value = "extractive", value_parser = ["extractive", "llm"])]
        from: String,
        /// Only windows that start within this long ago (e.g. 7d, 36h).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
    },
    /// Re-read the JetStream stream from a sequence or a time through the same path (stop `recap run` first).
    Replay {
        #[command(flatten)]
        cfg: Config,
        /// First stream sequence to read.
        #[arg(long, conflicts_with = "since", required_unless_present = "since")]
        from_seq: Option<u64>,
        /// Read events stored since this time (RFC 3339, e.g. 2026-11-20T00:00:00Z).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// One sweep cycle over the bot collections, then summarize what closed, and exit (for cron).
    /// Without --once, the same as `run --no-nats`.
    Sweep {
        #[command(flatten)]
        cfg: Config,
        #[arg(long)]
        once: bool,
    },
    /// Summarize history: sweep every bot collection from --since back (default LOOKBACK_DAYS), in bounded memory,
    /// resumable after an interruption (done windows are not redone).
    Backfill {
        #[command(flatten)]
        cfg: Config,
        /// How far back (e.g. 30d); default LOOKBACK_DAYS.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
    },
    /// Put dead-lettered windows back to due.
    Retry {
        #[command(flatten)]
        cfg: Config,
        /// Every dead window.
        #[arg(long, conflicts_with = "window")]
        all: bool,
        /// One window by id.
        #[arg(long)]
        window: Option<i64>,
    },
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,h2=warn,tower=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Normalizes (empty values mean unset), validates, and logs the configuration's warnings.
fn validated(cfg: &mut Config) -> anyhow::Result<()> {
    cfg.normalize();
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Applies recap's migrations only when one is pending: an up-to-date schema needs no CREATE privilege, so every
/// subcommand works with the read/write grants of docs/operate.md while `recap migrate` (or the first start) runs as
/// the schema's owner. Returns whether it migrated.
pub async fn migrate_if_pending(store: &Store) -> anyhow::Result<bool> {
    if store.migrations_pending().await? {
        store.migrate().await?;
        return Ok(true);
    }
    Ok(false)
}

pub async fn connect_store(cfg: &Config) -> anyhow::Result<Store> {
    let opts = cfg.pg_connect_options()?;
    Store::connect(opts, cfg.postgres.db_max_connections)
        .await
        .map(|s| s.with_running_summaries(cfg.windows.context_summary_every))
        .map_err(|e| {
            anyhow::anyhow!(
                "Postgres {}: {e} — is it running? set DATABASE_URL or POSTGRES_HOST/PORT",
                cfg.postgres_display()
            )
        })
}

pub fn points(cfg: &Config) -> anyhow::Result<Arc<Points>> {
    Ok(Arc::new(Points::new(
        &cfg.qdrant_grpc_url(),
        cfg.qdrant.qdrant_api_key.as_ref().map(|k| k.expose()),
        cfg.payload_mapping(),
    )?))
}

/// The pipeline context of a command that summarizes: the store, Qdrant, the configured summarizer, this instance.
pub async fn context(cfg: &Arc<Config>, store: &Store) -> anyhow::Result<crate::pipeline::Context> {
    Ok(crate::pipeline::Context {
        cfg: cfg.clone(),
        store: store.clone(),
        points: points(cfg)?,
        summarizer: summarizer(cfg, Some(store)).await?,
        instance: cfg.instance_id(),
    })
}

// The stages' settings are built in `config` (issue 27: every settings builder there); re-exported for the callers.
pub use crate::config::{llm_settings, sweep_settings, sweep_settings_for_partition};

/// The configured summarizer: the LLM one when a key is set (unless SUMMARIZER=extractive), else extractive.
/// With a store, the daily budget and the spend are kept in Postgres (see [`crate::budget`]), so they hold across
/// restarts and replicas.
pub async fn summarizer(
    cfg: &Config,
    store: Option<&Store>,
) -> anyhow::Result<Arc<dyn Summarizer>> {
    use crate::summarize::{BudgetFallback, extractive::Extractive, llm::LlmSummarizer};
    let settings = match llm_settings(cfg) {
        Some(s) if cfg.use_llm() => s,
        _ => return Ok(Arc::new(Extractive)),
    };
    let mut llm = LlmSummarizer::new(settings)?;
    if let Some(store) = store {
        // the budget and the spend live in Postgres, one ledger for every replica
        let ledger = crate::budget::PgLedger::new(store.pool().clone(), cfg.instance_id())
            .with_chunk(cfg.llm.llm_concurrency);
        if let Err(e) = ledger.reset_own().await {
            tracing::warn!(error = %e, "could not reset this replica's budget reservations (they expire by themselves)");
        }
        llm = llm.with_ledger(Arc::new(ledger));
    }
    Ok(match cfg.llm.over_budget {
        crate::config::OverBudget::Extractive => Arc::new(BudgetFallback { llm }),
        crate::config::OverBudget::Wait => Arc::new(llm),
    })
}

/// One tiny LLM call (`recap check --llm`).
pub async fn llm_probe(cfg: &Config) -> Result<String, String> {
    let settings = llm_settings(cfg).ok_or("no API key (set LLM_API_KEY or OPENROUTER_API_KEY)")?;
    let llm = crate::summarize::llm::LlmSummarizer::new(settings).map_err(|e| e.to_string())?;
    let msg = |i: i64, text: &str| crate::summarize::Message {
        point_id: i.to_string(),
        role: "user".into(),
        text: text.into(),
        ts_ms: 1_700_000_000_000 + i,
        emotion: None,
        vector: Vec::new(),
    };
    let window = crate::summarize::WindowInput {
        bot: "check".into(),
        user_id: "check".into(),
        start_ms: 1_700_000_000_000,
        end_ms: 1_700_000_000_001,
        messages: vec![
            msg(0, "I am checking that the summarizer answers."),
            msg(1, "Reply with a short summary, please."),
        ],
    };
    match crate::summarize::Summarizer::summarize(&llm, &window).await {
        Ok(s) => Ok(format!(
            "model {}, {} prompt tokens",
            cfg.llm.llm_model,
            s.usage.map(|u| u.prompt_tokens).unwrap_or(0)
        )),
        Err(e) => {
            let e = e.to_string();
            if model_not_found(&e) {
                return Err(format!(
                    "the model {:?} (LLM_MODEL) does not exist at this endpoint: set LLM_MODEL to a model it lists \
                     (GET {}/models) — {e}",
                    cfg.llm.llm_model,
                    cfg.llm.llm_base_url.redacted().trim_end_matches('/')
                ));
            }
            Err(e)
        }
    }
}

/// Whether an LLM error says the requested model does not exist: OpenAI's 404 `model_not_found`, OpenRouter's
/// 404 "No endpoints found for …" and 400 "… is not a valid model ID", and the like.
fn model_not_found(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    (e.contains("http 404") || e.contains("http 400"))
        && [
            "model_not_found",
            "model not found",
            "not a valid model",
            "no endpoints found",
            "does not exist",
            "unknown model",
        ]
        .iter()
        .any(|w| e.contains(w))
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { mut cfg, no_nats } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            run::run(cfg, no_nats).await
        }
        Cmd::Check { mut cfg, llm } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            check::check(&cfg, llm).await
        }
        Cmd::Migrate { mut cfg } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            if migrate_if_pending(&connect_store(&cfg).await?).await? {
                println!("migrations applied");
            } else {
                println!("nothing to migrate: schema up to date");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { mut cfg, json } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            status::status(&cfg, json).await
        }
        Cmd::Resummarize {
            mut cfg,
            from,
            since,
        } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            let since = chrono::Utc::now() - chrono::TimeDelta::from_std(since)?;
            let n = connect_store(&cfg)
                .await?
                .mark_for_resummarize(&from, since)
                .await?;
            println!(
                "{n} window(s) summarized by {from} since {} marked for summarizing again",
                since.to_rfc3339()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay {
            mut cfg,
            from_seq,
            since,
        } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            let from = match (from_seq, since) {
                (Some(seq), _) => crate::source::nats::ReplayFrom::Sequence(seq),
                (None, Some(t)) => crate::source::nats::ReplayFrom::Time(t),
                (None, None) => anyhow::bail!("say where to start: --from-seq N or --since TIME"),
            };
            replay::replay(cfg, from).await
        }
        Cmd::Sweep { mut cfg, once } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            if once {
                sweep::sweep(cfg, None).await
            } else {
                run::run(cfg, true).await
            }
        }
        Cmd::Backfill { mut cfg, since } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            let since = since.unwrap_or(std::time::Duration::from_secs(
                u64::from(cfg.sweep.lookback_days) * 86_400,
            ));
            sweep::sweep(cfg, Some(since)).await
        }
        Cmd::Retry {
            mut cfg,
            all,
            window,
        } => {
            init_logging(cfg.service.log_format);
            validated(&mut cfg)?;
            if !all && window.is_none() {
                anyhow::bail!("say which windows: --all or --window ID");
            }
            let n = connect_store(&cfg).await?.retry_dead(window).await?;
            println!("{n} dead window(s) put back to due");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::model_not_found;

    #[test]
    fn model_not_found_reads_the_endpoints_answers() {
        for e in [
            "LLM call failed: HTTP 404: The model `x` does not exist or you do not have access to it.",
            "LLM call failed: HTTP 404: No endpoints found for anthropic/claude-3.5-sonnet.",
            "LLM call failed: HTTP 400: claude-sonnet-4-6 is not a valid model ID",
        ] {
            assert!(model_not_found(e), "{e}");
        }
        for e in [
            "LLM call failed: HTTP 401: No auth credentials found",
            "LLM call failed: HTTP 404: page not found",
            "LLM endpoint unavailable: HTTP 503: the model endpoint is down",
        ] {
            assert!(!model_not_found(e), "{e}");
        }
    }
}
