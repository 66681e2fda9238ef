//! The change scan: window rows written since the scan position make their days dirty.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

use super::{Rollups, naive, utc};
use crate::rollup::{PeriodKey, WindowChange, dirty_days};
use crate::sink::StoreError;
use crate::summarize::looks_like_placeholder;

/// The checkpoint (`recap_checkpoints`) holding the scan's position: `updated_at` of the last window row read, in
/// microseconds since the epoch.
pub const SCAN_CHECKPOINT: &str = "rollups:scan";
/// Each scan re-reads window rows written this long before its position: a window transaction that started earlier
/// but committed after the last scan is still seen (re-reading is a no-op for days built from the same revision).
pub const SCAN_OVERLAP: Duration = Duration::from_secs(600);
/// Window rows read per scan query.
const SCAN_BATCH: i64 = 2000;

/// A window row the scan reads, with the day rollups covering it (`days`) and whether each has its current revision
/// among its inputs (`same`); `head` its text's start (placeholder test).
#[derive(Debug, sqlx::FromRow)]
struct ScanRow {
    id: i64,
    bot_name: String,
    user_id: String,
    revision: i32,
    start_timestamp: NaiveDateTime,
    updated_at: NaiveDateTime,
    days: Vec<DateTime<Utc>>,
    same: Vec<bool>,
    head: String,
}

impl Rollups {
    /// Reads window rows written since the scan position (minus [`SCAN_OVERLAP`]) and marks their days dirty.
    /// Returns (windows read, days marked).
    pub async fn scan(&self) -> Result<(usize, usize), StoreError> {
        let pool = self.store.pool();
        let pos = self.store.checkpoint(SCAN_CHECKPOINT).await?;
        let mut after: (NaiveDateTime, i64) = (
            pos.and_then(|p| DateTime::from_timestamp_micros(p as i64))
                .map(|t| naive(t) - chrono::Duration::from_std(SCAN_OVERLAP).unwrap_or_default())
                .unwrap_or_default(),
            0,
        );
        let (mut scanned, mut marked) = (0, 0);
        loop {
            let rows: Vec<ScanRow> = sqlx::query_as(
                "SELECT s.id::bigint AS id, s.bot_name::text AS bot_name, s.user_id::text AS user_id, s.revision,
                        s.start_timestamp, s.updated_at,
                        coalesce(array_agg(r.period_start) FILTER (WHERE r.id IS NOT NULL), '{}') AS days,
                        coalesce(array_agg(r.inputs @> ARRAY[s.id || ':' || s.revision]) FILTER (WHERE r.id IS NOT NULL), '{}')
                            AS same,
                        s.head
                 FROM (SELECT id, bot_name, user_id, revision, start_timestamp, updated_at, left(summary_text, 300) AS head
                       FROM conversation_summaries
                       WHERE summary_type = 'time_window' AND (updated_at, id) > ($1, $2)
                       ORDER BY updated_at, id LIMIT $3) s
                 LEFT JOIN recap_rollups r ON r.bot_name = s.bot_name AND r.user_id = s.user_id AND r.period = 'day'
                      AND r.covered_ids @> ARRAY[s.id::bigint]
                 GROUP BY s.id, s.bot_name, s.user_id, s.revision, s.start_timestamp, s.updated_at, s.head
                 ORDER BY s.updated_at, s.id",
            )
            .bind(after.0)
            .bind(after.1 as i32)
            .bind(SCAN_BATCH)
            .fetch_all(pool)
            .await?;
            let Some(last) = rows.last() else { break };
            after = (last.updated_at, last.id);
            let read = rows.len();
            // Placeholder rows (an older worker's) are never a rollup's input, so they make no day dirty.
            let changes: Vec<WindowChange> = rows
                .into_iter()
                .filter(|r| !looks_like_placeholder(&r.head))
                .map(|r| WindowChange {
                    summary_id: r.id,
                    bot: r.bot_name,
                    user_id: r.user_id,
                    revision: r.revision,
                    start: utc(r.start_timestamp),
                    covered_by: r.days.into_iter().zip(r.same).collect(),
                })
                .collect();
            scanned += read;
            let dirty: Vec<PeriodKey> = dirty_days(&changes).into_iter().collect();
            marked += dirty.len();
            let mut conn = pool.acquire().await?;
            mark_dirty(&mut conn, &dirty).await?;
            if (read as i64) < SCAN_BATCH {
                break;
            }
        }
        if scanned > 0 {
            sqlx::query(
                "INSERT INTO recap_checkpoints (name, position, points_read) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET position = GREATEST(recap_checkpoints.position, EXCLUDED.position),
                    points_read = recap_checkpoints.points_read + EXCLUDED.points_read, updated_at = now()",
            )
            .bind(SCAN_CHECKPOINT)
            .bind(after.0.and_utc().timestamp_micros() as f64)
            .bind(scanned as i64)
            .execute(pool)
            .await?;
        }
        metrics::counter!("recap_rollup_windows_scanned_total").increment(scanned as u64);
        Ok((scanned, marked))
    }
}

/// Marks rollups dirty (inserting their state rows), in key order so concurrent markers lock in one order.
pub(super) async fn mark_dirty(
    conn: &mut sqlx::PgConnection,
    keys: &[PeriodKey],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<&PeriodKey> = keys.iter().collect();
    keys.sort();
    keys.dedup();
    let bots: Vec<&str> = keys.iter().map(|k| k.bot.as_str()).collect();
    let users: Vec<&str> = keys.iter().map(|k| k.user_id.as_str()).collect();
    let periods: Vec<&str> = keys.iter().map(|k| k.period.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = keys.iter().map(|k| k.start).collect();
    let ends: Vec<DateTime<Utc>> = keys.iter().map(|k| k.end()).collect();
    sqlx::query(
        "INSERT INTO recap_rollups (bot_name, user_id, period, period_start, period_end)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
         ON CONFLICT ON CONSTRAINT uq_recap_rollups_period DO UPDATE SET dirty = true,
            dirty_since = coalesce(recap_rollups.dirty_since, now()), updated_at = now()",
    )
    .bind(&bots)
    .bind(&users)
    .bind(&periods)
    .bind(&starts)
    .bind(&ends)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
