//! The overview page: the status snapshot, summaries per hour and LLM spend per day.

use std::time::Instant;

use axum::Extension;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use chrono::{NaiveDateTime, Utc};
use maud::{Markup, html};

use super::{server_error, with_server_time};
use crate::console::Console;
use crate::console::auth::Session;
use crate::console::view::{age, bar_chart, num, page, table, ts, usd};
use crate::model::WindowState;
use crate::sink::StoreError;
use crate::status::{self, Snapshot};

/// Summaries written per hour (last 48 hours, from the summary rows' `updated_at`, index
/// `idx_conversation_summaries_updated`) and LLM spend per UTC day (last 14 days) from the spend ledger the daily budget
/// is kept in (`recap_llm_spend`, the figure `recap status` and `/metrics` show for today).
pub struct Charts {
    pub per_hour: Vec<(NaiveDateTime, i64)>,
    pub spend_per_day: Vec<(chrono::NaiveDate, f64)>,
}

#[derive(sqlx::FromRow)]
struct HourCount {
    hour: NaiveDateTime,
    n: i64,
}

#[derive(sqlx::FromRow)]
struct DaySpend {
    day: NaiveDateTime,
    spent_usd: f64,
}

pub async fn charts(c: &Console) -> Result<Charts, StoreError> {
    let pool = c.store.pool();
    let now = Utc::now().naive_utc();
    let hour0 = now.date().and_hms_opt(0, 0, 0).unwrap_or(now)
        + chrono::TimeDelta::hours(i64::from(chrono::Timelike::hour(&now)))
        - chrono::TimeDelta::hours(47);
    let hours: Vec<HourCount> = sqlx::query_as(
        "SELECT date_trunc('hour', updated_at) AS hour, count(*) AS n FROM conversation_summaries
         WHERE updated_at >= $1 AND coalesce(summary_type, 'time_window') = 'time_window' GROUP BY 1",
    )
    .bind(hour0)
    .fetch_all(pool)
    .await?;
    let day0 = now.date() - chrono::TimeDelta::days(13);
    let days: Vec<DaySpend> = sqlx::query_as(
        "SELECT day::timestamp AS day, spent_usd FROM recap_llm_spend WHERE day >= $1::date",
    )
    .bind(day0.and_hms_opt(0, 0, 0).unwrap_or_default())
    .fetch_all(pool)
    .await?;
    let per_hour = (0..48)
        .map(|i| {
            let h = hour0 + chrono::TimeDelta::hours(i);
            (
                h,
                hours.iter().find(|r| r.hour == h).map(|r| r.n).unwrap_or(0),
            )
        })
        .collect();
    let spend_per_day = (0..14)
        .map(|i| {
            let d = day0 + chrono::TimeDelta::days(i);
            (
                d,
                days.iter()
                    .find(|r| r.day.date() == d)
                    .map(|r| r.spent_usd)
                    .unwrap_or(0.0),
            )
        })
        .collect();
    Ok(Charts {
        per_hour,
        spend_per_day,
    })
}

/// What the overview shows: the status snapshot (the one `recap status` reads) and the charts' series.
pub struct OverviewData {
    pub snap: Snapshot,
    pub charts: Charts,
}

/// Loads the overview's data: the status snapshot and the charts, concurrently.
pub async fn load_overview(c: &Console) -> Result<OverviewData, StoreError> {
    let consumer = match &c.nats {
        Some(n) => {
            status::consumer_sample(n, &c.cfg.nats.nats_stream, &c.cfg.nats.nats_consumer).await
        }
        None => None,
    };
    let (snap, charts) = tokio::try_join!(status::snapshot(&c.store, consumer), charts(c))?;
    Ok(OverviewData { snap, charts })
}

/// The overview's HTML (also what `benches/console.rs` times).
pub async fn overview_html(c: &Console, session: Option<&Session>) -> Result<String, StoreError> {
    let data = load_overview(c).await?;
    Ok(render_overview(c, &data, session).into_string())
}

fn render_overview(c: &Console, d: &OverviewData, session: Option<&Session>) -> Markup {
    let (s, ch) = (&d.snap, &d.charts);
    let budget_usd = c.cfg.llm.llm_daily_budget_usd;
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
    let budget = budget_usd.map(|v| (v, format!("daily budget {}", usd(v))));
    let checkpoints: Vec<Vec<Markup>> = s
        .store
        .checkpoints
        .iter()
        .map(|cp| {
            vec![
                html! { (cp.name) },
                html! { span.num { (format!("{:.3}", cp.position)) } },
                html! { (num(cp.points_read)) },
                html! { (ts(cp.updated_at)) },
                html! { (age(status::age_seconds(cp.updated_at, s.taken_at))) },
            ]
        })
        .collect();
    let me = c.cfg.instance_id();
    let instances: Vec<Vec<Markup>> = s
        .instances
        .iter()
        .map(|i| {
            vec![
                html! {
                    (i.name)
                    @if i.name == me { " " span.muted { "(serving this page)" } }
                },
                html! { @if i.leads_ingest { "ingest leader" } @else { "worker" } },
                html! { (num(i.windows_leased)) },
            ]
        })
        .collect();
    let body = html! {
        h1 { "Overview" }
        div.cards #states {
            @for (state, n) in s.states() {
                div class={ "card " (state) } data-state=(state) {
                    div.n {
                        @if state == WindowState::Done.as_str() && s.store.windows_done_estimated { "≈" }
                        (num(n))
                    }
                    div.l { (state.replace('_', " ")) }
                }
            }
        }
        div.cards style="margin-top:10px" {
            div.card {
                div.n #consumer-lag {
                    @match (s.consumer, &c.nats) {
                        (Some(cs), _) => {
                            (num(cs.lag() as i64)) " "
                            span.muted {
                                "(" (num(cs.pending as i64)) " undelivered, "
                                (num(cs.ack_pending as i64)) " unacknowledged)"
                            }
                        }
                        (None, Some(_)) => "unknown (NATS did not answer)",
                        (None, None) => "no NATS (sweep only)",
                    }
                }
                div.l { "consumer lag" }
            }
            div.card { div.n { (num(s.store.open_messages)) } div.l { "open messages" } }
            div.card {
                div.n {
                    (s.store
                        .oldest_due
                        .map(|t| age(status::age_seconds(t, s.taken_at)))
                        .unwrap_or_else(|| "-".into()))
                }
                div.l { "oldest due window" }
            }
            div.card.dead { div.n #dead-letters { (num(s.store.dead_letters)) } div.l { "dead letters" } }
            div.card {
                div.n #spend-today { (usd(s.store.llm_spend_today_usd)) }
                div.l {
                    "LLM spend today"
                    @if let Some(b) = budget_usd { " of " (usd(b)) }
                }
            }
        }
        div.grid2 {
            div.panel {
                h2 { "Windows summarized per hour (48 h, UTC)" }
                (bar_chart("chart-hourly", &hour_bars, None, &|v| format!("{v:.0}"), 6))
            }
            div.panel {
                h2 {
                    "LLM spend per day (14 days, UTC)"
                    @if budget.is_none() { " " span.muted { "(no LLM_DAILY_BUDGET_USD)" } }
                }
                (bar_chart("chart-spend", &day_bars, budget.clone(), &usd, 2))
            }
        }
        h2 { "Source checkpoints" }
        (table(
            "checkpoints",
            &["checkpoint", "position", "points read", "updated (UTC)", "age"],
            &checkpoints,
            "no checkpoint yet",
        ))
        h2 { "Instances and leases" }
        p #leader {
            @match &s.leader {
                Some(l) => {
                    "ingest lease: " b { (l.owner) } ", epoch " (l.epoch) ", "
                    (if l.valid { "valid until" } else { "expired at" }) " " (ts(l.lease_until))
                }
                None => "no ingest lease taken yet",
            }
        }
        (table(
            "instances",
            &["instance", "role", "windows leased"],
            &instances,
            "no instance holds a lease right now",
        ))
        p.muted {
            "Numbers as of " (ts(s.taken_at)) " UTC; the same snapshot " code { "recap status --json" }
            " and " code { "/metrics" } " read."
        }
    };
    page("Overview", "Overview", session, body)
}

pub async fn overview(State(c): State<Console>, session: Option<Extension<Session>>) -> Response {
    let t0 = Instant::now();
    match overview_html(&c, session.as_deref()).await {
        Ok(html) => with_server_time(Html(html).into_response(), t0),
        Err(e) => server_error(e),
    }
}
