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
use serde_json::{Map, Value};
use vexil_core::{CompiledFlag, Flag, Metadata, Resolution, Selector, ValueType};

use crate::app::App;
use crate::error::{self, ErrorKind};

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

/// A request that cannot be evaluated, answered with the error table's HTTP status and OFREP
/// error body (`key` when the request names a flag).
struct Rejection {
    kind: ErrorKind,
    details: String,
    key: Option<String>,
}

impl Rejection {
    fn new(kind: ErrorKind, details: impl Into<String>, key: Option<&str>) -> Rejection {
        Rejection {
            kind,
            details: details.into(),
            key: key.map(str::to_owned),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let m = error::mapping(self.kind);
        let mut body = Map::new();
        if let Some(key) = self.key {
            body.insert("key".into(), Value::String(key));
        }
        if let Some(code) = m.ofrep_code {
            body.insert("errorCode".into(), Value::String(code.into()));
        }
        body.insert("errorDetails".into(), Value::String(self.details));
        json_response(m.http, &Value::Object(body))
    }
}

/// Reads the body up to the configured limit (and within `--body-read-timeout`).
async fn read_body(app: &App, body: Body) -> Result<Bytes, Rejection> {
    crate::body::read(body, app.max_body())
        .await
        .map_err(|(kind, details)| Rejection::new(kind, details, None))
}

/// The request's context: `{"context": {...}}`; an empty body is an empty context, a non-object
/// context is ignored (as flagd does), malformed JSON is `INVALID_CONTEXT`.
/// The request's own context: the body's `context` object.
fn own_context(body: &[u8], key: Option<&str>) -> Result<Map<String, Value>, Rejection> {
    let own = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut request)) => match request.remove("context") {
                Some(Value::Object(ctx)) => ctx,
                _ => Map::new(),
            },
            Ok(_) | Err(_) => {
                return Err(Rejection::new(
                    ErrorKind::InvalidContext,
                    "Provider context is not valid: the body must be a JSON object",
                    key,
                ));
            }
        }
    };
    Ok(own)
}

/// The header a `-H` mapping names.
fn header<'h>(headers: &'h HeaderMap) -> impl Fn(&str) -> Option<&'h str> {
    |name| headers.get(name).and_then(|v| v.to_str().ok())
}

fn selector(headers: &HeaderMap, key: Option<&str>) -> Result<Selector, Rejection> {
    crate::selector::from_headers(headers, "")
        .map_err(|details| Rejection::new(ErrorKind::InvalidArgument, details, key))
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

/// A flag's key, variant names and values, and metadata as JSON text: encoded on first use, then
/// kept with the compiled flag (its [`CompiledFlag::memo`]), so answering copies bytes instead of
/// serializing values.
#[derive(Debug)]
struct Fragments {
    /// The key as a JSON string (with quotes).
    key: Box<str>,
    /// Per variant, in definition order: its name as a JSON string and its value as JSON.
    variants: Vec<(Box<str>, Box<str>)>,
    /// The flag metadata as a JSON object.
    metadata: Box<str>,
}

impl Fragments {
    fn of(flag: &Flag) -> Fragments {
        fn text<T: Serialize + ?Sized>(v: &T) -> Box<str> {
            // Strings, maps and JSON values always serialize.
            serde_json::to_string(v)
                .unwrap_or_else(|_| "null".to_owned())
                .into_boxed_str()
        }
        Fragments {
            key: text(&flag.key),
            variants: flag
                .variants
                .iter()
                .map(|(name, value)| (text(name), text(value)))
                .collect(),
            metadata: text(&flag.metadata),
        }
    }

    /// The JSON name and value of the variant called `name`.
    fn variant(&self, flag: &Flag, name: &str) -> Option<(&str, &str)> {
        let index = flag.variants.iter().position(|(n, _)| n == name)?;
        self.variants.get(index).map(|(n, v)| (&**n, &**v))
    }
}

/// Appends one flag's OFREP object (success or failure) to `out`, from the flag's pre-encoded JSON
/// fragments; returns its HTTP status (for the single-flag endpoint).
fn write_flag_object(
    out: &mut Vec<u8>,
    flag: Option<&CompiledFlag>,
    key: &str,
    r: &Resolution<'_>,
    selector: &Metadata,
) -> StatusCode {
    let fragments = flag.and_then(|f| f.memo(Fragments::of));
    out.extend_from_slice(b"{\"key\":");
    match fragments {
        Some(f) => out.extend_from_slice(f.key.as_bytes()),
        None => write_json(out, key),
    }
    let status = match &r.error {
        Some(err) => {
            let m = error::mapping(ErrorKind::Evaluation(err.code));
            out.extend_from_slice(b",\"errorCode\":\"");
            out.extend_from_slice(m.ofrep_code.unwrap_or("GENERAL").as_bytes());
            out.extend_from_slice(b"\",\"errorDetails\":");
            write_json(out, &err.message);
            m.http
        }
        None => {
            out.extend_from_slice(b",\"reason\":\"");
            out.extend_from_slice(r.reason.as_str().as_bytes());
            out.push(b'"');
            let encoded = match (fragments, flag, r.variant) {
                (Some(f), Some(flag), Some(name)) => f.variant(flag.flag(), name),
                _ => None,
            };
            match (encoded, r.variant, r.value) {
                (Some((name, value)), _, _) => {
                    out.extend_from_slice(b",\"variant\":");
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b",\"value\":");
                    out.extend_from_slice(value.as_bytes());
                }
                (None, variant, value) => {
                    if let Some(variant) = variant {
                        out.extend_from_slice(b",\"variant\":");
                        write_json(out, variant);
                    }
                    if let Some(value) = value {
                        out.extend_from_slice(b",\"value\":");
                        write_json(out, value);
                    }
                }
            }
            StatusCode::OK
        }
    };
    out.extend_from_slice(b",\"metadata\":");
    // The cached fragment is the flag's own metadata; an experiment's answer carries its own.
    let own_metadata = flag.is_some_and(|f| r.metadata.is_some_and(|m| std::ptr::eq(m, &f.flag().metadata)));
    match (fragments, selector.is_empty() && own_metadata) {
        (Some(f), true) => out.extend_from_slice(f.metadata.as_bytes()),
        _ => write_json(
            out,
            &MergedMetadata {
                selector,
                flag: r.metadata,
            },
        ),
    }
    out.push(b'}');
    status
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Strings, JSON values and maps of them always serialize.
    let _ = serde_json::to_writer(&mut *out, value);
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
    let own = own_context(&bytes, Some(&key))?;
    let context = app.flags().context(&own, header(&headers));
    let selector_metadata = selector.metadata();
    let mut body = Vec::with_capacity(256);
    let status = app.flags().evaluate(
        PROTOCOL,
        &key,
        &selector,
        &context,
        ValueType::Any,
        |flag, resolution| write_flag_object(&mut body, flag, &key, resolution, &selector_metadata),
    );
    Ok(json_bytes(status, body))
}

async fn bulk(State(app): State<App>, headers: HeaderMap, body: Body) -> Result<Response, Rejection> {
    let bytes = read_body(&app, body).await?;
    let selector = selector(&headers, None)?;
    let own = own_context(&bytes, None)?;
    let context = app.flags().context(&own, header(&headers));
    let selector_metadata = selector.metadata();
    let mut body = Vec::with_capacity(4096);
    body.extend_from_slice(b"{\"flags\":[");
    let mut first = true;
    app.flags()
        .evaluate_all(PROTOCOL, &selector, &context, |flag, resolution| {
            if !std::mem::take(&mut first) {
                body.push(b',');
            }
            write_flag_object(&mut body, Some(flag), flag.key(), resolution, &selector_metadata);
        });
    body.extend_from_slice(b"],\"metadata\":");
    write_json(&mut body, &selector_metadata);
    body.push(b'}');
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
