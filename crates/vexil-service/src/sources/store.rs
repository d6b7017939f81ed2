//! The managed store as a source: every environment's flag sets, one document each, served under
//! `flagSetId=<environment>/<flag set>`; those of the default environment also to requests without
//! a selector.
//!
//! Changes are found by a version check: every environment's config version is read each poll
//! interval (one small query) and a load follows when one moved; a write made by this process
//! wakes the check at once ([`StoreSource::wake`]). A load reads only the environments whose
//! version moved; the others keep their documents, so [`Live`](crate::Live) recompiles nothing of
//! theirs. When only flags changed (the common write), even that environment is not read again:
//! the store's history gives the changed flags, which are parsed on their own and put in place, so
//! a write to a flag set of ten thousand flags parses and compiles one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt as _};
use tokio::sync::Notify;
use vexil_core::parse::{self, Strictness};
use vexil_store::{Change, EntityKind, EnvironmentSnapshot, Store};

use super::{LoadError, Loaded, Part, Source};

/// The managed store, as one source of many documents.
#[derive(Debug)]
pub struct StoreSource {
    store: Arc<dyn Store>,
    default_environment: String,
    poll_interval: Duration,
    /// Per environment: its documents as last loaded, as JSON and parsed.
    loaded: Mutex<HashMap<String, Environment>>,
    wake: Arc<Notify>,
    /// Environments read whole so far (the rest were caught up from the history).
    whole_loads: AtomicUsize,
}

/// One environment as last loaded.
#[derive(Debug, Clone)]
struct Environment {
    documents: Arc<EnvironmentSnapshot>,
    parts: Vec<Part>,
}

/// The source's name, as `source=store` selects it.
pub const STORE_SOURCE: &str = "store";

impl StoreSource {
    /// The store's flag sets; `default_environment`'s are listed (seen without a selector).
    pub fn new(store: Arc<dyn Store>, default_environment: impl Into<String>, poll_interval: Duration) -> StoreSource {
        StoreSource {
            store,
            default_environment: default_environment.into(),
            poll_interval,
            loaded: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            whole_loads: AtomicUsize::new(0),
        }
    }

    /// Checks for changes now rather than at the next poll (after a write by this process).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// An environment's flag sets as last loaded (what this server serves, or is about to), with
    /// its config version; `None` if the environment was not there.
    pub fn environment(&self, environment: &str) -> Option<Arc<EnvironmentSnapshot>> {
        let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.get(environment).map(|e| e.documents.clone())
    }

    /// How many times an environment was read whole (not caught up from the history).
    pub fn whole_loads(&self) -> usize {
        self.whole_loads.load(Ordering::Relaxed)
    }

    /// The default environment: the one requests without a selector see.
    pub fn default_environment(&self) -> &str {
        &self.default_environment
    }

    fn failed(e: vexil_store::StoreError) -> LoadError {
        LoadError::Other(Box::new(e))
    }

    async fn load_all(&self) -> Result<Loaded, LoadError> {
        let versions = self.store.config_versions().await.map_err(Self::failed)?;
        let mut parts = Vec::new();
        let mut fresh = HashMap::with_capacity(versions.len());
        // The default environment last: on a key in no flag set, it wins over the others (none of
        // which a request without a selector sees anyway).
        let (default, others): (Vec<_>, Vec<_>) = versions
            .into_iter()
            .partition(|(env, _)| *env == self.default_environment);
        for (environment, version) in others.into_iter().chain(default) {
            let cached = {
                let loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
                loaded.get(&environment).cloned()
            };
            let loaded = match cached {
                Some(hit) if hit.documents.config_version == version => hit,
                Some(older) => match self.catch_up(&environment, &older).await? {
                    Some(caught_up) => caught_up,
                    None => self.load_environment(&environment).await?,
                },
                None => self.load_environment(&environment).await?,
            };
            parts.extend(loaded.parts.iter().cloned());
            fresh.insert(environment, loaded);
        }
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(Loaded { parts })
    }

    /// Brings an environment loaded at an older version up to date from what changed since, when
    /// only flags changed (the common write): the changed flags are parsed on their own and put in
    /// place, every other flag keeps its parsed definition (so Live compiles only the changed
    /// ones). `None` when something else changed (a segment, a flag set): load it whole.
    async fn catch_up(&self, environment: &str, older: &Environment) -> Result<Option<Environment>, LoadError> {
        let since = older.documents.config_version;
        let (version, changes) = self
            .store
            .changes_since(environment.to_owned(), since)
            .await
            .map_err(Self::failed)?;
        if changes.iter().any(|c| c.kind != EntityKind::Flag) {
            return Ok(None);
        }
        let older = older.clone();
        let environment = environment.to_owned();
        let apply = move || apply_flag_changes(&environment, older, version, changes);
        tokio::task::spawn_blocking(apply)
            .await
            .map_err(|e| LoadError::Other(Box::new(e)))
    }

    async fn load_environment(&self, environment: &str) -> Result<Environment, LoadError> {
        self.whole_loads.fetch_add(1, Ordering::Relaxed);
        let snapshot = self
            .store
            .snapshot(environment.to_owned())
            .await
            .map_err(Self::failed)?;
        let documents = Arc::new(snapshot);
        let listed = environment == self.default_environment;
        let shared = documents.clone();
        let parse = move || {
            shared
                .flag_sets
                .iter()
                .map(|(set, document)| {
                    let key = format!("{}/{set}", shared.environment);
                    let parsed =
                        parse::parse_value(document, Strictness::Flagd).map_err(|source| LoadError::Invalid {
                            path: format!("{STORE_SOURCE}:{key}"),
                            source,
                        })?;
                    Ok(Part { key, parsed, listed })
                })
                .collect::<Result<Vec<Part>, LoadError>>()
        };
        let parts = tokio::task::spawn_blocking(parse)
            .await
            .map_err(|e| LoadError::Other(Box::new(e)))??;
        Ok(Environment { documents, parts })
    }
}

impl Source for StoreSource {
    fn name(&self) -> &str {
        STORE_SOURCE
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, LoadError>> {
        self.load_all().boxed()
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let store = self.store.clone();
        let wake = self.wake.clone();
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // `None`: not checked yet, so the first check reports (a change since the last load is
        // not missed); an error reports too, so the failing load shows in readiness.
        let state = (store, wake, ticker, None::<Vec<(String, i64)>>);
        stream::unfold(state, |(store, wake, mut ticker, mut seen)| async move {
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = wake.notified() => {}
                }
                match store.config_versions().await {
                    Ok(versions) if seen.as_ref() == Some(&versions) => continue,
                    Ok(versions) => seen = Some(versions),
                    Err(_) => seen = None,
                }
                return Some(((), (store, wake, ticker, seen)));
            }
        })
        .boxed()
    }
}

/// `older` with flag changes applied (see [`StoreSource::catch_up`]); `None` if a change is not in
/// a flag set `older` has, or a changed flag does not parse on its own.
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
                // The flag alone, with its set's evaluators and metadata: parsed as in the whole
                // document (the store validated it before it committed).
                let mut alone = serde_json::Map::new();
                alone.insert("flags".into(), serde_json::json!({ change.key.clone(): definition }));
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
    })
}
