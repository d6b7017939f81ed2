//! Vexil's pure domain: the flagd flag model, parsing and validation of flag definitions, and the
//! targeting engine that gives exactly flagd's answers.
//!
//! `vexil-core` does no I/O, spawns nothing and knows no wire types: callers hand it text or JSON
//! and a request context (with the current time), and get borrowed results back.
//!
//! - [`parse`] reads flagd JSON/YAML into a [`model::FlagConfig`], with diagnostics that name the
//!   flag and the JSON pointer;
//! - [`snapshot::Snapshot::build`] compiles every source's flags once;
//! - [`snapshot::Snapshot::evaluate`] resolves a flag for a [`eval::Context`].
//! - [`experiment`] assigns units to an experiment's variants (sticky, murmur3, layers);
//! - [`stats`] turns experiment aggregates into lifts, intervals, p-values and chances to win.

#![forbid(unsafe_code)]

pub mod context;
pub mod eval;
pub mod experiment;
pub mod model;
pub mod parse;
pub mod schema;
pub mod snapshot;
pub mod stats;
pub mod targeting;

pub use context::Attributes;
pub use eval::{CompiledFlag, Context, ErrorCode, EvalError, Reason, Resolution, Split};
pub use model::{Flag, FlagConfig, FlagState, Metadata, RuleText, ValueType};
pub use parse::{Diagnostic, Format, ParseError, Parsed, Severity, Strictness};
pub use snapshot::{Revision, Selector, SelectorError, Snapshot, SourceConfig};
pub use targeting::{Engine, FractionalMode, Prepared};
