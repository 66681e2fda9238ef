//! The prompt of one window: message lines, header, and the MMR selection when the window is over budget.

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage,
};
use chrono::{DateTime, Utc};

use super::mmr::select_mmr;
use super::{LlmSettings, MMR_LAMBDA, SYSTEM_PROMPT, chars, estimate_tokens, token_units};
use crate::summarize::{Message, Prior, WindowInput};

/// What [`build_prompt`] sent compared with the whole window (estimated tokens, `ceil(chars/4)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptStats {
    pub messages_total: usize,
    pub messages_sent: usize,
    /// Estimated prompt tokens had every message been sent.
    pub est_tokens_full: usize,
    /// Estimated prompt tokens of the prompt built.
    pub est_tokens_sent: usize,
}

/// The prompt of one window: system text, user text and what they cost.
#[derive(Debug, Clone)]
pub(super) struct PromptParts {
    pub(super) system: String,
    pub(super) user: String,
    pub(super) stats: PromptStats,
}

/// The chat messages for one window (system + user) and how much of the window they carry.
pub fn build_prompt(
    settings: &LlmSettings,
    window: &WindowInput,
) -> (Vec<ChatCompletionRequestMessage>, PromptStats) {
    let p = prompt_parts(settings, window);
    (chat_messages(&p.system, &p.user), p.stats)
}

pub(super) fn chat_messages(system: &str, user: &str) -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessage::from(system).into(),
        ChatCompletionRequestUserMessage::from(user).into(),
    ]
}

fn fmt_ms(ms: i64, pattern: &str) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format(pattern).to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// One message as a prompt line: `[HH:MM] (emotion) role: text` (`[MM-DD HH:MM]` when the messages span several
/// UTC dates; no parentheses without an emotion label). Whitespace is collapsed so a message is one line; `cap`
/// cuts the text to that many characters.
fn format_line(m: &Message, multi_day: bool, cap: Option<usize>) -> String {
    let time = fmt_ms(m.ts_ms, if multi_day { "%m-%d %H:%M" } else { "%H:%M" });
    let mut text = m.text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(cap) = cap
        && chars(&text) > cap
    {
        text = crate::summarize::extractive::trim_on_word(&text, cap.saturating_sub(1).max(1));
    }
    let role = if m.role.trim().is_empty() {
        "unknown"
    } else {
        m.role.trim()
    };
    match m
        .emotion
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        Some(e) => format!("[{time}] ({e}) {role}: {text}"),
        None => format!("[{time}] {role}: {text}"),
    }
}

/// The lines above the messages. No line here has the `speaker: text` shape, so nothing in it reads as a message.
fn header(w: &WindowInput, shown: usize, total: usize, selected: bool) -> String {
    let range = format!(
        "Conversation between user {} and the bot {}, from {} to {} UTC (message times are UTC).",
        w.user_id,
        w.bot,
        fmt_ms(w.start_ms, "%Y-%m-%d %H:%M"),
        fmt_ms(w.end_ms, "%Y-%m-%d %H:%M"),
    );
    let count = if selected {
        format!(
            "Showing {shown} of {total} messages, selected to represent the whole conversation; the others are left out."
        )
    } else {
        format!("All {total} messages of the window.")
    };
    format!("{range}\n{count}\nEach line gives [time] (emotion label) speaker, then the text.")
}

fn compose_user(header: &str, lines: &[&str]) -> String {
    let mut s =
        String::with_capacity(header.len() + lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
    s.push_str(header);
    s.push_str("\n\n");
    s.push_str(&lines.join("\n"));
    s
}

pub(super) fn prompt_parts(settings: &LlmSettings, w: &WindowInput) -> PromptParts {
    parts_with(
        settings,
        w,
        SYSTEM_PROMPT.to_string(),
        &|shown, total, selected| header(w, shown, total, selected),
    )
}

/// The system prompt of an incremental call: the window prompt's rules, and how to extend the summary so far.
pub const INCREMENTAL_SYSTEM_PROMPT: &str = "You keep a running summary of one conversation between a user and a chat \
bot up to date, so that the bot can later remember what this user talked about. You get the summary so far (of the \
conversation's earlier messages, which you do not see again) and the messages since. Reply with ONLY a JSON object - \
no prose, no code fences - of exactly this shape: {\"summary\": string, \"key_topics\": [string, 1 to 8 items], \
\"emotional_tone\": one of \"positive\", \"negative\", \"neutral\", \"mixed\", \"confidence\": number from 0 to 1}. \
The summary (2 to 5 sentences, third person, at most 600 characters) covers the WHOLE conversation: keep what the \
summary so far says that still matters and add what the new messages bring (topics, facts, plans, people, \
preferences, feelings); never invent facts. key_topics are short phrases from the summary so far or the new \
messages, the most important first. emotional_tone is the user's overall tone over the whole conversation; the \
emotion labels in parentheses are hints. confidence says how well the messages support the summary.";

/// The lines above the new messages of an incremental prompt: the window header, then the summary so far. The
/// summary so far is given as `Summary so far: ...` and `Key topics so far: ...` lines.
fn incremental_header(
    prior: &Prior,
    w: &WindowInput,
    shown: usize,
    total: usize,
    selected: bool,
) -> String {
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let count = if selected {
        format!(
            "Showing {shown} of the {total} messages since, selected to represent them; the others are left out."
        )
    } else {
        format!("All {total} messages since.")
    };
    format!(
        "Conversation between user {} and the bot {}, messages from {} UTC on (message times are UTC).\n\
         The summary so far covers the first {} messages, until {} UTC.\n\
         Summary so far: {}\n\
         Key topics so far: {}\n\
         Tone so far: {}\n\n\
         The messages since. {count}\nEach line gives [time] (emotion label) speaker, then the text.",
        w.user_id,
        w.bot,
        fmt_ms(w.start_ms, "%Y-%m-%d %H:%M"),
        prior.message_count,
        fmt_ms(prior.covers_until_ms, "%Y-%m-%d %H:%M"),
        flat(&prior.text),
        flat(&prior.key_topics.join(", ")),
        flat(&prior.emotional_tone),
    )
}

/// The prompt of an incremental call: [`INCREMENTAL_SYSTEM_PROMPT`], the summary so far and only the new messages
/// (the MMR selection under `max_input_tokens` as for a window). Its size depends on the new messages, not on how
/// many the summary so far covers.
pub(super) fn incremental_parts(
    settings: &LlmSettings,
    prior: &Prior,
    new: &WindowInput,
) -> PromptParts {
    parts_with(
        settings,
        new,
        INCREMENTAL_SYSTEM_PROMPT.to_string(),
        &|shown, total, selected| incremental_header(prior, new, shown, total, selected),
    )
}

/// The chat messages of an incremental call (see [`incremental_parts`]).
pub fn build_incremental_prompt(
    settings: &LlmSettings,
    prior: &Prior,
    new: &WindowInput,
) -> (Vec<ChatCompletionRequestMessage>, PromptStats) {
    let p = incremental_parts(settings, prior, new);
    (chat_messages(&p.system, &p.user), p.stats)
}

type Header<'a> = dyn Fn(usize, usize, bool) -> String + 'a;

fn parts_with(
    settings: &LlmSettings,
    w: &WindowInput,
    system: String,
    header: &Header<'_>,
) -> PromptParts {
    let msgs: Vec<&Message> = w
        .messages
        .iter()
        .filter(|m| !m.text.trim().is_empty())
        .collect();
    let n = msgs.len();
    let multi_day = match (msgs.first(), msgs.last()) {
        (Some(a), Some(b)) => fmt_ms(a.ts_ms, "%Y-%m-%d") != fmt_ms(b.ts_ms, "%Y-%m-%d"),
        _ => false,
    };
    let sys_chars = token_units(&system);

    let full_lines: Vec<String> = msgs
        .iter()
        .map(|m| format_line(m, multi_day, None))
        .collect();
    let full_refs: Vec<&str> = full_lines.iter().map(String::as_str).collect();
    let user_full = compose_user(&header(n, n, false), &full_refs);
    let est_full = estimate_tokens(sys_chars + token_units(&user_full));
    let max = settings.max_input_tokens;
    if max == 0 || est_full <= max {
        let stats = PromptStats {
            messages_total: n,
            messages_sent: n,
            est_tokens_full: est_full,
            est_tokens_sent: est_full,
        };
        return PromptParts {
            system,
            user: user_full,
            stats,
        };
    }

    // Over budget: choose messages by MMR until the budget is used.
    let fixed = sys_chars + token_units(&header(n, n, true)) + 2;
    let budget_chars = (max * 4).saturating_sub(fixed);
    // No single message may eat the budget: cap each at a sixth of it (at least 200 chars).
    let cap = (budget_chars / 6).max(200);
    let lines: Vec<String> = msgs
        .iter()
        .map(|m| format_line(m, multi_day, Some(cap)))
        .collect();
    let costs: Vec<usize> = lines.iter().map(|l| token_units(l) + 1).collect();
    let vectors: Vec<&[f32]> = msgs.iter().map(|m| m.vector.as_slice()).collect();
    let mut picked = select_mmr(&vectors, &costs, budget_chars, MMR_LAMBDA);
    let mut lines = lines;
    if picked.is_empty() && n > 0 {
        // Not even one line fits (tiny budget): send the most relevant message, cut to what is left.
        let first = select_mmr(&vectors, &vec![0; n], usize::MAX, MMR_LAMBDA)[0];
        lines[first] = format_line(
            msgs[first],
            multi_day,
            Some(budget_chars.saturating_sub(30).max(80)),
        );
        picked.push(first);
    }
    loop {
        let mut in_time: Vec<usize> = picked.clone();
        in_time.sort_unstable();
        let refs: Vec<&str> = in_time.iter().map(|&i| lines[i].as_str()).collect();
        let user = compose_user(&header(in_time.len(), n, true), &refs);
        let est = estimate_tokens(sys_chars + token_units(&user));
        if est <= max || picked.len() <= 1 {
            let stats = PromptStats {
                messages_total: n,
                messages_sent: in_time.len(),
                est_tokens_full: est_full,
                est_tokens_sent: est,
            };
            return PromptParts {
                system,
                user,
                stats,
            };
        }
        picked.pop(); // drop the least valuable pick (MMR order) until it fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::TONES;
    use crate::summarize::llm::testutil::*;
    use crate::summarize::llm::*;

    // ---- prompt ---------------------------------------------------------------------------------------------

    #[test]
    fn prompt_carries_speaker_time_text_and_emotion() {
        let mut w = convo("4711", 4, 0);
        w.messages[1].emotion = None;
        let (msgs, stats) = build_prompt(&LlmSettings::default(), &w);
        assert_eq!(msgs.len(), 2);
        assert!(matches!(msgs[0], ChatCompletionRequestMessage::System(_)));
        assert!(matches!(msgs[1], ChatCompletionRequestMessage::User(_)));
        let system = content_of(&msgs[0]);
        assert!(
            system.contains("JSON")
                && system.contains("key_topics")
                && system.contains("emotional_tone")
        );
        for t in TONES {
            assert!(system.contains(t));
        }
        let user = content_of(&msgs[1]);
        assert!(
            user.contains("[14:00] (joy) user: I finally finished my pottery class project"),
            "{user}"
        );
        assert!(
            user.contains("[14:01] assistant: That sounds beautiful!"),
            "{user}"
        );
        assert!(
            user.contains("(anxiety) user: I am nervous about the marathon"),
            "{user}"
        );
        assert!(user.contains("user 4711") && user.contains("bot elena"));
        assert!(user.contains("2026-11-26 00:00") && user.contains("2026-11-27 00:00"));
        assert!(user.contains("All 4 messages"));
        assert_eq!(stats.messages_total, 4);
        assert_eq!(stats.messages_sent, 4);
        assert_eq!(stats.est_tokens_full, stats.est_tokens_sent);
        assert_eq!(
            stats.est_tokens_sent,
            estimate_tokens(token_units(&system) + token_units(&user))
        );
        // multi-line messages stay on one line
        let w = window(
            "1",
            vec![msg(0, "user", "first line\nsecond line", None, vec![])],
        );
        let (msgs, _) = build_prompt(&LlmSettings::default(), &w);
        assert!(content_of(&msgs[1]).ends_with("[14:00] user: first line second line"));
    }

    #[test]
    fn incremental_prompt_holds_the_summary_so_far_and_only_the_new_messages() {
        let w = convo("4711", 40, 3);
        let prior = crate::summarize::Prior {
            text: "The user talked about pottery and a marathon.".into(),
            key_topics: vec!["pottery".into(), "marathon".into()],
            emotional_tone: "mixed".into(),
            message_count: 30,
            covers_until_ms: w.messages[29].ts_ms,
        };
        let new = WindowInput {
            messages: w.messages[30..].to_vec(),
            start_ms: w.messages[30].ts_ms,
            ..w.clone()
        };
        let (msgs, stats) = build_incremental_prompt(&LlmSettings::default(), &prior, &new);
        let system = content_of(&msgs[0]);
        assert!(system.contains("summary so far") && system.contains("JSON"));
        let user = content_of(&msgs[1]);
        assert!(
            user.contains("Summary so far: The user talked about pottery and a marathon."),
            "{user}"
        );
        assert!(user.contains("Key topics so far: pottery, marathon"));
        assert!(user.contains("covers the first 30 messages"));
        assert!(user.contains("All 10 messages since."), "{user}");
        assert_eq!(stats.messages_total, 10);
        assert_eq!(stats.messages_sent, 10);
        // the prompt is the size of the new messages, not of the whole window
        let (_, whole) = build_prompt(&LlmSettings::default(), &w);
        assert!(
            stats.est_tokens_sent < whole.est_tokens_sent / 2,
            "{stats:?} vs {whole:?}"
        );
        // the covered messages' times are not in it, the new ones' are
        assert!(user.contains(&format_line(&new.messages[0], false, None)));
        assert!(!user.contains(&format_line(&w.messages[0], false, None)));
        assert_eq!(
            stats.est_tokens_sent,
            estimate_tokens(token_units(&system) + token_units(&user))
        );
    }

    #[test]
    fn token_estimate_is_ceil_chars_over_4() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }
}
