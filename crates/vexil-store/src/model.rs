//! What the store holds and what its writes take.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// Who did something, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stamp {
    /// The actor (an API key's name and prefix, `cli:<user>`, …).
    pub by: String,
    /// When.
    pub at: Millis,
}

/// Who is writing: recorded in the rows written and in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    /// An actor by name.
    pub fn new(name: impl Into<String>) -> Actor {
        Actor(name.into())
    }
}

/// What a write expects of the row it writes (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Write whatever is there (create or replace).
    #[default]
    Any,
    /// The row must not exist yet (create only).
    Absent,
    /// The row must exist at this version (its ETag).
    Version(i64),
}

/// A requested page of a list: the token a previous page returned, and how many rows at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// `None` for the first page.
    pub token: Option<String>,
    /// At most this many rows; 0 means the default ([`PageRequest::DEFAULT_SIZE`]). Larger than
    /// [`PageRequest::MAX_SIZE`] is capped.
    pub size: u32,
}

impl PageRequest {
    /// Rows per page when none is asked for.
    pub const DEFAULT_SIZE: u32 = 100;
    /// The most rows one page returns.
    pub const MAX_SIZE: u32 = 1000;

    /// The first page of `size` rows.
    pub fn first(size: u32) -> PageRequest {
        PageRequest { token: None, size }
    }

    /// The number of rows to return.
    pub fn limit(&self) -> u32 {
        match self.size {
            0 => Self::DEFAULT_SIZE,
            n => n.min(Self::MAX_SIZE),
        }
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// The rows.
    pub items: Vec<T>,
    /// The token of the next page; `None` when this is the last.
    pub next: Option<String>,
}

/// An environment: its own flag sets, keys and config versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    /// `production`, `staging`, …
    pub key: String,
    /// A display name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The environment's latest config version (0 before its first change).
    pub config_version: i64,
    /// The row's ETag.
    pub version: i64,
    /// Created by and at.
    pub created: Stamp,
    /// Last updated by and at.
    pub updated: Stamp,
}

/// What creating or updating an environment sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvironmentInput {
    /// Display name (the key when empty).
    pub name: String,
    /// Free text.
    pub description: String,
}

/// A flag set: what flagd calls a flag set and serves under `flagSetId=<environment>/<key>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlagSet {
    /// The environment it belongs to.
    pub environment: String,
    /// Its key within the environment.
    pub key: String,
    /// A display name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// flagd's set metadata, merged into every flag's metadata when served.
    pub metadata: Map<String, Value>,
    /// The row's ETag.
    pub version: i64,
    /// Created by and at.
    pub created: Stamp,
    /// Last updated by and at.
    pub updated: Stamp,
}

/// What creating or updating a flag set sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagSetInput {
    /// Display name (the key when empty).
    pub name: String,
    /// Free text.
    pub description: String,
    /// flagd's set metadata.
    pub metadata: Map<String, Value>,
}

/// A managed flag: flagd's definition plus what the store keeps about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlagRecord {
    /// The environment.
    pub environment: String,
    /// The flag set.
    pub flag_set: String,
    /// The flag's key.
    pub key: String,
    /// flagd's flag object: `state`, `variants`, `defaultVariant`, `targeting`, `metadata`.
    pub definition: Value,
    /// Free text.
    pub description: String,
    /// Who owns the flag (a team, a person).
    pub owner: String,
    /// Labels to find it by.
    pub tags: Vec<String>,
    /// The row's ETag.
    pub version: i64,
    /// Created by and at.
    pub created: Stamp,
    /// Last updated by and at.
    pub updated: Stamp,
}

/// What creating or replacing a flag sets.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagInput {
    /// flagd's flag object.
    pub definition: Value,
    /// Free text.
    pub description: String,
    /// Who owns the flag.
    pub owner: String,
    /// Labels.
    pub tags: Vec<String>,
}

impl FlagInput {
    /// A flag with only its flagd definition.
    pub fn new(definition: Value) -> FlagInput {
        FlagInput {
            definition,
            description: String::new(),
            owner: String::new(),
            tags: Vec::new(),
        }
    }
}

/// A segment: a named rule flags reach with `{"$ref": "<key>"}` (flagd's `$evaluators`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentRecord {
    /// The environment.
    pub environment: String,
    /// The flag set.
    pub flag_set: String,
    /// The segment's key (what `$ref` names).
    pub key: String,
    /// The JsonLogic rule.
    pub rule: Value,
    /// Free text.
    pub description: String,
    /// The row's ETag.
    pub version: i64,
    /// Created by and at.
    pub created: Stamp,
    /// Last updated by and at.
    pub updated: Stamp,
}

/// What creating or replacing a segment sets.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentInput {
    /// The JsonLogic rule.
    pub rule: Value,
    /// Free text.
    pub description: String,
}

/// The result of a write that published a new config version.
#[derive(Debug, Clone, PartialEq)]
pub struct Written<T> {
    /// What was written (the row as stored).
    pub value: T,
    /// The environment's config version that includes the write; `None` when the write changed
    /// nothing (the same content written again), so no version was published.
    pub config_version: Option<i64>,
}

/// An immutable, numbered configuration of one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigVersion {
    /// The environment.
    pub environment: String,
    /// 1, 2, …
    pub version: i64,
    /// Who published it and when.
    pub created: Stamp,
    /// What changed, in words (`put flag checkout/new-banner`, `rollback to 3`, …).
    pub summary: String,
}

/// What kind of configuration entity a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    /// A flag set's own fields (name, description, metadata).
    FlagSet,
    /// A flag.
    Flag,
    /// A segment.
    Segment,
    /// An experiment.
    Experiment,
}

impl EntityKind {
    /// The name stored in the database and shown in diffs.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::FlagSet => "flag_set",
            EntityKind::Flag => "flag",
            EntityKind::Segment => "segment",
            EntityKind::Experiment => "experiment",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<EntityKind> {
        match s {
            "flag_set" => Some(EntityKind::FlagSet),
            "flag" => Some(EntityKind::Flag),
            "segment" => Some(EntityKind::Segment),
            "experiment" => Some(EntityKind::Experiment),
            _ => None,
        }
    }
}

/// One entity's change between two config versions (or in one write).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The flag set.
    pub flag_set: String,
    /// What kind of entity.
    pub kind: EntityKind,
    /// Its key (the flag set's own key for [`EntityKind::FlagSet`]).
    pub key: String,
    /// Its content before (`None`: it did not exist).
    pub before: Option<Value>,
    /// Its content after (`None`: it was deleted).
    pub after: Option<Value>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Increasing with time.
    pub id: i64,
    /// When.
    pub at: Millis,
    /// Who.
    pub actor: String,
    /// `create`, `update`, `delete`, `import`, `rollback`, `revoke`.
    pub action: String,
    /// The environment, when the entity is in one.
    pub environment: Option<String>,
    /// `environment`, `flag_set`, `flag`, `segment`, `api_key`.
    pub entity_kind: String,
    /// The entity's path: `production`, `production/checkout`, `production/checkout/new-banner`,
    /// or an API key's prefix.
    pub entity: String,
    /// The config version the change is part of.
    pub config_version: Option<i64>,
    /// The entity before (`None`: it did not exist).
    pub before: Option<Value>,
    /// The entity after (`None`: it was deleted).
    pub after: Option<Value>,
}

/// Which audit entries to list; every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Entries in this environment.
    pub environment: Option<String>,
    /// Entries about this kind of entity.
    pub entity_kind: Option<String>,
    /// Entries about this entity or anything under it (`production/checkout` matches its flags).
    pub entity: Option<String>,
    /// Entries by this actor.
    pub actor: Option<String>,
    /// Entries at or after this time.
    pub since: Option<Millis>,
    /// Entries before this time.
    pub until: Option<Millis>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in its environment (or everywhere, for a key without one).
    Admin,
    /// Evaluate flags in its environment.
    Evaluate,
    /// Send tracking events to its environment.
    Track,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Evaluate => "evaluate",
            Role::Track => "track",
        }
    }

    /// A role by name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "evaluate" => Some(Role::Evaluate),
            "track" => Some(Role::Track),
            _ => None,
        }
    }
}

/// An API key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// The key's id.
    pub id: i64,
    /// The key's public part (`vx_<prefix>_…`): what logs and the audit log name it by.
    pub prefix: String,
    /// A name for people.
    pub name: String,
    /// The environment it is scoped to; `None` for a global admin key.
    pub environment: Option<String>,
    /// What it may do.
    pub role: Role,
    /// Created by and at.
    pub created: Stamp,
    /// When it was revoked.
    pub revoked_at: Option<Millis>,
}

/// What creating an API key sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInput {
    /// A name for people.
    pub name: String,
    /// The environment (required unless the role is admin).
    pub environment: Option<String>,
    /// What it may do.
    pub role: Role,
}

/// A key just created: the stored record and the key itself, which is never shown again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedKey {
    /// The stored record.
    pub key: ApiKey,
    /// The key to hand to the client.
    pub secret: String,
}

/// One environment's flag sets as flagd documents, at one config version: what evaluation serves.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentSnapshot {
    /// The environment.
    pub environment: String,
    /// The config version the documents are at.
    pub config_version: i64,
    /// Each flag set's flagd document (its metadata carrying `flagSetId: <environment>/<set>`),
    /// sorted by key. Shared: a reader that updates one set keeps the others as they are.
    pub flag_sets: Vec<(String, std::sync::Arc<Value>)>,
}

/// An environment's changes since a config version ([`Store::history`](crate::Store::history)).
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// The environment's current config version.
    pub current: i64,
    /// Each version after the one asked for, up to `current`, oldest first; `None` when there
    /// were more than the limit.
    pub versions: Option<Vec<VersionChanges>>,
}

/// What one config version changed.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionChanges {
    /// The version.
    pub version: i64,
    /// Its changes, by flag set, kind and key (empty for a version that changed nothing).
    pub changes: Vec<Change>,
}

/// A row of the outbox: a config version to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The row's id.
    pub id: i64,
    /// The environment.
    pub environment: String,
    /// Its new config version.
    pub config_version: i64,
}

/// What an import replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportSummary {
    /// Flags in the set after the import.
    pub flags: usize,
    /// Segments in the set after the import.
    pub segments: usize,
    /// Entities created, changed or deleted.
    pub changed: usize,
}

/// Where an experiment is in its lifecycle: `draft → running ⇄ paused → stopped → archived`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentStatus {
    /// Being prepared: everything may change; evaluation ignores it.
    Draft,
    /// Allocating units. Its flag, weights, salt, layer and audience are locked.
    Running,
    /// Not allocating (the flag evaluates as without it, or serves the winner); may run again.
    Paused,
    /// Over: the flag evaluates as without it, or serves the chosen winner, until it is archived.
    Stopped,
    /// Kept for its results; evaluation ignores it.
    Archived,
}

impl ExperimentStatus {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExperimentStatus::Draft => "draft",
            ExperimentStatus::Running => "running",
            ExperimentStatus::Paused => "paused",
            ExperimentStatus::Stopped => "stopped",
            ExperimentStatus::Archived => "archived",
        }
    }

    /// The status a lowercase name names.
    pub fn parse(s: &str) -> Option<ExperimentStatus> {
        [
            ExperimentStatus::Draft,
            ExperimentStatus::Running,
            ExperimentStatus::Paused,
            ExperimentStatus::Stopped,
            ExperimentStatus::Archived,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }

    /// Whether an experiment may go from this status to `to`.
    pub fn may_become(self, to: ExperimentStatus) -> bool {
        use ExperimentStatus::*;
        matches!(
            (self, to),
            (Draft, Running)
                | (Draft, Archived)
                | (Running, Paused)
                | (Running, Stopped)
                | (Paused, Running)
                | (Paused, Stopped)
                | (Stopped, Archived)
        )
    }

    /// Whether the experiment's allocation (flag, weights, salt, layer, audience) is locked: once
    /// it has run, changing who gets what would mix two experiments in one set of results.
    pub fn allocation_locked(self) -> bool {
        self != ExperimentStatus::Draft
    }
}

/// How a metric's per-unit values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Whether the unit converted at least once (a rate).
    #[default]
    Binomial,
    /// The unit's sum of the event values (a mean per unit: revenue, items, seconds).
    Mean,
}

/// What a metric is for in an experiment's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MetricRole {
    /// The metric the experiment is decided on.
    #[default]
    Primary,
    /// Watched, not decided on.
    Secondary,
    /// Must not get worse.
    Guardrail,
}

/// A metric an experiment reads: conversion or custom events with this `metric` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricSpec {
    /// The events' `metric`.
    pub key: String,
    /// Rate or mean.
    #[serde(default)]
    pub kind: MetricKind,
    /// Primary, secondary or guardrail.
    #[serde(default)]
    pub role: MetricRole,
    /// Whether a decrease is the improvement (load time, errors).
    #[serde(default, rename = "lowerIsBetter")]
    pub lower_is_better: bool,
}

/// One variant's weight in an experiment's allocation (relative: 1 and 1 is an even split).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantWeight {
    /// A variant of the flag.
    pub variant: String,
    /// Its relative weight.
    pub weight: u32,
}

/// An experiment's slice of a layer: experiments of one layer with disjoint slices never share a
/// unit. Percent of the layer's units, `[start, end)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// The layer's key.
    pub key: String,
    /// Start of the slice, percent.
    #[serde(rename = "startPercent")]
    pub start_percent: f64,
    /// End of the slice (exclusive), percent.
    #[serde(rename = "endPercent")]
    pub end_percent: f64,
}

/// What creating or editing an experiment sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentInput {
    /// The flag (in the experiment's flag set) whose variants it allocates.
    pub flag: String,
    /// A name for people.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// What the experiment is expected to show.
    #[serde(default)]
    pub hypothesis: String,
    /// Who may enter: JsonLogic on the evaluation context (`None`: everyone with a targetingKey).
    #[serde(default)]
    pub audience: Option<Value>,
    /// The share of eligible units in the experiment, percent (resolution 0.0001).
    pub traffic_percent: f64,
    /// The variants allocated and their weights.
    pub weights: Vec<VariantWeight>,
    /// The metrics read.
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
    /// The hash salt (default: the experiment's id; fixed once created).
    #[serde(default)]
    pub salt: Option<String>,
    /// A slice of a layer, for experiments that must not share units.
    #[serde(default)]
    pub layer: Option<LayerSpec>,
}

/// An experiment's whole definition, as stored, versioned and rolled back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentDefinition {
    /// Stable for the experiment's life (reported as `experimentId` in evaluations).
    pub id: String,
    /// The lifecycle status.
    pub status: ExperimentStatus,
    /// The variant served to everyone once paused or stopped, if one was chosen.
    #[serde(default)]
    pub winner: Option<String>,
    /// When it first started running (ms).
    #[serde(default)]
    pub started_at: Option<Millis>,
    /// When it stopped (ms).
    #[serde(default)]
    pub stopped_at: Option<Millis>,
    /// The rest, as given (the salt filled in at creation).
    #[serde(flatten)]
    pub input: ExperimentInput,
}

/// An experiment as the store holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentRecord {
    /// The environment.
    pub environment: String,
    /// The flag set of its flag.
    pub flag_set: String,
    /// Its key, unique in the environment (events name experiments by it).
    pub key: String,
    /// What it is.
    pub definition: ExperimentDefinition,
    /// The row's ETag.
    pub version: i64,
    /// Created by and at.
    pub created: Stamp,
    /// Last updated by and at.
    pub updated: Stamp,
}

impl ExperimentDefinition {
    /// The salt units are hashed with.
    pub fn salt(&self) -> &str {
        self.input.salt.as_deref().unwrap_or(&self.id)
    }
}
