//! One window's page: its summary, messages and history.

use std::fmt::Write;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::Row;

use super::server_error;
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{self, esc, page, q, ts, usd};
use crate::sink::StoreError;

#[derive(Deserialize, Default)]
pub struct WindowQuery {
    retried: Option<u64>,
}

pub async fn window(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Path(id): Path<i64>,
    Query(wq): Query<WindowQuery>,
) -> Response {
    match window_html(&c, session.as_deref(), id, wq).await {
        Ok(Some(h)) => Html(h).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Html(page(
                "not found",
                "",
                session.as_deref(),
                "<p class=\"error\">No such window.</p>",
            )),
        )
            .into_response(),
        Err(e) => server_error(e),
    }
}

async fn window_html(
    c: &Console,
    session: Option<&Session>,
    id: i64,
    wq: WindowQuery,
) -> Result<Option<String>, StoreError> {
    let pool = c.store.pool();
    let Some(w) = sqlx::query(
        "SELECT w.bot_name, w.user_id, w.start_ts, w.end_ts, w.state, w.message_count, w.revision, w.attempts,
                w.last_error, w.coverage, w.lease_owner, w.lease_until, w.updated_at,
                s.summary_text, s.key_topics, s.emotional_tone, s.summarizer, s.model, s.prompt_tokens,
                s.completion_tokens, s.cost_usd, s.confidence_score, s.id
         FROM recap_windows w LEFT JOIN conversation_summaries s ON s.id = w.summary_id WHERE w.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let bot: String = w.get(0);
    let user: String = w.get(1);
    let start: DateTime<Utc> = w.get(2);
    let end: DateTime<Utc> = w.get(3);
    let state: String = w.get(4);
    let coverage: Option<String> = w.get(9);
    let mut b = format!(
        r#"<h1>Window {id} <span class="state {state}" id="window-state">{}</span></h1>
<p><a href="/console/conversations?bot={}&amp;user={}">{} / {}</a> · {} – {} UTC · {} messages · revision {} · attempts {}</p>"#,
        esc(&state),
        q(&bot),
        q(&user),
        esc(&bot),
        esc(&user),
        ts(start),
        ts(end),
        w.get::<i32, _>(5),
        w.get::<i32, _>(6),
        w.get::<i32, _>(7),
    );
    if let Some(n) = wq.retried {
        let _ = write!(
            b,
            r#"<p class="notice" id="retry-result">Retry: {n} dead window(s) put back to due{}.</p>"#,
            if state == "done" {
                " — and summarized since"
            } else {
                "; a worker picks it up shortly (reload)"
            }
        );
    }
    if let Some(err) = w.get::<Option<String>, _>(8) {
        let _ = write!(
            b,
            r#"<p class="error" id="last-error">Last error: {}</p>"#,
            esc(&err)
        );
    }
    if state == "dead"
        && let Some(s) = session
    {
        let _ = write!(
            b,
            r#"<form method="post" action="/console/dead/retry" class="inline">{}<input type="hidden" name="window" value="{id}"><button type="submit" id="retry-window">Retry this window</button></form>"#,
            view::csrf_field(s)
        );
    }
    // Messages as the worker fetches them: the window's recorded point ids plus a user/time scroll.
    let ids = c.store.window_points(id).await?;
    let bot_for = |name: &str| c.cfg.bot_for_collection(name);
    let fetched = match c.points.collections_for(&bot, &bot_for).await {
        Ok(colls) => c
            .points
            .fetch_window(
                &colls,
                &ids,
                &user,
                (start.timestamp_millis(), end.timestamp_millis()),
            )
            .await
            .map(|(m, _)| m),
        Err(e) => Err(e),
    };
    let mut msgs_html = String::new();
    let mut coverage_line = String::new();
    match &fetched {
        Ok(msgs) => {
            msgs_html.push_str(r#"<div class="msgs" id="messages">"#);
            for m in msgs {
                let cls = if m.role == "user" {
                    "user"
                } else {
                    "assistant"
                };
                let _ = write!(
                    msgs_html,
                    r#"<div class="msg {cls}"><span class="who">{} · {}</span>{}</div>"#,
                    esc(&m.role),
                    crate::sink::to_utc(m.ts_ms).format("%H:%M:%S"),
                    esc(&m.text)
                );
            }
            msgs_html.push_str("</div>");
            let fetched_ids: Vec<String> = msgs.iter().map(|m| m.point_id.clone()).collect();
            let now = crate::sink::coverage_fingerprint(&fetched_ids);
            coverage_line = match &coverage {
                Some(cov) if *cov == now => format!(
                    "the summary covers exactly these {} messages (fingerprint {})",
                    msgs.len(),
                    esc(cov)
                ),
                Some(cov) => format!(
                    "the summary's fingerprint {} differs from these {} messages' ({}): messages changed since",
                    esc(cov),
                    msgs.len(),
                    now
                ),
                None => format!("no summary yet; {} messages in Qdrant", msgs.len()),
            };
        }
        Err(e) => {
            let _ = write!(
                msgs_html,
                r#"<p class="error" id="messages">Qdrant: {}</p>"#,
                esc(&e.to_string())
            );
        }
    }
    let _ = write!(
        b,
        r#"<p id="coverage">Coverage: {coverage_line}; {} point ids recorded for this window.</p>"#,
        ids.len()
    );
    let summary = match w.get::<Option<String>, _>(13) {
        Some(text) => format!(
            r#"<div class="summary" id="summary">{}</div><p>topics: {} · tone: {} · summarizer: {} {} · tokens {} + {} · cost {} · confidence {:.2} · row {}</p>"#,
            esc(&text),
            esc(&w
                .get::<Option<Vec<String>>, _>(14)
                .unwrap_or_default()
                .join(", ")),
            esc(w.get::<Option<String>, _>(15).as_deref().unwrap_or("-")),
            esc(w.get::<Option<String>, _>(16).as_deref().unwrap_or("-")),
            esc(w.get::<Option<String>, _>(17).as_deref().unwrap_or("")),
            w.get::<Option<i32>, _>(18).unwrap_or(0),
            w.get::<Option<i32>, _>(19).unwrap_or(0),
            w.get::<Option<f64>, _>(20).map(usd).unwrap_or("-".into()),
            w.get::<Option<f64>, _>(21).unwrap_or(0.0),
            w.get::<Option<i32>, _>(22).unwrap_or(0),
        ),
        None => r#"<p class="empty" id="summary-none">No summary row.</p>"#.into(),
    };
    let _ = write!(
        b,
        r#"<div class="grid2"><div class="panel"><h2>Messages (from Qdrant)</h2>{msgs_html}</div><div class="panel"><h2>Summary</h2>{summary}</div></div>"#
    );
    Ok(Some(page(
        &format!("window {id}"),
        "Conversations",
        session,
        &b,
    )))
}
