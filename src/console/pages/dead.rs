//! The dead letters page and the retry of dead windows.

use std::fmt::Write;

use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use sqlx::Row;

use super::server_error;
use crate::console::auth::Session;
use crate::console::view::{self, esc, page, table, ts};
use crate::console::{Console, refuse_without_csrf};
use crate::sink::StoreError;

#[derive(Deserialize, Default)]
pub struct DeadQuery {
    retried: Option<u64>,
}

pub async fn dead(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Query(dq): Query<DeadQuery>,
) -> Response {
    match dead_html(&c, session.as_deref(), dq).await {
        Ok(h) => Html(h).into_response(),
        Err(e) => server_error(e),
    }
}

async fn dead_html(
    c: &Console,
    session: Option<&Session>,
    dq: DeadQuery,
) -> Result<String, StoreError> {
    let pool = c.store.pool();
    let windows = sqlx::query(
        "SELECT id, bot_name, user_id, start_ts, attempts, last_error, updated_at FROM recap_windows
         WHERE state = 'dead' ORDER BY updated_at DESC LIMIT 200",
    )
    .fetch_all(pool)
    .await?;
    let letters = sqlx::query(
        "SELECT id, source, subject, stream_seq, reason, received_at, substring(raw FROM 1 FOR 240)
         FROM recap_dead_letters ORDER BY id DESC LIMIT 200",
    )
    .fetch_all(pool)
    .await?;
    let mut b = String::from("<h1>Dead windows and dead letters</h1>");
    if let Some(n) = dq.retried {
        let _ = write!(
            b,
            r#"<p class="notice" id="retry-result">{n} dead window(s) put back to due.</p>"#
        );
    }
    let csrf = session.map(view::csrf_field).unwrap_or_default();
    let rows: Vec<Vec<String>> = windows
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            vec![
                format!(r#"<a href="/console/window/{id}">window {id}</a>"#),
                esc(&r.get::<String, _>(1)),
                esc(&r.get::<String, _>(2)),
                ts(r.get(3)),
                r.get::<i32, _>(4).to_string(),
                esc(r.get::<Option<String>, _>(5).as_deref().unwrap_or("")),
                ts(r.get(6)),
                format!(
                    r#"<form method="post" action="/console/dead/retry" class="inline">{csrf}<input type="hidden" name="window" value="{id}"><button type="submit" class="retry" data-window="{id}">Retry</button></form>"#
                ),
            ]
        })
        .collect();
    let _ = write!(
        b,
        "<h2>Dead windows ({})</h2>{}",
        windows.len(),
        table(
            "dead-windows",
            &[
                "window",
                "bot",
                "user",
                "start (UTC)",
                "attempts",
                "reason",
                "when (UTC)",
                ""
            ],
            &rows,
            "no dead window",
        )
    );
    if !windows.is_empty() {
        let _ = write!(
            b,
            r#"<form method="post" action="/console/dead/retry">{csrf}<button type="submit" id="retry-all">Retry all dead windows</button></form>"#
        );
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|r| {
            let raw: Vec<u8> = r.get(6);
            vec![
                r.get::<i64, _>(0).to_string(),
                esc(&r.get::<String, _>(1)),
                esc(r.get::<Option<String>, _>(2).as_deref().unwrap_or("")),
                r.get::<Option<i64>, _>(3)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                esc(&r.get::<String, _>(4)),
                ts(r.get(5)),
                format!(
                    r#"<pre class="body">{}</pre>"#,
                    esc(&String::from_utf8_lossy(&raw))
                ),
            ]
        })
        .collect();
    let _ = write!(
        b,
        "<h2>Dead letters (latest {})</h2>{}",
        letters.len(),
        table(
            "dead-letters",
            &[
                "id",
                "source",
                "subject",
                "stream seq",
                "reason",
                "when (UTC)",
                "body (excerpt)"
            ],
            &rows,
            "no dead letter",
        )
    );
    Ok(page("Dead letters", "Dead letters", session, &b))
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
