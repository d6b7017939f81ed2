//! Vexil's config snapshot cache and change bus, behind one trait ([`ConfigCache`]).
//!
//! Replicas that share a database learn about each other's writes here: the outbox relay of the
//! replica that finds a committed change [publishes](ConfigCache::publish) an [`Announcement`]
//! ("environment E is at config version V"), and every replica (the writer included)
//! [subscribes](ConfigCache::subscribe) and loads the change. The cache also keeps each
//! environment's latest published snapshot, so a starting replica reads it in one round trip
//! instead of querying the database, and a cheap [`versions`](ConfigCache::versions) check
//! repairs a missed message.
//!
//! Two implementations:
//! - [`RedisCache`]: Redis pub/sub and keys, on the redis crate's connection manager (reconnects
//!   with backoff and subscribes again after a reconnect). For replicas.
//! - [`InProcess`]: a broadcast channel inside the process, and no snapshot cache. For one
//!   replica (the default without `--redis-url`).
//!
//! Nothing here is on the evaluation path: a cache that is down makes replicas fall back to the
//! database's version check, never stops them serving.

mod in_process;
mod redis;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use in_process::InProcess;
pub use redis::RedisCache;

/// "`environment` is at config version `config_version`": what a change message says. Idempotent:
/// receiving it twice, or after a newer one, changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Announcement {
    /// The environment's key.
    pub environment: String,
    /// Its newest config version.
    pub config_version: i64,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A change message.
    Announced(Announcement),
    /// The subscription was (re)established after a gap (a reconnect, or this subscriber fell
    /// behind): messages may have been missed, check versions.
    Resync,
}

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// What the cache holds is not what Vexil wrote.
    #[error("cache entry `{key}` is malformed: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// A snapshot as the cache holds it: the environment's config version and its documents, encoded
/// by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSnapshot {
    /// The config version the body is at.
    pub config_version: i64,
    /// The encoded snapshot.
    pub body: Bytes,
}

/// The cache and bus. Shared (`Arc<dyn ConfigCache>`) by the relay, the store source and the
/// health reports; every method may run concurrently with any other and none blocks for long
/// (a Redis that is down fails each call after the connection timeout).
pub trait ConfigCache: Send + Sync + fmt::Debug {
    /// `"redis"` or `"in-process"`: how readiness, logs and metrics name it.
    fn kind(&self) -> &'static str;

    /// Whether snapshots are kept (Redis); without, `versions` is empty, `get_snapshot` finds
    /// nothing and `put_snapshot` stores nothing.
    fn holds_snapshots(&self) -> bool;

    /// Announces a change to every subscriber of every replica.
    fn publish(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), CacheError>>;

    /// Change messages from now on, with [`Event::Resync`] after any gap.
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    /// Each environment's cached snapshot version (empty if the cache holds none).
    fn versions(&self) -> BoxFuture<'_, Result<HashMap<String, i64>, CacheError>>;

    /// An environment's latest cached snapshot, if any.
    fn get_snapshot(&self, environment: String) -> BoxFuture<'_, Result<Option<CachedSnapshot>, CacheError>>;

    /// Caches a snapshot unless one at the same or a newer version is there; `true` if stored.
    fn put_snapshot(&self, environment: String, snapshot: CachedSnapshot) -> BoxFuture<'_, Result<bool, CacheError>>;

    /// Forgets a deleted environment's snapshot.
    fn remove_snapshot(&self, environment: String) -> BoxFuture<'_, Result<(), CacheError>>;

    /// Whether the cache answered its last call, and its counters.
    fn health(&self) -> Health;
}

/// How a cache is doing: for readiness detail, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the last call succeeded (and, for Redis, the subscription is in place).
    pub up: bool,
    /// The last error, while down.
    pub error: Option<String>,
    /// Change messages received.
    pub received: u64,
    /// Change messages published.
    pub published: u64,
}

/// Health bookkeeping shared by the implementations.
#[derive(Debug, Default)]
pub(crate) struct Status {
    up: AtomicBool,
    error: std::sync::Mutex<Option<String>>,
    received: AtomicU64,
    published: AtomicU64,
}

impl Status {
    pub(crate) fn up() -> Arc<Status> {
        let status = Status::default();
        status.up.store(true, Ordering::Relaxed);
        Arc::new(status)
    }

    pub(crate) fn down() -> Arc<Status> {
        Arc::new(Status::default())
    }

    /// Records a call's outcome; logs the transitions (not every failure).
    pub(crate) fn record<T>(&self, result: &Result<T, CacheError>) {
        match result {
            Ok(_) => self.set_up(),
            Err(e) => self.set_down(e.to_string()),
        }
    }

    pub(crate) fn set_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("config cache reachable again");
        }
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn set_down(&self, error: String) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, "config cache unreachable: replicas fall back to the database's version check");
        }
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn health(&self) -> Health {
        Health {
            up: self.up.load(Ordering::Relaxed),
            error: self.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            received: self.received.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
        }
    }
}

/// How many events a slow subscriber may fall behind by before it gets [`Event::Resync`].
pub(crate) const SUBSCRIBER_BUFFER: usize = 1024;
