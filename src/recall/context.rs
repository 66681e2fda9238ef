//! `GET /v1/context`: what a bot puts in its prompt while a conversation is going on, in one call: the user's
//! conversation (a running summary of its earlier part and every other message verbatim, or, with none open, the last
//! closed window's final summary) and the recaps of earlier conversations, under a token budget.
//!
//! IO shell over [`fit`] (the pure part). Reads, in one SQL statement, the key's open messages as of the latest
//! checkpoint (`recap_open_windows`), its last closed window (`recap_windows`) and its running summary
//! (`recap_running_summaries`); then, at the same time, a Qdrant scroll of the user's points stored after the latest
//! of those (so a message is there before its event is ingested, in every source mode) and the earlier recaps
//! (`recall`, or with `query=` the text search's ranking). The window definition ([`fit::latest_window`]) picks the
//! conversation the latest message is in; the messages the running summary does not cover are read from Qdrant by id.
//! Never calls a summarizer.

pub mod fit;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use qdrant_client::qdrant::{
    Condition, Filter, GetPointsBuilder, PointId, Range as QRange, RetrievedPoint,
};
use serde::Serialize;

use super::{Range, SummaryItem};
use crate::fetch::{
    FetchError, Points, is_point_id, map_point, point_id_from_str, point_id_string,
};
use crate::model::{WindowState, canonical_point_id};
use crate::sink::{Store, StoreError};
use crate::summarize::Message;
use crate::tracker::{Millis, TrackerConfig};
use fit::{Budgeted, Msg};

/// The bot a collection belongs to (the sweep's `COLLECTION_PATTERNS` / `COLLECTION_MAP`).
pub type BotForCollection = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What `/v1/context` needs of the configuration: the window definition and the bots' collections.
#[derive(Clone)]
pub struct ContextSettings {
    pub tracker: TrackerConfig,
    pub bot_for_collection: BotForCollection,
}

impl ContextSettings {
    /// From the service's configuration (what `recap run` mounts).
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let sweep = cfg.sweep.clone();
        ContextSettings {
            tracker: cfg.tracker_config(),
            bot_for_collection: Arc::new(move |c: &str| sweep.bot_for_collection(c)),
        }
    }
}

impl Default for ContextSettings {
    /// The defaults of `IDLE_GAP_MINUTES`, `TIME_WINDOW_HOURS` and `COLLECTION_PATTERNS`.
    fn default() -> Self {
        let sweep = crate::config::SweepConfig {
            enrichment_interval_seconds: 300,
            enrichment_batch_size: 100,
            lookback_days: 7,
            sweep_page_size: 1000,
            sweep_overlap_seconds: 120,
            collection_patterns: vec!["whisperengine_memory_*".into(), "chat_memories_*".into()],
            collection_map: Vec::new(),
            sweep_create_index: false,
        };
        ContextSettings {
            tracker: TrackerConfig::default(),
            bot_for_collection: Arc::new(move |c: &str| sweep.bot_for_collection(c)),
        }
    }
}

/// One request.
#[derive(Debug, Clone)]
pub struct ContextQuery<'a> {
    pub bot: &'a str,
    pub user_id: &'a str,
    pub max_tokens: usize,
    /// A tsquery from [`super::text_query`]: earlier recaps ranked as the text search ranks them.
    pub query: Option<String>,
}

/// The response.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub bot: String,
    pub user_id: String,
    pub tokens: usize,
    pub max_tokens: usize,
    pub omitted: usize,
    pub conversation: Option<Conversation>,
    pub earlier: Vec<SummaryItem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    pub start: DateTime<Utc>,
    pub open: bool,
    pub summary: Option<ConversationSummary>,
    pub messages: Vec<ContextMessage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationSummary {
    pub text: String,
    pub key_topics: Vec<String>,
    pub message_count: usize,
    pub covers_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextMessage {
    pub role: String,
    pub text: String,
    pub ts: DateTime<Utc>,
    pub point_id: String,
    /// Only when the latest message alone was over the budget and its text was cut.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl From<sqlx::Error> for ContextError {
    fn from(e: sqlx::Error) -> Self {
        ContextError::Store(StoreError::from(e))
    }
}

/// The key's state in Postgres, read in one statement.
#[derive(Debug, Default)]
struct KeyState {
    open: Vec<(String, Millis)>,
    last_window: Option<LastWindow>,
    running: Option<Running>,
}

#[derive(Debug)]
struct LastWindow {
    done: bool,
    points: Vec<(String, Millis)>,
    end_ms: Millis,
}

#[derive(Debug)]
struct Running {
    text: String,
    key_topics: Vec<String>,
    point_ids: Vec<String>,
    covers_until: Option<DateTime<Utc>>,
}

/// The key's open messages, last closed window and running summary, and (`$3` > 0) its earlier recaps by time
/// ([`super::recalled_cte`], `$3`..`$6` as [`super::recall_sql`] binds them): the whole Postgres side of a request
/// without `query=` in one statement.
fn key_state_sql() -> String {
    format!(
        "WITH {}
SELECT o.point_ids AS open_ids, o.point_ts AS open_ts,
       w.state AS last_state, w.summary_id AS last_summary_id, w.point_ids AS last_ids, w.point_ts AS last_ts,
       w.end_ts AS last_end,
       r.summary AS running_summary, r.key_topics AS running_topics, r.point_ids AS running_ids,
       r.covers_until AS running_until,
       (SELECT json_agg(recalled ORDER BY recalled.start DESC)::text FROM recalled) AS recalled
FROM (SELECT 1) one
LEFT JOIN recap_open_windows o ON o.bot_name = $1 AND o.user_id = $2
LEFT JOIN LATERAL (SELECT state, summary_id, point_ids, point_ts, end_ts FROM recap_windows
                   WHERE bot_name = $1 AND user_id = $2 ORDER BY start_ts DESC LIMIT 1) w ON true
LEFT JOIN recap_running_summaries r ON r.bot_name = $1 AND r.user_id = $2 AND r.summary IS NOT NULL",
        super::recalled_cte()
    )
}

fn ms(t: &DateTime<Utc>) -> Millis {
    t.timestamp_millis()
}

fn at(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A point id as Qdrant answers with it ([`canonical_point_id`]; an id Qdrant cannot hold stays as written).
fn canonical(id: &str) -> String {
    canonical_point_id(id).unwrap_or_else(|| id.to_string())
}

fn zip_points(ids: Option<Vec<String>>, ts: Option<Vec<DateTime<Utc>>>) -> Vec<(String, Millis)> {
    ids.unwrap_or_default()
        .iter()
        .zip(ts.unwrap_or_default().iter())
        .map(|(i, t)| (canonical(i), ms(t)))
        .collect()
}

/// The row of [`key_state_sql`]: the key's open points, its last window, its running summary, its recaps as JSON.
#[derive(sqlx::FromRow)]
struct KeyStateRow {
    open_ids: Option<Vec<String>>,
    open_ts: Option<Vec<DateTime<Utc>>>,
    last_state: Option<WindowState>,
    last_summary_id: Option<i32>,
    last_ids: Option<Vec<String>>,
    last_ts: Option<Vec<DateTime<Utc>>>,
    last_end: Option<DateTime<Utc>>,
    running_summary: Option<String>,
    running_topics: Option<Vec<String>>,
    running_ids: Option<Vec<String>>,
    running_until: Option<DateTime<Utc>>,
    recalled: Option<String>,
}

/// The key's state and, when `recall_limit` > 0, its latest `recall_limit` recaps in `range` (newest first).
async fn key_state(
    store: &Store,
    bot: &str,
    user: &str,
    range: &Range,
    recall_limit: i64,
) -> Result<(KeyState, Vec<SummaryItem>), ContextError> {
    let row: KeyStateRow = sqlx::query_as(sqlx::AssertSqlSafe(key_state_sql()))
        .bind(bot)
        .bind(user)
        .bind(recall_limit)
        .bind(range.since.map(|t| t.naive_utc()))
        .bind(range.until.map(|t| t.naive_utc()))
        .bind(range.summary_type.as_deref())
        .fetch_one(store.pool())
        .await?;
    let recalled = super::items_from_json(row.recalled.as_deref())?;
    let open = zip_points(row.open_ids, row.open_ts);
    let last_window = row.last_state.map(|state| LastWindow {
        done: state == WindowState::Done && row.last_summary_id.is_some(),
        points: zip_points(row.last_ids, row.last_ts),
        end_ms: row.last_end.map_or(Millis::MIN, |t| ms(&t)),
    });
    let running = row.running_summary.map(|text| Running {
        text,
        key_topics: row.running_topics.unwrap_or_default(),
        point_ids: row
            .running_ids
            .unwrap_or_default()
            .iter()
            .map(|i| canonical(i))
            .collect(),
        covers_until: row.running_until,
    });
    Ok((
        KeyState {
            open,
            last_window,
            running,
        },
        recalled,
    ))
}

fn keep_message(
    points: &Points,
    user: &str,
    p: &RetrievedPoint,
    out: &mut HashMap<String, Message>,
) {
    if let Ok(mp) = map_point(&points.mapping, p)
        && mp.user_id == user
    {
        out.entry(mp.message.point_id.clone()).or_insert(mp.message);
    }
}

/// The user's messages stored at or after `from_ms`, and those with the ids `named` whenever they were stored, in the
/// bot's collections (no vectors): one scroll per collection, the two conditions as `should` (either is enough).
async fn scroll_conversation(
    points: &Points,
    collections: &[String],
    user: &str,
    from_ms: Millis,
    named: &[String],
) -> Result<HashMap<String, Message>, FetchError> {
    let m = &points.mapping;
    let mut should = vec![Condition::range(
        m.timestamp_unix.clone(),
        QRange {
            gte: Some(from_ms as f64 / 1000.0),
            ..Default::default()
        },
    )];
    let ids: Vec<PointId> = named
        .iter()
        .filter(|i| is_point_id(i))
        .map(|i| point_id_from_str(i))
        .collect();
    if !ids.is_empty() {
        should.push(Condition::has_id(ids));
    }
    let filter = Filter {
        must: vec![Condition::matches(m.user.clone(), user.to_string())],
        should,
        must_not: vec![Condition::matches(
            m.role.clone(),
            "conversation_pair".to_string(),
        )],
        ..Default::default()
    };
    let scrolls = collections
        .iter()
        .map(|coll| points.scroll_all(coll, filter.clone()));
    let mut out = HashMap::new();
    for page in futures::future::try_join_all(scrolls).await? {
        for p in &page {
            keep_message(points, user, p, &mut out);
        }
    }
    Ok(out)
}

/// The user's messages with these ids (the first collection that has an id wins; ids Qdrant cannot parse are left out).
async fn by_ids(
    points: &Points,
    collections: &[String],
    user: &str,
    ids: &[String],
) -> Result<HashMap<String, Message>, FetchError> {
    let ids: Vec<PointId> = ids
        .iter()
        .filter(|i| is_point_id(i))
        .map(|i| point_id_from_str(i))
        .collect();
    let mut out = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let gets = collections.iter().map(|coll| {
        points.client().get_points(
            GetPointsBuilder::new(coll, ids.clone())
                .with_payload(points.payload_fields())
                .with_vectors(false),
        )
    });
    for r in futures::future::try_join_all(gets).await? {
        for p in &r.result {
            if p.id.as_ref().map(point_id_string).is_some() {
                keep_message(points, user, p, &mut out);
            }
        }
    }
    Ok(out)
}

/// Builds the context of one (bot, user) at wall-clock time `now_ms`.
pub async fn context(
    store: &Store,
    points: &Points,
    settings: &ContextSettings,
    q: &ContextQuery<'_>,
    now_ms: Millis,
) -> Result<Context, ContextError> {
    let (bot, user) = (q.bot, q.user_id);
    let cfg = &settings.tracker;
    // Earlier recaps: one more than could fit, plus one for the closed conversation. By time they come with the key's
    // state (one statement); ranked by `query=` they are searched while Qdrant is read.
    let depth = (q.max_tokens / 16).clamp(1, 100) as i64 + 1;
    let range = Range {
        summary_type: Some("time_window".into()),
        ..Default::default()
    };
    let by_time = if q.query.is_some() { 0 } else { depth };
    let (state, recalled) = key_state(store, bot, user, &range, by_time).await?;
    let earlier_fut = async {
        match &q.query {
            Some(tsq) => super::text_search(store, bot, user, tsq, &range, depth).await,
            None => Ok(recalled),
        }
    };

    // Points stored after everything recap has checkpointed for the key (within the longest open window's reach).
    let known_max = state
        .open
        .iter()
        .map(|p| p.1)
        .chain(state.last_window.as_ref().map(|w| w.end_ms))
        .max();
    let reach = now_ms - cfg.max_span_ms - cfg.lateness_ms;
    let from_ms = known_max.map_or(reach, |k| k.max(reach));
    // The open messages the running summary does not cover are read by id at the same time as the scroll (the
    // conversation is almost always the open window; any other message it needs is read after).
    let prefetch: Vec<String> = {
        let covered: HashSet<&str> = state
            .running
            .as_ref()
            .map(|r| r.point_ids.iter().map(String::as_str).collect())
            .unwrap_or_default();
        state
            .open
            .iter()
            .filter(|p| !covered.contains(p.0.as_str()))
            .map(|p| p.0.clone())
            .collect()
    };
    let bot_for = settings.bot_for_collection.clone();
    let qdrant_fut = async {
        let collections = match points.collections_for(bot, &|c| bot_for(c)).await {
            Ok(c) => c,
            Err(FetchError::NoCollection(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let scrolled = scroll_conversation(points, &collections, user, from_ms, &prefetch).await?;
        Ok::<_, FetchError>((collections, scrolled))
    };
    let (earlier, qd) = tokio::join!(earlier_fut, qdrant_fut);
    let mut earlier = earlier?;
    let (collections, scrolled) = qd?;

    // The conversation the latest message is in: open messages and newer points, minus the last closed window's.
    let closed: HashSet<&str> = state
        .last_window
        .as_ref()
        .map(|w| w.points.iter().map(|p| p.0.as_str()).collect())
        .unwrap_or_default();
    let mut candidates: Vec<(String, Millis)> = state.open.clone();
    // the points stored after the checkpoint are candidates; an open message read by id is one already (with the
    // checkpoint's time)
    let named: HashSet<&str> = prefetch.iter().map(String::as_str).collect();
    candidates.extend(
        scrolled
            .values()
            .filter(|m| m.ts_ms >= from_ms || !named.contains(m.point_id.as_str()))
            .map(|m| (m.point_id.clone(), m.ts_ms)),
    );
    let mut texts = scrolled;
    candidates.retain(|p| !closed.contains(p.0.as_str()));
    let mut conv = fit::latest_window(cfg, &candidates);
    let mut open = !conv.is_empty();
    if conv.is_empty()
        && let Some(w) = &state.last_window
        && !w.done
    {
        // Closed, but without its final summary yet (due, too short, dead): shown as the open one would be.
        conv = fit::latest_window(cfg, &w.points);
        open = false;
    }

    let mut budgeted = Budgeted {
        summary: None,
        messages: Vec::new(),
        earlier: Vec::new(),
    };
    let mut conversation: Option<Conversation> = None;
    let mut summary: Option<ConversationSummary> = None;
    if !conv.is_empty() {
        let running = state.running.as_ref().filter(|r| {
            let until = r.covers_until.as_ref().map_or(Millis::MIN, ms);
            fit::running_usable(&conv, &r.point_ids, until)
        });
        let covered: HashSet<&str> = running
            .map(|r| r.point_ids.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let rest: Vec<&(String, Millis)> = conv
            .iter()
            .filter(|p| !covered.contains(p.0.as_str()))
            .collect();
        let missing: Vec<String> = rest
            .iter()
            .filter(|p| !texts.contains_key(&p.0))
            .map(|p| p.0.clone())
            .collect();
        if !missing.is_empty() {
            texts.extend(by_ids(points, &collections, user, &missing).await?);
        }
        budgeted.messages = rest
            .iter()
            .filter_map(|p| texts.get(&p.0))
            .map(|m| Msg {
                point_id: m.point_id.clone(),
                role: m.role.clone(),
                text: m.text.clone(),
                ts_ms: m.ts_ms,
                truncated: false,
            })
            .collect();
        if let Some(r) = running {
            let s = ConversationSummary {
                text: r.text.clone(),
                key_topics: r.key_topics.clone(),
                message_count: r.point_ids.len(),
                covers_until: r.covers_until.or_else(|| {
                    conv.iter()
                        .filter(|p| covered.contains(p.0.as_str()))
                        .map(|p| p.1)
                        .max()
                        .map(at)
                }),
            };
            budgeted.summary = Some((fit::summary_tokens(&s.text, &s.key_topics), s.message_count));
            summary = Some(s);
        }
        conversation = Some(Conversation {
            start: at(conv[0].1),
            open,
            summary: None,
            messages: Vec::new(),
        });
    } else {
        // None open: the last closed window with its final summary (newest time window), not repeated in earlier.
        let last = if q.query.is_some() {
            super::recall(store, bot, user, &range, 1).await?.pop()
        } else {
            earlier.first().cloned()
        };
        if let Some(item) = last {
            earlier.retain(|e| e.id != item.id);
            let s = ConversationSummary {
                text: item.text.clone(),
                key_topics: item.key_topics.clone(),
                message_count: usize::try_from(item.message_count).unwrap_or(0),
                covers_until: Some(item.end),
            };
            budgeted.summary = Some((fit::summary_tokens(&s.text, &s.key_topics), s.message_count));
            summary = Some(s);
            conversation = Some(Conversation {
                start: item.start,
                open: false,
                summary: None,
                messages: Vec::new(),
            });
        }
    }
    earlier.truncate(depth as usize - 1);
    budgeted.earlier = earlier
        .iter()
        .map(|e| fit::summary_tokens(&e.text, &e.key_topics))
        .collect();
    let fitted = fit::fit(budgeted, q.max_tokens);
    earlier.truncate(fitted.earlier);
    if let Some(c) = conversation.as_mut() {
        c.summary = summary.filter(|_| fitted.summary);
        c.messages = fitted
            .messages
            .into_iter()
            .map(|m| ContextMessage {
                role: m.role,
                text: m.text,
                ts: at(m.ts_ms),
                point_id: m.point_id,
                truncated: m.truncated,
            })
            .collect();
    }
    Ok(Context {
        bot: bot.to_string(),
        user_id: user.to_string(),
        tokens: fitted.tokens,
        max_tokens: q.max_tokens,
        omitted: fitted.omitted,
        conversation,
        earlier,
    })
}
