//! OFREP (OpenFeature Remote Evaluation Protocol) on port 8016.
//!
//! `POST /ofrep/v1/evaluate/flags/{key}` and `POST /ofrep/v1/evaluate/flags` (bulk), answered as
//! flagd answers them, plus what the spec has and flagd lacks: a strong `ETag` on bulk responses and
//! `304 Not Modified` for a matching `If-None-Match`, and JSON errors for oversized bodies (413).

use std::hash::BuildHasher as _;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde::ser::SerializeMap as _;
use serde_json::{Map, Value, json};
use vexil_core::{Metadata, Resolution, Selector};

use crate::app::App;
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

/// A flag's metadata as OFREP reports it: the selector's reflection with the flag's own metadata
/// over it, serialized without building the merged map.
struct MergedMetadata<'a> {
    selector: &'a Metadata,
    flag: Option<&'a Metadata>,
}

impl Serialize for MergedMetadata<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.selector {
            if !self.flag.is_some_and(|f| f.contains_key(k)) {
                map.serialize_entry(k, v)?;
            }
        }
        for (k, v) in self.flag.into_iter().flatten() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One flag's OFREP object (success or failure), serialized straight from the snapshot.
struct FlagObject<'a> {
    key: &'a str,
    resolution: &'a Resolution<'a>,
    selector: &'a Metadata,
}

impl FlagObject<'_> {
    fn status(&self) -> StatusCode {
        self.resolution
            .error
            .as_ref()
            .map_or(StatusCode::OK, |e| error::mapping(e.code).http)
    }
}

impl Serialize for FlagObject<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.resolution;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("key", self.key)?;
        match &r.error {
            Some(err) => {
                map.serialize_entry("errorCode", error::mapping(err.code).ofrep_code)?;
                map.serialize_entry("errorDetails", &err.message)?;
            }
            None => {
                map.serialize_entry("reason", r.reason.as_str())?;
                if let Some(variant) = r.variant {
                    map.serialize_entry("variant", variant)?;
                }
                if let Some(value) = r.value {
                    map.serialize_entry("value", value)?;
                }
            }
        }
        map.serialize_entry(
            "metadata",
            &MergedMetadata {
                selector: self.selector,
                flag: r.metadata,
            },
        )?;
        map.end()
    }
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
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
    let selector_metadata = selector.metadata();
    let (status, body) = app.evaluate_with(PROTOCOL, &key, &selector, &context, |resolution| {
        let object = FlagObject {
            key: &key,
            resolution,
            selector: &selector_metadata,
        };
        (object.status(), serde_json::to_vec(&object))
    });
    let body = body.map_err(|e| {
        Rejection(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "errorDetails": e.to_string() }),
        )
    })?;
    Ok(json_bytes(status, body))
}

async fn bulk(State(app): State<App>, headers: HeaderMap, body: Body) -> Result<Response, Rejection> {
    let bytes = read_body(&app, body).await?;
    let selector = selector(&headers, None)?;
    let context = request_context(&app, &bytes, &headers, None)?;
    let selector_metadata = selector.metadata();
    let mut body = Vec::with_capacity(4096);
    body.extend_from_slice(b"{\"flags\":[");
    let mut failed = None;
    let mut first = true;
    app.evaluate_all_borrowed(PROTOCOL, &selector, &context, |flag, resolution| {
        if !std::mem::take(&mut first) {
            body.push(b',');
        }
        let object = FlagObject {
            key: flag.key(),
            resolution,
            selector: &selector_metadata,
        };
        if let Err(e) = serde_json::to_writer(&mut body, &object) {
            failed.get_or_insert(e);
        }
    });
    body.extend_from_slice(b"],\"metadata\":");
    let metadata = serde_json::to_writer(&mut body, &selector_metadata);
    body.push(b'}');
    if let Some(e) = failed.or(metadata.err()) {
        return Err(Rejection(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "errorCode": "GENERAL", "errorDetails": format!("bulk evaluation failed: {e}") }),
        ));
    }
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

/// A strong validator of a response body: the same on every replica running this version.
fn etag(body: &[u8]) -> String {
    let hash = foldhash::quality::FixedState::with_seed(0x7665_7869_6c00).hash_one(body);
    format!("\"{hash:016x}\"")
}
