//! `/metrics` of a server with a file source, the managed store (SQLite) and Redis: evaluations
//! over flagd's gRPC and OFREP counted by protocol, flag set and reason, with no label value taken
//! from a request that names a missing flag or flag set; each environment's config version and
//! when it was published; each file source's last change; the store's, Redis's and the tracker's
//! health, latency and queues; the build.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use vexil_e2e::{Scratch, Server, binary};
use vexil_proto::flagd::evaluation::v1;

const DEADLINE: Duration = Duration::from_secs(30);

/// Names a request makes up: none may show up in `/metrics`.
const MADE_UP: &str = "no-such";

fn import(dir: &Scratch, url: &str, environment: &str, document: &Value) {
    let file = dir.write(&format!("{environment}.json"), &document.to_string());
    let out = std::process::Command::new(binary())
        .args(["import", file.to_str().unwrap(), "--environment", environment])
        .args(["--flag-set", "web", "--database-url", url])
        .output()
        .expect("vexil runs");
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The value of the series written exactly as `series` (name and labels), if rendered.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

/// The values label `label` takes in the series of metric `name`.
fn label_values(text: &str, name: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|labels| {
            let at = labels.find(&key)? + key.len();
            Some(labels[at..].split('"').next()?.to_owned())
        })
        .collect()
}

async fn scrape(server: &Server) -> String {
    reqwest::get(server.management_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Scrapes until `ok` holds for the text (gauges are refreshed every second), failing after
/// [`DEADLINE`] with the last text.
async fn scrape_until(server: &Server, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = scrape(server).await;
        if ok(&text) {
            return text;
        }
        assert!(started.elapsed() < DEADLINE, "{what} within {DEADLINE:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn with_selector<T>(message: T, selector: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(selector) = selector {
        request
            .metadata_mut()
            .insert("flagd-selector", selector.parse().unwrap());
    }
    request
}

/// flagd v1 `ResolveString`; the gRPC status code of a failure.
async fn resolve(server: &Server, key: &str, selector: Option<&str>) -> Result<String, tonic::Code> {
    let mut client = v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let message = v1::ResolveStringRequest {
        flag_key: key.into(),
        context: None,
    };
    client
        .resolve_string(with_selector(message, selector))
        .await
        .map(|r| r.into_inner().value)
        .map_err(|s| s.code())
}

/// An OFREP evaluation of `key`, or of every flag (`None`); the status.
async fn ofrep(server: &Server, key: Option<&str>, selector: Option<&str>) -> u16 {
    let path = match key {
        Some(key) => format!("/ofrep/v1/evaluate/flags/{key}"),
        None => "/ofrep/v1/evaluate/flags".to_owned(),
    };
    let mut request = reqwest::Client::new()
        .post(server.ofrep_url(&path))
        .header("content-type", "application/json")
        .body(r#"{"context": {"targetingKey": "user-1"}}"#);
    if let Some(selector) = selector {
        request = request.header("flagd-selector", selector);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_configured_flag_sets_environments_and_backends_only() {
    let redis = vexil_testkit::redis();
    let dir = Scratch::new("metrics");
    let url = format!("sqlite:{}", dir.0.join("vexil.db").display());
    let colors = |color: &str| json!({"flags": {"color": {"state": "ENABLED", "variants": {"blue": "blue", "green": "green"}, "defaultVariant": color}}});
    let before_import = unix_now();
    import(&dir, &url, "default", &colors("blue"));
    import(&dir, &url, "staging", &colors("green"));
    let files = json!({"flags": {
        "banner": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                   "metadata": {"flagSetId": "files"}},
        "plain": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}
    }});
    let path = dir.write("flags.json", &files.to_string());
    let source = path.to_str().unwrap().to_owned();
    let uri = format!("file:{source}");
    let server = Server::start(&[
        "--uri",
        &uri,
        "--database-url",
        &url,
        "--redis-url",
        redis.url(),
        "--store-poll-interval-ms",
        "100",
    ]);

    // flagd's gRPC: flags of existing flag sets, a missing flag set, a missing flag.
    assert_eq!(
        resolve(&server, "color", Some("flagSetId=default/web")).await,
        Ok("blue".into())
    );
    let missing_set = format!("flagSetId={MADE_UP}-set");
    assert_eq!(
        resolve(&server, "color", Some(&missing_set)).await,
        Err(tonic::Code::NotFound)
    );
    let missing_flag = format!("{MADE_UP}-flag");
    assert_eq!(resolve(&server, &missing_flag, None).await, Err(tonic::Code::NotFound));
    let mut client = v1::service_client::ServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let banner = client
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "banner".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(banner.value);
    // OFREP: one flag of another environment, a missing flag, every flag, every flag of a missing
    // flag set.
    assert_eq!(ofrep(&server, Some("color"), Some("flagSetId=staging/web")).await, 200);
    assert_eq!(ofrep(&server, Some(&missing_flag), None).await, 404);
    assert_eq!(ofrep(&server, None, None).await, 200);
    assert_eq!(ofrep(&server, None, Some(&missing_set)).await, 200);
    let mut events = client
        .event_stream(v1::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(events.message().await.unwrap().unwrap().r#type, "provider_ready");

    // Redis answers, its snapshots are written back, and the imports' outbox rows are announced
    // (the relay sweeps rows older than 2 s).
    let text = scrape_until(&server, "Redis up, a snapshot cached, the imports announced", |t| {
        sample(t, r#"vexil_config_cache_up{kind="redis"}"#) == Some(1.0)
            && sample(t, "vexil_config_cache_writes_total").is_some_and(|n| n >= 1.0)
            && sample(t, "vexil_outbox_published_total").is_some_and(|n| n >= 2.0)
    })
    .await;
    let now = unix_now();

    // Evaluations: by protocol, the flag set of the flag evaluated, and reason.
    let evaluations = |labels: &str| sample(&text, &format!("vexil_evaluations_total{{{labels}}}"));
    let v1 = r#"protocol="flagd.evaluation.v1""#;
    assert_eq!(
        evaluations(&format!(r#"{v1},flag_set="default/web",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(
        evaluations(&format!(r#"{v1},flag_set="files",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(evaluations(&format!(r#"{v1},flag_set="",reason="ERROR""#)), Some(2.0));
    let ofrep = r#"protocol="ofrep""#;
    // The single evaluation of staging's color; the bulk one saw default's color, banner, plain.
    assert_eq!(
        evaluations(&format!(r#"{ofrep},flag_set="staging/web",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(
        evaluations(&format!(r#"{ofrep},flag_set="default/web",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(
        evaluations(&format!(r#"{ofrep},flag_set="files",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(
        evaluations(&format!(r#"{ofrep},flag_set="",reason="STATIC""#)),
        Some(1.0)
    );
    assert_eq!(
        evaluations(&format!(r#"{ofrep},flag_set="",reason="ERROR""#)),
        Some(1.0)
    );
    let flag_sets = label_values(&text, "vexil_evaluations_total", "flag_set");
    let configured: BTreeSet<String> = ["", "default/web", "staging/web", "files"].map(String::from).into();
    assert_eq!(flag_sets, configured);
    assert_eq!(
        label_values(&text, "vexil_evaluations_total", "protocol"),
        ["flagd.evaluation.v1", "ofrep"].map(String::from).into()
    );
    assert!(
        sample(&text, &format!("vexil_evaluation_duration_seconds_count{{{ofrep}}}")) == Some(4.0),
        "{text}"
    );
    // Nothing a request made up is a label value, in any metric.
    assert!(!text.contains(MADE_UP), "{text}");

    // The configuration: each environment's version and when it was published; the file's last
    // change; the snapshots and flags served.
    assert_eq!(
        sample(&text, r#"vexil_config_version{environment="default"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"vexil_config_version{environment="staging"}"#),
        Some(1.0)
    );
    assert_eq!(
        label_values(&text, "vexil_config_version", "environment"),
        ["default", "staging"].map(String::from).into()
    );
    for environment in ["default", "staging"] {
        let series = format!(r#"vexil_config_last_change_timestamp_seconds{{environment="{environment}"}}"#);
        let published = sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(
            (before_import - 1.0..=now + 1.0).contains(&published),
            "{environment} published at {published}, imported after {before_import}, scraped at {now}"
        );
    }
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let modified = modified.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let changed = sample(
        &text,
        &format!(r#"vexil_source_last_change_timestamp_seconds{{source="{source}"}}"#),
    );
    assert!(
        changed.is_some_and(|c| (c - modified).abs() < 0.001),
        "{changed:?} ≠ {modified}"
    );
    assert_eq!(
        sample(&text, &format!(r#"vexil_source_up{{source="{source}"}}"#)),
        Some(1.0)
    );
    assert_eq!(sample(&text, r#"vexil_source_up{source="store"}"#), Some(1.0));
    assert_eq!(sample(&text, "vexil_snapshots_published_total"), Some(0.0));
    // default's and staging's color, banner, plain.
    assert_eq!(sample(&text, "vexil_flags"), Some(4.0));

    // The store and Redis: up, and their calls timed.
    assert_eq!(sample(&text, "vexil_store_up"), Some(1.0));
    let store = |operation: &str| {
        sample(
            &text,
            &format!(r#"vexil_store_operation_duration_seconds_count{{operation="{operation}",outcome="ok"}}"#),
        )
    };
    for operation in ["config_versions", "snapshot", "pending_outbox", "mark_published"] {
        assert!(store(operation).is_some_and(|n| n >= 1.0), "{operation}:\n{text}");
    }
    let cache = |operation: &str| {
        sample(
            &text,
            &format!(
                r#"vexil_config_cache_operation_duration_seconds_count{{kind="redis",operation="{operation}",outcome="ok"}}"#
            ),
        )
    };
    for operation in ["versions", "put_snapshot", "publish"] {
        assert!(cache(operation).is_some_and(|n| n >= 1.0), "{operation}:\n{text}");
    }
    assert!(text.contains("# TYPE vexil_store_operation_duration_seconds histogram"));
    assert!(text.contains("# TYPE vexil_config_cache_operation_duration_seconds histogram"));
    assert_eq!(sample(&text, r#"vexil_store_loads_total{from="database"}"#), Some(2.0));

    // Streams, the tracker's queues, the build.
    assert_eq!(
        sample(&text, r#"vexil_stream_subscribers{kind="event_stream"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"vexil_tracking_queue_length{queue="exposures"}"#),
        Some(0.0)
    );
    assert!(sample(&text, r#"vexil_tracking_queue_capacity{queue="exposures"}"#).is_some_and(|n| n > 0.0));
    assert_eq!(
        sample(
            &text,
            &format!(r#"vexil_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );
    drop(events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_reported_down_while_postgres_is_and_up_after() {
    let postgres = vexil_testkit::PostgresServer::start_dedicated();
    let url = postgres.url("postgres");
    let dir = Scratch::new("metrics-outage");
    import(&dir, &url, "default", &json!({"flags": {}}));
    let server = Server::start(&["--database-url", &url, "--store-poll-interval-ms", "100"]);
    let text = scrape_until(&server, "the store up", |t| sample(t, "vexil_store_up") == Some(1.0)).await;
    assert_eq!(sample(&text, r#"vexil_config_cache_up{kind="in-process"}"#), Some(1.0));
    assert_eq!(
        sample(&text, r#"vexil_config_version{environment="default"}"#),
        Some(1.0)
    );

    postgres.stop();
    let failed = r#"vexil_store_operation_duration_seconds_count{operation="config_versions",outcome="error"}"#;
    let text = scrape_until(&server, "the store down", |t| sample(t, "vexil_store_up") == Some(0.0)).await;
    assert!(sample(&text, failed).is_some_and(|n| n >= 1.0), "{text}");
    // The version served is still there: evaluation goes on from the last snapshot.
    assert_eq!(
        sample(&text, r#"vexil_config_version{environment="default"}"#),
        Some(1.0)
    );

    postgres.start();
    scrape_until(&server, "the store up again", |t| {
        sample(t, "vexil_store_up") == Some(1.0)
    })
    .await;
}
