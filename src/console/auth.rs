//! Who may see the console, sessions and CSRF.
//!
//! * [`Access::Off`]: no `CONSOLE_TOKEN` and a listener that is not loopback — every console URL answers 401.
//! * [`Access::Open`]: no token on a loopback listener — anyone who can reach the port may look; a session (and so a
//!   CSRF token) is created on the first request. Only requests whose `Host` is loopback (`localhost`, 127.0.0.0/8,
//!   `[::1]`, with or without a port) are answered (421 otherwise), so DNS rebinding or a local reverse proxy under
//!   another name does not reach it ([`crate::http::loopback_host`]).
//! * [`Access::Token`]: the token logs in once (`POST /console/login`, at most [`LOGIN_BURST`] attempts per client
//!   address, then one per [`LOGIN_EVERY`]: 429 beyond); the session cookie is `HttpOnly`, `SameSite=Strict`, path
//!   `/console`. Without a session every console URL answers 401 (with the login form).
//!
//! The cookie is `Secure` and named `__Host-recap_console` (path `/`, as that prefix requires) when the request came
//! over TLS: with `CONSOLE_SECURE_COOKIE=on` always (recap is reached only through HTTPS), with `auto` (the default)
//! when a TLS-terminating proxy says so (`X-Forwarded-Proto: https` or `Forwarded: proto=https`), with `off` never.
//! Trusting the header cannot weaken anything: it only makes the cookie stricter for the client that sent it.
//!
//! Every state-changing request is a POST carrying the session's CSRF token in a hidden field, compared in constant
//! time ([`Sessions::check_csrf`]); a POST whose `Sec-Fetch-Site` says another site sent it is refused as well.
//! Sessions live in memory (a restart logs everyone out) for at most [`SESSION_TTL`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::{Secret, SecureCookie};

pub const COOKIE: &str = "recap_console";
/// The cookie's name when it is `Secure` (the prefix makes browsers require Secure, path `/` and no Domain).
pub const SECURE_COOKIE: &str = "__Host-recap_console";
/// Login attempts a client address may make at once ...
pub const LOGIN_BURST: u32 = 5;
/// ... and then one per this long.
pub const LOGIN_EVERY: Duration = Duration::from_secs(12);
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

    /// The live session the request's cookie names (the `__Host-` cookie on a secure request, else the plain one).
    pub fn from_headers(&self, headers: &HeaderMap, secure: bool) -> Option<Session> {
        let id = cookie(headers, cookie_name(secure))?;
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

/// Whether this request came over TLS, as far as recap can tell (see the module docs).
pub fn secure_request(setting: SecureCookie, headers: &HeaderMap) -> bool {
    match setting {
        SecureCookie::On => true,
        SecureCookie::Off => false,
        SecureCookie::Auto => {
            let said = |name: &str, f: fn(&str) -> bool| {
                headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(f)
            };
            said("x-forwarded-proto", |v| {
                v.split(',')
                    .next()
                    .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
            }) || said("forwarded", |v| {
                v.split(',').next().is_some_and(|hop| {
                    hop.split(';').any(|kv| {
                        kv.trim().split_once('=').is_some_and(|(k, v)| {
                            k.trim().eq_ignore_ascii_case("proto")
                                && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
                        })
                    })
                })
            })
        }
    }
}

fn cookie_name(secure: bool) -> &'static str {
    if secure { SECURE_COOKIE } else { COOKIE }
}

fn cookie_attrs(secure: bool) -> &'static str {
    if secure {
        "Path=/; Secure; HttpOnly; SameSite=Strict"
    } else {
        "Path=/console; HttpOnly; SameSite=Strict"
    }
}

/// `Set-Cookie` value for a session.
pub fn set_cookie(s: &Session, secure: bool) -> String {
    format!(
        "{}={}; {}; Max-Age={}",
        cookie_name(secure),
        s.id,
        cookie_attrs(secure),
        SESSION_TTL.as_secs()
    )
}

pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{}=; {}; Max-Age=0",
        cookie_name(secure),
        cookie_attrs(secure)
    )
}

/// Login attempts per client address (a keyed `governor` limiter: [`LOGIN_BURST`], then one per [`LOGIN_EVERY`]).
/// Every attempt counts, so a guess is refused before the token is compared. Behind a reverse proxy all clients share
/// the proxy's address (and its budget).
#[derive(Clone)]
pub struct LoginThrottle(Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>);

impl Default for LoginThrottle {
    fn default() -> Self {
        let quota = governor::Quota::with_period(LOGIN_EVERY)
            .expect("non-zero period")
            .allow_burst(std::num::NonZeroU32::new(LOGIN_BURST).expect("non-zero burst"));
        LoginThrottle(Arc::new(governor::RateLimiter::keyed(quota)))
    }
}

impl LoginThrottle {
    /// `Ok` when `client` may try a login now, else how long until it may.
    pub fn attempt(&self, client: std::net::IpAddr) -> Result<(), Duration> {
        if self.0.len() > 10_000 {
            self.0.retain_recent();
        }
        self.0.check_key(&client).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }
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
        let found = s.from_headers(&h, false).expect("session from cookie");
        assert!(
            s.from_headers(&h, true).is_none(),
            "a secure request reads only the __Host- cookie"
        );
        assert_eq!(found.csrf, a.csrf);
        assert!(Sessions::check_csrf(&found, Some(&a.csrf)));
        assert!(!Sessions::check_csrf(&found, None));
        assert!(!Sessions::check_csrf(&found, Some("x")));
        s.remove(&a.id);
        assert!(s.from_headers(&h, false).is_none());
        assert!(set_cookie(&a, false).contains("HttpOnly; SameSite=Strict"));
        assert!(!set_cookie(&a, false).contains("Secure"));
        let secure = set_cookie(&a, true);
        assert!(
            secure.starts_with("__Host-recap_console=") && secure.contains("; Path=/; Secure;"),
            "{secure}"
        );
        assert!(clear_cookie(true).starts_with("__Host-recap_console=;"));
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            format!("{SECURE_COOKIE}={}", a.id).parse().unwrap(),
        );
        s.create();
        let b = s.create();
        h.insert(
            axum::http::header::COOKIE,
            format!("{SECURE_COOKIE}={}", b.id).parse().unwrap(),
        );
        assert_eq!(s.from_headers(&h, true).map(|x| x.id), Some(b.id));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn secure_when_told_or_behind_tls() {
        let h = |k: &str, v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
            h
        };
        let none = HeaderMap::new();
        assert!(secure_request(SecureCookie::On, &none));
        assert!(!secure_request(SecureCookie::Auto, &none));
        assert!(!secure_request(
            SecureCookie::Off,
            &h("x-forwarded-proto", "https")
        ));
        assert!(secure_request(
            SecureCookie::Auto,
            &h("x-forwarded-proto", "HTTPS")
        ));
        assert!(secure_request(
            SecureCookie::Auto,
            &h("x-forwarded-proto", "https, http")
        ));
        assert!(!secure_request(
            SecureCookie::Auto,
            &h("x-forwarded-proto", "http")
        ));
        assert!(secure_request(
            SecureCookie::Auto,
            &h("forwarded", "for=1.2.3.4;proto=\"https\";by=x")
        ));
        assert!(!secure_request(
            SecureCookie::Auto,
            &h("forwarded", "for=1.2.3.4;proto=http")
        ));
    }

    #[test]
    fn logins_are_throttled_per_client() {
        let t = LoginThrottle::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..LOGIN_BURST {
            assert!(t.attempt(a).is_ok());
        }
        let wait = t.attempt(a).expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= LOGIN_EVERY, "{wait:?}");
        assert!(t.attempt(b).is_ok(), "another client has its own budget");
    }
}
