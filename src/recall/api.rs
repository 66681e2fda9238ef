//! The recall HTTP API, mounted on recap's HTTP server (`HTTP_ADDR`).
//!
//! * `GET /v1/recall?bot=&user_id=&since=&until=&limit=&type=&tz=`: summaries overlapping the range, newest first.
//! * `POST /v1/recall/search` `{bot, user_id, vector?, text?, limit?, since?, until?, tz?, type?}`: nearest summaries
//!   by vector (Qdrant `recap_summaries`), by text (Postgres full-text search), or both fused (reciprocal rank fusion).
//! * `DELETE /v1/users/{bot}/{user_id}`: forget a user.
//!
//! Results are `{"items": [...]}`. Every bad input is a 4xx `{"error": "...", "field": "..."}` naming the field.
//! With `RECALL_TOKEN` set, every request needs `Authorization: Bearer <token>` (compared in constant time).

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use dashmap::DashSet;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

mod body;
mod guard;
mod input;

use guard::guard;
use input::known_bot;
pub use input::{
    check_bot, check_no_nul, check_time, check_user, limit_of, range_of, type_of, vector_of,
};

use super::{SummaryItem, vectors};
use crate::config::Secret;
use crate::fetch::Points;
use crate::sink::Store;

/// Most results one request returns.
pub const MAX_LIMIT: i64 = 200;
const DEFAULT_LIMIT: i64 = 20;
const MAX_TEXT_CHARS: usize = 10_000;

/// Shared state of the recall routes.
#[derive(Clone)]
pub struct RecallState(Arc<Inner>);

struct Inner {
    /// The read pool (`RECALL_POOL_SIZE` connections with `RECALL_STATEMENT_TIMEOUT`): every read of the API.
    store: Store,
    /// The service's own pool, for the forget (a write that must not be cut by the read timeout).
    writer: Store,
    points: Arc<Points>,
    token: Option<[u8; 32]>,
    known_bots: DashSet<String>,
    dim: OnceLock<u64>,
    context: OnceLock<super::context::ContextSettings>,
    /// Requests served at once (`RECALL_CONCURRENCY`).
    concurrency: usize,
    /// Which partition's leader a forget fences and where it lists the user's points.
    forget: super::ForgetScope,
}

/// Requests served at once when not configured ([`RecallState::with_reads`]).
pub const DEFAULT_CONCURRENCY: usize = 16;

impl RecallState {
    pub fn new(store: Store, points: Arc<Points>, token: Option<&Secret>) -> Self {
        Self::with_reads(store.clone(), store, DEFAULT_CONCURRENCY, points, token)
    }

    /// Reads on `read` (a small pool of its own, so the read path never starves ingest), the forget on `writer`, at
    /// most `concurrency` requests at once.
    pub fn with_reads(
        read: Store,
        writer: Store,
        concurrency: usize,
        points: Arc<Points>,
        token: Option<&Secret>,
    ) -> Self {
        RecallState(Arc::new(Inner {
            store: read,
            writer,
            concurrency: concurrency.max(1),
            points,
            token: token
                .filter(|t| !t.is_blank())
                // trimmed as the presented token is (a token pasted with a newline still matches)
                .map(|t| Sha256::digest(t.expose().trim().as_bytes()).into()),
            known_bots: DashSet::new(),
            dim: OnceLock::new(),
            context: OnceLock::new(),
            forget: super::ForgetScope::default(),
        }))
    }

    /// The window definition and collections `GET /v1/context` uses (default: the settings' defaults).
    pub fn with_context(self, settings: super::context::ContextSettings) -> Self {
        let _ = self.0.context.set(settings);
        self
    }

    /// The partition layout and collections a forget works with (default: one partition, default patterns).
    pub fn with_forget_scope(mut self, scope: super::ForgetScope) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.forget = scope;
        }
        self
    }
}

/// The recall routes, with auth and metrics.
pub fn router(state: RecallState) -> Router {
    Router::new()
        .route("/v1/recall", get(recall))
        .route("/v1/recall/search", post(search))
        .route("/v1/users/{bot}/{user_id}", delete(forget))
        .route("/v1/context", get(context))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // one semaphore for every route (the non-global layer would give each route its own); outside the guard, so
        // a request waiting for a slot is not yet timed
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            state.0.concurrency,
        ))
        .with_state(state)
}

/// A 4xx (or 503) answer naming the field at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad(field: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field),
            message: message.into(),
        }
    }
    fn unavailable(what: &str, e: impl std::fmt::Display) -> Self {
        warn!(error = %e, "recall: {what} unavailable");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: format!("{what} is unavailable; retry later"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(f) => json!({"error": self.message, "field": f}),
            None => json!({"error": self.message}),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::sink::StoreError> for ApiError {
    /// A 503 only when Postgres is really unavailable (no connection, pool exhausted, the statement timeout, a server
    /// shutting down: [`StoreError::is_connection`](crate::sink::StoreError::is_connection)); a value Postgres cannot
    /// take (SQLSTATE class 22/23, which validation should have caught) is a 400; anything else a 500.
    fn from(e: crate::sink::StoreError) -> Self {
        store_error(e)
    }
}

/// The answer for a store error (see `From<StoreError>`), counted in `recap_recall_store_errors_total{kind}`.
pub fn store_error(e: crate::sink::StoreError) -> ApiError {
    if e.is_connection() {
        metrics::counter!("recap_recall_store_errors_total", "kind" => "unavailable").increment(1);
        return ApiError::unavailable("postgres", e);
    }
    if e.is_repeatable() {
        metrics::counter!("recap_recall_store_errors_total", "kind" => "data").increment(1);
        warn!(error = %e, "recall: postgres refused a value of the request");
        return ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some("query"),
            message: "postgres cannot store or compare a value of this request".into(),
        };
    }
    metrics::counter!("recap_recall_store_errors_total", "kind" => "internal").increment(1);
    warn!(error = %e, "recall: postgres error");
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        field: None,
        message: "internal error reading the store".into(),
    }
}

impl From<super::forget::ForgetError> for ApiError {
    fn from(e: super::forget::ForgetError) -> Self {
        use super::forget::ForgetError;
        match e {
            ForgetError::Store(e) => e.into(),
            ForgetError::Vectors(e) => e.into(),
            ForgetError::Points(e) => ApiError::unavailable("qdrant", e),
        }
    }
}

impl From<vectors::VectorError> for ApiError {
    fn from(e: vectors::VectorError) -> Self {
        ApiError::unavailable("the vector store", e)
    }
}

fn items(items: Vec<SummaryItem>) -> Json<Value> {
    Json(json!({ "items": items }))
}

// ----- GET /v1/recall -----

/// A GET's query parameters: each one known and given once, `bot` and `user_id` present and valid.
struct Params<'a> {
    map: std::collections::HashMap<&'static str, &'a str>,
    bot: &'a str,
    user: &'a str,
}

fn params<'a>(
    pairs: &'a [(String, String)],
    known: &[&'static str],
) -> Result<Params<'a>, ApiError> {
    let mut map = std::collections::HashMap::new();
    for (k, v) in pairs {
        let Some(key) = known.iter().copied().find(|x| *x == k.as_str()) else {
            return Err(ApiError::bad(
                "query",
                format!("unknown parameter {k:?} (known: {})", known.join(", ")),
            ));
        };
        if map.insert(key, v.as_str()).is_some() {
            return Err(ApiError::bad(key, format!("{key} is given more than once")));
        }
    }
    let bot = *map
        .get("bot")
        .ok_or_else(|| ApiError::bad("bot", "bot is required"))?;
    let user = *map
        .get("user_id")
        .ok_or_else(|| ApiError::bad("user_id", "user_id is required"))?;
    check_bot(bot)?;
    check_user(user)?;
    Ok(Params { map, bot, user })
}

async fn recall(
    State(s): State<RecallState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(pairs) = q.map_err(|e| ApiError::bad("query", format!("bad query string: {e}")))?;
    const KNOWN: [&str; 7] = ["bot", "user_id", "since", "until", "limit", "type", "tz"];
    let Params { map: p, bot, user } = params(&pairs, &KNOWN)?;
    let limit = p
        .get("limit")
        .map(|l| {
            l.trim()
                .parse::<i64>()
                .map_err(|_| ApiError::bad("limit", format!("limit {l:?} is not an integer")))
        })
        .transpose()?;
    let limit = limit_of(limit, MAX_LIMIT)?;
    let range = range_of(
        p.get("since").copied(),
        p.get("until").copied(),
        p.get("tz").copied(),
        type_of(p.get("type").copied())?,
    )?;
    known_bot(&s, bot).await?;
    Ok(items(
        super::recall(&s.0.store, bot, user, &range, limit).await?,
    ))
}

// ----- POST /v1/recall/search -----

async fn search(State(s): State<RecallState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let b = body::search_body(&body)?;
    let bot = b
        .bot
        .as_deref()
        .ok_or_else(|| ApiError::bad("bot", "bot is required"))?;
    let user = b
        .user_id
        .as_deref()
        .ok_or_else(|| ApiError::bad("user_id", "user_id is required"))?;
    check_bot(bot)?;
    check_user(user)?;
    let limit = limit_of(b.limit, 100)?;
    let vector = vector_of(b.vector)?;
    let text = match b.text.as_deref() {
        None => None,
        Some(t) if t.contains('\0') => {
            return Err(ApiError::bad("text", "text contains a NUL byte"));
        }
        Some(t) if t.chars().count() > MAX_TEXT_CHARS => {
            return Err(ApiError::bad(
                "text",
                format!("text is longer than {MAX_TEXT_CHARS} characters"),
            ));
        }
        Some(t) => Some(
            super::text_query(t)
                .ok_or_else(|| ApiError::bad("text", "text has no words to search for"))?,
        ),
    };
    if vector.is_none() && text.is_none() {
        return Err(ApiError::bad("vector", "give a vector, a text, or both"));
    }
    let summary_type = type_of(b.summary_type.as_deref())?;
    let range = range_of(
        b.since.as_deref(),
        b.until.as_deref(),
        b.tz.as_deref(),
        summary_type,
    )?;
    known_bot(&s, bot).await?;
    let client = s.0.points.client();
    if let Some(v) = &vector {
        let dim = match s.0.dim.get() {
            Some(d) => Some(*d),
            None => {
                let d = vectors::collection_dim(client).await?;
                if let Some(d) = d {
                    let _ = s.0.dim.set(d);
                }
                d
            }
        };
        if let Some(d) = dim
            && v.len() as u64 != d
        {
            return Err(ApiError::bad(
                "vector",
                format!(
                    "vector has {} dimensions; the summary vectors have {d}",
                    v.len()
                ),
            ));
        }
    }
    // Each ranking is deeper than `limit` when fusing, so an item ranked low by one and high by the other counts.
    let depth = if vector.is_some() && text.is_some() {
        (limit * 3).min(100)
    } else {
        limit
    };
    // The two rankings are independent: run them at once (a fused search costs the slower one, not the sum).
    let vector_ranking = async {
        match (&vector, s.0.dim.get()) {
            (Some(v), Some(_)) => {
                let mut filter = vectors::user_filter(
                    bot,
                    user,
                    range.since.map(|t| t.timestamp()),
                    range.until.map(|t| t.timestamp()),
                );
                if let Some(t) = &range.summary_type {
                    filter.must.push(qdrant_client::qdrant::Condition::matches(
                        "summary_type",
                        t.clone(),
                    ));
                }
                Ok::<Vec<(i32, f32)>, ApiError>(
                    vectors::search(client, filter, v.clone(), depth as u64).await?,
                )
            }
            _ => Ok(Vec::new()),
        }
    };
    let text_ranking = async {
        match &text {
            Some(t) => Ok::<Vec<SummaryItem>, ApiError>(
                super::text_search(&s.0.store, bot, user, t, &range, depth).await?,
            ),
            None => Ok(Vec::new()),
        }
    };
    let (by_vector, by_text) = tokio::try_join!(vector_ranking, text_ranking)?;
    let ranked: Vec<(i32, f64)> = match (&vector, &text) {
        (Some(_), Some(_)) => super::rrf(
            &[
                by_vector.iter().map(|x| x.0).collect(),
                by_text.iter().map(|x| x.id).collect(),
            ],
            60.0,
        ),
        (Some(_), None) => by_vector
            .iter()
            .map(|(id, sc)| (*id, f64::from(*sc)))
            .collect(),
        _ => by_text
            .iter()
            .map(|x| (x.id, x.score.unwrap_or(0.0)))
            .collect(),
    };
    let mut rows = if vector.is_some() {
        let ids: Vec<i32> = ranked.iter().map(|x| x.0).collect();
        super::by_ids(&s.0.store, bot, user, &ids).await?
    } else {
        by_text.into_iter().map(|x| (x.id, x)).collect()
    };
    let out: Vec<SummaryItem> = ranked
        .into_iter()
        .filter_map(|(id, score)| {
            rows.remove(&id).map(|it| SummaryItem {
                score: Some(score),
                ..it
            })
        })
        .take(limit as usize)
        .collect();
    Ok(items(out))
}

// ----- DELETE /v1/users/{bot}/{user_id} -----

async fn forget(
    State(s): State<RecallState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path((bot, user)) = p.map_err(|e| ApiError::bad("path", format!("bad path: {e}")))?;
    check_bot(&bot)?;
    check_user(&user)?;
    let deleted = super::forget_user(&s.0.writer, &s.0.points, &s.0.forget, &bot, &user).await?;
    metrics::counter!("recap_users_forgotten_total").increment(1);
    let rows: u64 = deleted.iter().map(|(_, n)| n).sum();
    // a tag (a hash), never the id of a user who asked to be forgotten
    info!(bot = %bot, user_tag = %super::user_tag(&bot, &user), rows, "user forgotten");
    let deleted: Map<String, Value> = deleted.into_iter().map(|(t, n)| (t, json!(n))).collect();
    Ok(Json(json!({ "forgotten": true, "deleted": deleted })))
}

// ----- GET /v1/context -----

/// Default `max_tokens` of `GET /v1/context`.
pub const DEFAULT_CONTEXT_TOKENS: usize = 2000;
/// Largest `max_tokens` accepted.
pub const MAX_CONTEXT_TOKENS: usize = 1_000_000;

impl From<super::context::ContextError> for ApiError {
    fn from(e: super::context::ContextError) -> Self {
        match e {
            super::context::ContextError::Store(e) => e.into(),
            super::context::ContextError::Fetch(e) => ApiError::unavailable("qdrant", e),
        }
    }
}

async fn context(
    State(s): State<RecallState>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<super::context::Context>, ApiError> {
    use super::context::fit::MIN_MAX_TOKENS;
    let Query(pairs) = q.map_err(|e| ApiError::bad("query", format!("bad query string: {e}")))?;
    const KNOWN: [&str; 4] = ["bot", "user_id", "max_tokens", "query"];
    let Params { map: p, bot, user } = params(&pairs, &KNOWN)?;
    let max_tokens = match p.get("max_tokens") {
        None => DEFAULT_CONTEXT_TOKENS,
        Some(m) => match m.trim().parse::<i64>() {
            Ok(n) if (MIN_MAX_TOKENS as i64..=MAX_CONTEXT_TOKENS as i64).contains(&n) => n as usize,
            Ok(n) => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!(
                        "max_tokens must be between {MIN_MAX_TOKENS} and {MAX_CONTEXT_TOKENS} (got {n})"
                    ),
                ));
            }
            Err(_) => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("max_tokens {m:?} is not an integer"),
                ));
            }
        },
    };
    let query = match p.get("query") {
        None => None,
        Some(t) if t.chars().count() > MAX_TEXT_CHARS => {
            return Err(ApiError::bad(
                "query",
                format!("query is longer than {MAX_TEXT_CHARS} characters"),
            ));
        }
        Some(t) => Some(check_no_nul("query", t).and_then(|()| {
            super::text_query(t)
                .ok_or_else(|| ApiError::bad("query", "query has no words to search for"))
        })?),
    };
    known_bot(&s, bot).await?;
    let default_settings;
    let settings = match s.0.context.get() {
        Some(c) => c,
        None => {
            default_settings = super::context::ContextSettings::default();
            &default_settings
        }
    };
    let req = super::context::ContextQuery {
        bot,
        user_id: user,
        max_tokens,
        query,
    };
    let now = Utc::now().timestamp_millis();
    Ok(Json(
        super::context::context(&s.0.store, &s.0.points, settings, &req, now).await?,
    ))
}
