//! The settings of the sweep and the LLM summarizer, built from the one [`Config`] (next to `nats_settings`,
//! `tracker_config` and the other builders in `mod.rs`).

use std::sync::Arc;

use super::Config;

/// The service's sweep (`ENRICHMENT_INTERVAL_SECONDS`, `LOOKBACK_DAYS`, `SWEEP_*`, the collection mapping).
pub fn sweep_settings(cfg: &Config) -> crate::source::sweep::SweepSettings {
    let mapper = cfg.clone();
    crate::source::sweep::SweepSettings {
        interval: std::time::Duration::from_secs(cfg.sweep.enrichment_interval_seconds),
        lookback: std::time::Duration::from_secs(u64::from(cfg.sweep.lookback_days) * 86_400),
        overlap: std::time::Duration::from_secs(cfg.sweep.sweep_overlap_seconds.into()),
        page_size: cfg.sweep.sweep_page_size,
        bot_for_collection: Arc::new(move |c: &str| mapper.bot_for_collection(c)),
        create_index: cfg.sweep.sweep_create_index,
        checkpoint_prefix: "sweep".into(),
        keep_user: None,
    }
}

/// The sweep of ingest partition `k` of `n`. By bot: only the collections of bots NATS puts in partition k
/// (`source::nats::partition_of`), so each collection is swept by the replica leading its bot's events. By user:
/// every collection, keeping the points of partition k's keys (`NatsSettings::owner`), with checkpoints of its own
/// (`sweep:p<k>:<collection>`).
pub fn sweep_settings_for_partition(
    cfg: &Config,
    k: u32,
    n: u32,
) -> crate::source::sweep::SweepSettings {
    let mut s = sweep_settings(cfg);
    if n > 1 {
        let nats = cfg.nats_settings();
        match nats.partition_by {
            crate::source::nats::PartitionBy::Bot => {
                let all = s.bot_for_collection.clone();
                s.bot_for_collection = Arc::new(move |c: &str| {
                    all(c).filter(|bot| crate::source::nats::partition_of(bot, n) == k)
                });
            }
            crate::source::nats::PartitionBy::User => {
                s.keep_user = Some(Arc::new(move |bot: &str, user: &str| {
                    nats.owner(bot, user) == k
                }));
                s.checkpoint_prefix = format!("sweep:p{k}");
            }
        }
    }
    s
}

pub fn llm_settings(cfg: &Config) -> Option<crate::summarize::llm::LlmSettings> {
    let key = cfg.llm_api_key()?;
    Some(crate::summarize::llm::LlmSettings {
        base_url: cfg.llm.llm_base_url.expose().to_owned(),
        api_key: key.expose().to_string(),
        model: cfg.llm.llm_model.clone(),
        concurrency: cfg.llm.llm_concurrency,
        requests_per_second: cfg.llm.llm_requests_per_second,
        timeout: cfg.llm.llm_timeout,
        max_retries: cfg.llm.llm_max_retries,
        max_input_tokens: cfg.llm.llm_max_input_tokens,
        breaker_failures: cfg.llm.llm_breaker_failures,
        breaker_cooldown: cfg.llm.llm_breaker_cooldown,
        price_prompt_per_mtok: cfg.llm.llm_price_prompt_per_mtok,
        price_completion_per_mtok: cfg.llm.llm_price_completion_per_mtok,
        daily_budget_usd: cfg.llm.llm_daily_budget_usd,
        ..Default::default()
    })
}
