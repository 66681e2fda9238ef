//! One status snapshot for everything that reports recap's state: `recap status [--json]`, the `/metrics` gauges
//! and the console's overview all read [`snapshot`], so they show the same numbers.
//!
//! The store's part is [`Store::status`] (windows by state, oldest due window, dead letters, open messages, LLM spend
//! today, checkpoints); this module adds open and leased windows, the ingest leader and the window leases per
//! instance, and the JetStream consumer's lag.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{WindowState, state_sql};
use crate::sink::{StatusReport, Store, StoreError};

/// The JetStream consumer as its server reports it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ConsumerSample {
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
}

impl ConsumerSample {
    /// What `/readyz` and `recap_consumer_lag` call lag: undelivered plus unacknowledged.
    pub fn lag(&self) -> u64 {
        self.pending + self.ack_pending
    }
}

/// The ingest lease.
#[derive(Debug, Clone, Serialize)]
pub struct Leader {
    pub owner: String,
    pub epoch: i64,
    pub lease_until: DateTime<Utc>,
    /// The lease has not expired.
    pub valid: bool,
}

/// An instance seen in the leases: the ingest leader and/or a worker holding window leases.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub name: String,
    pub leads_ingest: bool,
    pub windows_leased: i64,
}

/// The label of the keys with an open window in [`Snapshot::states`].
pub const OPEN: &str = "open";
/// The label of the due windows a worker holds a lease on in [`Snapshot::states`].
pub const LEASED: &str = "leased";

/// Everything `recap status --json` prints (the store's report flattened in, field names unchanged).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub store: StatusReport,
    /// (bot, user) keys with messages in a window that has not closed yet.
    pub windows_open: i64,
    /// Due windows a worker holds a lease on now (counted in `windows` as `due` too).
    pub windows_leased: i64,
    pub leader: Option<Leader>,
    pub instances: Vec<Instance>,
    /// None: no NATS configured, or the server did not answer.
    pub consumer: Option<ConsumerSample>,
    pub consumer_lag: Option<u64>,
    /// Summary vectors out of step with their rows (`vectors`); measured by [`snapshot_with_drift`] only (`recap
    /// status`), absent from the console's and `/metrics`' snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary_vector_drift: Option<crate::vectors::Drift>,
    pub taken_at: DateTime<Utc>,
}

impl Snapshot {
    /// Count of windows in a state.
    pub fn windows_in(&self, state: WindowState) -> i64 {
        self.store
            .windows
            .iter()
            .filter(|(s, _)| *s == state)
            .map(|(_, n)| *n)
            .sum()
    }

    /// The states an operator reads, in pipeline order: open, due (not leased), leased, done, too short, dead. `open`
    /// (a key's window not closed yet, `recap_open_windows`) and `leased` (due, held by a worker) are no
    /// [`WindowState`]: they are what the snapshot adds to the window rows' states.
    pub fn states(&self) -> [(&'static str, i64); 6] {
        use WindowState::{Dead, Done, Due, TooShort};
        [
            (OPEN, self.windows_open),
            // read a moment apart: a lease taken in between must not make `due` negative
            (
                Due.as_str(),
                (self.windows_in(Due) - self.windows_leased).max(0),
            ),
            (LEASED, self.windows_leased),
            (Done.as_str(), self.windows_in(Done)),
            (TooShort.as_str(), self.windows_in(TooShort)),
            (Dead.as_str(), self.windows_in(Dead)),
        ]
    }

    /// Sets the status gauges (`/metrics` calls this before rendering, so they are as fresh as the page).
    pub fn publish_gauges(&self) {
        for (state, n) in self.states() {
            metrics::gauge!("recap_windows_by_state", "state" => state).set(n as f64);
        }
        metrics::gauge!("recap_dead_letters").set(self.store.dead_letters as f64);
        metrics::gauge!("recap_open_messages").set(self.store.open_messages as f64);
        metrics::gauge!("recap_llm_spend_today_usd").set(self.store.llm_spend_today_usd);
        metrics::gauge!("recap_oldest_due_age_seconds").set(
            self.store
                .oldest_due
                .map(|t| age_seconds(t, self.taken_at))
                .unwrap_or(0.0),
        );
        for c in &self.store.checkpoints {
            metrics::gauge!("recap_checkpoint_age_seconds", "name" => c.name.clone())
                .set(age_seconds(c.updated_at, self.taken_at));
        }
    }
}

pub fn age_seconds(t: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - t).num_milliseconds().max(0) as f64 / 1000.0
}

/// Reads the snapshot; `consumer` is the caller's reading of the JetStream consumer (see [`consumer_sample`]).
pub async fn snapshot(
    store: &Store,
    consumer: Option<ConsumerSample>,
) -> Result<Snapshot, StoreError> {
    snapshot_of(store, consumer, false).await
}

/// [`snapshot`] with the summary-vector drift (`recap status`). The drift joins every done window with its summary
/// row and vector record: about half a second at a million rows (`benches/console.rs`), which the console's overview
/// and each `/metrics` scrape do not pay; the repair pass publishes the same figure as `recap_summary_vector_drift`.
pub async fn snapshot_with_drift(
    store: &Store,
    consumer: Option<ConsumerSample>,
) -> Result<Snapshot, StoreError> {
    snapshot_of(store, consumer, true).await
}

async fn snapshot_of(
    store: &Store,
    consumer: Option<ConsumerSample>,
    drift: bool,
) -> Result<Snapshot, StoreError> {
    let report = store.status().await?;
    let pool = store.pool();
    let windows_open: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_open_windows")
        .fetch_one(pool)
        .await?;
    // `WindowState::Due` a constant in the text: the partial index `idx_recap_windows_due` (see `model::state_sql`).
    let leases: Vec<(String, i64)> = sqlx::query_as(state_sql!(
        "SELECT lease_owner, count(*) FROM recap_windows
         WHERE state = {due} AND lease_until >= now() AND lease_owner IS NOT NULL
         GROUP BY lease_owner ORDER BY lease_owner"
    ))
    .fetch_all(pool)
    .await?;
    let leader: Option<(String, i64, DateTime<Utc>, bool)> = sqlx::query_as(
        "SELECT owner, epoch, lease_until, lease_until >= now() FROM recap_leader WHERE id = 1",
    )
    .fetch_optional(pool)
    .await?;
    let leader = leader.map(|(owner, epoch, lease_until, valid)| Leader {
        owner,
        epoch,
        lease_until,
        valid,
    });
    let mut instances: Vec<Instance> = leases
        .iter()
        .map(|(name, n)| Instance {
            name: name.clone(),
            leads_ingest: false,
            windows_leased: *n,
        })
        .collect();
    // Every replica leading an ingest partition (partition 0 is `leader`; NATS_PARTITIONS above 1 adds rows).
    let leading: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT owner FROM recap_leader WHERE lease_until >= now() ORDER BY owner DESC",
    )
    .fetch_all(pool)
    .await?;
    for owner in leading {
        match instances.iter_mut().find(|i| i.name == owner) {
            Some(i) => i.leads_ingest = true,
            None => instances.insert(
                0,
                Instance {
                    name: owner,
                    leads_ingest: true,
                    windows_leased: 0,
                },
            ),
        }
    }
    Ok(Snapshot {
        store: report,
        windows_open,
        windows_leased: leases.iter().map(|(_, n)| n).sum(),
        leader,
        instances,
        consumer,
        consumer_lag: consumer.map(|c| c.lag()),
        summary_vector_drift: match drift {
            true => Some(crate::vectors::drift(store).await?),
            false => None,
        },
        taken_at: Utc::now(),
    })
}

/// Reads the consumer's pending counts (at most 5 s; None when the server does not answer).
pub async fn consumer_sample(
    client: &async_nats::Client,
    stream: &str,
    consumer: &str,
) -> Option<ConsumerSample> {
    let probe = async {
        let js = async_nats::jetstream::new(client.clone());
        let stream = js.get_stream(stream).await.ok()?;
        let info = stream.consumer_info(consumer).await.ok()?;
        Some(ConsumerSample {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
        })
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
}
