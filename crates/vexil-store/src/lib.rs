//! Vexil's managed flag store: environments, flag sets, flags, segments, API keys, immutable
//! numbered config versions with the history to diff and roll them back, the audit log and the
//! outbox, behind one trait ([`Store`]) with a Postgres and a SQLite backend ([`SqlStore`]).
//!
//! Every write is one transaction: the rows, the environment's next config version with what it
//! changed, an audit entry per entity and an outbox row announcing the version. Writes to one
//! environment take turns (the first statement of each locks the environment's row). Every
//! configuration row has a `version`, its ETag: a write that expects another version fails with
//! [`StoreError::Conflict`] and writes nothing. A flag set's content is validated with the same
//! parser and targeting compiler evaluation uses before the transaction commits: an invalid write
//! fails with every problem and its JSON pointer ([`StoreError::Invalid`]) and stores nothing.
//!
//! What evaluation serves comes out as flagd documents, one per flag set
//! ([`Store::snapshot`]), with `flagSetId` `<environment>/<flag set>` in their metadata.

mod error;
mod events;
mod keys;
mod model;
mod sql;
mod validate;

use futures::future::BoxFuture;
use serde_json::Value;

pub use error::{Problem, StoreError};
pub use events::*;
pub use model::*;
pub use sql::{Backend, SqlStore, redact};

/// The result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The managed store. Implementations are shared (`Arc<dyn Store>`) by every request handler and
/// the task that follows changes; every method may run concurrently with any other.
pub trait Store: EventStore + Send + Sync + std::fmt::Debug {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Environments, by key.
    fn list_environments(&self, page: PageRequest) -> BoxFuture<'_, Result<Page<Environment>>>;
    /// One environment.
    fn get_environment(&self, key: String) -> BoxFuture<'_, Result<Environment>>;
    /// Creates an environment (no config version yet: its first flag set publishes version 1).
    fn create_environment(
        &self,
        actor: Actor,
        key: String,
        input: EnvironmentInput,
    ) -> BoxFuture<'_, Result<Environment>>;
    /// Changes an environment's name and description.
    fn update_environment(
        &self,
        actor: Actor,
        key: String,
        input: EnvironmentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Environment>>;
    /// Deletes an environment and everything in it (the audit log keeps its history).
    fn delete_environment(&self, actor: Actor, key: String, expect: Precondition) -> BoxFuture<'_, Result<()>>;

    /// An environment's flag sets, by key.
    fn list_flag_sets(&self, environment: String, page: PageRequest) -> BoxFuture<'_, Result<Page<FlagSet>>>;
    /// One flag set.
    fn get_flag_set(&self, environment: String, key: String) -> BoxFuture<'_, Result<FlagSet>>;
    /// Creates or updates a flag set's own fields (not its flags).
    fn put_flag_set(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        input: FlagSetInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<FlagSet>>>;
    /// Deletes a flag set with its flags and segments.
    fn delete_flag_set(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>>;

    /// A flag set's flags, by key.
    fn list_flags(
        &self,
        environment: String,
        flag_set: String,
        page: PageRequest,
    ) -> BoxFuture<'_, Result<Page<FlagRecord>>>;
    /// One flag.
    fn get_flag(&self, environment: String, flag_set: String, key: String) -> BoxFuture<'_, Result<FlagRecord>>;
    /// Creates or replaces a flag.
    fn put_flag(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: FlagInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<FlagRecord>>>;
    /// Deletes a flag.
    fn delete_flag(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>>;
    /// Checks a flag as [`Store::put_flag`] would (against the flag set's segments and metadata),
    /// writing nothing.
    fn validate_flag(
        &self,
        environment: String,
        flag_set: String,
        key: String,
        input: FlagInput,
    ) -> BoxFuture<'_, Result<()>>;

    /// A flag set's segments, by key.
    fn list_segments(
        &self,
        environment: String,
        flag_set: String,
        page: PageRequest,
    ) -> BoxFuture<'_, Result<Page<SegmentRecord>>>;
    /// One segment.
    fn get_segment(&self, environment: String, flag_set: String, key: String) -> BoxFuture<'_, Result<SegmentRecord>>;
    /// Creates or replaces a segment (every flag of the set is checked against it).
    fn put_segment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: SegmentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<SegmentRecord>>>;
    /// Deletes a segment (refused while a flag refers to it: the set would not validate).
    fn delete_segment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>>;

    /// Replaces a flag set's flags, segments and metadata with a flagd document's, creating the
    /// environment and the set when missing, in one config version. Managed fields (description,
    /// owner, tags) of flags that stay are kept.
    fn import(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        document: Value,
    ) -> BoxFuture<'_, Result<Written<ImportSummary>>>;
    /// A flag set as a flagd document (what [`Store::import`] takes back unchanged).
    fn export(&self, environment: String, flag_set: String) -> BoxFuture<'_, Result<Value>>;

    /// An environment's experiments, by key.
    fn list_experiments(&self, environment: String, page: PageRequest)
    -> BoxFuture<'_, Result<Page<ExperimentRecord>>>;
    /// One experiment (keys are unique in an environment).
    fn get_experiment(&self, environment: String, key: String) -> BoxFuture<'_, Result<ExperimentRecord>>;
    /// Creates an experiment on a flag of `flag_set` (a draft), or edits one: once it has run,
    /// only its traffic share, texts and metrics may change ([`StoreError::FailedPrecondition`]).
    fn put_experiment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: ExperimentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<ExperimentRecord>>>;
    /// Moves an experiment through `draft → running ⇄ paused → stopped → archived` (a draft may
    /// be archived), with the winner served once paused or stopped when given.
    fn transition_experiment(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        to: ExperimentStatus,
        winner: Option<String>,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<ExperimentRecord>>>;
    /// Deletes a draft or archived experiment.
    fn delete_experiment(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>>;

    /// An environment's config versions, newest first.
    fn list_versions(&self, environment: String, page: PageRequest) -> BoxFuture<'_, Result<Page<ConfigVersion>>>;
    /// What changed from config version `from` to `to` (either order), by flag set, kind and key.
    fn diff(&self, environment: String, from: i64, to: i64) -> BoxFuture<'_, Result<Vec<Change>>>;
    /// Publishes a new config version whose content is that of version `to`.
    fn rollback(&self, actor: Actor, environment: String, to: i64) -> BoxFuture<'_, Result<Written<Vec<Change>>>>;

    /// The audit log, newest first.
    fn audit(&self, filter: AuditFilter, page: PageRequest) -> BoxFuture<'_, Result<Page<AuditEntry>>>;

    /// Creates an API key; the key itself is returned once and only its hash is stored.
    fn create_api_key(&self, actor: Actor, input: ApiKeyInput) -> BoxFuture<'_, Result<CreatedKey>>;
    /// API keys (never the keys themselves), optionally of one environment.
    fn list_api_keys(&self, environment: Option<String>, page: PageRequest) -> BoxFuture<'_, Result<Page<ApiKey>>>;
    /// Revokes a key: it stops authenticating at once.
    fn revoke_api_key(&self, actor: Actor, id: i64) -> BoxFuture<'_, Result<ApiKey>>;
    /// The key a client presented, if it is one of ours and not revoked.
    fn authenticate(&self, secret: String) -> BoxFuture<'_, Result<Option<ApiKey>>>;
    /// Whether any key that is not revoked exists.
    fn has_api_keys(&self) -> BoxFuture<'_, Result<bool>>;

    /// Every environment's current config version, by key: a cheap check for changes.
    fn config_versions(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>>>;
    /// One environment's flag sets as flagd documents, consistent at one config version.
    fn snapshot(&self, environment: String) -> BoxFuture<'_, Result<EnvironmentSnapshot>>;
    /// An environment's changes after config version `since`, version by version in the order
    /// they were published (each [`Change::after`] the entity's body at that version, `None`:
    /// deleted; `before` is not filled); `versions: None` when more than `limit` versions were
    /// published since. What a watcher that saw version `since` missed.
    fn history(&self, environment: String, since: i64, limit: u32) -> BoxFuture<'_, Result<History>>;

    /// Outbox rows at least `min_age` old and not yet published, oldest first.
    fn pending_outbox(&self, limit: u32, min_age: std::time::Duration) -> BoxFuture<'_, Result<Vec<OutboxEntry>>>;
    /// Marks outbox rows published.
    fn mark_published(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<()>>;
    /// Deletes outbox rows published at least `min_age` ago; how many.
    fn prune_outbox(&self, min_age: std::time::Duration) -> BoxFuture<'_, Result<u64>>;
}
