//! Live over real files in temporary directories, and over an in-memory source driven by a channel.
//! Nothing waits for a fixed time before asserting: changes are awaited with generous deadlines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use serde_json::{Map, Value, json};
use vexil_core::parse::{self, Strictness};
use vexil_core::{Context, Selector, ValueType};

use super::*;
use crate::{FileSource, Loaded};

/// Long enough for any event on a loaded machine; reached only when a test fails.
const DEADLINE: Duration = Duration::from_secs(20);
/// A poll interval that never elapses during a test: what happens is caused by file events.
const NEVER: Duration = Duration::from_secs(3600);

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vexil-live-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Replaces the file by rename, as editors and ConfigMaps do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write(&tmp, text);
    std::fs::rename(&tmp, path).unwrap();
}

fn flags(key: &str, value: &str) -> Value {
    json!({"flags": {key: {"state": "ENABLED", "variants": {"v": value}, "defaultVariant": "v"}}})
}

fn value_in(live: &Live, key: &str, selector: &Selector) -> Option<Value> {
    let snap = live.snapshot();
    let empty = Map::new();
    let context = Context {
        attributes: &empty,
        now: 0,
    };
    snap.evaluate(key, selector, context, ValueType::Any).value.cloned()
}

fn value(live: &Live, key: &str) -> Option<Value> {
    value_in(live, key, &Selector::All)
}

fn file_config(paths: &[&Path], stale_after: Option<Duration>) -> LiveConfig {
    LiveConfig {
        sources: paths
            .iter()
            .map(|p| SourceSpec::parse(p.to_str().unwrap()).unwrap())
            .collect(),
        fractional: FractionalMode::V3,
        poll_interval: NEVER,
        stale_after,
    }
}

fn state<'r>(readiness: &'r Readiness, name: &str) -> &'r SourceState {
    &readiness.sources.iter().find(|s| s.name == name).unwrap().state
}

/// Waits for the next published configuration.
async fn next_published(changes: &mut watch::Receiver<Arc<Published>>) -> Arc<Published> {
    tokio::time::timeout(DEADLINE, changes.changed())
        .await
        .expect("a configuration is published")
        .unwrap();
    changes.borrow_and_update().clone()
}

#[test]
fn reloads_changes_and_keeps_the_last_good_document() {
    let dir = TempDir::new("reload");
    let path = dir.path("flags.json");
    write(&path, &flags("f", "one").to_string());
    let live = Live::load(&file_config(&[&path], Some(Duration::ZERO)));
    assert_eq!(live.current().version, 0);
    assert_eq!(value(&live, "f"), Some(json!("one")));
    assert!(live.readiness().is_ready());
    assert_eq!(live.readiness().to_string(), "ready");

    assert!(!live.reload_blocking(), "the same document: nothing to publish");

    write(&path, "{ not json");
    assert!(!live.reload_blocking());
    assert_eq!(
        value(&live, "f"),
        Some(json!("one")),
        "the last good flags keep serving"
    );
    let readiness = live.readiness();
    let name = path.to_str().unwrap();
    assert!(
        matches!(state(&readiness, name), SourceState::Failing { stale: true, .. }),
        "{readiness:?}"
    );
    assert!(!readiness.is_ready());
    let body = readiness.to_string();
    assert!(body.starts_with("not ready\n"), "{body}");
    assert!(
        body.contains(&format!("source {name}: failing for ")),
        "the body names the source: {body}"
    );
    assert!(
        body.contains(&format!("s (serving its last good flags): {name}: ")),
        "and why it fails: {body}"
    );

    write(&path, &flags("f", "two").to_string());
    assert!(live.reload_blocking());
    assert_eq!(live.current().version, 1);
    assert_eq!(value(&live, "f"), Some(json!("two")));
    assert!(live.readiness().is_ready());
}

#[test]
fn a_missing_source_is_not_ready() {
    let live = Live::load(&LiveConfig {
        sources: vec![SourceSpec::parse("file:/nonexistent/vexil/flags.json").unwrap()],
        fractional: FractionalMode::V3,
        poll_interval: NEVER,
        stale_after: None,
    });
    let readiness = live.readiness();
    assert!(!readiness.is_ready());
    let SourceState::NotLoaded { error } = state(&readiness, "/nonexistent/vexil/flags.json") else {
        panic!("{readiness:?}");
    };
    assert!(
        error.starts_with("cannot read /nonexistent/vexil/flags.json"),
        "{error}"
    );
    assert_eq!(
        readiness.to_string(),
        format!("not ready\nsource /nonexistent/vexil/flags.json: not loaded yet: {error}")
    );
    assert!(live.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_change_stream_fires_on_writes_and_on_rename_replacement() {
    let dir = TempDir::new("stream");
    let path = dir.path("flags.json");
    write(&path, &flags("f", "one").to_string());
    let source = FileSource::new(path.to_str().unwrap(), NEVER);
    source.load().await.unwrap();
    let mut changes = source.changes();
    // The first check (at once) finds the file as loaded, and neither the source's own reads nor
    // other files in the directory are changes.
    source.load().await.unwrap();
    write(&dir.path("unrelated.txt"), "x");
    let quiet = tokio::time::timeout(Duration::from_millis(300), changes.next()).await;
    assert!(quiet.is_err(), "no change reported");

    write(&path, &flags("f", "two").to_string());
    tokio::time::timeout(DEADLINE, changes.next())
        .await
        .expect("the write is reported")
        .unwrap();
    let loaded = source.load().await.unwrap();
    assert_eq!(loaded.parts[0].parsed.config.flags[0].variants[0].1, json!("two"));

    replace(&path, &flags("f", "three").to_string());
    tokio::time::timeout(DEADLINE, changes.next())
        .await
        .expect("the replacement is reported")
        .unwrap();
    let loaded = source.load().await.unwrap();
    assert_eq!(loaded.parts[0].parsed.config.flags[0].variants[0].1, json!("three"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_events_trigger_a_reload_and_a_failing_file_keeps_serving() {
    let dir = TempDir::new("events");
    let path = dir.path("flags.json");
    write(&path, &flags("f", "one").to_string());
    let live = Live::open(&file_config(&[&path], None)).await;
    let mut changes = live.subscribe();
    let task = live.watch();

    replace(&path, &flags("f", "two").to_string());
    assert_eq!(next_published(&mut changes).await.version, 1);
    assert_eq!(value(&live, "f"), Some(json!("two")));

    // An invalid document: reported by the readiness, the last good flags keep serving; fixed, the
    // file loads again.
    let name = path.to_str().unwrap();
    write(&path, "{ not json");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while matches!(state(&live.readiness(), name), SourceState::Loaded) {
        assert!(tokio::time::Instant::now() < deadline, "the failure is noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let readiness = live.readiness();
    assert!(readiness.is_ready(), "no --stale-after: still ready");
    assert!(
        readiness.to_string().contains(&format!("source {name}: failing")),
        "{readiness}"
    );
    assert_eq!(value(&live, "f"), Some(json!("two")));

    write(&path, &flags("f", "three").to_string());
    assert_eq!(next_published(&mut changes).await.version, 2);
    assert_eq!(value(&live, "f"), Some(json!("three")));
    assert_eq!(live.readiness().to_string(), "ready");
    task.abort();
}

#[test]
fn only_the_changed_source_is_compiled_again() {
    let dir = TempDir::new("incremental");
    let (a, b) = (dir.path("a.json"), dir.path("b.json"));
    write(&a, &flags("a", "one").to_string());
    write(&b, &flags("b", "one").to_string());
    let live = Live::load(&file_config(&[&a, &b], None));
    let before = live.snapshot();

    write(&b, &flags("b", "two").to_string());
    assert!(live.reload_blocking());
    let after = live.snapshot();
    assert_eq!(value(&live, "b"), Some(json!("two")));
    let (old, new) = (before.compiled_sources(), after.compiled_sources());
    assert!(Arc::ptr_eq(&old[0], &new[0]), "a.json is reused as compiled");
    assert!(!Arc::ptr_eq(&old[1], &new[1]), "b.json is compiled again");
    let full = Snapshot::build(
        live.inner.engine.clone(),
        new.iter()
            .map(|s| SourceConfig {
                name: s.name().to_owned(),
                config: s.config().clone(),
            })
            .collect(),
    )
    .0;
    assert_eq!(after.revision(), full.revision());

    // Rewritten with the same content: nothing is compiled or published.
    write(&a, &flags("a", "one").to_string());
    assert!(!live.reload_blocking());
    assert!(Arc::ptr_eq(&live.snapshot(), &after));
}

/// A source held in memory: the test sets its document (or a failure) through a channel.
#[derive(Debug)]
struct Memory {
    name: String,
    document: watch::Receiver<Result<Value, String>>,
    loads: AtomicUsize,
}

impl Memory {
    fn new(name: &str, document: Value) -> (Arc<Memory>, watch::Sender<Result<Value, String>>) {
        let (tx, rx) = watch::channel(Ok(document));
        let source = Memory {
            name: name.to_owned(),
            document: rx,
            loads: AtomicUsize::new(0),
        };
        (Arc::new(source), tx)
    }
}

impl Source for Memory {
    fn name(&self) -> &str {
        &self.name
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let document = self.document.borrow().clone();
        async move {
            match document {
                Ok(document) => parse::parse_value(&document, Strictness::Flagd)
                    .map(Loaded::from)
                    .map_err(|source| LoadError::Invalid {
                        path: self.name.clone(),
                        source,
                    }),
                Err(message) => Err(LoadError::Other(message.into())),
            }
        }
        .boxed()
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let mut document = self.document.clone();
        // Whatever was set since the last load counts as a change.
        document.mark_changed();
        futures::stream::unfold(document, |mut document| async move {
            document.changed().await.ok()?;
            Some(((), document))
        })
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_composes_any_sources() {
    let dir = TempDir::new("composed");
    let path = dir.path("flags.json");
    let mut document = flags("shared", "from-file");
    document["flags"]["only-file"] = document["flags"]["shared"].clone();
    write(&path, &document.to_string());
    let (memory, set) = Memory::new("memory", flags("shared", "from-memory"));
    let sources: Vec<Arc<dyn Source>> = vec![Arc::new(FileSource::new(path.to_str().unwrap(), NEVER)), memory.clone()];
    let options = LiveOptions {
        fractional: FractionalMode::V3,
        stale_after: Some(Duration::ZERO),
    };
    let live = Live::compose(sources, options).await;
    assert_eq!(
        value(&live, "shared"),
        Some(json!("from-memory")),
        "the later source wins"
    );
    let file = Selector::Source(path.to_str().unwrap().to_owned());
    assert_eq!(value_in(&live, "only-file", &file), Some(json!("from-file")));
    assert_eq!(value_in(&live, "shared", &file), None, "one flag per flag set and key");
    let mut changes = live.subscribe();
    let task = live.watch();
    let first = live.snapshot();

    set.send(Ok(flags("shared", "changed"))).unwrap();
    let published = next_published(&mut changes).await;
    assert_eq!(published.version, 1);
    assert_eq!(value(&live, "shared"), Some(json!("changed")));
    assert_eq!(
        value_in(&live, "shared", &Selector::Source("memory".into())),
        Some(json!("changed"))
    );
    assert!(
        Arc::ptr_eq(&first.compiled_sources()[0], &published.snapshot.compiled_sources()[0]),
        "the file source is not compiled again"
    );

    // The memory source fails: it keeps serving, and readiness names it.
    let loads = memory.loads.load(Ordering::Relaxed);
    set.send(Err("the store is unreachable".into())).unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while memory.loads.load(Ordering::Relaxed) == loads
        || matches!(state(&live.readiness(), "memory"), SourceState::Loaded)
    {
        assert!(tokio::time::Instant::now() < deadline, "the failure is noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let readiness = live.readiness();
    assert!(!readiness.is_ready(), "stale after zero seconds");
    assert_eq!(*state(&readiness, path.to_str().unwrap()), SourceState::Loaded);
    let body = readiness.to_string();
    assert!(body.starts_with("not ready\nsource memory: failing for "), "{body}");
    assert!(
        body.ends_with("s (serving its last good flags): the store is unreachable"),
        "{body}"
    );
    assert_eq!(value(&live, "shared"), Some(json!("changed")));
    assert_eq!(live.current().version, 1, "a failure publishes nothing");

    // Both change: each is followed on its own task; the versions follow the publishes.
    set.send(Ok(flags("shared", "again"))).unwrap();
    write(&path, &flags("other", "from-file").to_string());
    let mut seen = Vec::new();
    while value(&live, "shared") != Some(json!("again")) || value(&live, "other").is_none() {
        seen.push(next_published(&mut changes).await.version);
    }
    // A subscriber sees the newest version (a watch channel may skip one published in between);
    // each publish took the next version.
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    assert!(seen.iter().all(|v| (2..=3).contains(v)), "{seen:?}");
    assert_eq!(live.current().version, 3, "two publishes after version 1");
    assert!(live.readiness().is_ready());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_publish_each_version_once() {
    let (one, set_one) = Memory::new("one", flags("a", "0"));
    let (two, set_two) = Memory::new("two", flags("b", "0"));
    let options = LiveOptions {
        fractional: FractionalMode::V3,
        stale_after: None,
    };
    let live = Live::compose(vec![one, two], options).await;
    let mut changes = live.subscribe();
    let mut versions = Vec::new();
    for i in 1..=20 {
        set_one.send(Ok(flags("a", &i.to_string()))).unwrap();
        set_two.send(Ok(flags("b", &i.to_string()))).unwrap();
        let reloads = [live.reload(), live.reload(), live.reload()];
        let published = futures::future::join_all(reloads).await;
        assert_eq!(
            published.iter().filter(|p| **p).count(),
            1,
            "one publish for one change: {published:?}"
        );
        versions.push(changes.borrow_and_update().version);
        assert_eq!(value(&live, "a"), Some(json!(i.to_string())));
        assert_eq!(value(&live, "b"), Some(json!(i.to_string())));
    }
    assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
}

/// A source whose first change stream panics when polled (a bug in a source), and whose later
/// ones work.
#[derive(Debug)]
struct PanicsOnce {
    inner: Arc<Memory>,
    opened: AtomicUsize,
}

impl Source for PanicsOnce {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>> {
        self.inner.load()
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        if self.opened.fetch_add(1, Ordering::SeqCst) == 0 {
            return futures::stream::once(async { panic!("a bug in the change stream") }).boxed();
        }
        self.inner.changes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_watcher_that_panics_is_restarted() {
    let (memory, set) = Memory::new("flaky", flags("f", "0"));
    let source = Arc::new(PanicsOnce {
        inner: memory,
        opened: AtomicUsize::new(0),
    });
    let options = LiveOptions {
        fractional: FractionalMode::V3,
        stale_after: None,
    };
    let live = Live::compose(vec![source.clone() as Arc<dyn Source>], options).await;
    let mut changes = live.subscribe();
    let task = live.watch();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while source.opened.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the watcher is restarted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    set.send(Ok(flags("f", "1"))).unwrap();
    let published = next_published(&mut changes).await;
    assert_eq!(published.version, 1);
    assert_eq!(value(&live, "f"), Some(json!("1")), "the source is followed again");
    task.abort();
}
