//! The window side: claiming due windows under a lease, extending and releasing leases, and finishing a window
//! (the summary upsert and the window's new state in one transaction).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::ingest::{Asked, taken};
use super::{ClaimedWindow, ENRICHMENT_VERSION, Finished, Store, StoreError, WindowOutcome};
/// In `sink/mod.rs` (issue 27: `running.rs` needs them too; here they closed a circle windows -> running -> windows).
pub(super) use super::{next_attempt, truncate};
use crate::model::{WindowState, state_sql};
use crate::summarize::Summary;

/// What a claim took ([`Store::claim_due_with_points`]).
#[derive(Debug, Clone)]
pub struct Claim {
    pub windows: Vec<ClaimedWindow>,
    /// Each claimed window's point ids (as [`Store::window_point_ids`]).
    pub point_ids: HashMap<i64, Vec<String>>,
}

/// A window a worker holds a lease on, at the version it claimed ([`Store::renew_leases`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldWindow {
    pub id: i64,
    pub version: i32,
}

/// A window row as a claim returns it, with its point ids.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    bot_name: String,
    user_id: String,
    start_ts: DateTime<Utc>,
    end_ts: DateTime<Utc>,
    version: i32,
    revision: i32,
    attempts: i32,
    summary_id: Option<i32>,
    closed_at: DateTime<Utc>,
    point_ids: Vec<String>,
}

/// The claim of due windows (`$1` owner, `$2` lease in ms, `$3` limit). The state is a constant in its text: the
/// partial indexes on `state` (`idx_recap_windows_due`, `idx_recap_windows_not_done`) serve it even under a generic
/// plan (see `model::state_sql`; `tests/it/worker_batch.rs` checks the plan).
pub fn claim_due_sql() -> &'static str {
    state_sql!(
        "WITH retry AS (SELECT id FROM recap_windows
                   WHERE state = {due} AND not_before <= now() AND (lease_until IS NULL OR lease_until < now())
                   ORDER BY not_before, id LIMIT $3 FOR UPDATE SKIP LOCKED),
                  new AS (SELECT id FROM recap_windows
                   WHERE state = {due} AND not_before IS NULL AND (lease_until IS NULL OR lease_until < now())
                   ORDER BY not_before, id LIMIT $3 FOR UPDATE SKIP LOCKED),
                  c AS (SELECT id FROM retry UNION ALL SELECT id FROM new ORDER BY id LIMIT $3)
             UPDATE recap_windows w SET lease_owner = $1, lease_until = now() + $2 * interval '1 millisecond', updated_at = now()
             FROM c WHERE w.id = c.id
             RETURNING w.id, w.bot_name, w.user_id, w.start_ts, w.end_ts, w.version, w.revision, w.attempts, w.summary_id,
                       w.closed_at, w.point_ids"
    )
}

impl Store {
    // ---- windows ----------------------------------------------------------------------------------------------

    /// Claims up to `limit` due windows for `owner` for `lease`.
    pub async fn claim_due(
        &self,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<ClaimedWindow>, StoreError> {
        Ok(self
            .claim_due_with_points(owner, lease, limit)
            .await?
            .windows)
    }

    /// [`Store::claim_due`], with each claimed window's point ids (as [`Store::window_point_ids`]) read by the
    /// claim's own statement: a worker's batch needs no second query for them.
    pub async fn claim_due_with_points(
        &self,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> Result<Claim, StoreError> {
        // The due windows in two index-ordered scans of `idx_recap_windows_due` (not_before, id) WHERE state = 'due',
        // retries whose time came and new windows, each stopping after `limit` rows, then the lowest ids of both. One
        // scan in id order (`ORDER BY id` over `not_before IS NULL OR not_before <= now()`) read every entry a
        // finished window left in the index until vacuum: a bitmap scan of all of them per claim, growing with the
        // windows finished (issue 25). An ordered index scan marks such entries dead as it passes and skips them
        // afterwards. Rows one scan locks beyond the `limit` kept are unlocked when the statement ends.
        let rows: Vec<ClaimedRow> = sqlx::query_as(claim_due_sql())
            .bind(owner)
            .bind(lease.as_millis() as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut ids = HashMap::with_capacity(rows.len());
        let mut windows = Vec::with_capacity(rows.len());
        for r in rows {
            ids.insert(r.id, r.point_ids);
            windows.push(ClaimedWindow {
                id: r.id,
                bot: r.bot_name,
                user_id: r.user_id,
                start_ms: r.start_ts.timestamp_millis(),
                end_ms: r.end_ts.timestamp_millis(),
                version: r.version,
                revision: r.revision,
                attempts: r.attempts,
                summary_id: r.summary_id,
                closed_at_ms: r.closed_at.timestamp_millis(),
            });
        }
        Ok(Claim {
            windows,
            point_ids: ids,
        })
    }

    /// The point ids assigned to a window (see [`Store::window_point_ids`]).
    pub async fn window_points(&self, window_id: i64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .window_point_ids(&[window_id])
            .await?
            .remove(&window_id)
            .unwrap_or_default())
    }

    /// The point ids of each of `window_ids` (its coverage, `recap_windows.point_ids`, in time order), in one query:
    /// every id asked for has an entry (empty when no such window). The one place that knows where they are kept.
    pub async fn window_point_ids(
        &self,
        window_ids: &[i64],
    ) -> Result<HashMap<i64, Vec<String>>, StoreError> {
        let mut out: HashMap<i64, Vec<String>> =
            window_ids.iter().map(|id| (*id, Vec::new())).collect();
        if window_ids.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(i64, Vec<String>)> =
            sqlx::query_as("SELECT id, point_ids FROM recap_windows WHERE id = ANY($1)")
                .bind(window_ids)
                .fetch_all(&self.pool)
                .await?;
        for (id, ids) in rows {
            out.insert(id, ids);
        }
        Ok(out)
    }

    /// Of the points windows' scrolls found that no event named, those the window may not take
    /// ([`super::ingest::taken`]): another window of the same key covers them (a point stamped ahead of its host's
    /// clock is windowed at its arrival time, so its stored time can fall inside a later window's range: issue 24,
    /// case 1), or the key's tombstone lists them (a forgotten user's points the bot's collection still holds). Not
    /// summarized, not stored here. One query for a batch; it runs only when a scroll found unnamed points.
    pub async fn covered_elsewhere(
        &self,
        extra: &[(&ClaimedWindow, &str)],
    ) -> Result<HashSet<(i64, String)>, StoreError> {
        let asked: Vec<Asked<'_>> = extra
            .iter()
            .map(|(w, p)| Asked {
                bot: &w.bot,
                user: &w.user_id,
                point: p,
                except: Some(w.id),
            })
            .collect();
        Ok(taken(&self.pool, &asked)
            .await?
            .into_iter()
            .map(|i| (extra[i].0.id, extra[i].1.to_string()))
            .collect())
    }

    /// Gives back every lease `owner` holds (graceful shutdown).
    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let r = sqlx::query(state_sql!("UPDATE recap_windows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1 AND state = {due}"))
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
             WHERE id = $1 AND lease_owner = $2 AND version = $3 AND state = $5",
        )
        .bind(w.id)
        .bind(owner)
        .bind(w.version)
        .bind(lease.as_millis() as f64)
        .bind(WindowState::Due)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Extends the leases of many claimed windows in one statement (see [`Store::extend_lease`]): right before a
    /// claim's LLM calls start. Returns the ids still this worker's, due and at the version given.
    pub async fn extend_leases(
        &self,
        owner: &str,
        windows: &[HeldWindow],
        lease: Duration,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        self.renew_leases(owner, windows, lease)
            .await
            .map(|v| v.into_iter().collect())
    }

    /// Renews the leases `owner` holds on `windows` (the worker's heartbeat), only where the
    /// window is still due at that version: a window changed meanwhile (a late message) is not kept by a worker
    /// whose result its finish will throw away. Returns the ids still held.
    pub async fn renew_leases(
        &self,
        owner: &str,
        windows: &[HeldWindow],
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, versions): (Vec<i64>, Vec<i32>) =
            windows.iter().map(|w| (w.id, w.version)).unzip();
        // Locked in id order, as the finish locks its windows, so the two never wait on each other in a circle.
        let held = sqlx::query_scalar(
            "UPDATE recap_windows w SET lease_until = now() + $4 * interval '1 millisecond'
             FROM (SELECT v.id FROM recap_windows v JOIN unnest($1::bigint[], $2::int[]) AS x(id, version)
                     ON v.id = x.id AND v.version = x.version
                   WHERE v.lease_owner = $3 AND v.state = $5 ORDER BY v.id FOR UPDATE OF v) c
             WHERE w.id = c.id
             RETURNING w.id",
        )
        .bind(&ids)
        .bind(&versions)
        .bind(owner)
        .bind(lease.as_millis() as f64)
        .bind(WindowState::Due)
        .fetch_all(&self.pool)
        .await?;
        Ok(held)
    }

    /// Writes a worker's result for a window in one transaction: the batch finish ([`Store::finish_windows`]) of
    /// this one window, so the two can never drift apart (see the module docs for the rules).
    pub async fn finish_window(
        &self,
        owner: &str,
        w: &ClaimedWindow,
        outcome: &WindowOutcome,
    ) -> Result<Finished, StoreError> {
        self.finish_windows(owner, &[(w, outcome)])
            .await?
            .pop()
            .ok_or(StoreError::Invariant(
                "a finish of one window returned no result",
            ))
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn upsert_summary(
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
        sqlx::query_scalar(sql)
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
        return Ok(r);
    }
    Ok(bind_all(UPSERT_SUMMARY_SQL).fetch_one(&mut **tx).await?)
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

/// The `ON CONFLICT` clause of a summary row's upsert on its window key: the new summary replaces the row's, and
/// `cost_usd` adds up. Shared by [`UPSERT_SUMMARY_SQL`] and the batch upsert (`finish_batch.rs`).
macro_rules! on_window_conflict {
    () => {
        "ON CONFLICT ON CONSTRAINT uq_conversation_summaries_window DO UPDATE SET
        summary_text = EXCLUDED.summary_text, message_count = EXCLUDED.message_count, key_topics = EXCLUDED.key_topics,
        emotional_tone = EXCLUDED.emotional_tone, compression_ratio = EXCLUDED.compression_ratio,
        confidence_score = EXCLUDED.confidence_score, enrichment_version = EXCLUDED.enrichment_version,
        revision = EXCLUDED.revision, summarizer = EXCLUDED.summarizer, model = EXCLUDED.model,
        prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
        llm_latency_ms = EXCLUDED.llm_latency_ms,
        cost_usd = CASE WHEN EXCLUDED.cost_usd IS NULL THEN conversation_summaries.cost_usd
                        ELSE coalesce(conversation_summaries.cost_usd, 0) + EXCLUDED.cost_usd END,
        coverage = EXCLUDED.coverage,
        updated_at = now()"
    };
}
pub(super) use on_window_conflict;

/// Insert, or update the row with the same window key (e.g. a placeholder row the old worker wrote).
const UPSERT_SUMMARY_SQL: &str = concat!(
    "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp, end_timestamp,
        message_count, key_topics, emotional_tone, compression_ratio, confidence_score, enrichment_version, revision,
        summarizer, model, prompt_tokens, completion_tokens, llm_latency_ms, cost_usd, coverage, created_at, updated_at)
     VALUES ($1, $2, $3, 'time_window', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, now(), now())
     ",
    on_window_conflict!(),
    "
     RETURNING id"
);
