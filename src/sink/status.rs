//! What `recap status`, `retry` and `resummarize` read and change.

use chrono::{DateTime, Utc};

use crate::model::{WindowState, state_sql};

use super::{CheckpointRow, DONE_EXACT_BELOW, StatusReport, Store, StoreError};

/// Window counts by state ([`Store::window_states`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowCounts {
    /// (state, windows) for each state with windows, by name.
    pub by_state: Vec<(WindowState, i64)>,
    /// The `done` count is an estimate (a large table).
    pub done_estimated: bool,
}

impl Store {
    /// Puts dead windows back to due (`recap retry`). `None` = all dead windows.
    pub async fn retry_dead(&self, window: Option<i64>) -> Result<u64, StoreError> {
        // The filter a constant (`idx_recap_windows_not_done` holds the dead windows); the new state bound.
        let r = sqlx::query(state_sql!(
            "UPDATE recap_windows SET state = $2, attempts = 0, not_before = NULL, updated_at = now()
             WHERE state = {dead} AND ($1::bigint IS NULL OR id = $1)"
        ))
        .bind(window)
        .bind(WindowState::Due)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// What `recap status` shows.
    pub async fn status(&self) -> Result<StatusReport, StoreError> {
        let WindowCounts {
            by_state: windows,
            done_estimated: windows_done_estimated,
        } = self.window_states().await?;
        let oldest_due: Option<DateTime<Utc>> = sqlx::query_scalar(state_sql!(
            "SELECT min(closed_at) FROM recap_windows WHERE state = {due}"
        ))
        .fetch_one(&self.pool)
        .await?;
        let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM recap_dead_letters")
            .fetch_one(&self.pool)
            .await?;
        let open_messages: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(cardinality(point_ids)), 0)::int8 FROM recap_open_windows",
        )
        .fetch_one(&self.pool)
        .await?;
        let spend: f64 = sqlx::query_scalar(
            "SELECT coalesce((SELECT spent_usd FROM recap_llm_spend WHERE day = (now() AT TIME ZONE 'UTC')::date), 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        let checkpoints: Vec<CheckpointRow> = sqlx::query_as(
            "SELECT name, position, points_read, updated_at FROM recap_checkpoints ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
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
            "UPDATE recap_windows w SET state = $3, version = version + 1, attempts = 0, not_before = NULL,
                updated_at = now()
             FROM conversation_summaries s
             WHERE s.id = w.summary_id AND w.state = $4 AND s.summarizer = $1 AND w.start_ts >= $2",
        )
        .bind(from_kind)
        .bind(since)
        .bind(WindowState::Due)
        .bind(WindowState::Done)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Window counts by state, and whether `done` is an estimate. The states other than `done` are counted exactly
    /// (partial index `idx_recap_windows_not_done`); `done` is counted exactly while the table holds fewer than
    /// [`DONE_EXACT_BELOW`] rows, and beyond that derived from the planner's row estimate (scaled to the table's
    /// current size, as the planner does) minus the exact counts, so a status read stays a few milliseconds at
    /// millions of windows.
    pub async fn window_states(&self) -> Result<WindowCounts, StoreError> {
        let mut rows: Vec<(WindowState, i64)> = sqlx::query_as(state_sql!(
            "SELECT state, count(*) FROM recap_windows WHERE state <> {done} GROUP BY state"
        ))
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
            sqlx::query_scalar(state_sql!(
                "SELECT count(*) FROM recap_windows WHERE state = {done}"
            ))
            .fetch_one(&self.pool)
            .await?
        };
        if done > 0 {
            rows.push((WindowState::Done, done));
        }
        // By name, as the rows were sorted when the states were text (`recap status --json` keeps its order).
        rows.sort_by_key(|(s, _)| s.as_str());
        Ok(WindowCounts {
            by_state: rows,
            done_estimated: estimated,
        })
    }
}
