//! The flagd JSON schemas (flagd-schemas 0.2.13, vendored under `schemas/`), compiled once.
//!
//! flagd validates every flag document against `flags.json`/`flagd.json` and only *warns* on
//! violations; [`crate::parse`] does the same unless asked to be strict.

use std::sync::LazyLock;

use jsonschema::{Registry, Validator};
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
    validator
        .iter_errors(document)
        .map(|e| Violation { pointer: e.instance_path().to_string(), message: e.to_string() })
        .collect()
}
