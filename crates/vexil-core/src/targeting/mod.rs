//! Targeting rules: JsonLogic (datalogic-rs) with flagd's custom operators, compiled once per
//! snapshot and evaluated against a request context in a per-thread arena.
//!
//! The evaluation context seen by a rule is the request's context with `$flagd` set to
//! `{"flagKey": <key>, "timestamp": <unix seconds>}` (replacing any `$flagd` the caller sent). The
//! rule's result picks the variant as flagd does: `null` → the default variant; otherwise the
//! result's JSON text with every `"` removed is the variant name (`true` → `"true"`, `1` → `"1"`).

pub(crate) mod cbor;
pub mod fractional;
mod semver;
mod strings;

use std::cell::RefCell;
use std::fmt::Write as _;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::bumpalo::collections::Vec as BumpVec;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::{DataValue, Logic};
use serde_json::Value;

use crate::context::{Attributes, Object};

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
        let logic = self.inner.compile(rule).map_err(|e| e.to_string())?;
        Ok(Rule {
            logic,
            reads: reads(rule),
        })
    }
}

/// A compiled targeting rule, with the context keys it can read.
#[derive(Debug)]
pub struct Rule {
    logic: Logic,
    /// The top-level context keys the rule can read (sorted, `None`: any), so only those are
    /// written into the arena. `$flagd` is always there.
    reads: Option<Box<[Box<str>]>>,
}

impl Rule {
    /// The top-level context keys the rule can read; `None` when that is not known (the rule reads
    /// the whole context, a computed path, or an operator not analysed).
    pub fn reads(&self) -> Option<&[Box<str>]> {
        self.reads.as_deref()
    }
}

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

impl Prepared<'_> {
    /// The context's top-level `key` when it is a non-empty string (e.g. the `targetingKey`).
    pub fn string(&self, key: &str) -> Option<&str> {
        let i = self.entries.binary_search_by(|e| e.0.cmp(key)).ok()?;
        match self.entries[i].1 {
            DataValue::String(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }
}

/// Writes `attributes` into this thread's evaluation arena and runs `f` with the result.
/// Re-entrant: a call inside `f` finds the thread's arena in use and gets an arena of its own.
pub fn with_context<R>(attributes: &dyn Attributes, now: i64, f: impl FnOnce(&Prepared<'_>) -> R) -> R {
    with_context_reading(attributes, None, now, f)
}

/// [`with_context`] writing only the top-level keys in `reads` (sorted; `None`: every key): what
/// one rule can read ([`Rule::reads`]).
pub fn with_context_reading<R>(
    attributes: &dyn Attributes,
    reads: Option<&[Box<str>]>,
    now: i64,
    f: impl FnOnce(&Prepared<'_>) -> R,
) -> R {
    ARENA.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bump) => {
            bump.reset();
            prepare(&bump, attributes, reads, now, f)
        }
        Err(_) => prepare(&Bump::new(), attributes, reads, now, f),
    })
}

fn prepare<'a, R>(
    arena: &'a Bump,
    attributes: &'a dyn Attributes,
    reads: Option<&'a [Box<str>]>,
    now: i64,
    f: impl FnOnce(&Prepared<'_>) -> R,
) -> R {
    let mut root = Object::new(arena, 8);
    root.wanted = reads;
    attributes.write(&mut root);
    let mut entries = root.into_entries();
    // `$flagd` is the server's, appended per flag: drop any the caller sent.
    if let Ok(i) = entries.binary_search_by(|e| e.0.cmp("$flagd")) {
        let mut kept = BumpVec::with_capacity_in(entries.len() - 1, arena);
        kept.extend_from_slice_copy(&entries[..i]);
        kept.extend_from_slice_copy(&entries[i + 1..]);
        entries = kept.into_bump_slice();
    }
    f(&Prepared { arena, entries, now })
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
    run(engine, rule, flag_key, prepared, |result| {
        select_variant(result, variants)
    })
    .unwrap_or_else(Outcome::Failed)
}

/// Runs `rule` for flag `flag_key` against a prepared context, with `$flagd` appended, and reads
/// the result with `read`.
fn run<R>(
    engine: &Engine,
    rule: &Rule,
    flag_key: &str,
    prepared: &Prepared<'_>,
    read: impl FnOnce(&DataValue<'_>) -> R,
) -> Result<R, String> {
    let arena = prepared.arena;
    let flagd = arena.alloc_slice_copy(&[
        ("flagKey", DataValue::String(flag_key)),
        ("timestamp", DataValue::Number(NumberValue::Integer(prepared.now))),
    ]);
    let mut entries = BumpVec::with_capacity_in(prepared.entries.len() + 1, arena);
    entries.extend_from_slice_copy(prepared.entries);
    entries.push(("$flagd", DataValue::Object(flagd)));
    let root: &DataValue<'_> = arena.alloc(DataValue::Object(entries.into_bump_slice()));
    match engine.inner.evaluate(&rule.logic, root, arena) {
        Ok(result) => Ok(read(result)),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `rule` (as for flag `flag_key`) against a prepared context: whether its result is truthy
/// (JsonLogic's truthiness); an engine failure is the error.
pub(crate) fn matches(engine: &Engine, rule: &Rule, flag_key: &str, prepared: &Prepared<'_>) -> Result<bool, String> {
    run(engine, rule, flag_key, prepared, |result| engine.inner.truthy(result))
}

/// The top-level context keys `rule` can read, or `None` when that is not known.
///
/// Only operators whose data access is known are analysed: `var` with a literal path (its first
/// segment and the whole path, both kept), `missing`/`missing_some` with literal keys,
/// `fractional` (the `targetingKey`), and operators that only evaluate their arguments. Anything
/// else (the whole context, a computed or escaped path, `val`, an operator not listed) reads
/// every key. Keys read inside `map`/`filter`/… from the current item are kept as well: a
/// superset is harmless.
fn reads(rule: &Value) -> Option<Box<[Box<str>]>> {
    let mut keys = Vec::new();
    if !collect_reads(rule, &mut keys) {
        return None;
    }
    keys.sort_unstable();
    keys.dedup();
    Some(keys.into_iter().map(String::into_boxed_str).collect())
}

fn collect_reads(rule: &Value, keys: &mut Vec<String>) -> bool {
    let map = match rule {
        Value::Array(items) => return items.iter().all(|item| collect_reads(item, keys)),
        Value::Object(map) => map,
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => return true,
    };
    let mut entries = map.iter();
    let (Some((op, args)), None) = (entries.next(), entries.next()) else {
        return false;
    };
    match op.as_str() {
        "var" => match args {
            Value::Array(items) => match items.as_slice() {
                [path] => read_path(path, keys),
                [path, default] => read_path(path, keys) && collect_reads(default, keys),
                _ => false,
            },
            path => read_path(path, keys),
        },
        "missing" => match args {
            Value::Array(items) => items.iter().all(|path| read_path(path, keys)),
            path => read_path(path, keys),
        },
        "missing_some" => match args {
            Value::Array(items) => match items.as_slice() {
                [Value::Number(_), Value::Array(paths)] => paths.iter().all(|path| read_path(path, keys)),
                _ => false,
            },
            _ => false,
        },
        "fractional" => {
            keys.push("targetingKey".to_owned());
            collect_reads(args, keys)
        }
        "==" | "===" | "!=" | "!==" | ">" | ">=" | "<" | "<=" | "!" | "!!" | "and" | "or" | "if" | "?:" | "+" | "-"
        | "*" | "/" | "%" | "max" | "min" | "cat" | "substr" | "in" | "merge" | "map" | "filter" | "reduce" | "all"
        | "some" | "none" | "starts_with" | "ends_with" | "sem_ver" => collect_reads(args, keys),
        _ => false,
    }
}

/// A literal `var` path: its first segment and the whole path (a key may itself hold a dot).
fn read_path(path: &Value, keys: &mut Vec<String>) -> bool {
    let path = match path {
        Value::String(s) if !s.is_empty() && !s.contains('\\') => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return false,
    };
    if let Some((top, _)) = path.split_once('.') {
        keys.push(top.to_owned());
    }
    keys.push(path);
    true
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
                Ok(rule) => with_context(&(), 0, |p| evaluate(&engine, &rule, "f", &variants(&["a"]), p)),
            };
            assert!(matches!(outcome, Outcome::Failed(_)), "{rule}: {outcome:?}");
        }
    }

    #[test]
    fn a_rule_reads_the_keys_its_literal_paths_name() {
        let engine = Engine::new(FractionalMode::V3);
        let reads = |rule: Value| {
            let rule = engine.compile(&rule).expect("rule compiles");
            rule.reads()
                .map(|keys| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>())
        };
        let keys = |k: &[&str]| Some(k.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            reads(
                json!({"if": [{"in": ["@x.com", {"var": "email"}]}, "a", {"==": [{"var": "plan"}, "e"]}, "b", null]})
            ),
            keys(&["email", "plan"])
        );
        assert_eq!(reads(json!({"var": "user.tier"})), keys(&["user", "user.tier"]));
        assert_eq!(reads(json!({"var": ["a", {"var": "b"}]})), keys(&["a", "b"]));
        assert_eq!(
            reads(json!({"fractional": [["x", 50], ["y", 50]]})),
            keys(&["targetingKey"])
        );
        assert_eq!(
            reads(json!({"fractional": [{"var": "org"}, ["x", 50], ["y", 50]]})),
            keys(&["org", "targetingKey"])
        );
        assert_eq!(reads(json!({"missing_some": [1, ["a", "b"]]})), keys(&["a", "b"]));
        assert_eq!(reads(json!("on")), keys(&[]));
        // Anything not known reads everything.
        for rule in [
            json!({"var": ""}),
            json!({"var": {"cat": ["a", "b"]}}),
            json!({"var": "a\\.b"}),
            json!({"val": "a"}),
            json!({"if": [{"missing": {"var": "list"}}, "a", "b"]}),
            json!({"==": [{"length": {"var": "a"}}, 1]}),
        ] {
            assert_eq!(reads(rule.clone()), None, "{rule}");
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
