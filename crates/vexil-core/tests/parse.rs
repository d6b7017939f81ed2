//! Parsing flagd flag documents: shapes, `$ref`, metadata merge, default variants, diagnostics.

use serde_json::{Value, json};
use vexil_core::parse::{self, Format, Severity, Strictness};
use vexil_core::{FlagState, ParseError};

fn parse_json(doc: Value) -> vexil_core::Parsed {
    parse::parse_value(&doc, Strictness::Flagd).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(err: &ParseError) -> Vec<String> {
    err.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

#[test]
fn flags_as_map_and_as_array_are_the_same() {
    let map = parse_json(json!({"flags": {
        "a": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
        "b": {"state": "DISABLED", "variants": {"x": "1"}, "defaultVariant": "x"}
    }}));
    let array = parse_json(json!({"flags": [
        {"key": "a", "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
        {"key": "b", "state": "DISABLED", "variants": {"x": "1"}, "defaultVariant": "x"}
    ]}));
    assert_eq!(map.config.flags, array.config.flags);
    assert_eq!(map.config.flags[1].state, FlagState::Disabled);
}

#[test]
fn yaml_documents_parse_like_json() {
    let yaml =
        "flags:\n  a:\n    state: ENABLED\n    variants:\n      on: true\n      off: false\n    defaultVariant: 'on'\n";
    let parsed = parse::parse_str(yaml, Format::Yaml, Strictness::Strict).unwrap();
    let json = parse_json(
        json!({"flags": {"a": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}}}),
    );
    assert_eq!(parsed.config.flags, json.config.flags);
    assert_eq!(Format::from_path("flags.YML"), Format::Yaml);
    assert_eq!(Format::from_path("flags.json"), Format::Json);
}

#[test]
fn refs_are_inlined_wherever_they_appear() {
    let parsed = parse_json(json!({
        "$evaluators": {
            "is_ballmer": {"in": ["@macrosoft.com", {"var": "email"}]},
            "nested": {"and": [{"$ref": "is_ballmer"}, true]}
        },
        "flags": {"f": {
            "state": "ENABLED", "variants": {"y": "y", "n": "n"}, "defaultVariant": "n",
            "targeting": {"if": [{"$ref": "nested"}, "y", {"if": [{"$ref": "is_ballmer"}, "y", null]}]}
        }}
    }));
    let targeting = parsed.config.flags[0].targeting.as_ref().unwrap().to_value();
    assert_eq!(
        targeting,
        json!({"if": [
            {"and": [{"in": ["@macrosoft.com", {"var": "email"}]}, true]},
            "y",
            {"if": [{"in": ["@macrosoft.com", {"var": "email"}]}, "y", null]}
        ]})
    );
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
}

#[test]
fn unknown_and_recursive_refs_are_reported_and_left_in_place() {
    let parsed = parse_json(json!({
        "$evaluators": {"loop": {"!": [{"$ref": "loop"}]}},
        "flags": {
            "f": {"state": "ENABLED", "variants": {"y": "y"}, "defaultVariant": "y", "targeting": {"if": [{"$ref": "nope"}, "y", null]}},
            "g": {"state": "ENABLED", "variants": {"y": "y"}, "defaultVariant": "y", "targeting": {"$ref": "loop"}}
        }
    }));
    let f = &parsed.config.flags[0];
    assert_eq!(
        f.targeting.as_ref().unwrap().to_value()["if"][0],
        json!({"$ref": "nope"})
    );
    let messages: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
    assert!(
        messages.iter().any(|m| m.contains("flag `f`") && m.contains("`nope`")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("flag `g`") && m.contains("recursive")),
        "{messages:?}"
    );
}

#[test]
fn set_metadata_is_merged_and_the_flag_wins() {
    let parsed = parse_json(json!({
        "metadata": {"flagSetId": "set-1", "team": "core", "version": "1"},
        "flags": {
            "a": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "metadata": {"team": "growth", "owner": null}},
            "b": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "metadata": {"flagSetId": "other"}}
        }
    }));
    let a = &parsed.config.flags[0];
    assert_eq!(a.metadata.get("team"), Some(&json!("growth")));
    assert_eq!(a.metadata.get("version"), Some(&json!("1")));
    assert_eq!(a.metadata.get("owner"), None, "null metadata values are dropped");
    assert_eq!(a.flag_set_id(), Some("set-1"));
    assert_eq!(parsed.config.flags[1].flag_set_id(), Some("other"));
}

#[test]
fn default_variant_may_be_null_or_absent_but_not_unknown() {
    let parsed = parse_json(json!({"flags": {
        "null": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": null},
        "absent": {"state": "ENABLED", "variants": {"a": 1}}
    }}));
    assert!(parsed.config.flags.iter().all(|f| f.default_variant.is_none()));

    let err = parse::parse_value(
        &json!({"flags": {"bad": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "c"}}}),
        Strictness::Flagd,
    )
    .unwrap_err();
    assert_eq!(
        errors(&err),
        vec!["error: flag `bad` at /flags/bad/defaultVariant: default variant `c` is not one of the variants (a, b)"]
    );
}

#[test]
fn empty_targeting_is_no_targeting() {
    let parsed = parse_json(
        json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {}}}}),
    );
    assert_eq!(parsed.config.flags[0].targeting, None);
}

#[test]
fn schema_violations_warn_in_flagd_mode_and_fail_in_strict_mode() {
    let doc = json!({"flags": {"f": {"state": "ON", "variants": {"a": true, "b": "x"}, "defaultVariant": "a"}}});
    let parsed = parse::parse_value(&doc, Strictness::Flagd).unwrap();
    assert_eq!(
        parsed.config.flags[0].state,
        FlagState::Enabled,
        "flagd serves any state but DISABLED"
    );
    assert!(
        parsed
            .warnings
            .iter()
            .any(|w| w.pointer == "/flags/f/state" && w.flag.as_deref() == Some("f")),
        "{:?}",
        parsed.warnings
    );

    let err = parse::parse_value(&doc, Strictness::Strict).unwrap_err();
    let messages = errors(&err);
    assert!(messages.iter().any(|m| m.contains("/flags/f/state")), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("all variants must have one type")),
        "{messages:?}"
    );
}

#[test]
fn wrong_shapes_are_errors_naming_the_flag_and_path() {
    let cases = [
        (json!([]), "at /: expected an object with `flags`, found an array"),
        (
            json!({"flags": 3}),
            "at /flags: `flags` must be an object or an array, found a number",
        ),
        (
            json!({"flags": {"f": "x"}}),
            "flag `f` at /flags/f: a flag must be an object, found a string",
        ),
        (
            json!({"flags": {"f": {"state": 1, "variants": {"a": 1}}}}),
            "flag `f` at /flags/f/state: `state` must be a string, found a number",
        ),
        (
            json!({"flags": {"f": {"state": "ENABLED", "variants": []}}}),
            "flag `f` at /flags/f/variants: `variants` must be an object, found an array",
        ),
        (
            json!({"flags": [{"state": "ENABLED", "variants": {"a": 1}}]}),
            "at /flags/0: a flag in the `flags` array needs a non-empty string `key`",
        ),
        (
            json!({"flags": {"a/b": {"state": "ENABLED", "variants": {"a": 1}, "metadata": 7}}}),
            "flag `a/b` at /flags/a~1b/metadata: flag metadata must be an object, found a number",
        ),
    ];
    for (doc, expected) in cases {
        let err = parse::parse_value(&doc, Strictness::Flagd).unwrap_err();
        let messages = errors(&err);
        assert!(messages.iter().any(|m| m.ends_with(expected)), "{doc}: {messages:?}");
    }
}

#[test]
fn syntax_errors_say_where() {
    let err = parse::parse_str("{\"flags\": {\n  \"a\": }", Format::Json, Strictness::Flagd).unwrap_err();
    assert!(errors(&err)[0].contains("line 2"), "{err}");
    let err = parse::parse_str("flags: [unclosed", Format::Yaml, Strictness::Flagd).unwrap_err();
    assert!(errors(&err)[0].contains("not valid YAML"), "{err}");
}

#[test]
fn duplicate_keys_in_a_flag_array_keep_the_last() {
    let parsed = parse_json(json!({"flags": [
        {"key": "a", "state": "ENABLED", "variants": {"x": 1}, "defaultVariant": "x"},
        {"key": "a", "state": "DISABLED", "variants": {"x": 2}, "defaultVariant": "x"}
    ]}));
    assert_eq!(parsed.config.flags.len(), 1);
    assert_eq!(parsed.config.flags[0].state, FlagState::Disabled);
    assert!(parsed.warnings.iter().any(|w| w.message.contains("duplicate")));
}

#[test]
fn schema_warnings_point_at_the_real_problem() {
    // A number flag with an unknown operator: the warning is about the targeting, not about the
    // variants not being booleans (the first of the four flag types the schema tries).
    let parsed = parse_json(
        json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"nope": [1]}}}}),
    );
    let pointers: Vec<&str> = parsed.warnings.iter().map(|w| w.pointer.as_str()).collect();
    assert_eq!(pointers, ["/flags/f/targeting"], "{:?}", parsed.warnings);
    // A bad state on a flag in an array: reported on the flag, not as "not an object".
    let parsed =
        parse_json(json!({"flags": [{"key": "k", "state": "ON", "variants": {"a": true}, "defaultVariant": "a"}]}));
    assert_eq!(parsed.warnings[0].pointer, "/flags/0/state", "{:?}", parsed.warnings);
    assert_eq!(parsed.warnings[0].flag.as_deref(), Some("k"));
}

#[test]
fn rules_are_kept_as_canonical_compact_json() {
    let a = parse_json(
        json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
        "targeting": {"if": [{"==": [{"var": "x"}, 1]}, "a", null]}}}}),
    );
    let text = a.config.flags[0].targeting.as_ref().unwrap();
    assert_eq!(text.as_str(), r#"{"if":[{"==":[{"var":"x"},1]},"a",null]}"#);
    // Key order and whitespace in the source do not change the rule's text.
    let b = parse::parse_str(
        "{\"flags\": {\"f\": {\"targeting\": {\"if\": [{\"==\": [{\"var\": \"x\"}, 1]}, \"a\", null]},\n \"variants\": {\"a\": 1}, \"state\": \"ENABLED\", \"defaultVariant\": \"a\"}}}",
        Format::Json,
        Strictness::Flagd,
    )
    .unwrap();
    assert_eq!(a.config.flags, b.config.flags);
}

/// Found by fuzzing: refs that name an evaluator twice at every level expanded exponentially (a
/// 153-byte document took more than 2 GB). The expansion is now bounded, reported, and the flag
/// evaluates as a parse error.
#[test]
fn exponentially_expanding_refs_are_bounded_and_reported() {
    let cycle = json!({
        "$evaluators": {"a": [{"$ref": "a"}, {"$ref": "a"}]},
        "flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "targeting": {"$ref": "a"}}}
    });
    let mut evaluators = serde_json::Map::new();
    evaluators.insert("e0".into(), json!({"var": "x"}));
    for i in 1..40 {
        let prev = format!("e{}", i - 1);
        evaluators.insert(format!("e{i}"), json!({"or": [{"$ref": prev}, {"$ref": prev}]}));
    }
    let chain = json!({
        "$evaluators": evaluators,
        "flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "targeting": {"$ref": "e39"}}}
    });
    for doc in [cycle, chain] {
        let started = std::time::Instant::now();
        let parsed = parse_json(doc);
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        let rule = parsed.config.flags[0].targeting.as_ref().unwrap();
        assert!(rule.as_str().len() < 64 << 20, "{} bytes", rule.as_str().len());
        let refs: Vec<&str> = parsed
            .warnings
            .iter()
            .filter(|w| w.message.contains("unknown evaluator"))
            .map(|w| w.message.as_str())
            .collect();
        assert!(
            refs.len() <= 80,
            "each failure is reported once per evaluator: {refs:?}"
        );
        assert!(refs.iter().any(|m| m.contains("expand to more than")), "{refs:?}");
    }
}

/// Found by fuzzing: refs inlined into refs nested a rule deeper than the JSON parser reads back
/// (128 levels), so the rule kept as text silently became `null` (the flag evaluated to its default
/// instead of failing). Such a ref is now left in place and reported: the flag is a parse error.
#[test]
fn refs_that_would_nest_a_rule_too_deeply_are_left_in_place() {
    let mut evaluators = serde_json::Map::new();
    for i in 0..20 {
        let mut rule = if i < 19 {
            json!({"$ref": format!("d{}", i + 1)})
        } else {
            json!({"var": "x"})
        };
        for _ in 0..5 {
            rule = json!({"!": [rule]});
        }
        evaluators.insert(format!("d{i}"), rule);
    }
    let parsed = parse_json(json!({
        "$evaluators": evaluators,
        "flags": {"f": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on",
                        "targeting": {"if": [{"$ref": "d0"}, "off", "off"]}}}
    }));
    let rule = parsed.config.flags[0].targeting.as_ref().unwrap();
    let reparsed: Value = serde_json::from_str(rule.as_str()).expect("the rule kept parses back");
    assert_ne!(reparsed, Value::Null);
    assert!(rule.as_str().contains("$ref"), "{}", rule.as_str());
    assert!(
        parsed.warnings.iter().any(|w| w.message.contains("deeper than")),
        "{:?}",
        parsed.warnings
    );
    // Shallow chains still inline completely.
    let parsed = parse_json(json!({
        "$evaluators": {"a": {"!": [{"$ref": "b"}]}, "b": {"!": [{"var": "x"}]}},
        "flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "targeting": {"$ref": "a"}}}
    }));
    assert_eq!(
        parsed.config.flags[0].targeting.as_ref().unwrap().to_value(),
        json!({"!": [{"!": [{"var": "x"}]}]})
    );
    assert!(
        parsed.warnings.iter().all(|w| !w.message.contains("unknown evaluator")),
        "{:?}",
        parsed.warnings
    );
}

/// Found by fuzzing: the YAML parser's time is quadratic in flow nesting (`{"a":` × 100k took
/// minutes); such a document is now rejected at once with a clear error.
#[test]
fn deeply_nested_yaml_flow_collections_are_rejected_quickly() {
    let started = std::time::Instant::now();
    let text = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    let err = parse::parse_str(&text, Format::Yaml, Strictness::Flagd).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(err.to_string().contains("nest more than"), "{err}");
    // Ordinary nesting still parses, and still fails past the YAML parser's own limit.
    assert!(
        parse::parse_str(
            "flags: {a: {state: ENABLED, variants: {x: [[[1]]]}, defaultVariant: x}}",
            Format::Yaml,
            Strictness::Flagd
        )
        .is_ok()
    );
    let deep = format!("flags: {}{}", "[".repeat(500), "]".repeat(500));
    assert!(parse::parse_str(&deep, Format::Yaml, Strictness::Flagd).is_err());
}
