//! The circuit breaker in front of the endpoint.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;

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

/// Reports an admitted call's outcome to the breaker; a call dropped before reporting frees its trial slot.
pub(super) struct AdmissionGuard<'a> {
    pub(super) breaker: &'a Mutex<CircuitBreaker>,
    pub(super) admission: Admission,
    pub(super) settled: bool,
}

impl AdmissionGuard<'_> {
    pub(super) fn success(&mut self) {
        let a = self.admission;
        self.settle(|b| b.on_success(a));
    }
    pub(super) fn failure(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
