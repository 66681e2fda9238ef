//! Summarize stage: turns the messages of one closed window into a validated [`Summary`].
//!
//! Two implementations sit behind the [`Summarizer`] trait: [`extractive`] (deterministic, offline, no key needed)
//! and [`llm`] (one JSON call per window to an OpenAI-compatible endpoint). Nothing here writes to a database; the
//! sink stores what a summarizer returns, and only a [`Summary`] that passed [`Summary::validate`].

pub mod extractive;
pub mod llm;

use futures::future::BoxFuture;

/// Moved to [`crate::model`] (issue 27); kept here so older paths compile.
pub use crate::model::Message;

/// Everything a summarizer gets for one window. Messages are sorted by time, duplicates and
/// `conversation_pair` points already removed.
#[derive(Debug, Clone)]
pub struct WindowInput {
    pub bot: String,
    pub user_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub messages: Vec<Message>,
}

impl WindowInput {
    /// Characters of message text in the window (the numerator of `compression_ratio`).
    pub fn text_chars(&self) -> usize {
        self.messages.iter().map(|m| m.text.chars().count()).sum()
    }
}

/// Which summarizer produced a row; stored so a later LLM pass can upgrade extractive rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummarizerKind {
    Extractive,
    Llm,
}

impl SummarizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SummarizerKind::Extractive => "extractive",
            SummarizerKind::Llm => "llm",
        }
    }
}

/// The emotional tones a summary may carry (a small fixed set).
pub const TONES: &[&str] = &["positive", "negative", "neutral", "mixed"];

/// What one LLM call cost; `None` fields mean the provider did not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cost_usd: Option<f64>,
    pub latency_ms: u64,
}

/// A validated summary of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub text: String,
    pub key_topics: Vec<String>,
    pub emotional_tone: String,
    pub confidence: f64,
    pub kind: SummarizerKind,
    /// Present for LLM summaries.
    pub usage: Option<Usage>,
}

impl Summary {
    /// Checks the invariants every stored summary must hold: a non-empty summary that is not a placeholder,
    /// 1..=8 non-empty topics, a tone from [`TONES`], confidence clamped to 0..=1.
    pub fn validate(mut self) -> Result<Summary, SummarizeError> {
        // strict in what is stored: Postgres rejects NUL in text, and no summary needs one
        self.text = self.text.replace('\0', "").trim().to_string();
        if self.text.is_empty() {
            return Err(SummarizeError::Invalid("empty summary".into()));
        }
        if looks_like_placeholder(&self.text) {
            return Err(SummarizeError::Invalid("placeholder summary".into()));
        }
        self.key_topics = self
            .key_topics
            .into_iter()
            .map(|t| t.replace('\0', "").trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        self.key_topics.dedup();
        if self.key_topics.is_empty() {
            return Err(SummarizeError::Invalid("no key topics".into()));
        }
        self.key_topics.truncate(8);
        let tone = self.emotional_tone.trim().to_lowercase();
        if !TONES.contains(&tone.as_str()) {
            return Err(SummarizeError::Invalid(format!(
                "emotional_tone {tone:?} is not one of {TONES:?}"
            )));
        }
        self.emotional_tone = tone;
        self.confidence = if self.confidence.is_finite() {
            self.confidence.clamp(0.0, 1.0)
        } else {
            0.5
        };
        Ok(self)
    }
}

/// True for the kinds of text the old worker stored instead of a summary.
pub fn looks_like_placeholder(text: &str) -> bool {
    let t = text.trim().to_lowercase();
    t.is_empty()
        || t.contains("<coroutine")
        || t.starts_with("summary of ")
        || t == "placeholder"
        || t.starts_with("todo")
        || t.contains("summary unavailable")
}

#[derive(Debug, thiserror::Error)]
pub enum SummarizeError {
    /// The window has nothing to summarize (should have been caught as too short).
    #[error("window has no messages to summarize")]
    Empty,
    /// The reply (or the extractive result) failed validation.
    #[error("invalid summary: {0}")]
    Invalid(String),
    /// A transient fault: retry later without counting an attempt against the window (endpoint down, breaker open,
    /// rate limited, over budget).
    #[error("summarizer unavailable: {0}")]
    Unavailable(String),
    /// A failure that counts as an attempt for the window (bad replies after retries and repair, 4xx).
    #[error("summarizer failed: {0}")]
    Failed(String),
}

/// What an LLM call is for, sent as the `X-Recap-Purpose` request header and counted as the `purpose` label of
/// `recap_llm_calls_total`, so the calls per closed window stay measurable next to running summaries and rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The final summary of a closed window.
    Window,
    /// A running summary of an open window (`CONTEXT_SUMMARY_EVERY`).
    Running,
    /// A day, week or month rollup.
    Rollup,
}

impl Purpose {
    pub const ALL: [Purpose; 3] = [Purpose::Window, Purpose::Running, Purpose::Rollup];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Window => "window",
            Purpose::Running => "running",
            Purpose::Rollup => "rollup",
        }
    }
}

/// The summary so far of the first messages of a window (a valid running summary): the start of an incremental
/// summary, which adds only the messages since ([`Summarizer::summarize_incremental`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    pub text: String,
    pub key_topics: Vec<String>,
    pub emotional_tone: String,
    /// How many messages the prior summary covers.
    pub message_count: usize,
    /// Stored time of the last covered message (ms).
    pub covers_until_ms: i64,
}

/// What a caller checks before every LLM attempt (the first, each retry, the repair call): for a window, whether its
/// lease is still this worker's and its version unchanged (`pipeline::workers`). `Ok(false)` or an error: the
/// attempt is not sent and the call ends `Unavailable` (no money spent on a result that would be thrown away).
pub trait CallGate: Send + Sync {
    fn admit(&self) -> BoxFuture<'_, Result<bool, String>>;
}

tokio::task_local! {
    static CALL_GATE: std::sync::Arc<dyn CallGate>;
}

/// Runs `f` (a summarizer call) with `gate` asked before each of its LLM attempts.
pub async fn gated<F: std::future::Future>(gate: std::sync::Arc<dyn CallGate>, f: F) -> F::Output {
    CALL_GATE.scope(gate, f).await
}

/// The gate of the summarizer call running now (see [`gated`]), if any.
pub fn current_gate() -> Option<std::sync::Arc<dyn CallGate>> {
    CALL_GATE.try_with(|g| g.clone()).ok()
}

/// The summarize stage's one seam.
pub trait Summarizer: Send + Sync {
    fn kind(&self) -> SummarizerKind;
    /// The shared spend ledger the summarizer records its calls' costs in, if any: the window finish writes the
    /// settlements recorded so far in its own transaction ([`crate::budget::SpendLedger::take_pending`]).
    fn ledger(&self) -> Option<std::sync::Arc<dyn crate::budget::SpendLedger>> {
        None
    }
    /// `Err(Unavailable)` while no window could be summarized now (LLM circuit open, budget spent): workers ask
    /// before they claim and fetch, so an outage or a budget wait costs no Qdrant or Postgres work per window.
    fn ready(&self) -> BoxFuture<'_, Result<(), SummarizeError>> {
        Box::pin(async { Ok(()) })
    }
    fn summarize<'a>(
        &'a self,
        window: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>>;

    /// [`Summarizer::summarize`] for a given purpose (an LLM call says it; the extractive one has no calls).
    fn summarize_for<'a>(
        &'a self,
        window: &'a WindowInput,
        _purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        self.summarize(window)
    }

    /// Whether [`Summarizer::summarize_incremental`] is implemented (false: callers summarize the whole window).
    fn incremental(&self) -> bool {
        false
    }

    /// The summary of a window from the summary of its first messages (`prior`) and the messages since (`new`: only
    /// those, in time order, all stored after `prior.covers_until_ms`), at a cost proportional to `new`.
    fn summarize_incremental<'a>(
        &'a self,
        _prior: &'a Prior,
        _new: &'a WindowInput,
        _purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(async {
            Err(SummarizeError::Failed(
                "this summarizer has no incremental mode".into(),
            ))
        })
    }
}

/// The LLM summarizer, falling back to the extractive one while the daily budget is spent (OVER_BUDGET=extractive).
/// Rows written by the fallback are marked extractive, so `resummarize` can upgrade them later.
pub struct BudgetFallback {
    pub llm: llm::LlmSummarizer,
}

impl Summarizer for BudgetFallback {
    fn kind(&self) -> SummarizerKind {
        SummarizerKind::Llm
    }

    fn ledger(&self) -> Option<std::sync::Arc<dyn crate::budget::SpendLedger>> {
        self.llm.ledger()
    }

    /// Over budget the extractive summarizer answers, so only the LLM's circuit can hold windows back.
    fn ready(&self) -> BoxFuture<'_, Result<(), SummarizeError>> {
        Box::pin(async move {
            match self.llm.ready().await {
                Err(_) if self.llm.over_budget_now().await => Ok(()),
                r => r,
            }
        })
    }

    fn summarize<'a>(
        &'a self,
        window: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        self.summarize_for(window, Purpose::Window)
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
        Box::pin(async move {
            let fallback = || {
                metrics::counter!("recap_llm_budget_fallbacks_total").increment(1);
                extractive::Extractive.summarize_incremental(prior, new, purpose)
            };
            if self.llm.over_budget_now().await {
                return fallback().await;
            }
            match self.llm.summarize_incremental(prior, new, purpose).await {
                Err(SummarizeError::Unavailable(_)) if self.llm.over_budget_now().await => {
                    fallback().await
                }
                r => r,
            }
        })
    }

    fn summarize_for<'a>(
        &'a self,
        window: &'a WindowInput,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(async move {
            let fallback = || {
                metrics::counter!("recap_llm_budget_fallbacks_total").increment(1);
                extractive::Extractive.summarize(window)
            };
            if self.llm.over_budget_now().await {
                return fallback().await;
            }
            match self.llm.summarize_for(window, purpose).await {
                // the budget ran out between the check and the call (another replica spent it)
                Err(SummarizeError::Unavailable(_)) if self.llm.over_budget_now().await => {
                    fallback().await
                }
                r => r,
            }
        })
    }
}
