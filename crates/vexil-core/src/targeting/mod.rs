//! Targeting rules: JsonLogic (datalogic-rs) with flagd's custom operators, compiled once per
//! snapshot and evaluated against a request context in a per-thread arena.
//!
//! The evaluation context seen by a rule is the request's context with `$flagd` set to
//! `{"flagKey": <key>, "timestamp": <unix seconds>}` (replacing any `$flagd` the caller sent). The
//! rule's result picks the variant as flagd does: `null` → the default variant; otherwise the
//! result's JSON text with every `"` removed is the variant name (`true` → `"true"`, `1` → `"1"`).

mod cbor;
pub mod fractional;
mod semver;
mod strings;

use std::cell::RefCell;
use std::fmt::Write as _;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::bumpalo::collections::Vec as BumpVec;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::{DataValue, Logic};
use serde_json::{Map, Value};

pub use fractional::FractionalMode;

/// The rule engine: datalogic-rs with `fractional` (in one [`FractionalMode`]), `sem_ver`,
/// `starts_with` and `ends_with`.
pub struct Engine {
    inner: datalogic_rs::Engine,
    mode: FractionalMode,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("fractional", &self.mode).finish()
    }
}

impl Engine {
    /// An engine whose `fractional` follows `mode`.
    pub fn new(mode: FractionalMode) -> Engine {
        let inner = datalogic_rs::Engine::builder()
            .add_operator("fractional", fractional::Fractional(mode))
            .add_operator("sem_ver", semver::SemVer)
            .add_operator("starts_with", strings::Affix::Prefix)
            .add_operator("ends_with", strings::Affix::Suffix)
            .build();
        Engine { inner, mode }
    }

    /// The `fractional` generation this engine evaluates.
    pub fn fractional_mode(&self) -> FractionalMode {
        self.mode
    }

    /// Compiles a targeting rule. Fails on what JsonLogic cannot run (an unknown operator, a
    /// malformed one); flagd reports such a flag as a parse error when it is evaluated.
    pub fn compile(&self, rule: &Value) -> Result<Rule, String> {
        self.inner.compile(rule).map(Rule).map_err(|e| e.to_string())
    }
}

/// A compiled targeting rule.
#[derive(Debug)]
pub struct Rule(Logic);

/// What a rule chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The index of the variant named by the result.
    Variant(usize),
    /// The result was `null`: the default variant applies.
    Null,
    /// The result named no variant (the name is kept for the message).
    UnknownVariant(String),
    /// The engine failed (flagd: parse error).
    Failed(String),
}

thread_local! {
    /// The evaluation arena, reset before each use and reused for the life of the thread.
    static ARENA: RefCell<Bump> = RefCell::new(Bump::new());
}

/// A request's context converted once into the evaluation arena, ready for any number of rules
/// (a bulk evaluation converts the context once, not once per flag).
pub struct Prepared<'a> {
    arena: &'a Bump,
    /// The context's entries, without any `$flagd` the caller sent; `$flagd` is appended per flag.
    entries: &'a [(&'a str, DataValue<'a>)],
    now: i64,
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("attributes", &self.entries.len())
            .field("now", &self.now)
            .finish()
    }
}

/// Converts `context` into this thread's evaluation arena and runs `f` with it. Re-entrant: a call
/// inside `f` finds the thread's arena in use and gets an arena of its own.
pub fn with_context<R>(context: &Map<String, Value>, now: i64, f: impl FnOnce(&Prepared<'_>) -> R) -> R {
    ARENA.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bump) => {
            bump.reset();
            prepare(&bump, context, now, f)
        }
        Err(_) => prepare(&Bump::new(), context, now, f),
    })
}

fn prepare<R>(arena: &Bump, context: &Map<String, Value>, now: i64, f: impl FnOnce(&Prepared<'_>) -> R) -> R {
    let mut entries = BumpVec::with_capacity_in(context.len() + 1, arena);
    for (k, v) in context {
        if k != "$flagd" {
            entries.push((k.as_str(), data_value(v, arena)));
        }
    }
    f(&Prepared {
        arena,
        entries: entries.into_bump_slice(),
        now,
    })
}

/// Runs `rule` for flag `flag_key` against a prepared context and maps the result to one of
/// `variants`.
pub(crate) fn evaluate(
    engine: &Engine,
    rule: &Rule,
    flag_key: &str,
    variants: &[(String, Value)],
    prepared: &Prepared<'_>,
) -> Outcome {
    let arena = prepared.arena;
    let flagd = arena.alloc_slice_copy(&[
        ("flagKey", DataValue::String(flag_key)),
        ("timestamp", DataValue::Number(NumberValue::Integer(prepared.now))),
    ]);
    let mut entries = BumpVec::with_capacity_in(prepared.entries.len() + 1, arena);
    entries.extend_from_slice_copy(prepared.entries);
    entries.push(("$flagd", DataValue::Object(flagd)));
    let root: &DataValue<'_> = arena.alloc(DataValue::Object(entries.into_bump_slice()));
    match engine.inner.evaluate(&rule.0, root, arena) {
        Ok(result) => select_variant(result, variants),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Borrows a JSON value into the arena (strings are not copied).
///
/// Inlined so scalars are written in place: returning a `DataValue` through a call made the caller
/// stall on store forwarding (measured with `perf annotate`), which cost more than the rest of the
/// conversion.
#[inline(always)]
pub(crate) fn data_value<'a>(value: &'a Value, arena: &'a Bump) -> DataValue<'a> {
    match value {
        Value::Null => DataValue::Null,
        Value::Bool(b) => DataValue::Bool(*b),
        Value::Number(n) => DataValue::Number(match n.as_i64() {
            Some(i) => NumberValue::Integer(i),
            None => NumberValue::from_f64(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(s) => DataValue::String(s),
        Value::Array(items) => DataValue::Array(array_value(items, arena)),
        Value::Object(map) => DataValue::Object(object_value(map, arena)),
    }
}

#[inline(never)]
fn array_value<'a>(items: &'a [Value], arena: &'a Bump) -> &'a [DataValue<'a>] {
    let mut out = BumpVec::with_capacity_in(items.len(), arena);
    for item in items {
        out.push(data_value(item, arena));
    }
    out.into_bump_slice()
}

#[inline(never)]
fn object_value<'a>(map: &'a Map<String, Value>, arena: &'a Bump) -> &'a [(&'a str, DataValue<'a>)] {
    let mut out = BumpVec::with_capacity_in(map.len(), arena);
    for (k, v) in map {
        out.push((k.as_str(), data_value(v, arena)));
    }
    out.into_bump_slice()
}

/// flagd's variant selection from a rule result (`json.go` `evaluateVariant`).
fn select_variant(result: &DataValue<'_>, variants: &[(String, Value)]) -> Outcome {
    let find = |name: &str| variants.iter().position(|(n, _)| n == name);
    let found = match result {
        DataValue::Null => return Outcome::Null,
        DataValue::String(s) if !needs_escape(s) => find(s).ok_or_else(|| (*s).to_owned()),
        DataValue::Bool(true) => find("true").ok_or_else(|| "true".to_owned()),
        DataValue::Bool(false) => find("false").ok_or_else(|| "false".to_owned()),
        other => {
            let mut text = String::new();
            go_json(other, &mut text);
            text.retain(|c| c != '"');
            find(&text).ok_or(text)
        }
    };
    match found {
        Ok(index) => Outcome::Variant(index),
        Err(name) => Outcome::UnknownVariant(name),
    }
}

/// Whether Go's JSON encoder would escape something in `s` (so the variant name differs from `s`).
fn needs_escape(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c, '"' | '\\' | '<' | '>' | '&' | '\u{2028}' | '\u{2029}') || c < ' ')
}

/// Go's `json.Marshal` of a value as flagd's JsonLogic engine writes a result: object keys sorted,
/// numbers as float64, HTML characters escaped.
fn go_json(value: &DataValue<'_>, out: &mut String) {
    match value {
        DataValue::Null => out.push_str("null"),
        DataValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        DataValue::Number(n) => go_float(n.as_f64(), out),
        DataValue::String(s) => go_string(s, out),
        DataValue::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_json(item, out);
            }
            out.push(']');
        }
        DataValue::Object(entries) => {
            let mut sorted: Vec<&(&str, DataValue<'_>)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            sorted.dedup_by(|a, b| a.0 == b.0);
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(k, out);
                out.push(':');
                go_json(v, out);
            }
            out.push('}');
        }
        #[allow(unreachable_patterns)]
        _ => out.push_str("null"),
    }
}

fn go_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Go's `encoding/json` float64 format: plain decimal in [1e-6, 1e21), otherwise exponent form
/// with a signed, unpadded exponent (`1e+21`, `1e-7`).
pub(crate) fn go_float(f: f64, out: &mut String) {
    let magnitude = f.abs();
    if magnitude == 0.0 || (1e-6..1e21).contains(&magnitude) {
        let _ = write!(out, "{f}");
        return;
    }
    let text = format!("{f:e}");
    match text.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => {
            let _ = write!(out, "{mantissa}e+{exp}");
        }
        _ => out.push_str(&text),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn variants(names: &[&str]) -> Vec<(String, Value)> {
        names.iter().map(|n| ((*n).to_owned(), json!(n))).collect()
    }

    fn run(rule: Value, context: Value, names: &[&str]) -> Outcome {
        let engine = Engine::new(FractionalMode::V3);
        let rule = engine.compile(&rule).expect("rule compiles");
        let context = context.as_object().cloned().unwrap_or_default();
        with_context(&context, 1_700_000_000, |p| {
            evaluate(&engine, &rule, "my-flag", &variants(names), p)
        })
    }

    #[test]
    fn an_evaluation_inside_another_gets_its_own_arena() {
        let engine = Engine::new(FractionalMode::V3);
        let rule = engine
            .compile(&json!({"if": [{"==": [{"var": "who"}, "inner"]}, "b", "a"]}))
            .unwrap();
        let outer = json!({"who": "outer"}).as_object().cloned().unwrap();
        let inner = json!({"who": "inner"}).as_object().cloned().unwrap();
        let names = variants(&["a", "b"]);
        let (nested, after) = with_context(&outer, 0, |p| {
            let nested = with_context(&inner, 0, |q| evaluate(&engine, &rule, "f", &names, q));
            // The outer context is untouched by the nested evaluation.
            (nested, evaluate(&engine, &rule, "f", &names, p))
        });
        assert_eq!(nested, Outcome::Variant(1));
        assert_eq!(after, Outcome::Variant(0));
    }

    #[test]
    fn results_name_variants_as_flagd_does() {
        assert_eq!(
            run(json!({"if": [true, "b", "a"]}), json!({}), &["a", "b"]),
            Outcome::Variant(1)
        );
        assert_eq!(
            run(json!({"==": [1, 1]}), json!({}), &["false", "true"]),
            Outcome::Variant(1)
        );
        assert_eq!(run(json!({"+": [1, 1]}), json!({}), &["1", "2"]), Outcome::Variant(1));
        assert_eq!(run(json!({"/": [1, 2]}), json!({}), &["0.5"]), Outcome::Variant(0));
        assert_eq!(run(json!({"if": [true, null, "a"]}), json!({}), &["a"]), Outcome::Null);
        assert_eq!(
            run(json!({"if": [true, "three", "a"]}), json!({}), &["a"]),
            Outcome::UnknownVariant("three".into())
        );
    }

    #[test]
    fn flagd_properties_are_injected_and_win() {
        let rule = json!({"if": [{"==": [{"var": "$flagd.flagKey"}, "my-flag"]}, "yes", "no"]});
        assert_eq!(run(rule.clone(), json!({}), &["no", "yes"]), Outcome::Variant(1));
        assert_eq!(
            run(rule, json!({"$flagd": {"flagKey": "spoofed"}}), &["no", "yes"]),
            Outcome::Variant(1)
        );
        let ts = json!({"if": [{"==": [{"var": "$flagd.timestamp"}, 1_700_000_000]}, "yes", "no"]});
        assert_eq!(run(ts, json!({}), &["no", "yes"]), Outcome::Variant(1));
    }

    #[test]
    fn unknown_operators_fail() {
        let engine = Engine::new(FractionalMode::V3);
        for rule in [json!({"invalid": [1, 2]}), json!({"$ref": "nothing"})] {
            let outcome = match engine.compile(&rule) {
                Err(e) => Outcome::Failed(e),
                Ok(rule) => with_context(&Map::new(), 0, |p| evaluate(&engine, &rule, "f", &variants(&["a"]), p)),
            };
            assert!(matches!(outcome, Outcome::Failed(_)), "{rule}: {outcome:?}");
        }
    }

    #[test]
    fn go_float_format() {
        let f = |x: f64| {
            let mut s = String::new();
            go_float(x, &mut s);
            s
        };
        assert_eq!(f(1.0), "1");
        assert_eq!(f(0.5), "0.5");
        assert_eq!(f(1e21), "1e+21");
        assert_eq!(f(1e-7), "1e-7");
        assert_eq!(f(123456789.0), "123456789");
    }

    #[test]
    fn escaped_names_are_stripped_of_quotes_only() {
        assert_eq!(
            run(json!({"cat": ["a\"b"]}), json!({}), &["ab", "a\\b"]),
            Outcome::Variant(1)
        );
    }
}
