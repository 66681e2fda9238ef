//! LLM settings: the OpenAI-compatible endpoint, model, key, concurrency and rate, retries,
//! circuit breaker, prices and the daily budget.

use std::time::Duration;

use super::{
    ConfigError, H_LLM, RedactedUrl, Secret, at_least, at_most, bad, non_empty, norm_secret,
    parse_duration, redact_url, set_secret,
};

/// Which summarizer produces summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SummarizerChoice {
    /// The LLM when an API key is set, else the extractive summarizer.
    Auto,
    /// Always the LLM (an API key is required).
    Llm,
    /// Always the local extractive summarizer (no network, no cost).
    Extractive,
}

/// What to do when the daily LLM budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverBudget {
    /// Hold windows until the budget resets (next UTC day).
    Wait,
    /// Summarize with the extractive summarizer instead.
    Extractive,
}

/// LLM settings.
#[derive(clap::Args, Clone, Debug)]
pub struct LlmConfig {
    /// OpenAI-compatible API base URL
    #[arg(long, env = "LLM_BASE_URL", default_value = "https://openrouter.ai/api/v1", help_heading = H_LLM)]
    pub llm_base_url: RedactedUrl,

    /// Model name sent to the API
    #[arg(long, env = "LLM_MODEL", default_value = "anthropic/claude-sonnet-4.6", help_heading = H_LLM)]
    pub llm_model: String,

    /// OpenRouter API key (used when LLM_API_KEY is unset)
    #[arg(long, env = "OPENROUTER_API_KEY", hide_env_values = true, help_heading = H_LLM)]
    pub openrouter_api_key: Option<Secret>,

    /// API key for LLM_BASE_URL (wins over OPENROUTER_API_KEY)
    #[arg(long, env = "LLM_API_KEY", hide_env_values = true, help_heading = H_LLM)]
    pub llm_api_key: Option<Secret>,

    /// Summarizer: auto (LLM when an API key is set, else extractive), llm, extractive
    #[arg(long, env = "SUMMARIZER", value_enum, ignore_case = true, default_value = "auto", help_heading = H_LLM)]
    pub summarizer: SummarizerChoice,

    /// Concurrent LLM calls per instance
    #[arg(long, env = "LLM_CONCURRENCY", default_value_t = 4, help_heading = H_LLM)]
    pub llm_concurrency: usize,

    /// LLM request rate limit per instance (requests per second, may be fractional)
    #[arg(long, env = "LLM_REQUESTS_PER_SECOND", default_value_t = 5.0, help_heading = H_LLM)]
    pub llm_requests_per_second: f64,

    /// Timeout of one LLM call (e.g. 60s, 2m)
    #[arg(long, env = "LLM_TIMEOUT", default_value = "60s", value_parser = parse_duration, help_heading = H_LLM)]
    pub llm_timeout: Duration,

    /// Attempts per window before it is dead-lettered
    #[arg(long, env = "LLM_MAX_ATTEMPTS", default_value_t = 5, help_heading = H_LLM)]
    pub llm_max_attempts: u32,

    /// Retries of one LLM call on transient errors (429, 5xx, timeouts)
    #[arg(long, env = "LLM_MAX_RETRIES", default_value_t = 4, help_heading = H_LLM)]
    pub llm_max_retries: usize,

    /// Maximum prompt size in tokens; longer windows are condensed first
    #[arg(long, env = "LLM_MAX_INPUT_TOKENS", default_value_t = 6000, help_heading = H_LLM)]
    pub llm_max_input_tokens: usize,

    /// Consecutive failed calls that open the circuit breaker
    #[arg(long, env = "LLM_BREAKER_FAILURES", default_value_t = 5, help_heading = H_LLM)]
    pub llm_breaker_failures: u32,

    /// How long the open breaker blocks calls (e.g. 30s)
    #[arg(long, env = "LLM_BREAKER_COOLDOWN", default_value = "30s", value_parser = parse_duration, help_heading = H_LLM)]
    pub llm_breaker_cooldown: Duration,

    /// Price of prompt tokens, USD per million (for cost metrics and the budget)
    #[arg(long, env = "LLM_PRICE_PROMPT_PER_MTOK", default_value_t = 3.0, help_heading = H_LLM)]
    pub llm_price_prompt_per_mtok: f64,

    /// Price of completion tokens, USD per million
    #[arg(long, env = "LLM_PRICE_COMPLETION_PER_MTOK", default_value_t = 15.0, help_heading = H_LLM)]
    pub llm_price_completion_per_mtok: f64,

    /// Daily LLM spending limit in USD (UTC day, across instances). Unset: no limit
    #[arg(long, env = "LLM_DAILY_BUDGET_USD", help_heading = H_LLM)]
    pub llm_daily_budget_usd: Option<f64>,

    /// When the budget is spent: wait (hold windows until tomorrow) or extractive
    #[arg(long, env = "OVER_BUDGET", value_enum, ignore_case = true, default_value = "wait", help_heading = H_LLM)]
    pub over_budget: OverBudget,
}

impl LlmConfig {
    pub(super) fn normalize(&mut self) {
        norm_secret(&mut self.openrouter_api_key);
        norm_secret(&mut self.llm_api_key);
        if self.llm_base_url.trim().len() != self.llm_base_url.len() {
            self.llm_base_url = RedactedUrl::from(self.llm_base_url.trim().to_owned());
        }
        self.llm_model = self.llm_model.trim().to_owned();
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let base = self.llm_base_url.trim();
        if !url::Url::parse(base)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        {
            return bad(
                "LLM_BASE_URL",
                format!(
                    "LLM_BASE_URL {:?} is not an http(s) URL (set LLM_BASE_URL=https://openrouter.ai/api/v1)",
                    redact_url(base)
                ),
            );
        }
        non_empty(&self.llm_model, "LLM_MODEL", "anthropic/claude-sonnet-4.6")?;
        if self.summarizer == SummarizerChoice::Llm && self.llm_api_key().is_none() {
            return bad(
                "SUMMARIZER",
                "SUMMARIZER=llm needs an API key (set LLM_API_KEY or OPENROUTER_API_KEY, or SUMMARIZER=auto)",
            );
        }
        at_least(self.llm_concurrency, 1, "LLM_CONCURRENCY", "4")?;
        if !(self.llm_requests_per_second.is_finite() && self.llm_requests_per_second > 0.0) {
            return bad(
                "LLM_REQUESTS_PER_SECOND",
                "LLM_REQUESTS_PER_SECOND must be a number greater than 0 (set LLM_REQUESTS_PER_SECOND=5)",
            );
        }
        if self.llm_timeout < Duration::from_secs(1) {
            return bad(
                "LLM_TIMEOUT",
                "LLM_TIMEOUT must be at least 1s (set LLM_TIMEOUT=60s)",
            );
        }
        at_least(self.llm_max_attempts, 1, "LLM_MAX_ATTEMPTS", "5")?;
        at_most(self.llm_max_retries, 20, "LLM_MAX_RETRIES", "4")?;
        at_least(
            self.llm_max_input_tokens,
            500,
            "LLM_MAX_INPUT_TOKENS",
            "6000",
        )?;
        at_most(
            self.llm_max_input_tokens,
            2_000_000,
            "LLM_MAX_INPUT_TOKENS",
            "6000",
        )?;
        at_least(self.llm_breaker_failures, 1, "LLM_BREAKER_FAILURES", "5")?;
        if self.llm_breaker_cooldown < Duration::from_secs(1) {
            return bad(
                "LLM_BREAKER_COOLDOWN",
                "LLM_BREAKER_COOLDOWN must be at least 1s (set LLM_BREAKER_COOLDOWN=30s)",
            );
        }
        for (var, v, default) in [
            (
                "LLM_PRICE_PROMPT_PER_MTOK",
                self.llm_price_prompt_per_mtok,
                "3.0",
            ),
            (
                "LLM_PRICE_COMPLETION_PER_MTOK",
                self.llm_price_completion_per_mtok,
                "15.0",
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(
                    var,
                    format!("{var} must be a number >= 0 (set {var}={default})"),
                );
            }
        }
        if let Some(b) = self.llm_daily_budget_usd
            && !(b.is_finite() && b > 0.0)
        {
            return bad(
                "LLM_DAILY_BUDGET_USD",
                "LLM_DAILY_BUDGET_USD must be greater than 0 (set e.g. LLM_DAILY_BUDGET_USD=5, or unset it for no limit)",
            );
        }
        Ok(())
    }

    /// The LLM API key: LLM_API_KEY, else OPENROUTER_API_KEY (blank values count as unset).
    pub fn llm_api_key(&self) -> Option<&Secret> {
        set_secret(&self.llm_api_key).or_else(|| set_secret(&self.openrouter_api_key))
    }

    /// Whether summaries come from the LLM: SUMMARIZER=llm, or auto with an API key.
    pub fn use_llm(&self) -> bool {
        match self.summarizer {
            SummarizerChoice::Llm => true,
            SummarizerChoice::Extractive => false,
            SummarizerChoice::Auto => self.llm_api_key().is_some(),
        }
    }
}
