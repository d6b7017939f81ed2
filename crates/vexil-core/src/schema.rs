//! The flagd JSON schemas (flagd-schemas 0.2.13, vendored under `schemas/`), compiled once.
//!
//! flagd validates every flag document against `flags.json`/`flagd.json` and only *warns* on
//! violations; [`crate::parse`] does the same unless asked to be strict.

use std::sync::LazyLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Registry, ValidationError, Validator};
use serde_json::Value;

const FLAGS_URI: &str = "https://flagd.dev/schema/v0/flags.json";
const FLAGD_URI: &str = "https://flagd.dev/schema/v0/flagd.json";
const TARGETING_URI: &str = "https://flagd.dev/schema/v0/targeting.json";

fn schema(text: &str) -> Value {
    serde_json::from_str(text).expect("vendored flagd schema is valid JSON")
}

static REGISTRY: LazyLock<Registry<'static>> = LazyLock::new(|| {
    Registry::new()
        .add(FLAGS_URI, schema(include_str!("../schemas/flags.json")))
        .and_then(|r| r.add(FLAGD_URI, schema(include_str!("../schemas/flagd.json"))))
        .and_then(|r| r.add(TARGETING_URI, schema(include_str!("../schemas/targeting.json"))))
        .and_then(|r| r.prepare())
        .expect("vendored flagd schemas form a valid registry")
});

fn validator(uri: &str) -> Validator {
    jsonschema::options()
        .offline()
        .with_registry(&REGISTRY)
        .build(&serde_json::json!({ "$ref": uri }))
        .expect("vendored flagd schema compiles")
}

/// Which of the flagd schemas to check a document against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `flags.json`: what providers accept (`flags` must be a map).
    Flags,
    /// `flagd.json`: what the flagd daemon accepts (`flags` may also be an array).
    Flagd,
    /// `targeting.json`: one targeting rule.
    Targeting,
}

static FLAGS: LazyLock<Validator> = LazyLock::new(|| validator(FLAGS_URI));
static FLAGD: LazyLock<Validator> = LazyLock::new(|| validator(FLAGD_URI));
static TARGETING: LazyLock<Validator> = LazyLock::new(|| validator(TARGETING_URI));

/// One schema violation: where in the document, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the document (`/flags/my-flag/state`).
    pub pointer: String,
    /// What the schema says.
    pub message: String,
}

/// Checks `document` against `schema`, returning every violation (empty when valid).
pub fn check(schema: Schema, document: &Value) -> Vec<Violation> {
    let validator: &Validator = match schema {
        Schema::Flags => &FLAGS,
        Schema::Flagd => &FLAGD,
        Schema::Targeting => &TARGETING,
    };
    let mut out = Vec::new();
    for error in validator.iter_errors(document) {
        explain(&error, &mut out);
    }
    out
}

/// Turns a schema error into the violations a user can act on: for a failed `oneOf`/`anyOf` (every
/// flag is a `oneOf` of four flag types) the errors of the alternative that matched furthest into
/// the document, fewest errors first, instead of "not valid under any of the schemas".
fn explain(error: &ValidationError<'_>, out: &mut Vec<Violation>) {
    let branches = match error.kind() {
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => Some(context),
        _ => None,
    };
    let here = error.instance_path().as_str();
    // An alternative that fails on the type of the value itself does not apply at all (an array
    // where a map of flags is expected); among the others, the one with the fewest errors, then the
    // one that got deepest into the document, is what the author meant.
    let applies = |b: &&Vec<ValidationError<'static>>| {
        !b.iter()
            .any(|e| matches!(e.kind(), ValidationErrorKind::Type { .. }) && e.instance_path().as_str() == here)
    };
    let rank = |b: &&Vec<ValidationError<'static>>| {
        let depth = b
            .iter()
            .map(|e| e.instance_path().as_str().matches('/').count())
            .max()
            .unwrap_or(0);
        (b.len(), std::cmp::Reverse(depth))
    };
    let best = branches.and_then(|branches| {
        let candidates: Vec<&Vec<ValidationError<'static>>> = branches.iter().filter(|b| !b.is_empty()).collect();
        let applicable: Vec<&Vec<ValidationError<'static>>> = candidates.iter().copied().filter(applies).collect();
        let pool = if applicable.is_empty() { candidates } else { applicable };
        pool.into_iter().min_by_key(rank)
    });
    match best {
        Some(branch) => branch.iter().for_each(|e| explain(e, out)),
        None => out.push(Violation {
            pointer: error.instance_path().to_string(),
            message: error.masked_with("value").to_string(),
        }),
    }
}
