//! `recap run`: the service.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::pipeline::{IngestLoop, run_ingest, run_partitioned, run_workers};
use crate::source::nats::{LagProbe, NatsSource};

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}

/// Connects to Postgres, waiting (jittered back-off, cut short by shutdown) while it is unreachable, and applies
/// migrations.
async fn store_when_ready(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<crate::sink::Store>> {
    let mut backoff =
        crate::pipeline::loop_backoff(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match super::connect_store(cfg).await {
            Ok(store) => {
                // Only when something is missing: an up-to-date schema needs no CREATE privilege, so `recap run`
                // works with the read/write grants of docs/operate.md and `recap migrate` runs as the owner.
                super::migrate_if_pending(&store).await?;
                return Ok(Some(store));
            }
            Err(e) => warn!(error = %e, "waiting for Postgres"),
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        if crate::pipeline::sleep_or_shutdown(shutdown, delay).await {
            return Ok(None);
        }
    }
}

pub async fn run(cfg: Config, no_nats: bool) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = crate::http::install_metrics();
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let cfg = Arc::new(cfg);
    let Some(store) = store_when_ready(&cfg, &shutdown).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let ctx = super::context(&cfg, &store).await?;
    let points = ctx.points.clone();
    info!(instance = %ctx.instance, summarizer = ctx.summarizer.kind().as_str(), "recap starting");

    let lag = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let nats_client = match (&cfg.nats.nats_url, no_nats) {
        (Some(_), false) => {
            let settings = cfg.nats_settings();
            // A changed NATS_PARTITIONS / NATS_PARTITION_BY: the unread backlog moves to the new layout's subjects
            // before any consumer reads (issue 24, case 13); otherwise the stream config is applied as it is.
            crate::source::relayout::apply(&settings, &store).await?;
            let (client, probe) = LagProbe::start(&settings).await?;
            let (lag, stop) = (lag.clone(), shutdown.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    match probe.lag().await {
                        Ok(n) => {
                            lag.store(n, Ordering::Relaxed);
                            metrics::gauge!("recap_consumer_lag").set(n as f64);
                        }
                        Err(e) => tracing::debug!(error = %e, "consumer lag unknown"),
                    }
                    tokio::select! { _ = stop.cancelled() => {}, _ = tokio::time::sleep(Duration::from_secs(2)) => {} }
                }
                Ok(())
            });
            // One ingest loop per partition (one when NATS_PARTITIONS is 1): partition k's durable consumer and a
            // sweep of partition k's bots (a bot's events and collection belong to one partition).
            let partitions = settings.partitions.max(1);
            if partitions > 1 {
                // events on the other subject shape, re-published where their key's partition reads
                tasks.spawn({
                    let (settings, stop) = (settings.clone(), shutdown.clone());
                    async move {
                        crate::source::route::run_route(settings, stop).await;
                        Ok(())
                    }
                });
            }
            let (points, store, sweep_cfg) = (points.clone(), store.clone(), cfg.clone());
            let make_source = move |k: u32| {
                let settings = settings.for_partition(k);
                let sweep = crate::source::sweep::SweepSource::new(
                    points.clone(),
                    store.clone(),
                    super::sweep_settings_for_partition(&sweep_cfg, k, partitions),
                );
                async move {
                    let events = NatsSource::start(settings).await?;
                    Ok(crate::source::Hybrid::new(events, sweep))
                }
            };
            tasks.spawn(run_partitioned(
                ctx.clone(),
                partitions,
                make_source,
                shutdown.clone(),
                IngestLoop::default(),
            ));
            Some(client)
        }
        _ => {
            info!("NATS_URL not set (or --no-nats): running on the Qdrant sweep alone");
            tasks.spawn(run_ingest(
                ctx.clone(),
                crate::source::sweep::SweepSource::new(
                    points.clone(),
                    store.clone(),
                    super::sweep_settings(&cfg),
                ),
                shutdown.clone(),
            ));
            None
        }
    };
    tasks.spawn(run_workers(ctx.clone(), shutdown.clone()));
    if cfg.service.rollups {
        let rollups = crate::rollup::shell::Rollups {
            store: store.clone(),
            summarizer: ctx.summarizer.clone(),
            owner: ctx.instance.clone(),
            settings: crate::rollup::shell::RollupSettings {
                interval: cfg.service.rollup_interval,
                // the window lease (LEASE_SECONDS): validated to outlast an LLM call
                lease: Duration::from_secs(u64::from(cfg.service.lease_seconds)),
                concurrency: cfg.llm.llm_concurrency,
                ..Default::default()
            },
        };
        tasks.spawn(rollups.run(shutdown.clone()));
    }
    let repair = crate::vectors::Repair {
        store: ctx.store.clone(),
        points: ctx.points.clone(),
        bot_for_collection: {
            let cfg = ctx.cfg.clone();
            Arc::new(move |c: &str| cfg.bot_for_collection(c))
        },
        every: cfg.service.recall_repair_interval,
    };
    tasks.spawn(crate::vectors::run_repair(repair, shutdown.clone()));
    let read_store = read_store(&cfg)?;
    let recall = recall_state(&cfg, read_store.clone(), store.clone(), points.clone());
    let ready = crate::http::Readiness {
        store,
        points,
        nats: nats_client,
        max_lag: cfg.service.ready_max_lag,
        lag,
    };
    let mut console = crate::console::Console::for_service(cfg.clone(), &ready);
    console.store = read_store;
    let router = crate::http::router(metrics, ready)
        .merge(crate::console::router(console))
        .merge(crate::recall::api::router(recall));
    let (addr, stop) = (cfg.service.http_addr, shutdown.clone());
    tasks.spawn(async move {
        crate::http::serve(addr, router, stop)
            .await
            .map_err(anyhow::Error::from)
    });

    let mut failed = false;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "a task failed; shutting down");
                failed = true;
                shutdown.cancel();
            }
            Err(e) => {
                warn!(error = %e, "a task panicked; shutting down");
                failed = true;
                shutdown.cancel();
            }
        }
    }
    info!("recap stopped");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The pool the recall API and the console read through: small, of its own, with a statement timeout, so a burst of
/// reads (or a slow one) never takes the connections ingest and the workers need.
pub fn read_store(cfg: &Config) -> anyhow::Result<crate::sink::Store> {
    Ok(crate::sink::Store::connect_lazy(
        cfg.pg_connect_options()?.options([(
            "statement_timeout",
            cfg.service.recall_statement_timeout.as_millis().to_string(),
        )]),
        cfg.service.recall_pool_size,
    ))
}

/// The recall API's state as `recap run` serves it: reads on `read` ([`read_store`]), the forget on `writer`.
pub fn recall_state(
    cfg: &Config,
    read: crate::sink::Store,
    writer: crate::sink::Store,
    points: std::sync::Arc<crate::fetch::Points>,
) -> crate::recall::api::RecallState {
    crate::recall::api::RecallState::with_reads(
        read,
        writer,
        cfg.service.recall_concurrency,
        points,
        cfg.service.recall_token.as_ref(),
    )
    .with_context(crate::recall::context::ContextSettings::from_config(cfg))
    .with_forget_scope(crate::recall::ForgetScope::from_config(Arc::new(
        cfg.clone(),
    )))
}
