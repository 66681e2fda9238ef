//! The overview page: the status snapshot, summaries per hour and LLM spend per day.

use std::fmt::Write;
use std::time::Instant;

use axum::Extension;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use chrono::{NaiveDateTime, Utc};

use super::{server_error, with_server_time};
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{age, bar_chart, esc, num, page, table, ts, usd};
use crate::sink::StoreError;
use crate::status::{self, Snapshot};

/// Summaries written per hour (last 48 hours, from the summary rows' `updated_at`, index
/// `idx_conversation_summaries_updated`) and LLM spend per UTC day (last 14 days) from the spend ledger the daily budget
/// is kept in (`recap_llm_spend`, the figure `recap status` and `/metrics` show for today).
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
        "SELECT day::timestamp, spent_usd FROM recap_llm_spend WHERE day >= $1::date",
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
