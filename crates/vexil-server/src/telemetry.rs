//! Requests as operators see them: a latency histogram per RPC and per HTTP route (always on, for
//! Prometheus), and, when OpenTelemetry is configured, a span per request on every port with the
//! W3C trace context taken from the request, and an event per flag evaluation following
//! OpenTelemetry's feature-flag semantic conventions.
//!
//! Tracing is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; off, a request costs no span, no header parsing and no evaluation event (one branch on a
//! flag read once). The exporter, sampler, resource and batching read the standard `OTEL_*`
//! variables through the OpenTelemetry SDK.
//!
//! Labels are bounded: an RPC is labelled only when it names a method this server has (from the
//! protos' descriptors), otherwise `unknown`; an HTTP route is the router's template
//! (`/ofrep/v1/evaluate/flags/{key}`), never the request's path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use http::{HeaderMap, Request, Response};
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use vexil_core::Reason;

/// The request latency histogram of gRPC, gRPC-web and Connect calls (OpenTelemetry's
/// `rpc.server.call.duration`).
pub const RPC_DURATION: &str = "rpc_server_call_duration_seconds";
/// The request latency histogram of HTTP requests that are not RPCs (OpenTelemetry's
/// `http.server.request.duration`).
pub const HTTP_DURATION: &str = "http_server_request_duration_seconds";

/// The span target of requests and the event target of evaluations (kept out of the log).
pub const REQUEST_TARGET: &str = "vexil::request";
pub const EVALUATION_TARGET: &str = "vexil::evaluation";

/// `feature_flag.provider.name` of the evaluation events.
pub const PROVIDER_NAME: &str = "Vexil";

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are made (OpenTelemetry is configured and its exporter installed).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// OpenTelemetry as the `OTEL_*` variables ask, read through `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtelSettings {
    /// No endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    Off,
    /// Traces exported over OTLP to the endpoint the SDK reads from the environment.
    Otlp {
        endpoint: String,
        protocol: OtlpProtocol,
        /// A PEM file of the certificate authorities that sign the collector's certificate
        /// (`OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`), trusted beside the system's; for `https://`.
        certificate: Option<PathBuf>,
    },
}

/// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `grpc` (the default here: collectors listen on 4317).
    Grpc,
    /// `http/protobuf` (collectors listen on 4318; `OTEL_EXPORTER_OTLP_ENDPOINT` is the base URL
    /// that `/v1/traces` is appended to, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` the whole URL).
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

impl OtelSettings {
    /// Reads the settings, or every problem with them.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<OtelSettings, Vec<String>> {
        let var = |k: &str| env(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut problems = Vec::new();
        let exporter = var("OTEL_TRACES_EXPORTER");
        match exporter.as_deref() {
            None | Some("otlp") | Some("none") => {}
            Some(other) => problems.push(format!(
                "OTEL_TRACES_EXPORTER `{other}` is not supported (otlp or none)"
            )),
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(p) => {
                problems.push(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL `{p}` is not supported (grpc or http/protobuf)"
                ));
                OtlpProtocol::Grpc
            }
        };
        let certificate = var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| var("OTEL_EXPORTER_OTLP_CERTIFICATE"))
            .map(PathBuf::from);
        for client in ["CLIENT_CERTIFICATE", "CLIENT_KEY"] {
            if var(&format!("OTEL_EXPORTER_OTLP_TRACES_{client}"))
                .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{client}")))
                .is_some()
            {
                problems.push(format!(
                    "OTEL_EXPORTER_OTLP_{client} is not supported (no client certificates towards the collector)"
                ));
            }
        }
        if let Some(s) = var("OTEL_TRACES_SAMPLER") {
            const SAMPLERS: [&str; 6] = [
                "always_on",
                "always_off",
                "traceidratio",
                "parentbased_always_on",
                "parentbased_always_off",
                "parentbased_traceidratio",
            ];
            if !SAMPLERS.contains(&s.as_str()) {
                problems.push(format!(
                    "OTEL_TRACES_SAMPLER `{s}` is not supported ({})",
                    SAMPLERS.join(", ")
                ));
            }
            if s.ends_with("traceidratio") {
                let ratio = var("OTEL_TRACES_SAMPLER_ARG").and_then(|a| a.parse::<f64>().ok());
                if !ratio.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                    problems.push("OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1".to_owned());
                }
            }
        }
        if let Some(e) = &endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            problems.push(format!("the OTLP endpoint `{e}` must be an http:// or https:// URL"));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(match endpoint {
            Some(endpoint) if !disabled && exporter.as_deref() != Some("none") => OtelSettings::Otlp {
                endpoint,
                protocol,
                certificate,
            },
            _ => OtelSettings::Off,
        })
    }
}

/// The installed tracer provider: flushed and shut down by [`Tracing::shutdown`] (or on drop).
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Builds the OTLP exporter and the tracer provider the `OTEL_*` variables describe, sets the
    /// W3C propagators, and turns span making on. Needs a Tokio runtime. `settings` must be
    /// [`OtelSettings::Otlp`]; the SDK reads the rest of the environment itself.
    pub fn install(settings: &OtelSettings) -> anyhow::Result<Tracing> {
        let OtelSettings::Otlp {
            endpoint,
            protocol,
            certificate,
        } = settings
        else {
            anyhow::bail!("OpenTelemetry is not configured");
        };
        // rustls's process-wide provider, for reqwest (tonic names ring itself).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let authority =
            match certificate {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("cannot read OTEL_EXPORTER_OTLP_CERTIFICATE {}: {e}", path.display())
                })?),
                None => None,
            };
        let exporter = match protocol {
            OtlpProtocol::Grpc => {
                use opentelemetry_otlp::WithTonicConfig as _;
                let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &authority {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    builder = builder.with_tls_config(tls);
                }
                builder.build()
            }
            OtlpProtocol::HttpProtobuf => {
                use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
                let builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                match authority {
                    // The SDK's own client (the system's roots, OTEL_EXPORTER_OTLP_TIMEOUT).
                    None => builder.build(),
                    Some(pem) => builder.with_http_client(blocking_client(pem)?).build(),
                }
            }
        }
        .map_err(|e| anyhow::anyhow!("cannot build the OTLP span exporter: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
            Box::new(opentelemetry_sdk::propagation::BaggagePropagator::new()),
        ]));
        opentelemetry::global::set_tracer_provider(provider.clone());
        TRACING.store(true, Ordering::Relaxed);
        Ok(Tracing { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans, for the subscriber.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("vexil", tracing::Level::INFO)
            .with_target("vexil_server", tracing::Level::INFO)
            .with_target("vexil_service", tracing::Level::INFO)
            .with_target("vexil_store", tracing::Level::INFO)
            .with_target("vexil_cache", tracing::Level::INFO)
            .with_default(tracing::Level::WARN);
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("vexil"))
            .with_filter(filter)
    }

    /// Exports what is still queued and stops the exporter.
    pub fn shutdown(&self) {
        TRACING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

/// reqwest's blocking client trusting `pem`'s authorities beside the system's, with the OTLP
/// timeout (`OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` in milliseconds, 10 s by default). Built on a
/// thread of its own: it runs a runtime of its own, which cannot start inside Tokio's.
fn blocking_client(pem: Vec<u8>) -> anyhow::Result<reqwest::blocking::Client> {
    let millis = ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(10_000);
    std::thread::spawn(move || {
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("OTEL_EXPORTER_OTLP_CERTIFICATE is not PEM: {e}"))?;
        anyhow::ensure!(
            !certificates.is_empty(),
            "OTEL_EXPORTER_OTLP_CERTIFICATE holds no certificate"
        );
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_millis(millis));
        for c in certificates {
            builder = builder.add_root_certificate(c);
        }
        builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the OTLP HTTP client: {e}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))?
}

/// The gRPC status code of a response that carries it other than in `grpc-status` (Connect's
/// unary errors), for the request's metrics and span.
#[derive(Debug, Clone, Copy)]
pub struct RpcCode(pub i32);

/// The route template a request matched, copied from the request to the response by
/// [`RouteLayer`] so the server's outermost layer can label the request with it.
#[derive(Debug, Clone)]
struct Route(Arc<str>);

/// Copies axum's [`MatchedPath`] into the response (`Router::route_layer`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLayer;

impl<S> tower::Layer<S> for RouteLayer {
    type Service = RouteService<S>;
    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RouteService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for RouteService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = futures::future::Map<
        S::Future,
        Box<dyn FnOnce(Result<Response<R>, S::Error>) -> Result<Response<R>, S::Error> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        use futures::FutureExt as _;
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map(|m| Route(m.as_str().into()));
        let future = self.inner.call(request);
        future.map(Box::new(move |result: Result<Response<R>, S::Error>| {
            result.map(|mut response| {
                if let Some(route) = route {
                    response.extensions_mut().insert(route);
                }
                response
            })
        }))
    }
}

/// An RPC this server has: `/package.Service/Method`.
#[derive(Debug)]
struct Method {
    path: &'static str,
    service: &'static str,
    name: &'static str,
}

/// Every method of every service served, by path (bounded: from the protos, not from requests).
static METHODS: LazyLock<HashMap<&'static str, Method, foldhash::fast::RandomState>> = LazyLock::new(|| {
    let mut paths: Vec<String> = Vec::new();
    if let Ok(pool) = crate::grpc_wire::pool() {
        for service in pool.services() {
            for method in service.methods() {
                paths.push(format!("/{}/{}", service.full_name(), method.name()));
            }
        }
    }
    paths.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(str::to_owned),
    );
    paths
        .into_iter()
        .map(|p| {
            let path: &'static str = Box::leak(p.into_boxed_str());
            let (service, name) = path[1..].split_once('/').unwrap_or((path, ""));
            (path, Method { path, service, name })
        })
        .collect()
});

/// The RPC system of a request on a gRPC port, by content type.
fn rpc_system(headers: &HeaderMap) -> &'static str {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/grpc-web") {
        "grpc_web"
    } else if ct.starts_with("application/grpc") {
        "grpc"
    } else {
        "connect_rpc"
    }
}

/// What one port's requests are labelled with.
#[derive(Debug, Clone, Copy)]
pub struct Requests {
    /// The port's number (the `server.port` attribute).
    pub port: u16,
    /// Whether the port serves RPCs (8013, 8015): requests to a known method path are RPCs.
    pub rpc: bool,
}

#[derive(Debug)]
enum Kind {
    Rpc {
        system: &'static str,
        method: Option<&'static Method>,
    },
    Http {
        method: &'static str,
    },
}

/// One request being served: measured from its headers until its response body is done (a
/// stream: until it ends), and traced when tracing is on.
#[derive(Debug)]
pub struct Scope {
    port: u16,
    started: Instant,
    kind: Kind,
    route: Option<Arc<str>>,
    http_status: u16,
    grpc_code: Option<i32>,
    span: Option<tracing::Span>,
}

impl Requests {
    /// Starts the scope of `request`, with its span (child of the request's trace context) when
    /// tracing is on.
    pub fn begin<B>(&self, request: &Request<B>) -> Scope {
        let path = request.uri().path();
        let kind = match METHODS.get(path) {
            Some(method) if self.rpc => Kind::Rpc {
                system: rpc_system(request.headers()),
                method: Some(method),
            },
            None if self.rpc && request.method() == http::Method::POST => Kind::Rpc {
                system: rpc_system(request.headers()),
                method: None,
            },
            _ => Kind::Http {
                method: http_method(request.method()),
            },
        };
        let span = if tracing_enabled() {
            request_span(self.port, &kind, request.headers())
        } else {
            None
        };
        Scope {
            port: self.port,
            started: Instant::now(),
            kind,
            route: None,
            http_status: 0,
            grpc_code: None,
            span,
        }
    }
}

fn http_method(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The request's span, child of its trace context, or `None` when the sampler does not sample it
/// (then nothing more is spent on it: no span is entered, no evaluation event made).
fn request_span(port: u16, kind: &Kind, headers: &HeaderMap) -> Option<tracing::Span> {
    use tracing::field::Empty;
    let span = match kind {
        Kind::Rpc {
            system,
            method: Some(m),
        } => tracing::info_span!(
            target: REQUEST_TARGET,
            "request",
            otel.name = &m.path[1..],
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = *system,
            rpc.service = m.service,
            rpc.method = m.name,
            rpc.grpc.status_code = Empty,
            http.request.method = Empty,
            http.route = Empty,
            http.response.status_code = Empty,
            server.port = i64::from(port),
        ),
        Kind::Rpc { system, method: None } => tracing::info_span!(
            target: REQUEST_TARGET,
            "request",
            otel.name = "unknown",
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = *system,
            rpc.service = Empty,
            rpc.method = Empty,
            rpc.grpc.status_code = Empty,
            http.request.method = Empty,
            http.route = Empty,
            http.response.status_code = Empty,
            server.port = i64::from(port),
        ),
        Kind::Http { method } => tracing::info_span!(
            target: REQUEST_TARGET,
            "request",
            otel.name = *method,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = Empty,
            rpc.service = Empty,
            rpc.method = Empty,
            rpc.grpc.status_code = Empty,
            http.request.method = *method,
            http.route = Empty,
            http.response.status_code = Empty,
            server.port = i64::from(port),
        ),
    };
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
    use opentelemetry::trace::TraceContextExt as _;
    // Starting the span asks the sampler.
    span.context().span().span_context().is_sampled().then_some(span)
}

impl Scope {
    /// The span to run the request's handler in, when tracing is on.
    pub fn span(&self) -> Option<&tracing::Span> {
        self.span.as_ref()
    }

    /// Reads what the response's head tells: status, `grpc-status` (a trailers-only gRPC
    /// response), the route matched, Connect's error code.
    pub fn response<B>(&mut self, response: &Response<B>) {
        self.http_status = response.status().as_u16();
        if let Some(route) = response.extensions().get::<Route>() {
            self.route = Some(route.0.clone());
        }
        if let Some(code) = response.extensions().get::<RpcCode>() {
            self.grpc_code = Some(code.0);
        }
        if matches!(self.kind, Kind::Rpc { .. })
            && let Some(code) = grpc_status(response.headers())
        {
            // A trailers-only response (an error before any message).
            self.grpc_code = Some(code);
        }
        if let (Kind::Http { method }, Some(span)) = (&self.kind, &self.span) {
            let status = self.http_status;
            span.record("http.response.status_code", i64::from(status));
            if let Some(route) = &self.route {
                span.record("http.route", &**route);
                // The span has started (its parent was set): rename it on the OpenTelemetry side.
                use opentelemetry::trace::TraceContextExt as _;
                span.context().span().update_name(format!("{method} {route}"));
            }
            if status >= 500 {
                span.record("otel.status_code", "error");
            }
        }
    }

    /// Reads the `grpc-status` of a response's trailers.
    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = grpc_status(trailers) {
            self.grpc_code = Some(code);
        }
    }
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// gRPC's name of a status code (a bounded label).
fn code_label(code: i32) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| CODES.get(i))
        .copied()
        .unwrap_or("2")
}

/// The HTTP status code as a label (bounded: the server's own answers).
fn status_label(status: u16) -> &'static str {
    static LABELS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        (0..600u16)
            .map(|s| &*Box::leak(s.to_string().into_boxed_str()))
            .collect()
    });
    LABELS.get(usize::from(status)).copied().unwrap_or("0")
}

#[derive(Hash, PartialEq, Eq)]
enum HandleKey {
    Rpc(&'static str, &'static str, i32),
    Http(u16, &'static str, Option<Arc<str>>, u16),
}

thread_local! {
    /// Histogram handles per label set, per thread: the request path takes no lock to find one.
    static HANDLES: std::cell::RefCell<HashMap<HandleKey, metrics::Histogram, foldhash::fast::RandomState>> =
        std::cell::RefCell::new(HashMap::default());
}

fn record(key: HandleKey, took: Duration) {
    HANDLES.with(|cell| {
        let mut map = cell.borrow_mut();
        if let Some(h) = map.get(&key) {
            h.record(took.as_secs_f64());
            return;
        }
        let h = match &key {
            HandleKey::Rpc(system, method, code) => metrics::histogram!(
                RPC_DURATION,
                "rpc_system" => *system,
                "rpc_method" => *method,
                "rpc_grpc_status_code" => code_label(*code),
            ),
            HandleKey::Http(port, method, route, status) => metrics::histogram!(
                HTTP_DURATION,
                "http_request_method" => *method,
                "http_route" => route.as_deref().unwrap_or("").to_owned(),
                "http_response_status_code" => status_label(*status),
                "server_port" => port.to_string(),
            ),
        };
        h.record(took.as_secs_f64());
        map.insert(key, h);
    });
}

impl Drop for Scope {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        match &self.kind {
            Kind::Rpc { system, method } => {
                // An RPC that ended with no status (the client went away) is CANCELLED; a Connect
                // reply without an error is OK.
                let code = self.grpc_code.unwrap_or(match self.http_status {
                    200 if *system == "connect_rpc" => 0,
                    _ => 1,
                });
                let name = method.map_or("unknown", |m| &m.path[1..]);
                record(HandleKey::Rpc(system, name, code), took);
                if let Some(span) = &self.span {
                    span.record("rpc.grpc.status_code", i64::from(code));
                    if code != 0 {
                        span.record("otel.status_code", "error");
                    }
                }
            }
            Kind::Http { method } => {
                record(
                    HandleKey::Http(self.port, method, self.route.take(), self.http_status),
                    took,
                );
            }
        }
    }
}

/// Describes the request histograms and sets their buckets (call before the recorder is
/// installed is not needed: the buckets are given to the builder by [`buckets`]).
pub fn describe() {
    metrics::describe_histogram!(
        RPC_DURATION,
        metrics::Unit::Seconds,
        "Duration of gRPC, gRPC-web and Connect calls, from request headers to the end of the response (a stream: its whole life), by method and status code"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Duration of HTTP requests (OFREP, the JSON API, management), by method, route template, status code and port"
    );
}

/// The histogram buckets of request durations: from 10 µs (a flag evaluation) to 10 s (a slow
/// database write), plus the long tail of streams.
pub const BUCKETS: [f64; 14] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 5e-2, 0.25, 1.0, 10.0, 60.0,
];

/// OpenTelemetry's feature-flag evaluation event (`feature_flag.evaluation`) in the current span:
/// the flag, its set, the variant and reason, the error, and the experiment of a `SPLIT`.
#[allow(clippy::too_many_arguments)]
pub fn evaluation_event(
    key: &str,
    flag_set: Option<&str>,
    variant: Option<&str>,
    reason: Reason,
    error: Option<&str>,
    experiment: Option<(&str, &str)>,
    version: u64,
) {
    let reason = reason_value(reason);
    let (experiment_id, experiment_key) = experiment.unzip();
    tracing::event!(
        target: EVALUATION_TARGET,
        tracing::Level::INFO,
        feature_flag.key = key,
        feature_flag.provider.name = PROVIDER_NAME,
        feature_flag.set.id = flag_set,
        feature_flag.result.variant = variant,
        feature_flag.result.reason = reason,
        feature_flag.version = i64::try_from(version).unwrap_or(i64::MAX),
        error.type = error,
        vexil.experiment.id = experiment_id,
        vexil.experiment.key = experiment_key,
        "feature_flag.evaluation"
    );
}

/// The evaluation events of the flag service, in the request's span (composed with the metrics
/// observer only while tracing is on).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracedEvaluations;

impl vexil_service::Observer for TracedEvaluations {
    fn evaluation(&self, e: &vexil_service::Evaluation<'_>) {
        // Only in a request's span: one the sampler left out was never made.
        if !tracing_enabled() || tracing::Span::current().is_none() {
            return;
        }
        let r = e.resolution;
        evaluation_event(
            e.key,
            e.flag_set(),
            r.variant,
            r.reason,
            r.error.as_ref().map(|error| error.code.as_str()),
            r.split
                .as_ref()
                .map(|s| (s.experiment.id.as_str(), s.experiment.key.as_str())),
            e.version,
        );
    }

    /// A bulk evaluation (flagd's ResolveAll, OFREP's bulk) is one span; its flags are not one
    /// event each (a request may evaluate thousands), the span tells how many were evaluated.
    fn bulk_evaluation(&self, bulk: &vexil_service::BulkEvaluation<'_>) {
        if !tracing_enabled() || tracing::Span::current().is_none() {
            return;
        }
        tracing::event!(
            target: EVALUATION_TARGET,
            tracing::Level::INFO,
            feature_flag.provider.name = PROVIDER_NAME,
            feature_flag.version = i64::try_from(bulk.version).unwrap_or(i64::MAX),
            "feature_flag.bulk_evaluation"
        );
    }
}

/// `feature_flag.result.reason` as the semantic conventions spell it.
pub fn reason_value(reason: Reason) -> &'static str {
    match reason {
        Reason::Static => "static",
        Reason::Default => "default",
        Reason::TargetingMatch => "targeting_match",
        Reason::Split => "split",
        Reason::Disabled => "disabled",
        Reason::Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_disabled() {
        assert_eq!(OtelSettings::from_env(env(&[])), Ok(OtelSettings::Off));
        assert_eq!(
            OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])),
            Ok(OtelSettings::Off)
        );
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")];
        assert_eq!(
            OtelSettings::from_env(env(&on)),
            Ok(OtelSettings::Otlp {
                endpoint: "http://collector:4317".into(),
                protocol: OtlpProtocol::Grpc,
                certificate: None,
            })
        );
        for off in [("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")] {
            assert_eq!(
                OtelSettings::from_env(env(&[on[0], off])),
                Ok(OtelSettings::Off),
                "{off:?}"
            );
        }
        assert_eq!(
            OtelSettings::from_env(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317")])),
            Ok(OtelSettings::Otlp {
                endpoint: "https://c:4317".into(),
                protocol: OtlpProtocol::Grpc,
                certificate: None,
            })
        );
    }

    #[test]
    fn protocol_and_certificate_come_from_the_signal_variable_first() {
        let settings = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/otel/ca.pem"),
        ]));
        assert_eq!(
            settings,
            Ok(OtelSettings::Otlp {
                endpoint: "https://collector:4318".into(),
                protocol: OtlpProtocol::HttpProtobuf,
                certificate: Some(PathBuf::from("/etc/otel/ca.pem")),
            })
        );
        let settings = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/a.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/b.pem"),
        ]));
        assert!(
            matches!(settings, Ok(OtelSettings::Otlp { protocol: OtlpProtocol::Grpc, certificate: Some(c), .. }) if c == std::path::Path::new("/b.pem"))
        );
    }

    #[test]
    fn every_problem_with_the_otel_variables_is_reported() {
        let problems = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/key.pem"),
        ]))
        .unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("http/json")));
        assert!(problems.iter().any(|p| p.contains("CLIENT_KEY")));
        assert!(problems.iter().any(|p| p.contains("zipkin")));
        assert!(problems.iter().any(|p| p.contains("SAMPLER_ARG")));
        assert!(problems.iter().any(|p| p.contains("collector:4317")));
    }

    #[test]
    fn rpc_labels_come_from_the_protos_not_from_requests() {
        let requests = Requests { port: 8013, rpc: true };
        let known = Request::post("/flagd.evaluation.v1.Service/ResolveBoolean")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let scope = requests.begin(&known);
        assert!(matches!(
            scope.kind,
            Kind::Rpc { system: "grpc", method: Some(m) } if m.service == "flagd.evaluation.v1.Service" && m.name == "ResolveBoolean"
        ));
        let made_up = Request::post("/made.up.Service/Anything")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let scope = requests.begin(&made_up);
        assert!(matches!(
            scope.kind,
            Kind::Rpc {
                system: "connect_rpc",
                method: None
            }
        ));
        let web = Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc-web+proto")
            .body(())
            .unwrap();
        assert!(matches!(
            requests.begin(&web).kind,
            Kind::Rpc {
                system: "grpc_web",
                method: Some(_)
            }
        ));
        let http = Requests { port: 8016, rpc: false };
        let ofrep = Request::post("/ofrep/v1/evaluate/flags/x").body(()).unwrap();
        assert!(matches!(http.begin(&ofrep).kind, Kind::Http { method: "POST" }));
    }

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(code_label(0), "0");
        assert_eq!(code_label(16), "16");
        assert_eq!(code_label(99), "2");
        assert_eq!(code_label(-1), "2");
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(999), "0");
    }
}
