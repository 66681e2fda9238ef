//! The dead letters page and the retry of dead windows.

use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::server_error;
use crate::console::auth::Session;
use crate::console::view::{self, page, table, ts};
use crate::console::{Console, refuse_without_csrf};
use crate::model::state_sql;
use crate::sink::StoreError;

#[derive(Deserialize, Default)]
pub struct DeadQuery {
    retried: Option<u64>,
}

/// A dead window.
#[derive(sqlx::FromRow)]
struct DeadWindow {
    id: i64,
    bot_name: String,
    user_id: String,
    start_ts: DateTime<Utc>,
    attempts: i32,
    last_error: Option<String>,
    updated_at: DateTime<Utc>,
}

/// A dead letter, its body cut to 240 bytes.
#[derive(sqlx::FromRow)]
struct DeadLetter {
    id: i64,
    source: String,
    subject: Option<String>,
    stream_seq: Option<i64>,
    reason: String,
    received_at: DateTime<Utc>,
    excerpt: Vec<u8>,
}

/// What the dead letters page shows (the latest 200 of each).
struct DeadData {
    windows: Vec<DeadWindow>,
    letters: Vec<DeadLetter>,
}

pub async fn dead(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Query(dq): Query<DeadQuery>,
) -> Response {
    match load_dead(&c).await {
        Ok(d) => {
            Html(render_dead(&d, session.as_deref(), dq.retried).into_string()).into_response()
        }
        Err(e) => server_error(e),
    }
}

async fn load_dead(c: &Console) -> Result<DeadData, StoreError> {
    let pool = c.store.pool();
    // `WindowState::Dead` a constant in the text: the partial index `idx_recap_windows_not_done` (see
    // `model::state_sql`).
    let windows = sqlx::query_as(state_sql!(
        "SELECT id, bot_name, user_id, start_ts, attempts, last_error, updated_at FROM recap_windows
         WHERE state = {dead} ORDER BY updated_at DESC LIMIT 200"
    ))
    .fetch_all(pool)
    .await?;
    let letters = sqlx::query_as(
        "SELECT id, source, subject, stream_seq, reason, received_at, substring(raw FROM 1 FOR 240) AS excerpt
         FROM recap_dead_letters ORDER BY id DESC LIMIT 200",
    )
    .fetch_all(pool)
    .await?;
    Ok(DeadData { windows, letters })
}

fn render_dead(d: &DeadData, session: Option<&Session>, retried: Option<u64>) -> Markup {
    let csrf = html! { @if let Some(s) = session { (view::csrf_field(s)) } };
    let windows: Vec<Vec<Markup>> = d
        .windows
        .iter()
        .map(|w| {
            vec![
                html! { a href={ "/console/window/" (w.id) } { "window " (w.id) } },
                html! { (w.bot_name) },
                html! { (w.user_id) },
                html! { (ts(w.start_ts)) },
                html! { (w.attempts) },
                html! { (w.last_error.as_deref().unwrap_or("")) },
                html! { (ts(w.updated_at)) },
                html! {
                    form method="post" action="/console/dead/retry" class="inline" {
                        (csrf)
                        input type="hidden" name="window" value=(w.id);
                        button type="submit" class="retry" data-window=(w.id) { "Retry" }
                    }
                },
            ]
        })
        .collect();
    let letters: Vec<Vec<Markup>> = d
        .letters
        .iter()
        .map(|l| {
            vec![
                html! { (l.id) },
                html! { (l.source) },
                html! { (l.subject.as_deref().unwrap_or("")) },
                html! { @if let Some(seq) = l.stream_seq { (seq) } },
                html! { (l.reason) },
                html! { (ts(l.received_at)) },
                html! { pre.body { (String::from_utf8_lossy(&l.excerpt)) } },
            ]
        })
        .collect();
    let body = html! {
        h1 { "Dead windows and dead letters" }
        @if let Some(n) = retried {
            p.notice #retry-result { (n) " dead window(s) put back to due." }
        }
        h2 { "Dead windows (" (d.windows.len()) ")" }
        (table(
            "dead-windows",
            &["window", "bot", "user", "start (UTC)", "attempts", "reason", "when (UTC)", ""],
            &windows,
            "no dead window",
        ))
        @if !d.windows.is_empty() {
            form method="post" action="/console/dead/retry" {
                (csrf)
                button type="submit" id="retry-all" { "Retry all dead windows" }
            }
        }
        h2 { "Dead letters (latest " (d.letters.len()) ")" }
        (table(
            "dead-letters",
            &["id", "source", "subject", "stream seq", "reason", "when (UTC)", "body (excerpt)"],
            &letters,
            "no dead letter",
        ))
    };
    page("Dead letters", "Dead letters", session, body)
}

#[derive(Deserialize)]
pub struct RetryForm {
    csrf: Option<String>,
    window: Option<i64>,
}

/// Puts a dead window (or all) back to due: [`crate::sink::Store::retry_dead`], the statement of `recap retry`.
pub async fn retry(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Form(f): Form<RetryForm>,
) -> Response {
    if let Some(r) = refuse_without_csrf(session.as_deref(), f.csrf.as_deref()) {
        return r;
    }
    match c.store.retry_dead(f.window).await {
        Ok(n) => {
            tracing::info!(window_id = ?f.window, retried = n, "console: dead window(s) put back to due");
            match f.window {
                Some(id) => Redirect::to(&format!("/console/window/{id}?retried={n}")),
                None => Redirect::to(&format!("/console/dead?retried={n}")),
            }
            .into_response()
        }
        Err(e) => server_error(e),
    }
}
