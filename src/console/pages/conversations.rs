//! The conversations page: a user's (or bot's) windows and summaries as a timeline.

use std::fmt::Write;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use sqlx::Row;

use super::server_error;
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{esc, naive, num, page, q, table, usd};
use crate::sink::StoreError;

#[derive(Deserialize, Default)]
pub struct ConvQuery {
    bot: Option<String>,
    user: Option<String>,
}

struct TimelineItem {
    kind: String,
    link: Option<i64>,
    start: NaiveDateTime,
    end: NaiveDateTime,
    state: String,
    count: i32,
    topics: Vec<String>,
    tone: Option<String>,
    revision: i32,
    summarizer: Option<String>,
    tokens: Option<(i32, i32)>,
    cost: Option<f64>,
}

pub async fn conversations(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Query(cq): Query<ConvQuery>,
) -> Response {
    match conversations_html(&c, session.as_deref(), cq).await {
        Ok(h) => Html(h).into_response(),
        Err(e) => server_error(e),
    }
}

async fn conversations_html(
    c: &Console,
    session: Option<&Session>,
    cq: ConvQuery,
) -> Result<String, StoreError> {
    let pool = c.store.pool();
    let bots: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT bot_name FROM recap_watermarks ORDER BY bot_name")
            .fetch_all(pool)
            .await?;
    let bot = cq
        .bot
        .filter(|b| !b.is_empty())
        .or_else(|| bots.first().cloned());
    let user = cq.user.map(|u| u.trim().to_string()).unwrap_or_default();
    let mut b = String::from("<h1>Conversations</h1>");
    b.push_str(
        r#"<form method="get" action="/console/conversations" id="find"><label>bot <select name="bot" id="bot">"#,
    );
    for x in &bots {
        let sel = if Some(x) == bot.as_ref() {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, r#"<option value="{0}"{sel}>{0}</option>"#, esc(x));
    }
    let _ = write!(
        b,
        r#"</select></label> <label>user id <input name="user" id="user" value="{}" placeholder="user id or its beginning" size="32"></label> <button type="submit" id="search">Search</button></form>"#,
        esc(&user)
    );
    let Some(bot) = bot else {
        b.push_str(r#"<p class="empty">No bot seen yet.</p>"#);
        return Ok(page("Conversations", "Conversations", session, &b));
    };
    if user.is_empty() {
        b.push_str(r#"<p class="muted">Type a user id (or its first characters) to see their timeline.</p>"#);
        return Ok(page("Conversations", "Conversations", session, &b));
    }
    let windows = sqlx::query(
        "SELECT w.id, w.start_ts, w.end_ts, w.state, w.message_count, w.revision, s.key_topics, s.emotional_tone,
                s.summarizer, s.prompt_tokens, s.completion_tokens, s.cost_usd
         FROM recap_windows w LEFT JOIN conversation_summaries s ON s.id = w.summary_id
         WHERE w.bot_name = $1 AND w.user_id = $2 ORDER BY w.start_ts DESC LIMIT 200",
    )
    .bind(&bot)
    .bind(&user)
    .fetch_all(pool)
    .await?;
    if windows.is_empty() {
        // Not an exact id: the users whose id starts with it (an ordered index range, at most 20 names).
        let near: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM (SELECT user_id FROM recap_windows WHERE bot_name = $1 AND user_id >= $2
                 ORDER BY user_id LIMIT 2000) x ORDER BY user_id LIMIT 20",
        )
        .bind(&bot)
        .bind(&user)
        .fetch_all(pool)
        .await?;
        let near: Vec<&String> = near.iter().filter(|u| u.starts_with(&user)).collect();
        if near.is_empty() {
            let _ = write!(
                b,
                r#"<p class="empty" id="no-user">No windows for user {} of {}.</p>"#,
                esc(&user),
                esc(&bot)
            );
        } else {
            b.push_str(r#"<h2>Users starting with that</h2><ul id="users">"#);
            for u in near {
                let _ = write!(
                    b,
                    r#"<li><a href="/console/conversations?bot={}&amp;user={}">{}</a></li>"#,
                    q(&bot),
                    q(u),
                    esc(u)
                );
            }
            b.push_str("</ul>");
        }
        return Ok(page("Conversations", "Conversations", session, &b));
    }
    let rollups = sqlx::query(
        "SELECT summary_type, start_timestamp, end_timestamp, message_count, key_topics, emotional_tone, revision,
                summarizer, prompt_tokens, completion_tokens, cost_usd
         FROM conversation_summaries
         WHERE user_id = $2 AND bot_name = $1 AND coalesce(summary_type, 'time_window') <> 'time_window'
         ORDER BY start_timestamp DESC LIMIT 100",
    )
    .bind(&bot)
    .bind(&user)
    .fetch_all(pool)
    .await?;
    let tokens = |p: Option<i32>, c: Option<i32>| p.zip(c).or(p.map(|p| (p, 0)));
    let mut items: Vec<TimelineItem> = windows
        .iter()
        .map(|r| TimelineItem {
            kind: "window".into(),
            link: Some(r.get(0)),
            start: r.get::<DateTime<Utc>, _>(1).naive_utc(),
            end: r.get::<DateTime<Utc>, _>(2).naive_utc(),
            state: r.get(3),
            count: r.get(4),
            revision: r.get(5),
            topics: r.get::<Option<Vec<String>>, _>(6).unwrap_or_default(),
            tone: r.get(7),
            summarizer: r.get(8),
            tokens: tokens(r.get(9), r.get(10)),
            cost: r.get(11),
        })
        .collect();
    items.extend(rollups.iter().map(|r| {
        TimelineItem {
            kind: r
                .get::<Option<String>, _>(0)
                .unwrap_or_else(|| "rollup".into()),
            link: None,
            start: r.get(1),
            end: r.get(2),
            state: "done".into(),
            count: r.get(3),
            topics: r.get::<Option<Vec<String>>, _>(4).unwrap_or_default(),
            tone: r.get(5),
            revision: r.get(6),
            summarizer: r.get(7),
            tokens: tokens(r.get(8), r.get(9)),
            cost: r.get(10),
        }
    }));
    items.sort_by(|a, b| b.start.cmp(&a.start).then(a.kind.cmp(&b.kind)));
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let kind = match i.link {
                Some(id) => {
                    format!(r#"<a href="/console/window/{id}" class="window-link">window {id}</a>"#)
                }
                None => format!(r#"<span class="kind">{}</span>"#, esc(&i.kind)),
            };
            vec![
                kind,
                naive(i.start),
                naive(i.end),
                format!(
                    r#"<span class="state {0}">{0}</span>"#,
                    esc(&i.state.replace('_', " "))
                ),
                num(i.count.into()),
                esc(&i.topics.join(", ")),
                esc(i.tone.as_deref().unwrap_or("")),
                i.revision.to_string(),
                esc(i.summarizer.as_deref().unwrap_or("")),
                i.tokens
                    .map(|(p, c)| format!("{} + {}", num(p.into()), num(c.into())))
                    .unwrap_or_default(),
                i.cost.map(usd).unwrap_or_default(),
            ]
        })
        .collect();
    let _ = write!(
        b,
        r#"<h2>Timeline of <span id="timeline-user">{}</span> with {}</h2>{}"#,
        esc(&user),
        esc(&bot),
        table(
            "timeline",
            &[
                "item",
                "start (UTC)",
                "end (UTC)",
                "state",
                "messages",
                "topics",
                "tone",
                "revision",
                "summarizer",
                "tokens (prompt + completion)",
                "cost",
            ],
            &rows,
            "nothing yet",
        )
    );
    Ok(page("Conversations", "Conversations", session, &b))
}
