//! Running summaries of open windows (`recap_running_summaries`, migration 0013): marking keys due in the checkpoint
//! transaction, claims under a lease, the write (only while the open window still holds the coverage), retries, and
//! the consumption of a running summary when its window's final summary commits. The rules are in `crate::running`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::truncate;
use super::{Store, StoreError, to_utc};
use crate::summarize::{Prior, Summary};
use crate::tracker::Millis;

/// A stored running summary (summary text not NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRunning {
    pub point_ids: Vec<String>,
    pub covers_until_ms: Millis,
    pub message_count: i32,
    pub summary: String,
    pub key_topics: Vec<String>,
    pub emotional_tone: String,
    pub confidence: Option<f64>,
    pub summarizer: Option<String>,
}

impl StoredRunning {
    /// The summary so far, as an incremental summary starts from it.
    pub fn prior(&self) -> Prior {
        Prior {
            text: self.summary.clone(),
            key_topics: self.key_topics.clone(),
            emotional_tone: self.emotional_tone.clone(),
            message_count: self.message_count.max(0) as usize,
            covers_until_ms: self.covers_until_ms,
        }
    }

    pub fn coverage(&self) -> crate::running::Coverage<'_> {
        crate::running::Coverage {
            point_ids: &self.point_ids,
            covers_until_ms: self.covers_until_ms,
        }
    }
}

/// A due running summary claimed by a worker.
#[derive(Debug, Clone)]
pub struct ClaimedRunning {
    pub bot: String,
    pub user_id: String,
    /// The open window's message count that made it due.
    pub due_count: i32,
    pub attempts: i32,
    /// The running summary stored now, if any.
    pub stored: Option<StoredRunning>,
}

/// What a worker writes for a claimed running summary.
#[derive(Debug, Clone)]
pub enum RunningOutcome {
    /// A new running summary of the window's first `point_ids.len()` messages.
    Written {
        summary: Summary,
        point_ids: Vec<String>,
        covers_until_ms: Millis,
        window_start_ms: Millis,
    },
    /// Nothing to summarize now (no open window, fewer than CONTEXT_SUMMARY_EVERY messages in it, nothing new).
    Nothing,
    /// Try again after `delay` (`counts`: a failed attempt; after `max_attempts` the due mark is dropped until the
    /// window's next multiple).
    Retry {
        error: String,
        delay: Duration,
        counts: bool,
        max_attempts: i32,
    },
}

/// How a running-summary write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunningFinished {
    Written,
    /// The open window no longer holds the coverage (closed, merged, forgotten): nothing written.
    Discarded,
    Nothing,
    Retrying,
    GaveUp,
    /// The lease was lost: nothing written.
    Stale,
}

/// The stored-summary columns of a `recap_running_summaries` row ([`STORED_COLUMNS`]).
#[derive(sqlx::FromRow)]
struct StoredColumns {
    summary: Option<String>,
    key_topics: Vec<String>,
    emotional_tone: Option<String>,
    confidence: Option<f64>,
    point_ids: Vec<String>,
    covers_until: Option<DateTime<Utc>>,
    message_count: i32,
    summarizer: Option<String>,
}

impl StoredColumns {
    /// The stored running summary, if one was written (summary not NULL).
    fn stored(self) -> Option<StoredRunning> {
        Some(StoredRunning {
            summary: self.summary?,
            key_topics: self.key_topics,
            emotional_tone: self.emotional_tone.unwrap_or_else(|| "neutral".into()),
            confidence: self.confidence,
            point_ids: self.point_ids,
            covers_until_ms: self.covers_until.map_or(0, |t| t.timestamp_millis()),
            message_count: self.message_count,
            summarizer: self.summarizer,
        })
    }
}

/// A claimed `recap_running_summaries` row.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    bot_name: String,
    user_id: String,
    due_count: i32,
    attempts: i32,
    #[sqlx(flatten)]
    stored: StoredColumns,
}

/// A key's stored running summary.
#[derive(sqlx::FromRow)]
struct KeyRunningRow {
    bot_name: String,
    user_id: String,
    #[sqlx(flatten)]
    stored: StoredColumns,
}

const STORED_COLUMNS: &str = "summary, key_topics, emotional_tone, confidence, point_ids, covers_until, message_count, summarizer";

/// A key's open points as the last checkpoint stored them ([`Store::open_points`]): ids and times, one of each per
/// point, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPoints {
    pub ids: Vec<String>,
    pub times: Vec<Millis>,
}

impl Store {
    /// Claims up to `limit` due running summaries for `owner` for `lease` (`FOR UPDATE SKIP LOCKED`, like windows).
    pub async fn claim_running(
        &self,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<ClaimedRunning>, StoreError> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE recap_running_summaries r SET lease_owner = $1, lease_until = now() + $2 * interval '1 millisecond'
             FROM (SELECT bot_name, user_id FROM recap_running_summaries
                   WHERE due_count IS NOT NULL AND (not_before IS NULL OR not_before <= now())
                     AND (lease_until IS NULL OR lease_until < now())
                   ORDER BY not_before LIMIT $3 FOR UPDATE SKIP LOCKED) c
             WHERE r.bot_name = c.bot_name AND r.user_id = c.user_id
             RETURNING r.bot_name, r.user_id, r.due_count, r.attempts, {}",
            STORED_COLUMNS
                .split(", ")
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(owner)
        .bind(lease.as_millis() as f64)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ClaimedRunning {
                bot: r.bot_name,
                user_id: r.user_id,
                due_count: r.due_count,
                attempts: r.attempts,
                stored: r.stored.stored(),
            })
            .collect())
    }

    /// A key's open points as of the last checkpoint (`recap_open_windows`), in time order.
    pub async fn open_points(
        &self,
        bot: &str,
        user_id: &str,
    ) -> Result<Option<OpenPoints>, StoreError> {
        let row: Option<(Vec<String>, Vec<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT point_ids, point_ts FROM recap_open_windows WHERE bot_name = $1 AND user_id = $2",
        )
        .bind(bot)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(ids, ts)| OpenPoints {
            ids,
            times: ts.iter().map(|t| t.timestamp_millis()).collect(),
        }))
    }

    /// Extends the lease of a claimed running summary right before an LLM call: `false` when it is no longer
    /// `owner`'s (nothing may be called then).
    pub async fn extend_running_lease(
        &self,
        owner: &str,
        c: &ClaimedRunning,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_running_summaries SET lease_until = now() + $4 * interval '1 millisecond'
             WHERE bot_name = $1 AND user_id = $2 AND lease_owner = $3 AND due_count IS NOT NULL",
        )
        .bind(&c.bot)
        .bind(&c.user_id)
        .bind(owner)
        .bind(lease.as_millis() as f64)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The stored running summaries (summary not NULL) of the given keys, in one query: what a closing window may
    /// start from (it checks validity itself, [`crate::running::uncovered`]).
    pub async fn running_summaries(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<HashMap<(String, String), StoredRunning>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let b: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let u: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let rows: Vec<KeyRunningRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT r.bot_name, r.user_id, {} FROM recap_running_summaries r
             JOIN unnest($1::text[], $2::text[]) AS k(b, u) ON r.bot_name = k.b AND r.user_id = k.u
             WHERE r.summary IS NOT NULL",
            STORED_COLUMNS
                .split(", ")
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(&b)
        .bind(&u)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some(((r.bot_name, r.user_id), r.stored.stored()?)))
            .collect())
    }

    /// Writes a worker's result for a claimed running summary. A new summary is written only while the worker
    /// holds the lease and the key's open window still holds every covered point (else it is discarded: the window
    /// closed, merged or was forgotten meanwhile); the due mark is cleared unless ingest raised it past what was
    /// summarized.
    pub async fn finish_running(
        &self,
        owner: &str,
        c: &ClaimedRunning,
        outcome: &RunningOutcome,
    ) -> Result<RunningFinished, StoreError> {
        match outcome {
            RunningOutcome::Written {
                summary,
                point_ids,
                covers_until_ms,
                window_start_ms,
            } => {
                let usage = summary.usage.as_ref();
                let clean = |s: &str| s.replace('\0', "");
                let r = sqlx::query(
                    "UPDATE recap_running_summaries r SET summary = $4, key_topics = $5, emotional_tone = $6,
                        confidence = $7, summarizer = $8, model = $9, prompt_tokens = $10, completion_tokens = $11,
                        cost_usd = $12, point_ids = $13, covers_until = $14, window_start = $15, message_count = $16,
                        due_count = CASE WHEN r.due_count > $16 THEN r.due_count END, attempts = 0, not_before = now(),
                        lease_owner = NULL, lease_until = NULL, last_error = NULL, updated_at = now()
                     WHERE r.bot_name = $1 AND r.user_id = $2 AND r.lease_owner = $3
                       AND EXISTS (SELECT 1 FROM recap_open_windows o
                                   WHERE o.bot_name = r.bot_name AND o.user_id = r.user_id AND o.point_ids @> $13)",
                )
                .bind(&c.bot)
                .bind(&c.user_id)
                .bind(owner)
                .bind(clean(&summary.text))
                .bind(summary.key_topics.iter().map(|t| clean(t)).collect::<Vec<_>>())
                .bind(truncate(&summary.emotional_tone, 50))
                .bind(summary.confidence)
                .bind(summary.kind.as_str())
                .bind(usage.map(|u| truncate(&clean(&u.model), 200).to_string()))
                .bind(usage.map(|u| u.prompt_tokens as i32))
                .bind(usage.map(|u| u.completion_tokens as i32))
                .bind(usage.and_then(|u| u.cost_usd))
                .bind(point_ids)
                .bind(to_utc(*covers_until_ms))
                .bind(to_utc(*window_start_ms))
                .bind(point_ids.len() as i32)
                .execute(&self.pool)
                .await?;
                if r.rows_affected() == 1 {
                    return Ok(RunningFinished::Written);
                }
                let released = self.release_running(owner, c, true).await?;
                Ok(if released {
                    RunningFinished::Discarded
                } else {
                    RunningFinished::Stale
                })
            }
            RunningOutcome::Nothing => Ok(if self.release_running(owner, c, true).await? {
                RunningFinished::Nothing
            } else {
                RunningFinished::Stale
            }),
            RunningOutcome::Retry {
                error,
                delay,
                counts,
                max_attempts,
            } => {
                let super::NextAttempt {
                    attempts,
                    dead: give_up,
                } = super::next_attempt(c.attempts, *counts, *max_attempts);
                let r = sqlx::query(
                    "UPDATE recap_running_summaries SET attempts = CASE WHEN $5 THEN 0 ELSE $4 END,
                        due_count = CASE WHEN $5 THEN NULL ELSE due_count END, last_error = $6,
                        not_before = now() + $7 * interval '1 millisecond', lease_owner = NULL, lease_until = NULL,
                        updated_at = now()
                     WHERE bot_name = $1 AND user_id = $2 AND lease_owner = $3",
                )
                .bind(&c.bot)
                .bind(&c.user_id)
                .bind(owner)
                .bind(attempts)
                .bind(give_up)
                .bind(truncate(&error.replace('\0', ""), 2000))
                .bind(delay.as_millis() as f64)
                .execute(&self.pool)
                .await?;
                Ok(match (r.rows_affected(), give_up) {
                    (0, _) => RunningFinished::Stale,
                    (_, true) => RunningFinished::GaveUp,
                    _ => RunningFinished::Retrying,
                })
            }
        }
    }

    /// Gives a claimed running summary's lease back; `clear_due` also drops its due mark unless ingest raised it
    /// past the count the claim saw. False when the lease was not `owner`'s any more.
    async fn release_running(
        &self,
        owner: &str,
        c: &ClaimedRunning,
        clear_due: bool,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_running_summaries SET lease_owner = NULL, lease_until = NULL,
                due_count = CASE WHEN $4 AND due_count <= $5 THEN NULL ELSE due_count END, updated_at = now()
             WHERE bot_name = $1 AND user_id = $2 AND lease_owner = $3",
        )
        .bind(&c.bot)
        .bind(&c.user_id)
        .bind(owner)
        .bind(clear_due)
        .bind(c.due_count)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives back every running-summary lease `owner` holds (graceful shutdown).
    pub async fn release_running_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE recap_running_summaries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

/// Marks running summaries due in the checkpoint transaction, for the keys it changed (`keys`, with open points left):
/// a key whose open message count crossed a multiple of `every` since its running summary (or reached `every` without
/// one, or with one of an earlier window) gets `due_count` = that count. A running summary was built when its window
/// had `message_count + 1` messages (it leaves the latest out: `pipeline::running`). One statement, by primary key, only for keys
/// with at least `every` open messages.
pub(super) async fn mark_due(
    tx: &mut Transaction<'static, Postgres>,
    keys: (&[&str], &[&str]),
    every: u32,
) -> Result<(), StoreError> {
    if every == 0 || keys.0.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH o AS (
             SELECT o.bot_name, o.user_id, o.point_ids, o.point_ts[1] AS first_ts, cardinality(o.point_ids) AS n
             FROM recap_open_windows o JOIN unnest($1::text[], $2::text[]) AS k(b, u)
                  ON o.bot_name = k.b AND o.user_id = k.u
             WHERE cardinality(o.point_ids) >= $3),
         due AS (
             SELECT o.bot_name, o.user_id, o.first_ts, o.n FROM o
             LEFT JOIN recap_running_summaries r ON r.bot_name = o.bot_name AND r.user_id = o.user_id
             WHERE o.n / $3 > (CASE WHEN r.summary IS NOT NULL AND r.point_ids <@ o.point_ids
                                    THEN r.message_count + 1 ELSE 0 END) / $3
               AND (r.due_count IS NULL OR r.due_count < o.n))
         INSERT INTO recap_running_summaries AS r (bot_name, user_id, window_start, due_count, not_before)
         SELECT bot_name, user_id, first_ts, n, now() FROM due
         ON CONFLICT (bot_name, user_id) DO UPDATE SET due_count = EXCLUDED.due_count,
             not_before = CASE WHEN r.due_count IS NULL THEN now() ELSE r.not_before END,
             attempts = CASE WHEN r.due_count IS NULL THEN 0 ELSE r.attempts END, updated_at = now()",
    )
    .bind(keys.0)
    .bind(keys.1)
    .bind(every as i32)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// [`consume`] for the summarized windows among `done` (the window finish paths' one-line hook).
pub(super) async fn consume_windows(
    tx: &mut Transaction<'static, Postgres>,
    done: &[(&super::ClaimedWindow, &super::WindowOutcome)],
) -> Result<(), StoreError> {
    let (mut b, mut u, mut p): (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
    for (w, o) in done {
        if let super::WindowOutcome::Summarized { covered, .. } = o {
            for id in covered {
                b.push(&w.bot);
                u.push(&w.user_id);
                p.push(id);
            }
        }
    }
    consume(tx, (&b, &u, &p)).await
}

/// Consumes the running summaries of windows whose final summary commits in `tx`: a running summary whose coverage
/// shares a point with the window (`covered`: flat (bot, user, point id) triples) is cleared (its due mark, for a
/// newer open window of the key, stays), and a row left with neither summary nor due mark is deleted.
pub(super) async fn consume(
    tx: &mut Transaction<'static, Postgres>,
    covered: (&[&str], &[&str], &[&str]),
) -> Result<(), StoreError> {
    if covered.0.is_empty() {
        return Ok(());
    }
    let hit = "SELECT DISTINCT r.bot_name, r.user_id FROM recap_running_summaries r
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(b, u, p)
              ON r.bot_name = k.b AND r.user_id = k.u AND k.p = ANY(r.point_ids)";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM recap_running_summaries d USING ({hit}) h
         WHERE d.bot_name = h.bot_name AND d.user_id = h.user_id AND d.due_count IS NULL AND d.lease_owner IS NULL"
    )))
    .bind(covered.0)
    .bind(covered.1)
    .bind(covered.2)
    .execute(&mut **tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE recap_running_summaries r SET summary = NULL, key_topics = '{{}}', emotional_tone = NULL,
             confidence = NULL, point_ids = '{{}}', covers_until = NULL, message_count = 0, updated_at = now()
         FROM ({hit}) h WHERE r.bot_name = h.bot_name AND r.user_id = h.user_id"
    )))
    .bind(covered.0)
    .bind(covered.1)
    .bind(covered.2)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
