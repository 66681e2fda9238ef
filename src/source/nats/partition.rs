//! The partition layout: which of `n` partitions NATS stores a key's events in (the stream's subject transform).

use super::PartitionBy;

/// The partition NATS stores a bot's events in (`partition(n, 1)` of the stream's subject transform): FNV-1a 32 of
/// the bot name, mod `n`. The sweep and the state restore use it to take only their partition's bots.
pub fn partition_of(bot: &str, n: u32) -> u32 {
    partition_of_tokens(&[bot], n)
}

/// The partition of `n` that owns a (bot, user) key when partitioned by `by` (see [`NatsSettings::owner`]).
pub fn owner(by: PartitionBy, n: u32, bot: &str, user: &str) -> u32 {
    match by {
        PartitionBy::Bot => partition_of(bot, n),
        PartitionBy::User => partition_of_tokens(&[bot, &crate::event::user_token(user)], n),
    }
}

/// The partition layout a snapshot row is written under: `1` unpartitioned, else `bot/<n>` or `user/<n>`. Rows of
/// another layout are re-assigned by key at restore.
pub fn layout(by: PartitionBy, n: u32) -> String {
    match by {
        _ if n <= 1 => "1".to_string(),
        PartitionBy::Bot => format!("bot/{n}"),
        PartitionBy::User => format!("user/{n}"),
    }
}

/// NATS' `partition(n, i, j, ...)`: FNV-1a 32 of the tokens one after the other, mod `n`.
pub fn partition_of_tokens(tokens: &[&str], n: u32) -> u32 {
    if n <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in tokens.iter().flat_map(|t| t.as_bytes()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % n
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Load of the busiest partition over the mean (1.0 = even), for `(key, messages)` over `n` partitions.
    fn skew<'a>(load: impl IntoIterator<Item = (&'a str, f64)>, n: u32) -> f64 {
        let mut per = vec![0.0; n as usize];
        for (k, m) in load {
            per[partition_of(k, n) as usize] += m;
        }
        let total: f64 = per.iter().sum();
        per.iter().copied().fold(0.0, f64::max) / (total / f64::from(n))
    }

    /// The measurement behind partitioning by bot (ARCHITECTURE.md, "Scaling past one machine"): the skew of the
    /// busiest of 8 partitions for a WhisperEngine-like fleet of 10 bots, even and with one bot taking half the
    /// messages, by bot (what bots publish today) and by bot + user (a user token in the subject), 1,000 users a bot.
    #[test]
    fn partition_skew_by_bot_and_by_user() {
        let bots = [
            "elena", "marcus", "jake", "ryan", "gabriel", "sophia", "dream", "aethys", "aetheris",
            "dotty",
        ];
        let even = |_: usize| 1.0;
        let dominant = |i: usize| if i == 0 { 9.0 } else { 1.0 };
        for (name, weight) in [
            ("even", &even as &dyn Fn(usize) -> f64),
            ("one bot at 50%", &dominant),
        ] {
            let by_bot = skew(bots.iter().enumerate().map(|(i, b)| (*b, weight(i))), 8);
            let keys: Vec<(String, f64)> = bots
                .iter()
                .enumerate()
                .flat_map(|(i, b)| (0..1000).map(move |u| (format!("{b}{u}"), weight(i) / 1000.0)))
                .collect();
            let by_user = skew(keys.iter().map(|(k, w)| (k.as_str(), *w)), 8);
            println!(
                "SKEW fleet={name} partitions=8 by_bot={by_bot:.2} by_bot_and_user={by_user:.2}"
            );
            assert!(by_user < 1.2, "1,000 users a bot spread evenly: {by_user}");
            assert!(by_bot >= by_user);
        }
    }
}
