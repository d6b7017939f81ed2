//! The Connect protocol (connectrpc.com) on port 8013, as flagd's connect-go server speaks it: the
//! flagd-web provider calls `flagd.evaluation.v1` ResolveAll and EventStream this way.
//!
//! - unary: `POST /<service>/<method>` with `application/json` (proto3 JSON) or `application/proto`;
//!   errors are `{"code": "not_found", "message": "…"}` with the HTTP status Connect maps the code to;
//! - server streaming: `application/connect+json` or `application/connect+proto`, the request and
//!   every response message in a 5-byte envelope, then an end-of-stream envelope (flag `0x02`)
//!   carrying `{"error": …}` when the stream failed.
//!
//! Requests are decoded and handed to the very same tonic service implementations the gRPC
//! transport calls, so both protocols answer identically.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
#[cfg(test)]
use tonic::Code;
use tonic::Status;
use tonic::metadata::MetadataMap;
use vexil_proto::flagd::evaluation::v1::service_server::Service as V1;
use vexil_proto::flagd::evaluation::v2::service_server::Service as V2;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::schema::v1 as schema_v1;
use vexil_proto::schema::v1::service_server::Service as SchemaV1Service;

use crate::app::App;
use crate::error::{self, ErrorKind};
use crate::flagd::evaluation::{EvaluationV1, EvaluationV2, SchemaV1};

/// Whether a request is Connect (rather than gRPC or gRPC-web), by its content type.
pub fn is_connect(headers: &HeaderMap) -> bool {
    content_type(headers).is_some()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Json,
    Proto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    Streaming,
}

fn content_type(headers: &HeaderMap) -> Option<(Kind, Codec)> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let ct = ct.split(';').next()?.trim().to_ascii_lowercase();
    match ct.as_str() {
        "application/json" => Some((Kind::Unary, Codec::Json)),
        "application/proto" => Some((Kind::Unary, Codec::Proto)),
        "application/connect+json" => Some((Kind::Streaming, Codec::Json)),
        "application/connect+proto" => Some((Kind::Streaming, Codec::Proto)),
        _ => None,
    }
}

fn error_json(status: &Status) -> serde_json::Value {
    json!({ "code": crate::error::connect(status.code()).name, "message": status.message() })
}

fn unary_error(status: &Status) -> Response {
    (
        crate::error::connect(status.code()).http,
        [(header::CONTENT_TYPE, "application/json")],
        error_json(status).to_string(),
    )
        .into_response()
}

/// Turns every integer that a double cannot hold exactly (|n| >= 2^53) into the nearest double;
/// returns whether there was any.
fn integers_to_doubles(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            let exact = n.as_i64().is_some_and(|i| i.unsigned_abs() < 1 << f64::MANTISSA_DIGITS)
                || n.as_u64().is_some_and(|u| u < 1 << f64::MANTISSA_DIGITS);
            if exact {
                return false;
            }
            let rounded = n.as_f64().and_then(serde_json::Number::from_f64);
            match rounded {
                Some(d) => {
                    *n = d;
                    true
                }
                None => false,
            }
        }
        Value::Array(items) => items.iter_mut().fold(false, |any, v| integers_to_doubles(v) | any),
        Value::Object(map) => map.values_mut().fold(false, |any, v| integers_to_doubles(v) | any),
        _ => false,
    }
}

fn decode<T: DeserializeOwned + Message + Default>(codec: Codec, bytes: &[u8]) -> Result<T, Status> {
    match codec {
        // An empty JSON body is the empty message.
        Codec::Json if bytes.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        Codec::Json => serde_json::from_slice(bytes).or_else(|e| {
            // protojson reads every JSON number of a `google.protobuf.Value` as a double, however
            // large (flagd accepts 2^53 and above, rounded); pbjson refuses integers it cannot
            // represent exactly. Retry with such integers turned into doubles.
            let mut value: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|_| error::grpc_status(ErrorKind::InvalidArgument, format!("invalid JSON request: {e}")))?;
            if !integers_to_doubles(&mut value) {
                return Err(error::grpc_status(
                    ErrorKind::InvalidArgument,
                    format!("invalid JSON request: {e}"),
                ));
            }
            serde_json::from_value(value)
                .map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, format!("invalid JSON request: {e}")))
        }),
        Codec::Proto => T::decode(bytes)
            .map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, format!("invalid protobuf request: {e}"))),
    }
}

fn encode<T: Serialize + Message>(codec: Codec, message: &T) -> Result<Vec<u8>, Status> {
    match codec {
        Codec::Json => serde_json::to_vec(message)
            .map_err(|e| error::grpc_status(ErrorKind::Internal, format!("encoding the response: {e}"))),
        Codec::Proto => Ok(message.encode_to_vec()),
    }
}

fn request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    tonic::Request::from_parts(MetadataMap::from_headers(headers.clone()), Default::default(), message)
}

fn content_type_header(kind: Kind, codec: Codec) -> HeaderValue {
    HeaderValue::from_static(match (kind, codec) {
        (Kind::Unary, Codec::Json) => "application/json",
        (Kind::Unary, Codec::Proto) => "application/proto",
        (Kind::Streaming, Codec::Json) => "application/connect+json",
        (Kind::Streaming, Codec::Proto) => "application/connect+proto",
    })
}

async fn unary<Req, Resp, F, Fut>(codec: Codec, headers: &HeaderMap, body: &[u8], call: F) -> Response
where
    Req: DeserializeOwned + Message + Default,
    Resp: Serialize + Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let result = async {
        let message = decode::<Req>(codec, body)?;
        let response = call(request(headers, message)).await?;
        encode(codec, response.get_ref())
    }
    .await;
    match result {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, content_type_header(Kind::Unary, codec))],
            bytes,
        )
            .into_response(),
        Err(status) => unary_error(&status),
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// The end-of-stream message: `{}` or `{"error": …}` (always JSON, whatever the codec).
fn end_stream(error: Option<&Status>) -> Bytes {
    let body = match error {
        None => json!({}),
        Some(status) => json!({ "error": error_json(status) }),
    };
    envelope(0x02, body.to_string().as_bytes())
}

/// The single enveloped request message of a streaming call.
fn unwrap_envelope(body: &[u8]) -> Result<&[u8], Status> {
    if body.is_empty() {
        return Ok(body);
    }
    if body.len() < 5 {
        return Err(error::grpc_status(
            ErrorKind::InvalidArgument,
            "truncated Connect envelope",
        ));
    }
    if body[0] & 0x01 != 0 {
        return Err(Status::unimplemented("compressed Connect messages are not supported"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    body.get(5..5 + len)
        .ok_or_else(|| error::grpc_status(ErrorKind::InvalidArgument, "truncated Connect envelope"))
}

async fn server_stream<Req, Resp, F, Fut, S>(codec: Codec, headers: &HeaderMap, body: &[u8], call: F) -> Response
where
    Req: DeserializeOwned + Message + Default,
    Resp: Serialize + Message + Send + 'static,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
{
    let started = async {
        let message = decode::<Req>(codec, unwrap_envelope(body)?)?;
        call(request(headers, message)).await
    }
    .await;
    let frames: futures::stream::BoxStream<'static, Result<Bytes, std::convert::Infallible>> = match started {
        Ok(response) => {
            let messages = response.into_inner();
            // Each message in an envelope; the first error (or the end) closes the stream.
            let stream = futures::stream::unfold((Box::pin(messages), false), move |(mut messages, done)| async move {
                if done {
                    return None;
                }
                match messages.next().await {
                    Some(Ok(m)) => match encode(codec, &m) {
                        Ok(bytes) => Some((envelope(0x00, &bytes), (messages, false))),
                        Err(status) => Some((end_stream(Some(&status)), (messages, true))),
                    },
                    Some(Err(status)) => Some((end_stream(Some(&status)), (messages, true))),
                    None => Some((end_stream(None), (messages, true))),
                }
            });
            stream.map(Ok).boxed()
        }
        Err(status) => futures::stream::once(async move { Ok(end_stream(Some(&status))) }).boxed(),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type_header(Kind::Streaming, codec))],
        Body::from_stream(frames),
    )
        .into_response()
}

/// The five typed Resolve* methods of one flagd evaluation API, by method name.
macro_rules! resolve_methods {
    ($service:expr, $pkg:ident, $method:expr, $codec:expr, $headers:expr, $body:expr) => {
        match $method {
            "ResolveBoolean" => Some(
                unary(
                    $codec,
                    $headers,
                    $body,
                    |r: tonic::Request<$pkg::ResolveBooleanRequest>| $service.resolve_boolean(r),
                )
                .await,
            ),
            "ResolveString" => Some(
                unary(
                    $codec,
                    $headers,
                    $body,
                    |r: tonic::Request<$pkg::ResolveStringRequest>| $service.resolve_string(r),
                )
                .await,
            ),
            "ResolveFloat" => Some(
                unary(
                    $codec,
                    $headers,
                    $body,
                    |r: tonic::Request<$pkg::ResolveFloatRequest>| $service.resolve_float(r),
                )
                .await,
            ),
            "ResolveInt" => Some(
                unary($codec, $headers, $body, |r: tonic::Request<$pkg::ResolveIntRequest>| {
                    $service.resolve_int(r)
                })
                .await,
            ),
            "ResolveObject" => Some(
                unary(
                    $codec,
                    $headers,
                    $body,
                    |r: tonic::Request<$pkg::ResolveObjectRequest>| $service.resolve_object(r),
                )
                .await,
            ),
            _ => None,
        }
    };
}

/// Answers a Connect request for flagd's evaluation services.
pub async fn handle(app: App, path: &str, headers: HeaderMap, body: Body) -> Response {
    let Some((kind, codec)) = content_type(&headers) else {
        return unary_error(&error::grpc_status(
            ErrorKind::InvalidArgument,
            "unsupported content type",
        ));
    };
    let body = match axum::body::to_bytes(body, app.max_body()).await {
        Ok(b) => b,
        Err(_) => {
            return unary_error(&crate::error::grpc_status(
                crate::error::ErrorKind::PayloadTooLarge,
                format!("request body larger than {} bytes", app.max_body()),
            ));
        }
    };
    let (v1s, v2s, legacy) = (
        EvaluationV1 { app: app.clone() },
        EvaluationV2 { app: app.clone() },
        SchemaV1 { app },
    );
    let (h, b) = (&headers, &body[..]);
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    let response = match (kind, service, method) {
        (Kind::Unary, "flagd.evaluation.v1.Service", "ResolveAll") => Some(
            unary(codec, h, b, |r: tonic::Request<v1::ResolveAllRequest>| {
                v1s.resolve_all(r)
            })
            .await,
        ),
        (Kind::Unary, "flagd.evaluation.v1.Service", m) => resolve_methods!(v1s, v1, m, codec, h, b),
        (Kind::Unary, "flagd.evaluation.v2.Service", m) => resolve_methods!(v2s, v2, m, codec, h, b),
        (Kind::Unary, "schema.v1.Service", "ResolveAll") => Some(
            unary(codec, h, b, |r: tonic::Request<schema_v1::ResolveAllRequest>| {
                legacy.resolve_all(r)
            })
            .await,
        ),
        (Kind::Unary, "schema.v1.Service", m) => resolve_methods!(legacy, schema_v1, m, codec, h, b),
        (Kind::Streaming, "flagd.evaluation.v1.Service", "EventStream") => Some(
            server_stream(codec, h, b, |r: tonic::Request<v1::EventStreamRequest>| {
                v1s.event_stream(r)
            })
            .await,
        ),
        (Kind::Streaming, "flagd.evaluation.v2.Service", "EventStream") => Some(
            server_stream(codec, h, b, |r: tonic::Request<v2::EventStreamRequest>| {
                v2s.event_stream(r)
            })
            .await,
        ),
        (Kind::Streaming, "schema.v1.Service", "EventStream") => Some(
            server_stream(codec, h, b, |r: tonic::Request<schema_v1::EventStreamRequest>| {
                legacy.event_stream(r)
            })
            .await,
        ),
        _ => None,
    };
    response.unwrap_or_else(|| {
        let status = Status::unimplemented(format!(
            "no {} method {path}",
            if kind == Kind::Streaming { "streaming" } else { "unary" }
        ));
        match kind {
            Kind::Unary => unary_error(&status),
            Kind::Streaming => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type_header(kind, codec))],
                end_stream(Some(&status)),
            )
                .into_response(),
        }
    })
}

#[cfg(test)]
mod tests {
    use vexil_proto::pbjson_types::value::Kind as ValueKind;

    use super::*;

    fn number(request: &v1::ResolveBooleanRequest, key: &str) -> f64 {
        match request.context.as_ref().unwrap().fields[key].kind {
            Some(ValueKind::NumberValue(n)) => n,
            ref other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn json_numbers_beyond_two_to_the_53_are_read_as_doubles_like_protojson() {
        let body = br#"{"flagKey": "f", "context": {"big": 9007199254740993, "neg": -9223372036854775808, "small": 3, "nested": {"n": [18446744073709551615]}}}"#;
        let request: v1::ResolveBooleanRequest = decode(Codec::Json, body).unwrap();
        assert_eq!(number(&request, "big"), 9_007_199_254_740_992.0);
        assert_eq!(number(&request, "neg"), -9_223_372_036_854_775_808.0);
        assert_eq!(number(&request, "small"), 3.0);
        let bad = decode::<v1::ResolveBooleanRequest>(Codec::Json, br#"{"flagKey": 1}"#).unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
    }
}
