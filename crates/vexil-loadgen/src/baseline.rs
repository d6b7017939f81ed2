//! The baseline: servers that do no work behind the same protocol stack (tonic on axum/hyper, h2c;
//! axum for HTTP/JSON) and answer every request with a canned response of the same shape and size
//! as Vexil's, so a run's Vexil/baseline ratio is what Vexil's own work costs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use vexil_proto::flagd::evaluation::{v1, v2};

/// The responses the baseline answers with, captured from Vexil for the run's workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Canned {
    pub resolve_boolean: v1::ResolveBooleanResponse,
    pub resolve_string: v1::ResolveStringResponse,
    pub resolve_all: v1::ResolveAllResponse,
    pub v2_boolean: v2::ResolveBooleanResponse,
    pub ofrep_single: String,
    pub ofrep_bulk: String,
}

#[derive(Debug, Clone)]
struct NoOp(Arc<Canned>);

type Stream<T> = tokio_stream::wrappers::ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl v1::service_server::Service for NoOp {
    async fn resolve_all(&self, _: Request<v1::ResolveAllRequest>) -> Result<Response<v1::ResolveAllResponse>, Status> {
        Ok(Response::new(self.0.resolve_all.clone()))
    }
    async fn resolve_boolean(
        &self,
        _: Request<v1::ResolveBooleanRequest>,
    ) -> Result<Response<v1::ResolveBooleanResponse>, Status> {
        Ok(Response::new(self.0.resolve_boolean.clone()))
    }
    async fn resolve_string(
        &self,
        _: Request<v1::ResolveStringRequest>,
    ) -> Result<Response<v1::ResolveStringResponse>, Status> {
        Ok(Response::new(self.0.resolve_string.clone()))
    }
    async fn resolve_float(
        &self,
        _: Request<v1::ResolveFloatRequest>,
    ) -> Result<Response<v1::ResolveFloatResponse>, Status> {
        Ok(Response::new(v1::ResolveFloatResponse::default()))
    }
    async fn resolve_int(&self, _: Request<v1::ResolveIntRequest>) -> Result<Response<v1::ResolveIntResponse>, Status> {
        Ok(Response::new(v1::ResolveIntResponse::default()))
    }
    async fn resolve_object(
        &self,
        _: Request<v1::ResolveObjectRequest>,
    ) -> Result<Response<v1::ResolveObjectResponse>, Status> {
        Ok(Response::new(v1::ResolveObjectResponse::default()))
    }
    type EventStreamStream = Stream<v1::EventStreamResponse>;
    async fn event_stream(
        &self,
        _: Request<v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        Err(Status::unimplemented("the baseline has no streams"))
    }
}

#[tonic::async_trait]
impl v2::service_server::Service for NoOp {
    async fn resolve_boolean(
        &self,
        _: Request<v2::ResolveBooleanRequest>,
    ) -> Result<Response<v2::ResolveBooleanResponse>, Status> {
        Ok(Response::new(self.0.v2_boolean.clone()))
    }
    async fn resolve_string(
        &self,
        _: Request<v2::ResolveStringRequest>,
    ) -> Result<Response<v2::ResolveStringResponse>, Status> {
        Ok(Response::new(v2::ResolveStringResponse::default()))
    }
    async fn resolve_float(
        &self,
        _: Request<v2::ResolveFloatRequest>,
    ) -> Result<Response<v2::ResolveFloatResponse>, Status> {
        Ok(Response::new(v2::ResolveFloatResponse::default()))
    }
    async fn resolve_int(&self, _: Request<v2::ResolveIntRequest>) -> Result<Response<v2::ResolveIntResponse>, Status> {
        Ok(Response::new(v2::ResolveIntResponse::default()))
    }
    async fn resolve_object(
        &self,
        _: Request<v2::ResolveObjectRequest>,
    ) -> Result<Response<v2::ResolveObjectResponse>, Status> {
        Ok(Response::new(v2::ResolveObjectResponse::default()))
    }
    type EventStreamStream = Stream<v2::EventStreamResponse>;
    async fn event_stream(
        &self,
        _: Request<v2::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        Err(Status::unimplemented("the baseline has no streams"))
    }
}

/// Runs the baseline on the given ports until the process is killed.
pub async fn run(evaluation: u16, management: u16, ofrep: u16, canned: Canned) -> anyhow::Result<()> {
    let canned = Arc::new(canned);
    let grpc = tonic::service::Routes::new(v1::service_server::ServiceServer::new(NoOp(canned.clone())))
        .add_service(v2::service_server::ServiceServer::new(NoOp(canned.clone())))
        .add_service(tonic_health::server::health_reporter().1)
        .into_axum_router();
    let (single, bulk) = (
        Bytes::from(canned.ofrep_single.clone()),
        Bytes::from(canned.ofrep_bulk.clone()),
    );
    let json = || [(http::header::CONTENT_TYPE, "application/json")];
    let ofrep_router = Router::new()
        .route(
            "/ofrep/v1/evaluate/flags",
            post(move |_body: Bytes| async move { (json(), bulk.clone()) }),
        )
        .route(
            "/ofrep/v1/evaluate/flags/{key}",
            post(move |_body: Bytes| async move { (json(), single.clone()) }),
        );
    let management_router = Router::new().route("/readyz", get(|| async { "ready" }));
    let serve = |port: u16, router: Router| async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        // TCP_NODELAY, as Vexil's own accept loop sets it.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router).await?;
        anyhow::Ok(())
    };
    tokio::try_join!(
        serve(evaluation, grpc),
        serve(ofrep, ofrep_router),
        serve(management, management_router)
    )?;
    Ok(())
}
