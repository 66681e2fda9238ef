//! Sink stage: everything recap keeps in PostgreSQL, and the transactions that make its effects atomic.
//!
//! Two transactions carry all state changes:
//! * [`IngestTx`]: one per source batch — new messages (de-duplicated by point id), the windows the tracker closed,
//!   watermarks, dead letters and the source position commit together, fenced by the leader epoch. The source
//!   acknowledges its messages only after [`IngestTx::commit`] returned.
//! * [`Store::finish_window`]: one per window — the summary row (an upsert on the window key), the window's coverage,
//!   revision and new state commit together, and only while the worker still holds the window's lease and the window's
//!   messages are the ones it summarized.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::summarize::Summary;
use crate::tracker::{ClosedWindow, Millis, Mode, TrackerConfig};

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

pub fn to_utc(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// One message entering the tracker from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub bot: String,
    pub user_id: String,
    pub point_id: String,
    pub ts_ms: Millis,
}

/// Input recap could not use.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: &'static str,
    pub subject: Option<String>,
    pub stream_seq: Option<u64>,
    pub raw: Vec<u8>,
    pub reason: String,
}

/// The proof that this replica holds the ingest lease.
#[derive(Debug, Clone)]
pub struct Fence {
    pub owner: String,
    pub epoch: i64,
    pub ttl: Duration,
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
        /// The window's summary vector (normalized centroid of its `content` vectors), see `recall::vectors`.
        centroid: Option<Vec<f32>>,
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

/// A source position as `recap status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointRow {
    pub name: String,
    pub position: f64,
    pub points_read: i64,
    pub updated_at: DateTime<Utc>,
}

/// What `recap status` reports from the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    pub windows: Vec<(String, i64)>,
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

/// Postgres access for all of recap.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects lazily-checked: returns once one connection works.
    pub async fn connect(
        opts: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Store, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        Ok(Store { pool })
    }

    /// A store over a pool that connects on first use (for `/readyz` and a service that starts before Postgres).
    pub fn connect_lazy(opts: PgConnectOptions, max_connections: u32) -> Store {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts);
        Store { pool }
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

    // ---- leadership -------------------------------------------------------------------------------------------

    /// Takes the ingest lease if it is free, expired, or already ours. Returns the new epoch.
    pub async fn try_acquire_leader(
        &self,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO recap_leader (id, owner, epoch, lease_until) VALUES (1, $1, 1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, epoch = recap_leader.epoch + 1,
                 lease_until = EXCLUDED.lease_until
             WHERE recap_leader.lease_until < now() OR recap_leader.owner = EXCLUDED.owner
             RETURNING epoch",
        )
        .bind(owner)
        .bind(ttl.as_millis() as f64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Fence {
            owner: owner.to_string(),
            epoch: r.get(0),
            ttl,
        }))
    }

    /// Renews the lease outside a batch (an idle leader).
    pub async fn renew_leader(&self, fence: &Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        renew(&mut conn, fence).await
    }

    pub async fn release_leader(&self, fence: &Fence) -> Result<(), StoreError> {
        sqlx::query("UPDATE recap_leader SET lease_until = now() - interval '1 second' WHERE owner = $1 AND epoch = $2")
            .bind(&fence.owner)
            .bind(fence.epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- tracker state ----------------------------------------------------------------------------------------

    pub async fn load_watermarks(&self) -> Result<Vec<(String, Millis)>, StoreError> {
        let rows = sqlx::query("SELECT bot_name, watermark FROM recap_watermarks")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<DateTime<Utc>, _>(1).timestamp_millis(),
                )
            })
            .collect())
    }

    /// Messages of open windows, oldest first: the tracker's state.
    pub async fn load_open_messages(&self) -> Result<Vec<NewMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT bot_name, user_id, point_id, ts FROM recap_messages WHERE window_id IS NULL ORDER BY ts, point_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| NewMessage {
                bot: r.get(0),
                user_id: r.get(1),
                point_id: r.get(2),
                ts_ms: r.get::<DateTime<Utc>, _>(3).timestamp_millis(),
            })
            .collect())
    }

    pub async fn checkpoint(&self, name: &str) -> Result<Option<f64>, StoreError> {
        let row = sqlx::query("SELECT position FROM recap_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Starts an ingest transaction, renewing the leader lease inside it (the fence).
    pub async fn begin_ingest(&self, fence: &Fence) -> Result<IngestTx, StoreError> {
        // The batch is acknowledged to JetStream once this commits, so the commit must be durable when it returns,
        // whatever the server's default: with `synchronous_commit = off` a Postgres crash loses the last commits
        // (and with them messages already acknowledged). One round trip with the BEGIN.
        let mut tx = self
            .pool
            .begin_with("BEGIN; SET LOCAL synchronous_commit TO on")
            .await?;
        renew(&mut tx, fence).await?;
        Ok(IngestTx { tx })
    }

    // ---- windows ----------------------------------------------------------------------------------------------

    /// Claims up to `limit` due windows for `owner` for `lease`.
    pub async fn claim_due(
        &self,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<ClaimedWindow>, StoreError> {
        let rows = sqlx::query(
            "UPDATE recap_windows w SET lease_owner = $1, lease_until = now() + $2 * interval '1 millisecond', updated_at = now()
             FROM (SELECT id FROM recap_windows
                   WHERE state = 'due' AND (not_before IS NULL OR not_before <= now())
                     AND (lease_until IS NULL OR lease_until < now())
                   ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) c
             WHERE w.id = c.id
             RETURNING w.id, w.bot_name, w.user_id, w.start_ts, w.end_ts, w.version, w.revision, w.attempts, w.summary_id,
                       w.closed_at",
        )
        .bind(owner)
        .bind(lease.as_millis() as f64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ClaimedWindow {
                id: r.get(0),
                bot: r.get(1),
                user_id: r.get(2),
                start_ms: r.get::<DateTime<Utc>, _>(3).timestamp_millis(),
                end_ms: r.get::<DateTime<Utc>, _>(4).timestamp_millis(),
                version: r.get(5),
                revision: r.get(6),
                attempts: r.get(7),
                summary_id: r.get(8),
                closed_at_ms: r.get::<DateTime<Utc>, _>(9).timestamp_millis(),
            })
            .collect())
    }

    /// The point ids assigned to a window.
    pub async fn window_points(&self, window_id: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT point_id FROM recap_messages WHERE window_id = $1 ORDER BY ts, point_id",
        )
        .bind(window_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Gives back every lease `owner` holds (graceful shutdown).
    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let r = sqlx::query("UPDATE recap_windows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1 AND state = 'due'")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Extends the lease of a window this worker claimed, right before an LLM call: `false` when the lease is no
    /// longer `owner`'s (another replica claimed the window after it expired), the window is no longer due, or its
    /// messages changed since the claim (the summary would be thrown away). Nothing may be called for it then.
    pub async fn extend_lease(
        &self,
        owner: &str,
        w: &ClaimedWindow,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_windows SET lease_until = now() + $4 * interval '1 millisecond'
             WHERE id = $1 AND lease_owner = $2 AND version = $3 AND state = 'due'",
        )
        .bind(w.id)
        .bind(owner)
        .bind(w.version)
        .bind(lease.as_millis() as f64)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Renews the leases `owner` holds on `ids` (the worker's heartbeat); returns the ids still held.
    pub async fn renew_leases(
        &self,
        owner: &str,
        ids: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let held = sqlx::query_scalar(
            "UPDATE recap_windows SET lease_until = now() + $3 * interval '1 millisecond'
             WHERE id = ANY($1) AND lease_owner = $2 AND state = 'due' RETURNING id",
        )
        .bind(ids)
        .bind(owner)
        .bind(lease.as_millis() as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(held)
    }

    /// Writes a worker's result for a window in one transaction (see the module docs).
    pub async fn finish_window(
        &self,
        owner: &str,
        w: &ClaimedWindow,
        outcome: &WindowOutcome,
    ) -> Result<Finished, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT version, lease_owner, state, start_ts, end_ts FROM recap_windows WHERE id = $1 FOR UPDATE")
            .bind(w.id)
            .fetch_one(&mut *tx)
            .await?;
        let version: i32 = row.get(0);
        let lease_owner: Option<String> = row.get(1);
        let state: String = row.get(2);
        if lease_owner.as_deref() != Some(owner) || state != "due" {
            return Ok(Finished::Stale);
        }
        if version != w.version {
            sqlx::query(
                "UPDATE recap_windows SET lease_owner = NULL, lease_until = NULL WHERE id = $1",
            )
            .bind(w.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Finished::Stale);
        }
        let finished = match outcome {
            WindowOutcome::Summarized {
                summary,
                covered,
                extra,
                message_count,
                text_chars,
                span,
                ..
            } => {
                // The row's bounds are the stored points' times; the window keeps its tracker bounds.
                let (start, end) = (to_utc(span.0), to_utc(span.1));
                insert_messages(&mut tx, extra, Some(w.id)).await?;
                let coverage = coverage_fingerprint(covered);
                let revision = w.revision + 1;
                let summary_id = upsert_summary(
                    &mut tx,
                    w,
                    start.naive_utc(),
                    end.naive_utc(),
                    summary,
                    *message_count,
                    *text_chars,
                    revision,
                    &coverage,
                )
                .await?;
                sqlx::query(
                    "UPDATE recap_windows SET state = 'done', revision = $2, summary_id = $3, coverage = $4, attempts = 0,
                        message_count = $5, lease_owner = NULL, lease_until = NULL, last_error = NULL, updated_at = now()
                     WHERE id = $1",
                )
                .bind(w.id)
                .bind(revision)
                .bind(summary_id)
                .bind(&coverage)
                .bind(*message_count)
                .execute(&mut *tx)
                .await?;
                Finished::Done
            }
            WindowOutcome::TooShort { message_count } => {
                sqlx::query(
                    "UPDATE recap_windows SET state = 'too_short', message_count = $2, lease_owner = NULL, lease_until = NULL,
                        updated_at = now() WHERE id = $1",
                )
                .bind(w.id)
                .bind(*message_count)
                .execute(&mut *tx)
                .await?;
                Finished::TooShort
            }
            WindowOutcome::Retry {
                error,
                delay,
                counts,
                max_attempts,
            } => {
                let attempts = w.attempts + i32::from(*counts);
                let dead = *counts && attempts >= *max_attempts;
                sqlx::query(
                    "UPDATE recap_windows SET state = $2, attempts = $3, last_error = $4,
                        not_before = now() + $5 * interval '1 millisecond', lease_owner = NULL, lease_until = NULL,
                        updated_at = now() WHERE id = $1",
                )
                .bind(w.id)
                .bind(if dead { "dead" } else { "due" })
                .bind(attempts)
                .bind(truncate(&error.replace('\0', ""), 2000))
                .bind(delay.as_millis() as f64)
                .execute(&mut *tx)
                .await?;
                if dead {
                    Finished::Dead
                } else {
                    Finished::Retrying
                }
            }
        };
        tx.commit().await?;
        Ok(finished)
    }

    /// Puts dead windows back to due (`recap retry`). `None` = all dead windows.
    pub async fn retry_dead(&self, window: Option<i64>) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_windows SET state = 'due', attempts = 0, not_before = NULL, updated_at = now()
             WHERE state = 'dead' AND ($1::bigint IS NULL OR id = $1)",
        )
        .bind(window)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// What `recap status` shows.
    pub async fn status(&self) -> Result<StatusReport, StoreError> {
        let (windows, windows_done_estimated) = self.window_states().await?;
        let oldest_due: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT min(closed_at) FROM recap_windows WHERE state = 'due'")
                .fetch_one(&self.pool)
                .await?;
        let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_dead_letters")
            .fetch_one(&self.pool)
            .await?;
        let open_messages: i64 =
            sqlx::query_scalar("SELECT count(*) FROM recap_messages WHERE window_id IS NULL")
                .fetch_one(&self.pool)
                .await?;
        let spend: f64 = sqlx::query_scalar(
            "SELECT coalesce((SELECT spent_usd FROM recap_llm_spend WHERE day = (now() AT TIME ZONE 'UTC')::date), 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        let rows = sqlx::query(
            "SELECT name, position, points_read, updated_at FROM recap_checkpoints ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        let checkpoints = rows
            .iter()
            .map(|r| CheckpointRow {
                name: r.get(0),
                position: r.get(1),
                points_read: r.get(2),
                updated_at: r.get(3),
            })
            .collect();
        Ok(StatusReport {
            windows,
            windows_done_estimated,
            oldest_due,
            dead_letters,
            open_messages,
            llm_spend_today_usd: spend,
            checkpoints,
        })
    }

    /// Marks done windows whose row was written by `from_kind` (e.g. `extractive`) and that start at or after
    /// `since` as due again, so the running service summarizes them anew (same row, revision + 1).
    pub async fn mark_for_resummarize(
        &self,
        from_kind: &str,
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_windows w SET state = 'due', version = version + 1, attempts = 0, not_before = NULL,
                updated_at = now()
             FROM conversation_summaries s
             WHERE s.id = w.summary_id AND w.state = 'done' AND s.summarizer = $1 AND w.start_ts >= $2",
        )
        .bind(from_kind)
        .bind(since)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Window counts by state, and whether `done` is an estimate. The states other than `done` are counted exactly
    /// (partial index `idx_recap_windows_not_done`); `done` is counted exactly while the table holds fewer than
    /// [`DONE_EXACT_BELOW`] rows, and beyond that derived from the planner's row estimate (scaled to the table's
    /// current size, as the planner does) minus the exact counts, so a status read stays a few milliseconds at
    /// millions of windows.
    pub async fn window_states(&self) -> Result<(Vec<(String, i64)>, bool), StoreError> {
        let mut rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM recap_windows WHERE state <> 'done' GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        let estimate: f64 = sqlx::query_scalar(
            "SELECT coalesce(CASE WHEN relpages > 0 THEN reltuples / relpages
                 * (pg_relation_size(oid) / current_setting('block_size')::int) END, 0)::float8
             FROM pg_class WHERE oid = 'recap_windows'::regclass",
        )
        .fetch_one(&self.pool)
        .await?;
        let estimated = estimate >= DONE_EXACT_BELOW as f64;
        let done: i64 = if estimated {
            (estimate as i64 - rows.iter().map(|(_, n)| n).sum::<i64>()).max(0)
        } else {
            sqlx::query_scalar("SELECT count(*) FROM recap_windows WHERE state = 'done'")
                .fetch_one(&self.pool)
                .await?
        };
        if done > 0 {
            rows.push(("done".into(), done));
        }
        rows.sort();
        Ok((rows, estimated))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn renew(conn: &mut sqlx::PgConnection, fence: &Fence) -> Result<(), StoreError> {
    let r = sqlx::query(
        "UPDATE recap_leader SET lease_until = now() + $3 * interval '1 millisecond' WHERE id = 1 AND owner = $1 AND epoch = $2",
    )
    .bind(&fence.owner)
    .bind(fence.epoch)
    .bind(fence.ttl.as_millis() as f64)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::LostLeadership(fence.epoch))
    }
}

/// Inserts messages, skipping point ids already known. Returns a flag per input: true when it was new.
async fn insert_messages(
    tx: &mut Transaction<'_, Postgres>,
    msgs: &[NewMessage],
    window: Option<i64>,
) -> Result<Vec<bool>, StoreError> {
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let bots: Vec<&str> = msgs.iter().map(|m| m.bot.as_str()).collect();
    let ids: Vec<&str> = msgs.iter().map(|m| m.point_id.as_str()).collect();
    let users: Vec<&str> = msgs.iter().map(|m| m.user_id.as_str()).collect();
    let ts: Vec<DateTime<Utc>> = msgs.iter().map(|m| to_utc(m.ts_ms)).collect();
    let rows = sqlx::query(
        "INSERT INTO recap_messages (bot_name, point_id, user_id, ts, window_id)
         SELECT b, p, u, t, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS x(b, p, u, t)
         ON CONFLICT (bot_name, point_id) DO NOTHING
         RETURNING bot_name, point_id",
    )
    .bind(&bots)
    .bind(&ids)
    .bind(&users)
    .bind(&ts)
    .bind(window)
    .fetch_all(&mut **tx)
    .await?;
    let inserted: std::collections::HashSet<(String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut seen = std::collections::HashSet::new();
    Ok(msgs
        .iter()
        .map(|m| {
            let key = (m.bot.clone(), m.point_id.clone());
            inserted.contains(&key) && seen.insert(key)
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
async fn upsert_summary(
    tx: &mut Transaction<'_, Postgres>,
    w: &ClaimedWindow,
    start: NaiveDateTime,
    end: NaiveDateTime,
    s: &Summary,
    message_count: i32,
    text_chars: usize,
    revision: i32,
    coverage: &str,
) -> Result<i32, StoreError> {
    let compression = text_chars as f64 / s.text.chars().count().max(1) as f64;
    let usage = s.usage.as_ref();
    let model = usage.map(|u| u.model.clone());
    let prompt = usage.map(|u| u.prompt_tokens as i32);
    let completion = usage.map(|u| u.completion_tokens as i32);
    let latency = usage.map(|u| u.latency_ms as i32);
    let cost = usage.and_then(|u| u.cost_usd);
    // strict in what is stored: Postgres rejects NUL in text (a summarizer should have removed it already)
    let clean = |t: &str| t.replace('\0', "");
    let model = model.map(|m| clean(&m));
    let topics: Vec<String> = s.key_topics.iter().map(|t| clean(t)).collect();
    let text = clean(&s.text);
    let bind_all = |sql: &'static str| {
        sqlx::query(sql)
            .bind(w.user_id.clone())
            .bind(w.bot.clone())
            .bind(text.clone())
            .bind(start)
            .bind(end)
            .bind(message_count)
            .bind(topics.clone())
            .bind(clean(&s.emotional_tone))
            .bind(compression)
            .bind(s.confidence)
            .bind(ENRICHMENT_VERSION)
            .bind(revision)
            .bind(s.kind.as_str())
            .bind(model.clone())
            .bind(prompt)
            .bind(completion)
            .bind(latency)
            .bind(cost)
            .bind(coverage.to_string())
    };
    // A window that already has a row keeps it (its start/end may have moved with a late message).
    if let Some(id) = w.summary_id
        && let Some(r) = bind_all(UPDATE_SUMMARY_SQL)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
    {
        return Ok(r.get(0));
    }
    let row = bind_all(UPSERT_SUMMARY_SQL).fetch_one(&mut **tx).await?;
    Ok(row.get(0))
}

/// Parameters $1..$19 are shared with [`UPSERT_SUMMARY_SQL`]; $20 is the row id. `cost_usd` adds up over a window's
/// revisions: it is what the window cost, not what its last summary cost.
const UPDATE_SUMMARY_SQL: &str = "UPDATE conversation_summaries SET summary_text = $3, start_timestamp = $4,
        end_timestamp = $5, message_count = $6, key_topics = $7, emotional_tone = $8, compression_ratio = $9,
        confidence_score = $10, enrichment_version = $11, revision = $12, summarizer = $13, model = $14,
        prompt_tokens = $15, completion_tokens = $16, llm_latency_ms = $17,
        cost_usd = CASE WHEN $18::float8 IS NULL THEN cost_usd ELSE coalesce(cost_usd, 0) + $18 END, coverage = $19,
        updated_at = now()
     WHERE id = $20 AND user_id = $1 AND bot_name = $2
     RETURNING id";

/// Insert, or update the row with the same window key (e.g. a placeholder row the old worker wrote).
const UPSERT_SUMMARY_SQL: &str =
    "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp, end_timestamp,
        message_count, key_topics, emotional_tone, compression_ratio, confidence_score, enrichment_version, revision,
        summarizer, model, prompt_tokens, completion_tokens, llm_latency_ms, cost_usd, coverage, created_at, updated_at)
     VALUES ($1, $2, $3, 'time_window', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, now(), now())
     ON CONFLICT ON CONSTRAINT uq_conversation_summaries_window DO UPDATE SET
        summary_text = EXCLUDED.summary_text, message_count = EXCLUDED.message_count, key_topics = EXCLUDED.key_topics,
        emotional_tone = EXCLUDED.emotional_tone, compression_ratio = EXCLUDED.compression_ratio,
        confidence_score = EXCLUDED.confidence_score, enrichment_version = EXCLUDED.enrichment_version,
        revision = EXCLUDED.revision, summarizer = EXCLUDED.summarizer, model = EXCLUDED.model,
        prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
        llm_latency_ms = EXCLUDED.llm_latency_ms,
        cost_usd = CASE WHEN EXCLUDED.cost_usd IS NULL THEN conversation_summaries.cost_usd
                        ELSE coalesce(conversation_summaries.cost_usd, 0) + EXCLUDED.cost_usd END,
        coverage = EXCLUDED.coverage,
        updated_at = now()
     RETURNING id";

/// Which of a batch's closed windows (`$1` bots, `$2` users, `$3` upper and `$4` lower bounds, one element per window)
/// have a stored window of the same key they may belong to. Returns the 1-based positions.
///
/// One index probe per window (`idx_recap_windows_key_time`, backwards from `$3`, one row), whatever the length of the
/// user's history: a key's stored windows do not overlap (canonical windows are disjoint and merges join what they
/// bridge), so of the windows starting at or before `hi` the latest has the latest end, and if any ends at or after
/// `lo`, it does. (`start_ts <= hi AND end_ts >= lo` with `LIMIT 1` read the key's history from its oldest window,
/// and was even planned as a sequential scan; `tests/ingest_time.rs` checks the buffers read.)
pub const MERGE_CANDIDATE_PROBE_SQL: &str =
    "SELECT c.i FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                 WITH ORDINALITY AS c(b, u, hi, lo, i)
             CROSS JOIN LATERAL (SELECT w.end_ts FROM recap_windows w
                 WHERE w.bot_name = c.b AND w.user_id = c.u AND w.start_ts <= c.hi
                 ORDER BY w.bot_name DESC, w.user_id DESC, w.start_ts DESC LIMIT 1) x
             WHERE x.end_ts >= c.lo";

/// The stored windows of one key (`$1` bot, `$2` user) a closed window between `$4` and `$3` may belong to, locked.
/// `$5` is the window's start minus the longest span: no window starting earlier can belong to it
/// ([`crate::tracker::merge_target`]), so the index range read is bounded by the span, not by the user's history.
pub const MERGE_CANDIDATES_SQL: &str = "SELECT id, start_ts, end_ts, summary_id FROM recap_windows
             WHERE bot_name = $1 AND user_id = $2 AND start_ts <= $3 AND start_ts > $5 AND end_ts >= $4
             ORDER BY start_ts FOR UPDATE";

/// One ingest transaction (see the module docs).
pub struct IngestTx {
    tx: Transaction<'static, Postgres>,
}

impl IngestTx {
    /// Inserts messages; returns, per input, whether it was new (redeliveries and re-sweeps are not).
    pub async fn insert_messages(&mut self, msgs: &[NewMessage]) -> Result<Vec<bool>, StoreError> {
        insert_messages(&mut self.tx, msgs, None).await
    }

    pub async fn dead_letters(&mut self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        for d in letters {
            sqlx::query(
                // Letters without a stream sequence (ingest's far-future points, the sweep's invalid payloads) come
                // again with every sweep cycle that reads their point: stored once (idx_recap_dead_letters_raw).
                "INSERT INTO recap_dead_letters (source, subject, stream_seq, raw, reason)
                 SELECT $1, $2, $3, $4, $5
                 WHERE $3::bigint IS NOT NULL OR NOT EXISTS (SELECT 1 FROM recap_dead_letters
                     WHERE source = $1 AND stream_seq IS NULL AND md5(raw) = md5($4::bytea))
                 ON CONFLICT (source, stream_seq) WHERE stream_seq IS NOT NULL DO NOTHING",
            )
            .bind(d.source)
            .bind(d.subject.as_deref())
            .bind(d.stream_seq.map(|s| s as i64))
            .bind(&d.raw)
            .bind(&d.reason)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// Stores a batch's closed windows, in the order given, as [`IngestTx::close_window`] would one by one, in a
    /// fixed number of statements: one query finds which windows may belong to a stored one (a late message) and
    /// those, and any key closed twice in the batch, take the one-by-one path; the others (nearly all) are inserted
    /// together and their open messages assigned together. Returns how many were recorded as too short.
    pub async fn close_windows(
        &mut self,
        cfg: &TrackerConfig,
        windows: &[ClosedWindow],
        min_messages: u32,
    ) -> Result<usize, StoreError> {
        if windows.is_empty() {
            return Ok(0);
        }
        let gap = match cfg.mode {
            Mode::Session => cfg.idle_gap_ms,
            Mode::Tumbling => 0,
        };
        let ranges: Vec<(Millis, Millis)> =
            windows.iter().map(|w| w.message_range(cfg.mode)).collect();
        let bots: Vec<&str> = windows.iter().map(|w| &*w.bot).collect();
        let users: Vec<&str> = windows.iter().map(|w| &*w.user).collect();
        // Same bounds as close_window's candidate query.
        let his: Vec<DateTime<Utc>> = ranges
            .iter()
            .map(|r| to_utc(r.1.saturating_add(gap)))
            .collect();
        let los: Vec<DateTime<Utc>> = ranges
            .iter()
            .map(|r| to_utc(r.0.saturating_sub(gap)))
            .collect();
        // LATERAL + LIMIT 1: one index probe per window (idx_recap_windows_key_time) whatever the table's statistics
        // say (a plain join was planned as a scan of every stored window while the statistics were young).
        let with_candidates: std::collections::HashSet<i64> =
            sqlx::query_scalar::<_, i64>(MERGE_CANDIDATE_PROBE_SQL)
                .bind(&bots)
                .bind(&users)
                .bind(&his)
                .bind(&los)
                .fetch_all(&mut *self.tx)
                .await?
                .into_iter()
                .collect();
        let mut per_key: HashMap<(&str, &str), usize> = HashMap::new();
        for w in windows {
            *per_key.entry((&*w.bot, &*w.user)).or_default() += 1;
        }
        let one_by_one: Vec<bool> = (0..windows.len())
            .map(|i| {
                with_candidates.contains(&(i as i64 + 1))
                    || per_key[&(&*windows[i].bot, &*windows[i].user)] > 1
            })
            .collect();
        let mut too_short = 0;
        for (w, _) in windows.iter().zip(&one_by_one).filter(|(_, s)| **s) {
            too_short += usize::from(self.close_window(cfg, w, min_messages).await?.1);
        }
        let bulk: Vec<usize> = (0..windows.len()).filter(|i| !one_by_one[*i]).collect();
        if bulk.is_empty() {
            return Ok(too_short);
        }
        let b: Vec<&str> = bulk.iter().map(|i| bots[*i]).collect();
        let u: Vec<&str> = bulk.iter().map(|i| users[*i]).collect();
        let starts: Vec<DateTime<Utc>> =
            bulk.iter().map(|i| to_utc(windows[*i].start_ms)).collect();
        let ends: Vec<DateTime<Utc>> = bulk.iter().map(|i| to_utc(windows[*i].end_ms)).collect();
        let counts: Vec<i32> = bulk.iter().map(|i| windows[*i].count as i32).collect();
        let states: Vec<&str> = bulk
            .iter()
            .map(|i| {
                if windows[*i].count >= min_messages {
                    "due"
                } else {
                    "too_short"
                }
            })
            .collect();
        too_short += states.iter().filter(|s| **s == "too_short").count();
        // Inserted in the given order (ids ascending); each key occurs once here, so rows map back by key.
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count)
             SELECT b, u, s, e, st, n FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                 $5::text[], $6::int4[]) WITH ORDINALITY AS x(b, u, s, e, st, n, i)
             ORDER BY i
             RETURNING id, bot_name, user_id",
        )
        .bind(&b)
        .bind(&u)
        .bind(&starts)
        .bind(&ends)
        .bind(&states)
        .bind(&counts)
        .fetch_all(&mut *self.tx)
        .await?;
        let by_key: HashMap<(&str, &str), i64> = rows
            .iter()
            .map(|(id, b, u)| ((b.as_str(), u.as_str()), *id))
            .collect();
        let ids: Vec<i64> = bulk
            .iter()
            .map(|i| by_key.get(&(bots[*i], users[*i])).copied())
            .collect::<Option<_>>()
            .ok_or(StoreError::Invariant(
                "a window inserted in bulk was not returned",
            ))?;
        let lo: Vec<DateTime<Utc>> = bulk.iter().map(|i| to_utc(ranges[*i].0)).collect();
        let hi: Vec<DateTime<Utc>> = bulk.iter().map(|i| to_utc(ranges[*i].1)).collect();
        sqlx::query(
            "UPDATE recap_messages m SET window_id = c.id
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS c(id, b, u, lo, hi)
             WHERE m.bot_name = c.b AND m.user_id = c.u AND m.window_id IS NULL AND m.ts >= c.lo AND m.ts <= c.hi",
        )
        .bind(&ids)
        .bind(&b)
        .bind(&u)
        .bind(&lo)
        .bind(&hi)
        .execute(&mut *self.tx)
        .await?;
        Ok(too_short)
    }

    /// Stores a closed window: merged into a stored window it belongs to (a late message), or inserted as a new one
    /// (`due`, or `too_short` under `min_messages`). Assigns the window's open messages to it.
    /// Returns the window's id and whether it is recorded as too short.
    pub async fn close_window(
        &mut self,
        cfg: &TrackerConfig,
        w: &ClosedWindow,
        min_messages: u32,
    ) -> Result<(i64, bool), StoreError> {
        let (lo, hi) = w.message_range(cfg.mode);
        let gap = match cfg.mode {
            Mode::Session => cfg.idle_gap_ms,
            Mode::Tumbling => 0,
        };
        let candidates = sqlx::query(MERGE_CANDIDATES_SQL)
            .bind(&*w.bot)
            .bind(&*w.user)
            .bind(to_utc(hi.saturating_add(gap)))
            .bind(to_utc(lo.saturating_sub(gap)))
            .bind(to_utc(w.start_ms.saturating_sub(cfg.max_span_ms)))
            .fetch_all(&mut *self.tx)
            .await?;
        let existing: Vec<(i64, Millis, Millis, Option<i32>)> = candidates
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<DateTime<Utc>, _>(1).timestamp_millis(),
                    r.get::<DateTime<Utc>, _>(2).timestamp_millis(),
                    r.get(3),
                )
            })
            .collect();
        let spans: Vec<(Millis, Millis)> = existing.iter().map(|(_, s, e, _)| (*s, *e)).collect();
        let targets = crate::tracker::merge_targets(cfg, &spans, (w.start_ms, w.end_ms));
        let (id, state): (i64, String) = match targets.split_first() {
            Some((&first, rest)) => {
                let (id, _, _, _) = existing[first];
                // A late message that bridges stored windows joins them (the window definition gives one): the
                // later ones' messages move to the first, their rows (window and summary) are deleted.
                let (mut start, mut end, mut count) = (w.start_ms, w.end_ms, w.count as i32);
                for &j in rest {
                    let (other, s, e, summary) = existing[j];
                    start = start.min(s);
                    end = end.max(e);
                    count += sqlx::query_scalar::<_, i32>(
                        "DELETE FROM recap_windows WHERE id = $1 RETURNING message_count",
                    )
                    .bind(other)
                    .fetch_one(&mut *self.tx)
                    .await?;
                    sqlx::query("UPDATE recap_messages SET window_id = $1 WHERE window_id = $2")
                        .bind(id)
                        .bind(other)
                        .execute(&mut *self.tx)
                        .await?;
                    if let Some(row) = summary {
                        sqlx::query(
                            "DELETE FROM conversation_summaries WHERE id = $1 AND bot_name = $2 AND user_id = $3",
                        )
                        .bind(row)
                        .bind(&*w.bot)
                        .bind(&*w.user)
                        .execute(&mut *self.tx)
                        .await?;
                    }
                }
                let state = sqlx::query_scalar(
                    "UPDATE recap_windows SET start_ts = LEAST(start_ts, $2), end_ts = GREATEST(end_ts, $3),
                        message_count = message_count + $4, version = version + 1,
                        state = CASE WHEN message_count + $4 >= $5 THEN 'due' ELSE 'too_short' END,
                        attempts = 0, not_before = NULL, closed_at = now(), updated_at = now()
                     WHERE id = $1
                     RETURNING state",
                )
                .bind(id)
                .bind(to_utc(start))
                .bind(to_utc(end))
                .bind(count)
                .bind(min_messages as i32)
                .fetch_one(&mut *self.tx)
                .await?;
                (id, state)
            }
            None => sqlx::query_as(
                "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 RETURNING id, state",
            )
            .bind(&*w.bot)
            .bind(&*w.user)
            .bind(to_utc(w.start_ms))
            .bind(to_utc(w.end_ms))
            .bind(if w.count >= min_messages { "due" } else { "too_short" })
            .bind(w.count as i32)
            .fetch_one(&mut *self.tx)
            .await?,
        };
        sqlx::query(
            "UPDATE recap_messages SET window_id = $1
             WHERE bot_name = $2 AND user_id = $3 AND window_id IS NULL AND ts >= $4 AND ts <= $5",
        )
        .bind(id)
        .bind(&*w.bot)
        .bind(&*w.user)
        .bind(to_utc(lo))
        .bind(to_utc(hi))
        .execute(&mut *self.tx)
        .await?;
        Ok((id, state == "too_short"))
    }

    pub async fn save_watermarks(
        &mut self,
        marks: &[(std::sync::Arc<str>, Millis)],
    ) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let bots: Vec<&str> = marks.iter().map(|(b, _)| &**b).collect();
        let wms: Vec<DateTime<Utc>> = marks.iter().map(|(_, w)| to_utc(*w)).collect();
        // One row per bot (the tracker reports each bot once; GREATEST keeps the watermark monotonic regardless).
        sqlx::query(
            "INSERT INTO recap_watermarks (bot_name, watermark)
             SELECT b, max(w) FROM unnest($1::text[], $2::timestamptz[]) AS x(b, w) GROUP BY b
             ON CONFLICT (bot_name) DO UPDATE SET watermark = GREATEST(recap_watermarks.watermark, EXCLUDED.watermark),
                updated_at = now()",
        )
        .bind(&bots)
        .bind(&wms)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records a source position (JetStream sequence, or a sweep high-water mark) and how many points were read.
    pub async fn save_checkpoint(
        &mut self,
        name: &str,
        position: f64,
        points_read: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO recap_checkpoints (name, position, points_read) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET position = GREATEST(recap_checkpoints.position, EXCLUDED.position),
                points_read = recap_checkpoints.points_read + EXCLUDED.points_read, updated_at = now()",
        )
        .bind(name)
        .bind(position)
        .bind(points_read)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
