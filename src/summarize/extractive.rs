//! The extractive summarizer: deterministic, offline, no key and no IO.
//!
//! - **Topics**: term statistics over the window's user messages (all messages when the user said nothing usable):
//!   lowercase words of at least 4 letters that are not stopwords, scored `tf × ln(1 + N / df)` where `tf` counts the
//!   word over those messages, `N` is their number and `df` how many of them contain the word; ties broken
//!   alphabetically; up to [`MAX_TOPICS`]. Every topic is a run of letters cut from the lowercased window text, so it
//!   occurs verbatim (case-insensitively) in the window. The bot's own name (every run of letters of `WindowInput::bot`)
//!   is never a topic: users greet the bot by name, which says nothing about what they talked about.
//! - **Summary**: the 1–3 most central messages — cosine of each message's `content` vector to the centroid of the
//!   candidates' (normalised) vectors; term overlap with the topics when vectors are missing — quoted in time order,
//!   each cut to about [`QUOTE_CHARS`] characters on a word boundary, after one sentence naming the topics and the tone.
//! - **Tone**: the majority `emotional_context` label mapped onto [`TONES`](super::TONES) (see [`emotion_tone`]).
//! - **Confidence**: `0.3 + 0.3 · n / (n + 10)` for `n` messages — below 0.6: it is not a model's judgement.
//!
//! `extractive/central.rs` holds the vector side (cosine, centroid, the most central messages).

mod central;

pub use central::{central_messages, centrality, common_dim, cosine, normalized};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use futures::future::BoxFuture;

use super::{
    Message, Prior, Purpose, SummarizeError, Summarizer, SummarizerKind, Summary, WindowInput,
};

/// Most topics the extractive summarizer returns.
pub const MAX_TOPICS: usize = 5;
/// With at least this many repeated words, words said only once are not topics.
pub const MIN_REPEATED_TOPICS: usize = 3;
/// Rough length of one quoted key message in the summary.
pub const QUOTE_CHARS: usize = 200;
/// Windows with more text than this always get a summary shorter than their text.
const SHORTER_THAN_TEXT_ABOVE: usize = 500;

/// Common English words (and chat filler) that are never topics. Only words of 4+ letters matter.
const STOPWORDS: &str = "\
about above across actually after again against ahead almost alone along already also although \
always among another anybody anyhow anymore anyone anything anyway anywhere aren around \
assistant away back basically became because become becomes been before began behind being \
believe below beside besides best better between beyond both bring brought came cannot \
certainly come comes coming could couldn didn does doesn doing done down during each either \
else enough especially even ever every everybody everyone everything everywhere exactly fine \
first from further gave gets getting give given gives giving goes going gone gonna good got \
gotta gotten great hadn happen hasn have haven having hello help hence here hers herself hey \
himself hmm hope however indeed instead into isn itself just keep kind knew know known knows \
last later least less lets like likely little long look looked looking looks lots made mainly \
make makes making many maybe mean means meant might mine more most mostly much must myself \
need needs neither never next nice nobody none nope nothing okay once only onto other others \
otherwise ought ours ourselves over own perhaps please pretty probably quite rather really \
right said same says seem seemed seems seen shall shan should shouldn since some somebody \
somehow someone something sometimes somewhat somewhere soon still such sure take taken takes \
taking tell tells than thank thanks that thats their theirs them themselves then there \
therefore these they thing things think thinking thinks this those though thought through thus \
today together told tomorrow took toward towards tried tries truly trying under unless until \
upon used user uses using usually very wanna want wanted wants wasn well went were weren what \
whatever when whenever where wherever whether which while whoever whole whom whose will with \
within without wonder would wouldn yeah yesterday your yours yourself yourselves \
afterward afterwards beforehand meanwhile sometime somewhat anytime everyday lately recently currently \
finally suddenly simply totally literally definitely honestly seriously obviously apparently \
hmmm okey alright cool awesome thx ohh uhm umm quick question questions welcome hows whats \
feel feels felt theyre youre wont cant dont didnt doesnt isnt arent wasnt";

static STOPWORD_SET: LazyLock<BTreeSet<&'static str>> =
    LazyLock::new(|| STOPWORDS.split_whitespace().collect());

fn is_stopword(w: &str) -> bool {
    STOPWORD_SET.contains(w)
}

/// The deterministic summarizer behind [`Summarizer`]; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extractive;

impl Extractive {
    /// Summarizes one window synchronously (what [`Summarizer::summarize`] returns, without the future).
    pub fn summarize_window(&self, w: &WindowInput) -> Result<Summary, SummarizeError> {
        summarize_window(w)
    }
}

impl Summarizer for Extractive {
    fn kind(&self) -> SummarizerKind {
        SummarizerKind::Extractive
    }

    fn summarize<'a>(
        &'a self,
        window: &'a WindowInput,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(std::future::ready(summarize_window(window)))
    }

    fn incremental(&self) -> bool {
        true
    }

    fn summarize_incremental<'a>(
        &'a self,
        prior: &'a Prior,
        new: &'a WindowInput,
        _purpose: Purpose,
    ) -> BoxFuture<'a, Result<Summary, SummarizeError>> {
        Box::pin(std::future::ready(summarize_incremental(prior, new)))
    }
}

/// How often a prior topic at `rank` (0 = first) counts in the incremental re-ranking: as if it had been said
/// `max(1, prior_messages / (2 * (rank + 1)))` times (a Zipf-like share of the messages the prior summary covers).
pub fn carried_weight(prior_messages: usize, rank: usize) -> f64 {
    (prior_messages as f64 / (2.0 * (rank as f64 + 1.0))).max(1.0)
}

/// The quotes of a summary this summarizer wrote (`... Key messages: "a" / "b"`), without their quotation marks.
pub fn quotes_of(text: &str) -> Vec<String> {
    let Some((_, tail)) = text.split_once(" Key messages: ") else {
        return Vec::new();
    };
    tail.split(" / ")
        .map(|q| {
            q.trim()
                .trim_matches('"')
                .trim_end_matches('…')
                .trim()
                .to_string()
        })
        .filter(|q| !q.is_empty())
        .collect()
}

/// The incremental extractive summary: the prior summary plus the messages since, at a cost proportional to the new
/// messages (the prior is a fixed-size input: at most [`MAX_TOPICS`] topics and 3 quotes). Pure and deterministic.
///
/// - **Topics**: the prior's topics and the new messages' topic words (as [`summarize_window`] finds them, over the
///   new messages only) re-ranked together: a new word scores its count in the new messages, a prior topic at rank
///   `r` scores [`carried_weight`] (plus its count in the new messages); best first, ties to the prior order, then
///   alphabetical; up to [`MAX_TOPICS`]. So topics of a long conversation persist until the new messages say other
///   words more often.
/// - **Tone**: the majority over the new messages' emotion labels and the prior's tone counted once per prior message.
/// - **Summary**: the topic sentence over the whole count, then the 1-3 key messages chosen by topic overlap among the
///   prior's quotes and the new messages.
pub fn summarize_incremental(prior: &Prior, new: &WindowInput) -> Result<Summary, SummarizeError> {
    let (messages, users) = spoken(new)?;
    let source = if users.is_empty() { &messages } else { &users };
    let exclude = bot_name_words(&new.bot);
    let fresh = key_topics_excluding(source, MAX_TOPICS * 2, &exclude);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in source.iter() {
        for w in words(&m.text) {
            *counts.entry(w).or_default() += 1;
        }
    }
    // (score, prior rank or usize::MAX, word)
    let mut scored: Vec<(f64, usize, String)> = Vec::new();
    for (r, t) in prior.key_topics.iter().enumerate() {
        let t = t.trim().to_lowercase();
        if t.is_empty() || scored.iter().any(|s| s.2 == t) {
            continue;
        }
        let said = counts.get(&t).copied().unwrap_or(0) as f64;
        scored.push((carried_weight(prior.message_count, r) + said, r, t));
    }
    for w in fresh {
        if scored.iter().any(|s| s.2 == w) {
            continue;
        }
        let said = counts.get(&w).copied().unwrap_or(0) as f64;
        scored.push((said, usize::MAX, w));
    }
    scored.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    let mut topics: Vec<String> = scored.into_iter().take(MAX_TOPICS).map(|s| s.2).collect();
    if topics.is_empty() {
        topics = fallback_topics(&messages, &exclude);
    }

    let tone_source: Vec<&Message> = if users.iter().any(|m| m.emotion.is_some()) {
        users.clone()
    } else {
        messages.clone()
    };
    let prior_tone = prior.emotional_tone.trim().to_lowercase();
    let carried = std::iter::repeat_n(prior_tone.as_str(), prior.message_count)
        .filter(|t| !t.is_empty() && *t != "mixed");
    let mixed_votes = if prior_tone == "mixed" {
        prior.message_count
    } else {
        0
    };
    let tone = majority_tone(
        tone_source
            .iter()
            .filter_map(|m| m.emotion.as_deref())
            .chain(carried)
            .chain(std::iter::repeat_n("mixed", mixed_votes)),
    );

    // The prior's quotes compete with the new messages for the key messages, by topic overlap (no vectors: the
    // quotes have none).
    let carried_quotes: Vec<Message> = quotes_of(&prior.text)
        .into_iter()
        .enumerate()
        .map(|(i, q)| Message {
            point_id: format!("prior-{i}"),
            role: source.first().map_or("user".into(), |m| m.role.clone()),
            text: q,
            ts_ms: prior.covers_until_ms,
            emotion: None,
            vector: Vec::new(),
        })
        .collect();
    let stripped: Vec<Message> = source
        .iter()
        .map(|m| Message {
            vector: Vec::new(),
            ..(*m).clone()
        })
        .collect();
    let candidates: Vec<&Message> = carried_quotes.iter().chain(stripped.iter()).collect();
    let total = prior.message_count + messages.len();
    let text_chars = prior.text.chars().count() + new.text_chars();
    let text = compose_summary(&candidates, &topics, tone, total, text_chars);
    let n = total as f64;
    Summary {
        text,
        key_topics: topics,
        emotional_tone: tone.to_string(),
        confidence: 0.3 + 0.3 * n / (n + 10.0),
        kind: SummarizerKind::Extractive,
        usage: None,
    }
    .validate()
}

/// Summarizes one window; pure and deterministic.
/// A window's messages with text, and the user's among them; `Empty` when none has text.
#[allow(clippy::type_complexity)]
fn spoken(w: &WindowInput) -> Result<(Vec<&Message>, Vec<&Message>), SummarizeError> {
    let messages: Vec<&Message> = w
        .messages
        .iter()
        .filter(|m| !m.text.trim().is_empty())
        .collect();
    if messages.is_empty() {
        return Err(SummarizeError::Empty);
    }
    let users = messages
        .iter()
        .copied()
        .filter(|m| m.role == "user")
        .collect();
    Ok((messages, users))
}

pub fn summarize_window(w: &WindowInput) -> Result<Summary, SummarizeError> {
    let (messages, users) = spoken(w)?;

    let exclude = bot_name_words(&w.bot);
    let mut topics = if users.is_empty() {
        Vec::new()
    } else {
        key_topics_excluding(&users, MAX_TOPICS, &exclude)
    };
    if topics.is_empty() {
        topics = key_topics_excluding(&messages, MAX_TOPICS, &exclude);
    }
    if topics.is_empty() {
        topics = fallback_topics(&messages, &exclude);
    }

    let tone_source: Vec<&Message> = if users.iter().any(|m| m.emotion.is_some()) {
        users.clone()
    } else {
        messages.clone()
    };
    let tone = majority_tone(tone_source.iter().filter_map(|m| m.emotion.as_deref()));

    let candidates = if users.is_empty() { &messages } else { &users };
    let text_chars = w.text_chars();
    let text = compose_summary(candidates, &topics, tone, messages.len(), text_chars);

    let n = messages.len() as f64;
    Summary {
        text,
        key_topics: topics,
        emotional_tone: tone.to_string(),
        confidence: 0.3 + 0.3 * n / (n + 10.0),
        kind: SummarizerKind::Extractive,
        usage: None,
    }
    .validate()
}

/// Lowercased runs of letters (`char::is_alphabetic`) of `text`, in order. Each is a substring of
/// `text.to_lowercase()`.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Topic words of the given messages by `tf × ln(1 + N / df)`, best first, ties alphabetical; at most `k`. When at
/// least [`MIN_REPEATED_TOPICS`] words occur twice or more, words that occur once are not topics.
pub fn key_topics(messages: &[&Message], k: usize) -> Vec<String> {
    key_topics_excluding(messages, k, &BTreeSet::new())
}

/// The words of a bot's name (`elena`, `marcus`; `elena_7d` -> `elena`, `d`): never topics of its windows.
pub fn bot_name_words(bot: &str) -> BTreeSet<String> {
    words(bot).into_iter().collect()
}

/// [`key_topics`] without the words in `exclude` (the bot's name).
pub fn key_topics_excluding(
    messages: &[&Message],
    k: usize,
    exclude: &BTreeSet<String>,
) -> Vec<String> {
    let n_docs = messages.len();
    if n_docs == 0 || k == 0 {
        return Vec::new();
    }
    // BTreeMap: iteration order (and so the result) never depends on hashing.
    let mut tf: BTreeMap<String, usize> = BTreeMap::new();
    let mut df: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        let mut seen = BTreeSet::new();
        for w in words(&m.text) {
            if w.chars().count() < 4 || is_stopword(&w) || exclude.contains(&w) {
                continue;
            }
            *tf.entry(w.clone()).or_default() += 1;
            if seen.insert(w.clone()) {
                *df.entry(w).or_default() += 1;
            }
        }
    }
    // Words said more than once make better topics than the many said once (whose ties would otherwise be
    // settled by the alphabet): when there are enough repeated words, the one-off words are left out.
    let repeated = tf.values().filter(|&&f| f >= 2).count();
    let min_tf = if repeated >= MIN_REPEATED_TOPICS.min(k) {
        2
    } else {
        1
    };
    let mut scored: Vec<(f64, String)> = tf
        .into_iter()
        .filter(|(_, f)| *f >= min_tf)
        .map(|(w, f)| {
            let d = df[&w] as f64;
            (f as f64 * (1.0 + n_docs as f64 / d).ln(), w)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, w)| w).collect()
}

/// When no word of 4+ letters survives: the most frequent shorter non-stopword words, else the first
/// whitespace-separated token of the text (emoji-only windows). Always non-empty for non-blank text.
fn fallback_topics(messages: &[&Message], exclude: &BTreeSet<String>) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        for w in words(&m.text) {
            if w.chars().count() >= 2 && !is_stopword(&w) && !exclude.contains(&w) {
                *counts.entry(w).or_default() += 1;
            }
        }
    }
    let mut v: Vec<(usize, String)> = counts.into_iter().map(|(w, c)| (c, w)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut out: Vec<String> = v.into_iter().take(MAX_TOPICS).map(|(_, w)| w).collect();
    if out.is_empty()
        && let Some(tok) = messages
            .iter()
            .flat_map(|m| m.text.split_whitespace())
            .next()
    {
        out.push(tok.to_lowercase().chars().take(40).collect::<String>());
        // `take(40)` can cut a multi-char lowercase expansion; the token itself is always a safe substring
        if !messages
            .iter()
            .any(|m| m.text.to_lowercase().contains(out[0].as_str()))
        {
            out[0] = tok.to_string();
        }
    }
    out
}

/// The tone group of one `emotional_context` label: `positive`, `negative` or `neutral`; `None` for a label we do
/// not know (it is then not counted). Case and surrounding text (`"Joy"`, `"joy:0.8"`) are tolerated.
pub fn emotion_tone(label: &str) -> Option<&'static str> {
    let l = label.trim().to_lowercase();
    let word: String = l
        .chars()
        .take_while(|c| c.is_alphabetic() || *c == '_')
        .collect();
    let tone = match word.as_str() {
        "joy" | "joyful" | "happy" | "happiness" | "excitement" | "excited" | "love"
        | "gratitude" | "grateful" | "optimism" | "optimistic" | "hope" | "hopeful" | "pride"
        | "proud" | "relief" | "amusement" | "amused" | "admiration" | "approval" | "caring"
        | "contentment" | "content" | "enthusiasm" | "satisfaction" | "satisfied" | "delight"
        | "positive" | "trust" | "calm" | "playful" | "affection" | "serenity" | "peaceful"
        | "thankful" | "inspired" | "confident" => "positive",
        "sadness" | "sad" | "anger" | "angry" | "frustration" | "frustrated" | "fear"
        | "afraid" | "anxiety" | "anxious" | "disgust" | "disappointment" | "disappointed"
        | "grief" | "remorse" | "embarrassment" | "nervousness" | "nervous" | "annoyance"
        | "annoyed" | "disapproval" | "stress" | "stressed" | "loneliness" | "lonely" | "worry"
        | "worried" | "shame" | "guilt" | "jealousy" | "hurt" | "negative" | "despair"
        | "depression" | "depressed" | "irritation" | "rage" | "overwhelmed" | "helpless" => {
            "negative"
        }
        "neutral" | "curiosity" | "curious" | "surprise" | "realization" | "confusion"
        | "confused" | "thoughtful" | "contemplative" | "contemplation" | "interest"
        | "interested" | "none" => "neutral",
        _ => return None,
    };
    Some(tone)
}

/// The window's tone from its emotion labels: the majority group; `mixed` when positive and negative both reach 30 %
/// of the counted labels (or tie for the lead); `neutral` when nothing is counted.
pub fn majority_tone<'a>(labels: impl IntoIterator<Item = &'a str>) -> &'static str {
    let (mut pos, mut neg, mut neu) = (0usize, 0usize, 0usize);
    for l in labels {
        // a summary's own tone (rollups summarize summaries): mixed counts once each way
        if l.trim().eq_ignore_ascii_case("mixed") {
            pos += 1;
            neg += 1;
            continue;
        }
        match emotion_tone(l) {
            Some("positive") => pos += 1,
            Some("negative") => neg += 1,
            Some(_) => neu += 1,
            None => {}
        }
    }
    let total = pos + neg + neu;
    if total == 0 {
        return "neutral";
    }
    let share = |c: usize| c as f64 / total as f64;
    if share(pos) >= 0.3 && share(neg) >= 0.3 {
        return "mixed";
    }
    if pos == neg && pos > neu {
        return "mixed";
    }
    if pos > neg && pos > neu {
        "positive"
    } else if neg > pos && neg > neu {
        "negative"
    } else {
        "neutral"
    }
}

/// `text` cut to at most about `max_chars` characters at a word boundary, with `…` when cut; whitespace collapsed.
pub fn trim_on_word(text: &str, max_chars: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        return flat;
    }
    let cut: String = flat.chars().take(max_chars.max(1)).collect();
    let at = match cut.rfind(' ') {
        Some(i) if i >= cut.len() / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!(
        "{}…",
        at.trim_end_matches(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ':')
    )
}

/// "a", "a and b", "a, b and c".
pub fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [rest @ .., last] => format!("{} and {}", rest.join(", "), last),
    }
}

fn compose_summary(
    candidates: &[&Message],
    topics: &[String],
    tone: &str,
    n_messages: usize,
    text_chars: usize,
) -> String {
    // A rollup's input: one message per finer summary, role `<what> summary` (`crate::rollup::CONVERSATION_ROLE`,
    // `crate::rollup::DAY_ROLE`).
    if let Some(what) = candidates
        .first()
        .and_then(|m| m.role.strip_suffix(" summary"))
        .filter(|w| !w.is_empty() && candidates.iter().all(|m| m.role == candidates[0].role))
    {
        let head = format!(
            "Across {n_messages} {what}{} the user talked about {} (tone: {tone}).",
            if n_messages == 1 { "" } else { "s" },
            join_and(topics)
        );
        let k = candidates.len().min(3);
        let per = QUOTE_CHARS.min(2 * QUOTE_CHARS / k.max(1));
        let picked = central_messages(candidates, topics, k);
        let quotes: Vec<String> = picked
            .iter()
            .map(|&i| trim_on_word(&candidates[i].text, per))
            .collect();
        return format!("{head} Highlights: {}", quotes.join(" | "));
    }
    let who = if candidates.iter().all(|m| m.role == "user") {
        "The user"
    } else {
        "The conversation"
    };
    let verb = if who == "The user" {
        "talked about"
    } else {
        "was about"
    };
    let head = format!(
        "{who} {verb} {} over {n_messages} message{} (tone: {tone}).",
        join_and(topics),
        if n_messages == 1 { "" } else { "s" }
    );
    let k = match candidates.len() {
        0 => 0,
        1..=2 => 1,
        3..=5 => 2,
        _ => 3,
    };
    // Keep the summary shorter than the window's text for anything but tiny windows.
    let limit = if text_chars > SHORTER_THAN_TEXT_ABOVE {
        text_chars * 3 / 4
    } else {
        usize::MAX
    };
    let mut k = k;
    loop {
        if k == 0 {
            let h = trim_on_word(&head, limit.min(head.chars().count()));
            return h;
        }
        let picked = central_messages(candidates, topics, k);
        let overhead = head.chars().count() + " Key messages: ".len() + picked.len() * 6;
        let per = if limit == usize::MAX {
            QUOTE_CHARS
        } else {
            QUOTE_CHARS.min(limit.saturating_sub(overhead) / k)
        };
        if per < 40 && k > 1 {
            k -= 1;
            continue;
        }
        if per < 20 {
            k = 0;
            continue;
        }
        let quotes: Vec<String> = picked
            .iter()
            .map(|&i| format!("\"{}\"", trim_on_word(&candidates[i].text, per)))
            .collect();
        return format!("{head} Key messages: {}", quotes.join(" / "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: i64, role: &str, text: &str, emotion: Option<&str>, vector: Vec<f32>) -> Message {
        Message {
            point_id: format!("p{i}"),
            role: role.into(),
            text: text.into(),
            ts_ms: 1_700_000_000_000 + i * 60_000,
            emotion: emotion.map(str::to_string),
            vector,
        }
    }

    fn window(messages: Vec<Message>) -> WindowInput {
        WindowInput {
            bot: "elena".into(),
            user_id: "42".into(),
            start_ms: 1_700_000_000_000,
            end_ms: 1_700_000_000_000 + 86_400_000,
            messages,
        }
    }

    fn sample() -> WindowInput {
        window(vec![
            msg(
                0,
                "user",
                "I started learning the guitar last week, my fingers hurt from the chords.",
                Some("joy"),
                vec![],
            ),
            msg(
                1,
                "assistant",
                "That is wonderful! Guitar chords get easier with practice.",
                Some("joy"),
                vec![],
            ),
            msg(
                2,
                "user",
                "My sister Maria gave me her old guitar. We practice chords together on Sundays.",
                Some("love"),
                vec![],
            ),
            msg(
                3,
                "assistant",
                "How lovely to share that with Maria.",
                Some("joy"),
                vec![],
            ),
            msg(
                4,
                "user",
                "Work has been stressful though, the deadline for the marine biology report is Friday.",
                Some("anxiety"),
                vec![],
            ),
            msg(
                5,
                "user",
                "Still, playing guitar in the evening helps me relax after the report writing.",
                Some("joy"),
                vec![],
            ),
        ])
    }

    #[test]
    fn stopwords_are_lowercase_words() {
        assert!(STOPWORD_SET.len() > 250);
        assert!(
            STOPWORD_SET
                .iter()
                .all(|w| w.chars().all(|c| c.is_ascii_lowercase()))
        );
        assert!(is_stopword("because") && !is_stopword("guitar"));
    }

    #[test]
    fn topics_occur_in_window_text() {
        let w = sample();
        let s = summarize_window(&w).unwrap();
        let text: String = w
            .messages
            .iter()
            .map(|m| m.text.to_lowercase())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!s.key_topics.is_empty() && s.key_topics.len() <= MAX_TOPICS);
        for t in &s.key_topics {
            assert!(text.contains(&t.to_lowercase()), "topic {t:?} not in text");
            assert!(t.chars().count() >= 4);
        }
        assert_eq!(s.key_topics[0], "guitar", "{:?}", s.key_topics);
        assert!(s.key_topics.contains(&"chords".to_string()));
        assert_eq!(s.kind, SummarizerKind::Extractive);
        assert!(s.usage.is_none());
    }

    #[test]
    fn topics_come_from_user_messages_and_fall_back_to_all() {
        let w = window(vec![
            msg(0, "user", "ok", None, vec![]),
            msg(
                1,
                "assistant",
                "Tell me about astronomy telescopes",
                None,
                vec![],
            ),
        ]);
        let s = summarize_window(&w).unwrap();
        assert!(
            s.key_topics.contains(&"astronomy".to_string()),
            "{:?}",
            s.key_topics
        );
        // non-ASCII letters and emoji-only windows still give a topic that is in the text
        let w = window(vec![msg(0, "user", "😀 🎉", None, vec![])]);
        let s = summarize_window(&w).unwrap();
        assert_eq!(s.key_topics, vec!["😀".to_string()]);
        let w = window(vec![msg(
            0,
            "user",
            "Ich liebe Übungen mit Gitarre",
            None,
            vec![],
        )]);
        let s = summarize_window(&w).unwrap();
        for t in &s.key_topics {
            assert!("ich liebe übungen mit gitarre".contains(t.as_str()), "{t}");
        }
    }

    #[test]
    fn tie_broken_alphabetically() {
        let w = window(vec![msg(0, "user", "zebra apple mango", None, vec![])]);
        let s = summarize_window(&w).unwrap();
        assert_eq!(s.key_topics, vec!["apple", "mango", "zebra"]);
    }

    #[test]
    fn output_is_deterministic() {
        let w = sample();
        let a = summarize_window(&w).unwrap();
        for _ in 0..5 {
            assert_eq!(summarize_window(&w).unwrap(), a);
        }
        assert!(
            a.text.starts_with("The user talked about guitar"),
            "{}",
            a.text
        );
        assert!(a.text.contains("Key messages: \""), "{}", a.text);
        assert!(!crate::summarize::looks_like_placeholder(&a.text));
    }

    #[test]
    fn tone_majority_and_mixed() {
        assert_eq!(
            majority_tone(["joy", "joy", "neutral", "sadness"]),
            "positive"
        );
        assert_eq!(
            majority_tone(["frustration", "anger", "neutral", "joy"]),
            "negative"
        );
        assert_eq!(majority_tone(["neutral", "neutral", "joy"]), "neutral");
        assert_eq!(
            majority_tone(["joy", "joy", "sadness", "fear", "neutral"]),
            "mixed"
        );
        assert_eq!(majority_tone(["joy", "anger"]), "mixed");
        assert_eq!(majority_tone(Vec::<&str>::new()), "neutral");
        assert_eq!(majority_tone(["zorblax"]), "neutral");
        assert_eq!(majority_tone(["mixed"]), "mixed");
        assert_eq!(majority_tone(["positive", "mixed"]), "mixed");
        assert_eq!(majority_tone(["positive", "positive", "mixed"]), "positive");
        assert_eq!(
            majority_tone(["JOY", "Excitement:0.9", "gratitude"]),
            "positive"
        );
        // the window's tone uses the user's labels
        let s = summarize_window(&sample()).unwrap();
        assert_eq!(s.emotional_tone, "positive");
        let w = window(vec![
            msg(0, "user", "my cat is sick again", Some("sadness"), vec![]),
            msg(1, "assistant", "I am so sorry", Some("joy"), vec![]),
            msg(
                2,
                "user",
                "the vet visit went badly",
                Some("frustration"),
                vec![],
            ),
        ]);
        assert_eq!(summarize_window(&w).unwrap().emotional_tone, "negative");
    }

    #[test]
    fn centrality_picks_message_nearest_centroid() {
        // Three directions; message 2 sits between the others, i.e. nearest to the centroid.
        let w = window(vec![
            msg(
                0,
                "user",
                "the first message is about apples and pears",
                None,
                vec![1.0, 0.0, 0.0],
            ),
            msg(
                1,
                "user",
                "the second message is about bikes and trains",
                None,
                vec![0.0, 1.0, 0.0],
            ),
            msg(
                2,
                "user",
                "the middle message mixes fruit with travel",
                None,
                vec![0.6, 0.6, 0.1],
            ),
            msg(
                3,
                "user",
                "the fourth message is about oceans and ships",
                None,
                vec![0.0, 0.2, 1.0],
            ),
        ]);
        let ms: Vec<&Message> = w.messages.iter().collect();
        assert_eq!(central_messages(&ms, &[], 1), vec![2]);
        let c = centrality(&ms).unwrap();
        let best = (0..4)
            .max_by(|&a, &b| c[a].unwrap().total_cmp(&c[b].unwrap()))
            .unwrap();
        assert_eq!(best, 2);
        // picked messages come back in time order
        let two = central_messages(&ms, &[], 2);
        assert!(two.windows(2).all(|p| p[0] < p[1]));
        assert!(two.contains(&2));
        let s = summarize_window(&w).unwrap();
        assert!(
            s.text
                .contains("the middle message mixes fruit with travel"),
            "{}",
            s.text
        );
    }

    #[test]
    fn without_vectors_centrality_uses_topic_overlap() {
        let w = window(vec![
            msg(
                0,
                "user",
                "I went hiking near the lake yesterday afternoon",
                None,
                vec![],
            ),
            msg(
                1,
                "user",
                "The lake trail had snow, so hiking took hours, and my camera froze",
                None,
                vec![],
            ),
            msg(
                2,
                "user",
                "My camera battery died on the trail",
                None,
                vec![],
            ),
            msg(3, "user", "Dinner was pasta", None, vec![]),
        ]);
        let users: Vec<&Message> = w.messages.iter().collect();
        let topics = key_topics(&users, MAX_TOPICS);
        for t in ["hiking", "lake", "trail", "camera"] {
            assert!(topics.contains(&t.to_string()), "{topics:?}");
        }
        // message 1 mentions all four recurring topics
        assert_eq!(central_messages(&users, &topics, 1), vec![1]);
    }

    #[test]
    fn empty_window_is_an_error() {
        assert!(matches!(
            summarize_window(&window(vec![])),
            Err(SummarizeError::Empty)
        ));
        assert!(matches!(
            summarize_window(&window(vec![msg(0, "user", "   ", None, vec![])])),
            Err(SummarizeError::Empty)
        ));
    }

    #[test]
    fn long_window_summary_is_shorter_than_text() {
        let mut ms = Vec::new();
        for i in 0..60 {
            let text = format!(
                "Message number {i} talks at length about gardening, tomatoes, compost heaps and the weather in \
                 late spring, with many words so that every message is long enough to need trimming in the summary {i}."
            );
            ms.push(msg(
                i,
                if i % 2 == 0 { "user" } else { "assistant" },
                &text,
                Some("neutral"),
                vec![],
            ));
        }
        let w = window(ms);
        let s = summarize_window(&w).unwrap();
        assert!(s.text.chars().count() < w.text_chars());
        assert!(s.text.chars().count() < 3 * QUOTE_CHARS + 200, "{}", s.text);
        assert!(s.confidence > 0.3 && s.confidence < 0.6);
        // a window just over 500 chars too
        let w = window(vec![
            msg(
                0,
                "user",
                &"alpha beta gamma delta ".repeat(12),
                None,
                vec![],
            ),
            msg(
                1,
                "user",
                &"epsilon zeta theta iota ".repeat(12),
                None,
                vec![],
            ),
            msg(
                2,
                "user",
                &"kappa lambda sigma omega ".repeat(12),
                None,
                vec![],
            ),
        ]);
        assert!(w.text_chars() > 500);
        let s = summarize_window(&w).unwrap();
        assert!(
            s.text.chars().count() < w.text_chars(),
            "{} vs {}",
            s.text.chars().count(),
            w.text_chars()
        );
    }

    #[test]
    fn confidence_grows_with_count_and_stays_below_llm() {
        let one = summarize_window(&window(vec![msg(
            0,
            "user",
            "hiking in the alps",
            None,
            vec![],
        )]))
        .unwrap();
        let many = summarize_window(&sample()).unwrap();
        assert!(
            one.confidence >= 0.3 && one.confidence < many.confidence && many.confidence <= 0.6
        );
    }

    #[test]
    fn trim_on_word_boundary() {
        assert_eq!(trim_on_word("short text", 200), "short text");
        let t = trim_on_word("one two three four five six seven", 15);
        assert_eq!(t, "one two three…");
        assert!(trim_on_word(&"x".repeat(500), 200).chars().count() <= 201);
    }

    /// The windows of the sample conversations (`demo/conversations.json`, as `scripts/demo` loads them): session
    /// windows of each user's messages, at least 5 messages (MIN_MESSAGES_FOR_SUMMARY).
    fn demo_windows() -> Vec<WindowInput> {
        use crate::tracker::{TrackerConfig, canonical_windows};
        let data: serde_json::Value =
            serde_json::from_str(include_str!("../../demo/conversations.json")).unwrap();
        let t0: i64 = 1_763_629_200_000;
        let mut out = Vec::new();
        for conv in data["conversations"].as_array().unwrap() {
            let bot = conv["bot"].as_str().unwrap().to_string();
            let mut msgs = Vec::new();
            for s in conv["sessions"].as_array().unwrap() {
                let start = t0 + s["start_minute"].as_i64().unwrap() * 60_000;
                for (i, ex) in s["exchanges"].as_array().unwrap().iter().enumerate() {
                    let t = start + 120_000 * i as i64;
                    let emotion = ex["emotion"].as_str();
                    for (role, text, ts) in
                        [("user", &ex["user"], t), ("assistant", &ex["bot"], t + 1)]
                    {
                        let mut m = msg(
                            msgs.len() as i64,
                            role,
                            text.as_str().unwrap(),
                            emotion,
                            vec![],
                        );
                        m.ts_ms = ts;
                        msgs.push(m);
                    }
                }
            }
            let times: Vec<i64> = msgs.iter().map(|m| m.ts_ms).collect();
            let mut rest = msgs.as_slice();
            for (start, end, n, _) in canonical_windows(&TrackerConfig::default(), &times) {
                let (w, tail) = rest.split_at(n as usize);
                rest = tail;
                if n >= 5 {
                    out.push(WindowInput {
                        bot: bot.clone(),
                        user_id: conv["user_id"].as_str().unwrap().into(),
                        start_ms: start,
                        end_ms: end,
                        messages: w.to_vec(),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn demo_topics_read_well() {
        let windows = demo_windows();
        assert_eq!(windows.len(), 4, "the demo has four windows of 5+ messages");
        let filler = [
            "afterwards",
            "about",
            "quick",
            "question",
            "mostly",
            "thanks",
            "welcome",
            "feel",
        ];
        for w in &windows {
            let s = summarize_window(w).unwrap();
            for t in &s.key_topics {
                assert_ne!(
                    t, &w.bot,
                    "the bot's own name is a topic: {:?}",
                    s.key_topics
                );
                assert!(
                    !filler.contains(&t.as_str()),
                    "filler topic {t:?}: {:?}",
                    s.key_topics
                );
            }
            // and the topics still say what the window was about
            assert!(s.key_topics.len() >= 3, "{:?}", s.key_topics);
        }
        let all: Vec<Vec<String>> = windows
            .iter()
            .map(|w| summarize_window(w).unwrap().key_topics)
            .collect();
        assert!(
            all.iter().any(|t| t.contains(&"coral".to_string())),
            "{all:?}"
        );
        assert!(
            all.iter().any(|t| t.contains(&"marathon".to_string())),
            "{all:?}"
        );
        // a bot whose name is also a word keeps that word out of its own windows only
        let mut w = windows[0].clone();
        w.bot = "coral".into();
        assert!(
            !summarize_window(&w)
                .unwrap()
                .key_topics
                .contains(&"coral".to_string())
        );
    }

    #[tokio::test]
    async fn trait_object_works() {
        let s: Box<dyn Summarizer> = Box::new(Extractive);
        assert_eq!(s.kind(), SummarizerKind::Extractive);
        let out = s.summarize(&sample()).await.unwrap();
        assert_eq!(out, summarize_window(&sample()).unwrap());
    }

    // ---- incremental ------------------------------------------------------------------------------------------

    fn prior(topics: &[&str], n: usize, text: &str) -> Prior {
        Prior {
            text: text.into(),
            key_topics: topics.iter().map(|t| t.to_string()).collect(),
            emotional_tone: "positive".into(),
            message_count: n,
            covers_until_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn incremental_keeps_long_standing_topics_against_a_few_new_words() {
        let p = prior(
            &["guitar", "chords"],
            60,
            "The user talked about guitar and chords over 60 messages (tone: positive). Key messages: \
             \"I practise the guitar chords every evening\"",
        );
        let w = window(vec![
            msg(100, "user", "Rainy today.", Some("sadness"), vec![]),
            msg(
                101,
                "user",
                "I stayed home, it was rainy.",
                Some("neutral"),
                vec![],
            ),
        ]);
        let s = summarize_incremental(&p, &w).unwrap();
        assert_eq!(&s.key_topics[..2], ["guitar", "chords"], "{s:?}");
        assert!(s.key_topics.contains(&"rainy".to_string()), "{s:?}");
        assert!(s.text.contains("over 62 messages"), "{}", s.text);
        // 60 prior messages of positive tone outweigh two new labels
        assert_eq!(s.emotional_tone, "positive");
        // the prior's key message still competes with the new ones
        assert!(s.text.contains("guitar chords every evening"), "{}", s.text);
    }

    #[test]
    fn incremental_new_topics_win_once_said_more_often_than_the_prior_weight() {
        let p = prior(
            &["guitar"],
            4,
            "The user talked about guitar over 4 messages (tone: positive).",
        );
        let new: Vec<Message> = (0..12)
            .map(|i| {
                msg(
                    200 + i,
                    "user",
                    "the marathon training and marathon shoes",
                    Some("joy"),
                    vec![],
                )
            })
            .collect();
        let s = summarize_incremental(&p, &window(new)).unwrap();
        assert_eq!(s.key_topics[0], "marathon", "{s:?}");
        assert!(s.key_topics.contains(&"guitar".to_string()), "{s:?}");
    }

    #[test]
    fn quotes_round_trip_through_a_summary() {
        let s = summarize_window(&sample()).unwrap();
        let q = quotes_of(&s.text);
        assert!(!q.is_empty(), "{}", s.text);
        for quote in q {
            assert!(!quote.starts_with('"') && !quote.is_empty());
        }
        assert!(quotes_of("no quotes here").is_empty());
    }

    proptest::proptest! {
        /// Every topic of an incremental summary is a prior topic or a word of the new messages; the summary counts
        /// the prior's messages plus the new ones and validates; the same input gives the same summary.
        #[test]
        fn incremental_topics_come_from_the_prior_or_the_new_messages(
            picks in proptest::collection::vec((0usize..6, 0usize..4), 1..30),
            prior_n in 0usize..500,
            prior_topics in proptest::collection::vec(0usize..6, 0..6),
        ) {
            const WORDS: &[&str] = &["guitar", "hiking", "bakery", "kitten", "marathon", "lighthouse"];
            const EMO: &[&str] = &["joy", "sadness", "neutral", "anger"];
            let new: Vec<Message> = picks
                .iter()
                .enumerate()
                .map(|(i, (k, e))| msg(i as i64, "user", &format!("about the {} and the {}", WORDS[*k], WORDS[(k + i) % 6]), Some(EMO[*e]), vec![]))
                .collect();
            let topics: Vec<&str> = prior_topics.iter().map(|k| WORDS[*k]).collect();
            let p = prior(&topics, prior_n, "The user talked about things (tone: neutral).");
            let w = window(new);
            let s = summarize_incremental(&p, &w).unwrap();
            let said = w.messages.iter().map(|m| m.text.to_lowercase()).collect::<Vec<_>>().join(" ");
            for t in &s.key_topics {
                proptest::prop_assert!(topics.contains(&t.as_str()) || said.contains(t.as_str()), "{t} from nowhere");
            }
            let count = format!("over {} message", prior_n + w.messages.len());
            proptest::prop_assert!(s.text.contains(&count), "{}", s.text);
            proptest::prop_assert_eq!(s.clone(), summarize_incremental(&p, &w).unwrap());
        }
    }
}
