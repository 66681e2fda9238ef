//! The conversations page: a user's (or bot's) windows and summaries as a timeline.

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::server_error;
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{naive, num, page, q, table, usd};
use crate::model::WindowState;
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
    state: WindowState,
    count: i32,
    topics: Vec<String>,
    tone: Option<String>,
    revision: i32,
    summarizer: Option<String>,
    tokens: Option<(i32, i32)>,
    cost: Option<f64>,
}

/// A window row of the timeline.
#[derive(sqlx::FromRow)]
struct WindowRow {
    id: i64,
    start_ts: DateTime<Utc>,
    end_ts: DateTime<Utc>,
    state: WindowState,
    message_count: i32,
    revision: i32,
    key_topics: Option<Vec<String>>,
    emotional_tone: Option<String>,
    summarizer: Option<String>,
    prompt_tokens: Option<i32>,
    completion_tokens: Option<i32>,
    cost_usd: Option<f64>,
}

/// A rollup row (day, week, month) of the timeline.
#[derive(sqlx::FromRow)]
struct RollupRow {
    summary_type: Option<String>,
    start_timestamp: NaiveDateTime,
    end_timestamp: NaiveDateTime,
    message_count: i32,
    key_topics: Option<Vec<String>>,
    emotional_tone: Option<String>,
    revision: i32,
    summarizer: Option<String>,
    prompt_tokens: Option<i32>,
    completion_tokens: Option<i32>,
    cost_usd: Option<f64>,
}

/// What the conversations page shows.
struct ConversationsData {
    bots: Vec<String>,
    /// The bot asked for, else the first one seen (None: no bot seen yet).
    bot: Option<String>,
    user: String,
    found: Found,
}

enum Found {
    /// No bot, or no user typed: only the form.
    Nothing,
    /// Not an exact user id: the users whose id starts with it (maybe none).
    Near(Vec<String>),
    /// The user's windows and rollups, newest first.
    Timeline(Vec<TimelineItem>),
}

pub async fn conversations(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Query(cq): Query<ConvQuery>,
) -> Response {
    match load_conversations(&c, cq).await {
        Ok(d) => Html(render_conversations(&d, session.as_deref()).into_string()).into_response(),
        Err(e) => server_error(e),
    }
}

async fn load_conversations(c: &Console, cq: ConvQuery) -> Result<ConversationsData, StoreError> {
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
    let mut data = ConversationsData {
        bots,
        bot,
        user,
        found: Found::Nothing,
    };
    let Some(bot) = data.bot.clone() else {
        return Ok(data);
    };
    let user = data.user.clone();
    if user.is_empty() {
        return Ok(data);
    }
    let windows: Vec<WindowRow> = sqlx::query_as(
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
        data.found = Found::Near(near.into_iter().filter(|u| u.starts_with(&user)).collect());
        return Ok(data);
    }
    let rollups: Vec<RollupRow> = sqlx::query_as(
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
        .into_iter()
        .map(|r| TimelineItem {
            kind: "window".into(),
            link: Some(r.id),
            start: r.start_ts.naive_utc(),
            end: r.end_ts.naive_utc(),
            state: r.state,
            count: r.message_count,
            revision: r.revision,
            topics: r.key_topics.unwrap_or_default(),
            tone: r.emotional_tone,
            summarizer: r.summarizer,
            tokens: tokens(r.prompt_tokens, r.completion_tokens),
            cost: r.cost_usd,
        })
        .collect();
    items.extend(rollups.into_iter().map(|r| TimelineItem {
        kind: r.summary_type.unwrap_or_else(|| "rollup".into()),
        link: None,
        start: r.start_timestamp,
        end: r.end_timestamp,
        state: WindowState::Done,
        count: r.message_count,
        topics: r.key_topics.unwrap_or_default(),
        tone: r.emotional_tone,
        revision: r.revision,
        summarizer: r.summarizer,
        tokens: tokens(r.prompt_tokens, r.completion_tokens),
        cost: r.cost_usd,
    }));
    items.sort_by(|a, b| b.start.cmp(&a.start).then(a.kind.cmp(&b.kind)));
    data.found = Found::Timeline(items);
    Ok(data)
}

fn render_conversations(d: &ConversationsData, session: Option<&Session>) -> Markup {
    let form = html! {
        h1 { "Conversations" }
        form method="get" action="/console/conversations" id="find" {
            label {
                "bot "
                select name="bot" id="bot" {
                    @for x in &d.bots {
                        option value=(x) selected[Some(x) == d.bot.as_ref()] { (x) }
                    }
                }
            }
            " "
            label {
                "user id "
                input name="user" id="user" value=(d.user) placeholder="user id or its beginning" size="32";
            }
            " "
            button type="submit" id="search" { "Search" }
        }
    };
    let (bot, user) = (d.bot.as_deref().unwrap_or(""), d.user.as_str());
    let rest = match &d.found {
        Found::Nothing if d.bot.is_none() => html! { p.empty { "No bot seen yet." } },
        Found::Nothing => {
            html! { p.muted { "Type a user id (or its first characters) to see their timeline." } }
        }
        Found::Near(near) if near.is_empty() => html! {
            p.empty #no-user { "No windows for user " (user) " of " (bot) "." }
        },
        Found::Near(near) => html! {
            h2 { "Users starting with that" }
            ul #users {
                @for u in near {
                    li { a href={ "/console/conversations?bot=" (q(bot)) "&user=" (q(u)) } { (u) } }
                }
            }
        },
        Found::Timeline(items) => {
            let rows: Vec<Vec<Markup>> = items.iter().map(timeline_row).collect();
            html! {
                h2 { "Timeline of " span #timeline-user { (user) } " with " (bot) }
                (table(
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
                ))
            }
        }
    };
    page(
        "Conversations",
        "Conversations",
        session,
        html! { (form) (rest) },
    )
}

fn timeline_row(i: &TimelineItem) -> Vec<Markup> {
    let state = i.state.label();
    vec![
        match i.link {
            Some(id) => {
                html! { a href={ "/console/window/" (id) } class="window-link" { "window " (id) } }
            }
            None => html! { span.kind { (i.kind) } },
        },
        html! { (naive(i.start)) },
        html! { (naive(i.end)) },
        html! { span class={ "state " (state) } { (state) } },
        html! { (num(i.count.into())) },
        html! { (i.topics.join(", ")) },
        html! { (i.tone.as_deref().unwrap_or("")) },
        html! { (i.revision) },
        html! { (i.summarizer.as_deref().unwrap_or("")) },
        html! {
            @if let Some((p, c)) = i.tokens { (num(p.into())) " + " (num(c.into())) }
        },
        html! { @if let Some(v) = i.cost { (usd(v)) } },
    ]
}
