//! The ingest side: the leader lease (the fence), the checkpointed state read at start (`recap_open_windows`,
//! watermarks, tombstones), and the checkpoint transaction (`IngestTx`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};

use super::{DeadLetter, Fence, NewMessage, Store, StoreError, to_utc};
use crate::state::{ClampedPoint, Closed, Point, Snapshot};
use crate::tracker::{Millis, Mode, TrackerConfig};

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
        let row = sqlx::query(
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
        Ok(row.map(|r| Fence {
            owner: owner.to_string(),
            epoch: r.get(0),
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

    pub async fn load_watermarks(&self) -> Result<Vec<(String, i32, Millis)>, StoreError> {
        let rows = sqlx::query("SELECT bot_name, part, watermark FROM recap_watermarks")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<i32, _>(1),
                    r.get::<DateTime<Utc>, _>(2).timestamp_millis(),
                )
            })
            .collect())
    }

    /// The open messages stored by the last checkpoints: partition `part`'s rows written under `layout` (see
    /// [`crate::source::nats::layout`]), and every row written under another layout (`false` after it: the caller
    /// keeps those whose key it owns now).
    pub async fn load_open_state(
        &self,
        part: i32,
        layout: &str,
    ) -> Result<Vec<(Snapshot, bool)>, StoreError> {
        let rows = sqlx::query(
            "SELECT bot_name, user_id, point_ids, point_ts, true FROM recap_open_windows WHERE layout = $2 AND part = $1
             UNION ALL
             SELECT bot_name, user_id, point_ids, point_ts, false FROM recap_open_windows WHERE layout < $2 OR layout > $2",
        )
        .bind(part)
        .bind(layout)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let ids: Vec<String> = r.get(2);
                let ts: Vec<DateTime<Utc>> = r.get(3);
                let snapshot = Snapshot {
                    bot: std::sync::Arc::from(r.get::<&str, _>(0)),
                    user: std::sync::Arc::from(r.get::<&str, _>(1)),
                    points: ts.iter().map(|t| t.timestamp_millis()).zip(ids).collect(),
                };
                (snapshot, r.get::<bool, _>(4))
            })
            .collect())
    }

    /// Closed points stamped far ahead of the clock, younger than a day: (bot, user, point id, stored time).
    pub async fn load_clamped(&self) -> Result<Vec<(String, String, String, Millis)>, StoreError> {
        let rows = sqlx::query(
            "SELECT bot_name, user_id, point_id, stored_ts FROM recap_clamped_points
             WHERE stored_ts >= now() - make_interval(secs => $1::float8 / 1000)",
        )
        .bind(crate::state::CLAMPED_MEMORY_MS as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get::<DateTime<Utc>, _>(3).timestamp_millis(),
                )
            })
            .collect())
    }

    /// Tombstones of forgotten users (see [`crate::state::Tombstone`]).
    pub async fn load_forgotten(&self) -> Result<Vec<crate::state::Tombstone>, StoreError> {
        let rows =
            sqlx::query("SELECT bot_name, user_key, forgotten_at, point_ids FROM recap_forgotten")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| crate::state::Tombstone {
                bot: r.get(0),
                user_key: r.get(1),
                at: r.get::<DateTime<Utc>, _>(2).timestamp_millis(),
                points: r.get(3),
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

/// Adds points to a stored window's coverage (`recap_windows.point_ids`, `point_ts`: time order), skipping those it
/// already has. Returns a flag per input: true when it was new to the window. (The worker stores here the points a
/// window's scroll found that no event named.)
pub(super) async fn insert_messages(
    tx: &mut Transaction<'_, Postgres>,
    msgs: &[NewMessage],
    window: Option<i64>,
) -> Result<Vec<bool>, StoreError> {
    let Some(window) = window else {
        return Err(StoreError::Invariant(
            "messages are stored with their window (open ones live in checkpoints)",
        ));
    };
    if msgs.is_empty() {
        return Ok(Vec::new());
    }
    let row = sqlx::query("SELECT point_ids, point_ts FROM recap_windows WHERE id = $1 FOR UPDATE")
        .bind(window)
        .fetch_one(&mut **tx)
        .await?;
    let ids: Vec<String> = row.get(0);
    let ts: Vec<DateTime<Utc>> = row.get(1);
    let mut points: Vec<(Millis, String)> =
        ts.iter().map(|t| t.timestamp_millis()).zip(ids).collect();
    let mut known: std::collections::HashSet<String> =
        points.iter().map(|(_, id)| id.clone()).collect();
    let new: Vec<bool> = msgs
        .iter()
        .map(|m| {
            let fresh = known.insert(m.point_id.clone());
            if fresh {
                points.push((m.ts_ms, m.point_id.clone()));
            }
            fresh
        })
        .collect();
    if new.iter().any(|n| *n) {
        points.sort();
        let (ts, ids): (Vec<DateTime<Utc>>, Vec<String>) =
            points.into_iter().map(|(t, id)| (to_utc(t), id)).unzip();
        sqlx::query("UPDATE recap_windows SET point_ids = $2, point_ts = $3 WHERE id = $1")
            .bind(window)
            .bind(&ids)
            .bind(&ts)
            .execute(&mut **tx)
            .await?;
    }
    Ok(new)
}

/// Rows with variable-length point lists, flattened for `unnest`: the row index (1-based) of each point, its id and
/// time. SQL regroups them with [`POINTS_BY_ROW_SQL`].
struct FlatPoints<'a> {
    row: Vec<i64>,
    ids: Vec<&'a str>,
    ts: Vec<DateTime<Utc>>,
}

impl<'a> FlatPoints<'a> {
    fn of(lists: impl IntoIterator<Item = &'a [Point]>) -> FlatPoints<'a> {
        let mut f = FlatPoints {
            row: Vec::new(),
            ids: Vec::new(),
            ts: Vec::new(),
        };
        for (i, list) in lists.into_iter().enumerate() {
            for (t, id) in list {
                f.row.push(i as i64 + 1);
                f.ids.push(id);
                f.ts.push(to_utc(*t));
            }
        }
        f
    }
}

/// The point lists of [`FlatPoints`] bound as `$P1` (row), `$P2` (ids), `$P3` (times), one row per list: `(i, ids, ts)`.
const POINTS_BY_ROW_SQL: &str = "SELECT i, array_agg(id ORDER BY o) AS ids, array_agg(t ORDER BY o) AS ts
    FROM unnest($P1::int8[], $P2::text[], $P3::timestamptz[]) WITH ORDINALITY AS x(i, id, t, o) GROUP BY i";

fn points_by_row(first: usize) -> String {
    POINTS_BY_ROW_SQL
        .replace("$P1", &format!("${first}"))
        .replace("$P2", &format!("${}", first + 1))
        .replace("$P3", &format!("${}", first + 2))
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
pub const MERGE_CANDIDATES_SQL: &str = "SELECT id, start_ts, end_ts, summary_id, point_ids, point_ts FROM recap_windows
             WHERE bot_name = $1 AND user_id = $2 AND start_ts <= $3 AND start_ts > $5 AND end_ts >= $4
             ORDER BY start_ts FOR UPDATE";

/// What storing a checkpoint's closed windows did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// Windows recorded as too short to summarize.
    pub too_short: usize,
    /// Points a stored window had already (read again after their window closed): not new messages.
    pub already_stored: usize,
}

/// For each window of a checkpoint: whether its key closed another window in the same checkpoint that one of them
/// may belong to (the merge-candidate test of [`MERGE_CANDIDATES_SQL`], widened to the window's whole extent, in
/// either order). Such keys take the one-by-one path, in order, so the later window sees the earlier one stored; a
/// key whose windows lie apart (sessions hours apart, as in a backfill) is inserted with the others.
fn near_each_other(cfg: &TrackerConfig, windows: &[Closed]) -> Vec<bool> {
    let gap = match cfg.mode {
        Mode::Session => cfg.idle_gap_ms,
        Mode::Tumbling => 0,
    };
    /// A window's extent (first time, last time + gap) and its index.
    type Extent = (Millis, Millis, usize);
    let mut by_key: HashMap<(&str, &str), Vec<Extent>> = HashMap::new();
    for (i, c) in windows.iter().enumerate() {
        let w = &c.window;
        let (lo, hi) = w.message_range(cfg.mode);
        by_key.entry((&*w.bot, &*w.user)).or_default().push((
            lo.min(w.start_ms),
            hi.max(w.end_ms).saturating_add(gap),
            i,
        ));
    }
    let mut near = vec![false; windows.len()];
    for extents in by_key.values_mut().filter(|e| e.len() > 1) {
        extents.sort_unstable();
        let mut reach = Millis::MIN;
        let conflict = extents.iter().any(|&(from, to, _)| {
            let hit = from <= reach;
            reach = reach.max(to);
            hit
        });
        if conflict {
            for &(_, _, i) in extents.iter() {
                near[i] = true;
            }
        }
    }
    near
}

/// One ingest transaction: a checkpoint (see `crate::state`).
pub struct IngestTx {
    tx: Transaction<'static, Postgres>,
    running_every: u32,
}

impl IngestTx {
    pub async fn dead_letters(&mut self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        for d in letters {
            sqlx::query(
                // Letters without a stream sequence (ingest's far-future points, the sweep's invalid payloads) come
                // again with every sweep cycle that reads their point: stored once (idx_recap_dead_letters_raw).
                "INSERT INTO recap_dead_letters (source, subject, stream_seq, raw, reason, bot_name, user_id)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE ($3::bigint IS NOT NULL OR NOT EXISTS (SELECT 1 FROM recap_dead_letters
                     WHERE source = $1 AND stream_seq IS NULL AND md5(raw) = md5($4::bytea)))
                   -- a letter naming a forgotten user is not kept (read again after the forget, it would bring
                   -- them back; the metrics count it, the stream or the collection keeps the input)
                   AND ($8::text IS NULL OR NOT EXISTS (SELECT 1 FROM recap_forgotten f
                     WHERE f.bot_name = $6 AND f.user_key = $8))
                 ON CONFLICT (source, stream_seq) WHERE stream_seq IS NOT NULL DO NOTHING",
            )
            .bind(d.source)
            .bind(d.subject.as_deref())
            .bind(d.stream_seq.map(|s| s as i64))
            .bind(&d.raw)
            .bind(&d.reason)
            .bind(DeadLetter::key_part(d.bot.clone()))
            .bind(DeadLetter::key_part(d.user_id.clone()))
            .bind(match (&d.bot, &d.user_id) {
                (Some(b), Some(u)) => Some(super::user_key(b, u)),
                _ => None,
            })
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// Stores the open messages of the keys a checkpoint changed: one row per key (upsert), or its removal when it
    /// has none left. Two statements whatever the number of keys.
    pub async fn save_snapshots(
        &mut self,
        snaps: &[Snapshot],
        part: i32,
        layout: &str,
    ) -> Result<(), StoreError> {
        let (keep, gone): (Vec<&Snapshot>, Vec<&Snapshot>) =
            snaps.iter().partition(|s| !s.points.is_empty());
        if !gone.is_empty() {
            let b: Vec<&str> = gone.iter().map(|s| &*s.bot).collect();
            let u: Vec<&str> = gone.iter().map(|s| &*s.user).collect();
            sqlx::query(
                "DELETE FROM recap_open_windows o USING unnest($1::text[], $2::text[]) AS k(b, u)
                 WHERE o.bot_name = k.b AND o.user_id = k.u",
            )
            .bind(&b)
            .bind(&u)
            .execute(&mut *self.tx)
            .await?;
        }
        if keep.is_empty() {
            return Ok(());
        }
        let b: Vec<&str> = keep.iter().map(|s| &*s.bot).collect();
        let u: Vec<&str> = keep.iter().map(|s| &*s.user).collect();
        let flat = FlatPoints::of(keep.iter().map(|s| s.points.as_slice()));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO recap_open_windows (bot_name, user_id, part, layout, point_ids, point_ts)
             SELECT k.b, k.u, $3, $4, p.ids, p.ts
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(b, u, i) JOIN ({}) p ON p.i = k.i
             ON CONFLICT (bot_name, user_id) DO UPDATE SET part = EXCLUDED.part, layout = EXCLUDED.layout,
                 point_ids = EXCLUDED.point_ids, point_ts = EXCLUDED.point_ts, updated_at = now()",
            points_by_row(5)
        )))
        .bind(&b)
        .bind(&u)
        .bind(part)
        .bind(layout)
        .bind(&flat.row)
        .bind(&flat.ids)
        .bind(&flat.ts)
        .execute(&mut *self.tx)
        .await?;
        super::running::mark_due(&mut self.tx, (&b, &u), self.running_every).await?;
        Ok(())
    }

    /// Stores a checkpoint's closed windows, in the order given, as [`IngestTx::close_window`] would one by one, in a
    /// fixed number of statements: one query finds which windows may belong to a stored one (a late message) and
    /// those, and any key closed twice in the batch, take the one-by-one path; the others (nearly all) are inserted
    /// together with their coverage.
    pub async fn close_windows(
        &mut self,
        cfg: &TrackerConfig,
        windows: &[Closed],
        min_messages: u32,
    ) -> Result<Closing, StoreError> {
        let mut done = Closing::default();
        if windows.is_empty() {
            return Ok(done);
        }
        let gap = match cfg.mode {
            Mode::Session => cfg.idle_gap_ms,
            Mode::Tumbling => 0,
        };
        let ranges: Vec<(Millis, Millis)> = windows
            .iter()
            .map(|w| w.window.message_range(cfg.mode))
            .collect();
        let bots: Vec<&str> = windows.iter().map(|w| &*w.window.bot).collect();
        let users: Vec<&str> = windows.iter().map(|w| &*w.window.user).collect();
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
        let near = near_each_other(cfg, windows);
        let one_by_one: Vec<bool> = (0..windows.len())
            .map(|i| with_candidates.contains(&(i as i64 + 1)) || near[i] || windows[i].clamped)
            .collect();
        for (w, _) in windows.iter().zip(&one_by_one).filter(|(_, s)| **s) {
            let (_, short, covered) = self.close_window(cfg, w, min_messages).await?;
            done.too_short += usize::from(short);
            done.already_stored += covered;
        }
        let bulk: Vec<&Closed> = (0..windows.len())
            .filter(|i| !one_by_one[*i])
            .map(|i| &windows[i])
            .collect();
        if bulk.is_empty() {
            return Ok(done);
        }
        let b: Vec<&str> = bulk.iter().map(|w| &*w.window.bot).collect();
        let u: Vec<&str> = bulk.iter().map(|w| &*w.window.user).collect();
        let starts: Vec<DateTime<Utc>> = bulk.iter().map(|w| to_utc(w.window.start_ms)).collect();
        let ends: Vec<DateTime<Utc>> = bulk.iter().map(|w| to_utc(w.window.end_ms)).collect();
        let counts: Vec<i32> = bulk.iter().map(|w| w.points.len() as i32).collect();
        let states: Vec<&str> = bulk
            .iter()
            .map(|w| {
                if w.points.len() as u32 >= min_messages {
                    "due"
                } else {
                    "too_short"
                }
            })
            .collect();
        done.too_short += states.iter().filter(|s| **s == "too_short").count();
        let flat = FlatPoints::of(bulk.iter().map(|w| w.points.as_slice()));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, point_ids, point_ts)
             SELECT x.b, x.u, x.s, x.e, x.st, x.n, p.ids, p.ts
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::int4[])
                 WITH ORDINALITY AS x(b, u, s, e, st, n, i)
             JOIN ({}) p ON p.i = x.i
             ORDER BY x.i",
            points_by_row(7)
        )))
        .bind(&b)
        .bind(&u)
        .bind(&starts)
        .bind(&ends)
        .bind(&states)
        .bind(&counts)
        .bind(&flat.row)
        .bind(&flat.ids)
        .bind(&flat.ts)
        .execute(&mut *self.tx)
        .await?;
        Ok(done)
    }

    /// Stores a closed window: merged into the stored window(s) it belongs to (a late message, or a message read
    /// again after its window closed), or inserted as a new one (`due`, or `too_short` under `min_messages`).
    /// A window whose points the stored windows already cover (a redelivery, the sweep's overlap) changes nothing.
    /// Returns the window's id, whether it is recorded as too short, and how many of its points a stored window had
    /// already (read again: not new).
    pub async fn close_window(
        &mut self,
        cfg: &TrackerConfig,
        c: &Closed,
        min_messages: u32,
    ) -> Result<(i64, bool, usize), StoreError> {
        let w = &c.window;
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
        struct Candidate {
            id: i64,
            start: Millis,
            end: Millis,
            summary: Option<i32>,
            points: Vec<Point>,
        }
        let existing: Vec<Candidate> = candidates
            .iter()
            .map(|r| {
                let ids: Vec<String> = r.get(4);
                let ts: Vec<DateTime<Utc>> = r.get(5);
                Candidate {
                    id: r.get(0),
                    start: r.get::<DateTime<Utc>, _>(1).timestamp_millis(),
                    end: r.get::<DateTime<Utc>, _>(2).timestamp_millis(),
                    summary: r.get(3),
                    points: ts.iter().map(|t| t.timestamp_millis()).zip(ids).collect(),
                }
            })
            .collect();
        // De-duplication against the closed windows' coverage: points a stored window already has are not new.
        let mut covered: std::collections::HashSet<&str> = existing
            .iter()
            .flat_map(|e| e.points.iter().map(|(_, id)| id.as_str()))
            .collect();
        // A point stamped ahead of the clock was windowed by its arrival time, which a second read does not repeat:
        // it is looked for in every stored window of the key, not only the ones near in time.
        let elsewhere: Vec<String> = if c.clamped {
            let ids: Vec<&str> = c.points.iter().map(|(_, id)| id.as_str()).collect();
            sqlx::query_scalar(
                "SELECT p FROM recap_windows w CROSS JOIN LATERAL unnest(w.point_ids) AS p
                 WHERE w.bot_name = $1 AND w.user_id = $2 AND w.point_ids && $3::text[] AND p = ANY($3)",
            )
            .bind(&*w.bot)
            .bind(&*w.user)
            .bind(&ids)
            .fetch_all(&mut *self.tx)
            .await?
        } else {
            Vec::new()
        };
        covered.extend(elsewhere.iter().map(String::as_str));
        let fresh: Vec<&Point> = c
            .points
            .iter()
            .filter(|(_, id)| !covered.contains(id.as_str()))
            .collect();
        let covered_here = c.points.len() - fresh.len();
        if fresh.is_empty() {
            // Every point is stored already (read again after its window closed): nothing changes.
            let id = existing.first().map_or(0, |e| e.id);
            return Ok((id, false, covered_here));
        }
        let (f_lo, f_hi) = (
            fresh.iter().map(|p| p.0).min().unwrap_or(w.start_ms),
            fresh.iter().map(|p| p.0).max().unwrap_or(w.end_ms),
        );
        // The window as the fresh points alone make it (session: their span; tumbling: the bucket).
        let (w_start, w_end) = match cfg.mode {
            Mode::Session => (f_lo, f_hi),
            Mode::Tumbling => (w.start_ms, w.end_ms),
        };
        let spans: Vec<(Millis, Millis)> = existing.iter().map(|e| (e.start, e.end)).collect();
        let targets = crate::tracker::merge_targets(cfg, &spans, (w_start, w_end));
        let (id, state): (i64, String) = match targets.split_first() {
            Some((&first, rest)) => {
                let id = existing[first].id;
                // A late message that bridges stored windows joins them (the window definition gives one): the
                // later ones' points move to the first, their rows (window and summary) are deleted.
                let (mut start, mut end) = (w_start, w_end);
                let mut points: Vec<Point> = existing[first].points.clone();
                start = start.min(existing[first].start);
                end = end.max(existing[first].end);
                for &j in rest {
                    let other = &existing[j];
                    start = start.min(other.start);
                    end = end.max(other.end);
                    points.extend(other.points.iter().cloned());
                    sqlx::query("DELETE FROM recap_windows WHERE id = $1")
                        .bind(other.id)
                        .execute(&mut *self.tx)
                        .await?;
                    if let Some(row) = other.summary {
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
                points.extend(fresh.into_iter().cloned());
                points.sort();
                points.dedup_by(|a, b| a.1 == b.1);
                let (ts, ids): (Vec<DateTime<Utc>>, Vec<String>) =
                    points.into_iter().map(|(t, id)| (to_utc(t), id)).unzip();
                let state = sqlx::query_scalar(
                    "UPDATE recap_windows SET start_ts = LEAST(start_ts, $2), end_ts = GREATEST(end_ts, $3),
                        message_count = cardinality($5::text[]), point_ids = $5, point_ts = $6, version = version + 1,
                        state = CASE WHEN cardinality($5::text[]) >= $4 THEN 'due' ELSE 'too_short' END,
                        attempts = 0, not_before = NULL, closed_at = now(), updated_at = now()
                     WHERE id = $1
                     RETURNING state",
                )
                .bind(id)
                .bind(to_utc(start))
                .bind(to_utc(end))
                .bind(min_messages as i32)
                .bind(&ids)
                .bind(&ts)
                .fetch_one(&mut *self.tx)
                .await?;
                (id, state)
            }
            None => {
                let (ts, ids): (Vec<DateTime<Utc>>, Vec<String>) =
                    fresh.iter().map(|(t, id)| (to_utc(*t), id.clone())).unzip();
                sqlx::query_as(
                    "INSERT INTO recap_windows (bot_name, user_id, start_ts, end_ts, state, message_count, point_ids,
                         point_ts)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     RETURNING id, state",
                )
                .bind(&*w.bot)
                .bind(&*w.user)
                .bind(to_utc(w_start))
                .bind(to_utc(w_end))
                .bind(if ids.len() as u32 >= min_messages {
                    "due"
                } else {
                    "too_short"
                })
                .bind(ids.len() as i32)
                .bind(&ids)
                .bind(&ts)
                .fetch_one(&mut *self.tx)
                .await?
            }
        };
        Ok((id, state == "too_short", covered_here))
    }

    /// Stores closed points stamped far ahead of the clock (`recap_clamped_points`, see [`crate::state::ClampedPoint`])
    /// and drops the rows a day past their stored time.
    pub async fn save_clamped(&mut self, points: &[ClampedPoint]) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let bots: Vec<&str> = points.iter().map(|p| &*p.bot).collect();
        let ids: Vec<&str> = points.iter().map(|p| p.id.as_str()).collect();
        let users: Vec<&str> = points.iter().map(|p| &*p.user).collect();
        let ts: Vec<DateTime<Utc>> = points.iter().map(|p| to_utc(p.stored)).collect();
        sqlx::query(
            "INSERT INTO recap_clamped_points (bot_name, point_id, user_id, stored_ts)
             SELECT b, p, u, max(t) FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS x(b, p, u, t)
             GROUP BY b, p, u
             ON CONFLICT (bot_name, point_id) DO UPDATE SET stored_ts = GREATEST(recap_clamped_points.stored_ts,
                 EXCLUDED.stored_ts)",
        )
        .bind(&bots)
        .bind(&ids)
        .bind(&users)
        .bind(&ts)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "DELETE FROM recap_clamped_points WHERE stored_ts < now() - make_interval(secs => $1::float8 / 1000)",
        )
        .bind(crate::state::CLAMPED_MEMORY_MS as f64)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn save_watermarks(
        &mut self,
        marks: &[(std::sync::Arc<str>, Millis)],
        part: i32,
    ) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let bots: Vec<&str> = marks.iter().map(|(b, _)| &**b).collect();
        let wms: Vec<DateTime<Utc>> = marks.iter().map(|(_, w)| to_utc(*w)).collect();
        // One row per bot and partition (the tracker reports each bot once; GREATEST keeps the watermark monotonic
        // regardless).
        sqlx::query(
            "INSERT INTO recap_watermarks (bot_name, part, watermark)
             SELECT b, $3, max(w) FROM unnest($1::text[], $2::timestamptz[]) AS x(b, w) GROUP BY b
             ON CONFLICT (bot_name, part) DO UPDATE SET watermark = GREATEST(recap_watermarks.watermark, EXCLUDED.watermark),
                updated_at = now()",
        )
        .bind(&bots)
        .bind(&wms)
        .bind(part)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::ClosedWindow;

    fn closed(user: &str, start_ms: Millis, end_ms: Millis) -> Closed {
        Closed {
            window: ClosedWindow {
                bot: "b".into(),
                user: user.into(),
                start_ms,
                end_ms,
                count: 1,
            },
            points: vec![(start_ms, "1".into())],
            clamped: false,
        }
    }

    #[test]
    fn only_windows_of_one_key_within_the_gap_of_each_other_are_near() {
        let cfg = TrackerConfig {
            mode: Mode::Session,
            idle_gap_ms: 100,
            max_span_ms: 10_000,
            lateness_ms: 0,
        };
        let windows = [
            closed("u1", 0, 50),
            closed("u1", 1_000, 1_050), // apart from the others by more than the gap
            closed("u2", 0, 50),
            closed("u2", 140, 150), // 90 after u2's first window: within the gap, whichever order
            closed("u3", 10, 20),
            closed("u1", 5_000, 5_010),
        ];
        assert_eq!(
            near_each_other(&cfg, &windows),
            [false, false, true, true, false, false]
        );
        let reversed: Vec<Closed> = windows.iter().rev().cloned().collect();
        assert_eq!(
            near_each_other(&cfg, &reversed),
            [false, false, true, true, false, false]
        );
        // Exactly the gap apart is still a candidate (the stored window's end >= the next start - gap).
        let edge = [closed("u", 0, 50), closed("u", 150, 160)];
        assert_eq!(near_each_other(&cfg, &edge), [true, true]);
        let apart = [closed("u", 0, 50), closed("u", 151, 160)];
        assert_eq!(near_each_other(&cfg, &apart), [false, false]);
    }
}
