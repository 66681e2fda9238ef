//! The ingest side: the leader lease (the fence), heartbeats, and the checkpointed state read at start
//! (`recap_open_windows`, watermarks, tombstones). The checkpoint transaction (`IngestTx`) is `ingest/tx.rs`; the
//! coverage lists bound for SQL and the merge-candidate queries are `ingest/coverage.rs`.

mod coverage;
mod tx;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub(super) use coverage::{Asked, insert_messages, taken};
pub use coverage::{MERGE_CANDIDATE_PROBE_SQL, MERGE_CANDIDATES_SQL};
pub use tx::{Closing, IngestTx, WindowClosed};

use super::{Fence, Store, StoreError};
use crate::model::{StreamSeq, SweepPos};
use crate::state::{ClampedPoint, Snapshot};
use crate::tracker::Millis;

/// A key's open messages as a checkpoint stored them ([`Store::load_open_state`]).
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    pub snapshot: Snapshot,
    /// Written under the layout asked for (else under an earlier partition layout).
    pub current_layout: bool,
}

/// A bot's watermark as a partition stored it (`recap_watermarks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWatermark {
    pub bot: String,
    /// The partition that wrote it.
    pub part: i32,
    pub watermark: Millis,
}

/// A `recap_watermarks` row.
#[derive(sqlx::FromRow)]
struct WatermarkRow {
    bot_name: String,
    part: i32,
    watermark: DateTime<Utc>,
}

/// A `recap_open_windows` row, and whether it was written under the current layout.
#[derive(sqlx::FromRow)]
struct OpenRow {
    bot_name: String,
    user_id: String,
    point_ids: Vec<String>,
    point_ts: Vec<DateTime<Utc>>,
    current: bool,
}

/// A `recap_clamped_points` row.
#[derive(sqlx::FromRow)]
struct ClampedRow {
    bot_name: String,
    user_id: String,
    point_id: String,
    stored_ts: DateTime<Utc>,
}

/// A `recap_forgotten` row.
#[derive(sqlx::FromRow)]
struct ForgottenRow {
    bot_name: String,
    user_key: String,
    forgotten_at: DateTime<Utc>,
    point_ids: Option<Vec<String>>,
}

impl Store {
    // ---- leadership -------------------------------------------------------------------------------------------

    /// Takes the ingest lease (partition 0) if it is free, expired, or already ours. Returns the new epoch.
    pub async fn try_acquire_leader(
        &self,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Fence>, StoreError> {
        self.try_acquire_partition(owner, ttl, 0).await
    }

    /// Takes the lease of ingest partition `part` if it is free, expired, or already ours. Returns the new epoch.
    pub async fn try_acquire_partition(
        &self,
        owner: &str,
        ttl: Duration,
        part: i32,
    ) -> Result<Option<Fence>, StoreError> {
        let epoch = sqlx::query_scalar(
            "INSERT INTO recap_leader (id, owner, epoch, lease_until) VALUES ($3 + 1, $1, 1, now() + $2 * interval '1 millisecond')
             ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, epoch = recap_leader.epoch + 1,
                 lease_until = EXCLUDED.lease_until
             WHERE recap_leader.lease_until < now() OR recap_leader.owner = EXCLUDED.owner
             RETURNING epoch",
        )
        .bind(owner)
        .bind(ttl.as_millis() as f64)
        .bind(part)
        .fetch_optional(&self.pool)
        .await?;
        Ok(epoch.map(|epoch| Fence {
            owner: owner.to_string(),
            epoch,
            ttl,
            part,
        }))
    }

    /// Renews the lease outside a batch (an idle leader).
    pub async fn renew_leader(&self, fence: &Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        renew(&mut conn, fence).await
    }

    pub async fn release_leader(&self, fence: &Fence) -> Result<(), StoreError> {
        sqlx::query("UPDATE recap_leader SET lease_until = now() - interval '1 second' WHERE id = $3 + 1 AND owner = $1 AND epoch = $2")
            .bind(&fence.owner)
            .bind(fence.epoch)
            .bind(fence.part)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Says this replica takes part in ingest for `ttl` more, and whether it `can_ingest` (its sources read); returns
    /// how many replicas share the partitions now: itself plus the others alive that can ingest (issue 24, case 11: a
    /// replica that heartbeats but cannot reach NATS holds no share).
    pub async fn ingest_heartbeat(
        &self,
        instance: &str,
        ttl: Duration,
        can_ingest: bool,
    ) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "WITH me AS (INSERT INTO recap_ingest_members (instance, seen_until, can_ingest)
                 VALUES ($1, now() + $2 * interval '1 millisecond', $3)
                 ON CONFLICT (instance) DO UPDATE SET seen_until = EXCLUDED.seen_until,
                     can_ingest = EXCLUDED.can_ingest RETURNING instance)
             SELECT 1 + count(*) FROM recap_ingest_members
             WHERE seen_until >= now() AND can_ingest AND instance <> $1",
        )
        .bind(instance)
        .bind(ttl.as_millis() as f64)
        .bind(can_ingest)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as usize)
    }

    /// This replica leaves ingest (graceful shutdown): the others count it out at once.
    pub async fn ingest_leave(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM recap_ingest_members WHERE instance = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- tracker state ----------------------------------------------------------------------------------------

    pub async fn load_watermarks(&self) -> Result<Vec<StoredWatermark>, StoreError> {
        let rows: Vec<WatermarkRow> =
            sqlx::query_as("SELECT bot_name, part, watermark FROM recap_watermarks")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| StoredWatermark {
                bot: r.bot_name,
                part: r.part,
                watermark: r.watermark.timestamp_millis(),
            })
            .collect())
    }

    /// The open messages stored by the last checkpoints: partition `part`'s rows written under `layout` (see
    /// [`crate::source::nats::layout`]), and every row written under another layout (`current_layout: false`: the
    /// caller keeps those whose key it owns now).
    pub async fn load_open_state(
        &self,
        part: i32,
        layout: &str,
    ) -> Result<Vec<StoredSnapshot>, StoreError> {
        let rows: Vec<OpenRow> = sqlx::query_as(
            "SELECT bot_name, user_id, point_ids, point_ts, true AS current FROM recap_open_windows WHERE layout = $2 AND part = $1
             UNION ALL
             SELECT bot_name, user_id, point_ids, point_ts, false FROM recap_open_windows WHERE layout < $2 OR layout > $2",
        )
        .bind(part)
        .bind(layout)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let snapshot = Snapshot {
                    bot: std::sync::Arc::from(r.bot_name),
                    user: std::sync::Arc::from(r.user_id),
                    points: r
                        .point_ts
                        .iter()
                        .map(|t| t.timestamp_millis())
                        .zip(r.point_ids)
                        .collect(),
                };
                StoredSnapshot {
                    snapshot,
                    current_layout: r.current,
                }
            })
            .collect())
    }

    /// Closed points stamped far ahead of the clock, younger than a day.
    pub async fn load_clamped(&self) -> Result<Vec<ClampedPoint>, StoreError> {
        let rows: Vec<ClampedRow> = sqlx::query_as(
            "SELECT bot_name, user_id, point_id, stored_ts FROM recap_clamped_points
             WHERE stored_ts >= now() - make_interval(secs => $1::float8 / 1000)",
        )
        .bind(crate::state::CLAMPED_MEMORY_MS as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ClampedPoint {
                bot: r.bot_name.into(),
                user: r.user_id.into(),
                id: r.point_id,
                stored: r.stored_ts.timestamp_millis(),
            })
            .collect())
    }

    /// Tombstones of forgotten users (see [`crate::state::Tombstone`]).
    pub async fn load_forgotten(&self) -> Result<Vec<crate::state::Tombstone>, StoreError> {
        let rows: Vec<ForgottenRow> = sqlx::query_as(
            "SELECT bot_name, user_key, forgotten_at, point_ids FROM recap_forgotten",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| crate::state::Tombstone {
                bot: r.bot_name,
                user_key: r.user_key,
                at: r.forgotten_at.timestamp_millis(),
                points: r.point_ids,
            })
            .collect())
    }

    /// A stored stream position (`recap_checkpoints.position` of a JetStream source), exactly: a stored value that is
    /// not a whole sequence is an error, never rounded.
    pub async fn stream_position(&self, name: &str) -> Result<Option<StreamSeq>, StoreError> {
        match self.checkpoint(name).await? {
            None => Ok(None),
            Some(v) => StreamSeq::from_column(v)
                .map(Some)
                .ok_or(StoreError::Invariant(
                    "a stored stream position is not a whole sequence",
                )),
        }
    }

    /// A stored sweep position (`recap_checkpoints.position` of a collection's sweep).
    pub async fn sweep_position(&self, name: &str) -> Result<Option<SweepPos>, StoreError> {
        Ok(self.checkpoint(name).await?.map(SweepPos))
    }

    pub async fn checkpoint(&self, name: &str) -> Result<Option<f64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT position FROM recap_checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
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
        Ok(IngestTx {
            tx,
            running_every: self.running_every,
        })
    }
}

async fn renew(conn: &mut sqlx::PgConnection, fence: &Fence) -> Result<(), StoreError> {
    let r = sqlx::query(
        "UPDATE recap_leader SET lease_until = now() + $3 * interval '1 millisecond' WHERE id = $4 + 1 AND owner = $1 AND epoch = $2",
    )
    .bind(&fence.owner)
    .bind(fence.epoch)
    .bind(fence.ttl.as_millis() as f64)
    .bind(fence.part)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::LostLeadership(fence.epoch))
    }
}
