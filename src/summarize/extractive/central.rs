//! The most central messages of a window: cosine of each message's `content` vector to the candidates' centroid,
//! term overlap with the topics when vectors are missing.

use std::collections::{BTreeMap, BTreeSet};

use super::words;
use crate::summarize::Message;

/// Cosine similarity; 0 for empty vectors, vectors of different lengths or a zero vector.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// The vector dimension most messages share (ties: the larger), or `None` when no message has a vector.
pub fn common_dim<'a>(vectors: impl IntoIterator<Item = &'a [f32]>) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for v in vectors {
        if !v.is_empty() {
            *counts.entry(v.len()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(d, _)| d)
}

/// Unit-length copy of `v` (`None` for a zero or non-finite vector).
pub fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let n = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if n == 0.0 || !n.is_finite() {
        return None;
    }
    Some(v.iter().map(|x| (*x as f64 / n) as f32).collect())
}

/// For each message, its cosine to the centroid of the normalised vectors of dimension `common_dim`; `None` per
/// message without such a vector, and `None` overall when fewer than half the messages have one.
pub fn centrality(messages: &[&Message]) -> Option<Vec<Option<f64>>> {
    let dim = common_dim(messages.iter().map(|m| m.vector.as_slice()))?;
    let units: Vec<Option<Vec<f32>>> = messages
        .iter()
        .map(|m| {
            if m.vector.len() == dim {
                normalized(&m.vector)
            } else {
                None
            }
        })
        .collect();
    let have = units.iter().filter(|u| u.is_some()).count();
    if have == 0 || have * 2 < messages.len() {
        return None;
    }
    let mut centroid = vec![0f32; dim];
    for u in units.iter().flatten() {
        for (c, x) in centroid.iter_mut().zip(u) {
            *c += *x / have as f32;
        }
    }
    Some(
        units
            .iter()
            .map(|u| u.as_ref().map(|u| cosine(u, &centroid)))
            .collect(),
    )
}

/// Indices (into `messages`) of the `k` most central messages, in time (index) order. Centrality by vectors
/// ([`centrality`]); without vectors, by how many distinct topics a message mentions (per √words, so a long message
/// does not win by length alone). Ties go to the earlier message.
pub fn central_messages(messages: &[&Message], topics: &[String], k: usize) -> Vec<usize> {
    let scores: Vec<f64> = match centrality(messages) {
        Some(c) => c.into_iter().map(|s| s.unwrap_or(-2.0)).collect(),
        None => messages
            .iter()
            .map(|m| {
                let ws = words(&m.text);
                let set: BTreeSet<&str> = ws.iter().map(String::as_str).collect();
                let hits = topics.iter().filter(|t| set.contains(t.as_str())).count() as f64;
                hits / (ws.len().max(1) as f64).sqrt()
            })
            .collect(),
    };
    // Prefer messages with some substance (3+ words) when there are enough of them.
    let substantial: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].text.split_whitespace().count() >= 3)
        .collect();
    let mut pool: Vec<usize> = if substantial.len() >= k {
        substantial
    } else {
        (0..messages.len()).collect()
    };
    pool.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut picked: Vec<usize> = pool.into_iter().take(k).collect();
    picked.sort_unstable();
    picked
}
