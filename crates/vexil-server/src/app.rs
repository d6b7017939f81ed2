//! State shared by every handler: the flag service (evaluation and change fan-out, in
//! `vexil-service`) and the server's own limits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vexil_service::{Flags, FlagsConfig, Live, StaticContext};

use crate::metrics;
use crate::streams::StreamLimit;

/// Handler state (cheap to clone).
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<AppInner>,
}

#[derive(Debug)]
struct AppInner {
    flags: Flags,
    streams: Arc<StreamLimit>,
    stream_deadline: Option<Duration>,
    disable_sync_metadata: bool,
    max_body: usize,
    shutdown: watch::Receiver<bool>,
}

/// Parameters of [`App::new`].
#[derive(Debug)]
pub struct AppConfig {
    pub live: Live,
    pub statics: StaticContext,
    pub stream_deadline: Option<Duration>,
    pub disable_sync_metadata: bool,
    pub max_body: usize,
    /// The most EventStream and SyncFlags streams open at once (`--max-streams`).
    pub max_streams: usize,
    pub shutdown: watch::Receiver<bool>,
    /// Where exposures to experiments go (the tracker, with a managed store).
    pub exposures: Arc<dyn vexil_service::Exposures>,
}

impl App {
    pub fn new(c: AppConfig) -> App {
        App {
            inner: Arc::new(AppInner {
                flags: Flags::new(FlagsConfig {
                    live: c.live,
                    statics: c.statics,
                    // Evaluation events only while tracing is on: off, evaluations pay nothing for it.
                    observer: if crate::telemetry::tracing_enabled() {
                        Arc::new((metrics::Evaluations, crate::telemetry::TracedEvaluations))
                    } else {
                        Arc::new(metrics::Evaluations)
                    },
                    exposures: c.exposures,
                }),
                streams: StreamLimit::new(c.max_streams),
                stream_deadline: c.stream_deadline,
                disable_sync_metadata: c.disable_sync_metadata,
                max_body: c.max_body,
                shutdown: c.shutdown,
            }),
        }
    }

    /// The flag service every handler calls.
    pub fn flags(&self) -> &Flags {
        &self.inner.flags
    }

    pub fn live(&self) -> &Live {
        self.inner.flags.live()
    }

    pub fn stream_deadline(&self) -> Option<Duration> {
        self.inner.stream_deadline
    }

    pub fn sync_metadata_disabled(&self) -> bool {
        self.inner.disable_sync_metadata
    }

    pub fn max_body(&self) -> usize {
        self.inner.max_body
    }

    /// Admission of server streams.
    pub fn streams(&self) -> &Arc<StreamLimit> {
        &self.inner.streams
    }

    /// A receiver that turns `true` when the server shuts down.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }
}

/// Resolves when `shutdown` turns `true` (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await.map(|_| ());
}
