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
mod grpc_wire;
mod management;
pub mod metrics;
mod ofrep;
mod openapi;
mod selector;
mod serve;
pub mod store_cli;
mod streams;
pub mod telemetry;
mod transcode;
pub mod validate;
mod vexil_api;

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

use vexil_cache::{ConfigCache, InProcess, RedisCache};
use vexil_service::{Live, LiveConfig, Relay, StoreSource};

use crate::app::{App, AppConfig};
use crate::config::ServeArgs;

/// What the process has been asked to do (by its signals, in `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stop {
    /// Serve.
    #[default]
    Running,
    /// Stop gracefully (SIGTERM): `/readyz` and grpc.health answer not-serving for
    /// `--shutdown-delay` while requests are still served, so load balancers take the replica out;
    /// then the listeners close and in-flight requests and streams (told `provider_shutdown`) get
    /// `--shutdown-timeout` to finish.
    Drain,
    /// Stop without the delay (SIGINT, or a second signal); in-flight requests still get
    /// `--shutdown-timeout`.
    Now,
}

/// Runs the server until `signals` asks it to stop (SIGTERM/SIGINT when called from `main`).
pub async fn serve(args: ServeArgs, signals: watch::Receiver<Stop>) -> anyhow::Result<()> {
    let (draining_tx, draining) = watch::channel(false);
    let (stop_tx, shutdown) = watch::channel(false);
    let drain = tokio::spawn(drain(signals, args.shutdown_delay, draining_tx, stop_tx));
    let (sources, statics) = args
        .check()
        .map_err(|problems| anyhow::anyhow!("invalid configuration:\n  - {}", problems.join("\n  - ")))?;
    // First, so the store's and the cache's first calls (the initial load) are measured too.
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    let upkeep = metrics::spawn_upkeep(prometheus.clone());
    let live_config = LiveConfig {
        sources,
        fractional: args.fractional,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        stale_after: (!args.stale_after.is_zero()).then_some(args.stale_after),
    };
    let mut sources = live_config.open_sources();
    let managed = match args.store_url() {
        Some(url) => {
            let managed = managed(&url, &args).await?;
            sources.push(managed.source.clone());
            Some(Arc::new(managed))
        }
        None if args.redis_url.is_some() => {
            anyhow::bail!("--redis-url needs the store (replicas share its database): give --database-url")
        }
        None => None,
    };
    let relay = managed
        .as_ref()
        .map(|m| tokio::spawn(m.relay.clone().run(RELAY_INTERVAL)));
    let results_refresh = managed.as_ref().filter(|_| args.results_refresh_seconds > 0).map(|m| {
        let interval = Duration::from_secs(args.results_refresh_seconds);
        tokio::spawn(vexil_api::refresh_results(m.clone(), interval))
    });
    let retention = managed.as_ref().map(|m| {
        let dedupe = Duration::from_secs(u64::from(args.track_dedupe_days) * 86_400);
        let keep =
            (args.event_retention_days > 0).then(|| Duration::from_secs(u64::from(args.event_retention_days) * 86_400));
        tokio::spawn(event_retention(m.store.clone(), dedupe, keep))
    });
    let live = Live::compose(sources, live_config.options()).await;
    let watcher = live.watch();
    let cache = managed.as_ref().map(|m| m.source.cache().clone());
    let gauges = tokio::spawn(track_config(live.clone(), managed.clone()));

    let app = App::new(AppConfig {
        live: live.clone(),
        statics,
        stream_deadline: (!args.stream_deadline.is_zero()).then_some(args.stream_deadline),
        disable_sync_metadata: args.disable_sync_metadata,
        max_body: args.max_request_body,
        max_streams: usize::try_from(args.max_streams).unwrap_or(usize::MAX),
        shutdown: shutdown.clone(),
        exposures: match &managed {
            Some(managed) => managed.tracker.clone(),
            None => Arc::new(vexil_service::NoExposures),
        },
    });

    if args.flagd_keys && managed.is_none() {
        anyhow::bail!("--flagd-keys needs the store (the API keys live there): give --database-url");
    }
    let cors = cors(&args.cors_origin);
    let grpc = grpc_routes(&app, managed.as_ref(), args.max_request_body, draining.clone())?.into_axum_router();
    let evaluation = evaluation_router(grpc.clone(), args.max_request_body);
    let sync = sync_router(&app, args.max_request_body);
    let management = management::router(live.clone(), prometheus, cache, draining.clone())
        .merge(health_router(managed.is_some(), draining.clone()));
    let mut ofrep = ofrep::router(app.clone());
    if managed.is_some() {
        ofrep = ofrep.merge(transcode::router(grpc, args.max_request_body));
    }
    // With --flagd-keys, flagd's protocols want a key too (inside CORS, so browsers read refusals).
    let (evaluation, sync, ofrep) = match managed.as_ref().filter(|_| args.flagd_keys) {
        Some(managed) => {
            let guard = || axum::middleware::from_fn_with_state(managed.clone(), vexil_api::require_key);
            (evaluation.layer(guard()), sync.layer(guard()), ofrep.layer(guard()))
        }
        None => (evaluation, sync, ofrep),
    };
    let evaluation = evaluation.layer(cors.clone());
    let ofrep = ofrep.layer(cors);

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
        shutdown_timeout: args.shutdown_timeout,
    };
    let bind = |port: u16| SocketAddr::new(args.bind, port);
    // Management stays plain HTTP (probes and scrapers); the client-facing ports use TLS if given.
    let servers = [
        ("evaluation", bind(args.port), evaluation, tls.clone(), true),
        ("management", bind(args.management_port), management, None, false),
        ("sync", bind(args.sync_port), sync, tls.clone(), true),
        ("ofrep", bind(args.ofrep_port), ofrep, tls, false),
    ];
    let mut tasks = Vec::new();
    for (name, addr, router, tls, rpc) in servers {
        // HTTP requests are labelled with the route they matched (its template); RPCs with their
        // method.
        let router = if rpc {
            router
        } else {
            router.route_layer(telemetry::RouteLayer)
        };
        let requests = telemetry::Requests { port: addr.port(), rpc };
        let listener = serve::bind(name, addr).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(server = name, %addr, scheme, "listening");
        tasks.push(tokio::spawn(serve::serve(
            name,
            requests,
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
    drain.abort();
    watcher.abort();
    gauges.abort();
    if let Some(relay) = relay {
        relay.abort();
    }
    if let Some(retention) = retention {
        retention.abort();
    }
    if let Some(refresh) = results_refresh {
        refresh.abort();
    }
    if let Some(managed) = &managed {
        // Exposures queued and events of calls still being written are committed before exit.
        managed.tracker.close().await;
    }
    upkeep.abort();
    tracing::info!("stopped");
    Ok(())
}

/// The managed store: opened (and migrated), its source, and access to Vexil's API.
async fn managed(url: &str, args: &ServeArgs) -> anyhow::Result<vexil_api::Managed> {
    let store = vexil_store::SqlStore::open(url)
        .await
        .with_context(|| format!("cannot open the store at {}", vexil_store::redact(url)))?;
    tracing::info!(database = %store.database(), environment = %args.default_environment, "managed store open");
    let store: Arc<dyn vexil_store::Store> = Arc::new(store);
    let cache: Arc<dyn ConfigCache> = match &args.redis_url {
        Some(url) => {
            let roots = match &args.redis_ca_cert {
                Some(path) => Some(
                    std::fs::read(path).with_context(|| format!("cannot read --redis-ca-cert {}", path.display()))?,
                ),
                None => None,
            };
            let cache = RedisCache::connect_with_roots(url, &args.redis_key_prefix, roots.as_deref())
                .with_context(|| format!("invalid --redis-url {}", vexil_store::redact(url)))?;
            tracing::info!(redis = %vexil_store::redact(url), prefix = %args.redis_key_prefix, "config cache and change bus on Redis");
            Arc::new(cache)
        }
        None => Arc::new(InProcess::new()),
    };
    let poll = Duration::from_millis(args.store_poll_interval_ms);
    let source =
        Arc::new(StoreSource::new(store.clone(), args.default_environment.clone(), poll).with_cache(cache.clone()));
    let relay = Relay::new(store.clone(), cache);
    let admin_token = args.admin_token.clone();
    let access = vexil_api::Access::new(store.clone(), admin_token);
    if access.open().await.unwrap_or(false) {
        tracing::warn!(
            "no API key exists and VEXIL_ADMIN_TOKEN is not set: the admin API answers clients on this machine (loopback) without a key; create one with `vexil keys create --role admin`"
        );
    }
    let tracker = Arc::new(vexil_service::Tracker::new(store.clone(), tracker_config(args)?));
    Ok(vexil_api::Managed {
        store,
        source,
        relay,
        access,
        tracker,
        results: vexil_api::ScheduledResults::default(),
        fail_point: vexil_api::FailPoint::from_env(),
    })
}

/// How often event ids and old events are pruned.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Every hour (the first time a minute after start): forgets event ids older than `dedupe`, and
/// deletes events older than `keep`. Every replica does it; the deletes are idempotent.
async fn event_retention(store: Arc<dyn vexil_store::Store>, dedupe: Duration, keep: Option<Duration>) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    let mut tick = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        tick.tick().await;
        match store.prune_event_ids(dedupe).await {
            Ok(n) if n > 0 => tracing::info!(ids = n, "forgot old event ids"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot prune event ids; trying again later"),
        }
        if let Some(keep) = keep {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let before = i64::try_from(now.saturating_sub(keep).as_millis()).unwrap_or(0);
            match store.delete_events_before(before).await {
                Ok(n) if n > 0 => tracing::info!(events = n, "deleted events past their retention"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot delete old events; trying again later"),
            }
        }
    }
}

/// The tracker's rate limit and property policies from the command line.
fn tracker_config(args: &ServeArgs) -> anyhow::Result<vexil_service::TrackerConfig> {
    let mut config = vexil_service::TrackerConfig {
        rate_limit: (args.track_rate_limit > 0).then_some(vexil_service::RateLimit {
            per_second: args.track_rate_limit,
            burst: args.track_burst.max(1),
        }),
        ..vexil_service::TrackerConfig::default()
    };
    config.default_policy.scrub_emails = args.track_scrub_emails;
    for spec in &args.track_properties {
        let Some((environment, keys)) = spec.split_once('=') else {
            anyhow::bail!("--track-properties `{spec}`: expected <environment>=<key>,<key>,…");
        };
        let mut policy = config.default_policy.clone();
        policy.allowed_properties = Some(
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
        );
        config.policies.insert(environment.trim().to_owned(), policy);
    }
    Ok(config)
}

/// Every gRPC service of port 8013: flagd's, Vexil's own (with a store), health and reflection.
pub(crate) fn grpc_routes(
    app: &App,
    managed: Option<&Arc<vexil_api::Managed>>,
    max_body: usize,
    draining: watch::Receiver<bool>,
) -> anyhow::Result<tonic::service::Routes> {
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
    .add_service(health_service(managed.is_some(), draining))
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha);
    let Some(managed) = managed else {
        return Ok(routes);
    };
    use vexil_proto::vexil::v1::admin_service_server::AdminServiceServer;
    use vexil_proto::vexil::v1::bootstrap_service_server::BootstrapServiceServer;
    use vexil_proto::vexil::v1::config_service_server::ConfigServiceServer;
    use vexil_proto::vexil::v1::evaluation_service_server::EvaluationServiceServer;
    use vexil_proto::vexil::v1::tracking_service_server::TrackingServiceServer;
    let admin = vexil_api::Admin {
        managed: managed.clone(),
    };
    let evaluation = vexil_api::EvaluationApi {
        app: app.clone(),
        managed: managed.clone(),
    };
    let bootstrap = evaluation.clone();
    let config = vexil_api::ConfigApi {
        app: app.clone(),
        managed: managed.clone(),
    };
    Ok(routes
        .add_service(AdminServiceServer::new(admin).max_decoding_message_size(max_body))
        .add_service(EvaluationServiceServer::new(evaluation).max_decoding_message_size(max_body))
        .add_service(ConfigServiceServer::new(config).max_decoding_message_size(max_body))
        .add_service(BootstrapServiceServer::new(bootstrap).max_decoding_message_size(max_body))
        .add_service(
            TrackingServiceServer::new(vexil_api::TrackingApi {
                managed: managed.clone(),
            })
            .max_decoding_message_size(max_body),
        ))
}

/// 8013: the gRPC services over gRPC, gRPC-web and Connect.
pub(crate) fn evaluation_router(tonic: Router, max_body: usize) -> Router {
    let connect = connect::Connect::new(tonic.clone(), max_body);
    let grpc = tonic.layer(tonic_web::GrpcWebLayer::new());
    // One port, three protocols: Connect requests are told apart by their content type and reach
    // the same tonic routes through the generic Connect layer; gRPC and gRPC-web go to tonic.
    let dispatch = tower::service_fn(move |request: axum::extract::Request| {
        let (grpc, connect) = (grpc.clone(), connect.clone());
        async move {
            if connect::is_connect(request.headers()) {
                let (parts, body) = request.into_parts();
                let peer = parts.extensions.get::<serve::Peer>().copied();
                Ok(connect::handle(&connect, parts.uri.path(), parts.headers, peer, body).await)
            } else {
                grpc.oneshot(request).await
            }
        }
    });
    Router::new().fallback_service(dispatch)
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

/// grpc.health.v1: the server, flagd's services and, with a store, Vexil's own, all serving.
/// Every service answers NOT_SERVING once `draining` turns true (the server is stopping).
fn health_service(
    managed: bool,
    mut draining: watch::Receiver<bool>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let flagd = [
        "",
        "flagd.evaluation.v1.Service",
        "flagd.evaluation.v2.Service",
        "schema.v1.Service",
    ];
    let vexil = [
        "vexil.v1.AdminService",
        "vexil.v1.EvaluationService",
        "vexil.v1.ConfigService",
    ];
    let names: Vec<&'static str> = flagd.into_iter().chain(vexil.into_iter().filter(|_| managed)).collect();
    tokio::spawn(async move {
        for &name in &names {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        if draining.wait_for(|d| *d).await.is_ok() {
            for &name in &names {
                reporter
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        }
    });
    service
}

/// grpc.health.v1 on the management port too (flagd serves it there).
fn health_router(managed: bool, draining: watch::Receiver<bool>) -> Router {
    tonic::service::Routes::new(health_service(managed, draining)).into_axum_router()
}

/// Turns the process's signals into the server's two phases: `draining` (readiness drops) at the
/// first, then, after `delay` (cut short by [`Stop::Now`]), `stop` (listeners close, streams end).
async fn drain(
    mut signals: watch::Receiver<Stop>,
    delay: Duration,
    draining: watch::Sender<bool>,
    stop: watch::Sender<bool>,
) {
    let first = match signals.wait_for(|s| *s != Stop::Running).await.map(|s| *s) {
        Ok(s) => s,
        // Nobody can ask any more: serve until the process ends.
        Err(_) => return std::future::pending().await,
    };
    let _ = draining.send(true);
    if first == Stop::Drain && !delay.is_zero() {
        tracing::info!(
            delay_seconds = delay.as_secs_f64(),
            "draining: readiness answers 503 while requests are still served, then the listeners close"
        );
        let now = async {
            if signals.wait_for(|s| *s == Stop::Now).await.map(|_| ()).is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = now => tracing::info!("stopping now"),
        }
    }
    tracing::info!("closing the listeners; in-flight requests and streams finish");
    let _ = stop.send(true);
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

/// How often the outbox relay sweeps for changes whose writer did not publish them.
const RELAY_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps the gauges of the configuration, the store, the cache and the tracker current: on every
/// change, and every [`metrics::UPKEEP_INTERVAL`].
async fn track_config(live: Live, managed: Option<Arc<vexil_api::Managed>>) {
    let mut rx = live.subscribe();
    let mut tick = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    let mut gauges = metrics::ConfigGauges::default();
    loop {
        let published = rx.borrow_and_update().clone();
        gauges.published(&published, &live.readiness(), managed.is_some());
        if let Some(managed) = &managed {
            gauges.environments(&managed.source, &*managed.store).await;
            metrics::replication(&managed.source, managed.relay.published());
            metrics::tracking(&managed.tracker.stats());
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}
