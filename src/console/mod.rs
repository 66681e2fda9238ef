//! The operator console at `/console`, served by `recap run` on `HTTP_ADDR`: an overview (windows by state, consumer
//! lag, sweep checkpoints, instances and leases, windows summarized per hour, LLM spend per day against the budget),
//! conversations (a user's timeline of windows and rollups; a window's messages from Qdrant beside its summary) and
//! dead letters / dead windows (retry through [`Store::retry_dead`], as `recap retry` does).
//!
//! Server-rendered HTML with inline SVG charts: no script, no build step. The overview's numbers come from
//! [`crate::status::snapshot`], the same function `recap status` and the `/metrics` gauges read. Access, sessions and
//! CSRF: [`auth`].

pub mod auth;
mod pages;
pub mod view;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::config::Config;
use crate::fetch::Points;
use crate::sink::Store;
use auth::{Access, LoginThrottle, Session, Sessions};
pub use pages::overview_html;

/// What the console reads from.
#[derive(Clone)]
pub struct Console {
    pub store: Store,
    pub points: Arc<Points>,
    pub nats: Option<async_nats::Client>,
    pub cfg: Arc<Config>,
    pub access: Access,
    pub sessions: Sessions,
    pub logins: LoginThrottle,
}

/// Whether the request came over TLS (the cookie's name and `Secure`), put into the request's extensions by [`guard`].
#[derive(Clone, Copy)]
pub struct SecureRequest(pub bool);

impl Console {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        points: Arc<Points>,
        nats: Option<async_nats::Client>,
    ) -> Console {
        Console {
            access: Access::new(cfg.service.console_token.as_ref(), cfg.service.http_addr),
            store,
            points,
            nats,
            cfg,
            sessions: Sessions::default(),
            logins: LoginThrottle::default(),
        }
    }

    /// The console of a `recap run` (the pieces `/readyz` checks, plus the configuration).
    pub fn for_service(cfg: Arc<Config>, ready: &crate::http::Readiness) -> Console {
        Console::new(
            cfg,
            ready.store.clone(),
            ready.points.clone(),
            ready.nats.clone(),
        )
    }
}

/// The console's routes, all under `/console`, behind [`guard`].
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/console", get(pages::overview))
        .route("/console/", get(pages::overview))
        .route("/console/conversations", get(pages::conversations))
        .route("/console/window/{id}", get(pages::window))
        .route("/console/dead", get(pages::dead))
        .route("/console/dead/retry", post(pages::retry))
        .route("/console/login", get(pages::login_form).post(pages::login))
        .route("/console/logout", post(pages::logout))
        .route("/console/{*rest}", get(pages::not_found))
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Decides who gets through (see [`auth`]) and puts the request's [`Session`] into its extensions.
async fn guard(State(c): State<Console>, mut req: Request, next: Next) -> Response {
    if matches!(c.access, Access::Open) && !crate::http::loopback_host(&req) {
        return hardened(crate::http::not_loopback_host(
            "the console",
            "CONSOLE_TOKEN",
        ));
    }
    let is_login = req.uri().path() == "/console/login";
    let secure = auth::secure_request(c.cfg.service.console_secure_cookie, req.headers());
    req.extensions_mut().insert(SecureRequest(secure));
    let session = c.sessions.from_headers(req.headers(), secure);
    let mut new_cookie = None;
    match (&c.access, session) {
        (Access::Off, _) => {
            return hardened(
                (
                    StatusCode::UNAUTHORIZED,
                    "the console is off: set CONSOLE_TOKEN (or serve HTTP_ADDR on a loopback address)\n",
                )
                    .into_response(),
            );
        }
        (_, Some(s)) => {
            req.extensions_mut().insert(s);
        }
        (Access::Open, None) => {
            let s = c.sessions.create();
            new_cookie = Some(auth::set_cookie(&s, secure));
            req.extensions_mut().insert(s);
        }
        (Access::Token(_), None) if is_login => {}
        (Access::Token(_), None) => {
            return hardened(
                (
                    StatusCode::UNAUTHORIZED,
                    axum::response::Html(pages::login_page(None)),
                )
                    .into_response(),
            );
        }
    }
    if req.method() == axum::http::Method::POST && auth::cross_site(req.headers()) {
        return hardened((StatusCode::FORBIDDEN, "cross-site POST refused\n").into_response());
    }
    let mut resp = next.run(req).await;
    if let Some(c) = new_cookie
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    hardened(resp)
}

/// Headers every console response carries: no caching, no framing, no script, no referrer.
fn hardened(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// A POST form's CSRF check: the 403 to answer unless the session's token came with it.
fn refuse_without_csrf(session: Option<&Session>, submitted: Option<&str>) -> Option<Response> {
    match session {
        Some(s) if Sessions::check_csrf(s, submitted) => None,
        _ => Some(
            (
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token: reload the page and try again\n",
            )
                .into_response(),
        ),
    }
}
