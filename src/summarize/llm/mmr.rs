//! Maximal marginal relevance: which messages of a window fit the token budget.

use crate::summarize::extractive::{common_dim, normalized};

/// Maximal marginal relevance: indices in pick order whose `costs` add up to at most `budget`.
///
/// Relevance is the cosine of a message's vector to the centroid of the (normalised) vectors of the most common
/// dimension; diversity the highest cosine to a message already picked; the score `λ·relevance − (1−λ)·diversity`.
/// A candidate that no longer fits the remaining budget is dropped and the next best tried. Messages without a
/// usable vector score 0 on both. With no usable vectors at all, messages are taken spread evenly over the window
/// (bit-reversed order: first, middle, quarters, …).
pub fn select_mmr(vectors: &[&[f32]], costs: &[usize], budget: usize, lambda: f64) -> Vec<usize> {
    let n = vectors.len().min(costs.len());
    let dim = common_dim(vectors[..n].iter().copied());
    let units: Vec<Option<Vec<f32>>> = match dim {
        Some(d) => vectors[..n]
            .iter()
            .map(|v| if v.len() == d { normalized(v) } else { None })
            .collect(),
        None => vec![None; n],
    };
    let mut remaining = budget;
    let mut order = Vec::new();
    let have = units.iter().filter(|u| u.is_some()).count();
    if have == 0 {
        for i in spread_order(n) {
            if costs[i] <= remaining {
                remaining -= costs[i];
                order.push(i);
            }
        }
        return order;
    }
    let d = dim.unwrap_or(0);
    let mut centroid = vec![0f32; d];
    for u in units.iter().flatten() {
        for (c, x) in centroid.iter_mut().zip(u) {
            *c += *x;
        }
    }
    let centroid = normalized(&centroid).unwrap_or(centroid);
    let relevance: Vec<f64> = units
        .iter()
        .map(|u| u.as_ref().map_or(0.0, |u| dot(u, &centroid) as f64))
        .collect();
    let mut max_sim: Vec<Option<f64>> = vec![None; n];
    let mut alive = vec![true; n];
    loop {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..n {
            if !alive[i] {
                continue;
            }
            if costs[i] > remaining {
                alive[i] = false;
                continue;
            }
            let score = lambda * relevance[i] - (1.0 - lambda) * max_sim[i].unwrap_or(0.0);
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, i));
            }
        }
        let Some((_, p)) = best else { break };
        alive[p] = false;
        remaining -= costs[p];
        order.push(p);
        if let Some(up) = &units[p] {
            for i in 0..n {
                if alive[i]
                    && let Some(ui) = &units[i]
                {
                    let s = dot(ui, up) as f64;
                    if max_sim[i].is_none_or(|m| s > m) {
                        max_sim[i] = Some(s);
                    }
                }
            }
        }
    }
    order
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// 0..n in bit-reversed order, so every prefix is spread over the whole range.
fn spread_order(n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let bits = usize::BITS - (n - 1).leading_zeros();
    let mut out = Vec::with_capacity(n);
    for i in 0..(1usize << bits) {
        let r = if bits == 0 {
            0
        } else {
            i.reverse_bits() >> (usize::BITS - bits)
        };
        if r < n {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::Message;
    use crate::summarize::llm::testutil::*;
    use crate::summarize::llm::*;

    /// A 2,000-message window with clustered random-ish vectors stays under `max_input_tokens`.
    #[test]
    fn mmr_keeps_a_2000_message_window_under_budget() {
        const N: usize = 2000;
        const CLUSTERS: usize = 10;
        const DIM: usize = 384;
        let mut rng = Rng(0x5eed);
        let centers: Vec<Vec<f32>> = (0..CLUSTERS)
            .map(|_| (0..DIM).map(|_| rng.unit()).collect())
            .collect();
        let words = [
            "garden",
            "tomatoes",
            "marathon",
            "knee",
            "pottery",
            "bowl",
            "lisbon",
            "sister",
            "novel",
            "lighthouse",
        ];
        let mut cluster_of = Vec::new();
        let ms: Vec<Message> = (0..N)
            .map(|i| {
                let c = rng.below(CLUSTERS);
                cluster_of.push(c);
                let v: Vec<f32> = centers[c].iter().map(|x| x + 0.6 * rng.unit()).collect();
                let len = 40 + rng.below(360);
                let mut text = format!("message {i} about {}:", words[c]);
                while text.len() < len {
                    text.push(' ');
                    text.push_str(words[rng.below(words.len())]);
                }
                msg(
                    i,
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &text,
                    Some("neutral"),
                    v,
                )
            })
            .collect();
        let w = window("2000", ms);
        let s = LlmSettings {
            max_input_tokens: 8000,
            ..LlmSettings::default()
        };
        let started = Instant::now();
        let (msgs, stats) = build_prompt(&s, &w);
        let took = started.elapsed();
        println!(
            "2,000-message window: sent {} of {} messages, est. {} prompt tokens sent vs {} for the whole window \
             ({:.1}%), budget {}, built in {:?}",
            stats.messages_sent,
            stats.messages_total,
            stats.est_tokens_sent,
            stats.est_tokens_full,
            100.0 * stats.est_tokens_sent as f64 / stats.est_tokens_full as f64,
            s.max_input_tokens,
            took
        );
        assert_eq!(stats.messages_total, N);
        assert!(stats.est_tokens_full > 8000);
        assert!(stats.est_tokens_sent <= 8000, "{stats:?}");
        assert!(
            stats.est_tokens_sent > 7000,
            "budget should be nearly used: {stats:?}"
        );
        assert!(stats.messages_sent > 20 && stats.messages_sent < N);
        let user = content_of(&msgs[1]);
        assert_eq!(
            estimate_tokens(token_units(&content_of(&msgs[0])) + token_units(&user)),
            stats.est_tokens_sent
        );
        assert!(
            user.contains(&format!("Showing {} of {N} messages", stats.messages_sent)),
            "{}",
            &user[..300]
        );
        // shown in time order, and every cluster is represented (diversity)
        let ids: Vec<usize> = user
            .lines()
            .filter_map(|l| l.split("message ").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(ids.len(), stats.messages_sent);
        assert!(ids.windows(2).all(|p| p[0] < p[1]), "not in time order");
        let covered: BTreeSet<usize> = ids.iter().map(|&i| cluster_of[i]).collect();
        assert_eq!(covered.len(), CLUSTERS, "clusters covered: {covered:?}");
    }

    use std::collections::BTreeSet;

    #[test]
    fn mmr_prefers_relevant_then_diverse() {
        // 0 and 1 are near-duplicates close to the centroid; 2 is different; 3 is an outlier.
        let v = [
            vec![1.0, 0.1, 0.0],
            vec![1.0, 0.12, 0.0],
            vec![0.6, 0.8, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let refs: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
        let order = select_mmr(&refs, &[1, 1, 1, 1], 4, MMR_LAMBDA);
        assert_eq!(order.len(), 4);
        assert!(order[0] == 0 || order[0] == 1);
        assert_eq!(
            order[1], 2,
            "the near-duplicate must not come second: {order:?}"
        );
        // budget respected; a message that does not fit is skipped, a smaller one taken
        let order = select_mmr(&refs, &[5, 5, 10, 1], 7, MMR_LAMBDA);
        let cost: usize = order.iter().map(|&i| [5, 5, 10, 1][i]).sum();
        assert!(cost <= 7 && order.contains(&3), "{order:?}");
        // without vectors: spread over the window
        let none: Vec<&[f32]> = vec![&[]; 8];
        assert_eq!(select_mmr(&none, &[1; 8], 3, MMR_LAMBDA), vec![0, 4, 2]);
        assert_eq!(spread_order(5), vec![0, 4, 2, 1, 3]);
        assert_eq!(spread_order(1), vec![0]);
    }

    #[test]
    fn tiny_budget_still_sends_one_message() {
        let w = convo("7", 50, 3);
        let s = LlmSettings {
            max_input_tokens: 300,
            ..LlmSettings::default()
        };
        let (_, stats) = build_prompt(&s, &w);
        assert_eq!(stats.messages_sent, 1);
    }
}
