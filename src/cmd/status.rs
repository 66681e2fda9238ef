//! `recap status`: windows by state, oldest due window, consumer lag, checkpoints, dead letters, LLM spend today.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

pub async fn status(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let store = super::connect_store(cfg).await?;
    let report = store.status().await?;
    let vector_drift = crate::recall::vectors::drift(&store).await?;
    let lag = match &cfg.nats_url {
        Some(_) => {
            let s = cfg.nats_settings();
            let probe = async {
                let client = crate::source::nats::connect(&s, false).await?;
                let js = async_nats::jetstream::new(client);
                let stream = js
                    .get_stream(&s.stream)
                    .await
                    .map_err(|e| crate::source::SourceError::Nats(e.to_string()))?;
                let info = stream
                    .consumer_info(&s.consumer)
                    .await
                    .map_err(|e| crate::source::SourceError::Nats(e.to_string()))?;
                Ok::<u64, crate::source::SourceError>(
                    info.num_pending + info.num_ack_pending as u64,
                )
            };
            tokio::time::timeout(Duration::from_secs(5), probe)
                .await
                .ok()
                .and_then(Result::ok)
        }
        None => None,
    };
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["consumer_lag"] = serde_json::json!(lag);
        v["summary_vector_drift"] = serde_json::json!(vector_drift);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("windows by state:");
    for (state, n) in &report.windows {
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
    println!("dead letters       {}", report.dead_letters);
    println!(
        "summary vectors    {} missing, {} stale",
        vector_drift.missing, vector_drift.stale
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
