//! `vexil.v1.ConfigService`: an environment's flag sets as flagd documents, as this server serves
//! them (from memory, never from the database), once or as a stream of versions.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::config_service_server::ConfigService;
use vexil_store::EnvironmentSnapshot;

use super::Managed;
use super::auth::Need;
use super::convert::{self, required};
use crate::app::{App, stopping};
use crate::error::{ErrorKind, grpc_status};

#[derive(Debug, Clone)]
pub struct ConfigApi {
    pub app: App,
    pub managed: Arc<Managed>,
}

/// The message for `snapshot`, restricted to `flag_set` unless it is empty.
fn message(snapshot: &EnvironmentSnapshot, flag_set: &str) -> pb::ConfigSnapshot {
    pb::ConfigSnapshot {
        environment: snapshot.environment.clone(),
        config_version: snapshot.config_version,
        flag_sets: snapshot
            .flag_sets
            .iter()
            .filter(|(key, _)| flag_set.is_empty() || key == flag_set)
            .map(|(key, document)| pb::FlagSetDocument {
                key: key.clone(),
                document: convert::structure((**document).clone()),
            })
            .collect(),
    }
}

impl ConfigApi {
    fn current(&self, environment: &str, flag_set: &str) -> Result<Arc<EnvironmentSnapshot>, Status> {
        let snapshot = self
            .managed
            .source
            .environment(environment)
            .ok_or_else(|| grpc_status(ErrorKind::NotFound, format!("environment `{environment}` not found")))?;
        if !flag_set.is_empty() && !snapshot.flag_sets.iter().any(|(key, _)| key == flag_set) {
            return Err(grpc_status(
                ErrorKind::NotFound,
                format!("flag set `{environment}/{flag_set}` not found"),
            ));
        }
        Ok(snapshot)
    }
}

type Snapshots = Pin<Box<dyn Stream<Item = Result<pb::ConfigSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::ConfigSnapshot>, Status> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.managed.check(&request, Need::Evaluate(&environment)).await?;
        let flag_set = request.into_inner().flag_set;
        let snapshot = self.current(&environment, &flag_set)?;
        Ok(Response::new(message(&snapshot, &flag_set)))
    }

    type WatchStream = Snapshots;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Snapshots>, Status> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.managed.check(&request, Need::Evaluate(&environment)).await?;
        let flag_set = request.into_inner().flag_set;
        let first = self.current(&environment, &flag_set)?;
        // Counted against --max-streams with flagd's streams.
        let permit = self.app.streams().admit("config_watch")?;
        let (source, mut published, mut shutdown) = (
            self.managed.source.clone(),
            self.app.live().subscribe(),
            self.app.shutdown(),
        );
        let stream = async_stream(move |tx| async move {
            let _permit = permit;
            let mut sent = first.config_version;
            if tx.send(Ok(message(&first, &flag_set))).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    () = stopping(&mut shutdown) => return,
                    () = tx.closed() => return,
                }
                let Some(now) = source.environment(&environment) else {
                    let gone = grpc_status(ErrorKind::NotFound, format!("environment `{environment}` was deleted"));
                    let _ = tx.send(Err(gone)).await;
                    return;
                };
                if now.config_version != sent {
                    sent = now.config_version;
                    if tx.send(Ok(message(&now, &flag_set))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by `produce` through a one-message buffer: the producer waits while the client
/// is not reading, so nothing queues per subscriber.
fn async_stream<F, Fut>(produce: F) -> Snapshots
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ConfigSnapshot, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
