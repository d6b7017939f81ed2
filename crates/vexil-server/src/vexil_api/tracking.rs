//! `vexil.v1.TrackingService`: wire → access check → the tracker (validation, scrubbing, rate
//! limit, group commit) → wire. The answer is sent once the accepted events are committed.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::tracking_service_server::TrackingService;
use vexil_service::{EventOutcome, TrackError, TrackEvent};
use vexil_store::EventKind;

use super::Managed;
use super::auth::{Need, Principal};
use super::convert;
use crate::error::{ErrorKind, grpc_status};

#[derive(Debug, Clone)]
pub struct TrackingApi {
    pub managed: Arc<Managed>,
}

impl TrackingApi {
    /// The environment events go to (asked for, else the key's, else the default one) and the
    /// rate limiter's key (the API key, else the environment).
    async fn scope<T>(&self, request: &Request<T>, asked: &str) -> Result<(String, String), Status> {
        let environment = if asked.is_empty() {
            match self.managed.access.key_scope(request.metadata()).await? {
                Some(scope) => scope,
                None => self.managed.source.default_environment().to_owned(),
            }
        } else {
            asked.to_owned()
        };
        let principal = self.managed.check(request, Need::Track(&environment)).await?;
        let limiter = match principal {
            Principal::Key(key) => format!("key:{}", key.prefix),
            Principal::AdminToken => "admin-token".to_owned(),
            Principal::Anonymous => format!("environment:{environment}"),
        };
        Ok((environment, limiter))
    }

    async fn track(
        &self,
        environment: &str,
        limiter: &str,
        events: Vec<pb::TrackEvent>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        if events.len() > vexil_service::tracking::MAX_BATCH {
            return Err(track_status(TrackError::TooMany {
                max: vexil_service::tracking::MAX_BATCH,
                events: events.len(),
            }));
        }
        // Events whose kind does not parse are rejected here, the others go to the tracker with
        // their positions kept.
        let mut rejected = Vec::new();
        let mut ids = Vec::with_capacity(events.len());
        let mut sent = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            ids.push(event.event_id.clone());
            match track_event(event) {
                Ok(event) => {
                    positions.push(index);
                    sent.push(event);
                }
                Err(reason) => rejected.push((index, reason)),
            }
        }
        let outcome = self
            .managed
            .tracker
            .track(environment, limiter, sent)
            .await
            .map_err(track_status)?;
        let (mut accepted, mut duplicates) = (0u32, 0u32);
        for (position, event) in positions.into_iter().zip(outcome.events) {
            match event {
                EventOutcome::New => accepted += 1,
                EventOutcome::Duplicate => duplicates += 1,
                EventOutcome::Rejected { reason } => rejected.push((position, reason)),
            }
        }
        rejected.sort_by_key(|(index, _)| *index);
        Ok(Response::new(pb::TrackResponse {
            accepted,
            duplicates,
            rejected: rejected
                .into_iter()
                .map(|(index, reason)| pb::RejectedEvent {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    event_id: ids[index].clone(),
                    reason,
                })
                .collect(),
        }))
    }
}

/// An event off the wire; `Err`: why it is rejected.
fn track_event(e: pb::TrackEvent) -> Result<TrackEvent, String> {
    let kind = match e.kind.as_str() {
        "" => return Err("`kind` is required: exposure, conversion or custom".into()),
        k => EventKind::parse(k).ok_or_else(|| format!("`{k}` is not a kind: exposure, conversion or custom"))?,
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(TrackEvent {
        event_id: e.event_id,
        kind,
        unit: e.unit,
        flag: some(e.flag),
        experiment: some(e.experiment),
        variant: some(e.variant),
        metric: some(e.metric),
        value: e.value,
        properties: e.properties.map(|p| p.into_map()).unwrap_or_default(),
        client_time_ms: e.client_time.as_ref().map(convert::millis),
    })
}

/// The status of a call that failed whole (the tracker documents each).
fn track_status(e: TrackError) -> Status {
    let kind = match &e {
        // Retrying will not help: split the batch.
        TrackError::TooMany { .. } | TrackError::OverBurst { .. } => ErrorKind::InvalidArgument,
        TrackError::RateLimited { .. } => ErrorKind::ResourceExhausted,
        TrackError::Unavailable(_) => ErrorKind::Unavailable,
    };
    let mut status = grpc_status(kind, e.to_string());
    if let TrackError::RateLimited { retry_after } = e {
        // Whole seconds, rounded up; the JSON routes turn it into `Retry-After`.
        let seconds = retry_after.as_millis().div_ceil(1000).max(1);
        if let Ok(value) = seconds.to_string().parse() {
            status.metadata_mut().insert("retry-after", value);
        }
    }
    status
}

#[tonic::async_trait]
impl TrackingService for TrackingApi {
    async fn track(&self, request: Request<pb::TrackRequest>) -> Result<Response<pb::TrackResponse>, Status> {
        let asked = request.get_ref().environment.clone();
        let (environment, limiter) = self.scope(&request, &asked).await?;
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| grpc_status(ErrorKind::InvalidArgument, "`event` is required"))?;
        TrackingApi::track(self, &environment, &limiter, vec![event]).await
    }

    async fn track_batch(
        &self,
        request: Request<pb::TrackBatchRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let asked = request.get_ref().environment.clone();
        let (environment, limiter) = self.scope(&request, &asked).await?;
        TrackingApi::track(self, &environment, &limiter, request.into_inner().events).await
    }
}
