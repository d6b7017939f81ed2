//! Fuzzing entry points: one function per parser that takes outside input, each running the very
//! code the server runs on that input. Driven by the coverage-guided targets in `fuzz/` (see
//! `tools/fuzz`) and by the `fuzz_smoke` test. Not part of the public API.
//!
//! Every function takes arbitrary bytes, must not panic, and checks the contract of its parser:
//! a rejection is a non-empty error message.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use clap::{CommandFactory, FromArgMatches, Parser as _};
use futures::{FutureExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::BodyExt as _;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tower::ServiceExt as _;
use vexil_core::parse::{self, Format, Strictness};
use vexil_core::{Context, Engine, FractionalMode, Selector, Snapshot, SourceConfig, ValueType};
use vexil_proto::flagd::evaluation::v1::service_server::Service as _;
use vexil_proto::flagd::evaluation::v2::service_server::Service as _;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::flagd::sync::v1 as sync;
use vexil_proto::flagd::sync::v1::flag_sync_service_server::FlagSyncService as _;
use vexil_proto::schema::v1 as schema_v1;
use vexil_proto::schema::v1::service_server::Service as _;
use vexil_service::{Live, LiveConfig, SourceSpec, StaticContext};

use crate::app::{App, AppConfig};
use crate::config::{Cli, Command};
use crate::flagd::evaluation::{EvaluationV1, EvaluationV2, SchemaV1};

/// The evaluation time every target uses (`$flagd.timestamp`).
const NOW: i64 = 1_750_000_000;

/// Largest request body the server-backed targets accept (the server's `-B`).
const MAX_BODY: usize = 1 << 20;

/// A flag document with every kind of targeting flagd has: `fractional` (with and without a
/// bucketing expression), `sem_ver`, `starts_with`/`ends_with`, `in`, `var`, `if`, `$ref` (nested),
/// `$flagd.flagKey`/`$flagd.timestamp`, `targetingKey`, set and flag metadata, every value type,
/// a disabled flag, a flag without default variant and a rule that does not compile.
pub const RICH_FLAGS: &str = r##"{
  "$schema": "https://flagd.dev/schema/v0/flags.json",
  "metadata": { "flagSetId": "fuzz", "version": 3, "nothing": null },
  "$evaluators": {
    "is_staff": { "ends_with": [{ "var": "email" }, "@example.com"] },
    "is_beta": { "or": [{ "$ref": "is_staff" }, { "in": [{ "var": "tier" }, ["beta", "alpha"]] }] }
  },
  "flags": {
    "bool-flag": {
      "state": "ENABLED", "variants": { "on": true, "off": false }, "defaultVariant": "off",
      "targeting": { "if": [{ "$ref": "is_beta" }, "on", { "fractional": [["on", 20], ["off", 80]] }] },
      "metadata": { "owner": "team", "weight": 1.5 }
    },
    "string-flag": {
      "state": "ENABLED",
      "variants": { "a": "alpha", "b": "beta", "c": "gamma" },
      "defaultVariant": "a",
      "targeting": {
        "if": [
          { "starts_with": [{ "var": "name" }, "Dr."] }, "b",
          { "in": [{ "var": "country" }, ["DE", "FR", "NL"]] }, "c",
          { "in": ["x", { "var": "tags" }] }, "b",
          null
        ]
      }
    },
    "int-flag": {
      "state": "ENABLED", "variants": { "small": 10, "large": 5000000000 }, "defaultVariant": "small",
      "targeting": { "if": [{ "sem_ver": [{ "var": "version" }, ">=", "2.4.0"] }, "large", "small"] }
    },
    "semver-flag": {
      "state": "ENABLED", "variants": { "major": 1, "minor": 2, "none": 0 }, "defaultVariant": "none",
      "targeting": {
        "if": [
          { "sem_ver": [{ "var": "version" }, "^", "1.0.0"] }, "major",
          { "sem_ver": [{ "var": "version" }, "~", { "var": "base" }] }, "minor",
          { "sem_ver": ["1.2.3", "=", { "var": "version" }] }, "minor"
        ]
      }
    },
    "float-flag": {
      "state": "ENABLED", "variants": { "low": 0.25, "high": 1e300 }, "defaultVariant": "low",
      "targeting": { "if": [{ ">": [{ "var": "score" }, { "*": [{ "var": "factor" }, 2] }] }, "high", "low"] }
    },
    "object-flag": {
      "state": "ENABLED",
      "variants": { "x": { "color": "red", "list": [1, 2, { "deep": null }] }, "y": {} },
      "defaultVariant": "y",
      "targeting": {
        "fractional": [
          { "cat": [{ "var": "$flagd.flagKey" }, { "var": "user.id" }] },
          ["x", 50], ["y", 50]
        ]
      }
    },
    "fractional-targeting-key": {
      "state": "ENABLED", "variants": { "h": "heads", "t": "tails" }, "defaultVariant": "h",
      "targeting": { "fractional": [["h"], ["t", 3]] }
    },
    "timestamp-flag": {
      "state": "ENABLED", "variants": { "past": "past", "future": "future" }, "defaultVariant": "past",
      "targeting": {
        "if": [{ ">": [{ "var": "$flagd.timestamp" }, { "var": "cutoff" }] }, "future", "past"]
      }
    },
    "key-flag": {
      "state": "ENABLED", "variants": { "mine": "mine", "other": "other" }, "defaultVariant": "other",
      "targeting": {
        "if": [
          { "==": [{ "var": "targetingKey" }, { "var": "$flagd.flagKey" }] }, "mine",
          { "ends_with": [{ "var": "targetingKey" }, { "var": "suffix" }] }, { "var": "pick" }
        ]
      }
    },
    "array-ops-flag": {
      "state": "ENABLED", "variants": { "some": true, "none": false }, "defaultVariant": "none",
      "targeting": {
        "if": [
          { "some": [{ "var": "items" }, { ">=": [{ "var": "" }, 3] }] }, "some",
          { "all": [{ "map": [{ "var": "items" }, { "+": [{ "var": "" }, 1] }] }, { "<": [{ "var": "" }, 0] }] }, "some",
          { "substr": [{ "var": "name" }, 1, 2] }, "none"
        ]
      }
    },
    "no-default": {
      "state": "ENABLED", "variants": { "on": true }, "defaultVariant": null,
      "targeting": { "if": [{ "var": "enabled" }, "on"] }
    },
    "disabled-flag": {
      "state": "DISABLED", "variants": { "on": true, "off": false }, "defaultVariant": "on"
    },
    "broken-rule": {
      "state": "ENABLED", "variants": { "on": true, "off": false }, "defaultVariant": "off",
      "targeting": { "no-such-operator": [1, 2] }
    },
    "missing-ref": {
      "state": "ENABLED", "variants": { "on": true, "off": false }, "defaultVariant": "off",
      "targeting": { "if": [{ "$ref": "nope" }, "on", "off"] }
    }
  }
}"##;

/// The evaluation context the flag-document targets evaluate every flag with.
fn fixed_context() -> &'static Map<String, Value> {
    static CONTEXT: OnceLock<Map<String, Value>> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let value = json!({
            "targetingKey": "user-1",
            "email": "ann@example.com",
            "tier": "beta",
            "country": "DE",
            "name": "Dr. Who",
            "version": "2.5.1",
            "base": "2.5.0",
            "score": 3.5,
            "factor": 1,
            "user": { "id": 42, "name": "ann" },
            "tags": ["x", "y"],
            "items": [1, 2, 3],
            "cutoff": 0,
            "enabled": true,
            "color": "red"
        });
        match value {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    })
}

/// One engine per `fractional` generation (building one is not free).
fn engine(mode: FractionalMode) -> Arc<Engine> {
    static ENGINES: OnceLock<[Arc<Engine>; 3]> = OnceLock::new();
    let engines = ENGINES.get_or_init(|| {
        [
            Arc::new(Engine::new(FractionalMode::V1)),
            Arc::new(Engine::new(FractionalMode::V2)),
            Arc::new(Engine::new(FractionalMode::V3)),
        ]
    });
    match mode {
        FractionalMode::V1 => engines[0].clone(),
        FractionalMode::V2 => engines[1].clone(),
        _ => engines[2].clone(),
    }
}

fn mode_for(data: &[u8]) -> FractionalMode {
    match data.len() % 3 {
        0 => FractionalMode::V1,
        1 => FractionalMode::V2,
        _ => FractionalMode::V3,
    }
}

const TYPES: [ValueType; 6] = [
    ValueType::Boolean,
    ValueType::String,
    ValueType::Integer,
    ValueType::Float,
    ValueType::Object,
    ValueType::Any,
];

/// Compiles a parsed document (as a source of the server would) and evaluates every flag as every
/// type, singly and in bulk, through every selector that can see it; then the sync payload.
fn compile_and_evaluate(config: vexil_core::FlagConfig, mode: FractionalMode, context: &Map<String, Value>) {
    let (snapshot, warnings) = Snapshot::build(
        engine(mode),
        vec![SourceConfig {
            name: "fuzz.json".into(),
            config,
        }],
    );
    for w in &warnings {
        assert!(!w.message.is_empty(), "empty warning: {w:?}");
    }
    evaluate_everything(&snapshot, context);
}

fn evaluate_everything(snapshot: &Snapshot, context: &Map<String, Value>) {
    let ctx = Context {
        attributes: context,
        now: NOW,
    };
    let keys: Vec<String> = snapshot.flags(&Selector::All).map(|f| f.key().to_owned()).collect();
    for key in &keys {
        for ty in TYPES {
            let r = snapshot.evaluate(key, &Selector::All, ctx, ty);
            if let Some(err) = &r.error {
                assert!(!err.message.is_empty(), "empty evaluation error for {key}: {r:?}");
            }
        }
    }
    let selectors = [
        Selector::All,
        Selector::Source("fuzz.json".into()),
        Selector::FlagSet(None),
        Selector::FlagSet(Some("fuzz".into())),
    ];
    for selector in &selectors {
        snapshot.evaluate_all(selector, ctx, |flag, r| {
            if let Some(err) = &r.error {
                assert!(!err.message.is_empty(), "empty evaluation error: {r:?}");
            }
            // One flag given only the context keys its rule reads answers as with the whole context.
            let one = snapshot.evaluate(flag.key(), selector, ctx, ValueType::Any);
            assert_eq!(
                (one.reason, one.variant, one.value, &one.error),
                (r.reason, r.variant, r.value, &r.error),
                "{}",
                flag.key()
            );
        });
        let payload = vexil_service::flag_configuration(snapshot, selector);
        assert!(
            serde_json::from_str::<Value>(&payload).is_ok(),
            "sync payload is not JSON"
        );
    }
}

fn flag_document(data: &[u8], format: Format) {
    // The server reads sources with `read_to_string`: invalid UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let strictness = if data.len().is_multiple_of(2) {
        Strictness::Flagd
    } else {
        Strictness::Strict
    };
    match parse::parse_str(text, format, strictness) {
        Ok(parsed) => {
            for w in &parsed.warnings {
                assert!(!w.message.is_empty(), "empty warning: {w:?}");
            }
            // A rule is kept as text and parsed back to compile and to sync it: it must parse.
            for flag in &parsed.config.flags {
                if let Some(rule) = &flag.targeting
                    && let Err(e) = serde_json::from_str::<Value>(rule.as_str())
                {
                    panic!("flag `{}`: the rule kept does not parse back: {e}", flag.key);
                }
            }
            compile_and_evaluate(parsed.config, mode_for(data), fixed_context());
        }
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "a rejection without diagnostics");
            assert!(e.diagnostics.iter().all(|d| !d.message.is_empty()), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}

/// A flag document in JSON: parse (schema check, `$ref` inlining), compile, evaluate every flag.
pub fn flag_document_json(data: &[u8]) {
    flag_document(data, Format::Json);
}

/// A flag document in YAML: parse (schema check, `$ref` inlining), compile, evaluate every flag.
pub fn flag_document_yaml(data: &[u8]) {
    flag_document(data, Format::Yaml);
}

fn rich_snapshot(mode: FractionalMode) -> &'static Snapshot {
    static SNAPSHOTS: OnceLock<Vec<Snapshot>> = OnceLock::new();
    let all = SNAPSHOTS.get_or_init(|| {
        [FractionalMode::V1, FractionalMode::V2, FractionalMode::V3]
            .into_iter()
            .map(|mode| {
                let parsed = match parse::parse_str(RICH_FLAGS, Format::Json, Strictness::Flagd) {
                    Ok(p) => p,
                    Err(e) => panic!("the fixed fuzzing document does not parse: {e}"),
                };
                Snapshot::build(
                    engine(mode),
                    vec![SourceConfig {
                        name: "fuzz.json".into(),
                        config: parsed.config,
                    }],
                )
                .0
            })
            .collect()
    });
    match mode {
        FractionalMode::V1 => &all[0],
        FractionalMode::V2 => &all[1],
        _ => &all[2],
    }
}

/// An evaluation context (JSON, as OFREP and Connect JSON bodies carry it) evaluated against a
/// fixed document with rich targeting, flag by flag and in bulk.
pub fn evaluation_context(data: &[u8]) {
    let context = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(m)) => m,
        // A non-object is what OFREP ignores; still evaluate it as a context value under a key.
        Ok(other) => {
            let mut m = Map::new();
            m.insert("targetingKey".into(), other.clone());
            m.insert("user".into(), other);
            m
        }
        Err(_) => return,
    };
    evaluate_everything(rich_snapshot(mode_for(data)), &context);
}

/// The server state the request targets run against: the rich document as a file source, `-X`
/// and `-H` context.
struct Server {
    app: App,
    ofrep: axum::Router,
    /// The evaluation port's router (gRPC, gRPC-web and Connect).
    evaluation: axum::Router,
    runtime: tokio::runtime::Runtime,
    _stop: watch::Sender<bool>,
}

thread_local! {
    static SERVER: RefCell<Option<Server>> = const { RefCell::new(None) };
}

fn with_server<R>(f: impl FnOnce(&Server) -> R) -> R {
    SERVER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let server = slot.get_or_insert_with(start_server);
        f(server)
    })
}

fn start_server() -> Server {
    static FILE: OnceLock<String> = OnceLock::new();
    let path = FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vexil-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("flags.json");
        if let Err(e) = std::fs::write(&path, RICH_FLAGS) {
            panic!("writing {}: {e}", path.display());
        }
        path.display().to_string()
    });
    let sources = match SourceSpec::parse(&format!("file:{path}")) {
        Ok(s) => vec![s],
        Err(e) => panic!("{e}"),
    };
    let live = Live::load(&LiveConfig {
        sources,
        fractional: FractionalMode::V3,
        poll_interval: Duration::from_secs(3600),
        stale_after: None,
    });
    assert!(live.snapshot().len() > 10, "the fixed fuzzing document did not load");
    let mut values = Map::new();
    values.insert("env".into(), json!("fuzz"));
    let (stop, shutdown) = watch::channel(false);
    let app = App::new(AppConfig {
        live,
        statics: StaticContext {
            values,
            from_headers: vec![("x-user".into(), "email".into())],
        },
        stream_deadline: None,
        disable_sync_metadata: false,
        max_body: MAX_BODY,
        max_streams: 64,
        shutdown,
        exposures: std::sync::Arc::new(vexil_service::NoExposures),
    });
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => panic!("building the runtime: {e}"),
    };
    let evaluation = {
        // The health service spawns a task: build the router inside the runtime.
        let _entered = runtime.enter();
        match crate::grpc_routes(&app, None, MAX_BODY, tokio::sync::watch::channel(false).1) {
            Ok(routes) => crate::evaluation_router(routes.into_axum_router(), MAX_BODY),
            Err(e) => panic!("building the evaluation router: {e}"),
        }
    };
    Server {
        ofrep: crate::ofrep::router(app.clone()),
        evaluation,
        app,
        runtime,
        _stop: stop,
    }
}

/// Flag keys the request targets address (the last ones do not exist).
const KEYS: &[&str] = &[
    "bool-flag",
    "string-flag",
    "int-flag",
    "semver-flag",
    "float-flag",
    "object-flag",
    "fractional-targeting-key",
    "timestamp-flag",
    "key-flag",
    "array-ops-flag",
    "no-default",
    "disabled-flag",
    "broken-rule",
    "missing-ref",
    "unknown-flag",
    "%E2%9C%93%00",
];

/// Splits the fuzz input into a control byte, an optional header value (up to the first `\n`
/// when the control byte asks for one) and the body.
fn split_request(data: &[u8]) -> (u8, u8, Option<&[u8]>, &[u8]) {
    let (control, choice, rest) = match data {
        [c, k, rest @ ..] => (*c, *k, rest),
        [c] => (*c, 0, &[][..]),
        [] => (0, 0, &[][..]),
    };
    if control & 0x80 == 0 {
        return (control, choice, None, rest);
    }
    match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (control, choice, Some(&rest[..at]), &rest[at + 1..]),
        None => (control, choice, Some(rest), &[][..]),
    }
}

/// Reads a response body to its end (bounded: the body of a unary response), or the first frame
/// that is ready (streams never end by themselves).
async fn drain(response: axum::response::Response, streaming: bool) {
    let mut body = response.into_body();
    if streaming {
        let _ = body.frame().now_or_never();
        return;
    }
    if let Ok(collected) = body.collect().await {
        let bytes = collected.to_bytes();
        assert!(bytes.len() < 64 * MAX_BODY, "response of {} bytes", bytes.len());
    }
}

/// An OFREP request through the real router: single (`choice` picks the key) or bulk, with an
/// optional `Flagd-Selector`, `If-None-Match` and `X-User` header, and the fuzzed body.
pub fn ofrep(data: &[u8]) {
    let (control, choice, header_value, body) = split_request(data);
    let uri = if control & 0x01 == 0 {
        "/ofrep/v1/evaluate/flags".to_owned()
    } else {
        format!("/ofrep/v1/evaluate/flags/{}", KEYS[usize::from(choice) % KEYS.len()])
    };
    let mut request = Request::builder().method("POST").uri(uri);
    if control & 0x02 != 0 {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(value) = header_value.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        let name = match (control >> 2) & 0x03 {
            0 | 1 => "flagd-selector",
            2 => "if-none-match",
            _ => "x-user",
        };
        request = request.header(name, value);
    }
    let Ok(request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    with_server(|server| {
        server.runtime.block_on(async {
            let response = match server.ofrep.clone().oneshot(request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let status = response.status();
            assert!(!status.is_server_error(), "OFREP answered {status}");
            drain(response, false).await;
        });
    });
}

/// The Connect methods of port 8013 (the last ones do not exist).
const CONNECT_PATHS: &[&str] = &[
    "/flagd.evaluation.v1.Service/ResolveBoolean",
    "/flagd.evaluation.v1.Service/ResolveString",
    "/flagd.evaluation.v1.Service/ResolveFloat",
    "/flagd.evaluation.v1.Service/ResolveInt",
    "/flagd.evaluation.v1.Service/ResolveObject",
    "/flagd.evaluation.v1.Service/ResolveAll",
    "/flagd.evaluation.v1.Service/EventStream",
    "/flagd.evaluation.v2.Service/ResolveBoolean",
    "/flagd.evaluation.v2.Service/ResolveString",
    "/flagd.evaluation.v2.Service/ResolveFloat",
    "/flagd.evaluation.v2.Service/ResolveInt",
    "/flagd.evaluation.v2.Service/ResolveObject",
    "/flagd.evaluation.v2.Service/EventStream",
    "/schema.v1.Service/ResolveBoolean",
    "/schema.v1.Service/ResolveString",
    "/schema.v1.Service/ResolveFloat",
    "/schema.v1.Service/ResolveInt",
    "/schema.v1.Service/ResolveObject",
    "/schema.v1.Service/ResolveAll",
    "/schema.v1.Service/EventStream",
    "/flagd.evaluation.v1.Service/Nope",
    "/",
];

const CONNECT_TYPES: &[&str] = &[
    "application/json",
    "application/proto",
    "application/connect+json",
    "application/connect+proto",
    "Application/JSON; charset=utf-8",
    "application/grpc",
];

/// A Connect request (unary or streaming, JSON or proto, enveloped or not) through the handler the
/// evaluation port dispatches Connect requests to: `choice` picks the method, `control` the content
/// type; optional `Flagd-Selector` or `X-User` header.
pub fn connect(data: &[u8]) {
    let (control, choice, header_value, body) = split_request(data);
    let path = CONNECT_PATHS[usize::from(choice) % CONNECT_PATHS.len()];
    let content_type = CONNECT_TYPES[usize::from(control & 0x0f) % CONNECT_TYPES.len()];
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(value) = header_value.and_then(|v| HeaderValue::from_bytes(v).ok()) {
        let name = if control & 0x10 == 0 {
            "flagd-selector"
        } else {
            "x-user"
        };
        headers.insert(name, value);
    }
    if !crate::connect::is_connect(&headers) {
        return;
    }
    let streaming = content_type.contains("connect+");
    let body = Body::from(body.to_vec());
    with_server(|server| {
        let mut request = axum::extract::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(path);
        *request.headers_mut() = headers;
        let router = server.evaluation.clone();
        server.runtime.block_on(async {
            let response = match tower::ServiceExt::oneshot(router, request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // Evaluation errors map to 5xx statuses here (flagd's DataLoss/Unknown), so any status goes.
            drain(response, streaming).await;
        });
    });
}

fn request<T>(message: T, selector: Option<&[u8]>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = selector.and_then(|v| tonic::metadata::MetadataValue::try_from(v).ok()) {
        request.metadata_mut().insert("flagd-selector", value);
    }
    request
}

/// Decodes `body` as `T` (as tonic's prost codec does) and calls the service method on it.
macro_rules! call {
    ($service:expr, $method:ident, $ty:ty, $body:expr, $selector:expr) => {{
        if let Ok(message) = <$ty as prost::Message>::decode($body) {
            let _ = $service.$method(request(message, $selector)).await;
        }
    }};
    ($service:expr, $method:ident, $ty:ty, $body:expr, $selector:expr, stream) => {{
        if let Ok(message) = <$ty as prost::Message>::decode($body) {
            if let Ok(response) = $service.$method(request(message, $selector)).await {
                let mut stream = response.into_inner();
                let _ = stream.next().now_or_never();
            }
        }
    }};
}

/// A protobuf request of flagd's evaluation v1/v2, schema.v1 or sync v1 services (`choice` picks
/// the message): decoded with prost as the gRPC transport does, then answered by the service (its
/// `Struct` context decoded straight into JSON and evaluated).
pub fn protobuf(data: &[u8]) {
    let (_, choice, selector, body) = split_request(data);
    with_server(|server| {
        let (e1, e2, legacy) = (
            EvaluationV1 {
                app: server.app.clone(),
            },
            EvaluationV2 {
                app: server.app.clone(),
            },
            SchemaV1 {
                app: server.app.clone(),
            },
        );
        let syncs = crate::flagd::sync::Sync {
            app: server.app.clone(),
        };
        server.runtime.block_on(async {
            match choice % 24 {
                0 => call!(e1, resolve_boolean, v1::ResolveBooleanRequest, body, selector),
                1 => call!(e1, resolve_string, v1::ResolveStringRequest, body, selector),
                2 => call!(e1, resolve_float, v1::ResolveFloatRequest, body, selector),
                3 => call!(e1, resolve_int, v1::ResolveIntRequest, body, selector),
                4 => call!(e1, resolve_object, v1::ResolveObjectRequest, body, selector),
                5 => call!(e1, resolve_all, v1::ResolveAllRequest, body, selector),
                6 => call!(e1, event_stream, v1::EventStreamRequest, body, selector, stream),
                7 => call!(e2, resolve_boolean, v2::ResolveBooleanRequest, body, selector),
                8 => call!(e2, resolve_string, v2::ResolveStringRequest, body, selector),
                9 => call!(e2, resolve_float, v2::ResolveFloatRequest, body, selector),
                10 => call!(e2, resolve_int, v2::ResolveIntRequest, body, selector),
                11 => call!(e2, resolve_object, v2::ResolveObjectRequest, body, selector),
                12 => call!(e2, event_stream, v2::EventStreamRequest, body, selector, stream),
                13 => call!(
                    legacy,
                    resolve_boolean,
                    schema_v1::ResolveBooleanRequest,
                    body,
                    selector
                ),
                14 => call!(legacy, resolve_string, schema_v1::ResolveStringRequest, body, selector),
                15 => call!(legacy, resolve_float, schema_v1::ResolveFloatRequest, body, selector),
                16 => call!(legacy, resolve_int, schema_v1::ResolveIntRequest, body, selector),
                17 => call!(legacy, resolve_object, schema_v1::ResolveObjectRequest, body, selector),
                18 => call!(legacy, resolve_all, schema_v1::ResolveAllRequest, body, selector),
                19 => call!(
                    legacy,
                    event_stream,
                    schema_v1::EventStreamRequest,
                    body,
                    selector,
                    stream
                ),
                20 => call!(syncs, sync_flags, sync::SyncFlagsRequest, body, selector, stream),
                21 => call!(syncs, fetch_all_flags, sync::FetchAllFlagsRequest, body, selector),
                22 => call!(syncs, get_metadata, sync::GetMetadataRequest, body, selector),
                // A bare `Struct` (kept in its checked wire form): nothing prost's own `Struct`
                // rejects (prost also accepts a map entry of the wrong wire type, read as an
                // empty entry; that is rejected here); what decodes encodes, at the length it
                // says, and decodes back to itself; and rules see the same context from the wire
                // form as from its JSON.
                _ => {
                    use prost::Message;
                    let decoded = vexil_proto::JsonStruct::decode(body);
                    if decoded.is_ok() {
                        assert!(
                            pbjson_types::Struct::decode(body).is_ok(),
                            "accepted what prost rejects"
                        );
                    }
                    if let Ok(s) = decoded {
                        let bytes = s.encode_to_vec();
                        assert_eq!(bytes.len(), s.encoded_len());
                        let again = vexil_proto::JsonStruct::decode(&bytes[..]).expect("re-encoded Struct decodes");
                        assert_eq!(again, s);
                        let context = vexil_core::context::to_json;
                        assert_eq!(context(&s), context(&s.to_map()));
                    }
                }
            }
        });
    });
}

/// A flagd selector (`Flagd-Selector` header, sync request field): it parses, or the error says
/// what is wrong; a parsed selector prints back to itself.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Selector::parse(text) {
        Ok(selector) => {
            let printed = selector.to_string();
            match Selector::parse(&printed) {
                Ok(again) => assert_eq!(again, selector, "`{text}` printed as `{printed}`"),
                Err(e) => panic!("`{text}` printed as `{printed}`, which does not parse: {e}"),
            }
            let _ = selector.metadata();
        }
        Err(e) => assert!(!e.to_string().is_empty() && !e.0.is_empty()),
    }
}

/// flagd's environment variables the CLI falls back to.
const FLAGD_VARS: &[&str] = &[
    "FLAGD_URI",
    "FLAGD_SOURCES",
    "FLAGD_PORT",
    "FLAGD_CONTEXT_VALUE",
    "FLAGD_CONTEXT_FROM_HEADER",
    "FLAGD_STREAM_DEADLINE",
    "FLAGD_MAX_REQUEST_BODY",
    "FLAGD_DISABLE_SYNC_METADATA",
];

fn os_string(bytes: &[u8]) -> std::ffi::OsString {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt as _;
        std::ffi::OsString::from_vec(bytes.to_vec())
    }
    #[cfg(not(unix))]
    {
        String::from_utf8_lossy(bytes).into_owned().into()
    }
}

/// The command line and environment: the input is NUL-separated arguments after `vexil`; an
/// argument `NAME=value` after a `\x01` separator is a `FLAGD_*` variable instead (`NAME` picked
/// by its first byte). Parsed as `main` parses them (clap, then the flagd environment fallback),
/// then interpreted (`source_specs`, `static_context`); every rejection must say why.
pub fn config(data: &[u8]) {
    let (args_part, env_part) = match data.iter().position(|&b| b == 0x01) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut args = vec![std::ffi::OsString::from("vexil")];
    if !args_part.is_empty() {
        args.extend(args_part.split(|&b| b == 0).map(os_string));
    }
    let env: Vec<(&str, String)> = env_part
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let (&first, value) = entry.split_first()?;
            let value = std::str::from_utf8(value).ok()?;
            Some((FLAGD_VARS[usize::from(first) % FLAGD_VARS.len()], value.to_owned()))
        })
        .collect();
    let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());

    // `Cli::parse_from_with_env`, with clap's `try_` functions (the real one exits the process).
    let matches = match Cli::command().try_get_matches_from(args.clone()) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "clap error without a message");
            return;
        }
    };
    let cli = match matches.subcommand() {
        Some(("serve" | "start", sub)) => {
            let extra = crate::config::flagd_fallbacks(sub, &lookup);
            if extra.is_empty() {
                Cli::from_arg_matches(&matches)
            } else {
                let mut args = args;
                args.extend(extra.into_iter().map(Into::into));
                Cli::try_parse_from(args)
            }
        }
        _ => Cli::from_arg_matches(&matches),
    };
    let cli = match cli {
        Ok(cli) => cli,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "clap error without a message");
            return;
        }
    };
    if let Command::Serve(serve) = cli.command {
        match serve.source_specs() {
            Ok(specs) => {
                for s in &specs {
                    let _ = s.name();
                }
            }
            Err(e) => assert!(!e.trim().is_empty(), "source_specs rejected without a message"),
        }
        if let Err(e) = serve.static_context() {
            assert!(!e.trim().is_empty(), "static_context rejected without a message");
        }
    }
}

/// A fuzz target: arbitrary bytes in, a panic if a contract is broken.
pub type Target = fn(&[u8]);

/// Every target by name (for drivers that take the target as an argument).
pub const TARGETS: &[(&str, Target)] = &[
    ("flag_document_json", flag_document_json),
    ("flag_document_yaml", flag_document_yaml),
    ("evaluation_context", evaluation_context),
    ("ofrep", ofrep),
    ("connect", connect),
    ("protobuf", protobuf),
    ("selector", selector),
    ("config", config),
];
