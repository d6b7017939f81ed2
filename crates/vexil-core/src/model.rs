//! The flag model: flagd's flag definition, as parsed from a source document.
//!
//! These types are the *definition* of flags (what a file or the managed store holds). The compiled,
//! evaluation-ready form lives in [`crate::snapshot`].

use std::sync::Arc;

use serde_json::{Map, Value};

/// Flag metadata: string keys, string/number/boolean values (flagd's `metadata`).
///
/// A `BTreeMap`-backed JSON object, so iteration order is stable (sorted by key).
pub type Metadata = Map<String, Value>;

/// Whether a flag is served (`ENABLED`) or resolves with reason `DISABLED` (`DISABLED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlagState {
    /// `"ENABLED"`.
    Enabled,
    /// `"DISABLED"`.
    Disabled,
}

impl FlagState {
    /// The flagd spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FlagState::Enabled => "ENABLED",
            FlagState::Disabled => "DISABLED",
        }
    }
}

/// One flag as written in a flag definition document, after `$ref` substitution and with the flag
/// set's metadata merged into its own (the flag's keys win).
/// `Eq` so that comparing `Arc<Flag>`s (documents reloaded with most flags shared) short-cuts on
/// the pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// The flag key, unique within its flag set.
    pub key: String,
    /// `state`.
    pub state: FlagState,
    /// `variants`: variant name → value, in document order.
    pub variants: Vec<(String, Value)>,
    /// `defaultVariant`; `None` when absent or `null` (the caller's code default applies).
    pub default_variant: Option<String>,
    /// `targeting` with every `$ref` inlined; `None` when absent or `{}`.
    pub targeting: Option<RuleText>,
    /// Flag metadata merged over the flag set metadata.
    pub metadata: Metadata,
    /// The experiment attached to the flag (running, paused or stopped), from the document's
    /// `$experiments`.
    pub experiment: Option<Arc<crate::experiment::FlagExperiment>>,
}

impl Flag {
    /// The value of the named variant.
    pub fn variant(&self, name: &str) -> Option<&Value> {
        self.variants.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The flag set this flag belongs to: `metadata.flagSetId` when it is a string.
    pub fn flag_set_id(&self) -> Option<&str> {
        self.metadata.get("flagSetId").and_then(Value::as_str)
    }
}

/// A targeting rule kept as compact JSON text. A parsed JSON tree of a typical rule takes about ten
/// times the memory (every object is a `BTreeMap` node), and the rule is only needed parsed when it
/// is compiled or sent to an in-process provider. Equal rules have equal text: objects serialize
/// with sorted keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleText(Box<str>);

impl RuleText {
    /// The compact JSON text of `rule`.
    pub fn new(rule: &Value) -> RuleText {
        RuleText(rule.to_string().into_boxed_str())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The rule parsed back into JSON.
    pub fn to_value(&self) -> Value {
        // The text was serialized from a `Value`, so it always parses.
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

/// A parsed flag definition document (one file, one managed flag set): flagd's `flags`,
/// `$evaluators` and `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagConfig {
    /// The flags, in document order. Shared (`Arc`) with the snapshots compiled from them, so a
    /// snapshot rebuilt after another source changed copies no definitions.
    pub flags: Vec<Arc<Flag>>,
    /// The flag set metadata (`metadata` at the top level).
    pub metadata: Metadata,
    /// The shared rules (`$evaluators`), kept for export; already inlined into each flag's targeting.
    pub evaluators: Map<String, Value>,
}

/// The JSON type of a flag's variants, and the type a caller asks a flag to resolve as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// A JSON boolean.
    Boolean,
    /// A JSON string.
    String,
    /// A JSON number that is asked for as an integer (flagd truncates floats).
    Integer,
    /// A JSON number.
    Float,
    /// A JSON object.
    Object,
    /// Any JSON value (no type check): ResolveAll and OFREP.
    Any,
}

impl ValueType {
    /// The variant type of a JSON value, as the flagd schema names it.
    pub fn of(value: &Value) -> Option<ValueType> {
        match value {
            Value::Bool(_) => Some(ValueType::Boolean),
            Value::String(_) => Some(ValueType::String),
            Value::Number(_) => Some(ValueType::Float),
            Value::Object(_) => Some(ValueType::Object),
            Value::Null | Value::Array(_) => None,
        }
    }

    /// Whether `value` can be served to a caller asking for this type (flagd's type assertion:
    /// numbers are float64, so integer and float flags are interchangeable).
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            ValueType::Boolean => value.is_boolean(),
            ValueType::String => value.is_string(),
            ValueType::Integer | ValueType::Float => value.is_number(),
            ValueType::Object => value.is_object(),
            ValueType::Any => true,
        }
    }

    /// A lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Boolean => "boolean",
            ValueType::String => "string",
            ValueType::Integer => "integer",
            ValueType::Float => "float",
            ValueType::Object => "object",
            ValueType::Any => "any",
        }
    }
}
