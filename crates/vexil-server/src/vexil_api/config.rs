//! `vexil.v1.ConfigService`: an environment's flag sets as flagd documents, as this server serves
//! them (from memory), once or as a stream of changes. A watch resumes from the last version its
//! watcher saw: the changes of each version since, from what this server holds (the store source
//! keeps the latest versions' changes) or, for a watcher further behind, from the store's history;
//! a snapshot when even that is out of reach.

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

type Events = Pin<Box<dyn Stream<Item = Result<pb::ConfigEvent, Status>> + Send>>;

/// How many versions a watcher may be behind and still be sent each one's changes (read from the
/// store when this server no longer holds them); further behind, it gets a snapshot.
const WATCH_HISTORY_LIMIT: u32 = 1000;

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

    type WatchStream = Events;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Events>, Status> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.managed.check(&request, Need::Evaluate(&environment)).await?;
        let pb::WatchRequest {
            flag_set,
            since_version,
            ..
        } = request.into_inner();
        if since_version < 0 {
            return Err(grpc_status(
                ErrorKind::InvalidArgument,
                format!("since_version must be 0 or more, not {since_version}"),
            ));
        }
        let first = self.current(&environment, &flag_set)?;
        // Counted against --max-streams with flagd's streams.
        let permit = self.app.streams().admit("config_watch")?;
        let (mut published, mut shutdown) = (self.app.live().subscribe(), self.app.shutdown());
        let managed = self.managed.clone();
        let stream = async_stream(move |tx| async move {
            let _permit = permit;
            let mut watcher = Watcher {
                tx,
                managed,
                environment,
                flag_set,
                sent: since_version,
            };
            let caught_up = if since_version == 0 {
                watcher.snapshot(&first).await
            } else {
                watcher.catch_up(&first).await
            };
            if caught_up.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    () = stopping(&mut shutdown) => return,
                    () = watcher.tx.closed() => return,
                }
                let Some(now) = watcher.managed.source.environment(&watcher.environment) else {
                    let gone = grpc_status(
                        ErrorKind::NotFound,
                        format!("environment `{}` was deleted", watcher.environment),
                    );
                    let _ = watcher.tx.send(Err(gone)).await;
                    return;
                };
                // Behind the watcher (it saw a newer version elsewhere): wait for this server.
                if now.config_version > watcher.sent && watcher.catch_up(&now).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// One watch: what it has sent so far, and how to send more.
struct Watcher {
    tx: tokio::sync::mpsc::Sender<Result<pb::ConfigEvent, Status>>,
    managed: Arc<Managed>,
    environment: String,
    flag_set: String,
    /// The last version sent (or that the watcher said it saw).
    sent: i64,
}

/// The watcher went away.
struct Gone;

impl Watcher {
    async fn send(&mut self, config_version: i64, event: pb::config_event::Event) -> Result<(), Gone> {
        let event = pb::ConfigEvent {
            environment: self.environment.clone(),
            config_version,
            event: Some(event),
        };
        self.tx.send(Ok(event)).await.map_err(|_| Gone)?;
        self.sent = config_version;
        Ok(())
    }

    async fn snapshot(&mut self, now: &EnvironmentSnapshot) -> Result<(), Gone> {
        let snapshot = pb::config_event::Event::Snapshot(message(now, &self.flag_set));
        self.send(now.config_version, snapshot).await
    }

    /// Sends each version after the last one sent, up to `now` (or the store's newer one), or a
    /// snapshot of `now` if the versions between are out of reach.
    async fn catch_up(&mut self, now: &EnvironmentSnapshot) -> Result<(), Gone> {
        if now.config_version <= self.sent {
            return Ok(());
        }
        let held = self.managed.source.changes_after(&self.environment, self.sent);
        let versions = match held {
            Some(versions) => Some(versions),
            // Older than this server kept (it started since, say): the store's history.
            None => match self
                .managed
                .store
                .history(self.environment.clone(), self.sent, WATCH_HISTORY_LIMIT)
                .await
            {
                Ok(history) => history.versions.map(|v| v.into_iter().map(Arc::new).collect()),
                Err(error) => {
                    tracing::debug!(%error, "cannot read the history for a watcher: sending a snapshot");
                    None
                }
            },
        };
        let Some(versions) = versions else {
            return self.snapshot(now).await;
        };
        for version in versions {
            if version.version <= self.sent {
                continue;
            }
            let changes: Vec<pb::Change> = version
                .changes
                .iter()
                .filter(|c| self.flag_set.is_empty() || c.flag_set == self.flag_set)
                .cloned()
                .map(convert::change)
                .collect();
            if changes.is_empty() {
                // Nothing of the watched flag set: nothing to say.
                self.sent = version.version;
                continue;
            }
            let event = pb::config_event::Event::Changes(pb::VersionChanges { changes });
            self.send(version.version, event).await?;
        }
        Ok(())
    }
}

/// A stream fed by `produce` through a one-message buffer: the producer waits while the client
/// is not reading, so nothing queues per subscriber.
fn async_stream<F, Fut>(produce: F) -> Events
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ConfigEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
