//! Prometheus metrics. Labels are bounded: protocol (a fixed set), reason (six values), stream kind.
//!
//! Storage is bounded whether or not anyone scrapes `/metrics`: the recorder queues histogram
//! samples until they are drained into fixed buckets, and [`spawn_upkeep`] drains them every
//! [`UPKEEP_INTERVAL`] (a scrape drains them too). Without it, every latency sample would be kept
//! until the next scrape: about 8 bytes per evaluation, forever on a server nobody scrapes.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vexil_core::Reason;
use vexil_service::{Observer, ReasonTally};

const EVALUATIONS: &str = "vexil_evaluations_total";
const LATENCY: &str = "vexil_evaluation_duration_seconds";
const CONFIG_VERSION: &str = "vexil_config_version";
const FLAGS: &str = "vexil_flags";
const STREAMS: &str = "vexil_connected_streams";
const STREAMS_REJECTED: &str = "vexil_streams_rejected_total";
const CONNECTIONS_REJECTED: &str = "vexil_connections_rejected_total";
const SOURCE_UP: &str = "vexil_source_up";
const CACHE_UP: &str = "vexil_config_cache_up";
const CACHE_RECEIVED: &str = "vexil_config_messages_received_total";
const OUTBOX_PUBLISHED: &str = "vexil_outbox_published_total";
const CACHE_WRITES: &str = "vexil_config_cache_writes_total";
const STORE_LOADS: &str = "vexil_store_loads_total";
const TRACKED: &str = "vexil_tracked_events_total";
const EXPOSURES: &str = "vexil_exposures_total";
const TRACK_WRITES: &str = "vexil_tracking_transactions_total";

/// How often queued histogram samples are drained into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the global recorder (once per process) and returns the handle `/metrics` renders.
/// The caller runs [`spawn_upkeep`] on it.
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
    metrics::describe_counter!(STREAMS_REJECTED, "Streams refused because --max-streams were open");
    metrics::describe_gauge!(
        SOURCE_UP,
        "1 while a source's last load succeeded, 0 while it fails (its last good flags keep serving)"
    );
    metrics::describe_gauge!(
        CACHE_UP,
        "1 while the config cache and change bus (Redis, or in-process) answers, 0 while it does not"
    );
    metrics::describe_counter!(CACHE_RECEIVED, "Config change messages received from the bus");
    metrics::describe_counter!(OUTBOX_PUBLISHED, "Outbox rows this replica announced on the bus");
    metrics::describe_counter!(
        CACHE_WRITES,
        "Environment snapshots this replica wrote to the config cache"
    );
    metrics::describe_counter!(
        STORE_LOADS,
        "Environments read whole, from the config cache or from the database (catching up from the history is not counted)"
    );
    metrics::describe_counter!(
        TRACKED,
        "Tracked events by outcome: accepted, duplicate (a retry), rejected (invalid), rate_limited, overloaded"
    );
    metrics::describe_counter!(
        EXPOSURES,
        "Server-side exposures by outcome: recorded, deduplicated, dropped (queue full), written, retried (a batch that failed, tried again), failed (given up)"
    );
    metrics::describe_counter!(TRACK_WRITES, "Tracking transactions by outcome: committed, failed");
    metrics::describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused because --max-connections were open"
    );
    Ok(handle)
}

/// Drains the recorder's queued samples every [`UPKEEP_INTERVAL`] until the task is aborted, so
/// memory stays bounded when `/metrics` is never scraped.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// The metric handles of one protocol, looked up in the registry once.
struct Handles {
    evaluations: [metrics::Counter; ReasonTally::REASONS.len()],
    latency: metrics::Histogram,
}

thread_local! {
    /// Per thread, so the hot path takes no lock: protocol → handles (a handful of entries).
    static HANDLES: std::cell::RefCell<Vec<(&'static str, std::rc::Rc<Handles>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn handles(protocol: &'static str) -> std::rc::Rc<Handles> {
    HANDLES.with(|cell| {
        if let Some((_, h)) = cell.borrow().iter().find(|(p, _)| *p == protocol) {
            return h.clone();
        }
        let h = std::rc::Rc::new(Handles {
            evaluations: ReasonTally::REASONS
                .map(|r| metrics::counter!(EVALUATIONS, "protocol" => protocol, "reason" => r.as_str())),
            latency: metrics::histogram!(LATENCY, "protocol" => protocol),
        });
        cell.borrow_mut().push((protocol, h.clone()));
        h
    })
}

/// Records the flag service's evaluations: counted by protocol and reason, timed by protocol.
#[derive(Debug, Clone, Copy)]
pub struct Evaluations;

impl Observer for Evaluations {
    fn evaluation(&self, protocol: &'static str, reason: Reason, took: Duration) {
        let h = handles(protocol);
        h.evaluations[ReasonTally::index(reason)].increment(1);
        h.latency.record(took.as_secs_f64());
    }

    fn bulk_evaluation(&self, protocol: &'static str, tally: &ReasonTally, took: Duration) {
        let h = handles(protocol);
        for (counter, &n) in h.evaluations.iter().zip(tally.counts()) {
            if n > 0 {
                counter.increment(n);
            }
        }
        h.latency.record(took.as_secs_f64());
    }
}

/// The configuration being served.
pub fn config(version: u64, flags: usize) {
    metrics::gauge!(CONFIG_VERSION).set(version as f64);
    metrics::gauge!(FLAGS).set(flags as f64);
}

/// Every source's state (`vexil_source_up{source}`: names come from the configuration, so the
/// label is bounded).
pub fn sources(readiness: &vexil_service::Readiness) {
    for source in &readiness.sources {
        let up = matches!(source.state, vexil_service::SourceState::Loaded);
        metrics::gauge!(SOURCE_UP, "source" => source.name.clone()).set(if up { 1.0 } else { 0.0 });
    }
}

/// A connection refused by `--max-connections` on the `server` port.
/// The store source's loads and the change bus's health and counters.
pub fn replication(source: &vexil_service::StoreSource, published: u64) {
    let cache = source.cache();
    let health = cache.health();
    metrics::gauge!(CACHE_UP, "kind" => cache.kind()).set(if health.up { 1.0 } else { 0.0 });
    metrics::counter!(CACHE_RECEIVED, "kind" => cache.kind()).absolute(health.received);
    metrics::counter!(OUTBOX_PUBLISHED).absolute(published);
    metrics::counter!(CACHE_WRITES).absolute(source.cache_writes() as u64);
    metrics::counter!(STORE_LOADS, "from" => "cache").absolute(source.cache_loads() as u64);
    metrics::counter!(STORE_LOADS, "from" => "database").absolute(source.whole_loads() as u64);
}

/// The tracker's counters.
pub fn tracking(stats: &vexil_service::TrackerStats) {
    for (outcome, n) in [
        ("accepted", stats.events_accepted),
        ("duplicate", stats.events_duplicate),
        ("rejected", stats.events_rejected),
        ("rate_limited", stats.calls_rate_limited),
        ("overloaded", stats.calls_overloaded),
    ] {
        metrics::counter!(TRACKED, "outcome" => outcome).absolute(n);
    }
    for (outcome, n) in [
        ("recorded", stats.exposures_recorded),
        ("deduplicated", stats.exposures_deduplicated),
        ("dropped", stats.exposures_dropped),
        ("written", stats.exposures_written),
        ("failed", stats.exposures_failed),
        ("retried", stats.exposures_retried),
    ] {
        metrics::counter!(EXPOSURES, "outcome" => outcome).absolute(n);
    }
    metrics::counter!(TRACK_WRITES, "outcome" => "committed").absolute(stats.batches_written);
    metrics::counter!(TRACK_WRITES, "outcome" => "failed").absolute(stats.write_errors);
}

pub fn connection_rejected(server: &'static str) {
    metrics::counter!(CONNECTIONS_REJECTED, "server" => server).increment(1);
}

/// A stream refused by `--max-streams`.
pub fn stream_rejected(kind: &'static str) {
    metrics::counter!(STREAMS_REJECTED, "kind" => kind).increment(1);
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
