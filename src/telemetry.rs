//! Every metric recap exports, in one list ([`METRICS`]): its name, kind, help text and labels.
//!
//! [`register`] (called once at start, with the recorder installed) gives each its `# HELP` line and registers every
//! counter at zero, for each combination of its known label values, so that a rate or an `increase()` over a counter
//! that has not moved since start is 0, not an empty vector: an alert such as `RecapNoSummaries` can fire for a
//! recap that has summarized nothing since it started. A label whose values are open (a collection, an HTTP status)
//! has no known values, and its counter's series appear with their first increment (the help text is still there).
//! Gauges are set by their owner (the status snapshot on each scrape, the ingest loop), histograms on their first
//! observation. `tests/it/ops.rs` (`metrics_are_registered_at_zero_with_help`) compares `/metrics` right after start with
//! this list, and `every_metric_in_the_source_is_listed` below fails when a metric is added in code but not here.

/// A metric's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: its labels are (name, known values); an empty list of values means the values are open.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [(&'static str, &'static [&'static str])],
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        help,
        labels: &[],
    }
}

const fn l(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [(&'static str, &'static [&'static str])],
) -> Metric {
    Metric {
        name,
        kind,
        help,
        labels,
    }
}

use Kind::{Counter, Gauge, Histogram};

use crate::model::WindowState;

const LLM_ERRORS: &[&str] = &[
    "rate_limited",
    "server",
    "timeout",
    "connect",
    "client",
    "breaker_open",
    "invalid_json",
    "budget",
];
const MALFORMED: &[&str] = &[
    "json",
    "not_utf8",
    "too_large",
    "unknown_version",
    "field",
    "subject_mismatch",
    "future_timestamp",
];
const PERIODS: &[&str] = &["day", "week", "month"];
/// `status::Snapshot::states`: `open` and `leased` are what the snapshot adds to the window rows' states.
const WINDOWS_BY_STATE: &[&str] = &[
    "open",
    WindowState::Due.as_str(),
    "leased",
    WindowState::Done.as_str(),
    WindowState::TooShort.as_str(),
    WindowState::Dead.as_str(),
];
const ROLLUP_OUTCOMES: &[&str] = &["written", "unchanged", "removed", "stale", "failed"];

/// Every metric recap exports (besides `recap_llm_cost_usd_total` and `recap_build_info`, which
/// `http::render_metrics` writes itself).
pub const METRICS: &[Metric] = &[
    // ----- events (NATS)
    m(
        "recap_events_consumed_total",
        Counter,
        "Events taken from the consumer (valid, conversation_pair and malformed alike).",
    ),
    l(
        "recap_events_malformed_total",
        Counter,
        "Events sent to the dead-letter table recap_dead_letters, by reason.",
        &[("reason", MALFORMED)],
    ),
    m(
        "recap_events_duplicate_total",
        Counter,
        "Events for a point recap already had (redeliveries, re-publishes).",
    ),
    m(
        "recap_events_ignored_total",
        Counter,
        "conversation_pair events (recap summarizes the single messages).",
    ),
    m(
        "recap_events_late_total",
        Counter,
        "Events behind their bot's watermark (they may reopen a closed window).",
    ),
    m(
        "recap_events_redelivered_total",
        Counter,
        "Deliveries at or below the highest stream sequence already handed out (acknowledged again only).",
    ),
    m(
        "recap_events_rerouted_total",
        Counter,
        "Events re-published from the subject shape the partitions do not use to the one they do.",
    ),
    m(
        "recap_consumer_restarts_total",
        Counter,
        "Times a delivery never arrived and the consumer was started again after the last message handed out.",
    ),
    l(
        "recap_partitions_handed_back_total",
        Counter,
        "Ingest partitions whose lease a leader gave up: its checkpoint failed, its source kept failing, or it learnt it was deposed.",
        &[("reason", &["checkpoint", "source", "deposed"])],
    ),
    m(
        "recap_events_relayout_total",
        Counter,
        "Unread events of the previous partition layout re-published on the new one's subjects at a layout change.",
    ),
    m(
        "recap_consumer_lag",
        Gauge,
        "Messages pending on the consumer plus delivered and not yet acknowledged (sampled every 2 s).",
    ),
    m(
        "recap_consumer_pending",
        Gauge,
        "Pending messages on the consumer as of the last pulled message.",
    ),
    // ----- ingest and windows
    m(
        "recap_checkpoints_total",
        Counter,
        "Ingest checkpoints committed.",
    ),
    m(
        "recap_checkpoint_duration_seconds",
        Histogram,
        "One ingest checkpoint transaction.",
    ),
    m(
        "recap_windows_closed_total",
        Counter,
        "Windows closed (quiet for IDLE_GAP_MINUTES, or full).",
    ),
    m(
        "recap_windows_too_short_total",
        Counter,
        "Windows under MIN_MESSAGES_FOR_SUMMARY (no row).",
    ),
    m(
        "recap_windows_summarized_total",
        Counter,
        "Summaries written (one row per window; a late message rewrites it with revision + 1).",
    ),
    l(
        "recap_windows_retried_total",
        Counter,
        "Windows put back with a back-off; counted=yes when the attempt counts toward LLM_MAX_ATTEMPTS.",
        &[("counted", &["yes", "no"])],
    ),
    m(
        "recap_windows_dead_total",
        Counter,
        "Windows that failed LLM_MAX_ATTEMPTS times (recap retry puts them back).",
    ),
    m(
        "recap_window_leases_lost_total",
        Counter,
        "Windows not sent to the LLM because their lease was no longer this replica's (or the window changed).",
    ),
    l(
        "recap_window_points_missing_total",
        Counter,
        "Windows whose named points Qdrant did not show yet: put back for a while (waited), or past the wait summarized from what is visible (proceeded).",
        &[("outcome", &["waited", "proceeded"])],
    ),
    m(
        "recap_window_finish_retries_total",
        Counter,
        "Window finish transactions tried again after a lost Postgres connection (the paid results are kept).",
    ),
    m(
        "recap_window_write_errors_total",
        Counter,
        "Window results Postgres rejected for good (each counts as a failed attempt).",
    ),
    m(
        "recap_window_batch_fallbacks_total",
        Counter,
        "Window batches whose transaction failed and were finished one window at a time.",
    ),
    m(
        "recap_window_close_to_row_seconds",
        Histogram,
        "From a window's close to its row in conversation_summaries.",
    ),
    m(
        "recap_fetch_errors_total",
        Counter,
        "Window fetches from Qdrant that failed (the window waits and is retried).",
    ),
    l(
        "recap_points_skipped_total",
        Counter,
        "Qdrant points of a window that were not summarized, by reason.",
        &[("reason", &[])],
    ),
    // ----- sweep
    m(
        "recap_sweep_cycles_total",
        Counter,
        "Completed sweep cycles over the bot collections.",
    ),
    l(
        "recap_sweep_points_read_total",
        Counter,
        "Points read by the sweep, by collection.",
        &[("collection", &[])],
    ),
    m(
        "recap_sweep_points_read_last_cycle",
        Gauge,
        "Points read by the last completed sweep cycle.",
    ),
    l(
        "recap_sweep_points_skipped_total",
        Counter,
        "Swept points not ingested, by reason.",
        &[("reason", &[])],
    ),
    l(
        "recap_sweep_collection_failures_total",
        Counter,
        "Sweep reads of one collection that failed on Qdrant; the collection is left out of the cycle with a back-off \
         while the others go on.",
        &[("collection", &[])],
    ),
    l(
        "recap_sweep_errors_total",
        Counter,
        "Sweep failures, by kind.",
        &[("kind", &["postgres"])],
    ),
    // ----- LLM
    l(
        "recap_llm_calls_total",
        Counter,
        "LLM HTTP attempts by outcome (ok, rate_limited, server, timeout, connect, client) and purpose (window: a \
         closed window's summary, running: a running summary of an open window, rollup: a day/week/month rollup).",
        &[
            (
                "outcome",
                &[
                    "ok",
                    "rate_limited",
                    "server",
                    "timeout",
                    "connect",
                    "client",
                ],
            ),
            ("purpose", &["window", "running", "rollup"]),
        ],
    ),
    l(
        "recap_running_summaries_total",
        Counter,
        "Running summaries of open windows by outcome (written, discarded: the window changed before the write, \
         invalidated: the previous one no longer fitted its window and the new one was built from the whole window, \
         nothing, retrying, failed, stale) and final window summaries that started from one (used_at_close).",
        &[(
            "outcome",
            &[
                "written",
                "discarded",
                "invalidated",
                "nothing",
                "retrying",
                "failed",
                "stale",
                "used_at_close",
            ],
        )],
    ),
    l(
        "recap_llm_errors_total",
        Counter,
        "LLM failures, by kind (the failed outcomes, invalid_json, breaker_open, budget).",
        &[("kind", LLM_ERRORS)],
    ),
    m(
        "recap_llm_request_duration_seconds",
        Histogram,
        "One LLM HTTP attempt.",
    ),
    l(
        "recap_llm_tokens_total",
        Counter,
        "Tokens billed, by type.",
        &[("type", &["prompt", "completion"])],
    ),
    m(
        "recap_llm_budget_fallbacks_total",
        Counter,
        "Windows summarized extractively because the daily budget was spent (OVER_BUDGET=extractive).",
    ),
    m(
        "recap_llm_breaker_open",
        Gauge,
        "1 while the LLM circuit is open (windows wait), 0 once a trial call closed it.",
    ),
    // ----- rollups
    l(
        "recap_rollups_total",
        Counter,
        "Rollups built (ROLLUPS=on), by period and outcome.",
        &[("period", PERIODS), ("outcome", ROLLUP_OUTCOMES)],
    ),
    l(
        "recap_rollup_duration_seconds",
        Histogram,
        "Building one rollup (read, summarize, write), by period.",
        &[("period", PERIODS)],
    ),
    m(
        "recap_rollups_dirty",
        Gauge,
        "Rollups waiting to be (re)built, after each round.",
    ),
    m(
        "recap_rollup_windows_scanned_total",
        Counter,
        "Window rows read by the rollup change scan.",
    ),
    // ----- recall API and console
    l(
        "recap_recall_requests_total",
        Counter,
        "Recall API requests, by endpoint and HTTP status.",
        &[("endpoint", &[]), ("status", &[])],
    ),
    l(
        "recap_recall_request_duration_seconds",
        Histogram,
        "One recall API request, by endpoint.",
        &[("endpoint", &[])],
    ),
    l(
        "recap_recall_store_errors_total",
        Counter,
        "Recall API store errors: unavailable (503), data (a value Postgres refused: 400), internal (500).",
        &[("kind", &["unavailable", "data", "internal"])],
    ),
    m(
        "recap_users_forgotten_total",
        Counter,
        "Users forgotten through DELETE /v1/users/{bot}/{user_id}.",
    ),
    m(
        "recap_console_logins_throttled_total",
        Counter,
        "Console login attempts refused (429) because their client address tried too often.",
    ),
    m(
        "recap_summary_vectors_synced_total",
        Counter,
        "Summary vectors written to the Qdrant collection recap_summaries.",
    ),
    m(
        "recap_summary_vector_errors_total",
        Counter,
        "Summary vector syncs that failed (the repair pass tries again).",
    ),
    l(
        "recap_summary_vector_drift",
        Gauge,
        "Summary rows whose vector is missing or stale, as of the last repair pass.",
        &[("kind", &["missing", "stale"])],
    ),
    // ----- the status snapshot (refreshed on each scrape)
    l(
        "recap_windows_by_state",
        Gauge,
        "Windows by state, read from Postgres at each scrape (done is an estimate above 200,000 windows).",
        &[("state", WINDOWS_BY_STATE)],
    ),
    m("recap_dead_letters", Gauge, "Rows in recap_dead_letters."),
    m(
        "recap_open_messages",
        Gauge,
        "Messages of open windows, as of the last checkpoint.",
    ),
    m(
        "recap_llm_spend_today_usd",
        Gauge,
        "USD spent on LLM calls today (UTC), all replicas, from the ledger.",
    ),
    m(
        "recap_oldest_due_age_seconds",
        Gauge,
        "Age of the oldest window waiting to be summarized.",
    ),
    l(
        "recap_checkpoint_age_seconds",
        Gauge,
        "Age of each source checkpoint, by name.",
        &[("name", &[])],
    ),
];

/// Every label combination of `labels` whose values are all known (none when a label is open).
pub fn combinations(
    labels: &[(&'static str, &'static [&'static str])],
) -> Vec<Vec<(&'static str, &'static str)>> {
    let mut out: Vec<Vec<(&'static str, &'static str)>> = vec![Vec::new()];
    for (name, values) in labels {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push((*name, *v));
                    p
                })
            })
            .collect();
    }
    out
}

/// Describes every metric and registers every counter at zero for its known label values (see the module docs).
/// Idempotent: an increment of 0 changes nothing.
pub fn register() {
    for m in METRICS {
        match m.kind {
            Kind::Counter => {
                metrics::describe_counter!(m.name, m.help);
                for labels in combinations(m.labels) {
                    let labels: Vec<metrics::Label> = labels
                        .into_iter()
                        .map(|(k, v)| metrics::Label::new(k, v))
                        .collect();
                    metrics::counter!(m.name, labels).increment(0);
                }
            }
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} is listed twice", m.name);
            assert!(m.name.starts_with("recap_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            assert!(
                !m.name.ends_with("_latency_seconds"),
                "{}: durations are _duration_seconds",
                m.name
            );
            assert!(!m.help.is_empty(), "{} has no help", m.name);
        }
    }

    #[test]
    fn label_combinations() {
        let c = combinations(&[("a", &["1", "2"]), ("b", &["x", "y", "z"])]);
        assert_eq!(c.len(), 6);
        assert!(c.contains(&vec![("a", "2"), ("b", "z")]));
        assert_eq!(combinations(&[]), vec![Vec::new()]);
        assert!(combinations(&[("a", &["1"]), ("open", &[])]).is_empty());
    }

    /// Every `counter!` / `gauge!` / `histogram!` name in the source is in [`METRICS`] (so a metric added in code
    /// without its help text and zero registration fails here), and every listed one is used.
    #[test]
    fn every_metric_in_the_source_is_listed() {
        let mut used = std::collections::BTreeSet::new();
        let mut stack = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("telemetry.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for mac in ["counter!(", "gauge!(", "histogram!("] {
                        for (i, _) in text.match_indices(mac) {
                            let rest = text[i + mac.len()..].trim_start();
                            if let Some(r) = rest.strip_prefix('"') {
                                let name = &r[..r.find('"').unwrap()];
                                used.insert(name.to_string());
                            }
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            METRICS.iter().map(|m| m.name.to_string()).collect();
        let missing: Vec<_> = used.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "used in src/ but not in telemetry::METRICS: {missing:?}"
        );
        let unused: Vec<_> = listed.difference(&used).collect();
        assert!(
            unused.is_empty(),
            "in telemetry::METRICS but never recorded: {unused:?}"
        );
    }
}
