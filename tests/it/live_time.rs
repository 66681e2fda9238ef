//! Issue 14 at production timing, scaled down: messages are written to Qdrant at the wall clock and (with NATS) their
//! events published right after, stamped `ts = now()` at publish as `examples/publish.py` does (a few ms after the
//! point's stored time); one user pauses just under the idle gap, one user's bot host runs 20 minutes fast. The same
//! plan runs in event mode, hybrid mode and sweep-only mode, each against its own `recap run` process, concurrently.
//!
//! Scaled timing (production: idle gap 1 min, lateness 5 s, sweep every 20 s): IDLE_GAP=4s,
//! ALLOWED_LATENESS_SECONDS=1, ENRICHMENT_INTERVAL_SECONDS=2 (hybrid and sweep-only; event mode keeps the default
//! 300 s, so its sweep never runs during the test), messages 0.5 s apart, a pause of 3.5 s (just under the gap) and
//! one of 6 s (over it). The whole file takes about 30 s.
//!
//! `LIVE_TIMING=production` runs the same plan at production timing: every offset and the gap times 15 (idle gap
//! 60 s, messages 7.5 s apart, pauses of 52.5 s and 90 s), lateness 5 s, sweep every 20 s: about 5 minutes, run by
//! `scripts/bench` for the freshness figure, not by `scripts/test`.
//!
//! Asserts every window exactly once, with its exact message count and stored-time bounds, every row at revision 1,
//! and prints freshness: how long after a window's idle deadline (last write + gap) its row appeared.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use recap::pipeline::now_ms;

/// The scaled timing of the run (see the module docs).
#[derive(Clone, Copy)]
struct Timing {
    /// Every write offset and the idle gap are multiplied by this.
    scale: i64,
    lateness_s: i64,
    sweep_s: i64,
}

fn timing() -> Timing {
    match std::env::var("LIVE_TIMING").as_deref() {
        Ok("production") => Timing {
            scale: 15,
            lateness_s: 5,
            sweep_s: 20,
        },
        _ => Timing {
            scale: 1,
            lateness_s: 1,
            sweep_s: 2,
        },
    }
}

fn gap_ms() -> i64 {
    4000 * timing().scale
}
const SKEW_MS: i64 = 20 * MIN;

/// One user's plan: write offsets (ms from the start) and clock skew of its bot host.
struct Plan {
    user: &'static str,
    offsets: Vec<i64>,
    skew_ms: i64,
    /// Expected windows: message counts, in order.
    windows: Vec<usize>,
}

fn plans() -> Vec<Plan> {
    let k = timing().scale;
    let run = move |from: i64, n: i64| (0..n).map(move |i| (from + i * 500) * k);
    vec![
        Plan {
            user: "steady",
            offsets: run(0, 5).collect(),
            skew_ms: 0,
            windows: vec![5],
        },
        Plan {
            user: "pauser",
            offsets: run(0, 3).chain(run(1000 + 3500, 3)).collect(),
            skew_ms: 0,
            windows: vec![6],
        },
        Plan {
            user: "twice",
            offsets: run(0, 5).chain(run(2000 + 6000, 5)).collect(),
            skew_ms: 0,
            windows: vec![5, 5],
        },
        Plan {
            user: "fast",
            offsets: run(250, 5).collect(),
            skew_ms: SKEW_MS,
            windows: vec![5],
        },
    ]
}

/// A written message: user, stored time (the host's clock), wall-clock time of the write.
#[derive(Debug, Clone)]
struct Written {
    user: String,
    stored_ms: i64,
    wall_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Events,
    Hybrid,
    SweepOnly,
}

struct Outcome {
    mode: Mode,
    freshness_ms: Vec<i64>,
}

async fn run_mode(mode: Mode) -> Outcome {
    let db = fresh_db().await;
    db.migrate().await;
    let ns = nats_ns();
    let bot = format!("live{}", token());
    let collection = format!("whisperengine_memory_{bot}_7d");
    let q = qdrant().await;
    create_collection(&q, &collection, true).await;
    let js = ns.ensure().await;
    let mut envs = recap_env(&db, (mode != Mode::SweepOnly).then_some(&ns));
    envs.extend(
        [
            ("COLLECTION_PATTERNS", collection.clone()),
            ("COLLECTION_MAP", format!("{collection}={bot}")),
            ("IDLE_GAP", format!("{}ms", gap_ms())),
            ("ALLOWED_LATENESS_SECONDS", timing().lateness_s.to_string()),
            (
                "ENRICHMENT_INTERVAL_SECONDS",
                if mode == Mode::Events {
                    "300".into()
                } else {
                    timing().sweep_s.to_string()
                },
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let mut child = spawn_recap(&["run"], &envs, &log_path(&format!("live-{mode:?}")));
    wait_leading(&db.pool, 1, Duration::from_secs(30)).await; // recap up and leading

    // the writers: one task per user, at the wall clock
    let start = now_ms();
    let mut tasks = Vec::new();
    for plan in plans() {
        let (q, js, ns, bot, collection) = (
            qdrant().await,
            js.clone(),
            ns.clone(),
            bot.clone(),
            collection.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, off) in plan.offsets.iter().enumerate() {
                let wait = (start + off - now_ms()).max(0) as u64;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let wall = now_ms();
                let p = TestPoint {
                    id: uuid::Uuid::new_v4().to_string(),
                    user_id: plan.user.into(),
                    role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                    content: format!(
                        "{} says message {i} about the garden and the weather",
                        plan.user
                    ),
                    ts_ms: wall + plan.skew_ms,
                    emotion: "neutral".into(),
                    memory_type: "conversation".into(),
                };
                upsert(&q, &collection, std::slice::from_ref(&p)).await;
                if mode != Mode::SweepOnly {
                    // publish.py: ts = now() when publishing, after the point was stored
                    let mut e = p.event(&bot, &collection);
                    e.ts = chrono::Utc::now() + chrono::TimeDelta::milliseconds(plan.skew_ms);
                    ns.publish_raw(
                        &js,
                        vec![(e.subject(&ns.prefix), Some(p.id.clone()), e.to_body())],
                    )
                    .await;
                }
                out.push(Written {
                    user: plan.user.into(),
                    stored_ms: p.ts_ms,
                    wall_ms: wall,
                });
            }
            out
        }));
    }
    let mut written: Vec<Written> = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    // expected windows: the window definition over what was written (a fast host's messages by arrival). The plan's
    // counts hold unless the machine stalled a writer across the gap; then the definition wins (and we say so).
    let mut want: Vec<(String, i64, i64, i32)> = Vec::new();
    let mut deadlines: HashMap<(String, i64), i64> = HashMap::new();
    let tcfg = recap::tracker::TrackerConfig {
        idle_gap_ms: gap_ms(),
        ..recap::tracker::TrackerConfig::default()
    };
    for plan in plans() {
        let mut mine: Vec<&Written> = written.iter().filter(|w| w.user == plan.user).collect();
        mine.sort_by_key(|w| w.stored_ms);
        let times: Vec<i64> = mine.iter().map(|w| w.stored_ms - plan.skew_ms).collect();
        let counts: Vec<usize> = recap::tracker::canonical_windows(&tcfg, &times)
            .iter()
            .map(|w| w.2 as usize)
            .collect();
        if counts != plan.windows {
            println!(
                "{mode:?}: {}'s writes were delayed across the gap: windows {counts:?}, planned {:?}",
                plan.user, plan.windows
            );
        }
        let mut i = 0;
        for n in counts {
            let w = &mine[i..i + n];
            // MIN_MESSAGES_FOR_SUMMARY (5): a shorter window has no row
            if n >= 5 {
                want.push((
                    plan.user.into(),
                    w[0].stored_ms,
                    w[n - 1].stored_ms,
                    n as i32,
                ));
            }
            deadlines.insert(
                (plan.user.to_string(), w[0].stored_ms),
                w[n - 1].wall_ms + gap_ms(),
            );
            i += n;
        }
    }
    let t = timing();
    let got = wait_for_rows(
        &db.pool,
        want.len(),
        Duration::from_secs(60 * t.scale as u64),
    )
    .await;
    // a little longer (more than a sweep interval): nothing may be revised or added after the fact
    tokio::time::sleep(Duration::from_secs(3.max(t.sweep_s as u64 + 2))).await;
    let got_after = rows(&db.pool).await;
    terminate(&mut child);
    assert_eq!(
        got.len(),
        got_after.len(),
        "{mode:?}: rows added after settling"
    );

    want.sort();
    let mut have: Vec<(String, i64, i64, i32)> = got_after
        .iter()
        .map(|r| {
            (
                r.user.clone(),
                r.start.and_utc().timestamp_millis(),
                r.end.and_utc().timestamp_millis(),
                r.count,
            )
        })
        .collect();
    have.sort();
    assert_eq!(have.len(), want.len(), "{mode:?}: {have:?} vs {want:?}");
    for (h, w) in have.iter().zip(&want) {
        // stored times are float seconds in Qdrant: read back within a millisecond
        assert!(
            h.0 == w.0 && (h.1 - w.1).abs() <= 1 && (h.2 - w.2).abs() <= 1 && h.3 == w.3,
            "{mode:?}: row {h:?}, expected {w:?}\nall rows {have:?}\nexpected {want:?}"
        );
    }
    assert!(
        got_after.iter().all(|r| r.revision == 1),
        "{mode:?}: a window was summarized twice: {:?}",
        got_after
            .iter()
            .map(|r| (&r.user, r.revision))
            .collect::<Vec<_>>()
    );
    let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM recap_windows")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(
        versions.iter().all(|v| *v == 1),
        "{mode:?}: a window reopened: {versions:?}"
    );

    // freshness: when each row appeared (its window finished) after its idle deadline
    let done: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT w.user_id, s.start_timestamp AT TIME ZONE 'UTC', w.updated_at FROM recap_windows w
             JOIN conversation_summaries s ON s.id = w.summary_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut freshness_ms = Vec::new();
    for (user, start, at) in done {
        let key = deadlines
            .keys()
            .find(|(u, s)| *u == user && (s - start.timestamp_millis()).abs() <= 1)
            .cloned()
            .expect("a deadline for each row");
        let f = at.timestamp_millis() - deadlines[&key];
        println!("{mode:?}: {user} window from {start} finished {f} ms after its idle deadline");
        freshness_ms.push(f);
    }
    let _ = q.delete_collection(&collection).await;
    Outcome { mode, freshness_ms }
}

fn median(v: &mut [i64]) -> i64 {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_window_once_at_live_timing_in_every_mode() {
    let _shared = common::shared().await;
    let outcomes = futures::future::join_all(
        [Mode::Events, Mode::Hybrid, Mode::SweepOnly]
            .into_iter()
            .map(|m| tokio::spawn(run_mode(m))),
    )
    .await;
    let t = timing();
    for o in outcomes {
        let mut o = o.expect("mode run");
        let max = *o.freshness_ms.iter().max().unwrap();
        let med = median(&mut o.freshness_ms);
        println!(
            "FRESHNESS mode={:?} idle_gap={}ms lateness={}s sweep_interval={} windows={} median_ms={med} max_ms={max} (row after the idle deadline)",
            o.mode,
            gap_ms(),
            t.lateness_s,
            if o.mode == Mode::Events {
                "off".to_string()
            } else {
                format!("{}s", t.sweep_s)
            },
            o.freshness_ms.len()
        );
        // the same figures as `scripts/bench` reads them (benches/common's `emit` format)
        let mode = format!("{:?}", o.mode).to_lowercase();
        println!("BENCH\tfreshness_{mode}_median_ms\t{med:.3}\tms");
        println!("BENCH\tfreshness_{mode}_max_ms\t{max:.3}\tms");
        // event mode: within lateness + 5 s of the deadline; sweep-only: one sweep interval more
        let bound = match o.mode {
            Mode::Events | Mode::Hybrid => t.lateness_s * 1000 + 5000,
            Mode::SweepOnly => t.lateness_s * 1000 + 5000 + t.sweep_s * 1000,
        };
        assert!(
            max <= bound,
            "{:?}: a row came {max} ms after its deadline (bound {bound} ms)",
            o.mode
        );
    }
}
