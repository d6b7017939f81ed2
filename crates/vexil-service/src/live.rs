//! The live configuration: every source's last good document, compiled into one snapshot and
//! published on a watch channel; a watcher task that reloads sources when their files change.
//!
//! Invariants:
//! - a source that fails to load (unreadable, invalid) keeps serving its last good document;
//! - a new snapshot is published only when some source's content changed;
//! - `version` increases by one with every published snapshot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vexil_core::{Engine, FractionalMode, Snapshot, SourceConfig};

use crate::sources::{SourceSpec, Stamp};

/// How the live configuration is built and watched.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// The sources, in priority order (later wins).
    pub sources: Vec<SourceSpec>,
    /// The `fractional` generation rules evaluate.
    pub fractional: FractionalMode,
    /// How often files are checked for changes.
    pub poll_interval: Duration,
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

/// Whether the server should receive traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every source has loaded and none has been failing for longer than the grace period.
    Ready,
    /// Some source has never loaded.
    NotLoaded {
        /// The sources that have not loaded yet.
        sources: Vec<String>,
    },
    /// A source has been failing for longer than the grace period (its last good flags are still
    /// served).
    Stale {
        /// The failing source.
        source: String,
        /// For how long.
        failing_for: Duration,
    },
}

#[derive(Debug)]
struct SourceState {
    spec: SourceSpec,
    stamp: Option<Stamp>,
    /// The last good document, parsed (compared with each reload to detect real changes).
    good: Option<SourceConfig>,
    failing_since: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<Engine>,
    tx: watch::Sender<Arc<Published>>,
    sources: Mutex<Vec<SourceState>>,
    stale_after: Option<Duration>,
}

/// The live configuration, cheap to clone.
#[derive(Debug, Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

impl Live {
    /// Loads every source once and publishes the first snapshot (sources that fail are retried by
    /// the watcher). Does not start watching: see [`Live::watch`].
    pub fn load(config: &LiveConfig) -> Live {
        let engine = Arc::new(Engine::new(config.fractional));
        let empty = Arc::new(Published {
            snapshot: Arc::new(Snapshot::build(engine.clone(), Vec::new()).0),
            version: 0,
        });
        let (tx, _) = watch::channel(empty);
        let sources = config
            .sources
            .iter()
            .map(|spec| SourceState {
                spec: spec.clone(),
                stamp: None,
                good: None,
                failing_since: None,
            })
            .collect();
        let live = Live {
            inner: Arc::new(Inner {
                engine,
                tx,
                sources: Mutex::new(sources),
                stale_after: config.stale_after,
            }),
        };
        live.poll(true);
        live
    }

    /// Watches the sources until the returned task is dropped or aborted: file-system events
    /// (inotify on Linux) trigger a check at once; a check every `interval` is the backstop for
    /// what events miss (network file systems, a watcher that could not start).
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let live = self.clone();
        let (wake, mut woken) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = self.file_watcher(wake);
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    Some(()) = woken.recv() => {
                        // Let a burst of events (write, then close) settle into one check.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        while woken.try_recv().is_ok() {}
                    }
                }
                // File reads and compiles are blocking work.
                let l = live.clone();
                if tokio::task::spawn_blocking(move || l.poll(false)).await.is_err() {
                    tracing::error!("source watcher panicked");
                }
            }
        })
    }

    /// A watcher on the directories of the file sources (their parents, so that files replaced by
    /// rename, like editors and Kubernetes ConfigMaps do, are seen) that wakes `wake` on any event.
    fn file_watcher(&self, wake: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher as _;
        let mut dirs: Vec<std::path::PathBuf> = Vec::new();
        for state in self.inner.sources.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let SourceSpec::File(file) = &state.spec;
            let dir = match file.path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        if dirs.is_empty() {
            return None;
        }
        let handler = move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = wake.try_send(());
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch files ({e}); checking sources every poll interval only");
                return None;
            }
        };
        for dir in dirs {
            if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), "cannot watch directory ({e}); checking it every poll interval only");
            }
        }
        Some(watcher)
    }

    /// Checks every source; reloads the changed ones; publishes a new snapshot if content changed.
    /// Returns whether a new snapshot was published.
    pub fn poll(&self, initial: bool) -> bool {
        let mut sources = self.inner.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for state in sources.iter_mut() {
            let SourceSpec::File(file) = &state.spec;
            let stamp = file.stamp();
            // Unchanged files are not re-read, unless the last attempt failed.
            if !initial && stamp.is_some() && stamp == state.stamp && state.failing_since.is_none() {
                continue;
            }
            state.stamp = stamp;
            match file.load() {
                Ok(parsed) => {
                    if state.failing_since.take().is_some() {
                        tracing::info!(source = %file.name, "source loads again");
                    }
                    if state.good.as_ref().is_some_and(|old| old.config == parsed.config) {
                        continue;
                    }
                    for w in &parsed.warnings {
                        tracing::warn!(source = %file.name, "{w}");
                    }
                    state.good = Some(SourceConfig {
                        name: file.name.clone(),
                        config: parsed.config,
                    });
                    changed = true;
                }
                Err(e) => {
                    if state.failing_since.is_none() {
                        let keeping = if state.good.is_some() {
                            "serving its last good flags"
                        } else {
                            "no flags from it yet"
                        };
                        tracing::error!(source = %file.name, "cannot load source ({keeping}): {e}");
                        state.failing_since = Some(Instant::now());
                    }
                }
            }
        }
        if !changed {
            return false;
        }
        let configs: Vec<SourceConfig> = sources.iter().filter_map(|s| s.good.clone()).collect();
        drop(sources);
        let (snapshot, warnings) = Snapshot::build(self.inner.engine.clone(), configs);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let flags = snapshot.len();
        let snapshot = Arc::new(snapshot);
        let mut version = 0;
        self.inner.tx.send_modify(|current| {
            version = if initial { 0 } else { current.version + 1 };
            *current = Arc::new(Published { snapshot, version });
        });
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

    /// Whether the server should receive traffic.
    pub fn readiness(&self) -> Readiness {
        let sources = self.inner.sources.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<String> = sources
            .iter()
            .filter(|s| s.good.is_none())
            .map(|s| s.spec.name().to_owned())
            .collect();
        if !missing.is_empty() {
            return Readiness::NotLoaded { sources: missing };
        }
        if let Some(limit) = self.inner.stale_after {
            for s in sources.iter() {
                if let Some(since) = s.failing_since {
                    let failing_for = since.elapsed();
                    if failing_for > limit {
                        return Readiness::Stale {
                            source: s.spec.name().to_owned(),
                            failing_for,
                        };
                    }
                }
            }
        }
        Readiness::Ready
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::{Map, json};
    use vexil_core::{Context, Selector, ValueType};

    use super::*;
    use crate::FileSource;

    fn write(path: &std::path::Path, text: &str) {
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn value(live: &Live, key: &str) -> Option<serde_json::Value> {
        let snap = live.snapshot();
        let empty = Map::new();
        snap.evaluate(
            key,
            &Selector::All,
            Context {
                attributes: &empty,
                now: 0,
            },
            ValueType::Any,
        )
        .value
        .cloned()
    }

    fn flags(value: &str) -> String {
        json!({"flags": {"f": {"state": "ENABLED", "variants": {"v": value}, "defaultVariant": "v"}}}).to_string()
    }

    #[test]
    fn reloads_changes_and_keeps_the_last_good_document() {
        let dir = std::env::temp_dir().join(format!("vexil-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flags.json");
        write(&path, &flags("one"));
        let config = LiveConfig {
            sources: vec![SourceSpec::File(FileSource::new(path.to_str().unwrap()))],
            fractional: FractionalMode::V3,
            poll_interval: Duration::from_millis(10),
            stale_after: Some(Duration::ZERO),
        };
        let live = Live::load(&config);
        assert_eq!(live.current().version, 0);
        assert_eq!(value(&live, "f"), Some(json!("one")));
        assert_eq!(live.readiness(), Readiness::Ready);

        // Same stamp: nothing to do.
        assert!(!live.poll(false));

        write(&path, "{ not json");
        assert!(!live.poll(false));
        assert_eq!(
            value(&live, "f"),
            Some(json!("one")),
            "the last good flags keep serving"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(live.readiness(), Readiness::Stale { .. }));

        write(&path, &flags("two"));
        assert!(live.poll(false));
        assert_eq!(live.current().version, 1);
        assert_eq!(value(&live, "f"), Some(json!("two")));
        assert_eq!(live.readiness(), Readiness::Ready);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_events_trigger_a_reload_without_waiting_for_the_poll() {
        let dir = std::env::temp_dir().join(format!("vexil-live-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flags.json");
        write(&path, &flags("one"));
        let config = LiveConfig {
            sources: vec![SourceSpec::File(FileSource::new(path.to_str().unwrap()))],
            fractional: FractionalMode::V3,
            poll_interval: Duration::from_secs(3600),
            stale_after: None,
        };
        let live = Live::load(&config);
        let mut changes = live.subscribe();
        let task = live.watch(config.poll_interval);
        // The interval's first tick fires at once; let it pass before changing the file.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Replace the file by rename, as editors and ConfigMaps do.
        let tmp = dir.join(".flags.json.tmp");
        write(&tmp, &flags("two"));
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(2), changes.changed())
            .await
            .expect("reloaded on the file event")
            .unwrap();
        assert_eq!(value(&live, "f"), Some(json!("two")));
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_source_is_not_ready() {
        let config = LiveConfig {
            sources: vec![SourceSpec::parse("file:/nonexistent/vexil/flags.json").unwrap()],
            fractional: FractionalMode::V3,
            poll_interval: Duration::from_millis(10),
            stale_after: None,
        };
        let live = Live::load(&config);
        assert_eq!(
            live.readiness(),
            Readiness::NotLoaded {
                sources: vec!["/nonexistent/vexil/flags.json".into()]
            }
        );
        assert!(live.snapshot().is_empty());
    }
}
