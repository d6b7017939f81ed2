//! Vexil's use cases, free of wire types: the live configuration (sources → compiled snapshot),
//! file sources and their watchers, readiness, and evaluation with flagd's context merge.
//!
//! The live snapshot is published through a `tokio::sync::watch` channel: readers clone the current
//! `Arc<Snapshot>` (no lock held while evaluating), stream handlers await changes and diff the old
//! snapshot against the new one for their selector.

mod evaluate;
mod flags;
pub mod io;
mod live;
mod relay;
pub mod results;
mod sources;
pub mod tracking;

pub use evaluate::{RequestContext, StaticContext};
pub use flags::{
    BulkEvaluation, Changes, Evaluation, Exposures, FlagSetTally, Flags, FlagsConfig, NoExposures, Observer,
    ReasonTally, Unobserved, flag_configuration,
};
pub use live::{Live, LiveConfig, LiveOptions, Published, Readiness, SourceReadiness, SourceState};
pub use relay::{RELAY_GRACE, Relay};
pub use sources::{
    DATABASE_CHECK_EVERY, FileSource, LoadError, Loaded, Part, RECENT_VERSIONS, STORE_SOURCE, Source, SourceSpec,
    StoreSource,
};
pub use tracking::{
    EventOutcome, RateLimit, ScrubReport, TrackError, TrackEvent, TrackOutcome, Tracker, TrackerConfig, TrackerStats,
    TrackingPolicy,
};
