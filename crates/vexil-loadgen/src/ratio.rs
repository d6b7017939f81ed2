//! Throughput ratios on one server (the speed target of issue #8: flagd.evaluation.v1
//! ResolveBoolean on targeting flags against the same server's `grpc.health.v1` Check).
//!
//! Two things make a plain "run A for 10 s, then B for 10 s" ratio unreliable on a shared 2-vCPU
//! machine, and this runner removes both:
//!
//! - **Drift.** The host's load changes over seconds; two adjacent 10 s runs of the same scenario
//!   differ by up to ±15 %. Here every round runs each scenario for one short window, the order
//!   rotating from round to round, and a round's ratio compares windows a few seconds apart.
//!   The median over rounds drops the rounds a burst landed in.
//! - **The client.** tonic's client (a channel task behind a buffer, a codec per call, the answer
//!   decoded into a message) costs about as much CPU per call as the server, and more for a
//!   resolve than for a Check. Here each request is framed once and sent over raw HTTP/2 (`h2`);
//!   the answer is read, its `grpc-status` checked and its bytes dropped — the same small work for
//!   every scenario, so the server's core is what saturates.
//!
//! With the server's pid, each window also reads the CPU time of the server's threads, giving CPU
//! per request: its ratio is the throughput ratio of a server core that is always busy.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use serde::Serialize;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use vexil_proto::flagd::evaluation::{v1, v2};

use crate::flags::catalog;
use crate::process::thread_cpu_nanos;
use crate::wire::{first_message, grpc_frame, h2_connect_to};
use crate::workload::{Req, Scenario, requests};

/// What to run. The first scenario is the yardstick the others are compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub host: String,
    pub port: u16,
    /// The server's pid, for its CPU per request (`None`: throughput only).
    pub server_pid: Option<u32>,
    pub scenarios: Vec<Scenario>,
    /// Flags the server serves (`vexil-loadgen run --flags N --write-flags`), and context
    /// attributes per request.
    pub flags: usize,
    pub attrs: usize,
    pub concurrency: usize,
    pub connections: usize,
    #[serde(serialize_with = "secs")]
    pub window: Duration,
    pub rounds: usize,
    /// An unrecorded window per scenario before the first round.
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// One scenario's window of one round.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub round: usize,
    pub scenario: &'static str,
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// Server CPU (all threads) per request, microseconds.
    pub server_cpu_us: Option<f64>,
}

/// One scenario over all rounds, against the yardstick.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub requests: u64,
    pub median_per_second: f64,
    pub median_server_cpu_us: Option<f64>,
    /// This scenario's throughput over the yardstick's in the same round: median, lowest, highest.
    pub ratio_median: f64,
    /// A distribution-free 95 % confidence interval of that median (order statistics).
    pub ratio_ci: (f64, f64),
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Requests per second over all rounds against the yardstick's.
    pub ratio_of_totals: f64,
    /// The yardstick's median server CPU per request over this scenario's.
    pub cpu_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub spec: Spec,
    /// The decoded answer to each scenario's first request (what was measured is what was meant).
    pub first_answers: Vec<(String, String)>,
    pub windows: Vec<Window>,
    pub summaries: Vec<Summary>,
}

/// A request framed once: its method's URI and its gRPC frame.
#[derive(Debug, Clone)]
pub struct RawRequest {
    uri: http::Uri,
    frame: Bytes,
}

impl RawRequest {
    /// `req` as a raw gRPC request (`Err` for an HTTP scenario).
    pub fn new(req: &Req) -> anyhow::Result<RawRequest> {
        let (uri, frame): (&'static str, _) = match req {
            Req::Bool(r) => (
                "http://localhost/flagd.evaluation.v1.Service/ResolveBoolean",
                grpc_frame(r),
            ),
            Req::Str(r) => (
                "http://localhost/flagd.evaluation.v1.Service/ResolveString",
                grpc_frame(r),
            ),
            Req::All(r) => ("http://localhost/flagd.evaluation.v1.Service/ResolveAll", grpc_frame(r)),
            Req::V2Bool(r) => (
                "http://localhost/flagd.evaluation.v2.Service/ResolveBoolean",
                grpc_frame(r),
            ),
            Req::Health => (
                "http://localhost/grpc.health.v1.Health/Check",
                grpc_frame(&HealthCheckRequest::default()),
            ),
            Req::Http { path, .. } => anyhow::bail!("{path} is not a gRPC method"),
        };
        Ok(RawRequest {
            uri: http::Uri::from_static(uri),
            frame,
        })
    }
}

/// Sends `req` on `conn` and reads the whole answer: its body, or why it failed (transport error,
/// or a `grpc-status` other than 0).
pub async fn call(conn: &h2::client::SendRequest<Bytes>, req: &RawRequest) -> Result<Bytes, String> {
    let head = http::Request::post(req.uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = conn.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, mut send) = ready.send_request(head, false).map_err(|e| e.to_string())?;
    send.send_data(req.frame.clone(), true).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if let Some(status) = response.headers().get("grpc-status") {
        // A trailers-only answer: an error unless 0.
        return if status == "0" {
            Ok(Bytes::new())
        } else {
            Err(format!("grpc-status {status:?}"))
        };
    }
    let mut body = response.into_body();
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        match (&first, &mut more) {
            (None, _) => first = Some(chunk),
            (Some(f), None) => {
                let mut joined = BytesMut::from(&f[..]);
                joined.extend_from_slice(&chunk);
                more = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&chunk),
        }
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(status) if status == "0" => Ok(more.map_or_else(|| first.unwrap_or_default(), BytesMut::freeze)),
        Some(status) => Err(format!("grpc-status {status:?}")),
        None => Err("no grpc-status".into()),
    }
}

/// The answer to `req` decoded for a person to read.
fn describe(scenario: Scenario, body: &[u8]) -> anyhow::Result<String> {
    let message = first_message(body).ok_or_else(|| anyhow::anyhow!("no message in {} bytes", body.len()))?;
    Ok(match scenario {
        Scenario::ResolveBoolean | Scenario::ResolveTargeting => {
            format!("{:?}", v1::ResolveBooleanResponse::decode(message)?)
        }
        Scenario::ResolveString => format!("{:?}", v1::ResolveStringResponse::decode(message)?),
        Scenario::ResolveAll => {
            let all = v1::ResolveAllResponse::decode(message)?;
            format!("ResolveAllResponse with {} flags", all.flags.len())
        }
        Scenario::V2Boolean => format!("{:?}", v2::ResolveBooleanResponse::decode(message)?),
        Scenario::Health => format!("{:?}", tonic_health::pb::HealthCheckResponse::decode(message)?),
        Scenario::OfrepSingle | Scenario::OfrepBulk => anyhow::bail!("not a gRPC scenario"),
    })
}

/// Runs every scenario's window once per round (the order rotating) and sums it up; `progress`
/// gets a line per window.
pub async fn run(spec: &Spec, mut progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    anyhow::ensure!(!spec.scenarios.is_empty(), "no scenario");
    anyhow::ensure!(
        spec.rounds > 0 && spec.concurrency > 0,
        "rounds and concurrency must be positive"
    );
    let flags = catalog(spec.flags);
    let mut pools = Vec::new();
    for &scenario in &spec.scenarios {
        let pool: Vec<RawRequest> = requests(scenario, &flags, spec.attrs, 256)
            .iter()
            .map(RawRequest::new)
            .collect::<anyhow::Result<_>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", scenario.name()))?;
        pools.push(Arc::new(pool));
    }
    let mut conns = Vec::new();
    for _ in 0..spec.connections.max(1) {
        conns.push(h2_connect_to(&spec.host, spec.port).await?);
    }
    let conns = Arc::new(conns);

    let mut first_answers = Vec::new();
    for (scenario, pool) in spec.scenarios.iter().zip(&pools) {
        let body = call(&conns[0], &pool[0])
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", scenario.name()))?;
        let answer = describe(*scenario, &body)?;
        anyhow::ensure!(
            !answer.contains("\"ERROR\""),
            "{}: the server answered an error: {answer}",
            scenario.name()
        );
        progress(&format!("{}: {answer}", scenario.name()));
        first_answers.push((scenario.name().to_owned(), answer));
    }
    for pool in &pools {
        window(&conns, pool, spec.concurrency, spec.warmup, None).await?;
    }

    let mut windows = Vec::new();
    for round in 0..spec.rounds {
        for k in 0..spec.scenarios.len() {
            let i = (round + k) % spec.scenarios.len();
            let (requests, seconds, cpu) =
                window(&conns, &pools[i], spec.concurrency, spec.window, spec.server_pid).await?;
            let w = Window {
                round,
                scenario: spec.scenarios[i].name(),
                requests,
                seconds,
                per_second: requests as f64 / seconds,
                server_cpu_us: cpu.map(|nanos| nanos as f64 / 1000.0 / requests.max(1) as f64),
            };
            progress(&format!(
                "round {round} {:<18} {:>9.0} req/s{}",
                w.scenario,
                w.per_second,
                w.server_cpu_us
                    .map(|us| format!("  {us:6.2} µs server CPU per request"))
                    .unwrap_or_default()
            ));
            windows.push(w);
        }
    }
    let summaries = summarize(&spec.scenarios, &windows);
    Ok(Report {
        spec: spec.clone(),
        first_answers,
        windows,
        summaries,
    })
}

/// `concurrency` workers sending `pool` round-robin over `conns` for `length`: requests
/// answered, seconds (until the last answer), and the server's CPU nanoseconds if `pid` is given.
/// Any failed request fails the window (a ratio of a failing server means nothing).
async fn window(
    conns: &Arc<Vec<h2::client::SendRequest<Bytes>>>,
    pool: &Arc<Vec<RawRequest>>,
    concurrency: usize,
    length: Duration,
    pid: Option<u32>,
) -> anyhow::Result<(u64, f64, Option<u64>)> {
    let cpu_before = pid.and_then(thread_cpu_nanos);
    let start = Instant::now();
    let end = start + length;
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (conns, pool) = (conns.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = w;
            while Instant::now() < end {
                call(&conns[i % conns.len()], &pool[i % pool.len()]).await?;
                done += 1;
                i += concurrency;
            }
            Ok::<u64, String>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?.map_err(|e| anyhow::anyhow!("a request failed: {e}"))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = match (cpu_before, pid.and_then(thread_cpu_nanos)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    Ok((total, seconds, cpu))
}

/// The order statistics bounding a 95 % confidence interval of the median of `values`: ranks
/// n/2 ∓ 1.96·√n/2 (the normal approximation of the binomial; exact enough from n ≈ 10). With
/// fewer than 6 values the interval is the whole range.
fn median_ci(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    let low = ((n as f64 / 2.0 - half).floor().max(1.0) as usize).min(n) - 1;
    let high = ((n as f64 / 2.0 + half).ceil() as usize).clamp(1, n) - 1;
    (values[low], values[high])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Per scenario: its medians, and its ratios to the first scenario round by round.
pub fn summarize(scenarios: &[Scenario], windows: &[Window]) -> Vec<Summary> {
    let of = |s: Scenario| windows.iter().filter(move |w| w.scenario == s.name());
    let yardstick = scenarios[0];
    let rate_in = |s: Scenario, round: usize| of(s).find(|w| w.round == round).map(|w| w.per_second);
    let totals = |s: Scenario| {
        let (req, sec) = of(s).fold((0u64, 0f64), |(r, t), w| (r + w.requests, t + w.seconds));
        req as f64 / sec
    };
    let cpu = |s: Scenario| {
        let v: Vec<f64> = of(s).filter_map(|w| w.server_cpu_us).collect();
        (!v.is_empty()).then(|| median(v))
    };
    scenarios
        .iter()
        .map(|&s| {
            let ratios: Vec<f64> = of(s)
                .filter_map(|w| rate_in(yardstick, w.round).map(|y| w.per_second / y))
                .collect();
            Summary {
                scenario: s.name(),
                requests: of(s).map(|w| w.requests).sum(),
                median_per_second: median(of(s).map(|w| w.per_second).collect()),
                median_server_cpu_us: cpu(s),
                ratio_median: median(ratios.clone()),
                ratio_ci: median_ci(ratios.clone()),
                ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ratio_of_totals: totals(s) / totals(yardstick),
                cpu_ratio: cpu(yardstick).zip(cpu(s)).map(|(y, c)| y / c),
            }
        })
        .collect()
}

/// The summary as a Markdown table.
pub fn table(report: &Report) -> String {
    let yardstick = report.spec.scenarios[0].name();
    let mut out = format!(
        "| scenario | req/s (median) | server CPU per request | ratio to {yardstick}: median of {} rounds | 95 % CI of the median | lowest – highest | of totals | by server CPU |\n|---|---|---|---|---|---|---|---|\n",
        report.spec.rounds
    );
    for s in &report.summaries {
        let pct = |x: f64| format!("{:.1} %", x * 100.0);
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} – {} | {} – {} | {} | {} |\n",
            s.scenario,
            s.median_per_second,
            s.median_server_cpu_us.map_or("–".into(), |us| format!("{us:.2} µs")),
            pct(s.ratio_median),
            pct(s.ratio_ci.0),
            pct(s.ratio_ci.1),
            pct(s.ratio_min),
            pct(s.ratio_max),
            pct(s.ratio_of_totals),
            s.cpu_ratio.map_or("–".into(), pct),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(round: usize, scenario: Scenario, per_second: f64, cpu: f64) -> Window {
        Window {
            round,
            scenario: scenario.name(),
            requests: per_second as u64,
            seconds: 1.0,
            per_second,
            server_cpu_us: Some(cpu),
        }
    }

    #[test]
    fn ratios_are_taken_within_rounds_and_the_median_drops_an_outlier_round() {
        use Scenario::{Health, ResolveTargeting};
        let windows = vec![
            w(0, Health, 100.0, 10.0),
            w(0, ResolveTargeting, 90.0, 11.0),
            // The host was busy for all of round 1: both slow, the ratio unchanged.
            w(1, ResolveTargeting, 45.0, 11.0),
            w(1, Health, 50.0, 10.0),
            // A burst hit only the targeting window of round 2.
            w(2, Health, 100.0, 10.0),
            w(2, ResolveTargeting, 60.0, 12.0),
        ];
        let s = summarize(&[Health, ResolveTargeting], &windows);
        assert_eq!(s[0].ratio_median, 1.0);
        let t = &s[1];
        assert!((t.ratio_median - 0.9).abs() < 1e-9, "{t:?}");
        assert!((t.ratio_min - 0.6).abs() < 1e-9);
        assert!((t.ratio_max - 0.9).abs() < 1e-9);
        assert!((t.ratio_of_totals - 195.0 / 250.0).abs() < 1e-9);
        assert_eq!(t.median_server_cpu_us, Some(11.0));
        assert!((t.cpu_ratio.unwrap() - 10.0 / 11.0).abs() < 1e-9);
        assert_eq!(t.median_per_second, 60.0);
    }

    #[test]
    fn the_median_interval_is_bounded_by_order_statistics_around_the_middle() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        // n = 100: ranks 50 ∓ 9.8 → the 40th and 60th values.
        assert_eq!(median_ci(values.clone()), (40.0, 60.0));
        assert_eq!(median(values), 50.5);
        let few = vec![3.0, 1.0, 2.0];
        assert_eq!(median_ci(few), (1.0, 3.0));
        assert!(median_ci(Vec::new()).0.is_nan());
    }

    #[test]
    fn raw_requests_are_framed_protobuf_of_their_method() {
        let flags = catalog(10);
        let req = &requests(Scenario::ResolveTargeting, &flags, 5, 1)[0];
        let raw = RawRequest::new(req).unwrap();
        assert_eq!(raw.uri.path(), "/flagd.evaluation.v1.Service/ResolveBoolean");
        let decoded = v1::ResolveBooleanRequest::decode(first_message(&raw.frame).unwrap()).unwrap();
        let Req::Bool(original) = req else { panic!("boolean") };
        assert_eq!(&decoded, original);
        let health = RawRequest::new(&Req::Health).unwrap();
        assert_eq!(health.uri.path(), "/grpc.health.v1.Health/Check");
        assert!(
            RawRequest::new(&Req::Http {
                path: "/ofrep".into(),
                body: Bytes::new()
            })
            .is_err()
        );
    }
}
