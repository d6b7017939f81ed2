//! Soak: a long run of every evaluation protocol at a fixed share of the mix's maximum throughput,
//! while the flag file is rewritten every few milliseconds (one write in ten invalid) and stream
//! subscribers come and go. It checks that no request fails, that no bulk answer mixes two
//! configuration versions, and samples the server's resident memory every second.
//!
//! Every valid generation `N` of the churned file carries `N` in its values (the `gen-*` flags,
//! whose every variant is `"gen-N"`) and in its metadata (`generation: N` on the flag set and on
//! every `gen-*` flag), so any answer can be traced to the configuration version it came from.
//! Invalid writes carry values (`"bad-K"`) and generations (above [`INVALID_GENERATION`]) that
//! must never be served.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::flagd::sync::v1 as sync;

use crate::driver::Pacer;
use crate::flags::{GeneratedFlag, catalog, context};
use crate::process::Server;
use crate::workload::to_struct;

/// Generations at or above this come from invalid writes: a server must never serve them.
pub const INVALID_GENERATION: u64 = 1_000_000_000;

/// A request that takes longer than this is an error (and the loop moves on).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request protocols of the mix, sent in equal shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// flagd.evaluation.v1 ResolveBoolean (gRPC).
    V1Boolean,
    /// flagd.evaluation.v1 ResolveString (gRPC).
    V1String,
    /// flagd.evaluation.v1 ResolveAll (gRPC; a bulk answer).
    V1All,
    /// flagd.evaluation.v2 ResolveBoolean (gRPC).
    V2Boolean,
    /// flagd.evaluation.v2 ResolveString (gRPC).
    V2String,
    /// flagd.evaluation.v1 ResolveString over the Connect protocol, JSON, HTTP/1.1.
    ConnectString,
    /// OFREP single-flag evaluation.
    OfrepSingle,
    /// OFREP bulk evaluation (a bulk answer).
    OfrepBulk,
    /// flagd.sync.v1 FetchAllFlags (a bulk answer).
    SyncFetchAll,
}

impl Proto {
    pub const ALL: [Proto; 9] = [
        Proto::V1Boolean,
        Proto::V1String,
        Proto::V1All,
        Proto::V2Boolean,
        Proto::V2String,
        Proto::ConnectString,
        Proto::OfrepSingle,
        Proto::OfrepBulk,
        Proto::SyncFetchAll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Proto::V1Boolean => "v1-boolean",
            Proto::V1String => "v1-string",
            Proto::V1All => "v1-resolve-all",
            Proto::V2Boolean => "v2-boolean",
            Proto::V2String => "v2-string",
            Proto::ConnectString => "connect-json-string",
            Proto::OfrepSingle => "ofrep-single",
            Proto::OfrepBulk => "ofrep-bulk",
            Proto::SyncFetchAll => "sync-fetch-all",
        }
    }

    fn index(self) -> usize {
        Proto::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub vexil: PathBuf,
    /// Scratch directory for the flag file and the server's log.
    pub dir: PathBuf,
    /// The open-loop phase.
    pub duration: Duration,
    /// The closed-loop phase that measures the mix's maximum throughput.
    pub calibrate: Duration,
    /// Share of the maximum throughput the open-loop phase runs at.
    pub share: f64,
    /// Concurrent requests (both phases).
    pub concurrency: usize,
    /// HTTP/2 connections for gRPC (evaluation and sync ports each).
    pub connections: usize,
    /// Time between two writes of the flag file.
    pub churn: Duration,
    /// Stream subscribers alive at any time (half EventStream, half SyncFlags).
    pub subscribers: usize,
    /// A subscriber lives a random time in this range, then is replaced.
    pub subscriber_life: (Duration, Duration),
    /// Catalog flags (static, targeting, fractional) beside the generation flags.
    pub flags: usize,
    /// Context attributes per request.
    pub attrs: usize,
    /// Extra arguments for `vexil start`.
    pub vexil_args: Vec<String>,
}

/// Latency quantiles of one window, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: h.max() as f64 / 1000.0,
        }
    }
}

/// One protocol's figures over the open-loop phase.
#[derive(Debug, Clone, Serialize)]
pub struct ProtoReport {
    pub protocol: Proto,
    pub name: &'static str,
    pub requests: u64,
    /// Requests answered correctly (not errors; mixed answers count here).
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub mixed: u64,
    pub first: Latency,
    pub last: Latency,
    pub all: Latency,
}

/// The calibration phase (closed loop).
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub mixed: u64,
    /// Requests per second of the mix, closed loop at `concurrency`.
    pub max_throughput: f64,
}

/// One kind of stream subscriber.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub stream: &'static str,
    /// Subscriptions made (each lives 1–10 s, then is closed by the client and replaced).
    pub sessions: u64,
    pub messages: u64,
    /// EventStream: `configuration_change` events; SyncFlags: payloads after the first.
    pub changes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// SyncFlags payloads that mixed two generations.
    pub mixed: u64,
}

/// The churned flag file.
#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    pub writes: u64,
    /// The last valid generation written (generation 1 is the file the server starts with).
    pub generations: u64,
    pub invalid_writes: u64,
    /// The highest generation seen in any answer.
    pub max_generation_served: u64,
    pub write_errors: u64,
    pub first_error: Option<String>,
}

/// Resident memory of the server, sampled every second.
#[derive(Debug, Clone, Serialize)]
pub struct Rss {
    /// When the server was ready (before any load).
    pub ready_kb: u64,
    /// At the start and end of the open-loop phase.
    pub start_kb: u64,
    pub end_kb: u64,
    pub peak_kb: u64,
    /// Least-squares slope over the last half of the open-loop phase.
    pub slope_kb_per_min: f64,
    /// (seconds since the open-loop phase started — negative during calibration, KiB).
    pub samples: Vec<(f64, u64)>,
}

/// Everything a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub share: f64,
    pub concurrency: usize,
    pub connections: usize,
    pub flags: usize,
    pub attributes: usize,
    pub churn_ms: f64,
    pub subscribers: usize,
    pub calibration: Calibration,
    /// The open-loop phase's arrival rate and what was achieved.
    pub target_rate: f64,
    pub achieved_rate: f64,
    /// Length of the first and last latency windows: a minute, or a tenth of the run if shorter.
    pub window_s: f64,
    pub requests: u64,
    /// Every error: requests (both phases), stream subscribers, flag-file writes, the server.
    pub errors: u64,
    pub mixed_answers: u64,
    pub first_mixed: Option<String>,
    pub server_error: Option<String>,
    pub protocols: Vec<ProtoReport>,
    pub overall_first: Latency,
    pub overall_last: Latency,
    pub overall_all: Latency,
    pub streams: Vec<StreamReport>,
    pub churn: Churn,
    pub rss: Rss,
    pub passed: bool,
}

// ---------------------------------------------------------------------------------------------
// The churned flag file

/// The keys of the generation flags of generation `n` (one key rotates, so keys come and go).
fn generation_keys(n: u64) -> Vec<String> {
    let mut keys: Vec<String> = ["gen-static", "gen-targeting", "gen-fractional"]
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
    keys.push(format!("gen-rotating-{}", n % 3));
    keys
}

/// The string keys single-flag string requests use: the stable generation flags first.
const GENERATION_KEYS: [&str; 3] = ["gen-static", "gen-targeting", "gen-fractional"];

/// A valid document of generation `n`: the catalog plus the generation flags, all values
/// `value` and metadata `generation: n`.
fn document(catalog: &[GeneratedFlag], n: u64, value: &str) -> Value {
    let mut doc = crate::flags::document(catalog);
    let flags = doc["flags"].as_object_mut().expect("flags object");
    for key in generation_keys(n) {
        let mut flag = json!({
            "state": "ENABLED",
            "variants": {"a": value, "b": value},
            "defaultVariant": "a",
            "metadata": {"generation": n},
        });
        if key == "gen-targeting" {
            flag["targeting"] = json!({"if": [{"in": ["@example.com", {"var": "email"}]}, "b", null]});
        } else if key == "gen-fractional" {
            flag["targeting"] = json!({"fractional": [["a", 50], ["b", 50]]});
        }
        flags.insert(key, flag);
    }
    doc["metadata"] = json!({"generation": n});
    doc
}

/// The text of write number `k` when it is invalid: alternately truncated JSON and a flag that
/// is not an object (both rejected as a whole). Values and generations mark it as never servable.
fn invalid_text(catalog: &[GeneratedFlag], k: u64) -> String {
    let mut doc = document(catalog, INVALID_GENERATION + k, &format!("bad-{k}"));
    if !(k / 10).is_multiple_of(2) {
        let text = doc.to_string();
        let mut cut = text.len() / 2;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text[..cut].to_owned()
    } else {
        doc["flags"]["gen-broken"] = json!(42);
        doc.to_string()
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------------------------
// Checking answers

/// What the soak has written and seen, shared by every task.
#[derive(Debug, Default)]
struct Generations {
    /// The newest valid generation written (set before the file is written).
    written: AtomicU64,
    /// The highest generation seen in an answer.
    served: AtomicU64,
}

/// Generation marks found in one answer.
#[derive(Debug, Default)]
struct Marks {
    gens: BTreeSet<u64>,
    bad: Option<String>,
}

impl Marks {
    /// A `gen-*` flag's value.
    fn value(&mut self, key: &str, value: Option<&str>) {
        if !key.starts_with("gen-") {
            return;
        }
        match value.and_then(|v| v.strip_prefix("gen-")).and_then(|n| n.parse().ok()) {
            Some(n) => {
                self.gens.insert(n);
            }
            None => {
                self.bad
                    .get_or_insert_with(|| format!("flag {key} has value {value:?}, not from a valid write"));
            }
        }
    }

    /// A `generation` metadata entry.
    fn metadata(&mut self, generation: Option<f64>) {
        if let Some(g) = generation {
            self.gens.insert(g as u64);
        }
    }

    fn metadata_json(&mut self, metadata: Option<&Value>) {
        self.metadata(metadata.and_then(|m| m.get("generation")).and_then(Value::as_f64));
    }

    fn metadata_struct(&mut self, metadata: Option<&JsonStruct>) {
        self.metadata(metadata.and_then(|m| m.to_map().get("generation").and_then(Value::as_f64)));
    }
}

/// A checked answer: fine, or from two generations at once.
#[derive(Debug)]
enum Verdict {
    Ok,
    Mixed(String),
}

impl Generations {
    /// Judges an answer's marks; `Err` for an answer no valid configuration could give.
    fn judge(&self, marks: Marks, bulk: bool) -> Result<Verdict, String> {
        if let Some(bad) = marks.bad {
            return Err(bad);
        }
        let written = self.written.load(Ordering::Acquire);
        let Some(&newest) = marks.gens.last() else {
            return if bulk {
                Err("a bulk answer without any generation".into())
            } else {
                Ok(Verdict::Ok)
            };
        };
        if newest > written {
            return Err(format!(
                "generation {newest} served, but the newest valid write is {written}"
            ));
        }
        self.served.fetch_max(newest, Ordering::Relaxed);
        if marks.gens.len() > 1 {
            return Ok(Verdict::Mixed(format!("generations {:?} in one answer", marks.gens)));
        }
        Ok(Verdict::Ok)
    }
}

/// The marks of a sync payload (FetchAllFlags or SyncFlags): every variant of `gen-*` flags and
/// every flag's metadata.
fn sync_marks(payload: &str) -> Result<Marks, String> {
    let doc: Value = serde_json::from_str(payload).map_err(|e| format!("sync payload is not JSON: {e}"))?;
    let flags = doc
        .get("flags")
        .and_then(Value::as_object)
        .ok_or("sync payload without flags")?;
    let mut marks = Marks::default();
    for (key, flag) in flags {
        if key.starts_with("gen-") {
            for v in flag.get("variants").and_then(Value::as_object).into_iter().flatten() {
                marks.value(key, Some(v.1.as_str().unwrap_or("?")));
            }
        }
        marks.metadata_json(flag.get("metadata"));
    }
    marks.metadata_json(doc.get("metadata"));
    Ok(marks)
}

// ---------------------------------------------------------------------------------------------
// Sending requests

#[derive(Debug)]
struct Clients {
    v1: Vec<v1::service_client::ServiceClient<Channel>>,
    v2: Vec<v2::service_client::ServiceClient<Channel>>,
    sync: Vec<sync::flag_sync_service_client::FlagSyncServiceClient<Channel>>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    evaluation_port: u16,
    ofrep_port: u16,
}

/// One request's inputs.
#[derive(Debug)]
struct Input {
    bool_key: String,
    string_key: String,
    pcontext: JsonStruct,
    /// `{"context": …}` (OFREP).
    ofrep_body: Bytes,
    /// `{"flagKey": …, "context": …}` (Connect).
    connect_body: Bytes,
}

fn inputs(catalog: &[GeneratedFlag], attrs: usize, count: usize) -> Vec<Input> {
    let booleans: Vec<&str> = catalog.iter().filter(|f| f.boolean).map(|f| f.key.as_str()).collect();
    let strings: Vec<&str> = catalog.iter().filter(|f| !f.boolean).map(|f| f.key.as_str()).collect();
    (0..count)
        .map(|i| {
            let ctx = context(attrs, i as u64);
            let bool_key = booleans.get(i % booleans.len().max(1)).copied().unwrap_or("gen-static");
            // Half the string requests read a generation flag, half a catalog flag.
            let string_key = if i % 2 == 0 || strings.is_empty() {
                GENERATION_KEYS[(i / 2) % GENERATION_KEYS.len()]
            } else {
                strings[(i / 2) % strings.len()]
            };
            Input {
                bool_key: bool_key.to_owned(),
                string_key: string_key.to_owned(),
                pcontext: to_struct(&ctx),
                ofrep_body: Bytes::from(json!({ "context": ctx }).to_string()),
                connect_body: Bytes::from(json!({ "flagKey": string_key, "context": ctx }).to_string()),
            }
        })
        .collect()
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Clients {
    async fn connect(evaluation: u16, sync_port: u16, ofrep: u16, connections: usize) -> anyhow::Result<Clients> {
        let (mut v1s, mut v2s, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..connections.max(1) {
            let channel = endpoint(evaluation)?.connect().await?;
            v1s.push(v1::service_client::ServiceClient::new(channel.clone()));
            v2s.push(v2::service_client::ServiceClient::new(channel));
            let channel = endpoint(sync_port)?.connect().await?;
            syncs.push(sync::flag_sync_service_client::FlagSyncServiceClient::new(channel));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Clients {
            v1: v1s,
            v2: v2s,
            sync: syncs,
            http,
            evaluation_port: evaluation,
            ofrep_port: ofrep,
        })
    }

    /// A POST with a JSON body on loopback; the answer's JSON.
    async fn post_json(&self, port: u16, path: &str, body: Bytes) -> Result<Value, String> {
        let request = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = self.http.request(request).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("answer is not JSON: {e}"))
    }

    /// Sends one request of `proto` and checks its answer.
    async fn send(&self, proto: Proto, n: usize, input: &Input, gens: &Generations) -> Result<Verdict, String> {
        let mut marks = Marks::default();
        let mut bulk = false;
        let c = n % self.v1.len();
        match proto {
            Proto::V1Boolean => {
                let r = self.v1[c]
                    .clone()
                    .resolve_boolean(v1::ResolveBooleanRequest {
                        flag_key: input.bool_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V1String => {
                let r = self.v1[c]
                    .clone()
                    .resolve_string(v1::ResolveStringRequest {
                        flag_key: input.string_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.value(&input.string_key, Some(&r.value));
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V1All => {
                bulk = true;
                let r = self.v1[c]
                    .clone()
                    .resolve_all(v1::ResolveAllRequest {
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                for (key, flag) in &r.flags {
                    let value = match &flag.value {
                        Some(v1::any_flag::Value::StringValue(s)) => Some(s.as_str()),
                        _ => None,
                    };
                    marks.value(key, value);
                    marks.metadata_struct(flag.metadata.as_ref());
                }
            }
            Proto::V2Boolean => {
                let r = self.v2[c]
                    .clone()
                    .resolve_boolean(v2::ResolveBooleanRequest {
                        flag_key: input.bool_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V2String => {
                let r = self.v2[c]
                    .clone()
                    .resolve_string(v2::ResolveStringRequest {
                        flag_key: input.string_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.value(&input.string_key, r.value.as_deref());
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::ConnectString => {
                let r = self
                    .post_json(
                        self.evaluation_port,
                        "/flagd.evaluation.v1.Service/ResolveString",
                        input.connect_body.clone(),
                    )
                    .await?;
                marks.value(&input.string_key, r.get("value").and_then(Value::as_str));
                marks.metadata_json(r.get("metadata"));
            }
            Proto::OfrepSingle => {
                // Alternately a boolean catalog flag and a generation flag.
                let key = if n.is_multiple_of(2) {
                    &input.bool_key
                } else {
                    &input.string_key
                };
                let r = self
                    .post_json(
                        self.ofrep_port,
                        &format!("/ofrep/v1/evaluate/flags/{key}"),
                        input.ofrep_body.clone(),
                    )
                    .await?;
                if key.starts_with("gen-") {
                    marks.value(key, r.get("value").and_then(Value::as_str));
                }
                marks.metadata_json(r.get("metadata"));
            }
            Proto::OfrepBulk => {
                bulk = true;
                let r = self
                    .post_json(self.ofrep_port, "/ofrep/v1/evaluate/flags", input.ofrep_body.clone())
                    .await?;
                let flags = r
                    .get("flags")
                    .and_then(Value::as_array)
                    .ok_or("bulk answer without flags")?;
                for flag in flags {
                    let key = flag.get("key").and_then(Value::as_str).unwrap_or("");
                    marks.value(key, flag.get("value").and_then(Value::as_str));
                    marks.metadata_json(flag.get("metadata"));
                }
                marks.metadata_json(r.get("metadata"));
            }
            Proto::SyncFetchAll => {
                bulk = true;
                let r = self.sync[n % self.sync.len()]
                    .clone()
                    .fetch_all_flags(sync::FetchAllFlagsRequest::default())
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks = sync_marks(&r.flag_configuration)?;
            }
        }
        gens.judge(marks, bulk)
    }
}

fn endpoint(port: u16) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5)))
}

// ---------------------------------------------------------------------------------------------
// Recording

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
struct ProtoStats {
    requests: u64,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    mixed: u64,
    first_mixed: Option<String>,
    first: Histogram<u64>,
    last: Histogram<u64>,
    all: Histogram<u64>,
}

impl ProtoStats {
    fn new() -> ProtoStats {
        ProtoStats {
            requests: 0,
            ok: 0,
            errors: 0,
            first_error: None,
            mixed: 0,
            first_mixed: None,
            first: histogram(),
            last: histogram(),
            all: histogram(),
        }
    }
}

/// Where a request's latency goes.
#[derive(Debug, Clone, Copy)]
enum Window {
    First,
    Middle,
    Last,
}

/// Per-protocol statistics of one phase (one lock per protocol: uncontended in practice).
#[derive(Debug)]
struct Stats {
    protos: Vec<Mutex<ProtoStats>>,
    record_latency: bool,
}

impl Stats {
    fn new(record_latency: bool) -> Stats {
        Stats {
            protos: Proto::ALL.iter().map(|_| Mutex::new(ProtoStats::new())).collect(),
            record_latency,
        }
    }

    fn record(&self, proto: Proto, latency: Duration, result: Result<Verdict, String>, window: Window) {
        let mut s = self.protos[proto.index()].lock().expect("stats lock");
        s.requests += 1;
        match result {
            Ok(verdict) => {
                s.ok += 1;
                if let Verdict::Mixed(what) = verdict {
                    s.mixed += 1;
                    s.first_mixed.get_or_insert(what);
                }
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
            }
        }
        if self.record_latency {
            let ns = (latency.as_nanos().min(u128::from(u64::MAX)) as u64).max(1);
            let _ = s.all.record(ns);
            let _ = match window {
                Window::First => s.first.record(ns),
                Window::Last => s.last.record(ns),
                Window::Middle => Ok(()),
            };
        }
    }

    fn into_inner(self) -> Vec<ProtoStats> {
        self.protos
            .into_iter()
            .map(|m| m.into_inner().expect("stats lock"))
            .collect()
    }
}

/// Shared by every request loop.
#[derive(Debug)]
struct Load {
    clients: Clients,
    inputs: Vec<Input>,
    gens: Arc<Generations>,
}

/// Runs `concurrency` request loops from `start` to `end`: closed loop when `rate` is `None`,
/// else open loop at `rate` requests/s in total (latency from each request's intended start).
async fn drive(
    load: Arc<Load>,
    stats: Arc<Stats>,
    concurrency: usize,
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    window: Duration,
) {
    let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1e-6)));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (load, stats) = (load.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let mut pacer = Pacer::new(start, interval, w, concurrency);
            let mut i = w;
            loop {
                let intended = pacer.next().await;
                if intended >= end {
                    break;
                }
                let proto = Proto::ALL[i % Proto::ALL.len()];
                let input = &load.inputs[(i / Proto::ALL.len()) % load.inputs.len()];
                let result = tokio::time::timeout(REQUEST_TIMEOUT, load.clients.send(proto, i, input, &load.gens))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
                let done = Instant::now();
                let since = intended.saturating_duration_since(start);
                let w = if since < window {
                    Window::First
                } else if end.saturating_duration_since(intended) <= window {
                    Window::Last
                } else {
                    Window::Middle
                };
                stats.record(proto, done - intended, result, w);
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------
// Stream subscribers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    EventStream,
    SyncFlags,
}

#[derive(Debug, Default)]
struct StreamStats {
    sessions: u64,
    messages: u64,
    changes: u64,
    errors: u64,
    first_error: Option<String>,
    mixed: u64,
    first_mixed: Option<String>,
}

impl StreamStats {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// A small deterministic generator (splitmix64) for subscriber lifetimes.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(if span == 0 { 0 } else { self.next() % (span + 1) })
    }
}

/// One subscription living until `until` (or `stop`), reading every message.
async fn subscribe_once(
    kind: StreamKind,
    port: u16,
    until: Instant,
    stop: &mut watch::Receiver<bool>,
    gens: &Generations,
    stats: &Mutex<StreamStats>,
) -> Result<(), String> {
    let channel = tokio::time::timeout(REQUEST_TIMEOUT, endpoint(port).map_err(|e| e.to_string())?.connect())
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| format!("connecting: {e}"))?;
    stats.lock().expect("stream stats").sessions += 1;
    let mut first = true;
    match kind {
        StreamKind::EventStream => {
            let mut client = v1::service_client::ServiceClient::new(channel);
            let mut stream = client
                .event_stream(v1::EventStreamRequest {})
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m.map_err(|s| status_text(&s))?,
                    _ = tokio::time::sleep_until(until) => return Ok(()),
                    _ = stop.changed() => return Ok(()),
                };
                let Some(msg) = msg else {
                    return Err("the server ended the stream".into());
                };
                let mut s = stats.lock().expect("stream stats");
                s.messages += 1;
                if first && msg.r#type != "provider_ready" {
                    return Err(format!("first event is {:?}, not provider_ready", msg.r#type));
                }
                if msg.r#type == "configuration_change" {
                    s.changes += 1;
                }
                first = false;
            }
        }
        StreamKind::SyncFlags => {
            let mut client = sync::flag_sync_service_client::FlagSyncServiceClient::new(channel);
            let mut stream = client
                .sync_flags(sync::SyncFlagsRequest::default())
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m.map_err(|s| status_text(&s))?,
                    _ = tokio::time::sleep_until(until) => return Ok(()),
                    _ = stop.changed() => return Ok(()),
                };
                let Some(msg) = msg else {
                    return Err("the server ended the stream".into());
                };
                let verdict = gens.judge(sync_marks(&msg.flag_configuration)?, true)?;
                let mut s = stats.lock().expect("stream stats");
                s.messages += 1;
                if !first {
                    s.changes += 1;
                }
                if let Verdict::Mixed(what) = verdict {
                    s.mixed += 1;
                    s.first_mixed.get_or_insert(what);
                }
                first = false;
            }
        }
    }
}

/// A subscriber slot: subscribes for a random lifetime, closes, and subscribes again until `stop`.
async fn subscriber(
    kind: StreamKind,
    port: u16,
    life: (Duration, Duration),
    seed: u64,
    mut stop: watch::Receiver<bool>,
    gens: Arc<Generations>,
    stats: Arc<Mutex<StreamStats>>,
) {
    let mut rng = Rng(seed);
    while !*stop.borrow() {
        let until = Instant::now() + rng.between(life.0, life.1);
        if let Err(e) = subscribe_once(kind, port, until, &mut stop, &gens, &stats).await {
            stats.lock().expect("stream stats").error(e);
            // Do not spin on a server that refuses.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Least-squares slope of `points` (x, y), or 0 with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// Runs a soak; the report says whether it passed.
pub async fn run(spec: &SoakSpec) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(spec.share > 0.0, "--share must be positive");
    anyhow::ensure!(!spec.churn.is_zero(), "--churn-ms must be positive");
    anyhow::ensure!(spec.concurrency > 0, "--concurrency must be positive");
    let catalog = catalog(spec.flags);
    let path = spec.dir.join("soak-flags.json");
    let gens = Arc::new(Generations::default());
    gens.written.store(1, Ordering::Release);
    write_atomically(&path, &document(&catalog, 1, "gen-1").to_string())?;

    let log_path = spec.dir.join("vexil.log");
    let log = std::fs::File::create(&log_path)?;
    let mut server = Server::vexil_with_stderr(&spec.vexil, &path, &spec.vexil_args, log.into())?;
    server.wait_ready(Duration::from_secs(60))?;
    let pid = server.pid();
    let ready_kb = rss_kb(pid).unwrap_or(0);
    let ports = server.ports;

    let clients = Clients::connect(ports.evaluation, ports.sync, ports.ofrep, spec.connections).await?;
    let load = Arc::new(Load {
        clients,
        inputs: inputs(&catalog, spec.attrs, 1024),
        gens: gens.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // RSS every second.
    let sampler = {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(Instant, u64)> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                match rss_kb(pid) {
                    Some(kb) => samples.push((Instant::now(), kb)),
                    None => break,
                }
            }
            if let Some(kb) = rss_kb(pid) {
                samples.push((Instant::now(), kb));
            }
            samples
        })
    };

    // Churn: a write every `churn`; every tenth is invalid.
    let churner = {
        let (mut stop, gens, catalog, churn) = (stop_rx.clone(), gens.clone(), catalog.clone(), spec.churn);
        tokio::spawn(async move {
            let mut churn_stats = Churn {
                writes: 0,
                generations: 1,
                invalid_writes: 0,
                max_generation_served: 0,
                write_errors: 0,
                first_error: None,
            };
            let mut tick = tokio::time::interval(churn);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            for k in 1u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let text = if k.is_multiple_of(10) {
                    churn_stats.invalid_writes += 1;
                    invalid_text(&catalog, k)
                } else {
                    churn_stats.generations += 1;
                    let n = churn_stats.generations;
                    // Announced before it is written: a served generation is never ahead of it.
                    gens.written.store(n, Ordering::Release);
                    document(&catalog, n, &format!("gen-{n}")).to_string()
                };
                churn_stats.writes += 1;
                if let Err(e) = write_atomically(&path, &text) {
                    churn_stats.write_errors += 1;
                    churn_stats.first_error.get_or_insert(e.to_string());
                }
            }
            churn_stats
        })
    };

    // Stream subscribers.
    let event_stats = Arc::new(Mutex::new(StreamStats::default()));
    let sync_stats = Arc::new(Mutex::new(StreamStats::default()));
    let mut subscribers = Vec::new();
    for s in 0..spec.subscribers {
        let (kind, port, stats) = if s % 2 == 0 {
            (StreamKind::EventStream, ports.evaluation, event_stats.clone())
        } else {
            (StreamKind::SyncFlags, ports.sync, sync_stats.clone())
        };
        subscribers.push(tokio::spawn(subscriber(
            kind,
            port,
            spec.subscriber_life,
            0x5eed_0000 + s as u64,
            stop_rx.clone(),
            gens.clone(),
            stats,
        )));
    }

    // Phase 1: the mix's maximum throughput, closed loop.
    let calibration_stats = Arc::new(Stats::new(false));
    let calibration_start = Instant::now();
    drive(
        load.clone(),
        calibration_stats.clone(),
        spec.concurrency,
        calibration_start,
        calibration_start + spec.calibrate,
        None,
        Duration::ZERO,
    )
    .await;
    let calibration_elapsed = calibration_start.elapsed();
    let calibration_protos = Arc::try_unwrap(calibration_stats)
        .map_err(|_| anyhow::anyhow!("calibration still running"))?
        .into_inner();
    let calibration_requests: u64 = calibration_protos.iter().map(|p| p.requests).sum();
    let calibration_ok: u64 = calibration_protos.iter().map(|p| p.ok).sum();
    let max_throughput = calibration_ok as f64 / spec.calibrate.as_secs_f64().max(1e-9);
    let target_rate = (max_throughput * spec.share).max(1.0);

    // Phase 2: open loop at a share of it.
    let window = Duration::from_secs(60)
        .min(spec.duration / 10)
        .max(Duration::from_millis(1));
    let soak_stats = Arc::new(Stats::new(true));
    let soak_start = Instant::now();
    let soak_end = soak_start + spec.duration;
    drive(
        load.clone(),
        soak_stats.clone(),
        spec.concurrency,
        soak_start,
        soak_end,
        Some(target_rate),
        window,
    )
    .await;
    let soak_elapsed = soak_start.elapsed().min(spec.duration).max(Duration::from_millis(1));

    let _ = stop_tx.send(true);
    let mut churn = churner.await?;
    for s in subscribers {
        let _ = s.await;
    }
    let samples = sampler.await?;
    let server_error = server
        .exit_status()
        .map(|s| format!("the server exited during the soak: {s}"));
    drop(load);
    drop(server);

    // Report.
    let protos = Arc::try_unwrap(soak_stats)
        .map_err(|_| anyhow::anyhow!("soak still running"))?
        .into_inner();
    churn.max_generation_served = gens.served.load(Ordering::Relaxed);
    let mut overall = (histogram(), histogram(), histogram());
    let mut protocols = Vec::new();
    let mut first_mixed = None;
    for (proto, s) in Proto::ALL.iter().zip(&protos) {
        let _ = overall.0.add(&s.first);
        let _ = overall.1.add(&s.last);
        let _ = overall.2.add(&s.all);
        if first_mixed.is_none() {
            first_mixed.clone_from(&s.first_mixed);
        }
        protocols.push(ProtoReport {
            protocol: *proto,
            name: proto.name(),
            requests: s.requests,
            ok: s.ok,
            errors: s.errors,
            first_error: s.first_error.clone(),
            mixed: s.mixed,
            first: Latency::of(&s.first),
            last: Latency::of(&s.last),
            all: Latency::of(&s.all),
        });
    }
    let calibration = Calibration {
        seconds: calibration_elapsed.as_secs_f64(),
        requests: calibration_requests,
        errors: calibration_protos.iter().map(|p| p.errors).sum(),
        first_error: Proto::ALL
            .iter()
            .zip(&calibration_protos)
            .find_map(|(p, s)| s.first_error.as_ref().map(|e| format!("{}: {e}", p.name()))),
        mixed: calibration_protos.iter().map(|p| p.mixed).sum(),
        max_throughput,
    };
    if first_mixed.is_none() {
        first_mixed = calibration_protos.iter().find_map(|p| p.first_mixed.clone());
    }
    let streams: Vec<StreamReport> = [("event-stream", &event_stats), ("sync-flags", &sync_stats)]
        .into_iter()
        .map(|(name, stats)| {
            let s = stats.lock().expect("stream stats");
            StreamReport {
                stream: name,
                sessions: s.sessions,
                messages: s.messages,
                changes: s.changes,
                errors: s.errors,
                first_error: s.first_error.clone(),
                mixed: s.mixed,
            }
        })
        .collect();
    for (name, stats) in [("event-stream", &event_stats), ("sync-flags", &sync_stats)] {
        let s = stats.lock().expect("stream stats");
        if first_mixed.is_none() {
            first_mixed = s.first_mixed.clone().map(|m| format!("{name}: {m}"));
        }
    }

    let rel: Vec<(f64, u64)> = samples
        .iter()
        .map(|(at, kb)| {
            let t = if *at >= soak_start {
                at.duration_since(soak_start).as_secs_f64()
            } else {
                -soak_start.duration_since(*at).as_secs_f64()
            };
            (t, *kb)
        })
        .collect();
    let during: Vec<&(f64, u64)> = rel.iter().filter(|(t, _)| *t >= 0.0).collect();
    let half = spec.duration.as_secs_f64() / 2.0;
    let late: Vec<(f64, f64)> = during
        .iter()
        .filter(|(t, _)| *t >= half)
        .map(|(t, kb)| (*t / 60.0, *kb as f64))
        .collect();
    let rss = Rss {
        ready_kb,
        start_kb: during.first().map_or(0, |s| s.1),
        end_kb: during.last().map_or(0, |s| s.1),
        peak_kb: rel.iter().map(|s| s.1).max().unwrap_or(0),
        slope_kb_per_min: slope(&late),
        samples: rel,
    };

    let requests: u64 = protocols.iter().map(|p| p.requests).sum();
    let errors = protocols.iter().map(|p| p.errors).sum::<u64>()
        + calibration.errors
        + streams.iter().map(|s| s.errors).sum::<u64>()
        + churn.write_errors
        + u64::from(server_error.is_some());
    let mixed_answers = protocols.iter().map(|p| p.mixed).sum::<u64>()
        + calibration.mixed
        + streams.iter().map(|s| s.mixed).sum::<u64>();
    Ok(SoakReport {
        duration_s: spec.duration.as_secs_f64(),
        share: spec.share,
        concurrency: spec.concurrency,
        connections: spec.connections,
        flags: spec.flags,
        attributes: spec.attrs,
        churn_ms: spec.churn.as_secs_f64() * 1000.0,
        subscribers: spec.subscribers,
        calibration,
        target_rate,
        achieved_rate: requests as f64 / soak_elapsed.as_secs_f64(),
        window_s: window.as_secs_f64(),
        requests,
        errors,
        mixed_answers,
        first_mixed,
        server_error,
        protocols,
        overall_first: Latency::of(&overall.0),
        overall_last: Latency::of(&overall.1),
        overall_all: Latency::of(&overall.2),
        streams,
        churn,
        rss,
        passed: errors == 0 && mixed_answers == 0,
    })
}

// ---------------------------------------------------------------------------------------------
// The table

fn lat(l: &Latency) -> String {
    if l.count == 0 {
        return "-".into();
    }
    format!("{:.0} / {:.0} / {:.0} / {:.0}", l.p50_us, l.p90_us, l.p99_us, l.p999_us)
}

/// The report as readable text (Markdown tables).
pub fn table(r: &SoakReport) -> String {
    let mut out = String::new();
    let mib = |kb: u64| kb as f64 / 1024.0;
    out.push_str(&format!(
        "soak: {:.0} s at {:.0}% of the mix's maximum ({:.0} req/s closed loop at {} in flight) → target {:.0} req/s, achieved {:.0} req/s\n",
        r.duration_s,
        r.share * 100.0,
        r.calibration.max_throughput,
        r.concurrency,
        r.target_rate,
        r.achieved_rate
    ));
    out.push_str(&format!(
        "flags: {} catalog + generation flags, {} context attributes; churn every {:.0} ms: {} writes, generation 1 → {}, {} invalid, newest generation served {}\n",
        r.flags,
        r.attributes,
        r.churn_ms,
        r.churn.writes,
        r.churn.generations,
        r.churn.invalid_writes,
        r.churn.max_generation_served
    ));
    out.push_str(&format!(
        "RSS: ready {:.1} MiB, start {:.1} MiB, end {:.1} MiB, peak {:.1} MiB; slope over the last half {:+.1} KB/min\n",
        mib(r.rss.ready_kb),
        mib(r.rss.start_kb),
        mib(r.rss.end_kb),
        mib(r.rss.peak_kb),
        r.rss.slope_kb_per_min
    ));
    out.push_str(&format!(
        "requests {} (+{} calibrating), errors {}, mixed answers {}\n\n",
        r.requests, r.calibration.requests, r.errors, r.mixed_answers
    ));
    let w = if r.window_s.fract() == 0.0 {
        format!("{:.0}", r.window_s)
    } else {
        format!("{:.1}", r.window_s)
    };
    out.push_str(&format!(
        "| protocol | requests | errors | mixed | first {w} s p50 / p90 / p99 / p99.9 µs | last {w} s p50 / p90 / p99 / p99.9 µs |\n|---|---|---|---|---|---|\n"
    ));
    for p in &r.protocols {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            p.name,
            p.requests,
            p.errors,
            p.mixed,
            lat(&p.first),
            lat(&p.last)
        ));
    }
    out.push_str(&format!(
        "| **all** | {} | {} | {} | {} | {} |\n\n",
        r.requests,
        r.protocols.iter().map(|p| p.errors).sum::<u64>(),
        r.protocols.iter().map(|p| p.mixed).sum::<u64>(),
        lat(&r.overall_first),
        lat(&r.overall_last)
    ));
    out.push_str("| stream | sessions | messages | changes | errors | mixed |\n|---|---|---|---|---|---|\n");
    for s in &r.streams {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            s.stream, s.sessions, s.messages, s.changes, s.errors, s.mixed
        ));
    }
    let mut problems = Vec::new();
    if let Some(e) = &r.calibration.first_error {
        problems.push(format!("calibration: {} errors, first: {e}", r.calibration.errors));
    }
    for p in r.protocols.iter().filter(|p| p.errors > 0) {
        problems.push(format!(
            "{}: {} errors, first: {}",
            p.name,
            p.errors,
            p.first_error.as_deref().unwrap_or("?")
        ));
    }
    for s in r.streams.iter().filter(|s| s.errors > 0) {
        problems.push(format!(
            "{}: {} errors, first: {}",
            s.stream,
            s.errors,
            s.first_error.as_deref().unwrap_or("?")
        ));
    }
    if let Some(e) = &r.churn.first_error {
        problems.push(format!("flag file: {} write errors, first: {e}", r.churn.write_errors));
    }
    if let Some(e) = &r.server_error {
        problems.push(e.clone());
    }
    if let Some(m) = &r.first_mixed {
        problems.push(format!("{} mixed answers, first: {m}", r.mixed_answers));
    }
    out.push('\n');
    for p in &problems {
        out.push_str(&format!("- {p}\n"));
    }
    out.push_str(if r.passed {
        "PASS: no errors, no mixed answers\n"
    } else {
        "FAIL\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_slope() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), 3.0 * f64::from(i) + 7.0)).collect();
        assert!((slope(&points) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 6.0)]), 0.0);
    }

    #[test]
    fn generations_are_read_from_sync_payloads() {
        let catalog = catalog(6);
        let gens = Generations::default();
        gens.written.store(7, Ordering::Release);
        // What vexil sends is the document's flags with their metadata: the written one serves.
        let doc = document(&catalog, 7, "gen-7");
        let marks = sync_marks(&doc.to_string()).unwrap();
        assert_eq!(marks.gens, BTreeSet::from([7]));
        assert!(matches!(gens.judge(marks, true), Ok(Verdict::Ok)));
        assert_eq!(gens.served.load(Ordering::Relaxed), 7);

        // One flag from another version: mixed.
        let mut mixed = document(&catalog, 7, "gen-7");
        mixed["flags"]["gen-static"]["variants"]["b"] = json!("gen-6");
        let verdict = gens.judge(sync_marks(&mixed.to_string()).unwrap(), true).unwrap();
        assert!(matches!(verdict, Verdict::Mixed(_)), "{verdict:?}");

        // A generation not written yet, or an invalid write's values: errors.
        let ahead = document(&catalog, 8, "gen-8");
        assert!(gens.judge(sync_marks(&ahead.to_string()).unwrap(), true).is_err());
        let bad = document(&catalog, INVALID_GENERATION + 10, "bad-10");
        assert!(gens.judge(sync_marks(&bad.to_string()).unwrap(), true).is_err());
        // A bulk answer must carry a generation; a single one need not.
        assert!(gens.judge(Marks::default(), true).is_err());
        assert!(matches!(gens.judge(Marks::default(), false), Ok(Verdict::Ok)));
    }

    #[test]
    fn invalid_writes_do_not_parse_as_flag_documents() {
        let catalog = catalog(6);
        let truncated = invalid_text(&catalog, 10);
        assert!(serde_json::from_str::<Value>(&truncated).is_err());
        let broken: Value = serde_json::from_str(&invalid_text(&catalog, 20)).unwrap();
        assert_eq!(broken["flags"]["gen-broken"], json!(42));
        assert_eq!(broken["flags"]["gen-static"]["variants"]["a"], json!("bad-20"));
    }

    #[test]
    fn generation_flags_rotate_one_key() {
        assert!(generation_keys(1).contains(&"gen-rotating-1".to_owned()));
        assert!(!generation_keys(2).contains(&"gen-rotating-1".to_owned()));
        let doc = document(&catalog(3), 5, "gen-5");
        assert_eq!(doc["metadata"]["generation"], json!(5));
        assert_eq!(doc["flags"].as_object().unwrap().len(), 3 + 4);
    }

    #[test]
    fn subscriber_lifetimes_stay_in_range() {
        let mut rng = Rng(1);
        for _ in 0..1000 {
            let d = rng.between(Duration::from_secs(1), Duration::from_secs(10));
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(10));
        }
    }
}
