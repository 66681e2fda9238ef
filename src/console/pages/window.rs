//! One window's page: its summary, messages and history.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::server_error;
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{self, page, q, ts, usd};
use crate::model::WindowState;
use crate::sink::StoreError;
use crate::summarize::Message;

#[derive(Deserialize, Default)]
pub struct WindowQuery {
    retried: Option<u64>,
}

/// The window row and its summary row (if any).
#[derive(sqlx::FromRow)]
struct WindowRow {
    bot_name: String,
    user_id: String,
    start_ts: DateTime<Utc>,
    end_ts: DateTime<Utc>,
    state: WindowState,
    message_count: i32,
    revision: i32,
    attempts: i32,
    last_error: Option<String>,
    coverage: Option<String>,
    summary_text: Option<String>,
    key_topics: Option<Vec<String>>,
    emotional_tone: Option<String>,
    summarizer: Option<String>,
    model: Option<String>,
    prompt_tokens: Option<i32>,
    completion_tokens: Option<i32>,
    cost_usd: Option<f64>,
    confidence_score: Option<f64>,
    summary_row: Option<i32>,
}

/// What the window page shows.
struct WindowData {
    id: i64,
    w: WindowRow,
    /// The point ids recorded for the window.
    ids: Vec<String>,
    /// Its messages as the worker fetches them (recorded ids plus a user/time scroll), or Qdrant's error.
    fetched: Result<Vec<Message>, String>,
}

pub async fn window(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Path(id): Path<i64>,
    Query(wq): Query<WindowQuery>,
) -> Response {
    match load_window(&c, id).await {
        Ok(Some(d)) => {
            Html(render_window(&d, session.as_deref(), wq.retried).into_string()).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Html(
                page(
                    "not found",
                    "",
                    session.as_deref(),
                    html! { p.error { "No such window." } },
                )
                .into_string(),
            ),
        )
            .into_response(),
        Err(e) => server_error(e),
    }
}

async fn load_window(c: &Console, id: i64) -> Result<Option<WindowData>, StoreError> {
    let Some(w) = sqlx::query_as::<_, WindowRow>(
        "SELECT w.bot_name, w.user_id, w.start_ts, w.end_ts, w.state, w.message_count, w.revision, w.attempts,
                w.last_error, w.coverage,
                s.summary_text, s.key_topics, s.emotional_tone, s.summarizer, s.model, s.prompt_tokens,
                s.completion_tokens, s.cost_usd, s.confidence_score, s.id AS summary_row
         FROM recap_windows w LEFT JOIN conversation_summaries s ON s.id = w.summary_id WHERE w.id = $1",
    )
    .bind(id)
    .fetch_optional(c.store.pool())
    .await?
    else {
        return Ok(None);
    };
    // Messages as the worker fetches them: the window's recorded point ids plus a user/time scroll.
    let ids = c.store.window_points(id).await?;
    let bot_for = |name: &str| c.cfg.bot_for_collection(name);
    let fetched = match c.points.collections_for(&w.bot_name, &bot_for).await {
        Ok(colls) => c
            .points
            .fetch_window(
                &colls,
                &ids,
                &w.user_id,
                (w.start_ts.timestamp_millis(), w.end_ts.timestamp_millis()),
            )
            .await
            .map(|(m, _)| m),
        Err(e) => Err(e),
    };
    Ok(Some(WindowData {
        id,
        w,
        ids,
        fetched: fetched.map_err(|e| e.to_string()),
    }))
}

fn render_window(d: &WindowData, session: Option<&Session>, retried: Option<u64>) -> Markup {
    let (id, w) = (d.id, &d.w);
    let state = w.state;
    let coverage_line = match &d.fetched {
        Ok(msgs) => {
            let fetched_ids: Vec<String> = msgs.iter().map(|m| m.point_id.clone()).collect();
            let now = crate::sink::coverage_fingerprint(&fetched_ids);
            match &w.coverage {
                Some(cov) if *cov == now => format!(
                    "the summary covers exactly these {} messages (fingerprint {cov})",
                    msgs.len(),
                ),
                Some(cov) => format!(
                    "the summary's fingerprint {cov} differs from these {} messages' ({now}): messages changed since",
                    msgs.len(),
                ),
                None => format!("no summary yet; {} messages in Qdrant", msgs.len()),
            }
        }
        Err(_) => String::new(),
    };
    let body = html! {
        h1 { "Window " (id) " " span class={ "state " (state) } id="window-state" { (state) } }
        p {
            a href={ "/console/conversations?bot=" (q(&w.bot_name)) "&user=" (q(&w.user_id)) } {
                (w.bot_name) " / " (w.user_id)
            }
            " · " (ts(w.start_ts)) " – " (ts(w.end_ts)) " UTC · " (w.message_count) " messages · revision "
            (w.revision) " · attempts " (w.attempts)
        }
        @if let Some(n) = retried {
            p.notice #retry-result {
                "Retry: " (n) " dead window(s) put back to due"
                @if state == WindowState::Done { " — and summarized since" } @else { "; a worker picks it up shortly (reload)" }
                "."
            }
        }
        @if let Some(err) = &w.last_error {
            p.error #last-error { "Last error: " (err) }
        }
        @if state == WindowState::Dead {
            @if let Some(s) = session {
                form method="post" action="/console/dead/retry" class="inline" {
                    (view::csrf_field(s))
                    input type="hidden" name="window" value=(id);
                    button type="submit" id="retry-window" { "Retry this window" }
                }
            }
        }
        p #coverage {
            "Coverage: " (coverage_line) "; " (d.ids.len()) " point ids recorded for this window."
        }
        div.grid2 {
            div.panel {
                h2 { "Messages (from Qdrant)" }
                @match &d.fetched {
                    Ok(msgs) => {
                        div.msgs #messages {
                            @for m in msgs {
                                div class={ "msg " (if m.role == "user" { "user" } else { "assistant" }) } {
                                    span.who {
                                        (m.role) " · " (crate::sink::to_utc(m.ts_ms).format("%H:%M:%S"))
                                    }
                                    (m.text)
                                }
                            }
                        }
                    }
                    Err(e) => { p.error #messages { "Qdrant: " (e) } }
                }
            }
            div.panel {
                h2 { "Summary" }
                @match &w.summary_text {
                    Some(text) => {
                        div.summary #summary { (text) }
                        p {
                            "topics: " (w.key_topics.as_deref().unwrap_or_default().join(", "))
                            " · tone: " (w.emotional_tone.as_deref().unwrap_or("-"))
                            " · summarizer: " (w.summarizer.as_deref().unwrap_or("-"))
                            " " (w.model.as_deref().unwrap_or(""))
                            " · tokens " (w.prompt_tokens.unwrap_or(0)) " + " (w.completion_tokens.unwrap_or(0))
                            " · cost " (w.cost_usd.map(usd).unwrap_or("-".into()))
                            " · confidence " (format!("{:.2}", w.confidence_score.unwrap_or(0.0)))
                            " · row " (w.summary_row.unwrap_or(0))
                        }
                    }
                    None => { p.empty #summary-none { "No summary row." } }
                }
            }
        }
    };
    page(&format!("window {id}"), "Conversations", session, body)
}
