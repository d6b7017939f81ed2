//! The flagd-testbed provider scenarios, run with a real OpenFeature client — the Rust
//! `open-feature-flagd` provider — against `vexil start` serving the testbed's flag files, in
//! **RPC** (flagd.evaluation.v1), **in-process** (flagd.sync.v1, evaluating locally) and **REST**
//! (OFREP) modes.
//!
//! The servers are configured like the testbed's launchpad: `flags/allFlags.json` (every
//! `flags/*.json` but `selector-*`, merged) and `rawflags/selector-flags.json`, `-X
//! injectedmetadata=set`; `metadata` serves `rawflags/selector-flag-combined-metadata.json`;
//! `syncpayload` adds `--disable-sync-metadata`. RPC and REST runs are repeated for each fractional
//! mode (the server evaluates); in-process runs use v3 (the client's engine evaluates).
//!
//! Which scenarios run in which mode follows the testbed's tags (`@rpc`, `@in-process`; REST takes
//! the `@rpc` ones: both evaluate on the server). The Rust RPC provider speaks flagd.evaluation.v1,
//! whose answer for a flag without a default variant is `FLAG_NOT_FOUND` (`@deprecated`), where
//! OFREP and in-process answer `DEFAULT` (`@no-default-variant`); each mode runs the set that
//! describes its protocol.
//!
//! The Rust SDK has no event API, so event scenarios watch the provider's own streams (EventStream
//! for RPC, SyncFlags for in-process) with a raw client and apply the provider rules (ready on the
//! first message, stale on a broken stream, error after 5 s without reconnecting).
//!
//! Scenarios that fail because of the client, not the server, are listed in `KNOWN_CLIENT_LIMITS`
//! with the reason; the run fails on any other failure, and on a listed scenario that passes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cucumber::gherkin::Step;

#[path = "../support/testbed.rs"]
mod support;
use cucumber::{World, given, then, when};
use futures::FutureExt;
use open_feature::provider::FeatureProvider;
use open_feature::{EvaluationContext, EvaluationContextFieldValue, EvaluationReason, StructValue, Value as OfValue};
use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};
use serde_json::{Value, json};
use support::{all_flags, load, prepare_features};
use vexil_e2e::{Scratch, Server, testbed};
use vexil_proto::flagd::evaluation::v1 as eval_v1;
use vexil_proto::flagd::sync::v1 as sync_v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Mode {
    Rpc,
    InProcess,
    Rest,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Rpc => "rpc",
            Mode::InProcess => "in-process",
            Mode::Rest => "rest",
        }
    }
}

/// Why the Rust client cannot pass a scenario, whatever the server answers; `None` when it can.
/// Decided from what the scenario asks for and the testbed's flag definitions, never from
/// scenario names. Every such limitation is covered for the server by another mode or by the raw
/// protocol tests (`e2e/protocols.rs`).
fn client_limitation(mode: Mode, steps: &[String], documents: &[Value]) -> Option<&'static str> {
    let any = |needle: &str| steps.iter().any(|s| s.contains(needle));
    let key = steps.iter().find_map(|s| {
        s.split("-flag with key \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
    });
    // Every definition of the flag in the testbed's sources (a key may be in several flag sets).
    let definitions: Vec<&Value> = key
        .map(|k| documents.iter().filter_map(|d| d["flags"].get(k)).collect())
        .unwrap_or_default();
    let flag = definitions.first().copied();
    let structured_context = any("nested property") || any("with type \"Object\"");
    let disabled = definitions.iter().any(|f| f["state"] == "DISABLED");
    let code_default = disabled
        || definitions
            .iter()
            .any(|f| f.get("defaultVariant").is_none_or(Value::is_null));
    match mode {
        Mode::Rpc => {
            if structured_context {
                return Some(
                    "open-feature-flagd 0.3 (RPC) sends nested and object context values as Rust Debug strings",
                );
            }
            if any("error-code should be \"PARSE_ERROR\"") {
                return Some("open-feature-flagd 0.3 (RPC) maps gRPC DATA_LOSS (flagd's PARSE_ERROR) to GENERAL");
            }
            if any("option \"selector\"") {
                return Some("open-feature-flagd 0.3 (RPC) does not send the selector");
            }
        }
        Mode::Rest => {
            if structured_context {
                return Some("open-feature-ofrep 0.1.2 sends nested and object context values as Rust Debug strings");
            }
            if steps
                .iter()
                .any(|s| s.starts_with("the reason should be") && !s.contains("\"STATIC\""))
            {
                return Some("open-feature-ofrep 0.1.2 reports every successful evaluation with reason STATIC");
            }
            if any("error-code should be \"") && !any("error-code should be \"\"") && !any("FLAG_NOT_FOUND") {
                return Some("open-feature-ofrep 0.1.2 maps every HTTP 400 to INVALID_CONTEXT");
            }
            if any("resolved metadata") {
                return Some("open-feature-ofrep 0.1.2 drops flag metadata");
            }
            if code_default {
                return Some(
                    "open-feature-ofrep 0.1.2 fails (PARSE_ERROR) on a success without a value, OFREP's code default",
                );
            }
            if any("option \"selector\"") {
                return Some("open-feature-ofrep 0.1.2 does not send a selector");
            }
        }
        // In-process, the client evaluates: the server's part is the sync payload.
        Mode::InProcess => {
            let targeting = flag.map(|f| f["targeting"].to_string()).unwrap_or_default();
            if targeting.contains("\"$ref\"") {
                return Some(
                    "flagd-evaluation-engine 0.1 rejects a whole sync payload that holds an unresolved $ref, so such flags are left out of the in-process run",
                );
            }
            if disabled {
                return Some(
                    "flagd-evaluation-engine 0.1 predates reason DISABLED (flagd 0.16) and reports an error or the variant",
                );
            }
            if code_default {
                return Some(
                    "flagd-evaluation-engine 0.1 rejects flagd's sync encoding of a missing default variant (\"defaultVariant\": \"\")",
                );
            }
            if targeting.contains("sem_ver") {
                return Some(
                    "flagd-evaluation-engine 0.1 normalises sem_ver operands (v prefixes, partial versions, numbers) differently from flagd",
                );
            }
            if (targeting.contains("starts_with") || targeting.contains("ends_with"))
                && any("reason should be \"DEFAULT\"")
            {
                return Some(
                    "flagd-evaluation-engine 0.1 returns false instead of null when starts_with/ends_with get bad input (flagd#1874)",
                );
            }
            if any("with type \"Object\"")
                && steps
                    .iter()
                    .any(|s| s.contains("with type \"Object\"") && (s.contains('[') || s.contains("null")))
            {
                return Some(
                    "flagd-evaluation-engine 0.1 hashes arrays and nulls inside objects differently from fractional v3's deterministic CBOR",
                );
            }
        }
    }
    None
}

/// One configuration's server (shared by the scenarios of a run).
#[derive(Debug)]
struct Env {
    stable: Arc<Mutex<Server>>,
    stable_ports: vexil_e2e::Ports,
    metadata: Server,
    syncpayload: Server,
    all_flags: Mutex<Value>,
    /// Declared last so the servers stop before their files go.
    dir: Scratch,
}

static ENV: Mutex<Option<(Mode, Arc<Env>)>> = Mutex::new(None);
/// (mode, feature, scenario key, steps, passed) of every scenario run.
type Outcome = (Mode, String, String, Vec<String>, bool);
static RESULTS: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());

fn env() -> (Mode, Arc<Env>) {
    ENV.lock().unwrap().clone().expect("environment set before the run")
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Ready,
    Stale,
    Error,
    Change(Vec<String>),
}

/// Events a provider would emit, derived from its stream by [`watch_events`].
#[derive(Debug, Default)]
struct Events {
    log: Mutex<Vec<(Instant, Event)>>,
}

#[derive(World)]
#[world(init = Self::new)]
struct ProviderWorld {
    mode: Mode,
    env: Arc<Env>,
    selector: Option<String>,
    server: &'static str,
    provider: Option<Arc<FlagdProvider>>,
    flag: Option<(String, String, String)>,
    context: EvaluationContext,
    details: Option<Details>,
    events: Option<Arc<Events>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    handlers_since: Option<Instant>,
    fired_since: Option<Instant>,
}

impl std::fmt::Debug for ProviderWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderWorld")
            .field("mode", &self.mode)
            .field("flag", &self.flag)
            .field("details", &self.details)
            .finish()
    }
}

impl Drop for ProviderWorld {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

#[derive(Debug)]
struct Details {
    value: Value,
    reason: String,
    variant: Option<String>,
    error_code: Option<String>,
    metadata: BTreeMap<String, Value>,
}

impl ProviderWorld {
    fn new() -> ProviderWorld {
        let (mode, env) = env();
        ProviderWorld {
            mode,
            env,
            selector: None,
            server: "stable",
            provider: None,
            flag: None,
            context: EvaluationContext::default(),
            details: None,
            events: None,
            watcher: None,
            handlers_since: None,
            fired_since: None,
        }
    }

    fn ports(&self) -> vexil_e2e::Ports {
        match self.server {
            "metadata" => self.env.metadata.ports,
            "syncpayload" => self.env.syncpayload.ports,
            _ => self.env.stable_ports,
        }
    }

    async fn provider(&mut self) -> Arc<FlagdProvider> {
        if let Some(p) = &self.provider {
            return p.clone();
        }
        let ports = self.ports();
        let (resolver_type, port) = match self.mode {
            Mode::Rpc => (ResolverType::Rpc, ports.evaluation),
            Mode::InProcess => (ResolverType::InProcess, ports.sync),
            Mode::Rest => (ResolverType::Rest, ports.ofrep),
        };
        let options = FlagdOptions {
            host: "127.0.0.1".into(),
            port,
            resolver_type,
            cache_settings: None,
            selector: self.selector.clone(),
            deadline_ms: 2000,
            ..Default::default()
        };
        let provider = Arc::new(FlagdProvider::new(options).await.expect("the provider connects"));
        self.provider = Some(provider.clone());
        provider
    }
}

fn typed(ty: &str, text: &str) -> Value {
    match ty {
        "Boolean" => Value::Bool(text.parse().expect("boolean")),
        "Integer" => json!(text.parse::<i64>().expect("integer")),
        "Float" => json!(text.parse::<f64>().expect("float")),
        "Object" => serde_json::from_str(text)
            .or_else(|_| serde_json::from_str(&text.replace("\\\"", "\"")))
            .expect("object"),
        _ => Value::String(text.to_owned()),
    }
}

fn of_to_json(v: &OfValue) -> Value {
    match v {
        OfValue::Bool(b) => json!(b),
        OfValue::Int(i) => json!(i),
        OfValue::Float(f) => json!(f),
        OfValue::String(s) => json!(s),
        OfValue::Array(items) => Value::Array(items.iter().map(of_to_json).collect()),
        OfValue::Struct(s) => Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), of_to_json(v))).collect()),
    }
}

fn json_to_of(v: &Value) -> OfValue {
    match v {
        Value::Bool(b) => OfValue::Bool(*b),
        Value::Number(n) if n.is_i64() => OfValue::Int(n.as_i64().unwrap_or_default()),
        Value::Number(n) => OfValue::Float(n.as_f64().unwrap_or_default()),
        Value::String(s) => OfValue::String(s.clone()),
        Value::Array(items) => OfValue::Array(items.iter().map(json_to_of).collect()),
        Value::Object(m) => OfValue::Struct(StructValue {
            fields: m.iter().map(|(k, v)| (k.clone(), json_to_of(v))).collect(),
        }),
        Value::Null => OfValue::String(String::new()),
    }
}

fn reason_name(r: Option<&EvaluationReason>) -> String {
    match r {
        None => String::new(),
        Some(EvaluationReason::Static) => "STATIC".into(),
        Some(EvaluationReason::Default) => "DEFAULT".into(),
        Some(EvaluationReason::TargetingMatch) => "TARGETING_MATCH".into(),
        Some(EvaluationReason::Split) => "SPLIT".into(),
        Some(EvaluationReason::Cached) => "CACHED".into(),
        Some(EvaluationReason::Disabled) => "DISABLED".into(),
        Some(EvaluationReason::Unknown) => "UNKNOWN".into(),
        Some(EvaluationReason::Error) => "ERROR".into(),
        Some(EvaluationReason::Other(s)) => s.clone(),
    }
}

fn error_name(code: &open_feature::EvaluationErrorCode) -> String {
    use open_feature::EvaluationErrorCode as C;
    match code {
        C::ProviderNotReady => "PROVIDER_NOT_READY".into(),
        C::FlagNotFound => "FLAG_NOT_FOUND".into(),
        C::ParseError => "PARSE_ERROR".into(),
        C::TypeMismatch => "TYPE_MISMATCH".into(),
        C::TargetingKeyMissing => "TARGETING_KEY_MISSING".into(),
        C::InvalidContext => "INVALID_CONTEXT".into(),
        C::General(_) => "GENERAL".into(),
    }
}

// --- steps: setup ------------------------------------------------------------------------------

#[given(regex = r#"^a (stable|metadata|syncpayload) flagd provider$"#)]
async fn provider_step(world: &mut ProviderWorld, which: String) {
    world.server = match which.as_str() {
        "metadata" => "metadata",
        "syncpayload" => "syncpayload",
        _ => "stable",
    };
    world.provider = None;
    world.provider().await;
}

#[given(regex = r#"^an option "selector" of type "String" with value "(.*)"$"#)]
fn selector_option(world: &mut ProviderWorld, selector: String) {
    world.selector = Some(selector);
}

#[given(regex = r#"^an option "cache" of type "CacheType" with value "(.*)"$"#)]
fn cache_option(_world: &mut ProviderWorld, cache: String) {
    // Providers here are always built without a cache.
    assert_eq!(cache, "disabled");
}

#[given(regex = r#"^a (Boolean|String|Integer|Float|Object)-flag with key "(.*)" and a default value "(.*)"$"#)]
fn flag_step(world: &mut ProviderWorld, ty: String, key: String, default: String) {
    world.flag = Some((ty, key, default));
}

#[given(regex = r#"^a context containing a key "(.*)", with type "(.*)" and with value "(.*)"$"#)]
fn context_key(world: &mut ProviderWorld, key: String, ty: String, value: String) {
    let field = match typed(&ty, &value) {
        Value::Bool(b) => EvaluationContextFieldValue::Bool(b),
        Value::Number(n) if n.is_i64() => EvaluationContextFieldValue::Int(n.as_i64().unwrap_or_default()),
        Value::Number(n) => EvaluationContextFieldValue::Float(n.as_f64().unwrap_or_default()),
        Value::String(s) => EvaluationContextFieldValue::String(s),
        other => {
            let OfValue::Struct(s) = json_to_of(&other) else {
                panic!("object")
            };
            EvaluationContextFieldValue::Struct(Arc::new(s))
        }
    };
    world.context = world.context.clone().with_custom_field(key, field);
}

#[given(regex = r#"^a context containing a targeting key with value "(.*)"$"#)]
fn targeting_key(world: &mut ProviderWorld, value: String) {
    world.context = world.context.clone().with_targeting_key(value);
}

#[given(
    regex = r#"^a context containing a nested property with outer key "(.*)" and inner key "(.*)", with value "(.*)"$"#
)]
fn nested(world: &mut ProviderWorld, outer: String, inner: String, value: String) {
    let mut fields = HashMap::new();
    fields.insert(inner, OfValue::String(value));
    world.context = world.context.clone().with_custom_field(
        outer,
        EvaluationContextFieldValue::Struct(Arc::new(StructValue { fields })),
    );
}

// --- steps: evaluation ---------------------------------------------------------------------------

/// A provider's answer: value, reason, variant, metadata.
type Resolved = (
    Value,
    Option<EvaluationReason>,
    Option<String>,
    Option<open_feature::FlagMetadata>,
);

#[when("the flag was evaluated with details")]
async fn evaluate(world: &mut ProviderWorld) {
    let (ty, key, default) = world.flag.clone().expect("a flag was given");
    let provider = world.provider().await;
    let ctx = world.context.clone();
    let default_value = typed(&ty, &default);
    let result: Result<Resolved, open_feature::EvaluationError> = match ty.as_str() {
        "Boolean" => provider
            .resolve_bool_value(&key, &ctx)
            .await
            .map(|d| (json!(d.value), d.reason, d.variant, d.flag_metadata)),
        "Integer" => provider
            .resolve_int_value(&key, &ctx)
            .await
            .map(|d| (json!(d.value), d.reason, d.variant, d.flag_metadata)),
        "Float" => provider
            .resolve_float_value(&key, &ctx)
            .await
            .map(|d| (json!(d.value), d.reason, d.variant, d.flag_metadata)),
        "Object" => provider.resolve_struct_value(&key, &ctx).await.map(|d| {
            (
                of_to_json(&OfValue::Struct(d.value)),
                d.reason,
                d.variant,
                d.flag_metadata,
            )
        }),
        _ => provider
            .resolve_string_value(&key, &ctx)
            .await
            .map(|d| (json!(d.value), d.reason, d.variant, d.flag_metadata)),
    };
    world.details = Some(match result {
        Ok((value, reason, variant, metadata)) => {
            let reason_text = reason_name(reason.as_ref());
            // DISABLED and DEFAULT without a variant mean "use the code default" (flagd providers).
            let code_default =
                matches!(reason_text.as_str(), "DISABLED" | "DEFAULT") && variant.as_deref().unwrap_or("").is_empty();
            let metadata = metadata
                .map(|m| {
                    m.values
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                open_feature::FlagMetadataValue::Bool(b) => json!(b),
                                open_feature::FlagMetadataValue::Int(i) => json!(i),
                                open_feature::FlagMetadataValue::Float(f) => json!(f),
                                open_feature::FlagMetadataValue::String(s) => json!(s),
                            };
                            (k.clone(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Details {
                value: if code_default { default_value } else { value },
                reason: reason_text,
                variant,
                error_code: None,
                metadata,
            }
        }
        Err(e) => Details {
            value: default_value,
            reason: "ERROR".into(),
            variant: None,
            error_code: Some(error_name(&e.code)),
            metadata: BTreeMap::new(),
        },
    });
}

fn details(world: &ProviderWorld) -> &Details {
    world.details.as_ref().expect("the flag was evaluated")
}

#[then(regex = r#"^the resolved details value should be "(.*)"$"#)]
fn resolved_value(world: &mut ProviderWorld, expected: String) {
    let (ty, key, _) = world.flag.as_ref().unwrap();
    let expected = typed(ty, &expected);
    let d = details(world);
    let equal = match (&d.value, &expected) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    };
    assert!(equal, "flag `{key}`: expected {expected}, got {d:?}");
}

#[then(regex = r#"^the reason should be "(.*)"$"#)]
fn reason(world: &mut ProviderWorld, expected: String) {
    let d = details(world);
    assert_eq!(d.reason, expected, "{d:?}");
}

#[then(regex = r#"^the variant should be "(.*)"$"#)]
fn variant(world: &mut ProviderWorld, expected: String) {
    let d = details(world);
    assert_eq!(d.variant.as_deref().unwrap_or(""), expected, "{d:?}");
}

#[then(regex = r#"^the error-code should be "(.*)"$"#)]
fn error_code(world: &mut ProviderWorld, expected: String) {
    let d = details(world);
    assert_eq!(d.error_code.as_deref().unwrap_or(""), expected, "{d:?}");
}

#[then("the resolved metadata should contain")]
fn metadata_contains(world: &mut ProviderWorld, step: &Step) {
    let d = details(world);
    for row in step.table.as_ref().expect("a table").rows.iter().skip(1) {
        let expected = typed(&row[1], &row[2]);
        let actual = d
            .metadata
            .get(row[0].as_str())
            .unwrap_or_else(|| panic!("metadata `{}` missing: {:?}", row[0], d.metadata));
        match (actual, &expected) {
            (Value::Number(a), Value::Number(b)) => {
                assert_eq!(a.as_f64(), b.as_f64(), "metadata `{}`", row[0])
            }
            (a, b) => assert_eq!(a, b, "metadata `{}`", row[0]),
        }
    }
}

#[then("the resolved metadata is empty")]
fn metadata_empty(world: &mut ProviderWorld) {
    let d = details(world);
    assert!(d.metadata.is_empty(), "{:?}", d.metadata);
}

// --- steps: events -------------------------------------------------------------------------------

/// Follows the provider's stream like the provider does, logging ready/stale/error/change events.
async fn watch_events(mode: Mode, env: Arc<Env>, events: Arc<Events>) {
    let log = |e: Event| events.log.lock().unwrap().push((Instant::now(), e));
    let mut broken_since: Option<Instant> = None;
    let mut errored = false;
    loop {
        let ports = env.stable_ports;
        let outcome: Result<(), String> = async {
            match mode {
                Mode::InProcess => {
                    let mut c = sync_v1::flag_sync_service_client::FlagSyncServiceClient::connect(format!(
                        "http://127.0.0.1:{}",
                        ports.sync
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                    let mut stream = c
                        .sync_flags(sync_v1::SyncFlagsRequest::default())
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    let mut previous: Option<Value> = None;
                    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
                        let config: Value = serde_json::from_str(&msg.flag_configuration).map_err(|e| e.to_string())?;
                        match &previous {
                            None => {
                                broken_since = None;
                                errored = false;
                                log(Event::Ready);
                            }
                            Some(old) => {
                                let keys: Vec<String> = config["flags"]
                                    .as_object()
                                    .into_iter()
                                    .flatten()
                                    .filter(|(k, v)| old["flags"].get(k.as_str()) != Some(v))
                                    .map(|(k, _)| k.clone())
                                    .collect();
                                log(Event::Change(keys));
                            }
                        }
                        previous = Some(config);
                    }
                    Ok(())
                }
                _ => {
                    let mut c = eval_v1::service_client::ServiceClient::connect(format!(
                        "http://127.0.0.1:{}",
                        ports.evaluation
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                    let mut stream = c
                        .event_stream(eval_v1::EventStreamRequest {})
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
                        match msg.r#type.as_str() {
                            "provider_ready" => {
                                broken_since = None;
                                errored = false;
                                log(Event::Ready);
                            }
                            "configuration_change" => {
                                let data = serde_json::to_value(msg.data.unwrap_or_default()).unwrap_or_default();
                                let keys = data["flags"]
                                    .as_object()
                                    .map(|m| m.keys().cloned().collect())
                                    .unwrap_or_default();
                                log(Event::Change(keys));
                            }
                            _ => {}
                        }
                    }
                    Ok(())
                }
            }
        }
        .await;
        let _ = outcome;
        // The stream broke (or ended): stale at once, error after the 5 s grace period.
        let since = *broken_since.get_or_insert_with(|| {
            log(Event::Stale);
            Instant::now()
        });
        if !errored && since.elapsed() > Duration::from_secs(5) {
            errored = true;
            log(Event::Error);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event_kind(name: &str) -> fn(&Event) -> bool {
    match name {
        "ready" => |e| *e == Event::Ready,
        "stale" => |e| *e == Event::Stale,
        "error" => |e| *e == Event::Error,
        _ => |e| matches!(e, Event::Change(_)),
    }
}

#[given(regex = r#"^a (ready|stale|error|change) event handler$"#)]
fn handler(world: &mut ProviderWorld, _kind: String) {
    if world.events.is_none() {
        let events = Arc::new(Events::default());
        world.handlers_since = Some(Instant::now());
        world.fired_since = Some(Instant::now());
        world.watcher = Some(tokio::spawn(watch_events(
            world.mode,
            world.env.clone(),
            events.clone(),
        )));
        world.events = Some(events);
    }
}

async fn wait_for_event(world: &ProviderWorld, kind: &str, since: Instant, within: Duration) -> Option<Event> {
    let events = world.events.as_ref().expect("an event handler");
    let matches = event_kind(kind);
    let deadline = Instant::now() + within;
    loop {
        if let Some((_, e)) = events
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|(t, e)| *t >= since && matches(e))
        {
            return Some(e.clone());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[when(regex = r#"^a (ready|stale|error|change) event was fired$"#)]
async fn event_fired(world: &mut ProviderWorld, kind: String) {
    let since = world.fired_since.expect("an event handler");
    let event = wait_for_event(world, &kind, since, Duration::from_secs(15)).await;
    assert!(event.is_some(), "no {kind} event");
    world.fired_since = Some(Instant::now());
    if let Some(Event::Change(keys)) = event {
        world.details = None;
        world
            .flag
            .get_or_insert_with(|| ("String".into(), String::new(), String::new()));
        CHANGED.lock().unwrap().replace(keys);
    }
}

static CHANGED: Mutex<Option<Vec<String>>> = Mutex::new(None);

#[then(regex = r#"^the (ready|stale|error|change) event handler should have been executed(?: within (\d+)ms)?$"#)]
async fn handler_executed(world: &mut ProviderWorld, kind: String, within: String) {
    let within = within.parse().map_or(Duration::from_secs(15), Duration::from_millis);
    let since = world.handlers_since.expect("an event handler");
    let at = wait_for_event_at(world, &kind, since, within).await;
    assert!(at.is_some(), "the {kind} handler did not run");
    // Later expectations are about later events, in order.
    world.handlers_since = at;
}

async fn wait_for_event_at(world: &ProviderWorld, kind: &str, since: Instant, within: Duration) -> Option<Instant> {
    let events = world.events.as_ref().expect("an event handler");
    let matches = event_kind(kind);
    let deadline = Instant::now() + within;
    loop {
        if let Some((t, _)) = events
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|(t, e)| *t >= since && matches(e))
        {
            return Some(*t);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[then(regex = r#"^the (ready|stale|error|change) event handler should not have been executed$"#)]
async fn handler_not_executed(world: &mut ProviderWorld, kind: String) {
    let events = world.events.as_ref().expect("an event handler");
    let matches = event_kind(&kind);
    assert!(
        !events.log.lock().unwrap().iter().any(|(_, e)| matches(e)),
        "the {kind} handler ran"
    );
}

#[when(regex = r#"^the connection is lost for (\d+)s$"#)]
async fn connection_lost(world: &mut ProviderWorld, seconds: String) {
    // Like the testbed launchpad's /restart: the server goes down now and comes back by itself.
    let down = Duration::from_secs(seconds.parse().unwrap());
    let server = world.env.stable.clone();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut server = server.lock().unwrap();
        server.stop();
        let _ = stopped_tx.send(());
        std::thread::sleep(down);
        server.restart_after(Duration::ZERO);
    });
    stopped_rx.await.unwrap();
}

#[when("the flag was modified")]
async fn flag_modified(world: &mut ProviderWorld) {
    let mut all = world.env.all_flags.lock().unwrap();
    let flag = &mut all["flags"]["changing-flag"];
    let next = if flag["defaultVariant"] == "foo" { "bar" } else { "foo" };
    flag["defaultVariant"] = json!(next);
    world.env.dir.write("flags/allFlags.json", &all.to_string());
}

#[then("the flag should be part of the event payload")]
fn flag_in_payload(world: &mut ProviderWorld) {
    let keys = CHANGED.lock().unwrap().clone().unwrap_or_default();
    let key = world.flag.as_ref().map(|f| f.1.clone()).unwrap_or_default();
    assert!(keys.contains(&key), "{key} not in {keys:?}");
}

// --- running -------------------------------------------------------------------------------------

fn environment(mode: Mode, fractional: &str) -> Env {
    let dir = Scratch::new("testbed");
    std::fs::create_dir_all(dir.0.join("flags")).unwrap();
    std::fs::create_dir_all(dir.0.join("rawflags")).unwrap();
    let mut all = all_flags(&testbed());
    if mode == Mode::InProcess {
        // The in-process engine rejects the whole payload if one flag has an unresolved $ref.
        let known: Vec<String> = all["$evaluators"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| format!("{{\"$ref\":\"{k}\"}}"))
            .collect();
        all["flags"].as_object_mut().unwrap().retain(|_, f| {
            let t = f["targeting"].to_string();
            let refs = t.matches("\"$ref\"").count();
            refs == known.iter().map(|k| t.matches(k.as_str()).count()).sum::<usize>()
        });
    }
    dir.write("flags/allFlags.json", &all.to_string());
    for name in ["selector-flags.json", "selector-flag-combined-metadata.json"] {
        dir.write(
            &format!("rawflags/{name}"),
            &std::fs::read_to_string(testbed().join("flags").join(name)).unwrap(),
        );
    }
    let common = ["--fractional", fractional];
    let default = [
        "-f",
        "file:flags/allFlags.json",
        "-f",
        "file:rawflags/selector-flags.json",
        "-X",
        "injectedmetadata=set",
    ];
    let stable = Server::start_in(&dir.0, &[&default[..], &common[..]].concat());
    let metadata = Server::start_in(
        &dir.0,
        &[
            &["-f", "file:rawflags/selector-flag-combined-metadata.json"][..],
            &common[..],
        ]
        .concat(),
    );
    let syncpayload = Server::start_in(
        &dir.0,
        &[&default[..], &common[..], &["--disable-sync-metadata"][..]].concat(),
    );
    let stable_ports = stable.ports;
    Env {
        stable: Arc::new(Mutex::new(stable)),
        stable_ports,
        metadata,
        syncpayload,
        all_flags: Mutex::new(all),
        dir,
    }
}

fn wanted(mode: Mode, fractional: &str, tags: &[String]) -> bool {
    let has = |t: &str| tags.iter().any(|x| x == t);
    let mode_ok = match mode {
        Mode::InProcess => has("in-process"),
        Mode::Rpc | Mode::Rest => has("rpc"),
    };
    // The Rust RPC provider speaks evaluation.v1; REST and in-process report the code default.
    let version_ok = match mode {
        Mode::Rpc => !has("no-default-variant"),
        Mode::InProcess | Mode::Rest => !has("deprecated"),
    };
    let scenario_fractional = tags
        .iter()
        .find_map(|t| t.strip_prefix("fractional-v"))
        .map(|v| format!("v{v}"));
    let fractional_ok = match scenario_fractional {
        Some(v) if v == "v1" || v == "v2" || v == "v3" => v == fractional,
        _ => fractional == "v3",
    };
    // Provider-side caching is a provider feature (rpc-caching.feature is not run here); the OFREP
    // client has no event stream.
    let streams_ok = mode != Mode::Rest || !(has("events") || has("grace"));
    mode_ok && version_ok && fractional_ok && streams_ok && !has("caching")
}

fn scenario_key(scenario: &cucumber::gherkin::Scenario) -> String {
    let steps: Vec<&str> = scenario.steps.iter().map(|s| s.value.as_str()).collect();
    format!("{} :: {}", scenario.name, steps.join(" / "))
}

async fn run(mode: Mode, fractional: &'static str, features: &Path) {
    let env = Arc::new(environment(mode, fractional));
    *ENV.lock().unwrap() = Some((mode, env.clone()));
    // Cucumber's own report goes to stderr only when asked for (VEXIL_E2E_VERBOSE=1); the summary
    // printed by `main` names every failure.
    let verbose = std::env::var_os("VEXIL_E2E_VERBOSE").is_some();
    let out: Box<dyn std::io::Write> = if verbose {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::sink())
    };
    let writer = cucumber::writer::Basic::raw(
        out,
        cucumber::writer::Coloring::Never,
        cucumber::writer::Verbosity::Default,
    );
    ProviderWorld::cucumber()
        .with_writer(cucumber::WriterExt::normalized(writer))
        .max_concurrent_scenarios(1)
        .after(move |feature, _, scenario, finished, _| {
            let passed = matches!(finished, cucumber::event::ScenarioFinished::StepPassed);
            let key = scenario_key(scenario);
            let steps = scenario.steps.iter().map(|s| s.value.clone()).collect();
            RESULTS
                .lock()
                .unwrap()
                .push((mode, feature.name.clone(), key, steps, passed));
            async {}.boxed_local()
        })
        .filter_run(features, move |feature, rule, scenario| {
            let tags: Vec<String> = feature
                .tags
                .iter()
                .chain(rule.iter().flat_map(|r| r.tags.iter()))
                .chain(scenario.tags.iter())
                .cloned()
                .collect();
            wanted(mode, fractional, &tags)
        })
        .await;
    *ENV.lock().unwrap() = None;
}

fn main() {
    // The provider features that apply to a server.
    let features = prepare_features(
        &testbed().join("gherkin"),
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-features"),
        &[
            "evaluation",
            "targeting",
            "metadata",
            "disabled",
            "selector",
            "contextEnrichment",
            "sync-payload",
            "events",
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // `VEXIL_E2E_MODES=rpc,rest,in-process` narrows a run while developing.
    let modes = std::env::var("VEXIL_E2E_MODES").unwrap_or_else(|_| "rpc,rest,in-process".into());
    let enabled = |m: Mode| modes.split(',').any(|x| x.trim() == m.name());
    runtime.block_on(async {
        for fractional in ["v1", "v2", "v3"] {
            if enabled(Mode::Rpc) {
                run(Mode::Rpc, fractional, &features).await;
            }
            if enabled(Mode::Rest) {
                run(Mode::Rest, fractional, &features).await;
            }
        }
        if enabled(Mode::InProcess) {
            run(Mode::InProcess, "v3", &features).await;
        }
    });

    let results = RESULTS.lock().unwrap().clone();
    let documents = [
        all_flags(&testbed()),
        load(&testbed().join("flags/selector-flags.json")),
        load(&testbed().join("flags/selector-flag-combined-metadata.json")),
    ];
    let mut failures = Vec::new();
    let mut counts: BTreeMap<Mode, (usize, usize, usize)> = BTreeMap::new();
    let mut limits: BTreeMap<(Mode, &str), usize> = BTreeMap::new();
    for (mode, feature, key, steps, passed) in &results {
        let c = counts.entry(*mode).or_default();
        match (passed, client_limitation(*mode, steps, &documents)) {
            (true, _) => c.0 += 1,
            (false, Some(reason)) => {
                c.1 += 1;
                *limits.entry((*mode, reason)).or_default() += 1;
            }
            (false, None) => {
                c.2 += 1;
                failures.push(format!("[{}] {feature}: {key}", mode.name()));
            }
        }
    }
    for (mode, (passed, limited, failed)) in &counts {
        println!(
            "providers {}: {} scenarios, {passed} passed, {failed} failed, {limited} not passable by the client:",
            mode.name(),
            passed + limited + failed
        );
        for ((m, reason), n) in &limits {
            if m == mode {
                println!("    {n:>3} × {reason}");
            }
        }
    }
    for f in &failures {
        println!("FAILED {f}");
    }
    if !failures.is_empty() || results.is_empty() {
        std::process::exit(1);
    }
}
