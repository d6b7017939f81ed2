//! Vexil's own API, `vexil.v1`: administration of the managed store, evaluation, and config
//! snapshots and watches. Served over gRPC, gRPC-web and Connect on the gRPC port (the same generic
//! layers as flagd's services) and as JSON under `/v1` on the HTTP port (`transcode`).

mod admin;
mod auth;
mod config;
mod convert;
mod evaluation;
mod guard;
mod tracking;

use std::sync::Arc;

use tonic::Request;
use vexil_cache::Announcement;
use vexil_service::{Relay, StoreSource};
use vexil_store::Store;

pub use admin::Admin;
pub use auth::Access;
pub use config::ConfigApi;
pub use evaluation::EvaluationApi;
pub use guard::require_key;
pub use tracking::TrackingApi;

use crate::serve::Peer;
use auth::{Need, Principal};

/// The managed store as the API sees it: the store, the source that serves it, the relay that
/// announces its changes, and who may call.
#[derive(Debug)]
pub struct Managed {
    pub store: Arc<dyn Store>,
    pub source: Arc<StoreSource>,
    pub relay: Arc<Relay>,
    pub access: Access,
    /// Tracked events and server-side exposures.
    pub tracker: Arc<vexil_service::Tracker>,
    pub fail_point: FailPoint,
}

/// A fault to inject, for tests of what survives a crash (`VEXIL_FAIL_POINT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// None: the default.
    None,
    /// `after-commit`: the process aborts right after a write commits, before its change is
    /// announced (the outbox row stays pending for another replica's relay).
    AfterCommit,
}

impl FailPoint {
    /// From `VEXIL_FAIL_POINT`; an unknown value is ignored with a warning.
    pub fn from_env() -> FailPoint {
        match std::env::var("VEXIL_FAIL_POINT").as_deref() {
            Err(_) | Ok("") => FailPoint::None,
            Ok("after-commit") => {
                tracing::warn!("VEXIL_FAIL_POINT=after-commit: this process aborts after its first write commits");
                FailPoint::AfterCommit
            }
            Ok(other) => {
                tracing::warn!(fail_point = other, "unknown VEXIL_FAIL_POINT ignored");
                FailPoint::None
            }
        }
    }
}

impl Managed {
    async fn check<T>(&self, request: &Request<T>, need: Need<'_>) -> Result<Principal, tonic::Status> {
        let peer = request.extensions().get::<Peer>().copied();
        self.access.check(request.metadata(), peer, need).await
    }

    /// A write committed a new config version: serve it here now, and announce it to every
    /// replica (the outbox relay).
    fn config_written(&self) {
        if self.fail_point == FailPoint::AfterCommit {
            std::process::abort();
        }
        self.source.wake();
        self.relay.wake();
    }

    /// An environment was created or deleted (no config version, so no outbox row): serve it here
    /// now and tell the other replicas (best effort; their version check is the backstop).
    fn environment_changed(&self, environment: String, config_version: i64) {
        self.source.wake();
        let cache = self.source.cache().clone();
        tokio::spawn(async move {
            let announcement = Announcement {
                environment,
                config_version,
            };
            if let Err(error) = cache.publish(announcement).await {
                tracing::warn!(%error, "cannot announce an environment change; other replicas find it by their version check");
            }
        });
    }

    /// API keys were created or revoked here: forget what was remembered about keys.
    fn keys_changed(&self) {
        self.access.forget();
    }
}
