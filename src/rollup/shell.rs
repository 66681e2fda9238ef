//! The IO shell of rollups: the change scan, claiming dirty rollups with a lease (`FOR UPDATE SKIP LOCKED`), building
//! one through the configured [`Summarizer`], and the transaction that writes it (see the module docs of
//! [`crate::rollup`]).

mod scan;

use std::sync::Arc;

use futures::StreamExt;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    FinerSummary, Period, PeriodKey, covered_of, inputs_of, retry_delay, rollup_input, row_end,
};
use crate::sink::{ENRICHMENT_VERSION, Store, StoreError};
use crate::summarize::{SummarizeError, Summarizer, looks_like_placeholder};

use scan::mark_dirty;
pub use scan::{SCAN_CHECKPOINT, SCAN_OVERLAP};

/// Settings of the rollup task.
#[derive(Debug, Clone)]
pub struct RollupSettings {
    /// Time between rounds (scan, then build what is dirty).
    pub interval: Duration,
    /// Lease on a claimed rollup.
    pub lease: Duration,
    /// Rollups claimed per query.
    pub batch: i64,
    /// Rollups built at once (each may be one LLM call).
    pub concurrency: usize,
}

impl Default for RollupSettings {
    fn default() -> Self {
        RollupSettings {
            interval: Duration::from_secs(60),
            lease: Duration::from_secs(300),
            batch: 20,
            concurrency: 4,
        }
    }
}

/// A claimed dirty rollup.
#[derive(Debug, Clone)]
pub struct ClaimedRollup {
    pub id: i64,
    pub key: PeriodKey,
    pub revision: i32,
    pub summary_id: Option<i32>,
    pub inputs: Vec<String>,
    pub attempts: i32,
}

/// A `recap_rollups` row as a claim returns it.
#[derive(Debug, sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    bot_name: String,
    user_id: String,
    period: String,
    period_start: DateTime<Utc>,
    revision: i32,
    summary_id: Option<i32>,
    inputs: Vec<String>,
    attempts: i32,
}

/// How building one rollup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// A new revision was written.
    Written,
    /// Its inputs were the ones of its current revision: nothing written, no longer dirty.
    Unchanged,
    /// No finer summary left in the period: row and state removed.
    Removed,
    /// The inputs changed while it was built, or the lease was lost: nothing written, still dirty.
    Stale,
    /// The summarizer failed; tried again later.
    Failed,
}

impl Built {
    fn as_str(self) -> &'static str {
        match self {
            Built::Written => "written",
            Built::Unchanged => "unchanged",
            Built::Removed => "removed",
            Built::Stale => "stale",
            Built::Failed => "failed",
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub windows_scanned: usize,
    pub days_marked: usize,
    pub written: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub stale: usize,
    pub failed: usize,
}

/// The rollup worker of one replica.
pub struct Rollups {
    pub store: Store,
    pub summarizer: Arc<dyn Summarizer>,
    pub owner: String,
    pub settings: RollupSettings,
}

fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

fn utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

impl Rollups {
    /// Rounds every `interval` until `shutdown`; database outages are logged and waited out.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            match self.round(&shutdown).await {
                Ok(s) => debug!(?s, "rollup round"),
                Err(e) => warn!(error = %e, "rollup round failed; trying again next interval"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.settings.interval) => {}
            }
        }
        let _ = sqlx::query(
            "UPDATE recap_rollups SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(&self.owner)
        .execute(self.store.pool())
        .await;
        Ok(())
    }

    /// One round: scan for changed windows, then build dirty rollups until none is left to claim.
    pub async fn round(&self, shutdown: &CancellationToken) -> Result<RoundStats, StoreError> {
        let mut stats = RoundStats::default();
        let (scanned, marked) = self.scan().await?;
        stats.windows_scanned = scanned;
        stats.days_marked = marked;
        while !shutdown.is_cancelled() {
            let claimed = self.claim().await?;
            if claimed.is_empty() {
                break;
            }
            // Built concurrently: a batch never holds a week or a month together with one of its days (claim).
            let results: Vec<Result<Built, StoreError>> = futures::stream::iter(claimed)
                .map(|c| async move { self.build_contained(&c).await })
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect()
                .await;
            for built in results {
                match built? {
                    Built::Written => stats.written += 1,
                    Built::Unchanged => stats.unchanged += 1,
                    Built::Removed => stats.removed += 1,
                    Built::Stale => stats.stale += 1,
                    Built::Failed => stats.failed += 1,
                }
            }
            if stats.stale + stats.failed > 1000 {
                break; // something keeps changing under us: the next round goes on
            }
        }
        let dirty: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_rollups WHERE dirty")
            .fetch_one(self.store.pool())
            .await?;
        metrics::gauge!("recap_rollups_dirty").set(dirty as f64);
        Ok(stats)
    }

    /// Claims up to `batch` dirty rollups: days first, and a week or month only while none of its days is dirty.
    pub async fn claim(&self) -> Result<Vec<ClaimedRollup>, StoreError> {
        let rows = sqlx::query_as::<_, ClaimedRow>(
            "UPDATE recap_rollups r SET lease_owner = $1, lease_until = now() + $2 * interval '1 millisecond'
             FROM (SELECT c.id FROM recap_rollups c
                   WHERE c.dirty AND (c.lease_until IS NULL OR c.lease_until < now())
                     AND (c.not_before IS NULL OR c.not_before <= now())
                     AND (c.period = 'day' OR NOT EXISTS (
                         SELECT 1 FROM recap_rollups d WHERE d.bot_name = c.bot_name AND d.user_id = c.user_id
                            AND d.period = 'day' AND d.dirty AND d.period_start >= c.period_start
                            AND d.period_start < c.period_end))
                   ORDER BY (c.period <> 'day'), c.dirty_since, c.id
                   LIMIT $3 FOR UPDATE SKIP LOCKED) x
             WHERE r.id = x.id
             RETURNING r.id, r.bot_name, r.user_id, r.period, r.period_start, r.revision, r.summary_id, r.inputs,
                       r.attempts",
        )
        .bind(&self.owner)
        .bind(self.settings.lease.as_millis() as f64)
        .bind(self.settings.batch)
        .fetch_all(self.store.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ClaimedRollup {
                    id: r.id,
                    key: PeriodKey {
                        bot: r.bot_name,
                        user_id: r.user_id,
                        period: Period::parse(&r.period)
                            .ok_or(StoreError::Invariant("unknown rollup period"))?,
                        start: r.period_start,
                    },
                    revision: r.revision,
                    summary_id: r.summary_id,
                    inputs: r.inputs,
                    attempts: r.attempts,
                })
            })
            .collect()
    }

    /// [`Rollups::build`], with a statement that failed for this rollup alone (e.g. a row of another writer in its
    /// place) recorded on it (it waits and is tried again) instead of ending the round; connection errors end it.
    async fn build_contained(&self, c: &ClaimedRollup) -> Result<Built, StoreError> {
        match self.build(c).await {
            Err(e) if !e.is_connection() => {
                warn!(id = c.id, period = c.key.period.as_str(), error = %e, "rollup failed");
                self.failed(c, &e.to_string(), true).await?;
                metrics::counter!("recap_rollups_total", "period" => c.key.period.as_str(), "outcome" => "failed")
                    .increment(1);
                Ok(Built::Failed)
            }
            other => other,
        }
    }

    /// Builds one claimed rollup (a tracing span and a metric per rollup).
    pub async fn build(&self, c: &ClaimedRollup) -> Result<Built, StoreError> {
        let span = info_span!("rollup", id = c.id, bot = %c.key.bot, period = c.key.period.as_str(),
            start = %c.key.start.date_naive(), outcome = tracing::field::Empty);
        let t0 = Instant::now();
        let out = self.build_inner(c).instrument(span.clone()).await;
        if let Ok(b) = &out {
            span.record("outcome", b.as_str());
            metrics::counter!("recap_rollups_total", "period" => c.key.period.as_str(), "outcome" => b.as_str())
                .increment(1);
            metrics::histogram!("recap_rollup_duration_seconds", "period" => c.key.period.as_str())
                .record(t0.elapsed().as_secs_f64());
        }
        out
    }

    /// Records a failed build: the rollup stays dirty and waits [`retry_delay`] (longer after each counted failure).
    async fn failed(&self, c: &ClaimedRollup, error: &str, counts: bool) -> Result<(), StoreError> {
        let attempts = c.attempts + i32::from(counts);
        sqlx::query(
            "UPDATE recap_rollups SET attempts = $2, last_error = $3, lease_owner = NULL, lease_until = NULL,
                not_before = now() + $4 * interval '1 millisecond', updated_at = now()
             WHERE id = $1 AND lease_owner = $5",
        )
        .bind(c.id)
        .bind(attempts)
        .bind(error.chars().take(2000).collect::<String>())
        .bind(retry_delay(attempts).as_millis() as f64)
        .bind(&self.owner)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Gives a rollup back without writing (it stays dirty and is claimed again).
    async fn release(
        &self,
        tx: Transaction<'static, Postgres>,
        id: i64,
    ) -> Result<Built, StoreError> {
        drop(tx);
        sqlx::query(
            "UPDATE recap_rollups SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(&self.owner)
        .execute(self.store.pool())
        .await?;
        Ok(Built::Stale)
    }

    async fn build_inner(&self, c: &ClaimedRollup) -> Result<Built, StoreError> {
        let pool = self.store.pool();
        let rows = {
            let mut conn = pool.acquire().await?;
            load_inputs(&mut conn, &c.key).await?
        };
        let inputs = inputs_of(&rows);
        let mut tx = pool.begin().await?;
        if rows.is_empty() {
            if !lock_if_current(&mut tx, c, &inputs, &self.owner).await? {
                return self.release(tx, c.id).await;
            }
            if let Some(id) = c.summary_id {
                sqlx::query(
                    "DELETE FROM conversation_summaries WHERE id = $1 AND summary_type = $2",
                )
                .bind(id)
                .bind(c.key.period.as_str())
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("DELETE FROM recap_rollups WHERE id = $1")
                .bind(c.id)
                .execute(&mut *tx)
                .await?;
            if c.summary_id.is_some() {
                mark_dirty(&mut tx, &c.key.parents()).await?;
            }
            tx.commit().await?;
            return Ok(Built::Removed);
        }
        if c.summary_id.is_some() && inputs == c.inputs {
            if !lock_if_current(&mut tx, c, &inputs, &self.owner).await? {
                return self.release(tx, c.id).await;
            }
            sqlx::query(
                "UPDATE recap_rollups SET dirty = false, dirty_since = NULL, lease_owner = NULL, lease_until = NULL,
                    updated_at = now() WHERE id = $1",
            )
            .bind(c.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Built::Unchanged);
        }
        drop(tx);
        let input = rollup_input(&c.key, &rows);
        let summary = match self
            .summarizer
            .summarize_for(&input, crate::summarize::Purpose::Rollup)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let counts = !matches!(e, SummarizeError::Unavailable(_));
                warn!(error = %e, counts, "rollup summary failed; trying again later");
                self.failed(c, &e.to_string(), counts).await?;
                return Ok(Built::Failed);
            }
        };
        let mut tx = pool.begin().await?;
        if !lock_if_current(&mut tx, c, &inputs, &self.owner).await? {
            return self.release(tx, c.id).await;
        }
        let revision = c.revision + 1;
        let message_count: i64 = rows.iter().map(|r| i64::from(r.message_count)).sum();
        let source_chars: usize = rows.iter().map(|r| r.text.chars().count()).sum();
        let compression = source_chars as f64 / summary.text.chars().count().max(1) as f64;
        let usage = summary.usage.as_ref();
        let covered = covered_of(&rows);
        let start = naive(c.key.start);
        let end = naive(row_end(c.key.end()));
        let count = message_count.min(i64::from(i32::MAX)) as i32;
        let existing = match c.summary_id {
            Some(id) => {
                sqlx::query_scalar::<_, i32>(
                    "UPDATE conversation_summaries SET summary_text = $2, message_count = $3, key_topics = $4,
                        emotional_tone = $5, compression_ratio = $6, confidence_score = $7, enrichment_version = $8,
                        revision = $9, summarizer = $10, model = $11, prompt_tokens = $12, completion_tokens = $13,
                        llm_latency_ms = $14, cost_usd = $15, updated_at = now()
                     WHERE id = $1 AND summary_type = $16
                     RETURNING id",
                )
                .bind(id)
                .bind(&summary.text)
                .bind(count)
                .bind(&summary.key_topics)
                .bind(&summary.emotional_tone)
                .bind(compression)
                .bind(summary.confidence)
                .bind(ENRICHMENT_VERSION)
                .bind(revision)
                .bind(summary.kind.as_str())
                .bind(usage.map(|u| u.model.clone()))
                .bind(usage.map(|u| u.prompt_tokens as i32))
                .bind(usage.map(|u| u.completion_tokens as i32))
                .bind(usage.map(|u| u.latency_ms as i32))
                .bind(usage.and_then(|u| u.cost_usd))
                .bind(c.key.period.as_str())
                .fetch_optional(&mut *tx)
                .await?
            }
            None => None,
        };
        let summary_id: i32 = match existing {
            Some(id) => id,
            // A plain insert: a rollup's bounds never equal a window's, so a conflict here is a bug to surface.
            None => sqlx::query_scalar(
                "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp,
                    end_timestamp, message_count, key_topics, emotional_tone, compression_ratio, confidence_score,
                    enrichment_version, revision, summarizer, model, prompt_tokens, completion_tokens, llm_latency_ms,
                    cost_usd, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, now(), now())
                 RETURNING id",
            )
            .bind(&c.key.user_id)
            .bind(&c.key.bot)
            .bind(&summary.text)
            .bind(c.key.period.as_str())
            .bind(start)
            .bind(end)
            .bind(count)
            .bind(&summary.key_topics)
            .bind(&summary.emotional_tone)
            .bind(compression)
            .bind(summary.confidence)
            .bind(ENRICHMENT_VERSION)
            .bind(revision)
            .bind(summary.kind.as_str())
            .bind(usage.map(|u| u.model.clone()))
            .bind(usage.map(|u| u.prompt_tokens as i32))
            .bind(usage.map(|u| u.completion_tokens as i32))
            .bind(usage.map(|u| u.latency_ms as i32))
            .bind(usage.and_then(|u| u.cost_usd))
            .fetch_one(&mut *tx)
            .await?,
        };
        sqlx::query(
            "UPDATE recap_rollups SET dirty = false, dirty_since = NULL, revision = $2, summary_id = $3, inputs = $4,
                covered_ids = $5, attempts = 0, last_error = NULL, not_before = NULL, lease_owner = NULL,
                lease_until = NULL, updated_at = now()
             WHERE id = $1",
        )
        .bind(c.id)
        .bind(revision)
        .bind(summary_id)
        .bind(&inputs)
        .bind(&covered)
        .execute(&mut *tx)
        .await?;
        mark_dirty(&mut tx, &c.key.parents()).await?;
        tx.commit().await?;
        Ok(Built::Written)
    }
}

/// A finer summary as [`load_inputs`] reads it (its start without a zone, UTC).
#[derive(Debug, sqlx::FromRow)]
struct FinerRow {
    id: i64,
    revision: i32,
    text: String,
    key_topics: Vec<String>,
    tone: Option<String>,
    message_count: i32,
    start: NaiveDateTime,
    covered_ids: Vec<i64>,
}

/// The finer summaries of a rollup: the window rows starting in a day, or the day rollups of a week or a month.
/// Placeholder rows (an older worker's) are left out.
async fn load_inputs(
    conn: &mut sqlx::PgConnection,
    key: &PeriodKey,
) -> Result<Vec<FinerSummary>, StoreError> {
    let (start, end) = (naive(key.start), naive(key.end()));
    let rows = match key.period {
        Period::Day => {
            sqlx::query_as::<_, FinerRow>(
                "SELECT id::bigint AS id, revision, summary_text AS text, coalesce(key_topics, '{}') AS key_topics,
                    emotional_tone AS tone, message_count, start_timestamp AS start, ARRAY[id::bigint] AS covered_ids
                 FROM conversation_summaries
                 WHERE user_id = $1 AND bot_name = $2 AND summary_type = 'time_window'
                   AND start_timestamp >= $3 AND start_timestamp < $4
                 ORDER BY start_timestamp, id",
            )
            .bind(&key.user_id)
            .bind(&key.bot)
            .bind(start)
            .bind(end)
            .fetch_all(&mut *conn)
            .await?
        }
        Period::Week | Period::Month => {
            sqlx::query_as::<_, FinerRow>(
                "SELECT s.id::bigint AS id, s.revision, s.summary_text AS text, coalesce(s.key_topics, '{}') AS key_topics,
                    s.emotional_tone AS tone, s.message_count, s.start_timestamp AS start, r.covered_ids
                 FROM recap_rollups r JOIN conversation_summaries s ON s.id = r.summary_id
                 WHERE r.bot_name = $2 AND r.user_id = $1 AND r.period = 'day'
                   AND r.period_start >= $3 AND r.period_start < $4
                 ORDER BY r.period_start",
            )
            .bind(&key.user_id)
            .bind(&key.bot)
            .bind(key.start)
            .bind(key.end())
            .fetch_all(&mut *conn)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| FinerSummary {
            id: r.id,
            revision: r.revision,
            text: r.text,
            key_topics: r.key_topics,
            tone: r.tone,
            message_count: r.message_count,
            start: utc(r.start),
            covered_ids: r.covered_ids,
        })
        .filter(|f| !looks_like_placeholder(&f.text))
        .collect())
}

/// Locks the rollup's state row and checks that this worker still holds its lease and that its inputs are still
/// the ones it built from (read again inside the transaction).
async fn lock_if_current(
    tx: &mut Transaction<'static, Postgres>,
    c: &ClaimedRollup,
    inputs: &[String],
    owner: &str,
) -> Result<bool, StoreError> {
    let lease: Option<Option<String>> =
        sqlx::query_scalar("SELECT lease_owner FROM recap_rollups WHERE id = $1 FOR UPDATE")
            .bind(c.id)
            .fetch_optional(&mut **tx)
            .await?;
    if lease.flatten().as_deref() != Some(owner) {
        return Ok(false);
    }
    let now = load_inputs(&mut *tx, &c.key).await?;
    Ok(inputs_of(&now) == inputs)
}
