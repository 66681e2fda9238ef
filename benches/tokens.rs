//! Tokens per window (issue 9, part 5): recap's prompt for a window (`recap::summarize::llm::build_prompt`, one call,
//! MMR selection over the budget) against the older worker's approach: every message in full, twice (two calls per
//! window). Tokens are recap's estimate (`ceil(chars / 4)`, the rule the LLM test server also counts by).
//!
//! The baseline per window is `2 x PromptStats::est_tokens_full` (recap's own full prompt — system text, header and
//! every message — sent twice). Windows: the sample conversations (`demo/conversations.json`, the windows recap would
//! summarize, i.e. at least MIN_MESSAGES_FOR_SUMMARY messages) and synthetic windows of 50, 200 and 2000 messages.
//!
//! Running summaries (CONTEXT_SUMMARY_EVERY = N, recap's configured value): the close of the synthetic 200-message
//! window without them (`build_prompt` over the whole window) against with them (`build_incremental_prompt`: the
//! last running summary, of the first `N * floor(199 / N)` messages — the one at 200 not yet run when the window
//! closes — plus the messages since), both in one run; and what the running summaries themselves sent over the
//! window's life (each an incremental prompt of the previous one plus N messages). The prior summary is taken at the
//! LLM prompt's cap (600 characters, 8 topics): the largest a running summary is asked to be.
//!
//! `cargo bench --bench tokens`. Deterministic (no timing): one run is enough; `BENCH_RUNS` repeats it anyway.
//! Results: lines `BENCH<TAB>metric<TAB>value<TAB>unit`.
#![allow(clippy::type_complexity)]

use recap::summarize::llm::{LlmSettings, build_incremental_prompt, build_prompt};
use recap::summarize::{Message, Prior, WindowInput};
use recap::tracker::{TrackerConfig, canonical_windows, point_hash};

mod common;
use common::{MIN, embed, env_usize, parse_config};

fn msg(i: usize, role: &str, text: String, ts_ms: i64, emotion: &str) -> Message {
    Message {
        point_id: format!("p{i}"),
        role: role.into(),
        vector: embed(&text, 1),
        text,
        ts_ms,
        emotion: Some(emotion.into()),
    }
}

const T0: i64 = 1_763_629_200_000; // 2025-11-20T09:00:00Z

/// The windows of the sample conversations, as recap forms them (session windows of each user's messages; the
/// `conversation_pair` points are dropped by fetch and never reach the summarizer).
fn demo_windows(min_messages: usize) -> Vec<(String, WindowInput)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/conversations.json");
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("demo/conversations.json"))
            .expect("json");
    let cfg = TrackerConfig::default();
    let mut out = Vec::new();
    for conv in data["conversations"].as_array().expect("conversations") {
        let bot = conv["bot"].as_str().unwrap_or_default().to_string();
        let user = conv["user_id"].as_str().unwrap_or_default().to_string();
        let mut msgs = Vec::new();
        for s in conv["sessions"].as_array().expect("sessions") {
            let start = T0 + s["start_minute"].as_i64().unwrap_or(0) * MIN;
            for (i, ex) in s["exchanges"]
                .as_array()
                .expect("exchanges")
                .iter()
                .enumerate()
            {
                let t = start + 2 * MIN * i as i64;
                let emotion = ex["emotion"].as_str().unwrap_or("neutral");
                let n = msgs.len();
                msgs.push(msg(
                    n,
                    "user",
                    ex["user"].as_str().unwrap_or_default().into(),
                    t,
                    emotion,
                ));
                msgs.push(msg(
                    n + 1,
                    "assistant",
                    ex["bot"].as_str().unwrap_or_default().into(),
                    t + 1,
                    emotion,
                ));
            }
        }
        let times: Vec<i64> = msgs.iter().map(|m| m.ts_ms).collect();
        let mut rest = msgs.as_slice();
        for (start, end, n, _) in canonical_windows(&cfg, &times) {
            let (w, tail) = rest.split_at(n as usize);
            rest = tail;
            if (n as usize) < min_messages {
                continue; // too short: recap makes no LLM call for it
            }
            out.push((
                format!("demo {bot}/{}.. {n} msgs", &user[..6]),
                WindowInput {
                    bot: bot.clone(),
                    user_id: user.clone(),
                    start_ms: start,
                    end_ms: end,
                    messages: w.to_vec(),
                },
            ));
        }
    }
    out
}

const USER_LINES: &[&str] = &[
    "I have been learning to play the guitar every evening after work, mostly fingerstyle pieces.",
    "My sister is visiting next weekend and we plan a hiking trip in the mountains near the lake, weather permitting.",
    "The new job at the bakery starts on Monday and honestly I am nervous about getting up at four every morning.",
    "I adopted a small grey kitten called Pepper from the shelter; she already knocked over two plants.",
    "We should talk about marine biology again, the coral reefs near the coast are bleaching faster than I thought.",
    "Training for the marathon is going well, my knee feels better since I changed shoes.",
    "Can you remind me what I told you about my grandmother's recipe for plum dumplings?",
    "I finally finished reading that long novel about the lighthouse keeper; the ending made me cry.",
];
const BOT_LINES: &[&str] = &[
    "That sounds wonderful! How long have you been practising, and what got you started?",
    "A hiking trip sounds lovely. Do you already know which trail you want to take with her?",
    "It is completely normal to feel nervous before a new job. What part worries you the most?",
    "Pepper sounds adorable and full of energy. Kittens love to explore everything at that age.",
    "Coral bleaching is a real concern; marine heatwaves are the main driver right now.",
    "Great to hear your knee is better! Shoes make a huge difference for long distances.",
    "You told me she always used fresh plums and a pinch of cinnamon in the breadcrumbs.",
    "Endings like that stay with you for a while. What did you think of the keeper's choice?",
];
const EMOTIONS: &[&str] = &[
    "joy",
    "neutral",
    "excitement",
    "anxiety",
    "sadness",
    "gratitude",
    "curiosity",
];

/// A synthetic window of `n` messages (user and bot alternating, a minute apart), lines of 60 to 400 characters.
fn synthetic(n: usize) -> WindowInput {
    let mut messages = Vec::with_capacity(n);
    for i in 0..n {
        let k = (point_hash(&format!("{n}-{i}")) % 8) as usize;
        let (role, base) = if i % 2 == 0 {
            ("user", USER_LINES[k])
        } else {
            ("assistant", BOT_LINES[k])
        };
        // vary the length: some messages are one line, some a paragraph
        let reps = 1 + (point_hash(&format!("r{i}")) % 4) as usize;
        let text = (0..reps)
            .map(|r| {
                if r == 0 {
                    base.to_string()
                } else {
                    format!("Also, about #{i}-{r}: {}", USER_LINES[(k + r) % 8])
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        messages.push(msg(
            i,
            role,
            text,
            T0 + i as i64 * 30_000,
            EMOTIONS[(k + i) % EMOTIONS.len()],
        ));
    }
    WindowInput {
        bot: "elena".into(),
        user_id: "734829104857362431".into(),
        start_ms: T0,
        end_ms: T0 + (n as i64 - 1) * 30_000,
        messages,
    }
}

/// A running summary of the first `covered` messages of `w`, at the prompt's cap (600 characters, 8 topics).
fn prior_of(w: &WindowInput, covered: usize) -> Prior {
    let text: String = "The user talked about learning the guitar in the evenings, a hiking trip with their sister, \
        nerves before a new bakery job and a grey kitten called Pepper. "
        .repeat(4)
        .chars()
        .take(600)
        .collect();
    Prior {
        text,
        key_topics: [
            "guitar",
            "hiking trip",
            "sister",
            "bakery job",
            "kitten Pepper",
            "marathon",
            "coral reefs",
            "novel",
        ]
        .map(String::from)
        .to_vec(),
        emotional_tone: "mixed".into(),
        message_count: covered,
        covers_until_ms: w.messages[covered - 1].ts_ms,
    }
}

/// The messages of `w` from `from` to `to` (exclusive) as a window of their own.
fn part(w: &WindowInput, from: usize, to: usize) -> WindowInput {
    let messages = w.messages[from..to].to_vec();
    WindowInput {
        start_ms: messages[0].ts_ms,
        end_ms: messages[messages.len() - 1].ts_ms,
        messages,
        ..w.clone()
    }
}

/// The close of a window of `n` messages with and without running summaries every `every` messages; prints the
/// figures and BENCH lines.
fn running_summaries(settings: &LlmSettings, n: usize, every: usize) {
    let w = synthetic(n);
    let (_, full) = build_prompt(settings, &w);
    let covered = every * ((n - 1) / every);
    let (_, close) =
        build_incremental_prompt(settings, &prior_of(&w, covered), &part(&w, covered, n));
    // the running summaries over the window's life: the first from its first N messages, then each from the
    // previous one plus N messages
    let mut life = 0usize;
    let mut calls = 0usize;
    for upto in (every..=covered).step_by(every) {
        let (_, st) = if upto == every {
            build_prompt(settings, &part(&w, 0, upto))
        } else {
            build_incremental_prompt(
                settings,
                &prior_of(&w, upto - every),
                &part(&w, upto - every, upto),
            )
        };
        life += st.est_tokens_sent;
        calls += 1;
    }
    let ratio = close.est_tokens_sent as f64 / full.est_tokens_sent as f64;
    println!(
        "  running summaries every {every}: close of {n} msgs sends {} tokens ({} msgs) vs {} without ({} of {} msgs \
         sent): {ratio:.3}x; the {calls} running summaries before it sent {life} tokens in all",
        close.est_tokens_sent,
        close.messages_sent,
        full.est_tokens_sent,
        full.messages_sent,
        full.messages_total,
    );
    println!(
        "BENCH\ttokens_close_running_{n}msg\t{}\ttokens",
        close.est_tokens_sent
    );
    println!(
        "BENCH\ttokens_close_full_{n}msg\t{}\ttokens",
        full.est_tokens_sent
    );
    println!("BENCH\ttokens_close_ratio_running_{n}msg\t{ratio:.4}\tx");
    println!("BENCH\ttokens_running_life_{n}msg\t{life}\ttokens");
}

fn main() {
    let runs = env_usize("BENCH_RUNS", 1).max(1);
    // recap's configured budget (LLM_MAX_INPUT_TOKENS, default 6000) and minimum window size, from its own Config
    let cfg = parse_config(["bench"]);
    let settings = LlmSettings {
        max_input_tokens: cfg.llm.llm_max_input_tokens,
        ..Default::default()
    };
    let min = cfg.windows.min_messages_for_summary as usize;
    println!(
        "tokens benchmark: LLM_MAX_INPUT_TOKENS={}, MIN_MESSAGES_FOR_SUMMARY={min}; baseline = every message in full, two calls",
        settings.max_input_tokens
    );
    let mut windows = demo_windows(min);
    for n in [50, 200, 2000] {
        windows.push((format!("synthetic {n} msgs"), synthetic(n)));
    }
    // deterministic: the table is printed once, the BENCH lines once per run
    for run in 0..runs {
        let show = run == 0;
        if show {
            println!(
                "  {:<30} {:>6} {:>6} {:>10} {:>10} {:>10} {:>7}",
                "window", "msgs", "sent", "full tok", "recap tok", "old tok", "ratio"
            );
        }
        let (mut demo_sent, mut demo_old) = (0usize, 0usize);
        for (name, w) in &windows {
            let (_msgs, st) = build_prompt(&settings, w);
            let old = 2 * st.est_tokens_full;
            let ratio = st.est_tokens_sent as f64 / old as f64;
            if show {
                println!(
                    "  {:<30} {:>6} {:>6} {:>10} {:>10} {:>10} {:>7.3}",
                    name,
                    st.messages_total,
                    st.messages_sent,
                    st.est_tokens_full,
                    st.est_tokens_sent,
                    old,
                    ratio
                );
            }
            if name.starts_with("demo") {
                demo_sent += st.est_tokens_sent;
                demo_old += old;
            } else {
                let n = st.messages_total;
                println!("BENCH\ttokens_ratio_{n}msg\t{ratio:.4}\tx");
                if show {
                    println!("BENCH\ttokens_sent_{n}msg\t{}\ttokens", st.est_tokens_sent);
                    println!("BENCH\ttokens_old_{n}msg\t{old}\ttokens");
                }
            }
        }
        let r = demo_sent as f64 / demo_old as f64;
        if show {
            println!(
                "  demo windows: {} windows, recap {} tokens vs old {} tokens: {:.3}x",
                windows
                    .iter()
                    .filter(|(n, _)| n.starts_with("demo"))
                    .count(),
                demo_sent,
                demo_old,
                r
            );
        }
        println!("BENCH\ttokens_ratio_demo\t{r:.4}\tx");
        running_summaries(
            &settings,
            200,
            (cfg.windows.context_summary_every as usize).max(2),
        );
        println!(
            "BENCH\ttokens_sent_demo_per_window\t{:.1}\ttokens",
            demo_sent as f64
                / windows
                    .iter()
                    .filter(|(n, _)| n.starts_with("demo"))
                    .count() as f64
        );
    }
}
