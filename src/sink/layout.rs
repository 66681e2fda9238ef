//! The partition layout a stream's backlog is in (`recap_nats_layout`, migration 0019): locked while a replica
//! changes it (`source::relayout`), so replicas starting together change it once.

use sqlx::{Postgres, Transaction};

use super::{Store, StoreError};

/// The locked layout row of one stream; nothing changes unless [`LayoutLock::finish`] commits.
pub struct LayoutLock {
    tx: Transaction<'static, Postgres>,
    stream: String,
    /// The layout recorded for the stream (`None`: none yet, a first start or one before migration 0019).
    pub recorded: Option<String>,
}

impl Store {
    /// Locks the stream's layout row (made, unrecorded, when missing) until the lock is finished or dropped.
    pub async fn lock_layout(&self, stream: &str) -> Result<LayoutLock, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO recap_nats_layout (stream, layout) VALUES ($1, '') ON CONFLICT (stream) DO NOTHING",
        )
        .bind(stream)
        .execute(&mut *tx)
        .await?;
        let layout: String =
            sqlx::query_scalar("SELECT layout FROM recap_nats_layout WHERE stream = $1 FOR UPDATE")
                .bind(stream)
                .fetch_one(&mut *tx)
                .await?;
        Ok(LayoutLock {
            tx,
            stream: stream.to_string(),
            recorded: (!layout.is_empty()).then_some(layout),
        })
    }
}

impl LayoutLock {
    /// Records `layout` as the stream's. With `moved`: the layout changed and every message up to stream sequence
    /// `since` of the old one was applied or re-published on the new one, so the new layout's consumers start after
    /// it (their stored positions, `checkpoints`, move up to `since`), and every partition's leader epoch is bumped:
    /// a leader still running the old layout fails its next checkpoint and restores.
    pub async fn finish(
        mut self,
        layout: &str,
        moved: Option<(u64, &[String])>,
    ) -> Result<(), StoreError> {
        if let Some((since, checkpoints)) = moved {
            for name in checkpoints {
                sqlx::query(
                    "INSERT INTO recap_checkpoints (name, position, points_read) VALUES ($1, $2, 0)
                     ON CONFLICT (name) DO UPDATE
                         SET position = GREATEST(recap_checkpoints.position, EXCLUDED.position), updated_at = now()",
                )
                .bind(name)
                .bind(since as f64)
                .execute(&mut *self.tx)
                .await?;
            }
            sqlx::query("UPDATE recap_leader SET epoch = epoch + 1")
                .execute(&mut *self.tx)
                .await?;
        }
        sqlx::query(
            "UPDATE recap_nats_layout SET layout = $2, changed_at = now(),
                 since_seq = CASE WHEN $3::bigint IS NULL THEN since_seq ELSE $3 END
             WHERE stream = $1",
        )
        .bind(&self.stream)
        .bind(layout)
        .bind(moved.map(|(since, _)| since as i64))
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}
