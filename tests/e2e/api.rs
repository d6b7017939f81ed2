//! Vexil's own API (`vexil.v1`) against the built server with a managed store: administration
//! over gRPC and Connect, evaluation of what was written (and flagd's EventStream seeing it),
//! conflicts, validation with paths, versions, rollback, audit, and API keys (401/403).

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::MetadataValue;
use vexil_e2e::{Scratch, Server};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::v1 as flagd;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::admin_service_client::AdminServiceClient;
use vexil_proto::vexil::v1::config_service_client::ConfigServiceClient;
use vexil_proto::vexil::v1::evaluation_service_client::EvaluationServiceClient;

const DEADLINE: Duration = Duration::from_secs(30);

type Admin = AdminServiceClient<tonic::transport::Channel>;
type Evaluation = EvaluationServiceClient<tonic::transport::Channel>;

fn structure(v: Value) -> Option<JsonStruct> {
    match v {
        Value::Object(m) => Some(JsonStruct::from(m)),
        _ => None,
    }
}

fn flag(default: &str) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": default})
}

fn put(environment: &str, key: &str, definition: Value) -> pb::PutFlagRequest {
    pb::PutFlagRequest {
        environment: environment.into(),
        flag_set: "web".into(),
        key: key.into(),
        definition: structure(definition),
        ..Default::default()
    }
}

fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    request
}

fn server(dir: &Scratch, env: &[(&str, &str)]) -> Server {
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    Server::start_with_env(&["--database-url", &url, "--default-environment", "prod"], env)
}

async fn clients(s: &Server) -> (Admin, Evaluation) {
    let channel = tonic::transport::Endpoint::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        AdminServiceClient::new(channel.clone()),
        EvaluationServiceClient::new(channel),
    )
}

/// Evaluates `key` in `prod/web` until it answers `want` (a write is served within moments).
async fn served(evaluation: &mut Evaluation, key: &str, want: Value) -> pb::EvaluateResponse {
    let start = Instant::now();
    loop {
        let r = evaluation
            .evaluate(pb::EvaluateRequest {
                environment: "prod".into(),
                flag_set: "web".into(),
                flag_key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got = serde_json::to_value(r.value.clone()).unwrap();
        if got == want {
            return r;
        }
        assert!(start.elapsed() < DEADLINE, "{key} still evaluates to {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administration_over_grpc_reaches_evaluation_and_flagd_streams() {
    let dir = Scratch::new("api");
    let s = server(&dir, &[]);
    let (mut admin, mut evaluation) = clients(&s).await;
    // grpc.health.v1 knows Vexil's services (a Kubernetes gRPC probe can name one).
    let channel = tonic::transport::Endpoint::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in [
        "vexil.v1.AdminService",
        "vexil.v1.EvaluationService",
        "vexil.v1.ConfigService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    let env = admin
        .create_environment(pb::CreateEnvironmentRequest {
            key: "prod".into(),
            name: "Production".into(),
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((env.key.as_str(), env.version, env.config_version), ("prod", 1, 0));
    let set = admin
        .put_flag_set(pb::PutFlagSetRequest {
            environment: "prod".into(),
            flag_set: "web".into(),
            create_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.config_version, 1);

    let mut flagd = flagd::service_client::ServiceClient::connect(s.grpc_url())
        .await
        .unwrap();
    let mut events = flagd
        .event_stream(flagd::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(events.message().await.unwrap().unwrap().r#type, "provider_ready");

    let mut create = put("prod", "banner", flag("off"));
    create.create_only = true;
    create.owner = "web-team".into();
    let written = admin.put_flag(create).await.unwrap().into_inner();
    let stored = written.flag.unwrap();
    assert_eq!(
        (stored.version, stored.owner.as_str(), written.config_version),
        (1, "web-team", 2)
    );
    let answer = served(&mut evaluation, "banner", json!(false)).await;
    assert_eq!(
        (answer.reason.as_str(), answer.variant.as_str(), answer.config_version),
        ("STATIC", "off", 2)
    );
    assert_eq!(answer.typed, Some(pb::evaluate_response::Typed::BoolValue(false)));
    // flagd's own protocol sees the managed flag without a selector (the default environment).
    let change = tokio::time::timeout(DEADLINE, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.r#type, "configuration_change");
    let resolved = flagd
        .resolve_boolean(flagd::ResolveBooleanRequest {
            flag_key: "banner".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.variant, "off");

    // Optimistic concurrency: a stale version is ABORTED and changes nothing.
    let mut update = put("prod", "banner", flag("on"));
    update.version = Some(1);
    admin.put_flag(update.clone()).await.unwrap();
    let stale = admin.put_flag(update).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    served(&mut evaluation, "banner", json!(true)).await;

    // Invalid flags: every problem with its path, nothing stored; validate says the same.
    let bad = json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "off", "targeting": {"if": [{"$ref": "nobody"}, "on", null]}});
    let invalid = admin.put_flag(put("prod", "broken", bad.clone())).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("/flags/broken/defaultVariant"),
        "{}",
        invalid.message()
    );
    assert!(
        invalid.message().contains("/flags/broken/targeting"),
        "{}",
        invalid.message()
    );
    let problems: Value = serde_json::from_slice(invalid.details()).unwrap();
    assert!(problems.as_array().unwrap().len() >= 2, "{problems}");
    let checked = admin
        .validate_flag(put("prod", "broken", bad))
        .await
        .unwrap()
        .into_inner();
    assert!(!checked.valid);
    assert!(
        checked
            .problems
            .iter()
            .any(|p| p.pointer == "/flags/broken/defaultVariant")
    );
    let missing = admin
        .get_flag(pb::GetFlagRequest {
            environment: "prod".into(),
            flag_set: "web".into(),
            key: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Versions, diff, rollback and the audit log.
    let versions = admin
        .list_versions(pb::ListVersionsRequest {
            environment: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        versions.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    let diff = admin
        .diff_versions(pb::DiffVersionsRequest {
            environment: "prod".into(),
            from: 2,
            to: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(diff.changes.len(), 1);
    let rolled = admin
        .rollback(pb::RollbackRequest {
            environment: "prod".into(),
            version: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.config_version, 4);
    let answer = served(&mut evaluation, "banner", json!(false)).await;
    assert_eq!(answer.config_version, 4);
    let audit = admin
        .list_audit_entries(pb::ListAuditEntriesRequest {
            entity: "prod/web/banner".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["rollback", "update", "create"]);
    assert!(
        audit.entries[0].actor.starts_with("anonymous"),
        "{:?}",
        audit.entries[0]
    );

    // Batch evaluation of the whole environment, and the config service.
    let batch = evaluation
        .evaluate_batch(pb::EvaluateBatchRequest {
            environment: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        batch.results.iter().map(|r| r.flag_key.as_str()).collect::<Vec<_>>(),
        ["banner"]
    );
    let mut config = ConfigServiceClient::connect(s.grpc_url()).await.unwrap();
    let snapshot = config
        .get_snapshot(pb::GetSnapshotRequest {
            environment: "prod".into(),
            flag_set: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snapshot.config_version, 4);
    let mut watch = config
        .watch(pb::WatchRequest {
            environment: "prod".into(),
            flag_set: "web".into(),
            since_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.config_version, 4);
    let Some(pb::config_event::Event::Snapshot(snapshot)) = first.event else {
        panic!("a watch without since_version starts with a snapshot: {first:?}");
    };
    assert_eq!(snapshot.flag_sets.len(), 1);
    admin.put_flag(put("prod", "second", flag("on"))).await.unwrap();
    let next = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.config_version, 5);
    let Some(pb::config_event::Event::Changes(changes)) = next.event else {
        panic!("then each version's changes: {next:?}");
    };
    let [change] = changes.changes.as_slice() else {
        panic!("one change: {changes:?}");
    };
    assert_eq!((change.kind.as_str(), change.key.as_str()), ("flag", "second"));
    let after = serde_json::to_value(change.after.clone().unwrap()).unwrap();
    assert_eq!(after["definition"]["defaultVariant"], "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api() {
    let dir = Scratch::new("keys");
    let s = server(&dir, &[("VEXIL_ADMIN_TOKEN", "bootstrap-secret")]);
    let (mut admin, mut evaluation) = clients(&s).await;

    // With an admin token set, nothing is open, even on loopback.
    let anonymous = admin
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let wrong = admin
        .list_environments(keyed(pb::ListEnvironmentsRequest::default(), "vx_nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    let token = "bootstrap-secret";
    for environment in ["prod", "staging"] {
        admin
            .import_flag_set(keyed(
                pb::ImportFlagSetRequest {
                    environment: environment.into(),
                    flag_set: "web".into(),
                    document: structure(json!({"flags": {"banner": flag("on")}})),
                },
                token,
            ))
            .await
            .unwrap();
    }
    let evaluate_key = admin
        .create_api_key(keyed(
            pb::CreateApiKeyRequest {
                name: "web".into(),
                environment: "prod".into(),
                role: "evaluate".into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = evaluate_key.secret;
    assert!(secret.starts_with("vx_"));
    let prod_admin = admin
        .create_api_key(keyed(
            pb::CreateApiKeyRequest {
                name: "prod ops".into(),
                environment: "prod".into(),
                role: "admin".into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;

    // Evaluation needs a key once keys exist; the evaluate key works in its environment only.
    let evaluate = |environment: &str| pb::EvaluateRequest {
        environment: environment.into(),
        flag_key: "banner".into(),
        ..Default::default()
    };
    let refused = evaluation.evaluate(evaluate("prod")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // flagd's protocols stay open, as in flagd, unless --flagd-keys.
    let mut flagd = flagd::service_client::ServiceClient::connect(s.grpc_url())
        .await
        .unwrap();
    let open = flagd
        .resolve_boolean(flagd::ResolveBooleanRequest {
            flag_key: "banner".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(open.value);
    let answer = evaluation
        .evaluate(keyed(evaluate("prod"), &secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.value.map(|v| serde_json::to_value(v).unwrap()),
        Some(json!(true))
    );
    let implied = evaluation
        .evaluate(keyed(evaluate(""), &secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        implied.variant, "on",
        "an environment-scoped key implies its environment"
    );
    let elsewhere = evaluation
        .evaluate(keyed(evaluate("staging"), &secret))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::PermissionDenied);
    // An evaluate key administers nothing; an environment admin only its environment.
    let not_admin = admin
        .list_flag_sets(keyed(
            pb::ListFlagSetsRequest {
                environment: "prod".into(),
                ..Default::default()
            },
            &secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(not_admin.code(), Code::PermissionDenied);
    admin
        .put_flag(keyed(put("prod", "new", flag("off")), &prod_admin))
        .await
        .unwrap();
    let other = admin
        .put_flag(keyed(put("staging", "new", flag("off")), &prod_admin))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let global = admin
        .list_environments(keyed(pb::ListEnvironmentsRequest::default(), &prod_admin))
        .await
        .unwrap_err();
    assert_eq!(global.code(), Code::PermissionDenied);

    // The audit log names the key, never its secret; a revoked key stops working.
    let audit = admin
        .list_audit_entries(keyed(
            pb::ListAuditEntriesRequest {
                entity: "prod/web/new".into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(audit.entries[0].actor.starts_with("key:"), "{:?}", audit.entries[0]);
    let keys = admin
        .list_api_keys(keyed(pb::ListApiKeysRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.api_keys.len(), 2);
    let id = keys.api_keys.iter().find(|k| k.role == "evaluate").unwrap().id;
    admin
        .revoke_api_key(keyed(pb::RevokeApiKeyRequest { id }, token))
        .await
        .unwrap();
    let revoked = evaluation.evaluate(keyed(evaluate("prod"), &secret)).await.unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_json_reaches_vexil_services_through_the_generic_layer() {
    let dir = Scratch::new("connect");
    let s = server(&dir, &[]);
    let http = reqwest::Client::new();
    let call = |method: &str, body: Value| {
        http.post(format!("{}/vexil.v1.AdminService/{method}", s.grpc_url()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let created = call("CreateEnvironment", json!({"key": "prod"})).await.unwrap();
    assert_eq!(created.status(), 200);
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["key"], "prod");
    let again = call("CreateEnvironment", json!({"key": "prod"})).await.unwrap();
    assert_eq!(again.status(), 409);
    let error: Value = again.json().await.unwrap();
    assert_eq!(error["code"], "already_exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagd_keys_put_flagd_protocols_behind_keys() {
    let dir = Scratch::new("flagd-keys");
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    let token = "bootstrap-secret";
    let s = Server::start_with_env(
        &["--database-url", &url, "--default-environment", "prod", "--flagd-keys"],
        &[("VEXIL_ADMIN_TOKEN", token)],
    );
    let (mut admin, _) = clients(&s).await;
    for environment in ["prod", "staging"] {
        admin
            .import_flag_set(keyed(
                pb::ImportFlagSetRequest {
                    environment: environment.into(),
                    flag_set: "web".into(),
                    document: structure(json!({"flags": {"banner": flag("on")}})),
                },
                token,
            ))
            .await
            .unwrap();
    }
    let key_for = async |environment: &str| {
        AdminServiceClient::connect(s.grpc_url())
            .await
            .unwrap()
            .create_api_key(keyed(
                pb::CreateApiKeyRequest {
                    name: "flagd".into(),
                    environment: environment.into(),
                    role: "evaluate".into(),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .secret
    };
    let (prod, staging) = (key_for("prod").await, key_for("staging").await);

    let mut flagd = flagd::service_client::ServiceClient::connect(s.grpc_url())
        .await
        .unwrap();
    let resolve = || flagd::ResolveBooleanRequest {
        flag_key: "banner".into(),
        context: None,
    };
    assert_eq!(
        flagd.resolve_boolean(resolve()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        flagd
            .resolve_boolean(keyed(resolve(), "vx_wrong"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        flagd
            .resolve_boolean(keyed(resolve(), &staging))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(
        flagd
            .resolve_boolean(keyed(resolve(), &prod))
            .await
            .unwrap()
            .into_inner()
            .value
    );

    let http = reqwest::Client::new();
    let ofrep = |key: Option<&str>| {
        let mut request = http
            .post(s.ofrep_url("/ofrep/v1/evaluate/flags/banner"))
            .header("content-type", "application/json")
            .body(r#"{"context": {}}"#);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        request.send()
    };
    assert_eq!(ofrep(None).await.unwrap().status(), 401);
    assert_eq!(ofrep(Some(&staging)).await.unwrap().status(), 403);
    let answered = ofrep(Some(&prod)).await.unwrap();
    assert_eq!(answered.status(), 200);
    assert_eq!(answered.json::<Value>().await.unwrap()["value"], true);

    let mut sync = vexil_proto::flagd::sync::v1::flag_sync_service_client::FlagSyncServiceClient::connect(format!(
        "http://127.0.0.1:{}",
        s.ports.sync
    ))
    .await
    .unwrap();
    let fetch = || vexil_proto::flagd::sync::v1::FetchAllFlagsRequest::default();
    assert_eq!(
        sync.fetch_all_flags(fetch()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    sync.fetch_all_flags(keyed(fetch(), &prod)).await.unwrap();
    // Health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(s.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_is_transcoded_from_the_annotations() {
    let dir = Scratch::new("json");
    let s = server(&dir, &[]);
    let http = reqwest::Client::new();
    let v1 = |path: &str| s.ofrep_url(&format!("/v1{path}"));
    let send = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = http.request(method, v1(path));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    use reqwest::Method;

    let (status, env) = send(Method::POST, "/environments", Some(json!({"key": "prod"}))).await;
    assert_eq!(
        (status, env["key"].clone(), env["version"].clone()),
        (200, json!("prod"), json!("1"))
    );
    let (status, _) = send(Method::PUT, "/environments/prod/flag-sets/web", Some(json!({}))).await;
    assert_eq!(status, 200);
    let path = "/environments/prod/flag-sets/web/flags/banner";
    let (status, created) = send(
        Method::PUT,
        path,
        Some(json!({"definition": flag("off"), "createOnly": true})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        (created["flag"]["version"].clone(), created["configVersion"].clone()),
        (json!("1"), json!("2"))
    );
    let (status, exists) = send(
        Method::PUT,
        path,
        Some(json!({"definition": flag("on"), "createOnly": true})),
    )
    .await;
    assert_eq!((status, exists["status"].clone()), (409, json!("ALREADY_EXISTS")));
    let (status, _) = send(
        Method::PUT,
        path,
        Some(json!({"definition": flag("on"), "version": "1"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, stale) = send(
        Method::PUT,
        path,
        Some(json!({"definition": flag("off"), "version": "1"})),
    )
    .await;
    assert_eq!((status, stale["status"].clone()), (409, json!("ABORTED")));
    let bad = json!({"definition": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "off"}});
    let (status, invalid) = send(Method::PUT, "/environments/prod/flag-sets/web/flags/broken", Some(bad)).await;
    assert_eq!((status, invalid["status"].clone()), (400, json!("INVALID_ARGUMENT")));
    assert_eq!(
        invalid["problems"][0]["pointer"], "/flags/broken/defaultVariant",
        "{invalid}"
    );
    let (status, unknown) = send(Method::PUT, path, Some(json!({"definition": flag("on"), "colour": 1}))).await;
    assert_eq!(status, 400, "unknown fields are refused: {unknown}");

    let (status, listed) = send(Method::GET, "/environments/prod/flag-sets/web/flags?pageSize=1", None).await;
    assert_eq!((status, listed["flags"].as_array().unwrap().len()), (200, 1));
    let evaluate = json!({"environment": "prod", "flagSet": "web", "flagKey": "banner"});
    let start = Instant::now();
    loop {
        let (status, answer) = send(Method::POST, "/evaluate", Some(evaluate.clone())).await;
        assert_eq!(status, 200, "{answer}");
        if answer["value"] == json!(true) {
            assert_eq!(
                (answer["boolValue"].clone(), answer["reason"].clone()),
                (json!(true), json!("STATIC"))
            );
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{answer}");
    }
    let (status, audit) = send(Method::GET, "/audit?entity=prod/web/banner", None).await;
    assert_eq!(
        (status, audit["entries"].as_array().unwrap().len()),
        (200, 2),
        "{audit}"
    );
    let (status, missing) = send(Method::GET, "/nowhere", None).await;
    assert_eq!(status, 404, "{missing}");
    let (status, openapi) = send(Method::GET, "/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(openapi["paths"]["/v1/environments/{environment}/flag-sets/{flag_set}/flags/{key}"]["put"].is_object());

    // A browser page on this machine does not get the open admin API.
    let from_page = http
        .post(v1("/environments"))
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .body(json!({"key": "evil"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(from_page.status(), 401);

    // Watch as Server-Sent Events: the current version, then the next.
    let watch = http
        .get(v1("/environments/prod/config:watch?flagSet=web"))
        .send()
        .await
        .unwrap();
    assert_eq!(watch.headers()["content-type"], "text/event-stream");
    let mut events = SseEvents::of(watch);
    let first = events.next().await.1;
    assert_eq!(first["configVersion"], "3");
    assert_eq!(first["snapshot"]["flagSets"][0]["key"], "web");
    send(
        Method::PUT,
        "/environments/prod/flag-sets/web/flags/second",
        Some(json!({"definition": flag("on")})),
    )
    .await;
    let (id, second) = events.next().await;
    assert_eq!(id.as_deref(), Some("4"));
    assert_eq!(second["configVersion"], "4");
    assert_eq!(second["changes"]["changes"][0]["key"], "second");
    assert_eq!(
        second["changes"]["changes"][0]["after"]["definition"]["defaultVariant"],
        "on"
    );

    // An EventSource that reconnects sends the last id it saw: it gets exactly what came after.
    let resumed = http
        .get(v1("/environments/prod/config:watch?flagSet=web"))
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap();
    let (id, data) = SseEvents::of(resumed).next().await;
    assert_eq!(id.as_deref(), Some("4"));
    assert_eq!(data["changes"]["changes"][0]["key"], "second", "{data}");
}

/// The data events of a Server-Sent Events response, with their ids.
struct SseEvents {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    text: String,
}

impl SseEvents {
    fn of(response: reqwest::Response) -> SseEvents {
        SseEvents {
            body: Box::pin(response.bytes_stream()),
            text: String::new(),
        }
    }

    /// The next event with data (comments skipped): its id, if any, and its data as JSON.
    async fn next(&mut self) -> (Option<String>, Value) {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let event: String = self.text.drain(..end + 2).collect();
                let field = |name: &str| event.lines().find_map(|l| l.strip_prefix(name).map(str::to_owned));
                if let Some(data) = field("data: ") {
                    return (field("id: "), serde_json::from_str(&data).unwrap());
                }
                continue;
            }
            let chunk = tokio::time::timeout(DEADLINE, self.body.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_reaches_vexil_services() {
    use prost::Message;

    let dir = Scratch::new("grpc-web");
    let s = server(&dir, &[]);
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let call = |method: &'static str, message: Vec<u8>| {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&message);
        http.post(format!("{}/vexil.v1.AdminService/{method}", s.grpc_url()))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(frame)
            .send()
    };
    let created = call(
        "CreateEnvironment",
        pb::CreateEnvironmentRequest {
            key: "prod".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 200);
    let body = created.bytes().await.unwrap();
    assert_eq!(body[0], 0, "a data frame first");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let environment = pb::Environment::decode(&body[5..5 + len]).unwrap();
    assert_eq!((environment.key.as_str(), environment.version), ("prod", 1));
    let trailers = String::from_utf8_lossy(&body[5 + len + 5..]).to_ascii_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // Errors come as gRPC-web trailers too: ALREADY_EXISTS is 6.
    let again = call(
        "CreateEnvironment",
        pb::CreateEnvironmentRequest {
            key: "prod".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await
    .unwrap();
    let status = again
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| "in trailers".into());
    let text = String::from_utf8_lossy(&again.bytes().await.unwrap()).to_ascii_lowercase();
    assert!(status == "6" || text.contains("grpc-status:6"), "{status} {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watches_count_against_max_streams() {
    let dir = Scratch::new("watch-limit");
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    let s = Server::start_with_env(&["--database-url", &url, "--max-streams", "1"], &[]);
    let (mut admin, _) = clients(&s).await;
    admin
        .create_environment(pb::CreateEnvironmentRequest {
            key: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut config = ConfigServiceClient::connect(s.grpc_url()).await.unwrap();
    let watch = || pb::WatchRequest {
        environment: "prod".into(),
        flag_set: String::new(),
        since_version: 0,
    };
    // The new environment is served once this server has loaded it (moments after the write).
    let start = Instant::now();
    let mut first = loop {
        match config.watch(watch()).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::NotFound && start.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    first.message().await.unwrap().unwrap();
    let refused = config.watch(watch()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(first);
    let start = Instant::now();
    loop {
        match config.watch(watch()).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(start.elapsed() < DEADLINE, "the slot of a closed watch is given back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
