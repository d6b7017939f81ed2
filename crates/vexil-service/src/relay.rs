//! The outbox relay: announces committed config versions on the bus.
//!
//! Every write's transaction adds an outbox row naming the environment and its new version; the
//! relay publishes pending rows ([`ConfigCache::publish`]) and then marks them published. A row is
//! marked only after its message went out, so a crash between commit and publish (of this
//! process, or of the bus) loses nothing: the row stays pending and is published later, by this
//! replica once it runs again or the bus is back, or by any other replica's relay.
//!
//! The writer's own relay is woken right after its commit ([`Relay::wake`]) and publishes at once;
//! every relay also sweeps, each interval, rows older than a grace period (those whose writer
//! died before publishing). A row published twice is harmless: an announcement is idempotent.
//! Published rows are deleted after [`OUTBOX_RETENTION`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use vexil_cache::{Announcement, ConfigCache};
use vexil_store::Store;

use crate::io::{self, CacheCall, StoreCall};

/// How old a pending row must be before a relay that did not write it publishes it.
pub const RELAY_GRACE: Duration = Duration::from_secs(2);

/// Rows published per round trip.
const BATCH: u32 = 100;

/// Published rows are kept this long (for inspection), then deleted.
pub const OUTBOX_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How often a relay deletes old published rows.
const PRUNE_EVERY: Duration = Duration::from_secs(10 * 60);

/// The relay of one replica.
#[derive(Debug)]
pub struct Relay {
    store: Arc<dyn Store>,
    cache: Arc<dyn ConfigCache>,
    wake: Notify,
    published: AtomicU64,
}

impl Relay {
    /// A relay from `store`'s outbox to `cache`'s bus; [`Relay::run`] it.
    pub fn new(store: Arc<dyn Store>, cache: Arc<dyn ConfigCache>) -> Arc<Relay> {
        Arc::new(Relay {
            store,
            cache,
            wake: Notify::new(),
            published: AtomicU64::new(0),
        })
    }

    /// This process committed a write: publish now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Outbox rows this relay has published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Relays until the task is dropped: at once when woken, and every `interval` for rows older
    /// than [`RELAY_GRACE`].
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut pruned = tokio::time::Instant::now();
        loop {
            let min_age = tokio::select! {
                _ = ticker.tick() => RELAY_GRACE,
                () = self.wake.notified() => Duration::ZERO,
            };
            match self.relay(min_age).await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("outbox relay publishing again");
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "outbox relay cannot publish; pending changes stay in the outbox and are retried");
                }
                Err(_) => {}
            }
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = tokio::time::Instant::now();
                let prune = self.store.prune_outbox(OUTBOX_RETENTION);
                if let Err(error) = io::store(StoreCall::PruneOutbox, prune).await {
                    tracing::debug!(%error, "cannot prune the outbox");
                }
            }
        }
    }

    /// Publishes every pending row at least `min_age` old; how many were published.
    pub async fn relay(&self, min_age: Duration) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut total = 0;
        loop {
            let pending = io::store(StoreCall::PendingOutbox, self.store.pending_outbox(BATCH, min_age)).await?;
            if pending.is_empty() {
                return Ok(total);
            }
            let mut sent = Vec::with_capacity(pending.len());
            let mut failed = None;
            for entry in &pending {
                let announcement = Announcement {
                    environment: entry.environment.clone(),
                    config_version: entry.config_version,
                };
                match io::cache(&*self.cache, CacheCall::Publish, self.cache.publish(announcement)).await {
                    Ok(()) => sent.push(entry.id),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            total += sent.len();
            self.published.fetch_add(sent.len() as u64, Ordering::Relaxed);
            let more = sent.len() == BATCH as usize;
            if !sent.is_empty() {
                io::store(StoreCall::MarkPublished, self.store.mark_published(sent)).await?;
            }
            if let Some(e) = failed {
                return Err(Box::new(e));
            }
            if !more {
                return Ok(total);
            }
        }
    }
}
