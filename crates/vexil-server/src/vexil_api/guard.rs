//! `--flagd-keys`: flagd's protocols and OFREP behind API keys. A request must present a key that
//! may evaluate in the default environment (the flags those protocols see without a selector);
//! refusals speak the request's protocol: a gRPC status for gRPC and gRPC-web, Connect's error JSON
//! (which OFREP clients read by its HTTP status) otherwise. Vexil's own API, health and reflection
//! do their own checks or need none.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::metadata::MetadataMap;

use super::Managed;
use super::auth::Need;
use crate::error;
use crate::serve::Peer;

/// Paths that are not flagd's protocols or OFREP.
fn exempt(path: &str) -> bool {
    path.starts_with("/vexil.") || path.starts_with("/v1/") || path.starts_with("/grpc.")
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn require_key(State(managed): State<Arc<Managed>>, request: Request, next: Next) -> Response {
    if exempt(request.uri().path()) || request.method() == axum::http::Method::OPTIONS {
        return next.run(request).await;
    }
    let metadata = MetadataMap::from_headers(request.headers().clone());
    let peer = request.extensions().get::<Peer>().copied();
    let environment = managed.source.default_environment().to_owned();
    match managed
        .access
        .check_required(&metadata, peer, Need::Evaluate(&environment))
        .await
    {
        Ok(_) => next.run(request).await,
        Err(status) => refuse(&request, status),
    }
}

fn refuse(request: &Request, status: tonic::Status) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        return status.into_http::<axum::body::Body>().into_response();
    }
    let connect = error::connect(status.code());
    let body = serde_json::json!({"code": connect.name, "message": status.message(), "errorDetails": status.message()});
    (
        connect.http,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
