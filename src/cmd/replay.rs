//! `recap replay --from-seq N | --since TIME`: re-reads the JetStream stream through the same ingest path.
//! Messages recap already has are not new, so done windows stay done unless their messages changed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::pipeline::{Context, Ingest, now_ms};
use crate::source::Source;
use crate::source::nats::{NatsSource, ReplayFrom};

pub async fn replay(cfg: Config, from: ReplayFrom) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if cfg.nats.nats_url.is_none() {
        anyhow::bail!("replay reads the JetStream stream: set NATS_URL");
    }
    let cfg = Arc::new(cfg);
    let store = super::connect_store(&cfg).await?;
    super::migrate_if_pending(&store).await?;
    let ctx = Context {
        cfg: cfg.clone(),
        store: store.clone(),
        points: super::points(&cfg)?,
        summarizer: Arc::new(crate::summarize::extractive::Extractive),
        instance: format!("{}-replay", cfg.instance_id()),
    };
    let shutdown = CancellationToken::new();
    super::run::cancel_on_signal(shutdown.clone());
    // Replay feeds the ingest state, so it needs the ingest lease of each partition in turn: a running service must
    // be stopped first.
    let wait = Duration::from_secs(u64::from(cfg.service.leader_lease_seconds) * 3);
    let (mut read, mut new) = (0usize, 0usize);
    for part in 0..cfg.nats.nats_partitions.max(1) {
        let start = Ingest::start_partition(ctx.clone(), part, None, &shutdown);
        let mut ingest = match tokio::time::timeout(wait, start).await {
            Ok(r) => r?.ok_or_else(|| anyhow::anyhow!("interrupted"))?,
            Err(_) => {
                anyhow::bail!(
                    "another recap holds the ingest lease: stop `recap run` before replaying"
                )
            }
        };
        let settings = cfg.nats_settings().for_partition(part);
        let mut source = NatsSource::start_replay(settings, &from).await?;
        loop {
            let batch = source.next_batch().await?;
            read += batch.messages.len() + batch.dead_letters.len() + batch.ignored;
            let done = batch.caught_up;
            let applied = ingest.apply(&batch, now_ms()).await?;
            source.commit().await?;
            new += applied.new;
            if done || shutdown.is_cancelled() {
                break;
            }
        }
        ingest.release().await;
    }
    info!(read, new, "replay finished");
    println!("replayed {read} event(s); {new} new message(s)");
    Ok(ExitCode::SUCCESS)
}
