//! `recap status`: windows by state, oldest due window, consumer lag, checkpoints, dead letters, LLM spend today.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

pub async fn status(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let store = super::connect_store(cfg).await?;
    let consumer = match &cfg.nats.nats_url {
        Some(_) => {
            let s = cfg.nats_settings();
            match tokio::time::timeout(
                Duration::from_secs(5),
                crate::source::nats::connect(&s, false),
            )
            .await
            {
                Ok(Ok(client)) => {
                    crate::status::consumer_sample(&client, &s.stream, &s.consumer).await
                }
                _ => None,
            }
        }
        None => None,
    };
    let snap = crate::status::snapshot_with_drift(&store, consumer).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
        return Ok(ExitCode::SUCCESS);
    }
    let report = &snap.store;
    let lag = snap.consumer_lag;
    println!(
        "windows by state:{}",
        if report.windows_done_estimated {
            " (done estimated)"
        } else {
            ""
        }
    );
    for (state, n) in snap.states() {
        println!("  {state:<10} {n:>10}");
    }
    println!("open messages      {}", report.open_messages);
    println!(
        "oldest due window  {}",
        report
            .oldest_due
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "consumer lag       {}",
        lag.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
    );
    if let Some(c) = snap.consumer {
        println!(
            "consumer pending   {} undelivered, {} unacknowledged",
            c.pending, c.ack_pending
        );
    }
    println!("dead letters       {}", report.dead_letters);
    for i in &snap.instances {
        println!(
            "instance           {}{}, {} window lease(s)",
            i.name,
            if i.leads_ingest {
                " (ingest leader)"
            } else {
                ""
            },
            i.windows_leased
        );
    }
    let drift = snap.summary_vector_drift.unwrap_or_default();
    println!(
        "summary vectors    {} missing, {} stale",
        drift.missing, drift.stale
    );
    println!("LLM spend today    ${:.4}", report.llm_spend_today_usd);
    println!("checkpoints:");
    for c in &report.checkpoints {
        println!(
            "  {:<50} position {:>16.3}  read {:>8}  at {}",
            c.name,
            c.position,
            c.points_read,
            c.updated_at.to_rfc3339()
        );
    }
    Ok(ExitCode::SUCCESS)
}
