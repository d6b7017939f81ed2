//! Experiments: attached to a flag of a flag set, versioned with the configuration (an experiment
//! change is a config change: watchers see it, rollbacks restore it) and served to evaluation as
//! the flag set document's `$experiments` while running, paused or stopped.

use serde_json::{Map, Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::config::EnvWrite;
use super::{SqlStore, expect, json, key_start, page_of, stamp};
use crate::Result;
use crate::error::StoreError;
use crate::model::*;
use crate::validate::{SetDocument, item_key};

/// Longest free text (name, description, hypothesis).
const MAX_TEXT: usize = 10_000;
/// Most variants an experiment allocates, and most metrics it reads.
const MAX_VARIANTS: usize = 100;
const MAX_METRICS: usize = 50;
/// Longest metric key, layer key and salt.
const MAX_NAME: usize = 256;

fn experiment_of(environment: &str, row: &AnyRow) -> Result<ExperimentRecord> {
    Ok(ExperimentRecord {
        environment: environment.to_owned(),
        flag_set: row.try_get(0)?,
        key: row.try_get(1)?,
        definition: definition_of(&json(row, 2)?)?,
        version: row.try_get(3)?,
        created: stamp(row, 4)?,
        updated: stamp(row, 6)?,
    })
}

/// The stored body of an experiment (what config changes, diffs and the audit log hold).
pub(super) fn experiment_body(definition: &ExperimentDefinition) -> Value {
    serde_json::to_value(definition).expect("an experiment serializes")
}

/// An experiment from its stored body.
pub(super) fn definition_of(body: &Value) -> Result<ExperimentDefinition> {
    serde_json::from_value(body.clone())
        .map_err(|e| StoreError::Internal(format!("a stored experiment does not decode: {e}")))
}

/// Millionths of a percentage (0.0001 % resolution).
fn millionths(percent: f64) -> u64 {
    (percent * 10_000.0).round() as u64
}

/// The experiment in the core's `$experiments` form, when evaluation sees it: running, paused, or
/// stopped with a winner (`as_running`: as if it were running, to check a draft).
pub(super) fn core_form(definition: &ExperimentDefinition, as_running: bool) -> Option<Value> {
    let status = if as_running {
        ExperimentStatus::Running
    } else {
        definition.status
    };
    match status {
        ExperimentStatus::Running | ExperimentStatus::Paused => {}
        ExperimentStatus::Stopped if definition.winner.is_some() => {}
        _ => return None,
    }
    let input = &definition.input;
    let mut form = Map::new();
    form.insert("id".into(), json!(definition.id));
    form.insert("flag".into(), json!(input.flag));
    form.insert("status".into(), json!(status.as_str()));
    form.insert("salt".into(), json!(definition.salt()));
    form.insert("traffic".into(), json!(millionths(input.traffic_percent)));
    form.insert(
        "weights".into(),
        Value::Array(
            input
                .weights
                .iter()
                .map(|w| json!({"variant": w.variant, "weight": w.weight}))
                .collect(),
        ),
    );
    if let Some(audience) = &input.audience {
        form.insert("audience".into(), audience.clone());
    }
    if let Some(layer) = &input.layer {
        form.insert(
            "layer".into(),
            json!({
                "key": layer.key,
                "start": millionths(layer.start_percent),
                "end": millionths(layer.end_percent),
            }),
        );
    }
    if !as_running && let Some(winner) = &definition.winner {
        form.insert("winner".into(), json!(winner));
    }
    Some(Value::Object(form))
}

/// Checks an experiment's input on its own: every problem, with its pointer into the input.
fn check_input(input: &ExperimentInput) -> Result<()> {
    let mut problems = Vec::new();
    let mut problem = |pointer: &str, message: String| {
        problems.push(crate::Problem {
            pointer: pointer.to_owned(),
            message,
        })
    };
    if input.flag.is_empty() {
        problem("/flag", "an experiment names the flag it allocates".into());
    }
    for (pointer, text) in [
        ("/name", &input.name),
        ("/description", &input.description),
        ("/hypothesis", &input.hypothesis),
    ] {
        if text.len() > MAX_TEXT {
            problem(pointer, format!("at most {MAX_TEXT} bytes"));
        }
    }
    if !input.traffic_percent.is_finite() || !(0.0..=100.0).contains(&input.traffic_percent) {
        problem("/trafficPercent", "a percentage from 0 to 100".into());
    }
    if input.weights.is_empty() || input.weights.len() > MAX_VARIANTS {
        problem("/weights", format!("1 to {MAX_VARIANTS} weighted variants"));
    }
    for (i, w) in input.weights.iter().enumerate() {
        if input.weights[..i].iter().any(|o| o.variant == w.variant) {
            problem(
                &format!("/weights/{i}/variant"),
                format!("`{}` is weighted twice", w.variant),
            );
        }
    }
    if input.weights.iter().all(|w| w.weight == 0) && !input.weights.is_empty() {
        problem("/weights", "at least one variant needs a positive weight".into());
    }
    if input.metrics.len() > MAX_METRICS {
        problem("/metrics", format!("at most {MAX_METRICS} metrics"));
    }
    for (i, m) in input.metrics.iter().enumerate() {
        if m.key.is_empty() || m.key.len() > MAX_NAME {
            problem(&format!("/metrics/{i}/key"), format!("1 to {MAX_NAME} bytes"));
        }
        if input.metrics[..i].iter().any(|o| o.key == m.key) {
            problem(
                &format!("/metrics/{i}/key"),
                format!("metric `{}` is listed twice", m.key),
            );
        }
    }
    if let Some(salt) = &input.salt
        && (salt.is_empty() || salt.len() > MAX_NAME || salt.contains('\0'))
    {
        problem("/salt", format!("1 to {MAX_NAME} bytes without NUL"));
    }
    if let Some(layer) = &input.layer {
        if layer.key.is_empty() || layer.key.len() > MAX_NAME || layer.key.contains('\0') {
            problem("/layer/key", format!("1 to {MAX_NAME} bytes without NUL"));
        }
        let ok = layer.start_percent.is_finite()
            && layer.end_percent.is_finite()
            && 0.0 <= layer.start_percent
            && layer.start_percent < layer.end_percent
            && layer.end_percent <= 100.0;
        if !ok {
            problem(
                "/layer",
                "a slice [startPercent, endPercent) within 0 to 100, not empty".into(),
            );
        }
    }
    if let Some(audience) = &input.audience
        && !audience.is_object()
    {
        problem("/audience", "a JsonLogic rule (an object) or null".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(problems))
    }
}

/// A new experiment id: `x` and 16 hex digits.
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Internal(format!("no randomness: {e}")))?;
    Ok(format!(
        "x{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// What of an experiment must not change once it has run: who gets which variant.
fn allocation_of(input: &ExperimentInput, salt: &str) -> impl PartialEq + use<> {
    (
        input.flag.clone(),
        input.weights.clone(),
        salt.to_owned(),
        input.layer.clone(),
        input.audience.clone(),
    )
}

/// Whether two layer slices overlap.
fn overlap(a: &LayerSpec, b: &LayerSpec) -> bool {
    a.key == b.key && a.start_percent < b.end_percent && b.start_percent < a.end_percent
}

impl SqlStore {
    /// The experiments of a flag set, in a write or read transaction.
    pub(super) async fn set_experiments(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        environment: &str,
        set_id: i64,
    ) -> Result<Vec<ExperimentRecord>> {
        let rows = sqlx::query(self.q.experiments_of_set)
            .bind(set_id)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter().map(|r| experiment_of(environment, r)).collect()
    }

    pub(super) async fn experiments(&self, environment: &str, page: PageRequest) -> Result<Page<ExperimentRecord>> {
        let mut tx = self.read().await?;
        let (env_id, _) = self.environment_id(&mut tx, environment).await?;
        let rows = sqlx::query(self.q.experiment_list)
            .bind(env_id)
            .bind(key_start(&page)?)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&mut *tx)
            .await?;
        let items = rows
            .iter()
            .map(|r| experiment_of(environment, r))
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |e| e.key.clone()))
    }

    pub(super) async fn experiment(&self, environment: &str, key: &str) -> Result<ExperimentRecord> {
        let mut tx = self.read().await?;
        let (env_id, _) = self.environment_id(&mut tx, environment).await?;
        sqlx::query(self.q.experiment_select)
            .bind(env_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| experiment_of(environment, &row))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("experiment `{environment}/{key}`")))
    }

    /// Creates (as a draft) or edits an experiment; the config version published, if anything
    /// changed. Once it has run, its allocation is locked: only its texts, metrics and traffic
    /// share may change (ramping traffic keeps every exposed unit's variant).
    pub(super) async fn write_experiment(
        &self,
        actor: &Actor,
        environment: &str,
        flag_set: &str,
        key: &str,
        input: ExperimentInput,
        precondition: Precondition,
    ) -> Result<Option<i64>> {
        item_key("experiment", key)?;
        check_input(&input)?;
        let mut w = self.begin_env_write(actor, environment).await?;
        let set = w.existing_set_row(flag_set).await?;
        let what = format!("experiment `{environment}/{key}`");
        let before = w.experiment(key).await?;
        expect(&what, precondition, before.as_ref().map(|e| e.version))?;
        let definition = match &before {
            None => {
                let id = new_id()?;
                let mut input = input;
                input.salt.get_or_insert_with(|| id.clone());
                ExperimentDefinition {
                    id,
                    status: ExperimentStatus::Draft,
                    winner: None,
                    started_at: None,
                    stopped_at: None,
                    input,
                }
            }
            Some(before) => {
                if before.flag_set != flag_set {
                    return Err(StoreError::AlreadyExists(format!(
                        "{what} (in flag set `{}`)",
                        before.flag_set
                    )));
                }
                let old = &before.definition;
                let mut input = input;
                let salt = input.salt.clone().unwrap_or_else(|| old.salt().to_owned());
                input.salt = Some(salt.clone());
                if old.status.allocation_locked()
                    && allocation_of(&input, &salt) != allocation_of(&old.input, old.salt())
                {
                    return Err(StoreError::FailedPrecondition(format!(
                        "{what} is {}: its flag, weights, salt, layer and audience are locked once it has run (its traffic, texts and metrics may change)",
                        old.status.as_str()
                    )));
                }
                ExperimentDefinition { input, ..old.clone() }
            }
        };
        check_against_flag(&mut w, set.1, flag_set, key, &definition).await?;
        let summary = format!("put experiment {flag_set}/{key}");
        w.apply_experiment(set.0, flag_set, key, before.as_ref(), Some(&definition))
            .await?;
        w.finish(&summary, None).await
    }

    /// Moves an experiment through its lifecycle; `winner` (paused or stopped only) is the variant
    /// then served to everyone.
    pub(super) async fn transition_experiment(
        &self,
        actor: &Actor,
        environment: &str,
        key: &str,
        to: ExperimentStatus,
        winner: Option<String>,
        precondition: Precondition,
    ) -> Result<Option<i64>> {
        let mut w = self.begin_env_write(actor, environment).await?;
        let what = format!("experiment `{environment}/{key}`");
        let before = w
            .experiment(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(what.clone()))?;
        expect(&what, precondition, Some(before.version))?;
        let from = before.definition.status;
        if from != to && !from.may_become(to) {
            return Err(StoreError::FailedPrecondition(format!(
                "{what} is {}: it cannot become {} (draft → running ⇄ paused → stopped → archived; a draft may be archived)",
                from.as_str(),
                to.as_str()
            )));
        }
        if winner.is_some() && !matches!(to, ExperimentStatus::Paused | ExperimentStatus::Stopped) {
            return Err(StoreError::invalid(
                "/winner",
                "a winner is chosen when pausing or stopping an experiment",
            ));
        }
        if let Some(w) = &winner
            && !before.definition.input.weights.iter().any(|v| &v.variant == w)
        {
            return Err(StoreError::invalid(
                "/winner",
                format!("`{w}` is not one of the experiment's variants"),
            ));
        }
        let mut definition = before.definition.clone();
        definition.status = to;
        definition.winner = match to {
            ExperimentStatus::Paused | ExperimentStatus::Stopped => winner.or(definition.winner),
            _ => None,
        };
        if to == ExperimentStatus::Running {
            definition.started_at.get_or_insert(w.now);
            definition.stopped_at = None;
        }
        if to == ExperimentStatus::Stopped && from != ExperimentStatus::Stopped {
            definition.stopped_at = Some(w.now);
        }
        if to == ExperimentStatus::Running && from != ExperimentStatus::Running {
            // Layer slices of experiments allocating at once must not overlap.
            if let Some(layer) = &definition.input.layer {
                for other in w.store.all_experiments(&mut w.tx, environment, w.env_id).await? {
                    let active = matches!(
                        other.definition.status,
                        ExperimentStatus::Running | ExperimentStatus::Paused
                    );
                    if other.key != key
                        && active
                        && other.definition.input.layer.as_ref().is_some_and(|l| overlap(l, layer))
                    {
                        return Err(StoreError::FailedPrecondition(format!(
                            "{what}'s slice of layer `{}` overlaps that of experiment `{}`, which is {}",
                            layer.key,
                            other.key,
                            other.definition.status.as_str()
                        )));
                    }
                }
            }
        }
        let set = w.existing_set_row(&before.flag_set).await?;
        let action = match to {
            ExperimentStatus::Running if from == ExperimentStatus::Paused => "resume",
            ExperimentStatus::Running => "start",
            ExperimentStatus::Paused => "pause",
            ExperimentStatus::Stopped => "stop",
            ExperimentStatus::Archived => "archive",
            ExperimentStatus::Draft => "update",
        };
        let summary = format!("{action} experiment {}/{key}", before.flag_set);
        let flag_set = before.flag_set.clone();
        w.apply_experiment(set.0, &flag_set, key, Some(&before), Some(&definition))
            .await?;
        w.finish(&summary, Some(action)).await
    }

    /// Deletes a draft or archived experiment.
    pub(super) async fn remove_experiment(
        &self,
        actor: &Actor,
        environment: &str,
        key: &str,
        precondition: Precondition,
    ) -> Result<Option<i64>> {
        let mut w = self.begin_env_write(actor, environment).await?;
        let what = format!("experiment `{environment}/{key}`");
        let before = w
            .experiment(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(what.clone()))?;
        expect(&what, precondition, Some(before.version))?;
        if !matches!(
            before.definition.status,
            ExperimentStatus::Draft | ExperimentStatus::Archived
        ) {
            return Err(StoreError::FailedPrecondition(format!(
                "{what} is {}: only a draft or an archived experiment may be deleted (stop and archive it first)",
                before.definition.status.as_str()
            )));
        }
        let set = w.existing_set_row(&before.flag_set).await?;
        let flag_set = before.flag_set.clone();
        let summary = format!("delete experiment {flag_set}/{key}");
        w.apply_experiment(set.0, &flag_set, key, Some(&before), None).await?;
        w.finish(&summary, None).await
    }

    async fn all_experiments(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        environment: &str,
        env_id: i64,
    ) -> Result<Vec<ExperimentRecord>> {
        let rows = sqlx::query(self.q.experiment_list)
            .bind(env_id)
            .bind("")
            .bind(i64::MAX)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter().map(|r| experiment_of(environment, r)).collect()
    }
}

/// Checks a draft (as if it ran) against its flag: the flag exists and has the weighted variants,
/// and the audience compiles. A running experiment is checked again with the whole flag set when
/// the write finishes.
async fn check_against_flag(
    w: &mut EnvWrite<'_>,
    set: FlagSet,
    flag_set: &str,
    key: &str,
    definition: &ExperimentDefinition,
) -> Result<()> {
    let Some(flag) = w.flag_in(&set, flag_set, &definition.input.flag).await? else {
        return Err(StoreError::invalid(
            "/flag",
            format!("flag `{flag_set}/{}` does not exist", definition.input.flag),
        ));
    };
    let mut doc = SetDocument {
        metadata: set.metadata.clone(),
        ..SetDocument::default()
    };
    doc.flags.insert(flag.key, flag.definition);
    doc.segments = w.segments_of(&set).await?;
    if let Some(form) = core_form(definition, true) {
        doc.experiments.insert(key.to_owned(), form);
    }
    doc.check().map_err(|e| match e {
        // Pointers into the document's `$experiments/<key>` become pointers into the input.
        StoreError::Invalid(problems) => StoreError::Invalid(
            problems
                .into_iter()
                .map(|p| {
                    let prefix = format!("/$experiments/{}", vexil_core::parse::escape_pointer(key));
                    let pointer = match p.pointer.strip_prefix(&prefix) {
                        Some(rest) => rest.replace("/traffic", "/trafficPercent"),
                        None => p.pointer,
                    };
                    crate::Problem { pointer, ..p }
                })
                .collect(),
        ),
        other => other,
    })
}

impl EnvWrite<'_> {
    /// The experiment `key` of this environment, as stored.
    pub(super) async fn experiment(&mut self, key: &str) -> Result<Option<ExperimentRecord>> {
        sqlx::query(self.store.q.experiment_select)
            .bind(self.env_id)
            .bind(key)
            .fetch_optional(&mut *self.tx)
            .await?
            .map(|row| experiment_of(&self.environment, &row))
            .transpose()
    }

    /// Creates, replaces or (with `None`) deletes an experiment, `before` being what is stored.
    pub(super) async fn apply_experiment(
        &mut self,
        set_id: i64,
        flag_set: &str,
        key: &str,
        before: Option<&ExperimentRecord>,
        after: Option<&ExperimentDefinition>,
    ) -> Result<()> {
        let before_body = before.map(|e| experiment_body(&e.definition));
        let after_body = after.map(experiment_body);
        if before_body == after_body {
            return Ok(());
        }
        match &after_body {
            None => {
                sqlx::query(self.store.q.experiment_delete)
                    .bind(self.env_id)
                    .bind(key)
                    .execute(&mut *self.tx)
                    .await?;
            }
            Some(body) if before.is_some() => {
                sqlx::query(self.store.q.experiment_update)
                    .bind(self.env_id)
                    .bind(key)
                    .bind(body.to_string())
                    .bind(&self.actor)
                    .bind(self.now)
                    .execute(&mut *self.tx)
                    .await?;
            }
            Some(body) => {
                sqlx::query(self.store.q.experiment_insert)
                    .bind(self.env_id)
                    .bind(set_id)
                    .bind(key)
                    .bind(body.to_string())
                    .bind(&self.actor)
                    .bind(self.now)
                    .execute(&mut *self.tx)
                    .await?;
            }
        }
        self.record_change(flag_set, EntityKind::Experiment, key, before_body, after_body);
        Ok(())
    }

    /// Writes an experiment back to a body from the history (`None`: absent); nothing when its
    /// flag set is gone.
    pub(super) async fn restore_experiment(&mut self, flag_set: &str, key: &str, body: Option<&Value>) -> Result<()> {
        let Some((set_id, _)) = self.set_row_of(flag_set).await? else {
            return Ok(());
        };
        let before = self.experiment(key).await?;
        let after = body.map(definition_of).transpose()?;
        self.apply_experiment(set_id, flag_set, key, before.as_ref(), after.as_ref())
            .await
    }
}
