//! The LLM summarizer: one chat-completion call per window to an OpenAI-compatible endpoint (OpenRouter by default),
//! asking for a JSON object that becomes a validated [`Summary`].
//!
//! # Request and transport
//! The request is built with `async-openai`'s types ([`CreateChatCompletionRequest`], `response_format`
//! `json_object`) and its [`OpenAIConfig`] (API base, `Authorization` header; the key stays a `SecretString` there).
//! The HTTP exchange itself goes through `reqwest` (the client `async-openai` is built on) because `async-openai`'s
//! own client (a) drops the response headers, so `Retry-After` cannot be honoured, (b) always wraps calls in its
//! own fixed retry layer (3 retries, no jitter, not configurable without its `middleware` feature), which would hide
//! attempts from the breaker, the rate limiter and the concurrency limit, and (c) deserializes `usage` into a type
//! without OpenRouter's `usage.cost`.
//!
//! # Token budget
//! Tokens are estimated as `ceil(chars / 4)` over the characters (Unicode scalar values) of all message contents —
//! the same rule as the repo's test server (`testsupport/llm_server.py`), so the estimate of what is sent equals the
//! `prompt_tokens` that server reports. When the whole window would exceed `max_input_tokens`, messages are chosen
//! by maximal marginal relevance over their `content` vectors (relevance = cosine to the window centroid, diversity =
//! highest cosine to an already chosen message, λ = [`MMR_LAMBDA`]) until the budget is used, then shown in time
//! order with a line saying how many of the window's messages are shown. See [`build_prompt`] / [`PromptStats`].
//!
//! # Faults
//! Per HTTP attempt: circuit breaker admission → concurrency semaphore → `governor` rate limiter → `tokio` timeout.
//! Attempts that fail transiently (429, 5xx, 408, timeouts, connection errors) are retried with jittered exponential
//! backoff (`backon`), never sooner than the server's `Retry-After` / `retry-after-ms` (seconds, or an HTTP date).
//! A `Retry-After` longer than [`MAX_INLINE_RETRY_AFTER`] is not slept on: the window is answered `Unavailable` and
//! no call is made until that time has passed. Outcomes:
//! - transient faults that outlast the retries, an open circuit, a Retry-After wait, or the daily budget →
//!   [`SummarizeError::Unavailable`] (the window stays due; not an attempt);
//! - a reply that is not a valid JSON summary twice (one repair call), or a 4xx other than 408/429 →
//!   [`SummarizeError::Failed`] with the reason.
//!
//! # Metrics (`metrics` crate)
//! `recap_llm_calls_total{outcome,purpose}` per HTTP attempt (`ok`, `rate_limited`, `server`, `timeout`, `connect`,
//! `client`; purpose `window`, `running`, `rollup`: [`Purpose`], also sent as the `X-Recap-Purpose` header);
//! `recap_llm_errors_total{kind}` (`rate_limited`, `server`, `timeout`, `connect`, `client`, `invalid_json`,
//! `breaker_open`, `budget`); `recap_llm_tokens_total{type=prompt|completion}`; `recap_llm_cost_usd_total` (a counter
//! of USD: the `metrics` crate's counters are integers, so it is kept in [`cost_usd_total`] and `/metrics` renders
//! it); `recap_llm_request_duration_seconds` (histogram, per HTTP attempt).
//! The API key is never logged and never put into an error.
//!
//! [`CreateChatCompletionRequest`]: async_openai::types::chat::CreateChatCompletionRequest
//!
//! # Files
//! `mod.rs` settings, the summarizer and its window flow (call, parse, one repair); `prompt.rs` the prompt text;
//! `mmr.rs` the selection under the token budget; `call.rs` the request, HTTP attempts, retries and response;
//! `reply.rs` reply parsing and the repair prompt; `budget.rs` spend, the shared ledger and totals; `breaker.rs` the
//! circuit breaker.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_openai::config::{Config, OpenAIConfig};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderValue;
use tokio::sync::Semaphore;

use self::budget::{DailySpend, today_utc};
use self::call::with_usage;
use self::prompt::{incremental_parts, prompt_parts};
use self::reply::repair_system_prompt;
use super::{Prior, Purpose, SummarizeError, Summarizer, SummarizerKind, Summary, WindowInput};

/// OpenRouter's OpenAI-compatible API base.
pub const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";
/// The default `LLM_MODEL`: a model OpenRouter (the default endpoint) serves. Claude Sonnet 4.6 is listed there since
/// 2026-02 at 3/15 USD per Mtok (the default prices); Claude 3.5 Sonnet, the earlier default, was retired in 2025-10.
pub const DEFAULT_MODEL: &str = "anthropic/claude-sonnet-4.6";
/// λ of the maximal-marginal-relevance selection (weight of relevance against redundancy).
pub const MMR_LAMBDA: f64 = 0.7;
/// Longest `Retry-After` slept on inside one `summarize` call; longer ones end the call with `Unavailable`.
pub const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Upper bound on the reply length requested from the model.
pub const MAX_OUTPUT_TOKENS: u32 = 1024;
/// Most characters of a bad reply quoted back to the model in the repair call.
const REPAIR_QUOTE_CHARS: usize = 2000;

/// The system prompt of every call.
pub const SYSTEM_PROMPT: &str = "You summarize one time window of a conversation between a user and a chat bot, so \
that the bot can later remember what this user talked about. Reply with ONLY a JSON object - no prose, no code \
fences - of exactly this shape: {\"summary\": string, \"key_topics\": [string, 1 to 8 items], \"emotional_tone\": \
one of \"positive\", \"negative\", \"neutral\", \"mixed\", \"confidence\": number from 0 to 1}. The summary (2 to 5 \
sentences, third person, at most 600 characters) says which topics the user brought up, what they shared about \
themselves (facts, plans, people, preferences, feelings) and the overall tone; never invent facts. key_topics are \
short phrases that appear in the conversation. emotional_tone is the user's overall tone; the emotion labels in \
parentheses are hints. confidence says how well the messages support the summary.";

/// Estimated tokens for `units` token units ([`token_units`]): `ceil(units / 4)` (the test server's rule; for Latin
/// text a unit is a character, a usual average of 4 characters a token for English).
pub fn estimate_tokens(units: usize) -> usize {
    units.div_ceil(4)
}

/// Estimated tokens of a text: [`estimate_tokens`] of its [`token_units`].
pub fn estimate_text_tokens(text: &str) -> usize {
    estimate_tokens(token_units(text))
}

/// A text's length in token units, a quarter token each: 1 per Latin character (ASCII, Latin-1, Latin Extended,
/// general punctuation), 4 (a whole token) per any other character. CJK text is about one token per character in
/// BPE tokenizers (4 characters a token would undercount it about 4x); Cyrillic, Greek, Arabic and emoji lie between
/// and are counted high, on the safe side for the budget. The LLM test server counts by the same rule.
pub fn token_units(text: &str) -> usize {
    text.chars().map(|c| if is_latin(c) { 1 } else { 4 }).sum()
}

fn is_latin(c: char) -> bool {
    let c = c as u32;
    c < 0x0250 || (0x1E00..=0x1EFF).contains(&c) || (0x2000..=0x206F).contains(&c)
}

/// Settings of the LLM summarizer. `Debug` never shows the key.
#[derive(Clone)]
pub struct LlmSettings {
    /// OpenAI-compatible API base, e.g. `https://openrouter.ai/api/v1` (`/chat/completions` is appended).
    pub base_url: String,
    /// Bearer key; may be empty for local endpoints. Never logged or put into an error.
    pub api_key: String,
    pub model: String,
    /// Most HTTP calls in flight at once.
    pub concurrency: usize,
    /// Request rate limit; `<= 0` or non-finite disables it.
    pub requests_per_second: f64,
    /// Timeout of one HTTP call (request and body).
    pub timeout: Duration,
    /// Retries after the first attempt for transient faults.
    pub max_retries: usize,
    /// Budget of estimated prompt tokens per call (`ceil(chars/4)`); 0 = unlimited.
    pub max_input_tokens: usize,
    /// Consecutive transient failures that open the circuit; 0 disables the breaker.
    pub breaker_failures: u32,
    /// How long the circuit stays open before one trial call is let through.
    pub breaker_cooldown: Duration,
    /// First retry delay (doubles per retry, with jitter).
    pub retry_base_delay: Duration,
    /// Cap of one retry delay (a longer `Retry-After` still wins, up to [`MAX_INLINE_RETRY_AFTER`]).
    pub retry_max_delay: Duration,
    /// USD per million prompt tokens, used when the provider's reply has no `usage.cost`.
    pub price_prompt_per_mtok: f64,
    /// USD per million completion tokens, used when the provider's reply has no `usage.cost`.
    pub price_completion_per_mtok: f64,
    /// Spend cap per UTC day; `None` = no cap.
    pub daily_budget_usd: Option<f64>,
}

impl Default for LlmSettings {
    fn default() -> Self {
        LlmSettings {
            base_url: DEFAULT_BASE_URL.into(),
            api_key: String::new(),
            model: DEFAULT_MODEL.into(),
            concurrency: 4,
            requests_per_second: 2.0,
            timeout: Duration::from_secs(60),
            max_retries: 4,
            max_input_tokens: 8000,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(60),
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            // anthropic/claude-sonnet-4.6 list prices (OpenRouter, 2026)
            price_prompt_per_mtok: 3.0,
            price_completion_per_mtok: 15.0,
            daily_budget_usd: None,
        }
    }
}

impl fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSettings")
            .field("base_url", &self.base_url)
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    "<none>"
                } else {
                    "<redacted>"
                },
            )
            .field("model", &self.model)
            .field("concurrency", &self.concurrency)
            .field("requests_per_second", &self.requests_per_second)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("max_input_tokens", &self.max_input_tokens)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("price_prompt_per_mtok", &self.price_prompt_per_mtok)
            .field("price_completion_per_mtok", &self.price_completion_per_mtok)
            .field("daily_budget_usd", &self.daily_budget_usd)
            .finish()
    }
}

/// A setting the summarizer cannot work with (never contains the key).
#[derive(Debug, thiserror::Error)]
#[error("invalid LLM settings: {0}")]
pub struct LlmSetupError(pub String);

mod breaker;
mod budget;
mod call;
mod mmr;
mod prompt;
mod reply;
#[cfg(test)]
mod testutil;

pub use breaker::{Admission, BreakerState, CircuitBreaker};
pub use budget::{LlmTotals, cost_usd_total};
pub use call::parse_retry_after;
pub use mmr::select_mmr;
pub use prompt::{PromptStats, build_incremental_prompt, build_prompt};
pub use reply::parse_reply;

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The LLM summarizer; see the module docs. Share one instance (`Arc`) across all windows: the concurrency limit,
/// rate limiter, breaker and budget are per instance.
pub struct LlmSummarizer {
    settings: LlmSettings,
    config: OpenAIConfig,
    http: reqwest::Client,
    url: String,
    semaphore: Semaphore,
    limiter: Option<DefaultDirectRateLimiter>,
    breaker: Mutex<CircuitBreaker>,
    spend: Mutex<DailySpend>,
    totals: Mutex<LlmTotals>,
    /// No call before this instant (a long `Retry-After`).
    not_before: Mutex<Option<Instant>>,
    /// The budget shared with the other replicas (Postgres); without it the budget is this instance's own.
    ledger: Option<std::sync::Arc<dyn crate::budget::SpendLedger>>,
}

impl fmt::Debug for LlmSummarizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSummarizer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LlmSummarizer {
    /// Builds the summarizer (no network traffic). Fails on a base URL that does not parse or a key that cannot be
    /// sent in an HTTP header.
    pub fn new(mut settings: LlmSettings) -> Result<Self, LlmSetupError> {
        settings.base_url = settings.base_url.trim().trim_end_matches('/').to_string();
        settings.api_key = settings.api_key.trim().to_string();
        let parsed = reqwest::Url::parse(&settings.base_url).map_err(|e| {
            LlmSetupError(format!(
                "base URL {:?} does not parse: {e}",
                settings.base_url
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(LlmSetupError(format!(
                "base URL {:?} is not http(s)",
                settings.base_url
            )));
        }
        if HeaderValue::from_str(&format!("Bearer {}", settings.api_key)).is_err() {
            return Err(LlmSetupError(
                "the API key contains characters that cannot be sent in an HTTP header".into(),
            ));
        }
        if settings.model.trim().is_empty() {
            return Err(LlmSetupError("model is empty".into()));
        }
        settings.concurrency = settings.concurrency.max(1);
        // reqwest is built with `rustls-no-provider`: make sure a crypto provider is installed (no-op if one is).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("recap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmSetupError(format!("HTTP client: {e}")))?;
        let config = OpenAIConfig::new()
            .with_api_base(settings.base_url.clone())
            .with_api_key(settings.api_key.clone());
        let url = config.url("/chat/completions");
        let limiter = rate_quota(settings.requests_per_second).map(RateLimiter::direct);
        Ok(LlmSummarizer {
            semaphore: Semaphore::new(settings.concurrency),
            breaker: Mutex::new(CircuitBreaker::new(
                settings.breaker_failures,
                settings.breaker_cooldown,
            )),
            spend: Mutex::new(DailySpend {
                day: today_utc(),
                usd: 0.0,
            }),
            totals: Mutex::new(LlmTotals::default()),
            not_before: Mutex::new(None),
            ledger: None,
            settings,
            config,
            http,
            url,
            limiter,
        })
    }

    pub fn settings(&self) -> &LlmSettings {
        &self.settings
    }

    /// Keeps the daily budget and the spend in a ledger shared by every replica (see [`crate::budget`]).
    pub fn with_ledger(mut self, ledger: std::sync::Arc<dyn crate::budget::SpendLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Whether a window could be sent now: the circuit, a long Retry-After and the budget allow a call. Workers ask
    /// before they claim and fetch a window.
    pub async fn ready(&self) -> Result<(), SummarizeError> {
        self.admit_transport()?;
        if let Some(budget) = self.settings.daily_budget_usd
            && self.over_budget_now().await
        {
            metrics::counter!("recap_llm_errors_total", "kind" => "budget").increment(1);
            return Err(SummarizeError::Unavailable(format!(
                "daily budget of {budget:.4} USD reached (UTC day, all replicas)"
            )));
        }
        Ok(())
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        lock(&self.breaker).state(Instant::now())
    }

    async fn run(&self, w: &WindowInput, purpose: Purpose) -> Result<Summary, SummarizeError> {
        if w.messages.iter().all(|m| m.text.trim().is_empty()) {
            return Err(SummarizeError::Empty);
        }
        self.admit_transport()?;
        let prompt = prompt_parts(&self.settings, w);
        self.run_prompt(w, prompt, purpose).await
    }

    /// An incremental summary: one call whose prompt holds the prior summary and only the messages since
    /// (`prompt::incremental_parts`).
    async fn run_incremental(
        &self,
        prior: &Prior,
        new: &WindowInput,
        purpose: Purpose,
    ) -> Result<Summary, SummarizeError> {
        if new.messages.iter().all(|m| m.text.trim().is_empty()) {
            return Err(SummarizeError::Empty);
        }
        self.admit_transport()?;
        let prompt = incremental_parts(&self.settings, prior, new);
        self.run_prompt(new, prompt, purpose).await
    }

    async fn run_prompt(
        &self,
        w: &WindowInput,
        prompt: prompt::PromptParts,
        purpose: Purpose,
    ) -> Result<Summary, SummarizeError> {
        if prompt.stats.messages_sent < prompt.stats.messages_total {
            tracing::debug!(
                bot = %w.bot, user_id = %w.user_id,
                messages_total = prompt.stats.messages_total, messages_sent = prompt.stats.messages_sent,
                est_tokens_full = prompt.stats.est_tokens_full, est_tokens_sent = prompt.stats.est_tokens_sent,
                "window over the token budget: sending an MMR selection"
            );
        }
        let first = self
            .complete_budgeted(&prompt.system, &prompt.user, purpose)
            .await?;
        let reason = match parse_reply(&first.content) {
            Ok(s) => return Ok(with_usage(s, &[&first])),
            Err(reason) => reason,
        };
        metrics::counter!("recap_llm_errors_total", "kind" => "invalid_json").increment(1);
        tracing::warn!(bot = %w.bot, user_id = %w.user_id, %reason, "LLM reply is not a valid summary; one repair call");
        let repair = repair_system_prompt(&prompt.system, &first.content, &reason);
        let second = self
            .complete_budgeted(&repair, &prompt.user, purpose)
            .await?;
        match parse_reply(&second.content) {
            Ok(s) => Ok(with_usage(s, &[&first, &second])),
            Err(again) => {
                metrics::counter!("recap_llm_errors_total", "kind" => "invalid_json").increment(1);
                Err(SummarizeError::Failed(format!(
                    "no valid JSON summary after one repair call: {again} (first reply: {reason})"
                )))
            }
        }
    }
}

fn rate_quota(rps: f64) -> Option<Quota> {
    if !rps.is_finite() || rps <= 0.0 {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / rps);
    let burst = NonZeroU32::new((rps.ceil() as u32).clamp(1, 1000)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

impl Summarizer for LlmSummarizer {
    fn kind(&self) -> SummarizerKind {
        SummarizerKind::Llm
    }

    fn ledger(&self) -> Option<std::sync::Arc<dyn crate::budget::SpendLedger>> {
        self.ledger.clone()
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), SummarizeError>> {
        Box::pin(LlmSummarizer::ready(self))
    }

    fn summarize<'a>(
        &'a self,
        window: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(self.run(window, Purpose::Window))
    }

    fn summarize_for<'a>(
        &'a self,
        window: &'a WindowInput,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(self.run(window, purpose))
    }

    fn incremental(&self) -> bool {
        true
    }

    fn summarize_incremental<'a>(
        &'a self,
        prior: &'a Prior,
        new: &'a WindowInput,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(self.run_incremental(prior, new, purpose))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::TONES;
    use crate::summarize::llm::testutil::*;
    // ---- settings, budget -----------------------------------------------------------------------------------

    #[test]
    fn key_never_shows_in_debug_or_setup_errors() {
        let s = settings("http://127.0.0.1:9/v1");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("SECRET") && dbg.contains("<redacted>"));
        let llm = LlmSummarizer::new(s.clone()).unwrap();
        assert!(!format!("{llm:?}").contains("SECRET"));
        let bad = LlmSettings {
            api_key: "sk-SECRET\u{7f}bad".into(),
            ..s.clone()
        };
        let err = LlmSummarizer::new(bad).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(
            LlmSummarizer::new(LlmSettings {
                base_url: "not a url".into(),
                ..s
            })
            .is_err()
        );
    }

    // ---- against the test server -----------------------------------------------------------------------------

    /// One integration test at a time (they may share the `LLM_BASE_URL` server; and 2 cores).
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    struct TestServer {
        /// API base, e.g. `http://127.0.0.1:PORT/v1`.
        base: String,
        /// The server root (`/control`, `/stats`).
        root: String,
        child: Option<std::process::Child>,
        http: reqwest::Client,
    }

    impl TestServer {
        /// A private server process per test (its fault settings and counters are this test's alone); the
        /// shared `LLM_BASE_URL` server only when python3 or the script is not available — fault injection there
        /// would reach every other test using it.
        async fn start() -> TestServer {
            use std::io::BufRead;
            let _ = rustls::crypto::ring::default_provider().install_default();
            let http = reqwest::Client::new();
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testsupport/llm_server.py");
            let spawned = std::process::Command::new("python3")
                .arg(&script)
                .args(["--port", "0"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .spawn();
            let mut child = match spawned {
                Ok(child) if script.exists() => child,
                other => {
                    if let Ok(mut c) = other {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    let base = std::env::var("LLM_BASE_URL").expect(
                        "neither python3 testsupport/llm_server.py nor LLM_BASE_URL is available",
                    );
                    let base = base.trim_end_matches('/').to_string();
                    let root = base.trim_end_matches("/v1").to_string();
                    let s = TestServer {
                        base,
                        root,
                        child: None,
                        http,
                    };
                    s.reset().await;
                    return s;
                }
            };
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let port: u16 = line
                .trim()
                .strip_prefix("READY port=")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| {
                    let _ = child.kill();
                    panic!("unexpected first line from llm_server.py: {line:?}")
                });
            let root = format!("http://127.0.0.1:{port}");
            TestServer {
                base: format!("{root}/v1"),
                root,
                child: Some(child),
                http,
            }
        }

        async fn control(&self, body: serde_json::Value) {
            let r = self
                .http
                .post(format!("{}/control", self.root))
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "control {body}: {}", r.status());
        }

        async fn reset(&self) {
            let r = self
                .http
                .post(format!("{}/control/reset", self.root))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }

        /// `/stats` once no completion is in flight (the server records a call just after answering it).
        async fn stats(&self) -> serde_json::Value {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = self
                    .http
                    .get(format!("{}/stats?calls=1", self.root))
                    .send()
                    .await
                    .unwrap();
                let v: serde_json::Value =
                    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                if v["in_flight"].as_u64() == Some(0) || Instant::now() > deadline {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn assert_valid(s: &Summary) {
        assert!(
            !s.text.trim().is_empty() && !crate::summarize::looks_like_placeholder(&s.text),
            "{s:?}"
        );
        assert!((1..=8).contains(&s.key_topics.len()), "{s:?}");
        assert!(TONES.contains(&s.emotional_tone.as_str()));
        assert!((0.0..=1.0).contains(&s.confidence));
        assert_eq!(s.kind, SummarizerKind::Llm);
        assert!(
            s.usage
                .as_ref()
                .is_some_and(|u| u.prompt_tokens > 0 && u.completion_tokens > 0)
        );
    }

    #[tokio::test]
    async fn server_usage_matches_and_prompt_estimate_is_exact() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        let llm = LlmSummarizer::new(settings(&srv.base)).unwrap();
        for i in 0..4 {
            let w = convo(&format!("u{i}"), 5 + 7 * i, i as u64);
            let before = srv.stats().await;
            let s = llm.summarize(&w).await.unwrap();
            let after = srv.stats().await;
            assert_valid(&s);
            let u = s.usage.clone().unwrap();
            let d = |k: &str| after[k].as_f64().unwrap() - before[k].as_f64().unwrap();
            assert_eq!(d("calls_total"), 1.0, "one call per window");
            assert_eq!(u.prompt_tokens as f64, d("prompt_tokens_total"));
            assert_eq!(u.completion_tokens as f64, d("completion_tokens_total"));
            let cost = u.cost_usd.expect("the server reports usage.cost");
            assert!(
                (cost - d("cost_total")).abs() < 1e-9,
                "{cost} vs {}",
                d("cost_total")
            );
            assert!(
                cost_usd_total() >= cost,
                "recap_llm_cost_usd_total counts the call's cost"
            );
            assert_eq!(u.model, "recap-test-model");
            // our ceil(chars/4) estimate is exactly what the server counted
            let (_, stats) = build_prompt(llm.settings(), &w);
            assert_eq!(stats.est_tokens_sent as u32, u.prompt_tokens);
            // the server's topics come from the message lines, so the prompt lines were read as messages
            let text = w
                .messages
                .iter()
                .map(|m| m.text.to_lowercase())
                .collect::<Vec<_>>()
                .join(" ");
            for t in &s.key_topics {
                assert!(
                    text.contains(&t.to_lowercase()),
                    "topic {t:?} not in the window"
                );
            }
        }
        let t = llm.totals();
        let st = srv.stats().await;
        assert_eq!(
            t.prompt_tokens as f64,
            st["prompt_tokens_total"].as_f64().unwrap()
        );
        assert!((t.cost_usd - st["cost_total"].as_f64().unwrap()).abs() < 1e-9);
        assert!((llm.spent_today() - t.cost_usd).abs() < 1e-12);
    }

    #[tokio::test]
    async fn thirty_percent_faults_every_window_ends_ok_or_failed() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        srv.control(serde_json::json!({
            "fail_rate": 0.3, "fail_modes": ["429", "500", "nonjson"], "retry_after": 1, "seed": 4, "latency_ms": 40
        }))
        .await;
        let llm = LlmSummarizer::new(LlmSettings {
            concurrency: 4,
            ..settings(&srv.base)
        })
        .unwrap();
        let windows: Vec<WindowInput> = (0..30)
            .map(|i| convo(&format!("user-{i}"), 4 + i % 9, i as u64))
            .collect();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let results = futures::future::join_all(windows.iter().map(|w| {
            let llm = &llm;
            async move {
                // like the pipeline: an Unavailable window stays due and is tried again later
                let mut unavailable = 0;
                loop {
                    match llm.summarize(w).await {
                        Err(SummarizeError::Unavailable(_)) if Instant::now() < deadline => {
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        other => return (other, unavailable),
                    }
                }
            }
        }))
        .await;
        let (mut ok, mut failed, mut unavailable) = (0, 0, 0);
        for (r, u) in &results {
            unavailable += u;
            match r {
                Ok(s) => {
                    assert_valid(s);
                    ok += 1;
                }
                Err(SummarizeError::Failed(reason)) => {
                    assert!(!reason.trim().is_empty());
                    failed += 1;
                }
                Err(e) => panic!("window ended with {e}"),
            }
        }
        let st = srv.stats().await;
        println!(
            "30% faults: {ok} ok, {failed} failed, {unavailable} unavailable rounds, in {:?}; server: calls {} \
             failed_by_mode {} max_concurrency {} early_retries {}",
            started.elapsed(),
            st["calls_total"],
            st["calls_failed_by_mode"],
            st["max_concurrency_observed"],
            st["early_retries"]
        );
        assert_eq!(ok + failed, 30);
        assert!(st["max_concurrency_observed"].as_u64().unwrap() <= 4);
        assert_eq!(
            st["early_retries"].as_u64().unwrap(),
            0,
            "a retry came before its Retry-After"
        );
        for mode in ["429", "500", "nonjson"] {
            assert!(
                st["calls_failed_by_mode"][mode].as_u64().unwrap_or(0) > 0,
                "the run should have seen {mode}"
            );
        }
        // what we counted is what the server counted (including calls whose reply was then rejected)
        let t = llm.totals();
        assert_eq!(t.http_calls, st["calls_total"].as_u64().unwrap());
        assert_eq!(t.prompt_tokens, st["prompt_tokens_total"].as_u64().unwrap());
        assert_eq!(
            t.completion_tokens,
            st["completion_tokens_total"].as_u64().unwrap()
        );
        assert!((t.cost_usd - st["cost_total"].as_f64().unwrap()).abs() < 1e-9);
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        srv.control(serde_json::json!({"fail_next": 2, "fail_modes": ["429"], "retry_after": 1}))
            .await;
        let llm = LlmSummarizer::new(settings(&srv.base)).unwrap();
        let started = Instant::now();
        let s = llm.summarize(&convo("ra", 5, 1)).await.unwrap();
        assert_valid(&s);
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let st = srv.stats().await;
        assert_eq!(st["calls_total"].as_u64().unwrap(), 3);
        assert_eq!(st["early_retries"].as_u64().unwrap(), 0);
    }

    #[tokio::test]
    async fn non_json_once_is_repaired_twice_is_failed() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        let llm = LlmSummarizer::new(settings(&srv.base)).unwrap();
        srv.control(serde_json::json!({"fail_next": 1, "fail_modes": ["nonjson"]}))
            .await;
        let s = llm.summarize(&convo("r1", 6, 2)).await.unwrap();
        assert_valid(&s);
        let st = srv.stats().await;
        assert_eq!(st["calls_total"].as_u64().unwrap(), 2, "one repair call");
        // the summary's usage covers both calls
        let u = s.usage.unwrap();
        assert_eq!(
            u.prompt_tokens as u64,
            st["prompt_tokens_total"].as_u64().unwrap()
        );
        assert_eq!(
            u.completion_tokens as u64,
            st["completion_tokens_total"].as_u64().unwrap()
        );
        let calls = st["calls"].as_array().unwrap();
        assert_eq!(calls[0]["mode"], "nonjson");
        assert_eq!(calls[1]["mode"], "ok");

        srv.control(serde_json::json!({"fail_next": 2, "fail_modes": ["nonjson"]}))
            .await;
        let err = llm.summarize(&convo("r2", 6, 3)).await.unwrap_err();
        match &err {
            SummarizeError::Failed(reason) => {
                assert!(reason.contains("not the JSON object"), "{reason}")
            }
            other => panic!("expected Failed, got {other}"),
        }
        assert_eq!(srv.stats().await["calls_total"].as_u64().unwrap(), 4);
    }

    #[tokio::test]
    async fn client_errors_fail_and_timeouts_are_retried() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        // 404 from a wrong path: a 4xx other than 429 fails at once, no retry
        let wrong = LlmSummarizer::new(settings(&format!("{}/nope", srv.root))).unwrap();
        let err = wrong.summarize(&convo("c", 3, 0)).await.unwrap_err();
        assert!(
            matches!(&err, SummarizeError::Failed(m) if m.contains("404")),
            "{err}"
        );
        assert!(!err.to_string().contains("SECRET"));
        assert_eq!(wrong.totals().http_calls, 1);
        // a call that hangs past our timeout is retried
        srv.control(
            serde_json::json!({"fail_next": 1, "fail_modes": ["timeout"], "timeout_sleep_s": 3}),
        )
        .await;
        let llm = LlmSummarizer::new(LlmSettings {
            timeout: Duration::from_millis(500),
            ..settings(&srv.base)
        })
        .unwrap();
        let s = llm.summarize(&convo("t", 4, 1)).await.unwrap();
        assert_valid(&s);
        assert_eq!(llm.totals().http_calls, 2);
    }

    #[tokio::test]
    async fn endpoint_down_opens_the_breaker_then_recovers() {
        let _serial = SERIAL.lock().await;
        let srv = TestServer::start().await;
        let s = LlmSettings {
            breaker_failures: 3,
            breaker_cooldown: Duration::from_millis(1500),
            max_retries: 4,
            ..settings(&srv.base)
        };
        let llm = LlmSummarizer::new(s).unwrap();
        srv.control(serde_json::json!({"down": true})).await;
        let down_since = Instant::now();
        // windows while down: all Unavailable (never Failed), and the breaker stops the calls
        let mut outcomes = Vec::new();
        while down_since.elapsed() < Duration::from_secs(4) {
            let w = convo(
                &format!("down-{}", outcomes.len()),
                4,
                outcomes.len() as u64,
            );
            outcomes.push(llm.summarize(&w).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls_while_down = srv.stats().await["calls_total"].as_u64().unwrap();
        let circuit_open = outcomes
            .iter()
            .filter(
                |r| matches!(r, Err(SummarizeError::Unavailable(m)) if m.contains("circuit open")),
            )
            .count();
        println!(
            "down for 4s: {} windows tried, all Unavailable; {circuit_open} refused by the open circuit; {calls_while_down} HTTP calls",
            outcomes.len()
        );
        assert!(
            outcomes
                .iter()
                .all(|r| matches!(r, Err(SummarizeError::Unavailable(_)))),
            "{outcomes:?}"
        );
        assert!(circuit_open >= outcomes.len() / 2, "{outcomes:?}");
        // 3 to open, then one trial per cooldown (4 s / 1.5 s) — far fewer than windows × attempts
        assert!(
            calls_while_down <= 3 + 4,
            "{calls_while_down} calls while down"
        );
        // an open circuit answers without calling
        if llm.breaker_state() == BreakerState::Open {
            let before = srv.stats().await["calls_total"].as_u64().unwrap();
            let err = llm.summarize(&convo("x", 3, 0)).await.unwrap_err();
            assert!(matches!(&err, SummarizeError::Unavailable(m) if m.contains("circuit open")));
            assert_eq!(srv.stats().await["calls_total"].as_u64().unwrap(), before);
        }
        // back up: after the cooldown a trial goes through and everything is summarized again
        srv.control(serde_json::json!({"down": false})).await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
        for i in 0..5 {
            let s = llm
                .summarize(&convo(&format!("up-{i}"), 4, i))
                .await
                .unwrap();
            assert_valid(&s);
        }
        assert_eq!(llm.breaker_state(), BreakerState::Closed);
    }
}
