//! The flagd-testbed's evaluation scenarios checked against `vexil start` on **every** evaluation
//! protocol, with our own minimal clients speaking the wire (no provider library, so none of the
//! OpenFeature clients' limitations): gRPC `flagd.evaluation.v1` and `flagd.evaluation.v2` (the
//! tonic clients of vexil-proto), Connect JSON (`POST /flagd.evaluation.v1.Service/Resolve<Type>`,
//! `content-type: application/json`) and OFREP (`POST /ofrep/v1/evaluate/flags/{key}`, and the
//! flag's entry in the bulk `POST /ofrep/v1/evaluate/flags`).
//!
//! Every scenario of the testbed's evaluation features whose steps are all evaluation steps runs
//! once, and its "When the flag was evaluated with details" step asks every protocol that applies;
//! each `Then` step checks every protocol's answer (value, variant, reason, error code, metadata)
//! exactly, and keeps going after a mismatch so one scenario reports every protocol's every wrong
//! field. The protocols' legitimately different shapes are encoded once, in one mapping per
//! protocol from the wire to OpenFeature's resolution details ([`grpc_v1`], [`grpc_v2`],
//! [`connect_json`], [`ofrep`]), following flagd (`docs/flagd-compat.md`, flagd-schemas):
//!
//! - gRPC and Connect report errors as statuses, flagd's `errFormat`: `NOT_FOUND` →
//!   FLAG_NOT_FOUND, `INVALID_ARGUMENT` → TYPE_MISMATCH, `DATA_LOSS` → PARSE_ERROR, `UNKNOWN` →
//!   GENERAL; any other status, or Connect's HTTP status not being the code's, is a failure.
//! - v1 (and Connect, which serves v1 here) has no way to leave the value unset: reason DEFAULT or
//!   DISABLED with an empty variant means "the caller's code default", as flagd's providers read it;
//!   a flag without a default variant is FLAG_NOT_FOUND (`@deprecated`). v2 and OFREP leave value
//!   and variant out and answer DEFAULT (`@no-default-variant`).
//! - Connect JSON is proto3 JSON with unpopulated scalars emitted (flagd's codec), int64 as a
//!   string.
//! - OFREP: 200 with `key`, `reason`, `metadata` and optional `value`/`variant`; 404 with
//!   `errorCode: FLAG_NOT_FOUND`; 400 with one of the spec's error codes; OFREP is untyped, so the
//!   client checks the value's type itself (TYPE_MISMATCH), as an OFREP provider does. A bulk
//!   entry is read as the single body it equals; a flag missing from the bulk answer is not found.
//!
//! - Connect JSON may leave out an unset message (an Object value, the metadata): proto3 JSON's
//!   unset message.
//!
//! Every value that comes with a variant must be that variant's value in the served flag
//! definitions, and every success must carry exactly the metadata flagd gives it (the selector's
//! reflection, the flag set's metadata, the flag's). The answers must also agree across protocols: v1 and Connect JSON are the same
//! service, v2, OFREP and OFREP bulk give the same answers, and v1 and v2 differ only where v1 says
//! FLAG_NOT_FOUND for a flag v2 resolves to the code default.
//!
//! Servers are configured like the testbed's launchpad (see `providers.rs`): one stable server
//! per fractional mode (a scenario tagged `@fractional-vN` runs against that one, the rest against
//! v3), the `metadata` and `syncpayload` servers. The run prints its scenario counts per protocol
//! and fails on any failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cucumber::gherkin::Step;

#[path = "../support/testbed.rs"]
mod support;
use cucumber::{World, given, then, when};
use futures::FutureExt;
use serde_json::{Map, Value, json};
use support::{all_flags, load, prepare_features};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use vexil_e2e::{Scratch, Server, testbed};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Protocol {
    GrpcV1,
    GrpcV2,
    ConnectJson,
    Ofrep,
    OfrepBulk,
}

const PROTOCOLS: [Protocol; 5] = [
    Protocol::GrpcV1,
    Protocol::GrpcV2,
    Protocol::ConnectJson,
    Protocol::Ofrep,
    Protocol::OfrepBulk,
];

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::GrpcV1 => "grpc flagd.evaluation.v1",
            Protocol::GrpcV2 => "grpc flagd.evaluation.v2",
            Protocol::ConnectJson => "connect-json flagd.evaluation.v1",
            Protocol::Ofrep => "ofrep",
            Protocol::OfrepBulk => "ofrep bulk",
        }
    }

    /// Whether the protocol answers a flag without a default variant with FLAG_NOT_FOUND (flagd's
    /// legacy v1 answer, `@deprecated`) rather than the code default (`@no-default-variant`).
    fn not_found_without_default(self) -> bool {
        matches!(self, Protocol::GrpcV1 | Protocol::ConnectJson)
    }

    /// Whether a scenario with these tags describes this protocol.
    fn applies(self, tags: &[String]) -> bool {
        let has = |t: &str| tags.iter().any(|x| x == t);
        if has("deprecated") {
            return self.not_found_without_default();
        }
        if has("no-default-variant") {
            return !self.not_found_without_default();
        }
        true
    }
}

/// The servers of the run and a client for each.
#[derive(Debug)]
struct Env {
    /// The stable server by fractional mode.
    stable: BTreeMap<&'static str, Target>,
    metadata: Target,
    syncpayload: Target,
    http: reqwest::Client,
    /// Declared last so the servers stop before their files go.
    _dir: Scratch,
}

#[derive(Debug)]
struct Target {
    server: Server,
    channel: Channel,
    /// The flag documents it serves, to check that a value is its variant's.
    documents: Vec<Value>,
}

/// Generous: only a server that hangs takes this long.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl Target {
    fn new(server: Server, documents: Vec<Value>) -> Target {
        let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
            .expect("a URL")
            .timeout(TIMEOUT)
            .connect_lazy();
        Target {
            server,
            channel,
            documents,
        }
    }

    /// The metadata a successful evaluation of `key` may carry, one candidate per served document
    /// that defines it: the selector's reflection (`{"source": ..}` or `{"flagSetId": ..}`),
    /// overlaid by the document's (flag set's) metadata, overlaid by the flag's (flagd's rule).
    fn metadata_candidates(&self, key: &str, selector: Option<&str>) -> Vec<Map<String, Value>> {
        let mut reflection = Map::new();
        if let Some(s) = selector.filter(|s| !s.is_empty()) {
            match s.split_once('=') {
                Some((k, v)) => reflection.insert(k.to_owned(), json!(v)),
                None => reflection.insert("source".to_owned(), json!(s)),
            };
        }
        self.documents
            .iter()
            .filter_map(|d| {
                let flag = d["flags"].get(key)?;
                let mut m = reflection.clone();
                for layer in [&d["metadata"], &flag["metadata"]] {
                    if let Some(layer) = layer.as_object() {
                        m.extend(
                            layer
                                .iter()
                                .filter(|(_, v)| !v.is_null())
                                .map(|(k, v)| (k.clone(), v.clone())),
                        );
                    }
                }
                Some(m)
            })
            .collect()
    }

    /// The values the flag's `variant` has in the served documents (a key may be in several sets).
    fn variant_values(&self, key: &str, variant: &str) -> Vec<Value> {
        self.documents
            .iter()
            .filter_map(|d| d["flags"].get(key)?["variants"].get(variant).cloned())
            .collect()
    }
}

static ENV: Mutex<Option<Arc<Env>>> = Mutex::new(None);

/// What a step found wrong on one protocol.
#[derive(Debug, Clone)]
struct Failure {
    protocol: Protocol,
    /// "value", "reason", "variant", "error code", "metadata", "protocol" (the answer's shape),
    /// "agreement" (protocols disagree) or "step" (a step could not run).
    kind: &'static str,
    expected: String,
    observed: String,
}

/// (protocol, fractional mode, feature, scenario key, failures) of every scenario run.
type Outcome = (Protocol, &'static str, String, String, Vec<Failure>);
static RESULTS: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());

/// OpenFeature's resolution details, as a provider would report them.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    /// `None`: the caller's code default (also on errors).
    value: Option<Value>,
    reason: String,
    variant: Option<String>,
    error_code: Option<String>,
    metadata: Map<String, Value>,
}

impl Answer {
    fn error(code: &str, metadata: Map<String, Value>) -> Answer {
        Answer {
            value: None,
            reason: "ERROR".into(),
            variant: None,
            error_code: Some(code.into()),
            metadata,
        }
    }
}

#[derive(World)]
#[world(init = Self::new)]
struct RawWorld {
    env: Arc<Env>,
    protocols: Vec<Protocol>,
    fractional: &'static str,
    server: &'static str,
    selector: Option<String>,
    flag: Option<(String, String, String)>,
    context: Map<String, Value>,
    answers: BTreeMap<Protocol, Answer>,
    failures: Vec<Failure>,
}

impl std::fmt::Debug for RawWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawWorld")
            .field("flag", &self.flag)
            .field("answers", &self.answers)
            .field("failures", &self.failures)
            .finish()
    }
}

impl RawWorld {
    fn new() -> RawWorld {
        RawWorld {
            env: ENV.lock().unwrap().clone().expect("environment set before the run"),
            protocols: PROTOCOLS.to_vec(),
            fractional: "v3",
            server: "stable",
            selector: None,
            flag: None,
            context: Map::new(),
            answers: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    fn target(&self) -> &Target {
        match self.server {
            "metadata" => &self.env.metadata,
            "syncpayload" => &self.env.syncpayload,
            _ => &self.env.stable[self.fractional],
        }
    }

    fn fail(&mut self, protocol: Protocol, kind: &'static str, expected: impl ToString, observed: impl ToString) {
        self.failures.push(Failure {
            protocol,
            kind,
            expected: expected.to_string(),
            observed: observed.to_string(),
        });
    }

    /// Checks `observed(answer)` against `expected` on every protocol that answered.
    fn check(&mut self, kind: &'static str, expected: &str, observed: impl Fn(&Answer) -> String) {
        let results: Vec<(Protocol, String)> = self.answers.iter().map(|(p, a)| (*p, observed(a))).collect();
        for (protocol, seen) in results {
            if seen != expected {
                self.fail(protocol, kind, expected, seen);
            }
        }
    }
}

/// A gherkin cell as a value of the given type (`{\"a\": 1}` cells are JSON with escaped quotes).
fn typed(ty: &str, text: &str) -> Value {
    match ty {
        "Boolean" => Value::Bool(text.parse().expect("boolean")),
        "Integer" => Value::Number(text.parse().expect("integer")),
        "Float" => json!(text.parse::<f64>().expect("float")),
        "Object" => serde_json::from_str(text)
            .or_else(|_| serde_json::from_str(&text.replace("\\\"", "\"")))
            .expect("object"),
        _ => Value::String(text.to_owned()),
    }
}

/// JSON equality with numbers compared as numbers (`1` = `1.0`: gRPC's Struct has only doubles).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (x, y) => x == y,
    }
}

fn same_answer(a: &Answer, b: &Answer) -> bool {
    let value = match (&a.value, &b.value) {
        (Some(x), Some(y)) => same(x, y),
        (x, y) => x == y,
    };
    // Errors carry metadata only on OFREP (flagd's error bodies).
    let metadata =
        a.error_code.is_some() || same(&Value::Object(a.metadata.clone()), &Value::Object(b.metadata.clone()));
    value && metadata && a.reason == b.reason && a.variant == b.variant && a.error_code == b.error_code
}

/// A JSON object as a protobuf Struct (every number is sent as a double).
fn to_struct(context: &Map<String, Value>) -> Option<JsonStruct> {
    Some(JsonStruct::from(context.clone()))
}

fn struct_to_map(s: Option<JsonStruct>) -> Map<String, Value> {
    s.map(JsonStruct::into_map).unwrap_or_default()
}

fn with_selector<T>(message: T, selector: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(s) = selector {
        r.metadata_mut()
            .insert("flagd-selector", MetadataValue::try_from(s).expect("an ASCII selector"));
    }
    r
}

/// flagd's gRPC error statuses (`errFormat`) as OpenFeature error codes.
fn grpc_error(status: &tonic::Status) -> Result<Answer, String> {
    let code = match status.code() {
        tonic::Code::NotFound => "FLAG_NOT_FOUND",
        tonic::Code::InvalidArgument => "TYPE_MISMATCH",
        tonic::Code::DataLoss => "PARSE_ERROR",
        tonic::Code::Unknown => "GENERAL",
        other => return Err(format!("gRPC status {other:?}: {}", status.message())),
    };
    Ok(Answer::error(code, Map::new()))
}

/// flagd's v1 success: every field is set; DEFAULT/DISABLED with an empty variant means the code
/// default (how flagd's providers read it).
fn v1_success(value: Value, reason: String, variant: String, metadata: Option<JsonStruct>) -> Result<Answer, String> {
    if reason.is_empty() || reason == "ERROR" {
        return Err(format!("success with reason {reason:?}"));
    }
    let code_default = variant.is_empty() && matches!(reason.as_str(), "DEFAULT" | "DISABLED");
    Ok(Answer {
        value: (!code_default).then_some(value),
        reason,
        variant: (!variant.is_empty()).then_some(variant),
        error_code: None,
        metadata: struct_to_map(metadata),
    })
}

/// v2: value and variant are unset together, and only for the code default.
fn v2_success(
    value: Option<Value>,
    reason: String,
    variant: Option<String>,
    metadata: Option<JsonStruct>,
) -> Result<Answer, String> {
    if reason.is_empty() || reason == "ERROR" {
        return Err(format!("success with reason {reason:?}"));
    }
    if value.is_none() != variant.is_none() {
        return Err(format!("value {value:?} with variant {variant:?}"));
    }
    if value.is_none() && !matches!(reason.as_str(), "DEFAULT" | "DISABLED") {
        return Err(format!("no value with reason {reason}"));
    }
    Ok(Answer {
        value,
        reason,
        variant,
        error_code: None,
        metadata: struct_to_map(metadata),
    })
}

async fn grpc_v1(
    target: &Target,
    ty: &str,
    key: &str,
    ctx: &Map<String, Value>,
    sel: Option<&str>,
) -> Result<Answer, String> {
    let mut c = v1::service_client::ServiceClient::new(target.channel.clone());
    let flag_key = key.to_owned();
    let context = to_struct(ctx);
    macro_rules! call {
        ($method:ident, $req:ident, $value:expr) => {
            match c
                .$method(with_selector(v1::$req { flag_key, context }, sel))
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let value = $value(&r);
                    v1_success(value, r.reason, r.variant, r.metadata)
                }
                Err(status) => grpc_error(&status),
            }
        };
    }
    match ty {
        "Boolean" => call!(
            resolve_boolean,
            ResolveBooleanRequest,
            |r: &v1::ResolveBooleanResponse| json!(r.value)
        ),
        "String" => call!(
            resolve_string,
            ResolveStringRequest,
            |r: &v1::ResolveStringResponse| json!(r.value)
        ),
        "Integer" => call!(resolve_int, ResolveIntRequest, |r: &v1::ResolveIntResponse| json!(
            r.value
        )),
        "Float" => call!(
            resolve_float,
            ResolveFloatRequest,
            |r: &v1::ResolveFloatResponse| json!(r.value)
        ),
        _ => call!(resolve_object, ResolveObjectRequest, |r: &v1::ResolveObjectResponse| {
            Value::Object(struct_to_map(r.value.clone()))
        }),
    }
}

async fn grpc_v2(
    target: &Target,
    ty: &str,
    key: &str,
    ctx: &Map<String, Value>,
    sel: Option<&str>,
) -> Result<Answer, String> {
    let mut c = v2::service_client::ServiceClient::new(target.channel.clone());
    let flag_key = key.to_owned();
    let context = to_struct(ctx);
    macro_rules! call {
        ($method:ident, $req:ident, $value:expr) => {
            match c
                .$method(with_selector(v2::$req { flag_key, context }, sel))
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let value = $value(&r);
                    v2_success(value, r.reason, r.variant, r.metadata)
                }
                Err(status) => grpc_error(&status),
            }
        };
    }
    match ty {
        "Boolean" => call!(
            resolve_boolean,
            ResolveBooleanRequest,
            |r: &v2::ResolveBooleanResponse| r.value.map(|v| json!(v))
        ),
        "String" => call!(resolve_string, ResolveStringRequest, |r: &v2::ResolveStringResponse| r
            .value
            .clone()
            .map(Value::String)),
        "Integer" => call!(resolve_int, ResolveIntRequest, |r: &v2::ResolveIntResponse| r
            .value
            .map(|v| json!(v))),
        "Float" => call!(resolve_float, ResolveFloatRequest, |r: &v2::ResolveFloatResponse| r
            .value
            .map(|v| json!(v))),
        _ => call!(resolve_object, ResolveObjectRequest, |r: &v2::ResolveObjectResponse| {
            r.value.clone().map(|v| Value::Object(struct_to_map(Some(v))))
        }),
    }
}

fn method(ty: &str) -> &'static str {
    match ty {
        "Boolean" => "ResolveBoolean",
        "String" => "ResolveString",
        "Integer" => "ResolveInt",
        "Float" => "ResolveFloat",
        _ => "ResolveObject",
    }
}

/// Connect's unary JSON protocol for flagd.evaluation.v1: proto3 JSON with every field emitted,
/// errors as `{"code": ..., "message": ...}` with Connect's HTTP status for the code.
async fn connect_json(
    env: &Env,
    target: &Target,
    ty: &str,
    key: &str,
    ctx: &Map<String, Value>,
    sel: Option<&str>,
) -> Result<Answer, String> {
    let mut request = env
        .http
        .post(format!(
            "{}/flagd.evaluation.v1.Service/{}",
            target.server.grpc_url(),
            method(ty)
        ))
        .header("content-type", "application/json")
        .body(json!({"flagKey": key, "context": ctx}).to_string());
    if let Some(s) = sel {
        request = request.header("Flagd-Selector", s);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("HTTP {status}: {e}: {text}"))?;
    if status != 200 {
        let (code, http) = match body["code"].as_str() {
            Some("not_found") => ("FLAG_NOT_FOUND", 404),
            Some("invalid_argument") => ("TYPE_MISMATCH", 400),
            Some("data_loss") => ("PARSE_ERROR", 500),
            Some("unknown") => ("GENERAL", 500),
            _ => return Err(format!("HTTP {status}: {text}")),
        };
        if status != http {
            return Err(format!("HTTP {status} for Connect code {}", body["code"]));
        }
        return Ok(Answer::error(code, Map::new()));
    }
    // Scalars are always emitted (flagd's codec emits unpopulated fields); an absent message
    // (an Object value, the metadata) is proto3 JSON's unset message.
    let scalars: &[&str] = if ty == "Object" {
        &["reason", "variant"]
    } else {
        &["value", "reason", "variant"]
    };
    let fields: Vec<&str> = scalars.iter().copied().filter(|f| body.get(*f).is_none()).collect();
    if !fields.is_empty() {
        return Err(format!("unpopulated fields not emitted ({fields:?}): {text}"));
    }
    let value = match ty {
        "Object" => match body.get("value") {
            None | Some(Value::Null) => json!({}),
            Some(v) => v.clone(),
        },
        "Integer" => {
            let Some(Ok(i)) = body["value"].as_str().map(str::parse::<i64>) else {
                return Err(format!("int64 value not a JSON string: {text}"));
            };
            json!(i)
        }
        _ => body["value"].clone(),
    };
    let reason = body["reason"].as_str().unwrap_or_default().to_owned();
    let variant = body["variant"].as_str().unwrap_or_default().to_owned();
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(format!("metadata {other}")),
    };
    v1_success(value, reason, variant, to_struct(&metadata))
}

/// OFREP's single evaluation. OFREP has no types: the client checks the value's type.
async fn ofrep(
    env: &Env,
    target: &Target,
    ty: &str,
    key: &str,
    ctx: &Map<String, Value>,
    sel: Option<&str>,
) -> Result<Answer, String> {
    let mut request = env
        .http
        .post(target.server.ofrep_url(&format!("/ofrep/v1/evaluate/flags/{key}")))
        .header("content-type", "application/json")
        .body(json!({ "context": ctx }).to_string());
    if let Some(s) = sel {
        request = request.header("Flagd-Selector", s);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("HTTP {status}: {e}: {text}"))?;
    ofrep_flag(ty, key, status, &body)
}

/// OFREP's bulk evaluation, read like the single one for `key`: each entry is an evaluation
/// success or failure, in a 200 response; a flag that is not there was not found.
async fn ofrep_bulk(
    env: &Env,
    target: &Target,
    ty: &str,
    key: &str,
    ctx: &Map<String, Value>,
    sel: Option<&str>,
) -> Result<Answer, String> {
    let mut request = env
        .http
        .post(target.server.ofrep_url("/ofrep/v1/evaluate/flags"))
        .header("content-type", "application/json")
        .body(json!({ "context": ctx }).to_string());
    if let Some(s) = sel {
        request = request.header("Flagd-Selector", s);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {text}"));
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    let Some(flags) = body["flags"].as_array() else {
        return Err(format!("no flags array: {text}"));
    };
    let mut entries = flags.iter().filter(|f| f["key"] == key);
    match (entries.next(), entries.next()) {
        (None, _) => Ok(Answer::error("FLAG_NOT_FOUND", Map::new())),
        (Some(entry), None) => {
            // An entry is a single evaluation's body; failures carry the status they would have.
            let status = match entry["errorCode"].as_str() {
                None => 200,
                Some("FLAG_NOT_FOUND") => 404,
                Some(_) => 400,
            };
            ofrep_flag(ty, key, status, entry)
        }
        (Some(_), Some(_)) => Err(format!("`{key}` twice: {text}")),
    }
}

/// One flag's OFREP evaluation body with its HTTP status.
fn ofrep_flag(ty: &str, key: &str, status: u16, body: &Value) -> Result<Answer, String> {
    let text = body.to_string();
    if body["key"] != key {
        return Err(format!("HTTP {status} for another key: {text}"));
    }
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(format!("metadata {other}")),
    };
    let error_code = body.get("errorCode").and_then(Value::as_str);
    match (status, error_code) {
        (404, Some("FLAG_NOT_FOUND")) => return Ok(Answer::error("FLAG_NOT_FOUND", metadata)),
        (400, Some(code @ ("PARSE_ERROR" | "TARGETING_KEY_MISSING" | "INVALID_CONTEXT" | "GENERAL"))) => {
            return Ok(Answer::error(code, metadata));
        }
        (200, None) => {}
        _ => return Err(format!("HTTP {status}: {text}")),
    }
    if body.get("metadata").is_none() {
        return Err(format!("no metadata: {text}"));
    }
    let reason = body["reason"].as_str().unwrap_or_default().to_owned();
    let variant = match body.get("variant") {
        None => None,
        Some(Value::String(v)) => Some(v.clone()),
        Some(other) => return Err(format!("variant {other}")),
    };
    let value = body.get("value").cloned();
    let typed_ok = match (&value, ty) {
        (None, _) => true,
        (Some(Value::Bool(_)), "Boolean") | (Some(Value::String(_)), "String") => true,
        (Some(Value::Number(n)), "Integer") => n.is_i64() || n.is_u64(),
        (Some(Value::Number(_)), "Float") | (Some(Value::Object(_)), "Object") => true,
        _ => false,
    };
    if !typed_ok {
        return Ok(Answer::error("TYPE_MISMATCH", metadata));
    }
    v2_success(value, reason, variant, to_struct(&metadata))
}

// --- steps: setup ------------------------------------------------------------------------------

#[given(regex = r#"^a (stable|metadata|syncpayload) flagd provider$"#)]
fn provider_step(world: &mut RawWorld, which: String) {
    world.server = match which.as_str() {
        "metadata" => "metadata",
        "syncpayload" => "syncpayload",
        _ => "stable",
    };
}

#[given(regex = r#"^an option "selector" of type "String" with value "(.*)"$"#)]
fn selector_option(world: &mut RawWorld, selector: String) {
    world.selector = Some(selector);
}

#[given(regex = r#"^an option "cache" of type "CacheType" with value "(.*)"$"#)]
fn cache_option(_world: &mut RawWorld, cache: String) {
    // The raw clients never cache.
    assert_eq!(cache, "disabled");
}

#[given(
    regex = r#"^a (Boolean|String|Integer|Float|Object)-flag with key "(.*)" and a (?:default|fallback) value "(.*)"$"#
)]
fn flag_step(world: &mut RawWorld, ty: String, key: String, default: String) {
    world.flag = Some((ty, key, default));
}

#[given(regex = r#"^a context containing a key "(.*)", with type "(.*)" and with value "(.*)"$"#)]
fn context_key(world: &mut RawWorld, key: String, ty: String, value: String) {
    world.context.insert(key, typed(&ty, &value));
}

#[given(regex = r#"^a context containing a targeting key with value "(.*)"$"#)]
fn targeting_key(world: &mut RawWorld, value: String) {
    world.context.insert("targetingKey".into(), Value::String(value));
}

#[given(
    regex = r#"^a context containing a nested property with outer key "(.*)" and inner key "(.*)", with value "(.*)"$"#
)]
fn nested(world: &mut RawWorld, outer: String, inner: String, value: String) {
    let entry = world.context.entry(outer).or_insert_with(|| json!({}));
    entry[inner] = Value::String(value);
}

// --- steps: evaluation ---------------------------------------------------------------------------

#[when("the flag was evaluated with details")]
async fn evaluate(world: &mut RawWorld) {
    let (ty, key, _) = world.flag.clone().expect("a flag was given");
    let env = world.env.clone();
    let target = world.target();
    let sel = world.selector.as_deref();
    let ctx = &world.context;
    let mut answers = BTreeMap::new();
    let mut broken = Vec::new();
    for protocol in world.protocols.clone() {
        let answer = match protocol {
            Protocol::GrpcV1 => grpc_v1(target, &ty, &key, ctx, sel).await,
            Protocol::GrpcV2 => grpc_v2(target, &ty, &key, ctx, sel).await,
            Protocol::ConnectJson => connect_json(&env, target, &ty, &key, ctx, sel).await,
            Protocol::Ofrep => ofrep(&env, target, &ty, &key, ctx, sel).await,
            Protocol::OfrepBulk => ofrep_bulk(&env, target, &ty, &key, ctx, sel).await,
        };
        match answer {
            Ok(a) => {
                answers.insert(protocol, a);
            }
            Err(e) => broken.push((protocol, e)),
        }
    }
    for (protocol, e) in broken {
        world.fail(protocol, "protocol", "an answer of flagd's shape", e);
    }
    // A value is its variant's value in the flag definition (ResolveInt truncates, as flagd).
    let mut wrong = Vec::new();
    for (protocol, a) in &answers {
        let (Some(value), Some(variant)) = (&a.value, &a.variant) else {
            continue;
        };
        let defined = world.target().variant_values(&key, variant);
        let matches = |d: &Value| match (ty.as_str(), d.as_f64()) {
            ("Integer", Some(f)) => same(value, &json!(f.trunc() as i64)),
            _ => same(value, d),
        };
        if !defined.iter().any(matches) {
            wrong.push((
                *protocol,
                format!("variant `{variant}`: one of {defined:?}"),
                value.clone(),
            ));
        }
    }
    for (protocol, expected, value) in wrong {
        world.fail(protocol, "variant value", expected, value);
    }
    // A success carries exactly the metadata flagd gives it.
    let candidates = world.target().metadata_candidates(&key, world.selector.as_deref());
    let mut wrong = Vec::new();
    for (protocol, a) in &answers {
        let actual = Value::Object(a.metadata.clone());
        if a.error_code.is_none() && !candidates.iter().any(|m| same(&actual, &Value::Object(m.clone()))) {
            wrong.push((*protocol, format!("one of {candidates:?}"), actual));
        }
    }
    for (protocol, expected, actual) in wrong {
        world.fail(protocol, "metadata (definition)", expected, actual);
    }
    // Agreement: v1 = Connect (one service), v2 = OFREP, v1 = v2 but for v1's FLAG_NOT_FOUND
    // where v2 gives the code default (a flag without a default variant).
    let pairs = [
        (Protocol::GrpcV1, Protocol::ConnectJson),
        (Protocol::GrpcV2, Protocol::Ofrep),
        (Protocol::Ofrep, Protocol::OfrepBulk),
        (Protocol::GrpcV1, Protocol::GrpcV2),
    ];
    for (a, b) in pairs {
        let (Some(x), Some(y)) = (answers.get(&a), answers.get(&b)) else {
            continue;
        };
        let legacy = a == Protocol::GrpcV1
            && b == Protocol::GrpcV2
            && x.error_code.as_deref() == Some("FLAG_NOT_FOUND")
            && y.reason == "DEFAULT"
            && y.value.is_none();
        if !legacy && !same_answer(x, y) {
            world.fail(b, "agreement", format!("{} answer {x:?}", a.name()), format!("{y:?}"));
        }
    }
    world.answers = answers;
}

fn flag_type(world: &RawWorld) -> (String, Value) {
    let (ty, _, default) = world.flag.as_ref().expect("a flag was given");
    (ty.clone(), typed(ty, default))
}

#[then(regex = r#"^the resolved details value should be "(.*)"$"#)]
fn resolved_value(world: &mut RawWorld, expected: String) {
    let (ty, default) = flag_type(world);
    let expected = typed(&ty, &expected);
    let seen: Vec<(Protocol, Value)> = world
        .answers
        .iter()
        .map(|(p, a)| (*p, a.value.clone().unwrap_or_else(|| default.clone())))
        .collect();
    for (protocol, value) in seen {
        if !same(&value, &expected) {
            world.fail(protocol, "value", &expected, value);
        }
    }
}

#[then(regex = r#"^the reason should be "(.*)"$"#)]
fn reason(world: &mut RawWorld, expected: String) {
    world.check("reason", &expected, |a| a.reason.clone());
}

#[then(regex = r#"^the variant should be "(.*)"$"#)]
fn variant(world: &mut RawWorld, expected: String) {
    world.check("variant", &expected, |a| a.variant.clone().unwrap_or_default());
}

#[then(regex = r#"^the error-code should be "(.*)"$"#)]
fn error_code(world: &mut RawWorld, expected: String) {
    world.check("error code", &expected, |a| a.error_code.clone().unwrap_or_default());
}

#[then("the resolved metadata should contain")]
fn metadata_contains(world: &mut RawWorld, step: &Step) {
    let rows = step.table.as_ref().expect("a table").rows.clone();
    let mut wrong = Vec::new();
    for (protocol, answer) in &world.answers {
        for row in rows.iter().skip(1) {
            let expected = typed(&row[1], &row[2]);
            let kind_ok = |v: &Value| match row[1].as_str() {
                "Integer" | "Float" => v.is_number(),
                "Boolean" => v.is_boolean(),
                _ => v.is_string(),
            };
            match answer.metadata.get(row[0].as_str()) {
                Some(v) if kind_ok(v) && same(v, &expected) => {}
                seen => wrong.push((
                    *protocol,
                    format!("{}={expected}", row[0]),
                    format!("{}={seen:?}", row[0]),
                )),
            }
        }
    }
    for (protocol, expected, seen) in wrong {
        world.fail(protocol, "metadata", expected, seen);
    }
}

#[then("the resolved metadata is empty")]
fn metadata_empty(world: &mut RawWorld) {
    world.check("metadata", "{}", |a| Value::Object(a.metadata.clone()).to_string());
}

// --- running -------------------------------------------------------------------------------------

fn environment() -> Env {
    let dir = Scratch::new("raw");
    std::fs::create_dir_all(dir.0.join("flags")).unwrap();
    std::fs::create_dir_all(dir.0.join("rawflags")).unwrap();
    let all = all_flags(&testbed());
    dir.write("flags/allFlags.json", &all.to_string());
    let stable_documents = vec![all, load(&testbed().join("flags/selector-flags.json"))];
    let metadata_documents = vec![load(&testbed().join("flags/selector-flag-combined-metadata.json"))];
    for name in ["selector-flags.json", "selector-flag-combined-metadata.json"] {
        dir.write(
            &format!("rawflags/{name}"),
            &std::fs::read_to_string(testbed().join("flags").join(name)).unwrap(),
        );
    }
    let default = [
        "-f",
        "file:flags/allFlags.json",
        "-f",
        "file:rawflags/selector-flags.json",
        "-X",
        "injectedmetadata=set",
    ];
    let stable = ["v1", "v2", "v3"]
        .into_iter()
        .map(|mode| {
            let args = [&default[..], &["--fractional", mode][..]].concat();
            (
                mode,
                Target::new(Server::start_in(&dir.0, &args), stable_documents.clone()),
            )
        })
        .collect();
    let metadata = Server::start_in(&dir.0, &["-f", "file:rawflags/selector-flag-combined-metadata.json"]);
    let syncpayload = Server::start_in(&dir.0, &[&default[..], &["--disable-sync-metadata"][..]].concat());
    Env {
        stable,
        metadata: Target::new(metadata, metadata_documents),
        syncpayload: Target::new(syncpayload, stable_documents),
        http: reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .expect("an HTTP client"),
        _dir: dir,
    }
}

/// The steps this runner speaks: a scenario with any other step (events, connection loss, caching)
/// is about a provider, not about the server's answers.
const EVALUATION_STEPS: [&str; 13] = [
    "an option \"cache\"",
    "an option \"selector\"",
    "a stable flagd provider",
    "a metadata flagd provider",
    "a syncpayload flagd provider",
    "-flag with key",
    "a context containing",
    "the flag was evaluated with details",
    "the resolved details value should be",
    "the reason should be",
    "the variant should be",
    "the error-code should be",
    "the resolved metadata",
];

fn tags(
    feature: &cucumber::gherkin::Feature,
    rule: Option<&cucumber::gherkin::Rule>,
    scenario: &cucumber::gherkin::Scenario,
) -> Vec<String> {
    feature
        .tags
        .iter()
        .chain(rule.iter().flat_map(|r| r.tags.iter()))
        .chain(scenario.tags.iter())
        .cloned()
        .collect()
}

fn fractional_of(tags: &[String]) -> &'static str {
    match tags.iter().find_map(|t| t.strip_prefix("fractional-v")) {
        Some("1") => "v1",
        Some("2") => "v2",
        _ => "v3",
    }
}

fn scenario_key(scenario: &cucumber::gherkin::Scenario) -> String {
    let steps: Vec<&str> = scenario.steps.iter().map(|s| s.value.as_str()).collect();
    format!("{} :: {}", scenario.name, steps.join(" / "))
}

fn main() {
    let features = prepare_features(
        &testbed().join("gherkin"),
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("raw-features"),
        &[
            "evaluation",
            "targeting",
            "metadata",
            "disabled",
            "selector",
            "contextEnrichment",
            "sync-payload",
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        *ENV.lock().unwrap() = Some(Arc::new(environment()));
        let writer = support::report_writer();
        RawWorld::cucumber()
            .with_writer(cucumber::WriterExt::normalized(writer))
            .max_concurrent_scenarios(16)
            .before(|feature, rule, scenario, world| {
                let tags = tags(feature, rule, scenario);
                world.fractional = fractional_of(&tags);
                world.protocols = PROTOCOLS.into_iter().filter(|p| p.applies(&tags)).collect();
                async {}.boxed_local()
            })
            .after(|feature, rule, scenario, finished, world| {
                let tags = tags(feature, rule, scenario);
                let fractional = fractional_of(&tags);
                let protocols: Vec<Protocol> = PROTOCOLS.into_iter().filter(|p| p.applies(&tags)).collect();
                let mut failures = world.map(|w| std::mem::take(&mut w.failures)).unwrap_or_default();
                let broken = match finished {
                    cucumber::event::ScenarioFinished::StepPassed => None,
                    cucumber::event::ScenarioFinished::StepSkipped => Some("a step without a definition".to_owned()),
                    cucumber::event::ScenarioFinished::StepFailed(_, _, e) => Some(e.to_string()),
                    cucumber::event::ScenarioFinished::BeforeHookFailed(_) => Some("the before hook failed".to_owned()),
                };
                if let Some(e) = broken {
                    for &protocol in &protocols {
                        failures.push(Failure {
                            protocol,
                            kind: "step",
                            expected: "the step runs".into(),
                            observed: e.clone(),
                        });
                    }
                }
                let key = scenario_key(scenario);
                let mut results = RESULTS.lock().unwrap();
                for protocol in protocols {
                    let mine = failures.iter().filter(|f| f.protocol == protocol).cloned().collect();
                    results.push((protocol, fractional, feature.name.clone(), key.clone(), mine));
                }
                async {}.boxed_local()
            })
            .filter_run(&features, |feature, rule, scenario| {
                let evaluation_only = feature
                    .background
                    .iter()
                    .flat_map(|b| b.steps.iter())
                    .chain(scenario.steps.iter())
                    .all(|s| EVALUATION_STEPS.iter().any(|known| s.value.contains(known)));
                let tags = tags(feature, rule, scenario);
                evaluation_only && PROTOCOLS.iter().any(|p| p.applies(&tags))
            })
            .await;
        // Stops the servers.
        ENV.lock().unwrap().take();
    });

    let results = RESULTS.lock().unwrap().clone();
    let mut counts: BTreeMap<Protocol, (usize, usize)> = BTreeMap::new();
    let mut failed = Vec::new();
    for (protocol, fractional, feature, key, failures) in &results {
        let c = counts.entry(*protocol).or_default();
        if failures.is_empty() {
            c.0 += 1;
        } else {
            c.1 += 1;
            for f in failures {
                failed.push(format!(
                    "FAILED [{}, fractional {fractional}] {feature}: {key}\n    {} step: expected {}, observed {}",
                    protocol.name(),
                    f.kind,
                    f.expected,
                    f.observed
                ));
            }
        }
    }
    for (protocol, (passed, failed)) in &counts {
        println!(
            "raw {}: {} scenarios, {passed} passed, {failed} failed",
            protocol.name(),
            passed + failed
        );
    }
    for f in &failed {
        println!("{f}");
    }
    if !failed.is_empty() || counts.len() != PROTOCOLS.len() {
        std::process::exit(1);
    }
}
