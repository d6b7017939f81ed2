//! Property tests: fractional distribution and stickiness, sem_ver against the semver rules, and a
//! parser/evaluator that never panics on arbitrary input.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use vexil_core::parse::{self, Format, Strictness};
use vexil_core::{Context, Engine, FractionalMode, Reason, Selector, Snapshot, SourceConfig, ValueType};

const MODES: [FractionalMode; 3] = [FractionalMode::V1, FractionalMode::V2, FractionalMode::V3];

fn snapshot(mode: FractionalMode, flags: Value) -> Snapshot {
    let config = parse::parse_value(&json!({ "flags": flags }), Strictness::Flagd)
        .unwrap()
        .config;
    Snapshot::build(
        Arc::new(Engine::new(mode)),
        vec![SourceConfig {
            name: "p".into(),
            config,
        }],
    )
    .0
}

/// A string flag `f` whose targeting is `{"fractional": buckets}` (shorthand: flag key + targeting key).
fn fractional_flag(buckets: Value) -> Value {
    let mut variants = Map::new();
    for b in buckets.as_array().unwrap() {
        let name = b[0].as_str().unwrap();
        variants.insert(name.into(), json!(name));
    }
    variants.insert("default".into(), json!("default"));
    json!({"f": {"state": "ENABLED", "variants": variants, "defaultVariant": "default", "targeting": {"fractional": buckets}}})
}

fn pick(snap: &Snapshot, key: &str) -> (Reason, String) {
    let mut attrs = Map::new();
    attrs.insert("targetingKey".into(), json!(key));
    let r = snap.evaluate(
        "f",
        &Selector::All,
        Context {
            attributes: &attrs,
            now: 0,
        },
        ValueType::String,
    );
    (r.reason, r.value.and_then(Value::as_str).unwrap_or("").to_owned())
}

/// SplitMix64: a deterministic key stream from a seed.
fn keys(seed: u64, n: usize) -> impl Iterator<Item = String> {
    let mut state = seed;
    (0..n).map(move |_| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        format!("user-{:x}", z ^ (z >> 31))
    })
}

#[test]
fn fractional_distribution_matches_weights_over_100k_keys() {
    let buckets = json!([["a", 10], ["b", 20], ["c", 30], ["d", 40]]);
    let expected = [("a", 0.10), ("b", 0.20), ("c", 0.30), ("d", 0.40)];
    const N: usize = 100_000;
    for mode in MODES {
        let snap = snapshot(mode, fractional_flag(buckets.clone()));
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for key in keys(0x5eed ^ mode as u64, N) {
            let (reason, variant) = pick(&snap, &key);
            assert_eq!(reason, Reason::TargetingMatch);
            *counts.entry(variant).or_default() += 1;
        }
        for (variant, share) in expected {
            let observed = counts.get(variant).copied().unwrap_or(0) as f64 / N as f64;
            // Binomial sd at n=100k is ≤ 0.0016; 0.01 is > 6 sd.
            assert!(
                (observed - share).abs() < 0.01,
                "{mode:?} {variant}: {observed} vs {share}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fractional_is_sticky(key in ".{0,40}", weights in prop::collection::vec(0u32..1000, 1..6)) {
        let buckets: Vec<Value> = weights.iter().enumerate().map(|(i, w)| json!([format!("v{i}"), w])).collect();
        for mode in MODES {
            // Two independently built snapshots give the same answer, every time.
            let one = snapshot(mode, fractional_flag(json!(buckets)));
            let two = snapshot(mode, fractional_flag(json!(buckets)));
            let first = pick(&one, &key);
            prop_assert_eq!(&first, &pick(&one, &key));
            prop_assert_eq!(&first, &pick(&two, &key));
        }
    }

    #[test]
    fn zero_weight_buckets_are_never_chosen(key in "[a-z0-9@.]{1,24}", weights in prop::collection::vec(0u32..5, 1..6)) {
        let buckets: Vec<Value> = weights.iter().enumerate().map(|(i, w)| json!([format!("v{i}"), w])).collect();
        for mode in [FractionalMode::V2, FractionalMode::V3] {
            let snap = snapshot(mode, fractional_flag(json!(buckets)));
            let (reason, variant) = pick(&snap, &key);
            if weights.iter().all(|&w| w == 0) {
                // All weights zero: the operator yields null, the default variant applies.
                prop_assert_eq!((reason, variant.as_str()), (Reason::Default, "default"));
            } else {
                let index: usize = variant.trim_start_matches('v').parse().unwrap();
                prop_assert!(weights[index] > 0, "{:?} chose zero-weight bucket {}", mode, index);
            }
        }
    }

    #[test]
    fn a_single_bucket_always_wins(key in "[a-z0-9@.]{1,24}", weight in 1u32..=i32::MAX as u32) {
        for mode in [FractionalMode::V2, FractionalMode::V3] {
            let snap = snapshot(mode, fractional_flag(json!([["only", weight]])));
            prop_assert_eq!(pick(&snap, &key), (Reason::TargetingMatch, "only".to_owned()));
        }
    }

    #[test]
    fn maximal_weights_are_accepted_and_overflow_is_null(key in "[a-z0-9@.]{1,24}", split in 1u32..(i32::MAX as u32)) {
        let max = i32::MAX as u32;
        for mode in [FractionalMode::V2, FractionalMode::V3] {
            let exact = snapshot(mode, fractional_flag(json!([["a", split], ["b", max - split]])));
            prop_assert_eq!(pick(&exact, &key).0, Reason::TargetingMatch);
            let over = snapshot(mode, fractional_flag(json!([["a", split], ["b", max - split + 1]])));
            prop_assert_eq!(pick(&over, &key), (Reason::Default, "default".to_owned()));
        }
    }

    #[test]
    fn sem_ver_follows_semver_precedence(
        a in (0u64..20, 0u64..20, 0u64..20), b in (0u64..20, 0u64..20, 0u64..20),
        pre_a in prop::option::of("(alpha|beta|rc)(\\.[1-9])?"), pre_b in prop::option::of("(alpha|beta|rc)(\\.[1-9])?"),
        v_prefix in any::<bool>(),
    ) {
        let render = |(x, y, z): (u64, u64, u64), pre: &Option<String>| match pre {
            Some(p) => format!("{x}.{y}.{z}-{p}"),
            None => format!("{x}.{y}.{z}"),
        };
        let (va, vb) = (render(a, &pre_a), render(b, &pre_b));
        // Reference order: the numeric triple, then a release above any of its prereleases, then
        // prerelease identifiers (these ones compare alphabetically, then numerically).
        let pre_key = |p: &Option<String>| match p {
            None => (1, String::new(), 0),
            Some(p) => {
                let (word, n) = p.split_once('.').map_or((p.as_str(), 0), |(w, n)| (w, n.parse().unwrap()));
                (0, word.to_owned(), n + 1)
            }
        };
        let expected = (a, pre_key(&pre_a)).cmp(&(b, pre_key(&pre_b)));
        let prefix = if v_prefix { "v" } else { "" };
        for (op, holds) in [
            ("=", expected.is_eq()), ("!=", expected.is_ne()), ("<", expected.is_lt()),
            ("<=", expected.is_le()), (">", expected.is_gt()), (">=", expected.is_ge()),
            ("~", a.0 == b.0 && a.1 == b.1), ("^", a.0 == b.0),
        ] {
            let snap = snapshot(FractionalMode::V3, json!({"f": {
                "state": "ENABLED", "variants": {"true": true, "false": false}, "defaultVariant": "false",
                "targeting": {"sem_ver": [{"var": "v"}, op, vb]}
            }}));
            let mut attrs = Map::new();
            attrs.insert("v".into(), json!(format!("{prefix}{va}")));
            let r = snap.evaluate("f", &Selector::All, Context { attributes: &attrs, now: 0 }, ValueType::Boolean);
            prop_assert_eq!(r.value, Some(&json!(holds)), "{}{} {} {}", prefix, va, op, vb);
        }
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = parse::parse_str(&text, Format::Json, Strictness::Flagd);
        let _ = parse::parse_str(&text, Format::Yaml, Strictness::Strict);
    }

    #[test]
    fn parsing_and_evaluating_arbitrary_documents_never_panics(
        flags in prop::collection::btree_map("[a-z]{1,6}", flag_like(), 0..4),
        evaluators in prop::collection::btree_map("[a-z]{1,4}", json_value(), 0..3),
        context in prop::collection::btree_map("[a-zA-Z$]{1,8}", json_value(), 0..4),
    ) {
        let doc = json!({"flags": flags, "$evaluators": evaluators});
        for strictness in [Strictness::Flagd, Strictness::Strict] {
            let Ok(parsed) = parse::parse_value(&doc, strictness) else { continue };
            for mode in MODES {
                let source = SourceConfig { name: "p".into(), config: parsed.config.clone() };
                let (snap, _) = Snapshot::build(Arc::new(Engine::new(mode)), vec![source]);
                let attrs: Map<String, Value> = context.clone().into_iter().collect();
                for flag in snap.flags(&Selector::All) {
                    for ty in [ValueType::Any, ValueType::Boolean, ValueType::Integer, ValueType::Object] {
                        let r = snap.evaluate(flag.key(), &Selector::All, Context { attributes: &attrs, now: 0 }, ty);
                        prop_assert_eq!(r.reason == Reason::Error, r.error.is_some());
                        prop_assert_eq!(r.value.is_some(), r.variant.is_some());
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A rule is given only the context keys it can read (`Rule::reads`): its answer is the one it
    /// gives with the whole context (what a bulk evaluation prepares).
    #[test]
    fn a_rule_answers_the_same_with_only_the_keys_it_reads(
        rules in prop::collection::btree_map("[a-z]{1,6}", json_value(), 1..4),
        context in prop::collection::btree_map(context_key(), context_value(), 0..6),
    ) {
        let flags: Map<String, Value> = rules
            .into_iter()
            .map(|(key, rule)| {
                let variants = json!({"a": "a", "b": "b", "c": 1, "true": true, "false": false});
                (key, json!({"state": "ENABLED", "variants": variants, "defaultVariant": "a", "targeting": rule}))
            })
            .collect();
        let doc = json!({"flags": flags});
        let Ok(parsed) = parse::parse_value(&doc, Strictness::Flagd) else { return Ok(()) };
        for mode in MODES {
            let source = SourceConfig { name: "p".into(), config: parsed.config.clone() };
            let (snap, _) = Snapshot::build(Arc::new(Engine::new(mode)), vec![source]);
            let attrs: Map<String, Value> = context.clone().into_iter().collect();
            let ctx = Context { attributes: &attrs, now: 7 };
            let mut whole = Vec::new();
            snap.evaluate_all(&Selector::All, ctx, |flag, r| {
                whole.push((flag.key().to_owned(), r.reason, r.variant.map(str::to_owned), r.error));
            });
            for (key, reason, variant, error) in whole {
                let r = snap.evaluate(&key, &Selector::All, ctx, ValueType::Any);
                prop_assert_eq!((r.reason, r.variant.map(str::to_owned), r.error), (reason, variant, error), "{}", key);
            }
        }
    }
}

#[test]
fn a_nested_path_reads_its_first_segment() {
    let rule = json!({"if": [{"==": [{"var": "b.c"}, 1]}, "on", "off"]});
    let flags = json!({"f": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off", "targeting": rule}});
    let snap = snapshot(FractionalMode::V3, flags);
    let attrs = json!({"b": {"c": 1}, "x": 2}).as_object().cloned().unwrap();
    let r = snap.evaluate(
        "f",
        &Selector::All,
        Context {
            attributes: &attrs,
            now: 0,
        },
        ValueType::Boolean,
    );
    assert_eq!(r.variant, Some("on"));
}

/// Context keys, mostly ones the generated rules read.
fn context_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("targetingKey".to_owned()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("b.c".to_owned()),
        Just("$flagd".to_owned()),
        "[a-z]{1,3}",
    ]
}

/// Context values: also objects holding the `c` of `{"var": "b.c"}`, and variant names.
fn context_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        json_value(),
        "[a-c]{1,2}".prop_map(Value::String),
        prop_oneof![json_value(), "[a-c]{1,2}".prop_map(Value::String)].prop_map(|v| json!({"c": v})),
    ]
}

/// Arbitrary JSON, biased towards JsonLogic operators and flagd's custom ones.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z0-9.@ -]{0,8}".prop_map(Value::String),
        Just(json!({"var": "targetingKey"})),
        Just(json!({"var": "$flagd.flagKey"})),
        Just(json!({"var": "a"})),
        Just(json!({"var": "b.c"})),
        Just(json!({"var": ["b", 1]})),
        Just(json!({"var": ""})),
        Just(json!({"missing": ["a", "b.c"]})),
        Just(json!({"missing_some": [1, ["a", "x"]]})),
        Just(json!({"fractional": [["a", 50], ["b", 50]]})),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        let op = prop_oneof![
            Just("if"),
            Just("=="),
            Just("in"),
            Just("var"),
            Just("fractional"),
            Just("sem_ver"),
            Just("starts_with"),
            Just("ends_with"),
            Just("cat"),
            Just("+"),
            Just("/"),
            Just("map"),
            Just("reduce"),
            Just("$ref"),
            Just("missing"),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            (op, prop::collection::vec(inner.clone(), 0..4)).prop_map(|(op, args)| json!({ op: args })),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped more or less like flags.
fn flag_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!("ENABLED")), Just(json!("DISABLED")), json_value()],
        prop::collection::btree_map("[a-c]{1,2}", json_value(), 0..4),
        prop::option::of(prop_oneof!["[a-c]{1,2}".prop_map(Value::String), json_value()]),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(state, variants, default, targeting, metadata)| {
            let mut flag = Map::new();
            flag.insert("state".into(), state);
            flag.insert("variants".into(), Value::Object(variants.into_iter().collect()));
            if let Some(d) = default {
                flag.insert("defaultVariant".into(), d);
            }
            if let Some(t) = targeting {
                flag.insert("targeting".into(), t);
            }
            if let Some(m) = metadata {
                flag.insert("metadata".into(), m);
            }
            Value::Object(flag)
        })
}

#[test]
fn v1_weights_that_overflow_wrap_as_flagd_s_go_ints_did() {
    // i64::MAX twice wraps to -2: every share is negative, no bucket is hit, and the rule gives
    // null (the default variant) — never an overflow panic.
    let max = i64::MAX;
    let snap = snapshot(FractionalMode::V1, fractional_flag(json!([["a", max], ["b", max]])));
    for key in keys(7, 20) {
        assert_eq!(pick(&snap, &key), (Reason::Default, "default".to_owned()), "{key}");
    }
}
