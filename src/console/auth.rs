//! Who may see the console, sessions and CSRF.
//!
//! * [`Access::Off`]: no `CONSOLE_TOKEN` and a listener that is not loopback — every console URL answers 401.
//! * [`Access::Open`]: no token on a loopback listener — anyone who can reach the port may look; a session (and so a
//!   CSRF token) is created on the first request.
//! * [`Access::Token`]: the token logs in once (`POST /console/login`); the session cookie is `HttpOnly`,
//!   `SameSite=Strict`, path `/console`. Without a session every console URL answers 401 (with the login form).
//!
//! Every state-changing request is a POST carrying the session's CSRF token in a hidden field, compared in constant
//! time ([`Sessions::check_csrf`]); a POST whose `Sec-Fetch-Site` says another site sent it is refused as well.
//! Sessions live in memory (a restart logs everyone out) for at most [`SESSION_TTL`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::Secret;

pub const COOKIE: &str = "recap_console";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const MAX_SESSIONS: usize = 10_000;

/// How the console is reachable (fixed at start).
#[derive(Clone)]
pub enum Access {
    Off,
    Open,
    Token(Secret),
}

impl Access {
    pub fn new(token: Option<&Secret>, listener: SocketAddr) -> Access {
        match token.filter(|t| !t.is_blank()) {
            Some(t) => Access::Token(t.clone()),
            None if listener.ip().is_loopback() => Access::Open,
            None => Access::Off,
        }
    }

    /// Whether `given` is the token (constant time). Always false without a token.
    pub fn token_matches(&self, given: &str) -> bool {
        match self {
            Access::Token(t) => ct_eq(t.expose().trim().as_bytes(), given.trim().as_bytes()),
            _ => false,
        }
    }
}

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub csrf: String,
}

struct Entry {
    csrf: String,
    expires: Instant,
}

/// The sessions of this process.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Entry>>>);

impl Sessions {
    pub fn create(&self) -> Session {
        let s = Session {
            id: random_token(),
            csrf: random_token(),
        };
        let now = Instant::now();
        let mut m = self.0.lock().expect("sessions lock");
        m.retain(|_, e| e.expires > now);
        if m.len() >= MAX_SESSIONS {
            // Full of live sessions (only an open loopback console can get here): the oldest go first.
            let mut by_age: Vec<(Instant, String)> =
                m.iter().map(|(k, e)| (e.expires, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_SESSIONS / 10) {
                m.remove(&k);
            }
        }
        m.insert(
            s.id.clone(),
            Entry {
                csrf: s.csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        s
    }

    /// The live session the request's cookie names.
    pub fn from_headers(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let m = self.0.lock().expect("sessions lock");
        // Looked up by hash; the id itself is 244 random bits, so timing reveals nothing usable.
        let e = m.get(id)?;
        (e.expires > Instant::now()).then(|| Session {
            id: id.to_string(),
            csrf: e.csrf.clone(),
        })
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().expect("sessions lock").remove(id);
    }

    /// Whether a submitted CSRF value is the session's (constant time).
    pub fn check_csrf(session: &Session, submitted: Option<&str>) -> bool {
        submitted.is_some_and(|v| ct_eq(session.csrf.as_bytes(), v.as_bytes()))
    }
}

/// `Set-Cookie` value for a session.
pub fn set_cookie(s: &Session) -> String {
    format!(
        "{COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        s.id,
        SESSION_TTL.as_secs()
    )
}

pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// A POST another site sent (browsers say so in `Sec-Fetch-Site`; SameSite=Strict already keeps the cookie off it).
pub fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site")
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// 244 random bits (two v4 UUIDs from the OS generator) as 64 hex characters.
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Constant-time equality (the length is not secret: tokens are compared whole).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_follows_token_and_listener() {
        let lo: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        assert!(matches!(Access::new(None, lo), Access::Open));
        assert!(matches!(Access::new(None, any), Access::Off));
        assert!(matches!(
            Access::new(Some(&Secret::new("  ")), any),
            Access::Off
        ));
        let a = Access::new(Some(&Secret::new("0123456789abcdef")), any);
        assert!(a.token_matches("0123456789abcdef"));
        assert!(!a.token_matches("0123456789abcdeX"));
        assert!(!a.token_matches(""));
        assert!(!Access::Open.token_matches(""));
    }

    #[test]
    fn sessions_and_csrf() {
        let s = Sessions::default();
        let a = s.create();
        assert_eq!(a.id.len(), 64);
        assert_ne!(a.id, a.csrf);
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            format!("other=1; {COOKIE}={}", a.id).parse().unwrap(),
        );
        let found = s.from_headers(&h).expect("session from cookie");
        assert_eq!(found.csrf, a.csrf);
        assert!(Sessions::check_csrf(&found, Some(&a.csrf)));
        assert!(!Sessions::check_csrf(&found, None));
        assert!(!Sessions::check_csrf(&found, Some("x")));
        s.remove(&a.id);
        assert!(s.from_headers(&h).is_none());
        assert!(set_cookie(&a).contains("HttpOnly; SameSite=Strict"));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }
}
