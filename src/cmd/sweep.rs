//! `recap sweep --once` (one sweep cycle, then summarize what closed; for cron) and `recap backfill --since 30d`
//! (history in bounded memory, resumable: its own checkpoints, done windows stay done).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use qdrant_client::qdrant::{Condition, CountPointsBuilder, Filter, Range};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::model::WindowState;
use crate::pipeline::{Context, Ingest, drain_due, now_ms};
use crate::source::sweep::{SweepSource, sweep_once};

/// A progress bar on a terminal, log lines (at most one every 5 s) otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    last_log: std::sync::Mutex<Instant>,
    total: u64,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        });
        Progress {
            bar,
            what,
            last_log: std::sync::Mutex::new(Instant::now()),
            total,
        }
    }

    fn set(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            return;
        }
        let mut last = self.last_log.lock().expect("lock");
        if last.elapsed() >= Duration::from_secs(5) || pos == self.total {
            *last = Instant::now();
            info!(
                progress = self.what,
                done = pos,
                total = self.total,
                "progress"
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Points newer than `since` in the collections that map to bots (for the progress total; estimates are fine).
async fn points_to_read(ctx: &Context, since_secs: f64) -> u64 {
    let Ok(colls) = ctx.points.collections(true).await else {
        return 0;
    };
    let mut total = 0;
    for c in colls
        .iter()
        .filter(|c| ctx.cfg.bot_for_collection(c).is_some())
    {
        let filter = Filter::must([Condition::range(
            ctx.cfg.payload.payload_timestamp_unix_field.clone(),
            Range {
                gte: Some(since_secs),
                ..Default::default()
            },
        )]);
        if let Ok(r) = ctx
            .points
            .client()
            .count(CountPointsBuilder::new(c).filter(filter).exact(false))
            .await
        {
            total += r.result.map(|r| r.count).unwrap_or(0);
        }
    }
    total
}

pub async fn sweep(cfg: Config, backfill_since: Option<Duration>) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = Arc::new(cfg);
    let store = super::connect_store(&cfg).await?;
    super::migrate_if_pending(&store).await?;
    let ctx = super::context(&cfg, &store).await?;
    let points = ctx.points.clone();
    let shutdown = CancellationToken::new();
    super::run::cancel_on_signal(shutdown.clone());
    let wait = Duration::from_secs(u64::from(cfg.service.leader_lease_seconds) * 3);
    // Each ingest partition's bots are swept under that partition's lease (one partition without NATS partitions).
    let partitions = if cfg.nats.nats_url.is_some() {
        cfg.nats.nats_partitions.max(1)
    } else {
        1
    };
    let mut what = "sweep";
    let mut points_read = 0u64;
    for part in 0..partitions {
        let start = Ingest::start_partition(ctx.clone(), part, None, &shutdown);
        let mut ingest = match tokio::time::timeout(wait, start).await {
            Ok(r) => r?.ok_or_else(|| anyhow::anyhow!("interrupted"))?,
            Err(_) => anyhow::bail!(
                "another recap holds the ingest lease: it sweeps already (stop it to sweep by hand)"
            ),
        };
        let mut settings = super::sweep_settings_for_partition(&cfg, part, partitions);
        if let Some(since) = backfill_since {
            settings.lookback = since;
            // backfill:<collection>, or backfill:p<k>:<collection> where each partition sweeps every collection
            settings.checkpoint_prefix =
                settings.checkpoint_prefix.replacen("sweep", "backfill", 1);
            what = "backfill";
        }
        let since_secs = (now_ms() as f64 / 1000.0) - settings.lookback.as_secs_f64();
        let progress = Progress::new("points", points_to_read(&ctx, since_secs).await);
        let mut source = SweepSource::new(points.clone(), store.clone(), settings);
        let mut read = 0u64;
        let report = sweep_once(&mut source, async |b| {
            let r = ingest.apply(b, now_ms()).await.map(drop);
            read += b.checkpoint.as_ref().map_or(0, |c| c.points_read as u64);
            progress.set(read);
            r
        })
        .await;
        ingest.release().await;
        progress.finish();
        let report = report?;
        print!("{report}");
        points_read += report.points_read();
    }
    let due = store
        .status()
        .await?
        .windows
        .iter()
        .filter(|(s, _)| *s == WindowState::Due)
        .map(|(_, n)| *n)
        .sum::<i64>();
    let windows = Progress::new("windows", due.max(0) as u64);
    let finished = drain_due(&ctx, &|n| windows.set(n as u64)).await?;
    windows.finish();
    println!("{what}: {points_read} point(s) read, {finished} window(s) finished");
    Ok(ExitCode::SUCCESS)
}
