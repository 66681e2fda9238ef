//! Window tracker: a pure state machine from messages and clock ticks to closed windows.
//!
//! No tokio, no network, no database and no clock in here: every input carries its own time, and the shell
//! (`pipeline`) asks [`Tracker::poll_timeout`] when to call [`Tracker::tick`] next, like quinn-proto's connection.
//!
//! * Time is event time. Each bot has a watermark: the largest message time seen minus the allowed lateness, and —
//!   only when the shell says the source is caught up — the wall clock minus the allowed lateness. It never goes back.
//!   The shell feeds message times through [`effective_time`] (never later than the wall clock at arrival), so no
//!   watermark passes the wall clock: a host whose clock is fast cannot close other users' windows early.
//! * A (bot, user) key holds its open messages sorted by time (timestamp + a hash of the point id: no text).
//!   The windows of a key are a function of its message set alone ([`canonical_windows`]); a window closes when the
//!   bot's watermark reaches its close time, so any arrival order within the lateness bound closes the same windows.
//! * Session mode: a window grows while the next message is less than `idle_gap` after the last one and less than
//!   `max_span` after the first; it closes at `min(last + idle_gap, first + max_span)`. Tumbling mode: windows are
//!   the `max_span`-aligned UTC buckets; a bucket closes at its end.
//! * A message older than its window's close time (late) still enters the key; its window closes at the next poll.
//!   The shell merges such a window into the one already stored, if any (see `sink::close_window`).
//!
//! Representation (sized for a million open windows; `benches/tracker.rs` measures it):
//! * Bot names and user ids are interned: a bot is a `u32` index (bots are never forgotten), a user a `u32` index
//!   into a table of `Arc<str>` with a count of the user's open keys; the entry is freed (and its index reused) when
//!   the user's last open key closes, so the table is bounded by the users with open windows.
//! * A key is `(bot, user)` as two `u32`s, mapped (foldhash, randomly seeded) to a slot in a slab of [`KeyState`]s
//!   (freed slots are reused). A key state is its sorted messages (`(time, point-id hash)`, 16 B each; the vector
//!   grows by one up to 8 and by half after that, not by doubling) and the number of them in its first window, which
//!   lets `observe` skip or resume the first-window scan instead of redoing it: a message after the first window's
//!   breaking message cannot change the first window, and the scan state after an unchanged prefix is as before.
//! * Each bot has an indexed binary min-heap of its keys' first-window close times ordered by (close time, user id
//!   string) — the order the windows are drained in — and each key state knows its heap position, so a changed
//!   close time is a sift, not a remove + insert.

mod heap;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use heap::{heap_pop, heap_update, sift_up};

/// Milliseconds since the Unix epoch, UTC ([`crate::model::Millis`]).
pub use crate::model::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Session,
    Tumbling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    pub mode: Mode,
    pub idle_gap_ms: Millis,
    pub max_span_ms: Millis,
    pub lateness_ms: Millis,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            mode: Mode::Session,
            idle_gap_ms: 30 * 60_000,
            max_span_ms: 24 * 3_600_000,
            lateness_ms: 120_000,
        }
    }
}

/// What became of one observed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// New for this key; `late` when the message was already behind its bot's watermark.
    Accepted { late: bool },
    /// The same point id is already open for this key (by a 64-bit hash of it: see [`Tracker::observe`]).
    Duplicate,
}

/// A window the tracker has closed. Its messages are the key's open messages with `start_ms <= ts <= end_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClosedWindow {
    pub bot: Arc<str>,
    pub user: Arc<str>,
    /// First message time (session) or bucket start (tumbling).
    pub start_ms: Millis,
    /// Last message time (session) or bucket end (tumbling, exclusive).
    pub end_ms: Millis,
    /// Distinct messages in the window.
    pub count: u32,
}

impl ClosedWindow {
    /// The inclusive time range of the window's messages.
    pub fn message_range(&self, mode: Mode) -> (Millis, Millis) {
        match mode {
            Mode::Session => (self.start_ms, self.end_ms),
            Mode::Tumbling => (self.start_ms, self.end_ms - 1),
        }
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One open message: its time and a 64-bit hash of its point id (for de-duplication; the tracker's `id_hasher`).
type Open = (Millis, u64);

/// A (bot, user) key by interned indices; hashed as one `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyId {
    bot: u32,
    user: u32,
}

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64((u64::from(self.bot) << 32) | u64::from(self.user));
    }
}

/// The open messages of one key (a slab slot; a free slot has no messages).
#[derive(Debug, Default)]
struct KeyState {
    /// Sorted by (time, id hash), no two equal id hashes.
    open: Vec<Open>,
    /// Messages in the first window of `open` (0 in a free slot).
    first_len: u32,
    /// Index of this key's entry in its bot's deadline heap.
    heap_pos: u32,
}

/// An interned user id and how many open keys use it.
#[derive(Debug)]
struct UserSlot {
    /// `None` in a free slot.
    name: Option<Arc<str>>,
    keys: u32,
}

/// A key's first-window close time in its bot's heap.
#[derive(Debug, Clone, Copy)]
struct HeapEntry {
    deadline: Millis,
    user: u32,
    slot: u32,
}

#[derive(Debug)]
struct BotState {
    name: Arc<str>,
    watermark: Millis,
    watermark_changed: bool,
    /// Min-heap by (close time, user id string) of every key of this bot with open messages.
    deadlines: Vec<HeapEntry>,
}

/// The window tracker. See the module docs.
#[derive(Debug)]
pub struct Tracker {
    cfg: TrackerConfig,
    bots: Vec<BotState>,
    bot_index: FastMap<Arc<str>, u32>,
    users: Vec<UserSlot>,
    user_index: FastMap<Arc<str>, u32>,
    free_users: Vec<u32>,
    keys: FastMap<KeyId, u32>,
    slots: Vec<KeyState>,
    free_slots: Vec<u32>,
    /// Hashes point ids for de-duplication (seeded per tracker; the state is rebuilt on start, nothing persists it).
    id_hasher: foldhash::fast::RandomState,
}

/// FNV-1a: a stable 64-bit hash of a point id (stable across runs and Rust versions, unlike `DefaultHasher`).
pub fn point_hash(point_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in point_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The windows of one key's message times, oldest first: `(start, end, count, close_at)`.
/// This is the definition the tracker implements incrementally; tests compare against it.
pub fn canonical_windows(
    cfg: &TrackerConfig,
    sorted_times: &[Millis],
) -> Vec<(Millis, Millis, u32, Millis)> {
    let mut out = Vec::new();
    let mut rest = sorted_times;
    while !rest.is_empty() {
        let (n, start, end, close) = first_window(cfg, rest.iter().copied());
        out.push((start, end, n as u32, close));
        rest = &rest[n..];
    }
    out
}

/// The first window of a non-empty sorted sequence: (messages in it, start, end, close time).
fn first_window(
    cfg: &TrackerConfig,
    mut times: impl Iterator<Item = Millis>,
) -> (usize, Millis, Millis, Millis) {
    let first = times.next().expect("non-empty");
    extend_window(cfg, first, first, 1, times)
}

/// [`first_window`] resumed: `n` messages from `first` to `last` are known to be in the first window and `rest` are
/// the messages after them. The scan is a left fold whose state after a prefix depends on that prefix alone.
fn extend_window(
    cfg: &TrackerConfig,
    first: Millis,
    mut last: Millis,
    mut n: usize,
    rest: impl Iterator<Item = Millis>,
) -> (usize, Millis, Millis, Millis) {
    match cfg.mode {
        Mode::Session => {
            for t in rest {
                if t - last < cfg.idle_gap_ms && t - first < cfg.max_span_ms {
                    last = t;
                    n += 1;
                } else {
                    break;
                }
            }
            (
                n,
                first,
                last,
                (last + cfg.idle_gap_ms).min(first + cfg.max_span_ms),
            )
        }
        Mode::Tumbling => {
            let start = first.div_euclid(cfg.max_span_ms) * cfg.max_span_ms;
            let end = start + cfg.max_span_ms;
            n += rest.take_while(|t| *t < end).count();
            (n, start, end, end)
        }
    }
}

/// Which stored window (index into `existing`, oldest first) a newly closed window `new = (start, end)` of the same
/// key belongs to. Only a window closed late (its messages arrived after the watermark passed them) can belong to a
/// stored one: canonical windows are separated by at least the idle gap or start a full span apart, so for on-time
/// windows this returns `None`.
pub fn merge_target(
    cfg: &TrackerConfig,
    existing: impl IntoIterator<Item = (Millis, Millis)>,
    new: (Millis, Millis),
) -> Option<usize> {
    existing.into_iter().position(|(s, e)| match cfg.mode {
        Mode::Session => {
            (new.0 - s).abs() < cfg.max_span_ms
                && new.0 < e.saturating_add(cfg.idle_gap_ms)
                && s < new.1.saturating_add(cfg.idle_gap_ms)
        }
        Mode::Tumbling => s == new.0,
    })
}

/// Every stored window (indices into `existing`, oldest first) a newly closed window `new` of the same key belongs
/// to: [`merge_target`]'s rule applied to each, with `new` grown by every window it takes in. More than one when a
/// late message bridges stored windows (within the idle gap of both): by the window definition they are one window.
pub fn merge_targets(
    cfg: &TrackerConfig,
    existing: &[(Millis, Millis)],
    new: (Millis, Millis),
) -> Vec<usize> {
    let mut merged = new;
    let mut out: Vec<usize> = Vec::new();
    loop {
        let next = existing.iter().enumerate().position(|(i, w)| {
            !out.contains(&i) && merge_target(cfg, std::iter::once(*w), merged).is_some()
        });
        let Some(i) = next else { break };
        merged = (merged.0.min(existing[i].0), merged.1.max(existing[i].1));
        out.push(i);
    }
    out.sort_unstable();
    out
}

/// The time the tracker uses for a message stamped `ts` that arrives when the wall clock reads `now`: its own time,
/// but never later than `now`. A host whose clock runs ahead would otherwise drag its bot's watermark ahead of the
/// wall clock (closing every other user's open window at once and making their next messages late); clamped, its
/// messages are windowed by their arrival, and the bot's event-time watermark stays at most `now - lateness`, the
/// bound the wall clock gives. Pure: the shell passes `now` in and stores the clamped time (so a rebuild from the
/// store sees the same times).
pub fn effective_time(ts: Millis, now: Millis) -> Millis {
    ts.min(now)
}

/// The next capacity of a full message vector: one more up to 8 (most windows are short, and a reallocation that
/// small is cheap), then half again (8, 12, 18, 27, ...), where doubling would waste up to half the vector.
fn grown(cap: usize) -> usize {
    if cap < 8 { cap + 1 } else { cap + cap / 2 }
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker {
            cfg,
            bots: Vec::new(),
            bot_index: FastMap::default(),
            users: Vec::new(),
            user_index: FastMap::default(),
            free_users: Vec::new(),
            keys: FastMap::default(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            id_hasher: foldhash::fast::RandomState::default(),
        }
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.cfg
    }

    fn bot_id(&mut self, bot: &str) -> u32 {
        if let Some(id) = self.bot_index.get(bot) {
            return *id;
        }
        let name: Arc<str> = Arc::from(bot);
        let id = self.bots.len() as u32;
        self.bots.push(BotState {
            name: name.clone(),
            watermark: Millis::MIN,
            watermark_changed: false,
            deadlines: Vec::new(),
        });
        self.bot_index.insert(name, id);
        id
    }

    /// The interned index of `user` (which has no open key yet for the caller's bot), counting one more key for it.
    fn user_for_new_key(&mut self, user: &str, known: Option<u32>) -> u32 {
        let id = match known {
            Some(id) => id,
            None => {
                let name: Arc<str> = Arc::from(user);
                let slot = UserSlot {
                    name: Some(name.clone()),
                    keys: 0,
                };
                let id = match self.free_users.pop() {
                    Some(id) => {
                        self.users[id as usize] = slot;
                        id
                    }
                    None => {
                        self.users.push(slot);
                        (self.users.len() - 1) as u32
                    }
                };
                self.user_index.insert(name, id);
                id
            }
        };
        self.users[id as usize].keys += 1;
        id
    }

    /// Restores a bot's watermark (on start, from the store). Never moves it back.
    pub fn restore_watermark(&mut self, bot: &str, watermark: Millis) {
        let id = self.bot_id(bot);
        let b = &mut self.bots[id as usize];
        b.watermark = b.watermark.max(watermark);
    }

    /// The bot's watermark, if the bot has been seen.
    pub fn watermark(&self, bot: &str) -> Option<Millis> {
        self.bot_index
            .get(bot)
            .map(|id| self.bots[*id as usize].watermark)
            .filter(|w| *w != Millis::MIN)
    }

    /// Watermarks that moved since the last call (to persist them in the same transaction as the windows).
    pub fn take_watermark_changes(&mut self) -> Vec<(Arc<str>, Millis)> {
        let mut out = Vec::new();
        for b in &mut self.bots {
            if std::mem::take(&mut b.watermark_changed) {
                out.push((b.name.clone(), b.watermark));
            }
        }
        out
    }

    /// Number of (bot, user) keys with open messages (each holds at least one open window).
    pub fn open_keys(&self) -> usize {
        self.keys.len()
    }

    /// Number of open messages across all keys.
    pub fn open_messages(&self) -> usize {
        self.slots.iter().map(|k| k.open.len()).sum()
    }

    /// Feeds one message. Advances the bot's watermark to `ts - lateness`.
    ///
    /// A message whose point id hashes (64 bits, foldhash seeded per tracker) like an open message of the same key is
    /// a duplicate, whatever its time. Distinct ids of one key collide with probability about 2^-64 per pair, and
    /// not reproducibly (the seed differs per process), where the 64-bit FNV-1a [`point_hash`] used before collided
    /// for fixed pairs; it is still not cryptographic, and the store de-duplicates by point id before the tracker.
    pub fn observe(&mut self, bot: &str, user: &str, point_id: &str, ts: Millis) -> Observed {
        self.observe_at(bot, user, point_id, ts, true)
    }

    /// [`observe`](Self::observe), moving the bot's watermark by the message's time only with `advance`. A sweep page's
    /// messages advance nothing (issue 24, case 2): unordered paging, the first cycle and a bot's other collections
    /// may still hold older points of the bot; the completed cycle's horizon ticks instead.
    pub fn observe_at(
        &mut self,
        bot: &str,
        user: &str,
        point_id: &str,
        ts: Millis,
        advance: bool,
    ) -> Observed {
        let bot_id = self.bot_id(bot);
        let hash = {
            let mut h = self.id_hasher.build_hasher();
            h.write(point_id.as_bytes());
            h.finish()
        };
        let cfg = self.cfg;
        let known_user = self.user_index.get(user).copied();
        let existing = known_user.and_then(|u| {
            self.keys
                .get(&KeyId {
                    bot: bot_id,
                    user: u,
                })
                .map(|s| (u, *s))
        });
        let bot_state = &mut self.bots[bot_id as usize];
        let late = ts < bot_state.watermark;
        let advanced = ts.saturating_sub(cfg.lateness_ms);
        if let Some((_, slot)) = existing {
            let key = &mut self.slots[slot as usize];
            if key.open.iter().any(|(_, h)| *h == hash) {
                return Observed::Duplicate;
            }
            let pos = key.open.partition_point(|o| *o < (ts, hash));
            if key.open.len() == key.open.capacity() {
                key.open
                    .reserve_exact(grown(key.open.capacity()) - key.open.len());
            }
            key.open.insert(pos, (ts, hash));
            let n = key.first_len as usize;
            // A message after the first window's breaking message (index `n`) leaves the first window as it was.
            if pos <= n {
                let k = pos.max(1);
                let (n, _, _, close) = extend_window(
                    &cfg,
                    key.open[0].0,
                    key.open[k - 1].0,
                    k,
                    key.open[k..].iter().map(|o| o.0),
                );
                key.first_len = n as u32;
                let at = key.heap_pos as usize;
                heap_update(
                    &mut bot_state.deadlines,
                    &mut self.slots,
                    &self.users,
                    at,
                    close,
                );
            }
        } else {
            let user_id = self.user_for_new_key(user, known_user);
            let key = KeyState {
                open: vec![(ts, hash)],
                first_len: 1,
                heap_pos: 0,
            };
            let slot = match self.free_slots.pop() {
                Some(s) => {
                    self.slots[s as usize] = key;
                    s
                }
                None => {
                    self.slots.push(key);
                    (self.slots.len() - 1) as u32
                }
            };
            self.keys.insert(
                KeyId {
                    bot: bot_id,
                    user: user_id,
                },
                slot,
            );
            let (_, _, _, close) = extend_window(&cfg, ts, ts, 1, std::iter::empty());
            let heap = &mut self.bots[bot_id as usize].deadlines;
            heap.push(HeapEntry {
                deadline: close,
                user: user_id,
                slot,
            });
            let at = heap.len() - 1;
            sift_up(heap, &mut self.slots, &self.users, at);
        }
        let bot_state = &mut self.bots[bot_id as usize];
        if advance && advanced > bot_state.watermark {
            bot_state.watermark = advanced;
            bot_state.watermark_changed = true;
        }
        Observed::Accepted { late }
    }

    /// The source is caught up at wall-clock time `now`: every bot's watermark moves to at least `now - lateness`.
    pub fn tick(&mut self, now: Millis) {
        self.tick_except(now, |_| false);
    }

    /// [`tick`](Self::tick), leaving the bots `held` says where they are.
    pub fn tick_except(&mut self, now: Millis, held: impl Fn(&str) -> bool) {
        let wm = now.saturating_sub(self.cfg.lateness_ms);
        for b in &mut self.bots {
            if wm > b.watermark && !held(&b.name) {
                b.watermark = wm;
                b.watermark_changed = true;
            }
        }
    }

    /// The wall-clock time at which a [`tick`](Self::tick) would close the next window, if any is open.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.bots
            .iter()
            .filter_map(|b| b.deadlines.first())
            .map(|e| e.deadline.saturating_add(self.cfg.lateness_ms))
            .min()
    }

    /// Drains one window whose close time its bot's watermark has reached.
    pub fn poll_close(&mut self) -> Option<ClosedWindow> {
        let cfg = self.cfg;
        for (bot_id, b) in self.bots.iter_mut().enumerate() {
            let Some(&top) = b.deadlines.first() else {
                continue;
            };
            if top.deadline > b.watermark {
                continue;
            }
            let key = &mut self.slots[top.slot as usize];
            let n = key.first_len as usize;
            let (n_check, start, end, _) = first_window(&cfg, key.open[..n].iter().map(|o| o.0));
            debug_assert_eq!(n_check, n);
            key.open.drain(..n);
            let user_slot = &mut self.users[top.user as usize];
            let user;
            if key.open.is_empty() {
                *key = KeyState::default();
                self.free_slots.push(top.slot);
                heap_pop(&mut b.deadlines, &mut self.slots, &self.users);
                self.keys.remove(&KeyId {
                    bot: bot_id as u32,
                    user: top.user,
                });
                let user_slot = &mut self.users[top.user as usize];
                user_slot.keys -= 1;
                if user_slot.keys == 0 {
                    let name = user_slot.name.take().expect("a used user slot has a name");
                    self.user_index.remove(&*name);
                    self.free_users.push(top.user);
                    user = name;
                } else {
                    user = user_slot.name.clone().expect("a used user slot has a name");
                }
            } else {
                user = user_slot.name.clone().expect("a used user slot has a name");
                if key.open.capacity() > 2 * key.open.len() {
                    key.open.shrink_to(grown(key.open.len()));
                }
                let (n, _, _, close) = first_window(&cfg, key.open.iter().map(|o| o.0));
                key.first_len = n as u32;
                heap_update(&mut b.deadlines, &mut self.slots, &self.users, 0, close);
            }
            return Some(ClosedWindow {
                bot: b.name.clone(),
                user,
                start_ms: start,
                end_ms: end,
                count: n as u32,
            });
        }
        None
    }

    /// Drains every window that can close now.
    pub fn drain_closed(&mut self) -> Vec<ClosedWindow> {
        std::iter::from_fn(|| self.poll_close()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Millis = 60_000;
    const HOUR: Millis = 60 * MIN;
    const T0: Millis = 1_763_596_800_000; // 2025-11-20T00:00:00Z

    fn cfg() -> TrackerConfig {
        TrackerConfig::default()
    }

    #[test]
    fn a_session_closes_after_the_idle_gap_plus_lateness() {
        let mut t = Tracker::new(cfg());
        for i in 0..5 {
            assert_eq!(
                t.observe("elena", "u1", &format!("p{i}"), T0 + i * MIN),
                Observed::Accepted { late: false }
            );
        }
        assert!(t.poll_close().is_none());
        let due = t.poll_timeout().unwrap();
        assert_eq!(due, T0 + 4 * MIN + 30 * MIN + 2 * MIN);
        t.tick(due - 1);
        assert!(t.poll_close().is_none());
        t.tick(due);
        let w = t.poll_close().unwrap();
        assert_eq!((w.start_ms, w.end_ms, w.count), (T0, T0 + 4 * MIN, 5));
        assert_eq!((&*w.bot, &*w.user), ("elena", "u1"));
        assert_eq!(t.open_keys(), 0);
        assert!(t.poll_timeout().is_none());
    }

    #[test]
    fn event_time_closes_windows_without_ticks() {
        let mut t = Tracker::new(cfg());
        t.observe("b", "u", "a", T0);
        t.observe("b", "u", "b", T0 + MIN);
        // a message 40 minutes later: gap passed, but the watermark is 38 minutes on: not yet 31 + 2 minutes
        t.observe("b", "u", "c", T0 + 40 * MIN);
        let w = t.poll_close().expect("first session closed by event time");
        assert_eq!((w.start_ms, w.end_ms, w.count), (T0, T0 + MIN, 2));
        assert!(t.poll_close().is_none());
    }

    #[test]
    fn a_session_is_capped_at_the_max_span() {
        let mut t = Tracker::new(cfg());
        // one message every 10 minutes for 30 hours
        for i in 0..180 {
            t.observe("b", "u", &format!("p{i}"), T0 + i * 10 * MIN);
        }
        t.tick(T0 + 100 * HOUR);
        let ws = t.drain_closed();
        assert_eq!(ws.len(), 2);
        assert_eq!((ws[0].start_ms, ws[0].count), (T0, 144));
        assert_eq!(ws[0].end_ms, T0 + 143 * 10 * MIN);
        assert_eq!((ws[1].start_ms, ws[1].count), (T0 + 24 * HOUR, 36));
    }

    #[test]
    fn duplicates_are_counted_once() {
        let mut t = Tracker::new(cfg());
        assert_eq!(
            t.observe("b", "u", "p", T0),
            Observed::Accepted { late: false }
        );
        assert_eq!(t.observe("b", "u", "p", T0), Observed::Duplicate);
        t.tick(T0 + 10 * HOUR);
        assert_eq!(t.drain_closed()[0].count, 1);
    }

    #[test]
    fn late_messages_are_flagged_and_close_at_once() {
        let mut t = Tracker::new(cfg());
        t.observe("b", "u", "a", T0 + 5 * HOUR);
        let obs = t.observe("b", "u2", "late", T0);
        assert_eq!(obs, Observed::Accepted { late: true });
        let w = t.poll_close().unwrap();
        assert_eq!((&*w.user, w.start_ms, w.count), ("u2", T0, 1));
    }

    #[test]
    fn tumbling_windows_align_to_utc_buckets() {
        let c = TrackerConfig {
            mode: Mode::Tumbling,
            ..cfg()
        };
        let mut t = Tracker::new(c);
        t.observe("b", "u", "a", T0 + HOUR);
        t.observe("b", "u", "b", T0 + 23 * HOUR);
        t.observe("b", "u", "c", T0 + 25 * HOUR);
        t.tick(T0 + 24 * HOUR + 2 * MIN);
        let ws = t.drain_closed();
        assert_eq!(ws.len(), 1);
        assert_eq!(
            (ws[0].start_ms, ws[0].end_ms, ws[0].count),
            (T0, T0 + 24 * HOUR, 2)
        );
        assert_eq!(
            ws[0].message_range(Mode::Tumbling),
            (T0, T0 + 24 * HOUR - 1)
        );
    }

    #[test]
    fn watermarks_are_per_bot_and_monotonic() {
        let mut t = Tracker::new(cfg());
        t.observe("a", "u", "1", T0 + 10 * HOUR);
        t.observe("b", "u", "2", T0);
        assert_eq!(t.watermark("a"), Some(T0 + 10 * HOUR - 2 * MIN));
        assert_eq!(t.watermark("b"), Some(T0 - 2 * MIN));
        t.restore_watermark("a", T0);
        assert_eq!(t.watermark("a"), Some(T0 + 10 * HOUR - 2 * MIN));
        let changes = t.take_watermark_changes();
        assert_eq!(changes.len(), 2);
        assert!(t.take_watermark_changes().is_empty());
    }

    #[test]
    fn merge_target_finds_the_window_a_late_message_belongs_to() {
        let c = cfg();
        let stored = [(T0, T0 + HOUR), (T0 + 5 * HOUR, T0 + 6 * HOUR)];
        // inside the first window, and within the idle gap after its end
        assert_eq!(
            merge_target(&c, stored, (T0 + 10 * MIN, T0 + 10 * MIN)),
            Some(0)
        );
        assert_eq!(
            merge_target(&c, stored, (T0 + HOUR + 29 * MIN, T0 + HOUR + 29 * MIN)),
            Some(0)
        );
        // between the two, further than the gap from both: its own window
        assert_eq!(
            merge_target(&c, stored, (T0 + 3 * HOUR, T0 + 3 * HOUR)),
            None
        );
        // a canonical neighbour split by the max span is not merged
        let long = [(T0, T0 + 24 * HOUR - MIN)];
        assert_eq!(
            merge_target(&c, long, (T0 + 24 * HOUR, T0 + 25 * HOUR)),
            None
        );
        let tum = TrackerConfig {
            mode: Mode::Tumbling,
            ..c
        };
        assert_eq!(
            merge_target(&tum, [(T0, T0 + 24 * HOUR)], (T0, T0 + 24 * HOUR)),
            Some(0)
        );
        assert_eq!(
            merge_target(
                &tum,
                [(T0, T0 + 24 * HOUR)],
                (T0 + 24 * HOUR, T0 + 48 * HOUR)
            ),
            None
        );
    }

    /// Windows closed by feeding `arrivals` in order, ticking the wall clock at the end.
    fn run(
        c: TrackerConfig,
        arrivals: &[(u8, Millis, u32)],
        ticks: &[(usize, Millis)],
    ) -> Vec<ClosedWindow> {
        let mut t = Tracker::new(c);
        let mut out = Vec::new();
        for (i, (user, ts, id)) in arrivals.iter().enumerate() {
            for (at, now) in ticks {
                if *at == i {
                    t.tick(*now);
                }
            }
            t.observe("bot", &format!("u{user}"), &format!("p{id}"), *ts);
            out.extend(t.drain_closed());
        }
        t.tick(Millis::MAX / 2);
        out.extend(t.drain_closed());
        out.sort();
        out
    }

    fn expected(c: TrackerConfig, events: &[(u8, Millis, u32)]) -> Vec<ClosedWindow> {
        let mut by_user: HashMap<u8, HashMap<u32, Millis>> = HashMap::new();
        for (u, ts, id) in events {
            by_user.entry(*u).or_default().insert(*id, *ts);
        }
        let mut out = Vec::new();
        for (u, ids) in by_user {
            let mut times: Vec<Millis> = ids.values().copied().collect();
            times.sort();
            for (s, e, n, _) in canonical_windows(&c, &times) {
                out.push(ClosedWindow {
                    bot: "bot".into(),
                    user: format!("u{u}").into(),
                    start_ms: s,
                    end_ms: e,
                    count: n,
                });
            }
        }
        out.sort();
        out
    }

    fn arb_config() -> impl Strategy<Value = TrackerConfig> {
        (
            prop_oneof![Just(Mode::Session), Just(Mode::Tumbling)],
            1..40i64,
            1..10i64,
            0..5i64,
        )
            .prop_map(|(mode, gap, span_h, late)| TrackerConfig {
                mode,
                idle_gap_ms: gap * MIN,
                max_span_ms: span_h * HOUR,
                lateness_ms: late * MIN,
            })
    }

    /// Events: (user, time, point id); ids are unique per event, so each id has one time.
    fn arb_events() -> impl Strategy<Value = Vec<(u8, Millis, u32)>> {
        prop::collection::vec((0u8..4, 0..(48 * 60i64)), 1..120).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (u, m))| (u, T0 + m * MIN + (i as i64 % 7) * 1000, i as u32))
                .collect()
        })
    }

    /// The tracker as it was first written (one sorted message vector per key, a `BTreeSet<(close time, user)>` per
    /// bot, the first window recomputed from scratch on every change): the reference the incremental representation
    /// must match operation by operation, including the order windows are drained in.
    #[derive(Default)]
    struct Model {
        bots: Vec<ModelBot>,
    }

    /// A bot of the [`Model`]: name, watermark and every user's sorted open (time, point id).
    type ModelBot = (
        String,
        Millis,
        std::collections::BTreeMap<String, Vec<(Millis, String)>>,
    );

    impl Model {
        fn bot(&mut self, bot: &str) -> usize {
            match self.bots.iter().position(|b| b.0 == bot) {
                Some(i) => i,
                None => {
                    self.bots
                        .push((bot.to_string(), Millis::MIN, Default::default()));
                    self.bots.len() - 1
                }
            }
        }

        fn observe(
            &mut self,
            bot: &str,
            user: &str,
            point_id: &str,
            ts: Millis,
            c: &TrackerConfig,
        ) -> Observed {
            let b = self.bot(bot);
            let (_, wm, keys) = &mut self.bots[b];
            let late = ts < *wm;
            let open = keys.entry(user.to_string()).or_default();
            if open.iter().any(|o| o.1 == point_id) {
                return Observed::Duplicate;
            }
            let pos = open.partition_point(|o| o.0 <= ts);
            open.insert(pos, (ts, point_id.to_string()));
            *wm = (*wm).max(ts.saturating_sub(c.lateness_ms));
            Observed::Accepted { late }
        }

        fn tick(&mut self, now: Millis, c: &TrackerConfig) {
            for b in &mut self.bots {
                b.1 = b.1.max(now.saturating_sub(c.lateness_ms));
            }
        }

        fn deadlines(&self, c: &TrackerConfig) -> Vec<Option<(Millis, String)>> {
            self.bots
                .iter()
                .map(|(_, _, keys)| {
                    keys.iter()
                        .map(|(u, open)| (first_window(c, open.iter().map(|o| o.0)).3, u.clone()))
                        .min()
                })
                .collect()
        }

        fn poll_timeout(&self, c: &TrackerConfig) -> Option<Millis> {
            self.deadlines(c)
                .into_iter()
                .flatten()
                .map(|(d, _)| d.saturating_add(c.lateness_ms))
                .min()
        }

        fn poll_close(&mut self, c: &TrackerConfig) -> Option<ClosedWindow> {
            for (i, d) in self.deadlines(c).into_iter().enumerate() {
                let Some((d, user)) = d else { continue };
                let (name, wm, keys) = &mut self.bots[i];
                if d > *wm {
                    continue;
                }
                let open = keys.get_mut(&user).unwrap();
                let (n, start, end, _) = first_window(c, open.iter().map(|o| o.0));
                open.drain(..n);
                if open.is_empty() {
                    keys.remove(&user);
                }
                return Some(ClosedWindow {
                    bot: name.as_str().into(),
                    user: user.into(),
                    start_ms: start,
                    end_ms: end,
                    count: n as u32,
                });
            }
            None
        }

        fn open_keys(&self) -> usize {
            self.bots.iter().map(|b| b.2.len()).sum()
        }

        fn open_messages(&self) -> usize {
            self.bots
                .iter()
                .flat_map(|b| b.2.values())
                .map(Vec::len)
                .sum()
        }
    }

    /// One step of a differential run: observe (bot, user, point id, minutes after T0), tick (minutes), drain.
    #[derive(Debug, Clone)]
    enum Op {
        Observe(u8, u8, u8, i64),
        Tick(i64),
        Drain,
    }

    fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            8 => (0u8..3, 0u8..6, 0u8..60, 0..(30 * 60i64)).prop_map(|(b, u, p, m)| Op::Observe(b, u, p, m)),
            1 => (0..(32 * 60i64)).prop_map(Op::Tick),
            2 => Just(Op::Drain),
        ];
        prop::collection::vec(op, 1..300)
    }

    proptest! {
        /// The clock-skew rule: messages observed at wall time `now` with [`effective_time`], whatever their stamps
        /// (hosts up to a day fast), never move a watermark past `now - lateness`; so a message stamped within the
        /// lateness of its arrival (an honest host) is never late, and no window closes before the wall clock (with
        /// the lateness) has passed its close time.
        #[test]
        fn a_fast_clock_never_moves_the_watermark_past_the_wall_clock(
            c in arb_config(),
            msgs in prop::collection::vec((0u8..4, 0u8..3, 0..(6 * 60i64), prop::bool::ANY, 0..(24 * 60i64), 0..1_000i64), 1..150),
        ) {
            let mut t = Tracker::new(c);
            let mut now = T0;
            for (i, (user, bot, step, fast, ahead, delay)) in msgs.iter().enumerate() {
                now += step * 1000;
                let bot = format!("b{bot}");
                // a fast host stamps up to a day ahead; an honest one stamps before arrival, within the lateness
                let ts = if *fast { now + ahead * MIN } else { now - delay % (c.lateness_ms + 1) };
                let obs = t.observe(&bot, &format!("u{user}"), &format!("p{i}"), effective_time(ts, now));
                if !*fast {
                    prop_assert_eq!(obs, Observed::Accepted { late: false }, "an honest message was late");
                }
                if *fast {
                    t.tick(now);
                }
                for b in 0..3 {
                    if let Some(wm) = t.watermark(&format!("b{b}")) {
                        prop_assert!(wm <= now - c.lateness_ms, "watermark {} past now - lateness {}", wm, now - c.lateness_ms);
                    }
                }
                for w in t.drain_closed() {
                    let close = match c.mode {
                        Mode::Session => (w.end_ms + c.idle_gap_ms).min(w.start_ms + c.max_span_ms),
                        Mode::Tumbling => w.end_ms,
                    };
                    prop_assert!(close + c.lateness_ms <= now, "window {:?} closed before the wall clock passed it", w);
                }
            }
        }

        /// [`merge_targets`]: the stored windows plus the new one, merged where it says, are the canonical windows of
        /// their messages (here each window is given by its first and last message time) when the new window is a
        /// single late message between or next to them.
        #[test]
        fn merge_targets_joins_what_a_bridging_message_joins(
            gaps in prop::collection::vec(1..90i64, 1..6),
            at in 0..600i64,
        ) {
            let c = TrackerConfig { mode: Mode::Session, idle_gap_ms: 30 * MIN, max_span_ms: 100 * HOUR, lateness_ms: 0 };
            // stored windows: two messages 1 min apart, consecutive windows separated by at least the idle gap
            let mut times = Vec::new();
            let mut t0 = T0;
            for g in &gaps {
                times.extend([t0, t0 + MIN]);
                t0 += MIN + 30 * MIN + g * MIN;
            }
            let stored: Vec<(Millis, Millis)> = canonical_windows(&c, &times).iter().map(|w| (w.0, w.1)).collect();
            let late = T0 + at * MIN + 17;
            let targets = merge_targets(&c, &stored, (late, late));
            let mut all = times.clone();
            all.push(late);
            all.sort();
            let want = canonical_windows(&c, &all).len();
            // windows after merging: the untouched stored ones plus one (the merged, or the new one alone)
            prop_assert_eq!(stored.len() - targets.len() + 1, want, "targets {:?} for {} among {:?}", targets, late, stored);
        }

        /// Any arrival order within the lateness bound, with duplicates and redeliveries, closes the canonical windows.
        #[test]
        fn order_and_duplication_within_lateness_do_not_change_windows(
            c in arb_config(),
            events in arb_events(),
            delays in prop::collection::vec(0..1_000_000i64, 240),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            // arrival time = event time + a delay below the lateness bound; duplicates arrive later, also in bound.
            let mut arrivals: Vec<(Millis, (u8, Millis, u32))> = events.iter().enumerate()
                .map(|(i, e)| (e.1 + delays[i % delays.len()] % (c.lateness_ms + 1), *e)).collect();
            for (j, d) in dups.iter().enumerate() {
                let e = events[d.index(events.len())];
                arrivals.push((e.1 + delays[(j * 7 + 3) % delays.len()] % (c.lateness_ms + 1), e));
            }
            arrivals.sort_by_key(|(at, e)| (*at, e.2));
            // Arrival order must respect the bound: an event arrives before the watermark passes it, i.e. before any
            // event more than `lateness` newer has arrived. Sorting by arrival time = ts + delay <= ts + lateness
            // guarantees that.
            let order: Vec<(u8, Millis, u32)> = arrivals.iter().map(|(_, e)| *e).collect();
            let got = run(c, &order, &[]);
            prop_assert_eq!(got, expected(c, &events));
        }

        /// Replaying the same events in time order without wall-clock ticks (a backfill) closes exactly the windows that
        /// live processing (ticks with the wall clock just after each event) closed.
        #[test]
        fn replay_equals_live(c in arb_config(), events in arb_events()) {
            let mut ordered = events.clone();
            ordered.sort_by_key(|e| (e.1, e.2));
            // live: the source is caught up after every event, at wall time = event time.
            let ticks: Vec<(usize, Millis)> = ordered.iter().enumerate().map(|(i, e)| (i + 1, e.1)).collect();
            let live = run(c, &ordered, &ticks);
            let replay = run(c, &ordered, &[]);
            prop_assert_eq!(&live, &replay);
            prop_assert_eq!(live, expected(c, &events));
        }

        /// Within the lateness bound the windows of a key never overlap; in any order at all (late events included)
        /// every distinct message is closed exactly once.
        #[test]
        fn windows_never_overlap_and_every_message_closes_once(c in arb_config(), events in arb_events(), seed in any::<u64>()) {
            let mut ordered = events.clone();
            ordered.sort_by_key(|e| (e.1, e.2));
            let in_bound = run(c, &ordered, &[]);
            let mut by_user: HashMap<Arc<str>, Vec<(Millis, Millis)>> = HashMap::new();
            for w in &in_bound {
                by_user.entry(w.user.clone()).or_default().push(w.message_range(c.mode));
            }
            for ranges in by_user.values_mut() {
                ranges.sort();
                for pair in ranges.windows(2) {
                    prop_assert!(pair[0].1 < pair[1].0, "overlap {:?}", pair);
                }
            }
            let mut shuffled = events.clone();
            shuffled.sort_by_key(|e| point_hash(&format!("{seed}-{}", e.2)));
            let any_order = run(c, &shuffled, &[]);
            let total: u32 = any_order.iter().map(|w| w.count).sum();
            prop_assert_eq!(total as usize, events.len());
        }

        /// Operation by operation, in any order (late messages, redeliveries of a point id at another time, ticks,
        /// users whose keys all close and come back), the tracker answers exactly as the reference model: the same
        /// `Observed`, the same windows drained in the same order, the same timeouts and counts.
        #[test]
        fn incremental_tracker_equals_the_reference_model(c in arb_config(), ops in arb_ops()) {
            let mut t = Tracker::new(c);
            let mut m = Model::default();
            for op in &ops {
                match *op {
                    Op::Observe(b, u, p, min) => {
                        let (bot, user, pid) = (format!("b{b}"), format!("u{u}"), format!("p{p}"));
                        let ts = T0 + min * MIN;
                        prop_assert_eq!(t.observe(&bot, &user, &pid, ts), m.observe(&bot, &user, &pid, ts, &c));
                    }
                    Op::Tick(min) => {
                        t.tick(T0 + min * MIN);
                        m.tick(T0 + min * MIN, &c);
                    }
                    Op::Drain => {
                        let want: Vec<ClosedWindow> = std::iter::from_fn(|| m.poll_close(&c)).collect();
                        prop_assert_eq!(t.drain_closed(), want);
                    }
                }
                prop_assert_eq!(t.poll_timeout(), m.poll_timeout(&c));
                prop_assert_eq!(t.open_keys(), m.open_keys());
                prop_assert_eq!(t.open_messages(), m.open_messages());
            }
            t.tick(Millis::MAX / 2);
            m.tick(Millis::MAX / 2, &c);
            let want: Vec<ClosedWindow> = std::iter::from_fn(|| m.poll_close(&c)).collect();
            prop_assert_eq!(t.drain_closed(), want);
            prop_assert_eq!(t.open_keys(), 0);
            // every interned user was freed with its last key
            prop_assert!(t.user_index.is_empty());
            prop_assert_eq!(t.free_users.len(), t.users.len());
            prop_assert_eq!(t.free_slots.len(), t.slots.len());
        }
    }
}
