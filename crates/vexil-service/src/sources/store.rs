//! The managed store as a source: every environment's flag sets, one document each, served under
//! `flagSetId=<environment>/<flag set>`; those of the default environment also to requests without
//! a selector.
//!
//! How a change arrives, fastest first:
//! - a write by this process wakes the source at once ([`StoreSource::wake`]);
//! - a change message on the bus ([`ConfigCache::subscribe`]): the outbox relay of whichever
//!   replica wrote it announces "environment E is at version V";
//! - the version check, each poll interval: with a cache that holds snapshots (Redis), its
//!   version hash (which any replica that loaded a newer version has advanced), and the
//!   database's versions every [`DATABASE_CHECK_EVERY`] ticks or whenever the cache fails; without
//!   one, the database's each tick. This repairs a missed message (and is all there is while Redis
//!   is down).
//!
//! A load reads only the environments whose version moved. It reads the history since the version
//! held ([`Store::history`]); when only flags changed (the common write), the changed flags are
//! parsed on their own and put in place, so [`Live`](crate::Live) recompiles only those, and a
//! write to a flag set of ten thousand flags parses and compiles one. The versions read are kept
//! (the last [`RECENT_VERSIONS`]) for watchers that resume from a version ([`StoreSource::changes_after`]).
//!
//! An environment not held yet (at start) is read from the cache when it has it, then caught up
//! from the history; from the database otherwise. Once a version has been held for a poll
//! interval and the cache is behind, this replica writes it to the cache, so a starting replica
//! does not read the whole environment from the database.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use vexil_cache::{Announcement, CachedSnapshot, ConfigCache, Event, InProcess};
use vexil_core::parse::{self, Strictness};
use vexil_store::{Change, EntityKind, EnvironmentSnapshot, Store, VersionChanges};

use super::{LoadError, Loaded, Part, Source};
use crate::io::{self, CacheCall, StoreCall};

/// How many of an environment's latest versions' changes a source keeps for resuming watchers.
pub const RECENT_VERSIONS: usize = 256;

/// With a cache that holds snapshots, the database's versions are read every this many ticks of
/// the version check (the first tick included).
pub const DATABASE_CHECK_EVERY: u64 = 10;

/// The managed store, as one source of many documents.
#[derive(Debug)]
pub struct StoreSource {
    store: Arc<dyn Store>,
    cache: Arc<dyn ConfigCache>,
    default_environment: String,
    poll_interval: Duration,
    /// Per environment: what was last loaded.
    loaded: Arc<Mutex<HashMap<String, Environment>>>,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Environments read whole from the database.
    whole_loads: AtomicUsize,
    /// Environments read from the cache.
    cache_loads: AtomicUsize,
    /// Snapshots this source wrote to the cache.
    cache_writes: AtomicUsize,
}

/// One environment as last loaded.
#[derive(Debug, Clone)]
struct Environment {
    documents: Arc<EnvironmentSnapshot>,
    parts: Vec<Part>,
    /// The changes of the versions up to `documents.config_version`, oldest first, without gaps.
    recent: VecDeque<Arc<VersionChanges>>,
    /// When this version was loaded.
    at: Instant,
}

impl Environment {
    fn version(&self) -> i64 {
        self.documents.config_version
    }
}

/// The source's name, as `source=store` selects it.
pub const STORE_SOURCE: &str = "store";

impl StoreSource {
    /// The store's flag sets; `default_environment`'s are listed (seen without a selector). One
    /// replica: changes are announced in-process; see [`StoreSource::with_cache`].
    pub fn new(store: Arc<dyn Store>, default_environment: impl Into<String>, poll_interval: Duration) -> StoreSource {
        StoreSource {
            store,
            cache: Arc::new(InProcess::new()),
            default_environment: default_environment.into(),
            poll_interval,
            loaded: Arc::new(Mutex::new(HashMap::new())),
            wake: Arc::new(Notify::new()),
            counters: Arc::new(Counters::default()),
        }
    }

    /// Follows change messages of, and reads and writes snapshots in, `cache` (shared with the
    /// outbox relay).
    #[must_use]
    pub fn with_cache(mut self, cache: Arc<dyn ConfigCache>) -> StoreSource {
        self.cache = cache;
        self
    }

    /// The cache and bus this source follows.
    pub fn cache(&self) -> &Arc<dyn ConfigCache> {
        &self.cache
    }

    /// Checks for changes now rather than at the next poll (after a write by this process).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// An environment's flag sets as last loaded (what this server serves, or is about to), with
    /// its config version; `None` if the environment was not there.
    pub fn environment(&self, environment: &str) -> Option<Arc<EnvironmentSnapshot>> {
        lock(&self.loaded).get(environment).map(|e| e.documents.clone())
    }

    /// The changes of every version after `since` up to the one held, oldest first, if this source
    /// still has them all (`Some(empty)` when `since` is the version held or newer); `None` when it
    /// does not (the environment is unknown, or `since` is older than what it kept).
    pub fn changes_after(&self, environment: &str, since: i64) -> Option<Vec<Arc<VersionChanges>>> {
        let loaded = lock(&self.loaded);
        let held = loaded.get(environment)?;
        if since >= held.version() {
            return Some(Vec::new());
        }
        let first = held.recent.front()?.version;
        if since + 1 < first {
            return None;
        }
        Some(held.recent.iter().filter(|v| v.version > since).cloned().collect())
    }

    /// How many times an environment was read whole from the database (not caught up from the
    /// history, nor read from the cache).
    pub fn whole_loads(&self) -> usize {
        self.counters.whole_loads.load(Ordering::Relaxed)
    }

    /// How many times an environment was read from the cache.
    pub fn cache_loads(&self) -> usize {
        self.counters.cache_loads.load(Ordering::Relaxed)
    }

    /// How many snapshots this source wrote to the cache.
    pub fn cache_writes(&self) -> usize {
        self.counters.cache_writes.load(Ordering::Relaxed)
    }

    /// Every environment held, with the config version held, by key.
    pub fn versions(&self) -> Vec<(String, i64)> {
        let mut versions: Vec<(String, i64)> = lock(&self.loaded)
            .iter()
            .map(|(environment, held)| (environment.clone(), held.version()))
            .collect();
        versions.sort();
        versions
    }

    /// The default environment: the one requests without a selector see.
    pub fn default_environment(&self) -> &str {
        &self.default_environment
    }

    fn failed(e: vexil_store::StoreError) -> LoadError {
        LoadError::Other(Box::new(e))
    }

    async fn load_all(&self) -> Result<Loaded, LoadError> {
        let versions = io::store(StoreCall::ConfigVersions, self.store.config_versions())
            .await
            .map_err(Self::failed)?;
        let mut parts = Vec::new();
        let mut fresh = HashMap::with_capacity(versions.len());
        // The default environment last: on a key in no flag set, it wins over the others (none of
        // which a request without a selector sees anyway).
        let (default, others): (Vec<_>, Vec<_>) = versions
            .into_iter()
            .partition(|(env, _)| *env == self.default_environment);
        // What the cache has, asked once (and only if an environment is new here): a cache that is
        // down costs one timeout, not one per environment.
        let mut cached: Option<HashMap<String, i64>> = None;
        for (environment, version) in others.into_iter().chain(default) {
            let held = lock(&self.loaded).get(&environment).cloned();
            let loaded = match held {
                Some(hit) if hit.version() == version => hit,
                Some(older) => self.catch_up(&environment, older).await?,
                None => {
                    if cached.is_none() {
                        cached = Some(self.cached_versions().await);
                    }
                    let usable = cached
                        .as_ref()
                        .and_then(|c| c.get(&environment))
                        .is_some_and(|v| *v <= version);
                    self.first_load(&environment, usable).await?
                }
            };
            parts.extend(loaded.parts.iter().cloned());
            fresh.insert(environment, loaded);
        }
        *lock(&self.loaded) = fresh;
        Ok(Loaded { parts })
    }

    /// The cache's snapshot versions; none if it holds no snapshots or cannot be reached.
    async fn cached_versions(&self) -> HashMap<String, i64> {
        if !self.cache.holds_snapshots() {
            return HashMap::new();
        }
        match io::cache(&*self.cache, CacheCall::Versions, self.cache.versions()).await {
            Ok(versions) => versions,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the config cache: reading environments from the database");
                HashMap::new()
            }
        }
    }

    /// An environment this source does not hold: from the cache (when `cached`: it has a version
    /// not newer than the database's; a newer one belongs to an environment since deleted and
    /// created again) and the history since, or whole from the database.
    async fn first_load(&self, environment: &str, cached: bool) -> Result<Environment, LoadError> {
        if cached {
            match self.read_cached(environment).await {
                Ok(Some(cached)) => {
                    self.counters.cache_loads.fetch_add(1, Ordering::Relaxed);
                    return self.catch_up(environment, cached).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(environment, error = %e, "cannot read the cached snapshot, reading the database")
                }
            }
        }
        self.load_environment(environment).await
    }

    /// The cache's snapshot of `environment`, if it has one.
    async fn read_cached(&self, environment: &str) -> Result<Option<Environment>, LoadError> {
        let read = self.cache.get_snapshot(environment.to_owned());
        let cached = io::cache(&*self.cache, CacheCall::GetSnapshot, read)
            .await
            .map_err(|e| LoadError::Other(Box::new(e)))?;
        let Some(cached) = cached else {
            return Ok(None);
        };
        let listed = environment == self.default_environment;
        let environment = environment.to_owned();
        let decode = move || -> Result<Environment, LoadError> {
            let documents = decode(&cached.body).map_err(|e| LoadError::Other(e.into()))?;
            if documents.environment != environment || documents.config_version != cached.config_version {
                return Err(LoadError::Other(
                    format!("the cached snapshot of `{environment}` is not what its key says").into(),
                ));
            }
            parse_environment(Arc::new(documents), listed)
        };
        tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| LoadError::Other(Box::new(e)))?
            .map(Some)
    }

    /// Brings an environment held at an older version up to date from the history: in place when
    /// only flags changed, else read whole. Either way the versions read are kept for watchers.
    async fn catch_up(&self, environment: &str, older: Environment) -> Result<Environment, LoadError> {
        let read = self
            .store
            .history(environment.to_owned(), older.version(), RECENT_VERSIONS as u32);
        let history = io::store(StoreCall::History, read).await.map_err(Self::failed)?;
        let Some(versions) = history.versions.filter(|_| history.current >= older.version()) else {
            // Too far behind, or the environment was deleted and created again: read it whole.
            return self.load_environment(environment).await;
        };
        if versions.is_empty() {
            return Ok(older);
        }
        let versions: Vec<Arc<VersionChanges>> = versions.into_iter().map(Arc::new).collect();
        let flags_only = versions
            .iter()
            .all(|v| v.changes.iter().all(|c| c.kind == EntityKind::Flag));
        let mut caught_up = None;
        if flags_only {
            let (older, changes, current) = (older.clone(), collapse(&versions), history.current);
            let environment = environment.to_owned();
            let apply = move || apply_flag_changes(&environment, older, current, changes);
            caught_up = tokio::task::spawn_blocking(apply)
                .await
                .map_err(|e| LoadError::Other(Box::new(e)))?;
        }
        let mut loaded = match caught_up {
            Some(loaded) => loaded,
            None => self.load_environment(environment).await?,
        };
        if loaded.version() != history.current {
            // Written again meanwhile: the history read does not reach the version loaded.
            return Ok(loaded);
        }
        loaded.recent = older.recent;
        loaded.recent.extend(versions);
        while loaded.recent.len() > RECENT_VERSIONS {
            loaded.recent.pop_front();
        }
        Ok(loaded)
    }

    async fn load_environment(&self, environment: &str) -> Result<Environment, LoadError> {
        self.counters.whole_loads.fetch_add(1, Ordering::Relaxed);
        let snapshot = io::store(StoreCall::Snapshot, self.store.snapshot(environment.to_owned()))
            .await
            .map_err(Self::failed)?;
        let listed = environment == self.default_environment;
        tokio::task::spawn_blocking(move || parse_environment(Arc::new(snapshot), listed))
            .await
            .map_err(|e| LoadError::Other(Box::new(e)))?
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parses an environment's documents, one part per flag set.
fn parse_environment(documents: Arc<EnvironmentSnapshot>, listed: bool) -> Result<Environment, LoadError> {
    let parts = documents
        .flag_sets
        .iter()
        .map(|(set, document)| {
            let key = format!("{}/{set}", documents.environment);
            let parsed = parse::parse_value(document, Strictness::Flagd).map_err(|source| LoadError::Invalid {
                path: format!("{STORE_SOURCE}:{key}"),
                source,
            })?;
            Ok(Part { key, parsed, listed })
        })
        .collect::<Result<Vec<Part>, LoadError>>()?;
    Ok(Environment {
        documents,
        parts,
        recent: VecDeque::new(),
        at: Instant::now(),
    })
}

/// A snapshot as the cache holds it.
#[derive(Serialize)]
struct Encoded<'a> {
    environment: &'a str,
    config_version: i64,
    flag_sets: Vec<(&'a str, &'a Value)>,
}

#[derive(Deserialize)]
struct Decoded {
    environment: String,
    config_version: i64,
    flag_sets: Vec<(String, Value)>,
}

fn encode(snapshot: &EnvironmentSnapshot) -> bytes::Bytes {
    let encoded = Encoded {
        environment: &snapshot.environment,
        config_version: snapshot.config_version,
        flag_sets: snapshot.flag_sets.iter().map(|(k, d)| (k.as_str(), &**d)).collect(),
    };
    serde_json::to_vec(&encoded).expect("JSON values serialize").into()
}

fn decode(body: &[u8]) -> Result<EnvironmentSnapshot, serde_json::Error> {
    let decoded: Decoded = serde_json::from_slice(body)?;
    Ok(EnvironmentSnapshot {
        environment: decoded.environment,
        config_version: decoded.config_version,
        flag_sets: decoded.flag_sets.into_iter().map(|(k, d)| (k, Arc::new(d))).collect(),
    })
}

/// The last change of each entity over `versions`, in key order.
fn collapse(versions: &[Arc<VersionChanges>]) -> Vec<Change> {
    let mut last = BTreeMap::new();
    for change in versions.iter().flat_map(|v| &v.changes) {
        last.insert(
            (change.flag_set.clone(), change.kind, change.key.clone()),
            change.clone(),
        );
    }
    last.into_values().collect()
}

impl Source for StoreSource {
    fn name(&self) -> &str {
        STORE_SOURCE
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>> {
        self.load_all().boxed()
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let check = Check {
            store: self.store.clone(),
            cache: self.cache.clone(),
            loaded: self.loaded.clone(),
            wake: self.wake.clone(),
            counters: self.counters.clone(),
            settle: self.poll_interval,
            events: self.cache.subscribe(),
            ticker,
            ticks: 0,
        };
        stream::unfold(check, |mut check| async move {
            check.next().await;
            Some(((), check))
        })
        .boxed()
    }
}

/// The version check behind [`StoreSource::changes`].
struct Check {
    store: Arc<dyn Store>,
    cache: Arc<dyn ConfigCache>,
    loaded: Arc<Mutex<HashMap<String, Environment>>>,
    wake: Arc<Notify>,
    counters: Arc<Counters>,
    /// How long a loaded version is held before this replica writes it to the cache.
    settle: Duration,
    events: broadcast::Receiver<Event>,
    ticker: tokio::time::Interval,
    ticks: u64,
}

impl Check {
    /// Returns when the source should load again.
    async fn next(&mut self) {
        loop {
            // Cache entries that name versions this source does not hold: the database says which
            // are news and which are stale (an environment deleted, or created again).
            let mut suspects = HashMap::new();
            let database = tokio::select! {
                _ = self.ticker.tick() => {
                    self.ticks += 1;
                    match self.check_cache().await {
                        Some(differing) if !differing.is_empty() => {
                            suspects = differing;
                            true
                        }
                        // The cache agrees; the database now and then.
                        Some(_) => (self.ticks - 1).is_multiple_of(DATABASE_CHECK_EVERY),
                        // No cache, or it failed: the database.
                        None => true,
                    }
                }
                () = self.wake.notified() => true,
                event = self.events.recv() => match event {
                    Ok(Event::Announced(announcement)) => {
                        if self.differs(&announcement) {
                            return;
                        }
                        false
                    }
                    // A gap: messages may be lost.
                    Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        self.events = broadcast::channel(1).1;
                        false
                    }
                },
            };
            if !database {
                continue;
            }
            let Ok(versions) = io::store(StoreCall::ConfigVersions, self.store.config_versions()).await else {
                // Reported so the failing load shows in readiness.
                return;
            };
            for (environment, cached) in suspects {
                let current = versions.iter().find(|(env, _)| *env == environment).map(|(_, v)| *v);
                if current.is_none_or(|v| v < cached) {
                    // Stale: no replica would ever replace it (snapshots only move forward).
                    let remove = self.cache.remove_snapshot(environment);
                    let _ = io::cache(&*self.cache, CacheCall::RemoveSnapshot, remove).await;
                }
            }
            if !self.holds(&versions) {
                return;
            }
        }
    }

    /// Whether an announcement names a version this source does not hold.
    fn differs(&self, announcement: &Announcement) -> bool {
        lock(&self.loaded)
            .get(&announcement.environment)
            .is_none_or(|e| e.version() != announcement.config_version)
    }

    /// Whether the environments held are exactly these, at these versions.
    fn holds(&self, versions: &[(String, i64)]) -> bool {
        let loaded = lock(&self.loaded);
        loaded.len() == versions.len()
            && versions
                .iter()
                .all(|(env, version)| loaded.get(env).is_some_and(|e| e.version() == *version))
    }

    /// With a cache that holds snapshots: writes the versions this source holds (settled) and the
    /// cache is behind on, and returns the cache's entries that are newer than what this source
    /// holds or name an environment it does not hold (for the database to judge). `None` without
    /// such a cache, or when it fails.
    async fn check_cache(&mut self) -> Option<HashMap<String, i64>> {
        if !self.cache.holds_snapshots() {
            return None;
        }
        let cached = io::cache(&*self.cache, CacheCall::Versions, self.cache.versions())
            .await
            .ok()?;
        let (differing, to_write) = {
            let loaded = lock(&self.loaded);
            let differing: HashMap<String, i64> = cached
                .iter()
                .filter(|(env, version)| loaded.get(*env).is_none_or(|e| e.version() < **version))
                .map(|(env, version)| (env.clone(), *version))
                .collect();
            let to_write: Vec<Arc<EnvironmentSnapshot>> = loaded
                .iter()
                .filter(|(env, e)| cached.get(*env).is_none_or(|v| *v < e.version()) && e.at.elapsed() >= self.settle)
                .map(|(_, e)| e.documents.clone())
                .collect();
            (differing, to_write)
        };
        for documents in to_write {
            let environment = documents.environment.clone();
            let snapshot = CachedSnapshot {
                config_version: documents.config_version,
                body: tokio::task::spawn_blocking(move || encode(&documents)).await.ok()?,
            };
            let put = self.cache.put_snapshot(environment, snapshot);
            if io::cache(&*self.cache, CacheCall::PutSnapshot, put).await.ok()? {
                self.counters.cache_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(differing)
    }
}

/// `older` with flag changes applied (see [`StoreSource::catch_up`]) at `version`; `None` if a
/// change is not in a flag set `older` has, or a changed flag does not parse on its own.
fn apply_flag_changes(
    environment: &str,
    older: Environment,
    version: i64,
    changes: Vec<Change>,
) -> Option<Environment> {
    let mut documents = (*older.documents).clone();
    let mut parts = older.parts;
    for change in changes {
        let index = documents
            .flag_sets
            .iter()
            .position(|(set, _)| *set == change.flag_set)?;
        let part_key = format!("{environment}/{}", change.flag_set);
        let part = parts.iter_mut().find(|p| p.key == part_key)?;
        let document = Arc::make_mut(&mut documents.flag_sets[index].1);
        let flags = &mut part.parsed.config.flags;
        let at = flags.binary_search_by(|f| f.key.as_str().cmp(&change.key));
        match change.after.as_ref().and_then(|body| body.get("definition")) {
            Some(definition) => {
                // The flag alone, with its set's evaluators, metadata and experiments (the one on
                // this flag attaches to it; the others name flags not in `alone` and are left
                // out): parsed as in the whole document (the store validated it before it
                // committed).
                let mut alone = serde_json::Map::new();
                alone.insert("flags".into(), serde_json::json!({ change.key.clone(): definition }));
                if let Some(experiments) = document.get("$experiments").and_then(|e| e.as_object()) {
                    let own: serde_json::Map<_, _> = experiments
                        .iter()
                        .filter(|(_, e)| e.get("flag").and_then(|f| f.as_str()) == Some(change.key.as_str()))
                        .map(|(k, e)| (k.clone(), e.clone()))
                        .collect();
                    if !own.is_empty() {
                        alone.insert("$experiments".into(), serde_json::Value::Object(own));
                    }
                }
                for field in ["$evaluators", "metadata"] {
                    if let Some(value) = document.get(field) {
                        alone.insert(field.into(), value.clone());
                    }
                }
                let parsed = parse::parse_value(&serde_json::Value::Object(alone), Strictness::Flagd).ok()?;
                let flag = parsed.config.flags.into_iter().next()?;
                match at {
                    Ok(i) => flags[i] = flag,
                    Err(i) => flags.insert(i, flag),
                }
                document
                    .get_mut("flags")?
                    .as_object_mut()?
                    .insert(change.key, definition.clone());
            }
            None => {
                if let Ok(i) = at {
                    flags.remove(i);
                }
                document.get_mut("flags")?.as_object_mut()?.remove(&change.key);
            }
        }
    }
    documents.config_version = version;
    Some(Environment {
        documents: Arc::new(documents),
        parts,
        recent: VecDeque::new(),
        at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_survives_the_cache_encoding() {
        let snapshot = EnvironmentSnapshot {
            environment: "prod".into(),
            config_version: 7,
            flag_sets: vec![
                ("a".into(), Arc::new(serde_json::json!({"flags": {}}))),
                (
                    "b".into(),
                    Arc::new(serde_json::json!({"flags": {"x": {"state": "ENABLED"}}})),
                ),
            ],
        };
        assert_eq!(decode(&encode(&snapshot)).unwrap(), snapshot);
    }

    #[test]
    fn collapse_keeps_each_entity_s_last_change() {
        let change = |key: &str, after: Option<i64>| Change {
            flag_set: "s".into(),
            kind: EntityKind::Flag,
            key: key.into(),
            before: None,
            after: after.map(Value::from),
        };
        let versions = [
            Arc::new(VersionChanges {
                version: 2,
                changes: vec![change("a", Some(1)), change("b", Some(1))],
            }),
            Arc::new(VersionChanges {
                version: 3,
                changes: vec![change("a", None)],
            }),
        ];
        assert_eq!(collapse(&versions), [change("a", None), change("b", Some(1))]);
    }
}
