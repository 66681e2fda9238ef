//! The recall API's guard: bearer auth (constant time over SHA-256 digests), open mode's loopback `Host` rule, and
//! the request metrics.

use std::time::Instant;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::RecallState;

/// Bearer auth (constant time over SHA-256 digests, so the length is not revealed either) and request metrics.
pub(super) async fn guard(State(s): State<RecallState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let started = Instant::now();
    if s.0.token.is_none() && !crate::http::loopback_host(&req) {
        return crate::http::not_loopback_host("the recall API", "RECALL_TOKEN");
    }
    let resp = match &s.0.token {
        Some(want) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
            match given {
                Some(g) if bool::from(g.ct_eq(want)) => next.run(req).await,
                _ => (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({"error": "missing or wrong bearer token (Authorization: Bearer <RECALL_TOKEN>)", "field": "authorization"})),
                )
                    .into_response(),
            }
        }
        None => next.run(req).await,
    };
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("recap_recall_request_duration_seconds", "endpoint" => endpoint.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("recap_recall_requests_total", "endpoint" => endpoint, "status" => status)
        .increment(1);
    resp
}
