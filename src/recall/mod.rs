//! Recall: the read path bots use to get their recaps back, and forgetting a user.
//!
//! * [`api`]: the HTTP handlers (`GET /v1/recall`, `POST /v1/recall/search`, `DELETE /v1/users/{bot}/{user_id}`),
//!   bearer auth, input validation (every bad input a 4xx naming the field).
//! * [`timerange`]: `since`/`until` (RFC 3339, dates, `7d`, `yesterday`, `last week` ...) in an IANA zone.
//! * [`vectors`] (re-exported from [`crate::vectors`]): summary vectors in the Qdrant collection `recap_summaries`.
//! * [`forget`]: forgetting a user, completely, whatever runs at the same time.
//! * This module: the SQL (recall by time, full-text search) and reciprocal rank fusion.

pub mod api;
pub mod context;
pub mod forget;
pub mod timerange;
/// Moved to the top-level [`crate::vectors`] (issue 27: `status` and `pipeline` use it, below `recall`); kept here so
/// older paths compile.
pub use crate::vectors;

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;

use crate::sink::{Store, StoreError};

/// Every table holding per-(bot, user) state, each with `bot_name` and `user_id` columns: forgetting a user deletes
/// their rows from all of them in one transaction (`forget`). Add a table here when it holds user state.
pub const USER_TABLES: &[&str] = &[
    "recap_window_words",
    "conversation_summaries",
    "recap_summary_vectors",
    "recap_open_windows",
    "recap_windows",
    "recap_rollups",
    "recap_running_summaries",
    "recap_dead_letters",
    "recap_clamped_points",
];

/// Lives with the said words it must split alike (`sink::words`, below `recall`).
pub use crate::sink::words::text_query;
pub use forget::{ForgetScope, forget_rows, forget_user};

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

/// The columns of a [`SummaryItem`] as [`ItemRow`] reads them (by name).
const ITEM_COLUMNS: &str = "id, bot_name AS bot, user_id, coalesce(summary_type, 'time_window') AS summary_type, \
    summary_text AS text, coalesce(key_topics, '{}') AS key_topics, emotional_tone, start_timestamp AS start, \
    end_timestamp AS \"end\", message_count, revision";

/// A summary row as read ([`ITEM_COLUMNS`], and [`recalled_cte`]'s rows as JSON): times without a zone (UTC).
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
struct ItemRow {
    id: i32,
    bot: String,
    user_id: String,
    summary_type: String,
    text: String,
    key_topics: Vec<String>,
    emotional_tone: Option<String>,
    start: NaiveDateTime,
    end: NaiveDateTime,
    message_count: i32,
    revision: i32,
    /// [`text_search_sql`]'s score; absent elsewhere.
    #[sqlx(default)]
    #[serde(default)]
    rank: Option<f64>,
}

impl From<ItemRow> for SummaryItem {
    fn from(r: ItemRow) -> Self {
        SummaryItem {
            id: r.id,
            bot: r.bot,
            user_id: r.user_id,
            summary_type: r.summary_type,
            text: r.text,
            key_topics: r.key_topics,
            emotional_tone: r.emotional_tone,
            start: r.start.and_utc(),
            end: r.end.and_utc(),
            message_count: r.message_count,
            revision: r.revision,
            score: r.rank,
        }
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
///
/// An unset bound is the widest one (`coalesce` with an infinity, the row's own type) rather than `$n IS NULL OR ...`:
/// with `IS NULL OR` a custom plan (which folds the unset bounds away) always looked cheaper than the generic plan, so
/// Postgres planned every execution again (about 130 us of a recall's 210 us in Postgres, measured with
/// `EXPLAIN (ANALYZE) EXECUTE` at 1,000,000 rows); written this way the generic plan costs the same and is kept after
/// the fifth execution (an index scan on (bot, user, start), planning about 15 us).
fn range_sql(first: usize) -> String {
    let (a, b, c) = (first, first + 1, first + 2);
    format!(
        "AND end_timestamp > coalesce(${a}::timestamp, '-infinity') \
         AND start_timestamp < coalesce(${b}::timestamp, 'infinity') \
         AND coalesce(summary_type, 'time_window') = coalesce(${c}::text, summary_type, 'time_window')"
    )
}

/// A statement reading [`ItemRow`]s.
type ItemQuery<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, ItemRow, sqlx::postgres::PgArguments>;

fn bind_range<'q>(q: ItemQuery<'q>, r: &'q Range) -> ItemQuery<'q> {
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

/// [`recall_sql`] as a common table expression `recalled` whose columns are named as [`SummaryItem`]'s fields, for a
/// statement that reads the recalled rows besides other things (`json_agg(recalled)` and [`items_from_json`]).
pub fn recalled_cte() -> String {
    format!(
        "recalled(id, bot, user_id, summary_type, text, key_topics, emotional_tone, start, \"end\", message_count, \
         revision) AS ({})",
        recall_sql()
    )
}

/// Rows of [`recalled_cte`] aggregated as JSON text (`json_agg`), back as items in the same order.
pub fn items_from_json(json: Option<&str>) -> Result<Vec<SummaryItem>, StoreError> {
    let Some(json) = json else {
        return Ok(Vec::new());
    };
    let raw: Vec<ItemRow> =
        serde_json::from_str(json).map_err(|e| StoreError::Db(sqlx::Error::Decode(Box::new(e))))?;
    Ok(raw.into_iter().map(SummaryItem::from).collect())
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
    let q = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(bot)
        .bind(user_id)
        .bind(limit);
    let rows = bind_range(q, range).fetch_all(store.pool()).await?;
    Ok(rows.into_iter().map(SummaryItem::from).collect())
}

/// Rows by id, restricted to one (bot, user) (a vector whose row is gone or belongs elsewhere is dropped).
pub async fn by_ids(
    store: &Store,
    bot: &str,
    user_id: &str,
    ids: &[i32],
) -> Result<HashMap<i32, SummaryItem>, StoreError> {
    let rows: Vec<ItemRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM conversation_summaries WHERE id = ANY($1) AND bot_name = $2 AND user_id = $3"
    )))
    .bind(ids)
    .bind(bot)
    .bind(user_id)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.id, SummaryItem::from(r)))
        .collect())
}

/// The SQL of [`text_search`] (also used to show its plan): `$1` bot, `$2` user, `$3` limit, `$4` the tsquery
/// ([`text_query`]), then the range.
///
/// A row matches when its summary (`recap_summary_tsv`: topics and text) or the words said in its window
/// (`recap_window_words`) match. Summary matches rank first, scored `1 + ts_rank_cd` over the summary (above 1);
/// rows found only by their said words follow, scored `r / (1 + r)` with `r = ts_rank` over the words (below 1:
/// the said words are stripped of positions, so the cover density of `ts_rank_cd` does not apply to them). Ties: the
/// newest first. The summary's tsvector is computed once per row (`OFFSET 0` keeps the lateral subquery from being
/// inlined into the filter, the CASE and `ts_rank_cd`, which computed it three times: 5.9 ms -> 2.6 ms for a user with
/// 100 rows, `EXPLAIN (ANALYZE) EXECUTE`).
pub fn text_search_sql() -> String {
    format!(
        "SELECT {ITEM_COLUMNS}, (CASE WHEN t.tsv @@ q THEN 1 + ts_rank_cd(t.tsv, q)
                 ELSE ts_rank(w.said, q) / (1 + ts_rank(w.said, q)) END)::float8 AS rank
         FROM conversation_summaries s CROSS JOIN to_tsquery('english', $4) q
         CROSS JOIN LATERAL (SELECT recap_summary_tsv(s.summary_text, s.key_topics) AS tsv OFFSET 0) t
         LEFT JOIN LATERAL (SELECT ww.words AS said FROM recap_window_words ww WHERE ww.summary_id = s.id) w ON true
         WHERE s.bot_name = $1 AND s.user_id = $2 AND (t.tsv @@ q OR coalesce(w.said @@ q, false)) {}
         ORDER BY rank DESC, start_timestamp DESC LIMIT $3",
        range_sql(5)
    )
}

/// Full-text search over a (bot, user)'s summaries and the words said in their windows, best first (summary
/// matches before said-word-only matches, see [`text_search_sql`]). The one text ranking of the recall API.
pub async fn text_search(
    store: &Store,
    bot: &str,
    user_id: &str,
    query: &str,
    range: &Range,
    limit: i64,
) -> Result<Vec<SummaryItem>, StoreError> {
    let sql = text_search_sql();
    let q = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(bot)
        .bind(user_id)
        .bind(limit)
        .bind(query);
    let rows = bind_range(q, range).fetch_all(store.pool()).await?;
    // every row has its `rank` (the statement selects it)
    Ok(rows.into_iter().map(SummaryItem::from).collect())
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
    crate::model::user_key(bot, user_id)[..12].to_string()
}

/// What forgetting a user deleted, per table.
pub type Deleted = Vec<(String, u64)>;

/// True when recap has anything for this bot (a summary, a window, or open messages).
pub async fn bot_known(store: &Store, bot: &str) -> Result<bool, StoreError> {
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM conversation_summaries WHERE bot_name = $1)
             OR EXISTS (SELECT 1 FROM recap_windows WHERE bot_name = $1)
             OR EXISTS (SELECT 1 FROM recap_open_windows WHERE bot_name = $1)",
    )
    .bind(bot)
    .fetch_one(store.pool())
    .await?;
    Ok(known)
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
