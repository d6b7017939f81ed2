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
    /// [`crate::snapshot`]'s hash of the definition (part of the snapshot revision).
    hash: u64,
    /// See [`CompiledFlag::memo`].
    memo: OnceLock<Box<dyn Any + Send + Sync>>,
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
        let (targeting, problem) = match &flag.targeting {
            None => (Targeting::None, None),
            Some(rule) => match engine.compile(&rule.to_value()) {
                Ok(rule) => (Targeting::Rule(rule), None),
                Err(e) => (Targeting::Invalid(e.clone()), Some(e)),
            },
        };
        let hash = crate::snapshot::flag_hash(&flag);
        (
            CompiledFlag {
                flag,
                default_index,
                targeting,
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
        if self.flag.state == FlagState::Disabled || !matches!(self.targeting, Targeting::Rule(_)) {
            return self.evaluate_prepared(engine, None, ty);
        }
        let reads = match &self.targeting {
            Targeting::Rule(rule) => rule.reads(),
            _ => None,
        };
        targeting::with_context_reading(context.attributes, reads, context.now, |prepared| {
            self.evaluate_prepared(engine, Some(prepared), ty)
        })
    }

    /// Evaluates the flag against a context already converted for rules (see
    /// [`targeting::with_context`]); `None` only for flags that do not run a rule.
    pub fn evaluate_in<'s>(&'s self, engine: &Engine, prepared: &Prepared<'_>, ty: ValueType) -> Resolution<'s> {
        self.evaluate_prepared(engine, Some(prepared), ty)
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
        }
    }
}
