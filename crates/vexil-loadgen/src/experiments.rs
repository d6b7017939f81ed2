//! The experiments feature's figures (`vexil-loadgen experiments`): how fast tracked events are
//! taken, how long an experiment's results take to compute from the raw events, and what an
//! experiment flag costs evaluation beside a plain one.
//!
//! Every measurement gets a fresh database — on PostgreSQL a new database of `vexil-testkit`'s
//! server (a throwaway one started from the installed binaries, tuned for tests: `fsync`,
//! `synchronous_commit` and `full_page_writes` off; or the server of `VEXIL_TEST_DATABASE_URL`),
//! on SQLite a new file — and a fresh `vexil serve --database-url … --default-environment prod
//! --track-rate-limit 0 --results-refresh-seconds 0` on free ports (results only on request: no
//! background computation beside what is measured). Environment `prod`, flag set `web`, set up
//! through the JSON API on the server's HTTP (OFREP) port.
//!
//! - **Ingest:** `clients` closed-loop clients each send `POST /v1/track:batch` with `batch`
//!   conversion events (or `POST /v1/track` with one, for a batch of 1), every event id unique, for
//!   `seconds` after an unrecorded warm-up. Events/s counts the events the answers say were
//!   accepted (an answer comes once its events are committed), over the calls that completed in
//!   the measured window; latency is that of one call. CPU: the server's, this process's and the
//!   whole machine's (which includes the database), in cores, from `/proc` over the window.
//! - **Results:** an experiment on flag `checkout` (variants `control` and `treatment`, metrics
//!   `purchase`, binomial, and `revenue`, mean) is created and started; then `events` events are
//!   written straight into the server's database with the store's own insert path
//!   ([`EventStore::insert_events`]; on PostgreSQL 1,000 events a call, `load_concurrency` calls
//!   at once; on SQLite, which takes one writer at a time, 100 a call, one at a time): one exposure
//!   per unit (`events / 8` units, each to one variant) and 7 conversions per unit (`purchase`
//!   about 6–7 % of them, `revenue` with a value the rest), deterministic (a seeded hash, no random
//!   generator), with server times after the experiment's start and before the first query. Then
//!   `GET /v1/environments/prod/experiments/<key>/results?refresh=true` (computed now, not the
//!   server's last scheduled results) is timed: the first call, then the
//!   median of 5 more. The first answer's exposed units are checked against what was loaded.
//! - **Evaluation:** flags `plain` and `split` with the same two variants, a running experiment
//!   (100 % of traffic) on `split`. `concurrency` closed-loop workers ask for one of them over
//!   gRPC (`vexil.v1.EvaluationService/Evaluate`, over `connections` HTTP/2 connections) or OFREP,
//!   each request with a targetingKey never used before, so every evaluation of `split` is a new
//!   exposure recorded by the server (deduplicated in memory, queued, written in the background
//!   in batches) as in production; `plain` first, then `split`, the same duration. The answers'
//!   reason is checked (`STATIC`, `SPLIT`); the server's exposure counters
//!   (`vexil_exposures_total`) are read before and after.

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use vexil_proto::JsonStruct;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::evaluation_service_client::EvaluationServiceClient;
use vexil_store::{EventKind, EventStore, Inserted, NewEvent, SqlStore};

use crate::process::{self, Ports, Server, http_get};
use crate::store::Percentiles;

const ENVIRONMENT: &str = "prod";
const FLAG_SET: &str = "web";
/// The results measurement's experiment and its flag.
const RESULTS_EXPERIMENT: &str = "checkout-test";
const RESULTS_FLAG: &str = "checkout";
/// The evaluation measurement's flags: one without an experiment, one with.
const PLAIN_FLAG: &str = "plain";
const SPLIT_FLAG: &str = "split";
const SPLIT_EXPERIMENT: &str = "split-test";
/// Events per insert call when loading on PostgreSQL (the store's rows per statement).
const LOAD_CHUNK: u64 = 1000;
/// Events per insert call when loading on SQLite: its statement is built for the batch, and
/// binding a statement's parameters costs time quadratic in their number there (sqlx looks each
/// one's name up, `sqlite3_bind_parameter_name` walks the list): 1,000 events (12,000
/// parameters) take about 0.3 s, 100 events far less than a tenth of that.
const LOAD_CHUNK_SQLITE: u64 = 100;
/// Events per unit when loading: its exposure and 7 conversions.
const EVENTS_PER_UNIT: u64 = 8;
/// How long the server's counters may lag (its metrics are refreshed every second), plus the
/// background exposure writer's time.
const COUNTERS_SETTLE: Duration = Duration::from_millis(2500);
/// Timed results calls after the first one.
const RESULTS_REPEATS: usize = 5;

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Database {
    Postgres,
    Sqlite,
    Both,
}

impl Database {
    /// The databases this choice stands for.
    pub fn each(self) -> Vec<Database> {
        match self {
            Database::Both => vec![Database::Postgres, Database::Sqlite],
            one => vec![one],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Database::Postgres => "postgres",
            Database::Sqlite => "sqlite",
            Database::Both => "both",
        }
    }
}

/// Which measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum What {
    Ingest,
    Results,
    Evaluation,
}

/// The evaluation measurement's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalProtocol {
    /// `vexil.v1.EvaluationService/Evaluate` over gRPC.
    Grpc,
    /// OFREP single-flag evaluation over HTTP/1.1.
    Ofrep,
}

/// What to measure and how hard.
#[derive(Debug, Clone)]
pub struct Spec {
    pub vexil: PathBuf,
    pub databases: Vec<Database>,
    pub what: Vec<What>,
    /// Measured time of each run (ingest and evaluation).
    pub duration: Duration,
    /// Unrecorded time before it.
    pub warmup: Duration,
    /// Events per `/v1/track:batch` call.
    pub batch_size: usize,
    /// Clients sending batches.
    pub batch_clients: usize,
    /// Clients sending one event per `/v1/track` call.
    pub single_clients: usize,
    /// Event counts for the results measurement (one fresh database each).
    pub events: Vec<u64>,
    /// Insert calls in flight while loading (PostgreSQL; SQLite loads with one).
    pub load_concurrency: usize,
    /// Evaluation: workers, HTTP/2 connections (gRPC), protocol.
    pub concurrency: usize,
    pub connections: usize,
    pub protocol: EvalProtocol,
    /// Extra arguments for `vexil serve`.
    pub vexil_args: Vec<String>,
}

/// One ingest run.
#[derive(Debug, Clone, Serialize)]
pub struct IngestRow {
    pub database: String,
    pub endpoint: String,
    pub batch: usize,
    pub clients: usize,
    pub seconds: f64,
    pub calls: u64,
    /// Events the answers said were stored now.
    pub accepted: u64,
    pub events_per_second: f64,
    pub calls_per_second: f64,
    /// One call's latency, in microseconds.
    pub latency: Percentiles,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cpu: Cpu,
}

/// One results measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ResultsRow {
    pub database: String,
    /// Event rows loaded.
    pub events: u64,
    /// Units loaded (one exposure each).
    pub units: u64,
    /// Exposed units the results counted (should be `units`).
    pub exposed_units: u64,
    pub load_seconds: f64,
    pub load_events_per_second: f64,
    /// The first results call.
    pub first_seconds: f64,
    /// The next calls.
    pub repeat_seconds: Vec<f64>,
    pub median_seconds: f64,
    /// The first answer's lifts, for a glance (variant → metric → relative lift).
    pub summary: Value,
}

/// One evaluation run.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluationRow {
    pub database: String,
    pub protocol: EvalProtocol,
    pub flag: String,
    pub experiment: bool,
    pub concurrency: usize,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    /// Latency of one request, in microseconds.
    pub latency: Percentiles,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Answers with another reason than expected (`STATIC` for the plain flag, `SPLIT`).
    pub unexpected: u64,
    pub cpu: Cpu,
    /// The server's `vexil_exposures_total` over the run (warm-up included), by outcome.
    pub exposures: Map<String, Value>,
}

/// CPU used over a measured window, in cores (CPU seconds per second).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub server: Option<f64>,
    pub loadgen: Option<f64>,
    /// Every process of the machine (the database too), from `/proc/stat`.
    pub machine: Option<f64>,
}

/// Everything `vexil-loadgen experiments` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Where PostgreSQL came from and how it is set up.
    pub postgres: Option<String>,
    pub ingest: Vec<IngestRow>,
    pub results: Vec<ResultsRow>,
    pub evaluation: Vec<EvaluationRow>,
}

/// Runs what `spec` asks for, database by database; `progress` is told each row as it is done.
pub async fn run(spec: &Spec, mut progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    let mut report = Report::default();
    for &database in &spec.databases {
        if database == Database::Postgres {
            let external = std::env::var(vexil_testkit::DATABASE_URL_ENV).is_ok_and(|u| !u.trim().is_empty());
            // Blocks while a throwaway server starts.
            tokio::task::spawn_blocking(vexil_testkit::postgres).await?;
            report.postgres = Some(if external {
                format!("the server of {}", vexil_testkit::DATABASE_URL_ENV)
            } else {
                "throwaway (vexil-testkit: fsync, synchronous_commit and full_page_writes off)".to_owned()
            });
        }
        for what in &spec.what {
            match what {
                What::Ingest => {
                    let db = Fresh::new(database).await;
                    let server = Vexil::start(spec, db.url()).await?;
                    server.setup(&[PLAIN_FLAG], None).await?;
                    for (batch, clients) in [(spec.batch_size, spec.batch_clients), (1, spec.single_clients)] {
                        let row = ingest(spec, database, &server, batch, clients).await?;
                        progress(&format!(
                            "ingest {} batch {batch} × {clients} clients: {:.0} events/s",
                            database.name(),
                            row.events_per_second
                        ));
                        report.ingest.push(row);
                    }
                }
                What::Results => {
                    for &events in &spec.events {
                        let db = Fresh::new(database).await;
                        let server = Vexil::start(spec, db.url()).await?;
                        let row = results(spec, database, &server, db.url(), events, &mut progress).await?;
                        progress(&format!(
                            "results {} {events} events: first {:.2} s, median {:.2} s",
                            database.name(),
                            row.first_seconds,
                            row.median_seconds
                        ));
                        report.results.push(row);
                    }
                }
                What::Evaluation => {
                    let db = Fresh::new(database).await;
                    let server = Vexil::start(spec, db.url()).await?;
                    server
                        .setup(&[PLAIN_FLAG, SPLIT_FLAG], Some((SPLIT_EXPERIMENT, SPLIT_FLAG)))
                        .await?;
                    server.wait_split(spec).await?;
                    for (flag, experiment) in [(PLAIN_FLAG, false), (SPLIT_FLAG, true)] {
                        let row = evaluation(spec, database, &server, flag, experiment).await?;
                        progress(&format!(
                            "evaluation {} {flag}: {:.0} req/s",
                            database.name(),
                            row.requests_per_second
                        ));
                        report.evaluation.push(row);
                    }
                }
            }
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Databases and the server
// ---------------------------------------------------------------------------------------------

/// A fresh database, removed when dropped.
#[derive(Debug)]
enum Fresh {
    Postgres(vexil_testkit::TestDatabase),
    Sqlite(vexil_testkit::TestSqlite),
}

impl Fresh {
    async fn new(database: Database) -> Fresh {
        match database {
            Database::Postgres => Fresh::Postgres(vexil_testkit::postgres().database().await),
            _ => Fresh::Sqlite(vexil_testkit::sqlite()),
        }
    }

    fn url(&self) -> &str {
        match self {
            Fresh::Postgres(db) => db.url(),
            Fresh::Sqlite(db) => db.url(),
        }
    }
}

/// A `vexil serve` on a database, and a JSON client for its HTTP port.
#[derive(Debug)]
struct Vexil {
    server: Server,
    http: Http,
}

impl Vexil {
    async fn start(spec: &Spec, database_url: &str) -> anyhow::Result<Vexil> {
        let ports = Ports::free()?;
        let mut cmd = Command::new(&spec.vexil);
        cmd.arg("serve")
            .args(["--database-url", database_url, "--default-environment", ENVIRONMENT])
            .args(["--track-rate-limit", "0"])
            // Results only on request: no background computation beside what is measured.
            .args(["--results-refresh-seconds", "0"])
            .args(["-p", &ports.evaluation.to_string(), "-m", &ports.management.to_string()])
            .args(["-g", &ports.sync.to_string(), "-r", &ports.ofrep.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(&spec.vexil_args)
            .env(
                "VEXIL_LOG",
                std::env::var("VEXIL_LOADGEN_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let mut server = Server::spawn_command(cmd, ports).context("starting vexil serve")?;
        let server = tokio::task::spawn_blocking(move || {
            server.wait_ready(Duration::from_secs(60))?;
            anyhow::Ok(server)
        })
        .await??;
        Ok(Vexil {
            http: Http::new(ports.ofrep, 1024),
            server,
        })
    }

    /// Environment `prod`, flag set `web`, `flags` (each with variants `control` and `treatment`),
    /// and, when given, a running experiment on one of them: (its key, the flag). Returns when
    /// the experiment was started (ms since the epoch, taken after the server answered).
    async fn setup(&self, flags: &[&str], experiment: Option<(&str, &str)>) -> anyhow::Result<i64> {
        let http = &self.http;
        http.json(Method::POST, "/v1/environments", json!({ "key": ENVIRONMENT }))
            .await?;
        http.json(
            Method::PUT,
            &format!("/v1/environments/{ENVIRONMENT}/flag-sets/{FLAG_SET}"),
            json!({}),
        )
        .await?;
        for flag in flags {
            let definition = json!({
                "state": "ENABLED",
                "variants": { "control": "control", "treatment": "treatment" },
                "defaultVariant": "control",
            });
            http.json(
                Method::PUT,
                &format!("/v1/environments/{ENVIRONMENT}/flag-sets/{FLAG_SET}/flags/{flag}"),
                json!({ "definition": definition }),
            )
            .await?;
        }
        let Some((key, flag)) = experiment else {
            return Ok(now_ms());
        };
        http.json(
            Method::PUT,
            &format!("/v1/environments/{ENVIRONMENT}/experiments/{key}"),
            json!({
                "flagSet": FLAG_SET,
                "flag": flag,
                "trafficPercent": 100,
                "weights": [{ "variant": "control", "weight": 1 }, { "variant": "treatment", "weight": 1 }],
                "metrics": [{ "key": "purchase", "kind": "binomial" }, { "key": "revenue", "kind": "mean" }],
            }),
        )
        .await?;
        let started = http
            .json(
                Method::POST,
                &format!("/v1/environments/{ENVIRONMENT}/experiments/{key}:start"),
                json!({}),
            )
            .await?;
        let status = started.pointer("/experiment/status").and_then(Value::as_str);
        anyhow::ensure!(status == Some("running"), "the experiment did not start: {started}");
        Ok(now_ms())
    }

    /// Waits until the experiment flag is served with its split (the store's change reached
    /// evaluation).
    async fn wait_split(&self, spec: &Spec) -> anyhow::Result<()> {
        let evaluator = Evaluator::connect(spec, &self.server).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0u64;
        loop {
            n += 1;
            if evaluator.evaluate(SPLIT_FLAG, &format!("probe-{n}")).await? == "SPLIT" {
                // The probes' exposures reach the server's counters (updated every second).
                tokio::time::sleep(COUNTERS_SETTLE).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the experiment flag is not served with its split within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's `vexil_exposures_total`, by outcome.
    fn exposures(&self) -> Map<String, Value> {
        let body = http_get(self.server.ports.management, "/metrics").map_or_else(String::new, |(_, b)| b);
        let mut out = Map::new();
        for line in body.lines().filter(|l| l.starts_with("vexil_exposures_total{")) {
            let outcome = line
                .split("outcome=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?");
            if let Some(n) = line.split_whitespace().last().and_then(|n| n.parse::<f64>().ok()) {
                out.insert(outcome.to_owned(), json!(n as u64));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// JSON over HTTP/1.1 to one port of loopback.
#[derive(Debug, Clone)]
struct Http {
    client: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    fn new(port: u16, pool: usize) -> Http {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(pool)
            .build(connector);
        Http {
            client,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Status and body of one call.
    async fn call(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = self.client.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// The JSON answer of a call that must succeed.
    async fn json(&self, method: Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let body = if method == Method::GET {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let (status, answer) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            bail!("{method} {path}: HTTP {status}: {}", String::from_utf8_lossy(&answer));
        }
        serde_json::from_slice(&answer).with_context(|| format!("{method} {path}: not JSON"))
    }
}

// ---------------------------------------------------------------------------------------------
// Closed-loop runs, CPU
// ---------------------------------------------------------------------------------------------

/// CPU counters at one instant (seconds).
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    server: Option<f64>,
    own: Option<f64>,
    machine: Option<f64>,
}

impl CpuSample {
    fn take(server: &Server) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            server: server.cpu_seconds(),
            own: process::own_cpu_seconds(),
            machine: machine_busy_seconds(),
        }
    }

    /// Cores used from `self` to `later`.
    fn cores_until(&self, later: &CpuSample) -> Cpu {
        let secs = (later.at - self.at).as_secs_f64().max(1e-9);
        let rate = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / secs);
        Cpu {
            server: rate(self.server, later.server),
            loadgen: rate(self.own, later.own),
            machine: rate(self.machine, later.machine),
        }
    }
}

/// Busy CPU seconds of the whole machine (all but idle and iowait), from `/proc/stat`.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse::<f64>().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user).
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4).copied().unwrap_or(0.0);
    Some(busy / 100.0)
}

/// What one closed-loop run measured (calls completed inside the measured window).
#[derive(Debug)]
struct Loop {
    calls: u64,
    /// The units the calls reported done (events accepted, or 1 per request).
    done: u64,
    errors: u64,
    first_error: Option<String>,
    /// Calls whose answer was not the expected one.
    unexpected: u64,
    latency: Histogram<u64>,
    elapsed: Duration,
    cpu: Cpu,
}

/// What one call did: units done, whether the answer was the expected one.
type CallResult = Result<(u64, bool), String>;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Runs `workers` closed-loop workers calling `call(worker, sequence)` for `warmup` + `duration`;
/// records the calls that complete in the measured window, and the CPU used over it.
async fn closed_loop<F, Fut>(workers: usize, warmup: Duration, duration: Duration, server: &Server, call: F) -> Loop
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CallResult> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let tasks: Vec<_> = (0..workers.max(1))
        .map(|w| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut me = Loop {
                    calls: 0,
                    done: 0,
                    errors: 0,
                    first_error: None,
                    unexpected: 0,
                    latency: histogram(),
                    elapsed: duration,
                    cpu: Cpu::default(),
                };
                let mut seq = 0u64;
                loop {
                    let began = Instant::now();
                    if began >= end {
                        break;
                    }
                    let result = call(w, seq).await;
                    seq += 1;
                    let finished = Instant::now();
                    if finished < measure_from || finished >= end {
                        continue;
                    }
                    me.calls += 1;
                    let _ = me
                        .latency
                        .record(u64::try_from((finished - began).as_micros()).unwrap_or(u64::MAX).max(1));
                    match result {
                        Ok((done, expected)) => {
                            me.done += done;
                            me.unexpected += u64::from(!expected);
                        }
                        Err(e) => {
                            me.errors += 1;
                            me.first_error.get_or_insert(e);
                        }
                    }
                }
                me
            })
        })
        .collect();
    tokio::time::sleep_until(measure_from).await;
    let before = CpuSample::take(server);
    tokio::time::sleep_until(end).await;
    let after = CpuSample::take(server);
    let mut total = Loop {
        calls: 0,
        done: 0,
        errors: 0,
        first_error: None,
        unexpected: 0,
        latency: histogram(),
        elapsed: duration,
        cpu: before.cores_until(&after),
    };
    for task in tasks {
        let Ok(w) = task.await else {
            total.errors += 1;
            continue;
        };
        total.calls += w.calls;
        total.done += w.done;
        total.errors += w.errors;
        total.unexpected += w.unexpected;
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        let _ = total.latency.add(&w.latency);
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Ingest
// ---------------------------------------------------------------------------------------------

/// One conversion event as JSON.
fn event_json(out: &mut String, id: &str, unit: u64) {
    let _ = write!(
        out,
        r#"{{"eventId":"{id}","kind":"conversion","unit":"u{unit}","metric":"purchase"}}"#
    );
}

async fn ingest(
    spec: &Spec,
    database: Database,
    server: &Vexil,
    batch: usize,
    clients: usize,
) -> anyhow::Result<IngestRow> {
    // Unique across runs on the same database too.
    let run = format!("{:x}-{batch}", now_ms());
    let http = Http::new(server.server.ports.ofrep, clients.max(1));
    let path = if batch == 1 { "/v1/track" } else { "/v1/track:batch" };
    let measured = closed_loop(clients, spec.warmup, spec.duration, &server.server, move |w, seq| {
        let (http, run) = (http.clone(), run.clone());
        async move {
            let mut body = String::with_capacity(64 + batch * 96);
            if batch == 1 {
                body.push_str(r#"{"environment":"prod","event":"#);
                event_json(&mut body, &format!("{run}-{w}-{seq}"), seq);
                body.push('}');
            } else {
                body.push_str(r#"{"environment":"prod","events":["#);
                for k in 0..batch {
                    if k > 0 {
                        body.push(',');
                    }
                    event_json(
                        &mut body,
                        &format!("{run}-{w}-{seq}-{k}"),
                        seq * batch as u64 + k as u64,
                    );
                }
                body.push_str("]}");
            }
            let (status, answer) = http
                .call(Method::POST, path, Bytes::from(body))
                .await
                .map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&answer)));
            }
            let answer: Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
            let accepted = answer.get("accepted").and_then(Value::as_u64).unwrap_or(0);
            if accepted != batch as u64 {
                return Err(format!("{accepted} of {batch} accepted: {answer}"));
            }
            Ok((accepted, true))
        }
    })
    .await;
    let secs = measured.elapsed.as_secs_f64();
    Ok(IngestRow {
        database: database.name().to_owned(),
        endpoint: path.to_owned(),
        batch,
        clients,
        seconds: secs,
        calls: measured.calls,
        accepted: measured.done,
        events_per_second: measured.done as f64 / secs,
        calls_per_second: measured.calls as f64 / secs,
        latency: Percentiles::of(&measured.latency),
        errors: measured.errors,
        first_error: measured.first_error,
        cpu: measured.cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a seeded, well-mixed hash of `x`.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How the loaded events are laid out in time: unit `u`'s exposure at `t0 + u × span / units`,
/// its conversions 1 to 7 ms after it.
#[derive(Debug, Clone, Copy)]
struct Layout {
    events: u64,
    units: u64,
    t0_ms: i64,
    span_ms: i64,
}

const SEED: u64 = 0x5eed_5eed_0f7e_5700;

/// Event `i` of the loaded data (deterministic).
fn loaded_event(layout: &Layout, i: u64) -> NewEvent {
    let unit = i / EVENTS_PER_UNIT;
    let j = i % EVENTS_PER_UNIT;
    let treatment = mix(SEED ^ unit) & 1 == 1;
    let exposed_at =
        layout.t0_ms + i64::try_from(unit * layout.span_ms.unsigned_abs() / layout.units.max(1)).unwrap_or(0);
    let mut event = NewEvent {
        environment: ENVIRONMENT.to_owned(),
        event_id: format!("load-{i}"),
        kind: EventKind::Conversion,
        unit: format!("unit-{unit}"),
        flag: None,
        experiment: None,
        variant: None,
        metric: None,
        value: None,
        properties: Map::new(),
        client_time_ms: None,
        server_time_ms: exposed_at + i64::try_from(j).unwrap_or(0),
    };
    if j == 0 {
        event.kind = EventKind::Exposure;
        event.flag = Some(RESULTS_FLAG.to_owned());
        event.experiment = Some(RESULTS_EXPERIMENT.to_owned());
        event.variant = Some(if treatment { "treatment" } else { "control" }.to_owned());
        return event;
    }
    let h = mix(SEED.rotate_left(17) ^ i);
    // About 6 % of a control unit's events are purchases, 7 % of a treatment unit's.
    let purchase_per_mille = if treatment { 70 } else { 60 };
    if h % 1000 < purchase_per_mille {
        event.metric = Some("purchase".to_owned());
    } else {
        event.metric = Some("revenue".to_owned());
        event.value = Some(((h >> 20) % 10_000) as f64 / 100.0);
    }
    event
}

/// Writes the layout's events with the store's insert path, `concurrency` calls at once.
async fn load(
    database_url: &str,
    layout: Layout,
    concurrency: usize,
    chunk: u64,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let store = Arc::new(SqlStore::open(database_url).await.context("opening the store")?);
    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (store, next, written) = (store.clone(), next.clone(), written.clone());
            tokio::spawn(async move {
                loop {
                    let from = next.fetch_add(chunk, Ordering::Relaxed);
                    if from >= layout.events {
                        return anyhow::Ok(());
                    }
                    let until = (from + chunk).min(layout.events);
                    let events: Vec<NewEvent> = (from..until).map(|i| loaded_event(&layout, i)).collect();
                    let inserted = store.insert_events(events).await?;
                    let new = inserted.iter().filter(|i| **i == Inserted::New).count();
                    anyhow::ensure!(new == inserted.len(), "events {from}..{until}: only {new} were new");
                    written.fetch_add(until - from, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut shown = 0u64;
    let step = (layout.events / 10).max(1);
    let mut all = futures::future::try_join_all(tasks);
    loop {
        tokio::select! {
            done = &mut all => {
                for r in done? {
                    r?;
                }
                break;
            }
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                let n = written.load(Ordering::Relaxed);
                if n / step > shown / step {
                    shown = n;
                    progress(&format!(
                        "  loaded {n} of {} events ({:.0} s)",
                        layout.events,
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
    }
    store.close().await;
    Ok(())
}

/// Sum of `exposures[].units` of a results answer (uint64s are JSON strings in proto3 JSON).
fn exposed_units(results: &Value) -> u64 {
    results
        .get("exposures")
        .and_then(Value::as_array)
        .map_or(0, |a| a.iter().map(|e| number(e.get("units"))).sum())
}

fn number(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// Per metric and variant, the mean, the relative lift and the verdict the results report (a
/// glance at the answer, not the measurement).
fn summary(results: &Value) -> Value {
    let mut out = Map::new();
    for metric in results.get("metrics").and_then(Value::as_array).into_iter().flatten() {
        let key = metric.get("metric").and_then(Value::as_str).unwrap_or("?").to_owned();
        let mut variants = Map::new();
        for v in metric.get("variants").and_then(Value::as_array).into_iter().flatten() {
            let name = v.get("variant").and_then(Value::as_str).unwrap_or("?").to_owned();
            variants.insert(
                name,
                json!({
                    "mean": v.get("mean"),
                    "relative": v.pointer("/relative/estimate"),
                    "verdict": v.get("verdict"),
                }),
            );
        }
        out.insert(key, Value::Object(variants));
    }
    Value::Object(out)
}

async fn results(
    spec: &Spec,
    database: Database,
    server: &Vexil,
    database_url: &str,
    events: u64,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<ResultsRow> {
    let started_ms = server
        .setup(&[RESULTS_FLAG], Some((RESULTS_EXPERIMENT, RESULTS_FLAG)))
        .await?;
    // After the start (with a margin), and a second later all of them: before the first query.
    let layout = Layout {
        events,
        units: events.div_ceil(EVENTS_PER_UNIT),
        t0_ms: started_ms + 20,
        span_ms: 1000,
    };
    let loading = Instant::now();
    // SQLite takes one writer at a time: more only wait in its busy handler (and may time out).
    let (concurrency, chunk) = match database {
        Database::Sqlite => (1, LOAD_CHUNK_SQLITE),
        _ => (spec.load_concurrency, LOAD_CHUNK),
    };
    load(database_url, layout, concurrency, chunk, progress).await?;
    let load_seconds = loading.elapsed().as_secs_f64();
    let last = layout.t0_ms + layout.span_ms + EVENTS_PER_UNIT as i64;
    let wait = last + 50 - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }

    // `refresh`: computed now, never the server's last scheduled results.
    let path = format!("/v1/environments/{ENVIRONMENT}/experiments/{RESULTS_EXPERIMENT}/results?refresh=true");
    let timed = || async {
        let t = Instant::now();
        let answer = server.http.json(Method::GET, &path, Value::Null).await?;
        anyhow::Ok((t.elapsed().as_secs_f64(), answer))
    };
    let (first_seconds, first) = timed().await?;
    let mut repeat_seconds = Vec::with_capacity(RESULTS_REPEATS);
    for _ in 0..RESULTS_REPEATS {
        repeat_seconds.push(timed().await?.0);
    }
    let mut sorted = repeat_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let exposed = exposed_units(&first);
    if exposed != layout.units {
        progress(&format!(
            "  warning: the results counted {exposed} exposed units, {} were loaded",
            layout.units
        ));
    }
    Ok(ResultsRow {
        database: database.name().to_owned(),
        events,
        units: layout.units,
        exposed_units: exposed,
        load_seconds,
        load_events_per_second: events as f64 / load_seconds.max(1e-9),
        first_seconds,
        median_seconds: sorted[sorted.len() / 2],
        repeat_seconds,
        summary: summary(&first),
    })
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// Evaluates one flag for one targetingKey over the chosen protocol.
#[derive(Debug, Clone)]
enum Evaluator {
    Grpc(Vec<EvaluationServiceClient<Channel>>),
    Ofrep(Box<Http>),
}

impl Evaluator {
    async fn connect(spec: &Spec, server: &Server) -> anyhow::Result<Evaluator> {
        Ok(match spec.protocol {
            EvalProtocol::Grpc => {
                let mut clients = Vec::new();
                for _ in 0..spec.connections.max(1) {
                    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", server.ports.evaluation))?
                        .tcp_nodelay(true)
                        .connect()
                        .await?;
                    clients.push(EvaluationServiceClient::new(channel));
                }
                Evaluator::Grpc(clients)
            }
            EvalProtocol::Ofrep => Evaluator::Ofrep(Box::new(Http::new(server.ports.ofrep, spec.concurrency.max(1)))),
        })
    }

    /// The answer's reason.
    async fn evaluate(&self, flag: &str, targeting_key: &str) -> anyhow::Result<String> {
        self.evaluate_on(0, flag, targeting_key).await
    }

    async fn evaluate_on(&self, worker: usize, flag: &str, targeting_key: &str) -> anyhow::Result<String> {
        match self {
            Evaluator::Grpc(clients) => {
                let mut context = Map::new();
                context.insert("targetingKey".into(), Value::String(targeting_key.to_owned()));
                let answer = clients[worker % clients.len()]
                    .clone()
                    .evaluate(pb::EvaluateRequest {
                        environment: ENVIRONMENT.into(),
                        flag_set: FLAG_SET.into(),
                        flag_key: flag.to_owned(),
                        context: Some(JsonStruct::from(context)),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                Ok(answer.reason)
            }
            Evaluator::Ofrep(http) => {
                let body = format!(r#"{{"context":{{"targetingKey":"{targeting_key}"}}}}"#);
                let (status, answer) = http
                    .call(
                        Method::POST,
                        &format!("/ofrep/v1/evaluate/flags/{flag}"),
                        Bytes::from(body),
                    )
                    .await?;
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&answer));
                }
                let answer: Value = serde_json::from_slice(&answer)?;
                Ok(answer.get("reason").and_then(Value::as_str).unwrap_or("").to_owned())
            }
        }
    }
}

async fn evaluation(
    spec: &Spec,
    database: Database,
    server: &Vexil,
    flag: &'static str,
    experiment: bool,
) -> anyhow::Result<EvaluationRow> {
    let evaluator = Arc::new(Evaluator::connect(spec, &server.server).await?);
    let expected = if experiment { "SPLIT" } else { "STATIC" };
    let run = format!("{:x}-{flag}", now_ms());
    let exposures_before = server.exposures();
    let measured = closed_loop(
        spec.concurrency,
        spec.warmup,
        spec.duration,
        &server.server,
        move |w, seq| {
            let (evaluator, key) = (evaluator.clone(), format!("{run}-{w}-{seq}"));
            async move {
                let reason = evaluator.evaluate_on(w, flag, &key).await.map_err(|e| e.to_string())?;
                Ok((1, reason == expected))
            }
        },
    )
    .await;
    // Let the background writer catch up and the counters (updated every second) follow.
    tokio::time::sleep(COUNTERS_SETTLE).await;
    let after = server.exposures();
    let exposures = after
        .iter()
        .map(|(k, v)| {
            let was = exposures_before.get(k).and_then(Value::as_u64).unwrap_or(0);
            (k.clone(), json!(v.as_u64().unwrap_or(0).saturating_sub(was)))
        })
        .collect();
    let secs = measured.elapsed.as_secs_f64();
    Ok(EvaluationRow {
        database: database.name().to_owned(),
        protocol: spec.protocol,
        flag: flag.to_owned(),
        experiment,
        concurrency: spec.concurrency,
        connections: spec.connections,
        seconds: secs,
        requests: measured.calls,
        requests_per_second: measured.calls as f64 / secs,
        latency: Percentiles::of(&measured.latency),
        errors: measured.errors,
        first_error: measured.first_error,
        unexpected: measured.unexpected,
        cpu: measured.cpu,
        exposures,
    })
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn cores(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// The report as Markdown tables (one per measurement that ran).
pub fn tables(report: &Report) -> String {
    let mut out = String::new();
    if let Some(postgres) = &report.postgres {
        let _ = writeln!(out, "PostgreSQL: {postgres}\n");
    }
    if !report.ingest.is_empty() {
        out.push_str(
            "| database | endpoint | batch | clients | events/s | calls/s | call p50 ms | call p99 ms | errors | server CPU | loadgen CPU | machine CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &report.ingest {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                r.database,
                r.endpoint,
                r.batch,
                r.clients,
                r.events_per_second,
                r.calls_per_second,
                ms(r.latency.p50_us),
                ms(r.latency.p99_us),
                r.errors,
                cores(r.cpu.server),
                cores(r.cpu.loadgen),
                cores(r.cpu.machine),
            );
        }
        out.push('\n');
    }
    if !report.results.is_empty() {
        out.push_str(
            "| database | events (rows) | exposed units | load s (events/s) | first results call s | median of next 5 s | min – max s |\n|---|---|---|---|---|---|---|\n",
        );
        for r in &report.results {
            let min = r.repeat_seconds.iter().copied().fold(f64::INFINITY, f64::min);
            let max = r.repeat_seconds.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "| {} | {} | {} of {} | {:.1} ({:.0}) | {:.3} | {:.3} | {:.3} – {:.3} |",
                r.database,
                r.events,
                r.exposed_units,
                r.units,
                r.load_seconds,
                r.load_events_per_second,
                r.first_seconds,
                r.median_seconds,
                min,
                max,
            );
        }
        out.push('\n');
    }
    if !report.evaluation.is_empty() {
        out.push_str(
            "| database | protocol | flag | conc | req/s | p50 µs | p99 µs | errors | unexpected | server CPU | loadgen CPU | machine CPU | exposures recorded / written / dropped |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &report.evaluation {
            let get = |k: &str| r.exposures.get(k).and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {:?} | {}{} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
                r.database,
                r.protocol,
                r.flag,
                if r.experiment { " (experiment)" } else { " (plain)" },
                r.concurrency,
                r.requests_per_second,
                r.latency.p50_us,
                r.latency.p99_us,
                r.errors,
                r.unexpected,
                cores(r.cpu.server),
                cores(r.cpu.loadgen),
                cores(r.cpu.machine),
                get("recorded"),
                get("written"),
                get("dropped"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_events_are_deterministic_and_laid_out_per_unit() {
        let layout = Layout {
            events: 80,
            units: 10,
            t0_ms: 1_000_000,
            span_ms: 1000,
        };
        let all: Vec<NewEvent> = (0..layout.events).map(|i| loaded_event(&layout, i)).collect();
        assert_eq!(
            all,
            (0..layout.events).map(|i| loaded_event(&layout, i)).collect::<Vec<_>>()
        );
        for unit in all.chunks(EVENTS_PER_UNIT as usize) {
            let exposure = &unit[0];
            assert_eq!(exposure.kind, EventKind::Exposure);
            assert_eq!(exposure.experiment.as_deref(), Some(RESULTS_EXPERIMENT));
            for conversion in &unit[1..] {
                assert_eq!(conversion.kind, EventKind::Conversion);
                assert_eq!(conversion.unit, exposure.unit);
                assert!(conversion.server_time_ms > exposure.server_time_ms);
                assert!(conversion.server_time_ms < layout.t0_ms + layout.span_ms + 8);
            }
        }
        let ids: std::collections::HashSet<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), all.len());
        let treatment = all.iter().filter(|e| e.variant.as_deref() == Some("treatment")).count();
        assert!((1..10).contains(&treatment), "{treatment}");
    }

    #[test]
    fn exposed_units_read_numbers_and_strings() {
        let results =
            json!({"exposures": [{"variant": "control", "units": "40"}, {"variant": "treatment", "units": 2}]});
        assert_eq!(exposed_units(&results), 42);
    }
}
