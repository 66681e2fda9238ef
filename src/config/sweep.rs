//! Sweep settings: how often and how far back recap reads Qdrant, and which collections
//! belong to which bot.

use super::{ConfigError, H_SWEEP, at_least, at_most, bad, norm_list, parse_bool, parse_trimmed};

/// Sweep settings.
#[derive(clap::Args, Clone, Debug)]
pub struct SweepConfig {
    /// Seconds between sweeps of Qdrant (and rounds of window claiming)
    #[arg(long, env = "ENRICHMENT_INTERVAL_SECONDS", default_value_t = 300, help_heading = H_SWEEP)]
    pub enrichment_interval_seconds: u64,

    /// Windows claimed per round
    #[arg(long, env = "ENRICHMENT_BATCH_SIZE", default_value_t = 50, help_heading = H_SWEEP)]
    pub enrichment_batch_size: u32,

    /// How far back the first sweep of a collection reads (days)
    #[arg(long, env = "LOOKBACK_DAYS", default_value_t = 30, help_heading = H_SWEEP)]
    pub lookback_days: u32,

    /// Points per Qdrant scroll page
    #[arg(long, env = "SWEEP_PAGE_SIZE", default_value_t = 1000, help_heading = H_SWEEP)]
    pub sweep_page_size: u32,

    /// Each sweep re-reads this many seconds before its last high-water mark (late writes)
    #[arg(long, env = "SWEEP_OVERLAP_SECONDS", default_value_t = 600, help_heading = H_SWEEP)]
    pub sweep_overlap_seconds: u32,

    /// Collections to read, comma-separated globs (* only). The bot is what * matched, minus a
    /// trailing _7d
    #[arg(long, env = "COLLECTION_PATTERNS", value_delimiter = ',', value_parser = parse_trimmed,
          default_value = "whisperengine_memory_*,chat_memories_*", help_heading = H_SWEEP)]
    pub collection_patterns: Vec<String>,

    /// Explicit collection=bot pairs, comma-separated; win over COLLECTION_PATTERNS (mapped
    /// collections are read even when no pattern matches them)
    #[arg(long, env = "COLLECTION_MAP", value_delimiter = ',', value_parser = parse_map_entry, help_heading = H_SWEEP)]
    pub collection_map: Vec<(String, String)>,

    /// Create the payload indexes recap needs (timestamp_unix...) in bots' collections when
    /// missing. Off by default: recap never changes bots' collections unless told
    #[arg(long, env = "SWEEP_CREATE_INDEX", action = clap::ArgAction::Set, value_parser = parse_bool, default_missing_value = "true", num_args = 0..=1, default_value = "false", help_heading = H_SWEEP)]
    pub sweep_create_index: bool,
}

fn parse_map_entry(s: &str) -> Result<(String, String), String> {
    let s = s.trim();
    if s.is_empty() {
        // `COLLECTION_MAP=` (empty) — dropped by `normalize`, ignored elsewhere.
        return Ok((String::new(), String::new()));
    }
    match s.split_once('=') {
        Some((c, b)) => Ok((c.trim().to_owned(), b.trim().to_owned())),
        None => Err(format!("expected collection=bot, got {s:?}")),
    }
}

/// A bot name usable as a NATS subject token and in Postgres: `[A-Za-z0-9_-]+`.
pub fn is_valid_bot_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `*`-only glob match (a `*` matches any run of characters, including none).
pub(super) fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

impl SweepConfig {
    pub(super) fn normalize(&mut self) {
        norm_list(&mut self.collection_patterns);
        self.collection_map
            .retain(|(c, b)| !(c.is_empty() && b.is_empty()));
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_least(
            self.enrichment_interval_seconds,
            1,
            "ENRICHMENT_INTERVAL_SECONDS",
            "300",
        )?;
        at_least(self.enrichment_batch_size, 1, "ENRICHMENT_BATCH_SIZE", "50")?;
        at_least(self.lookback_days, 1, "LOOKBACK_DAYS", "30")?;
        at_most(self.lookback_days, 3650, "LOOKBACK_DAYS", "30")?;
        at_least(self.sweep_page_size, 1, "SWEEP_PAGE_SIZE", "1000")?;
        at_most(self.sweep_page_size, 100_000, "SWEEP_PAGE_SIZE", "1000")?;
        at_most(
            self.sweep_overlap_seconds,
            86_400,
            "SWEEP_OVERLAP_SECONDS",
            "600",
        )?;
        let patterns: Vec<&str> = self
            .collection_patterns
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        if patterns.is_empty() && self.collection_map.iter().all(|(c, _)| c.trim().is_empty()) {
            return bad(
                "COLLECTION_PATTERNS",
                "COLLECTION_PATTERNS is empty (set COLLECTION_PATTERNS=whisperengine_memory_*,chat_memories_*)",
            );
        }
        for p in &patterns {
            if !p.contains('*') && !self.collection_map.iter().any(|(c, _)| c.trim() == *p) {
                return bad(
                    "COLLECTION_PATTERNS",
                    format!(
                        "COLLECTION_PATTERNS entry {p:?} has no * so no bot name can be taken from it (use e.g. {p}_* or set COLLECTION_MAP={p}=<bot>)"
                    ),
                );
            }
        }
        for (i, (coll, bot)) in self.collection_map.iter().enumerate() {
            let (coll, bot) = (coll.trim(), bot.trim());
            if coll.is_empty() && bot.is_empty() {
                continue;
            }
            if coll.is_empty() || !is_valid_bot_name(bot) {
                return bad(
                    "COLLECTION_MAP",
                    format!(
                        "COLLECTION_MAP entry \"{coll}={bot}\" must be collection=bot with bot made of A-Z a-z 0-9 _ - (set e.g. COLLECTION_MAP=whisperengine_memory_elena_7d=elena)"
                    ),
                );
            }
            if let Some((_, other)) = self.collection_map[..i]
                .iter()
                .find(|(c, b)| c.trim() == coll && b.trim() != bot)
            {
                return bad(
                    "COLLECTION_MAP",
                    format!(
                        "COLLECTION_MAP maps {coll:?} to both {:?} and {bot:?} (keep one)",
                        other.trim()
                    ),
                );
            }
        }
        Ok(())
    }

    /// The bot a Qdrant collection belongs to, or `None` if recap should not read it.
    ///
    /// COLLECTION_MAP first; else the first COLLECTION_PATTERNS glob that matches: the bot is the
    /// text between the pattern's literal prefix (before the first `*`) and literal suffix (after
    /// the last `*`), minus a trailing `_7d`, and must be a valid bot name (`[A-Za-z0-9_-]+`).
    /// `whisperengine_memory_elena_7d` → `elena`, `chat_memories_marcus` → `marcus`.
    pub fn bot_for_collection(&self, name: &str) -> Option<String> {
        if let Some((_, bot)) = self
            .collection_map
            .iter()
            .find(|(c, b)| !c.trim().is_empty() && c.trim() == name && is_valid_bot_name(b.trim()))
        {
            return Some(bot.trim().to_owned());
        }
        for pattern in self.collection_patterns.iter().map(|p| p.trim()) {
            let (Some(first), Some(last)) = (pattern.find('*'), pattern.rfind('*')) else {
                continue;
            };
            if !glob_match(pattern, name) {
                continue;
            }
            let (prefix, suffix) = (&pattern[..first], &pattern[last + 1..]);
            if name.len() < prefix.len() + suffix.len() {
                continue;
            }
            let middle = &name[prefix.len()..name.len() - suffix.len()];
            let bot = middle.strip_suffix("_7d").unwrap_or(middle);
            if is_valid_bot_name(bot) {
                return Some(bot.to_owned());
            }
        }
        None
    }
}
