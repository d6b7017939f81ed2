//! The flagd-testbed conformance suite, run against `vexil-core` with the cucumber crate reading the
//! testbed's own `.feature` files (vendored in `tests/conformance/flagd-testbed`).
//!
//! Two suites:
//! - **evaluator**: every scenario of `evaluator/gherkin/*.feature` against
//!   `evaluator/flags/testkit-flags.json`;
//! - **provider**: the evaluation scenarios of `gherkin/{targeting,evaluation,metadata,disabled}.feature`
//!   against the testbed's flag files, loaded as the testbed's launchpad does (`flags/*.json` except
//!   `selector-*` merged into `flags/allFlags.json`, plus `rawflags/selector-flags.json`), acting as an
//!   in-process provider would.
//!
//! Scenarios tagged `@fractional-v1`, `-v2` or `-v3` run with a snapshot in that fractional mode;
//! the rest run once, in the default mode (v3). `@deprecated` scenarios (flagd's legacy RPC v1
//! answer for flags without a default variant, contradicted by `@no-default-variant`) are left to
//! the server's RPC v1 tests.
//!
//! The run fails if any scenario fails or has a step without a definition.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use cucumber::gherkin::Step;

#[path = "../../../tests/support/testbed.rs"]
mod support;
use cucumber::writer::Stats as _;
use cucumber::{World, given, then, when};
use serde_json::{Map, Value};
use support::{all_flags, load, prepare_features};
use vexil_core::parse::{self, Strictness};
use vexil_core::{Context, Engine, FractionalMode, Reason, Selector, Snapshot, SourceConfig, ValueType};

fn testbed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/flagd-testbed")
}

/// The snapshots a run's scenarios evaluate against.
#[derive(Debug)]
struct Suite {
    /// What "an evaluator" / "a stable flagd provider" serves.
    stable: Arc<Snapshot>,
    /// What "a metadata flagd provider" serves (the testbed's `metadata` launchpad config).
    metadata: Arc<Snapshot>,
}

/// The suite of the run in progress (cucumber builds worlds without arguments).
static SUITE: Mutex<Option<Arc<Suite>>> = Mutex::new(None);

#[derive(Debug, World)]
#[world(init = Self::new)]
struct Testbed {
    suite: Arc<Suite>,
    snapshot: Arc<Snapshot>,
    selector: Selector,
    request: Option<(ValueType, String, String)>,
    context: Map<String, Value>,
    details: Option<Details>,
}

/// What an OpenFeature client reports after evaluating a flag.
#[derive(Debug)]
struct Details {
    value: Value,
    reason: String,
    variant: Option<String>,
    error_code: Option<String>,
    metadata: Map<String, Value>,
}

impl Testbed {
    fn new() -> Testbed {
        let suite = SUITE.lock().unwrap().clone().expect("suite set before the run");
        Testbed {
            snapshot: suite.stable.clone(),
            suite,
            selector: Selector::All,
            request: None,
            context: Map::new(),
            details: None,
        }
    }
}

fn value_type(name: &str) -> ValueType {
    match name {
        "Boolean" => ValueType::Boolean,
        "String" => ValueType::String,
        "Integer" => ValueType::Integer,
        "Float" => ValueType::Float,
        "Object" => ValueType::Object,
        other => panic!("unknown flag type {other}"),
    }
}

/// A gherkin cell as a value of the given type (`{\"a\": 1}` cells are JSON with escaped quotes).
fn typed(ty: ValueType, text: &str) -> Value {
    match ty {
        ValueType::Boolean => Value::Bool(text.parse().expect("boolean")),
        ValueType::String => Value::String(text.to_owned()),
        ValueType::Integer => Value::from(text.parse::<i64>().expect("integer")),
        ValueType::Float => Value::from(text.parse::<f64>().expect("float")),
        ValueType::Object | ValueType::Any => serde_json::from_str(text)
            .or_else(|_| serde_json::from_str(&text.replace("\\\"", "\"")))
            .expect("object"),
    }
}

/// A resolved value as the typed OpenFeature API returns it (flagd's ResolveInt truncates).
fn as_type(ty: ValueType, value: &Value) -> Value {
    match ty {
        ValueType::Integer => Value::from(value.as_f64().expect("number").trunc() as i64),
        ValueType::Float => Value::from(value.as_f64().expect("number")),
        _ => value.clone(),
    }
}

#[given("an evaluator")]
#[given("a stable flagd provider")]
fn stable(world: &mut Testbed) {
    world.snapshot = world.suite.stable.clone();
}

#[given("a metadata flagd provider")]
fn metadata_provider(world: &mut Testbed) {
    world.snapshot = world.suite.metadata.clone();
}

#[given(regex = r#"^an option "selector" of type "String" with value "(.*)"$"#)]
fn selector_option(world: &mut Testbed, selector: String) {
    world.selector = Selector::parse(&selector).expect("valid selector");
}

#[given(regex = r#"^an option "cache" of type "CacheType" with value "(.*)"$"#)]
fn cache_option(_world: &mut Testbed, _cache: String) {
    // Caching is a provider concern; evaluation here is always fresh.
}

#[given(
    regex = r#"^a (Boolean|String|Integer|Float|Object)-flag with key "(.*)" and a (?:default|fallback) value "(.*)"$"#
)]
fn flag(world: &mut Testbed, ty: String, key: String, default: String) {
    world.request = Some((value_type(&ty), key, default));
}

#[given(regex = r#"^a context containing a key "(.*)", with type "(.*)" and with value "(.*)"$"#)]
fn context_key(world: &mut Testbed, key: String, ty: String, value: String) {
    let value = typed(value_type(&ty), &value);
    world.context.insert(key, value);
}

#[given(regex = r#"^a context containing a targeting key with value "(.*)"$"#)]
fn targeting_key(world: &mut Testbed, value: String) {
    world.context.insert("targetingKey".into(), Value::String(value));
}

#[given(
    regex = r#"^a context containing a nested property with outer key "(.*)" and inner key "(.*)", with value "(.*)"$"#
)]
fn nested(world: &mut Testbed, outer: String, inner: String, value: String) {
    let mut object = Map::new();
    object.insert(inner, Value::String(value));
    world.context.insert(outer, Value::Object(object));
}

#[when("the flag was evaluated with details")]
fn evaluate(world: &mut Testbed) {
    let (ty, key, default) = world.request.clone().expect("a flag was given");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let context = Context {
        attributes: &world.context,
        now,
    };
    let resolution = world.snapshot.evaluate(&key, &world.selector, context, ty);
    let value = match resolution.value {
        Some(v) => as_type(ty, v),
        None => typed(ty, &default),
    };
    world.details = Some(Details {
        value,
        reason: resolution.reason.as_str().to_owned(),
        variant: resolution.variant.map(str::to_owned),
        error_code: resolution.error_code().map(|c| c.as_str().to_owned()),
        metadata: resolution.metadata.cloned().unwrap_or_default(),
    });
    // A successful evaluation never carries an error, an error never a value.
    assert_eq!(resolution.reason == Reason::Error, resolution.error.is_some());
}

fn details(world: &Testbed) -> &Details {
    world.details.as_ref().expect("the flag was evaluated")
}

#[then(regex = r#"^the resolved details value should be "(.*)"$"#)]
fn resolved_value(world: &mut Testbed, expected: String) {
    let (ty, key, _) = world.request.as_ref().unwrap();
    let expected = typed(*ty, &expected);
    let d = details(world);
    assert_eq!(d.value, expected, "flag `{key}`: {d:?}");
}

#[then(regex = r#"^the reason should be "(.*)"$"#)]
fn reason(world: &mut Testbed, expected: String) {
    let d = details(world);
    assert_eq!(d.reason, expected, "{d:?}");
}

#[then(regex = r#"^the variant should be "(.*)"$"#)]
fn variant(world: &mut Testbed, expected: String) {
    let d = details(world);
    assert_eq!(d.variant.as_deref().unwrap_or(""), expected, "{d:?}");
}

#[then(regex = r#"^the error-code should be "(.*)"$"#)]
fn error_code(world: &mut Testbed, expected: String) {
    let d = details(world);
    assert_eq!(d.error_code.as_deref().unwrap_or(""), expected, "{d:?}");
}

#[then("the resolved metadata should contain")]
fn metadata_contains(world: &mut Testbed, step: &Step) {
    let d = details(world);
    let table = step.table.as_ref().expect("a table");
    for row in table.rows.iter().skip(1) {
        let (key, ty, value) = (&row[0], &row[1], &row[2]);
        let expected = typed(value_type(ty), value);
        let actual = d
            .metadata
            .get(key.as_str())
            .unwrap_or_else(|| panic!("metadata `{key}` missing: {:?}", d.metadata));
        match value_type(ty) {
            ValueType::Integer | ValueType::Float => {
                assert_eq!(actual.as_f64(), expected.as_f64(), "metadata `{key}`")
            }
            _ => assert_eq!(actual, &expected, "metadata `{key}`"),
        }
    }
}

#[then("the resolved metadata is empty")]
fn metadata_empty(world: &mut Testbed) {
    let d = details(world);
    assert!(d.metadata.is_empty(), "{:?}", d.metadata);
}

fn source(name: &str, document: &Value) -> SourceConfig {
    let parsed = parse::parse_value(document, Strictness::Flagd).unwrap_or_else(|e| panic!("{name}: {e}"));
    SourceConfig {
        name: name.to_owned(),
        config: parsed.config,
    }
}

fn snapshot(mode: FractionalMode, sources: Vec<SourceConfig>) -> Arc<Snapshot> {
    Arc::new(Snapshot::build(Arc::new(Engine::new(mode)), sources).0)
}

fn evaluator_suite(mode: FractionalMode) -> Suite {
    let doc = load(&testbed().join("evaluator/flags/testkit-flags.json"));
    let stable = snapshot(mode, vec![source("testkit-flags.json", &doc)]);
    Suite {
        metadata: stable.clone(),
        stable,
    }
}

fn provider_suite(mode: FractionalMode) -> Suite {
    let selector_flags = load(&testbed().join("flags/selector-flags.json"));
    let combined = load(&testbed().join("flags/selector-flag-combined-metadata.json"));
    Suite {
        stable: snapshot(
            mode,
            vec![
                source("flags/allFlags.json", &all_flags(&testbed())),
                source("rawflags/selector-flags.json", &selector_flags),
            ],
        ),
        metadata: snapshot(
            mode,
            vec![source("rawflags/selector-flag-combined-metadata.json", &combined)],
        ),
    }
}

fn fractional_tag(tags: &[String]) -> Option<FractionalMode> {
    tags.iter()
        .find_map(|t| t.strip_prefix("fractional-").and_then(FractionalMode::parse))
}

#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

/// Runs `features` with `suite`, keeping the scenarios of `mode` (untagged ones in the default mode).
async fn run(label: &str, features: PathBuf, suite: Suite, mode: FractionalMode, keep: fn(&[String]) -> bool) -> Tally {
    *SUITE.lock().unwrap() = Some(Arc::new(suite));
    let writer = Testbed::cucumber()
        .filter_run(features, move |feature, rule, scenario| {
            let tags: Vec<String> = feature
                .tags
                .iter()
                .chain(rule.iter().flat_map(|r| r.tags.iter()))
                .chain(scenario.tags.iter())
                .cloned()
                .collect();
            let wanted = fractional_tag(&tags).unwrap_or_default();
            wanted == mode && keep(&tags)
        })
        .await;
    let stats = writer.scenarios_stats();
    let tally = Tally {
        passed: stats.passed,
        failed: stats.failed,
        skipped: stats.skipped,
    };
    let broken = writer.parsing_errors() + writer.hook_errors();
    println!(
        "testbed {label} ({}): {tally:?}, parse/hook errors: {broken}",
        mode.as_str()
    );
    assert_eq!(broken, 0, "the feature files must parse");
    tally
}

fn main() {
    let modes = [FractionalMode::V1, FractionalMode::V2, FractionalMode::V3];
    let provider_features = ["targeting", "evaluation", "metadata", "disabled"];
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flagd-testbed");
    let evaluator_dir = prepare_features(&testbed().join("evaluator/gherkin"), &scratch.join("evaluator"), &[]);
    let provider_dir = prepare_features(
        &testbed().join("gherkin"),
        &scratch.join("provider"),
        &provider_features,
    );
    let mut total = Tally::default();
    futures::executor::block_on(async {
        for mode in modes {
            let t = run("evaluator", evaluator_dir.clone(), evaluator_suite(mode), mode, |_| {
                true
            })
            .await;
            total.passed += t.passed;
            total.failed += t.failed;
            total.skipped += t.skipped;
            for feature in provider_features {
                let path = provider_dir.join(format!("{feature}.feature"));
                let t = run(feature, path, provider_suite(mode), mode, |tags| {
                    !tags.iter().any(|t| t == "deprecated")
                })
                .await;
                total.passed += t.passed;
                total.failed += t.failed;
                total.skipped += t.skipped;
            }
        }
    });
    println!(
        "testbed total: {} scenarios passed, {} failed, {} with undefined steps",
        total.passed, total.failed, total.skipped
    );
    if total.failed > 0 || total.skipped > 0 || total.passed == 0 {
        std::process::exit(1);
    }
}
