//! Domain types every stage shares, at the bottom of the module order (this module imports none of recap's).
//!
//! * [`WindowState`]: a closed window's state in `recap_windows.state`.
//! * [`Millis`]: a time, milliseconds since the Unix epoch, UTC.
//! * [`NewMessage`], [`Message`], [`DeadLetter`] (`message.rs`): a message entering the tracker, a message fetched
//!   for a summary, input recap could not use.
//! * [`is_point_id`], [`canonical_point_id`], [`user_key`] (`ids.rs`): the point-id rules (the Qdrant-typed helpers,
//!   `point_id_string` and `point_id_from_str`, stay in `fetch`) and the key a (bot, user) is forgotten by.
//! * [`StreamSeq`], [`SweepPos`] (`position.rs`): source positions stored with a checkpoint; a stream sequence is an integer in Rust and converted exactly at the SQL edge.
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
pub use position::{MAX_EXACT_SEQ, StreamSeq, SweepPos};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// A closed window's state (`recap_windows.state`, a `text` column with `CHECK (state IN (...))`, migration 0002).
/// Decoded from and bound as text (`sqlx::Type`); its JSON and text forms are the column's (`too_short`).
///
/// SQL that filters on a state the partial indexes are written for (`idx_recap_windows_due`: `state = 'due'`,
/// `idx_recap_windows_not_done`: `state <> 'done'`) keeps the literal in the statement: a bound parameter lets
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
}

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
}
