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
    /// Results computed on the schedule, by environment and experiment (default options).
    pub results: ScheduledResults,
    pub fail_point: FailPoint,
}

/// The results of running experiments, computed every interval with the default options (so a
/// dashboard polling them costs the database nothing); a request with `refresh` or other options
/// computes its own.
#[derive(Debug, Default)]
pub struct ScheduledResults {
    latest:
        std::sync::Mutex<std::collections::HashMap<(String, String), Arc<vexil_proto::vexil::v1::ExperimentResults>>>,
}

impl ScheduledResults {
    /// The last results computed for an experiment, if any.
    pub fn get(&self, environment: &str, key: &str) -> Option<Arc<vexil_proto::vexil::v1::ExperimentResults>> {
        let latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.get(&(environment.to_owned(), key.to_owned())).cloned()
    }

    fn put(&self, environment: &str, key: &str, results: vexil_proto::vexil::v1::ExperimentResults) {
        let mut latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.insert((environment.to_owned(), key.to_owned()), Arc::new(results));
    }

    /// Keeps only the experiments in `running`.
    fn retain(&self, running: &std::collections::HashSet<(String, String)>) {
        let mut latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.retain(|k, _| running.contains(k));
    }
}

/// Every `interval`: computes the results of every running or paused experiment of every
/// environment with the default options. Failures are logged and tried again next time.
pub async fn refresh_results(managed: Arc<Managed>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut running = std::collections::HashSet::new();
        let environments = match all_pages(|page| managed.store.list_environments(page)).await {
            Ok(environments) => environments,
            Err(error) => {
                tracing::warn!(%error, "cannot list environments to refresh experiment results");
                continue;
            }
        };
        for environment in environments {
            let key = environment.key;
            let experiments = match all_pages(|page| managed.store.list_experiments(key.clone(), page)).await {
                Ok(experiments) => experiments,
                Err(error) => {
                    tracing::warn!(%error, environment = %key, "cannot list experiments to refresh their results");
                    continue;
                }
            };
            for experiment in experiments {
                use vexil_store::ExperimentStatus as S;
                if !matches!(experiment.definition.status, S::Running | S::Paused) {
                    continue;
                }
                running.insert((key.clone(), experiment.key.clone()));
                let now = now_ms();
                match vexil_service::results::experiment_results(
                    &*managed.store,
                    &key,
                    &experiment.key,
                    &vexil_service::results::ResultsOptions::default(),
                    now,
                )
                .await
                {
                    Ok(results) => managed
                        .results
                        .put(&key, &experiment.key, convert::results(results, now)),
                    Err(error) => {
                        tracing::warn!(%error, environment = %key, experiment = %experiment.key, "cannot compute experiment results");
                    }
                }
            }
        }
        managed.results.retain(&running);
    }
}

/// Every item of a paged list.
async fn all_pages<T, F>(mut list: impl FnMut(vexil_store::PageRequest) -> F) -> vexil_store::Result<Vec<T>>
where
    F: std::future::Future<Output = vexil_store::Result<vexil_store::Page<T>>>,
{
    let mut items = Vec::new();
    let mut token = None;
    loop {
        let page = list(vexil_store::PageRequest { token, size: 1000 }).await?;
        items.extend(page.items);
        match page.next {
            Some(next) => token = Some(next),
            None => return Ok(items),
        }
    }
}

/// Now, in milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
