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
//! `recap_llm_calls_total{outcome}` per HTTP attempt (`ok`, `rate_limited`, `server`, `timeout`, `connect`, `client`);
//! `recap_llm_errors_total{kind}` (`rate_limited`, `server`, `timeout`, `connect`, `client`, `invalid_json`,
//! `breaker_open`, `budget`); `recap_llm_tokens_total{type=prompt|completion}`; `recap_llm_cost_usd_total` (a counter
//! of USD: the `metrics` crate's counters are integers, so it is kept in [`cost_usd_total`] and `/metrics` renders
//! it); `recap_llm_latency_seconds` (histogram, per HTTP attempt).
//! The API key is never logged and never put into an error.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_openai::config::{Config, OpenAIConfig};
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, ResponseFormat,
};
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::extractive::{common_dim, emotion_tone, normalized};
use super::{
    Message, SummarizeError, Summarizer, SummarizerKind, Summary, TONES, Usage, WindowInput,
};

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

/// Estimated tokens for `chars` characters: `ceil(chars / 4)` (the test server's rule; a usual average for English).
pub fn estimate_tokens(chars: usize) -> usize {
    chars.div_ceil(4)
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

// ---------------------------------------------------------------------------------------------------------------
// Prompt

/// What [`build_prompt`] sent compared with the whole window (estimated tokens, `ceil(chars/4)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptStats {
    pub messages_total: usize,
    pub messages_sent: usize,
    /// Estimated prompt tokens had every message been sent.
    pub est_tokens_full: usize,
    /// Estimated prompt tokens of the prompt built.
    pub est_tokens_sent: usize,
}

/// The prompt of one window: system text, user text and what they cost.
#[derive(Debug, Clone)]
struct PromptParts {
    system: String,
    user: String,
    stats: PromptStats,
}

/// The chat messages for one window (system + user) and how much of the window they carry.
pub fn build_prompt(
    settings: &LlmSettings,
    window: &WindowInput,
) -> (Vec<ChatCompletionRequestMessage>, PromptStats) {
    let p = prompt_parts(settings, window);
    (chat_messages(&p.system, &p.user), p.stats)
}

fn chat_messages(system: &str, user: &str) -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessage::from(system).into(),
        ChatCompletionRequestUserMessage::from(user).into(),
    ]
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn fmt_ms(ms: i64, pattern: &str) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format(pattern).to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// One message as a prompt line: `[HH:MM] (emotion) role: text` (`[MM-DD HH:MM]` when the messages span several
/// UTC dates; no parentheses without an emotion label). Whitespace is collapsed so a message is one line; `cap`
/// cuts the text to that many characters.
fn format_line(m: &Message, multi_day: bool, cap: Option<usize>) -> String {
    let time = fmt_ms(m.ts_ms, if multi_day { "%m-%d %H:%M" } else { "%H:%M" });
    let mut text = m.text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(cap) = cap
        && chars(&text) > cap
    {
        text = super::extractive::trim_on_word(&text, cap.saturating_sub(1).max(1));
    }
    let role = if m.role.trim().is_empty() {
        "unknown"
    } else {
        m.role.trim()
    };
    match m
        .emotion
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        Some(e) => format!("[{time}] ({e}) {role}: {text}"),
        None => format!("[{time}] {role}: {text}"),
    }
}

/// The lines above the messages. No line here has the `speaker: text` shape, so nothing in it reads as a message.
fn header(w: &WindowInput, shown: usize, total: usize, selected: bool) -> String {
    let range = format!(
        "Conversation between user {} and the bot {}, from {} to {} UTC (message times are UTC).",
        w.user_id,
        w.bot,
        fmt_ms(w.start_ms, "%Y-%m-%d %H:%M"),
        fmt_ms(w.end_ms, "%Y-%m-%d %H:%M"),
    );
    let count = if selected {
        format!(
            "Showing {shown} of {total} messages, selected to represent the whole conversation; the others are left out."
        )
    } else {
        format!("All {total} messages of the window.")
    };
    format!("{range}\n{count}\nEach line gives [time] (emotion label) speaker, then the text.")
}

fn compose_user(header: &str, lines: &[&str]) -> String {
    let mut s =
        String::with_capacity(header.len() + lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
    s.push_str(header);
    s.push_str("\n\n");
    s.push_str(&lines.join("\n"));
    s
}

fn prompt_parts(settings: &LlmSettings, w: &WindowInput) -> PromptParts {
    let msgs: Vec<&Message> = w
        .messages
        .iter()
        .filter(|m| !m.text.trim().is_empty())
        .collect();
    let n = msgs.len();
    let multi_day = match (msgs.first(), msgs.last()) {
        (Some(a), Some(b)) => fmt_ms(a.ts_ms, "%Y-%m-%d") != fmt_ms(b.ts_ms, "%Y-%m-%d"),
        _ => false,
    };
    let system = SYSTEM_PROMPT.to_string();
    let sys_chars = chars(&system);

    let full_lines: Vec<String> = msgs
        .iter()
        .map(|m| format_line(m, multi_day, None))
        .collect();
    let full_refs: Vec<&str> = full_lines.iter().map(String::as_str).collect();
    let user_full = compose_user(&header(w, n, n, false), &full_refs);
    let est_full = estimate_tokens(sys_chars + chars(&user_full));
    let max = settings.max_input_tokens;
    if max == 0 || est_full <= max {
        let stats = PromptStats {
            messages_total: n,
            messages_sent: n,
            est_tokens_full: est_full,
            est_tokens_sent: est_full,
        };
        return PromptParts {
            system,
            user: user_full,
            stats,
        };
    }

    // Over budget: choose messages by MMR until the budget is used.
    let fixed = sys_chars + chars(&header(w, n, n, true)) + 2;
    let budget_chars = (max * 4).saturating_sub(fixed);
    // No single message may eat the budget: cap each at a sixth of it (at least 200 chars).
    let cap = (budget_chars / 6).max(200);
    let lines: Vec<String> = msgs
        .iter()
        .map(|m| format_line(m, multi_day, Some(cap)))
        .collect();
    let costs: Vec<usize> = lines.iter().map(|l| chars(l) + 1).collect();
    let vectors: Vec<&[f32]> = msgs.iter().map(|m| m.vector.as_slice()).collect();
    let mut picked = select_mmr(&vectors, &costs, budget_chars, MMR_LAMBDA);
    let mut lines = lines;
    if picked.is_empty() && n > 0 {
        // Not even one line fits (tiny budget): send the most relevant message, cut to what is left.
        let first = select_mmr(&vectors, &vec![0; n], usize::MAX, MMR_LAMBDA)[0];
        lines[first] = format_line(
            msgs[first],
            multi_day,
            Some(budget_chars.saturating_sub(30).max(80)),
        );
        picked.push(first);
    }
    loop {
        let mut in_time: Vec<usize> = picked.clone();
        in_time.sort_unstable();
        let refs: Vec<&str> = in_time.iter().map(|&i| lines[i].as_str()).collect();
        let user = compose_user(&header(w, in_time.len(), n, true), &refs);
        let est = estimate_tokens(sys_chars + chars(&user));
        if est <= max || picked.len() <= 1 {
            let stats = PromptStats {
                messages_total: n,
                messages_sent: in_time.len(),
                est_tokens_full: est_full,
                est_tokens_sent: est,
            };
            return PromptParts {
                system,
                user,
                stats,
            };
        }
        picked.pop(); // drop the least valuable pick (MMR order) until it fits
    }
}

/// Maximal marginal relevance: indices in pick order whose `costs` add up to at most `budget`.
///
/// Relevance is the cosine of a message's vector to the centroid of the (normalised) vectors of the most common
/// dimension; diversity the highest cosine to a message already picked; the score `λ·relevance − (1−λ)·diversity`.
/// A candidate that no longer fits the remaining budget is dropped and the next best tried. Messages without a
/// usable vector score 0 on both. With no usable vectors at all, messages are taken spread evenly over the window
/// (bit-reversed order: first, middle, quarters, …).
pub fn select_mmr(vectors: &[&[f32]], costs: &[usize], budget: usize, lambda: f64) -> Vec<usize> {
    let n = vectors.len().min(costs.len());
    let dim = common_dim(vectors[..n].iter().copied());
    let units: Vec<Option<Vec<f32>>> = match dim {
        Some(d) => vectors[..n]
            .iter()
            .map(|v| if v.len() == d { normalized(v) } else { None })
            .collect(),
        None => vec![None; n],
    };
    let mut remaining = budget;
    let mut order = Vec::new();
    let have = units.iter().filter(|u| u.is_some()).count();
    if have == 0 {
        for i in spread_order(n) {
            if costs[i] <= remaining {
                remaining -= costs[i];
                order.push(i);
            }
        }
        return order;
    }
    let d = dim.unwrap_or(0);
    let mut centroid = vec![0f32; d];
    for u in units.iter().flatten() {
        for (c, x) in centroid.iter_mut().zip(u) {
            *c += *x;
        }
    }
    let centroid = normalized(&centroid).unwrap_or(centroid);
    let relevance: Vec<f64> = units
        .iter()
        .map(|u| u.as_ref().map_or(0.0, |u| dot(u, &centroid) as f64))
        .collect();
    let mut max_sim: Vec<Option<f64>> = vec![None; n];
    let mut alive = vec![true; n];
    loop {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..n {
            if !alive[i] {
                continue;
            }
            if costs[i] > remaining {
                alive[i] = false;
                continue;
            }
            let score = lambda * relevance[i] - (1.0 - lambda) * max_sim[i].unwrap_or(0.0);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i));
            }
        }
        let Some((_, p)) = best else { break };
        alive[p] = false;
        remaining -= costs[p];
        order.push(p);
        if let Some(up) = &units[p] {
            for i in 0..n {
                if alive[i]
                    && let Some(ui) = &units[i]
                {
                    let s = dot(ui, up) as f64;
                    if max_sim[i].is_none_or(|m| s > m) {
                        max_sim[i] = Some(s);
                    }
                }
            }
        }
    }
    order
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// 0..n in bit-reversed order, so every prefix is spread over the whole range.
fn spread_order(n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let bits = usize::BITS - (n - 1).leading_zeros();
    let mut out = Vec::with_capacity(n);
    for i in 0..(1usize << bits) {
        let r = if bits == 0 {
            0
        } else {
            i.reverse_bits() >> (usize::BITS - bits)
        };
        if r < n {
            out.push(r);
        }
    }
    out
}

/// The system prompt of the one repair call: the original instructions, the rejected reply and why.
fn repair_system_prompt(system: &str, bad_reply: &str, reason: &str) -> String {
    let quoted = if chars(bad_reply) > REPAIR_QUOTE_CHARS {
        format!(
            "{}…",
            bad_reply
                .chars()
                .take(REPAIR_QUOTE_CHARS)
                .collect::<String>()
        )
    } else {
        bad_reply.to_string()
    };
    format!(
        "{system}\n\nYour previous answer for this conversation was rejected ({reason}). It was:\n<<<\n{quoted}\n>>>\n\
         Answer again with ONLY the JSON object described above, nothing before or after it."
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Reply parsing

/// The fields of a reply object. Liberal in what it accepts: a field may come under its name or an alias, both may be
/// present side by side (the first non-null one in [`field`]'s order wins, the other is ignored), and keys nobody
/// asked for are ignored.
#[derive(Debug)]
struct ReplyJson {
    summary: String,
    key_topics: serde_json::Value,
    emotional_tone: serde_json::Value,
    confidence: serde_json::Value,
}

/// The first present, non-null value among `names`.
fn field(obj: &serde_json::Map<String, serde_json::Value>, names: &[&str]) -> serde_json::Value {
    names
        .iter()
        .filter_map(|n| obj.get(*n))
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

impl ReplyJson {
    fn from_str(c: &str) -> Result<ReplyJson, String> {
        let obj = match serde_json::from_str::<serde_json::Value>(c).map_err(|e| e.to_string())? {
            serde_json::Value::Object(o) => o,
            other => return Err(format!("expected a JSON object, got {}", json_kind(&other))),
        };
        let summary = match field(&obj, &["summary", "summary_text", "summaryText"]) {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => return Err("missing field `summary`".into()),
            other => return Err(format!("`summary` is {}, not a string", json_kind(&other))),
        };
        Ok(ReplyJson {
            summary,
            key_topics: field(&obj, &["key_topics", "topics", "keyTopics"]),
            emotional_tone: field(&obj, &["emotional_tone", "tone", "emotionalTone"]),
            confidence: field(&obj, &["confidence"]),
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The JSON object inside a reply: the whole text, the inside of a ```` ``` ```` / ```` ```json ```` fence, or the
/// span from the first `{` to the last `}`.
fn json_candidates(content: &str) -> Vec<&str> {
    let t = content.trim();
    let mut out = vec![t];
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
        let inner = rest.rsplit_once("```").map_or(rest, |(a, _)| a);
        out.push(inner.trim());
    }
    if let (Some(a), Some(b)) = (t.find('{'), t.rfind('}'))
        && a < b
    {
        out.push(&t[a..=b]);
    }
    out
}

/// Parses and validates a model reply into an LLM [`Summary`] (without usage); `Err` carries the reason.
pub fn parse_reply(content: &str) -> Result<Summary, String> {
    if content.trim().is_empty() {
        return Err("empty reply".into());
    }
    let mut first_err = None;
    let mut parsed = None;
    for c in json_candidates(content) {
        match ReplyJson::from_str(c) {
            Ok(r) => {
                parsed = Some(r);
                break;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some(r) = parsed else {
        let snippet: String = content.trim().chars().take(120).collect();
        return Err(format!(
            "reply is not the JSON object asked for ({}): {snippet:?}",
            first_err.map(|e| e.to_string()).unwrap_or_default()
        ));
    };
    let key_topics: Vec<String> = match r.key_topics {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })
            .collect(),
        serde_json::Value::String(s) => s.split([',', ';']).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let tone_raw = match r.emotional_tone {
        serde_json::Value::String(s) => s.trim().to_lowercase(),
        _ => String::new(),
    };
    let emotional_tone = if TONES.contains(&tone_raw.as_str()) {
        tone_raw
    } else {
        // A label instead of a tone ("happy", "frustrated"): map it; anything else fails validation.
        emotion_tone(&tone_raw)
            .map(str::to_string)
            .unwrap_or(tone_raw)
    };
    let confidence = match r.confidence {
        serde_json::Value::Number(n) => n.as_f64().unwrap_or(0.5),
        serde_json::Value::String(s) => s
            .trim()
            .trim_end_matches('%')
            .parse::<f64>()
            .map(|v| if v > 1.0 { v / 100.0 } else { v })
            .unwrap_or(0.5),
        _ => 0.5,
    };
    Summary {
        text: r.summary,
        key_topics,
        emotional_tone,
        confidence,
        kind: SummarizerKind::Llm,
        usage: None,
    }
    .validate()
    .map_err(|e| match e {
        SummarizeError::Invalid(why) => why,
        other => other.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Retry-After

/// How long a response asks to wait: the larger of `retry-after-ms` (milliseconds) and `Retry-After` (seconds, or an
/// HTTP date relative to `now`); `None` when neither is present and parseable.
pub fn parse_retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v / 1000.0));
    let ra = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.trim();
            if let Ok(secs) = v.parse::<f64>() {
                return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
            }
            let when = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
            Some((when - now).to_std().unwrap_or(Duration::ZERO))
        });
    match (ms, ra) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Circuit breaker

/// The breaker's state at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// Cooldown over: one trial call may go through.
    HalfOpen,
}

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    /// The single half-open trial call: its outcome closes or re-opens the circuit.
    Trial,
}

/// A small circuit breaker: `threshold` consecutive transient failures open it for `cooldown`; then one trial call
/// is let through (half-open) — success closes it, failure opens it again. A trial whose outcome never arrives
/// (cancelled call) is replaced after another `cooldown`. `threshold` 0 disables it. Time is passed in explicitly.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    consecutive: u32,
    open_until: Option<Instant>,
    trial_started: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            threshold,
            cooldown,
            consecutive: 0,
            open_until: None,
            trial_started: None,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether the circuit is open or half-open (not closed), whatever the time.
    pub fn is_tripped(&self) -> bool {
        self.open_until.is_some()
    }

    /// Consecutive transient failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// `Some(wait)` when a call now would be refused (open, or half-open with its trial in flight).
    pub fn rejects(&self, now: Instant) -> Option<Duration> {
        match self.state(now) {
            BreakerState::Closed => None,
            BreakerState::Open => Some(self.open_until.map_or(Duration::ZERO, |u| u - now)),
            BreakerState::HalfOpen => match self.trial_started {
                Some(t) if now.duration_since(t) < self.cooldown => {
                    Some(self.cooldown - now.duration_since(t))
                }
                _ => None,
            },
        }
    }

    /// Lets a call through (`Ok`) or refuses it with how long to wait (`Err`).
    pub fn admit(&mut self, now: Instant) -> Result<Admission, Duration> {
        if let Some(wait) = self.rejects(now) {
            return Err(wait);
        }
        match self.state(now) {
            BreakerState::Closed => Ok(Admission::Normal),
            _ => {
                self.trial_started = Some(now);
                Ok(Admission::Trial)
            }
        }
    }

    /// The endpoint answered (a success, or an error that is not the endpoint's fault).
    pub fn on_success(&mut self, admission: Admission) {
        match (admission, self.open_until) {
            (_, None) => self.consecutive = 0,
            (Admission::Trial, Some(_)) => {
                self.open_until = None;
                self.trial_started = None;
                self.consecutive = 0;
            }
            // a call admitted before the circuit opened finished well: the trial decides, not it
            (Admission::Normal, Some(_)) => {}
        }
    }

    /// A transient failure (5xx, 429, timeout, connection error).
    pub fn on_failure(&mut self, admission: Admission, now: Instant) {
        if self.threshold == 0 {
            return;
        }
        match (admission, self.open_until) {
            (Admission::Trial, _) => {
                self.open_until = Some(now + self.cooldown);
                self.trial_started = None;
                self.consecutive = 0;
            }
            (Admission::Normal, None) => {
                self.consecutive += 1;
                if self.consecutive >= self.threshold {
                    self.open_until = Some(now + self.cooldown);
                    self.consecutive = 0;
                }
            }
            (Admission::Normal, Some(_)) => {}
        }
    }

    /// The call ended without an outcome (cancelled): a trial slot is freed.
    pub fn on_abandoned(&mut self, admission: Admission) {
        if admission == Admission::Trial {
            self.trial_started = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports an admitted call's outcome to the breaker; a call dropped before reporting frees its trial slot.
struct AdmissionGuard<'a> {
    breaker: &'a Mutex<CircuitBreaker>,
    admission: Admission,
    settled: bool,
}

impl AdmissionGuard<'_> {
    fn success(&mut self) {
        let a = self.admission;
        self.settle(|b| b.on_success(a));
    }
    fn failure(&mut self) {
        let a = self.admission;
        self.settle(|b| b.on_failure(a, Instant::now()));
    }
    /// Applies an outcome; when it opens or closes the circuit, says so once (log line and the
    /// `recap_llm_breaker_open` gauge), not on every refused call.
    fn settle(&mut self, outcome: impl FnOnce(&mut CircuitBreaker)) {
        let mut b = lock(self.breaker);
        let was_open = b.is_tripped();
        outcome(&mut b);
        let open = b.is_tripped();
        drop(b);
        self.settled = true;
        if open != was_open {
            metrics::gauge!("recap_llm_breaker_open").set(if open { 1.0 } else { 0.0 });
            if open {
                tracing::warn!(
                    "LLM circuit opened after repeated endpoint failures: windows wait until a trial call succeeds"
                );
            } else {
                tracing::info!("LLM circuit closed: the endpoint answers again");
            }
        }
    }
}

impl Drop for AdmissionGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            lock(self.breaker).on_abandoned(self.admission);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Calls

/// Why one HTTP attempt failed.
#[derive(Debug)]
enum CallError {
    RateLimited {
        retry_after: Option<Duration>,
    },
    Server {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    Timeout(Duration),
    Connect(String),
    Client {
        status: u16,
        message: String,
    },
    BreakerOpen(Duration),
}

impl CallError {
    fn kind(&self) -> &'static str {
        match self {
            CallError::RateLimited { .. } => "rate_limited",
            CallError::Server { .. } => "server",
            CallError::Timeout(_) => "timeout",
            CallError::Connect(_) => "connect",
            CallError::Client { .. } => "client",
            CallError::BreakerOpen(_) => "breaker_open",
        }
    }

    /// A fault of the endpoint or the network: retried, counted by the breaker, `Unavailable` in the end.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            CallError::RateLimited { .. }
                | CallError::Server { .. }
                | CallError::Timeout(_)
                | CallError::Connect(_)
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::RateLimited { retry_after } | CallError::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::RateLimited {
                retry_after: Some(d),
            } => write!(f, "429 rate limited (retry after {:.1}s)", d.as_secs_f64()),
            CallError::RateLimited { retry_after: None } => write!(f, "429 rate limited"),
            CallError::Server {
                status, message, ..
            } => write!(f, "HTTP {status}: {message}"),
            CallError::Timeout(d) => write!(f, "no answer within {:.1}s", d.as_secs_f64()),
            CallError::Connect(m) => write!(f, "connection error: {m}"),
            CallError::Client { status, message } => write!(f, "HTTP {status}: {message}"),
            CallError::BreakerOpen(d) => {
                write!(f, "circuit open for another {:.1}s", d.as_secs_f64())
            }
        }
    }
}

/// One answered call.
#[derive(Debug, Clone)]
struct Completion {
    content: String,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    cost_usd: Option<f64>,
    latency: Duration,
}

#[derive(Debug, Deserialize)]
struct ApiResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ApiChoice>,
    #[serde(default)]
    usage: Option<ApiUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ApiChoice {
    #[serde(default)]
    message: Option<ApiMessage>,
}

#[derive(Debug, Deserialize)]
struct ApiMessage {
    #[serde(default)]
    content: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    /// OpenRouter (and the test server) report the call's cost in USD.
    #[serde(default)]
    cost: Option<f64>,
}

/// Running totals of what the summarizer sent and was charged (since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LlmTotals {
    /// HTTP requests sent (whatever their outcome).
    pub http_calls: u64,
    /// Requests answered 2xx with a completion.
    pub ok_calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug)]
struct DailySpend {
    day: NaiveDate,
    usd: f64,
}

impl DailySpend {
    fn at(&mut self, today: NaiveDate) -> &mut f64 {
        if self.day != today {
            self.day = today;
            self.usd = 0.0;
        }
        &mut self.usd
    }
}

fn today_utc() -> NaiveDate {
    Utc::now().date_naive()
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

/// USD spent on LLM calls since the process started, as f64 bits: the `recap_llm_cost_usd_total` counter, which
/// `/metrics` renders (the `metrics` crate's counters are integers).
static COST_USD_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn add_cost_usd_total(usd: f64) {
    use std::sync::atomic::Ordering;
    if usd.is_finite() && usd > 0.0 {
        let _ = COST_USD_TOTAL.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + usd).to_bits())
        });
    }
}

/// The value of the `recap_llm_cost_usd_total` counter.
pub fn cost_usd_total() -> f64 {
    f64::from_bits(COST_USD_TOTAL.load(std::sync::atomic::Ordering::Relaxed))
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

    /// What one call with this prompt may cost at most: its tokens at the configured prices plus a full
    /// [`MAX_OUTPUT_TOKENS`] completion (what a call reserves from the shared budget).
    pub fn estimate_cost(&self, system: &str, user: &str) -> f64 {
        let prompt = estimate_tokens(chars(system) + chars(user)) as f64;
        (prompt * self.settings.price_prompt_per_mtok
            + f64::from(MAX_OUTPUT_TOKENS) * self.settings.price_completion_per_mtok)
            / 1e6
    }

    /// How long a reservation may outlive its call's start: every attempt timing out with the longest back-off.
    fn reservation_ttl(&self) -> Duration {
        let s = &self.settings;
        let tries = s.max_retries as u32 + 1;
        s.timeout * tries
            + s.retry_max_delay * tries
            + MAX_INLINE_RETRY_AFTER
            + Duration::from_secs(60)
    }

    /// True when a daily budget is set and today's spend (with the ledger: all replicas' spend and reservations)
    /// has reached it. A ledger that cannot be read counts as over budget.
    pub async fn over_budget_now(&self) -> bool {
        let Some(budget) = self.settings.daily_budget_usd else {
            return false;
        };
        match &self.ledger {
            Some(l) => l.committed_today().await.map_or(true, |c| c >= budget),
            None => self.spent_today() >= budget,
        }
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

    /// One logical call within the budget: reserves its estimated cost in the shared ledger (or checks this
    /// instance's spend without one), calls, then records what it cost.
    async fn complete_budgeted(
        &self,
        system: &str,
        user: &str,
    ) -> Result<Completion, SummarizeError> {
        let reserved = match (&self.ledger, self.settings.daily_budget_usd) {
            (None, _) => {
                self.check_budget()?;
                None
            }
            (Some(_), None) => None,
            (Some(l), Some(budget)) => {
                match l
                    .reserve(
                        self.estimate_cost(system, user),
                        budget,
                        self.reservation_ttl(),
                    )
                    .await
                {
                    Ok(crate::budget::Reserve::Granted { usd }) => Some(usd),
                    Ok(crate::budget::Reserve::Over { committed_usd }) => {
                        metrics::counter!("recap_llm_errors_total", "kind" => "budget")
                            .increment(1);
                        return Err(SummarizeError::Unavailable(format!(
                            "daily budget of {budget:.4} USD reached ({committed_usd:.4} USD spent or reserved \
                             today, UTC, all replicas)"
                        )));
                    }
                    Err(e) => {
                        return Err(SummarizeError::Unavailable(format!(
                            "cannot reserve the call's cost in the shared budget: {e}"
                        )));
                    }
                }
            }
        };
        let result = self.complete(system, user).await;
        if let Some(l) = &self.ledger {
            let cost = result.as_ref().ok().and_then(|c| c.cost_usd).unwrap_or(0.0);
            if (reserved.is_some() || cost > 0.0)
                && let Err(e) = l.settle(reserved, cost).await
            {
                tracing::warn!(error = %e, cost_usd = cost, "could not record the LLM call's cost in Postgres");
            }
        }
        result
    }

    /// Adds `usd` to today's (UTC) spend — e.g. the sum of today's stored LLM costs, read at start.
    pub fn record_spend_seed(&self, usd: f64) {
        if usd.is_finite() && usd > 0.0 {
            *lock(&self.spend).at(today_utc()) += usd;
        }
    }

    /// USD spent today (UTC) through this summarizer, plus the seed.
    pub fn spent_today(&self) -> f64 {
        *lock(&self.spend).at(today_utc())
    }

    /// What this summarizer has sent and been charged since it was created.
    pub fn totals(&self) -> LlmTotals {
        *lock(&self.totals)
    }

    /// The breaker's state now.
    pub fn breaker_state(&self) -> BreakerState {
        lock(&self.breaker).state(Instant::now())
    }

    /// True when a daily budget is set and today's spend has reached it (the caller may then fall back to the
    /// extractive summarizer instead of letting windows wait).
    pub fn over_budget(&self) -> bool {
        self.settings
            .daily_budget_usd
            .is_some_and(|b| self.spent_today() >= b)
    }

    fn check_budget(&self) -> Result<(), SummarizeError> {
        if let Some(budget) = self.settings.daily_budget_usd {
            let spent = self.spent_today();
            if spent >= budget {
                metrics::counter!("recap_llm_errors_total", "kind" => "budget").increment(1);
                return Err(SummarizeError::Unavailable(format!(
                    "daily budget of {budget:.4} USD reached ({spent:.4} USD spent today, UTC)"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a window without any call while the circuit is open or a long Retry-After runs.
    fn admit_transport(&self) -> Result<(), SummarizeError> {
        let now = Instant::now();
        if let Some(until) = *lock(&self.not_before)
            && now < until
        {
            metrics::counter!("recap_llm_errors_total", "kind" => "rate_limited").increment(1);
            return Err(SummarizeError::Unavailable(format!(
                "rate limited by the endpoint for another {:.1}s",
                (until - now).as_secs_f64()
            )));
        }
        if let Some(wait) = lock(&self.breaker).rejects(now) {
            metrics::counter!("recap_llm_errors_total", "kind" => "breaker_open").increment(1);
            return Err(SummarizeError::Unavailable(format!(
                "circuit open for another {:.1}s after repeated endpoint failures",
                wait.as_secs_f64()
            )));
        }
        Ok(())
    }

    fn redact(&self, s: &str) -> String {
        let key = &self.settings.api_key;
        if key.len() >= 4 {
            s.replace(key.as_str(), "[redacted]")
        } else {
            s.to_string()
        }
    }

    fn request_body(&self, system: &str, user: &str) -> Result<Vec<u8>, SummarizeError> {
        #[allow(deprecated)] // `max_tokens` is what OpenRouter and most compatible servers read
        let request = CreateChatCompletionRequest {
            model: self.settings.model.clone(),
            messages: chat_messages(system, user),
            response_format: Some(ResponseFormat::JsonObject),
            temperature: Some(0.2),
            max_tokens: Some(MAX_OUTPUT_TOKENS),
            ..Default::default()
        };
        serde_json::to_vec(&request)
            .map_err(|e| SummarizeError::Failed(format!("cannot encode the request: {e}")))
    }

    async fn run(&self, w: &WindowInput) -> Result<Summary, SummarizeError> {
        if w.messages.iter().all(|m| m.text.trim().is_empty()) {
            return Err(SummarizeError::Empty);
        }
        self.admit_transport()?;
        let prompt = prompt_parts(&self.settings, w);
        if prompt.stats.messages_sent < prompt.stats.messages_total {
            tracing::debug!(
                bot = %w.bot, user_id = %w.user_id,
                messages_total = prompt.stats.messages_total, messages_sent = prompt.stats.messages_sent,
                est_tokens_full = prompt.stats.est_tokens_full, est_tokens_sent = prompt.stats.est_tokens_sent,
                "window over the token budget: sending an MMR selection"
            );
        }
        let first = self.complete_budgeted(&prompt.system, &prompt.user).await?;
        let reason = match parse_reply(&first.content) {
            Ok(s) => return Ok(with_usage(s, &[&first])),
            Err(reason) => reason,
        };
        metrics::counter!("recap_llm_errors_total", "kind" => "invalid_json").increment(1);
        tracing::warn!(bot = %w.bot, user_id = %w.user_id, %reason, "LLM reply is not a valid summary; one repair call");
        let repair = repair_system_prompt(&prompt.system, &first.content, &reason);
        let second = self.complete_budgeted(&repair, &prompt.user).await?;
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

    /// One logical call: attempts with retries; maps the final failure onto [`SummarizeError`].
    async fn complete(&self, system: &str, user: &str) -> Result<Completion, SummarizeError> {
        // The same bytes for every attempt (servers may recognise a retried request by its body).
        let body = self.request_body(system, user)?;
        let attempts = AtomicUsize::new(0);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_base_delay)
            .with_max_delay(
                self.settings
                    .retry_max_delay
                    .max(self.settings.retry_base_delay),
            )
            .with_max_times(self.settings.max_retries)
            .with_jitter();
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.attempt(&body)
        })
        .retry(backoff)
        .when(CallError::is_transient)
        .adjust(|e, delay| {
            let delay = delay?;
            match e.retry_after() {
                Some(ra) if ra > MAX_INLINE_RETRY_AFTER => None,
                // never sooner than the server asked (plus a little slack for clock granularity)
                Some(ra) => Some(delay.max(ra + Duration::from_millis(20))),
                None => Some(delay),
            }
        })
        .notify(|e, delay| {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "LLM call failed; retrying");
        })
        .await;
        let n = attempts.load(Ordering::Relaxed);
        result.map_err(|e| match e {
            CallError::BreakerOpen(wait) => SummarizeError::Unavailable(format!(
                "circuit open for another {:.1}s after repeated endpoint failures",
                wait.as_secs_f64()
            )),
            CallError::RateLimited {
                retry_after: Some(ra),
            } if ra > MAX_INLINE_RETRY_AFTER => {
                let until = Instant::now() + ra;
                let mut nb = lock(&self.not_before);
                *nb = Some(nb.map_or(until, |u| u.max(until)));
                SummarizeError::Unavailable(format!(
                    "rate limited: the endpoint asked to wait {:.0}s",
                    ra.as_secs_f64()
                ))
            }
            e if e.is_transient() => SummarizeError::Unavailable(format!(
                "LLM endpoint unavailable after {n} attempt(s): {e}"
            )),
            e => SummarizeError::Failed(format!("LLM endpoint rejected the request: {e}")),
        })
    }

    /// One HTTP attempt, through the breaker, the concurrency limit, the rate limiter and the timeout.
    async fn attempt(&self, body: &[u8]) -> Result<Completion, CallError> {
        let admission = lock(&self.breaker).admit(Instant::now()).map_err(|wait| {
            metrics::counter!("recap_llm_errors_total", "kind" => "breaker_open").increment(1);
            CallError::BreakerOpen(wait)
        })?;
        let mut guard = AdmissionGuard {
            breaker: &self.breaker,
            admission,
            settled: false,
        };
        let _permit = self
            .semaphore
            .acquire()
            .await
            .map_err(|_| CallError::Connect("summarizer shut down".into()))?;
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        let started = Instant::now();
        lock(&self.totals).http_calls += 1;
        let outcome = match tokio::time::timeout(self.settings.timeout, self.send(body)).await {
            Err(_) => Err(CallError::Timeout(self.settings.timeout)),
            Ok(Err(e)) => Err(self.transport_error(e)),
            Ok(Ok((status, headers, bytes))) => {
                self.read_response(status, &headers, &bytes, started.elapsed())
            }
        };
        metrics::histogram!("recap_llm_latency_seconds").record(started.elapsed().as_secs_f64());
        match &outcome {
            Ok(c) => {
                guard.success();
                metrics::counter!("recap_llm_calls_total", "outcome" => "ok").increment(1);
                self.account(c);
            }
            Err(e) => {
                if e.is_transient() {
                    guard.failure();
                } else {
                    guard.success(); // the endpoint answered; the request was at fault
                }
                metrics::counter!("recap_llm_calls_total", "outcome" => e.kind()).increment(1);
                metrics::counter!("recap_llm_errors_total", "kind" => e.kind()).increment(1);
            }
        }
        outcome
    }

    async fn send(&self, body: &[u8]) -> Result<(StatusCode, HeaderMap, Vec<u8>), reqwest::Error> {
        let response = self
            .http
            .post(&self.url)
            .headers(self.config.headers())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok((status, headers, bytes.to_vec()))
    }

    fn transport_error(&self, e: reqwest::Error) -> CallError {
        let e = e.without_url();
        if e.is_timeout() {
            return CallError::Timeout(self.settings.timeout);
        }
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        CallError::Connect(self.redact(&msg))
    }

    fn read_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        latency: Duration,
    ) -> Result<Completion, CallError> {
        let retry_after = parse_retry_after(headers, Utc::now());
        if status.is_success() {
            let resp: ApiResponse =
                serde_json::from_slice(body).map_err(|e| CallError::Server {
                    status: status.as_u16(),
                    retry_after: None,
                    message: format!("unreadable completion body: {e}"),
                })?;
            let Some(choice) = resp.choices.into_iter().next() else {
                let message = resp.error.map_or_else(
                    || "completion without choices".to_string(),
                    |e| self.redact(&short(&e.to_string())),
                );
                return Err(CallError::Server {
                    status: status.as_u16(),
                    retry_after,
                    message,
                });
            };
            let content = match choice.message.and_then(|m| m.content) {
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => String::new(),
            };
            let (prompt_tokens, completion_tokens, provider_cost) = match resp.usage {
                Some(u) => (
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cost.filter(|c| c.is_finite() && *c >= 0.0),
                ),
                None => (0, 0, None),
            };
            let priced = self.settings.price_prompt_per_mtok > 0.0
                || self.settings.price_completion_per_mtok > 0.0;
            let cost_usd = provider_cost.or_else(|| {
                priced.then(|| {
                    (prompt_tokens as f64 * self.settings.price_prompt_per_mtok
                        + completion_tokens as f64 * self.settings.price_completion_per_mtok)
                        / 1e6
                })
            });
            return Ok(Completion {
                content,
                model: resp
                    .model
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or_else(|| self.settings.model.clone()),
                prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(completion_tokens).unwrap_or(u32::MAX),
                cost_usd,
                latency,
            });
        }
        let message = self.redact(&error_message(body));
        match status.as_u16() {
            429 => Err(CallError::RateLimited { retry_after }),
            408 => Err(CallError::Timeout(self.settings.timeout)),
            s if status.is_server_error() => Err(CallError::Server {
                status: s,
                retry_after,
                message,
            }),
            s => Err(CallError::Client { status: s, message }),
        }
    }

    fn account(&self, c: &Completion) {
        metrics::counter!("recap_llm_tokens_total", "type" => "prompt")
            .increment(c.prompt_tokens as u64);
        metrics::counter!("recap_llm_tokens_total", "type" => "completion")
            .increment(c.completion_tokens as u64);
        let cost = c.cost_usd.unwrap_or(0.0);
        add_cost_usd_total(cost);
        *lock(&self.spend).at(today_utc()) += cost;
        let mut t = lock(&self.totals);
        t.ok_calls += 1;
        t.prompt_tokens += c.prompt_tokens as u64;
        t.completion_tokens += c.completion_tokens as u64;
        t.cost_usd += cost;
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if chars(s) > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The `error.message` of an OpenAI-style error body, else the body's start.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(m) = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(|m| m.as_str())
    {
        return short(m);
    }
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        short(&text)
    }
}

/// The usage of the calls behind one summary, summed.
fn with_usage(mut s: Summary, calls: &[&Completion]) -> Summary {
    let cost = calls.iter().map(|c| c.cost_usd).sum::<Option<f64>>();
    s.usage = Some(Usage {
        model: calls.last().map(|c| c.model.clone()).unwrap_or_default(),
        prompt_tokens: calls.iter().map(|c| c.prompt_tokens).sum(),
        completion_tokens: calls.iter().map(|c| c.completion_tokens).sum(),
        cost_usd: cost,
        latency_ms: calls.iter().map(|c| c.latency.as_millis() as u64).sum(),
    });
    s
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

    fn ready(&self) -> BoxFuture<'_, Result<(), SummarizeError>> {
        Box::pin(LlmSummarizer::ready(self))
    }

    fn summarize<'a>(
        &'a self,
        window: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(self.run(window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- helpers --------------------------------------------------------------------------------------------

    /// A tiny deterministic generator (xorshift64*), so tests need no `rand`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const T0: i64 = 1_795_651_200_000; // 2026-11-26 00:00:00 UTC

    fn msg(i: usize, role: &str, text: &str, emotion: Option<&str>, vector: Vec<f32>) -> Message {
        Message {
            point_id: format!("00000000-0000-4000-8000-{i:012}"),
            role: role.into(),
            text: text.into(),
            ts_ms: T0 + 14 * 3_600_000 + i as i64 * 61_000,
            emotion: emotion.map(str::to_string),
            vector,
        }
    }

    fn window(user_id: &str, messages: Vec<Message>) -> WindowInput {
        WindowInput {
            bot: "elena".into(),
            user_id: user_id.into(),
            start_ms: T0,
            end_ms: T0 + 86_400_000,
            messages,
        }
    }

    const LINES: &[(&str, &str, &str)] = &[
        (
            "user",
            "I finally finished my pottery class project, a blue glazed bowl for my grandmother.",
            "joy",
        ),
        (
            "assistant",
            "That sounds beautiful! Your grandmother will love the bowl.",
            "joy",
        ),
        (
            "user",
            "I am nervous about the marathon next month, my knee still hurts after long runs.",
            "anxiety",
        ),
        (
            "assistant",
            "Maybe ask a physiotherapist about the knee before the marathon.",
            "neutral",
        ),
        (
            "user",
            "My sister Lena moved to Lisbon and I miss our Sunday dinners together.",
            "sadness",
        ),
        (
            "user",
            "I started reading a novel about lighthouse keepers in Norway, it is wonderful.",
            "joy",
        ),
        (
            "assistant",
            "Lighthouse stories are so atmospheric. What do you like most about it?",
            "neutral",
        ),
        (
            "user",
            "The quiet. I want to visit a lighthouse in Norway next summer with Lena.",
            "excitement",
        ),
    ];

    fn convo(user_id: &str, n: usize, seed: u64) -> WindowInput {
        let mut rng = Rng(seed | 1);
        let ms = (0..n)
            .map(|i| {
                let (role, text, emotion) = LINES[(i + seed as usize) % LINES.len()];
                let v: Vec<f32> = (0..16).map(|_| rng.unit()).collect();
                msg(i, role, text, Some(emotion), v)
            })
            .collect();
        window(user_id, ms)
    }

    fn settings(base_url: &str) -> LlmSettings {
        LlmSettings {
            base_url: base_url.into(),
            api_key: "sk-test-SECRET-KEY-1234".into(),
            model: "recap-test-model".into(),
            concurrency: 4,
            requests_per_second: 200.0,
            timeout: Duration::from_secs(5),
            max_retries: 6,
            max_input_tokens: 8000,
            breaker_failures: 8,
            breaker_cooldown: Duration::from_secs(1),
            retry_base_delay: Duration::from_millis(30),
            retry_max_delay: Duration::from_millis(400),
            price_prompt_per_mtok: 0.0,
            price_completion_per_mtok: 0.0,
            daily_budget_usd: None,
        }
    }

    fn content_of(m: &ChatCompletionRequestMessage) -> String {
        serde_json::to_value(m).unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    // ---- prompt ---------------------------------------------------------------------------------------------

    #[test]
    fn prompt_carries_speaker_time_text_and_emotion() {
        let mut w = convo("4711", 4, 0);
        w.messages[1].emotion = None;
        let (msgs, stats) = build_prompt(&LlmSettings::default(), &w);
        assert_eq!(msgs.len(), 2);
        assert!(matches!(msgs[0], ChatCompletionRequestMessage::System(_)));
        assert!(matches!(msgs[1], ChatCompletionRequestMessage::User(_)));
        let system = content_of(&msgs[0]);
        assert!(
            system.contains("JSON")
                && system.contains("key_topics")
                && system.contains("emotional_tone")
        );
        for t in TONES {
            assert!(system.contains(t));
        }
        let user = content_of(&msgs[1]);
        assert!(
            user.contains("[14:00] (joy) user: I finally finished my pottery class project"),
            "{user}"
        );
        assert!(
            user.contains("[14:01] assistant: That sounds beautiful!"),
            "{user}"
        );
        assert!(
            user.contains("(anxiety) user: I am nervous about the marathon"),
            "{user}"
        );
        assert!(user.contains("user 4711") && user.contains("bot elena"));
        assert!(user.contains("2026-11-26 00:00") && user.contains("2026-11-27 00:00"));
        assert!(user.contains("All 4 messages"));
        assert_eq!(stats.messages_total, 4);
        assert_eq!(stats.messages_sent, 4);
        assert_eq!(stats.est_tokens_full, stats.est_tokens_sent);
        assert_eq!(
            stats.est_tokens_sent,
            estimate_tokens(chars(&system) + chars(&user))
        );
        // multi-line messages stay on one line
        let w = window(
            "1",
            vec![msg(0, "user", "first line\nsecond line", None, vec![])],
        );
        let (msgs, _) = build_prompt(&LlmSettings::default(), &w);
        assert!(content_of(&msgs[1]).ends_with("[14:00] user: first line second line"));
    }

    #[test]
    fn token_estimate_is_ceil_chars_over_4() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }

    /// A 2,000-message window with clustered random-ish vectors stays under `max_input_tokens`.
    #[test]
    fn mmr_keeps_a_2000_message_window_under_budget() {
        const N: usize = 2000;
        const CLUSTERS: usize = 10;
        const DIM: usize = 384;
        let mut rng = Rng(0x5eed);
        let centers: Vec<Vec<f32>> = (0..CLUSTERS)
            .map(|_| (0..DIM).map(|_| rng.unit()).collect())
            .collect();
        let words = [
            "garden",
            "tomatoes",
            "marathon",
            "knee",
            "pottery",
            "bowl",
            "lisbon",
            "sister",
            "novel",
            "lighthouse",
        ];
        let mut cluster_of = Vec::new();
        let ms: Vec<Message> = (0..N)
            .map(|i| {
                let c = rng.below(CLUSTERS);
                cluster_of.push(c);
                let v: Vec<f32> = centers[c].iter().map(|x| x + 0.6 * rng.unit()).collect();
                let len = 40 + rng.below(360);
                let mut text = format!("message {i} about {}:", words[c]);
                while text.len() < len {
                    text.push(' ');
                    text.push_str(words[rng.below(words.len())]);
                }
                msg(
                    i,
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &text,
                    Some("neutral"),
                    v,
                )
            })
            .collect();
        let w = window("2000", ms);
        let s = LlmSettings {
            max_input_tokens: 8000,
            ..LlmSettings::default()
        };
        let started = Instant::now();
        let (msgs, stats) = build_prompt(&s, &w);
        let took = started.elapsed();
        println!(
            "2,000-message window: sent {} of {} messages, est. {} prompt tokens sent vs {} for the whole window \
             ({:.1}%), budget {}, built in {:?}",
            stats.messages_sent,
            stats.messages_total,
            stats.est_tokens_sent,
            stats.est_tokens_full,
            100.0 * stats.est_tokens_sent as f64 / stats.est_tokens_full as f64,
            s.max_input_tokens,
            took
        );
        assert_eq!(stats.messages_total, N);
        assert!(stats.est_tokens_full > 8000);
        assert!(stats.est_tokens_sent <= 8000, "{stats:?}");
        assert!(
            stats.est_tokens_sent > 7000,
            "budget should be nearly used: {stats:?}"
        );
        assert!(stats.messages_sent > 20 && stats.messages_sent < N);
        let user = content_of(&msgs[1]);
        assert_eq!(
            estimate_tokens(chars(&content_of(&msgs[0])) + chars(&user)),
            stats.est_tokens_sent
        );
        assert!(
            user.contains(&format!("Showing {} of {N} messages", stats.messages_sent)),
            "{}",
            &user[..300]
        );
        // shown in time order, and every cluster is represented (diversity)
        let ids: Vec<usize> = user
            .lines()
            .filter_map(|l| l.split("message ").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(ids.len(), stats.messages_sent);
        assert!(ids.windows(2).all(|p| p[0] < p[1]), "not in time order");
        let covered: BTreeSet<usize> = ids.iter().map(|&i| cluster_of[i]).collect();
        assert_eq!(covered.len(), CLUSTERS, "clusters covered: {covered:?}");
    }

    use std::collections::BTreeSet;

    #[test]
    fn mmr_prefers_relevant_then_diverse() {
        // 0 and 1 are near-duplicates close to the centroid; 2 is different; 3 is an outlier.
        let v = [
            vec![1.0, 0.1, 0.0],
            vec![1.0, 0.12, 0.0],
            vec![0.6, 0.8, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let refs: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
        let order = select_mmr(&refs, &[1, 1, 1, 1], 4, MMR_LAMBDA);
        assert_eq!(order.len(), 4);
        assert!(order[0] == 0 || order[0] == 1);
        assert_eq!(
            order[1], 2,
            "the near-duplicate must not come second: {order:?}"
        );
        // budget respected; a message that does not fit is skipped, a smaller one taken
        let order = select_mmr(&refs, &[5, 5, 10, 1], 7, MMR_LAMBDA);
        let cost: usize = order.iter().map(|&i| [5, 5, 10, 1][i]).sum();
        assert!(cost <= 7 && order.contains(&3), "{order:?}");
        // without vectors: spread over the window
        let none: Vec<&[f32]> = vec![&[]; 8];
        assert_eq!(select_mmr(&none, &[1; 8], 3, MMR_LAMBDA), vec![0, 4, 2]);
        assert_eq!(spread_order(5), vec![0, 4, 2, 1, 3]);
        assert_eq!(spread_order(1), vec![0]);
    }

    #[test]
    fn tiny_budget_still_sends_one_message() {
        let w = convo("7", 50, 3);
        let s = LlmSettings {
            max_input_tokens: 300,
            ..LlmSettings::default()
        };
        let (_, stats) = build_prompt(&s, &w);
        assert_eq!(stats.messages_sent, 1);
    }

    // ---- reply parsing / repair decision ----------------------------------------------------------------------

    const GOOD: &str = r#"{"summary": "The user finished a pottery bowl for their grandmother and worries about a knee before a marathon.", "key_topics": ["pottery", "marathon", "knee"], "emotional_tone": "mixed", "confidence": 0.82}"#;

    #[test]
    fn parses_plain_fenced_and_wrapped_json() {
        let s = parse_reply(GOOD).unwrap();
        assert_eq!(s.key_topics, vec!["pottery", "marathon", "knee"]);
        assert_eq!(s.emotional_tone, "mixed");
        assert_eq!(s.kind, SummarizerKind::Llm);
        assert!((s.confidence - 0.82).abs() < 1e-9);
        assert_eq!(parse_reply(&format!("```json\n{GOOD}\n```")).unwrap(), s);
        assert_eq!(parse_reply(&format!("```\n{GOOD}\n```")).unwrap(), s);
        assert_eq!(
            parse_reply(&format!("Here you go:\n{GOOD}\nHope that helps!")).unwrap(),
            s
        );
    }

    #[test]
    fn lenient_where_harmless() {
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":"chess, openings","emotional_tone":"Happy","confidence":"0.9"}"#).unwrap();
        assert_eq!(s.key_topics, vec!["chess", "openings"]);
        assert_eq!(s.emotional_tone, "positive");
        assert!((s.confidence - 0.9).abs() < 1e-9);
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":["chess"],"emotional_tone":"neutral","confidence":7}"#).unwrap();
        assert_eq!(s.confidence, 1.0);
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":["chess"],"emotional_tone":"neutral"}"#).unwrap();
        assert_eq!(s.confidence, 0.5);
        let many: Vec<String> = (0..12).map(|i| format!("\"t{i}\"")).collect();
        let s = parse_reply(&format!(
            r#"{{"summary":"x y z","key_topics":[{}],"emotional_tone":"neutral"}}"#,
            many.join(",")
        ))
        .unwrap();
        assert_eq!(s.key_topics.len(), 8);
    }

    #[test]
    fn a_field_next_to_its_alias_and_extra_keys_are_accepted() {
        let s = parse_reply(GOOD).unwrap();
        let both = r#"```json
{"summary": "The user finished a pottery bowl for their grandmother and worries about a knee before a marathon.",
 "summary_text": "something else", "key_topics": ["pottery", "marathon", "knee"], "topics": ["other"],
 "emotional_tone": "mixed", "tone": "neutral", "confidence": 0.82, "language": "en", "notes": {"v": 3}}
```"#;
        assert_eq!(
            parse_reply(both).unwrap(),
            s,
            "the field wins over its alias"
        );
        // only the aliases, or a null field next to its alias
        let aliases = r#"{"summary_text": "The user talked about chess.", "topics": ["chess"], "tone": "neutral",
            "summary": null, "key_topics": null}"#;
        let a = parse_reply(aliases).unwrap();
        assert_eq!(a.text, "The user talked about chess.");
        assert_eq!(a.key_topics, vec!["chess"]);
        // strict in what is stored: no NUL reaches a summary
        let nul = parse_reply(
            r#"{"summary": "The user talked about\u0000 chess.", "key_topics": ["ch\u0000ess"], "emotional_tone": "neutral"}"#,
        )
        .unwrap();
        assert!(
            !nul.text.contains('\0') && !nul.key_topics[0].contains('\0'),
            "{nul:?}"
        );
    }

    #[test]
    fn rejects_what_needs_a_repair_call() {
        for bad in [
            "",
            "Sure! Here is the summary: The user talked about pottery. Let me know if you need anything else.",
            r#"{"key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"Summary of conversation","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"<coroutine object at 0x1>","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"ok text","key_topics":[],"emotional_tone":"neutral"}"#,
            r#"{"summary":"ok text","key_topics":["a"],"emotional_tone":"ecstatic-ish"}"#,
            r#"["not", "an", "object"]"#,
        ] {
            let r = parse_reply(bad);
            assert!(r.is_err(), "accepted {bad:?}");
            assert!(!r.unwrap_err().is_empty());
        }
    }

    #[test]
    fn repair_prompt_quotes_the_bad_reply_and_asks_for_json_only() {
        let bad = "Sure! Here is the summary: pottery.";
        let p = repair_system_prompt(SYSTEM_PROMPT, bad, "reply is not the JSON object asked for");
        assert!(p.starts_with(SYSTEM_PROMPT));
        assert!(p.contains(bad));
        assert!(p.contains("ONLY the JSON object"));
        let long = "x".repeat(10_000);
        assert!(
            chars(&repair_system_prompt(SYSTEM_PROMPT, &long, "r"))
                < chars(SYSTEM_PROMPT) + REPAIR_QUOTE_CHARS + 300
        );
    }

    // ---- Retry-After ----------------------------------------------------------------------------------------

    #[test]
    fn retry_after_seconds_ms_and_http_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("4500"));
        assert_eq!(
            parse_retry_after(&h, now),
            Some(Duration::from_millis(4500))
        );
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:07 GMT"),
        );
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:27:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h, now), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h, now), None);
    }

    // ---- breaker --------------------------------------------------------------------------------------------

    #[test]
    fn breaker_opens_after_consecutive_failures_then_half_opens() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_millis(x);
        let mut b = CircuitBreaker::new(3, Duration::from_secs(10));
        assert_eq!(b.state(t0), BreakerState::Closed);
        // two failures, a success resets the count
        for _ in 0..2 {
            let a = b.admit(s(0)).unwrap();
            b.on_failure(a, s(0));
        }
        let a = b.admit(s(1)).unwrap();
        b.on_success(a);
        assert_eq!(b.consecutive_failures(), 0);
        // three in a row open it
        for i in 0..3 {
            let a = b.admit(s(10 + i)).unwrap();
            assert_eq!(a, Admission::Normal);
            b.on_failure(a, s(10 + i));
        }
        assert_eq!(b.state(s(12)), BreakerState::Open);
        assert_eq!(b.admit(s(13)), Err(Duration::from_millis(10_012 - 13)));
        assert!(b.rejects(s(5_000)).is_some());
        // after the cooldown: half-open, exactly one trial
        assert_eq!(b.state(s(10_012)), BreakerState::HalfOpen);
        assert_eq!(b.rejects(s(10_012)), None);
        let trial = b.admit(s(10_012)).unwrap();
        assert_eq!(trial, Admission::Trial);
        assert!(
            b.admit(s(10_013)).is_err(),
            "a second call while the trial is in flight"
        );
        // trial fails: open again for a full cooldown
        b.on_failure(trial, s(10_500));
        assert_eq!(b.state(s(10_501)), BreakerState::Open);
        assert_eq!(b.state(s(20_499)), BreakerState::Open);
        let trial = b.admit(s(20_500)).unwrap();
        assert_eq!(trial, Admission::Trial);
        // a late success of an old normal call does not close it; the trial's success does
        b.on_success(Admission::Normal);
        assert_eq!(b.state(s(20_501)), BreakerState::HalfOpen);
        b.on_success(trial);
        assert_eq!(b.state(s(20_502)), BreakerState::Closed);
        assert_eq!(b.admit(s(20_503)), Ok(Admission::Normal));
    }

    #[test]
    fn breaker_frees_an_abandoned_trial_and_can_be_disabled() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_millis(x);
        let mut b = CircuitBreaker::new(1, Duration::from_secs(1));
        let a = b.admit(s(0)).unwrap();
        b.on_failure(a, s(0));
        let trial = b.admit(s(1_000)).unwrap();
        b.on_abandoned(trial);
        assert_eq!(b.admit(s(1_001)), Ok(Admission::Trial));
        // a trial never reported is replaced after another cooldown
        assert!(b.admit(s(1_500)).is_err());
        assert_eq!(b.admit(s(2_002)), Ok(Admission::Trial));
        let mut off = CircuitBreaker::new(0, Duration::from_secs(1));
        for i in 0..100 {
            let a = off.admit(s(i)).unwrap();
            off.on_failure(a, s(i));
        }
        assert_eq!(off.state(s(100)), BreakerState::Closed);
    }

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

    #[test]
    fn spend_is_kept_per_utc_day() {
        let mut d = DailySpend {
            day: NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(),
            usd: 0.0,
        };
        *d.at(NaiveDate::from_ymd_opt(2026, 11, 26).unwrap()) += 1.5;
        assert_eq!(*d.at(NaiveDate::from_ymd_opt(2026, 11, 26).unwrap()), 1.5);
        assert_eq!(*d.at(NaiveDate::from_ymd_opt(2026, 11, 27).unwrap()), 0.0);
        let llm = LlmSummarizer::new(settings("http://127.0.0.1:9/v1")).unwrap();
        llm.record_spend_seed(0.25);
        llm.record_spend_seed(f64::NAN);
        assert!((llm.spent_today() - 0.25).abs() < 1e-12);
    }

    #[tokio::test]
    async fn over_budget_and_empty_windows_make_no_call() {
        // port 9 (discard) is never called: both answers come before any request
        let llm = LlmSummarizer::new(LlmSettings {
            daily_budget_usd: Some(0.1),
            ..settings("http://127.0.0.1:9/v1")
        })
        .unwrap();
        assert!(!llm.over_budget());
        llm.record_spend_seed(0.2);
        assert!(llm.over_budget());
        let err = llm.summarize(&convo("1", 3, 0)).await.unwrap_err();
        assert!(
            matches!(&err, SummarizeError::Unavailable(m) if m.contains("daily budget")),
            "{err}"
        );
        assert!(matches!(
            llm.summarize(&window("1", vec![])).await,
            Err(SummarizeError::Empty)
        ));
        assert_eq!(llm.totals().http_calls, 0);
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable_and_opens_the_breaker() {
        // a port nobody listens on
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = LlmSettings {
            breaker_failures: 3,
            max_retries: 5,
            breaker_cooldown: Duration::from_secs(30),
            ..settings(&format!("http://127.0.0.1:{port}/v1"))
        };
        let llm = LlmSummarizer::new(s).unwrap();
        let err = llm.summarize(&convo("1", 3, 0)).await.unwrap_err();
        assert!(matches!(&err, SummarizeError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("SECRET"));
        assert_eq!(
            llm.totals().http_calls,
            3,
            "the breaker stops the retries after 3 failures"
        );
        assert_eq!(llm.breaker_state(), BreakerState::Open);
        let err = llm.summarize(&convo("2", 3, 0)).await.unwrap_err();
        assert!(
            matches!(&err, SummarizeError::Unavailable(m) if m.contains("circuit open")),
            "{err}"
        );
        assert_eq!(llm.totals().http_calls, 3);
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
