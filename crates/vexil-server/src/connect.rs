//! The Connect protocol (connectrpc.com) on port 8013, as flagd's connect-go server speaks it: the
//! flagd-web provider calls `flagd.evaluation.v1` ResolveAll and EventStream this way.
//!
//! - unary: `POST /<service>/<method>` with `application/json` (proto3 JSON) or `application/proto`;
//!   errors are `{"code": "not_found", "message": "…"}` with the HTTP status Connect maps the code to;
//! - server streaming: `application/connect+json` or `application/connect+proto`, the request and
//!   every response message in a 5-byte envelope, then an end-of-stream envelope (flag `0x02`)
//!   carrying `{"error": …}` when the stream failed.
//!
//! One generic layer, no table of methods: the method is looked up in the protos' descriptors by
//! its path, the request is turned into a gRPC request (JSON transcoded to protobuf with
//! `prost-reflect`) and handed to the very router that serves gRPC, and the gRPC response is turned
//! back. Every service on the port — flagd's and any added later — answers Connect identically to
//! gRPC, through the same handlers.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use http_body_util::{BodyExt, BodyStream};
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions};
use serde_json::json;
use tonic::Status;
use tower::ServiceExt;

use crate::error::{self, ErrorKind};
use crate::grpc_wire;
use crate::serve::Peer;

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

fn content_type_header(kind: Kind, codec: Codec) -> HeaderValue {
    HeaderValue::from_static(match (kind, codec) {
        (Kind::Unary, Codec::Json) => "application/json",
        (Kind::Unary, Codec::Proto) => "application/proto",
        (Kind::Streaming, Codec::Json) => "application/connect+json",
        (Kind::Streaming, Codec::Proto) => "application/connect+proto",
    })
}

/// The method at `path` (`/<package.Service>/<Method>`).
fn method(path: &str) -> Result<MethodDescriptor, Status> {
    let pool = grpc_wire::pool().map_err(|e| error::grpc_status(ErrorKind::Internal, e))?;
    let (service, name) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    pool.get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == name))
        .ok_or_else(|| Status::unimplemented(format!("no method {path}")))
}

/// The Connect side of the evaluation port: the gRPC router it hands requests to.
#[derive(Debug, Clone)]
pub struct Connect {
    grpc: Router,
    max_body: usize,
}

impl Connect {
    /// Connect in front of `grpc` (tonic's routes), with requests up to `max_body` bytes.
    pub fn new(grpc: Router, max_body: usize) -> Connect {
        Connect { grpc, max_body }
    }
}

/// Answers a Connect request. `peer` (on Vexil's own API) travels on to the gRPC request.
pub async fn handle(connect: &Connect, path: &str, headers: HeaderMap, peer: Option<Peer>, body: Body) -> Response {
    let Some((kind, codec)) = content_type(&headers) else {
        return unary_error(&error::grpc_status(
            ErrorKind::InvalidArgument,
            "unsupported content type",
        ));
    };
    let reply = |status: Status| match kind {
        Kind::Unary => unary_error(&status),
        Kind::Streaming => stream_response(codec, futures::stream::once(async move { end_stream(Some(&status)) })),
    };
    let body = match crate::body::read(body, connect.max_body).await {
        Ok(b) => b,
        Err((kind, message)) => return reply(error::grpc_status(kind, message)),
    };
    let method = match method(path) {
        Ok(m) if m.is_server_streaming() == (kind == Kind::Streaming) && !m.is_client_streaming() => m,
        Ok(_) | Err(_) => {
            let what = if kind == Kind::Streaming { "streaming" } else { "unary" };
            return reply(Status::unimplemented(format!("no {what} method {path}")));
        }
    };
    let message = match kind {
        Kind::Unary => Ok(&body[..]),
        Kind::Streaming => unwrap_envelope(&body),
    };
    let request = match message.and_then(|m| to_protobuf(codec, &method.input(), m)) {
        Ok(r) => r,
        Err(status) => return reply(status),
    };
    let response = match connect
        .grpc
        .clone()
        .oneshot(grpc_request(path, &headers, peer, &request))
        .await
    {
        Ok(r) => r,
        Err(never) => match never {},
    };
    match kind {
        Kind::Unary => unary_reply(codec, &method.output(), response).await,
        Kind::Streaming => stream_reply(codec, method.output(), response),
    }
}

/// Headers that belong to the Connect exchange, not to the call.
const CONNECT_ONLY: [&str; 10] = [
    "content-type",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-content-encoding",
    "connect-accept-encoding",
    "te",
    "transfer-encoding",
];

/// The gRPC request for `message` (protobuf), with the caller's headers (selector, `-H` context).
fn grpc_request(path: &str, headers: &HeaderMap, peer: Option<Peer>, message: &[u8]) -> axum::extract::Request {
    let mut request = axum::extract::Request::new(Body::from(grpc_wire::frame(message)));
    if let Some(peer) = peer {
        request.extensions_mut().insert(peer);
    }
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = path.parse().unwrap_or_default();
    let forwarded = request.headers_mut();
    for (name, value) in headers {
        if !CONNECT_ONLY.contains(&name.as_str()) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    forwarded.insert(header::TE, HeaderValue::from_static("trailers"));
    request
}

/// The request message as protobuf: JSON transcoded with the message's descriptor.
fn to_protobuf(codec: Codec, input: &MessageDescriptor, message: &[u8]) -> Result<Vec<u8>, Status> {
    match codec {
        Codec::Proto => Ok(message.to_vec()),
        // An empty JSON body is the empty message.
        Codec::Json if message.iter().all(u8::is_ascii_whitespace) => Ok(Vec::new()),
        Codec::Json => {
            let invalid = |e: serde_json::Error| {
                error::grpc_status(ErrorKind::InvalidArgument, format!("invalid JSON request: {e}"))
            };
            let mut deserializer = serde_json::Deserializer::from_slice(message);
            // Unknown fields are ignored, as flagd's connect-go does.
            let options = DeserializeOptions::new().deny_unknown_fields(false);
            let decoded = DynamicMessage::deserialize_with_options(input.clone(), &mut deserializer, &options)
                .map_err(invalid)?;
            deserializer.end().map_err(invalid)?;
            Ok(decoded.encode_to_vec())
        }
    }
}

/// A response message (protobuf) in the request's codec: JSON emits every field, as flagd does.
fn from_protobuf(codec: Codec, output: &MessageDescriptor, message: Bytes) -> Result<Vec<u8>, Status> {
    match codec {
        Codec::Proto => Ok(message.to_vec()),
        Codec::Json => {
            let internal = |e: String| error::grpc_status(ErrorKind::Internal, format!("encoding the response: {e}"));
            let decoded = DynamicMessage::decode(output.clone(), message).map_err(|e| internal(e.to_string()))?;
            let mut json = decoded
                .serialize_with_options(
                    serde_json::value::Serializer,
                    &SerializeOptions::new().skip_default_fields(false),
                )
                .map_err(|e| internal(e.to_string()))?;
            null_unset_messages(output, &mut json);
            serde_json::to_vec(&json).map_err(|e| internal(e.to_string()))
        }
    }
}

/// protojson's `EmitUnpopulated` (flagd's codec) writes an unset message field as `null`;
/// prost-reflect leaves it out.
fn null_unset_messages(descriptor: &MessageDescriptor, json: &mut serde_json::Value) {
    let serde_json::Value::Object(object) = json else {
        return;
    };
    let own = |m: &MessageDescriptor| !m.full_name().starts_with("google.protobuf.");
    for field in descriptor.fields() {
        let prost_reflect::Kind::Message(inner) = field.kind() else {
            continue;
        };
        if field.is_map() {
            // A map's entries: recurse into message values.
            let value_kind = inner.map_entry_value_field().kind();
            if let (prost_reflect::Kind::Message(value), Some(serde_json::Value::Object(entries))) =
                (value_kind, object.get_mut(field.json_name()))
                && own(&value)
            {
                entries.values_mut().for_each(|v| null_unset_messages(&value, v));
            }
            continue;
        }
        if field.is_list() {
            if let Some(serde_json::Value::Array(items)) = object.get_mut(field.json_name())
                && own(&inner)
            {
                items.iter_mut().for_each(|v| null_unset_messages(&inner, v));
            }
            continue;
        }
        if field.containing_oneof().is_some() {
            continue;
        }
        match object.get_mut(field.json_name()) {
            None => {
                object.insert(field.json_name().to_owned(), serde_json::Value::Null);
            }
            // Well-known types have JSON forms of their own.
            Some(value) if own(&inner) => null_unset_messages(&inner, value),
            Some(_) => {}
        }
    }
}

/// The gRPC status of a response, from its headers (trailers-only) or trailers.
fn status_of(map: &HeaderMap) -> Option<Status> {
    Status::from_header_map(map)
}

/// Splits the complete gRPC messages off the front of `buffer`.
fn take_messages(buffer: &mut BytesMut) -> Result<Vec<Bytes>, Status> {
    grpc_wire::take_messages(buffer).map_err(|e| error::grpc_status(ErrorKind::Internal, e))
}

async fn unary_reply(codec: Codec, output: &MessageDescriptor, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    if let Some(status) = status_of(&parts.headers).filter(|s| s.code() != tonic::Code::Ok) {
        return unary_error(&status);
    }
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => return unary_error(&error::grpc_status(ErrorKind::Internal, e.to_string())),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    if let Some(status) = status_of(&trailers).filter(|s| s.code() != tonic::Code::Ok) {
        return unary_error(&status);
    }
    let mut buffer = BytesMut::from(collected.to_bytes().as_ref());
    let message = match take_messages(&mut buffer).map(|m| m.into_iter().next()) {
        Ok(Some(m)) => m,
        Ok(None) => return unary_error(&error::grpc_status(ErrorKind::Internal, "no response message")),
        Err(status) => return unary_error(&status),
    };
    match from_protobuf(codec, output, message) {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, content_type_header(Kind::Unary, codec))],
            bytes,
        )
            .into_response(),
        Err(status) => unary_error(&status),
    }
}

/// The gRPC response stream as Connect envelopes, pulled as the client reads.
fn stream_reply(codec: Codec, output: MessageDescriptor, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    if let Some(status) = status_of(&parts.headers).filter(|s| s.code() != tonic::Code::Ok) {
        return stream_response(codec, futures::stream::once(async move { end_stream(Some(&status)) }));
    }
    struct State {
        frames: BodyStream<Body>,
        buffer: BytesMut,
        done: bool,
    }
    let state = State {
        frames: BodyStream::new(body),
        buffer: BytesMut::new(),
        done: false,
    };
    let envelopes = futures::stream::unfold(state, move |mut s| {
        let output = output.clone();
        async move {
            if s.done {
                return None;
            }
            loop {
                let out = match s.frames.next().await {
                    Some(Ok(frame)) if frame.is_data() => {
                        s.buffer.extend_from_slice(&frame.into_data().unwrap_or_default());
                        let envelopes: Result<Vec<Bytes>, Status> = take_messages(&mut s.buffer).and_then(|messages| {
                            messages
                                .into_iter()
                                .map(|m| from_protobuf(codec, &output, m).map(|bytes| envelope(0x00, &bytes)))
                                .collect()
                        });
                        match envelopes {
                            Ok(e) if e.is_empty() => continue,
                            Ok(e) => e,
                            Err(status) => {
                                s.done = true;
                                vec![end_stream(Some(&status))]
                            }
                        }
                    }
                    Some(Ok(frame)) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        s.done = true;
                        let status = status_of(&trailers).filter(|s| s.code() != tonic::Code::Ok);
                        vec![end_stream(status.as_ref())]
                    }
                    Some(Err(e)) => {
                        s.done = true;
                        vec![end_stream(Some(&error::grpc_status(
                            ErrorKind::Internal,
                            e.to_string(),
                        )))]
                    }
                    None => {
                        s.done = true;
                        vec![end_stream(None)]
                    }
                };
                return Some((futures::stream::iter(out), s));
            }
        }
    })
    .flatten();
    stream_response(codec, envelopes)
}

fn stream_response(codec: Codec, envelopes: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type_header(Kind::Streaming, codec))],
        Body::from_stream(envelopes.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

fn error_json(status: &Status) -> serde_json::Value {
    json!({ "code": error::connect(status.code()).name, "message": status.message() })
}

fn unary_error(status: &Status) -> Response {
    let mut response = (
        error::connect(status.code()).http,
        [(header::CONTENT_TYPE, "application/json")],
        error_json(status).to_string(),
    )
        .into_response();
    response
        .extensions_mut()
        .insert(crate::telemetry::RpcCode(status.code() as i32));
    response
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(flags);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
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

#[cfg(test)]
mod tests {
    use vexil_proto::flagd::evaluation::v1;

    use super::*;

    fn number(request: &v1::ResolveBooleanRequest, key: &str) -> f64 {
        match &request.context.as_ref().unwrap().to_map()[key] {
            serde_json::Value::Number(n) => n.as_f64().unwrap(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn json_numbers_beyond_two_to_the_53_are_read_as_doubles_like_protojson() {
        let input = method("/flagd.evaluation.v1.Service/ResolveBoolean").unwrap().input();
        let body = br#"{"flagKey": "f", "unknownField": 1, "context": {"big": 9007199254740993, "neg": -9223372036854775808, "small": 3, "nested": {"n": [18446744073709551615]}}}"#;
        let bytes = to_protobuf(Codec::Json, &input, body).unwrap();
        let request = v1::ResolveBooleanRequest::decode(&bytes[..]).unwrap();
        assert_eq!(request.flag_key, "f");
        assert_eq!(number(&request, "big"), 9_007_199_254_740_992.0);
        assert_eq!(number(&request, "neg"), -9_223_372_036_854_775_808.0);
        assert_eq!(number(&request, "small"), 3.0);
        let bad = to_protobuf(Codec::Json, &input, br#"{"flagKey": 1}"#).unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let trailing = to_protobuf(Codec::Json, &input, br#"{"flagKey": "f"} x"#).unwrap_err();
        assert_eq!(trailing.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn methods_are_found_by_path_in_the_descriptors() {
        assert!(method("/flagd.evaluation.v2.Service/ResolveObject").is_ok());
        assert!(
            method("/flagd.evaluation.v1.Service/EventStream")
                .unwrap()
                .is_server_streaming()
        );
        assert_eq!(
            method("/nope.Service/X").unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        assert_eq!(method("garbage").unwrap_err().code(), tonic::Code::Unimplemented);
    }

    #[test]
    fn responses_emit_every_field_and_int64_as_strings() {
        let output = method("/flagd.evaluation.v1.Service/ResolveInt").unwrap().output();
        let message = v1::ResolveIntResponse {
            value: 42,
            reason: "STATIC".into(),
            variant: String::new(),
            metadata: None,
        };
        let json = from_protobuf(Codec::Json, &output, Bytes::from(message.encode_to_vec())).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["value"], "42");
        assert_eq!(json["variant"], "");
        assert_eq!(json["reason"], "STATIC");
        // Unset messages are emitted as null, as protojson's EmitUnpopulated does (flagd).
        let output = method("/flagd.evaluation.v1.Service/ResolveObject").unwrap().output();
        let message = v1::ResolveObjectResponse {
            value: None,
            reason: "DISABLED".into(),
            variant: String::new(),
            metadata: None,
        };
        let json = from_protobuf(Codec::Json, &output, Bytes::from(message.encode_to_vec())).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json.get("value"), Some(&serde_json::Value::Null), "{json}");
        // Also inside maps (ResolveAll's flags).
        let output = method("/flagd.evaluation.v1.Service/ResolveAll").unwrap().output();
        let mut flags = std::collections::HashMap::new();
        flags.insert(
            "f".to_owned(),
            v1::AnyFlag {
                reason: "STATIC".into(),
                variant: "on".into(),
                value: Some(v1::any_flag::Value::BoolValue(true)),
                metadata: None,
            },
        );
        let message = v1::ResolveAllResponse { flags, metadata: None };
        let json = from_protobuf(Codec::Json, &output, Bytes::from(message.encode_to_vec())).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["flags"]["f"]["metadata"], serde_json::Value::Null, "{json}");
        assert_eq!(json["flags"]["f"]["boolValue"], true, "{json}");
        assert_eq!(json["metadata"], serde_json::Value::Null, "{json}");
        assert!(json.as_object().unwrap().contains_key("metadata"), "{json}");
    }
}
