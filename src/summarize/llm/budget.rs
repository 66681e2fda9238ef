//! The daily budget and what calls cost: this instance's spend, the shared ledger ([`crate::budget`]), totals.

use std::time::Duration;

use chrono::{NaiveDate, Utc};

use super::call::Completion;
use super::{
    LlmSummarizer, MAX_INLINE_RETRY_AFTER, MAX_OUTPUT_TOKENS, estimate_tokens, lock, token_units,
};
use crate::summarize::SummarizeError;

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
pub(super) struct DailySpend {
    pub(super) day: NaiveDate,
    pub(super) usd: f64,
}

impl DailySpend {
    pub(super) fn at(&mut self, today: NaiveDate) -> &mut f64 {
        if self.day != today {
            self.day = today;
            self.usd = 0.0;
        }
        &mut self.usd
    }
}

pub(super) fn today_utc() -> NaiveDate {
    Utc::now().date_naive()
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
    /// What one call with this prompt may cost at most: its tokens at the configured prices plus a full
    /// [`MAX_OUTPUT_TOKENS`] completion (what a call reserves from the shared budget).
    pub fn estimate_cost(&self, system: &str, user: &str) -> f64 {
        let prompt = estimate_tokens(token_units(system) + token_units(user)) as f64;
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
    /// One logical call within the budget: reserves its estimated cost in the shared ledger (or checks this
    /// instance's spend without one), calls, then records what it cost: the completion's cost, plus what failed
    /// attempts may have been billed (a timed-out attempt at the reserved estimate, see [`LlmSummarizer::complete`]).
    /// The ledger writes settlements in batches (the window's finish transaction, the next reservation).
    pub(super) async fn complete_budgeted(
        &self,
        system: &str,
        user: &str,
        purpose: crate::summarize::Purpose,
    ) -> Result<Completion, SummarizeError> {
        let estimate = self.estimate_cost(system, user);
        let reserved = match (&self.ledger, self.settings.daily_budget_usd) {
            (None, _) => {
                self.check_budget()?;
                None
            }
            (Some(_), None) => None,
            (Some(l), Some(budget)) => {
                match l.reserve(estimate, budget, self.reservation_ttl()).await {
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
        let (result, billed_failures) = self.complete(system, user, purpose, estimate).await;
        if billed_failures > 0.0 {
            add_cost_usd_total(billed_failures);
            *lock(&self.spend).at(today_utc()) += billed_failures;
            lock(&self.totals).cost_usd += billed_failures;
        }
        if let Some(l) = &self.ledger {
            let cost =
                result.as_ref().ok().and_then(|c| c.cost_usd).unwrap_or(0.0) + billed_failures;
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

    pub(super) fn account(&self, c: &Completion) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::llm::testutil::*;
    use crate::summarize::llm::*;

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
}
