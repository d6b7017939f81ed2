//! File sources: flagd's `--uri file:<path>` (JSON or YAML), reloaded on file-system events
//! (inotify on Linux) with polling as the backstop.
//!
//! The file's parent directory is watched, not the file, so that a file replaced by rename (as
//! editors and Kubernetes ConfigMaps do) is still seen. An event that names the file is a change;
//! any other event in the directory (a ConfigMap's `..data` swap names only the directory's
//! symlinks), and every poll tick, compares the file's stamp (modification time and length) with
//! the one the last load saw, and is a change only if it differs or the last load failed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt as _};
use tokio::sync::mpsc;
use vexil_core::parse::{self, Format, Parsed, Strictness};

use super::{LoadError, Loaded, Source};

/// A flag definition file.
#[derive(Debug)]
pub struct FileSource {
    /// The path as given (the source name).
    name: String,
    path: PathBuf,
    format: Format,
    poll_interval: Duration,
    /// What the last load saw, shared with the change streams.
    seen: Arc<Mutex<Seen>>,
}

/// What the last load of a file saw.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    stamp: Option<Stamp>,
    failed: bool,
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileSource {
    /// A source reading `path` (JSON or YAML, from the extension), checked every `poll_interval`
    /// besides file-system events.
    pub fn new(path: &str, poll_interval: Duration) -> FileSource {
        FileSource {
            name: path.to_owned(),
            path: PathBuf::from(path),
            format: Format::from_path(path),
            poll_interval,
            seen: Arc::default(),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses the file (flagd's leniency: schema violations are warnings). Blocking.
    fn read(path: &Path, format: Format) -> Result<Parsed, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse::parse_str(&text, format, Strictness::Flagd).map_err(|source| LoadError::Invalid {
            path: path.display().to_string(),
            source,
        })
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>> {
        let (path, format, seen) = (self.path.clone(), self.format, self.seen.clone());
        let read = tokio::task::spawn_blocking(move || {
            // The stamp is taken before reading: a write during the read shows as a newer stamp.
            let stamp = stamp(&path);
            let result = FileSource::read(&path, format);
            *lock(&seen) = Seen {
                stamp,
                failed: result.is_err(),
            };
            result
        });
        async move { read.await.map_err(|e| LoadError::Other(Box::new(e)))?.map(Loaded::from) }.boxed()
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let touched = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::channel(1);
        let watcher = watch_directory(self, touched.clone(), wake);
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changes = Changes {
            _watcher: watcher,
            touched,
            woken,
            ticker,
            path: self.path.clone(),
            seen: self.seen.clone(),
        };
        futures::stream::unfold(changes, |mut changes| async move {
            changes.next().await;
            Some(((), changes))
        })
        .boxed()
    }
}

/// The state of a file source's change stream.
struct Changes {
    /// Kept for as long as the stream: dropping it stops the watch.
    _watcher: Option<notify::RecommendedWatcher>,
    /// Set when an event named the file itself.
    touched: Arc<AtomicBool>,
    /// Woken by any event in the directory.
    woken: mpsc::Receiver<()>,
    ticker: tokio::time::Interval,
    path: PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl Changes {
    /// Waits until the file may have changed. The ticker's first tick is immediate: a change since
    /// the last load is seen at once.
    async fn next(&mut self) {
        loop {
            tokio::select! {
                _ = self.ticker.tick() => {}
                Some(()) = self.woken.recv() => {
                    // Let a burst of events (truncate, write, close) settle into one check.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    while self.woken.try_recv().is_ok() {}
                }
            }
            if self.touched.swap(false, Ordering::Relaxed) || self.stamp_changed().await {
                return;
            }
        }
    }

    async fn stamp_changed(&self) -> bool {
        let path = self.path.clone();
        let Ok(stamp) = tokio::task::spawn_blocking(move || stamp(&path)).await else {
            return true;
        };
        let seen = *lock(&self.seen);
        seen.failed || seen.stamp != stamp
    }
}

/// A watcher on the directory of `file` that wakes `wake` on every event that may be a change, and
/// sets `touched` when the event names the file; `None` (with a warning) if it cannot start.
fn watch_directory(
    file: &FileSource,
    touched: Arc<AtomicBool>,
    wake: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    use notify::event::{AccessKind, AccessMode, EventKind};

    let dir = match file.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = file.path.file_name().map(ToOwned::to_owned);
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Opening and reading are not changes (and loading the file opens it).
        if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == file_name.as_deref()) {
            touched.store(true, Ordering::Relaxed);
        }
        let _ = wake.try_send(());
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(source = %file.name, error = %e, "cannot watch files, checking the source every poll interval only");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(
            source = %file.name,
            dir = %dir.display(),
            error = %e,
            "cannot watch the directory, checking the source every poll interval only"
        );
        return None;
    }
    Some(watcher)
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}
