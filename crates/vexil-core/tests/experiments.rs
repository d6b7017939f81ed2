//! Experiments in flag evaluation: a flag set document's `$experiments` attach to flags, running
//! ones allocate assigned units (`SPLIT`, with the experiment in the metadata), everyone else gets
//! the flag's own evaluation, and a paused or stopped experiment serves its winner.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use vexil_core::experiment::{Allocation, Assignment, BUCKETS, Phase};
use vexil_core::parse::{self, Strictness};
use vexil_core::{Context, Engine, FractionalMode, Reason, Selector, Snapshot, SourceConfig, ValueType};

fn document(experiment: Value) -> Value {
    json!({
        "flags": {
            "checkout": {
                "state": "ENABLED",
                "variants": {"control": "blue", "bold": "red", "other": "green"},
                "defaultVariant": "control",
                "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "other", null]},
                "metadata": {"owner": "web"}
            },
            "plain": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"}
        },
        "$experiments": {"checkout-copy": experiment}
    })
}

fn running() -> Value {
    json!({
        "id": "x1", "flag": "checkout", "status": "running", "salt": "x1", "traffic": BUCKETS,
        "weights": [{"variant": "control", "weight": 1}, {"variant": "bold", "weight": 1}]
    })
}

fn snapshot(document: &Value) -> Snapshot {
    let parsed = parse::parse_value(document, Strictness::Strict).expect("the document parses");
    let (snapshot, warnings) = Snapshot::build(
        Arc::new(Engine::new(FractionalMode::default())),
        vec![SourceConfig {
            name: "set".into(),
            config: parsed.config,
        }],
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    snapshot
}

fn context(unit: Option<&str>, plan: &str) -> Map<String, Value> {
    let mut context = Map::new();
    if let Some(unit) = unit {
        context.insert("targetingKey".into(), json!(unit));
    }
    context.insert("plan".into(), json!(plan));
    context
}

fn evaluate<'s>(snapshot: &'s Snapshot, attributes: &Map<String, Value>) -> vexil_core::Resolution<'s> {
    snapshot.evaluate(
        "checkout",
        &Selector::All,
        Context {
            attributes,
            now: 1_700_000_000,
        },
        ValueType::String,
    )
}

#[test]
fn a_running_experiment_splits_assigned_units_with_its_metadata() {
    let snapshot = snapshot(&document(running()));
    let allocation = Allocation::new("x1", BUCKETS, &[("control", 1), ("bold", 1)], None).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..2000 {
        let unit = format!("user-{i}");
        let attributes = context(Some(&unit), "free");
        let r = evaluate(&snapshot, &attributes);
        assert_eq!(r.reason, Reason::Split, "{unit}");
        let Assignment::Variant(expected) = allocation.assign(&unit) else {
            panic!("full traffic assigns everyone")
        };
        assert_eq!(r.variant, Some(expected), "the core's allocation decides: {unit}");
        let metadata = r.metadata.unwrap();
        assert_eq!(metadata["experimentKey"], "checkout-copy");
        assert_eq!(metadata["experimentId"], "x1");
        assert_eq!(metadata["experimentVariant"], expected);
        assert_eq!(metadata["owner"], "web", "the flag's own metadata stays");
        let split = r.split.as_ref().unwrap();
        assert_eq!(
            (split.experiment.key.as_str(), &*split.unit),
            ("checkout-copy", unit.as_str())
        );
        *seen.entry(expected).or_insert(0) += 1;
        // Sticky: the same unit, the same answer.
        assert_eq!(evaluate(&snapshot, &attributes).variant, r.variant);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|n| (900..=1100).contains(n)), "{seen:?}");
    // The experiment comes before the flag's targeting: a pro user in it is split too.
    let pro = context(Some("user-1"), "pro");
    assert_eq!(evaluate(&snapshot, &pro).reason, Reason::Split);
}

#[test]
fn units_the_experiment_does_not_take_get_the_flag_s_own_evaluation() {
    let mut experiment = running();
    experiment["traffic"] = json!(BUCKETS / 2);
    experiment["audience"] = json!({"in": [{"var": "country"}, ["NL", "BE"]]});
    let snapshot = snapshot(&document(experiment));
    // No targetingKey: no unit to allocate.
    let anonymous = context(None, "pro");
    let r = evaluate(&snapshot, &anonymous);
    assert_eq!((r.reason, r.variant), (Reason::TargetingMatch, Some("other")));
    assert!(r.split.is_none() && !r.metadata.unwrap().contains_key("experimentKey"));
    // Outside the audience.
    let mut outside = context(Some("user-1"), "free");
    outside.insert("country".into(), json!("DE"));
    let r = evaluate(&snapshot, &outside);
    // (The flag's targeting returns `null` for free users: the default variant.)
    assert_eq!((r.reason, r.variant), (Reason::Default, Some("control")));
    // In the audience: half the units by traffic.
    let allocation = Allocation::new("x1", BUCKETS / 2, &[("control", 1), ("bold", 1)], None).unwrap();
    let (mut split, mut not) = (0, 0);
    for i in 0..2000 {
        let unit = format!("user-{i}");
        let mut attributes = context(Some(&unit), "free");
        attributes.insert("country".into(), json!("NL"));
        let r = evaluate(&snapshot, &attributes);
        match allocation.assign(&unit) {
            Assignment::Variant(v) => {
                assert_eq!((r.reason, r.variant), (Reason::Split, Some(v)));
                split += 1;
            }
            _ => {
                assert_eq!((r.reason, r.variant), (Reason::Default, Some("control")));
                not += 1;
            }
        }
    }
    assert!(split > 800 && not > 800, "{split} {not}");
}

#[test]
fn paused_and_stopped_experiments_serve_the_flag_or_their_winner() {
    for status in ["paused", "stopped"] {
        let mut experiment = running();
        experiment["status"] = json!(status);
        let snapshot = snapshot(&document(experiment.clone()));
        let attributes = context(Some("user-7"), "free");
        let r = evaluate(&snapshot, &attributes);
        assert_eq!((r.reason, r.variant), (Reason::Default, Some("control")), "{status}");
        assert!(r.split.is_none());

        experiment["winner"] = json!("bold");
        let snapshot = self::snapshot(&document(experiment));
        let r = evaluate(&snapshot, &context(Some("user-7"), "pro"));
        assert_eq!(
            (r.reason, r.variant, r.value),
            (Reason::Static, Some("bold"), Some(&json!("red")))
        );
        let metadata = r.metadata.unwrap();
        assert_eq!(metadata["experimentWinner"], "bold");
        assert!(r.split.is_none(), "serving a winner is no exposure");
        // Without a context at all, too.
        let r = evaluate(&snapshot, &Map::new());
        assert_eq!(r.variant, Some("bold"));
    }
}

#[test]
fn a_disabled_flag_stays_disabled_and_types_are_checked() {
    let mut doc = document(running());
    doc["flags"]["checkout"]["state"] = json!("DISABLED");
    let snapshot = snapshot(&doc);
    let attributes = context(Some("user-1"), "free");
    assert_eq!(evaluate(&snapshot, &attributes).reason, Reason::Disabled);

    let snapshot = self::snapshot(&document(running()));
    let r = snapshot.evaluate(
        "checkout",
        &Selector::All,
        Context {
            attributes: &attributes,
            now: 0,
        },
        ValueType::Boolean,
    );
    assert_eq!(r.reason, Reason::Error);
    assert_eq!(r.error_code(), Some(vexil_core::ErrorCode::TypeMismatch));
}

#[test]
fn bulk_evaluation_splits_too() {
    let snapshot = snapshot(&document(running()));
    let attributes = context(Some("user-3"), "free");
    let mut reasons = Vec::new();
    snapshot.evaluate_all(
        &Selector::All,
        Context {
            attributes: &attributes,
            now: 0,
        },
        |flag, r| reasons.push((flag.key().to_owned(), r.reason)),
    );
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        [
            ("checkout".to_owned(), Reason::Split),
            ("plain".to_owned(), Reason::Static)
        ]
    );
}

#[test]
fn the_experiment_changes_the_revision_and_a_layer_keeps_units_apart() {
    let base = snapshot(&document(running()));
    let mut ramped = running();
    ramped["traffic"] = json!(BUCKETS / 10);
    assert_ne!(base.revision(), snapshot(&document(ramped)).revision());

    let mut layered = running();
    layered["layer"] = json!({"key": "checkout", "start": 0, "end": BUCKETS / 4});
    let snapshot = snapshot(&document(layered));
    let definition = snapshot
        .get("checkout", &Selector::All)
        .unwrap()
        .flag()
        .experiment
        .clone()
        .unwrap();
    assert_eq!(definition.phase, Phase::Running);
    let in_layer = (0..4000)
        .filter(|i| evaluate(&snapshot, &context(Some(&format!("u{i}")), "free")).reason == Reason::Split)
        .count();
    assert!((800..=1200).contains(&in_layer), "a quarter of the layer: {in_layer}");
}

#[test]
fn invalid_experiments_are_reported_with_their_pointer() {
    let problems = |experiment: Value| -> Vec<(String, String)> {
        let err = parse::parse_value(&document(experiment), Strictness::Flagd).unwrap_err();
        err.diagnostics.into_iter().map(|d| (d.pointer, d.message)).collect()
    };
    let mut unknown_flag = running();
    unknown_flag["flag"] = json!("nope");
    assert_eq!(problems(unknown_flag)[0].0, "/$experiments/checkout-copy/flag");
    let mut unknown_variant = running();
    unknown_variant["weights"][1]["variant"] = json!("purple");
    let found = problems(unknown_variant);
    assert_eq!(found[0].0, "/$experiments/checkout-copy/weights/1/variant");
    assert!(found[0].1.contains("purple"), "{found:?}");
    let mut no_weight = running();
    no_weight["weights"] = json!([{"variant": "control", "weight": 0}]);
    assert!(problems(no_weight)[0].1.contains("positive weight"));
    let mut bad_status = running();
    bad_status["status"] = json!("draft");
    assert_eq!(problems(bad_status)[0].0, "/$experiments/checkout-copy/status");
    let mut bad_winner = running();
    bad_winner["winner"] = json!("purple");
    assert_eq!(problems(bad_winner)[0].0, "/$experiments/checkout-copy/winner");

    let mut two = document(running());
    two["$experiments"]["second"] = running();
    let err = parse::parse_value(&two, Strictness::Flagd).unwrap_err();
    assert!(
        err.diagnostics[0].message.contains("one experiment at a time"),
        "{:?}",
        err.diagnostics
    );
}

/// What an in-process flagd provider gets: the experiment as flagd targeting (`fractional` v3)
/// around the flag's own rule. Evaluated by flagd's rules (this crate's engine, checked against
/// flagd's testbed), it gives every unit the variant the server's allocation gives.
#[test]
fn the_experiment_as_flagd_targeting_allocates_every_unit_alike() {
    let mut experiment = running();
    experiment["traffic"] = json!(700_000);
    experiment["weights"] = json!([
        {"variant": "control", "weight": 2}, {"variant": "bold", "weight": 1}, {"variant": "other", "weight": 4}
    ]);
    experiment["layer"] = json!({"key": "checkout", "start": 100_000, "end": 900_000});
    experiment["audience"] = json!({"!=": [{"var": "country"}, "DE"]});
    let server = snapshot(&document(experiment));
    let definition = server.get("checkout", &Selector::All).unwrap().flag();
    let own_rule = definition.targeting.as_ref().map(|t| t.to_value());
    let emulated = definition
        .experiment
        .as_ref()
        .unwrap()
        .targeting(own_rule.as_ref())
        .expect("a running experiment has a rule");
    let mut plain = document(Value::Null);
    plain.as_object_mut().unwrap().remove("$experiments");
    plain["flags"]["checkout"]["targeting"] = emulated;
    let provider = snapshot(&plain);
    let (mut split, mut outside) = (0, 0);
    for i in 0..20_000 {
        let unit = format!("unit-{i}");
        let mut attributes = context(Some(&unit), if i % 7 == 0 { "pro" } else { "free" });
        attributes.insert("country".into(), json!(if i % 11 == 0 { "DE" } else { "NL" }));
        let want = evaluate(&server, &attributes);
        let got = evaluate(&provider, &attributes);
        assert_eq!(got.variant, want.variant, "{unit}: {want:?} / {got:?}");
        if want.reason == Reason::Split {
            split += 1;
        } else {
            outside += 1;
        }
    }
    assert!(split > 7_000 && outside > 7_000, "{split} {outside}");
    let anonymous = context(None, "pro");
    assert_eq!(
        evaluate(&provider, &anonymous).variant,
        evaluate(&server, &anonymous).variant
    );
    // Paused: the flag's own rule.
    let mut paused = running();
    paused["status"] = json!("paused");
    let server = snapshot(&document(paused));
    let definition = server.get("checkout", &Selector::All).unwrap().flag();
    assert_eq!(definition.experiment.as_ref().unwrap().targeting(None), None);
}
