//! Vexil's JSON API under `/v1` on the HTTP port, transcoded to and from the `vexil.v1` gRPC
//! services. There is no hand-written route: the route table is built, at first use, from the
//! `google.api.http` annotations of every method in the protos' descriptors
//! ([`vexil_proto::FILE_DESCRIPTOR_SET`]), and every call goes through the very tonic router that
//! serves gRPC — the same handlers, the same access checks, the same errors.
//!
//! # Routes
//!
//! Each `google.api.http` rule (and each of its `additional_bindings`) is one route: an HTTP method
//! (`get`, `put`, `post`, `delete`, `patch` or `custom.kind`) and a path template:
//!
//! - literal segments (`environments`), `*` (one segment), `**` (the rest of the path, last only);
//! - variables `{field}` (one segment) or `{field=pattern/*}` (the segments the pattern matches),
//!   whose field path may be dotted (`{parent.name}`);
//! - an optional `:verb` suffix (`/v1/api-keys/{id}:revoke`).
//!
//! A path is served by its most specific matching template: segment by segment, a literal beats a
//! `*` or variable, which beats `**`; then a template with a verb beats one without. So
//! `…/flags/new-banner:validate` is `ValidateFlag`, never `GetFlag` of a key `new-banner:validate`
//! (such a key is reached with its colon escaped, `new-banner%3Avalidate`). A path no template
//! matches is 404; a path whose best template has no route for the request's method is 405 with
//! `Allow`.
//!
//! # Requests
//!
//! The request message is built in three steps, later ones overriding earlier ones:
//!
//! 1. the JSON body (proto3 JSON mapping, camelCase or original field names): with `body: "*"` it
//!    is the whole message (an empty body is the empty message), with `body: "field"` it is that
//!    field, and without `body` a request must have none. Unknown fields are rejected: this is
//!    Vexil's own API, and a typo must not pass silently.
//! 2. the path variables, percent-decoded (a multi-segment variable keeps `%2F`), converted to
//!    their field's type as proto3 JSON reads a string (an `int64 id` from `/api-keys/42:revoke`);
//! 3. the query parameters, for the fields neither the path nor the body sets (with `body: "*"`
//!    there are none): `name=value` by proto3 JSON or original name, nested fields with dots
//!    (`a.b=1`), repeated fields by repetition (`tags=a&tags=b`), well-known types by their JSON
//!    string form (`since=2024-01-01T00:00:00Z`). An unknown parameter, or a singular field given
//!    twice, is an error.
//!
//! Every request error is a 400 naming the body, path variable or parameter at fault; a body over
//! `max_body` is 413; a body of another content type than JSON (`application/json`, `…+json`, or
//! none given) is 415 — which also keeps browsers from sending one cross-site without a CORS
//! preflight (HTML forms send `application/x-www-form-urlencoded`, `multipart/form-data` or
//! `text/plain`; so does `curl -d` without `-H 'content-type: application/json'`). The call then goes to the gRPC router as a gRPC request (`application/grpc`,
//! `te: trailers`) with the caller's headers — `authorization` and `x-api-key` among them; hop-by-hop,
//! content and `grpc-*` headers are not forwarded — and the client's address ([`Peer`]), which
//! decides what an anonymous caller may do.
//!
//! # Responses
//!
//! A unary call answers `200` with the response message (or its `response_body` field) as proto3
//! JSON: camelCase names, 64-bit integers as strings, enums by name, timestamps in RFC 3339. Every
//! field is present, defaults included, except unset messages, unset `optional` fields and the
//! members of a oneof that is not set. The gRPC response's metadata comes along as headers.
//!
//! A server-streaming call (`ConfigService.Watch`) answers Server-Sent Events (`text/event-stream`):
//! one `data: <json>` event per message, written as it arrives, a comment line every 15 seconds of
//! silence to keep proxies from closing the stream, and, if the stream fails, a last
//! `event: error` whose data is the error below. With `Accept: application/x-ndjson` the messages are
//! newline-delimited JSON instead, a failure being a last line `{"error": …}`. A call refused before
//! its stream starts (unknown environment, no access) is an ordinary error response. Streams resume:
//! an event whose message has a `configVersion` carries it as its `id:`, and a request with
//! `Last-Event-ID` (what a browser's `EventSource` sends when it reconnects) sets the request's
//! `since_version` to it unless the query did, so a reconnecting watcher, on any replica, misses
//! no version and sees none twice.
//!
//! An error answers the HTTP status the error table gives the gRPC code
//! ([`error::connect`]: `INVALID_ARGUMENT` 400, `UNAUTHENTICATED` 401, `PERMISSION_DENIED` 403,
//! `NOT_FOUND` 404, `ALREADY_EXISTS`/`ABORTED` 409, `UNAVAILABLE` 503, …) and the body
//! `{"code": 3, "status": "INVALID_ARGUMENT", "message": "…", "problems": [{"pointer", "message"}]}`,
//! `problems` being there when the status details carry them (an invalid input, see
//! [`error::store_status`]).
//!
//! `GET /v1/openapi.json` is the OpenAPI document of these routes ([`crate::openapi`]).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use http_body_util::{BodyExt, BodyStream};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    ReflectMessage, SerializeOptions,
};
use serde_json::json;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::error::{self, ErrorKind};
use crate::grpc_wire;
use crate::serve::Peer;

/// The package whose services are transcoded.
const PACKAGE: &str = "vexil.v1";

/// The method option holding the HTTP rule.
const HTTP_OPTION: &str = "google.api.http";

/// How long a Server-Sent Events stream stays silent before a keep-alive comment.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Vexil's JSON API under /v1 on the HTTP port: routes from the protos' google.api.http
/// annotations, each call handed to `grpc` (tonic's routes), request bodies up to `max_body`
/// bytes. Also serves `GET /v1/openapi.json`.
pub fn router(grpc: Router, max_body: usize) -> Router {
    let transcoder = Arc::new(Transcoder { grpc, max_body });
    Router::new()
        .route("/v1/openapi.json", axum::routing::get(crate::openapi::serve))
        .route("/v1/{*path}", axum::routing::any(handle))
        .with_state(transcoder)
}

/// The state of [`router`]: the gRPC side and the body limit.
#[derive(Debug)]
struct Transcoder {
    grpc: Router,
    max_body: usize,
}

// ---------------------------------------------------------------------------------------------
// Descriptors and the route table
// ---------------------------------------------------------------------------------------------

static ROUTES: LazyLock<Result<RouteTable, String>> = LazyLock::new(|| RouteTable::build(pool()?));

/// The descriptors of every proto (decoded once, shared with the Connect layer).
pub(crate) fn pool() -> Result<&'static DescriptorPool, String> {
    grpc_wire::pool()
}

/// The route table (built once, from the descriptors).
pub(crate) fn routes() -> Result<&'static RouteTable, String> {
    ROUTES.as_ref().map_err(|e| format!("HTTP routes: {e}"))
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one segment.
    Any,
    /// `**`: the rest of the path (zero or more segments).
    Rest,
}

/// A variable of a path template: the field it sets and the template segments it spans.
#[derive(Debug, Clone)]
pub(crate) struct Variable {
    /// The field path as the template writes it (`flag_set`, `parent.name`).
    pub(crate) field_path: String,
    start: usize,
    end: usize,
}

/// A parsed `google.api.http` path template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    source: String,
    segments: Vec<Segment>,
    verb: Option<String>,
    variables: Vec<Variable>,
}

impl Template {
    /// Parses `/seg/{var}/{var=pattern/**}:verb`.
    pub(crate) fn parse(source: &str) -> Result<Template, String> {
        let fail = |why: &str| format!("path template `{source}`: {why}");
        let rest = source.strip_prefix('/').ok_or_else(|| fail("must start with `/`"))?;
        // The verb is a `:` after the last segment, i.e. after any `/` or `}`.
        let tail = rest.rfind(['/', '}']).map_or(0, |i| i + 1);
        let (path, verb) = match rest[tail..].find(':') {
            Some(i) => {
                let verb = &rest[tail + i + 1..];
                if verb.is_empty() || verb.contains(['{', '}', '*']) {
                    return Err(fail("invalid verb"));
                }
                (&rest[..tail + i], Some(verb.to_owned()))
            }
            None => (rest, None),
        };
        let mut segments = Vec::new();
        let mut variables: Vec<Variable> = Vec::new();
        let mut remaining = path;
        while !remaining.is_empty() {
            if let Some(inner) = remaining.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| fail("unclosed `{`"))?;
                let (field_path, pattern) = inner[..close].split_once('=').unwrap_or((&inner[..close], "*"));
                let valid_ident = |s: &str| {
                    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                };
                if !field_path.split('.').all(valid_ident) {
                    return Err(fail(&format!("invalid variable `{field_path}`")));
                }
                if variables.iter().any(|v| v.field_path == field_path) {
                    return Err(fail(&format!("variable `{field_path}` twice")));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments
                        .push(parse_segment(part, true).ok_or_else(|| fail(&format!("invalid pattern `{pattern}`")))?);
                }
                variables.push(Variable {
                    field_path: field_path.to_owned(),
                    start,
                    end: segments.len(),
                });
                remaining = &inner[close + 1..];
            } else {
                let end = remaining.find('/').unwrap_or(remaining.len());
                let part = &remaining[..end];
                segments.push(parse_segment(part, false).ok_or_else(|| fail(&format!("invalid segment `{part}`")))?);
                remaining = &remaining[end..];
            }
            match remaining.strip_prefix('/') {
                Some("") => return Err(fail("empty segment")),
                Some(next) => remaining = next,
                None if remaining.is_empty() => {}
                None => return Err(fail("a variable must be a whole segment")),
            }
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::Rest)
            && i + 1 != segments.len()
        {
            return Err(fail("`**` must be the last segment"));
        }
        Ok(Template {
            source: source.to_owned(),
            segments,
            verb,
            variables,
        })
    }

    /// The template as written in the annotation.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// The variables, in path order.
    pub(crate) fn variables(&self) -> &[Variable] {
        &self.variables
    }

    /// The template as an OpenAPI path: each variable as `{field.path}`, the verb kept literally.
    pub(crate) fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.field_path);
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            out.push_str(match &self.segments[i] {
                Segment::Literal(l) => l,
                Segment::Any => "*",
                Segment::Rest => "**",
            });
            i += 1;
        }
        if out.is_empty() {
            out.push('/');
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// Whether the variable spans one segment exactly (it is then fully percent-decoded).
    fn single_segment(&self, v: &Variable) -> bool {
        v.end == v.start + 1 && self.segments[v.start] == Segment::Any
    }

    /// How specific the template is, to order the templates matching a path: segment by segment
    /// a literal (3) beats `*` (2), which beats `**` (1); then a verb (1) beats none (0).
    fn rank(&self) -> Vec<u8> {
        let mut rank: Vec<u8> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 3,
                Segment::Any => 2,
                Segment::Rest => 1,
            })
            .collect();
        rank.push(u8::from(self.verb.is_some()));
        rank
    }

    /// Matches the raw (still percent-encoded) `path`: the raw text of each variable.
    fn matches(&self, path: &str) -> Option<Vec<String>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => {
                let head = rest.strip_suffix(verb.as_str())?.strip_suffix(':')?;
                if head.ends_with('/') || (head.is_empty() && !self.segments.is_empty()) {
                    return None;
                }
                head
            }
            None => rest,
        };
        let raw: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        if raw.iter().any(|s| s.is_empty()) {
            return None;
        }
        // bounds[i]: the index in `raw` where template segment `i` starts.
        let mut bounds = Vec::with_capacity(self.segments.len() + 1);
        let mut j = 0;
        for segment in &self.segments {
            bounds.push(j);
            match segment {
                Segment::Literal(literal) => {
                    if raw.get(j)? != literal {
                        return None;
                    }
                    j += 1;
                }
                Segment::Any => {
                    raw.get(j)?;
                    j += 1;
                }
                Segment::Rest => j = raw.len(),
            }
        }
        bounds.push(j);
        if j != raw.len() {
            return None;
        }
        Some(
            self.variables
                .iter()
                .map(|v| raw[bounds[v.start]..bounds[v.end]].join("/"))
                .collect(),
        )
    }
}

fn parse_segment(part: &str, in_variable: bool) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::Any),
        "**" => Some(Segment::Rest),
        _ if part.contains(['{', '}', '*', '=']) || (in_variable && part.contains(':')) => None,
        literal => Some(Segment::Literal(literal.to_owned())),
    }
}

/// Where the request body goes.
#[derive(Debug, Clone)]
pub(crate) enum BodyRule {
    /// No body (`body` unset): the fields come from the path and the query.
    None,
    /// `body: "*"`: the body is the request message, less what the path sets.
    Whole,
    /// `body: "field"`: the body is that field; the other fields come from the path and the query.
    Field(FieldDescriptor),
}

/// One HTTP route: an HTTP rule of a gRPC method.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) template: Template,
    pub(crate) rpc: MethodDescriptor,
    pub(crate) body: BodyRule,
    /// `response_body`: the field of the response message that is the HTTP response.
    pub(crate) response_body: Option<FieldDescriptor>,
    /// Each template variable's field path, resolved in the request message.
    pub(crate) path_fields: Vec<Vec<FieldDescriptor>>,
    /// 0 for the method's own rule, `n` for its `n`-th additional binding.
    pub(crate) binding: usize,
    rank: Vec<u8>,
    /// `/<package.Service>/<Method>`.
    grpc_path: String,
}

impl Route {
    fn new(rpc: &MethodDescriptor, rule: &DynamicMessage, binding: usize) -> Result<Route, String> {
        let name = rpc.full_name();
        let text = |message: &DynamicMessage, field: &str| {
            message
                .get_field_by_name(field)
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let simple = [
            ("get", Method::GET),
            ("put", Method::PUT),
            ("post", Method::POST),
            ("delete", Method::DELETE),
            ("patch", Method::PATCH),
        ];
        let (method, path) = if let Some((field, method)) = simple.iter().find(|(f, _)| rule.has_field_by_name(f)) {
            (method.clone(), text(rule, field))
        } else if let Some(custom) = rule
            .get_field_by_name("custom")
            .filter(|_| rule.has_field_by_name("custom"))
            && let Some(custom) = custom.as_message()
        {
            let kind = text(custom, "kind");
            let method =
                Method::from_bytes(kind.as_bytes()).map_err(|_| format!("{name}: invalid HTTP method `{kind}`"))?;
            (method, text(custom, "path"))
        } else {
            return Err(format!("{name}: an HTTP rule without a pattern"));
        };
        let template = Template::parse(&path).map_err(|e| format!("{name}: {e}"))?;
        let input = rpc.input();
        let path_fields = template
            .variables
            .iter()
            .map(|v| path_field(&input, &v.field_path).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let body = match text(rule, "body").as_str() {
            "" => BodyRule::None,
            "*" => BodyRule::Whole,
            field => BodyRule::Field(
                input
                    .get_field_by_name(field)
                    .ok_or_else(|| format!("{name}: no body field `{field}` in {}", input.full_name()))?,
            ),
        };
        let response_body = match text(rule, "response_body").as_str() {
            "" => None,
            field => Some(
                rpc.output()
                    .get_field_by_name(field)
                    .ok_or_else(|| format!("{name}: no response field `{field}`"))?,
            ),
        };
        Ok(Route {
            rank: template.rank(),
            grpc_path: format!("/{}/{}", rpc.parent_service().full_name(), rpc.name()),
            method,
            template,
            rpc: rpc.clone(),
            body,
            response_body,
            path_fields,
            binding,
        })
    }
}

/// The field a path variable sets: singular messages down to a singular scalar or enum.
fn path_field(input: &MessageDescriptor, field_path: &str) -> Result<Vec<FieldDescriptor>, String> {
    let mut fields = Vec::new();
    let mut message = input.clone();
    let mut parts = field_path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = message.get_field_by_name(part).ok_or_else(|| {
            format!(
                "path variable `{field_path}`: no field `{part}` in {}",
                message.full_name()
            )
        })?;
        if field.is_list() || field.is_map() {
            return Err(format!("path variable `{field_path}`: `{part}` is repeated"));
        }
        match (field.kind(), parts.peek()) {
            (Kind::Message(inner), Some(_)) => message = inner,
            (Kind::Message(_), None) => return Err(format!("path variable `{field_path}` is a message")),
            (_, Some(_)) => return Err(format!("path variable `{field_path}`: `{part}` is not a message")),
            (_, None) => {}
        }
        fields.push(field);
    }
    Ok(fields)
}

/// Every route of the `vexil.v1` services.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
}

/// The outcome of looking a request up in the [`RouteTable`].
#[derive(Debug)]
pub(crate) enum Lookup<'a> {
    /// The route, and the raw text of each of its template's variables.
    Found(&'a Route, Vec<String>),
    NotFound,
    /// The path is known, not with this method: the methods it has.
    MethodNotAllowed(Vec<Method>),
}

impl RouteTable {
    /// The routes of every method of [`PACKAGE`] with a `google.api.http` option. Client-streaming
    /// methods have no JSON form and are left out.
    fn build(pool: &DescriptorPool) -> Result<RouteTable, String> {
        let http = pool
            .get_extension_by_name(HTTP_OPTION)
            .ok_or_else(|| format!("the descriptors lack the `{HTTP_OPTION}` option"))?;
        let mut routes = Vec::new();
        for service in pool.services().filter(|s| s.package_name() == PACKAGE) {
            for rpc in service.methods() {
                let options = rpc.options();
                if rpc.is_client_streaming() || !options.has_extension(&http) {
                    continue;
                }
                let rule = options.get_extension(&http);
                let rule = rule
                    .as_message()
                    .ok_or_else(|| format!("{}: `{HTTP_OPTION}` is not an HttpRule", rpc.full_name()))?;
                routes.push(Route::new(&rpc, rule, 0)?);
                let extra = rule.get_field_by_name("additional_bindings");
                for (i, binding) in extra.iter().filter_map(|v| v.as_list()).flatten().enumerate() {
                    if let Some(binding) = binding.as_message() {
                        routes.push(Route::new(&rpc, binding, i + 1)?);
                    }
                }
            }
        }
        if routes.is_empty() {
            return Err(format!(
                "no `{PACKAGE}` method has a `{HTTP_OPTION}` option in the descriptor set (the build must \
                 encode it with its extension options: protox's `encode_file_descriptor_set`)"
            ));
        }
        for (i, a) in routes.iter().enumerate() {
            if let Some(b) = routes[..i]
                .iter()
                .find(|b| b.method == a.method && b.template.openapi_path() == a.template.openapi_path())
            {
                return Err(format!(
                    "{} and {} both route {} {}",
                    a.rpc.full_name(),
                    b.rpc.full_name(),
                    a.method,
                    a.template.source()
                ));
            }
        }
        Ok(RouteTable { routes })
    }

    /// Every route, in the order of the descriptors.
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` on the raw `path`: the most specific template matching the path,
    /// then the route of that template with the request's method.
    pub(crate) fn find(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut best: Option<&[u8]> = None;
        let mut candidates: Vec<(&Route, Vec<String>)> = Vec::new();
        for route in &self.routes {
            let Some(captures) = route.template.matches(path) else {
                continue;
            };
            match best {
                Some(rank) if rank > route.rank.as_slice() => continue,
                Some(rank) if rank == route.rank.as_slice() => {}
                _ => {
                    best = Some(&route.rank);
                    candidates.clear();
                }
            }
            candidates.push((route, captures));
        }
        if candidates.is_empty() {
            return Lookup::NotFound;
        }
        let mut allowed: Vec<Method> = Vec::new();
        for (route, captures) in candidates {
            if route.method == method {
                return Lookup::Found(route, captures);
            }
            if !allowed.contains(&route.method) {
                allowed.push(route.method.clone());
            }
        }
        Lookup::MethodNotAllowed(allowed)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An error response: the HTTP status and the JSON body `{code, status, message, problems?}`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    http: StatusCode,
    code: Code,
    message: String,
    problems: Option<serde_json::Value>,
    allow: Option<String>,
    /// `Retry-After` (seconds), from the status's `retry-after` metadata (rate limits).
    retry_after: Option<String>,
}

impl ApiError {
    /// An error of the table's `kind` (its HTTP status and gRPC code).
    fn kind(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        let mapping = error::mapping(kind);
        ApiError {
            http: mapping.http,
            code: mapping.grpc,
            message: message.into(),
            problems: None,
            allow: None,
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::kind(ErrorKind::InvalidArgument, message)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::kind(ErrorKind::Internal, message)
    }

    /// A gRPC status, with the HTTP status the error table gives its code and the problems its
    /// details carry.
    fn status(status: &Status) -> ApiError {
        let problems = serde_json::from_slice::<serde_json::Value>(status.details())
            .ok()
            .filter(|p| p.as_array().is_some_and(|a| a.iter().all(serde_json::Value::is_object)));
        ApiError {
            http: error::connect(status.code()).http,
            code: status.code(),
            message: status.message().to_owned(),
            problems,
            allow: None,
            retry_after: status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }

    /// The JSON body.
    fn json(&self) -> serde_json::Value {
        let mut body = json!({
            "code": self.code as i32,
            "status": status_name(self.code),
            "message": self.message,
        });
        if let Some(problems) = &self.problems {
            body["problems"] = problems.clone();
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.http,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            self.json().to_string(),
        )
            .into_response();
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        if let Some(after) = self.retry_after.and_then(|a| HeaderValue::from_str(&a).ok()) {
            response.headers_mut().insert(header::RETRY_AFTER, after);
        }
        response
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`), as Google's JSON APIs write it.
pub(crate) fn status_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

async fn handle(State(transcoder): State<Arc<Transcoder>>, request: Request) -> Response {
    transcode(&transcoder, request)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn transcode(transcoder: &Transcoder, request: Request) -> Result<Response, ApiError> {
    let table = routes().map_err(ApiError::internal)?;
    let (parts, body) = request.into_parts();
    let (route, captures) = match table.find(&parts.method, parts.uri.path()) {
        Lookup::Found(route, captures) => (route, captures),
        Lookup::NotFound => {
            return Err(ApiError::kind(
                ErrorKind::NotFound,
                format!("no route {} {}", parts.method, parts.uri.path()),
            ));
        }
        Lookup::MethodNotAllowed(allowed) => {
            let allow = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
            return Err(ApiError {
                http: StatusCode::METHOD_NOT_ALLOWED,
                code: Code::Unimplemented,
                message: format!(
                    "{} {} is not allowed (allowed: {allow})",
                    parts.method,
                    parts.uri.path()
                ),
                problems: None,
                allow: Some(allow),
                retry_after: None,
            });
        }
    };
    let body = crate::body::read(body, transcoder.max_body)
        .await
        .map_err(|(kind, message)| ApiError::kind(kind, message))?;
    if !is_blank(&body) && !is_json(&parts.headers) {
        let given = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return Err(ApiError {
            http: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ApiError::invalid(format!(
                "the request body must be JSON, sent as `content-type: application/json` (not `{}`)",
                given.unwrap_or_default()
            ))
        });
    }
    let mut message = request_message(route, &captures, parts.uri.query(), &body)?;
    if route.rpc.is_server_streaming() {
        resume_after_last_event(&mut message, &parts.headers)?;
    }
    let grpc = grpc_request(route, &parts, &message.encode_to_vec());
    let response = match transcoder.grpc.clone().oneshot(grpc).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if route.rpc.is_server_streaming() {
        Ok(stream_reply(route, StreamFormat::of(&parts.headers), response))
    } else {
        Ok(unary_reply(route, response).await)
    }
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Whether the body's content type is JSON (or not given).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// The request message of `route`: the body, then the path variables, then the query.
fn request_message(
    route: &Route,
    captures: &[String],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ApiError> {
    let input = route.rpc.input();
    let mut message = match &route.body {
        BodyRule::None if is_blank(body) => DynamicMessage::new(input.clone()),
        BodyRule::None => {
            return Err(ApiError::invalid(format!(
                "{} {} takes no request body",
                route.method,
                route.template.source()
            )));
        }
        BodyRule::Whole if is_blank(body) => DynamicMessage::new(input.clone()),
        BodyRule::Whole => from_json(&input, body)?,
        BodyRule::Field(field) => {
            // The body is the field's value: read it as the only member of the message.
            let mut wrapped = Vec::with_capacity(body.len() + field.json_name().len() + 5);
            wrapped.extend_from_slice(format!("{{{}:", serde_json::Value::from(field.json_name())).as_bytes());
            wrapped.extend_from_slice(body);
            wrapped.extend_from_slice(b"\n}");
            from_json(&input, &wrapped)?
        }
    };
    for ((variable, fields), raw) in route.template.variables.iter().zip(&route.path_fields).zip(captures) {
        let what = format!("path variable `{}`", variable.field_path);
        let keep_slash = !route.template.single_segment(variable);
        let value = percent_decode(raw, keep_slash, false).map_err(|e| ApiError::invalid(format!("{what}: {e}")))?;
        set_from_text(&mut message, fields, &[value], &what)?;
    }
    let parameters = query.map(parse_query).transpose()?.unwrap_or_default();
    if parameters.is_empty() {
        return Ok(message);
    }
    // Fields the path and the body set cannot be query parameters.
    let mut bound: Vec<Vec<u32>> = route.path_fields.iter().map(|f| numbers(f)).collect();
    if let BodyRule::Field(field) = &route.body {
        bound.push(vec![field.number()]);
    }
    let mut grouped: Vec<(String, Vec<FieldDescriptor>, Vec<String>)> = Vec::new();
    for (name, value) in parameters {
        if matches!(route.body, BodyRule::Whole) {
            return Err(ApiError::invalid(format!(
                "query parameter `{name}`: {} {} takes its fields in the request body",
                route.method,
                route.template.source()
            )));
        }
        let fields =
            query_field(&input, &name).ok_or_else(|| ApiError::invalid(format!("unknown query parameter `{name}`")))?;
        let path = numbers(&fields);
        if bound.iter().any(|b| b.starts_with(&path) || path.starts_with(b)) {
            return Err(ApiError::invalid(format!(
                "query parameter `{name}`: the field is set by the path or the body"
            )));
        }
        match grouped.iter_mut().find(|(_, f, _)| numbers(f) == path) {
            Some((first, _, values)) => {
                if !fields.last().is_some_and(FieldDescriptor::is_list) {
                    return Err(ApiError::invalid(format!(
                        "query parameter `{name}` given more than once{}",
                        if *first == name {
                            String::new()
                        } else {
                            format!(" (as `{first}`)")
                        }
                    )));
                }
                values.push(value);
            }
            None => grouped.push((name, fields, vec![value])),
        }
    }
    for (name, fields, values) in grouped {
        set_from_text(&mut message, &fields, &values, &format!("query parameter `{name}`"))?;
    }
    Ok(message)
}

fn numbers(fields: &[FieldDescriptor]) -> Vec<u32> {
    fields.iter().map(FieldDescriptor::number).collect()
}

/// A JSON body as `input`, strictly: unknown fields and trailing data are errors.
fn from_json(input: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::invalid(format!("invalid request body: {e}"));
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let message =
        DynamicMessage::deserialize_with_options(input.clone(), &mut deserializer, &options).map_err(invalid)?;
    deserializer.end().map_err(invalid)?;
    Ok(message)
}

/// The field a query parameter names: dot-separated field names (proto3 JSON or original),
/// through singular messages of Vexil's own (a well-known type is set whole, by its JSON string).
fn query_field(input: &MessageDescriptor, name: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut message = input.clone();
    let mut parts = name.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = message
            .get_field_by_json_name(part)
            .or_else(|| message.get_field_by_name(part))?;
        if field.is_map() {
            return None;
        }
        if parts.peek().is_some() {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !is_well_known(&inner) => message = inner,
                _ => return None,
            }
        }
        fields.push(field);
    }
    Some(fields)
}

/// Whether `message` is one of protobuf's well-known types (with a JSON form of its own).
pub(crate) fn is_well_known(message: &MessageDescriptor) -> bool {
    message.package_name() == "google.protobuf"
}

/// Sets the field at `fields` (a path from the top message) from text: each value converted as
/// proto3 JSON reads a string for the field's type (several values for a repeated field).
fn set_from_text(
    message: &mut DynamicMessage,
    fields: &[FieldDescriptor],
    values: &[String],
    what: &str,
) -> Result<(), ApiError> {
    let Some((leaf, parents)) = fields.split_last() else {
        return Err(ApiError::internal(format!("{what}: no field")));
    };
    let mut target = message;
    for field in parents {
        target = target
            .get_field_mut(field)
            .as_message_mut()
            .ok_or_else(|| ApiError::internal(format!("{what}: `{}` is not a message", field.name())))?;
    }
    let kind = leaf.kind();
    let json = if leaf.is_list() {
        serde_json::Value::Array(values.iter().map(|v| text_to_json(&kind, v)).collect())
    } else {
        values.first().map(|v| text_to_json(&kind, v)).unwrap_or_default()
    };
    let mut wrapper = serde_json::Map::new();
    wrapper.insert(leaf.json_name().to_owned(), json);
    let parsed = DynamicMessage::deserialize(target.descriptor(), serde_json::Value::Object(wrapper))
        .map_err(|e| ApiError::invalid(format!("{what}: {e}")))?;
    target.set_field(leaf, parsed.get_field(leaf).into_owned());
    Ok(())
}

/// The JSON value proto3 JSON reads for a field of `kind` given as text: strings for everything
/// that has a string form (numbers, 64-bit integers, bytes, timestamps, durations, …), booleans
/// and enum numbers as such, `Struct`/`ListValue`/`Value` parsed as JSON.
fn text_to_json(kind: &Kind, text: &str) -> serde_json::Value {
    let boolean = || match text {
        "true" | "1" => serde_json::Value::Bool(true),
        "false" | "0" => serde_json::Value::Bool(false),
        _ => serde_json::Value::String(text.to_owned()),
    };
    match kind {
        Kind::Bool => boolean(),
        Kind::Enum(_) => text
            .parse::<i32>()
            .map_or_else(|_| serde_json::Value::String(text.to_owned()), serde_json::Value::from),
        Kind::Message(message) => match message.full_name() {
            "google.protobuf.BoolValue" => boolean(),
            "google.protobuf.Struct" | "google.protobuf.ListValue" | "google.protobuf.Value" => {
                serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
            }
            _ => serde_json::Value::String(text.to_owned()),
        },
        _ => serde_json::Value::String(text.to_owned()),
    }
}

/// `name=value` pairs of a query string (`+` is a space), percent-decoded; empty pairs skipped.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode =
                |s: &str| percent_decode(s, false, true).map_err(|e| ApiError::invalid(format!("query string: {e}")));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// Percent-decodes `raw` as UTF-8. `keep_slash`: `%2F` stays encoded (the segments of a
/// multi-segment path variable); `plus_as_space`: `+` is a space (query strings).
fn percent_decode(raw: &str, keep_slash: bool, plus_as_space: bool) -> Result<String, String> {
    let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| Some(hex(h[0])? << 4 | hex(h[1])?))
                    .ok_or_else(|| format!("invalid percent-encoding in `{raw}`"))?;
                if keep_slash && decoded == b'/' {
                    out.extend_from_slice(&bytes[i..i + 3]);
                } else {
                    out.push(decoded);
                }
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{raw}` is not UTF-8"))
}

/// Request headers that belong to the HTTP exchange, not to the call.
const NOT_FORWARDED: [&str; 14] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "transfer-encoding",
    "expect",
    "content-type",
    "content-length",
    "content-encoding",
    "accept",
    "accept-encoding",
];

/// The gRPC request for `message` (protobuf): the caller's headers (credentials among them) and
/// its address.
fn grpc_request(route: &Route, parts: &http::request::Parts, message: &[u8]) -> Request {
    let mut request = Request::new(Body::from(grpc_frame(message)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = route.grpc_path.parse().unwrap_or_default();
    let forwarded = request.headers_mut();
    for (name, value) in &parts.headers {
        let name_str = name.as_str();
        if !NOT_FORWARDED.contains(&name_str) && !name_str.starts_with("grpc-") {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    forwarded.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(peer) = parts.extensions.get::<Peer>().copied() {
        request.extensions_mut().insert(peer);
    }
    request
}

fn grpc_frame(message: &[u8]) -> Bytes {
    grpc_wire::frame(message)
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// The gRPC status of a response, from its headers (trailers-only) or trailers; a response that
/// is not gRPC at all (no `grpc-status`, HTTP error) is mapped as gRPC clients map it.
fn status_of(http: StatusCode, map: &HeaderMap) -> Option<Status> {
    if let Some(status) = Status::from_header_map(map) {
        return Some(status);
    }
    let code = match http.as_u16() {
        200 => return None,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(Status::new(code, format!("the gRPC side answered HTTP {http}")))
}

/// Splits the complete gRPC messages off the front of `buffer`.
fn take_messages(buffer: &mut BytesMut) -> Result<Vec<Bytes>, ApiError> {
    grpc_wire::take_messages(buffer).map_err(ApiError::internal)
}

/// How responses are written: every field but unset messages, optionals and oneofs; camelCase
/// names; 64-bit integers as strings.
fn json_options() -> SerializeOptions {
    SerializeOptions::new().skip_default_fields(false)
}

/// A response message (protobuf) as JSON: the message, or its `response_body` field.
/// The request field a stream resumes from, set from `Last-Event-ID`.
const RESUME_FIELD: &str = "since_version";

/// The response field (proto3 JSON name) an event's `id:` is taken from.
const EVENT_ID_FIELD: &str = "configVersion";

/// `Last-Event-ID`, when the request has a [`RESUME_FIELD`] the query left unset: resume after it.
fn resume_after_last_event(message: &mut DynamicMessage, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(last) = headers.get("last-event-id") else {
        return Ok(());
    };
    let Some(field) = message.descriptor().get_field_by_name(RESUME_FIELD) else {
        return Ok(());
    };
    if message.has_field(&field) {
        return Ok(());
    }
    let version = last
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|v| *v >= 0)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "Last-Event-ID must be the config version of the last event seen, not `{}`",
                String::from_utf8_lossy(last.as_bytes())
            ))
        })?;
    message.set_field(&field, prost_reflect::Value::I64(version));
    Ok(())
}

fn response_json(route: &Route, message: Bytes) -> Result<Vec<u8>, ApiError> {
    let json = response_value(route, message)?;
    serde_json::to_vec(&json).map_err(|e| ApiError::internal(format!("encoding the response: {e}")))
}

/// One streamed message: its JSON and, if it has an [`EVENT_ID_FIELD`], the event's id.
fn response_event(route: &Route, message: Bytes) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let json = response_value(route, message)?;
    let id = match json.get(EVENT_ID_FIELD) {
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(serde_json::Value::Number(id)) => Some(id.to_string()),
        _ => None,
    };
    let bytes = serde_json::to_vec(&json).map_err(|e| ApiError::internal(format!("encoding the response: {e}")))?;
    Ok((bytes, id))
}

fn response_value(route: &Route, message: Bytes) -> Result<serde_json::Value, ApiError> {
    let internal = |e: String| ApiError::internal(format!("encoding the response: {e}"));
    let decoded = DynamicMessage::decode(route.rpc.output(), message).map_err(|e| internal(e.to_string()))?;
    let json = decoded
        .serialize_with_options(serde_json::value::Serializer, &json_options())
        .map_err(|e| internal(e.to_string()))?;
    Ok(match &route.response_body {
        Some(field) => json.get(field.json_name()).cloned().unwrap_or_default(),
        None => json,
    })
}

/// Response headers that are gRPC's or the HTTP exchange's, not the call's metadata.
fn is_metadata(name: &header::HeaderName) -> bool {
    let name = name.as_str();
    !(name.starts_with("grpc-")
        || name.starts_with("access-control-")
        || matches!(
            name,
            "content-type"
                | "content-length"
                | "content-encoding"
                | "transfer-encoding"
                | "trailer"
                | "te"
                | "connection"
                | "vary"
        ))
}

fn copy_metadata(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from.iter().filter(|(name, _)| is_metadata(name)) {
        to.append(name.clone(), value.clone());
    }
}

async fn unary_reply(route: &Route, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    if let Some(status) = status_of(parts.status, &parts.headers).filter(|s| s.code() != Code::Ok) {
        return ApiError::status(&status).into_response();
    }
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    if let Some(status) = Status::from_header_map(&trailers).filter(|s| s.code() != Code::Ok) {
        return ApiError::status(&status).into_response();
    }
    let mut buffer = BytesMut::from(collected.to_bytes().as_ref());
    let json = take_messages(&mut buffer).and_then(|messages| {
        let message = messages
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("no response message"))?;
        response_json(route, message)
    });
    match json {
        Ok(json) => {
            let mut reply = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                json,
            )
                .into_response();
            copy_metadata(&parts.headers, reply.headers_mut());
            reply
        }
        Err(e) => e.into_response(),
    }
}

/// How a server stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamFormat {
    /// Server-Sent Events (the default).
    Sse,
    /// Newline-delimited JSON (`Accept: application/x-ndjson`).
    NdJson,
}

impl StreamFormat {
    fn of(headers: &HeaderMap) -> StreamFormat {
        let ndjson = headers.get_all(header::ACCEPT).iter().any(|accept| {
            accept.to_str().unwrap_or_default().split(',').any(|media| {
                let media = media.split(';').next().unwrap_or_default().trim();
                media.eq_ignore_ascii_case("application/x-ndjson") || media.eq_ignore_ascii_case("application/jsonl")
            })
        });
        if ndjson {
            StreamFormat::NdJson
        } else {
            StreamFormat::Sse
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            StreamFormat::Sse => "text/event-stream",
            StreamFormat::NdJson => "application/x-ndjson",
        }
    }

    fn message(self, json: &[u8], id: Option<&str>) -> Bytes {
        match self {
            StreamFormat::Sse => {
                let id = id.map(|id| format!("id: {id}\n")).unwrap_or_default();
                [id.as_bytes(), b"data: ", json, b"\n\n"].concat().into()
            }
            StreamFormat::NdJson => [json, b"\n"].concat().into(),
        }
    }

    fn error(self, error: &ApiError) -> Bytes {
        match self {
            StreamFormat::Sse => format!("event: error\ndata: {}\n\n", error.json()).into(),
            StreamFormat::NdJson => format!("{}\n", json!({ "error": error.json() })).into(),
        }
    }

    /// What keeps a silent stream alive, if anything.
    fn heartbeat(self) -> Option<Bytes> {
        match self {
            StreamFormat::Sse => Some(Bytes::from_static(b": keep-alive\n\n")),
            StreamFormat::NdJson => None,
        }
    }
}

/// The gRPC response stream as events, each written as its message arrives.
fn stream_reply(route: &Route, format: StreamFormat, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    if let Some(status) = status_of(parts.status, &parts.headers).filter(|s| s.code() != Code::Ok) {
        return ApiError::status(&status).into_response();
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
    let route = route.clone();
    let events = futures::stream::unfold(state, move |mut s| {
        let route = route.clone();
        async move {
            if s.done {
                return None;
            }
            loop {
                let next = match format.heartbeat() {
                    Some(heartbeat) => match tokio::time::timeout(HEARTBEAT, s.frames.next()).await {
                        Ok(next) => next,
                        Err(_silent) => return Some((futures::stream::iter(vec![heartbeat]), s)),
                    },
                    None => s.frames.next().await,
                };
                let out = match next {
                    Some(Ok(frame)) if frame.is_data() => {
                        s.buffer.extend_from_slice(&frame.into_data().unwrap_or_default());
                        let events: Result<Vec<Bytes>, ApiError> = take_messages(&mut s.buffer).and_then(|messages| {
                            messages
                                .into_iter()
                                .map(|m| {
                                    response_event(&route, m).map(|(json, id)| format.message(&json, id.as_deref()))
                                })
                                .collect()
                        });
                        match events {
                            Ok(events) if events.is_empty() => continue,
                            Ok(events) => events,
                            Err(e) => {
                                s.done = true;
                                vec![format.error(&e)]
                            }
                        }
                    }
                    Some(Ok(frame)) => {
                        s.done = true;
                        let trailers = frame.into_trailers().unwrap_or_default();
                        match Status::from_header_map(&trailers).filter(|s| s.code() != Code::Ok) {
                            Some(status) => vec![format.error(&ApiError::status(&status))],
                            None => continue,
                        }
                    }
                    Some(Err(e)) => {
                        s.done = true;
                        vec![format.error(&ApiError::internal(e.to_string()))]
                    }
                    None => return None,
                };
                return Some((futures::stream::iter(out), s));
            }
        }
    })
    .flatten();
    let mut reply = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(format.content_type())),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(events.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response();
    copy_metadata(&parts.headers, reply.headers_mut());
    reply
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use hyper::body::Frame;
    use vexil_proto::vexil::v1 as api;

    use super::*;

    fn table() -> &'static RouteTable {
        routes().expect("the route table builds")
    }

    fn found(method: Method, path: &str) -> (&'static str, Vec<String>) {
        match table().find(&method, path) {
            Lookup::Found(route, captures) => (route.rpc.name(), captures),
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    fn route_of(name: &str) -> &'static Route {
        table()
            .routes()
            .iter()
            .find(|r| r.rpc.name() == name && r.binding == 0)
            .unwrap_or_else(|| panic!("no route for {name}"))
    }

    /// A route for `rpc` from an HTTP rule written here (`(field, value)` pairs of `HttpRule`).
    fn custom_route(service: &str, rpc: &str, rule: &[(&str, &str)]) -> Route {
        let pool = pool().unwrap();
        let mut message = DynamicMessage::new(pool.get_message_by_name("google.api.HttpRule").unwrap());
        for (field, value) in rule {
            message.set_field_by_name(field, prost_reflect::Value::String((*value).to_owned()));
        }
        let rpc = pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == rpc))
            .unwrap();
        Route::new(&rpc, &message, 0).unwrap()
    }

    fn error_message(result: Result<DynamicMessage, ApiError>) -> String {
        let e = result.expect_err("an error");
        assert_eq!(e.http, StatusCode::BAD_REQUEST, "{e:?}");
        assert_eq!(e.code, Code::InvalidArgument, "{e:?}");
        e.message
    }

    #[test]
    fn templates_parse_literals_variables_wildcards_and_verbs() {
        let t = Template::parse("/v1/environments/{environment}/flag-sets/{flag_set}:import").unwrap();
        assert_eq!(t.verb.as_deref(), Some("import"));
        assert_eq!(t.segments.len(), 5);
        let names: Vec<&str> = t.variables().iter().map(|v| v.field_path.as_str()).collect();
        assert_eq!(names, ["environment", "flag_set"]);
        assert_eq!(
            t.openapi_path(),
            "/v1/environments/{environment}/flag-sets/{flag_set}:import"
        );

        let t = Template::parse("/v1/{name=projects/*/things/**}:get").unwrap();
        assert_eq!(
            t.segments,
            [
                Segment::Literal("v1".into()),
                Segment::Literal("projects".into()),
                Segment::Any,
                Segment::Literal("things".into()),
                Segment::Rest
            ]
        );
        assert_eq!((t.variables[0].start, t.variables[0].end), (1, 5));
        assert_eq!(t.openapi_path(), "/v1/{name}:get");
        assert!(!t.single_segment(&t.variables[0]));

        let t = Template::parse("/v1/*/x/{a.b}").unwrap();
        assert_eq!(t.variables[0].field_path, "a.b");
        assert!(t.single_segment(&t.variables[0]));
        assert!(t.verb.is_none());

        for bad in [
            "v1/x",
            "/v1/**/x",
            "/v1/{x",
            "/v1/{x}y",
            "/v1/",
            "/v1//x",
            "/v1/{1x}",
            "/v1/{x}/{x}",
            "/v1/x:",
            "/v1/{x={y}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn templates_match_raw_paths_and_rank_literals_over_variables_over_rest() {
        let t = Template::parse("/v1/flags/{key}").unwrap();
        assert_eq!(t.matches("/v1/flags/a%2Fb").unwrap(), ["a%2Fb"]);
        assert_eq!(t.matches("/v1/flags/a:validate").unwrap(), ["a:validate"]);
        assert!(t.matches("/v1/flags").is_none());
        assert!(t.matches("/v1/flags/").is_none());
        assert!(t.matches("/v1/flags/a/b").is_none());
        assert!(t.matches("v1/flags/a").is_none());

        let verb = Template::parse("/v1/flags/{key}:validate").unwrap();
        assert_eq!(verb.matches("/v1/flags/a:b:validate").unwrap(), ["a:b"]);
        assert!(verb.matches("/v1/flags/a").is_none());
        assert!(verb.matches("/v1/flags/:validate").is_none());
        assert!(verb.matches("/v1/flags/a%3Avalidate").is_none());
        assert!(verb.rank() > t.rank(), "a verb beats none");

        let rest = Template::parse("/v1/{path=**}").unwrap();
        assert_eq!(rest.matches("/v1/a/b/c").unwrap(), ["a/b/c"]);
        assert_eq!(rest.matches("/v1").unwrap(), [""]);
        let literal = Template::parse("/v1/flags/special").unwrap();
        let any = Template::parse("/v1/*/special").unwrap();
        assert!(literal.rank() > t.rank());
        assert!(t.rank() > any.rank());
        assert!(any.rank() > rest.rank());
    }

    #[test]
    fn every_vexil_method_has_a_route() {
        let pool = pool().unwrap();
        let methods: Vec<String> = pool
            .services()
            .filter(|s| s.package_name() == PACKAGE)
            .flat_map(|s| s.methods().map(|m| m.full_name().to_owned()).collect::<Vec<_>>())
            .collect();
        assert!(methods.len() >= 31, "{methods:?}");
        for method in &methods {
            assert!(
                table().routes().iter().any(|r| r.rpc.full_name() == method),
                "no route for {method}"
            );
        }
        assert_eq!(
            table().routes().len(),
            methods.len(),
            "one rule each, no additional bindings"
        );
        let watch = route_of("Watch");
        assert!(watch.rpc.is_server_streaming());
        assert_eq!(watch.grpc_path, "/vexil.v1.ConfigService/Watch");
        assert!(matches!(route_of("PutFlag").body, BodyRule::Whole));
        assert!(matches!(route_of("GetFlag").body, BodyRule::None));
    }

    #[test]
    fn the_most_specific_route_wins_and_known_paths_answer_405() {
        let flags = "/v1/environments/prod/flag-sets/checkout/flags";
        assert_eq!(
            found(Method::GET, &format!("{flags}/new-banner")),
            ("GetFlag", vec!["prod".into(), "checkout".into(), "new-banner".into()])
        );
        assert_eq!(
            found(Method::POST, &format!("{flags}/new-banner:validate")).0,
            "ValidateFlag"
        );
        assert_eq!(found(Method::PUT, &format!("{flags}/new-banner")).0, "PutFlag");
        // The verb route is the path's best: GET there is not GetFlag of `new-banner:validate`.
        match table().find(&Method::GET, &format!("{flags}/new-banner:validate")) {
            Lookup::MethodNotAllowed(allowed) => assert_eq!(allowed, [Method::POST]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            found(Method::GET, &format!("{flags}/new-banner%3Avalidate")).1[2],
            "new-banner%3Avalidate"
        );
        assert_eq!(found(Method::POST, "/v1/evaluate").0, "Evaluate");
        assert_eq!(found(Method::POST, "/v1/evaluate:batch").0, "EvaluateBatch");
        assert_eq!(found(Method::GET, "/v1/environments/prod/config").0, "GetSnapshot");
        assert_eq!(found(Method::GET, "/v1/environments/prod/config:watch").0, "Watch");
        assert_eq!(
            found(Method::GET, "/v1/environments/prod/versions:diff").0,
            "DiffVersions"
        );
        assert_eq!(found(Method::GET, "/v1/environments/prod/versions").0, "ListVersions");
        assert_eq!(
            found(Method::POST, "/v1/environments/prod/versions/3:rollback").0,
            "Rollback"
        );
        assert_eq!(found(Method::POST, "/v1/api-keys/42:revoke").1, ["42"]);
        match table().find(&Method::DELETE, "/v1/environments") {
            Lookup::MethodNotAllowed(allowed) => assert_eq!(allowed, [Method::GET, Method::POST]),
            other => panic!("{other:?}"),
        }
        for missing in [
            "/v1/nope",
            "/v1/environments/",
            "/v1/environments//flag-sets",
            "/v1/evaluate:nope",
        ] {
            assert!(
                matches!(table().find(&Method::GET, missing), Lookup::NotFound),
                "{missing}"
            );
        }
    }

    #[test]
    fn path_variables_are_percent_decoded_and_typed() {
        assert_eq!(percent_decode("a%20b%3Ac", false, false).unwrap(), "a b:c");
        assert_eq!(percent_decode("a+b", false, false).unwrap(), "a+b");
        assert_eq!(percent_decode("a+b", false, true).unwrap(), "a b");
        assert_eq!(percent_decode("x%2Fy/z", true, false).unwrap(), "x%2Fy/z");
        assert_eq!(percent_decode("x%2fy", false, false).unwrap(), "x/y");
        assert_eq!(percent_decode("caf%C3%A9", false, false).unwrap(), "café");
        assert!(percent_decode("a%2", false, false).is_err());
        assert!(percent_decode("a%zz", false, false).is_err());
        assert!(percent_decode("%FF", false, false).is_err());

        let route = route_of("RevokeApiKey");
        let message = request_message(route, &["42".into()], None, b"").unwrap();
        assert_eq!(message.get_field_by_name("id").unwrap().as_i64(), Some(42));
        let e = error_message(request_message(route, &["x".into()], None, b""));
        assert!(e.contains("path variable `id`"), "{e}");

        let route = route_of("GetFlag");
        let captures = ["prod".into(), "check%20out".into(), "a%3Avalidate".into()];
        let message = request_message(route, &captures, None, b"").unwrap();
        let request: api::GetFlagRequest = message.transcode_to().unwrap();
        assert_eq!(
            (
                request.environment.as_str(),
                request.flag_set.as_str(),
                request.key.as_str()
            ),
            ("prod", "check out", "a:validate")
        );
    }

    #[test]
    fn query_parameters_set_the_other_fields() {
        let route = route_of("ListAuditEntries");
        let query = "since=2024-01-01T00:00:00Z&page_size=20&entityKind=flag&actor=key%3Aabc+x&pageToken=&";
        let message = request_message(route, &[], Some(query), b"").unwrap();
        let request: api::ListAuditEntriesRequest = message.transcode_to().unwrap();
        assert_eq!(
            request.since.as_ref().map(|t| (t.seconds, t.nanos)),
            Some((1_704_067_200, 0))
        );
        assert_eq!(request.until, None);
        assert_eq!(request.page_size, 20);
        assert_eq!(request.entity_kind, "flag");
        assert_eq!(request.actor, "key:abc x");

        for (query, expected) in [
            ("nope=1", "unknown query parameter `nope`"),
            ("page_size=abc", "query parameter `page_size`"),
            ("page_size=1&pageSize=2", "given more than once (as `page_size`)"),
            ("since=yesterday", "query parameter `since`"),
            ("since.seconds=1", "unknown query parameter `since.seconds`"),
            ("a=%zz", "invalid percent-encoding"),
        ] {
            let e = error_message(request_message(route, &[], Some(query), b""));
            assert!(e.contains(expected), "{query}: {e}");
        }

        // Fields the path sets are not parameters, and a `body: "*"` method has none.
        let route = route_of("GetFlagSet");
        let e = error_message(request_message(
            route,
            &["a".into(), "b".into()],
            Some("environment=x"),
            b"",
        ));
        assert!(e.contains("set by the path"), "{e}");
        let route = route_of("CreateEnvironment");
        let e = error_message(request_message(route, &[], Some("key=x"), b"{}"));
        assert!(e.contains("takes its fields in the request body"), "{e}");

        // Repeated fields by repetition, JSON-valued fields as JSON, enums by name or number.
        let route = custom_route(
            "vexil.v1.EvaluationService",
            "EvaluateBatch",
            &[("get", "/v1/x/{environment}")],
        );
        let query = "flag_keys=a&flagKeys=b&context=%7B%22targetingKey%22%3A%22u1%22%7D&flagSet=s";
        let message = request_message(&route, &["prod".into()], Some(query), b"").unwrap();
        let request: api::EvaluateBatchRequest = message.transcode_to().unwrap();
        assert_eq!(request.flag_keys, ["a", "b"]);
        assert_eq!(request.environment, "prod");
        assert_eq!(request.flag_set, "s");
        assert_eq!(
            request.context.unwrap().to_map()["targetingKey"],
            serde_json::json!("u1")
        );
        let route = custom_route("vexil.v1.EvaluationService", "Evaluate", &[("get", "/v1/x")]);
        for query in ["type=VALUE_TYPE_STRING", "type=2"] {
            let request: api::EvaluateRequest = request_message(&route, &[], Some(query), b"")
                .unwrap()
                .transcode_to()
                .unwrap();
            assert_eq!(request.r#type(), api::ValueType::String, "{query}");
        }
        let e = error_message(request_message(&route, &[], Some("type=VALUE_TYPE_NOPE"), b""));
        assert!(e.contains("query parameter `type`"), "{e}");
    }

    #[test]
    fn bodies_are_strict_proto3_json_and_the_path_wins() {
        let route = route_of("PutFlag");
        let captures = ["prod".into(), "checkout".into(), "banner".into()];
        let body = br#"{"environment": "other", "definition": {"state": "ENABLED"}, "tags": ["a"], "version": "3", "create_only": true}"#;
        let request: api::PutFlagRequest = request_message(route, &captures, None, body)
            .unwrap()
            .transcode_to()
            .unwrap();
        assert_eq!(request.environment, "prod");
        assert_eq!(request.key, "banner");
        assert_eq!(request.tags, ["a"]);
        assert_eq!(request.version, Some(3));
        assert!(request.create_only);
        assert_eq!(
            request.definition.unwrap().to_map()["state"],
            serde_json::json!("ENABLED")
        );

        for (body, expected) in [
            (&br#"{"defnition": {}}"#[..], "unrecognized field name 'defnition'"),
            (br#"{"tags": "a"}"#, "invalid request body"),
            (br#"{"definition": {}"#, "invalid request body"),
            (br#"{} {}"#, "trailing characters"),
            (br#"[]"#, "invalid request body"),
        ] {
            let e = error_message(request_message(route, &captures, None, body));
            assert!(e.contains(expected), "{}: {e}", String::from_utf8_lossy(body));
        }
        // No body rule: no body.
        let e = error_message(request_message(
            route_of("GetEnvironment"),
            &["prod".into()],
            None,
            b"{}",
        ));
        assert!(e.contains("takes no request body"), "{e}");
        assert!(request_message(route_of("GetEnvironment"), &["prod".into()], None, b" \n").is_ok());
        // An empty body is the empty message.
        assert!(request_message(route_of("CreateEnvironment"), &[], None, b"").is_ok());

        // `body: "field"`: the body is the field's value.
        let route = custom_route(
            "vexil.v1.EvaluationService",
            "Evaluate",
            &[("post", "/v1/x/{flag_key}"), ("body", "context")],
        );
        let request: api::EvaluateRequest = request_message(
            &route,
            &["f".into()],
            Some("environment=prod"),
            br#"{"targetingKey": "u1"}"#,
        )
        .unwrap()
        .transcode_to()
        .unwrap();
        assert_eq!(request.flag_key, "f");
        assert_eq!(request.environment, "prod");
        assert_eq!(
            request.context.unwrap().to_map()["targetingKey"],
            serde_json::json!("u1")
        );
        let e = error_message(request_message(&route, &["f".into()], Some("context=%7B%7D"), b"{}"));
        assert!(e.contains("set by the path or the body"), "{e}");
    }

    // --- HTTP, against a dummy gRPC side ---

    /// What the dummy gRPC side received.
    #[derive(Debug)]
    struct Received {
        path: String,
        headers: HeaderMap,
        peer: Option<Peer>,
        body: Bytes,
    }

    type Log = Arc<Mutex<Vec<Received>>>;

    /// A gRPC side answering every call with `reply()`, logging the calls.
    fn dummy(reply: impl Fn() -> Response + Clone + Send + Sync + 'static) -> (Router, Log) {
        let log: Log = Arc::default();
        let seen = log.clone();
        let router = Router::new().fallback(move |request: Request| {
            let (seen, reply) = (seen.clone(), reply.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(Received {
                    path: parts.uri.path().to_owned(),
                    peer: parts.extensions.get::<Peer>().copied(),
                    headers: parts.headers,
                    body,
                });
                reply()
            }
        });
        (router, log)
    }

    fn trailers(status: Status) -> HeaderMap {
        status.into_http::<()>().headers().clone()
    }

    /// A gRPC response: `messages` framed, then `trailers`.
    fn grpc_response(messages: &[Vec<u8>], trailers: HeaderMap) -> Response {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> =
            messages.iter().map(|m| Ok(Frame::data(grpc_frame(m)))).collect();
        frames.push(Ok(Frame::trailers(trailers)));
        let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    }

    fn ok_trailers() -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from_static("0"));
        map
    }

    fn environment() -> Vec<u8> {
        api::Environment {
            key: "prod".into(),
            name: "Production".into(),
            config_version: 7,
            ..Default::default()
        }
        .encode_to_vec()
    }

    async fn call(grpc: Router, request: http::Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
        let response = router(grpc, 64).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    fn json(bytes: &Bytes) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
    }

    #[tokio::test]
    async fn a_unary_call_goes_to_grpc_with_the_callers_credentials_and_address() {
        let (grpc, log) = dummy(|| {
            let mut response = grpc_response(&[environment()], ok_trailers());
            response
                .headers_mut()
                .insert("x-vexil-note", HeaderValue::from_static("n1"));
            response
        });
        let peer = Peer(SocketAddr::from(([127, 0, 0, 1], 4242)));
        let mut request = http::Request::get("/v1/environments/prod")
            .header("authorization", "Bearer vx_secret")
            .header("x-api-key", "vx_other")
            .header("accept-encoding", "gzip")
            .header("grpc-encoding", "gzip")
            .body(Body::empty())
            .unwrap();
        request.extensions_mut().insert(peer);
        let (status, headers, body) = call(grpc, request).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers["x-vexil-note"], "n1");
        let body = json(&body);
        assert_eq!(body["key"], "prod");
        assert_eq!(body["configVersion"], "7");
        assert_eq!(body["version"], "0", "defaults are present: {body}");
        assert_eq!(body["description"], "");
        assert!(body.get("created").is_none(), "unset messages are not: {body}");

        let received = log.lock().unwrap();
        let [received] = received.as_slice() else {
            panic!("{received:?}")
        };
        assert_eq!(received.path, "/vexil.v1.AdminService/GetEnvironment");
        assert_eq!(received.headers[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(received.headers[header::TE], "trailers");
        assert_eq!(received.headers["authorization"], "Bearer vx_secret");
        assert_eq!(received.headers["x-api-key"], "vx_other");
        assert!(received.headers.get("accept-encoding").is_none());
        assert!(received.headers.get("grpc-encoding").is_none());
        assert_eq!(received.peer.map(|p| p.0), Some(peer.0));
        let message = api::GetEnvironmentRequest::decode(&received.body[5..]).unwrap();
        assert_eq!(message.environment, "prod");
        assert_eq!(received.body[0], 0);
        assert_eq!(
            usize::try_from(u32::from_be_bytes(received.body[1..5].try_into().unwrap())).unwrap(),
            received.body.len() - 5
        );
    }

    #[tokio::test]
    async fn grpc_errors_answer_the_error_tables_http_status_with_problems() {
        // Trailers-only: the status in the headers.
        let (grpc, _) = dummy(|| Status::not_found("no environment `prod`").into_http());
        let (status, headers, body) = call(
            grpc,
            http::Request::get("/v1/environments/prod").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            json(&body),
            serde_json::json!({"code": 5, "status": "NOT_FOUND", "message": "no environment `prod`"})
        );

        // In the trailers, with problems in the details.
        let problems =
            serde_json::json!([{"pointer": "/flags/banner/state", "message": "must be ENABLED or DISABLED"}]);
        let details = Bytes::from(serde_json::to_vec(&problems).unwrap());
        let (grpc, _) = dummy(move || {
            let status = Status::with_details(Code::InvalidArgument, "invalid flag", details.clone());
            grpc_response(&[], trailers(status))
        });
        let request = http::Request::put("/v1/environments/prod/flag-sets/s/flags/banner")
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _, body) = call(grpc, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json(&body),
            serde_json::json!({"code": 3, "status": "INVALID_ARGUMENT", "message": "invalid flag", "problems": problems})
        );

        for (code, http) in [
            (Code::Aborted, StatusCode::CONFLICT),
            (Code::AlreadyExists, StatusCode::CONFLICT),
            (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            (Code::PermissionDenied, StatusCode::FORBIDDEN),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let (grpc, _) = dummy(move || Status::new(code, "x").into_http());
            let (status, _, body) = call(
                grpc,
                http::Request::get("/v1/environments").body(Body::empty()).unwrap(),
            )
            .await;
            assert_eq!(status, http, "{code:?}");
            assert_eq!(json(&body)["status"], status_name(code));
        }
    }

    #[tokio::test]
    async fn unknown_paths_are_404_wrong_methods_405_and_bad_requests_never_reach_grpc() {
        let (grpc, log) = dummy(|| grpc_response(&[environment()], ok_trailers()));
        let (status, _, body) = call(
            grpc.clone(),
            http::Request::get("/v1/nope").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["status"], "NOT_FOUND");

        let (status, headers, body) = call(
            grpc.clone(),
            http::Request::delete("/v1/environments").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET, POST");
        assert_eq!(json(&body)["status"], "UNIMPLEMENTED");

        let request = http::Request::post("/v1/environments")
            .body(Body::from("{\"key\": 1"))
            .unwrap();
        let (status, _, body) = call(grpc.clone(), request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            json(&body)["message"]
                .as_str()
                .unwrap()
                .contains("invalid request body"),
            "{body:?}"
        );

        let request = http::Request::post("/v1/environments")
            .header("content-type", "text/plain")
            .body(Body::from("key=x"))
            .unwrap();
        assert_eq!(call(grpc.clone(), request).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        let request = http::Request::post("/v1/environments")
            .body(Body::from(vec![b' '; 65]))
            .unwrap();
        let (status, _, body) = call(grpc.clone(), request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json(&body)["status"], "RESOURCE_EXHAUSTED");

        assert!(log.lock().unwrap().is_empty());

        let request = http::Request::post("/v1/environments")
            .header("content-type", "application/json; charset=utf-8")
            .body(Body::from(r#"{"key": "prod"}"#))
            .unwrap();
        assert_eq!(call(grpc, request).await.0, StatusCode::OK);
        let received = log.lock().unwrap();
        let message = api::CreateEnvironmentRequest::decode(&received[0].body[5..]).unwrap();
        assert_eq!(message.key, "prod");
    }

    fn snapshot(version: i64) -> Vec<u8> {
        let snapshot = api::ConfigSnapshot {
            environment: "prod".into(),
            config_version: version,
            flag_sets: Vec::new(),
        };
        api::ConfigEvent {
            environment: "prod".into(),
            config_version: version,
            event: Some(api::config_event::Event::Snapshot(snapshot)),
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn server_streams_are_server_sent_events_or_ndjson() {
        let failed = || {
            grpc_response(
                &[snapshot(1), snapshot(2)],
                trailers(Status::unavailable("the store is down")),
            )
        };
        let (grpc, log) = dummy(failed);
        let request = http::Request::get("/v1/environments/prod/config:watch?flagSet=checkout&sinceVersion=7")
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = call(grpc.clone(), request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        let error = r#"{"code":14,"message":"the store is down","status":"UNAVAILABLE"}"#;
        let event = |v: u32| {
            format!(
                r#"{{"configVersion":"{v}","environment":"prod","snapshot":{{"configVersion":"{v}","environment":"prod","flagSets":[]}}}}"#
            )
        };
        let (first, second) = (event(1), event(2));
        // Each event's id is its config version (what Last-Event-ID gives back on a reconnect).
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("id: 1\ndata: {first}\n\nid: 2\ndata: {second}\n\nevent: error\ndata: {error}\n\n")
        );
        let message = api::WatchRequest::decode(&log.lock().unwrap()[0].body[5..]).unwrap();
        assert_eq!(
            (
                message.environment.as_str(),
                message.flag_set.as_str(),
                message.since_version
            ),
            ("prod", "checkout", 7)
        );
        // A reconnecting EventSource resumes after its Last-Event-ID; the query wins over it; a
        // Last-Event-ID that is not a version is refused.
        for (query, last, since) in [("", "2", 2), ("?sinceVersion=5", "2", 5)] {
            let request = http::Request::get(format!("/v1/environments/prod/config:watch{query}"))
                .header("last-event-id", last)
                .body(Body::empty())
                .unwrap();
            assert_eq!(call(grpc.clone(), request).await.0, StatusCode::OK);
            let sent = log.lock().unwrap().last().unwrap().body.clone();
            assert_eq!(
                api::WatchRequest::decode(&sent[5..]).unwrap().since_version,
                since,
                "{query}"
            );
        }
        let calls = log.lock().unwrap().len();
        for bad in ["yesterday", "-1"] {
            let request = http::Request::get("/v1/environments/prod/config:watch")
                .header("last-event-id", bad)
                .body(Body::empty())
                .unwrap();
            let (status, _, body) = call(grpc.clone(), request).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(json(&body)["message"].as_str().unwrap().contains("Last-Event-ID"));
        }
        assert_eq!(log.lock().unwrap().len(), calls, "refused before the call");

        let request = http::Request::get("/v1/environments/prod/config:watch")
            .header("accept", "application/json, application/x-ndjson;q=0.9")
            .body(Body::empty())
            .unwrap();
        let (_, headers, body) = call(grpc, request).await;
        assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("{first}\n{second}\n{{\"error\":{error}}}\n")
        );

        // A clean end is just the end; a call refused before its stream is a plain error.
        let (grpc, _) = dummy(|| grpc_response(&[snapshot(3)], ok_trailers()));
        let request = http::Request::get("/v1/environments/prod/config:watch")
            .body(Body::empty())
            .unwrap();
        let (_, _, body) = call(grpc, request).await;
        assert_eq!(String::from_utf8_lossy(&body), format!("id: 3\ndata: {}\n\n", event(3)));
        let (grpc, _) = dummy(|| Status::permission_denied("not yours").into_http());
        let request = http::Request::get("/v1/environments/prod/config:watch")
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = call(grpc, request).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(json(&body)["status"], "PERMISSION_DENIED");
    }

    #[tokio::test(start_paused = true)]
    async fn stream_events_are_written_as_they_arrive_with_heartbeats_in_between() {
        let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
        let receiver = Arc::new(Mutex::new(Some(receiver)));
        let (grpc, _) = dummy(move || {
            let frames = receiver.lock().unwrap().take().expect("one call");
            let mut response = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response
        });
        let request = http::Request::get("/v1/environments/prod/config:watch")
            .body(Body::empty())
            .unwrap();
        let response = router(grpc, 64).oneshot(request).await.unwrap();
        let mut body = response.into_body();
        sender
            .unbounded_send(Ok(Frame::data(grpc_frame(&snapshot(1)))))
            .unwrap();
        let event = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(event.starts_with(b"id: 1\ndata: {\"configVersion\":\"1\""), "{event:?}");
        // Silence: a keep-alive comment after HEARTBEAT (paused time advances by itself).
        let started = tokio::time::Instant::now();
        let event = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(event, Bytes::from_static(b": keep-alive\n\n"));
        assert_eq!(started.elapsed(), HEARTBEAT);
        sender
            .unbounded_send(Ok(Frame::data(grpc_frame(&snapshot(2)))))
            .unwrap();
        let event = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(event.starts_with(b"id: 2\ndata: {\"configVersion\":\"2\""), "{event:?}");
        sender.unbounded_send(Ok(Frame::trailers(ok_trailers()))).unwrap();
        drop(sender);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_openapi_document_is_served() {
        let (grpc, log) = dummy(|| grpc_response(&[], ok_trailers()));
        let (status, headers, body) = call(
            grpc,
            http::Request::get("/v1/openapi.json").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(&json(&body), crate::openapi::document());
        assert!(log.lock().unwrap().is_empty());
    }
}
