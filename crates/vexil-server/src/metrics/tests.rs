//! What the recorder renders for what the server reports, on a recorder of the test's own (the
//! global one is the process's): evaluations by protocol, flag set and reason, the store's and the
//! cache's calls, and the configuration's gauges.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusRecorder;
use serde_json::{Map, Value, json};
use vexil_core::{Context, Engine, FractionalMode, Reason, Selector, Snapshot, SourceConfig, ValueType};
use vexil_service::{FlagSetTally, Readiness, Source as _, SourceReadiness, SourceState};
use vexil_store::{Actor, SqlStore};

use super::*;

fn recorder() -> PrometheusRecorder {
    builder().unwrap().build_recorder()
}

/// The value of the series written exactly as `series` (name and labels), if rendered.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

/// Every series of metric `name`, as rendered (without values).
fn series<'t>(text: &'t str, name: &str) -> Vec<&'t str> {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .map(|line| line.rsplit_once(' ').unwrap().0)
        .collect()
}

fn snapshot(name: &str, document: Value) -> Arc<Snapshot> {
    let parsed = vexil_core::parse::parse_value(&document, vexil_core::Strictness::Flagd).unwrap();
    let source = SourceConfig {
        name: name.to_owned(),
        config: parsed.config,
    };
    Arc::new(Snapshot::build(Arc::new(Engine::new(FractionalMode::V3)), vec![source]).0)
}

/// Evaluates `key` for `selector` and tells `observer`, as `Flags::evaluate` does.
fn evaluate(observer: &dyn Observer, snapshot: &Snapshot, protocol: &'static str, key: &str, selector: &Selector) {
    let attributes = Map::new();
    let context = Context {
        attributes: &attributes,
        now: 0,
    };
    let resolution = snapshot.evaluate(key, selector, context, ValueType::Any);
    observer.evaluation(&Evaluation {
        protocol,
        key,
        selector,
        flag: snapshot.get(key, selector),
        resolution: &resolution,
        version: 0,
        took: Duration::from_micros(3),
    });
}

#[test]
fn evaluations_are_counted_by_protocol_flag_set_and_reason() {
    let snapshot = snapshot(
        "flags.json",
        json!({
            "flags": {
                "a": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"},
                "b": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on",
                      "metadata": {"flagSetId": "billing"}},
                "loose": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                          "metadata": {"flagSetId": ""}}
            },
            "metadata": {"flagSetId": "web"}
        }),
    );
    let recorder = recorder();
    // A thread of its own: the handles each thread keeps belong to the recorder it first saw.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            metrics::with_local_recorder(&recorder, || {
                let unknown_set = Selector::FlagSet(Some("no-such-set".into()));
                evaluate(&Evaluations, &snapshot, "ofrep", "a", &Selector::All);
                evaluate(&Evaluations, &snapshot, "ofrep", "a", &Selector::All);
                evaluate(&Evaluations, &snapshot, "ofrep", "b", &Selector::All);
                evaluate(&Evaluations, &snapshot, "ofrep", "no-such-flag", &Selector::All);
                evaluate(&Evaluations, &snapshot, "ofrep", "a", &unknown_set);
                evaluate(&Evaluations, &snapshot, "flagd.evaluation.v1", "loose", &Selector::All);
                let mut tally = FlagSetTally::default();
                tally.add(Some("web"), Reason::Static);
                tally.add(Some("billing"), Reason::Disabled);
                tally.add(Some("web"), Reason::Split);
                tally.add(None, Reason::Default);
                Evaluations.bulk_evaluation(&BulkEvaluation {
                    protocol: "ofrep",
                    selector: &unknown_set,
                    tally: &tally,
                    version: 0,
                    took: Duration::from_micros(40),
                });
            });
        });
    });
    let text = recorder.handle().render();
    let count = |labels: &str| sample(&text, &format!("vexil_evaluations_total{{{labels}}}"));
    assert_eq!(count(r#"protocol="ofrep",flag_set="web",reason="STATIC""#), Some(3.0));
    assert_eq!(count(r#"protocol="ofrep",flag_set="web",reason="SPLIT""#), Some(1.0));
    assert_eq!(
        count(r#"protocol="ofrep",flag_set="billing",reason="DISABLED""#),
        Some(2.0)
    );
    // A missing flag, or a flag set that does not exist: no flag, so no flag set.
    assert_eq!(count(r#"protocol="ofrep",flag_set="",reason="ERROR""#), Some(2.0));
    assert_eq!(count(r#"protocol="ofrep",flag_set="",reason="DEFAULT""#), Some(1.0));
    // An empty flagSetId is no flag set.
    assert_eq!(
        count(r#"protocol="flagd.evaluation.v1",flag_set="",reason="STATIC""#),
        Some(1.0)
    );
    // Every reason of a (protocol, flag set) is rendered once it is seen, at 0 until counted.
    assert_eq!(
        count(r#"protocol="ofrep",flag_set="billing",reason="TARGETING_MATCH""#),
        Some(0.0)
    );
    let rendered = series(&text, "vexil_evaluations_total");
    assert_eq!(
        rendered.len(),
        6 * 4,
        "(ofrep: web, billing, none; v1: none) × 6 reasons: {rendered:#?}"
    );
    assert!(!text.contains("no-such"), "{text}");
    assert_eq!(
        sample(&text, r#"vexil_evaluation_duration_seconds_count{protocol="ofrep"}"#),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"vexil_evaluation_duration_seconds_bucket{protocol="ofrep",le="0.000005"}"#
        ),
        Some(5.0)
    );
}

#[test]
fn background_calls_are_timed_and_say_whether_the_store_is_up() {
    let recorder = recorder();
    metrics::with_local_recorder(&recorder, || {
        Calls.store(StoreCall::ConfigVersions, Duration::from_millis(2), None);
        Calls.store(StoreCall::Snapshot, Duration::from_millis(30), None);
        let text = recorder.handle().render();
        assert_eq!(sample(&text, "vexil_store_up"), Some(1.0));
        Calls.store(
            StoreCall::ConfigVersions,
            Duration::from_secs(3),
            Some(&StoreError::Unavailable("connection refused".into())),
        );
        let text = recorder.handle().render();
        assert_eq!(sample(&text, "vexil_store_up"), Some(0.0));
        // Not found is an answer: the store is up.
        Calls.store(
            StoreCall::History,
            Duration::from_millis(1),
            Some(&StoreError::NotFound("x".into())),
        );
        let malformed = vexil_cache::CacheError::Malformed {
            key: "k".into(),
            reason: "r".into(),
        };
        Calls.cache(
            "redis",
            CacheCall::GetSnapshot,
            Duration::from_millis(1),
            Some(&malformed),
        );
        Calls.cache("redis", CacheCall::Publish, Duration::from_micros(300), None);
    });
    let text = recorder.handle().render();
    assert_eq!(sample(&text, "vexil_store_up"), Some(1.0));
    let store = |labels: &str| {
        sample(
            &text,
            &format!("vexil_store_operation_duration_seconds_count{{{labels}}}"),
        )
    };
    assert_eq!(store(r#"operation="config_versions",outcome="ok""#), Some(1.0));
    assert_eq!(store(r#"operation="config_versions",outcome="error""#), Some(1.0));
    assert_eq!(store(r#"operation="snapshot",outcome="ok""#), Some(1.0));
    assert_eq!(store(r#"operation="history",outcome="error""#), Some(1.0));
    assert_eq!(
        sample(
            &text,
            r#"vexil_store_operation_duration_seconds_bucket{operation="snapshot",outcome="ok",le="0.05"}"#
        ),
        Some(1.0)
    );
    let cache = |labels: &str| {
        sample(
            &text,
            &format!("vexil_config_cache_operation_duration_seconds_count{{{labels}}}"),
        )
    };
    assert_eq!(
        cache(r#"kind="redis",operation="get_snapshot",outcome="error""#),
        Some(1.0)
    );
    assert_eq!(cache(r#"kind="redis",operation="publish",outcome="ok""#), Some(1.0));
    // Histograms, not summaries.
    assert!(
        text.contains("# TYPE vexil_store_operation_duration_seconds histogram"),
        "{text}"
    );
}

#[test]
fn a_file_source_s_last_change_is_its_modification_time_seen_when_its_flags_change() {
    let dir = std::env::temp_dir().join(format!("vexil-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flags.json");
    let name = path.to_str().unwrap().to_owned();
    let document = |variant: &str| json!({"flags": {"a": {"state": "ENABLED", "variants": {"on": true, "yes": true}, "defaultVariant": variant}}});
    let touch = |secs: u64| {
        std::fs::write(&path, "{}").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    };
    let readiness = |state: SourceState| Readiness {
        sources: vec![SourceReadiness {
            name: name.clone(),
            state,
        }],
    };
    let recorder = recorder();
    let mut gauges = ConfigGauges::default();
    let series = format!(r#"vexil_source_last_change_timestamp_seconds{{source="{name}"}}"#);
    let up = format!(r#"vexil_source_up{{source="{name}"}}"#);

    touch(1_000);
    let first = Published {
        snapshot: snapshot(&name, document("on")),
        version: 0,
    };
    metrics::with_local_recorder(&recorder, || {
        gauges.published(&first, &readiness(SourceState::Loaded), false)
    });
    let text = recorder.handle().render();
    assert_eq!(sample(&text, &series), Some(1_000.0));
    assert_eq!(sample(&text, &up), Some(1.0));
    assert_eq!(sample(&text, "vexil_snapshots_published_total"), Some(0.0));
    assert_eq!(sample(&text, "vexil_flags"), Some(1.0));

    // The file is touched but its flags did not change (the same compiled document): kept.
    touch(2_000);
    let failing = SourceState::Failing {
        error: "e".into(),
        failing_for: Duration::from_secs(1),
        stale: false,
    };
    metrics::with_local_recorder(&recorder, || gauges.published(&first, &readiness(failing), false));
    let text = recorder.handle().render();
    assert_eq!(sample(&text, &series), Some(1_000.0));
    assert_eq!(sample(&text, &up), Some(0.0));

    // Its flags changed.
    touch(3_000);
    let second = Published {
        snapshot: snapshot(&name, document("yes")),
        version: 1,
    };
    metrics::with_local_recorder(&recorder, || {
        gauges.published(&second, &readiness(SourceState::Loaded), false)
    });
    let text = recorder.handle().render();
    assert_eq!(sample(&text, &series), Some(3_000.0));
    assert_eq!(sample(&text, "vexil_snapshots_published_total"), Some(1.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn each_environment_s_version_and_when_it_was_published() {
    let dir = std::env::temp_dir().join(format!("vexil-metrics-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("vexil.db").display());
    let store: Arc<dyn Store> = Arc::new(SqlStore::open(&url).await.unwrap());
    let document = json!({"flags": {"a": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}}});
    for (environment, set) in [("prod", "web"), ("prod", "billing"), ("dev", "web")] {
        store
            .import(Actor::new("test"), environment.into(), set.into(), document.clone())
            .await
            .unwrap();
    }
    let source = StoreSource::new(store.clone(), "prod", Duration::from_secs(3600));
    source.load().await.unwrap();
    let published = |environment: &str| {
        let store = store.clone();
        let environment = environment.to_owned();
        async move {
            let page = store.list_versions(environment, PageRequest::first(1)).await.unwrap();
            page.items[0].created.at as f64 / 1000.0
        }
    };

    let recorder = recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    let mut gauges = ConfigGauges::default();
    gauges.environments(&source, &*store).await;
    let text = recorder.handle().render();
    assert_eq!(sample(&text, r#"vexil_config_version{environment="prod"}"#), Some(2.0));
    assert_eq!(sample(&text, r#"vexil_config_version{environment="dev"}"#), Some(1.0));
    for environment in ["prod", "dev"] {
        assert_eq!(
            sample(
                &text,
                &format!(r#"vexil_config_last_change_timestamp_seconds{{environment="{environment}"}}"#)
            ),
            Some(published(environment).await)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
