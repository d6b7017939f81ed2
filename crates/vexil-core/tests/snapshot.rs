//! Snapshots: selectors, source priority, flag sets, and flagd's evaluation edge cases.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use vexil_core::parse::{self, Strictness};
use vexil_core::{Context, Engine, ErrorCode, FractionalMode, Reason, Selector, Snapshot, SourceConfig, ValueType};

fn source(name: &str, doc: Value) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        config: parse::parse_value(&doc, Strictness::Flagd).unwrap().config,
    }
}

fn snapshot(sources: Vec<SourceConfig>) -> Snapshot {
    Snapshot::build(Arc::new(Engine::new(FractionalMode::V3)), sources).0
}

fn ctx(attributes: &Map<String, Value>) -> Context<'_> {
    Context {
        attributes,
        now: 1_700_000_000,
    }
}

fn flag(state: &str, value: Value) -> Value {
    json!({"state": state, "variants": {"v": value}, "defaultVariant": "v"})
}

#[test]
fn selectors_parse_like_flagd() {
    assert_eq!(Selector::parse(""), Ok(Selector::All));
    assert_eq!(
        Selector::parse("flagSetId=abc"),
        Ok(Selector::FlagSet(Some("abc".into())))
    );
    assert_eq!(Selector::parse("flagSetId="), Ok(Selector::FlagSet(None)));
    assert_eq!(Selector::parse("source=a.json"), Ok(Selector::Source("a.json".into())));
    assert_eq!(
        Selector::parse("flags/a.json"),
        Ok(Selector::Source("flags/a.json".into()))
    );
    assert!(Selector::parse("owner=me").is_err());
    assert!(Selector::parse("source=").is_err());
    assert_eq!(
        Selector::parse("flagSetId=abc").unwrap().metadata(),
        json!({"flagSetId": "abc"}).as_object().unwrap().clone()
    );
    assert!(Selector::All.metadata().is_empty());
}

#[test]
fn later_sources_win_without_a_selector() {
    let snap = snapshot(vec![
        source(
            "a.json",
            json!({"flags": {"f": flag("ENABLED", json!("from-a")), "only-a": flag("ENABLED", json!(1))}}),
        ),
        source("b.json", json!({"flags": {"f": flag("ENABLED", json!("from-b"))}})),
    ]);
    let empty = Map::new();
    let r = snap.evaluate("f", &Selector::All, ctx(&empty), ValueType::String);
    assert_eq!(r.value, Some(&json!("from-b")));
    // Flags are keyed by (flag set, key), as in flagd's store: b.json's `f` replaced a.json's.
    let r = snap.evaluate("f", &Selector::Source("a.json".into()), ctx(&empty), ValueType::String);
    assert_eq!(r.error_code(), Some(ErrorCode::FlagNotFound));
    let r = snap.evaluate("f", &Selector::Source("b.json".into()), ctx(&empty), ValueType::String);
    assert_eq!(r.value, Some(&json!("from-b")));
    let r = snap.evaluate(
        "only-a",
        &Selector::Source("b.json".into()),
        ctx(&empty),
        ValueType::Float,
    );
    assert_eq!(r.error_code(), Some(ErrorCode::FlagNotFound));
    let keys: Vec<&str> = snap.flags(&Selector::All).map(|f| f.key()).collect();
    assert_eq!(keys, ["f", "only-a"]);
    let keys: Vec<&str> = snap
        .flags(&Selector::Source("b.json".into()))
        .map(|f| f.key())
        .collect();
    assert_eq!(keys, ["f"]);
}

#[test]
fn flag_sets_namespace_keys() {
    let snap = snapshot(vec![
        source("a.json", json!({"flags": {"f": flag("DISABLED", json!(true))}})),
        source(
            "b.json",
            json!({"metadata": {"flagSetId": "set-b"}, "flags": {"f": flag("ENABLED", json!(false))}}),
        ),
    ]);
    let empty = Map::new();
    let in_set = snap.evaluate(
        "f",
        &Selector::FlagSet(Some("set-b".into())),
        ctx(&empty),
        ValueType::Boolean,
    );
    assert_eq!((in_set.reason, in_set.value), (Reason::Static, Some(&json!(false))));
    assert_eq!(in_set.metadata.unwrap().get("flagSetId"), Some(&json!("set-b")));
    let no_set = snap.evaluate("f", &Selector::FlagSet(None), ctx(&empty), ValueType::Boolean);
    assert_eq!(no_set.reason, Reason::Disabled);
    let other = snap.evaluate(
        "f",
        &Selector::FlagSet(Some("nope".into())),
        ctx(&empty),
        ValueType::Boolean,
    );
    assert_eq!(other.error_code(), Some(ErrorCode::FlagNotFound));
    assert_eq!(snap.len(), 2);
}

#[test]
fn flagd_edge_cases() {
    let snap = snapshot(vec![source(
        "edge.json",
        json!({"flags": {
            "null-result": {"state": "ENABLED", "variants": {"one": 1, "two": 2}, "defaultVariant": "two", "targeting": {"if": [true, null, "one"]}},
            "bool-result": {"state": "ENABLED", "variants": {"true": "yes", "false": "no"}, "defaultVariant": "false", "targeting": {"==": [1, 1]}},
            "unknown-variant": {"state": "ENABLED", "variants": {"one": 1}, "defaultVariant": "one", "targeting": {"if": [true, "three", "one"]}},
            "bad-operator": {"state": "ENABLED", "variants": {"one": 1}, "defaultVariant": "one", "targeting": {"invalid": [1]}},
            "no-default": {"state": "ENABLED", "variants": {"one": 1}},
            "no-default-null": {"state": "ENABLED", "variants": {"one": 1}, "defaultVariant": null, "targeting": {"if": [false, "one", null]}},
            "disabled": {"state": "DISABLED", "variants": {"one": 1}, "defaultVariant": "one", "targeting": {"invalid": [1]}},
            "float": {"state": "ENABLED", "variants": {"half": 0.5, "int": 10}, "defaultVariant": "half"},
            "object": {"state": "ENABLED", "variants": {"o": {"a": [1]}, "arr": [1]}, "defaultVariant": "o", "targeting": {"if": [{"var": "arr"}, "arr", null]}}
        }}),
    )]);
    let empty = Map::new();
    let eval = |key: &str, ty: ValueType| snap.evaluate(key, &Selector::All, ctx(&empty), ty);

    let r = eval("null-result", ValueType::Integer);
    assert_eq!(
        (r.reason, r.variant, r.value),
        (Reason::Default, Some("two"), Some(&json!(2)))
    );
    let r = eval("bool-result", ValueType::String);
    assert_eq!((r.reason, r.variant), (Reason::TargetingMatch, Some("true")));
    assert_eq!(
        eval("unknown-variant", ValueType::Integer).error_code(),
        Some(ErrorCode::General)
    );
    assert_eq!(
        eval("bad-operator", ValueType::Integer).error_code(),
        Some(ErrorCode::ParseError)
    );
    let r = eval("no-default", ValueType::Integer);
    assert!(r.is_code_default() && r.reason == Reason::Default && r.variant.is_none());
    let r = eval("no-default-null", ValueType::Integer);
    assert!(r.is_code_default() && r.reason == Reason::Default);
    let r = eval("disabled", ValueType::Integer);
    assert!(
        r.is_code_default() && r.reason == Reason::Disabled,
        "targeting does not run: {r:?}"
    );
    // Integers and floats are interchangeable (flagd's numbers are float64).
    assert_eq!(eval("float", ValueType::Integer).value, Some(&json!(0.5)));
    assert_eq!(eval("float", ValueType::Float).value, Some(&json!(0.5)));
    let mismatch = eval("float", ValueType::Boolean);
    assert_eq!(
        (mismatch.reason, mismatch.error_code()),
        (Reason::Error, Some(ErrorCode::TypeMismatch))
    );
    assert!(mismatch.error.unwrap().message.contains("flag `float`"));
    assert_eq!(eval("object", ValueType::Object).value, Some(&json!({"a": [1]})));
    assert_eq!(eval("object", ValueType::Any).value, Some(&json!({"a": [1]})));
    assert_eq!(
        eval("missing", ValueType::Any).error_code(),
        Some(ErrorCode::FlagNotFound)
    );

    let mut with_arr = Map::new();
    with_arr.insert("arr".into(), json!(true));
    let r = snap.evaluate("object", &Selector::All, ctx(&with_arr), ValueType::Object);
    assert_eq!(
        r.error_code(),
        Some(ErrorCode::TypeMismatch),
        "an array is not an object"
    );
    assert_eq!(
        snap.get("float", &Selector::All).unwrap().default_type(),
        Some(ValueType::Float)
    );
}

#[test]
fn uncompilable_rules_are_reported_but_do_not_sink_the_snapshot() {
    let engine = Arc::new(Engine::new(FractionalMode::V3));
    // An object with two keys is not a JsonLogic operation.
    let doc = json!({"flags": {
        "f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"a": 1, "b": 2}},
        "g": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"}
    }});
    let (snap, warnings) = Snapshot::build(engine, vec![source("s", doc)]);
    assert_eq!(snap.len(), 2);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].flag.as_deref(), Some("f"));
    assert_eq!(warnings[0].pointer, "/flags/f/targeting");
    let empty = Map::new();
    assert_eq!(
        snap.evaluate("f", &Selector::All, ctx(&empty), ValueType::Any)
            .error_code(),
        Some(ErrorCode::ParseError)
    );
    assert_eq!(
        snap.evaluate("g", &Selector::All, ctx(&empty), ValueType::Any).reason,
        Reason::Static
    );
}

#[test]
fn targeting_key_and_context_reach_rules() {
    let snap = snapshot(vec![source(
        "s",
        json!({"flags": {"f": {
            "state": "ENABLED", "variants": {"hit": true, "miss": false}, "defaultVariant": "miss",
            "targeting": {"if": [{"and": [
                {"==": [{"var": "targetingKey"}, "user-1"]},
                {"in": [{"var": "plan"}, ["pro", "enterprise"]]},
                {">=": [{"var": "age"}, 18]},
                {"starts_with": [{"var": "email"}, "ann"]},
                {"sem_ver": [{"var": "app.version"}, ">=", "2.1.0"]}
            ]}, "hit", null]}
        }}}),
    )]);
    let mut attrs: Map<String, Value> = json!({
        "targetingKey": "user-1", "plan": "pro", "age": 30, "email": "ann@example.com", "app": {"version": "2.10.0"}
    })
    .as_object()
    .unwrap()
    .clone();
    let r = snap.evaluate("f", &Selector::All, ctx(&attrs), ValueType::Boolean);
    assert_eq!((r.reason, r.value), (Reason::TargetingMatch, Some(&json!(true))));
    attrs.insert("age".into(), json!(17));
    let r = snap.evaluate("f", &Selector::All, ctx(&attrs), ValueType::Boolean);
    assert_eq!((r.reason, r.value), (Reason::Default, Some(&json!(false))));
}

#[test]
fn changes_between_snapshots() {
    let old = snapshot(vec![source(
        "a.json",
        json!({"flags": {"same": flag("ENABLED", json!(1)), "edited": flag("ENABLED", json!(1)), "gone": flag("ENABLED", json!(1))}}),
    )]);
    let new = snapshot(vec![source(
        "a.json",
        json!({"flags": {"same": flag("ENABLED", json!(1)), "edited": flag("DISABLED", json!(1)), "added": flag("ENABLED", json!(1))}}),
    )]);
    use vexil_core::snapshot::Change;
    assert_eq!(
        new.changes_since(&old, &Selector::All),
        vec![
            ("added".into(), Change::Write),
            ("edited".into(), Change::Update),
            ("gone".into(), Change::Delete)
        ]
    );
    assert!(new.changes_since(&new, &Selector::All).is_empty());
    assert!(
        new.changes_since(&old, &Selector::FlagSet(Some("other".into())))
            .is_empty()
    );
    let moved = snapshot(vec![
        source("a.json", json!({"flags": {}})),
        source("b.json", json!({"flags": {"same": flag("ENABLED", json!(1))}})),
    ]);
    let c = moved.changes_since(&old, &Selector::All);
    assert!(c.contains(&("same".into(), Change::Update)), "{c:?}");
}

#[test]
fn evaluating_all_flags_at_once_matches_one_by_one() {
    let snap = snapshot(vec![source(
        "s",
        json!({"flags": {
            "static": flag("ENABLED", json!(1)),
            "disabled": flag("DISABLED", json!(1)),
            "rule": {"state": "ENABLED", "variants": {"a": "a", "b": "b"}, "defaultVariant": "a",
                     "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "b", null]}},
            "split": {"state": "ENABLED", "variants": {"a": "a", "b": "b"}, "defaultVariant": "a",
                      "targeting": {"fractional": [["a", 50], ["b", 50]]}},
            "key": {"state": "ENABLED", "variants": {"yes": true, "no": false}, "defaultVariant": "no",
                    "targeting": {"if": [{"==": [{"var": "$flagd.flagKey"}, "key"]}, "yes", "no"]}}
        }}),
    )]);
    for attrs in [
        json!({"plan": "pro", "targetingKey": "u1"}),
        json!({"plan": "free", "targetingKey": "u2", "$flagd": {"flagKey": "x"}}),
    ] {
        let attrs = attrs.as_object().unwrap().clone();
        let mut all = Vec::new();
        snap.evaluate_all(&Selector::All, ctx(&attrs), |flag, r| {
            all.push((flag.key().to_owned(), r))
        });
        assert_eq!(all.len(), 5);
        for (key, r) in all {
            assert_eq!(
                r,
                snap.evaluate(&key, &Selector::All, ctx(&attrs), ValueType::Any),
                "{key}"
            );
        }
    }
}

#[test]
fn the_revision_names_the_content() {
    let doc = || json!({"flags": {"a": flag("ENABLED", json!(1)), "b": flag("ENABLED", json!("x"))}});
    let one = snapshot(vec![source("f.json", doc())]);
    let again = snapshot(vec![source("f.json", doc())]);
    assert_eq!(one.revision(), again.revision(), "the same input, the same revision");
    assert_eq!(
        one.revision().to_string().len(),
        16,
        "shown as 16 hex digits: {}",
        one.revision()
    );
    let mut changed = doc();
    changed["flags"]["b"]["variants"]["v"] = json!("y");
    let mut metadata = doc();
    metadata["metadata"] = json!({"team": "core"});
    let mut disabled = doc();
    disabled["flags"]["a"]["state"] = json!("DISABLED");
    let mut targeted = doc();
    targeted["flags"]["a"]["targeting"] = json!({"if": [true, "v", null]});
    let others = [
        snapshot(vec![source("f.json", changed)]),
        snapshot(vec![source("f.json", metadata)]),
        snapshot(vec![source("f.json", disabled)]),
        snapshot(vec![source("f.json", targeted)]),
        snapshot(vec![source("g.json", doc())]),
        snapshot(vec![source("f.json", doc()), source("g.json", json!({"flags": {}}))]),
        Snapshot::build(Arc::new(Engine::new(FractionalMode::V2)), vec![source("f.json", doc())]).0,
    ];
    let mut revisions: Vec<_> = others.iter().map(Snapshot::revision).collect();
    revisions.push(one.revision());
    let count = revisions.len();
    revisions.sort();
    revisions.dedup();
    assert_eq!(revisions.len(), count, "every change of content changes the revision");
}

#[test]
fn a_compiled_flag_memoizes_one_derived_value() {
    let snap = snapshot(vec![source("a", json!({"flags": {"f": flag("ENABLED", json!(1))}}))]);
    let compiled = snap.get("f", &Selector::All).unwrap();
    let mut calls = 0;
    let first = compiled
        .memo(|f| {
            calls += 1;
            format!("{}:{}", f.key, f.variants.len())
        })
        .cloned();
    let again = compiled.memo(|_| -> String { unreachable!("computed once") }).cloned();
    assert_eq!(
        (first.as_deref(), again.as_deref(), calls),
        (Some("f:1"), Some("f:1"), 1)
    );
    assert_eq!(compiled.memo(|_| 7_u32), None, "the slot holds the first type only");
}

#[test]
fn assembling_reuses_the_compiled_flags_of_unchanged_sources() {
    use vexil_core::snapshot::CompiledSource;

    let engine = Arc::new(Engine::new(FractionalMode::V3));
    let a = || {
        source(
            "a.json",
            json!({"flags": {
                "shared": flag("ENABLED", json!("from-a")),
                "only-a": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                           "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "on", null]}},
                "broken": {"state": "ENABLED", "variants": {"v": 1}, "defaultVariant": "v",
                           "targeting": {"a": 1, "b": 2}}
            }}),
        )
    };
    let b = |value: &str| {
        source(
            "b.json",
            json!({"flags": {"shared": flag("ENABLED", json!(value)), "only-b": flag("DISABLED", json!(2))}}),
        )
    };
    let compile = |s| Arc::new(CompiledSource::compile(&engine, s));
    let (compiled_a, compiled_b) = (compile(a()), compile(b("one")));
    assert_eq!(compiled_a.warnings().len(), 1, "the broken rule is reported");
    let first = Snapshot::assemble(engine.clone(), vec![compiled_a.clone(), compiled_b]);

    // b changes: only b is compiled again.
    let second = Snapshot::assemble(engine.clone(), vec![compiled_a.clone(), compile(b("two"))]);
    assert!(Arc::ptr_eq(&second.compiled_sources()[0], &compiled_a));
    let selector = Selector::Source("a.json".into());
    for key in ["only-a", "broken"] {
        assert!(
            std::ptr::eq(first.get(key, &selector).unwrap(), second.get(key, &selector).unwrap()),
            "{key}: the same compiled flag, not a copy"
        );
    }

    // Identical to compiling everything from scratch.
    let (full, warnings) = Snapshot::build(engine.clone(), vec![a(), b("two")]);
    assert_eq!(warnings, compiled_a.warnings());
    assert_eq!(
        second.revision(),
        full.revision(),
        "the same content, the same revision"
    );
    assert_ne!(first.revision(), second.revision());
    assert_eq!(second.sources().collect::<Vec<_>>(), full.sources().collect::<Vec<_>>());
    assert_eq!(second.len(), full.len());
    let attrs = json!({"plan": "pro", "targetingKey": "u"}).as_object().unwrap().clone();
    for selector in [
        Selector::All,
        Selector::Source("a.json".into()),
        Selector::Source("b.json".into()),
        Selector::FlagSet(None),
    ] {
        let mut incremental = Vec::new();
        second.evaluate_all(&selector, ctx(&attrs), |f, r| {
            incremental.push((f.key().to_owned(), format!("{r:?}")))
        });
        let mut scratch = Vec::new();
        full.evaluate_all(&selector, ctx(&attrs), |f, r| {
            scratch.push((f.key().to_owned(), format!("{r:?}")))
        });
        assert_eq!(incremental, scratch, "{selector}");
        assert!(second.changes_since(&full, &selector).is_empty(), "{selector}");
    }
    assert_eq!(
        second
            .evaluate("shared", &Selector::All, ctx(&attrs), ValueType::String)
            .value,
        Some(&json!("two")),
        "the later source still wins"
    );
}

#[test]
fn an_unlisted_source_is_seen_only_by_selectors_that_name_it() {
    use vexil_core::snapshot::CompiledSource;

    let engine = Arc::new(Engine::new(FractionalMode::V3));
    let listed = source(
        "file.json",
        json!({"flags": {"shared": flag("ENABLED", json!("file")), "only-file": flag("ENABLED", json!(1))}}),
    );
    let managed = source(
        "store",
        json!({"metadata": {"flagSetId": "staging/web"},
               "flags": {"shared": flag("ENABLED", json!("staging")), "only-staging": flag("ENABLED", json!(2))}}),
    );
    let unlisted = CompiledSource::compile(&engine, managed.clone()).unlisted();
    assert!(!unlisted.is_listed());
    let snap = Snapshot::assemble(
        engine.clone(),
        vec![
            Arc::new(CompiledSource::compile(&engine, listed.clone())),
            Arc::new(unlisted),
        ],
    );

    // Without a selector: the listed source only, even where the unlisted one comes later.
    let all: Vec<&str> = snap.flags(&Selector::All).map(|f| f.key()).collect();
    assert_eq!(all, ["only-file", "shared"]);
    let attrs = Map::new();
    let shared = snap.evaluate("shared", &Selector::All, ctx(&attrs), ValueType::Any);
    assert_eq!(shared.value, Some(&json!("file")));
    let hidden = snap.evaluate("only-staging", &Selector::All, ctx(&attrs), ValueType::Any);
    assert_eq!(hidden.error.map(|e| e.code), Some(ErrorCode::FlagNotFound));

    // Named by flag set or source: there.
    let staging = Selector::FlagSet(Some("staging/web".into()));
    let seen: Vec<&str> = snap.flags(&staging).map(|f| f.key()).collect();
    assert_eq!(seen, ["only-staging", "shared"]);
    let value = snap.evaluate("shared", &staging, ctx(&attrs), ValueType::Any);
    assert_eq!(value.value, Some(&json!("staging")));
    let by_source: Vec<&str> = snap.flags(&Selector::Source("store".into())).map(|f| f.key()).collect();
    assert_eq!(by_source, ["only-staging", "shared"]);

    // Listing is part of the content: the revision tells the two apart.
    let listed_too = Snapshot::build(engine.clone(), vec![listed, managed]).0;
    assert_ne!(listed_too.revision(), snap.revision());
}

#[test]
fn recompiling_a_source_reuses_its_unchanged_flags() {
    use vexil_core::snapshot::CompiledSource;

    let engine = Arc::new(Engine::new(FractionalMode::V3));
    let doc = |plan: &str| {
        json!({"flags": {
            "kept": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                     "targeting": {"if": [{"==": [{"var": "plan"}, "pro"]}, "on", null]}},
            "broken": {"state": "ENABLED", "variants": {"v": 1}, "defaultVariant": "v", "targeting": {"a": 1, "b": 2}},
            "changed": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                        "targeting": {"if": [{"==": [{"var": "plan"}, plan]}, "on", null]}}
        }})
    };
    let first = CompiledSource::compile(&engine, source("a.json", doc("pro")));
    // Reloaded: every definition parsed anew (equal, not the same allocation), one changed.
    let second = CompiledSource::compile_reusing(&engine, source("a.json", doc("team")), Some(&first));
    let by_key = |c: &CompiledSource, key: &str| -> *const vexil_core::CompiledFlag {
        c.flags().find(|f| f.key() == key).map(|f| f as *const _).unwrap()
    };
    assert_eq!(
        by_key(&first, "kept"),
        by_key(&second, "kept"),
        "an equal flag is not compiled again"
    );
    assert_eq!(by_key(&first, "broken"), by_key(&second, "broken"));
    assert_ne!(by_key(&first, "changed"), by_key(&second, "changed"));
    assert_eq!(
        second.warnings(),
        first.warnings(),
        "a reused flag's compile problem is still reported"
    );
    // The same as compiling from scratch.
    let scratch = CompiledSource::compile(&engine, source("a.json", doc("team")));
    let snap = |c: CompiledSource| Snapshot::assemble(engine.clone(), vec![Arc::new(c)]);
    let (reused, fresh) = (snap(second), snap(scratch));
    assert_eq!(reused.revision(), fresh.revision());
    let attrs = json!({"plan": "team"}).as_object().unwrap().clone();
    for key in ["kept", "broken", "changed"] {
        let a = reused.evaluate(key, &Selector::All, ctx(&attrs), ValueType::Any);
        let b = fresh.evaluate(key, &Selector::All, ctx(&attrs), ValueType::Any);
        assert_eq!((a.value, a.variant, a.reason), (b.value, b.variant, b.reason), "{key}");
    }
}
