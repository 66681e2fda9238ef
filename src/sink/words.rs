//! The words said in a window (`recap_window_words`, migration 0014): what text search matches besides the summary
//! (`recall::text_search`), so a word the user said that the summary does not repeat still finds the window.
//!
//! [`said`] is pure: the window's distinct words, in the order first said, at most [`MAX_WORDS`] of at most
//! [`MAX_WORD_BYTES`] bytes each (the bound of what one window stores, whatever its number of messages). [`write`]
//! stores them in the transaction that writes the summary rows, set-based (one statement for a batch), as
//! `strip(to_tsvector('english', words))`: the text configuration of `recap_summary_tsv`, no positions, each lexeme
//! once. A row summarized again replaces its words; a deleted row takes them along (`ON DELETE CASCADE`).

use std::collections::{HashMap, HashSet};

use sqlx::{Postgres, Transaction};

use super::StoreError;
use crate::summarize::Message;

/// Most distinct words stored per window: a window of thousands of messages keeps the first this many it said.
/// Conversational English uses far fewer in one window; the cap bounds a window of random tokens.
pub const MAX_WORDS: usize = 8192;
/// Longer runs of letters and digits are not words ([`text_query`] drops them too).
pub const MAX_WORD_BYTES: usize = 100;

/// The words of a query as an OR of tsquery terms (letters and digits only, at most 32 distinct words of at most
/// 100 bytes); `None`
/// when the text has no word.
pub fn text_query(text: &str) -> Option<String> {
    let mut words: Vec<String> = Vec::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && w.len() <= 100) // longer is no word (and no lexeme: Postgres caps them)
        .map(str::to_lowercase)
    {
        if !words.contains(&w) {
            words.push(w);
        }
        if words.len() == 32 {
            break;
        }
    }
    (!words.is_empty()).then(|| words.join(" | "))
}

/// The distinct words of the messages' text (both sides), lowercased, space-separated, in the order first said. A
/// word is a run of letters and digits, the split [`text_query`] applies to a query, so every query word can
/// match a said word.
pub fn said(messages: &[Message]) -> String {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = String::new();
    'messages: for m in messages {
        for w in m
            .text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty() && w.len() <= MAX_WORD_BYTES)
        {
            let w = w.to_lowercase();
            if seen.contains(&w) {
                continue;
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&w);
            seen.insert(w);
            if seen.len() == MAX_WORDS {
                break 'messages;
            }
        }
    }
    out
}

/// The words said in a summarized window, for its summary row.
pub(super) struct Said<'a> {
    pub summary_id: i32,
    pub bot: &'a str,
    pub user_id: &'a str,
    /// As [`said`] gives them.
    pub words: &'a str,
}

/// Stores the said words of the summarized windows `written` in one statement. A row id given twice keeps the last
/// words.
pub(super) async fn write<'a>(
    tx: &mut Transaction<'_, Postgres>,
    written: impl IntoIterator<Item = Said<'a>>,
) -> Result<(), StoreError> {
    let by_row: HashMap<i32, Said> = written.into_iter().map(|s| (s.summary_id, s)).collect();
    if by_row.is_empty() {
        return Ok(());
    }
    let (mut ids, mut bots, mut users, mut words) = (vec![], vec![], vec![], vec![]);
    for (sid, s) in by_row {
        ids.push(sid);
        bots.push(s.bot);
        users.push(s.user_id);
        words.push(s.words.replace('\0', ""));
    }
    sqlx::query(
        "INSERT INTO recap_window_words (summary_id, bot_name, user_id, words, updated_at)
         SELECT x.sid, x.b, x.u, strip(to_tsvector('english'::regconfig, x.t)), now()
         FROM unnest($1::int[], $2::text[], $3::text[], $4::text[]) AS x(sid, b, u, t)
         ON CONFLICT (summary_id) DO UPDATE SET bot_name = EXCLUDED.bot_name, user_id = EXCLUDED.user_id,
            words = EXCLUDED.words, updated_at = now()",
    )
    .bind(ids)
    .bind(bots)
    .bind(users)
    .bind(words)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(text: &str) -> Message {
        Message {
            point_id: "1".into(),
            role: "user".into(),
            text: text.into(),
            ts_ms: 0,
            emotion: None,
            vector: vec![],
        }
    }

    #[test]
    fn distinct_words_in_the_order_first_said() {
        let m = [msg("I went Kayaking, kayaking!"), msg("e-mail me: x@y.org")];
        assert_eq!(said(&m), "i went kayaking e mail me x y org");
        assert_eq!(said(&[msg(" ,.!")]), "");
        assert_eq!(said(&[]), "");
    }

    #[test]
    fn a_huge_window_keeps_the_first_words_up_to_the_cap() {
        let m: Vec<Message> = (0..(MAX_WORDS + 500))
            .map(|i| msg(&format!("w{i} w{i} common")))
            .collect();
        let s = said(&m);
        let words: Vec<&str> = s.split(' ').collect();
        assert_eq!(words.len(), MAX_WORDS);
        assert_eq!(words[0], "w0");
        assert_eq!(words[1], "common");
        assert!(!s.contains(&format!("w{}", MAX_WORDS)));
        let long = "a".repeat(MAX_WORD_BYTES + 1);
        assert_eq!(said(&[msg(&format!("{long} ok"))]), "ok");
    }

    proptest! {
        /// Every word of a query (as [`text_query`] splits it) that was said is among the said words, and no
        /// word is stored twice.
        #[test]
        fn every_query_word_said_is_stored_once(texts in proptest::collection::vec("[a-zA-Z0-9 ,.!'é-]{0,40}", 0..20)) {
            let m: Vec<Message> = texts.iter().map(|t| msg(t)).collect();
            let s = said(&m);
            let stored: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
            let set: HashSet<&str> = stored.iter().copied().collect();
            prop_assert_eq!(set.len(), stored.len());
            for t in &texts {
                if let Some(q) = text_query(t) {
                    for w in q.split(" | ") {
                        prop_assert!(set.contains(w), "{} missing from {}", w, s);
                    }
                }
            }
        }
    }
}
