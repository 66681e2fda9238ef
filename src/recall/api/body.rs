//! The body of `POST /v1/recall/search` as a serde struct. Unknown fields are refused and every type error names its
//! field ([`serde_path_to_error`] gives the path); the messages are those of the API's other checks (`bot must be a
//! string`, `limit must be an integer`, `unknown field "colour" (known: ...)`), the values themselves are checked
//! after parsing by the same functions every route uses.

use serde::Deserialize;

use super::ApiError;

/// The search body's fields, in the order the unknown-field message lists them.
pub const SEARCH_FIELDS: [&str; 9] = [
    "bot", "user_id", "vector", "text", "limit", "since", "until", "tz", "type",
];

/// `POST /v1/recall/search` `{bot, user_id, vector?, text?, limit?, since?, until?, tz?, type?}`; `null` is absent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    pub bot: Option<String>,
    pub user_id: Option<String>,
    /// Checked by [`super::vector_of`] (length, finite as f32, not all zero).
    pub vector: Option<Vec<f64>>,
    pub text: Option<String>,
    pub limit: Option<i64>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub tz: Option<String>,
    #[serde(rename = "type")]
    pub summary_type: Option<String>,
}

/// Parses the body: a JSON object of the known fields, each of its type, or a 400 naming the field at fault.
pub fn search_body(body: &[u8]) -> Result<SearchBody, ApiError> {
    let not_json = |e: serde_json::Error| ApiError::bad("body", format!("body is not JSON: {e}"));
    // A struct also deserializes from a JSON array (its fields by position): only an object is a body.
    if body.trim_ascii_start().first() != Some(&b'{') {
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
        return Err(ApiError::bad("body", "body must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: SearchBody = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let (path, inner) = (e.path().clone(), e.into_inner());
        if inner.is_syntax() || inner.is_eof() {
            return not_json(inner);
        }
        let field = match path.iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => known(key),
            _ => None,
        };
        match field {
            Some(f) => type_error(f, path.iter().nth(1).is_some()),
            None => object_error(&inner),
        }
    })?;
    de.end().map_err(not_json)?;
    Ok(parsed)
}

fn known(key: &str) -> Option<&'static str> {
    SEARCH_FIELDS.iter().copied().find(|f| *f == key)
}

/// A field of the wrong type (`inside`: an element of it, i.e. a vector's).
fn type_error(field: &'static str, inside: bool) -> ApiError {
    match field {
        "vector" if inside => ApiError::bad(
            "vector",
            "vector must be an array of numbers that are finite as 32-bit floats (|x| < 3.4e38)",
        ),
        "vector" => ApiError::bad("vector", "vector must be an array of numbers"),
        "limit" => ApiError::bad("limit", "limit must be an integer"),
        f => ApiError::bad(f, format!("{f} must be a string")),
    }
}

/// An error of the object itself: an unknown or repeated field (serde's messages quote the name in backticks).
fn object_error(e: &serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let quoted = |prefix: &str| {
        msg.strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned())
    };
    if let Some(name) = quoted("unknown field `") {
        return ApiError::bad(
            "body",
            format!(
                "unknown field {name:?} (known: {})",
                SEARCH_FIELDS.join(", ")
            ),
        );
    }
    if let Some(f) = quoted("duplicate field `").as_deref().and_then(known) {
        return ApiError::bad(f, format!("{f} is given more than once"));
    }
    ApiError::bad("body", format!("body is not a search request: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> (Option<&'static str>, String) {
        let e = search_body(body.as_bytes()).expect_err(body);
        (e.field, e.message)
    }

    #[test]
    fn a_body_parses_into_its_fields() {
        let b = search_body(
            br#"{"bot": "b", "user_id": "u", "vector": [1, 2.5], "text": "t", "limit": 5, "since": "1d",
                 "until": "now", "tz": "UTC", "type": "day"}"#,
        )
        .unwrap();
        assert_eq!(b.bot.as_deref(), Some("b"));
        assert_eq!(b.user_id.as_deref(), Some("u"));
        assert_eq!(b.vector, Some(vec![1.0, 2.5]));
        assert_eq!(b.text.as_deref(), Some("t"));
        assert_eq!(b.limit, Some(5));
        assert_eq!(b.since.as_deref(), Some("1d"));
        assert_eq!(b.until.as_deref(), Some("now"));
        assert_eq!(b.tz.as_deref(), Some("UTC"));
        assert_eq!(b.summary_type.as_deref(), Some("day"));
        let b = search_body(br#" {"bot": null, "vector": null, "limit": null} "#).unwrap();
        assert!(b.bot.is_none() && b.vector.is_none() && b.limit.is_none());
    }

    #[test]
    fn every_error_names_its_field_with_the_apis_message() {
        let cases: [(&str, &str, &str); 13] = [
            ("", "body", "body is not JSON: "),
            ("{\"bot\": ", "body", "body is not JSON: "),
            ("[1, 2]", "body", "body must be a JSON object"),
            ("\"x\"", "body", "body must be a JSON object"),
            ("{} x", "body", "body is not JSON: "),
            (
                r#"{"bot": "b", "colour": 1}"#,
                "body",
                r#"unknown field "colour" (known: bot, user_id, vector, text, limit, since, until, tz, type)"#,
            ),
            (
                r#"{"bot": "b", "bot": "c"}"#,
                "bot",
                "bot is given more than once",
            ),
            (r#"{"bot": 5}"#, "bot", "bot must be a string"),
            (r#"{"text": 5}"#, "text", "text must be a string"),
            (r#"{"type": []}"#, "type", "type must be a string"),
            (r#"{"limit": 1.5}"#, "limit", "limit must be an integer"),
            (
                r#"{"vector": "abc"}"#,
                "vector",
                "vector must be an array of numbers",
            ),
            (
                r#"{"vector": [1, "x"]}"#,
                "vector",
                "vector must be an array of numbers that are finite as 32-bit floats (|x| < 3.4e38)",
            ),
        ];
        for (body, field, message) in cases {
            let (f, m) = err(body);
            assert_eq!(f, Some(field), "{body}: {m}");
            assert!(m.starts_with(message), "{body}: {m}");
        }
        // a number too large for an i64 is no integer either
        assert_eq!(err(r#"{"limit": 1e30}"#).0, Some("limit"));
        assert_eq!(err(r#"{"limit": 18446744073709551615}"#).0, Some("limit"));
    }
}
