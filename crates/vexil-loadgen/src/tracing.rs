//! The cost of OpenTelemetry tracing (issue #12): the same scenarios against the server with
//! tracing off, sampled and on (every request traced), its spans exported over OTLP/gRPC to an
//! in-process sink that only counts what it receives.
//!
//! Modes are interleaved over rounds (round *r* starts with the *r*-th mode) so the machine's
//! drift is spread over all of them; each mode of each round is a fresh server. Spans are counted
//! per operation (`package.Service/Method` or `METHOD /route`) over the server's whole life — the
//! server is stopped with SIGINT, which flushes its batch span processor — and compared with the
//! requests sent for that operation, warm-up included.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde::Serialize;

use crate::driver::{self, LoadSpec};
use crate::flags::{catalog, document};
use crate::process::{self, Server};
use crate::workload::{Client, Req, Scenario, requests};

/// The name of the span event the server adds per flag evaluation.
pub const EVALUATION_EVENT: &str = "feature_flag.evaluation";

/// How the server is traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No `OTEL_*` variable: tracing off (the request histograms only).
    Off,
    /// `OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=<ratio>`.
    Sampled,
    /// `OTEL_TRACES_SAMPLER=always_on`: every request traced and exported.
    On,
}

impl Mode {
    /// `off`, `sampled-1%`, `on`.
    pub fn label(self, ratio: f64) -> String {
        match self {
            Mode::Off => "off".into(),
            Mode::Sampled => format!("sampled-{}%", percent(ratio)),
            Mode::On => "on".into(),
        }
    }

    /// The share of requests expected to be traced.
    pub fn expected_share(self, ratio: f64) -> f64 {
        match self {
            Mode::Off => 0.0,
            Mode::Sampled => ratio,
            Mode::On => 1.0,
        }
    }
}

/// `ratio` as a percentage without trailing zeros (0.01 → `1`, 0.005 → `0.5`).
fn percent(ratio: f64) -> String {
    let s = format!("{:.4}", ratio * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The server's environment for `mode`: every inherited `OTEL_*` variable removed, then the mode's
/// (and, traced, `extra`) set.
pub fn environment(
    mode: Mode,
    ratio: f64,
    endpoint: &str,
    extra: &[(String, String)],
) -> Vec<(String, Option<String>)> {
    let mut set: Vec<(String, String)> = Vec::new();
    match mode {
        Mode::Off => {}
        Mode::Sampled => {
            set.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()));
            set.push(("OTEL_TRACES_SAMPLER".into(), "parentbased_traceidratio".into()));
            set.push(("OTEL_TRACES_SAMPLER_ARG".into(), ratio.to_string()));
        }
        Mode::On => {
            set.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.into()));
            set.push(("OTEL_TRACES_SAMPLER".into(), "always_on".into()));
        }
    }
    if mode != Mode::Off {
        for (k, v) in extra {
            set.retain(|(key, _)| key != k);
            set.push((k.clone(), v.clone()));
        }
    }
    let mut env: Vec<(String, Option<String>)> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("OTEL_") && !set.iter().any(|(s, _)| s == k))
        .map(|k| (k, None))
        .collect();
    env.extend(set.into_iter().map(|(k, v)| (k, Some(v))));
    env
}

/// What the sink received from one server.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Received {
    /// Export calls.
    pub exports: u64,
    pub spans: u64,
    /// Span events of any name.
    pub events: u64,
    /// `feature_flag.evaluation` events.
    pub evaluation_events: u64,
    /// Spans and evaluation events per operation (see [`operation`]).
    pub by_operation: BTreeMap<String, Operation>,
}

/// Spans of one operation and their evaluation events.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Operation {
    pub spans: u64,
    pub evaluation_events: u64,
}

/// An OTLP trace receiver that counts spans and events, and keeps nothing else.
#[derive(Debug, Default)]
pub struct Sink {
    received: Mutex<Received>,
}

impl Sink {
    /// What was received since the last call.
    pub fn take(&self) -> Received {
        std::mem::take(&mut *self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut received = self.received.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        received.exports += 1;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            let evaluations = span.events.iter().filter(|e| e.name == EVALUATION_EVENT).count() as u64;
            received.spans += 1;
            received.events += span.events.len() as u64;
            received.evaluation_events += evaluations;
            let op = received.by_operation.entry(operation(span)).or_default();
            op.spans += 1;
            op.evaluation_events += evaluations;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn string_attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// What a span is of: `package.Service/Method` for an RPC, `METHOD /route` for an HTTP request
/// that matched a route, its name otherwise.
pub fn operation(span: &Span) -> String {
    if let (Some(service), Some(method)) = (
        string_attribute(span, "rpc.service"),
        string_attribute(span, "rpc.method"),
    ) {
        return format!("{service}/{method}");
    }
    if let (Some(method), Some(route)) = (
        string_attribute(span, "http.request.method"),
        string_attribute(span, "http.route"),
    ) {
        return format!("{method} {route}");
    }
    span.name.clone()
}

/// The operation a scenario's requests are spans of (as [`operation`] names it).
pub fn scenario_operation(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::ResolveBoolean | Scenario::ResolveTargeting => "flagd.evaluation.v1.Service/ResolveBoolean",
        Scenario::ResolveString => "flagd.evaluation.v1.Service/ResolveString",
        Scenario::ResolveAll => "flagd.evaluation.v1.Service/ResolveAll",
        Scenario::V2Boolean => "flagd.evaluation.v2.Service/ResolveBoolean",
        Scenario::OfrepSingle => "POST /ofrep/v1/evaluate/flags/{key}",
        Scenario::OfrepBulk => "POST /ofrep/v1/evaluate/flags",
        Scenario::Health => "grpc.health.v1.Health/Check",
    }
}

/// A running sink and the endpoint to export to.
#[derive(Debug)]
pub struct RunningSink {
    pub sink: Arc<Sink>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the sink on a free loopback port.
pub async fn start_sink() -> anyhow::Result<RunningSink> {
    start_sink_at(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts the sink on `addr`.
pub async fn start_sink_at(addr: std::net::SocketAddr) -> anyhow::Result<RunningSink> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let sink = Arc::new(Sink::default());
    let service = TraceServiceServer::from_arc(sink.clone()).max_decoding_message_size(256 << 20);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("the OTLP sink stopped: {e}");
        }
    });
    Ok(RunningSink { sink, endpoint, task })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub vexil: PathBuf,
    /// Scratch directory (the flag file, the servers' logs).
    pub dir: PathBuf,
    pub scenarios: Vec<Scenario>,
    pub modes: Vec<Mode>,
    pub rounds: usize,
    pub flags: usize,
    pub attrs: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Fixed total arrival rate (requests/s, open loop); `None`: closed loop, as fast as possible.
    pub rate: Option<f64>,
    /// The sampled mode's ratio.
    pub ratio: f64,
    /// More `OTEL_*` variables for the traced modes (e.g. `OTEL_BSP_MAX_QUEUE_SIZE`).
    pub otel_env: Vec<(String, String)>,
    pub vexil_args: Vec<String>,
}

/// One measured scenario against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub round: usize,
    pub mode: Mode,
    pub mode_label: String,
    pub scenario: String,
    /// Requests in the measured window.
    pub requests: u64,
    /// Requests of the warm-up before it.
    pub warmup_requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU cores the server used on average over the window.
    pub server_cpu: Option<f64>,
    /// Server CPU time per request, µs.
    pub server_cpu_us_per_request: Option<f64>,
    /// CPU cores this process used (the load and the sink).
    pub loadgen_cpu: Option<f64>,
}

/// One server's life: what it was sent and what the sink received from it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerRun {
    pub round: usize,
    pub mode: Mode,
    pub mode_label: String,
    /// Requests sent per operation, warm-up included.
    pub sent: BTreeMap<String, u64>,
    pub received: Received,
    /// How the server ended after SIGINT.
    pub exit: String,
    /// The server's log lines about dropped spans or failed exports.
    pub exporter_log: Vec<String>,
    /// Spans the batch span processor dropped (its queue full), as its log says at shutdown.
    pub dropped_spans: u64,
}

/// The `dropped_span_count` the batch span processor logs at shutdown.
pub fn dropped_spans(log: &[String]) -> u64 {
    log.iter()
        .filter_map(|line| {
            let rest = &line[line.find("dropped_span_count=")? + "dropped_span_count=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// One mode and scenario over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mode: Mode,
    pub mode_label: String,
    pub scenario: String,
    pub rounds: usize,
    pub median_throughput: f64,
    /// Median throughput as a share of the `off` mode's.
    pub throughput_vs_off: Option<f64>,
    pub median_p50_us: f64,
    pub median_p99_us: f64,
    pub median_server_cpu_us_per_request: Option<f64>,
    /// Median CPU per request as a share of the `off` mode's.
    pub cpu_vs_off: Option<f64>,
    /// Requests sent for the scenario's operation over all rounds (warm-up included).
    pub requests_sent: u64,
    pub spans_received: u64,
    pub evaluation_events: u64,
    pub expected_share: f64,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub flags: usize,
    pub attributes: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub duration_seconds: f64,
    pub warmup_seconds: f64,
    /// Fixed arrival rate, if not closed loop.
    pub rate: Option<f64>,
    pub rounds: usize,
    pub ratio: f64,
    pub otel_env: Vec<(String, String)>,
    pub runs: Vec<Run>,
    pub servers: Vec<ServerRun>,
    pub summary: Vec<Summary>,
    pub warnings: Vec<String>,
}

/// Runs every mode of every round; `progress` is told what is starting.
pub async fn run(spec: &Spec, progress: impl Fn(&str)) -> anyhow::Result<Report> {
    anyhow::ensure!(!spec.modes.is_empty(), "no mode to run");
    anyhow::ensure!(!spec.scenarios.is_empty(), "no scenario to run");
    anyhow::ensure!(spec.concurrency > 0, "--concurrency must be positive");
    anyhow::ensure!(
        (0.0..=1.0).contains(&spec.ratio),
        "the sample ratio must be from 0 to 1"
    );
    let flags = catalog(spec.flags);
    let file = spec.dir.join(format!("flags-{}.json", spec.flags));
    std::fs::write(&file, document(&flags).to_string())?;
    let pools: Vec<(Scenario, Arc<Vec<Req>>)> = spec
        .scenarios
        .iter()
        .map(|s| (*s, Arc::new(requests(*s, &flags, spec.attrs, 1024))))
        .collect();
    let sink = start_sink().await?;
    let rounds = spec.rounds.max(1);
    let mut runs = Vec::new();
    let mut servers = Vec::new();
    let mut warnings = Vec::new();
    for round in 1..=rounds {
        for k in 0..spec.modes.len() {
            let mode = spec.modes[(round - 1 + k) % spec.modes.len()];
            let label = mode.label(spec.ratio);
            progress(&format!("round {round}/{rounds}: tracing {label}"));
            let _ = sink.sink.take();
            let env = environment(mode, spec.ratio, &sink.endpoint, &spec.otel_env);
            let log_path = spec.dir.join(format!("vexil-{round}-{label}.log"));
            let mut server = Server::vexil_with_env(
                &spec.vexil,
                &file,
                &spec.vexil_args,
                &env,
                File::create(&log_path)?.into(),
            )?;
            server.wait_ready(Duration::from_secs(60))?;
            let client =
                Arc::new(Client::connect(server.ports.evaluation, server.ports.ofrep, spec.connections).await?);
            let mut sent: BTreeMap<String, u64> = BTreeMap::new();
            for (scenario, pool) in &pools {
                let warm = LoadSpec {
                    concurrency: spec.concurrency,
                    duration: spec.warmup,
                    warmup: Duration::ZERO,
                    rate: spec.rate,
                };
                let (warmed, ()) = driver::drive(client.clone(), pool.clone(), warm, || ()).await;
                let measured = LoadSpec {
                    duration: spec.duration,
                    ..warm
                };
                let pid = server.pid();
                let (m, (server0, own0)) = driver::drive(client.clone(), pool.clone(), measured, move || {
                    (server_cpu(pid), process::own_cpu_seconds())
                })
                .await;
                let (server1, own1) = (server.cpu_seconds(), process::own_cpu_seconds());
                let secs = spec.duration.as_secs_f64();
                let server_seconds = server0.zip(server1).map(|(a, b)| b - a);
                *sent.entry(scenario_operation(*scenario).to_owned()).or_default() += warmed.requests + m.requests;
                runs.push(Run {
                    round,
                    mode,
                    mode_label: label.clone(),
                    scenario: scenario.name().to_owned(),
                    requests: m.requests,
                    warmup_requests: warmed.requests,
                    errors: m.errors + warmed.errors,
                    first_error: warmed.first_error.or(m.first_error.clone()),
                    throughput: m.throughput(),
                    p50_us: m.quantile_us(0.5),
                    p90_us: m.quantile_us(0.9),
                    p99_us: m.quantile_us(0.99),
                    p999_us: m.quantile_us(0.999),
                    server_cpu: server_seconds.map(|s| s / secs),
                    server_cpu_us_per_request: server_seconds
                        .filter(|_| m.requests > 0)
                        .map(|s| s * 1e6 / m.requests as f64),
                    loadgen_cpu: own0.zip(own1).map(|(a, b)| (b - a) / secs),
                });
            }
            drop(client);
            let exit = stop(&mut server, Duration::from_secs(30)).await;
            drop(server);
            let received = sink.sink.take();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let exporter_log: Vec<String> = log
                .lines()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("dropped") || l.contains("export") || l.contains("otlp")
                })
                .map(|l| strip_ansi(l).chars().take(400).collect())
                .collect();
            let server_run = ServerRun {
                round,
                mode,
                mode_label: label,
                sent,
                received,
                exit,
                dropped_spans: dropped_spans(&exporter_log),
                exporter_log,
            };
            warnings.extend(check(&server_run, spec.ratio));
            servers.push(server_run);
        }
    }
    for r in runs.iter().filter(|r| r.errors > 0) {
        warnings.push(format!(
            "round {} {} {}: {} errors, first: {}",
            r.round,
            r.mode_label,
            r.scenario,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
    let summary = summarize(spec, &runs, &servers);
    Ok(Report {
        flags: spec.flags,
        attributes: spec.attrs,
        concurrency: spec.concurrency,
        connections: spec.connections,
        duration_seconds: spec.duration.as_secs_f64(),
        warmup_seconds: spec.warmup.as_secs_f64(),
        rate: spec.rate,
        rounds,
        ratio: spec.ratio,
        otel_env: spec.otel_env.clone(),
        runs,
        servers,
        summary,
        warnings,
    })
}

fn server_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// Stops the server with SIGINT (no drain delay; it flushes its spans on the way out) and waits
/// for it to exit; killed (on drop) if it has not within `timeout`.
async fn stop(server: &mut Server, timeout: Duration) -> String {
    if let Err(e) = server.signal("INT") {
        return format!("could not signal: {e}");
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = server.exit_status() {
            return status.to_string();
        }
        if tokio::time::Instant::now() > deadline {
            return format!("still running {timeout:?} after SIGINT: killed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `line` without terminal colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Warnings when a server's spans are not what its mode should give: none when off, one per
/// request when on, about `ratio` of the requests when sampled (within four standard deviations
/// of the binomial count).
pub fn check(run: &ServerRun, ratio: f64) -> Vec<String> {
    let mut warnings = Vec::new();
    let at = format!("round {} tracing {}", run.round, run.mode_label);
    if run.mode == Mode::Off {
        if run.received.spans > 0 {
            warnings.push(format!(
                "{at}: the sink received {} spans from a server with tracing off",
                run.received.spans
            ));
        }
        return warnings;
    }
    let share = run.mode.expected_share(ratio);
    for (op, &sent) in &run.sent {
        let spans = run.received.by_operation.get(op).map_or(0, |o| o.spans);
        let expected = sent as f64 * share;
        let tolerance = if run.mode == Mode::On {
            // Every request is a span; allow for nothing but rounding.
            0.001 * expected + 1.0
        } else {
            4.0 * (sent as f64 * share * (1.0 - share)).sqrt() + 1.0
        };
        if (spans as f64 - expected).abs() > tolerance {
            warnings.push(format!(
                "{at}: {op}: {spans} spans received for {sent} requests ({:.2} %), expected about {expected:.0}",
                if sent > 0 {
                    spans as f64 * 100.0 / sent as f64
                } else {
                    0.0
                }
            ));
        }
    }
    if run.dropped_spans > 0 {
        warnings.push(format!(
            "{at}: the server's batch span processor dropped {} spans (its queue was full: OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_SCHEDULE_DELAY)",
            run.dropped_spans
        ));
    }
    for line in run.exporter_log.iter().filter(|l| !l.contains("dropped")) {
        warnings.push(format!("{at}: server log: {line}"));
    }
    if run.exit != "exit status: 0" {
        warnings.push(format!("{at}: the server's exit after SIGINT: {}", run.exit));
    }
    warnings
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn summarize(spec: &Spec, runs: &[Run], servers: &[ServerRun]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for scenario in &spec.scenarios {
        let name = scenario.name();
        let op = scenario_operation(*scenario);
        for &mode in &spec.modes {
            let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode && r.scenario == name).collect();
            let med = |f: &dyn Fn(&Run) -> Option<f64>| median(of.iter().filter_map(|r| f(r)).collect());
            let (sent, spans, events) =
                servers
                    .iter()
                    .filter(|s| s.mode == mode)
                    .fold((0, 0, 0), |(sent, spans, events), s| {
                        let o = s.received.by_operation.get(op).copied().unwrap_or_default();
                        (
                            sent + s.sent.get(op).copied().unwrap_or(0),
                            spans + o.spans,
                            events + o.evaluation_events,
                        )
                    });
            out.push(Summary {
                mode,
                mode_label: mode.label(spec.ratio),
                scenario: name.to_owned(),
                rounds: of.len(),
                median_throughput: med(&|r| Some(r.throughput)).unwrap_or(0.0),
                throughput_vs_off: None,
                median_p50_us: med(&|r| Some(r.p50_us)).unwrap_or(0.0),
                median_p99_us: med(&|r| Some(r.p99_us)).unwrap_or(0.0),
                median_server_cpu_us_per_request: med(&|r| r.server_cpu_us_per_request),
                cpu_vs_off: None,
                requests_sent: sent,
                spans_received: spans,
                evaluation_events: events,
                expected_share: mode.expected_share(spec.ratio),
            });
        }
    }
    let offs: Vec<(String, f64, Option<f64>)> = out
        .iter()
        .filter(|s| s.mode == Mode::Off)
        .map(|s| {
            (
                s.scenario.clone(),
                s.median_throughput,
                s.median_server_cpu_us_per_request,
            )
        })
        .collect();
    for s in &mut out {
        if let Some((_, rps, cpu)) = offs.iter().find(|(name, ..)| *name == s.scenario) {
            s.throughput_vs_off = (*rps > 0.0).then(|| s.median_throughput / rps);
            s.cpu_vs_off = cpu
                .zip(s.median_server_cpu_us_per_request)
                .filter(|(off, _)| *off > 0.0)
                .map(|(off, this)| this / off);
        }
    }
    out
}

/// `n` with thousands separators.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn share(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{:.0} %", x * 100.0))
}

/// The report as Markdown: each round, then the medians with the spans received.
pub fn tables(report: &Report) -> String {
    let load = match report.rate {
        Some(rate) => format!("open loop at {rate:.0} req/s, up to {} in flight", report.concurrency),
        None => format!("closed loop, {} in flight", report.concurrency),
    };
    let mut out = format!(
        "Each round ({} flags, {} attributes, {load}, {} connections, {} s after {} s of warm-up):\n\n",
        report.flags, report.attributes, report.connections, report.duration_seconds, report.warmup_seconds
    );
    out.push_str(
        "| round | tracing | scenario | req/s | p50 µs | p99 µs | server CPU | server CPU µs/req | loadgen CPU | errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &report.runs {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |\n",
            r.round,
            r.mode_label,
            r.scenario,
            thousands(r.throughput.round() as u64),
            r.p50_us,
            r.p99_us,
            opt(r.server_cpu, 2),
            opt(r.server_cpu_us_per_request, 1),
            opt(r.loadgen_cpu, 2),
            r.errors,
        ));
    }
    out.push_str(
        "\nEach server (every span it made is either received by the sink or dropped by its batch processor):\n\n| round | tracing | requests sent | spans received | spans dropped (server log) | exports | exit |\n|---|---|---|---|---|---|---|\n",
    );
    for s in &report.servers {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            s.round,
            s.mode_label,
            thousands(s.sent.values().sum()),
            thousands(s.received.spans),
            thousands(s.dropped_spans),
            thousands(s.received.exports),
            s.exit,
        ));
    }
    out.push_str(&format!(
        "\nMedians of {} rounds; spans received by the OTLP sink against the requests sent (warm-up included) over all rounds:\n\n",
        report.rounds
    ));
    out.push_str(
        "| scenario | tracing | req/s | vs off | p50 / p99 µs | server CPU µs/req | vs off | spans received / requests sent | evaluation events |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in &report.summary {
        let ratio = if s.requests_sent > 0 {
            format!(" ({:.2} %)", s.spans_received as f64 * 100.0 / s.requests_sent as f64)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} / {:.0} | {} | {} | {} / {}{} | {} |\n",
            s.scenario,
            s.mode_label,
            thousands(s.median_throughput.round() as u64),
            share(s.throughput_vs_off),
            s.median_p50_us,
            s.median_p99_us,
            opt(s.median_server_cpu_us_per_request, 1),
            share(s.cpu_vs_off),
            thousands(s.spans_received),
            thousands(s.requests_sent),
            ratio,
            thousands(s.evaluation_events),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};

    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..KeyValue::default()
        }
    }

    #[test]
    fn spans_are_counted_by_operation() {
        let rpc = Span {
            name: "flagd.evaluation.v1.Service/ResolveBoolean".into(),
            attributes: vec![
                kv("rpc.service", "flagd.evaluation.v1.Service"),
                kv("rpc.method", "ResolveBoolean"),
            ],
            ..Span::default()
        };
        let http = Span {
            name: "POST".into(),
            attributes: vec![
                kv("http.request.method", "POST"),
                kv("http.route", "/ofrep/v1/evaluate/flags/{key}"),
            ],
            ..Span::default()
        };
        assert_eq!(operation(&rpc), scenario_operation(Scenario::ResolveBoolean));
        assert_eq!(operation(&http), scenario_operation(Scenario::OfrepSingle));
        assert_eq!(operation(&Span::default()), "");
    }

    #[test]
    fn modes_set_and_clear_the_otel_variables() {
        let off = environment(
            Mode::Off,
            0.01,
            "http://127.0.0.1:1",
            &[("OTEL_BSP_MAX_QUEUE_SIZE".into(), "1".into())],
        );
        assert!(off.iter().all(|(k, v)| k.starts_with("OTEL_") && v.is_none()));
        let sampled = environment(Mode::Sampled, 0.01, "http://127.0.0.1:1", &[]);
        let get = |env: &[(String, Option<String>)], k: &str| {
            env.iter().find(|(key, _)| key == k).and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get(&sampled, "OTEL_TRACES_SAMPLER").as_deref(),
            Some("parentbased_traceidratio")
        );
        assert_eq!(get(&sampled, "OTEL_TRACES_SAMPLER_ARG").as_deref(), Some("0.01"));
        let on = environment(
            Mode::On,
            0.01,
            "http://127.0.0.1:1",
            &[("OTEL_BSP_MAX_QUEUE_SIZE".into(), "65536".into())],
        );
        assert_eq!(get(&on, "OTEL_TRACES_SAMPLER").as_deref(), Some("always_on"));
        assert_eq!(get(&on, "OTEL_BSP_MAX_QUEUE_SIZE").as_deref(), Some("65536"));
        assert_eq!(Mode::Sampled.label(0.01), "sampled-1%");
        assert_eq!(Mode::Sampled.label(0.005), "sampled-0.5%");
    }

    #[test]
    fn span_counts_are_checked_against_the_mode() {
        let run = |mode, sent: u64, spans: u64| ServerRun {
            round: 1,
            mode,
            mode_label: mode.label(0.01),
            sent: [("op".to_owned(), sent)].into(),
            received: Received {
                spans,
                by_operation: [(
                    "op".to_owned(),
                    Operation {
                        spans,
                        evaluation_events: spans,
                    },
                )]
                .into(),
                ..Received::default()
            },
            exit: "exit status: 0".into(),
            exporter_log: Vec::new(),
            dropped_spans: 0,
        };
        assert!(check(&run(Mode::Off, 1000, 0), 0.01).is_empty());
        assert_eq!(check(&run(Mode::Off, 1000, 3), 0.01).len(), 1);
        assert!(check(&run(Mode::On, 100_000, 100_000), 0.01).is_empty());
        assert_eq!(check(&run(Mode::On, 100_000, 97_952), 0.01).len(), 1);
        assert!(check(&run(Mode::Sampled, 100_000, 1_030), 0.01).is_empty());
        assert_eq!(check(&run(Mode::Sampled, 100_000, 2_000), 0.01).len(), 1);
    }

    #[test]
    fn dropped_spans_are_read_from_the_log() {
        let log = vec![
            "WARN opentelemetry_sdk: name=\"BatchSpanProcessor.SpanDroppingStarted\" BatchSpanProcessor dropped a Span".to_owned(),
            "WARN opentelemetry_sdk: name=\"BatchSpanProcessor.SpansDropped\" dropped_span_count=89931 max_queue_size=2048 Spans were dropped".to_owned(),
        ];
        assert_eq!(dropped_spans(&log), 89_931);
        assert_eq!(dropped_spans(&[]), 0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[tokio::test]
    async fn the_sink_counts_what_it_is_sent() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span::Event};
        let sink = start_sink().await.unwrap();
        let mut client = TraceServiceClient::connect(sink.endpoint.clone()).await.unwrap();
        let span = Span {
            name: "x".into(),
            events: vec![
                Event {
                    name: EVALUATION_EVENT.into(),
                    ..Event::default()
                },
                Event {
                    name: "other".into(),
                    ..Event::default()
                },
            ],
            ..Span::default()
        };
        client
            .export(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span.clone(), span],
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                }],
            })
            .await
            .unwrap();
        let r = sink.sink.take();
        assert_eq!((r.exports, r.spans, r.events, r.evaluation_events), (1, 2, 4, 2));
        assert_eq!(r.by_operation["x"].spans, 2);
        assert_eq!(sink.sink.take().spans, 0);
    }
}
