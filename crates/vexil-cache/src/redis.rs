//! Redis: change messages on a pub/sub channel, snapshots in keys.
//!
//! Layout, under a prefix (`vexil:` by default, so deployments can share a server):
//! - `<prefix>changes`: the pub/sub channel; each message is an [`Announcement`] as JSON.
//! - `<prefix>versions`: a hash, environment → config version of its cached snapshot.
//! - `<prefix>snapshot:<environment>:<version>`: the snapshot's body. The one the hash names is
//!   kept; the one it replaced expires after a minute (a reader that just read the old version
//!   from the hash still finds it).
//!
//! One connection manager carries commands and the subscription (RESP3 push messages): it
//! reconnects with backoff after the connection drops and subscribes again, and every reconnect
//! is reported to subscribers as [`Event::Resync`] (messages published meanwhile were lost).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands as _, IntoConnectionInfo as _, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::{broadcast, mpsc};

use crate::{Announcement, CacheError, CachedSnapshot, ConfigCache, Event, Health, SUBSCRIBER_BUFFER, Status};

/// How long a replaced snapshot stays readable.
const REPLACED_TTL_SECONDS: i64 = 60;

/// Stores a snapshot if it is newer than the cached one: KEYS = versions hash, new snapshot key,
/// old snapshot key prefix; ARGV = environment, version, body.
const PUT_SNAPSHOT: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
local version = tonumber(ARGV[2])
if current >= version then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
if current >= 0 then redis.call('EXPIRE', KEYS[3] .. current, ARGV[4]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Reads the cached snapshot named by the versions hash: KEYS = versions hash, snapshot key prefix;
/// ARGV = environment. Returns {version, body} or nil.
const GET_SNAPSHOT: &str = r"
local version = redis.call('HGET', KEYS[1], ARGV[1])
if not version then return nil end
local body = redis.call('GET', KEYS[2] .. version)
if not body then return nil end
return {version, body}
";

/// Removes an environment's snapshot: KEYS = versions hash, snapshot key prefix; ARGV = environment.
const REMOVE_SNAPSHOT: &str = r"
local version = redis.call('HGET', KEYS[1], ARGV[1])
if version then redis.call('DEL', KEYS[2] .. version) end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
";

/// Redis as cache and bus.
pub struct RedisCache {
    connection: ConnectionManager,
    prefix: String,
    events: broadcast::Sender<Event>,
    status: Arc<Status>,
    put: Script,
    get: Script,
    remove: Script,
    /// Ends the subscription's background tasks when the cache is dropped.
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("status", &self.status.health())
            .finish_non_exhaustive()
    }
}

struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl RedisCache {
    /// A cache on the Redis server at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://…` for TLS, verified against the system's roots), its keys and channel under
    /// `prefix`. Does not wait for the server: a Redis that is down at start makes the cache report
    /// down, and it connects (and subscribes) once the server is there. Fails only on a malformed
    /// URL. Must be called within a Tokio runtime.
    pub fn connect(url: &str, prefix: &str) -> Result<RedisCache, CacheError> {
        RedisCache::connect_with_roots(url, prefix, None)
    }

    /// As [`RedisCache::connect`], a `rediss://` server's certificate verified against
    /// `root_cert` (PEM: a private CA, or the server's own self-signed certificate) instead of the
    /// system's roots.
    pub fn connect_with_roots(url: &str, prefix: &str, root_cert: Option<&[u8]>) -> Result<RedisCache, CacheError> {
        let info = url.into_connection_info()?;
        let redis_settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(redis_settings);
        // redis's TLS asks rustls for the process's crypto provider; with more than one compiled
        // in (the workspace has ring and aws-lc-rs), none is chosen by itself: choose ring, as
        // Vexil's own listeners do (a provider installed before stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match root_cert {
            Some(pem) => {
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                };
                redis::Client::build_with_tls(info, certificates)?
            }
            None => redis::Client::open(info)?,
        };
        let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2))
            // A call to a Redis that is down fails fast (the version check falls back to the
            // database); the next call, at the next tick, tries to connect again.
            .set_number_of_retries(2)
            .set_push_sender(push_tx)
            .set_automatic_resubscription();
        let connection = ConnectionManager::new_lazy_with_config(client, config)?;
        let events = broadcast::channel(SUBSCRIBER_BUFFER).0;
        let status = Status::down();
        let channel = format!("{prefix}changes");
        let subscriber = tokio::spawn(subscribe(connection.clone(), channel.clone(), status.clone()));
        let forwarder = tokio::spawn(forward(push_rx, channel, events.clone(), status.clone()));
        Ok(RedisCache {
            connection,
            prefix: prefix.to_owned(),
            events,
            status,
            put: Script::new(PUT_SNAPSHOT),
            get: Script::new(GET_SNAPSHOT),
            remove: Script::new(REMOVE_SNAPSHOT),
            _tasks: Arc::new(Tasks(vec![subscriber, forwarder])),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn recorded<T>(&self, result: Result<T, CacheError>) -> Result<T, CacheError> {
        self.status.record(&result);
        result
    }
}

/// Subscribes once the server answers; afterwards the connection manager subscribes again after
/// each reconnect by itself.
async fn subscribe(mut connection: ConnectionManager, channel: String, status: Arc<Status>) {
    let mut delay = Duration::from_millis(50);
    loop {
        match connection.subscribe(&channel).await {
            Ok(()) => return,
            Err(e) => status.set_down(e.to_string()),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Turns push messages into events: messages on our channel into announcements, a (re)subscribe
/// into [`Event::Resync`], a disconnect into "down".
async fn forward(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    channel: String,
    events: broadcast::Sender<Event>,
    status: Arc<Status>,
) {
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::Message => {
                let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice() else {
                    continue;
                };
                if name.as_slice() != channel.as_bytes() {
                    continue;
                }
                match serde_json::from_slice::<Announcement>(payload) {
                    Ok(announcement) => {
                        status.received();
                        let _ = events.send(Event::Announced(announcement));
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed change message"),
                }
            }
            PushKind::Subscribe => {
                status.set_up();
                let _ = events.send(Event::Resync);
            }
            PushKind::Disconnection => status.set_down("connection lost".into()),
            _ => {}
        }
    }
}

impl ConfigCache for RedisCache {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn holds_snapshots(&self) -> bool {
        true
    }

    fn publish(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), CacheError>> {
        async move {
            let payload = serde_json::to_string(&announcement).expect("an announcement serializes");
            let mut connection = self.connection.clone();
            let result: Result<i64, _> = connection.publish(self.key("changes"), payload).await;
            let result = self.recorded(result.map_err(CacheError::from));
            if result.is_ok() {
                self.status.published();
            }
            result.map(drop)
        }
        .boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn versions(&self) -> BoxFuture<'_, Result<HashMap<String, i64>, CacheError>> {
        async move {
            let mut connection = self.connection.clone();
            let result = connection.hgetall(self.key("versions")).await;
            self.recorded(result.map_err(CacheError::from))
        }
        .boxed()
    }

    fn get_snapshot(&self, environment: String) -> BoxFuture<'_, Result<Option<CachedSnapshot>, CacheError>> {
        async move {
            let mut connection = self.connection.clone();
            let result: Result<Option<(i64, Vec<u8>)>, _> = self
                .get
                .key(self.key("versions"))
                .key(self.key(&format!("snapshot:{environment}:")))
                .arg(&environment)
                .invoke_async(&mut connection)
                .await;
            let result = self.recorded(result.map_err(CacheError::from))?;
            Ok(result.map(|(config_version, body)| CachedSnapshot {
                config_version,
                body: body.into(),
            }))
        }
        .boxed()
    }

    fn put_snapshot(&self, environment: String, snapshot: CachedSnapshot) -> BoxFuture<'_, Result<bool, CacheError>> {
        async move {
            let mut connection = self.connection.clone();
            let old = self.key(&format!("snapshot:{environment}:"));
            let result: Result<i64, _> = self
                .put
                .key(self.key("versions"))
                .key(format!("{old}{}", snapshot.config_version))
                .key(old)
                .arg(&environment)
                .arg(snapshot.config_version)
                .arg(snapshot.body.as_ref())
                .arg(REPLACED_TTL_SECONDS)
                .invoke_async(&mut connection)
                .await;
            Ok(self.recorded(result.map_err(CacheError::from))? == 1)
        }
        .boxed()
    }

    fn remove_snapshot(&self, environment: String) -> BoxFuture<'_, Result<(), CacheError>> {
        async move {
            let mut connection = self.connection.clone();
            let result: Result<i64, _> = self
                .remove
                .key(self.key("versions"))
                .key(self.key(&format!("snapshot:{environment}:")))
                .arg(&environment)
                .invoke_async(&mut connection)
                .await;
            self.recorded(result.map_err(CacheError::from)).map(drop)
        }
        .boxed()
    }

    fn health(&self) -> Health {
        self.status.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next_announcement(events: &mut broadcast::Receiver<Event>) -> Announcement {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(Event::Announced(a)) => return a,
                    Ok(Event::Resync) => continue,
                    Err(e) => panic!("subscription ended: {e}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("an announcement within 10 s")
    }

    async fn until_up(cache: &RedisCache) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cache.health().up {
            assert!(
                tokio::time::Instant::now() < deadline,
                "cache not up: {:?}",
                cache.health()
            );
            let _ = cache.versions().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn announcement(environment: &str, config_version: i64) -> Announcement {
        Announcement {
            environment: environment.into(),
            config_version,
        }
    }

    #[tokio::test]
    async fn announcements_reach_every_replica_and_resume_after_a_restart() {
        let server = vexil_testkit::redis();
        let (a, b) = (
            RedisCache::connect(server.url(), "vexil:").unwrap(),
            RedisCache::connect(server.url(), "vexil:").unwrap(),
        );
        let other = RedisCache::connect(server.url(), "other:").unwrap();
        let (mut events_a, mut events_b, mut events_other) = (a.subscribe(), b.subscribe(), other.subscribe());
        until_up(&a).await;
        until_up(&b).await;
        // Subscribed: the first Resync of each.
        assert_eq!(events_b.recv().await.unwrap(), Event::Resync);
        assert_eq!(events_other.recv().await.unwrap(), Event::Resync);

        a.publish(announcement("prod", 1)).await.unwrap();
        assert_eq!(next_announcement(&mut events_a).await, announcement("prod", 1));
        assert_eq!(next_announcement(&mut events_b).await, announcement("prod", 1));
        assert_eq!(b.health().received, 1);

        server.stop();
        assert!(a.publish(announcement("prod", 2)).await.is_err());
        assert!(!a.health().up);
        server.start();
        until_up(&a).await;
        // b resubscribes by itself (its connection manager saw the disconnect): a Resync, then
        // messages flow again.
        let resync = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(Event::Resync) = events_b.recv().await {
                    return;
                }
            }
        });
        resync.await.expect("b resubscribed after the restart");
        a.publish(announcement("prod", 3)).await.unwrap();
        assert_eq!(next_announcement(&mut events_b).await, announcement("prod", 3));
        // Another prefix is another bus: it saw its own reconnect, and no announcement.
        while let Ok(event) = events_other.try_recv() {
            assert_eq!(event, Event::Resync);
        }
    }

    #[tokio::test]
    async fn snapshots_only_move_forward() {
        let server = vexil_testkit::redis();
        let cache = RedisCache::connect(server.url(), "vexil:").unwrap();
        let snapshot = |config_version: i64, body: &'static str| CachedSnapshot {
            config_version,
            body: body.into(),
        };
        assert_eq!(cache.get_snapshot("prod".into()).await.unwrap(), None);
        assert!(cache.put_snapshot("prod".into(), snapshot(2, "two")).await.unwrap());
        assert!(!cache.put_snapshot("prod".into(), snapshot(1, "one")).await.unwrap());
        assert!(!cache.put_snapshot("prod".into(), snapshot(2, "again")).await.unwrap());
        assert_eq!(
            cache.get_snapshot("prod".into()).await.unwrap(),
            Some(snapshot(2, "two"))
        );
        assert!(cache.put_snapshot("prod".into(), snapshot(5, "five")).await.unwrap());
        assert!(cache.put_snapshot("dev".into(), snapshot(1, "dev")).await.unwrap());
        assert_eq!(
            cache.get_snapshot("prod".into()).await.unwrap(),
            Some(snapshot(5, "five"))
        );
        let versions = cache.versions().await.unwrap();
        assert_eq!(versions, HashMap::from([("prod".into(), 5), ("dev".into(), 1)]));
        // The replaced body expires; the current one does not.
        let mut connection = cache.connection.clone();
        let ttl: i64 = connection.ttl("vexil:snapshot:prod:2").await.unwrap();
        assert!(ttl > 0 && ttl <= REPLACED_TTL_SECONDS, "ttl {ttl}");
        let ttl: i64 = connection.ttl("vexil:snapshot:prod:5").await.unwrap();
        assert_eq!(ttl, -1);
        cache.remove_snapshot("prod".into()).await.unwrap();
        assert_eq!(cache.get_snapshot("prod".into()).await.unwrap(), None);
        assert_eq!(cache.versions().await.unwrap(), HashMap::from([("dev".into(), 1)]));
    }

    #[tokio::test]
    async fn a_server_that_is_down_is_reported_not_waited_for() {
        let server = vexil_testkit::redis();
        let url = server.url().to_owned();
        drop(server);
        let cache = RedisCache::connect(&url, "vexil:").unwrap();
        assert!(cache.versions().await.is_err());
        let health = cache.health();
        assert!(!health.up);
        assert!(health.error.is_some());
        assert!(RedisCache::connect("http://nope", "vexil:").is_err());
    }

    /// A redis-server speaking only TLS on a free port, with a self-signed certificate for
    /// 127.0.0.1; killed and removed on drop.
    struct TlsRedis {
        child: std::process::Child,
        dir: std::path::PathBuf,
        port: u16,
        cert_pem: String,
    }

    impl TlsRedis {
        fn start() -> TlsRedis {
            let dir = std::env::temp_dir().join(format!("vexil-cache-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
            let cert_pem = certified.cert.pem();
            std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
            std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .current_dir(&dir)
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
                .args(["--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server runs (install the redis-server package)");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(std::time::Instant::now() < deadline, "redis-server (TLS) did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            TlsRedis {
                child,
                dir,
                port,
                cert_pem,
            }
        }
    }

    impl Drop for TlsRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn tls_redis_is_reached_with_its_root_and_refused_without() {
        let server = TlsRedis::start();
        let url = format!("rediss://127.0.0.1:{}", server.port);
        let cache = RedisCache::connect_with_roots(&url, "vexil:", Some(server.cert_pem.as_bytes())).unwrap();
        let mut events = cache.subscribe();
        until_up(&cache).await;
        cache.publish(announcement("prod", 4)).await.unwrap();
        assert_eq!(next_announcement(&mut events).await, announcement("prod", 4));
        let snapshot = CachedSnapshot {
            config_version: 4,
            body: "four".into(),
        };
        assert!(cache.put_snapshot("prod".into(), snapshot.clone()).await.unwrap());
        assert_eq!(cache.get_snapshot("prod".into()).await.unwrap(), Some(snapshot));

        // Not trusted (the system's roots do not know this certificate): refused, reported down.
        let untrusted = RedisCache::connect(&url, "vexil:").unwrap();
        assert!(untrusted.versions().await.is_err());
        assert!(!untrusted.health().up);
        // Plain text to a TLS port fails too.
        let plain = RedisCache::connect(&format!("redis://127.0.0.1:{}", server.port), "vexil:").unwrap();
        assert!(plain.versions().await.is_err());
    }
}
