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
                ..
            } => {
                let start: DateTime<Utc> = row.get(3);
                let end: DateTime<Utc> = row.get(4);
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
                .bind(truncate(error, 2000))
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
        let windows = self.window_states().await?;
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
            "SELECT coalesce(sum(cost_usd), 0)::float8 FROM conversation_summaries
             WHERE updated_at >= date_trunc('day', now() AT TIME ZONE 'UTC')",
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

    /// Window counts by state.
    pub async fn window_states(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows =
            sqlx::query("SELECT state, count(*) FROM recap_windows GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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
    let bind_all = |sql: &'static str| {
        sqlx::query(sql)
            .bind(w.user_id.clone())
            .bind(w.bot.clone())
            .bind(s.text.clone())
            .bind(start)
            .bind(end)
            .bind(message_count)
            .bind(s.key_topics.clone())
            .bind(s.emotional_tone.clone())
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

/// Parameters $1..$19 are shared with [`UPSERT_SUMMARY_SQL`]; $20 is the row id.
const UPDATE_SUMMARY_SQL: &str = "UPDATE conversation_summaries SET summary_text = $3, start_timestamp = $4,
        end_timestamp = $5, message_count = $6, key_topics = $7, emotional_tone = $8, compression_ratio = $9,
        confidence_score = $10, enrichment_version = $11, revision = $12, summarizer = $13, model = $14,
        prompt_tokens = $15, completion_tokens = $16, llm_latency_ms = $17, cost_usd = $18, coverage = $19,
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
        llm_latency_ms = EXCLUDED.llm_latency_ms, cost_usd = EXCLUDED.cost_usd, coverage = EXCLUDED.coverage,
        updated_at = now()
     RETURNING id";

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
                "INSERT INTO recap_dead_letters (source, subject, stream_seq, raw, reason) VALUES ($1, $2, $3, $4, $5)
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
        let with_candidates: std::collections::HashSet<i64> = sqlx::query_scalar::<_, i64>(
            "SELECT c.i FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                 WITH ORDINALITY AS c(b, u, hi, lo, i)
             CROSS JOIN LATERAL (SELECT 1 FROM recap_windows w
                 WHERE w.bot_name = c.b AND w.user_id = c.u AND w.start_ts <= c.hi AND w.end_ts >= c.lo LIMIT 1) x",
        )
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
        let candidates = sqlx::query(
            "SELECT id, start_ts, end_ts FROM recap_windows
             WHERE bot_name = $1 AND user_id = $2 AND start_ts <= $3 AND end_ts >= $4
             ORDER BY start_ts FOR UPDATE",
        )
        .bind(&*w.bot)
        .bind(&*w.user)
        .bind(to_utc(hi.saturating_add(gap)))
        .bind(to_utc(lo.saturating_sub(gap)))
        .fetch_all(&mut *self.tx)
        .await?;
        let existing: Vec<(i64, Millis, Millis)> = candidates
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<DateTime<Utc>, _>(1).timestamp_millis(),
                    r.get::<DateTime<Utc>, _>(2).timestamp_millis(),
                )
            })
            .collect();
        let target = crate::tracker::merge_target(
            cfg,
            existing.iter().map(|(_, s, e)| (*s, *e)),
            (w.start_ms, w.end_ms),
        );
        let (id, state): (i64, String) = match target {
            Some(i) => {
                let (id, _, _) = existing[i];
                let state = sqlx::query_scalar(
                    "UPDATE recap_windows SET start_ts = LEAST(start_ts, $2), end_ts = GREATEST(end_ts, $3),
                        message_count = message_count + $4, version = version + 1,
                        state = CASE WHEN message_count + $4 >= $5 THEN 'due' ELSE 'too_short' END,
                        attempts = 0, not_before = NULL, closed_at = now(), updated_at = now()
                     WHERE id = $1
                     RETURNING state",
                )
                .bind(id)
                .bind(to_utc(w.start_ms))
                .bind(to_utc(w.end_ms))
                .bind(w.count as i32)
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
