//! Results as a table and as JSON.

use serde::Serialize;

use crate::driver::{LoadSpec, Measured};

/// One measured run of one scenario against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    pub scenario: String,
    pub flags: usize,
    pub attributes: usize,
    pub connections: usize,
    pub load: LoadSpec,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// CPU cores the server used on average during the measurement.
    pub server_cpu: Option<f64>,
    /// CPU cores this load generator used.
    pub loadgen_cpu: Option<f64>,
    /// Throughput as a share of the baseline's in the same run.
    pub vs_baseline: Option<f64>,
}

impl Row {
    pub fn new(
        target: &str,
        scenario: &str,
        flags: usize,
        attributes: usize,
        connections: usize,
        load: LoadSpec,
        m: &Measured,
    ) -> Row {
        Row {
            target: target.into(),
            scenario: scenario.into(),
            flags,
            attributes,
            connections,
            load,
            requests: m.requests,
            errors: m.errors,
            first_error: m.first_error.clone(),
            throughput: m.throughput(),
            p50_us: m.quantile_us(0.5),
            p90_us: m.quantile_us(0.9),
            p99_us: m.quantile_us(0.99),
            p999_us: m.quantile_us(0.999),
            max_us: m.latency.max() as f64 / 1000.0,
            server_cpu: None,
            loadgen_cpu: None,
            vs_baseline: None,
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// A Markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| target | scenario | flags | attrs | conc | req/s | vs baseline | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | server CPU | loadgen CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let concurrency = match r.load.rate {
            Some(rate) => format!("{} @ {rate:.0}/s", r.load.concurrency),
            None => r.load.concurrency.to_string(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |\n",
            r.target,
            r.scenario,
            r.flags,
            r.attributes,
            concurrency,
            r.throughput,
            r.vs_baseline
                .map_or_else(|| "-".into(), |v| format!("{:.0}%", v * 100.0)),
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.errors,
            opt(r.server_cpu, 2),
            opt(r.loadgen_cpu, 2),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn table_has_a_row_per_run() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
        h.record(150_000).unwrap();
        let m = Measured {
            requests: 10,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(1),
            latency: h,
        };
        let spec = LoadSpec {
            concurrency: 4,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            rate: None,
        };
        let mut row = Row::new("vexil", "resolve-boolean", 10, 5, 1, spec, &m);
        row.vs_baseline = Some(0.85);
        let t = table(&[row]);
        assert!(
            t.contains("| vexil | resolve-boolean | 10 | 5 | 4 | 10 | 85% | 150 |"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 3);
    }
}
