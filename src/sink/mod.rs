//! Sink stage: everything recap keeps in PostgreSQL, and the transactions that make its effects atomic.
//!
//! Two transactions carry all state changes:
//! * [`IngestTx`]: one per source batch — new messages (de-duplicated by point id), the windows the tracker closed,
//!   watermarks, dead letters and the source position commit together, fenced by the leader epoch. The source
//!   acknowledges its messages only after [`IngestTx::commit`] returned.
//! * [`Store::finish_windows`]: one per batch of windows ([`Store::finish_window`] for one) — per window, the summary
//!   row (an upsert on the window key), the window's coverage, revision and new state commit together, and only while
//!   the worker still holds the window's lease and the window's messages are the ones it summarized (checked per
//!   window: a window that fails the check is skipped, the others are written).
//!
//! Files: `mod.rs` the shared types, errors and the connection (pool, migrations); `ingest.rs` the leader lease, the
//! tracker state read at start (`ingest/tx.rs`: [`IngestTx`], `ingest/coverage.rs`: coverage lists, merge probes); `windows.rs` claiming, leases and [`Store::finish_window`] (a batch of one); `finish_batch.rs`
//! [`Store::finish_windows`]; `status.rs` what `status`, `retry` and `resummarize` read and change; `words.rs` the
//! words said in a window, stored with its row for text search.

mod finish_batch;
mod ingest;
mod layout;
mod lease;
mod running;
mod status;
mod windows;
pub mod words;

/// Moved to [`crate::model`] (issue 27); kept here so older paths compile.
pub use crate::model::{DeadLetter, NewMessage, user_key};
pub use ingest::{
    Closing, IngestTx, MERGE_CANDIDATE_PROBE_SQL, MERGE_CANDIDATES_SQL, StoredSnapshot,
    StoredWatermark, WindowClosed,
};
pub use layout::LayoutLock;
pub use lease::Lease;
pub use running::{ClaimedRunning, OpenPoints, RunningFinished, RunningOutcome, StoredRunning};
pub use status::WindowCounts;
pub use windows::{Claim, HeldWindow, claim_due_sql};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::summarize::Summary;
use crate::tracker::Millis;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Below this many windows `done` is counted exactly; above, it is estimated (see [`Store::window_states`]).
pub const DONE_EXACT_BELOW: i64 = 200_000;

/// `enrichment_version` written on every row: recap's version.
pub const ENRICHMENT_VERSION: &str = concat!("recap-", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("this replica is no longer the ingest leader (epoch {0})")]
    LostLeadership(i64),
    #[error("internal error: {0}")]
    Invariant(&'static str),
}

impl StoreError {
    /// True when the database could not be reached or the connection broke (wait and retry, do not dead-letter).
    pub fn is_connection(&self) -> bool {
        match self {
            StoreError::Db(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::WorkerCrashed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c.starts_with("57") || c.starts_with("08"))
            }
            _ => false,
        }
    }

    /// True for an error the same write will hit again (SQLSTATE class 22, data exception: a NUL in text, a value too
    /// long for its column; class 23, integrity constraint violation): retrying it as it is can never succeed.
    pub fn is_repeatable(&self) -> bool {
        match self {
            StoreError::Db(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            _ => false,
        }
    }
}

/// `s` cut to at most `max` characters (at a character boundary).
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A window's (or running summary's) attempts after a failed one ([`next_attempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NextAttempt {
    attempts: i32,
    /// Out of attempts: dead (a running summary: given up).
    dead: bool,
}

/// A window's attempts after a failed one (`counts`: it counts against `max_attempts`), and whether it is now dead.
fn next_attempt(attempts: i32, counts: bool, max_attempts: i32) -> NextAttempt {
    let attempts = attempts + i32::from(counts);
    NextAttempt {
        attempts,
        dead: counts && attempts >= max_attempts,
    }
}

pub fn to_utc(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The proof that this replica holds the ingest lease.
#[derive(Debug, Clone)]
pub struct Fence {
    pub owner: String,
    pub epoch: i64,
    pub ttl: Duration,
    /// The ingest partition this lease is for (0 when unpartitioned): row `part + 1` of `recap_leader`.
    pub part: i32,
}

/// A due window claimed by a worker.
#[derive(Debug, Clone)]
pub struct ClaimedWindow {
    pub id: i64,
    pub bot: String,
    pub user_id: String,
    pub start_ms: Millis,
    pub end_ms: Millis,
    pub version: i32,
    pub revision: i32,
    pub attempts: i32,
    pub summary_id: Option<i32>,
    /// When the window was (last) closed: the start of the close-to-row latency.
    pub closed_at_ms: Millis,
}

/// What a worker did with a claimed window.
// One value per window in flight, built once and moved to the finish: boxing the large variant saves nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum WindowOutcome {
    Summarized {
        summary: Summary,
        /// Point ids the summary covers (all of the window's messages after filtering).
        covered: Vec<String>,
        /// Points found in Qdrant for the window that no event or sweep had reported: recorded so they are not
        /// counted again as late messages.
        extra: Vec<NewMessage>,
        message_count: i32,
        text_chars: usize,
        /// The window's first and last stored message times (the row's start and end).
        span: (Millis, Millis),
        /// The window's summary vector (normalized centroid of its `content` vectors), see `vectors`.
        centroid: Option<Vec<f32>>,
        /// The words said in the window ([`words::said`]), stored with the row for text search.
        words: String,
    },
    TooShort {
        message_count: i32,
    },
    /// Try again after `delay`; `counts` says whether this failure counts against LLM_MAX_ATTEMPTS.
    Retry {
        error: String,
        delay: Duration,
        counts: bool,
        max_attempts: i32,
    },
}

/// A source position as `recap status` shows it (a `recap_checkpoints` row, read by name).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct CheckpointRow {
    pub name: String,
    pub position: f64,
    pub points_read: i64,
    pub updated_at: DateTime<Utc>,
}

/// What `recap status` reports from the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    pub windows: Vec<(crate::model::WindowState, i64)>,
    /// `done` in `windows` is an estimate (a large table; see [`Store::window_states`]).
    pub windows_done_estimated: bool,
    pub oldest_due: Option<DateTime<Utc>>,
    pub dead_letters: i64,
    pub open_messages: i64,
    pub llm_spend_today_usd: f64,
    pub checkpoints: Vec<CheckpointRow>,
}

/// How a finish attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Done,
    TooShort,
    Retrying,
    Dead,
    /// The window changed (a late message) or the lease was lost: nothing written, it will be done again.
    Stale,
}

/// A stable fingerprint of the point ids a summary covers (FNV-1a over the sorted ids).
pub fn coverage_fingerprint(ids: &[String]) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in sorted {
        for b in id.as_bytes().iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The pool every store uses. No ping before each acquire (`test_before_acquire`): sqlx already pings a connection
/// when it goes back to the pool (off the caller's path), so a ping before use as well made every statement two
/// round trips on the caller's path instead of one (issue 25's read-path profile). A connection that broke while idle
/// fails its next statement with an I/O error, which every caller already treats as a lost connection (a 503 on the
/// read path, a rewind or retry in the pipeline); the ping on its way back then fails and the pool drops it.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
}

/// Postgres access for all of recap.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// CONTEXT_SUMMARY_EVERY: checkpoints mark running summaries due at each multiple (0 = off, the default).
    running_every: u32,
    /// Rung when this process committed windows that are due now (an ingest checkpoint that closed windows), so the
    /// window workers of the same process claim them at once instead of at their next poll. Shared by the store's
    /// clones; other replicas still find the windows by polling.
    due: Arc<tokio::sync::Notify>,
}

impl Store {
    /// Connects lazily-checked: returns once one connection works.
    pub async fn connect(
        opts: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Store, StoreError> {
        let pool = pool_options(max_connections).connect_with(opts).await?;
        Ok(Store {
            pool,
            running_every: 0,
            due: Arc::default(),
        })
    }

    /// A store over a pool that connects on first use (for `/readyz` and a service that starts before Postgres).
    pub fn connect_lazy(opts: PgConnectOptions, max_connections: u32) -> Store {
        let pool = pool_options(max_connections).connect_lazy_with(opts);
        Store {
            pool,
            running_every: 0,
            due: Arc::default(),
        }
    }

    /// Checkpoints mark an open window's running summary due each time its message count reaches a multiple of
    /// `every` (CONTEXT_SUMMARY_EVERY; 0 = off).
    pub fn with_running_summaries(mut self, every: u32) -> Store {
        self.running_every = every;
        self
    }

    /// Says that windows are due now (see [`Store::due_now`]). Remembered when no worker waits: the next wait
    /// returns at once.
    pub fn windows_due(&self) {
        self.due.notify_one();
    }

    /// Returns when this process committed due windows (or `after` passed): a worker's wait between empty claims.
    pub async fn due_now(&self, after: Duration) {
        let _ = tokio::time::timeout(after, self.due.notified()).await;
    }

    pub fn running_every(&self) -> u32 {
        self.running_every
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether any of recap's migrations is not applied yet (also when `_sqlx_migrations` does not exist). Needs
    /// only SELECT on `_sqlx_migrations`.
    pub async fn migrations_pending(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
            {
                Ok(v) => v,
                // 42P01 undefined_table: a database recap never migrated
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            };
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .any(|m| !applied.contains(&m.version)))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
