//! Tracker benchmark (issue 9, part 1): events per second through the pure window tracker on one core, and bytes per
//! open window with 1,000,000 open windows, measured with a counting global allocator (live requested bytes).
//!
//! `cargo bench --bench tracker`. Environment:
//! * `BENCH_RUNS` (default 3): runs of the throughput measurement; min/median/max are printed. The memory figures are
//!   deterministic and measured once (`BENCH_MEMORY_RUNS` for more).
//! * `BENCH_TRACKER_EVENTS` (default 2,000,000): events of the throughput stream.
//! * `BENCH_OPEN_WINDOWS` (default 1,000,000): open windows of the memory measurement.
//! * `BENCH_TRACKER_PART` = `throughput` | `memory`: run one part only (for profiling with callgrind).
//!
//! The memory part ends with "where the bytes go": the tracker's structures (key map, key slab, deadline heaps,
//! interned users, message vectors) rebuilt with types of the same sizes, their bytes per window and their sum.
//!
//! Machine-readable results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`, one per run.
#![allow(clippy::type_complexity)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::time::Instant;

use recap::tracker::{Millis, Tracker, TrackerConfig};

mod common;
use common::{BOTS, Columns, MIN, Rng, emit, env_usize, summary};

// ---------------------------------------------------------------------------------------------------------------
// Counting allocator: live requested bytes and allocation count, only while `COUNTING` is on (off during the
// throughput runs so the atomics do not bias them).

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
            ALLOCS.fetch_sub(1, Ordering::Relaxed);
        }
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live bytes and allocations made by `f`'s result (everything `f` allocated and did not free).
fn measure_live<T>(f: impl FnOnce() -> T) -> (T, isize, usize) {
    let (b0, a0) = (LIVE.load(Ordering::SeqCst), ALLOCS.load(Ordering::SeqCst));
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (
        out,
        LIVE.load(Ordering::SeqCst) - b0,
        ALLOCS.load(Ordering::SeqCst).wrapping_sub(a0),
    )
}

const SUMMARY: Columns = Columns {
    label: 34,
    value: 14,
    decimals: 1,
};

const T0: Millis = 1_763_596_800_000; // 2025-11-20T00:00:00Z

/// A discord-like 18-digit user id.
fn user_id(i: u64) -> String {
    format!(
        "{}",
        734_829_104_857_362_431u64.wrapping_add(i.wrapping_mul(7_919_000_013))
            % 900_000_000_000_000_000
            + 100_000_000_000_000_000
    )
}

/// One event of the stream: indices into the bot and user tables, the point id and the message time.
struct Ev {
    bot: u8,
    user: u32,
    point: String,
    ts: Millis,
}

/// A realistic event stream: 10,000 users (each talking to one or two of 8 bots) in sessions of 2 to 40 messages a
/// few seconds to 5 minutes apart, sessions hours apart; events arrive in time order with up to 60 s of jitter
/// (inside the 120 s allowed lateness, so nothing is late), bots every few hundred events.
fn stream(n: usize, users: usize, seed: u64) -> (Vec<String>, Vec<Ev>) {
    let mut rng = Rng(seed | 1);
    let user_ids: Vec<String> = (0..users as u64).map(user_id).collect();
    let per_user = n / users;
    let mut evs: Vec<(Millis, Ev)> = Vec::with_capacity(n + 64);
    for u in 0..users {
        let bot_a = rng.below(BOTS.len() as u64) as u8;
        let bot_b = rng.below(BOTS.len() as u64) as u8;
        let mut t = T0 + rng.below(12 * 60) as Millis * MIN;
        let mut left = per_user + usize::from(u < n % users);
        while left > 0 {
            let len = (2 + rng.below(39) as usize).min(left);
            let bot = if rng.below(4) == 0 { bot_b } else { bot_a };
            for _ in 0..len {
                t += 5_000 + rng.below(5 * MIN as u64) as Millis;
                let arrival = t + rng.below(60_000) as Millis;
                evs.push((
                    arrival,
                    Ev {
                        bot,
                        user: u as u32,
                        point: rng.uuid(),
                        ts: t,
                    },
                ));
            }
            left -= len;
            // the next session starts 1 to 12 hours later
            t += (60 + rng.below(11 * 60) as Millis) * MIN;
        }
    }
    evs.sort_by_key(|(arrival, _)| *arrival);
    (user_ids, evs.into_iter().map(|(_, e)| e).collect())
}

/// Feeds the stream in batches of 500 (as `Ingest::apply` does: observe each, then drain what closed), then closes
/// everything. Returns (closed windows, messages in them). Not inlined: `scripts/bench` profiles exactly this function
/// (`valgrind --tool=callgrind --toggle-collect='*run_stream*'`).
#[inline(never)]
fn run_stream(users: &[String], evs: &[Ev]) -> (usize, u64) {
    let mut t = Tracker::new(TrackerConfig::default());
    let (mut windows, mut msgs) = (0usize, 0u64);
    for chunk in evs.chunks(500) {
        for e in chunk {
            black_box(t.observe(
                BOTS[e.bot as usize],
                &users[e.user as usize],
                &e.point,
                e.ts,
            ));
        }
        for w in t.drain_closed() {
            windows += 1;
            msgs += u64::from(w.count);
        }
    }
    t.tick(Millis::MAX / 2);
    for w in t.drain_closed() {
        windows += 1;
        msgs += u64::from(w.count);
    }
    (windows, msgs)
}

fn throughput(runs: usize) {
    let n = env_usize("BENCH_TRACKER_EVENTS", 2_000_000);
    let users = env_usize("BENCH_TRACKER_USERS", 10_000);
    let t0 = Instant::now();
    let (user_ids, evs) = stream(n, users, 0x5eed);
    eprintln!(
        "tracker: {} events, {} users, {} bots generated in {:.1}s",
        evs.len(),
        users,
        BOTS.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut rates = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        let (windows, msgs) = run_stream(&user_ids, &evs);
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(
            msgs as usize,
            evs.len(),
            "every message closes exactly once"
        );
        let rate = evs.len() as f64 / secs;
        eprintln!(
            "  run {run}: {:.3}s, {windows} windows closed ({:.1} messages each), {:.0} events/s",
            secs,
            msgs as f64 / windows as f64,
            rate
        );
        emit("tracker_events_per_sec", rate, "events/s");
        rates.push(rate);
    }
    summary(&SUMMARY, "tracker events/s (one core)", "events/s", rates);
}

/// `windows` open windows (20 bots x windows/20 users), each of `per_window` messages a minute apart, all inside
/// the idle gap so nothing closes. Returns the tracker (to be measured while alive).
fn open_windows(windows: usize, per_window: usize) -> Tracker {
    let mut t = Tracker::new(TrackerConfig::default());
    let bots: Vec<String> = (0..20).map(|i| format!("bot{i:02}")).collect();
    let mut rng = Rng(0xfeed);
    let mut pid = String::with_capacity(36);
    for m in 0..per_window {
        for w in 0..windows {
            let user = user_id(w as u64 / 20);
            pid.clear();
            pid.push_str(&rng.uuid());
            t.observe(
                &bots[w % 20],
                &user,
                &pid,
                T0 + m as Millis * MIN + (w % 997) as Millis,
            );
        }
    }
    assert!(t.drain_closed().is_empty(), "nothing closes");
    assert_eq!(t.open_keys(), windows);
    t
}

/// The same shapes the tracker keeps per open window, rebuilt here with types of the same sizes to attribute the bytes
/// (a memory profile) for the layout of `open_windows` (20 bots, windows/20 users): the key map's table, the key slab,
/// the per-bot deadline heaps, the interned users (shared by a user's keys) and the message vectors.
fn attribute(windows: usize) {
    type Fast = foldhash::fast::RandomState;
    let n = windows as f64;
    let users = windows.div_ceil(20);
    // key map: (bot, user) -> slab slot, as `HashMap<KeyId(u32, u32), u32>` (12 B entries)
    let (m, table, _) = measure_live(|| {
        let mut m: HashMap<(u32, u32), u32, Fast> = HashMap::default();
        for w in 0..windows {
            m.insert(((w % 20) as u32, (w / 20) as u32), w as u32);
        }
        m
    });
    drop(m);
    // slab: `KeyState { open: Vec<(Millis, u64)>, first_len: u32, heap_pos: u32 }` (32 B), grown by doubling
    let (v, slab, _) = measure_live(|| {
        let mut v: Vec<(Vec<(Millis, u64)>, u32, u32)> = Vec::new();
        for _ in 0..windows {
            v.push((Vec::new(), 0, 0));
        }
        v
    });
    drop(v);
    // deadline heaps: one `Vec<HeapEntry { deadline: Millis, user: u32, slot: u32 }>` (16 B) per bot
    let (h, heaps, _) = measure_live(|| {
        let mut h: Vec<Vec<(Millis, u32, u32)>> = (0..20).map(|_| Vec::new()).collect();
        for w in 0..windows {
            h[w % 20].push((T0, w as u32, w as u32));
        }
        h
    });
    drop(h);
    // interned users: the `Arc<str>` (16 B counts + 18 B), its index entry and its slot
    let (u, interned, _) = measure_live(|| {
        let mut index: HashMap<Arc<str>, u32, Fast> = HashMap::default();
        let mut slots: Vec<(Option<Arc<str>>, u32)> = Vec::new();
        for i in 0..users {
            let name: Arc<str> = Arc::from(user_id(i as u64).as_str());
            index.insert(name.clone(), i as u32);
            slots.push((Some(name), 20));
        }
        (index, slots)
    });
    drop(u);
    let fixed = (table + slab + heaps + interned) as f64 / n;
    let row = |what: &str, bytes: f64, note: &str| {
        println!(
            "{}",
            format!("    {what:<46} {bytes:>6.1} B  {note}").trim_end()
        )
    };
    println!(
        "  where the bytes of an open window go (same shapes rebuilt with {windows} keys, {users} users):"
    );
    row(
        "HashMap<KeyId(u32, u32), u32> key map table",
        table as f64 / n,
        "(12 B entry + 1 B control, load <= 7/8, power-of-two buckets)",
    );
    row(
        "Vec<KeyState> slab",
        slab as f64 / n,
        "(32 B: message Vec, first-window length, heap position)",
    );
    row(
        "per-bot Vec<HeapEntry> deadline heaps",
        heaps as f64 / n,
        "(16 B: close time, user, slot)",
    );
    row(
        "interned users (Arc<str>, index entry, slot)",
        interned as f64 / n,
        "(one per user, shared by its 20 keys here)",
    );
    for (msgs, cap) in [(1usize, 1usize), (5, 5)] {
        let bytes = (cap * std::mem::size_of::<(Millis, u64)>()) as f64;
        row(
            &format!("Vec<(Millis, u64)> of {msgs} message(s)"),
            bytes,
            &format!("(capacity {cap}: grown by one up to 8, then by half)"),
        );
        row(
            &format!("sum for {msgs}-message windows"),
            fixed + bytes,
            "",
        );
    }
}

/// The allocator count is deterministic (same data, same allocation sizes), so one run per shape unless
/// `BENCH_MEMORY_RUNS` asks for more.
fn memory() {
    let runs = env_usize("BENCH_MEMORY_RUNS", 1).max(1);
    let windows = env_usize("BENCH_OPEN_WINDOWS", 1_000_000);
    for per_window in [1usize, 5] {
        let mut per = Vec::new();
        for run in 0..runs {
            let (t, bytes, allocs) = measure_live(|| open_windows(windows, per_window));
            let b = bytes as f64 / windows as f64;
            eprintln!(
                "  run {run}: {windows} open windows x {per_window} messages: {:.1} MiB live, {allocs} allocations, {b:.1} B/window",
                bytes as f64 / 1048576.0
            );
            emit(
                &format!("tracker_bytes_per_open_window_{per_window}msg"),
                b,
                "B",
            );
            per.push(b);
            drop(t);
        }
        summary(
            &SUMMARY,
            &format!("bytes/open window ({per_window} msg)"),
            "B",
            per,
        );
    }
    attribute(windows);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let only = std::env::var("BENCH_TRACKER_PART").unwrap_or_default();
    println!("tracker benchmark ({runs} runs)");
    if only.is_empty() || only == "throughput" {
        throughput(runs);
    }
    if only.is_empty() || only == "memory" {
        memory();
    }
}
