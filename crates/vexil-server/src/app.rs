//! State shared by every handler, and the one evaluation path all protocols use.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use vexil_core::snapshot::Change;
use vexil_core::{CompiledFlag, Context, Metadata, Reason, Resolution, Revision, Selector, Snapshot, ValueType};
use vexil_service::{Live, StaticContext, merge_context};

use crate::metrics;
use crate::streams::StreamLimit;

/// Handler state (cheap to clone).
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<AppInner>,
}

#[derive(Debug)]
struct AppInner {
    /// Work every stream subscriber of a selector would repeat on a change, done once: the
    /// changes between two snapshots and the sync payload of a snapshot.
    fanout: Mutex<FanoutCache>,
    streams: Arc<StreamLimit>,
    live: Live,
    statics: StaticContext,
    stream_deadline: Option<Duration>,
    disable_sync_metadata: bool,
    max_body: usize,
    shutdown: watch::Receiver<bool>,
}

/// The evaluation of one flag, owned (ready to be encoded by any protocol).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub reason: Reason,
    pub variant: Option<String>,
    pub value: Option<Value>,
    /// Selector reflection ∪ flag metadata (flagd's single-evaluation metadata).
    pub metadata: Metadata,
    /// Set when `reason` is `Error`.
    pub error: Option<vexil_core::EvalError>,
}

impl Evaluated {
    fn from_resolution(r: Resolution<'_>, selector: &Selector) -> Evaluated {
        let mut metadata = selector.metadata();
        if let Some(flag_metadata) = r.metadata {
            for (k, v) in flag_metadata {
                metadata.insert(k.clone(), v.clone());
            }
        }
        Evaluated {
            reason: r.reason,
            variant: r.variant.map(str::to_owned),
            value: r.value.cloned(),
            metadata,
            error: r.error,
        }
    }
}

/// Parameters of [`App::new`].
#[derive(Debug)]
pub struct AppConfig {
    pub live: Live,
    pub statics: StaticContext,
    pub stream_deadline: Option<Duration>,
    pub disable_sync_metadata: bool,
    pub max_body: usize,
    /// The most EventStream and SyncFlags streams open at once (`--max-streams`).
    pub max_streams: usize,
    pub shutdown: watch::Receiver<bool>,
}

impl App {
    pub fn new(c: AppConfig) -> App {
        App {
            inner: Arc::new(AppInner {
                fanout: Mutex::new(FanoutCache::default()),
                streams: StreamLimit::new(c.max_streams),
                live: c.live,
                statics: c.statics,
                stream_deadline: c.stream_deadline,
                disable_sync_metadata: c.disable_sync_metadata,
                max_body: c.max_body,
                shutdown: c.shutdown,
            }),
        }
    }

    pub fn live(&self) -> &Live {
        &self.inner.live
    }

    pub fn statics(&self) -> &StaticContext {
        &self.inner.statics
    }

    pub fn stream_deadline(&self) -> Option<Duration> {
        self.inner.stream_deadline
    }

    pub fn sync_metadata_disabled(&self) -> bool {
        self.inner.disable_sync_metadata
    }

    pub fn max_body(&self) -> usize {
        self.inner.max_body
    }

    /// Admission of server streams.
    pub fn streams(&self) -> &Arc<StreamLimit> {
        &self.inner.streams
    }

    /// What changed for `selector` from `old` to `new` (computed once for all subscribers that
    /// are up to date; a subscriber catching up from an older snapshot gets its own entry).
    pub fn changes(&self, old: &Snapshot, new: &Snapshot, selector: &Selector) -> Changes {
        let (from, to) = (old.revision(), new.revision());
        let mut cache = self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache
            .changes
            .iter()
            .find(|e| e.from == from && e.to == to && e.selector == *selector);
        if let Some(e) = hit {
            return e.changes.clone();
        }
        let changes = Arc::new(new.changes_since(old, selector));
        // Only changes into the newest snapshot are worth keeping.
        cache.changes.retain(|e| e.to == to);
        bounded_push(
            &mut cache.changes,
            ChangesEntry {
                from,
                to,
                selector: selector.clone(),
                changes: changes.clone(),
            },
        );
        changes
    }

    /// The encoded flagd `SyncFlagsResponse` of `snapshot` for `selector`, computed once and shared
    /// (reference-counted) by every subscriber.
    pub fn sync_payload(&self, snapshot: &Snapshot, selector: &Selector) -> Bytes {
        let revision = snapshot.revision();
        let mut cache = self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache
            .payloads
            .iter()
            .find(|e| e.revision == revision && e.selector == *selector);
        if let Some(e) = hit {
            return e.payload.clone();
        }
        let payload = crate::flagd::sync::encode_response(snapshot, selector, &self.inner.statics);
        // Only payloads of the newest snapshot are worth keeping (slow subscribers keep theirs).
        cache.payloads.retain(|e| e.revision == revision);
        bounded_push(
            &mut cache.payloads,
            PayloadEntry {
                revision,
                selector: selector.clone(),
                payload: payload.clone(),
            },
        );
        payload
    }

    /// A receiver that turns `true` when the server shuts down.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// The request context merged with `-X` values and `-H` headers.
    pub fn context<'h>(
        &self,
        request: Map<String, Value>,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Map<String, Value> {
        if self.inner.statics.is_empty() {
            return request;
        }
        merge_context(request, &self.inner.statics, header)
    }

    /// Evaluates one flag for every protocol: the current snapshot, the merged context, metrics.
    pub fn evaluate(
        &self,
        protocol: &'static str,
        key: &str,
        selector: &Selector,
        context: &Map<String, Value>,
        ty: ValueType,
    ) -> Evaluated {
        self.evaluate_with(protocol, key, selector, context, ty, |_, resolution| {
            Evaluated::from_resolution(resolution.clone(), selector)
        })
    }

    /// As [`App::evaluate`], handing the flag (when it exists) and the result, borrowed from the
    /// snapshot, to `f` (for encoders that write the response directly).
    pub fn evaluate_with<T>(
        &self,
        protocol: &'static str,
        key: &str,
        selector: &Selector,
        context: &Map<String, Value>,
        ty: ValueType,
        f: impl FnOnce(Option<&CompiledFlag>, &Resolution<'_>) -> T,
    ) -> T {
        let started = Instant::now();
        let snapshot = self.inner.live.snapshot();
        let ctx = Context {
            attributes: context,
            now: now(),
        };
        let flag = snapshot.get(key, selector);
        let resolution = match flag {
            Some(flag) => flag.evaluate(snapshot.engine(), ctx, ty),
            None => Resolution::not_found(key),
        };
        metrics::evaluation(protocol, resolution.reason, started.elapsed());
        f(flag, &resolution)
    }

    /// Evaluates every flag `selector` sees (bulk: flagd ResolveAll, OFREP bulk). `f` receives each
    /// flag's key, its default variant's type, and the evaluation.
    pub fn evaluate_all(
        &self,
        protocol: &'static str,
        selector: &Selector,
        context: &Map<String, Value>,
        mut f: impl FnMut(&str, Option<ValueType>, Evaluated),
    ) -> Arc<Snapshot> {
        self.evaluate_all_borrowed(protocol, selector, context, |flag, resolution| {
            f(
                flag.key(),
                flag.default_type(),
                Evaluated::from_resolution(resolution.clone(), selector),
            )
        })
    }

    /// As [`App::evaluate_all`], handing out the results borrowed from the snapshot (nothing is
    /// copied: for encoders that write the response directly).
    pub fn evaluate_all_borrowed(
        &self,
        protocol: &'static str,
        selector: &Selector,
        context: &Map<String, Value>,
        mut f: impl FnMut(&CompiledFlag, &Resolution<'_>),
    ) -> Arc<Snapshot> {
        let started = Instant::now();
        let snapshot = self.inner.live.snapshot();
        let ctx = Context {
            attributes: context,
            now: now(),
        };
        let mut tally = metrics::Tally::default();
        snapshot.evaluate_all(selector, ctx, |flag, resolution| {
            tally.add(resolution.reason);
            f(flag, &resolution);
        });
        tally.record(protocol);
        metrics::latency(protocol, started.elapsed());
        snapshot
    }
}

/// The changed keys of a selector between two snapshots.
pub type Changes = Arc<Vec<(String, Change)>>;

/// Selectors cached per snapshot; beyond this the oldest entry goes.
const FANOUT_ENTRIES: usize = 256;

/// See [`App::changes`] and [`App::sync_payload`]: keyed by snapshot revision and selector.
#[derive(Debug, Default)]
struct FanoutCache {
    changes: Vec<ChangesEntry>,
    payloads: Vec<PayloadEntry>,
}

#[derive(Debug)]
struct ChangesEntry {
    from: Revision,
    to: Revision,
    selector: Selector,
    changes: Changes,
}

#[derive(Debug)]
struct PayloadEntry {
    revision: Revision,
    selector: Selector,
    payload: Bytes,
}

fn bounded_push<T>(entries: &mut Vec<T>, entry: T) {
    if entries.len() >= FANOUT_ENTRIES {
        entries.remove(0);
    }
    entries.push(entry);
}

/// Unix seconds now (`$flagd.timestamp`).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Resolves when `shutdown` turns `true` (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await.map(|_| ());
}
