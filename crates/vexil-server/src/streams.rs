//! Server streams (flagd EventStream and SyncFlags): admission against `--max-streams`, and the
//! policy for slow readers.
//!
//! **Streams are pulled, not pushed.** A stream builds its next message only when the transport
//! asks for it, and hyper asks only when the client has flow-control credit for the previous one.
//! A subscriber that stops reading therefore accumulates no backlog: changes made meanwhile are
//! coalesced, and when it reads again it gets the newest state (EventStream: every key changed
//! since the last message it got; SyncFlags: the current flags). The server holds for it at most
//! the message in flight and the next one; SyncFlags payloads are shared by every subscriber of the
//! selector (reference-counted bytes), so a stalled in-process provider costs a few hundred bytes
//! of state, not copies of the flag payload.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tonic::Status;
use vexil_core::{Selector, Snapshot};
use vexil_service::{Changes, Published};

use crate::app::App;
use crate::metrics::StreamGuard;

/// What a subscription has to tell its subscriber next.
#[derive(Debug)]
pub enum Event {
    /// The flags the selector sees changed since the last `Changed` (or since the subscription
    /// opened): `changes` are every key that changed meanwhile, `snapshot` the newest.
    Changed { snapshot: Arc<Snapshot>, changes: Changes },
    /// Nothing was said for the quiet period (a keep-alive is due).
    Quiet,
    /// The server is shutting down; the subscription ends after this.
    ShuttingDown,
    /// The stream deadline (`--stream-deadline`) passed; the subscription ends after this.
    DeadlineReached,
}

/// A subscriber's view of configuration changes for one selector: the one stream behind
/// EventStream and SyncFlags. Pulled: [`Subscription::next`] is awaited when the transport wants
/// the next message, and compares the newest snapshot with the last one this subscriber was told
/// about, so changes made while it was not reading are coalesced.
#[derive(Debug)]
pub struct Subscription {
    app: App,
    selector: Selector,
    config: watch::Receiver<Arc<Published>>,
    /// The snapshot the subscriber was last told about.
    told: Arc<Snapshot>,
    shutdown: watch::Receiver<bool>,
    deadline: Option<Instant>,
    quiet_after: Option<Duration>,
    last_event: Instant,
    ended: bool,
    _permit: StreamPermit,
}

impl Subscription {
    /// Opens a subscription of `kind` (admitted against `--max-streams`) for `selector`, starting
    /// from the current snapshot. `quiet_after`: report [`Event::Quiet`] after that long without
    /// an event.
    pub fn open(
        app: &App,
        kind: &'static str,
        selector: Selector,
        quiet_after: Option<Duration>,
    ) -> Result<Subscription, Status> {
        let permit = app.streams().admit(kind)?;
        let mut config = app.live().subscribe();
        let told = config.borrow_and_update().snapshot.clone();
        Ok(Subscription {
            app: app.clone(),
            selector,
            config,
            told,
            shutdown: app.shutdown(),
            deadline: app.stream_deadline().map(|d| Instant::now() + d),
            quiet_after,
            last_event: Instant::now(),
            ended: false,
            _permit: permit,
        })
    }

    /// The snapshot the subscriber was last told about (at first, the one it opened on).
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.told
    }

    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let event = loop {
            tokio::select! {
                changed = self.config.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let current = self.config.borrow_and_update().snapshot.clone();
                    let changes = self.app.flags().changes(&self.told, &current, &self.selector);
                    self.told = current;
                    if !changes.is_empty() {
                        break Event::Changed { snapshot: self.told.clone(), changes };
                    }
                }
                () = sleep_until(self.last_event + self.quiet_after.unwrap_or_default()), if self.quiet_after.is_some() => {
                    break Event::Quiet;
                }
                () = crate::app::stopping(&mut self.shutdown) => {
                    self.ended = true;
                    break Event::ShuttingDown;
                }
                () = sleep_until(self.deadline.unwrap_or_else(Instant::now)), if self.deadline.is_some() => {
                    self.ended = true;
                    break Event::DeadlineReached;
                }
            }
        };
        self.last_event = Instant::now();
        Some(event)
    }
}

/// Counts open streams against a limit.
#[derive(Debug)]
pub struct StreamLimit {
    open: AtomicUsize,
    max: usize,
}

/// An admitted stream; releases its slot (and the open-streams gauge) when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    limit: Arc<StreamLimit>,
    _gauge: StreamGuard,
}

impl StreamLimit {
    pub fn new(max: usize) -> Arc<StreamLimit> {
        Arc::new(StreamLimit {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// Admits one more stream of `kind`, or answers `RESOURCE_EXHAUSTED` when `max` are open.
    pub fn admit(self: &Arc<Self>, kind: &'static str) -> Result<StreamPermit, Status> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        match admitted {
            Ok(_) => Ok(StreamPermit {
                limit: self.clone(),
                _gauge: StreamGuard::open(kind),
            }),
            Err(_) => {
                crate::metrics::stream_rejected(kind);
                Err(crate::error::grpc_status(
                    crate::error::ErrorKind::ResourceExhausted,
                    format!("too many open streams: this server allows {} (--max-streams)", self.max),
                ))
            }
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio_test::{assert_pending, assert_ready};
    use vexil_core::FractionalMode;
    use vexil_service::{Live, LiveConfig, SourceSpec, StaticContext};

    use super::*;
    use crate::app::AppConfig;

    /// A server's state on a flag file of `values` (key → string value), without sockets.
    struct Fixture {
        app: App,
        live: Live,
        stop: watch::Sender<bool>,
        path: PathBuf,
        _dir: TempDir,
    }

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn document(values: &[(&str, &str)]) -> String {
        let flags: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(k, v)| {
                let flag = serde_json::json!({"state": "ENABLED", "variants": {"v": v}, "defaultVariant": "v"});
                ((*k).to_owned(), flag)
            })
            .collect();
        serde_json::json!({ "flags": flags }).to_string()
    }

    impl Fixture {
        fn new(values: &[(&str, &str)], stream_deadline: Option<Duration>) -> Fixture {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vexil-streams-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("flags.json");
            std::fs::write(&path, document(values)).unwrap();
            let live = Live::load(&LiveConfig {
                sources: vec![SourceSpec::parse(&format!("file:{}", path.display())).unwrap()],
                fractional: FractionalMode::V3,
                poll_interval: Duration::from_secs(3600),
                stale_after: None,
            });
            let (stop, shutdown) = watch::channel(false);
            let app = App::new(AppConfig {
                live: live.clone(),
                statics: StaticContext::default(),
                stream_deadline,
                disable_sync_metadata: false,
                max_body: 1024,
                max_streams: 8,
                shutdown,
                exposures: std::sync::Arc::new(vexil_service::NoExposures),
            });
            Fixture {
                app,
                live,
                stop,
                path,
                _dir: TempDir(dir),
            }
        }

        /// Rewrites the flag file and publishes it (what the watcher does on a file event).
        fn publish(&self, values: &[(&str, &str)]) {
            std::fs::write(&self.path, document(values)).unwrap();
            assert!(self.live.reload_blocking(), "a new snapshot is published");
        }
    }

    fn changed_keys(event: Option<Event>) -> Vec<String> {
        match event {
            Some(Event::Changed { changes, .. }) => changes.iter().map(|(k, _)| k.clone()).collect(),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn changes_wait_for_the_subscriber_and_are_coalesced() {
        let f = Fixture::new(&[("a", "1"), ("b", "1"), ("c", "1")], None);
        let mut subscription = Subscription::open(&f.app, "test", Selector::All, None).unwrap();
        {
            let mut next = tokio_test::task::spawn(subscription.next());
            assert_pending!(next.poll(), "nothing changed yet");
            f.publish(&[("a", "2"), ("b", "1"), ("c", "1")]);
            assert!(next.is_woken(), "a change wakes the subscriber");
            assert_eq!(changed_keys(assert_ready!(next.poll())), ["a"]);
        }
        // Two changes while the subscriber is not reading: one event, with both keys.
        f.publish(&[("a", "2"), ("b", "2"), ("c", "1")]);
        f.publish(&[("a", "2"), ("b", "2"), ("c", "2")]);
        let mut next = tokio_test::task::spawn(subscription.next());
        let mut keys = changed_keys(assert_ready!(next.poll()));
        keys.sort();
        assert_eq!(keys, ["b", "c"]);
        drop(next);
        assert_eq!(
            subscription.snapshot().len(),
            3,
            "the subscription now stands at the newest snapshot"
        );
        let mut next = tokio_test::task::spawn(subscription.next());
        assert_pending!(next.poll(), "and has nothing more to say");
    }

    #[tokio::test]
    async fn a_change_to_flags_outside_the_selector_is_not_an_event() {
        let f = Fixture::new(&[("a", "1")], None);
        let selector = Selector::parse("flagSetId=other").unwrap();
        let mut subscription = Subscription::open(&f.app, "test", selector, None).unwrap();
        let mut next = tokio_test::task::spawn(subscription.next());
        f.publish(&[("a", "2")]);
        assert_pending!(next.poll());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_subscription() {
        let f = Fixture::new(&[("a", "1")], Some(Duration::from_secs(5)));
        let mut subscription = Subscription::open(&f.app, "test", Selector::All, None).unwrap();
        let opened = Instant::now();
        assert!(matches!(subscription.next().await, Some(Event::DeadlineReached)));
        assert_eq!(opened.elapsed(), Duration::from_secs(5));
        assert!(subscription.next().await.is_none(), "nothing after the deadline");
        f.publish(&[("a", "2")]);
        assert!(subscription.next().await.is_none(), "not even a change");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_periods_and_shutdown() {
        let f = Fixture::new(&[("a", "1")], None);
        let mut subscription =
            Subscription::open(&f.app, "test", Selector::All, Some(Duration::from_secs(20))).unwrap();
        let opened = Instant::now();
        assert!(matches!(subscription.next().await, Some(Event::Quiet)));
        assert_eq!(opened.elapsed(), Duration::from_secs(20));
        f.stop.send(true).unwrap();
        assert!(matches!(subscription.next().await, Some(Event::ShuttingDown)));
        assert!(subscription.next().await.is_none());
    }

    #[test]
    fn subscriptions_count_against_max_streams() {
        let f = Fixture::new(&[("a", "1")], None);
        let open: Vec<Subscription> = (0..8)
            .map(|_| Subscription::open(&f.app, "test", Selector::All, None).unwrap())
            .collect();
        let refused = Subscription::open(&f.app, "test", Selector::All, None).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(open);
        assert!(Subscription::open(&f.app, "test", Selector::All, None).is_ok());
    }

    #[test]
    fn admits_up_to_the_limit_and_frees_slots_on_drop() {
        let limit = StreamLimit::new(2);
        let a = limit.admit("test").unwrap();
        let _b = limit.admit("test").unwrap();
        let refused = limit.admit("test").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-streams"), "{}", refused.message());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.admit("test").unwrap();
    }
}
