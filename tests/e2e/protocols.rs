//! Raw protocol tests against the built `vexil` binary: what OpenFeature clients do not exercise.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use vexil_e2e::{Scratch, Server};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::flagd::sync::v1 as sync;
use vexil_proto::schema::v1 as schema_v1;

const FLAGS: &str = r#"{
  "metadata": {"team": "core"},
  "$evaluators": {"is_staff": {"ends_with": [{"var": "email"}, "@example.com"]}},
  "flags": {
    "bool": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
             "targeting": {"if": [{"$ref": "is_staff"}, "on", null]}, "metadata": {"owner": "ann"}},
    "string": {"state": "ENABLED", "variants": {"a": "alpha", "b": "beta"}, "defaultVariant": "a"},
    "half": {"state": "ENABLED", "variants": {"half": 0.5, "ten": 10}, "defaultVariant": "half"},
    "object": {"state": "ENABLED", "variants": {"o": {"k": [1, "x"]}}, "defaultVariant": "o"},
    "no-default": {"state": "ENABLED", "variants": {"a": 1}},
    "disabled": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"},
    "broken": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"invalid": [1]}},
    "unknown-variant": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"if": [true, "zzz", "a"]}},
    "env": {"state": "ENABLED", "variants": {"prod": "prod", "other": "other"}, "defaultVariant": "other",
            "targeting": {"if": [{"==": [{"var": "env"}, "prod"]}, "prod", "other"]}},
    "region": {"state": "ENABLED", "variants": {"eu": "eu", "other": "other"}, "defaultVariant": "other",
            "targeting": {"if": [{"==": [{"var": "region"}, "eu"]}, "eu", "other"]}}
  }
}"#;

fn ctx(pairs: &[(&str, &str)]) -> Option<JsonStruct> {
    Some(JsonStruct::from(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect::<serde_json::Map<String, Value>>(),
    ))
}

fn start(flags: &str, extra: &[&str]) -> (Server, Scratch) {
    let dir = Scratch::new("proto");
    let path = dir.write("flags.json", flags);
    let uri = format!("file:{}", path.display());
    let mut args = vec!["--uri", uri.as_str()];
    args.extend_from_slice(extra);
    (Server::start(&args), dir)
}

async fn v1_client(s: &Server) -> v1::service_client::ServiceClient<tonic::transport::Channel> {
    v1::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap()
}

fn with_selector<T>(message: T, selector: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("flagd-selector", MetadataValue::try_from(selector).unwrap());
    r
}

#[tokio::test]
async fn evaluation_v1_values_reasons_and_errors() {
    let (s, _dir) = start(FLAGS, &[]);
    let mut c = v1_client(&s).await;

    let staff = c
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "bool".into(),
            context: ctx(&[("email", "ann@example.com")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (staff.value, staff.reason.as_str(), staff.variant.as_str()),
        (true, "TARGETING_MATCH", "on")
    );
    let metadata = staff.metadata.unwrap().into_map();
    assert!(
        metadata.contains_key("owner") && metadata.contains_key("team"),
        "flag and set metadata: {metadata:?}"
    );
    let other = c
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "bool".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((other.value, other.reason.as_str()), (false, "DEFAULT"));

    let s1 = c
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "string".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s1.value.as_str(), s1.reason.as_str(), s1.variant.as_str()),
        ("alpha", "STATIC", "a")
    );
    // Integers resolve as float64 and truncate, as in flagd.
    let i = c
        .resolve_int(v1::ResolveIntRequest {
            flag_key: "half".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.value, 0);
    let f = c
        .resolve_float(v1::ResolveFloatRequest {
            flag_key: "half".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.value, 0.5);
    let o = c
        .resolve_object(v1::ResolveObjectRequest {
            flag_key: "object".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(o.value.unwrap().into_map().contains_key("k"));

    let disabled = c
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "disabled".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (disabled.value, disabled.reason.as_str(), disabled.variant.as_str()),
        (false, "DISABLED", "")
    );

    let code = |r: Result<tonic::Response<v1::ResolveIntResponse>, tonic::Status>| r.unwrap_err().code();
    let int = |key: &str| v1::ResolveIntRequest {
        flag_key: key.into(),
        context: None,
    };
    assert_eq!(code(c.resolve_int(int("missing")).await), Code::NotFound);
    assert_eq!(
        code(c.resolve_int(int("no-default")).await),
        Code::NotFound,
        "v1 has no way to say 'code default'"
    );
    assert_eq!(code(c.resolve_int(int("broken")).await), Code::DataLoss);
    assert_eq!(code(c.resolve_int(int("unknown-variant")).await), Code::Unknown);
    let mismatch = c
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "string".into(),
            context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(mismatch.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn evaluation_v2_leaves_value_and_variant_unset_for_the_code_default() {
    let (s, _dir) = start(FLAGS, &[]);
    let mut c = v2::service_client::ServiceClient::connect(s.grpc_url()).await.unwrap();
    let r = c
        .resolve_int(v2::ResolveIntRequest {
            flag_key: "no-default".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.value, r.variant, r.reason.as_str()), (None, None, "DEFAULT"));
    let r = c
        .resolve_boolean(v2::ResolveBooleanRequest {
            flag_key: "disabled".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.value, r.variant, r.reason.as_str()), (None, None, "DISABLED"));
    let r = c
        .resolve_string(v2::ResolveStringRequest {
            flag_key: "string".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.value.as_deref(), r.variant.as_deref()), (Some("alpha"), Some("a")));
    let err = c
        .resolve_string(v2::ResolveStringRequest {
            flag_key: "missing".into(),
            context: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn schema_v1_is_served_and_reports_fallback() {
    let (s, _dir) = start(FLAGS, &[]);
    let mut c = schema_v1::service_client::ServiceClient::connect(s.grpc_url())
        .await
        .unwrap();
    let r = c
        .resolve_int(schema_v1::ResolveIntRequest {
            flag_key: "no-default".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.value, r.reason.as_str()), (0, "FALLBACK"));
    let all = c
        .resolve_all(schema_v1::ResolveAllRequest { context: None })
        .await
        .unwrap()
        .into_inner();
    assert!(all.flags.contains_key("string"));
}

#[tokio::test]
async fn resolve_all_uses_default_variant_types_and_skips_flags_without_one() {
    let (s, _dir) = start(FLAGS, &[]);
    let mut c = v1_client(&s).await;
    let all = c
        .resolve_all(v1::ResolveAllRequest {
            context: ctx(&[("email", "bo@example.com")]),
        })
        .await
        .unwrap()
        .into_inner();
    use v1::any_flag::Value as V;
    assert_eq!(all.flags["bool"].value, Some(V::BoolValue(true)));
    assert_eq!(all.flags["half"].value, Some(V::DoubleValue(0.5)));
    assert_eq!(all.flags["string"].reason, "STATIC");
    assert!(!all.flags.contains_key("no-default") && !all.flags.contains_key("disabled"));
    assert_eq!(all.flags["broken"].reason, "ERROR");
    // As flagd: an erroring flag carries its type's zero value, no variant.
    assert_eq!(all.flags["broken"].value, Some(V::DoubleValue(0.0)));
    assert_eq!(all.flags["broken"].variant, "");
    assert!(
        all.flags["bool"]
            .metadata
            .as_ref()
            .unwrap()
            .to_map()
            .contains_key("owner")
    );
}

#[tokio::test]
async fn selectors_pick_flag_sets_and_bad_ones_are_invalid_arguments() {
    let dir = Scratch::new("selector");
    let a = dir.write(
        "a.json",
        r#"{"flags": {"f": {"state": "ENABLED", "variants": {"a": "from-a"}, "defaultVariant": "a"}}}"#,
    );
    let b = dir.write(
        "b.json",
        r#"{"metadata": {"flagSetId": "set-b"}, "flags": {"f": {"state": "ENABLED", "variants": {"b": "from-b"}, "defaultVariant": "b"}}}"#,
    );
    let (ua, ub) = (format!("file:{}", a.display()), format!("file:{}", b.display()));
    let s = Server::start(&["-f", &ua, "-f", &ub]);
    let mut c = v1_client(&s).await;
    let get = |sel: Option<&str>| {
        let msg = v1::ResolveStringRequest {
            flag_key: "f".into(),
            context: None,
        };
        match sel {
            Some(sel) => with_selector(msg, sel),
            None => tonic::Request::new(msg),
        }
    };
    assert_eq!(
        c.resolve_string(get(None)).await.unwrap().into_inner().value,
        "from-b",
        "later source wins"
    );
    assert_eq!(
        c.resolve_string(get(Some("flagSetId=")))
            .await
            .unwrap()
            .into_inner()
            .value,
        "from-a"
    );
    let in_set = c
        .resolve_string(get(Some("flagSetId=set-b")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(in_set.value, "from-b");
    assert_eq!(in_set.metadata.unwrap().into_map()["flagSetId"], "set-b");
    assert_eq!(
        c.resolve_string(get(Some(&a.display().to_string())))
            .await
            .unwrap()
            .into_inner()
            .value,
        "from-a"
    );
    assert_eq!(
        c.resolve_string(get(Some("owner=me"))).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn static_and_header_context() {
    let (s, _dir) = start(FLAGS, &["-X", "env=prod", "-H", "X-Region=region"]);
    let mut c = v1_client(&s).await;
    let r = c
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "env".into(),
            context: ctx(&[("env", "dev")]),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().value, "prod", "-X wins over the request context");
    let mut req = tonic::Request::new(v1::ResolveStringRequest {
        flag_key: "region".into(),
        context: None,
    });
    req.metadata_mut().insert("x-region", MetadataValue::from_static("eu"));
    assert_eq!(c.resolve_string(req).await.unwrap().into_inner().value, "eu");
}

async fn next_event(stream: &mut tonic::Streaming<v1::EventStreamResponse>) -> v1::EventStreamResponse {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn event_stream_ready_change_and_shutdown() {
    let (mut s, dir) = start(FLAGS, &[]);
    let mut c = v1_client(&s).await;
    let mut stream = c.event_stream(v1::EventStreamRequest {}).await.unwrap().into_inner();
    assert_eq!(next_event(&mut stream).await.r#type, "provider_ready");

    let changed = FLAGS
        .replace(r#""alpha""#, r#""ALPHA""#)
        .replace(r#""object": "#, r#""object2": "#);
    dir.write("flags.json", &changed);
    let event = next_event(&mut stream).await;
    assert_eq!(event.r#type, "configuration_change");
    let data = serde_json::to_value(event.data.unwrap()).unwrap();
    assert_eq!(data["flags"]["string"]["type"], "update");
    assert_eq!(data["flags"]["object"]["type"], "delete");
    assert_eq!(data["flags"]["object2"]["type"], "write");
    assert!(
        data["flags"].get("bool").is_none(),
        "unchanged flags are not listed: {data}"
    );

    let stopping = tokio::task::spawn_blocking(move || s.stop());
    assert_eq!(next_event(&mut stream).await.r#type, "provider_shutdown");
    assert!(stopping.await.unwrap(), "vexil exits cleanly on SIGTERM");
}

/// SIGTERM as Kubernetes sends it: readiness (and grpc.health) drop first while requests are
/// still served for `--shutdown-delay`, then the listeners close, streams get `provider_shutdown`
/// and the process exits cleanly.
#[tokio::test]
async fn sigterm_drops_readiness_first_then_ends_streams_and_exits() {
    let dir = Scratch::new("drain");
    let path = dir.write("flags.json", FLAGS);
    let uri = format!("file:{}", path.display());
    let mut s = Server::start_with_env(&["--uri", &uri], &[("VEXIL_SHUTDOWN_DELAY", "3")]);
    let mut c = v1_client(&s).await;
    let mut stream = c.event_stream(v1::EventStreamRequest {}).await.unwrap().into_inner();
    assert_eq!(next_event(&mut stream).await.r#type, "provider_ready");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(s.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );

    s.terminate();
    let started = Instant::now();
    while s.http_status("/readyz") != Some(503) {
        assert!(started.elapsed() < DEADLINE, "/readyz never answered 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Draining: not ready, yet still serving.
    let answer = c
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "bool".into(),
            context: None,
        })
        .await
        .expect("requests are served while draining")
        .into_inner();
    assert_eq!(answer.reason, "DEFAULT");
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    assert_eq!(s.http_status("/healthz"), Some(200), "alive while draining");

    assert_eq!(next_event(&mut stream).await.r#type, "provider_shutdown");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "streams end after the delay, not at the signal ({:?})",
        started.elapsed()
    );
    let exited = tokio::task::spawn_blocking(move || s.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert_eq!(exited, Some(true), "vexil exits cleanly after draining");
}

/// A request in flight when the listeners close (its body still arriving) is answered, then the
/// process exits; a new connection is refused.
#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _dir) = start(FLAGS, &[]);
    let body = br#"{"context": {"email": "ann@example.com"}}"#;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.ports.ofrep))
        .await
        .unwrap();
    let head = format!(
        "POST /ofrep/v1/evaluate/flags/bool HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body[..10]).await.unwrap();
    // The server has the request's head: it is in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.terminate();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", s.ports.ofrep))
        .await
        .is_ok()
    {
        assert!(started.elapsed() < DEADLINE, "the listener never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tcp.write_all(&body[10..]).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut response))
        .await
        .expect("answered")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""value":true"#), "{response}");
    let exited = tokio::task::spawn_blocking(move || s.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert_eq!(exited, Some(true), "vexil exits cleanly once the request is answered");
}

#[tokio::test]
async fn sync_streams_the_full_configuration_then_every_change() {
    let (s, dir) = start(FLAGS, &["-X", "env=prod"]);
    let mut c = sync::flag_sync_service_client::FlagSyncServiceClient::connect(s.sync_url())
        .await
        .unwrap();
    let mut stream = c
        .sync_flags(sync::SyncFlagsRequest {
            provider_id: "t".into(),
            selector: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config: Value = serde_json::from_str(&first.flag_configuration).unwrap();
    assert_eq!(
        config["flags"]["bool"]["targeting"]["if"][0],
        json!({"ends_with": [{"var": "email"}, "@example.com"]}),
        "$ref inlined"
    );
    assert_eq!(config["flags"]["no-default"]["defaultVariant"], "");
    assert_eq!(config["flags"]["bool"]["metadata"]["team"], "core");
    assert!(
        config["flags"]["bool"]["source"]
            .as_str()
            .unwrap()
            .ends_with("flags.json")
    );
    assert_eq!(
        serde_json::to_value(first.sync_context.unwrap()).unwrap(),
        json!({"env": "prod"})
    );

    dir.write("flags.json", &FLAGS.replace(r#""beta""#, r#""BETA""#));
    let second = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config: Value = serde_json::from_str(&second.flag_configuration).unwrap();
    assert_eq!(config["flags"]["string"]["variants"]["b"], "BETA");

    let fetched = c
        .fetch_all_flags(sync::FetchAllFlagsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.flag_configuration, second.flag_configuration);
    #[allow(deprecated)] // flagd deprecated GetMetadata; in-process providers still call it.
    let meta = c.get_metadata(sync::GetMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(
        serde_json::to_value(meta.metadata.unwrap()).unwrap(),
        json!({"env": "prod"})
    );
    let bad = c
        .fetch_all_flags(sync::FetchAllFlagsRequest {
            provider_id: String::new(),
            selector: "x=y".into(),
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn sync_metadata_can_be_disabled() {
    let (s, _dir) = start(FLAGS, &["--disable-sync-metadata"]);
    let mut c = sync::flag_sync_service_client::FlagSyncServiceClient::connect(s.sync_url())
        .await
        .unwrap();
    #[allow(deprecated)]
    let r = c.get_metadata(sync::GetMetadataRequest {}).await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);
}

#[tokio::test]
async fn ofrep_single_bulk_etag_and_errors() {
    let (s, _dir) = start(FLAGS, &["-B", "2000"]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        http.post(s.ofrep_url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };

    let r = post(
        "/ofrep/v1/evaluate/flags/bool",
        r#"{"context": {"email": "x@example.com"}}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["value"].clone(), body["reason"].clone(), body["variant"].clone()),
        (json!(true), json!("TARGETING_MATCH"), json!("on"))
    );

    let r = post("/ofrep/v1/evaluate/flags/no-default", "").send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "DEFAULT");
    assert!(body.get("value").is_none() && body.get("variant").is_none());

    let r = post("/ofrep/v1/evaluate/flags/missing", "{}").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], "FLAG_NOT_FOUND");
    let r = post("/ofrep/v1/evaluate/flags/broken", "{}").send().await.unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap()["errorCode"].clone()
        ),
        (400, json!("PARSE_ERROR"))
    );
    let r = post("/ofrep/v1/evaluate/flags/bool", "{not json").send().await.unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap()["errorCode"].clone()
        ),
        (400, json!("INVALID_CONTEXT"))
    );
    let r = post(
        "/ofrep/v1/evaluate/flags/bool",
        &format!(r#"{{"context": {{"pad": "{}"}}}}"#, "x".repeat(5000)),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 413);
    assert!(
        r.json::<Value>().await.unwrap()["errorDetails"]
            .as_str()
            .unwrap()
            .contains("too large")
    );
    let r = post("/ofrep/v1/evaluate/flags/bool", "{}")
        .header("flagd-selector", "nope=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let bulk = post("/ofrep/v1/evaluate/flags", r#"{"context": {"email": "x@example.com"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bulk.status(), 200);
    let etag = bulk.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = bulk.json().await.unwrap();
    let flags = body["flags"].as_array().unwrap();
    assert!(
        flags
            .iter()
            .any(|f| f["key"] == "disabled" && f["reason"] == "DISABLED")
    );
    assert!(
        flags
            .iter()
            .any(|f| f["key"] == "broken" && f["errorCode"] == "PARSE_ERROR")
    );
    let again = post("/ofrep/v1/evaluate/flags", r#"{"context": {"email": "x@example.com"}}"#)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let other = post("/ofrep/v1/evaluate/flags", r#"{"context": {"email": "x@other.org"}}"#)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "a different result has a different ETag");
}

#[tokio::test]
async fn health_and_reflection() {
    let (s, _dir) = start(FLAGS, &[]);
    let channel = tonic::transport::Endpoint::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "flagd.evaluation.v1.Service".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Without a store, Vexil's own services are not there.
    let missing = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vexil.v1.EvaluationService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "flagd.evaluation.v1.Service",
        "flagd.evaluation.v2.Service",
        "schema.v1.Service",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
}

#[tokio::test]
async fn grpc_web_over_http1() {
    use prost::Message;
    let (s, _dir) = start(FLAGS, &[]);
    let request = v1::ResolveStringRequest {
        flag_key: "string".into(),
        context: None,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
    frame.extend_from_slice(&request);
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let r = http
        .post(format!("{}/flagd.evaluation.v1.Service/ResolveString", s.grpc_url()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(body[0], 0, "a data frame first");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let response = v1::ResolveStringResponse::decode(&body[5..5 + len]).unwrap();
    assert_eq!(response.value, "alpha");
    let trailers = String::from_utf8_lossy(&body[5 + len + 5..]).to_ascii_lowercase();
    assert_eq!(body[5 + len], 0x80, "then a trailers frame");
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}

/// Generous: these tests share two cores with whole-workspace builds. A wait ends as soon as the
/// event under test happens; only a regression waits this long.
const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, failing with `what` after [`DEADLINE`].
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn file_edits_are_served_and_invalid_ones_keep_the_last_good_flags() {
    let stale_after = Duration::from_secs(1);
    let (s, dir) = start(FLAGS, &["--stale-after", "1"]);
    let http = reqwest::Client::new();
    let value = || async {
        let r = http
            .post(s.ofrep_url("/ofrep/v1/evaluate/flags/string"))
            .body("{}")
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["value"].clone()
    };
    assert_eq!(value().await, "alpha");
    dir.write("flags.json", &FLAGS.replace(r#""alpha""#, r#""edited""#));
    wait_for("the edit served", || async {
        (value().await == "edited").then_some(())
    })
    .await;

    // An invalid edit: the last good flags keep serving, and readiness turns 412 once the source
    // has been failing for --stale-after (not before: the write is at or before `written`).
    let written = Instant::now();
    dir.write(
        "flags.json",
        &FLAGS.replace(r#""defaultVariant": "a""#, r#""defaultVariant": "nope""#),
    );
    wait_for(
        "not ready once the source has failed for longer than --stale-after",
        || async {
            assert_eq!(value().await, "edited", "the last good flags keep serving");
            (s.http_status("/readyz") == Some(412)).then_some(())
        },
    )
    .await;
    assert!(
        written.elapsed() >= stale_after,
        "ready within the grace period (412 after {:?})",
        written.elapsed()
    );
    assert_eq!(value().await, "edited", "the last good flags keep serving");

    dir.write("flags.json", FLAGS);
    wait_for("ready and serving the fixed file", || async {
        (s.http_status("/readyz") == Some(200) && value().await == "alpha").then_some(())
    })
    .await;
}

#[tokio::test]
async fn not_ready_until_the_sources_load() {
    let dir = Scratch::new("late");
    let path = dir.0.join("late.json");
    let uri = format!("file:{}", path.display());
    let s = Server::start_unready(&["--uri", &uri]);
    assert_eq!(s.http_status("/readyz"), Some(412));
    dir.write("late.json", FLAGS);
    wait_for("ready once the file appears", || async {
        (s.http_status("/readyz") == Some(200)).then_some(())
    })
    .await;
    let metrics = reqwest::get(s.management_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vexil_flags"), "{metrics}");
}

#[tokio::test]
async fn starts_without_sources() {
    let s = Server::start(&[]);
    let mut c = v1_client(&s).await;
    let all = c
        .resolve_all(v1::ResolveAllRequest { context: None })
        .await
        .unwrap()
        .into_inner();
    assert!(all.flags.is_empty());
}

#[tokio::test]
async fn connect_json_unary_matches_grpc() {
    let (s, _dir) = start(FLAGS, &["-X", "env=prod"]);
    let http = reqwest::Client::new();
    let call = |method: &str, body: Value| {
        http.post(format!("{}/{method}", s.grpc_url()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let r = call(
        "flagd.evaluation.v1.Service/ResolveBoolean",
        json!({"flagKey": "bool", "context": {"email": "a@example.com"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["value"].clone(), body["reason"].clone(), body["variant"].clone()),
        (json!(true), json!("TARGETING_MATCH"), json!("on"))
    );
    assert_eq!(body["metadata"]["owner"], "ann");
    // proto3 JSON: int64 as a string, zero values emitted, snake_case names accepted.
    let body: Value = call("flagd.evaluation.v1.Service/ResolveInt", json!({"flag_key": "half"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["value"], "0");
    let body: Value = call("flagd.evaluation.v1.Service/ResolveString", json!({"flagKey": "env"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["value"], "prod", "-X applies to Connect too");
    let body: Value = call(
        "flagd.evaluation.v2.Service/ResolveInt",
        json!({"flagKey": "no-default"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(body["reason"], "DEFAULT");
    assert!(
        body.get("value").is_none_or(Value::is_null) && body.get("variant").is_none_or(Value::is_null),
        "{body}"
    );
    let all: Value = call("flagd.evaluation.v1.Service/ResolveAll", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["flags"]["string"]["stringValue"], "alpha");

    let r = call("flagd.evaluation.v1.Service/ResolveInt", json!({"flagKey": "missing"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    let r = call(
        "flagd.evaluation.v1.Service/ResolveBoolean",
        json!({"flagKey": "string"}),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()["code"].clone()),
        (400, json!("invalid_argument"))
    );
    let r = http
        .post(format!("{}/flagd.evaluation.v1.Service/ResolveBoolean", s.grpc_url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = call("flagd.evaluation.v1.Service/Nope", json!({})).await.unwrap();
    assert_eq!(r.status(), 501);
}

#[tokio::test]
async fn connect_proto_unary() {
    use prost::Message;
    let (s, _dir) = start(FLAGS, &[]);
    let request = v1::ResolveStringRequest {
        flag_key: "string".into(),
        context: None,
    }
    .encode_to_vec();
    let r = reqwest::Client::new()
        .post(format!("{}/flagd.evaluation.v1.Service/ResolveString", s.grpc_url()))
        .header("content-type", "application/proto")
        .body(request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/proto");
    let response = v1::ResolveStringResponse::decode(r.bytes().await.unwrap()).unwrap();
    assert_eq!(response.value, "alpha");
}

/// Reads Connect envelopes from a streaming response body.
struct Envelopes {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Envelopes {
    async fn next(&mut self) -> Option<(u8, Value)> {
        loop {
            if self.buffer.len() >= 5 {
                let len = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() >= 5 + len {
                    let flags = self.buffer[0];
                    let payload: Value = serde_json::from_slice(&self.buffer[5..5 + len]).unwrap();
                    self.buffer.drain(..5 + len);
                    return Some((flags, payload));
                }
            }
            let chunk = tokio::time::timeout(DEADLINE, self.response.chunk())
                .await
                .expect("a frame")
                .unwrap()?;
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

#[tokio::test]
async fn connect_streaming_event_stream() {
    let (mut s, dir) = start(FLAGS, &[]);
    let mut request = vec![0u8, 0, 0, 0, 2];
    request.extend_from_slice(b"{}");
    let response = reqwest::Client::new()
        .post(format!("{}/flagd.evaluation.v1.Service/EventStream", s.grpc_url()))
        .header("content-type", "application/connect+json")
        .body(request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/connect+json");
    let mut frames = Envelopes {
        response,
        buffer: Vec::new(),
    };
    assert_eq!(
        frames.next().await.unwrap(),
        (0, json!({"type": "provider_ready", "data": {}}))
    );
    dir.write("flags.json", &FLAGS.replace(r#""alpha""#, r#""changed""#));
    let (flags, change) = frames.next().await.unwrap();
    assert_eq!((flags, change["type"].clone()), (0, json!("configuration_change")));
    assert_eq!(change["data"]["flags"]["string"]["type"], "update");
    let stopping = tokio::task::spawn_blocking(move || s.stop());
    assert_eq!(frames.next().await.unwrap().1["type"], "provider_shutdown");
    let (flags, end) = frames.next().await.unwrap();
    assert_eq!(
        (flags, end),
        (2, json!({})),
        "an end-of-stream message closes the stream"
    );
    assert!(stopping.await.unwrap());
}

#[tokio::test]
async fn tls_with_the_flagd_provider() {
    use open_feature::EvaluationContext;
    use open_feature::provider::FeatureProvider;
    use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};

    let dir = Scratch::new("tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.write("cert.pem", &cert.cert.pem());
    let key_path = dir.write("key.pem", &cert.signing_key.serialize_pem());
    let flags = dir.write("flags.json", FLAGS);
    let (uri, c, k) = (
        format!("file:{}", flags.display()),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let s = Server::start(&["--uri", &uri, "-c", &c, "-k", &k]);

    for (resolver_type, port) in [
        (ResolverType::Rpc, s.ports.evaluation),
        (ResolverType::InProcess, s.ports.sync),
    ] {
        let options = FlagdOptions {
            host: "localhost".into(),
            port,
            resolver_type: resolver_type.clone(),
            tls: true,
            cert_path: Some(c.clone()),
            cache_settings: None,
            deadline_ms: 3000,
            ..Default::default()
        };
        let provider = FlagdProvider::new(options)
            .await
            .unwrap_or_else(|e| panic!("{resolver_type:?} over TLS: {e:?}"));
        let r = provider
            .resolve_string_value("string", &EvaluationContext::default())
            .await
            .unwrap();
        assert_eq!(r.value, "alpha", "{resolver_type:?}");
    }

    // Plaintext HTTP/2 to a TLS port fails: nothing is served unencrypted.
    let plain = v1::service_client::ServiceClient::connect(s.grpc_url()).await;
    let failed = match plain {
        Err(_) => true,
        Ok(mut c) => c
            .resolve_string(v1::ResolveStringRequest {
                flag_key: "string".into(),
                context: None,
            })
            .await
            .is_err(),
    };
    assert!(failed);
}

#[test]
fn tls_needs_both_files() {
    let out = std::process::Command::new(vexil_e2e::binary())
        .args(["start", "-c", "/nonexistent.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server-key-path"));
    let out = std::process::Command::new(vexil_e2e::binary())
        .args([
            "start",
            "-c",
            "/nonexistent/cert.pem",
            "-k",
            "/nonexistent/key.pem",
            "-p",
            "0",
            "-m",
            "0",
            "-g",
            "0",
            "-r",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cert.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn oversized_headers_are_rejected() {
    let (s, _dir) = start(FLAGS, &["-R", "4096"]);
    let http = reqwest::Client::new();
    let r = http
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/string"))
        .header("x-big", "x".repeat(16 * 1024))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let r = http
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/string"))
        .header("x-small", "x".repeat(512))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_count_evaluations_by_reason_and_streams() {
    let (s, _dir) = start(FLAGS, &[]);
    let mut c = v1_client(&s).await;
    c.resolve_string(v1::ResolveStringRequest {
        flag_key: "string".into(),
        context: None,
    })
    .await
    .unwrap();
    let _ = c
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "missing".into(),
            context: None,
        })
        .await;
    let mut stream = c.event_stream(v1::EventStreamRequest {}).await.unwrap().into_inner();
    next_event(&mut stream).await;
    let text = reqwest::get(s.management_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |needle: &str| text.lines().any(|l| l.starts_with(needle));
    assert!(
        has(r#"vexil_evaluations_total{protocol="flagd.evaluation.v1",flag_set="",reason="STATIC"} 1"#),
        "{text}"
    );
    assert!(
        has(r#"vexil_evaluations_total{protocol="flagd.evaluation.v1",flag_set="",reason="ERROR"} 1"#),
        "{text}"
    );
    assert!(
        has(r#"vexil_evaluation_duration_seconds_bucket{protocol="flagd.evaluation.v1""#),
        "{text}"
    );
    assert!(has("vexil_snapshots_published_total 0"), "{text}");
    assert!(has(r#"vexil_stream_subscribers{kind="event_stream"} 1"#), "{text}");
    assert!(has("vexil_flags 10"), "{text}");
}

#[tokio::test]
async fn stream_deadline_ends_streams() {
    let (s, _dir) = start(FLAGS, &["--stream-deadline", "1"]);
    let mut c = v1_client(&s).await;
    let mut stream = c.event_stream(v1::EventStreamRequest {}).await.unwrap().into_inner();
    assert_eq!(next_event(&mut stream).await.r#type, "provider_ready");
    let started = Instant::now();
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the deadline ends the stream");
    assert_eq!(end.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(started.elapsed() >= Duration::from_millis(800));
}

/// A browser's preflight from `origin` to OFREP and to Connect is allowed, answered with `allowed`.
async fn preflights_allow(s: &Server, origin: &str, allowed: &str) {
    for url in [
        s.ofrep_url("/ofrep/v1/evaluate/flags"),
        format!("{}/flagd.evaluation.v1.Service/ResolveAll", s.grpc_url()),
    ] {
        let r = reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,flagd-selector")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{url}: {}", r.status());
        assert_eq!(r.headers()["access-control-allow-origin"], allowed, "{url}");
    }
}

#[tokio::test]
async fn cors_for_browser_clients() {
    let (s, _dir) = start(FLAGS, &["-C", "https://app.example.com"]);
    preflights_allow(&s, "https://app.example.com", "https://app.example.com").await;
    let r = reqwest::Client::new()
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags"))
        .header("origin", "https://evil.example.org")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn yaml_sources_and_oversized_grpc_messages() {
    let dir = Scratch::new("yaml");
    let yaml =
        "flags:\n  greeting:\n    state: ENABLED\n    variants: {hi: hello, bye: goodbye}\n    defaultVariant: hi\n";
    let path = dir.write("flags.yaml", yaml);
    let uri = format!("file:{}", path.display());
    let s = Server::start(&["--uri", &uri, "-B", "2048"]);
    let mut c = v1_client(&s).await;
    let r = c
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "greeting".into(),
            context: None,
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().value, "hello");
    let big = ctx(&[("pad", &"x".repeat(10_000))]);
    let err = c
        .resolve_string(v1::ResolveStringRequest {
            flag_key: "greeting".into(),
            context: big,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

#[tokio::test]
async fn ofrep_writes_exact_json_for_escapes_objects_and_selector_metadata() {
    let flags = r#"{
      "metadata": {"flagSetId": "set-1", "team": "a \"quoted\" team"},
      "flags": {
        "weird \"key\"": {"state": "ENABLED", "variants": {"va\"r": "line\nbreak <&>", "o": {"k": [1, 2.5, null]}}, "defaultVariant": "va\"r",
                          "targeting": {"if": [{"==": [{"var": "pick"}, "o"]}, "o", null]}},
        "plain": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}
      }
    }"#;
    let (s, _dir) = start(flags, &[]);
    let http = reqwest::Client::new();
    for selector in [None, Some("flagSetId=set-1")] {
        let mut request = http
            .post(s.ofrep_url("/ofrep/v1/evaluate/flags"))
            .body(r#"{"context": {"pick": "o"}}"#);
        if let Some(sel) = selector {
            request = request.header("flagd-selector", sel);
        }
        let body: Value = request.send().await.unwrap().json().await.unwrap();
        let weird = body["flags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == "weird \"key\"")
            .expect("escaped key")
            .clone();
        assert_eq!(weird["value"], json!({"k": [1, 2.5, null]}));
        assert_eq!(weird["variant"], "o");
        assert_eq!(
            weird["metadata"],
            json!({"flagSetId": "set-1", "team": "a \"quoted\" team"})
        );
        let expected_top = if selector.is_some() {
            json!({"flagSetId": "set-1"})
        } else {
            json!({})
        };
        assert_eq!(body["metadata"], expected_top);
    }
    let single: Value = http
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags/weird%20%22key%22"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(single["value"], "line\nbreak <&>");
    assert_eq!(single["variant"], "va\"r");
    assert_eq!(single["reason"], "DEFAULT");
}

#[tokio::test]
async fn cors_allows_every_origin_by_default_like_flagd() {
    let (s, _dir) = start(FLAGS, &[]);
    preflights_allow(&s, "https://any.example.net", "*").await;
    let r = reqwest::Client::new()
        .post(s.ofrep_url("/ofrep/v1/evaluate/flags"))
        .header("origin", "https://any.example.net")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("etag"), "{exposed}");
}
