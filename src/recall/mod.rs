//! Recall: the read path bots use to get their recaps back, and forgetting a user.
//!
//! * [`api`]: the HTTP handlers (`GET /v1/recall`, `POST /v1/recall/search`, `DELETE /v1/users/{bot}/{user_id}`),
//!   bearer auth, input validation (every bad input a 4xx naming the field).
//! * [`timerange`]: `since`/`until` (RFC 3339, dates, `7d`, `yesterday`, `last week` ...) in an IANA zone.
//! * [`vectors`]: summary vectors in the Qdrant collection `recap_summaries`, their sync and repair.
//! * This module: the SQL (recall by time, full-text search, forget) and reciprocal rank fusion.

pub mod api;
pub mod timerange;
pub mod vectors;

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use crate::sink::{Store, StoreError};

/// Every table holding per-(bot, user) state, each with `bot_name` and `user_id` columns: forgetting a user deletes
/// their rows from all of them in one transaction. Add a table here when it holds user state.
pub const USER_TABLES: &[&str] = &[
    "conversation_summaries",
    "recap_summary_vectors",
    "recap_open_windows",
    "recap_windows",
    "recap_rollups",
    "recap_running_summaries",
    "recap_clamped_points",
];

/// One summary as recall returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SummaryItem {
    pub id: i32,
    pub bot: String,
    pub user_id: String,
    pub summary_type: String,
    pub text: String,
    pub key_topics: Vec<String>,
    pub emotional_tone: Option<String>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub message_count: i32,
    pub revision: i32,
    /// Search only: the fused or single-ranking score (higher is better).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

const ITEM_COLUMNS: &str = "id, bot_name, user_id, coalesce(summary_type, 'time_window'), summary_text, \
    coalesce(key_topics, '{}'), emotional_tone, start_timestamp, end_timestamp, message_count, revision";

fn item(row: &sqlx::postgres::PgRow) -> SummaryItem {
    let start: NaiveDateTime = row.get(7);
    let end: NaiveDateTime = row.get(8);
    SummaryItem {
        id: row.get(0),
        bot: row.get(1),
        user_id: row.get(2),
        summary_type: row.get(3),
        text: row.get(4),
        key_topics: row.get(5),
        emotional_tone: row.get(6),
        start: start.and_utc(),
        end: end.and_utc(),
        message_count: row.get(9),
        revision: row.get(10),
        score: None,
    }
}

/// What to recall.
#[derive(Debug, Clone, Default)]
pub struct Range {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub summary_type: Option<String>,
}

/// The SQL condition for `Range`, with parameters from `$first` on (bound by [`bind_range`]).
fn range_sql(first: usize) -> String {
    let (a, b, c) = (first, first + 1, first + 2);
    format!(
        "AND (${a}::timestamp IS NULL OR end_timestamp > ${a}) AND (${b}::timestamp IS NULL OR start_timestamp < ${b}) \
         AND (${c}::text IS NULL OR coalesce(summary_type, 'time_window') = ${c})"
    )
}

fn bind_range<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    r: &'q Range,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(r.since.map(|t| t.naive_utc()))
        .bind(r.until.map(|t| t.naive_utc()))
        .bind(r.summary_type.as_deref())
}

/// The SQL of [`recall`] (also used to show its plan).
pub fn recall_sql() -> String {
    format!(
        "SELECT {ITEM_COLUMNS} FROM conversation_summaries WHERE bot_name = $1 AND user_id = $2 {} \
         ORDER BY start_timestamp DESC LIMIT $3",
        range_sql(4)
    )
}

/// A (bot, user)'s summaries overlapping the range, newest first.
pub async fn recall(
    store: &Store,
    bot: &str,
    user_id: &str,
    range: &Range,
    limit: i64,
) -> Result<Vec<SummaryItem>, StoreError> {
    let sql = recall_sql();
    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(bot)
        .bind(user_id)
        .bind(limit);
    let rows = bind_range(q, range).fetch_all(store.pool()).await?;
    Ok(rows.iter().map(item).collect())
}

/// Rows by id, restricted to one (bot, user) (a vector whose row is gone or belongs elsewhere is dropped).
pub async fn by_ids(
    store: &Store,
    bot: &str,
    user_id: &str,
    ids: &[i32],
) -> Result<HashMap<i32, SummaryItem>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM conversation_summaries WHERE id = ANY($1) AND bot_name = $2 AND user_id = $3"
    )))
    .bind(ids)
    .bind(bot)
    .bind(user_id)
    .fetch_all(store.pool())
    .await?;
    Ok(rows.iter().map(|r| (r.get::<i32, _>(0), item(r))).collect())
}

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

/// Full-text search over a (bot, user)'s summary text and topics, best first.
pub async fn text_search(
    store: &Store,
    bot: &str,
    user_id: &str,
    query: &str,
    range: &Range,
    limit: i64,
) -> Result<Vec<SummaryItem>, StoreError> {
    let sql = format!(
        "SELECT {ITEM_COLUMNS}, ts_rank_cd(recap_summary_tsv(summary_text, key_topics), q)::float8 AS rank \
         FROM conversation_summaries, to_tsquery('english', $4) q \
         WHERE bot_name = $1 AND user_id = $2 AND recap_summary_tsv(summary_text, key_topics) @@ q {} \
         ORDER BY rank DESC, start_timestamp DESC LIMIT $3",
        range_sql(5)
    );
    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(bot)
        .bind(user_id)
        .bind(limit)
        .bind(query);
    let rows = bind_range(q, range).fetch_all(store.pool()).await?;
    Ok(rows
        .iter()
        .map(|r| SummaryItem {
            score: Some(r.get::<f64, _>(11)),
            ..item(r)
        })
        .collect())
}

/// Reciprocal rank fusion (k = 60) of rankings of ids, best first, with the fused scores.
pub fn rrf(rankings: &[Vec<i32>], k: f64) -> Vec<(i32, f64)> {
    let mut score: HashMap<i32, f64> = HashMap::new();
    for ranking in rankings {
        for (rank, id) in ranking.iter().enumerate() {
            *score.entry(*id).or_default() += 1.0 / (k + rank as f64 + 1.0);
        }
    }
    let mut out: Vec<(i32, f64)> = score.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// A short, non-reversible tag for a user in logs (never the id in clear text).
pub fn user_tag(bot: &str, user_id: &str) -> String {
    crate::sink::user_key(bot, user_id)[..12].to_string()
}

/// What forgetting a user deleted, per table.
pub type Deleted = Vec<(String, u64)>;

/// Deletes everything recap holds about one (bot, user) in Postgres, in one transaction: their rows in every
/// [`USER_TABLES`] table and their dead letters (events naming both the bot and the user).
pub async fn forget_rows(store: &Store, bot: &str, user_id: &str) -> Result<Deleted, StoreError> {
    let mut tx = store.pool().begin().await?;
    let mut deleted = Vec::new();
    for table in USER_TABLES {
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE bot_name = $1 AND user_id = $2"
        )))
        .bind(bot)
        .bind(user_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        deleted.push((table.to_string(), n));
    }
    // Dead letters keep the raw event; one that names this bot and this user (as JSON strings) is theirs.
    let n = sqlx::query(
        "DELETE FROM recap_dead_letters
         WHERE position(convert_to(to_json($1::text)::text, 'UTF8') IN raw) > 0
           AND position(convert_to(to_json($2::text)::text, 'UTF8') IN raw) > 0",
    )
    .bind(bot)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    deleted.push(("recap_dead_letters".to_string(), n));
    // The ingest leader holds the user's open messages in memory. Bumping the leader's epoch fails the fence of its
    // next transaction: it steps down, takes the lease again and rebuilds its tracker from Postgres, where the user
    // is gone, so a later message of theirs starts fresh. Its uncommitted batch is not acknowledged and comes back.
    sqlx::query("UPDATE recap_leader SET epoch = epoch + 1")
        .execute(&mut *tx)
        .await?;
    // The bots' collections keep the user's points: the sweep's overlap, a backfill or a replay would read them again.
    // The tombstone makes ingest skip every message of theirs stored until now (`sink::user_key`, never the id).
    sqlx::query(
        "INSERT INTO recap_forgotten (bot_name, user_key, forgotten_at) VALUES ($1, $2, now())
         ON CONFLICT (bot_name, user_key) DO UPDATE SET forgotten_at = now()",
    )
    .bind(bot)
    .bind(crate::sink::user_key(bot, user_id))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted)
}

/// True when recap has anything for this bot (a summary or a window).
pub async fn bot_known(store: &Store, bot: &str) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM conversation_summaries WHERE bot_name = $1)
             OR EXISTS (SELECT 1 FROM recap_windows WHERE bot_name = $1)",
    )
    .bind(bot)
    .fetch_one(store.pool())
    .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_rewards_agreement() {
        let fused = rrf(&[vec![1, 2, 3], vec![3, 1, 4]], 60.0);
        assert_eq!(fused[0].0, 1);
        assert_eq!(fused[1].0, 3);
        assert_eq!(fused.len(), 4);
        assert!(rrf(&[], 60.0).is_empty());
    }

    #[test]
    fn text_query_is_an_or_of_words() {
        assert_eq!(
            text_query("Hiking, hiking & the ALPS!").unwrap(),
            "hiking | the | alps"
        );
        assert_eq!(text_query(" ,.!"), None);
        assert_eq!(text_query("a:b|c'd"), Some("a | b | c | d".into()));
    }

    #[test]
    fn user_tag_hides_the_id() {
        let t = user_tag("elena", "user-42");
        assert_eq!(t.len(), 12);
        assert!(!t.contains("42") || t != "user-42");
        assert_ne!(t, user_tag("elena", "user-43"));
    }
}
