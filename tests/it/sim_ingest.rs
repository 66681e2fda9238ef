//! A deterministic simulation of the ingest rules on a virtual clock: the pure tracker driven as the shell drives it
//! (`tracker::effective_time` at arrival, ticks only when a source is caught up, to its horizon), with seeded random
//! publish and delivery delays, Qdrant visibility lag, sweep cycles of random length, hosts whose clocks run 20 minutes
//! fast or a few ms off, users who pause just under the idle gap, and crashes (the tracker rebuilt from what was stored,
//! the batch in flight redelivered). 200 schedules per mode (events, sweep-only, hybrid) by default, a few seconds in a
//! debug build; `SIM_SCHEDULES=5000` for more (1000 x 3 modes take about a minute unoptimized). With the old rules
//! (message times not capped by the wall clock, or the sweep ticking to "now" between cycles) it fails on seed 0.
//!
//! It checks the invariants `tests/live_time.rs` checks on real services, over many more schedules: no honest message
//! is ever late (so no window is reopened or summarized twice), every message closes in exactly one window, honest
//! users' windows are exactly the canonical windows of their times, and no watermark passes `now - lateness`.
//! (It simulates the shell's rules, not its IO: the Postgres and Qdrant paths are what the other suites exercise.)

use std::collections::{HashMap, HashSet};

use crate::common::Rng;

use recap::tracker::{
    Millis, Mode, Observed, Tracker, TrackerConfig, canonical_windows, effective_time,
};

const GAP: Millis = 4_000;
const LATENESS: Millis = 1_000;
const STEP: Millis = 100;
const T0: Millis = 1_800_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum SourceMode {
    Events,
    SweepOnly,
    Hybrid,
}

#[derive(Clone, Debug)]
struct Msg {
    id: u32,
    user: u8,
    fast: bool,
    /// When the point became visible in Qdrant (real time).
    visible: Millis,
    /// The point's stored time (the host's clock).
    stored: Millis,
    /// The event's `ts` (publish time on the host's clock) and when it reaches recap (real time).
    event_ts: Millis,
    event_at: Millis,
}

/// One schedule: users writing at the wall clock, the chosen source, random crashes. Panics on a broken invariant.
fn simulate(seed: u64, mode: SourceMode) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cfg = TrackerConfig {
        mode: Mode::Session,
        idle_gap_ms: GAP,
        max_span_ms: 3_600_000,
        lateness_ms: LATENESS,
    };
    // --- the writers
    let users = rng.range(2, 6) as u8;
    let mut msgs = Vec::new();
    let mut id = 0u32;
    for u in 0..users {
        let fast = u == 0 && rng.chance(0.7);
        let skew = if fast { 20 * 60_000 } else { rng.range(-30, 1) };
        let mut t = T0 + rng.range(0, 3_000);
        for _ in 0..rng.range(3, 25) {
            let write = t;
            let visible = write + rng.range(0, 50); // Qdrant makes it visible a little later
            let publish = visible + rng.range(1, 10); // publish.py: right after the write, ts = now()
            msgs.push(Msg {
                id,
                user: u,
                fast,
                visible,
                stored: write + skew,
                event_ts: publish + skew,
                event_at: publish + rng.range(0, 400), // delivery, within the lateness
            });
            id += 1;
            // next message: quick, just under the gap, or after a break (never within 100 ms of the gap)
            t += match rng.range(0, 10) {
                0..=5 => rng.range(100, 1_500),
                6..=7 => rng.range(GAP - 600, GAP - 100),
                _ => rng.range(GAP + 100, 3 * GAP),
            };
        }
    }
    let end = msgs
        .iter()
        .map(|m| m.event_at.max(m.visible))
        .max()
        .unwrap()
        + 3 * GAP
        + 10_000;

    // --- recap: the store (what committed), the tracker, the sources
    let mut stored: HashMap<u32, Millis> = HashMap::new(); // point -> tracked (effective) time
    let mut closed_msgs: HashSet<u32> = HashSet::new();
    let mut watermark: HashMap<String, Millis> = HashMap::new();
    let mut windows: Vec<(u8, Millis, Millis, u32)> = Vec::new();
    let mut tracker = Tracker::new(cfg);
    let interval = 2_000;
    let mut next_cycle = T0
        + if mode == SourceMode::Hybrid {
            interval
        } else {
            0
        };
    let mut cycle: Option<(Millis, Millis)> = None; // (start, done at)
    let mut horizon: Option<Millis> = None;
    let mut now = T0;
    let by_id: HashMap<u32, &Msg> = msgs.iter().map(|m| (m.id, m)).collect();
    while now < end {
        now += STEP;
        let crash = rng.chance(0.01);
        // the batch: (point, time as the source reports it)
        let mut batch: Vec<(u32, Millis)> = Vec::new();
        let mut caught_up = false;
        let mut tick_to = now;
        let events = mode != SourceMode::SweepOnly;
        let sweep = mode != SourceMode::Events;
        if sweep && cycle.is_none() && now >= next_cycle {
            cycle = Some((now, now + rng.range(STEP, 600)));
            next_cycle = now + interval;
        }
        let mut sweep_page = false;
        if let Some((start, done)) = cycle
            && now >= done
        {
            // the cycle read what was visible when it started (pages: the last one now)
            batch.extend(
                msgs.iter()
                    .filter(|m| m.visible <= start && !stored.contains_key(&m.id))
                    .map(|m| (m.id, m.stored)),
            );
            sweep_page = true;
            if !crash {
                cycle = None;
                horizon = Some(start);
            }
        }
        if events && !sweep_page {
            batch.extend(
                msgs.iter()
                    .filter(|m| m.event_at <= now && !stored.contains_key(&m.id))
                    .map(|m| (m.id, m.event_ts)),
            );
            // caught up: nothing delivered and unacknowledged, nothing undelivered; ticks only between cycles
            caught_up = cycle.is_none();
        } else if mode == SourceMode::SweepOnly && cycle.is_none() {
            // between cycles (or the last page): caught up to the last cycle's start
            if let Some(h) = horizon {
                caught_up = true;
                tick_to = h.min(now);
            }
        }
        if crash {
            // the transaction failed: nothing of this batch is stored; the tracker is rebuilt from the store
            tracker = Tracker::new(cfg);
            for (b, w) in &watermark {
                tracker.restore_watermark(b, *w);
            }
            let mut open: Vec<(u32, Millis)> = stored
                .iter()
                .filter(|(p, _)| !closed_msgs.contains(p))
                .map(|(p, t)| (*p, *t))
                .collect();
            open.sort_by_key(|(p, t)| (*t, *p));
            for (p, t) in open {
                let m = by_id[&p];
                tracker.observe("b", &format!("u{}", m.user), &p.to_string(), t);
            }
            let _ = tracker.take_watermark_changes();
            assert!(
                tracker.drain_closed().is_empty(),
                "seed {seed}: a rebuild closed a window"
            );
            continue;
        }
        batch.sort_by_key(|(_, t)| *t);
        let mut seen = HashSet::new();
        for (p, ts) in batch {
            if !seen.insert(p) || stored.contains_key(&p) {
                continue; // a message seen by both sources counts once
            }
            let m = by_id[&p];
            let t = effective_time(ts, now);
            stored.insert(p, t);
            let obs = tracker.observe("b", &format!("u{}", m.user), &p.to_string(), t);
            if !m.fast {
                assert_eq!(
                    obs,
                    Observed::Accepted { late: false },
                    "seed {seed} {mode:?}: honest message {p} (ts {ts}, at {now}) was late"
                );
            } else {
                assert!(
                    matches!(obs, Observed::Accepted { late: false }),
                    "seed {seed}: fast message late"
                );
            }
        }
        if caught_up {
            tracker.tick(tick_to);
        }
        if let Some(wm) = tracker.watermark("b") {
            assert!(
                wm <= now - LATENESS,
                "seed {seed} {mode:?}: watermark {wm} past now - lateness"
            );
        }
        for w in tracker.drain_closed() {
            let user: u8 = w.user[1..].parse().unwrap();
            for (p, t) in &stored {
                if by_id[p].user == user
                    && *t >= w.start_ms
                    && *t <= w.end_ms
                    && !closed_msgs.contains(p)
                {
                    closed_msgs.insert(*p);
                }
            }
            windows.push((user, w.start_ms, w.end_ms, w.count));
        }
        for (b, w) in tracker.take_watermark_changes() {
            watermark.insert(b.to_string(), w);
        }
    }
    // every message closed once; honest users' windows are the canonical windows of their (event or stored) times
    assert_eq!(
        closed_msgs.len(),
        msgs.len(),
        "seed {seed} {mode:?}: not every message closed"
    );
    let total: u32 = windows.iter().map(|w| w.3).sum();
    assert_eq!(
        total as usize,
        msgs.len(),
        "seed {seed} {mode:?}: a message closed twice"
    );
    for u in 0..users {
        let mine: Vec<&Msg> = msgs.iter().filter(|m| m.user == u).collect();
        if mine[0].fast {
            continue; // windowed by arrival
        }
        let mut times: Vec<Millis> = mine.iter().map(|m| stored[&m.id]).collect();
        times.sort();
        let want: Vec<(u8, Millis, Millis, u32)> = canonical_windows(&cfg, &times)
            .into_iter()
            .map(|(s, e, n, _)| (u, s, e, n))
            .collect();
        let got: Vec<(u8, Millis, Millis, u32)> =
            windows.iter().filter(|w| w.0 == u).copied().collect();
        assert_eq!(got, want, "seed {seed} {mode:?}: user {u}'s windows");
    }
}

#[test]
fn seeded_schedules_keep_the_watermark_rules() {
    let n: u64 = std::env::var("SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let t = std::time::Instant::now();
    for mode in [
        SourceMode::Events,
        SourceMode::SweepOnly,
        SourceMode::Hybrid,
    ] {
        for seed in 0..n {
            simulate(seed, mode);
        }
    }
    println!(
        "SIM {} schedules x 3 modes in {:.2} s",
        n,
        t.elapsed().as_secs_f64()
    );
}
