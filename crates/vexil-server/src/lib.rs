//! The `vexil` server: wires the live configuration to flagd's protocols on flagd's ports.
//!
//! | port | serves |
//! |---|---|
//! | 8013 | `flagd.evaluation.v1`, `flagd.evaluation.v2`, `schema.v1` (gRPC, gRPC-web and Connect), `grpc.health.v1`, reflection |
//! | 8014 | `/healthz`, `/readyz`, `/metrics` |
//! | 8015 | `flagd.sync.v1` |
//! | 8016 | OFREP |
//!
//! This is the only crate that sees wire types; handlers convert, call `App`, convert back.

#![forbid(unsafe_code)]

pub mod app;
mod body;
pub mod config;
mod connect;
mod error;
mod flagd;
#[doc(hidden)]
pub mod fuzzing;
mod management;
pub mod metrics;
mod ofrep;
mod selector;
mod serve;
pub mod store_cli;
mod streams;
pub mod validate;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use std::sync::Arc;
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::flagd::sync::v1::flag_sync_service_server::FlagSyncServiceServer;
use vexil_proto::schema::v1 as schema_v1;

use vexil_service::{Live, LiveConfig, StoreSource};

use crate::app::{App, AppConfig};
use crate::config::ServeArgs;

/// Runs the server until `shutdown` turns `true` (or SIGTERM/SIGINT when called from `main`).
pub async fn serve(args: ServeArgs, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (sources, statics) = args
        .check()
        .map_err(|problems| anyhow::anyhow!("invalid configuration:\n  - {}", problems.join("\n  - ")))?;
    let live_config = LiveConfig {
        sources,
        fractional: args.fractional,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        stale_after: (!args.stale_after.is_zero()).then_some(args.stale_after),
    };
    let mut sources = live_config.open_sources();
    if let Some(url) = args.store_url() {
        let store = vexil_store::SqlStore::open(&url)
            .await
            .with_context(|| format!("cannot open the store at {}", vexil_store::redact(&url)))?;
        tracing::info!(database = %store.database(), environment = %args.default_environment, "managed store open");
        let poll = Duration::from_millis(args.store_poll_interval_ms);
        sources.push(Arc::new(StoreSource::new(
            Arc::new(store),
            args.default_environment.clone(),
            poll,
        )));
    }
    let live = Live::compose(sources, live_config.options()).await;
    let watcher = live.watch();
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    let upkeep = metrics::spawn_upkeep(prometheus.clone());
    let gauges = tokio::spawn(track_config(live.clone()));

    let app = App::new(AppConfig {
        live: live.clone(),
        statics,
        stream_deadline: (!args.stream_deadline.is_zero()).then_some(args.stream_deadline),
        disable_sync_metadata: args.disable_sync_metadata,
        max_body: args.max_request_body,
        max_streams: usize::try_from(args.max_streams).unwrap_or(usize::MAX),
        shutdown: shutdown.clone(),
    });

    let cors = cors(&args.cors_origin);
    let evaluation = evaluation_router(&app, args.max_request_body)?.layer(cors.clone());
    let sync = sync_router(&app, args.max_request_body);
    let management = management::router(live.clone(), prometheus).merge(health_router());
    let ofrep = ofrep::router(app.clone()).layer(cors);

    let tls = match (&args.server_cert_path, &args.server_key_path) {
        (Some(cert), Some(key)) => Some(serve::tls_acceptor(cert, key)?),
        _ => None,
    };
    let limits = serve::Limits {
        max_header_bytes: args.max_request_header,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: args.header_read_timeout,
        idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
        body_read_timeout: args.body_read_timeout,
    };
    let bind = |port: u16| SocketAddr::new(args.bind, port);
    // Management stays plain HTTP (probes and scrapers); the client-facing ports use TLS if given.
    let servers = [
        ("evaluation", bind(args.port), evaluation, tls.clone()),
        ("management", bind(args.management_port), management, None),
        ("sync", bind(args.sync_port), sync, tls.clone()),
        ("ofrep", bind(args.ofrep_port), ofrep, tls),
    ];
    let mut tasks = Vec::new();
    for (name, addr, router, tls) in servers {
        let listener = serve::bind(name, addr).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "{name} listening");
        tasks.push(tokio::spawn(serve::serve(
            name,
            listener,
            router,
            tls,
            limits,
            shutdown.clone(),
        )));
    }
    for task in tasks {
        task.await??;
    }
    watcher.abort();
    gauges.abort();
    upkeep.abort();
    tracing::info!("stopped");
    Ok(())
}

/// 8013: flagd's evaluation APIs over gRPC and gRPC-web, health and reflection.
pub(crate) fn evaluation_router(app: &App, max_body: usize) -> anyhow::Result<Router> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vexil_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vexil_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(
        v1::service_server::ServiceServer::new(flagd::evaluation::EvaluationV1 { app: app.clone() })
            .max_decoding_message_size(max_body),
    )
    .add_service(
        v2::service_server::ServiceServer::new(flagd::evaluation::EvaluationV2 { app: app.clone() })
            .max_decoding_message_size(max_body),
    )
    .add_service(
        schema_v1::service_server::ServiceServer::new(flagd::evaluation::SchemaV1 { app: app.clone() })
            .max_decoding_message_size(max_body),
    )
    .add_service(health_service())
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha);
    let tonic = routes.into_axum_router();
    let connect = connect::Connect::new(tonic.clone(), max_body);
    let grpc = tonic.layer(tonic_web::GrpcWebLayer::new());
    // One port, three protocols: Connect requests are told apart by their content type and reach
    // the same tonic routes through the generic Connect layer; gRPC and gRPC-web go to tonic.
    let dispatch = tower::service_fn(move |request: axum::extract::Request| {
        let (grpc, connect) = (grpc.clone(), connect.clone());
        async move {
            if connect::is_connect(request.headers()) {
                let (parts, body) = request.into_parts();
                Ok(connect::handle(&connect, parts.uri.path(), parts.headers, body).await)
            } else {
                grpc.oneshot(request).await
            }
        }
    });
    Ok(Router::new().fallback_service(dispatch))
}

/// 8015: flagd.sync.v1. SyncFlags is framed by hand (shared payload bytes, see `flagd::sync`);
/// FetchAllFlags and GetMetadata are tonic's.
fn sync_router(app: &App, max_body: usize) -> Router {
    let tonic = tonic::service::Routes::new(
        FlagSyncServiceServer::new(flagd::sync::Sync { app: app.clone() }).max_decoding_message_size(max_body),
    )
    .into_axum_router();
    Router::new()
        .route(
            flagd::sync::SYNC_FLAGS_PATH,
            axum::routing::post(flagd::sync::sync_flags_grpc),
        )
        .with_state(app.clone())
        .fallback_service(tonic)
}

fn health_service() -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        for name in [
            "",
            "flagd.evaluation.v1.Service",
            "flagd.evaluation.v2.Service",
            "schema.v1.Service",
        ] {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
    });
    service
}

/// grpc.health.v1 on the management port too (flagd serves it there).
fn health_router() -> Router {
    tonic::service::Routes::new(health_service()).into_axum_router()
}

/// CORS for the flagd protocols (8013, 8016). Like flagd, no `-C` allows every origin (browser
/// providers work against a default server); `-C` restricts to the origins given.
fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.is_empty() || origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let exposed = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "connect-protocol-version",
        "etag",
    ]
    .map(http::HeaderName::from_static);
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(Any)
        .allow_headers(Any)
        .expose_headers(exposed)
}

/// Keeps the configuration gauges current.
async fn track_config(live: Live) {
    let mut rx = live.subscribe();
    loop {
        let (version, flags) = {
            let p = rx.borrow_and_update();
            (p.version, p.snapshot.len())
        };
        metrics::config(version, flags);
        if rx.changed().await.is_err() {
            return;
        }
    }
}
