//! Prometheus metrics. Labels are bounded: protocol (a fixed set), reason (six values), stream kind.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vexil_core::Reason;

const EVALUATIONS: &str = "vexil_evaluations_total";
const LATENCY: &str = "vexil_evaluation_duration_seconds";
const CONFIG_VERSION: &str = "vexil_config_version";
const FLAGS: &str = "vexil_flags";
const STREAMS: &str = "vexil_connected_streams";

/// Installs the global recorder (once per process) and returns the handle `/metrics` renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LATENCY.into()), &buckets)?
        .install_recorder()?;
    metrics::describe_counter!(EVALUATIONS, "Flag evaluations by protocol and reason");
    metrics::describe_histogram!(LATENCY, metrics::Unit::Seconds, "Time to evaluate a request's flags");
    metrics::describe_gauge!(CONFIG_VERSION, "Version of the configuration being served");
    metrics::describe_gauge!(FLAGS, "Flags in the configuration being served");
    metrics::describe_gauge!(STREAMS, "Open EventStream and SyncFlags streams");
    Ok(handle)
}

/// One evaluation: counted by reason, timed.
pub fn evaluation(protocol: &'static str, reason: Reason, took: Duration) {
    count(protocol, reason);
    latency(protocol, took);
}

pub fn count(protocol: &'static str, reason: Reason) {
    metrics::counter!(EVALUATIONS, "protocol" => protocol, "reason" => reason.as_str()).increment(1);
}

pub fn latency(protocol: &'static str, took: Duration) {
    metrics::histogram!(LATENCY, "protocol" => protocol).record(took.as_secs_f64());
}

pub fn config(version: u64, flags: usize) {
    metrics::gauge!(CONFIG_VERSION).set(version as f64);
    metrics::gauge!(FLAGS).set(flags as f64);
}

/// Counts an open stream for as long as the guard lives.
#[derive(Debug)]
pub struct StreamGuard(&'static str);

impl StreamGuard {
    pub fn open(kind: &'static str) -> StreamGuard {
        metrics::gauge!(STREAMS, "kind" => kind).increment(1.0);
        StreamGuard(kind)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        metrics::gauge!(STREAMS, "kind" => self.0).decrement(1.0);
    }
}
