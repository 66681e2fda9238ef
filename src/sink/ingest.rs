//! The ingest side: the leader lease (the fence), the tracker state read at start, and the ingest transaction.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};

use super::{DeadLetter, Fence, NewMessage, Store, StoreError, to_utc};
use crate::tracker::{ClosedWindow, Millis, Mode, TrackerConfig};

impl Store {
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
pub(super) async fn insert_messages(
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
    let keys: Vec<String> = msgs
        .iter()
        .map(|m| super::user_key(&m.bot, &m.user_id))
        .collect();
    // A message of a forgotten user stored before the forget is not new (migration 0009).
    let rows = sqlx::query(
        "INSERT INTO recap_messages (bot_name, point_id, user_id, ts, window_id)
         SELECT b, p, u, t, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $6::text[])
             AS x(b, p, u, t, k)
         WHERE NOT EXISTS (
             SELECT 1 FROM recap_forgotten f WHERE f.bot_name = x.b AND f.user_key = x.k AND x.t <= f.forgotten_at)
         ON CONFLICT (bot_name, point_id) DO NOTHING
         RETURNING bot_name, point_id",
    )
    .bind(&bots)
    .bind(&ids)
    .bind(&users)
    .bind(&ts)
    .bind(window)
    .bind(&keys)
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
