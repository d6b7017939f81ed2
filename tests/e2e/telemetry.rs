//! OpenTelemetry traces end to end: the real `vexil` binary exports over OTLP/gRPC (the
//! `opentelemetry-otlp` exporter, configured only by `OTEL_*` variables) to a collector in this
//! test (a tonic `TraceService` that records what it receives). Every protocol's request becomes a
//! server span, child of the W3C `traceparent` the client sent, with the RPC or HTTP attributes;
//! evaluations are `feature_flag.evaluation` events with OpenTelemetry's feature-flag attributes
//! (the experiment too, for a `SPLIT`). The per-request Prometheus histograms are checked on the
//! same requests, including that a made-up method or path never becomes a label.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use vexil_e2e::{Scratch, Server};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

const DEADLINE: Duration = Duration::from_secs(30);

/// A span received, with its resource's attributes.
type ReceivedSpan = (Vec<KeyValue>, Span);

/// What the collector received: every span with its resource's attributes.
#[derive(Debug, Default, Clone)]
struct Received(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for s in scope.spans {
                    spans.push((resource.clone(), s));
                }
            }
        }
    }
}

/// Starts the collector on a free port; returns its endpoint.
async fn collector() -> (String, Received) {
    grpc_collector(None).await
}

/// A self-signed certificate for `localhost` (the collector's name in `https://` endpoints): its
/// PEM and its key's PEM.
fn localhost_certificate() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// An OTLP/gRPC collector on a free port, over TLS with `identity` (certificate and key PEM);
/// returns its endpoint.
async fn grpc_collector(identity: Option<(String, String)>) -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    // This process links both of rustls's providers (the flagd provider's dependencies bring
    // aws-lc-rs): name one for tonic's TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = tonic::transport::Server::builder();
    let scheme = match &identity {
        Some((cert, key)) => {
            let tls =
                tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
            builder = builder.tls_config(tls).unwrap();
            "https://localhost"
        }
        None => "http://127.0.0.1",
    };
    tokio::spawn(async move {
        builder
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("{scheme}:{port}"), received)
}

/// What an OTLP/HTTP collector saw: the spans, and the path and content type of each export.
#[derive(Debug, Default, Clone)]
struct HttpReceived {
    spans: Received,
    exports: Arc<Mutex<Vec<(String, String)>>>,
}

/// An OTLP/HTTP collector (`POST /v1/traces`, binary protobuf) on a free port, over TLS with
/// `identity` (certificate and key PEM); returns its base URL.
async fn http_collector(identity: Option<(String, String)>) -> (String, HttpReceived) {
    use axum::body::Bytes;
    use axum::extract::{OriginalUri, State};
    use prost::Message as _;
    use rustls::pki_types::pem::PemObject as _;

    async fn export(
        State(received): State<HttpReceived>,
        OriginalUri(uri): OriginalUri,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> Result<([(&'static str, &'static str); 1], Vec<u8>), http::StatusCode> {
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        received
            .exports
            .lock()
            .unwrap()
            .push((uri.path().to_owned(), content_type));
        let request = ExportTraceServiceRequest::decode(body).map_err(|_| http::StatusCode::BAD_REQUEST)?;
        received.spans.record(request);
        let answer = ExportTraceServiceResponse { partial_success: None };
        Ok(([("content-type", "application/x-protobuf")], answer.encode_to_vec()))
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = HttpReceived::default();
    let router = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(received.clone());
    let Some((cert, key)) = identity else {
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        return (format!("http://127.0.0.1:{port}"), received);
    };
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}"), received)
}

/// A ResolveBoolean of `beta` for ann@example.com (a targeting match), sent with `traceparent`.
async fn resolve_beta(server: &Server, traceparent: &str) -> v1::ResolveBooleanResponse {
    let mut client = v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let context = JsonStruct::from(json!({"email": "ann@example.com"}).as_object().cloned().unwrap());
    let request = v1::ResolveBooleanRequest {
        flag_key: "beta".into(),
        context: Some(context),
    };
    client
        .resolve_boolean(traced(request, traceparent))
        .await
        .unwrap()
        .into_inner()
}

/// [`resolve_beta`] in a new sampled trace (`n`); returns the trace id.
async fn traced_resolve(server: &Server, n: u8) -> String {
    let (header, trace, _) = traceparent(n);
    assert_eq!(resolve_beta(server, &header).await.reason, "TARGETING_MATCH");
    trace
}

impl Received {
    /// Waits for the server span of `trace_id` (hex).
    async fn span_of(&self, trace_id: &str) -> (Vec<KeyValue>, Span) {
        let started = Instant::now();
        loop {
            let found = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| hex(&s.trace_id) == trace_id && s.kind == span::SpanKind::Server as i32)
                .cloned();
            if let Some(found) = found {
                return found;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no span of trace {trace_id} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        other => json!(format!("{other:?}")),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map(value).unwrap_or(Value::Null)))
        .collect()
}

/// A `traceparent` for a new trace: (header, trace id, parent span id).
fn traceparent(n: u8) -> (String, String, String) {
    let trace = format!("{:032x}", 0x0af7651916cd43dd8448eb211c80319c_u128 + u128::from(n));
    let parent = format!("{:016x}", 0xb7ad6b7169203331_u64 + u64::from(n));
    (format!("00-{trace}-{parent}-01"), trace, parent)
}

fn traced<T>(message: T, header: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", MetadataValue::try_from(header).unwrap());
    request
}

const FLAGS: &str = r#"{
  "metadata": {"flagSetId": "web"},
  "flags": {
    "beta": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
             "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on", null]}},
    "color": {"state": "ENABLED", "variants": {"blue": "blue", "red": "red"}, "defaultVariant": "blue"}
  },
  "$experiments": {
    "color-test": {
      "id": "x00000000000000c1", "flag": "color", "status": "running", "salt": "x00000000000000c1",
      "traffic": 1000000, "weights": [{"variant": "blue", "weight": 1}, {"variant": "red", "weight": 1}]
    }
  }
}"#;

fn the_event(span: &Span, key: &str) -> HashMap<String, Value> {
    let events: Vec<_> = span
        .events
        .iter()
        .filter(|e| e.name == "feature_flag.evaluation")
        .map(|e| attributes(&e.attributes))
        .filter(|a| a.get("feature_flag.key") == Some(&json!(key)))
        .collect();
    assert_eq!(events.len(), 1, "one evaluation event of {key} in {span:#?}");
    events.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_is_traced_with_the_callers_context_and_flag_attributes() {
    let (endpoint, received) = collector().await;
    let dir = Scratch::new("telemetry");
    let path = dir.write("flags.json", FLAGS);
    let uri = format!("file:{}", path.display());
    let server = Server::start_with_env(
        &["--uri", &uri],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "vexil-e2e"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );

    // gRPC (flagd.evaluation.v1): a targeting match.
    let (header, trace, parent) = traceparent(1);
    // A caller that does not sample its trace (flags 00): the parent-based sampler makes no span.
    let (unsampled, unsampled_trace, _) = traceparent(9);
    resolve_beta(&server, &unsampled.replace("-01", "-00")).await;
    let answer = resolve_beta(&server, &header).await;
    assert_eq!((answer.value, answer.reason.as_str()), (true, "TARGETING_MATCH"));
    let (resource, span) = received.span_of(&trace).await;
    assert!(
        !received
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| hex(&s.trace_id) == unsampled_trace),
        "a trace the caller did not sample is not exported"
    );
    assert_eq!(hex(&span.parent_span_id), parent, "child of the caller's span");
    assert_eq!(span.name, "flagd.evaluation.v1.Service/ResolveBoolean");
    let attrs = attributes(&span.attributes);
    assert_eq!(attrs["rpc.system"], json!("grpc"));
    assert_eq!(attrs["rpc.service"], json!("flagd.evaluation.v1.Service"));
    assert_eq!(attrs["rpc.method"], json!("ResolveBoolean"));
    assert_eq!(attrs["rpc.grpc.status_code"], json!(0));
    assert_eq!(attrs["server.port"], json!(server.ports.evaluation));
    assert_eq!(attributes(&resource)["service.name"], json!("vexil-e2e"));
    let event = the_event(&span, "beta");
    assert_eq!(event["feature_flag.result.variant"], json!("on"));
    assert_eq!(event["feature_flag.result.reason"], json!("targeting_match"));
    assert_eq!(event["feature_flag.provider.name"], json!("Vexil"));
    assert_eq!(event["feature_flag.set.id"], json!("web"));
    assert!(!event.contains_key("vexil.experiment.key"));

    // OFREP: an experiment's split.
    let (header, trace, parent) = traceparent(2);
    let http = reqwest::Client::new();
    let r = http
        .post(server.ofrep_url("/ofrep/v1/evaluate/flags/color"))
        .header("traceparent", &header)
        .json(&json!({"context": {"targetingKey": "unit-7"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "SPLIT", "{body}");
    let (_, span) = received.span_of(&trace).await;
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(span.name, "POST /ofrep/v1/evaluate/flags/{key}", "{span:#?}");
    let attrs = attributes(&span.attributes);
    assert_eq!(attrs["http.request.method"], json!("POST"));
    assert_eq!(attrs["http.route"], json!("/ofrep/v1/evaluate/flags/{key}"));
    assert_eq!(attrs["http.response.status_code"], json!(200));
    let event = the_event(&span, "color");
    assert_eq!(event["feature_flag.result.reason"], json!("split"));
    assert_eq!(event["feature_flag.result.variant"], body["variant"]);
    assert_eq!(event["vexil.experiment.key"], json!("color-test"));
    assert_eq!(event["vexil.experiment.id"], json!("x00000000000000c1"));

    // Connect (JSON): a missing flag is an error with its code, on the span and the event.
    let (header, trace, _) = traceparent(3);
    let r = http
        .post(format!(
            "{}/flagd.evaluation.v1.Service/ResolveString",
            server.grpc_url()
        ))
        .header("traceparent", &header)
        .json(&json!({"flagKey": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (_, span) = received.span_of(&trace).await;
    let attrs = attributes(&span.attributes);
    assert_eq!(attrs["rpc.system"], json!("connect_rpc"));
    assert_eq!(attrs["rpc.grpc.status_code"], json!(5), "NOT_FOUND");
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    let event = the_event(&span, "nope");
    assert_eq!(event["feature_flag.result.reason"], json!("error"));
    assert_eq!(event["error.type"], json!("FLAG_NOT_FOUND"));

    // flagd.sync.v1 on its own port.
    let (header, trace, parent) = traceparent(4);
    let mut sync_client = sync::flag_sync_service_client::FlagSyncServiceClient::connect(server.sync_url())
        .await
        .unwrap();
    sync_client
        .fetch_all_flags(traced(sync::FetchAllFlagsRequest::default(), &header))
        .await
        .unwrap();
    let (_, span) = received.span_of(&trace).await;
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(span.name, "flagd.sync.v1.FlagSyncService/FetchAllFlags");
    assert_eq!(attributes(&span.attributes)["server.port"], json!(server.ports.sync));

    // Without a traceparent a request starts its own trace; with a made-up method it is
    // `unknown`, never the path the client sent.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(server.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let made_up: Result<tonic::Response<v1::ResolveBooleanResponse>, _> = grpc
        .unary(
            tonic::Request::new(v1::ResolveBooleanRequest::default()),
            http::uri::PathAndQuery::from_static("/made.up.Service/Invented"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(made_up.unwrap_err().code(), tonic::Code::Unimplemented);

    // The request histograms, on the same requests.
    let started = Instant::now();
    let metrics = loop {
        let text = http
            .get(server.management_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("grpc.health.v1.Health/Check") || started.elapsed() > DEADLINE {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for series in [
        r#"rpc_server_call_duration_seconds_count{rpc_system="grpc",rpc_method="flagd.evaluation.v1.Service/ResolveBoolean",rpc_grpc_status_code="0"} 2"#,
        r#"rpc_server_call_duration_seconds_count{rpc_system="connect_rpc",rpc_method="flagd.evaluation.v1.Service/ResolveString",rpc_grpc_status_code="5"} 1"#,
        r#"rpc_server_call_duration_seconds_count{rpc_system="grpc",rpc_method="flagd.sync.v1.FlagSyncService/FetchAllFlags",rpc_grpc_status_code="0"} 1"#,
        r#"rpc_server_call_duration_seconds_count{rpc_system="grpc",rpc_method="grpc.health.v1.Health/Check",rpc_grpc_status_code="0"} 1"#,
        r#"rpc_server_call_duration_seconds_count{rpc_system="grpc",rpc_method="unknown",rpc_grpc_status_code="12"} 1"#,
        r#"http_request_method="POST",http_route="/ofrep/v1/evaluate/flags/{key}",http_response_status_code="200""#,
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
    assert!(!metrics.contains("made.up"), "a made-up method is no label:\n{metrics}");
    assert!(
        !metrics.contains("/ofrep/v1/evaluate/flags/color"),
        "the path is no label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_http_protobuf() {
    let (base, received) = http_collector(None).await;
    let dir = Scratch::new("telemetry-http");
    let path = dir.write("flags.json", FLAGS);
    let uri = format!("file:{}", path.display());
    let server = Server::start_with_env(
        &["--uri", &uri],
        &[
            // The base URL: the exporter appends /v1/traces.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &base),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let trace = traced_resolve(&server, 21).await;
    let (_, span) = received.spans.span_of(&trace).await;
    assert_eq!(span.name, "flagd.evaluation.v1.Service/ResolveBoolean");
    let event = the_event(&span, "beta");
    assert_eq!(event["feature_flag.result.variant"], json!("on"));
    let exports = received.exports.lock().unwrap().clone();
    assert!(!exports.is_empty());
    for (path, content_type) in exports {
        assert_eq!(
            (path.as_str(), content_type.as_str()),
            ("/v1/traces", "application/x-protobuf")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_tls_collector_signed_by_the_given_certificate_authority() {
    let dir = Scratch::new("telemetry-tls");
    let path = dir.write("flags.json", FLAGS);
    let uri = format!("file:{}", path.display());
    for (n, protocol) in [(31u8, "grpc"), (32, "http/protobuf")] {
        let (cert, key) = localhost_certificate();
        let ca = dir.write(&format!("ca-{n}.pem"), &cert);
        let (endpoint, spans) = match protocol {
            "grpc" => grpc_collector(Some((cert, key))).await,
            _ => {
                let (base, received) = http_collector(Some((cert, key))).await;
                (base, received.spans)
            }
        };
        assert!(endpoint.starts_with("https://localhost:"), "{endpoint}");
        let server = Server::start_with_env(
            &["--uri", &uri],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca.display().to_string()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        );
        let trace = traced_resolve(&server, n).await;
        let (_, span) = spans.span_of(&trace).await;
        assert_eq!(span.name, "flagd.evaluation.v1.Service/ResolveBoolean", "{protocol}");
    }
}
