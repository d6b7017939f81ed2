//! The use cases every protocol calls: evaluate one flag, evaluate every flag a selector sees, and
//! the per-change work that stream subscribers share (what changed for a selector; the selector's
//! flags as flagd's JSON, encoded once).
//!
//! Free of wire types: a handler converts its request into a key, a [`Selector`] and a context,
//! calls in, and encodes the [`Resolution`] it is handed — borrowed from the snapshot, the one
//! result type from the core to every wire.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use vexil_core::experiment::Phase;
use vexil_core::snapshot::Change;
use vexil_core::{
    Attributes, CompiledFlag, Context, FractionalMode, Reason, Resolution, Revision, Selector, Snapshot, ValueType,
};

use crate::evaluate::{RequestContext, StaticContext};
use crate::live::Live;

/// What evaluations report, for metrics. Called on the request path: implementations must not
/// block.
pub trait Observer: Send + Sync + fmt::Debug {
    /// One flag evaluated for `protocol`, in `took`.
    fn evaluation(&self, protocol: &'static str, reason: Reason, took: Duration);
    /// A bulk request evaluated `tally` flags for `protocol`, in `took`.
    fn bulk_evaluation(&self, protocol: &'static str, tally: &ReasonTally, took: Duration);
}

/// An [`Observer`] that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn evaluation(&self, _: &'static str, _: Reason, _: Duration) {}
    fn bulk_evaluation(&self, _: &'static str, _: &ReasonTally, _: Duration) {}
}

/// Where the exposures of evaluations go: a unit got an experiment's variant (reason `SPLIT`).
/// Called on the request path: implementations must not block or wait (queue, then write).
pub trait Exposures: Send + Sync + fmt::Debug {
    /// `unit` was allocated `variant` of `experiment` on `flag`, in `environment`.
    fn exposed(&self, environment: &str, experiment: &str, flag: &str, variant: &str, unit: &str);
}

/// [`Exposures`] that records nothing (no managed store: no experiments).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoExposures;

impl Exposures for NoExposures {
    fn exposed(&self, _: &str, _: &str, _: &str, _: &str, _: &str) {}
}

/// The tracker records server-side exposures (deduplicated, written in the background).
impl Exposures for crate::tracking::Tracker {
    fn exposed(&self, environment: &str, experiment: &str, flag: &str, variant: &str, unit: &str) {
        self.record_exposure(environment, experiment, flag, variant, unit);
    }
}

/// Hands a `SPLIT` result's exposure to `exposures`. The environment is the first part of the
/// flag's `flagSetId` (`<environment>/<flag set>`): experiments live in the managed store only.
fn expose(exposures: &dyn Exposures, flag: &CompiledFlag, resolution: &Resolution<'_>) {
    let (Some(split), Some(variant)) = (&resolution.split, resolution.variant) else {
        return;
    };
    let Some((environment, _)) = flag.flag().flag_set_id().and_then(|id| id.split_once('/')) else {
        return;
    };
    exposures.exposed(environment, &split.experiment.key, flag.key(), variant, &split.unit);
}

/// The reasons a bulk request's evaluations resolved with, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReasonTally([u64; Self::REASONS.len()]);

impl ReasonTally {
    /// Every reason, in a fixed order.
    pub const REASONS: [Reason; 6] = [
        Reason::Static,
        Reason::TargetingMatch,
        Reason::Default,
        Reason::Disabled,
        Reason::Split,
        Reason::Error,
    ];

    /// The position of `reason` in [`ReasonTally::REASONS`].
    pub fn index(reason: Reason) -> usize {
        match reason {
            Reason::Static => 0,
            Reason::TargetingMatch => 1,
            Reason::Default => 2,
            Reason::Disabled => 3,
            Reason::Split => 4,
            Reason::Error => 5,
        }
    }

    /// Counts one evaluation.
    pub fn add(&mut self, reason: Reason) {
        self.0[Self::index(reason)] += 1;
    }

    /// The count per reason, in the order of [`ReasonTally::REASONS`].
    pub fn counts(&self) -> &[u64; Self::REASONS.len()] {
        &self.0
    }
}

/// The changed keys of a selector between two snapshots.
pub type Changes = Arc<Vec<(String, Change)>>;

/// Parameters of [`Flags::new`].
#[derive(Debug)]
pub struct FlagsConfig {
    /// Where the current snapshot comes from.
    pub live: Live,
    /// `-X` values and `-H` header mappings merged into every request's context.
    pub statics: StaticContext,
    /// Told about every evaluation.
    pub observer: Arc<dyn Observer>,
    /// Told about every exposure to an experiment.
    pub exposures: Arc<dyn Exposures>,
}

/// The flag service: evaluation and change fan-out over the live configuration (cheap to clone).
#[derive(Debug, Clone)]
pub struct Flags {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    live: Live,
    statics: StaticContext,
    observer: Arc<dyn Observer>,
    exposures: Arc<dyn Exposures>,
    /// Work every stream subscriber of a selector would repeat on a change, done once.
    fanout: Mutex<Fanout>,
}

impl Flags {
    /// A service over `config.live`.
    pub fn new(config: FlagsConfig) -> Flags {
        Flags {
            inner: Arc::new(Inner {
                live: config.live,
                statics: config.statics,
                observer: config.observer,
                exposures: config.exposures,
                fanout: Mutex::new(Fanout::default()),
            }),
        }
    }

    /// The live configuration.
    pub fn live(&self) -> &Live {
        &self.inner.live
    }

    /// The `-X` values and `-H` mappings.
    pub fn statics(&self) -> &StaticContext {
        &self.inner.statics
    }

    /// The request's own context with `-X` values and `-H` headers over it (`header` looks a
    /// request header up by lowercase name).
    pub fn context<'r>(
        &'r self,
        request: &'r dyn Attributes,
        header: impl Fn(&str) -> Option<&'r str>,
    ) -> RequestContext<'r> {
        RequestContext::new(request, &self.inner.statics, header)
    }

    /// Evaluates `key` for `protocol` against the current snapshot, and hands the flag (when it
    /// exists) and the result, borrowed from the snapshot, to `encode`.
    pub fn evaluate<T>(
        &self,
        protocol: &'static str,
        key: &str,
        selector: &Selector,
        context: &dyn Attributes,
        ty: ValueType,
        encode: impl FnOnce(Option<&CompiledFlag>, &Resolution<'_>) -> T,
    ) -> T {
        let started = Instant::now();
        let snapshot = self.inner.live.snapshot();
        let flag = snapshot.get(key, selector);
        let resolution = match flag {
            Some(flag) => {
                let resolution = flag.evaluate(snapshot.engine(), request_context(context), ty);
                expose(&*self.inner.exposures, flag, &resolution);
                resolution
            }
            None => Resolution::not_found(key),
        };
        self.inner
            .observer
            .evaluation(protocol, resolution.reason, started.elapsed());
        encode(flag, &resolution)
    }

    /// Evaluates every flag `selector` sees (flagd's ResolveAll, OFREP bulk), converting the
    /// context once, and hands each flag and its result to `encode`. Returns the snapshot
    /// evaluated against (every result comes from it).
    pub fn evaluate_all(
        &self,
        protocol: &'static str,
        selector: &Selector,
        context: &dyn Attributes,
        mut encode: impl FnMut(&CompiledFlag, &Resolution<'_>),
    ) -> Arc<Snapshot> {
        let started = Instant::now();
        let snapshot = self.inner.live.snapshot();
        let mut tally = ReasonTally::default();
        snapshot.evaluate_all(selector, request_context(context), |flag, resolution| {
            tally.add(resolution.reason);
            expose(&*self.inner.exposures, flag, &resolution);
            encode(flag, &resolution);
        });
        self.inner.observer.bulk_evaluation(protocol, &tally, started.elapsed());
        snapshot
    }

    /// What changed for `selector` from `old` to `new`: computed once for every subscriber that
    /// is up to date; a subscriber catching up from an older snapshot gets its own entry.
    pub fn changes(&self, old: &Snapshot, new: &Snapshot, selector: &Selector) -> Changes {
        let (from, to) = (old.revision(), new.revision());
        let mut fanout = self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner());
        let hit = fanout
            .changes
            .iter()
            .find(|e| e.from == from && e.to == to && e.selector == *selector);
        if let Some(e) = hit {
            return e.changes.clone();
        }
        let changes = Arc::new(new.changes_since(old, selector));
        // Only changes into the newest snapshot are worth keeping.
        fanout.changes.retain(|e| e.to == to);
        bounded_push(
            &mut fanout.changes,
            ChangesEntry {
                from,
                to,
                selector: selector.clone(),
                changes: changes.clone(),
            },
        );
        changes
    }

    /// The sync payload of `snapshot` for `selector`: the selected flags as flagd's JSON
    /// ([`flag_configuration`]) wrapped by `encode` into the wire's message, computed once per
    /// snapshot revision and selector and shared (reference-counted) by every subscriber.
    pub fn sync_payload(
        &self,
        snapshot: &Snapshot,
        selector: &Selector,
        encode: impl FnOnce(String) -> Bytes,
    ) -> Bytes {
        let revision = snapshot.revision();
        let cached = |fanout: &Fanout| {
            fanout
                .payloads
                .iter()
                .find(|e| e.revision == revision && e.selector == *selector)
                .map(|e| e.payload.clone())
        };
        if let Some(payload) = cached(&self.lock_fanout()) {
            return payload;
        }
        // Encoded without the lock: a large configuration takes a while, and other selectors'
        // subscribers need not wait for it.
        let payload = encode(flag_configuration(snapshot, selector));
        let mut fanout = self.lock_fanout();
        if let Some(raced) = cached(&fanout) {
            return raced;
        }
        // Only payloads of the newest snapshot are worth keeping (slow subscribers keep theirs).
        fanout.payloads.retain(|e| e.revision == revision);
        bounded_push(
            &mut fanout.payloads,
            PayloadEntry {
                revision,
                selector: selector.clone(),
                payload: payload.clone(),
            },
        );
        payload
    }

    fn lock_fanout(&self) -> std::sync::MutexGuard<'_, Fanout> {
        self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// flagd's sync payload for the flags `selector` sees: `{"flags": {key: flag}}`, each flag with
/// its state, default variant, variants, targeting (`$ref`s inlined), source and merged metadata.
/// A flag's experiment travels as flagd targeting ([`vexil_core::experiment::FlagExperiment::targeting`])
/// and its id and key as metadata, so in-process providers allocate units as the server does.
pub fn flag_configuration(snapshot: &Snapshot, selector: &Selector) -> String {
    let mut flags = Map::new();
    let v3 = snapshot.engine().fractional_mode() == FractionalMode::V3;
    for compiled in snapshot.flags(selector) {
        let flag = compiled.flag();
        let mut out = Map::new();
        let mut default_variant = flag.default_variant.as_deref();
        let mut targeting = flag.targeting.as_ref().map(|t| t.to_value());
        let mut metadata = flag.metadata.clone();
        if let Some(experiment) = &flag.experiment {
            // In-process providers allocate as the server does: a running experiment becomes
            // `fractional` (v3) targeting around the flag's rule, a chosen winner the default.
            // (With an older `fractional` generation a provider cannot hash alike: it gets the
            // flag's own rule.)
            if let Some(winner) = experiment
                .winner
                .as_deref()
                .filter(|_| experiment.phase != Phase::Running)
            {
                default_variant = Some(winner);
                targeting = None;
            } else if v3 && let Some(rule) = experiment.targeting(targeting.as_ref()) {
                targeting = Some(rule);
            }
            metadata.insert("experimentId".into(), json!(experiment.id));
            metadata.insert("experimentKey".into(), json!(experiment.key));
        }
        out.insert("state".into(), json!(flag.state.as_str()));
        out.insert("defaultVariant".into(), json!(default_variant.unwrap_or("")));
        out.insert(
            "variants".into(),
            Value::Object(flag.variants.iter().cloned().collect()),
        );
        if let Some(t) = targeting {
            out.insert("targeting".into(), t);
        }
        out.insert(
            "source".into(),
            json!(snapshot.source_of(&flag.key, selector).unwrap_or("")),
        );
        if !metadata.is_empty() {
            out.insert("metadata".into(), Value::Object(metadata));
        }
        flags.insert(flag.key.clone(), Value::Object(out));
    }
    json!({ "flags": flags }).to_string()
}

fn request_context(attributes: &dyn Attributes) -> Context<'_> {
    Context { attributes, now: now() }
}

/// Unix seconds now (`$flagd.timestamp`).
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Selectors cached per snapshot; beyond this the oldest entry goes.
const FANOUT_ENTRIES: usize = 256;

/// See [`Flags::changes`] and [`Flags::sync_payload`]: keyed by snapshot revision and selector.
#[derive(Debug, Default)]
struct Fanout {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vexil_core::FractionalMode;

    use super::*;
    use crate::{LiveConfig, SourceSpec};

    /// Counts what it is told.
    #[derive(Debug, Default)]
    struct Counting {
        single: Mutex<Vec<(&'static str, Reason)>>,
        bulk: Mutex<Vec<(&'static str, ReasonTally)>>,
    }

    impl Observer for Counting {
        fn evaluation(&self, protocol: &'static str, reason: Reason, _: Duration) {
            self.single.lock().unwrap().push((protocol, reason));
        }
        fn bulk_evaluation(&self, protocol: &'static str, tally: &ReasonTally, _: Duration) {
            self.bulk.lock().unwrap().push((protocol, tally.clone()));
        }
    }

    struct Fixture {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        flags: Flags,
        observer: Arc<Counting>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const FLAGS: &str = r#"{"flags": {
        "on": {"state": "ENABLED", "variants": {"yes": true, "no": false}, "defaultVariant": "yes"},
        "vip": {"state": "ENABLED", "variants": {"yes": true, "no": false}, "defaultVariant": "no",
                "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "yes", null]}},
        "off": {"state": "DISABLED", "variants": {"a": "a"}, "defaultVariant": "a"}
    }}"#;

    fn fixture(name: &str, text: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vexil-flags-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flags.json");
        std::fs::write(&path, text).unwrap();
        let live = Live::load(&LiveConfig {
            sources: vec![SourceSpec::parse(path.to_str().unwrap()).unwrap()],
            fractional: FractionalMode::V3,
            poll_interval: Duration::from_secs(3600),
            stale_after: None,
        });
        let observer = Arc::new(Counting::default());
        let flags = Flags::new(FlagsConfig {
            live,
            statics: StaticContext::default(),
            observer: observer.clone(),
            exposures: Arc::new(NoExposures),
        });
        Fixture {
            dir,
            path,
            flags,
            observer,
        }
    }

    fn context(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn evaluate_hands_the_borrowed_result_to_the_encoder_and_observes_it() {
        let f = fixture("evaluate", FLAGS);
        let gold = context(json!({"tier": "gold"}));
        let (reason, value) = f
            .flags
            .evaluate("p", "vip", &Selector::All, &gold, ValueType::Boolean, |flag, r| {
                assert_eq!(flag.map(CompiledFlag::key), Some("vip"));
                (r.reason, r.value.cloned())
            });
        assert_eq!((reason, value), (Reason::TargetingMatch, Some(json!(true))));
        let missing = f
            .flags
            .evaluate("p", "nope", &Selector::All, &gold, ValueType::Boolean, |flag, r| {
                assert!(flag.is_none());
                r.error_code()
            });
        assert_eq!(missing, Some(vexil_core::ErrorCode::FlagNotFound));
        assert_eq!(
            *f.observer.single.lock().unwrap(),
            vec![("p", Reason::TargetingMatch), ("p", Reason::Error)]
        );
    }

    #[test]
    fn evaluate_all_tallies_every_reason_once_per_request() {
        let f = fixture("bulk", FLAGS);
        let mut keys = Vec::new();
        f.flags.evaluate_all("bulk", &Selector::All, &Map::new(), |flag, _| {
            keys.push(flag.key().to_owned())
        });
        keys.sort();
        assert_eq!(keys, ["off", "on", "vip"]);
        let bulk = f.observer.bulk.lock().unwrap();
        assert_eq!(bulk.len(), 1);
        let mut expected = ReasonTally::default();
        expected.add(Reason::Static);
        expected.add(Reason::Default);
        expected.add(Reason::Disabled);
        assert_eq!(bulk[0], ("bulk", expected));
    }

    #[test]
    fn the_sync_payload_is_encoded_once_per_revision_and_selector() {
        let f = fixture("payload", FLAGS);
        let encoded = AtomicUsize::new(0);
        let encode = |config: String| {
            encoded.fetch_add(1, Ordering::Relaxed);
            Bytes::from(config)
        };
        let snapshot = f.flags.live().snapshot();
        let all = f.flags.sync_payload(&snapshot, &Selector::All, encode);
        let again = f.flags.sync_payload(&snapshot, &Selector::All, encode);
        assert_eq!(all.as_ptr(), again.as_ptr(), "the same shared bytes");
        let source = Selector::Source(f.path.to_str().unwrap().to_owned());
        f.flags.sync_payload(&snapshot, &source, encode);
        assert_eq!(encoded.load(Ordering::Relaxed), 2, "one encoding per selector");
        let config: Value = serde_json::from_slice(&all).unwrap();
        assert_eq!(config["flags"]["vip"]["defaultVariant"], json!("no"));
        assert_eq!(config["flags"]["on"]["source"], json!(f.path.to_str().unwrap()));

        // A new revision is encoded again.
        std::fs::write(
            &f.path,
            FLAGS.replace("\"defaultVariant\": \"no\"", "\"defaultVariant\": \"yes\""),
        )
        .unwrap();
        assert!(f.flags.live().reload_blocking());
        let newer = f.flags.live().snapshot();
        let changed: Value = serde_json::from_slice(&f.flags.sync_payload(&newer, &Selector::All, encode)).unwrap();
        assert_eq!(changed["flags"]["vip"]["defaultVariant"], json!("yes"));
        assert_eq!(encoded.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn changes_are_diffed_once_for_every_subscriber_of_a_selector() {
        let f = fixture("changes", FLAGS);
        let old = f.flags.live().snapshot();
        std::fs::write(&f.path, FLAGS.replace("\"a\": \"a\"", "\"a\": \"bb\"")).unwrap();
        assert!(f.flags.live().reload_blocking());
        let new = f.flags.live().snapshot();
        let first = f.flags.changes(&old, &new, &Selector::All);
        let second = f.flags.changes(&old, &new, &Selector::All);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["off"]);
        assert!(f.flags.changes(&new, &new, &Selector::All).is_empty());
    }
}
