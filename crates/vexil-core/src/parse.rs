//! Parsing flagd flag definition documents (JSON or YAML) into [`FlagConfig`].
//!
//! The rules are flagd's (`core/pkg/evaluator/json.go`, `core/pkg/store/store.go`):
//! - `flags` is a map of key → flag, or (flagd daemon form) an array of flags carrying `key`;
//! - `$evaluators` are shared rules, inlined wherever a targeting rule contains `{"$ref": "name"}`;
//! - the top-level `metadata` is merged into every flag's metadata, the flag's own keys winning;
//! - `defaultVariant` may be absent or `null` (the caller's code default applies), but when it is a
//!   string it must name a variant, or the whole document is rejected;
//! - a schema violation is only a warning (flagd logs it and loads the document) unless the caller
//!   asks for [`Strictness::Strict`].
//!
//! Every diagnostic names the flag (when there is one) and the JSON pointer of the offending value.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::model::{Flag, FlagConfig, FlagState, Metadata, RuleText, ValueType};
use crate::schema::{self, Schema};

/// How deep `$ref`s may nest inside `$evaluators` before we call it a cycle.
const MAX_REF_DEPTH: usize = 32;

/// How many JSON values `$ref` inlining may copy into one document's rules in all. Refs that
/// refer to an evaluator more than once at each level expand exponentially (`a: [$ref b, $ref b]`,
/// `b: [$ref c, $ref c]`, …); past this budget the remaining refs are left in place and reported.
const MAX_INLINED_VALUES: usize = 250_000;

/// How deeply an inlined rule may nest: a rule is kept as JSON text and parsed back when it is
/// compiled or synced, and the JSON parser stops at 128 levels.
const MAX_RULE_DEPTH: usize = 120;

/// The text format of a flag document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON.
    Json,
    /// YAML (a superset of JSON).
    Yaml,
}

impl Format {
    /// The format a file name implies: `.yaml`/`.yml` are YAML, anything else JSON.
    pub fn from_path(path: &str) -> Format {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Format::Yaml
        } else {
            Format::Json
        }
    }
}

/// Whether schema violations reject the document (`Strict`) or are only reported (`Flagd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// flagd's behaviour: schema violations are warnings.
    Flagd,
    /// Every schema violation is an error (linting, the admin API).
    Strict,
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The document is loaded anyway.
    Warning,
    /// The document is rejected.
    Error,
}

/// One problem found in a flag document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The flag the problem is in, when it is in one.
    pub flag: Option<String>,
    /// JSON pointer of the offending value (`""` for the whole document).
    pub pointer: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        let at = if self.pointer.is_empty() { "/" } else { &self.pointer };
        match &self.flag {
            Some(flag) => write!(f, "{level}: flag `{flag}` at {at}: {}", self.message),
            None => write!(f, "{level}: at {at}: {}", self.message),
        }
    }
}

/// A document that could not be loaded: every error found (and the warnings beside them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid flag definition: {}", summary(.diagnostics))]
pub struct ParseError {
    /// Everything found, errors first.
    pub diagnostics: Vec<Diagnostic>,
}

fn summary(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A successfully parsed document and the warnings found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The flags, evaluators and set metadata.
    pub config: FlagConfig,
    /// Schema violations and other problems that did not stop loading.
    pub warnings: Vec<Diagnostic>,
}

/// Parses a flag document from text.
pub fn parse_str(text: &str, format: Format, strictness: Strictness) -> Result<Parsed, ParseError> {
    parse_value(&read_document(text, format)?, strictness)
}

/// Reads a document's text as JSON (YAML is read into the same JSON model), without checking it
/// as a flag document.
pub fn read_document(text: &str, format: Format) -> Result<Value, ParseError> {
    match format {
        Format::Json => {
            serde_json::from_str::<Value>(text).map_err(|e| single_error(None, "", format!("not valid JSON: {e}")))
        }
        Format::Yaml => {
            check_yaml_flow_depth(text)?;
            serde_yaml::from_str::<Value>(text).map_err(|e| single_error(None, "", format!("not valid YAML: {e}")))
        }
    }
}

/// How deeply `[` and `{` may nest in a YAML document. The YAML parser takes time quadratic in the
/// flow nesting depth (found by fuzzing: 600 kB of `{"a":` took minutes) before its own limit of
/// 128 levels applies, so deeper documents are rejected up front. Brackets are counted without
/// regard to quoting: only a document with hundreds of unclosed brackets in strings could be
/// rejected wrongly.
const MAX_YAML_FLOW_DEPTH: usize = 1000;

fn check_yaml_flow_depth(text: &str) -> Result<(), ParseError> {
    let (mut depth, mut line) = (0usize, 1usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' => line += 1,
            _ => continue,
        }
        if depth > MAX_YAML_FLOW_DEPTH {
            return Err(single_error(
                None,
                "",
                format!("not valid YAML: `[` and `{{` nest more than {MAX_YAML_FLOW_DEPTH} levels deep (line {line})"),
            ));
        }
    }
    Ok(())
}

/// Parses a flag document already read as JSON.
pub fn parse_value(document: &Value, strictness: Strictness) -> Result<Parsed, ParseError> {
    let mut out = Diagnostics {
        list: Vec::new(),
        strictness,
    };
    for v in schema::check(Schema::Flagd, document) {
        let flag = flag_of_pointer(document, &v.pointer);
        out.schema(flag, v.pointer, v.message);
    }
    let config = build_config(document, &mut out);
    let mut list = out.list;
    list.sort_by_key(|d| std::cmp::Reverse(d.severity));
    if list.iter().any(|d| d.severity == Severity::Error) {
        return Err(ParseError { diagnostics: list });
    }
    Ok(Parsed { config, warnings: list })
}

fn single_error(flag: Option<String>, pointer: &str, message: String) -> ParseError {
    ParseError {
        diagnostics: vec![Diagnostic {
            severity: Severity::Error,
            flag,
            pointer: pointer.into(),
            message,
        }],
    }
}

struct Diagnostics {
    list: Vec<Diagnostic>,
    strictness: Strictness,
}

impl Diagnostics {
    fn error(&mut self, flag: Option<&str>, pointer: String, message: String) {
        self.push(Severity::Error, flag, pointer, message);
    }

    /// A violation of the flagd schema that flagd itself tolerates.
    fn schema(&mut self, flag: Option<String>, pointer: String, message: String) {
        let severity = match self.strictness {
            Strictness::Flagd => Severity::Warning,
            Strictness::Strict => Severity::Error,
        };
        self.list.push(Diagnostic {
            severity,
            flag,
            pointer,
            message,
        });
    }

    fn push(&mut self, severity: Severity, flag: Option<&str>, pointer: String, message: String) {
        self.list.push(Diagnostic {
            severity,
            flag: flag.map(str::to_owned),
            pointer,
            message,
        });
    }
}

/// Escapes one JSON pointer reference token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn unescape_segment(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

/// The key of the flag a pointer points into, if any (`/flags/<key>/…` or `/flags/<index>/…`).
fn flag_of_pointer(document: &Value, pointer: &str) -> Option<String> {
    let mut parts = pointer.strip_prefix("/flags/")?.split('/');
    let first = unescape_segment(parts.next()?);
    match document.get("flags")? {
        Value::Object(_) => Some(first),
        Value::Array(items) => {
            let index: usize = first.parse().ok()?;
            let key = items.get(index)?.get("key")?.as_str()?;
            Some(key.to_owned())
        }
        _ => None,
    }
}

fn build_config(document: &Value, out: &mut Diagnostics) -> FlagConfig {
    let Some(root) = document.as_object() else {
        out.error(
            None,
            String::new(),
            format!("expected an object with `flags`, found {}", kind(document)),
        );
        return FlagConfig::default();
    };

    let metadata = match root.get("metadata") {
        None | Some(Value::Null) => Metadata::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            out.error(
                None,
                "/metadata".into(),
                format!("flag set metadata must be an object, found {}", kind(other)),
            );
            Metadata::new()
        }
    };

    let evaluators = match root.get("$evaluators") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            out.error(
                None,
                "/$evaluators".into(),
                format!("`$evaluators` must be an object, found {}", kind(other)),
            );
            Map::new()
        }
    };

    let mut flags: Vec<Arc<Flag>> = Vec::new();
    let mut budget = MAX_INLINED_VALUES;
    match root.get("flags") {
        // flagd loads a document without flags as an empty set (the schema check reports it).
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, raw) in map {
                let pointer = format!("/flags/{}", escape_pointer(key));
                if let Some(flag) = build_flag(key, raw, &pointer, &metadata, &evaluators, &mut budget, out) {
                    flags.push(Arc::new(flag));
                }
            }
        }
        Some(Value::Array(items)) => {
            for (index, raw) in items.iter().enumerate() {
                let pointer = format!("/flags/{index}");
                let Some(key) = raw.get("key").and_then(Value::as_str).filter(|k| !k.is_empty()) else {
                    out.error(
                        None,
                        pointer,
                        "a flag in the `flags` array needs a non-empty string `key`".into(),
                    );
                    continue;
                };
                if let Some(flag) = build_flag(key, raw, &pointer, &metadata, &evaluators, &mut budget, out) {
                    if let Some(previous) = flags.iter().position(|f| f.key == flag.key) {
                        out.push(
                            Severity::Warning,
                            Some(key),
                            pointer,
                            "duplicate flag key: this definition replaces the earlier one".into(),
                        );
                        flags.remove(previous);
                    }
                    flags.push(Arc::new(flag));
                }
            }
        }
        Some(other) => {
            out.error(
                None,
                "/flags".into(),
                format!("`flags` must be an object or an array, found {}", kind(other)),
            );
        }
    }

    if let Some(experiments) = root.get("$experiments") {
        attach_experiments(experiments, &mut flags, out);
    }

    FlagConfig {
        flags,
        metadata,
        evaluators,
    }
}

/// Reads Vexil's `$experiments` (experiment key → what evaluation needs of it) and attaches each
/// to its flag. An experiment must name a flag of the document and only its variants; a flag
/// takes at most one experiment.
///
/// ```json
/// "$experiments": {
///   "checkout-copy": {
///     "id": "x4f9c2a1b", "flag": "checkout-button", "status": "running",
///     "salt": "x4f9c2a1b", "traffic": 500000,
///     "weights": [{"variant": "control", "weight": 1}, {"variant": "bold", "weight": 1}],
///     "audience": {"==": [{"var": "country"}, "NL"]},
///     "layer": {"key": "checkout", "start": 0, "end": 500000},
///     "winner": null
///   }
/// }
/// ```
fn attach_experiments(experiments: &Value, flags: &mut [Arc<Flag>], out: &mut Diagnostics) {
    let Some(experiments) = experiments.as_object() else {
        if !experiments.is_null() {
            out.error(
                None,
                "/$experiments".into(),
                format!("`$experiments` must be an object, found {}", kind(experiments)),
            );
        }
        return;
    };
    for (key, raw) in experiments {
        let pointer = format!("/$experiments/{}", escape_pointer(key));
        match build_experiment(key, raw, flags) {
            Ok((index, experiment)) => {
                let flag = Arc::make_mut(&mut flags[index]);
                if let Some(other) = &flag.experiment {
                    out.error(
                        Some(&flag.key.clone()),
                        pointer,
                        format!(
                            "flag `{}` already has experiment `{}`: a flag takes one experiment at a time",
                            flag.key, other.key
                        ),
                    );
                    continue;
                }
                flag.experiment = Some(Arc::new(experiment));
            }
            Err((field, message)) => out.error(None, format!("{pointer}{field}"), message),
        }
    }
}

/// One `$experiments` entry and the index of its flag; on error the field (a pointer suffix) and why.
fn build_experiment(
    key: &str,
    raw: &Value,
    flags: &[Arc<Flag>],
) -> Result<(usize, crate::experiment::FlagExperiment), (String, String)> {
    use crate::experiment::{Allocation, FlagExperiment, LayerSlice, Phase};
    let fail = |field: &str, message: String| (field.to_owned(), message);
    let text = |field: &str| -> Result<&str, (String, String)> {
        raw.get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| fail(&format!("/{field}"), format!("`{field}` must be a string")))
    };
    let millionths = |value: Option<&Value>, field: &str| -> Result<u32, (String, String)> {
        value
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| fail(field, "must be a whole number of millionths".into()))
    };
    if !raw.is_object() {
        return Err(fail(
            "",
            format!("an experiment must be an object, found {}", kind(raw)),
        ));
    }
    let flag_key = text("flag")?;
    let index = flags
        .iter()
        .position(|f| f.key == flag_key)
        .ok_or_else(|| fail("/flag", format!("flag `{flag_key}` is not in this flag set")))?;
    let flag = &flags[index];
    let status = text("status")?;
    let phase =
        Phase::parse(status).ok_or_else(|| fail("/status", format!("`{status}` is not running, paused or stopped")))?;
    let traffic = millionths(raw.get("traffic"), "/traffic")?;
    let mut weights: Vec<(&str, u32)> = Vec::new();
    for (i, w) in raw
        .get("weights")
        .and_then(Value::as_array)
        .ok_or_else(|| fail("/weights", "`weights` must be an array".into()))?
        .iter()
        .enumerate()
    {
        let variant = w
            .get("variant")
            .and_then(Value::as_str)
            .ok_or_else(|| fail(&format!("/weights/{i}/variant"), "must be a string".into()))?;
        if flag.variant(variant).is_none() {
            return Err(fail(
                &format!("/weights/{i}/variant"),
                format!("`{variant}` is not a variant of flag `{flag_key}`"),
            ));
        }
        let weight = w
            .get("weight")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| fail(&format!("/weights/{i}/weight"), "must be a whole number".into()))?;
        weights.push((variant, weight));
    }
    let layer = match raw.get("layer") {
        None | Some(Value::Null) => None,
        Some(layer) => Some(LayerSlice {
            layer: layer
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| fail("/layer/key", "must be a string".into()))?
                .to_owned(),
            start: millionths(layer.get("start"), "/layer/start")?,
            end: millionths(layer.get("end"), "/layer/end")?,
        }),
    };
    let allocation = Allocation::new(text("salt")?, traffic, &weights, layer).map_err(|e| fail("", e.to_string()))?;
    let audience = match raw.get("audience") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(rule) => Some(RuleText::new(rule)),
    };
    let winner = match raw.get("winner") {
        None | Some(Value::Null) => None,
        Some(Value::String(w)) if flag.variant(w).is_some() => Some(w.clone()),
        Some(other) => {
            return Err(fail(
                "/winner",
                format!("the winner {other} is not a variant of flag `{flag_key}`"),
            ));
        }
    };
    Ok((
        index,
        FlagExperiment {
            id: text("id")?.to_owned(),
            key: key.to_owned(),
            phase,
            allocation,
            audience,
            winner,
        },
    ))
}

fn build_flag(
    key: &str,
    raw: &Value,
    pointer: &str,
    set_metadata: &Metadata,
    evaluators: &Map<String, Value>,
    budget: &mut usize,
    out: &mut Diagnostics,
) -> Option<Flag> {
    let errors_before = out.list.iter().filter(|d| d.severity == Severity::Error).count();
    let flag = Some(key);
    let Some(obj) = raw.as_object() else {
        out.error(
            flag,
            pointer.into(),
            format!("a flag must be an object, found {}", kind(raw)),
        );
        return None;
    };

    // flagd serves any state other than "DISABLED" (the schema check reports unknown values).
    let state = match obj.get("state") {
        Some(Value::String(s)) if s == "DISABLED" => FlagState::Disabled,
        Some(Value::String(_)) | None => FlagState::Enabled,
        Some(other) => {
            out.error(
                flag,
                format!("{pointer}/state"),
                format!("`state` must be a string, found {}", kind(other)),
            );
            FlagState::Enabled
        }
    };

    let variants: Vec<(String, Value)> = match obj.get("variants") {
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        None | Some(Value::Null) => Vec::new(),
        Some(other) => {
            out.error(
                flag,
                format!("{pointer}/variants"),
                format!("`variants` must be an object, found {}", kind(other)),
            );
            Vec::new()
        }
    };

    let default_variant = match obj.get("defaultVariant") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            if !variants.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
                out.error(
                    flag,
                    format!("{pointer}/defaultVariant"),
                    format!(
                        "default variant `{name}` is not one of the variants ({})",
                        known.join(", ")
                    ),
                );
            }
            Some(name.clone())
        }
        Some(other) => {
            out.error(
                flag,
                format!("{pointer}/defaultVariant"),
                format!("`defaultVariant` must be a string or null, found {}", kind(other)),
            );
            None
        }
    };

    check_variant_types(key, &variants, pointer, out);

    let targeting = match obj.get("targeting") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(rule) => {
            let mut rule = rule.clone();
            let mut unknown = Vec::new();
            inline_refs(&mut rule, evaluators, (0, 0), budget, &mut unknown);
            for name in unknown {
                out.push(
                    Severity::Warning,
                    flag,
                    format!("{pointer}/targeting"),
                    format!("`$ref` to unknown evaluator `{name}`: evaluating this flag is a parse error"),
                );
            }
            Some(RuleText::new(&rule))
        }
    };

    let mut metadata = set_metadata.clone();
    match obj.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(own)) => {
            for (k, v) in own {
                metadata.insert(k.clone(), v.clone());
            }
        }
        Some(other) => {
            out.error(
                flag,
                format!("{pointer}/metadata"),
                format!("flag metadata must be an object, found {}", kind(other)),
            );
        }
    }
    // flagd drops null metadata values when it reports them.
    metadata.retain(|_, v| !v.is_null());

    let errors_after = out.list.iter().filter(|d| d.severity == Severity::Error).count();
    (errors_after == errors_before).then(|| Flag {
        key: key.to_owned(),
        state,
        variants,
        default_variant,
        targeting,
        metadata,
        experiment: None,
    })
}

/// Reports variants whose values are not all of one type (a schema rule flagd only warns about).
fn check_variant_types(key: &str, variants: &[(String, Value)], pointer: &str, out: &mut Diagnostics) {
    let mut first: Option<(&str, ValueType)> = None;
    for (name, value) in variants {
        let Some(ty) = ValueType::of(value) else {
            continue;
        };
        match first {
            None => first = Some((name, ty)),
            Some((first_name, first_ty)) if first_ty != ty => {
                // The schema check reports this too; keep a clearer message beside it only in
                // strict mode, where it is an error the user must fix.
                if out.strictness == Strictness::Strict {
                    out.schema(
                        Some(key.to_owned()),
                        format!("{pointer}/variants/{}", escape_pointer(name)),
                        format!(
                            "variant `{name}` is a {} but variant `{first_name}` is a {}: all variants must have one type",
                            ty.name(),
                            first_ty.name()
                        ),
                    );
                }
                return;
            }
            Some(_) => {}
        }
    }
}

/// Replaces every `{"$ref": "<name>"}` object in `rule` with a copy of `$evaluators[name]`,
/// following refs inside evaluators up to [`MAX_REF_DEPTH`]. Unknown names are left in place (they
/// evaluate as an unknown operator, which flagd reports as a parse error) and collected, and so are
/// refs past the inlining budget or whose copy would nest the rule deeper than [`MAX_RULE_DEPTH`].
/// `at` is (ref nesting, JSON nesting of `rule` within the flag's rule). Returns how many arrays
/// and objects nest in `rule` once inlined (0 for a scalar).
fn inline_refs(
    rule: &mut Value,
    evaluators: &Map<String, Value>,
    at: (usize, usize),
    budget: &mut usize,
    unknown: &mut Vec<String>,
) -> usize {
    let (depth, level) = at;
    match rule {
        Value::Object(map) => {
            if map.len() == 1
                && let Some(Value::String(name)) = map.get("$ref")
            {
                match evaluators.get(name.as_str()) {
                    Some(target) if depth < MAX_REF_DEPTH => {
                        let size = values(target);
                        if size > *budget {
                            report(
                                unknown,
                                format!(
                                    "{name} (the document's `$ref`s expand to more than {MAX_INLINED_VALUES} values: is it recursive?)"
                                ),
                            );
                            *budget = 0;
                            return 1;
                        }
                        *budget -= size;
                        let mut target = target.clone();
                        let nested = inline_refs(&mut target, evaluators, (depth + 1, level), budget, unknown);
                        if level + nested > MAX_RULE_DEPTH {
                            report(
                                unknown,
                                format!("{name} (inlined, the rule would nest deeper than {MAX_RULE_DEPTH} levels)"),
                            );
                            return 1;
                        }
                        *rule = target;
                        return nested;
                    }
                    Some(_) => report(unknown, format!("{name} (nested too deeply: is it recursive?)")),
                    None => report(unknown, name.clone()),
                }
                return 1;
            }
            1 + map
                .values_mut()
                .map(|value| inline_refs(value, evaluators, (depth, level + 1), budget, unknown))
                .max()
                .unwrap_or(0)
        }
        Value::Array(items) => {
            1 + items
                .iter_mut()
                .map(|item| inline_refs(item, evaluators, (depth, level + 1), budget, unknown))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// Collects an unresolved ref once (a recursive evaluator fails the same way many times).
fn report(unknown: &mut Vec<String>, message: String) {
    if !unknown.contains(&message) {
        unknown.push(message);
    }
}

/// How many JSON values `value` holds (itself included).
fn values(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(values).sum::<usize>(),
        Value::Array(items) => 1 + items.iter().map(values).sum::<usize>(),
        _ => 1,
    }
}

/// A short name of a JSON value's type, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a document as strictly as the admin API and `vexil validate` do: every problem is an
/// error, those flagd would only warn about included (schema violations, a `$ref` to an unknown
/// evaluator), and so is a targeting rule that does not compile (which flagd would serve as
/// `PARSE_ERROR`). Every problem is reported, not only the first.
pub fn check_value(document: &Value, engine: &crate::targeting::Engine) -> Result<Parsed, ParseError> {
    let as_error = |d: &Diagnostic| Diagnostic {
        severity: Severity::Error,
        ..d.clone()
    };
    let parsed = parse_value(document, Strictness::Strict).map_err(|e| ParseError {
        diagnostics: e.diagnostics.iter().map(as_error).collect(),
    })?;
    let mut rejected: Vec<Diagnostic> = parsed.warnings.iter().map(as_error).collect();
    rejected.extend(parsed.config.flags.iter().filter_map(|flag| {
        let rule = flag.targeting.as_ref()?;
        let problem = engine.compile(&rule.to_value()).err()?;
        Some(Diagnostic {
            severity: Severity::Error,
            flag: Some(flag.key.clone()),
            pointer: format!("/flags/{}/targeting", escape_pointer(&flag.key)),
            message: format!("targeting does not compile: {problem}"),
        })
    }));
    rejected.extend(parsed.config.flags.iter().filter_map(|flag| {
        let experiment = flag.experiment.as_ref()?;
        let problem = engine.compile(&experiment.audience.as_ref()?.to_value()).err()?;
        Some(Diagnostic {
            severity: Severity::Error,
            flag: Some(flag.key.clone()),
            pointer: format!("/$experiments/{}/audience", escape_pointer(&experiment.key)),
            message: format!("the audience does not compile: {problem}"),
        })
    }));
    if rejected.is_empty() {
        Ok(parsed)
    } else {
        Err(ParseError { diagnostics: rejected })
    }
}
