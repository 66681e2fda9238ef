//! Ingest's operator state and its checkpoints (the Flink / Arroyo shape): a pure core, no IO, no clock.
//!
//! [`State`] wraps the [`Tracker`] with what the tracker does not keep: the point ids of every open message (a window's
//! coverage when it closes), the keys changed since the last checkpoint, the closed windows not yet stored, the
//! source positions and the tombstones of forgotten users. The shell feeds it batches in memory and, every second or
//! `CHECKPOINT_MESSAGES` messages, takes a [`Checkpoint`]: one snapshot per key changed since the last (its open
//! messages, or its removal), the windows closed since, the watermarks moved and the source positions. The shell writes
//! it in one transaction and only then acknowledges what it read. Restart (or any failed checkpoint) = a new `State`
//! from the stored snapshots ([`State::restore`]) and the source rewound to the stored position.
//!
//! De-duplication: a message already open for its key is a duplicate here (the tracker's hash); a message re-read
//! after its window closed (the sweep's overlap, a replay) comes out as a late window and is compared with the stored
//! window's coverage when the sink merges it (`sink::ingest`), so it never bumps a window whose points it already has.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::{Position, SourceCheckpoint};
use crate::tracker::{ClosedWindow, Millis, Observed, Tracker, TrackerConfig};

mod clamped;
pub use clamped::{CAPACITY as CLAMPED_CAPACITY, ClampedMemory, MEMORY_MS as CLAMPED_MEMORY_MS};

/// A closed point that was stamped ahead of the clock when read, far enough that a read at its stamp would not be
/// related to its window by time ([`clamped::escapes_time_probe`]): stored (`recap_clamped_points`) so a restarted
/// state (a takeover, a replay) still knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClampedPoint {
    pub bot: Arc<str>,
    pub user: Arc<str>,
    pub id: String,
    /// The point's stored time (its stamp), not its arrival.
    pub stored: Millis,
}

/// A (bot, user) key.
pub type Key = (Arc<str>, Arc<str>);

/// A forgotten user's tombstone (`recap_forgotten`, see `recall::forget`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub bot: String,
    /// `model::user_key(bot, user)`: never the id itself.
    pub user_key: String,
    /// When the forget committed (Postgres' clock): used only by tombstones without `points`.
    pub at: Millis,
    /// Every point of the user the forget listed (the bot's collections then, and recap's rows): exactly these are
    /// not new, whatever their time. `None`: a tombstone written before migration 0017 (the old time rule).
    pub points: Option<Vec<String>>,
}

/// An open message: stored time and point id.
pub type Point = (Millis, String);

/// A closed window with the points it covers (time order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub window: ClosedWindow,
    pub points: Vec<Point>,
    /// Some point was stamped ahead of the clock when read (its time here is its arrival, which a later read of the
    /// same point would not repeat): the sink checks these points against every stored window of the key.
    pub clamped: bool,
}

/// One key's open messages as stored in a snapshot row (`points` empty: the key has no open message any more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub bot: Arc<str>,
    pub user: Arc<str>,
    pub points: Vec<Point>,
}

/// What one checkpoint stores, in one transaction.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Changed keys: their open messages now (upsert), or none (delete).
    pub snapshots: Vec<Snapshot>,
    /// Windows closed since the last checkpoint, in closing order.
    pub closed: Vec<Closed>,
    pub watermarks: Vec<(Arc<str>, Millis)>,
    /// Source positions (one per name: the latest, with the points read since the last checkpoint), by name.
    pub positions: Vec<SourceCheckpoint>,
    /// Messages applied since the last checkpoint.
    pub messages: usize,
    /// Closed points stamped far ahead of the clock (see [`ClampedPoint`]).
    pub clamped: Vec<ClampedPoint>,
}

impl Checkpoint {
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
            && self.closed.is_empty()
            && self.watermarks.is_empty()
            && self.positions.is_empty()
            && self.clamped.is_empty()
    }
}

type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug)]
struct KeyBuf {
    bot: Arc<str>,
    user: Arc<str>,
    /// Sorted by (time, point id); the same message set as the tracker's key.
    points: Vec<Point>,
    /// Points stamped ahead of the clock when read: point id -> stored time (usually empty).
    clamped: HashMap<String, Millis>,
    /// A snapshot row exists for this key (so closing its last window must delete it).
    stored: bool,
    /// Changed since the last checkpoint (and listed in `State::dirty`).
    dirty: bool,
}

/// A bot's open keys, by user (looked up by `&str`: no allocation per message).
#[derive(Debug)]
struct BotKeys {
    name: Arc<str>,
    users: Fast<Arc<str>, KeyBuf>,
}

/// Ingest's in-memory state (see the module docs).
#[derive(Debug)]
pub struct State {
    tracker: Tracker,
    open: Fast<Arc<str>, BotKeys>,
    open_keys: usize,
    /// Keys flagged dirty since the last checkpoint (an entry whose key closed meanwhile is skipped).
    dirty: Vec<Key>,
    /// Keys with a snapshot row whose last open message closed: their rows are deleted by the next checkpoint.
    deleted: HashSet<Key, foldhash::fast::RandomState>,
    closed: Vec<Closed>,
    positions: HashMap<String, (Position, i64)>,
    /// Forgotten users' points by bot (see [`Tombstone`]): one lookup per message of a bot with a tombstone, none
    /// for the others.
    forgotten_points: HashMap<String, HashSet<String>>,
    /// Tombstones written before migration 0017: (bot, user key) -> forgotten at; messages stored up to then are not
    /// new.
    forgotten: HashMap<(String, String), Millis>,
    forgotten_bots: HashSet<String>,
    /// Points stamped ahead of the clock whose window closed (by bot and point id). Read again (the sweep re-reads
    /// them while its overlap covers their stored time; hybrid mode's sweep after their events; a replay), before or
    /// after the clock passed their stamp, they would open a new window: they are duplicates until a day past their
    /// stored time (`state/clamped.rs`).
    closed_clamped: ClampedMemory,
    /// Closed clamped points for the next checkpoint to store.
    clamped_rows: Vec<ClampedPoint>,
    messages: usize,
}

impl State {
    pub fn new(cfg: TrackerConfig) -> State {
        State {
            tracker: Tracker::new(cfg),
            open: HashMap::default(),
            open_keys: 0,
            dirty: Vec::new(),
            deleted: HashSet::default(),
            closed: Vec::new(),
            positions: HashMap::new(),
            forgotten_points: HashMap::new(),
            forgotten: HashMap::new(),
            forgotten_bots: HashSet::new(),
            closed_clamped: ClampedMemory::new(),
            clamped_rows: Vec::new(),
            messages: 0,
        }
    }

    /// The state a checkpoint left: watermarks, then each stored key's open messages. Nothing is dirty afterwards.
    pub fn restore(
        cfg: TrackerConfig,
        watermarks: impl IntoIterator<Item = (String, Millis)>,
        snapshots: impl IntoIterator<Item = Snapshot>,
    ) -> State {
        State::restore_forgetting(cfg, watermarks, snapshots, [])
    }

    /// [`State::restore`] with the tombstones applied first: a snapshot row holding points of a forgotten user
    /// (written before the forget) restores without them, so the user never comes back from a snapshot.
    pub fn restore_forgetting(
        cfg: TrackerConfig,
        watermarks: impl IntoIterator<Item = (String, Millis)>,
        snapshots: impl IntoIterator<Item = Snapshot>,
        tombstones: impl IntoIterator<Item = Tombstone>,
    ) -> State {
        let mut s = State::new(cfg);
        s.set_forgotten(tombstones);
        for (bot, wm) in watermarks {
            s.tracker.restore_watermark(&bot, wm);
        }
        for mut snap in snapshots {
            let mut dropped = false;
            if !s.forgotten_points.is_empty() || !s.forgotten_bots.is_empty() {
                let before = snap.points.len();
                snap.points
                    .retain(|(ts, id)| !s.is_forgotten(&snap.bot, &snap.user, id, *ts));
                dropped = snap.points.len() < before;
            }
            for (ts, id) in &snap.points {
                s.tracker.observe(&snap.bot, &snap.user, id, *ts);
            }
            let mut points = snap.points;
            points.sort();
            if points.is_empty() && dropped {
                // the row held only forgotten points: the next checkpoint deletes it
                s.deleted.insert((snap.bot.clone(), snap.user.clone()));
            }
            if !points.is_empty() {
                // a row that held forgotten points is written again (without them) by the next checkpoint
                if dropped {
                    s.dirty.push((snap.bot.clone(), snap.user.clone()));
                }
                let b = s.open.entry(snap.bot.clone()).or_insert_with(|| BotKeys {
                    name: snap.bot.clone(),
                    users: HashMap::default(),
                });
                if b.users
                    .insert(
                        snap.user.clone(),
                        KeyBuf {
                            bot: b.name.clone(),
                            user: snap.user,
                            points,
                            clamped: HashMap::new(),
                            stored: true,
                            dirty: dropped,
                        },
                    )
                    .is_none()
                {
                    s.open_keys += 1;
                }
            }
        }
        // Anything closable was closed by the checkpoint that stored these rows; a restore closes nothing itself.
        let _ = s.tracker.take_watermark_changes();
        s
    }

    /// Points stamped ahead of the clock, as stored (`recap_clamped_points`). One still open is its key's again (its
    /// window's close remembers it and asks the sink for the key-wide check); the others are closed ones, duplicates
    /// whenever read again.
    pub fn remember_clamped(&mut self, rows: impl IntoIterator<Item = ClampedPoint>) {
        let rows: Vec<ClampedPoint> = rows.into_iter().collect();
        if rows.is_empty() {
            // the common restore: no index of the open points to build
            return;
        }
        let mut open: HashMap<(Arc<str>, String), Arc<str>> = HashMap::new();
        for b in self.open.values() {
            for buf in b.users.values() {
                for (_, id) in &buf.points {
                    open.insert((b.name.clone(), id.clone()), buf.user.clone());
                }
            }
        }
        for c in rows {
            let buf = open
                .remove(&(c.bot.clone(), c.id.clone()))
                .and_then(|user| {
                    self.open
                        .get_mut(&*c.bot)
                        .and_then(|b| b.users.get_mut(&*user))
                });
            match buf {
                Some(buf) => {
                    buf.clamped.insert(c.id, c.stored);
                }
                None => self.closed_clamped.remember(&c.bot, &c.id, c.stored),
            }
        }
    }

    /// Remembered closed clamped points, and the entries touched so far looking them up (cost accounting).
    pub fn clamped_memory(&self) -> (usize, u64) {
        (self.closed_clamped.len(), self.closed_clamped.work())
    }

    /// Users forgotten through recall (see [`Tombstone`]).
    pub fn set_forgotten(&mut self, rows: impl IntoIterator<Item = Tombstone>) {
        for t in rows {
            match t.points {
                Some(points) => self
                    .forgotten_points
                    .entry(t.bot)
                    .or_default()
                    .extend(points),
                None => {
                    self.forgotten_bots.insert(t.bot.clone());
                    self.forgotten.insert((t.bot, t.user_key), t.at);
                }
            }
        }
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn config(&self) -> &TrackerConfig {
        self.tracker.config()
    }

    /// Keys with open messages.
    pub fn open_keys(&self) -> usize {
        self.open_keys
    }

    /// Messages applied since the last checkpoint.
    pub fn pending_messages(&self) -> usize {
        self.messages
    }

    /// Something to store: a changed key, a closed window, a moved watermark or a source position.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
            || !self.deleted.is_empty()
            || !self.closed.is_empty()
            || !self.positions.is_empty()
    }

    /// A message of a forgotten user from before the forget: its point was listed by the forget (migration 0017);
    /// for a tombstone written before that, stored at or before the forget (migration 0009).
    fn is_forgotten(&self, bot: &str, user: &str, point_id: &str, ts: Millis) -> bool {
        if self
            .forgotten_points
            .get(bot)
            .is_some_and(|ids| ids.contains(point_id))
        {
            return true;
        }
        if !self.forgotten_bots.contains(bot) {
            return false;
        }
        self.forgotten
            .get(&(bot.to_string(), crate::model::user_key(bot, user)))
            .is_some_and(|at| ts <= *at)
    }

    /// Feeds one message read at wall-clock time `now`. A message stamped ahead of the clock (a host whose clock is
    /// fast) is tracked at its arrival time (`tracker::effective_time`), so it moves no watermark past the clock.
    /// `None` when the message belongs to a forgotten user.
    pub fn observe(
        &mut self,
        bot: &str,
        user: &str,
        point_id: &str,
        ts: Millis,
        now: Millis,
    ) -> Option<Observed> {
        self.observe_from(bot, user, point_id, ts, now, true)
    }

    /// [`observe`](Self::observe); `event_time` false (a sweep page): the message moves no watermark
    /// ([`Tracker::observe_at`]).
    pub fn observe_from(
        &mut self,
        bot: &str,
        user: &str,
        point_id: &str,
        ts: Millis,
        now: Millis,
        event_time: bool,
    ) -> Option<Observed> {
        if self.is_forgotten(bot, user, point_id, ts) {
            return None;
        }
        let clamped = ts > now;
        // Whatever the clock says now: a closed point read at arrival once is a duplicate at its stamp too.
        if !self.closed_clamped.is_empty() {
            self.closed_clamped.expire(now);
            if self.closed_clamped.contains(bot, point_id) {
                return Some(Observed::Duplicate);
            }
        }
        let eff = crate::tracker::effective_time(ts, now);
        let o = self
            .tracker
            .observe_at(bot, user, point_id, eff, event_time);
        if let Observed::Accepted { .. } = o {
            self.messages += 1;
            let b = match self.open.get_mut(bot) {
                Some(b) => b,
                None => {
                    let name: Arc<str> = Arc::from(bot);
                    self.open.entry(name.clone()).or_insert(BotKeys {
                        name,
                        users: HashMap::default(),
                    })
                }
            };
            let buf = match b.users.get_mut(user) {
                Some(buf) => buf,
                None => {
                    let user: Arc<str> = Arc::from(user);
                    // A key whose row waits to be deleted is stored still: the next snapshot overwrites the row.
                    let stored = self.deleted.remove(&(b.name.clone(), user.clone()));
                    self.open_keys += 1;
                    b.users.entry(user.clone()).or_insert(KeyBuf {
                        bot: b.name.clone(),
                        user,
                        points: Vec::new(),
                        clamped: HashMap::new(),
                        stored,
                        dirty: false,
                    })
                }
            };
            let p = (eff, point_id.to_string());
            let at = buf.points.partition_point(|q| *q < p);
            buf.points.insert(at, p);
            if clamped {
                buf.clamped.insert(point_id.to_string(), ts);
                // Stored with the next checkpoint already while its window is open (not only at its close): a leader
                // that restores the key (a takeover, a failed checkpoint, a forget's epoch bump) must still know the
                // point was stamped ahead of the clock when it closes the window (nemesis finding 1).
                if clamped::escapes_time_probe(self.tracker.config(), eff, ts) {
                    self.clamped_rows.push(ClampedPoint {
                        bot: buf.bot.clone(),
                        user: buf.user.clone(),
                        id: point_id.to_string(),
                        stored: ts,
                    });
                }
            }
            if !buf.dirty {
                buf.dirty = true;
                self.dirty.push((buf.bot.clone(), buf.user.clone()));
            }
        }
        Some(o)
    }

    /// The source is caught up at `now` (see [`Tracker::tick`]).
    pub fn tick(&mut self, now: Millis) {
        self.tracker.tick(now);
    }

    /// [`tick`](Self::tick) for every bot but those `held` says (a sweep that skipped one of their collections).
    pub fn tick_except(&mut self, now: Millis, held: impl Fn(&str) -> bool) {
        self.tracker.tick_except(now, held);
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        self.tracker.poll_timeout()
    }

    /// Records a source position to store with the next checkpoint (the latest wins; points read add up).
    pub fn set_position(&mut self, c: &SourceCheckpoint) {
        let e = self
            .positions
            .entry(c.name.clone())
            .or_insert((c.position, 0));
        e.0 = e.0.later(c.position);
        e.1 += c.points_read;
    }

    /// Closes every window the watermarks allow, taking their points out of the open state. Returns how many.
    pub fn close_due(&mut self) -> usize {
        let mode = self.tracker.config().mode;
        let mut n = 0;
        while let Some(w) = self.tracker.poll_close() {
            n += 1;
            let (lo, hi) = w.message_range(mode);
            let Some(b) = self.open.get_mut(&*w.bot) else {
                debug_assert!(false, "a closed window's bot has no open points");
                continue;
            };
            let Some(buf) = b.users.get_mut(&*w.user) else {
                debug_assert!(false, "a closed window's key has no open points");
                continue;
            };
            // The tracker closes the first window of a key: a prefix of its time-ordered messages.
            let end = buf.points.partition_point(|(t, _)| *t <= hi);
            let points: Vec<Point> = buf.points.drain(..end).collect();
            debug_assert!(points.iter().all(|(t, _)| *t >= lo));
            debug_assert_eq!(points.len(), w.count as usize);
            let mut clamped = false;
            if !buf.clamped.is_empty() {
                let cfg = self.tracker.config();
                for (eff, id) in &points {
                    if let Some(stored) = buf.clamped.remove(id) {
                        clamped = true;
                        self.closed_clamped.remember(&w.bot, id, stored);
                        if clamped::escapes_time_probe(cfg, *eff, stored) {
                            self.clamped_rows.push(ClampedPoint {
                                bot: w.bot.clone(),
                                user: w.user.clone(),
                                id: id.clone(),
                                stored,
                            });
                        }
                    }
                }
            }
            if buf.points.is_empty() {
                if buf.stored {
                    self.deleted.insert((w.bot.clone(), w.user.clone()));
                }
                b.users.remove(&*w.user);
                self.open_keys -= 1;
                if b.users.is_empty() {
                    self.open.remove(&*w.bot);
                }
            } else if !buf.dirty {
                buf.dirty = true;
                self.dirty.push((w.bot.clone(), w.user.clone()));
            }
            self.closed.push(Closed {
                window: w,
                points,
                clamped,
            });
        }
        n
    }

    /// Everything changed since the last checkpoint; afterwards the state counts as stored (if the transaction fails,
    /// the shell restores a new state from the store instead).
    pub fn take_checkpoint(&mut self) -> Checkpoint {
        let mut snapshots = Vec::with_capacity(self.dirty.len() + self.deleted.len());
        for (bot, user) in self.deleted.drain() {
            snapshots.push(Snapshot {
                bot,
                user,
                points: Vec::new(),
            });
        }
        for (bot, user) in std::mem::take(&mut self.dirty) {
            let Some(buf) = self
                .open
                .get_mut(&*bot)
                .and_then(|b| b.users.get_mut(&*user))
            else {
                continue; // closed since: deleted above if it had a row, else never stored
            };
            if buf.dirty {
                buf.dirty = false;
                buf.stored = true;
                snapshots.push(Snapshot {
                    bot,
                    user,
                    points: buf.points.clone(),
                });
            }
        }
        let mut positions: Vec<SourceCheckpoint> = self
            .positions
            .drain()
            .map(|(name, (position, points_read))| SourceCheckpoint {
                name,
                position,
                points_read,
            })
            .collect();
        positions.sort_by(|a, b| a.name.cmp(&b.name));
        // a point read and closed between two checkpoints is listed twice (when read, when closed): stored once
        let mut clamped = std::mem::take(&mut self.clamped_rows);
        clamped.sort_by(|a, b| (&a.bot, &a.id, b.stored).cmp(&(&b.bot, &b.id, a.stored)));
        clamped.dedup_by(|a, b| a.bot == b.bot && a.id == b.id);
        Checkpoint {
            snapshots,
            closed: std::mem::take(&mut self.closed),
            watermarks: self.tracker.take_watermark_changes(),
            positions,
            messages: std::mem::take(&mut self.messages),
            clamped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Millis = 60_000;

    fn cfg() -> TrackerConfig {
        TrackerConfig {
            idle_gap_ms: 10 * MIN,
            max_span_ms: 120 * MIN,
            lateness_ms: MIN,
            ..TrackerConfig::default()
        }
    }

    /// The stored side of checkpoints: snapshot rows by key, closed windows, watermarks.
    #[derive(Default)]
    struct Stored {
        rows: HashMap<Key, Vec<Point>>,
        windows: Vec<Closed>,
        watermarks: HashMap<String, Millis>,
    }

    impl Stored {
        fn apply(&mut self, c: Checkpoint) {
            for s in c.snapshots {
                if s.points.is_empty() {
                    self.rows.remove(&(s.bot, s.user));
                } else {
                    self.rows.insert((s.bot, s.user), s.points);
                }
            }
            self.windows.extend(c.closed);
            for (b, w) in c.watermarks {
                let e = self.watermarks.entry(b.to_string()).or_insert(w);
                *e = (*e).max(w);
            }
        }

        fn restore(&self) -> State {
            State::restore(
                cfg(),
                self.watermarks.iter().map(|(b, w)| (b.clone(), *w)),
                self.rows.iter().map(|((b, u), p)| Snapshot {
                    bot: b.clone(),
                    user: u.clone(),
                    points: p.clone(),
                }),
            )
        }
    }

    fn feed(s: &mut State, msgs: &[(u8, u8, u16)]) {
        for (u, id, t) in msgs {
            let ts = i64::from(*t) * MIN / 4;
            s.observe("bot", &format!("u{u}"), &format!("p{id}"), ts, ts);
            s.close_due();
        }
    }

    fn windows_of(ws: &[Closed]) -> Vec<(String, Vec<Point>)> {
        let mut v: Vec<(String, Vec<Point>)> = ws
            .iter()
            .map(|c| (c.window.user.to_string(), c.points.clone()))
            .collect();
        v.sort();
        v
    }

    proptest! {
        /// Checkpointing at any points and restarting from the stored state at any checkpoint closes exactly the
        /// windows (with exactly the points) of a run that never stopped: nothing lost, nothing twice.
        #[test]
        fn a_restart_from_any_checkpoint_closes_the_same_windows(
            msgs in proptest::collection::vec((0u8..4, 0u8..40, 0u16..600), 1..80),
            cuts in proptest::collection::vec(0usize..80, 0..6),
            crash_at in 0usize..80,
        ) {
            let mut sorted = msgs.clone();
            sorted.sort_by_key(|m| m.2);
            // Reference: one state, never stopped.
            let mut reference = State::new(cfg());
            feed(&mut reference, &sorted);
            reference.tick(i64::from(u16::MAX) * MIN);
            reference.close_due();
            let want = windows_of(&reference.take_checkpoint().closed);

            // Checkpointed run: checkpoints after the messages in `cuts`; a crash after message `crash_at` loses
            // everything since the last checkpoint, and the source rewinds to it.
            let mut stored = Stored::default();
            let mut s = State::new(cfg());
            let mut position = 0usize; // messages covered by the stored state
            let mut i = 0usize;
            let mut crashed = false;
            while i < sorted.len() {
                feed(&mut s, &sorted[i..=i]);
                i += 1;
                if cuts.contains(&i) {
                    stored.apply(s.take_checkpoint());
                    position = i;
                }
                if !crashed && i == crash_at.min(sorted.len()) {
                    crashed = true;
                    s = stored.restore();
                    i = position;
                }
            }
            s.tick(i64::from(u16::MAX) * MIN);
            s.close_due();
            stored.apply(s.take_checkpoint());
            prop_assert_eq!(windows_of(&stored.windows), want);
            prop_assert!(stored.rows.is_empty(), "no snapshot left for closed keys");
        }
    }

    #[test]
    fn only_changed_keys_are_snapshotted_and_a_key_that_opened_and_closed_between_checkpoints_writes_no_row()
     {
        let mut s = State::new(cfg());
        s.observe("b", "a", "1", 0, 0);
        s.observe("b", "z", "2", 0, 0);
        let c = s.take_checkpoint();
        assert_eq!(c.snapshots.len(), 2);
        assert_eq!(c.messages, 2);
        s.observe("b", "a", "3", MIN, MIN);
        let c = s.take_checkpoint();
        assert_eq!(c.snapshots.len(), 1, "only the changed key");
        assert_eq!(c.snapshots[0].points.len(), 2);
        // A key opened and closed within one checkpoint interval: its window, no snapshot row.
        s.observe("b", "short", "9", 2 * MIN, 2 * MIN);
        s.tick(100 * MIN);
        assert_eq!(s.close_due(), 3);
        let c = s.take_checkpoint();
        assert_eq!(c.closed.len(), 3);
        let users: Vec<&str> = c.snapshots.iter().map(|x| &*x.user).collect();
        assert!(!users.contains(&"short"), "{users:?}");
        assert!(
            c.snapshots.iter().all(|x| x.points.is_empty()),
            "stored keys deleted"
        );
        assert_eq!(c.snapshots.len(), 2);
    }

    #[test]
    fn a_point_stamped_ahead_of_the_clock_read_again_after_its_window_closed_is_a_duplicate() {
        let mut s = State::new(cfg());
        let fast = 20 * MIN; // the host's clock is 20 minutes ahead
        for (i, t) in [0, MIN, 2 * MIN].iter().enumerate() {
            s.observe("b", "f", &format!("p{i}"), t + fast, *t);
        }
        s.tick(15 * MIN);
        assert_eq!(s.close_due(), 1);
        let c = s.take_checkpoint();
        assert!(
            c.closed[0].clamped,
            "the window is marked for the key-wide coverage check"
        );
        assert_eq!(c.closed[0].points.len(), 3);
        // the sweep reads the points again: their arrival time would be now, in no stored window's range
        for i in 0..3 {
            assert_eq!(
                s.observe("b", "f", &format!("p{i}"), i as i64 * MIN + fast, 16 * MIN),
                Some(Observed::Duplicate)
            );
        }
        assert_eq!(s.open_keys(), 0, "nothing reopened");
        // a day past their stored time they are forgotten (a read then would be a dead letter by MAX_FUTURE_MS)
        assert!(matches!(
            s.observe("b", "f", "p0", 30 * 3_600_000, 26 * 3_600_000),
            Some(Observed::Accepted { .. })
        ));
    }

    /// The sink's coverage rule, modelled: a closed window's point is not new when a stored window of its key has it
    /// and either lies within the idle gap of the closing window (the merge-candidate probe) or the closing window is
    /// marked `clamped` (the key-wide check). Returns each point id's count of stored windows holding it.
    fn sink_model(cfg: &TrackerConfig, closed: &[Closed]) -> HashMap<String, usize> {
        let mut stored: Vec<(Key, Millis, Millis, Vec<String>)> = Vec::new();
        let mut count: HashMap<String, usize> = HashMap::new();
        for c in closed {
            let key = (c.window.bot.clone(), c.window.user.clone());
            let (lo, hi) = c.window.message_range(cfg.mode);
            let gap = match cfg.mode {
                crate::tracker::Mode::Session => cfg.idle_gap_ms,
                crate::tracker::Mode::Tumbling => 0,
            };
            let fresh: Vec<String> = c
                .points
                .iter()
                .map(|(_, id)| id.clone())
                .filter(|id| {
                    !stored.iter().any(|(k, s, e, ids)| {
                        *k == key
                            && (c.clamped || (*e >= lo - gap && *s <= hi + gap))
                            && ids.contains(id)
                    })
                })
                .collect();
            for id in &fresh {
                *count.entry(id.clone()).or_default() += 1;
            }
            if !fresh.is_empty() {
                let ts: Vec<Millis> = c.points.iter().map(|p| p.0).collect();
                stored.push((key, ts[0], ts[ts.len() - 1], fresh));
            }
        }
        count
    }

    /// Reads `(wall time, user, point id, stamp)` in wall-clock order, ticking the clock as a caught-up event source
    /// does, and closes everything at the end.
    fn run_reads(s: &mut State, reads: &mut [(Millis, u8, u16, Millis)]) -> Vec<Closed> {
        reads.sort();
        let mut closed = Vec::new();
        for (now, u, id, ts) in reads.iter() {
            s.tick(*now);
            s.close_due();
            s.observe("bot", &format!("u{u}"), &format!("p{id}"), *ts, *now);
            s.close_due();
            closed.extend(s.take_checkpoint().closed);
        }
        s.tick(Millis::MAX / 4);
        s.close_due();
        closed.extend(s.take_checkpoint().closed);
        closed
    }

    proptest! {
        /// Hosts whose clocks run ahead (by ms, by 90 s, by 20 min), every message read twice (its event at arrival,
        /// then the sweep or a replay any time later, before or after the clock passed its stamp): every point ends
        /// in exactly one stored window, in session and tumbling mode (issue 24, case 1).
        #[test]
        fn a_fast_hosts_message_read_again_at_any_time_is_in_one_window(
            msgs in proptest::collection::vec(
                (0u8..3, 0u16..600, prop_oneof![Just(0i64), Just(3), Just(90_000), Just(20 * MIN)], 0i64..40 * MIN),
                1..40,
            ),
            tumbling in any::<bool>(),
        ) {
            let cfg = TrackerConfig {
                idle_gap_ms: MIN,
                max_span_ms: 10 * MIN,
                lateness_ms: 1000,
                mode: if tumbling { crate::tracker::Mode::Tumbling } else { crate::tracker::Mode::Session },
            };
            let mut reads = Vec::new();
            let mut seen = HashSet::new();
            for (i, (u, t, skew, again)) in msgs.iter().enumerate() {
                let wall = i64::from(*t) * 1000;
                let id = i as u16;
                // a point id belongs to one user
                if !seen.insert(id) { continue; }
                reads.push((wall, *u, id, wall + skew));
                reads.push((wall + again, *u, id, wall + skew));
            }
            let mut s = State::new(cfg);
            let closed = run_reads(&mut s, &mut reads);
            let count = sink_model(&cfg, &closed);
            prop_assert_eq!(count.len(), seen.len(), "every point stored");
            prop_assert!(count.values().all(|n| *n == 1), "a point in two windows: {:?}", count);
        }
    }

    #[test]
    fn a_host_90_s_fast_read_again_once_the_clock_passed_its_stamps_opens_no_second_window() {
        let cfg = TrackerConfig {
            idle_gap_ms: MIN,
            max_span_ms: 120 * MIN,
            lateness_ms: 1000,
            ..TrackerConfig::default()
        };
        let fast = 90_000;
        let mut s = State::new(cfg);
        let mut reads: Vec<(Millis, u8, u16, Millis)> = (0..6)
            .flat_map(|i| {
                let wall = i64::from(i) * 1000;
                // the event at arrival, then the sweep 100 s later: past the stamps
                [
                    (wall, 0, i, wall + fast),
                    (wall + 100_000, 0, i, wall + fast),
                ]
            })
            .collect();
        let closed = run_reads(&mut s, &mut reads);
        assert_eq!(closed.len(), 1, "one window: {closed:?}");
        assert_eq!(closed[0].points.len(), 6);
        // far enough from their arrival that the sink's time probe would not relate them: stored for a restart
        let (n, _) = s.clamped_memory();
        assert_eq!(n, 6);
    }

    #[test]
    fn a_restored_state_knows_the_stored_clamped_points_as_duplicates() {
        let cfg = TrackerConfig {
            idle_gap_ms: MIN,
            lateness_ms: 1000,
            ..TrackerConfig::default()
        };
        let mut s = State::new(cfg);
        for i in 0..3 {
            s.observe("b", "f", &format!("p{i}"), i * 1000 + 90_000, i * 1000);
        }
        s.tick(5 * MIN);
        assert_eq!(s.close_due(), 1);
        let c = s.take_checkpoint();
        assert_eq!(c.clamped.len(), 3, "stored with the checkpoint");
        assert_eq!(c.clamped[0].stored, 90_000);
        // a takeover (or `recap replay`) restores them, then reads the points at their stamps
        let mut r = State::restore(cfg, [("b".to_string(), 5 * MIN)], []);
        r.remember_clamped(c.clamped.iter().cloned());
        for i in 0..3 {
            assert_eq!(
                r.observe("b", "f", &format!("p{i}"), i * 1000 + 90_000, 6 * MIN),
                Some(Observed::Duplicate)
            );
        }
        assert_eq!(r.open_keys(), 0);
        // a host a few ms fast: remembered in memory, not stored (the sink's time probe finds its re-reads)
        let mut s = State::new(cfg);
        s.observe("b", "g", "q", 10_003, 10_000);
        s.tick(5 * MIN);
        s.close_due();
        assert!(s.take_checkpoint().clamped.is_empty());
        assert_eq!(s.clamped_memory().0, 1);
    }

    /// Issue 24, case 15: with 10x more remembered clamped points, reading a clamped message costs the same number
    /// of entries touched (it used to scan them all).
    #[test]
    fn the_cost_of_a_clamped_message_stays_flat_as_remembered_points_grow() {
        let cfg = TrackerConfig {
            idle_gap_ms: MIN,
            lateness_ms: 1000,
            ..TrackerConfig::default()
        };
        let per_message = |remembered: usize| {
            let mut s = State::new(cfg);
            // a host 5 ms fast: every message clamped; one message per user, each window closed
            for i in 0..remembered {
                let t = i as i64;
                s.observe("b", &format!("u{i}"), &format!("p{i}"), t + 5, t);
            }
            s.tick(remembered as i64 + 10 * MIN);
            s.close_due();
            let _ = s.take_checkpoint();
            assert_eq!(s.clamped_memory().0, remembered);
            let before = s.clamped_memory().1;
            let now = remembered as i64 + 10 * MIN;
            for i in 0..1000 {
                let t = now + i;
                s.observe("b", &format!("v{i}"), &format!("n{i}"), t + 5, t);
            }
            (s.clamped_memory().1 - before) as f64 / 1000.0
        };
        let small = per_message(2_000);
        let large = per_message(20_000);
        assert!(
            large <= small * 1.5 + 1.0,
            "work per clamped message grew with the remembered points: {small} -> {large}"
        );
    }

    #[test]
    fn a_duplicate_is_not_counted_and_a_forgotten_users_old_message_is_skipped() {
        let mut s = State::new(cfg());
        assert!(matches!(
            s.observe("b", "u", "1", 0, 0),
            Some(Observed::Accepted { .. })
        ));
        assert_eq!(s.observe("b", "u", "1", 0, 0), Some(Observed::Duplicate));
        s.set_forgotten([Tombstone {
            bot: "b".to_string(),
            user_key: crate::model::user_key("b", "gone"),
            at: 5 * MIN,
            points: None,
        }]);
        assert_eq!(s.observe("b", "gone", "2", 5 * MIN, 5 * MIN), None);
        assert!(
            s.observe("b", "gone", "3", 5 * MIN + 1, 5 * MIN + 1)
                .is_some(),
            "later messages start fresh"
        );
        assert_eq!(s.take_checkpoint().messages, 2);
    }

    /// The rule of migration 0017: exactly the points the forget listed are not new, whatever their time (a bot host
    /// whose clock is fast or slow changes nothing), and a snapshot restored from before the forget drops them.
    #[test]
    fn a_forgotten_users_listed_points_are_skipped_whatever_their_time() {
        let tomb = || Tombstone {
            bot: "b".to_string(),
            user_key: crate::model::user_key("b", "gone"),
            at: 5 * MIN,
            points: Some(vec!["old1".into(), "old2".into()]),
        };
        let mut s = State::new(cfg());
        s.set_forgotten([tomb()]);
        // listed points: skipped even when stamped long after the forget (a fast host)
        assert_eq!(s.observe("b", "gone", "old1", 50 * MIN, 50 * MIN), None);
        // a point not listed: new, even when stamped before the forget (a slow host)
        assert!(matches!(
            s.observe("b", "gone", "new1", MIN, 50 * MIN),
            Some(Observed::Accepted { .. })
        ));
        // another bot's point of the same id is not theirs
        assert!(s.observe("c", "gone", "old2", MIN, 50 * MIN).is_some());
        // a snapshot row written before the forget restores without the listed points
        let snap = Snapshot {
            bot: "b".into(),
            user: "gone".into(),
            points: vec![
                (MIN, "old1".into()),
                (2 * MIN, "old2".into()),
                (3 * MIN, "new2".into()),
            ],
        };
        let mut r = State::restore_forgetting(cfg(), [], [snap.clone()], [tomb()]);
        assert_eq!(r.tracker().open_messages(), 1);
        assert_eq!(r.open_keys(), 1);
        // and the next checkpoint writes the row again without them
        let c = r.take_checkpoint();
        assert_eq!(c.snapshots.len(), 1);
        assert_eq!(c.snapshots[0].points, vec![(3 * MIN, "new2".to_string())]);
        let only_old = Snapshot {
            points: snap.points[..2].to_vec(),
            ..snap
        };
        let mut r = State::restore_forgetting(cfg(), [], [only_old], [tomb()]);
        assert_eq!(
            r.open_keys(),
            0,
            "the forgotten user came back from a snapshot"
        );
        // a row of forgotten points only is deleted by the next checkpoint
        let c = r.take_checkpoint();
        assert_eq!(c.snapshots.len(), 1);
        assert!(c.snapshots[0].points.is_empty());
        // a restore without their points in it has nothing to store
        let mut r = State::restore_forgetting(cfg(), [], [], [tomb()]);
        assert!(r.take_checkpoint().is_empty());
    }
}
