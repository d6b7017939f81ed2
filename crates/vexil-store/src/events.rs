//! Tracked events: exposures, conversions and custom events, the raw source of truth experiment
//! results are computed from.
//!
//! Inserts are idempotent by `(environment, event_id)`: a retried batch stores each event once, and
//! the answer says which events were new. Results are aggregated from the raw rows in SQL (per
//! variant, over each exposed unit), never from counters kept beside them.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Result;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A unit saw an experiment's variant (recorded by the server when it evaluates an experiment
    /// flag, or sent by a client that evaluates locally).
    Exposure,
    /// A unit did what a metric counts (`metric`, optional `value`, default 1).
    Conversion,
    /// Anything else the application tracks (`metric`, optional `value`).
    Custom,
}

impl EventKind {
    /// `exposure`, `conversion` or `custom`: the stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Exposure => "exposure",
            EventKind::Conversion => "conversion",
            EventKind::Custom => "custom",
        }
    }

    /// The kind a stored spelling names.
    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "exposure" => Some(EventKind::Exposure),
            "conversion" => Some(EventKind::Conversion),
            "custom" => Some(EventKind::Custom),
            _ => None,
        }
    }
}

/// One event to store, already validated and scrubbed by the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The environment it belongs to (by key).
    pub environment: String,
    /// The client's id for the event: a retry with the same id is stored once.
    pub event_id: String,
    /// What it records.
    pub kind: EventKind,
    /// The unit (user, device, account…): the context's `targetingKey`.
    pub unit: String,
    /// The flag evaluated (exposures).
    pub flag: Option<String>,
    /// The experiment (exposures; optional on conversions).
    pub experiment: Option<String>,
    /// The variant the unit got (exposures).
    pub variant: Option<String>,
    /// The metric (conversions and custom events).
    pub metric: Option<String>,
    /// The metric's value (a conversion without one counts 1).
    pub value: Option<f64>,
    /// Scrubbed properties.
    pub properties: Map<String, Value>,
    /// When the client says it happened (ms since the epoch).
    pub client_time_ms: Option<i64>,
    /// When the server received it (ms since the epoch).
    pub server_time_ms: i64,
}

/// What became of one event of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored now.
    New,
    /// An event with this id was stored before (a retry): nothing was written.
    Duplicate,
}

/// Which events a metric's totals are taken over.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricQuery {
    /// The environment.
    pub environment: String,
    /// The experiment whose exposures define the units and their variants.
    pub experiment: String,
    /// The metric (conversion and custom events with this `metric`).
    pub metric: String,
    /// Exposures and events received (server time) from this time on (ms; `None`: from the
    /// beginning). A unit's first exposure is its first in the range.
    pub from_ms: Option<i64>,
    /// Exposures and events received before this time (ms; `None`: until now).
    pub until_ms: Option<i64>,
    /// When set, also the pre-exposure covariate for CUPED: the unit's sum of the metric over
    /// this long before its first exposure (`[first - window, first)`, even before `from_ms`).
    pub covariate_window: Option<Duration>,
}

/// One variant's totals for one metric, over the units exposed to that variant (and only to it).
/// A unit's value is the sum of its metric events' values (1 for an event without one) at or
/// after its first exposure; a unit without such events counts 0.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VariantTotals {
    /// The variant.
    pub variant: String,
    /// Units exposed to it.
    pub units: u64,
    /// Units with at least one event of the metric after exposure.
    pub converted: u64,
    /// Sum over units of the unit's value.
    pub sum: f64,
    /// Sum over units of the unit's value squared.
    pub sum_squares: f64,
    /// CUPED (when asked): sum over units of the pre-exposure covariate.
    pub covariate_sum: f64,
    /// CUPED: sum of squares of the covariate.
    pub covariate_sum_squares: f64,
    /// CUPED: sum over units of value × covariate.
    pub cross_sum: f64,
    /// CUPED of a rate: units with at least one event of the metric in the covariate window.
    pub pre_converted: u64,
    /// CUPED of a rate: units with events both in the covariate window and after exposure.
    pub both_converted: u64,
}

/// Exposed units per variant of an experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureCount {
    /// The variant.
    pub variant: String,
    /// Distinct units exposed to it (and only to it).
    pub units: u64,
}

/// The event store: implemented by [`crate::SqlStore`] on both backends.
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Stores `events` in one transaction (acknowledged only once committed), idempotently by
    /// `(environment, event_id)`; one answer per event, in order. An event id repeated inside the
    /// batch is stored once (the later ones are duplicates).
    fn insert_events(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Inserted>>>;

    /// Distinct exposed units per variant of `experiment` (units exposed to more than one
    /// variant are left out: their variant is ambiguous), over the exposures received (server
    /// time) from `from_ms` and before `until_ms`.
    fn exposure_counts(
        &self,
        environment: String,
        experiment: String,
        from_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> BoxFuture<'_, Result<Vec<ExposureCount>>>;

    /// Each variant's totals for one metric (see [`VariantTotals`]); variants with no exposed
    /// unit are absent.
    fn metric_totals(&self, query: MetricQuery) -> BoxFuture<'_, Result<Vec<VariantTotals>>>;

    /// Forgets the event ids (idempotency keys) recorded more than `older_than` ago: a retry after
    /// that is stored again. The events stay. How many ids went.
    fn prune_event_ids(&self, older_than: Duration) -> BoxFuture<'_, Result<u64>>;

    /// Deletes the events (of every environment) received before `before_ms` (retention; on Postgres
    /// whole day partitions are dropped). How many went, when known.
    fn delete_events_before(&self, before_ms: i64) -> BoxFuture<'_, Result<u64>>;
}
