//! The checkpoint transaction (`IngestTx`): dead letters, snapshots, closed windows (merged with their stored
//! windows' coverage), clamped points, watermarks and source positions, under the leader's fence.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::coverage::{
    Asked, FlatPoints, MERGE_CANDIDATE_PROBE_SQL, MERGE_CANDIDATES_SQL, near_each_other,
    points_by_row, taken,
};
use crate::model::{SourceCheckpoint, WindowState};
use crate::sink::{DeadLetter, StoreError, to_utc};
use crate::state::{ClampedPoint, Closed, Point, Snapshot};
use crate::tracker::{Millis, Mode, TrackerConfig};

/// What storing a checkpoint's closed windows did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    /// Windows recorded as too short to summarize.
    pub too_short: usize,
    /// Points a stored window had already (read again after their window closed): not new messages.
    pub already_stored: usize,
}

/// The state a closed window of `messages` messages is stored in: due, or too short under `min_messages`.
fn closed_state(messages: usize, min_messages: u32) -> WindowState {
    if messages as u32 >= min_messages {
        WindowState::Due
    } else {
        WindowState::TooShort
    }
}

/// What storing one closed window did ([`IngestTx::close_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowClosed {
    /// The stored window's id (the first stored window of the key when every point was stored already).
    pub id: i64,
    /// Recorded as too short to summarize.
    pub too_short: bool,
    /// Points a stored window had already (read again: not new).
    pub already_stored: usize,
}

/// One ingest transaction: a checkpoint (see `crate::state`).
pub struct IngestTx {
    pub(super) tx: Transaction<'static, Postgres>,
    pub(super) running_every: u32,
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
                (Some(b), Some(u)) => Some(crate::sink::user_key(b, u)),
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
        crate::sink::running::mark_due(&mut self.tx, (&b, &u), self.running_every).await?;
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
            let closed = self.close_window(cfg, w, min_messages).await?;
            done.too_short += usize::from(closed.too_short);
            done.already_stored += closed.already_stored;
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
        let states: Vec<WindowState> = bulk
            .iter()
            .map(|w| closed_state(w.points.len(), min_messages))
            .collect();
        done.too_short += states
            .iter()
            .filter(|s| **s == WindowState::TooShort)
            .count();
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
    ) -> Result<WindowClosed, StoreError> {
        let w = &c.window;
        let (lo, hi) = w.message_range(cfg.mode);
        let gap = match cfg.mode {
            Mode::Session => cfg.idle_gap_ms,
            Mode::Tumbling => 0,
        };
        /// A row of [`MERGE_CANDIDATES_SQL`].
        #[derive(sqlx::FromRow)]
        struct CandidateRow {
            id: i64,
            start_ts: DateTime<Utc>,
            end_ts: DateTime<Utc>,
            summary_id: Option<i32>,
            point_ids: Vec<String>,
            point_ts: Vec<DateTime<Utc>>,
        }
        let candidates: Vec<CandidateRow> = sqlx::query_as(MERGE_CANDIDATES_SQL)
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
            .into_iter()
            .map(|r| Candidate {
                id: r.id,
                start: r.start_ts.timestamp_millis(),
                end: r.end_ts.timestamp_millis(),
                summary: r.summary_id,
                points: r
                    .point_ts
                    .iter()
                    .map(|t| t.timestamp_millis())
                    .zip(r.point_ids)
                    .collect(),
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
            let asked: Vec<Asked<'_>> = c
                .points
                .iter()
                .map(|(_, id)| Asked {
                    bot: &w.bot,
                    user: &w.user,
                    point: id,
                    except: None,
                })
                .collect();
            taken(&mut *self.tx, &asked)
                .await?
                .into_iter()
                .map(|i| c.points[i].1.clone())
                .collect()
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
            return Ok(WindowClosed {
                id,
                too_short: false,
                already_stored: covered_here,
            });
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
        let (id, state): (i64, WindowState) = match targets.split_first() {
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
                        state = CASE WHEN cardinality($5::text[]) >= $4 THEN $7 ELSE $8 END,
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
                .bind(WindowState::Due)
                .bind(WindowState::TooShort)
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
                .bind(closed_state(ids.len(), min_messages))
                .bind(ids.len() as i32)
                .bind(&ids)
                .bind(&ts)
                .fetch_one(&mut *self.tx)
                .await?
            }
        };
        Ok(WindowClosed {
            id,
            too_short: state == WindowState::TooShort,
            already_stored: covered_here,
        })
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

    /// Records a source position (JetStream sequence, or a sweep high-water mark) and how many points were read
    /// (the position stored as the column's double: [`crate::model::Position::to_column`]).
    pub async fn save_checkpoint(&mut self, c: &SourceCheckpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO recap_checkpoints (name, position, points_read) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET position = GREATEST(recap_checkpoints.position, EXCLUDED.position),
                points_read = recap_checkpoints.points_read + EXCLUDED.points_read, updated_at = now()",
        )
        .bind(&c.name)
        .bind(c.position.to_column())
        .bind(c.points_read)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
