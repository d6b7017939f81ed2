//! `flagd.sync.v1.FlagSyncService` on port 8015: what in-process providers stream their flags from.
//!
//! SyncFlags sends the selected flags as flagd's JSON (`{"flags": {key: flag}}`, `$ref`s inlined,
//! set metadata merged) at once and again after every change to them; `sync_context` carries the
//! `-X` values. FetchAllFlags answers the same JSON once; GetMetadata the `-X` values.

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vexil_core::{Selector, Snapshot};
use vexil_proto::flagd::sync::v1::{self as sync, flag_sync_service_server::FlagSyncService};

use crate::app::App;
use crate::convert::json_to_struct;
use crate::metrics::StreamGuard;

/// The sync service.
#[derive(Debug, Clone)]
pub struct Sync {
    pub app: App,
}

/// The selector: the `Flagd-Selector` header if present, else the (deprecated) body field.
fn selector<T>(request: &Request<T>, body: &str) -> Result<Selector, Status> {
    let text = match request.metadata().get("flagd-selector") {
        Some(v) => v
            .to_str()
            .map_err(|_| Status::invalid_argument("the Flagd-Selector header is not valid text"))?,
        None => body,
    };
    Selector::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// flagd's sync payload for the flags `selector` sees.
pub fn flag_configuration(snapshot: &Snapshot, selector: &Selector) -> String {
    let mut flags = Map::new();
    for compiled in snapshot.flags(selector) {
        let flag = compiled.flag();
        let mut out = Map::new();
        out.insert("state".into(), json!(flag.state.as_str()));
        out.insert(
            "defaultVariant".into(),
            json!(flag.default_variant.as_deref().unwrap_or("")),
        );
        out.insert(
            "variants".into(),
            Value::Object(flag.variants.iter().cloned().collect()),
        );
        if let Some(t) = &flag.targeting {
            out.insert("targeting".into(), t.to_value());
        }
        out.insert(
            "source".into(),
            json!(snapshot.source_of(&flag.key, selector).unwrap_or("")),
        );
        if !flag.metadata.is_empty() {
            out.insert("metadata".into(), Value::Object(flag.metadata.clone()));
        }
        flags.insert(flag.key.clone(), Value::Object(out));
    }
    json!({ "flags": flags }).to_string()
}

#[tonic::async_trait]
impl FlagSyncService for Sync {
    type SyncFlagsStream = ReceiverStream<Result<sync::SyncFlagsResponse, Status>>;

    async fn sync_flags(
        &self,
        request: Request<sync::SyncFlagsRequest>,
    ) -> Result<Response<Self::SyncFlagsStream>, Status> {
        let selector = selector(&request, &request.get_ref().selector)?;
        let sync_context = Some(json_to_struct(&self.app.statics().values));
        let (tx, rx) = mpsc::channel(4);
        let mut config = self.app.live().subscribe();
        let mut shutdown = self.app.shutdown();
        let deadline = self.app.stream_deadline().map(|d| Instant::now() + d);
        let app = self.app.clone();
        tokio::spawn(async move {
            let _guard = StreamGuard::open("sync_flags");
            let mut previous = config.borrow_and_update().snapshot.clone();
            let first = sync::SyncFlagsResponse {
                flag_configuration: app.sync_payload(&previous, &selector).to_string(),
                sync_context: sync_context.clone(),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = config.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let current = config.borrow_and_update().snapshot.clone();
                        let changed = !app.changes(&previous, &current, &selector).is_empty();
                        previous = current;
                        if !changed {
                            continue;
                        }
                        let message = sync::SyncFlagsResponse {
                            flag_configuration: app.sync_payload(&previous, &selector).to_string(),
                            sync_context: sync_context.clone(),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                    () = crate::app::stopping(&mut shutdown) => break,
                    () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                        let _ = tx.send(Err(Status::deadline_exceeded("stream deadline reached"))).await;
                        break;
                    }
                    () = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_all_flags(
        &self,
        request: Request<sync::FetchAllFlagsRequest>,
    ) -> Result<Response<sync::FetchAllFlagsResponse>, Status> {
        let selector = selector(&request, &request.get_ref().selector)?;
        let snapshot = self.app.live().snapshot();
        Ok(Response::new(sync::FetchAllFlagsResponse {
            flag_configuration: flag_configuration(&snapshot, &selector),
        }))
    }

    async fn get_metadata(
        &self,
        _request: Request<sync::GetMetadataRequest>,
    ) -> Result<Response<sync::GetMetadataResponse>, Status> {
        if self.app.sync_metadata_disabled() {
            return Err(Status::unimplemented(
                "GetMetadata is disabled (--disable-sync-metadata)",
            ));
        }
        Ok(Response::new(sync::GetMetadataResponse {
            metadata: Some(json_to_struct(&self.app.statics().values)),
        }))
    }
}
