//! flagd's EventStream (the same on evaluation v1, v2 and schema.v1): `provider_ready` on
//! subscribe, `configuration_change` with the changed keys of the selected flags on every change,
//! `keep_alive` after 20 s of silence, `provider_shutdown` when the server stops.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use serde_json::{Map, Value, json};
use tonic::Status;
use vexil_core::Selector;
use vexil_proto::JsonStruct;

use crate::app::App;
use crate::streams::{Event, Subscription};

/// How long a stream may be silent before a `keep_alive` is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A server stream of events of one API's message type.
pub type EventStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// Opens an event stream for `selector`; `make(type, data)` builds the API's message. Refused with
/// `RESOURCE_EXHAUSTED` when `--max-streams` streams are open. The messages are built as the
/// transport pulls them (see `crate::streams`).
pub fn stream<R, F>(app: &App, selector: Selector, make: F) -> Result<EventStream<R>, Status>
where
    R: Send + 'static,
    F: Fn(&'static str, Option<JsonStruct>) -> R + Send + 'static,
{
    let subscription = Subscription::open(app, "event_stream", selector, Some(KEEP_ALIVE))?;
    let ready = make("provider_ready", Some(JsonStruct::default()));
    let events = futures::stream::unfold((subscription, make), |(mut subscription, make)| async move {
        let message = match subscription.next().await? {
            Event::Changed { changes, .. } => {
                let flags: Map<String, Value> = changes
                    .iter()
                    .map(|(key, change)| (key.clone(), json!({ "type": change.as_str() })))
                    .collect();
                let data = JsonStruct::from(Map::from_iter([("flags".to_owned(), Value::Object(flags))]));
                Ok(make("configuration_change", Some(data)))
            }
            Event::Quiet => Ok(make("keep_alive", None)),
            Event::ShuttingDown => Ok(make("provider_shutdown", Some(JsonStruct::default()))),
            Event::DeadlineReached => Err(Status::deadline_exceeded("stream deadline reached")),
        };
        Some((message, (subscription, make)))
    });
    Ok(Box::pin(futures::StreamExt::chain(
        futures::stream::once(async { Ok(ready) }),
        events,
    )))
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
            exposures: std::sync::Arc::new(vexil_service::NoExposures),
        });
        let mut events = stream(&app, Selector::All, |kind, data| (kind, data.is_some())).unwrap();
        assert_eq!(events.next().await.unwrap().unwrap(), ("provider_ready", true));
        let started = tokio::time::Instant::now();
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
