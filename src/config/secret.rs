//! Values that must never be printed: [`Secret`] (tokens, keys, passwords) and [`RedactedUrl`]
//! (URLs that may carry credentials), plus the redaction helpers built on `url::Url`.

use std::convert::Infallible;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// A string that must never be printed: `Debug` and `Display` both show `***`.
/// Read the value with [`Secret::expose`]. Held in a [`secrecy::SecretString`], so the value
/// is zeroed when dropped.
#[derive(Clone, Default)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The secret value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// True when the value is empty or only whitespace (e.g. `OPENROUTER_API_KEY=` in a
    /// compose file); such a secret counts as unset.
    pub fn is_blank(&self) -> bool {
        self.expose().trim().is_empty()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s)
    }
}

/// A URL setting as given (any text: checked by `validate`, blank counts as unset) whose
/// `Debug` and `Display` mask its credentials (see [`redact_url`]). `Deref`s to the raw text,
/// for handing to a client library; never log that.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    /// The URL as given, credentials included. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with credentials masked.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl Deref for RedactedUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for RedactedUrl {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RedactedUrl(s.to_owned()))
    }
}

impl From<String> for RedactedUrl {
    fn from(s: String) -> Self {
        RedactedUrl(s)
    }
}

impl PartialEq<str> for RedactedUrl {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for RedactedUrl {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The URL with credentials masked: the password in `user:password@`, a bare token in
/// `nats://token@`, and `password`/`token`/`key`-like query values. A URL with nothing to mask
/// comes back unchanged (not re-serialized). Parsed with `url::Url`; text it cannot parse is
/// masked from the scheme to the last `@` (keeping a `user:`), or wholly (`"***"`) when it has
/// no scheme but contains an `@`.
pub(crate) fn redact_url(s: &str) -> String {
    // Only `scheme://` text is a URL here (`Url` would read `u:p@h` as scheme `u`).
    let Some(mut url) = s.contains("://").then(|| Url::parse(s).ok()).flatten() else {
        return redact_unparsed(s);
    };
    let mut changed = false;
    if url.password().is_some() {
        changed |= url.set_password(Some("***")).is_ok();
    } else if !url.username().is_empty() && !matches!(url.scheme(), "postgres" | "postgresql") {
        changed |= url.set_username("***").is_ok();
    }
    if let Some(query) = url.query() {
        let masked = redact_query(query);
        if masked != query {
            url.set_query(Some(&masked));
            changed = true;
        }
    }
    if changed { url.into() } else { s.to_owned() }
}

fn redact_unparsed(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return if s.contains('@') {
            "***".to_owned()
        } else {
            s.to_owned()
        };
    };
    match rest.rfind('@') {
        Some(at) => {
            let auth = match rest[..at].split_once(':') {
                Some((user, _)) => format!("{user}:***@"),
                None => "***@".to_owned(),
            };
            format!("{scheme}://{auth}{}", &rest[at + 1..])
        }
        None => s.to_owned(),
    }
}

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_secret_param(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "password", "passwd", "pass", "token", "key", "secret", "auth",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// Removes every occurrence of each secret from `msg` (for errors built by other libraries).
pub(crate) fn scrub(msg: String, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 2)
        .fold(msg, |m, s| m.replace(s, "***"))
}

/// The secrets inside a URL (password, password-like query values), for scrubbing.
pub(crate) fn url_secrets(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    match Url::parse(s) {
        Ok(url) => {
            if let Some(pw) = url.password() {
                out.push(pw.to_owned());
            }
        }
        Err(_) => {
            if let Some((_, rest)) = s.split_once("://")
                && let Some(at) = rest.rfind('@')
                && let Some((_, pw)) = rest[..at].split_once(':')
            {
                out.push(pw.to_owned());
            }
        }
    }
    if let Some((_, query)) = s.split_once('?') {
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=')
                && is_secret_param(k)
            {
                out.push(v.to_owned());
            }
        }
    }
    out
}
