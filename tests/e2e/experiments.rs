//! Experiments end to end through the public APIs of the built server, as the README's curl
//! walkthrough does it: create a flag and an experiment, start it, evaluate it for 10,000 units
//! (server-side exposures), track conversions with a planted effect, and read results that find
//! it with the right sign — and an A/A experiment that finds nothing. On SQLite (the embedded
//! default) and on Postgres. Beside it: the same assignment on flagd's protocols and OFREP,
//! idempotent retries, bad events rejected one by one, the rate limit, and bootstrap payloads.

use std::time::{Duration, Instant};

use open_feature::EvaluationContext;
use open_feature::provider::FeatureProvider;
use open_feature_flagd::{FlagdOptions, FlagdProvider, ResolverType};
use serde_json::{Value, json};
use vexil_e2e::{Scratch, Server};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::v1 as flagd;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::evaluation_service_client::EvaluationServiceClient;

const DEADLINE: Duration = Duration::from_secs(60);
const UNITS: usize = 10_000;

/// JSON calls against the HTTP port, as curl makes them.
struct Api {
    http: reqwest::Client,
    server: Server,
}

impl Api {
    fn url(&self, path: &str) -> String {
        self.server.ofrep_url(path)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    /// A call that must succeed.
    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, body, _) = self.call(method, path, body).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.ok(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> Value {
        self.ok(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.ok(reqwest::Method::GET, path, None).await
    }
}

async fn start(database_url: &str, extra: &[&str]) -> Api {
    let mut args = vec!["--database-url", database_url, "--default-environment", "prod"];
    args.extend_from_slice(extra);
    Api {
        http: reqwest::Client::new(),
        server: Server::start(&args),
    }
}

/// An environment `prod` with flag set `web` and two string flags with variants control and
/// treatment, each with an experiment (`checkout-copy` with a planted effect, `aa-test` without).
async fn set_up(api: &Api) {
    api.post("/v1/environments", json!({"key": "prod", "name": "Production"}))
        .await;
    api.put("/v1/environments/prod/flag-sets/web", json!({})).await;
    for flag in ["checkout-button", "footer-copy"] {
        let definition = json!({
            "state": "ENABLED",
            "variants": {"control": "Buy", "treatment": "Buy now"},
            "defaultVariant": "control"
        });
        api.put(
            &format!("/v1/environments/prod/flag-sets/web/flags/{flag}"),
            json!({"definition": definition}),
        )
        .await;
    }
    for (key, flag) in [("checkout-copy", "checkout-button"), ("aa-test", "footer-copy")] {
        let created = api
            .put(
                &format!("/v1/environments/prod/experiments/{key}"),
                json!({
                    "flagSet": "web",
                    "flag": flag,
                    "hypothesis": "a more direct button sells more",
                    "trafficPercent": 100,
                    "weights": [{"variant": "control", "weight": 1}, {"variant": "treatment", "weight": 1}],
                    "metrics": [{"key": "purchase", "kind": "binomial"}, {"key": "revenue", "kind": "mean", "role": "secondary"}]
                }),
            )
            .await;
        assert_eq!(created["experiment"]["status"], "draft");
        let started = api
            .post(&format!("/v1/environments/prod/experiments/{key}:start"), json!({}))
            .await;
        assert_eq!(started["experiment"]["status"], "running");
    }
}

/// Evaluates `flag` for `unit` over Vexil's gRPC API until the experiment answers (a write is
/// served within moments of its commit).
async fn evaluate(
    client: &mut EvaluationServiceClient<tonic::transport::Channel>,
    flag: &str,
    unit: &str,
) -> pb::EvaluateResponse {
    let mut context = serde_json::Map::new();
    context.insert("targetingKey".into(), json!(unit));
    client
        .evaluate(pb::EvaluateRequest {
            environment: "prod".into(),
            flag_key: flag.into(),
            context: Some(JsonStruct::from(context)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Whether `unit` converts: deterministic, at `percent` %.
fn converts(unit: usize, percent: usize) -> bool {
    (unit * 7919) % 100 < percent
}

async fn run_experiment_loop(database_url: &str) {
    let api = start(database_url, &[]).await;
    set_up(&api).await;
    let channel = tonic::transport::Endpoint::from_shared(api.server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EvaluationServiceClient::new(channel);

    // Both experiments are served within moments of their start.
    let began = Instant::now();
    while evaluate(&mut client, "checkout-button", "user-0").await.reason != "SPLIT"
        || evaluate(&mut client, "footer-copy", "user-0").await.reason != "SPLIT"
    {
        assert!(began.elapsed() < DEADLINE, "the started experiment is never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 10,000 units evaluate both flags: each is assigned, sticky, with the experiment in metadata.
    let mut variants = Vec::with_capacity(UNITS);
    for unit in 0..UNITS {
        let name = format!("user-{unit}");
        let r = evaluate(&mut client, "checkout-button", &name).await;
        assert_eq!(r.reason, "SPLIT", "{name}: config version {}", r.config_version);
        let metadata = r.metadata.unwrap().into_map();
        assert_eq!(metadata["experimentKey"], "checkout-copy");
        assert_eq!(metadata["experimentVariant"], json!(r.variant));
        variants.push(r.variant);
        let aa = evaluate(&mut client, "footer-copy", &name).await;
        assert_eq!(aa.reason, "SPLIT", "{name}");
    }
    let treated = variants.iter().filter(|v| *v == "treatment").count();
    assert!((4_700..=5_300).contains(&treated), "an even split: {treated}");

    // Conversions with a planted effect: control 10 %, treatment 14 %; the A/A flag's units
    // convert at 10 % whatever their variant. Revenue 20 per purchase.
    let mut events = Vec::new();
    for (unit, variant) in variants.iter().enumerate() {
        let rate = if variant == "treatment" { 14 } else { 10 };
        if converts(unit, rate) {
            events.push(json!({"eventId": format!("buy-{unit}"), "kind": "conversion", "unit": format!("user-{unit}"), "metric": "purchase"}));
            events.push(json!({"eventId": format!("rev-{unit}"), "kind": "custom", "unit": format!("user-{unit}"), "metric": "revenue", "value": 20.0}));
        }
    }
    let mut accepted = 0;
    for batch in events.chunks(1000) {
        let answer = api.post("/v1/track:batch", json!({"events": batch})).await;
        accepted += answer["accepted"].as_u64().unwrap();
        assert_eq!(answer["rejected"], json!([]), "{answer}");
    }
    assert_eq!(accepted as usize, events.len());
    // A retried batch is counted once.
    let retried = api
        .post("/v1/track:batch", json!({"events": &events[..1000.min(events.len())]}))
        .await;
    assert_eq!(
        (retried["accepted"].as_u64(), retried["duplicates"].as_u64()),
        (Some(0), Some(1000.min(events.len()) as u64))
    );

    // Bad events are rejected one by one with their reasons; the good ones of the batch are kept.
    let mixed = api
        .post(
            "/v1/track:batch",
            json!({"events": [
                {"eventId": "ok-1", "kind": "custom", "unit": "user-1", "metric": "scroll"},
                {"eventId": "", "kind": "conversion", "unit": "user-1", "metric": "purchase"},
                {"eventId": "bad-kind", "kind": "purchase", "unit": "user-1"},
                {"eventId": "no-metric", "kind": "conversion", "unit": "user-1"},
                {"eventId": "ok-2", "kind": "conversion", "unit": "user-2", "metric": "scroll", "properties": {"password": "hunter2", "page": "/cart"}}
            ]}),
        )
        .await;
    assert_eq!(mixed["accepted"], 2, "{mixed}");
    let rejected: Vec<u64> = mixed["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, [1, 2, 3], "{mixed}");
    assert!(
        mixed["rejected"][1]["reason"].as_str().unwrap().contains("purchase"),
        "{mixed}"
    );

    // Results, once every server-side exposure is written: the effect, with the right sign.
    let results = results_with_all_exposures(&api, "checkout-copy").await;
    assert_eq!(results["sampleRatio"]["mismatch"], false, "{results}");
    let purchase = &results["metrics"][0];
    assert_eq!(purchase["metric"], "purchase");
    let treatment = purchase["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"] == "treatment")
        .unwrap();
    let relative = &treatment["relative"];
    assert!(relative["estimate"].as_f64().unwrap() > 0.2, "{results}");
    assert!(
        relative["lower"].as_f64().unwrap() > 0.0,
        "the interval excludes 0: {results}"
    );
    assert_eq!(treatment["significant"], true, "{results}");
    let units: u64 = results["exposures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| count(&e["units"]))
        .sum();
    assert_eq!(units as usize, UNITS);

    // The A/A experiment finds nothing.
    let aa = results_with_all_exposures(&api, "aa-test").await;
    for variant in aa["metrics"][0]["variants"].as_array().unwrap() {
        assert_eq!(variant["significant"], false, "{aa}");
    }
}

/// A 64-bit count, which proto3 JSON writes as a string.
fn count(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or(0)
}

/// The experiment's results once its exposures cover every unit evaluated (they are written in
/// the background).
async fn results_with_all_exposures(api: &Api, key: &str) -> Value {
    let began = Instant::now();
    loop {
        let results = api
            .get(&format!("/v1/environments/prod/experiments/{key}/results"))
            .await;
        let units: u64 = results["exposures"]
            .as_array()
            .map(|e| e.iter().map(|e| count(&e["units"])).sum())
            .unwrap_or(0);
        if units as usize >= UNITS {
            return results;
        }
        if began.elapsed() > DEADLINE {
            let metrics = api
                .http
                .get(api.server.management_url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let tracking: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("vexil_exposures") || l.starts_with("vexil_track"))
                .collect();
            panic!("exposures never all written: {results}\n{tracking:#?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_runs_end_to_end_on_sqlite() {
    let dir = Scratch::new("experiments-sqlite");
    run_experiment_loop(&format!("sqlite:{}", dir.0.join("vexil.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_runs_end_to_end_on_postgres() {
    let database = vexil_testkit::postgres().database().await;
    run_experiment_loop(database.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_gives_the_experiment_s_assignment_and_bootstrap_hydrates_it() {
    let dir = Scratch::new("experiments-protocols");
    let api = start(&format!("sqlite:{}", dir.0.join("vexil.db").display()), &[]).await;
    set_up(&api).await;
    let channel = tonic::transport::Endpoint::from_shared(api.server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut vexil = EvaluationServiceClient::new(channel.clone());
    let began = Instant::now();
    while evaluate(&mut vexil, "checkout-button", "user-0").await.reason != "SPLIT" {
        assert!(began.elapsed() < DEADLINE, "the started experiment is never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut flagd_v1 = flagd::service_client::ServiceClient::new(channel);
    for unit in ["alice", "bob", "carol", "dave"] {
        let own = evaluate(&mut vexil, "checkout-button", unit).await;
        let mut context = serde_json::Map::new();
        context.insert("targetingKey".into(), json!(unit));
        let v1 = flagd_v1
            .resolve_string(flagd::ResolveStringRequest {
                flag_key: "checkout-button".into(),
                context: Some(JsonStruct::from(context)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v1.reason.as_str(), v1.variant.as_str()),
            ("SPLIT", own.variant.as_str()),
            "{unit}"
        );
        assert_eq!(v1.metadata.unwrap().into_map()["experimentKey"], "checkout-copy");
        let ofrep = api
            .post(
                "/ofrep/v1/evaluate/flags/checkout-button",
                json!({"context": {"targetingKey": unit}}),
            )
            .await;
        assert_eq!(
            (ofrep["reason"].as_str(), ofrep["variant"].as_str()),
            (Some("SPLIT"), Some(own.variant.as_str())),
            "{ofrep}"
        );
        assert_eq!(ofrep["metadata"]["experimentId"], experiment_id(&api).await);
    }

    // An in-process provider (OpenFeature's Rust flagd provider) gets the experiment as flagd
    // targeting and allocates every unit as the server does, with the experiment in the metadata.
    let in_process = FlagdProvider::new(FlagdOptions {
        host: "127.0.0.1".into(),
        port: api.server.ports.sync,
        resolver_type: ResolverType::InProcess,
        cache_settings: None,
        deadline_ms: 2000,
        ..Default::default()
    })
    .await
    .expect("the in-process provider connects");
    let mut agreed = 0;
    for i in 0..200 {
        let unit = format!("visitor-{i}");
        let own = evaluate(&mut vexil, "checkout-button", &unit).await;
        let context = EvaluationContext::default().with_targeting_key(unit.clone());
        let local = in_process
            .resolve_string_value("checkout-button", &context)
            .await
            .expect("the in-process provider resolves the flag");
        assert_eq!(local.variant.as_deref(), Some(own.variant.as_str()), "{unit}");
        let metadata = format!("{:?}", local.flag_metadata);
        assert!(metadata.contains("checkout-copy"), "{metadata}");
        agreed += 1;
    }
    assert_eq!(agreed, 200);

    // A change to the flag alone (applied in place, from the history) keeps its experiment.
    api.put(
        "/v1/environments/prod/flag-sets/web/flags/checkout-button",
        json!({"definition": {
            "state": "ENABLED",
            "variants": {"control": "Buy", "treatment": "Buy now"},
            "defaultVariant": "control",
            "metadata": {"team": "web"}
        }}),
    )
    .await;
    let began = Instant::now();
    loop {
        let r = evaluate(&mut vexil, "checkout-button", "alice").await;
        let metadata = r.metadata.clone().unwrap().into_map();
        if metadata.get("team") == Some(&json!("web")) {
            assert_eq!(r.reason, "SPLIT");
            assert_eq!(metadata["experimentKey"], "checkout-copy");
            break;
        }
        assert!(began.elapsed() < DEADLINE, "the flag change is never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Units seen only on flagd's protocol or only on OFREP are exposed too (server-side): with
    // user-0, alice…dave and the 200 visitors (over Vexil's API) that is 245 units.
    for i in 0..20 {
        let mut context = serde_json::Map::new();
        context.insert("targetingKey".into(), json!(format!("flagd-only-{i}")));
        let v1 = flagd_v1
            .resolve_string(flagd::ResolveStringRequest {
                flag_key: "checkout-button".into(),
                context: Some(JsonStruct::from(context)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v1.reason, "SPLIT");
        let ofrep = api
            .post(
                "/ofrep/v1/evaluate/flags/checkout-button",
                json!({"context": {"targetingKey": format!("ofrep-only-{i}")}}),
            )
            .await;
        assert_eq!(ofrep["reason"], "SPLIT");
    }
    let began = Instant::now();
    loop {
        let results = api
            .get("/v1/environments/prod/experiments/checkout-copy/results?refresh=true")
            .await;
        let units: u64 = results["exposures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| count(&e["units"]))
            .sum();
        if units == 245 {
            break;
        }
        assert!(units < 245, "more units than were evaluated: {units}");
        assert!(began.elapsed() < DEADLINE, "exposures never all written: {units}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Bootstrap: every flag for one context, with the assignment and a stable ETag.
    let request = json!({"environment": "prod", "context": {"targetingKey": "alice"}});
    let first = api.post("/v1/bootstrap", request.clone()).await;
    let second = api.post("/v1/bootstrap", request).await;
    assert_eq!(first["etag"], second["etag"]);
    let checkout = &first["flags"]["checkout-button"];
    assert_eq!(checkout["reason"], "SPLIT");
    assert_eq!(checkout["experiment"]["key"], "checkout-copy");
    assert_eq!(checkout["experiment"]["variant"], checkout["variant"]);
    assert!(first["configVersion"].as_str().is_some_and(|v| v != "0"), "{first}");
    let other = api
        .post("/v1/bootstrap", json!({"environment": "prod", "context": {"targetingKey": "zed-the-other-unit"}, "flagKeys": ["footer-copy"]}))
        .await;
    assert_eq!(other["flags"].as_object().unwrap().len(), 1);

    // Stopping with a winner serves the winner to everyone; the experiment leaves the metadata
    // of SPLIT answers.
    api.post(
        "/v1/environments/prod/experiments/checkout-copy:stop",
        json!({"winner": "treatment"}),
    )
    .await;
    let began = Instant::now();
    loop {
        let r = evaluate(&mut vexil, "checkout-button", "anyone").await;
        if r.reason == "STATIC" {
            assert_eq!(r.variant, "treatment");
            break;
        }
        assert!(began.elapsed() < DEADLINE, "the winner is never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stopped experiment cannot start again; its allocation stays locked.
    let (status, body, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/environments/prod/experiments/checkout-copy:start",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (400, Some("FAILED_PRECONDITION")),
        "{body}"
    );
}

async fn experiment_id(api: &Api) -> Value {
    api.get("/v1/environments/prod/experiments/checkout-copy").await["id"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_is_rate_limited_per_key_with_retry_after() {
    let dir = Scratch::new("experiments-rate");
    let api = start(
        &format!("sqlite:{}", dir.0.join("vexil.db").display()),
        &["--track-rate-limit", "1", "--track-burst", "20"],
    )
    .await;
    api.post("/v1/environments", json!({"key": "prod"})).await;
    let events = |from: usize, n: usize| -> Value {
        json!({"events": (from..from + n).map(|i| json!({"eventId": format!("e{i}"), "kind": "custom", "unit": "u", "metric": "m"})).collect::<Vec<_>>()})
    };
    let first = api.post("/v1/track:batch", events(0, 20)).await;
    assert_eq!(first["accepted"], 20);
    let (status, body, headers) = api
        .call(reqwest::Method::POST, "/v1/track:batch", Some(events(20, 5)))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED")),
        "{body}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    // Too many events for one call is refused whole.
    let (status, body, _) = api
        .call(reqwest::Method::POST, "/v1/track:batch", Some(events(100, 1001)))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_computed_on_a_schedule_and_on_request() {
    let dir = Scratch::new("experiments-schedule");
    let api = start(
        &format!("sqlite:{}", dir.0.join("vexil.db").display()),
        &["--results-refresh-seconds", "2"],
    )
    .await;
    set_up(&api).await;
    let path = "/v1/environments/prod/experiments/checkout-copy/results";
    // Once the schedule has run, two reads in a row give the same computation (unless the
    // schedule ran between them: then the next pair does).
    let began = Instant::now();
    let scheduled = loop {
        let first = api.get(path).await["computedAt"].clone();
        let second = api.get(path).await["computedAt"].clone();
        if first == second {
            break first;
        }
        assert!(began.elapsed() < DEADLINE, "results are never served from the schedule");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // `refresh` computes them now.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = api.get(&format!("{path}?refresh=true")).await["computedAt"].clone();
    assert_ne!(fresh, scheduled);
    assert!(
        fresh.as_str().unwrap() > scheduled.as_str().unwrap(),
        "{fresh} after {scheduled}"
    );
    // Other options are computed on request, with the method they name.
    let bayesian = api.get(&format!("{path}?method=bayesian")).await;
    assert_eq!(bayesian["method"]["method"], "bayesian", "{bayesian}");
    let (status, body, _) = api
        .call(reqwest::Method::GET, &format!("{path}?method=magic"), None)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{body}"
    );
}
