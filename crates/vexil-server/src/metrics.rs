//! Prometheus metrics on the management port's `/metrics`, named by the OpenTelemetry→Prometheus
//! conventions: snake case under `vexil_`, base units in the name (`_seconds`), counters ending in
//! `_total`, `_timestamp_seconds` for points in time (an age is `time() - …`), `_info` for the
//! build. `docs/observability.md` lists every metric with its labels.
//!
//! Every label value is bounded and comes from the server or its configuration, never from a
//! request: protocols, reasons, stream kinds and operations are fixed sets; flag sets are those of
//! flags that exist (a request naming a missing flag or flag set is counted under `flag_set=""`);
//! sources and environments are configured.
//!
//! Storage is bounded whether or not anyone scrapes `/metrics`: the recorder queues histogram
//! samples until they are drained into fixed buckets, and [`spawn_upkeep`] drains them every
//! [`UPKEEP_INTERVAL`] (a scrape drains them too). Without it, every latency sample would be kept
//! until the next scrape: about 8 bytes per evaluation, forever on a server nobody scrapes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vexil_core::snapshot::CompiledSource;
use vexil_service::io::{CacheCall, IoObserver, StoreCall};
use vexil_service::{BulkEvaluation, Evaluation, Observer, Published, Readiness, ReasonTally, StoreSource};
use vexil_store::{PageRequest, Store, StoreError};

const EVALUATIONS: &str = "vexil_evaluations_total";
const EVALUATION_DURATION: &str = "vexil_evaluation_duration_seconds";
const SNAPSHOTS: &str = "vexil_snapshots_published_total";
const FLAGS: &str = "vexil_flags";
const CONFIG_VERSION: &str = "vexil_config_version";
const CONFIG_CHANGED: &str = "vexil_config_last_change_timestamp_seconds";
const SOURCE_UP: &str = "vexil_source_up";
const SOURCE_CHANGED: &str = "vexil_source_last_change_timestamp_seconds";
const STREAMS: &str = "vexil_stream_subscribers";
const STREAMS_REJECTED: &str = "vexil_streams_rejected_total";
const CONNECTIONS_REJECTED: &str = "vexil_connections_rejected_total";
const STORE_UP: &str = "vexil_store_up";
const STORE_DURATION: &str = "vexil_store_operation_duration_seconds";
const STORE_LOADS: &str = "vexil_store_loads_total";
const CACHE_UP: &str = "vexil_config_cache_up";
const CACHE_DURATION: &str = "vexil_config_cache_operation_duration_seconds";
const CACHE_RECEIVED: &str = "vexil_config_messages_received_total";
const CACHE_WRITES: &str = "vexil_config_cache_writes_total";
const OUTBOX_PUBLISHED: &str = "vexil_outbox_published_total";
const TRACKED: &str = "vexil_tracked_events_total";
const SCRUBBED: &str = "vexil_tracked_values_scrubbed_total";
const EXPOSURES: &str = "vexil_exposures_total";
const TRACK_WRITES: &str = "vexil_tracking_transactions_total";
const TRACK_QUEUE: &str = "vexil_tracking_queue_length";
const TRACK_QUEUE_CAPACITY: &str = "vexil_tracking_queue_capacity";
const BUILD_INFO: &str = "vexil_build_info";

/// How often queued histogram samples are drained into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Buckets of one flag evaluation: 1 µs to 10 ms.
const EVALUATION_BUCKETS: [f64; 10] = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2];

/// Buckets of a store or cache call, and of any histogram not given its own: 500 µs to 10 s.
const CALL_BUCKETS: [f64; 14] = [
    5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder (once per process), and the observer of the store's and the
/// cache's background calls; returns the handle `/metrics` renders. The caller runs
/// [`spawn_upkeep`] on it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = builder()?.install_recorder()?;
    describe();
    crate::telemetry::describe();
    vexil_service::io::set_observer(Box::new(Calls));
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// The recorder's configuration: every histogram's buckets (none is rendered as a summary).
fn builder() -> anyhow::Result<PrometheusBuilder> {
    let full = |name: &str| Matcher::Full(name.to_owned());
    Ok(PrometheusBuilder::new()
        .set_buckets(&CALL_BUCKETS)?
        .set_buckets_for_metric(full(EVALUATION_DURATION), &EVALUATION_BUCKETS)?
        .set_buckets_for_metric(full(crate::telemetry::RPC_DURATION), &crate::telemetry::BUCKETS)?
        .set_buckets_for_metric(full(crate::telemetry::HTTP_DURATION), &crate::telemetry::BUCKETS)?)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        EVALUATIONS,
        "Flag evaluations by protocol, flag set (\"\": none, or no such flag) and reason"
    );
    describe_histogram!(
        EVALUATION_DURATION,
        Unit::Seconds,
        "Time to evaluate a request's flags (one, or every flag a bulk request sees), by protocol"
    );
    describe_counter!(
        SNAPSHOTS,
        "Configuration snapshots published since start after the first (a change of any source)"
    );
    describe_gauge!(FLAGS, "Flags in the configuration being served");
    describe_gauge!(
        CONFIG_VERSION,
        "Config version of each managed environment being served"
    );
    describe_gauge!(
        CONFIG_CHANGED,
        Unit::Seconds,
        "When the config version being served of each managed environment was published (Unix time)"
    );
    describe_gauge!(
        SOURCE_UP,
        "1 while a source's last load succeeded, 0 while it fails (its last good flags keep serving)"
    );
    describe_gauge!(
        SOURCE_CHANGED,
        Unit::Seconds,
        "When the flags served from each file source last changed: the file's modification time (Unix time)"
    );
    describe_gauge!(
        STREAMS,
        "Open subscriptions by kind: event_stream, sync_flags, config_watch"
    );
    describe_counter!(STREAMS_REJECTED, "Streams refused because --max-streams were open");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused because --max-connections were open"
    );
    describe_gauge!(
        STORE_UP,
        "1 while the store answers the server's background calls, 0 while it is unreachable or failing"
    );
    describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Duration of the store calls the server makes on its own (loads, version checks, catch-up, outbox, tracking writes), by operation and outcome"
    );
    describe_counter!(
        STORE_LOADS,
        "Environments read whole, from the config cache or from the database (catching up from the history is not counted)"
    );
    describe_gauge!(
        CACHE_UP,
        "1 while the config cache and change bus (Redis, or in-process) answers, 0 while it does not"
    );
    describe_histogram!(
        CACHE_DURATION,
        Unit::Seconds,
        "Duration of config cache calls (version checks, snapshot reads and writes, announcements), by cache kind, operation and outcome"
    );
    describe_counter!(CACHE_RECEIVED, "Config change messages received from the bus");
    describe_counter!(
        CACHE_WRITES,
        "Environment snapshots this replica wrote to the config cache"
    );
    describe_counter!(OUTBOX_PUBLISHED, "Outbox rows this replica announced on the bus");
    describe_counter!(
        TRACKED,
        "Tracked events by outcome: accepted, duplicate (a retry), rejected (invalid), rate_limited, overloaded"
    );
    describe_counter!(
        SCRUBBED,
        "Tracked event properties scrubbed, by action: dropped (not allowed, named like a secret, or past a limit), redacted (a secret or an email), truncated"
    );
    describe_counter!(
        EXPOSURES,
        "Server-side exposures by outcome: recorded, deduplicated, dropped (queue full), written, retried (a batch that failed, tried again), failed (given up)"
    );
    describe_counter!(TRACK_WRITES, "Tracking transactions by outcome: committed, failed");
    describe_gauge!(
        TRACK_QUEUE,
        "Waiting in the tracker's queues now: exposures (to be batched), calls (batches of events or exposures, to be written)"
    );
    describe_gauge!(TRACK_QUEUE_CAPACITY, "How much the tracker's queues hold");
    describe_gauge!(BUILD_INFO, "Always 1; the labels name the running build");
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

// === evaluations ===

/// One counter per reason, for one protocol and flag set.
struct Counters([metrics::Counter; ReasonTally::REASONS.len()]);

impl Counters {
    fn new(protocol: &'static str, flag_set: &str) -> Counters {
        let flag_set = metrics::SharedString::from(flag_set.to_owned());
        Counters(ReasonTally::REASONS.map(|reason| {
            metrics::counter!(EVALUATIONS, "protocol" => protocol, "flag_set" => flag_set.clone(), "reason" => reason.as_str())
        }))
    }
}

/// The metric handles of one protocol, looked up in the registry once per thread.
struct Handles {
    protocol: &'static str,
    duration: metrics::Histogram,
    /// Flags without a flag set, and flags not found.
    no_flag_set: Counters,
    /// By flag set: only flag sets of flags that exist get here.
    flag_sets: HashMap<Box<str>, Counters, foldhash::fast::RandomState>,
}

impl Handles {
    fn new(protocol: &'static str) -> Handles {
        Handles {
            protocol,
            duration: metrics::histogram!(EVALUATION_DURATION, "protocol" => protocol),
            no_flag_set: Counters::new(protocol, ""),
            flag_sets: HashMap::default(),
        }
    }

    /// Calls `count` with the counters of `flag_set`.
    fn count(&mut self, flag_set: Option<&str>, count: impl FnOnce(&Counters)) {
        let Some(flag_set) = flag_set.filter(|s| !s.is_empty()) else {
            return count(&self.no_flag_set);
        };
        match self.flag_sets.get(flag_set) {
            Some(counters) => count(counters),
            None => {
                let counters = Counters::new(self.protocol, flag_set);
                count(&counters);
                self.flag_sets.insert(flag_set.into(), counters);
            }
        }
    }
}

thread_local! {
    /// Per thread, so the hot path takes no lock: by protocol (a handful).
    static HANDLES: RefCell<Vec<Handles>> = const { RefCell::new(Vec::new()) };
}

fn with_handles(protocol: &'static str, f: impl FnOnce(&mut Handles)) {
    HANDLES.with_borrow_mut(|all| {
        let at = match all.iter().position(|h| h.protocol == protocol) {
            Some(at) => at,
            None => {
                all.push(Handles::new(protocol));
                all.len() - 1
            }
        };
        f(&mut all[at]);
    });
}

/// Records the flag service's evaluations: counted by protocol, flag set and reason, timed by
/// protocol.
#[derive(Debug, Clone, Copy)]
pub struct Evaluations;

impl Observer for Evaluations {
    fn evaluation(&self, evaluation: &Evaluation<'_>) {
        with_handles(evaluation.protocol, |h| {
            h.duration.record(evaluation.took.as_secs_f64());
            let reason = ReasonTally::index(evaluation.resolution.reason);
            h.count(evaluation.flag_set(), |counters| counters.0[reason].increment(1));
        });
    }

    fn bulk_evaluation(&self, bulk: &BulkEvaluation<'_>) {
        with_handles(bulk.protocol, |h| {
            h.duration.record(bulk.took.as_secs_f64());
            for (flag_set, tally) in bulk.tally.iter() {
                h.count(flag_set, |counters| {
                    for (counter, &n) in counters.0.iter().zip(tally.counts()) {
                        if n > 0 {
                            counter.increment(n);
                        }
                    }
                });
            }
        });
    }
}

// === the store's and the cache's calls ===

/// Times the store's and the cache's background calls, and keeps `vexil_store_up`.
#[derive(Debug)]
struct Calls;

fn outcome(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

impl IoObserver for Calls {
    fn store(&self, call: StoreCall, took: Duration, error: Option<&StoreError>) {
        metrics::histogram!(STORE_DURATION, "operation" => call.as_str(), "outcome" => outcome(error.is_none()))
            .record(took.as_secs_f64());
        // A refusal (not found, a conflict) is an answer; only these say the store is not usable.
        let up = !matches!(error, Some(StoreError::Unavailable(_) | StoreError::Internal(_)));
        metrics::gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
    }

    fn cache(&self, kind: &'static str, call: CacheCall, took: Duration, error: Option<&vexil_cache::CacheError>) {
        let outcome = outcome(error.is_none());
        metrics::histogram!(CACHE_DURATION, "kind" => kind, "operation" => call.as_str(), "outcome" => outcome)
            .record(took.as_secs_f64());
    }
}

// === the configuration ===

/// The configuration's gauges, brought up to date by the server's upkeep task on every change
/// and every [`UPKEEP_INTERVAL`].
#[derive(Debug, Default)]
pub struct ConfigGauges {
    /// Per file source: its compiled document last seen (to tell a change).
    files: HashMap<String, Vec<Arc<CompiledSource>>>,
    /// Per managed environment: the version whose publication time is set.
    published: HashMap<String, i64>,
}

impl ConfigGauges {
    /// The configuration published, and every source's state. `managed`: the store's source
    /// (named [`vexil_service::STORE_SOURCE`]), whose environments [`ConfigGauges::environments`]
    /// reports.
    pub fn published(&mut self, published: &Published, readiness: &Readiness, managed: bool) {
        metrics::counter!(SNAPSHOTS).absolute(published.version);
        metrics::gauge!(FLAGS).set(published.snapshot.len() as f64);
        for source in &readiness.sources {
            let up = matches!(source.state, vexil_service::SourceState::Loaded);
            metrics::gauge!(SOURCE_UP, "source" => source.name.clone()).set(if up { 1.0 } else { 0.0 });
        }
        let compiled = published.snapshot.compiled_sources();
        let files = readiness
            .sources
            .iter()
            .filter(|s| !(managed && s.name == vexil_service::STORE_SOURCE));
        for file in files {
            let current: Vec<Arc<CompiledSource>> =
                compiled.iter().filter(|c| c.name() == file.name).cloned().collect();
            if current.is_empty() {
                continue; // never loaded: nothing served from it
            }
            let seen = self.files.get(&file.name);
            if seen.is_some_and(|seen| {
                seen.len() == current.len() && seen.iter().zip(&current).all(|(a, b)| Arc::ptr_eq(a, b))
            }) {
                continue;
            }
            let modified = std::fs::metadata(&file.name)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            metrics::gauge!(SOURCE_CHANGED, "source" => file.name.clone()).set(unix_seconds(modified));
            self.files.insert(file.name.clone(), current);
        }
    }

    /// Each managed environment's config version being served, and when it was published: read
    /// from the store once per version (a failed read is tried again next time).
    pub async fn environments(&mut self, source: &StoreSource, store: &dyn Store) {
        for (environment, version) in source.versions() {
            metrics::gauge!(CONFIG_VERSION, "environment" => environment.clone()).set(version as f64);
            if self.published.get(&environment) == Some(&version) {
                continue;
            }
            let newest = match store.list_versions(environment.clone(), PageRequest::first(1)).await {
                Ok(page) => page.items.into_iter().next(),
                Err(error) => {
                    tracing::debug!(%error, environment, "cannot read when the config version was published");
                    continue;
                }
            };
            // Newer: written since, and about to be loaded; next time.
            let Some(newest) = newest.filter(|v| v.version == version) else {
                continue;
            };
            let at = newest.created.at as f64 / 1000.0;
            metrics::gauge!(CONFIG_CHANGED, "environment" => environment.clone()).set(at);
            self.published.insert(environment, version);
        }
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The store source's loads and the change bus's health and counters.
pub fn replication(source: &StoreSource, published: u64) {
    let cache = source.cache();
    let health = cache.health();
    metrics::gauge!(CACHE_UP, "kind" => cache.kind()).set(if health.up { 1.0 } else { 0.0 });
    metrics::counter!(CACHE_RECEIVED, "kind" => cache.kind()).absolute(health.received);
    metrics::counter!(OUTBOX_PUBLISHED).absolute(published);
    metrics::counter!(CACHE_WRITES).absolute(source.cache_writes() as u64);
    metrics::counter!(STORE_LOADS, "from" => "cache").absolute(source.cache_loads() as u64);
    metrics::counter!(STORE_LOADS, "from" => "database").absolute(source.whole_loads() as u64);
}

/// The tracker's counters and queues.
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
    for (action, n) in [
        ("dropped", stats.properties_dropped),
        ("redacted", stats.values_redacted),
        ("truncated", stats.values_truncated),
    ] {
        metrics::counter!(SCRUBBED, "action" => action).absolute(n);
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
    for (queue, length, capacity) in [
        ("exposures", stats.exposures_queued, stats.exposure_queue_capacity),
        ("calls", stats.calls_queued, stats.call_queue_capacity),
    ] {
        metrics::gauge!(TRACK_QUEUE, "queue" => queue).set(length as f64);
        metrics::gauge!(TRACK_QUEUE_CAPACITY, "queue" => queue).set(capacity as f64);
    }
}

// === connections and streams ===

/// A connection refused by `--max-connections` on the `server` port.
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

#[cfg(test)]
mod tests;
