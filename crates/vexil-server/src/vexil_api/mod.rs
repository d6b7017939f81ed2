//! Vexil's own API, `vexil.v1`: administration of the managed store, evaluation, and config
//! snapshots and watches. Served over gRPC, gRPC-web and Connect on the gRPC port (the same generic
//! layers as flagd's services) and as JSON under `/v1` on the HTTP port (`transcode`).

mod admin;
mod auth;
mod config;
mod convert;
mod evaluation;
mod guard;

use std::sync::Arc;

use tonic::Request;
use vexil_service::StoreSource;
use vexil_store::Store;

pub use admin::Admin;
pub use auth::Access;
pub use config::ConfigApi;
pub use evaluation::EvaluationApi;
pub use guard::require_key;

use crate::serve::Peer;
use auth::{Need, Principal};

/// The managed store as the API sees it: the store, the source that serves it, and who may call.
#[derive(Debug)]
pub struct Managed {
    pub store: Arc<dyn Store>,
    pub source: Arc<StoreSource>,
    pub access: Access,
}

impl Managed {
    async fn check<T>(&self, request: &Request<T>, need: Need<'_>) -> Result<Principal, tonic::Status> {
        let peer = request.extensions().get::<Peer>().copied();
        self.access.check(request.metadata(), peer, need).await
    }

    /// API keys were created or revoked here: forget what was remembered about keys.
    fn keys_changed(&self) {
        self.access.forget();
    }
}
