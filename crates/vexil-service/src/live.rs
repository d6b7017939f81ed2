//! The live configuration: every source's last good document, compiled into one snapshot and
//! published on a watch channel; one task per source that reloads it when it reports a change.
//!
//! Invariants:
//! - a source that fails to load (unreadable, invalid, unreachable) keeps serving its last good
//!   document;
//! - a new snapshot is published only when some source's content changed;
//! - `version` increases by one with every published snapshot;
//! - only a source whose document changed is compiled again; the next snapshot is assembled from
//!   the other sources' compiled flags as they are;
//! - no `std` lock is held across I/O, parsing or compiling: loads and compiles run outside any
//!   lock, a source's state is locked only to read or swap it, and publishing is serialized by an
//!   async lock so that versions follow the order snapshots are assembled in.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::watch;
use vexil_core::snapshot::CompiledSource;
use vexil_core::{Engine, FractionalMode, Snapshot, SourceConfig};

use crate::sources::{LoadError, Source, SourceSpec};

/// How the live configuration is built from the command line's sources and watched.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// The sources, in priority order (later wins).
    pub sources: Vec<SourceSpec>,
    /// The `fractional` generation rules evaluate.
    pub fractional: FractionalMode,
    /// How often file sources check their files besides file-system events.
    pub poll_interval: Duration,
    /// How long a source may keep failing before the server reports not ready; `None`: never.
    pub stale_after: Option<Duration>,
}

impl LiveConfig {
    /// The sources, opened.
    pub fn open_sources(&self) -> Vec<Arc<dyn Source>> {
        self.sources.iter().map(|spec| spec.open(self.poll_interval)).collect()
    }

    /// Everything but the sources.
    pub fn options(&self) -> LiveOptions {
        LiveOptions {
            fractional: self.fractional,
            stale_after: self.stale_after,
        }
    }
}

/// How sources are compiled and judged, whatever they are.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    /// The `fractional` generation rules evaluate.
    pub fractional: FractionalMode,
    /// How long a source may keep failing before the server reports not ready; `None`: never.
    pub stale_after: Option<Duration>,
}

/// One published configuration.
#[derive(Debug)]
pub struct Published {
    /// The compiled flags.
    pub snapshot: Arc<Snapshot>,
    /// 0 for the first snapshot, +1 for every change.
    pub version: u64,
}

/// Whether the server should receive traffic, with every source's state. Shown as `/readyz`
/// answers: `ready`, or `not ready` and a line per source that is not loaded or failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Every source, in priority order.
    pub sources: Vec<SourceReadiness>,
}

/// One source's part of [`Readiness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReadiness {
    /// The source's name.
    pub name: String,
    /// How its loads go.
    pub state: SourceState,
}

/// How a source's loads go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceState {
    /// Its last load succeeded.
    Loaded,
    /// It has never loaded: none of its flags are served.
    NotLoaded {
        /// Why the last attempt failed.
        error: String,
    },
    /// Its last loads failed; its last good flags keep serving.
    Failing {
        /// Why the last attempt failed.
        error: String,
        /// Since the first failure.
        failing_for: Duration,
        /// Failing for longer than the grace period (`stale_after`): the server is not ready.
        stale: bool,
    },
}

impl Readiness {
    /// Every source has loaded and none has been failing for longer than the grace period.
    pub fn is_ready(&self) -> bool {
        self.sources.iter().all(|s| s.state.is_ready())
    }
}

impl SourceState {
    /// Loaded, or failing for no longer than the grace period.
    pub fn is_ready(&self) -> bool {
        match self {
            SourceState::Loaded => true,
            SourceState::NotLoaded { .. } => false,
            SourceState::Failing { stale, .. } => !stale,
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_ready() { "ready" } else { "not ready" })?;
        for source in &self.sources {
            let name = &source.name;
            match &source.state {
                SourceState::Loaded => {}
                SourceState::NotLoaded { error } => write!(f, "\nsource {name}: not loaded yet: {error}")?,
                SourceState::Failing { error, failing_for, .. } => write!(
                    f,
                    "\nsource {name}: failing for {}s (serving its last good flags): {error}",
                    failing_for.as_secs()
                )?,
            }
        }
        Ok(())
    }
}

/// The live configuration, cheap to clone.
#[derive(Debug, Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<Engine>,
    tx: watch::Sender<Arc<Published>>,
    /// In priority order.
    slots: Vec<Slot>,
    stale_after: Option<Duration>,
    /// Held while a snapshot is assembled and published.
    publishing: tokio::sync::Mutex<()>,
}

/// One source and what Live knows of it.
#[derive(Debug)]
struct Slot {
    source: Arc<dyn Source>,
    /// Held for a whole load (an async lock): loads of one source never overlap, so a slower load
    /// cannot overwrite the result of a newer one.
    loading: tokio::sync::Mutex<()>,
    /// Locked only to read or swap.
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The last good load, each of its documents compiled (by part key, in the source's order).
    good: Option<Vec<(String, Arc<CompiledSource>)>>,
    failing: Option<Failure>,
}

impl SlotState {
    fn compiled(&self) -> impl Iterator<Item = Arc<CompiledSource>> + '_ {
        self.good.iter().flatten().map(|(_, c)| c.clone())
    }
}

#[derive(Debug)]
struct Failure {
    since: Instant,
    error: String,
}

/// How long a source watcher that panicked waits before it follows its source again.
const WATCHER_RESTART: std::time::Duration = std::time::Duration::from_secs(1);

impl Live {
    /// Loads every source once (concurrently) and publishes the first snapshot, version 0 (sources
    /// that fail are retried when they report a change). Does not start watching: see
    /// [`Live::watch`].
    pub async fn compose(sources: Vec<Arc<dyn Source>>, options: LiveOptions) -> Live {
        let engine = Arc::new(Engine::new(options.fractional));
        let slots: Vec<Slot> = sources.into_iter().map(Slot::new).collect();
        futures::future::join_all(slots.iter().map(|slot| slot.reload(&engine))).await;
        let compiled = slots
            .iter()
            .flat_map(|slot| slot.state().compiled().collect::<Vec<_>>())
            .collect();
        let snapshot = assemble(&engine, compiled).await;
        tracing::info!(version = 0, flags = snapshot.len(), "configuration published");
        let (tx, _) = watch::channel(Arc::new(Published { snapshot, version: 0 }));
        Live {
            inner: Arc::new(Inner {
                engine,
                tx,
                slots,
                stale_after: options.stale_after,
                publishing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// [`Live::compose`] of the command line's sources.
    pub async fn open(config: &LiveConfig) -> Live {
        Live::compose(config.open_sources(), config.options()).await
    }

    /// [`Live::open`] for sync callers: blocks the calling thread (the work runs on a thread and
    /// runtime of its own, so this may be called from within a runtime too).
    pub fn load(config: &LiveConfig) -> Live {
        block_on(Live::open(config))
    }

    /// Follows every source's changes until the returned task is dropped or aborted: one task per
    /// source reloads it when it reports a change, and publishes a new snapshot when its content
    /// changed. The sources' change streams are opened before this returns.
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut followers = std::collections::HashMap::new();
        for index in 0..self.inner.slots.len() {
            let changes = self.inner.slots[index].source.changes();
            let task = tasks.spawn(self.clone().follow(index, changes));
            followers.insert(task.id(), index);
        }
        let live = self.clone();
        tokio::spawn(async move {
            while let Some(done) = tasks.join_next_with_id().await {
                let Err(e) = done else { continue };
                let Some(index) = followers.remove(&e.id()) else {
                    continue;
                };
                if !e.is_panic() {
                    continue;
                }
                // A bug, not a source failure (those are reported by `reload`): keep following
                // the source, after a pause so that a panic on every change cannot spin.
                let slot = &live.inner.slots[index];
                tracing::error!(source = %slot.source.name(), error = %e, restart_in = ?WATCHER_RESTART, "the source watcher panicked, restarting it");
                tokio::time::sleep(WATCHER_RESTART).await;
                let changes = slot.source.changes();
                let task = tasks.spawn(live.clone().follow(index, changes));
                followers.insert(task.id(), index);
            }
        })
    }

    async fn follow(self, index: usize, mut changes: BoxStream<'static, ()>) {
        let slot = &self.inner.slots[index];
        while changes.next().await.is_some() {
            if slot.reload(&self.inner.engine).await {
                self.publish().await;
            }
        }
        tracing::warn!(source = %slot.source.name(), "the source stopped reporting changes");
    }

    /// Loads every source again (concurrently) and publishes a snapshot if some content changed;
    /// returns whether it did.
    pub async fn reload(&self) -> bool {
        let reloads = self.inner.slots.iter().map(|slot| slot.reload(&self.inner.engine));
        let changed = futures::future::join_all(reloads).await;
        changed.contains(&true) && self.publish().await
    }

    /// [`Live::reload`] for sync callers (tests): blocks the calling thread, like [`Live::load`].
    /// Must not be called on a runtime thread that a [`Live::watch`] task of this `Live` needs in
    /// order to finish publishing.
    pub fn reload_blocking(&self) -> bool {
        block_on(self.reload())
    }

    /// Assembles a snapshot from every source's last good compiled document and publishes it as
    /// the next version, unless an earlier call already published these very documents.
    async fn publish(&self) -> bool {
        let _publishing = self.inner.publishing.lock().await;
        let compiled: Vec<Arc<CompiledSource>> = self
            .inner
            .slots
            .iter()
            .flat_map(|slot| slot.state().compiled().collect::<Vec<_>>())
            .collect();
        let current = self.current();
        let published = current.snapshot.compiled_sources();
        if published.len() == compiled.len() && published.iter().zip(&compiled).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return false;
        }
        let snapshot = assemble(&self.inner.engine, compiled).await;
        let (version, flags) = (current.version + 1, snapshot.len());
        self.inner.tx.send_replace(Arc::new(Published { snapshot, version }));
        tracing::info!(version, flags, "configuration published");
        true
    }

    /// The current configuration.
    pub fn current(&self) -> Arc<Published> {
        self.inner.tx.borrow().clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.tx.borrow().snapshot.clone()
    }

    /// A receiver that is notified of every published configuration.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.inner.tx.subscribe()
    }

    /// How many receivers are subscribed (open streams).
    pub fn subscribers(&self) -> usize {
        self.inner.tx.receiver_count()
    }

    /// Whether the server should receive traffic, and every source's state.
    pub fn readiness(&self) -> Readiness {
        let sources = self
            .inner
            .slots
            .iter()
            .map(|slot| {
                let state = slot.state();
                let state = match (&state.good, &state.failing) {
                    (_, None) => SourceState::Loaded,
                    (None, Some(failure)) => SourceState::NotLoaded {
                        error: failure.error.clone(),
                    },
                    (Some(_), Some(failure)) => {
                        let failing_for = failure.since.elapsed();
                        SourceState::Failing {
                            error: failure.error.clone(),
                            failing_for,
                            stale: self.inner.stale_after.is_some_and(|limit| failing_for > limit),
                        }
                    }
                };
                SourceReadiness {
                    name: slot.source.name().to_owned(),
                    state,
                }
            })
            .collect();
        Readiness { sources }
    }
}

impl Slot {
    fn new(source: Arc<dyn Source>) -> Slot {
        Slot {
            source,
            loading: tokio::sync::Mutex::new(()),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the source; compiles and keeps the documents that changed (returns whether any did).
    /// A failure keeps the last good load.
    async fn reload(&self, engine: &Arc<Engine>) -> bool {
        let _loading = self.loading.lock().await;
        let name = self.source.name();
        let loaded = match self.source.load().await {
            Ok(loaded) => loaded,
            Err(e) => {
                self.failed(&e);
                return false;
            }
        };
        let (good, recovered) = {
            let mut state = self.state();
            (state.good.clone().unwrap_or_default(), state.failing.take().is_some())
        };
        if recovered {
            tracing::info!(source = %name, "source loads again");
        }
        let mut changed = good.len() != loaded.parts.len();
        let mut parts = Vec::with_capacity(loaded.parts.len());
        for part in loaded.parts {
            let kept = good.iter().find(|(key, compiled)| {
                *key == part.key && compiled.is_listed() == part.listed && *compiled.config() == part.parsed.config
            });
            if let Some((key, compiled)) = kept {
                changed |= parts.len() >= good.len() || good[parts.len()].0 != *key;
                parts.push((key.clone(), compiled.clone()));
                continue;
            }
            changed = true;
            for w in &part.parsed.warnings {
                tracing::warn!(source = %name, part = %part.key, "{w}");
            }
            let source = SourceConfig {
                name: name.to_owned(),
                config: part.parsed.config,
            };
            let engine = engine.clone();
            let listed = part.listed;
            // The same document's last compiled version: its unchanged flags are not compiled again.
            let previous = good.iter().find(|(key, _)| *key == part.key).map(|(_, c)| c.clone());
            let compile = move || {
                let compiled = CompiledSource::compile_reusing(&engine, source, previous.as_deref());
                if listed { compiled } else { compiled.unlisted() }
            };
            let compiled = match tokio::task::spawn_blocking(compile).await {
                Ok(compiled) => compiled,
                Err(e) => {
                    self.failed(&LoadError::Other(Box::new(e)));
                    return false;
                }
            };
            for w in compiled.warnings() {
                tracing::warn!(source = %name, part = %part.key, "{w}");
            }
            parts.push((part.key, Arc::new(compiled)));
        }
        if !changed && self.state().good.is_some() {
            return false;
        }
        self.state().good = Some(parts);
        true
    }

    fn failed(&self, error: &LoadError) {
        let error = error.to_string();
        let first = {
            let mut state = self.state();
            let first = state.failing.is_none();
            match &mut state.failing {
                Some(failure) => failure.error.clone_from(&error),
                None => {
                    state.failing = Some(Failure {
                        since: Instant::now(),
                        error: error.clone(),
                    })
                }
            }
            first.then(|| state.good.is_some())
        };
        if let Some(serving) = first {
            let keeping = if serving {
                "serving its last good flags"
            } else {
                "no flags from it yet"
            };
            tracing::error!(source = %self.source.name(), error = %error, "cannot load source ({keeping})");
        }
    }
}

/// Assembles a snapshot (off the async threads: it indexes every flag).
async fn assemble(engine: &Arc<Engine>, compiled: Vec<Arc<CompiledSource>>) -> Arc<Snapshot> {
    let engine = engine.clone();
    let build = move || Arc::new(Snapshot::assemble(engine, compiled));
    match tokio::task::spawn_blocking(build).await {
        Ok(snapshot) => snapshot,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Not started because the runtime is shutting down, which drops this task too.
        Err(_) => std::future::pending().await,
    }
}

/// Runs `future` to completion on a thread and runtime of its own, blocking the caller.
fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("cannot start a runtime to load sources: {e}"));
            runtime.block_on(future)
        });
        runner.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests;
