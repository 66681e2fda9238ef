//! Window settings: how messages are grouped into the windows recap summarizes.

use std::time::Duration;

use super::{ConfigError, H_WIN, at_least, at_most, bad, parse_duration};

/// How messages are grouped into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WindowMode {
    /// A window closes after IDLE_GAP_MINUTES without messages (capped at TIME_WINDOW_HOURS).
    Session,
    /// Fixed windows of TIME_WINDOW_HOURS aligned to UTC midnight.
    Tumbling,
}

/// Window settings.
#[derive(clap::Args, Clone, Debug)]
pub struct WindowConfig {
    /// Window mode: session (closed by an idle gap) or tumbling (fixed TIME_WINDOW_HOURS)
    #[arg(long, env = "WINDOW_MODE", value_enum, ignore_case = true, default_value = "session", help_heading = H_WIN)]
    pub window_mode: WindowMode,

    /// Session mode: minutes of silence that close a window
    #[arg(long, env = "IDLE_GAP_MINUTES", default_value_t = 30, help_heading = H_WIN)]
    pub idle_gap_minutes: u32,

    /// Session mode: silence that closes a window, as a duration (e.g. 45s, 30m); wins over IDLE_GAP_MINUTES
    #[arg(long, env = "IDLE_GAP", value_parser = parse_duration, help_heading = H_WIN)]
    pub idle_gap: Option<Duration>,

    /// Window length in tumbling mode; longest window in session mode (hours, 1..=744)
    #[arg(long, env = "TIME_WINDOW_HOURS", default_value_t = 24, help_heading = H_WIN)]
    pub time_window_hours: u32,

    /// How late a message may arrive and still join its window (seconds, at most 86400)
    #[arg(long, env = "ALLOWED_LATENESS_SECONDS", default_value_t = 120, help_heading = H_WIN)]
    pub allowed_lateness_seconds: u32,

    /// Windows with fewer messages are not summarized
    #[arg(long, env = "MIN_MESSAGES_FOR_SUMMARY", default_value_t = 5, help_heading = H_WIN)]
    pub min_messages_for_summary: u32,

    /// Running summaries of open windows: one each time an open window's message count reaches a multiple of this
    /// (built incrementally; the final summary starts from the last one); 0 turns them off
    #[arg(long, env = "CONTEXT_SUMMARY_EVERY", default_value_t = 20, help_heading = H_WIN)]
    pub context_summary_every: u32,
}

impl WindowConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least(self.idle_gap_minutes, 1, "IDLE_GAP_MINUTES", "30")?;
        at_most(self.idle_gap_minutes, 7 * 24 * 60, "IDLE_GAP_MINUTES", "30")?;
        if let Some(g) = self.idle_gap
            && !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)).contains(&g)
        {
            return bad(
                "IDLE_GAP",
                "IDLE_GAP must be between 1s and 7d (set e.g. IDLE_GAP=30m)",
            );
        }
        at_least(self.time_window_hours, 1, "TIME_WINDOW_HOURS", "24")?;
        at_most(self.time_window_hours, 24 * 31, "TIME_WINDOW_HOURS", "24")?;
        at_most(
            self.allowed_lateness_seconds,
            86_400,
            "ALLOWED_LATENESS_SECONDS",
            "120",
        )?;
        at_least(
            self.min_messages_for_summary,
            1,
            "MIN_MESSAGES_FOR_SUMMARY",
            "5",
        )?;
        if self.context_summary_every == 1 {
            return bad(
                "CONTEXT_SUMMARY_EVERY",
                "CONTEXT_SUMMARY_EVERY must be 0 (off) or at least 2 (set CONTEXT_SUMMARY_EVERY=20)",
            );
        }
        at_most(
            self.context_summary_every,
            100_000,
            "CONTEXT_SUMMARY_EVERY",
            "20",
        )
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.window_mode == WindowMode::Session
            && self.idle_gap_ms() >= i64::from(self.time_window_hours) * 3_600_000
        {
            w.push(format!(
                "IDLE_GAP ({}) is not shorter than TIME_WINDOW_HOURS ({}h): sessions are always cut at the maximum length",
                humantime::format_duration(Duration::from_millis(self.idle_gap_ms() as u64)),
                self.time_window_hours
            ));
        }
        w
    }

    /// The idle gap in milliseconds: IDLE_GAP when set (whole milliseconds), else IDLE_GAP_MINUTES.
    pub fn idle_gap_ms(&self) -> i64 {
        match self.idle_gap {
            Some(d) => d.as_millis().min(i64::MAX as u128) as i64,
            None => i64::from(self.idle_gap_minutes) * 60_000,
        }
    }

    /// The window settings for [`crate::tracker`]: WINDOW_MODE, IDLE_GAP_MINUTES,
    /// TIME_WINDOW_HOURS (window length / longest session) and ALLOWED_LATENESS_SECONDS in ms.
    pub fn tracker_config(&self) -> crate::tracker::TrackerConfig {
        crate::tracker::TrackerConfig {
            mode: match self.window_mode {
                WindowMode::Session => crate::tracker::Mode::Session,
                WindowMode::Tumbling => crate::tracker::Mode::Tumbling,
            },
            idle_gap_ms: self.idle_gap_ms(),
            max_span_ms: i64::from(self.time_window_hours) * 3_600_000,
            lateness_ms: i64::from(self.allowed_lateness_seconds) * 1_000,
        }
    }
}
