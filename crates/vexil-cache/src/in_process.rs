//! One replica: the bus is a broadcast channel, and there is no snapshot cache (the replica's own
//! memory is the only copy worth having).

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::broadcast;

use crate::{Announcement, CacheError, CachedSnapshot, ConfigCache, Event, Health, SUBSCRIBER_BUFFER, Status};

/// The bus of a single replica.
#[derive(Debug)]
pub struct InProcess {
    events: broadcast::Sender<Event>,
    status: Arc<Status>,
}

impl InProcess {
    /// A bus with no subscribers yet.
    pub fn new() -> InProcess {
        InProcess {
            events: broadcast::channel(SUBSCRIBER_BUFFER).0,
            status: Status::up(),
        }
    }
}

impl Default for InProcess {
    fn default() -> Self {
        InProcess::new()
    }
}

impl ConfigCache for InProcess {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    fn holds_snapshots(&self) -> bool {
        false
    }

    fn publish(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), CacheError>> {
        self.status.published();
        // No subscriber is not an error: nobody is listening yet.
        if self.events.send(Event::Announced(announcement)).is_ok() {
            self.status.received();
        }
        futures::future::ready(Ok(())).boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn versions(&self) -> BoxFuture<'_, Result<HashMap<String, i64>, CacheError>> {
        futures::future::ready(Ok(HashMap::new())).boxed()
    }

    fn get_snapshot(&self, _environment: String) -> BoxFuture<'_, Result<Option<CachedSnapshot>, CacheError>> {
        futures::future::ready(Ok(None)).boxed()
    }

    fn put_snapshot(&self, _environment: String, _snapshot: CachedSnapshot) -> BoxFuture<'_, Result<bool, CacheError>> {
        futures::future::ready(Ok(false)).boxed()
    }

    fn remove_snapshot(&self, _environment: String) -> BoxFuture<'_, Result<(), CacheError>> {
        futures::future::ready(Ok(())).boxed()
    }

    fn health(&self) -> Health {
        self.status.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishes_to_every_subscriber_and_caches_nothing() {
        let bus = InProcess::new();
        let (mut a, mut b) = (bus.subscribe(), bus.subscribe());
        let announced = Announcement {
            environment: "prod".into(),
            config_version: 3,
        };
        bus.publish(announced.clone()).await.unwrap();
        assert_eq!(a.recv().await.unwrap(), Event::Announced(announced.clone()));
        assert_eq!(b.recv().await.unwrap(), Event::Announced(announced));
        let snapshot = CachedSnapshot {
            config_version: 3,
            body: "{}".into(),
        };
        assert!(!bus.put_snapshot("prod".into(), snapshot).await.unwrap());
        assert_eq!(bus.get_snapshot("prod".into()).await.unwrap(), None);
        assert!(bus.versions().await.unwrap().is_empty());
        assert_eq!(bus.health().published, 1);
    }
}
