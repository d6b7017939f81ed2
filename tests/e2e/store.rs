//! The managed store end to end, on SQLite and on Postgres: `vexil import` run as another process
//! changes a running server's flags, and every flagd protocol sees it: an EventStream gets
//! `configuration_change`, a SyncFlags subscriber the new payload, the OpenFeature flagd provider
//! (RPC and in-process) the new value; `vexil export` gives the document back.

use std::process::Output;
use std::time::{Duration, Instant};

use open_feature::EvaluationContext;
use open_feature::provider::FeatureProvider;
use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};
use serde_json::{Value, json};
use vexil_e2e::{Scratch, Server, binary};
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

const DEADLINE: Duration = Duration::from_secs(30);

fn vexil(args: &[&str]) -> Output {
    std::process::Command::new(binary())
        .args(args)
        .output()
        .expect("vexil runs")
}

fn document(color: &str) -> Value {
    json!({
        "flags": {
            "color": {"state": "ENABLED", "variants": {"blue": "blue", "red": "red", "green": "green"}, "defaultVariant": color},
            "beta": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                     "targeting": {"if": [{"$ref": "staff"}, "on", null]}}
        },
        "$evaluators": {"staff": {"ends_with": [{"var": "email"}, "@example.com"]}},
        "metadata": {"team": "web"}
    })
}

fn import(dir: &Scratch, url: &str, environment: &str, doc: &Value) -> String {
    let file = dir.write("flags.json", &doc.to_string());
    let out = vexil(&[
        "import",
        file.to_str().unwrap(),
        "--environment",
        environment,
        "--flag-set",
        "web",
        "--database-url",
        url,
    ]);
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn with_selector<T>(message: T, selector: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("flagd-selector", selector.parse().unwrap());
    request
}

async fn resolve(
    client: &mut v1::service_client::ServiceClient<tonic::transport::Channel>,
    selector: Option<&str>,
) -> Result<String, tonic::Code> {
    let message = v1::ResolveStringRequest {
        flag_key: "color".into(),
        context: None,
    };
    let request = match selector {
        Some(s) => with_selector(message, s),
        None => tonic::Request::new(message),
    };
    client
        .resolve_string(request)
        .await
        .map(|r| r.into_inner().value)
        .map_err(|s| s.code())
}

async fn provider(mode: ResolverType, port: u16, selector: Option<&str>) -> FlagdProvider {
    FlagdProvider::new(FlagdOptions {
        host: "127.0.0.1".into(),
        port,
        resolver_type: mode,
        cache_settings: None,
        selector: selector.map(str::to_owned),
        deadline_ms: 2000,
        ..Default::default()
    })
    .await
    .expect("the provider connects")
}

/// Waits until the provider resolves `color` to `want`.
async fn eventually(provider: &FlagdProvider, want: &str) {
    let start = Instant::now();
    loop {
        let got = provider
            .resolve_string_value("color", &EvaluationContext::default())
            .await
            .map(|d| d.value);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the provider still resolves {got:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_change_by_another_process_reaches_every_protocol(url: &str) {
    let dir = Scratch::new("store");
    let out = import(&dir, url, "default", &document("blue"));
    assert!(out.contains("config version 1"), "{out}");
    import(&dir, url, "staging", &document("green"));

    let server = Server::start(&["--database-url", url, "--store-poll-interval-ms", "100"]);
    let mut client = v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    assert_eq!(resolve(&mut client, None).await, Ok("blue".into()));
    assert_eq!(
        resolve(&mut client, Some("flagSetId=default/web")).await,
        Ok("blue".into())
    );
    assert_eq!(
        resolve(&mut client, Some("flagSetId=staging/web")).await,
        Ok("green".into())
    );
    assert_eq!(
        resolve(&mut client, Some("flagSetId=qa/web")).await,
        Err(tonic::Code::NotFound)
    );

    let mut events = client
        .event_stream(v1::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    let ready = tokio::time::timeout(DEADLINE, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ready.r#type, "provider_ready");
    let mut syncer = sync::flag_sync_service_client::FlagSyncServiceClient::connect(server.sync_url())
        .await
        .unwrap();
    let mut syncs = syncer
        .sync_flags(sync::SyncFlagsRequest {
            provider_id: "e2e".into(),
            selector: "flagSetId=staging/web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, syncs.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config: Value = serde_json::from_str(&first.flag_configuration).unwrap();
    assert_eq!(config["flags"]["color"]["defaultVariant"], "green");
    assert_eq!(
        config["flags"]["color"]["metadata"],
        json!({"team": "web", "flagSetId": "staging/web"})
    );
    assert_eq!(
        config["flags"]["beta"]["targeting"]["if"][0],
        json!({"ends_with": [{"var": "email"}, "@example.com"]}),
        "segments inlined"
    );

    let rpc = provider(ResolverType::Rpc, server.ports.evaluation, None).await;
    let in_process = provider(
        ResolverType::InProcess,
        server.ports.sync,
        Some("flagSetId=staging/web"),
    )
    .await;
    eventually(&rpc, "blue").await;
    eventually(&in_process, "green").await;

    // Another process changes both environments.
    import(&dir, url, "default", &document("red"));
    import(&dir, url, "staging", &document("red"));
    let change = tokio::time::timeout(DEADLINE, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.r#type, "configuration_change");
    let data = serde_json::to_value(change.data.unwrap()).unwrap();
    assert_eq!(data["flags"]["color"]["type"], "update", "{data}");
    let next = tokio::time::timeout(DEADLINE, syncs.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config: Value = serde_json::from_str(&next.flag_configuration).unwrap();
    assert_eq!(config["flags"]["color"]["defaultVariant"], "red");
    eventually(&rpc, "red").await;
    eventually(&in_process, "red").await;
    assert_eq!(
        resolve(&mut client, Some("flagSetId=staging/web")).await,
        Ok("red".into())
    );

    // A write through this server's admin API reaches the same subscribers and both providers.
    let mut admin = vexil_proto::vexil::v1::admin_service_client::AdminServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    for environment in ["default", "staging"] {
        let mut flag = document("green")["flags"]["color"].clone();
        flag["defaultVariant"] = json!("green");
        admin
            .put_flag(vexil_proto::vexil::v1::PutFlagRequest {
                environment: environment.into(),
                flag_set: "web".into(),
                key: "color".into(),
                definition: match flag {
                    Value::Object(m) => Some(m.into()),
                    _ => None,
                },
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let change = tokio::time::timeout(DEADLINE, events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.r#type, "configuration_change");
    let synced = tokio::time::timeout(DEADLINE, syncs.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let config: Value = serde_json::from_str(&synced.flag_configuration).unwrap();
    assert_eq!(config["flags"]["color"]["defaultVariant"], "green");
    eventually(&rpc, "green").await;
    eventually(&in_process, "green").await;
    let mut flag = document("red")["flags"]["color"].clone();
    flag["defaultVariant"] = json!("red");
    admin
        .put_flag(vexil_proto::vexil::v1::PutFlagRequest {
            environment: "default".into(),
            flag_set: "web".into(),
            key: "color".into(),
            definition: match flag {
                Value::Object(m) => Some(m.into()),
                _ => None,
            },
            ..Default::default()
        })
        .await
        .unwrap();

    // `export` gives the document back.
    let out = vexil(&[
        "export",
        "--environment",
        "default",
        "--flag-set",
        "web",
        "--database-url",
        url,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let exported: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(exported, document("red"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let dir = Scratch::new("sqlite");
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    a_change_by_another_process_reaches_every_protocol(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let db = vexil_testkit::postgres().database().await;
    a_change_by_another_process_reaches_every_protocol(db.url()).await;
}

#[test]
fn the_store_commands_report_problems_and_exit_non_zero() {
    let dir = Scratch::new("cli");
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    let mut bad = document("purple");
    bad["flags"]["beta"]["targeting"] = json!({"if": [{"$ref": "nobody"}, "on", null]});
    let file = dir.write("bad.json", &bad.to_string());
    let out = vexil(&[
        "import",
        file.to_str().unwrap(),
        "-e",
        "default",
        "--flag-set",
        "web",
        "--database-url",
        &url,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/flags/color/defaultVariant"), "{err}");
    assert!(err.contains("/flags/beta/targeting"), "{err}");

    let out = vexil(&["export", "-e", "default", "--flag-set", "web", "--database-url", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let out = vexil(&["migrate", "--database-url", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = vexil(&["migrate", "--database-url", "mysql://nowhere/db"]);
    assert!(!out.status.success());

    let out = vexil(&["keys", "create", "--role", "admin", "--database-url", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(key.trim().starts_with("vx_"), "{key}");
    let out = vexil(&["keys", "create", "--role", "evaluate", "--database-url", &url]);
    assert!(!out.status.success(), "an evaluate key needs an environment");
    let out = vexil(&[
        "keys",
        "create",
        "--role",
        "root",
        "-e",
        "default",
        "--database-url",
        &url,
    ]);
    assert!(!out.status.success());

    // Redis is for replicas of a store; a malformed URL is refused at start.
    let out = vexil(&[
        "start",
        "-f",
        "examples/flags.json",
        "--redis-url",
        "redis://127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis-url needs the store"), "{err}");
    let out = vexil(&["serve", "--database-url", &url, "--redis-url", "http://nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid --redis-url"), "{err}");
    let out = vexil(&[
        "serve",
        "--database-url",
        &url,
        "--redis-url",
        "rediss://127.0.0.1:1",
        "--redis-ca-cert",
        "/nonexistent/ca.pem",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read --redis-ca-cert /nonexistent/ca.pem"), "{err}");
}

/// Waits until `ok` holds, polling.
async fn until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < DEADLINE, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_outlives_a_postgres_outage_and_writes_fail_cleanly() {
    use vexil_proto::vexil::v1 as pb;
    use vexil_proto::vexil::v1::admin_service_client::AdminServiceClient;

    let postgres = vexil_testkit::PostgresServer::start_dedicated();
    let url = postgres.url("postgres");
    let dir = Scratch::new("outage");
    import(&dir, &url, "default", &document("blue"));
    let server = Server::start(&[
        "--database-url",
        &url,
        "--store-poll-interval-ms",
        "100",
        "--stale-after",
        "0",
    ]);
    let mut flagd = v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let mut admin = AdminServiceClient::connect(server.grpc_url()).await.unwrap();
    let write = |color: &str| pb::PutFlagRequest {
        environment: "default".into(),
        flag_set: "web".into(),
        key: "color".into(),
        definition: match document(color)["flags"]["color"].clone() {
            Value::Object(m) => Some(m.into()),
            _ => None,
        },
        ..Default::default()
    };
    admin.put_flag(write("green")).await.unwrap();
    until("the write is served", async || {
        resolve(&mut flagd, None).await == Ok("green".into())
    })
    .await;

    postgres.stop();
    // Writes fail with UNAVAILABLE; evaluation answers from the last snapshot.
    let failed = admin.put_flag(write("red")).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    for _ in 0..20 {
        assert_eq!(resolve(&mut flagd, None).await, Ok("green".into()));
    }
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let url = server.management_url(path);
        let http = http.clone();
        async move { http.get(url).send().await.unwrap() }
    };
    until("readiness reports the store failing", async || {
        let response = get("/readyz").await;
        response.status() == 200 && response.text().await.unwrap().contains("source store: failing")
    })
    .await;
    until("the metrics report the store down", async || {
        get("/metrics")
            .await
            .text()
            .await
            .unwrap()
            .contains(r#"vexil_source_up{source="store"} 0"#)
    })
    .await;
    assert_eq!(resolve(&mut flagd, None).await, Ok("green".into()));

    // The database returns: writes work again and everything converges.
    postgres.start();
    until("writes work again", async || admin.put_flag(write("red")).await.is_ok()).await;
    until("the new value is served", async || {
        resolve(&mut flagd, None).await == Ok("red".into())
    })
    .await;
    until("readiness recovers", async || {
        let response = get("/readyz").await;
        response.status() == 200 && response.text().await.unwrap() == "ready"
    })
    .await;
    until("the metrics report the store up", async || {
        get("/metrics")
            .await
            .text()
            .await
            .unwrap()
            .contains(r#"vexil_source_up{source="store"} 1"#)
    })
    .await;
}
