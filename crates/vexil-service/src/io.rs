//! How the calls this process makes to the store and the config cache on its own go: the store
//! source's loads, version checks and catch-ups, its cache reads and writes, the outbox relay and
//! the tracker's writes. Each is timed and reported with its outcome to the process's
//! [`IoObserver`] (the server's metrics), if one is set ([`set_observer`]).
//!
//! One observer per process, like a metrics recorder or a tracing subscriber: the calls are made
//! deep inside long-lived tasks (the store source, the relay, the tracker's writer), and none of
//! them is on the evaluation path. The operations are a fixed set ([`StoreCall`], [`CacheCall`]):
//! safe as metric labels.

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vexil_cache::{CacheError, ConfigCache};
use vexil_store::StoreError;

/// A store call made in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreCall {
    /// Every environment's config version: the version check, and the start of every load.
    ConfigVersions,
    /// An environment read whole.
    Snapshot,
    /// An environment's changes since a version: catching up.
    History,
    /// The outbox rows to publish (the relay).
    PendingOutbox,
    /// Outbox rows marked published (the relay).
    MarkPublished,
    /// Old published outbox rows deleted (the relay).
    PruneOutbox,
    /// Tracked events and exposures written (the tracker's group commit).
    InsertEvents,
}

impl StoreCall {
    /// Every call, in a fixed order.
    pub const ALL: [StoreCall; 7] = [
        StoreCall::ConfigVersions,
        StoreCall::Snapshot,
        StoreCall::History,
        StoreCall::PendingOutbox,
        StoreCall::MarkPublished,
        StoreCall::PruneOutbox,
        StoreCall::InsertEvents,
    ];

    /// The store method's name: `config_versions`, `snapshot`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            StoreCall::ConfigVersions => "config_versions",
            StoreCall::Snapshot => "snapshot",
            StoreCall::History => "history",
            StoreCall::PendingOutbox => "pending_outbox",
            StoreCall::MarkPublished => "mark_published",
            StoreCall::PruneOutbox => "prune_outbox",
            StoreCall::InsertEvents => "insert_events",
        }
    }
}

/// A config cache call made in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheCall {
    /// Each environment's cached snapshot version: the version check.
    Versions,
    /// An environment's cached snapshot read (a replica starting).
    GetSnapshot,
    /// A settled snapshot written back.
    PutSnapshot,
    /// A stale snapshot removed.
    RemoveSnapshot,
    /// A change announced (the relay).
    Publish,
}

impl CacheCall {
    /// Every call, in a fixed order.
    pub const ALL: [CacheCall; 5] = [
        CacheCall::Versions,
        CacheCall::GetSnapshot,
        CacheCall::PutSnapshot,
        CacheCall::RemoveSnapshot,
        CacheCall::Publish,
    ];

    /// The cache method's name: `versions`, `get_snapshot`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            CacheCall::Versions => "versions",
            CacheCall::GetSnapshot => "get_snapshot",
            CacheCall::PutSnapshot => "put_snapshot",
            CacheCall::RemoveSnapshot => "remove_snapshot",
            CacheCall::Publish => "publish",
        }
    }
}

/// Told of every background store and cache call when it completes. Must not block.
pub trait IoObserver: Send + Sync + fmt::Debug {
    /// A store call took `took` and failed with `error`, or succeeded (`None`).
    fn store(&self, call: StoreCall, took: Duration, error: Option<&StoreError>);
    /// A call to the cache of `kind` ([`ConfigCache::kind`]) took `took` and failed with `error`,
    /// or succeeded (`None`).
    fn cache(&self, kind: &'static str, call: CacheCall, took: Duration, error: Option<&CacheError>);
}

static OBSERVER: OnceLock<Box<dyn IoObserver>> = OnceLock::new();

/// Sets the process's observer; `false` (and `observer` is dropped) if one was set already.
pub fn set_observer(observer: Box<dyn IoObserver>) -> bool {
    OBSERVER.set(observer).is_ok()
}

/// Runs a store call, timed.
pub(crate) async fn store<T>(
    call: StoreCall,
    future: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = future.await;
    if let Some(observer) = OBSERVER.get() {
        observer.store(call, started.elapsed(), result.as_ref().err());
    }
    result
}

/// Runs a call to `cache`, timed.
pub(crate) async fn cache<T>(
    cache: &dyn ConfigCache,
    call: CacheCall,
    future: impl Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    let started = Instant::now();
    let result = future.await;
    if let Some(observer) = OBSERVER.get() {
        observer.cache(cache.kind(), call, started.elapsed(), result.as_ref().err());
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vexil_cache::{Announcement, InProcess};
    use vexil_store::{Store, StoreError};

    use super::*;
    use crate::{Relay, Source, StoreSource};

    /// What it was told (tests of this crate run concurrently: each looks for its own calls).
    #[derive(Debug, Default)]
    struct Recorded {
        calls: Mutex<Vec<(&'static str, &'static str, bool)>>,
    }

    #[derive(Debug)]
    struct Recorder(Arc<Recorded>);

    impl IoObserver for Recorder {
        fn store(&self, call: StoreCall, _: Duration, error: Option<&StoreError>) {
            self.0
                .calls
                .lock()
                .unwrap()
                .push(("store", call.as_str(), error.is_none()));
        }
        fn cache(&self, kind: &'static str, call: CacheCall, _: Duration, error: Option<&CacheError>) {
            self.0
                .calls
                .lock()
                .unwrap()
                .push((kind, call.as_str(), error.is_none()));
        }
    }

    #[tokio::test]
    async fn background_calls_are_timed_with_their_outcome() {
        let recorded = Arc::new(Recorded::default());
        assert!(set_observer(Box::new(Recorder(recorded.clone()))));
        assert!(!set_observer(Box::new(Recorder(recorded.clone()))), "one per process");

        let file = vexil_testkit::sqlite();
        let store: Arc<dyn Store> = Arc::new(vexil_store::SqlStore::open(file.url()).await.unwrap());
        let source = StoreSource::new(store.clone(), "prod", Duration::from_secs(3600));
        source.load().await.unwrap();
        let relay = Relay::new(store.clone(), Arc::new(InProcess::new()));
        relay.relay(Duration::ZERO).await.unwrap();
        let bus = InProcess::new();
        let announcement = Announcement {
            environment: "prod".into(),
            config_version: 1,
        };
        cache(&bus, CacheCall::Publish, bus.publish(announcement))
            .await
            .unwrap();
        let failed = super::store::<()>(StoreCall::Snapshot, async {
            Err(StoreError::Unavailable("down".into()))
        })
        .await;
        assert!(failed.is_err());

        let calls = recorded.calls.lock().unwrap().clone();
        for expected in [
            ("store", "config_versions", true),
            ("store", "pending_outbox", true),
            ("in-process", "publish", true),
            ("store", "snapshot", false),
        ] {
            assert!(calls.contains(&expected), "{expected:?} not in {calls:?}");
        }
    }
}
