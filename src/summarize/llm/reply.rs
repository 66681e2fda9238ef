//! The reply: parsing and validating the model's JSON, and the prompt of the one repair call.

use super::{REPAIR_QUOTE_CHARS, chars};
use crate::summarize::extractive::emotion_tone;
use crate::summarize::{SummarizeError, SummarizerKind, Summary, TONES};

/// The system prompt of the one repair call: the original instructions, the rejected reply and why.
pub(super) fn repair_system_prompt(system: &str, bad_reply: &str, reason: &str) -> String {
    let quoted = if chars(bad_reply) > REPAIR_QUOTE_CHARS {
        format!(
            "{}…",
            bad_reply
                .chars()
                .take(REPAIR_QUOTE_CHARS)
                .collect::<String>()
        )
    } else {
        bad_reply.to_string()
    };
    format!(
        "{system}\n\nYour previous answer for this conversation was rejected ({reason}). It was:\n<<<\n{quoted}\n>>>\n\
         Answer again with ONLY the JSON object described above, nothing before or after it."
    )
}

/// The fields of a reply object. Liberal in what it accepts: a field may come under its name or an alias, both may be
/// present side by side (the first non-null one in [`field`]'s order wins, the other is ignored), and keys nobody
/// asked for are ignored.
#[derive(Debug)]
struct ReplyJson {
    summary: String,
    key_topics: serde_json::Value,
    emotional_tone: serde_json::Value,
    confidence: serde_json::Value,
}

/// The first present, non-null value among `names`.
fn field(obj: &serde_json::Map<String, serde_json::Value>, names: &[&str]) -> serde_json::Value {
    names
        .iter()
        .filter_map(|n| obj.get(*n))
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

impl ReplyJson {
    fn from_str(c: &str) -> Result<ReplyJson, String> {
        let obj = match serde_json::from_str::<serde_json::Value>(c).map_err(|e| e.to_string())? {
            serde_json::Value::Object(o) => o,
            other => return Err(format!("expected a JSON object, got {}", json_kind(&other))),
        };
        let summary = match field(&obj, &["summary", "summary_text", "summaryText"]) {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => return Err("missing field `summary`".into()),
            other => return Err(format!("`summary` is {}, not a string", json_kind(&other))),
        };
        Ok(ReplyJson {
            summary,
            key_topics: field(&obj, &["key_topics", "topics", "keyTopics"]),
            emotional_tone: field(&obj, &["emotional_tone", "tone", "emotionalTone"]),
            confidence: field(&obj, &["confidence"]),
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The JSON object inside a reply: the whole text, the inside of a ```` ``` ```` / ```` ```json ```` fence, or the
/// span from the first `{` to the last `}`.
fn json_candidates(content: &str) -> Vec<&str> {
    let t = content.trim();
    let mut out = vec![t];
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
        let inner = rest.rsplit_once("```").map_or(rest, |(a, _)| a);
        out.push(inner.trim());
    }
    if let (Some(a), Some(b)) = (t.find('{'), t.rfind('}'))
        && a < b
    {
        out.push(&t[a..=b]);
    }
    out
}

/// Parses and validates a model reply into an LLM [`Summary`] (without usage); `Err` carries the reason.
pub fn parse_reply(content: &str) -> Result<Summary, String> {
    if content.trim().is_empty() {
        return Err("empty reply".into());
    }
    let mut first_err = None;
    let mut parsed = None;
    for c in json_candidates(content) {
        match ReplyJson::from_str(c) {
            Ok(r) => {
                parsed = Some(r);
                break;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some(r) = parsed else {
        let snippet: String = content.trim().chars().take(120).collect();
        return Err(format!(
            "reply is not the JSON object asked for ({}): {snippet:?}",
            first_err.map(|e| e.to_string()).unwrap_or_default()
        ));
    };
    let key_topics: Vec<String> = match r.key_topics {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })
            .collect(),
        serde_json::Value::String(s) => s.split([',', ';']).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let tone_raw = match r.emotional_tone {
        serde_json::Value::String(s) => s.trim().to_lowercase(),
        _ => String::new(),
    };
    let emotional_tone = if TONES.contains(&tone_raw.as_str()) {
        tone_raw
    } else {
        // A label instead of a tone ("happy", "frustrated"): map it; anything else fails validation.
        emotion_tone(&tone_raw)
            .map(str::to_string)
            .unwrap_or(tone_raw)
    };
    let confidence = match r.confidence {
        serde_json::Value::Number(n) => n.as_f64().unwrap_or(0.5),
        serde_json::Value::String(s) => s
            .trim()
            .trim_end_matches('%')
            .parse::<f64>()
            .map(|v| if v > 1.0 { v / 100.0 } else { v })
            .unwrap_or(0.5),
        _ => 0.5,
    };
    Summary {
        text: r.summary,
        key_topics,
        emotional_tone,
        confidence,
        kind: SummarizerKind::Llm,
        usage: None,
    }
    .validate()
    .map_err(|e| match e {
        SummarizeError::Invalid(why) => why,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::llm::*;

    // ---- reply parsing / repair decision ----------------------------------------------------------------------

    const GOOD: &str = r#"{"summary": "The user finished a pottery bowl for their grandmother and worries about a knee before a marathon.", "key_topics": ["pottery", "marathon", "knee"], "emotional_tone": "mixed", "confidence": 0.82}"#;

    #[test]
    fn parses_plain_fenced_and_wrapped_json() {
        let s = parse_reply(GOOD).unwrap();
        assert_eq!(s.key_topics, vec!["pottery", "marathon", "knee"]);
        assert_eq!(s.emotional_tone, "mixed");
        assert_eq!(s.kind, SummarizerKind::Llm);
        assert!((s.confidence - 0.82).abs() < 1e-9);
        assert_eq!(parse_reply(&format!("```json\n{GOOD}\n```")).unwrap(), s);
        assert_eq!(parse_reply(&format!("```\n{GOOD}\n```")).unwrap(), s);
        assert_eq!(
            parse_reply(&format!("Here you go:\n{GOOD}\nHope that helps!")).unwrap(),
            s
        );
    }

    #[test]
    fn lenient_where_harmless() {
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":"chess, openings","emotional_tone":"Happy","confidence":"0.9"}"#).unwrap();
        assert_eq!(s.key_topics, vec!["chess", "openings"]);
        assert_eq!(s.emotional_tone, "positive");
        assert!((s.confidence - 0.9).abs() < 1e-9);
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":["chess"],"emotional_tone":"neutral","confidence":7}"#).unwrap();
        assert_eq!(s.confidence, 1.0);
        let s = parse_reply(r#"{"summary":"The user talked about chess.","key_topics":["chess"],"emotional_tone":"neutral"}"#).unwrap();
        assert_eq!(s.confidence, 0.5);
        let many: Vec<String> = (0..12).map(|i| format!("\"t{i}\"")).collect();
        let s = parse_reply(&format!(
            r#"{{"summary":"x y z","key_topics":[{}],"emotional_tone":"neutral"}}"#,
            many.join(",")
        ))
        .unwrap();
        assert_eq!(s.key_topics.len(), 8);
    }

    #[test]
    fn a_field_next_to_its_alias_and_extra_keys_are_accepted() {
        let s = parse_reply(GOOD).unwrap();
        let both = r#"```json
{"summary": "The user finished a pottery bowl for their grandmother and worries about a knee before a marathon.",
 "summary_text": "something else", "key_topics": ["pottery", "marathon", "knee"], "topics": ["other"],
 "emotional_tone": "mixed", "tone": "neutral", "confidence": 0.82, "language": "en", "notes": {"v": 3}}
```"#;
        assert_eq!(
            parse_reply(both).unwrap(),
            s,
            "the field wins over its alias"
        );
        // only the aliases, or a null field next to its alias
        let aliases = r#"{"summary_text": "The user talked about chess.", "topics": ["chess"], "tone": "neutral",
            "summary": null, "key_topics": null}"#;
        let a = parse_reply(aliases).unwrap();
        assert_eq!(a.text, "The user talked about chess.");
        assert_eq!(a.key_topics, vec!["chess"]);
        // strict in what is stored: no NUL reaches a summary
        let nul = parse_reply(
            r#"{"summary": "The user talked about\u0000 chess.", "key_topics": ["ch\u0000ess"], "emotional_tone": "neutral"}"#,
        )
        .unwrap();
        assert!(
            !nul.text.contains('\0') && !nul.key_topics[0].contains('\0'),
            "{nul:?}"
        );
    }

    #[test]
    fn rejects_what_needs_a_repair_call() {
        for bad in [
            "",
            "Sure! Here is the summary: The user talked about pottery. Let me know if you need anything else.",
            r#"{"key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"Summary of conversation","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"<coroutine object at 0x1>","key_topics":["a"],"emotional_tone":"neutral"}"#,
            r#"{"summary":"ok text","key_topics":[],"emotional_tone":"neutral"}"#,
            r#"{"summary":"ok text","key_topics":["a"],"emotional_tone":"ecstatic-ish"}"#,
            r#"["not", "an", "object"]"#,
        ] {
            let r = parse_reply(bad);
            assert!(r.is_err(), "accepted {bad:?}");
            assert!(!r.unwrap_err().is_empty());
        }
    }

    #[test]
    fn repair_prompt_quotes_the_bad_reply_and_asks_for_json_only() {
        let bad = "Sure! Here is the summary: pottery.";
        let p = repair_system_prompt(SYSTEM_PROMPT, bad, "reply is not the JSON object asked for");
        assert!(p.starts_with(SYSTEM_PROMPT));
        assert!(p.contains(bad));
        assert!(p.contains("ONLY the JSON object"));
        let long = "x".repeat(10_000);
        assert!(
            chars(&repair_system_prompt(SYSTEM_PROMPT, &long, "r"))
                < chars(SYSTEM_PROMPT) + REPAIR_QUOTE_CHARS + 300
        );
    }
}
