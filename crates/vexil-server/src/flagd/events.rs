//! flagd's EventStream (the same on evaluation v1, v2 and schema.v1): `provider_ready` on
//! subscribe, `configuration_change` with the changed keys of the selected flags on every change,
//! `keep_alive` after 20 s of silence, `provider_shutdown` when the server stops.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use vexil_core::Selector;
use vexil_proto::pbjson_types::Struct;

use crate::app::App;
use crate::convert::json_to_struct;
use crate::metrics::StreamGuard;

/// How long a stream may be silent before a `keep_alive` is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A server stream of events of one API's message type.
pub type EventStream<R> = ReceiverStream<Result<R, Status>>;

/// Opens an event stream for `selector`; `make(type, data)` builds the API's message.
pub fn stream<R, F>(app: &App, selector: Selector, make: F) -> EventStream<R>
where
    R: Send + 'static,
    F: Fn(&'static str, Option<Struct>) -> R + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let mut config = app.live().subscribe();
    let mut previous = config.borrow_and_update().snapshot.clone();
    let mut shutdown = app.shutdown();
    let deadline = app.stream_deadline().map(|d| Instant::now() + d);
    let app = app.clone();
    tokio::spawn(async move {
        let _guard = StreamGuard::open("event_stream");
        let empty = || Some(Struct::default());
        if tx.send(Ok(make("provider_ready", empty()))).await.is_err() {
            return;
        }
        let mut last_sent = Instant::now();
        loop {
            let message = tokio::select! {
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = config.borrow_and_update().snapshot.clone();
                    let changes = app.changes(&previous, &current, &selector);
                    previous = current;
                    if changes.is_empty() {
                        continue;
                    }
                    let flags: Map<String, Value> =
                        changes.iter().map(|(key, change)| (key.clone(), json!({ "type": change.as_str() }))).collect();
                    let data = json!({ "flags": flags });
                    Ok(make("configuration_change", data.as_object().map(json_to_struct)))
                }
                () = sleep_until(last_sent + KEEP_ALIVE) => Ok(make("keep_alive", None)),
                () = crate::app::stopping(&mut shutdown) => {
                    let _ = tx.send(Ok(make("provider_shutdown", empty()))).await;
                    break;
                }
                () = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    let _ = tx.send(Err(Status::deadline_exceeded("stream deadline reached"))).await;
                    break;
                }
                () = tx.closed() => break,
            };
            if tx.send(message).await.is_err() {
                break;
            }
            last_sent = Instant::now();
        }
    });
    ReceiverStream::new(rx)
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
            shutdown,
        });
        let mut events = stream(&app, Selector::All, |kind, data| (kind, data.is_some()));
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
