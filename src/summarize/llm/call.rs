//! One logical call: the request, its HTTP attempts with retries, and the reading of the response.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_openai::config::Config;
use async_openai::types::chat::{CreateChatCompletionRequest, ResponseFormat};
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde::Deserialize;

use super::breaker::AdmissionGuard;
use super::prompt::chat_messages;
use super::{
    LlmSummarizer, MAX_INLINE_RETRY_AFTER, MAX_OUTPUT_TOKENS, chars, estimate_text_tokens,
    estimate_tokens, lock, token_units,
};
use crate::summarize::{Purpose, SummarizeError, Summary, Usage};

/// The request header that says what a call is for (`window`, `running`, `rollup`); the test server counts by it.
pub const PURPOSE_HEADER: &str = "x-recap-purpose";

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
    /// The caller's gate ([`crate::summarize::CallGate`]) refused the attempt: no request was sent.
    Fenced(String),
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
            CallError::Fenced(_) => "fenced",
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

    /// An attempt the provider may have billed though we got no completion: it timed out (the answer may have come
    /// after we stopped waiting), or a 2xx came whose body cannot be read.
    fn may_be_billed(&self) -> bool {
        match self {
            CallError::Timeout(_) => true,
            CallError::Server { status, .. } => (200..300).contains(status),
            _ => false,
        }
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
            CallError::Fenced(why) => write!(f, "no call made: {why}"),
        }
    }
}

/// One answered call.
#[derive(Debug, Clone)]
pub(super) struct Completion {
    pub(super) content: String,
    pub(super) model: String,
    pub(super) prompt_tokens: u32,
    pub(super) completion_tokens: u32,
    pub(super) cost_usd: Option<f64>,
    pub(super) latency: Duration,
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
impl LlmSummarizer {
    /// Refuses a window without any call while the circuit is open or a long Retry-After runs.
    pub(super) fn admit_transport(&self) -> Result<(), SummarizeError> {
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

    /// One logical call: attempts with retries; maps the final failure onto [`SummarizeError`]. Every attempt first
    /// asks the caller's gate ([`crate::summarize::current_gate`]: for a window, is its lease still this worker's and
    /// its version unchanged?) and is not sent when it says no. Also returns what failed attempts may have been
    /// billed: a timed-out attempt or a 2xx whose body cannot be read at `estimate_usd` (the call may have been
    /// answered, and billed, after we stopped waiting; the reserved estimate is its most), others at 0 (a 429, 5xx,
    /// 4xx or a refused connection is not billed).
    pub(super) async fn complete(
        &self,
        system: &str,
        user: &str,
        purpose: Purpose,
        estimate_usd: f64,
    ) -> (Result<Completion, SummarizeError>, f64) {
        // The same bytes for every attempt (servers may recognise a retried request by its body).
        let body = match self.request_body(system, user) {
            Ok(b) => b,
            Err(e) => return (Err(e), 0.0),
        };
        let prompt_tokens_est = estimate_tokens(token_units(system) + token_units(user)) as u64;
        let gate = crate::summarize::current_gate();
        let billed = std::sync::Mutex::new(0.0f64);
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
        let result = (|| async {
            if let Some(gate) = &gate {
                match gate.admit().await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(CallError::Fenced(
                            "the window's lease is no longer this worker's or the window changed".into(),
                        ));
                    }
                    Err(e) => {
                        return Err(CallError::Fenced(format!(
                            "cannot check the window's lease: {e}"
                        )));
                    }
                }
            }
            attempts.fetch_add(1, Ordering::Relaxed);
            let r = self.attempt(&body, purpose, prompt_tokens_est).await;
            if let Err(e) = &r
                && e.may_be_billed()
            {
                *lock(&billed) += estimate_usd;
            }
            r
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
        let billed = *lock(&billed);
        let result = result.map_err(|e| match e {
            CallError::Fenced(why) => {
                SummarizeError::Unavailable(format!("no LLM call made: {why}"))
            }
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
        });
        (result, billed)
    }

    /// One HTTP attempt, through the breaker, the concurrency limit, the rate limiter and the timeout.
    async fn attempt(
        &self,
        body: &[u8],
        purpose: Purpose,
        prompt_tokens_est: u64,
    ) -> Result<Completion, CallError> {
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
        let outcome =
            match tokio::time::timeout(self.settings.timeout, self.send(body, purpose)).await {
                Err(_) => Err(CallError::Timeout(self.settings.timeout)),
                Ok(Err(e)) => Err(self.transport_error(e)),
                Ok(Ok((status, headers, bytes))) => self.read_response(
                    status,
                    &headers,
                    &bytes,
                    started.elapsed(),
                    prompt_tokens_est,
                ),
            };
        metrics::histogram!("recap_llm_request_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match &outcome {
            Ok(c) => {
                guard.success();
                metrics::counter!("recap_llm_calls_total", "outcome" => "ok", "purpose" => purpose.as_str())
                    .increment(1);
                self.account(c);
            }
            Err(e) => {
                if e.is_transient() {
                    guard.failure();
                } else {
                    guard.success(); // the endpoint answered; the request was at fault
                }
                metrics::counter!("recap_llm_calls_total", "outcome" => e.kind(), "purpose" => purpose.as_str())
                    .increment(1);
                metrics::counter!("recap_llm_errors_total", "kind" => e.kind()).increment(1);
            }
        }
        outcome
    }

    async fn send(
        &self,
        body: &[u8],
        purpose: Purpose,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), reqwest::Error> {
        let response = self
            .http
            .post(&self.url)
            .headers(self.config.headers())
            .header(CONTENT_TYPE, "application/json")
            .header(PURPOSE_HEADER, purpose.as_str())
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
        prompt_tokens_est: u64,
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
            // Without `usage` the call is still billed: its tokens estimated from the prompt and the reply text.
            let (prompt_tokens, completion_tokens, provider_cost) = match resp.usage {
                Some(u) => (
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cost.filter(|c| c.is_finite() && *c >= 0.0),
                ),
                None => (
                    prompt_tokens_est,
                    estimate_text_tokens(&content) as u64,
                    None,
                ),
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
pub(super) fn with_usage(mut s: Summary, calls: &[&Completion]) -> Summary {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::llm::testutil::*;
    use crate::summarize::llm::*;

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
}
