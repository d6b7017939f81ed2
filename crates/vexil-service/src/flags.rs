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

/// What evaluations report, for metrics and traces. Called on the request path (about 100k
/// evaluations a second per core): implementations must not block, and should neither allocate
/// nor lock per call.
///
/// Object safe; observers compose: `(a, b)` tells `a`, then `b`, and an `Arc` of an observer is
/// one.
///
/// What came from the request ([`Evaluation::key`], the selectors) is unbounded: never a metric
/// label. The flag set of a flag that exists ([`Evaluation::flag_set`], [`FlagSetTally`]) comes
/// from the configuration.
pub trait Observer: Send + Sync + fmt::Debug {
    /// One flag evaluated ([`Flags::evaluate`]).
    fn evaluation(&self, evaluation: &Evaluation<'_>);
    /// Every flag a selector sees, evaluated for one request ([`Flags::evaluate_all`]).
    fn bulk_evaluation(&self, bulk: &BulkEvaluation<'_>);
}

/// One flag evaluated, as an [`Observer`] is told.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation<'a> {
    /// The protocol the request came in on (the handler's constant).
    pub protocol: &'static str,
    /// The key the request asked for (from the request: unbounded).
    pub key: &'a str,
    /// The selector the request gave (from the request: unbounded).
    pub selector: &'a Selector,
    /// The flag evaluated; `None` when no flag `key` exists for the selector.
    pub flag: Option<&'a CompiledFlag>,
    /// The result: variant, reason, error and the experiment of a `SPLIT`.
    pub resolution: &'a Resolution<'a>,
    /// The version of the configuration evaluated against ([`crate::Published::version`]).
    pub version: u64,
    /// How long the lookup and the evaluation took (the encoding is not counted).
    pub took: Duration,
}

impl<'a> Evaluation<'a> {
    /// The flag set of the flag evaluated (its `flagSetId`, from the configuration); `None` when
    /// the flag has none, or does not exist.
    pub fn flag_set(&self) -> Option<&'a str> {
        self.flag.and_then(|flag| flag.flag().flag_set_id())
    }
}

/// Every flag a selector sees, evaluated for one request, as an [`Observer`] is told.
#[derive(Debug, Clone, Copy)]
pub struct BulkEvaluation<'a> {
    /// The protocol the request came in on (the handler's constant).
    pub protocol: &'static str,
    /// The selector the request gave (from the request: unbounded).
    pub selector: &'a Selector,
    /// How many flags of each flag set resolved with each reason.
    pub tally: &'a FlagSetTally<'a>,
    /// The version of the configuration evaluated against ([`crate::Published::version`]).
    pub version: u64,
    /// How long the evaluations took (the encoding is not counted).
    pub took: Duration,
}

impl<A: Observer, B: Observer> Observer for (A, B) {
    fn evaluation(&self, evaluation: &Evaluation<'_>) {
        self.0.evaluation(evaluation);
        self.1.evaluation(evaluation);
    }

    fn bulk_evaluation(&self, bulk: &BulkEvaluation<'_>) {
        self.0.bulk_evaluation(bulk);
        self.1.bulk_evaluation(bulk);
    }
}

impl<O: Observer + ?Sized> Observer for Arc<O> {
    fn evaluation(&self, evaluation: &Evaluation<'_>) {
        (**self).evaluation(evaluation);
    }

    fn bulk_evaluation(&self, bulk: &BulkEvaluation<'_>) {
        (**self).bulk_evaluation(bulk);
    }
}

/// An [`Observer`] that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn evaluation(&self, _: &Evaluation<'_>) {}
    fn bulk_evaluation(&self, _: &BulkEvaluation<'_>) {}
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
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

    /// How many evaluations were counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// The reasons a bulk request's evaluations resolved with, counted per flag set (the flags'
/// `flagSetId`s, borrowed from the snapshot; `None`: flags without one). Allocates only past
/// [`FlagSetTally::INLINE`] flag sets in one request.
#[derive(Debug, Default, Clone)]
pub struct FlagSetTally<'a> {
    inline: [(Option<&'a str>, ReasonTally); FlagSetTally::INLINE],
    len: usize,
    spilled: Vec<(Option<&'a str>, ReasonTally)>,
}

impl<'a> FlagSetTally<'a> {
    /// Flag sets counted without allocating.
    pub const INLINE: usize = 8;

    /// Counts one evaluation of a flag of `flag_set`.
    pub fn add(&mut self, flag_set: Option<&'a str>, reason: Reason) {
        let (inline, spilled) = (&mut self.inline[..self.len], &mut self.spilled);
        if let Some((_, tally)) = inline
            .iter_mut()
            .chain(spilled.iter_mut())
            .find(|(set, _)| *set == flag_set)
        {
            tally.add(reason);
            return;
        }
        let mut tally = ReasonTally::default();
        tally.add(reason);
        match self.inline.get_mut(self.len) {
            Some(free) => {
                *free = (flag_set, tally);
                self.len += 1;
            }
            None => self.spilled.push((flag_set, tally)),
        }
    }

    /// Each flag set counted, with its reasons, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = (Option<&'a str>, &ReasonTally)> + '_ {
        self.inline[..self.len]
            .iter()
            .chain(&self.spilled)
            .map(|(set, tally)| (*set, tally))
    }

    /// Every flag set's reasons, summed.
    pub fn reasons(&self) -> ReasonTally {
        let mut sum = ReasonTally::default();
        for (_, tally) in self.iter() {
            for (total, n) in sum.0.iter_mut().zip(tally.counts()) {
                *total += n;
            }
        }
        sum
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
        let published = self.inner.live.current();
        let snapshot = &published.snapshot;
        let flag = snapshot.get(key, selector);
        let resolution = match flag {
            Some(flag) => {
                let resolution = flag.evaluate(snapshot.engine(), request_context(context), ty);
                expose(&*self.inner.exposures, flag, &resolution);
                resolution
            }
            None => Resolution::not_found(key),
        };
        self.inner.observer.evaluation(&Evaluation {
            protocol,
            key,
            selector,
            flag,
            resolution: &resolution,
            version: published.version,
            took: started.elapsed(),
        });
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
        let published = self.inner.live.current();
        let snapshot = &published.snapshot;
        let mut tally = FlagSetTally::default();
        snapshot.evaluate_all(selector, request_context(context), |flag, resolution| {
            tally.add(flag.flag().flag_set_id(), resolution.reason);
            expose(&*self.inner.exposures, flag, &resolution);
            encode(flag, &resolution);
        });
        self.inner.observer.bulk_evaluation(&BulkEvaluation {
            protocol,
            selector,
            tally: &tally,
            version: published.version,
            took: started.elapsed(),
        });
        snapshot.clone()
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

    /// What an observer is told about one evaluation, owned.
    type Single = (&'static str, String, Option<String>, Reason, u64);
    /// What an observer is told about a bulk evaluation, owned.
    type Bulk = (&'static str, Vec<(Option<String>, ReasonTally)>);

    /// Keeps what it is told.
    #[derive(Debug, Default)]
    struct Counting {
        single: Mutex<Vec<Single>>,
        bulk: Mutex<Vec<Bulk>>,
    }

    impl Observer for Counting {
        fn evaluation(&self, e: &Evaluation<'_>) {
            assert_eq!(e.flag.map(CompiledFlag::key), e.flag.map(|_| e.key));
            let flag_set = e.flag_set().map(str::to_owned);
            let seen = (e.protocol, e.key.to_owned(), flag_set, e.resolution.reason, e.version);
            self.single.lock().unwrap().push(seen);
        }
        fn bulk_evaluation(&self, b: &BulkEvaluation<'_>) {
            let sets = b.tally.iter().map(|(set, t)| (set.map(str::to_owned), *t)).collect();
            self.bulk.lock().unwrap().push((b.protocol, sets));
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
                "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "yes", null]},
                "metadata": {"flagSetId": "billing"}},
        "off": {"state": "DISABLED", "variants": {"a": "a"}, "defaultVariant": "a"}
    }, "metadata": {"flagSetId": "web"}}"#;

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
        // A flag set that does not exist: no flag, so no flag set either.
        let unknown = Selector::FlagSet(Some("made-up".into()));
        f.flags
            .evaluate("q", "on", &unknown, &gold, ValueType::Boolean, |flag, _| {
                assert!(flag.is_none())
            });
        f.flags
            .evaluate("q", "on", &Selector::All, &gold, ValueType::Boolean, |_, _| ());
        assert_eq!(
            *f.observer.single.lock().unwrap(),
            vec![
                ("p", "vip".into(), Some("billing".into()), Reason::TargetingMatch, 0),
                ("p", "nope".into(), None, Reason::Error, 0),
                ("q", "on".into(), None, Reason::Error, 0),
                ("q", "on".into(), Some("web".into()), Reason::Static, 0),
            ]
        );
    }

    #[test]
    fn evaluate_all_tallies_every_flag_set_s_reasons_once_per_request() {
        let f = fixture("bulk", FLAGS);
        let mut keys = Vec::new();
        f.flags.evaluate_all("bulk", &Selector::All, &Map::new(), |flag, _| {
            keys.push(flag.key().to_owned())
        });
        keys.sort();
        assert_eq!(keys, ["off", "on", "vip"]);
        f.flags.evaluate_all(
            "bulk",
            &Selector::FlagSet(Some("made-up".into())),
            &Map::new(),
            |_, _| panic!("no flag has that flag set"),
        );
        let bulk = f.observer.bulk.lock().unwrap();
        let tally = |reasons: &[Reason]| {
            let mut tally = ReasonTally::default();
            reasons.iter().for_each(|r| tally.add(*r));
            tally
        };
        // In key order: off (web), on (web), vip (billing).
        assert_eq!(
            *bulk,
            vec![
                (
                    "bulk",
                    vec![
                        (Some("web".into()), tally(&[Reason::Disabled, Reason::Static])),
                        (Some("billing".into()), tally(&[Reason::Default])),
                    ]
                ),
                ("bulk", vec![]),
            ]
        );
    }

    #[test]
    fn a_flag_set_tally_spills_past_its_inline_entries() {
        let names: Vec<String> = (0..FlagSetTally::INLINE + 3).map(|i| format!("set{i}")).collect();
        let mut tally = FlagSetTally::default();
        tally.add(None, Reason::Error);
        for (i, name) in names.iter().enumerate() {
            tally.add(Some(name), Reason::Static);
            if i % 2 == 0 {
                tally.add(Some(name), Reason::Split);
            }
        }
        tally.add(None, Reason::Error);
        tally.add(Some(&names[FlagSetTally::INLINE + 1]), Reason::Default);
        let seen: Vec<(Option<&str>, u64)> = tally.iter().map(|(set, t)| (set, t.total())).collect();
        assert_eq!(seen.len(), names.len() + 1);
        assert_eq!(seen[0], (None, 2));
        assert_eq!(seen[1], (Some("set0"), 2));
        assert_eq!(
            seen[FlagSetTally::INLINE + 2],
            (Some(names[FlagSetTally::INLINE + 1].as_str()), 2)
        );
        let reasons = tally.reasons();
        assert_eq!(
            reasons.total(),
            2 + names.len() as u64 + names.len().div_ceil(2) as u64 + 1
        );
        assert_eq!(reasons.counts()[ReasonTally::index(Reason::Error)], 2);
    }

    #[test]
    fn observers_compose() {
        let (a, b) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let both: Arc<dyn Observer> = Arc::new((a.clone(), b.clone() as Arc<dyn Observer>));
        let resolution = Resolution::not_found("x");
        both.evaluation(&Evaluation {
            protocol: "p",
            key: "x",
            selector: &Selector::All,
            flag: None,
            resolution: &resolution,
            version: 7,
            took: Duration::ZERO,
        });
        both.bulk_evaluation(&BulkEvaluation {
            protocol: "p",
            selector: &Selector::All,
            tally: &FlagSetTally::default(),
            version: 7,
            took: Duration::ZERO,
        });
        for observer in [a, b] {
            assert_eq!(
                *observer.single.lock().unwrap(),
                vec![("p", "x".into(), None, Reason::Error, 7)]
            );
            assert_eq!(*observer.bulk.lock().unwrap(), vec![("p", vec![])]);
        }
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
