//! The soak's report: what a run measured (per protocol, per stream, the churned flag file and
//! the server's resident memory), serialised as JSON, and its rendering as readable text.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Proto;

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
    pub(super) fn of(h: &Histogram<u64>) -> Latency {
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
