//! The console's handlers: read, render, answer. SQL here is read-only except the retry, which is
//! [`Store::retry_dead`] (the same statement `recap retry` runs).

use std::fmt::Write;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use sqlx::Row;

use super::auth::{self, Session};
use super::view::{self, age, bar_chart, esc, naive, num, page, q, table, ts, usd};
use super::{Console, refuse_without_csrf};
use crate::sink::StoreError;
use crate::status::{self, Snapshot};

fn server_error(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "console: a page failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(page(
            "error",
            "",
            None,
            &format!(
                r#"<p class="error">This page could not be read: {}</p>"#,
                esc(&e.to_string())
            ),
        )),
    )
        .into_response()
}

fn with_server_time(mut resp: Response, t0: Instant) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!(
        "app;dur={:.1}",
        t0.elapsed().as_secs_f64() * 1000.0
    )) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

// ------------------------------------------------------------------------------------------------ overview

/// Summaries written per hour (last 48 hours) and LLM spend per UTC day (last 14 days), from the summary rows'
/// `updated_at` (index `idx_conversation_summaries_updated`). Today's spend is the snapshot's figure.
pub struct Charts {
    pub per_hour: Vec<(NaiveDateTime, i64)>,
    pub spend_per_day: Vec<(chrono::NaiveDate, f64)>,
}

pub async fn charts(c: &Console) -> Result<Charts, StoreError> {
    let pool = c.store.pool();
    let now = Utc::now().naive_utc();
    let hour0 = now.date().and_hms_opt(0, 0, 0).unwrap_or(now)
        + chrono::TimeDelta::hours(i64::from(chrono::Timelike::hour(&now)))
        - chrono::TimeDelta::hours(47);
    let hours: Vec<(NaiveDateTime, i64)> = sqlx::query_as(
        "SELECT date_trunc('hour', updated_at), count(*) FROM conversation_summaries
         WHERE updated_at >= $1 AND coalesce(summary_type, 'time_window') = 'time_window' GROUP BY 1",
    )
    .bind(hour0)
    .fetch_all(pool)
    .await?;
    let day0 = now.date() - chrono::TimeDelta::days(13);
    let days: Vec<(NaiveDateTime, f64)> = sqlx::query_as(
        "SELECT date_trunc('day', updated_at), coalesce(sum(cost_usd), 0)::float8 FROM conversation_summaries
         WHERE updated_at >= $1 GROUP BY 1",
    )
    .bind(day0.and_hms_opt(0, 0, 0).unwrap_or_default())
    .fetch_all(pool)
    .await?;
    let per_hour = (0..48)
        .map(|i| {
            let h = hour0 + chrono::TimeDelta::hours(i);
            (
                h,
                hours
                    .iter()
                    .find(|(t, _)| *t == h)
                    .map(|(_, n)| *n)
                    .unwrap_or(0),
            )
        })
        .collect();
    let spend_per_day = (0..14)
        .map(|i| {
            let d = day0 + chrono::TimeDelta::days(i);
            (
                d,
                days.iter()
                    .find(|(t, _)| t.date() == d)
                    .map(|(_, v)| *v)
                    .unwrap_or(0.0),
            )
        })
        .collect();
    Ok(Charts {
        per_hour,
        spend_per_day,
    })
}

/// The overview's HTML (also what `benches/console.rs` times).
pub async fn overview_html(c: &Console, session: Option<&Session>) -> Result<String, StoreError> {
    let consumer = match &c.nats {
        Some(n) => {
            status::consumer_sample(n, &c.cfg.nats.nats_stream, &c.cfg.nats.nats_consumer).await
        }
        None => None,
    };
    let (snap, charts) = tokio::try_join!(status::snapshot(&c.store, consumer), charts(c))?;
    Ok(render_overview(c, &snap, &charts, session))
}

fn render_overview(c: &Console, s: &Snapshot, ch: &Charts, session: Option<&Session>) -> String {
    let mut b = String::from("<h1>Overview</h1>");
    b.push_str(r#"<div class="cards" id="states">"#);
    for (state, n) in s.states() {
        let est = if state == "done" && s.store.windows_done_estimated {
            "≈"
        } else {
            ""
        };
        let _ = write!(
            b,
            r#"<div class="card {state}" data-state="{state}"><div class="n">{est}{}</div><div class="l">{}</div></div>"#,
            num(n),
            state.replace('_', " ")
        );
    }
    let lag = match (s.consumer, &c.nats) {
        (Some(cs), _) => format!(
            "{} <span class=\"muted\">({} undelivered, {} unacknowledged)</span>",
            num(cs.lag() as i64),
            num(cs.pending as i64),
            num(cs.ack_pending as i64)
        ),
        (None, Some(_)) => "unknown (NATS did not answer)".into(),
        (None, None) => "no NATS (sweep only)".into(),
    };
    b.push_str("</div>");
    let _ = write!(
        b,
        r#"<div class="cards" style="margin-top:10px">
<div class="card"><div class="n" id="consumer-lag">{lag}</div><div class="l">consumer lag</div></div>
<div class="card"><div class="n">{}</div><div class="l">open messages</div></div>
<div class="card"><div class="n">{}</div><div class="l">oldest due window</div></div>
<div class="card dead"><div class="n" id="dead-letters">{}</div><div class="l">dead letters</div></div>
<div class="card"><div class="n" id="spend-today">{}</div><div class="l">LLM spend today{}</div></div></div>"#,
        num(s.store.open_messages),
        s.store
            .oldest_due
            .map(|t| age(status::age_seconds(t, s.taken_at)))
            .unwrap_or_else(|| "-".into()),
        num(s.store.dead_letters),
        usd(s.store.llm_spend_today_usd),
        c.cfg
            .llm
            .llm_daily_budget_usd
            .map(|b| format!(" of {}", usd(b)))
            .unwrap_or_default(),
    );
    let hour_bars: Vec<(String, f64)> = ch
        .per_hour
        .iter()
        .map(|(h, n)| (h.format("%d %H:00").to_string(), *n as f64))
        .collect();
    let day_bars: Vec<(String, f64)> = ch
        .spend_per_day
        .iter()
        .map(|(d, v)| (d.format("%m-%d").to_string(), *v))
        .collect();
    let budget = c
        .cfg
        .llm
        .llm_daily_budget_usd
        .map(|v| (v, format!("daily budget {}", usd(v))));
    let _ = write!(
        b,
        r#"<div class="grid2"><div class="panel"><h2>Windows summarized per hour (48 h, UTC)</h2>{}</div>
<div class="panel"><h2>LLM spend per day (14 days, UTC){}</h2>{}</div></div>"#,
        bar_chart("chart-hourly", &hour_bars, None, &|v| format!("{v:.0}"), 6),
        if budget.is_none() {
            " <span class=\"muted\">(no LLM_DAILY_BUDGET_USD)</span>"
        } else {
            ""
        },
        bar_chart("chart-spend", &day_bars, budget, &usd, 2),
    );
    let checkpoints: Vec<Vec<String>> = s
        .store
        .checkpoints
        .iter()
        .map(|cp| {
            vec![
                esc(&cp.name),
                format!(r#"<span class="num">{:.3}</span>"#, cp.position),
                num(cp.points_read),
                ts(cp.updated_at),
                age(status::age_seconds(cp.updated_at, s.taken_at)),
            ]
        })
        .collect();
    let _ = write!(
        b,
        "<h2>Source checkpoints</h2>{}",
        table(
            "checkpoints",
            &[
                "checkpoint",
                "position",
                "points read",
                "updated (UTC)",
                "age"
            ],
            &checkpoints,
            "no checkpoint yet",
        )
    );
    let me = c.cfg.instance_id();
    let instances: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|i| {
            vec![
                format!(
                    "{}{}",
                    esc(&i.name),
                    if i.name == me {
                        r#" <span class="muted">(serving this page)</span>"#
                    } else {
                        ""
                    }
                ),
                if i.leads_ingest {
                    "ingest leader".into()
                } else {
                    "worker".into()
                },
                num(i.windows_leased),
            ]
        })
        .collect();
    let leader = match &s.leader {
        Some(l) => format!(
            "ingest lease: <b>{}</b>, epoch {}, {} {}",
            esc(&l.owner),
            l.epoch,
            if l.valid { "valid until" } else { "expired at" },
            ts(l.lease_until)
        ),
        None => "no ingest lease taken yet".into(),
    };
    let _ = write!(
        b,
        r#"<h2>Instances and leases</h2><p id="leader">{leader}</p>{}"#,
        table(
            "instances",
            &["instance", "role", "windows leased"],
            &instances,
            "no instance holds a lease right now",
        )
    );
    let _ = write!(
        b,
        r#"<p class="muted">Numbers as of {} UTC; the same snapshot <code>recap status --json</code> and <code>/metrics</code> read.</p>"#,
        ts(s.taken_at)
    );
    page("Overview", "Overview", session, &b)
}

pub async fn overview(State(c): State<Console>, session: Option<Extension<Session>>) -> Response {
    let t0 = Instant::now();
    match overview_html(&c, session.as_deref()).await {
        Ok(html) => with_server_time(Html(html).into_response(), t0),
        Err(e) => server_error(e),
    }
}

// ------------------------------------------------------------------------------------------------ conversations

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
        sqlx::query_scalar("SELECT bot_name FROM recap_watermarks ORDER BY bot_name")
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

// ------------------------------------------------------------------------------------------------ one window

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

// ------------------------------------------------------------------------------------------------ dead

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
            tracing::info!(window = ?f.window, retried = n, "console: dead window(s) put back to due");
            match f.window {
                Some(id) => Redirect::to(&format!("/console/window/{id}?retried={n}")),
                None => Redirect::to(&format!("/console/dead?retried={n}")),
            }
            .into_response()
        }
        Err(e) => server_error(e),
    }
}

// ------------------------------------------------------------------------------------------------ login

pub fn login_page(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!(r#"<p class="error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    page(
        "Log in",
        "",
        None,
        &format!(
            r#"<h1>Log in</h1>{err}<form method="post" action="/console/login" id="login"><label>console token <input type="password" name="token" id="token" autocomplete="current-password" size="40" autofocus></label> <button type="submit" id="login-button">Log in</button></form>
<p class="muted">The token is the service's <code>CONSOLE_TOKEN</code>.</p>"#
        ),
    )
}

pub async fn login_form(session: Option<Extension<Session>>) -> Response {
    match session {
        Some(_) => Redirect::to("/console").into_response(),
        None => (StatusCode::UNAUTHORIZED, Html(login_page(None))).into_response(),
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: Option<String>,
}

pub async fn login(State(c): State<Console>, Form(f): Form<LoginForm>) -> Response {
    if !c.access.token_matches(f.token.as_deref().unwrap_or("")) {
        tracing::warn!("console: a login with a wrong token");
        // Slows down guessing a little (the token has at least 16 characters).
        tokio::time::sleep(Duration::from_millis(300)).await;
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(Some("That is not the console token."))),
        )
            .into_response();
    }
    let s = c.sessions.create();
    let mut resp = Redirect::to("/console").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(&s)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct LogoutForm {
    csrf: Option<String>,
}

pub async fn logout(
    State(c): State<Console>,
    session: Option<Extension<Session>>,
    Form(f): Form<LogoutForm>,
) -> Response {
    if let Some(r) = refuse_without_csrf(session.as_deref(), f.csrf.as_deref()) {
        return r;
    }
    if let Some(s) = session {
        c.sessions.remove(&s.id);
    }
    let mut resp = Redirect::to("/console").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

pub async fn not_found(session: Option<Extension<Session>>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(page(
            "not found",
            "",
            session.as_deref(),
            "<p class=\"error\">No such page.</p>",
        )),
    )
        .into_response()
}
