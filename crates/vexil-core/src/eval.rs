//! Evaluating one compiled flag: flagd's `evaluateVariant` + `resolve` (core/pkg/evaluator/json.go).
//!
//! 1. `state: DISABLED` → reason `DISABLED`, no value; targeting does not run.
//! 2. No targeting: the default variant (`STATIC`), or the caller's code default (`DEFAULT`, no
//!    value) when there is none.
//! 3. Targeting: `null` → the default variant (`DEFAULT`); a variant name → `TARGETING_MATCH`; a
//!    name that is not a variant → `ERROR`/`GENERAL`; an engine failure → `ERROR`/`PARSE_ERROR`.
//! 4. The value must have the requested type, or `ERROR`/`TYPE_MISMATCH`.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::context::Attributes;

use crate::experiment::{Assignment, FlagExperiment, Phase};
use crate::model::{Flag, FlagState, Metadata, ValueType};
use crate::targeting::{self, Engine, Outcome, Prepared, Rule};

/// Why a flag resolved the way it did (OpenFeature's resolution reasons that flagd reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No targeting: the default variant.
    Static,
    /// Targeting chose a variant.
    TargetingMatch,
    /// Targeting returned `null` (default variant), or there is no default variant at all (the
    /// caller's code default; then there is no value).
    Default,
    /// The flag is disabled; there is no value.
    Disabled,
    /// A running experiment allocated the variant.
    Split,
    /// The evaluation failed; see the error code.
    Error,
}

impl Reason {
    /// The OpenFeature spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Split => "SPLIT",
            Reason::Error => "ERROR",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an evaluation failed (OpenFeature error codes that flagd produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No flag with that key (for the selector).
    FlagNotFound,
    /// The flag's value is not of the requested type.
    TypeMismatch,
    /// The targeting rule could not be run.
    ParseError,
    /// Anything else, e.g. targeting named a variant that does not exist.
    General,
}

impl ErrorCode {
    /// The OpenFeature spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::General => "GENERAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed evaluation: the code and a message for logs and error details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    /// The OpenFeature error code.
    pub code: ErrorCode,
    /// What went wrong, lowercase, naming the flag.
    pub message: String,
}

/// The request side of an evaluation: the caller's context and the evaluation time.
#[derive(Clone, Copy)]
pub struct Context<'c> {
    /// The evaluation context (`targetingKey` and any attributes), written into the rules'
    /// arena only when a rule runs.
    pub attributes: &'c dyn Attributes,
    /// Unix seconds, exposed to rules as `$flagd.timestamp`.
    pub now: i64,
}

/// The result of evaluating one flag. Borrowed from the snapshot: building it allocates nothing
/// unless the evaluation failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'s> {
    /// Why.
    pub reason: Reason,
    /// The chosen variant; `None` when the caller's code default applies (disabled flag, no default
    /// variant) or on error.
    pub variant: Option<&'s str>,
    /// The chosen variant's value; `None` exactly when `variant` is.
    pub value: Option<&'s Value>,
    /// The flag's metadata (flag set metadata merged in); `None` when the flag does not exist.
    pub metadata: Option<&'s Metadata>,
    /// Set when `reason` is `Error`.
    pub error: Option<EvalError>,
    /// The experiment that allocated the variant and the unit it allocated, when `reason` is
    /// `Split` (an exposure).
    pub split: Option<Split<'s>>,
}

/// A unit's exposure to an experiment: which experiment, and the unit (the context's
/// `targetingKey`, copied out of the request).
#[derive(Debug, Clone, PartialEq)]
pub struct Split<'s> {
    /// The experiment.
    pub experiment: &'s FlagExperiment,
    /// The unit assigned.
    pub unit: Box<str>,
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("attributes", &crate::context::to_json(self.attributes))
            .field("now", &self.now)
            .finish()
    }
}

impl<'s> Resolution<'s> {
    /// A flag that does not exist.
    pub fn not_found(key: &str) -> Resolution<'s> {
        Resolution {
            reason: Reason::Error,
            variant: None,
            value: None,
            metadata: None,
            error: Some(EvalError {
                code: ErrorCode::FlagNotFound,
                message: format!("flag `{key}` not found"),
            }),
            split: None,
        }
    }

    /// The error code, when the evaluation failed.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    /// Whether the caller's code default applies without an error (disabled flag, or no default
    /// variant): flagd v2 and OFREP then leave value and variant out.
    pub fn is_code_default(&self) -> bool {
        self.error.is_none() && self.value.is_none()
    }
}

/// A flag ready to evaluate: its definition, the index of its default variant and its compiled
/// targeting rule.
#[derive(Debug)]
pub struct CompiledFlag {
    flag: Arc<Flag>,
    default_index: Option<usize>,
    targeting: Targeting,
    /// The attached experiment, ready to allocate.
    experiment: Option<CompiledExperiment>,
    /// The top-level context keys an evaluation can read (`None`: any).
    reads: Option<Box<[Box<str>]>>,
    /// [`crate::snapshot`]'s hash of the definition (part of the snapshot revision).
    hash: u64,
    /// See [`CompiledFlag::memo`].
    memo: OnceLock<Box<dyn Any + Send + Sync>>,
}

/// A flag's experiment with its audience compiled and the metadata its answers carry.
#[derive(Debug)]
struct CompiledExperiment {
    definition: Arc<FlagExperiment>,
    /// The audience rule; `Err`: it does not compile, and no unit is eligible.
    audience: Option<Result<Rule, String>>,
    /// Per flag variant (by index): the flag's metadata with the experiment's id, key and the
    /// variant, for `SPLIT` answers. Empty for variants the experiment does not allocate.
    split_metadata: Vec<Option<Metadata>>,
    /// The winner's index and the metadata served with it (paused or stopped experiments).
    winner: Option<(usize, Metadata)>,
}

impl CompiledExperiment {
    fn compile(flag: &Flag, definition: &Arc<FlagExperiment>, engine: &Engine) -> (CompiledExperiment, Option<String>) {
        let with = |extra: &[(&str, &str)]| {
            let mut metadata = flag.metadata.clone();
            metadata.insert("experimentId".into(), Value::from(definition.id.as_str()));
            metadata.insert("experimentKey".into(), Value::from(definition.key.as_str()));
            for (k, v) in extra {
                metadata.insert((*k).into(), Value::from(*v));
            }
            metadata
        };
        let split_metadata = flag
            .variants
            .iter()
            .map(|(name, _)| {
                definition
                    .allocation
                    .variants()
                    .any(|v| v == name)
                    .then(|| with(&[("experimentVariant", name)]))
            })
            .collect();
        let winner = definition.winner.as_deref().and_then(|w| {
            let index = flag.variants.iter().position(|(n, _)| n == w)?;
            Some((index, with(&[("experimentWinner", w)])))
        });
        let audience = definition
            .audience
            .as_ref()
            .map(|rule| engine.compile(&rule.to_value()));
        let problem = match &audience {
            Some(Err(e)) => Some(format!(
                "experiment `{}`: the audience does not compile: {e}",
                definition.key
            )),
            _ => None,
        };
        (
            CompiledExperiment {
                definition: definition.clone(),
                audience,
                split_metadata,
                winner,
            },
            problem,
        )
    }

    /// Whether evaluation needs the context for it (a running experiment reads the unit).
    fn reads_context(&self) -> bool {
        self.definition.phase == Phase::Running
    }
}

#[derive(Debug)]
enum Targeting {
    None,
    Rule(Rule),
    /// The rule did not compile: every evaluation is a parse error (as in flagd).
    Invalid(String),
}

impl CompiledFlag {
    /// Compiles `flag` with `engine`. A rule that does not compile is kept: evaluating the flag
    /// then reports `PARSE_ERROR`, as flagd does. The compile error is returned beside it so the
    /// loader can report it.
    pub fn compile(flag: Arc<Flag>, engine: &Engine) -> (CompiledFlag, Option<String>) {
        let default_index = flag
            .default_variant
            .as_deref()
            .and_then(|d| flag.variants.iter().position(|(n, _)| n == d));
        let (targeting, mut problem) = match &flag.targeting {
            None => (Targeting::None, None),
            Some(rule) => match engine.compile(&rule.to_value()) {
                Ok(rule) => (Targeting::Rule(rule), None),
                Err(e) => (Targeting::Invalid(e.clone()), Some(e)),
            },
        };
        let experiment = flag.experiment.as_ref().map(|definition| {
            let (compiled, trouble) = CompiledExperiment::compile(&flag, definition, engine);
            problem = problem.take().or(trouble);
            compiled
        });
        let reads = context_reads(&targeting, experiment.as_ref());
        let hash = crate::snapshot::flag_hash(&flag);
        (
            CompiledFlag {
                flag,
                default_index,
                targeting,
                experiment,
                reads,
                hash,
                memo: OnceLock::new(),
            },
            problem,
        )
    }

    /// The shared definition (to tell whether a reloaded source kept this very flag).
    pub(crate) fn definition(&self) -> &Arc<Flag> {
        &self.flag
    }

    /// Why the targeting rule did not compile, if it did not.
    pub(crate) fn problem(&self) -> Option<&str> {
        match &self.targeting {
            Targeting::Invalid(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn content_hash(&self) -> u64 {
        self.hash
    }

    /// The definition this flag was compiled from.
    pub fn flag(&self) -> &Flag {
        &self.flag
    }

    /// A value a wire encoder derives from the flag's definition (e.g. its variants pre-encoded
    /// in the wire format), computed by `init` on first use and kept for as long as the compiled
    /// flag lives. One slot per flag: the first type asked for holds it, and asking with another
    /// type returns `None` (the encoder then works from [`CompiledFlag::flag`]).
    pub fn memo<T: Any + Send + Sync>(&self, init: impl FnOnce(&Flag) -> T) -> Option<&T> {
        self.memo.get_or_init(|| Box::new(init(&self.flag))).downcast_ref()
    }

    /// The flag key.
    pub fn key(&self) -> &str {
        &self.flag.key
    }

    /// The type of the default variant's value (what flagd's ResolveAll resolves the flag as).
    pub fn default_type(&self) -> Option<ValueType> {
        self.default_index.and_then(|i| ValueType::of(&self.flag.variants[i].1))
    }

    /// Evaluates the flag for `context`, asking for a value of type `ty`.
    pub fn evaluate<'s>(&'s self, engine: &Engine, context: Context<'_>, ty: ValueType) -> Resolution<'s> {
        // Static and disabled flags never look at the context: do not convert it.
        if !self.reads_context() {
            return self.evaluate_prepared(engine, None, ty);
        }
        targeting::with_context_reading(context.attributes, self.reads.as_deref(), context.now, |prepared| {
            self.evaluate_prepared(engine, Some(prepared), ty)
        })
    }

    /// Evaluates the flag against a context already converted for rules (see
    /// [`targeting::with_context`]); `None` only for flags that do not run a rule.
    pub fn evaluate_in<'s>(&'s self, engine: &Engine, prepared: &Prepared<'_>, ty: ValueType) -> Resolution<'s> {
        self.evaluate_prepared(engine, Some(prepared), ty)
    }

    /// Whether an evaluation looks at the context at all.
    fn reads_context(&self) -> bool {
        self.flag.state != FlagState::Disabled
            && (matches!(self.targeting, Targeting::Rule(_))
                || self.experiment.as_ref().is_some_and(CompiledExperiment::reads_context))
    }

    /// The experiment's answer, when it has one for this context: `SPLIT` for an assigned unit
    /// of a running experiment, the winner once it is paused or stopped with one.
    fn experiment_answer<'s>(
        &'s self,
        engine: &Engine,
        prepared: Option<&Prepared<'_>>,
    ) -> Option<(usize, Reason, &'s Metadata, Option<Split<'s>>)> {
        let experiment = self.experiment.as_ref()?;
        let definition = &*experiment.definition;
        if definition.phase != Phase::Running {
            let (index, metadata) = experiment.winner.as_ref()?;
            return Some((*index, Reason::Static, metadata, None));
        }
        let prepared = prepared?;
        let unit = prepared.string("targetingKey")?;
        let eligible = match &experiment.audience {
            None => true,
            // A rule that fails to run admits nobody (the flag's own evaluation answers).
            Some(Ok(rule)) => targeting::matches(engine, rule, &self.flag.key, prepared).unwrap_or(false),
            Some(Err(_)) => false,
        };
        if !eligible {
            return None;
        }
        let Assignment::Variant(variant) = definition.allocation.assign(unit) else {
            return None;
        };
        let index = self.flag.variants.iter().position(|(n, _)| n == variant)?;
        let metadata = experiment.split_metadata[index].as_ref()?;
        let split = Split {
            experiment: definition,
            unit: unit.into(),
        };
        Some((index, Reason::Split, metadata, Some(split)))
    }

    fn evaluate_prepared<'s>(
        &'s self,
        engine: &Engine,
        prepared: Option<&Prepared<'_>>,
        ty: ValueType,
    ) -> Resolution<'s> {
        let metadata = Some(&self.flag.metadata);
        if self.flag.state == FlagState::Disabled {
            return Resolution {
                reason: Reason::Disabled,
                variant: None,
                value: None,
                metadata,
                error: None,
                split: None,
            };
        }
        if let Some((index, reason, metadata, split)) = self.experiment_answer(engine, prepared) {
            let (variant, value) = &self.flag.variants[index];
            if !ty.accepts(value) {
                return self.failed(
                    ErrorCode::TypeMismatch,
                    format!("variant `{variant}` is not a {} value", ty.name()),
                );
            }
            return Resolution {
                reason,
                variant: Some(variant),
                value: Some(value),
                metadata: Some(metadata),
                error: None,
                split,
            };
        }
        let (index, reason) = match &self.targeting {
            Targeting::None => (self.default_index, Reason::Static),
            Targeting::Invalid(e) => {
                return self.failed(ErrorCode::ParseError, format!("targeting does not compile: {e}"));
            }
            Targeting::Rule(rule) => {
                let Some(prepared) = prepared else {
                    return self.failed(
                        ErrorCode::General,
                        "no context was prepared for the targeting rule".into(),
                    );
                };
                match targeting::evaluate(engine, rule, &self.flag.key, &self.flag.variants, prepared) {
                    Outcome::Variant(i) => (Some(i), Reason::TargetingMatch),
                    Outcome::Null => (self.default_index, Reason::Default),
                    Outcome::UnknownVariant(name) => {
                        return self.failed(
                            ErrorCode::General,
                            format!("targeting returned `{name}`, which is not a variant"),
                        );
                    }
                    Outcome::Failed(e) => {
                        return self.failed(ErrorCode::ParseError, format!("targeting failed: {e}"));
                    }
                }
            }
        };
        let Some(index) = index else {
            // No default variant: the caller's code default applies.
            return Resolution {
                reason: Reason::Default,
                variant: None,
                value: None,
                metadata,
                error: None,
                split: None,
            };
        };
        let (variant, value) = &self.flag.variants[index];
        if !ty.accepts(value) {
            return self.failed(
                ErrorCode::TypeMismatch,
                format!("variant `{variant}` is not a {} value", ty.name()),
            );
        }
        Resolution {
            reason,
            variant: Some(variant),
            value: Some(value),
            metadata,
            error: None,
            split: None,
        }
    }

    fn failed(&self, code: ErrorCode, detail: String) -> Resolution<'_> {
        Resolution {
            reason: Reason::Error,
            variant: None,
            value: None,
            metadata: Some(&self.flag.metadata),
            error: Some(EvalError {
                code,
                message: format!("flag `{}`: {detail}", self.flag.key),
            }),
            split: None,
        }
    }
}

/// The top-level context keys evaluating a flag can read: its rule's, and with a running
/// experiment the `targetingKey` and the audience's (`None`: any key, or not known).
fn context_reads(targeting: &Targeting, experiment: Option<&CompiledExperiment>) -> Option<Box<[Box<str>]>> {
    let mut keys: Vec<Box<str>> = match targeting {
        Targeting::Rule(rule) => rule.reads()?.to_vec(),
        _ => Vec::new(),
    };
    if let Some(experiment) = experiment.filter(|e| e.reads_context()) {
        keys.push("targetingKey".into());
        if let Some(Ok(rule)) = &experiment.audience {
            keys.extend(rule.reads()?.iter().cloned());
        }
    }
    keys.sort();
    keys.dedup();
    Some(keys.into_boxed_slice())
}
