//! A compiled, immutable view of every flag from every source: what evaluation reads.
//!
//! Flags are keyed like flagd's store (`core/pkg/store/store.go`): by flag set (`flagSetId` from the
//! merged metadata) and key, each remembering its source and the source's priority (its position in
//! the source list; later sources win). Without a selector a key resolves to the flag from the
//! highest-priority source; with one, to the flag in the selected flag set or source.
//!
//! A snapshot is built once per configuration change and shared as `Arc<Snapshot>`; reading it takes
//! no lock. Each source is compiled on its own into an `Arc<CompiledSource>`: when one source
//! changes, the next snapshot is assembled from the other sources' compiled flags as they are
//! ([`Snapshot::assemble`]) and only the changed source is compiled again.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use foldhash::fast::RandomState;
use serde_json::Value;

use crate::eval::{CompiledFlag, Context, Resolution};
use crate::model::{Flag, FlagConfig, RuleText, ValueType};
use crate::parse::{Diagnostic, Severity};
use crate::targeting::{Engine, FractionalMode};

/// Which flags a request sees (flagd's selector: a single `key=value`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Selector {
    /// No selector: every flag of a listed source (see [`CompiledSource::unlisted`]), the
    /// highest-priority source winning on duplicate keys.
    #[default]
    All,
    /// `flagSetId=<id>`; `flagSetId=` (empty) selects the flags that have no flag set id.
    FlagSet(Option<String>),
    /// `source=<name>`, or a bare value without `=`.
    Source(String),
    /// Every flag set of a managed environment (`flagSetId` `<environment>/…`): Vexil's own API,
    /// not a flagd selector (nothing parses to it).
    Environment(String),
}

/// A selector that is not `flagSetId=…`, `source=…` or a bare source name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector `{0}`: expected `flagSetId=<id>`, `source=<name>` or a source name")]
pub struct SelectorError(pub String);

impl Selector {
    /// Parses flagd's selector syntax (`core/pkg/store/query.go`).
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        if s.is_empty() {
            return Ok(Selector::All);
        }
        let Some((key, value)) = s.split_once('=') else {
            return Ok(Selector::Source(s.to_owned()));
        };
        match key {
            "flagSetId" if value.is_empty() => Ok(Selector::FlagSet(None)),
            "flagSetId" => Ok(Selector::FlagSet(Some(value.to_owned()))),
            "source" if !value.is_empty() => Ok(Selector::Source(value.to_owned())),
            _ => Err(SelectorError(s.to_owned())),
        }
    }

    /// The selector as flagd reflects it in response metadata: `{}`, `{"flagSetId": …}` or
    /// `{"source": …}`.
    pub fn metadata(&self) -> crate::model::Metadata {
        let mut m = crate::model::Metadata::new();
        match self {
            Selector::All | Selector::FlagSet(None) | Selector::Environment(_) => {}
            Selector::FlagSet(Some(id)) => {
                m.insert("flagSetId".into(), id.clone().into());
            }
            Selector::Source(s) => {
                m.insert("source".into(), s.clone().into());
            }
        }
        m
    }

    fn matches(&self, entry: &Entry) -> bool {
        match self {
            Selector::All => entry.listed,
            Selector::FlagSet(id) => entry.flag.flag().flag_set_id() == id.as_deref(),
            Selector::Source(s) => *entry.source == **s,
            Selector::Environment(env) => entry
                .flag
                .flag()
                .flag_set_id()
                .and_then(|id| id.strip_prefix(env.as_str()))
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => Ok(()),
            Selector::FlagSet(id) => write!(f, "flagSetId={}", id.as_deref().unwrap_or("")),
            Selector::Source(s) => write!(f, "source={s}"),
            Selector::Environment(env) => write!(f, "environment={env}"),
        }
    }
}

/// One source's flags, as input to [`Snapshot::build`] and [`CompiledSource::compile`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The source's name as selectors address it (flagd: the URI as given, e.g. `flags/a.json`).
    pub name: String,
    /// Its parsed document.
    pub config: FlagConfig,
}

/// One source's flags, compiled: what snapshots are assembled from. A snapshot holds its sources
/// as `Arc<CompiledSource>`, so the next snapshot reuses the flags of a source that did not change
/// (the same compiled flags, not copies).
#[derive(Debug)]
pub struct CompiledSource {
    engine: Arc<Engine>,
    name: Arc<str>,
    config: FlagConfig,
    flags: Vec<Arc<CompiledFlag>>,
    warnings: Vec<Diagnostic>,
    /// Whether a request without a selector sees its flags.
    listed: bool,
    /// This source's part of the snapshot [`Revision`].
    hash: u64,
}

impl CompiledSource {
    /// Compiles `source`'s flags with `engine`. Targeting rules that do not compile are reported as
    /// warnings and evaluate as parse errors, as in flagd.
    pub fn compile(engine: &Arc<Engine>, source: SourceConfig) -> CompiledSource {
        CompiledSource::compile_reusing(engine, source, None)
    }

    /// As [`CompiledSource::compile`], reusing the compiled flags of `previous` (an earlier
    /// version of the same source) whose definitions did not change: a source that changed one flag
    /// of ten thousand compiles one. The result equals compiling everything; a reused flag's
    /// definition is the earlier one (equal), so the two versions share it instead of holding two
    /// copies.
    pub fn compile_reusing(
        engine: &Arc<Engine>,
        mut source: SourceConfig,
        previous: Option<&CompiledSource>,
    ) -> CompiledSource {
        let reusable: HashMap<&str, &Arc<CompiledFlag>, RandomState> = previous
            .filter(|p| Arc::ptr_eq(&p.engine, engine))
            .map(|p| p.flags.iter().map(|c| (c.key(), c)).collect())
            .unwrap_or_default();
        let mut warnings = Vec::new();
        let mut flags: Vec<Arc<CompiledFlag>> = Vec::with_capacity(source.config.flags.len());
        for flag in &mut source.config.flags {
            let same = reusable
                .get(flag.key.as_str())
                .filter(|c| Arc::ptr_eq(c.definition(), flag) || **c.definition() == **flag);
            let (compiled, problem) = match same {
                Some(&same) => {
                    *flag = same.definition().clone();
                    (same.clone(), same.problem().map(str::to_owned))
                }
                None => {
                    let (compiled, problem) = CompiledFlag::compile(flag.clone(), engine);
                    (Arc::new(compiled), problem)
                }
            };
            if let Some(problem) = problem {
                warnings.push(Diagnostic {
                    severity: Severity::Warning,
                    flag: Some(compiled.key().to_owned()),
                    pointer: format!("/flags/{}/targeting", compiled.key()),
                    message: format!("targeting does not compile, evaluations will fail: {problem}"),
                });
            }
            flags.push(compiled);
        }
        let hash = source_hash(&source.name, &flags);
        CompiledSource {
            engine: engine.clone(),
            name: Arc::from(source.name),
            config: source.config,
            flags,
            warnings,
            listed: true,
            hash,
        }
    }

    /// The source, its flags seen only by a selector that names their flag set or the source (a
    /// managed environment other than the default one), not by a request without a selector.
    pub fn unlisted(mut self) -> CompiledSource {
        use std::hash::Hasher as _;
        self.listed = false;
        let mut h = hasher();
        h.write_u64(self.hash);
        hash_text(&mut h, "unlisted");
        self.hash = h.finish();
        self
    }

    /// Whether a request without a selector sees this source's flags.
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// The source's name, as selectors address it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The document the flags were compiled from (compare it with a reloaded one to tell whether
    /// the source changed).
    pub fn config(&self) -> &FlagConfig {
        &self.config
    }

    /// The compiled flags, in document order.
    pub fn flags(&self) -> impl Iterator<Item = &CompiledFlag> {
        self.flags.iter().map(|f| &**f)
    }

    /// Targeting rules that did not compile.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }
}

/// A flag in the snapshot, with where it came from.
#[derive(Debug)]
struct Entry {
    flag: Arc<CompiledFlag>,
    source: Arc<str>,
    priority: usize,
    /// Seen by [`Selector::All`].
    listed: bool,
}

/// A compiled snapshot of all flags.
#[derive(Debug)]
pub struct Snapshot {
    engine: Arc<Engine>,
    entries: Vec<Entry>,
    /// Key → indices into `entries`, in priority order (lowest first). Keys come from
    /// configuration, never from requests, so a fast (randomly seeded) hasher is safe here.
    by_key: HashMap<String, Vec<usize>, RandomState>,
    /// For [`Selector::All`]: the winning listed entry of every key, sorted by key.
    winners: Vec<usize>,
    /// For the other selectors: an entry of every key, listed or not, sorted by key.
    keys: Vec<usize>,
    sources: Vec<Arc<CompiledSource>>,
    revision: Revision,
}

/// Identifies a snapshot's content: equal for snapshots built from equal sources (the same names,
/// the same flags in the same order, the same `fractional` mode), in this process or the next one
/// of the same build. Caches of per-snapshot work key on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revision(pub u64);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A hasher with a fixed seed: the same input gives the same hash in every process.
fn hasher() -> foldhash::quality::FoldHasher<'static> {
    use std::hash::BuildHasher as _;
    foldhash::quality::FixedState::with_seed(0x7665_7869_6c5f_7276).build_hasher()
}

fn hash_text(h: &mut impl std::hash::Hasher, s: &str) {
    h.write_usize(s.len());
    h.write(s.as_bytes());
}

/// A hash of everything a source contributes to a snapshot: its name and every flag's definition
/// (each flag's hash is computed once, when it is compiled).
fn source_hash(name: &str, flags: &[Arc<CompiledFlag>]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = hasher();
    hash_text(&mut h, name);
    h.write_usize(flags.len());
    for flag in flags {
        h.write_u64(flag.content_hash());
    }
    h.finish()
}

/// A hash of a flag's definition: key, state, default variant, variants, targeting, metadata.
pub(crate) fn flag_hash(flag: &Flag) -> u64 {
    use std::hash::Hasher as _;
    let mut h = hasher();
    hash_text(&mut h, &flag.key);
    hash_text(&mut h, flag.state.as_str());
    hash_text(&mut h, flag.default_variant.as_deref().unwrap_or("\u{0}"));
    h.write_usize(flag.variants.len());
    for (name, value) in &flag.variants {
        hash_text(&mut h, name);
        hash_text(&mut h, &value.to_string());
    }
    hash_text(&mut h, flag.targeting.as_ref().map_or("", RuleText::as_str));
    hash_text(&mut h, &Value::Object(flag.metadata.clone()).to_string());
    if let Some(experiment) = &flag.experiment {
        // Debug output names every field: a change to any of them changes the revision.
        hash_text(&mut h, &format!("{experiment:?}"));
    }
    h.finish()
}

/// A hash of everything a snapshot is built from: the `fractional` mode and each source's hash.
fn revision(mode: FractionalMode, sources: &[Arc<CompiledSource>]) -> Revision {
    use std::hash::Hasher as _;
    let mut h = hasher();
    hash_text(&mut h, &format!("{mode:?}"));
    h.write_usize(sources.len());
    for source in sources {
        h.write_u64(source.hash);
    }
    Revision(h.finish())
}

impl Snapshot {
    /// An empty snapshot (no sources).
    pub fn empty(mode: FractionalMode) -> Snapshot {
        Snapshot::build(Arc::new(Engine::new(mode)), Vec::new()).0
    }

    /// Compiles `sources` (in priority order: later wins) into a snapshot. Targeting rules that do
    /// not compile are reported as warnings and evaluate as parse errors, as in flagd.
    pub fn build(engine: Arc<Engine>, sources: Vec<SourceConfig>) -> (Snapshot, Vec<Diagnostic>) {
        let compiled: Vec<Arc<CompiledSource>> = sources
            .into_iter()
            .map(|source| Arc::new(CompiledSource::compile(&engine, source)))
            .collect();
        let warnings = compiled.iter().flat_map(|c| c.warnings.iter().cloned()).collect();
        (Snapshot::assemble(engine, compiled), warnings)
    }

    /// A snapshot of sources already compiled with `engine` (in priority order: later wins),
    /// compiling nothing: a source shared with an earlier snapshot contributes the very same
    /// compiled flags. The result equals [`Snapshot::build`] of the sources' documents, revision
    /// included.
    pub fn assemble(engine: Arc<Engine>, sources: Vec<Arc<CompiledSource>>) -> Snapshot {
        debug_assert!(
            sources.iter().all(|s| Arc::ptr_eq(&s.engine, &engine)),
            "sources compiled with another engine"
        );
        let revision = revision(engine.fractional_mode(), &sources);
        let mut entries: Vec<Entry> = Vec::new();
        // Keys come from configuration, never from requests: the fast hasher is safe.
        let mut by_id: HashMap<(Option<&str>, &str), usize, RandomState> = HashMap::default();
        for (priority, source) in sources.iter().enumerate() {
            for flag in &source.flags {
                let entry = Entry {
                    flag: flag.clone(),
                    source: source.name.clone(),
                    priority,
                    listed: source.listed,
                };
                // One flag per (flag set, key): a later source replaces an earlier one.
                match by_id.get(&(flag.flag().flag_set_id(), flag.key())) {
                    Some(&at) => entries[at] = entry,
                    None => {
                        by_id.insert((flag.flag().flag_set_id(), flag.key()), entries.len());
                        entries.push(entry);
                    }
                }
            }
        }
        let mut by_key: HashMap<String, Vec<usize>, RandomState> = HashMap::default();
        for (i, e) in entries.iter().enumerate() {
            by_key.entry(e.flag.key().to_owned()).or_default().push(i);
        }
        for indices in by_key.values_mut() {
            indices.sort_by_key(|&i| entries[i].priority);
        }
        let mut winners: Vec<usize> = by_key
            .values()
            .filter_map(|v| v.iter().rev().find(|&&i| entries[i].listed).copied())
            .collect();
        winners.sort_by(|&a, &b| entries[a].flag.key().cmp(entries[b].flag.key()));
        let mut keys: Vec<usize> = by_key.values().filter_map(|v| v.last().copied()).collect();
        keys.sort_by(|&a, &b| entries[a].flag.key().cmp(entries[b].flag.key()));
        Snapshot {
            engine,
            entries,
            by_key,
            winners,
            keys,
            sources,
            revision,
        }
    }

    /// The compiled sources, in priority order (to assemble the next snapshot from).
    pub fn compiled_sources(&self) -> &[Arc<CompiledSource>] {
        &self.sources
    }

    /// What this snapshot's content is (see [`Revision`]).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The engine the flags were compiled with.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The source names, in priority order.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().map(|s| s.name())
    }

    /// How many flags the snapshot holds (counting a key once per flag set).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the snapshot holds no flags.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The flag `key` as `selector` sees it.
    pub fn get(&self, key: &str, selector: &Selector) -> Option<&CompiledFlag> {
        let candidates = self.by_key.get(key)?;
        candidates
            .iter()
            .rev()
            .map(|&i| &self.entries[i])
            .find(|e| selector.matches(e))
            .map(|e| &*e.flag)
    }

    /// Every flag `selector` sees, one per key, sorted by key.
    pub fn flags<'s, 'q>(&'s self, selector: &'q Selector) -> impl Iterator<Item = &'s CompiledFlag> + use<'s, 'q> {
        let keys = match selector {
            Selector::All => &self.winners,
            _ => &self.keys,
        };
        keys.iter().filter_map(move |&i| match selector {
            Selector::All => Some(&*self.entries[i].flag),
            _ => self.get(self.entries[i].flag.key(), selector),
        })
    }

    /// Evaluates every flag `selector` sees for `context` (each as any type), converting the context
    /// once; `f` receives each flag and its resolution, in key order.
    pub fn evaluate_all<'s>(
        &'s self,
        selector: &Selector,
        context: Context<'_>,
        mut f: impl FnMut(&'s CompiledFlag, Resolution<'s>),
    ) {
        crate::targeting::with_context(context.attributes, context.now, |prepared| {
            for flag in self.flags(selector) {
                f(flag, flag.evaluate_in(&self.engine, prepared, ValueType::Any));
            }
        });
    }

    /// Evaluates flag `key` for `context` as type `ty`.
    pub fn evaluate<'s>(
        &'s self,
        key: &str,
        selector: &Selector,
        context: Context<'_>,
        ty: ValueType,
    ) -> Resolution<'s> {
        match self.get(key, selector) {
            Some(flag) => flag.evaluate(&self.engine, context, ty),
            None => Resolution::not_found(key),
        }
    }
}

/// How a flag changed between two snapshots (flagd's `configuration_change` payload types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// The flag is new.
    Write,
    /// The flag's definition or source changed.
    Update,
    /// The flag is gone.
    Delete,
}

impl Change {
    /// flagd's spelling: `write`, `update`, `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Write => "write",
            Change::Update => "update",
            Change::Delete => "delete",
        }
    }
}

impl Snapshot {
    /// The source a flag `selector` sees under `key` came from.
    pub fn source_of(&self, key: &str, selector: &Selector) -> Option<&str> {
        let candidates = self.by_key.get(key)?;
        candidates
            .iter()
            .rev()
            .map(|&i| &self.entries[i])
            .find(|e| selector.matches(e))
            .map(|e| &*e.source)
    }

    /// What changed for `selector` from `old` to `self`, sorted by key: flags added, removed, or
    /// whose definition (state, variants, default variant, targeting, metadata) or source differs.
    pub fn changes_since(&self, old: &Snapshot, selector: &Selector) -> Vec<(String, Change)> {
        let mut out = Vec::new();
        let mut before = old.flags(selector).peekable();
        let mut after = self.flags(selector).peekable();
        loop {
            let ordering = match (before.peek(), after.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(b), Some(a)) => b.key().cmp(a.key()),
            };
            match ordering {
                std::cmp::Ordering::Less => {
                    let b = before.next().unwrap_or_else(|| unreachable!());
                    out.push((b.key().to_owned(), Change::Delete));
                }
                std::cmp::Ordering::Greater => {
                    let a = after.next().unwrap_or_else(|| unreachable!());
                    out.push((a.key().to_owned(), Change::Write));
                }
                std::cmp::Ordering::Equal => {
                    let (b, a) = (
                        before.next().unwrap_or_else(|| unreachable!()),
                        after.next().unwrap_or_else(|| unreachable!()),
                    );
                    let moved = old.source_of(b.key(), selector) != self.source_of(a.key(), selector);
                    if b.flag() != a.flag() || moved {
                        out.push((a.key().to_owned(), Change::Update));
                    }
                }
            }
        }
        out
    }
}
