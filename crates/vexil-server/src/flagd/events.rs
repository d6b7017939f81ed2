//! flagd's EventStream (the same on evaluation v1, v2 and schema.v1): `provider_ready` on
//! subscribe, `configuration_change` with the changed keys of the selected flags on every change,
//! `keep_alive` after 20 s of silence, `provider_shutdown` when the server stops.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tonic::Status;
use vexil_core::{Selector, Snapshot};
use vexil_proto::pbjson_types::Struct;
use vexil_service::Published;

use crate::app::App;
use crate::convert::json_to_struct;
use crate::streams::StreamPermit;

/// How long a stream may be silent before a `keep_alive` is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A server stream of events of one API's message type.
pub type EventStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `provider_ready` not sent yet.
    Opening,
    Open,
    /// The last message (`provider_shutdown` or the deadline error) has been sent.
    Closed,
}

/// One subscriber's state. Messages are built when the transport pulls the next one (see
/// `crate::streams`): `previous` is the snapshot of the last change the subscriber was sent, so the
/// changes of a subscriber that was not reading are coalesced into one message.
struct Subscriber<F> {
    app: App,
    selector: Selector,
    config: watch::Receiver<Arc<Published>>,
    previous: Arc<Snapshot>,
    shutdown: watch::Receiver<bool>,
    deadline: Option<Instant>,
    last_sent: Instant,
    phase: Phase,
    make: F,
    _permit: StreamPermit,
}

/// Opens an event stream for `selector`; `make(type, data)` builds the API's message. Refused with
/// `RESOURCE_EXHAUSTED` when `--max-streams` streams are open.
pub fn stream<R, F>(app: &App, selector: Selector, make: F) -> Result<EventStream<R>, Status>
where
    R: Send + 'static,
    F: Fn(&'static str, Option<Struct>) -> R + Send + 'static,
{
    let permit = app.streams().admit("event_stream")?;
    let mut config = app.live().subscribe();
    let previous = config.borrow_and_update().snapshot.clone();
    let subscriber = Subscriber {
        app: app.clone(),
        selector,
        config,
        previous,
        shutdown: app.shutdown(),
        deadline: app.stream_deadline().map(|d| Instant::now() + d),
        last_sent: Instant::now(),
        phase: Phase::Opening,
        make,
        _permit: permit,
    };
    Ok(Box::pin(futures::stream::unfold(subscriber, |mut s| async move {
        let message = s.next().await?;
        Some((message, s))
    })))
}

impl<R, F> Subscriber<F>
where
    F: Fn(&'static str, Option<Struct>) -> R,
{
    /// The next message, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Result<R, Status>> {
        let empty = || Some(Struct::default());
        let message = match self.phase {
            Phase::Closed => return None,
            Phase::Opening => {
                self.phase = Phase::Open;
                Ok((self.make)("provider_ready", empty()))
            }
            Phase::Open => loop {
                tokio::select! {
                    changed = self.config.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        let current = self.config.borrow_and_update().snapshot.clone();
                        let changes = self.app.changes(&self.previous, &current, &self.selector);
                        self.previous = current;
                        if changes.is_empty() {
                            continue;
                        }
                        let flags: Map<String, Value> = changes
                            .iter()
                            .map(|(key, change)| (key.clone(), json!({ "type": change.as_str() })))
                            .collect();
                        let data = json!({ "flags": flags });
                        break Ok((self.make)("configuration_change", data.as_object().map(json_to_struct)));
                    }
                    () = sleep_until(self.last_sent + KEEP_ALIVE) => break Ok((self.make)("keep_alive", None)),
                    () = crate::app::stopping(&mut self.shutdown) => {
                        self.phase = Phase::Closed;
                        break Ok((self.make)("provider_shutdown", empty()));
                    }
                    () = sleep_until(self.deadline.unwrap_or_else(far_future)), if self.deadline.is_some() => {
                        self.phase = Phase::Closed;
                        break Err(Status::deadline_exceeded("stream deadline reached"));
                    }
                }
            },
        };
        self.last_sent = Instant::now();
        Some(message)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tokio_stream::StreamExt;
    use vexil_core::{FractionalMode, Selector};
    use vexil_service::{Live, LiveConfig, StaticContext};

    use super::*;
    use crate::app::{App, AppConfig};

    #[tokio::test(start_paused = true)]
    async fn keep_alive_after_twenty_seconds_of_silence_then_shutdown() {
        let live = Live::load(&LiveConfig {
            sources: Vec::new(),
            fractional: FractionalMode::V3,
            poll_interval: Duration::from_secs(1),
            stale_after: None,
        });
        let (stop, shutdown) = watch::channel(false);
        let app = App::new(AppConfig {
            live,
            statics: StaticContext::default(),
            stream_deadline: None,
            disable_sync_metadata: false,
            max_body: 1024,
            max_streams: 10,
            shutdown,
        });
        let mut events = stream(&app, Selector::All, |kind, data| (kind, data.is_some())).unwrap();
        assert_eq!(events.next().await.unwrap().unwrap(), ("provider_ready", true));
        let started = Instant::now();
        assert_eq!(events.next().await.unwrap().unwrap(), ("keep_alive", false));
        assert_eq!(
            started.elapsed(),
            KEEP_ALIVE,
            "exactly after 20 s of silence (paused clock)"
        );
        stop.send(true).unwrap();
        assert_eq!(events.next().await.unwrap().unwrap(), ("provider_shutdown", true));
        assert!(events.next().await.is_none(), "the stream ends after provider_shutdown");
    }
}
