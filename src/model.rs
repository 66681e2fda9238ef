//! Domain types every stage shares, at the bottom of the module order (this module imports none of recap's).
//!
//! * [`WindowState`]: a closed window's state in `recap_windows.state`; [`state_sql!`]: SQL text with states as
//!   constants, built from the enum.
//! * [`Millis`]: a time, milliseconds since the Unix epoch, UTC.
//! * [`NewMessage`], [`Message`], [`DeadLetter`] (`message.rs`): a message entering the tracker, a message fetched
//!   for a summary, input recap could not use.
//! * [`is_point_id`], [`canonical_point_id`], [`user_key`] (`ids.rs`): the point-id rules (the Qdrant-typed helpers,
//!   `point_id_string` and `point_id_from_str`, stay in `fetch`) and the key a (bot, user) is forgotten by.
//! * [`StreamSeq`], [`SweepPos`], [`Position`] (either), [`SourceCheckpoint`] (a checkpoint's name, position and
//!   points read) (`position.rs`): source positions stored with a checkpoint; a stream sequence is an integer in Rust
//!   and converted exactly at the SQL edge (`Position::to_column`).
//! * [`Clock`], [`SystemClock`], [`ManualClock`] (`clock.rs`): the wall clock the ingest loop and the sweep read.
//!
//! The old homes (`sink::NewMessage`, `summarize::Message`, `fetch::is_point_id`, ...) re-export these.

mod clock;
mod ids;
mod message;
mod position;

pub use clock::{Clock, ManualClock, SystemClock};
pub use ids::{canonical_point_id, is_point_id, user_key};
pub use message::{DeadLetter, Message, NewMessage};
pub use position::{MAX_EXACT_SEQ, Position, SourceCheckpoint, StreamSeq, SweepPos};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// A closed window's state (`recap_windows.state`, a `text` column with `CHECK (state IN (...))`, migration 0002).
/// Decoded from and bound as text (`sqlx::Type`); its JSON and text forms are the column's (`too_short`).
///
/// The states' names are written here only (a test below fails on a state literal anywhere else in `src/`). SQL
/// binds a state it writes or checks on a row found by id (`.bind(WindowState::Due)`); SQL that filters on a state
/// the partial indexes are written for (`idx_recap_windows_due`: `state = 'due'`, `idx_recap_windows_not_done`:
/// `state <> 'done'`) keeps the state a constant in its text, built once by [`state_sql!`]: a bound parameter lets
/// Postgres switch a prepared statement to a generic plan, which cannot use a partial index.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum WindowState {
    /// Closed, waiting for (or held by) a worker.
    Due,
    /// Summarized: its summary row is written.
    Done,
    /// Below `MIN_MESSAGES_FOR_SUMMARY`: no call, no row.
    TooShort,
    /// Out of attempts (`LLM_MAX_ATTEMPTS`); `recap retry` puts it back to due.
    Dead,
}

impl WindowState {
    /// Every state, in pipeline order.
    pub const ALL: [WindowState; 4] = [
        WindowState::Due,
        WindowState::Done,
        WindowState::TooShort,
        WindowState::Dead,
    ];

    /// The column's text.
    pub const fn as_str(self) -> &'static str {
        match self {
            WindowState::Due => "due",
            WindowState::Done => "done",
            WindowState::TooShort => "too_short",
            WindowState::Dead => "dead",
        }
    }

    /// For people: `too short`.
    pub fn label(self) -> String {
        self.as_str().replace('_', " ")
    }

    /// The state as an SQL string constant (`'due'`).
    pub fn sql_literal(self) -> String {
        format!("'{}'", self.as_str())
    }

    /// `template` with each `{due}`, `{done}`, `{too_short}` and `{dead}` replaced by that state's SQL constant
    /// (`'due'`, ...): SQL text that keeps a state as a constant (a partial index's predicate) without a second copy
    /// of its name. Any other brace (`'{}'`, `'{a,b}'`, a misspelled `{ded}`) is left as it is: Postgres refuses
    /// a misspelled state, so the statement fails its first run.
    pub fn fill_sql(template: &str) -> String {
        WindowState::ALL.iter().fold(template.to_owned(), |sql, w| {
            sql.replace(&format!("{{{}}}", w.as_str()), &w.sql_literal())
        })
    }
}

/// SQL text with window states as constants, built once from [`WindowState`] (see [`WindowState::fill_sql`]):
/// `sqlx::query(state_sql!("SELECT ... WHERE state = {due}"))`. Gives a `&'static str`.
///
/// For the filters a partial index is written for (`idx_recap_windows_due`: `state = 'due'`,
/// `idx_recap_windows_not_done`: `state <> 'done'`) and the scans beside them, so their plans stay those of a
/// constant; a state a statement writes, or checks on a row found by id, is bound as a parameter instead
/// (`.bind(WindowState::Done)`).
macro_rules! state_sql {
    ($template:literal) => {{
        static SQL: ::std::sync::LazyLock<String> =
            ::std::sync::LazyLock::new(|| $crate::model::WindowState::fill_sql($template));
        SQL.as_str()
    }};
}
pub(crate) use state_sql;

impl fmt::Display for WindowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of the column's states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a window state (due, done, too_short, dead)")]
pub struct UnknownWindowState(pub String);

impl FromStr for WindowState {
    type Err = UnknownWindowState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WindowState::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| UnknownWindowState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enum holds exactly the states the column's CHECK constraint allows, under the same names.
    #[test]
    fn the_states_are_the_columns() {
        let migration = include_str!("../migrations/0002_recap_state.sql");
        let check = migration
            .split("state TEXT NOT NULL CHECK (state IN (")
            .nth(1)
            .and_then(|s| s.split("))").next())
            .expect("the CHECK of recap_windows.state");
        let allowed: Vec<&str> = check
            .split(',')
            .map(|s| s.trim().trim_matches('\''))
            .collect();
        let ours: Vec<&str> = WindowState::ALL.iter().map(|w| w.as_str()).collect();
        assert_eq!(ours, allowed);
        for w in WindowState::ALL {
            assert_eq!(w.as_str().parse::<WindowState>(), Ok(w));
            assert_eq!(w.to_string(), w.as_str());
            assert_eq!(serde_json::to_value(w).unwrap(), w.as_str());
        }
        assert_eq!(WindowState::TooShort.label(), "too short");
        assert!("open".parse::<WindowState>().is_err());
    }

    /// The string literals of a file whose value is a window state's name (`"due"`) or holds one quoted as SQL
    /// holds it (`'due'`), with their lines: every literal, macro bodies included (`sqlx::query!`, `html!`), doc
    /// comments and `//` comments not.
    fn state_literals(file: &std::path::Path) -> Vec<(usize, String)> {
        use proc_macro2::{Delimiter, TokenStream, TokenTree};
        fn walk(ts: TokenStream, out: &mut Vec<(usize, String)>) {
            let mut tokens = ts.into_iter().peekable();
            while let Some(tt) = tokens.next() {
                match tt {
                    TokenTree::Punct(p) if p.as_char() == '#' => {
                        if matches!(tokens.peek(), Some(TokenTree::Punct(b)) if b.as_char() == '!')
                        {
                            tokens.next();
                        }
                        if let Some(TokenTree::Group(g)) = tokens.peek() {
                            let is_doc = g.delimiter() == Delimiter::Bracket
                                && matches!(g.stream().into_iter().next(),
                                            Some(TokenTree::Ident(i)) if i == "doc");
                            if is_doc {
                                tokens.next();
                            }
                        }
                    }
                    TokenTree::Group(g) => walk(g.stream(), out),
                    TokenTree::Literal(l) => {
                        let Ok(syn::Lit::Str(lit)) = syn::parse_str::<syn::Lit>(&l.to_string())
                        else {
                            continue;
                        };
                        let v = lit.value();
                        if WindowState::ALL
                            .iter()
                            .any(|w| v == w.as_str() || v.contains(&w.sql_literal()))
                        {
                            out.push((l.span().start().line, l.to_string()));
                        }
                    }
                    _ => {}
                }
            }
        }
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let tokens: TokenStream = text
            .parse()
            .unwrap_or_else(|e| panic!("tokenize {}: {e:?}", file.display()));
        let mut out = Vec::new();
        walk(tokens, &mut out);
        out
    }

    /// Issue 27: a window state's name is written once, in [`WindowState::as_str`]. A string literal in `src/`
    /// outside `model` that is a state's name or holds one quoted for SQL fails this test: bind the enum
    /// (`.bind(WindowState::Done)`), build SQL text that needs the constant with [`state_sql!`] (`{due}`), or call
    /// `WindowState::Due.as_str()`.
    #[test]
    fn no_window_state_literal_outside_this_module() {
        fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).expect("read src/") {
                let p = e.expect("dir entry").path();
                if p.is_dir() {
                    rust_files(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        // The scan finds the names where they are written: in this module.
        let here = state_literals(&src.join("model.rs"));
        for w in WindowState::ALL {
            assert!(
                here.iter()
                    .any(|(_, l)| l == &format!("\"{}\"", w.as_str())),
                "the scan does not see {w:?} in model.rs: {here:?}"
            );
        }
        assert!(files.len() > 50, "{} files under src/", files.len());
        let mut found = Vec::new();
        for f in files
            .iter()
            .filter(|f| !f.starts_with(src.join("model")) && **f != src.join("model.rs"))
        {
            for (line, lit) in state_literals(f) {
                let first = lit.lines().next().unwrap_or_default();
                found.push(format!(
                    "{}:{line}: {first}",
                    f.strip_prefix(&src).unwrap_or(f).display()
                ));
            }
        }
        assert!(
            found.is_empty(),
            "window-state literals outside model::WindowState (bind the enum, or state_sql!(\"... {{due}}\")):\n{}",
            found.join("\n")
        );
    }

    #[test]
    fn sql_text_gets_each_state_as_a_constant_and_other_braces_stay() {
        assert_eq!(
            WindowState::fill_sql(
                "UPDATE w SET state = {due} WHERE state IN ({dead},{too_short}) AND state <> {done}"
            ),
            "UPDATE w SET state = 'due' WHERE state IN ('dead','too_short') AND state <> 'done'"
        );
        let other = "SELECT '{}'::text[], '{1,2}'::int[], '{a,b}'::text[], {ded}, {";
        assert_eq!(WindowState::fill_sql(other), other);
        let sql: &'static str =
            state_sql!("SELECT count(*) FROM recap_windows WHERE state = {dead}");
        assert_eq!(
            sql,
            format!(
                "SELECT count(*) FROM recap_windows WHERE state = '{}'",
                WindowState::Dead.as_str()
            )
        );
    }
}
