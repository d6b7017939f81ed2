//! OFREP (OpenFeature Remote Evaluation Protocol) on port 8016.
//!
//! `POST /ofrep/v1/evaluate/flags/{key}` and `POST /ofrep/v1/evaluate/flags` (bulk), answered as
//! flagd answers them, plus what the spec has and flagd lacks: a strong `ETag` on bulk responses and
//! `304 Not Modified` for a matching `If-None-Match`, and JSON errors for oversized bodies (413).

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use vexil_core::{Selector, ValueType};

use crate::app::{App, Evaluated};
use crate::error;

const PROTOCOL: &str = "ofrep";

pub fn router(app: App) -> Router {
    Router::new()
        .route("/ofrep/v1/evaluate/flags", post(bulk))
        .route("/ofrep/v1/evaluate/flags/", post(bulk))
        .route("/ofrep/v1/evaluate/flags/{key}", post(single))
        .route("/ofrep/v1/evaluate/flags/{key}/", post(single))
        .with_state(app)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

/// A request that cannot be evaluated: the JSON error body and status.
struct Rejection(StatusCode, Value);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

/// Reads the body up to the configured limit.
async fn read_body(app: &App, body: Body) -> Result<Bytes, Rejection> {
    axum::body::to_bytes(body, app.max_body()).await.map_err(|_| {
        Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({ "errorDetails": format!("request body too large (limit {} bytes)", app.max_body()) }),
        )
    })
}

/// The request's context: `{"context": {...}}`; an empty body is an empty context, a non-object
/// context is ignored (as flagd does), malformed JSON is `INVALID_CONTEXT`.
fn request_context(
    app: &App,
    body: &[u8],
    headers: &HeaderMap,
    key: Option<&str>,
) -> Result<Map<String, Value>, Rejection> {
    let own = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut request)) => match request.remove("context") {
                Some(Value::Object(ctx)) => ctx,
                _ => Map::new(),
            },
            Ok(_) | Err(_) => {
                let mut failure = json!({ "errorCode": "INVALID_CONTEXT", "errorDetails": "Provider context is not valid: the body must be a JSON object" });
                if let Some(key) = key {
                    failure["key"] = json!(key);
                }
                return Err(Rejection(StatusCode::BAD_REQUEST, failure));
            }
        }
    };
    Ok(app.context(own, |name| headers.get(name).and_then(|v| v.to_str().ok())))
}

fn selector(headers: &HeaderMap, key: Option<&str>) -> Result<Selector, Rejection> {
    let Some(value) = headers.get("flagd-selector") else {
        return Ok(Selector::All);
    };
    let parsed = value
        .to_str()
        .map_err(|_| "the Flagd-Selector header is not valid text".to_owned())
        .and_then(|s| Selector::parse(s).map_err(|e| e.to_string()));
    parsed.map_err(|details| {
        let mut failure = json!({ "errorCode": "GENERAL", "errorDetails": details });
        if let Some(key) = key {
            failure["key"] = json!(key);
        }
        Rejection(StatusCode::BAD_REQUEST, failure)
    })
}

/// One flag's OFREP object (success or failure) and its HTTP status.
fn flag_object(key: &str, ev: Evaluated) -> (StatusCode, Value) {
    let mut out = Map::new();
    out.insert("key".into(), json!(key));
    if let Some(err) = ev.error {
        let m = error::mapping(err.code);
        out.insert("errorCode".into(), json!(m.ofrep_code));
        out.insert("errorDetails".into(), json!(err.message));
        out.insert("metadata".into(), Value::Object(ev.metadata));
        return (m.http, Value::Object(out));
    }
    out.insert("reason".into(), json!(ev.reason.as_str()));
    if let Some(v) = ev.variant {
        out.insert("variant".into(), json!(v));
    }
    if let Some(v) = ev.value {
        out.insert("value".into(), v);
    }
    out.insert("metadata".into(), Value::Object(ev.metadata));
    (StatusCode::OK, Value::Object(out))
}

async fn single(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let bytes = read_body(&app, body).await?;
    let selector = selector(&headers, Some(&key))?;
    let context = request_context(&app, &bytes, &headers, Some(&key))?;
    let ev = app.evaluate(PROTOCOL, &key, &selector, &context, ValueType::Any);
    let (status, body) = flag_object(&key, ev);
    Ok(json_response(status, &body))
}

async fn bulk(State(app): State<App>, headers: HeaderMap, body: Body) -> Result<Response, Rejection> {
    let bytes = read_body(&app, body).await?;
    let selector = selector(&headers, None)?;
    let context = request_context(&app, &bytes, &headers, None)?;
    let mut flags = Vec::new();
    app.evaluate_all(PROTOCOL, &selector, &context, |key, _, ev| {
        flags.push(flag_object(key, ev).1)
    });
    let body = json!({ "flags": flags, "metadata": selector.metadata() }).to_string();
    let etag = etag(&body);
    let unchanged = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| matches!(candidate.trim(), "*") || candidate.trim().trim_start_matches("W/") == etag);
    let etag_header = HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_header)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::ETAG, etag_header),
        ],
        body,
    )
        .into_response())
}

/// A strong validator of a response body (deterministic across processes of one build).
fn etag(body: &str) -> String {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}
