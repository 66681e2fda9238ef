//! The console's handlers: read, render, answer. SQL here is read-only except the retry, which is
//! [`Store::retry_dead`](crate::sink::Store::retry_dead) (the same statement `recap retry` runs).
//!
//! One file per page: `overview`, `conversations` (a user's timeline), `window` (one window), `dead` (dead letters
//! and their retry). Each page is a `load_*` function (its SQL, rows as `sqlx::FromRow` structs, returning the page's
//! data) and a `render_*` function (maud markup: every value escaped). Shared here: the error page, the `Server-Timing`
//! header, login and logout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::{ConnectInfo, Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::auth::{self, Session};
use super::view::page;
use super::{Console, SecureRequest, refuse_without_csrf};

mod conversations;
mod dead;
mod overview;
mod window;

pub use conversations::conversations;
pub use dead::{dead, retry};
pub use overview::{overview, overview_html};
pub use window::window;

fn server_error(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "console: a page failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(
            page(
                "error",
                "",
                None,
                html! { p.error { "This page could not be read: " (e.to_string()) } },
            )
            .into_string(),
        ),
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

// ------------------------------------------------------------------------------------------------ login

pub fn login_page(error: Option<&str>) -> String {
    page(
        "Log in",
        "",
        None,
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/console/login" id="login" {
                label {
                    "console token "
                    input type="password" name="token" id="token" autocomplete="current-password" size="40" autofocus;
                }
                " "
                button type="submit" id="login-button" { "Log in" }
            }
            p.muted { "The token is the service's " code { "CONSOLE_TOKEN" } "." }
        },
    )
    .into_string()
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

pub async fn login(
    State(c): State<Console>,
    Extension(SecureRequest(secure)): Extension<SecureRequest>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    Form(f): Form<LoginForm>,
) -> Response {
    // Without the client's address (a router served without connect info) every client shares one budget.
    let ip = client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.0.ip());
    if let Err(wait) = c.logins.attempt(ip) {
        tracing::warn!(client = %ip, "console: login attempts throttled");
        metrics::counter!("recap_console_logins_throttled_total").increment(1);
        let secs = wait.as_secs().max(1).to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs)],
            Html(login_page(Some(
                "Too many login attempts from this address; wait a little.",
            ))),
        )
            .into_response();
    }
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
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(&s, secure)) {
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
    Extension(SecureRequest(secure)): Extension<SecureRequest>,
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
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie(secure)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

pub async fn not_found(session: Option<Extension<Session>>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(
            page(
                "not found",
                "",
                session.as_deref(),
                html! { p.error { "No such page." } },
            )
            .into_string(),
        ),
    )
        .into_response()
}
