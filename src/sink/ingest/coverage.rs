//! A checkpoint's coverage lists bound for SQL (`FlatPoints`, regrouped by `POINTS_BY_ROW_SQL`), the coverage
//! insert of a stored window (`insert_messages`), the merge-candidate queries, and which closed windows of one
//! checkpoint are near each other.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use crate::sink::{NewMessage, StoreError, to_utc};
use crate::state::{Closed, Point};
use crate::tracker::{Millis, Mode, TrackerConfig};

/// A stored window's coverage columns.
#[derive(sqlx::FromRow)]
struct CoverageRow {
    point_ids: Vec<String>,
    point_ts: Vec<DateTime<Utc>>,
}

/// Adds points to a stored window's coverage (`recap_windows.point_ids`, `point_ts`: time order), skipping those it
/// already has and those another window of the key has. Returns a flag per input: true when it was new to the
/// window. (The worker stores here the points a window's scroll found that no event named.)
pub(in crate::sink) async fn insert_messages(
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
    let row: CoverageRow =
        sqlx::query_as("SELECT point_ids, point_ts FROM recap_windows WHERE id = $1 FOR UPDATE")
            .bind(window)
            .fetch_one(&mut **tx)
            .await?;
    let mut points: Vec<(Millis, String)> = row
        .point_ts
        .iter()
        .map(|t| t.timestamp_millis())
        .zip(row.point_ids)
        .collect();
    let mut known: std::collections::HashSet<String> =
        points.iter().map(|(_, id)| id.clone()).collect();
    // A point another window of the key covers is that window's, a point the key's tombstone lists is no one's:
    // never stored here (issue 24, case 1).
    let asked: Vec<Asked<'_>> = msgs
        .iter()
        .map(|m| Asked {
            bot: &m.bot,
            user: &m.user_id,
            point: &m.point_id,
            except: Some(window),
        })
        .collect();
    let elsewhere: Vec<String> = taken(&mut **tx, &asked)
        .await?
        .into_iter()
        .map(|i| msgs[i].point_id.clone())
        .collect();
    known.extend(elsewhere);
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

/// A point a window of a key would take: `except` is that window when it is stored.
pub struct Asked<'a> {
    pub bot: &'a str,
    pub user: &'a str,
    pub point: &'a str,
    pub except: Option<i64>,
}

/// Which of the points asked a window of their key may not take: those another stored window of the key covers (a
/// fast host's message windowed at its arrival, or one a checkpoint closed since a worker's fetch: issue 24, case 1)
/// and those the key's tombstone lists (a forgotten user's points, which the bots' collections still hold: a
/// worker's scroll finds them again). One statement for the three places that ask: the ingest's check of a clamped
/// window, a worker's scroll and the finish's coverage insert. Returns the positions in `asked`.
pub async fn taken<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    asked: &[Asked<'_>],
) -> Result<HashSet<usize>, StoreError> {
    if asked.is_empty() {
        return Ok(HashSet::new());
    }
    let bots: Vec<&str> = asked.iter().map(|a| a.bot).collect();
    let users: Vec<&str> = asked.iter().map(|a| a.user).collect();
    let points: Vec<&str> = asked.iter().map(|a| a.point).collect();
    let except: Vec<Option<i64>> = asked.iter().map(|a| a.except).collect();
    let keys: Vec<String> = asked
        .iter()
        .map(|a| crate::model::user_key(a.bot, a.user))
        .collect();
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT x.i FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[])
                 WITH ORDINALITY AS x(b, u, p, me, k, i)
         WHERE EXISTS (SELECT 1 FROM recap_windows o
                       WHERE o.bot_name = x.b AND o.user_id = x.u AND o.id IS DISTINCT FROM x.me
                         AND x.p = ANY(o.point_ids))
            OR EXISTS (SELECT 1 FROM recap_forgotten f
                       WHERE f.bot_name = x.b AND f.user_key = x.k AND x.p = ANY(f.point_ids))",
    )
    .bind(&bots)
    .bind(&users)
    .bind(&points)
    .bind(&except)
    .bind(&keys)
    .fetch_all(ex)
    .await?;
    Ok(rows.into_iter().map(|i| i as usize - 1).collect())
}

/// Rows with variable-length point lists, flattened for `unnest`: the row index (1-based) of each point, its id and
/// time. SQL regroups them with [`POINTS_BY_ROW_SQL`].
pub(super) struct FlatPoints<'a> {
    pub(super) row: Vec<i64>,
    pub(super) ids: Vec<&'a str>,
    pub(super) ts: Vec<DateTime<Utc>>,
}

impl<'a> FlatPoints<'a> {
    pub(super) fn of(lists: impl IntoIterator<Item = &'a [Point]>) -> FlatPoints<'a> {
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

pub(super) fn points_by_row(first: usize) -> String {
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
/// and was even planned as a sequential scan; `tests/it/ingest_time.rs` checks the buffers read.)
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

/// For each window of a checkpoint: whether its key closed another window in the same checkpoint that one of them
/// may belong to (the merge-candidate test of [`MERGE_CANDIDATES_SQL`], widened to the window's whole extent, in
/// either order). Such keys take the one-by-one path, in order, so the later window sees the earlier one stored; a
/// key whose windows lie apart (sessions hours apart, as in a backfill) is inserted with the others.
pub(super) fn near_each_other(cfg: &TrackerConfig, windows: &[Closed]) -> Vec<bool> {
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
