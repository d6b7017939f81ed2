//! Environments, flag sets, flags and segments: reads, and the writes that publish config versions.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, expect, json, key_start, now, page_of, stamp, to_text};
use crate::error::StoreError;
use crate::model::*;
use crate::validate::{SetDocument, flag_body, flag_set_body, item_key, scope_key, segment_body};
use crate::{Backend, Result};

/// How many rows "all of them" is in a paged query.
const ALL: i64 = i64::MAX;

fn environment_of(row: &AnyRow) -> Result<Environment> {
    Ok(Environment {
        key: row.try_get(0)?,
        name: row.try_get(1)?,
        description: row.try_get(2)?,
        config_version: row.try_get(3)?,
        version: row.try_get(4)?,
        created: stamp(row, 5)?,
        updated: stamp(row, 7)?,
    })
}

/// A flag set row: its id and the record.
struct SetRow {
    id: i64,
    set: FlagSet,
}

fn flag_set_of(environment: &str, row: &AnyRow) -> Result<SetRow> {
    let metadata = match json(row, 4)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Ok(SetRow {
        id: row.try_get(0)?,
        set: FlagSet {
            environment: environment.to_owned(),
            key: row.try_get(1)?,
            name: row.try_get(2)?,
            description: row.try_get(3)?,
            metadata,
            version: row.try_get(5)?,
            created: stamp(row, 6)?,
            updated: stamp(row, 8)?,
        },
    })
}

fn flag_of(environment: &str, flag_set: &str, row: &AnyRow) -> Result<FlagRecord> {
    let tags = match json(row, 4)? {
        Value::Array(tags) => tags.into_iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    Ok(FlagRecord {
        environment: environment.to_owned(),
        flag_set: flag_set.to_owned(),
        key: row.try_get(0)?,
        definition: json(row, 1)?,
        description: row.try_get(2)?,
        owner: row.try_get(3)?,
        tags,
        version: row.try_get(5)?,
        created: stamp(row, 6)?,
        updated: stamp(row, 8)?,
    })
}

fn segment_of(environment: &str, flag_set: &str, row: &AnyRow) -> Result<SegmentRecord> {
    Ok(SegmentRecord {
        environment: environment.to_owned(),
        flag_set: flag_set.to_owned(),
        key: row.try_get(0)?,
        rule: json(row, 1)?,
        description: row.try_get(2)?,
        version: row.try_get(3)?,
        created: stamp(row, 4)?,
        updated: stamp(row, 6)?,
    })
}

impl FlagRecord {
    fn input(&self) -> FlagInput {
        FlagInput {
            definition: self.definition.clone(),
            description: self.description.clone(),
            owner: self.owner.clone(),
            tags: self.tags.clone(),
        }
    }
}

fn flag_input_body(input: &FlagInput) -> Value {
    flag_body(&input.definition, &input.description, &input.owner, &input.tags)
}

/// A flag, segment or flag set body from the history, back as the input that writes it.
fn flag_input_of(body: &Value) -> FlagInput {
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    FlagInput {
        definition: body.get("definition").cloned().unwrap_or(Value::Null),
        description: text("description"),
        owner: text("owner"),
        tags: body
            .get("tags")
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
    }
}

fn segment_input_of(body: &Value) -> SegmentInput {
    SegmentInput {
        rule: body.get("rule").cloned().unwrap_or(Value::Null),
        description: body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}

fn flag_set_input_of(body: &Value) -> FlagSetInput {
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    FlagSetInput {
        name: text("name"),
        description: text("description"),
        metadata: body
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
    }
}

/// What of a flag set a write touched, so what must be validated before it commits.
#[derive(Debug, Default)]
struct Touched {
    /// Segments or metadata changed: every flag must be checked against them.
    whole: bool,
    /// Flags written.
    flags: BTreeSet<String>,
}

/// A write to one environment's configuration, inside its transaction: the environment locked,
/// its next config version taken; what it changes is collected and validated, then recorded with
/// the version, the audit log and the outbox ([`EnvWrite::finish`]). Dropped without `finish`,
/// the transaction rolls back and nothing is stored.
pub(super) struct EnvWrite<'s> {
    pub(super) store: &'s SqlStore,
    pub(super) tx: Transaction<'static, Any>,
    pub(super) env_id: i64,
    pub(super) environment: String,
    pub(super) version: i64,
    pub(super) actor: String,
    pub(super) now: Millis,
    changes: Vec<Change>,
    touched: BTreeMap<String, Touched>,
    /// Sets validated as a whole already (an import's document).
    checked: BTreeSet<String>,
}

impl SqlStore {
    /// Starts a configuration write to `environment`, taking its lock.
    pub(super) async fn begin_env_write(&self, actor: &Actor, environment: &str) -> Result<EnvWrite<'_>> {
        let tx = self.write().await?;
        self.lock_environment(tx, actor, environment).await
    }

    /// Locks `environment` in `tx` and takes its next config version.
    async fn lock_environment(
        &self,
        mut tx: Transaction<'static, Any>,
        actor: &Actor,
        environment: &str,
    ) -> Result<EnvWrite<'_>> {
        let row = sqlx::query(self.q.environment_lock)
            .bind(environment)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("environment `{environment}`")))?;
        Ok(EnvWrite {
            store: self,
            tx,
            env_id: row.try_get(0)?,
            environment: environment.to_owned(),
            version: row.try_get(1)?,
            actor: actor.0.clone(),
            now: now(),
            changes: Vec::new(),
            touched: BTreeMap::new(),
            checked: BTreeSet::new(),
        })
    }

    /// The id of an environment, for reads.
    pub(super) async fn environment_id(
        &self,
        tx: &mut Transaction<'static, Any>,
        environment: &str,
    ) -> Result<(i64, i64)> {
        let row = sqlx::query(self.q.environment_id)
            .bind(environment)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("environment `{environment}`")))?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    async fn set_row(
        &self,
        tx: &mut Transaction<'static, Any>,
        env_id: i64,
        environment: &str,
        key: &str,
    ) -> Result<Option<SetRow>> {
        sqlx::query(self.q.flag_set_select)
            .bind(env_id)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?
            .map(|row| flag_set_of(environment, &row))
            .transpose()
    }

    /// A flag set that must exist, for reads.
    async fn existing_set(&self, tx: &mut Transaction<'static, Any>, environment: &str, key: &str) -> Result<SetRow> {
        let (env_id, _) = self.environment_id(tx, environment).await?;
        self.set_row(tx, env_id, environment, key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("flag set `{environment}/{key}`")))
    }

    async fn all_flags(
        &self,
        tx: &mut Transaction<'static, Any>,
        set: &FlagSet,
        set_id: i64,
    ) -> Result<Vec<FlagRecord>> {
        let rows = sqlx::query(self.q.flag_list)
            .bind(set_id)
            .bind("")
            .bind(ALL)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter().map(|r| flag_of(&set.environment, &set.key, r)).collect()
    }

    async fn all_segments(
        &self,
        tx: &mut Transaction<'static, Any>,
        set: &FlagSet,
        set_id: i64,
    ) -> Result<Vec<SegmentRecord>> {
        let rows = sqlx::query(self.q.segment_list)
            .bind(set_id)
            .bind("")
            .bind(ALL)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter().map(|r| segment_of(&set.environment, &set.key, r)).collect()
    }

    pub(super) async fn environments(&self, page: PageRequest) -> Result<Page<Environment>> {
        let rows = sqlx::query(self.q.environment_list)
            .bind(key_start(&page)?)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = rows.iter().map(environment_of).collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |e| e.key.clone()))
    }

    pub(super) async fn environment(&self, key: &str) -> Result<Environment> {
        let row = sqlx::query(self.q.environment_select)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("environment `{key}`")))?;
        environment_of(&row)
    }

    pub(super) async fn insert_environment(
        &self,
        actor: &Actor,
        key: &str,
        input: EnvironmentInput,
    ) -> Result<Environment> {
        scope_key("environment", key)?;
        let mut tx = self.write().await?;
        if !self.create_environment_in(&mut tx, actor, key, input, now()).await? {
            return Err(StoreError::AlreadyExists(format!("environment `{key}`")));
        }
        tx.commit().await?;
        self.environment(key).await
    }

    /// Inserts an environment unless it exists (with its audit entry); whether it was created.
    async fn create_environment_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        actor: &Actor,
        key: &str,
        input: EnvironmentInput,
        at: Millis,
    ) -> Result<bool> {
        let name = if input.name.is_empty() { key } else { &input.name };
        let created = sqlx::query(self.q.environment_insert)
            .bind(key)
            .bind(name)
            .bind(&input.description)
            .bind(&actor.0)
            .bind(at)
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
        if created {
            let after = serde_json::json!({"name": name, "description": input.description});
            self.audit_in(
                tx,
                at,
                actor,
                "create",
                Some(key),
                "environment",
                key,
                None,
                None,
                Some(&after),
            )
            .await?;
        }
        Ok(created)
    }

    pub(super) async fn change_environment(
        &self,
        actor: &Actor,
        key: &str,
        input: EnvironmentInput,
        precondition: Precondition,
    ) -> Result<Environment> {
        let mut tx = self.write().await?;
        let before = sqlx::query(self.q.environment_select)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| environment_of(&row))
            .transpose()?;
        let what = format!("environment `{key}`");
        let Some(before) = before else {
            return Err(StoreError::NotFound(what));
        };
        expect(&what, precondition, Some(before.version))?;
        let name = if input.name.is_empty() { key } else { &input.name };
        let at = now();
        sqlx::query(self.q.environment_update)
            .bind(key)
            .bind(name)
            .bind(&input.description)
            .bind(&actor.0)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        let old = serde_json::json!({"name": before.name, "description": before.description});
        let new = serde_json::json!({"name": name, "description": input.description});
        self.audit_in(
            &mut tx,
            at,
            actor,
            "update",
            Some(key),
            "environment",
            key,
            None,
            Some(&old),
            Some(&new),
        )
        .await?;
        tx.commit().await?;
        self.environment(key).await
    }

    pub(super) async fn remove_environment(&self, actor: &Actor, key: &str, precondition: Precondition) -> Result<()> {
        let mut tx = self.write().await?;
        let before = sqlx::query(self.q.environment_select)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| environment_of(&row))
            .transpose()?;
        let what = format!("environment `{key}`");
        let Some(before) = before else {
            return Err(StoreError::NotFound(what));
        };
        expect(&what, precondition, Some(before.version))?;
        let at = now();
        sqlx::query(self.q.environment_delete)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let old = serde_json::json!({"name": before.name, "description": before.description, "config_version": before.config_version});
        self.audit_in(
            &mut tx,
            at,
            actor,
            "delete",
            Some(key),
            "environment",
            key,
            None,
            Some(&old),
            None,
        )
        .await?;
        // Servers following the store drop the environment's flag sets when it is gone.
        self.announce(&mut tx, key, before.config_version + 1, at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// An outbox row for `version` of `environment`, and on Postgres a notification at commit.
    pub(super) async fn announce(
        &self,
        tx: &mut Transaction<'static, Any>,
        environment: &str,
        version: i64,
        at: Millis,
    ) -> Result<()> {
        sqlx::query(self.q.outbox_insert)
            .bind(environment)
            .bind(version)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        if self.backend == Backend::Postgres {
            sqlx::query(self.q.notify)
                .bind(format!("{environment}:{version}"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    pub(super) async fn flag_sets(&self, environment: &str, page: PageRequest) -> Result<Page<FlagSet>> {
        let mut tx = self.read().await?;
        let (env_id, _) = self.environment_id(&mut tx, environment).await?;
        let rows = sqlx::query(self.q.flag_set_list)
            .bind(env_id)
            .bind(key_start(&page)?)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&mut *tx)
            .await?;
        let items = rows
            .iter()
            .map(|r| flag_set_of(environment, r).map(|s| s.set))
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |s| s.key.clone()))
    }

    pub(super) async fn flag_set(&self, environment: &str, key: &str) -> Result<FlagSet> {
        let mut tx = self.read().await?;
        Ok(self.existing_set(&mut tx, environment, key).await?.set)
    }

    pub(super) async fn write_flag_set(
        &self,
        actor: &Actor,
        environment: &str,
        key: &str,
        input: Option<FlagSetInput>,
        precondition: Precondition,
    ) -> Result<Written<FlagSet>> {
        scope_key("flag set", key)?;
        let mut w = self.begin_env_write(actor, environment).await?;
        let before = w.set(key).await?;
        expect(
            &format!("flag set `{environment}/{key}`"),
            precondition,
            before.as_ref().map(|s| s.set.version),
        )?;
        let deleting = input.is_none();
        if deleting && before.is_none() {
            return Err(StoreError::NotFound(format!("flag set `{environment}/{key}`")));
        }
        w.apply_flag_set(key, input).await?;
        let summary = format!("{} flag set {key}", if deleting { "delete" } else { "put" });
        let after = w.set(key).await?;
        let config_version = w.finish(&summary, None).await?;
        let value = match after {
            Some(row) => row.set,
            None => before
                .map(|b| b.set)
                .ok_or_else(|| StoreError::NotFound(format!("flag set `{environment}/{key}`")))?,
        };
        Ok(Written { value, config_version })
    }

    pub(super) async fn flags(&self, environment: &str, flag_set: &str, page: PageRequest) -> Result<Page<FlagRecord>> {
        self.list_in_set(environment, flag_set, page, self.q.flag_list, flag_of, |f| {
            f.key.clone()
        })
        .await
    }

    pub(super) async fn flag(&self, environment: &str, flag_set: &str, key: &str) -> Result<FlagRecord> {
        self.get_in_set(environment, flag_set, key, "flag", self.q.flag_select, flag_of)
            .await
    }

    /// One page of the rows `query` lists in a flag set, decoded by `decode`.
    async fn list_in_set<T>(
        &self,
        environment: &str,
        flag_set: &str,
        page: PageRequest,
        query: &'static str,
        decode: fn(&str, &str, &AnyRow) -> Result<T>,
        key: fn(&T) -> String,
    ) -> Result<Page<T>> {
        let mut tx = self.read().await?;
        let set = self.existing_set(&mut tx, environment, flag_set).await?;
        let rows = sqlx::query(query)
            .bind(set.id)
            .bind(key_start(&page)?)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&mut *tx)
            .await?;
        let items = rows
            .iter()
            .map(|r| decode(environment, flag_set, r))
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), key))
    }

    /// The row `query` selects by key in a flag set (a `what`), decoded by `decode`.
    async fn get_in_set<T>(
        &self,
        environment: &str,
        flag_set: &str,
        key: &str,
        what: &str,
        query: &'static str,
        decode: fn(&str, &str, &AnyRow) -> Result<T>,
    ) -> Result<T> {
        let mut tx = self.read().await?;
        let set = self.existing_set(&mut tx, environment, flag_set).await?;
        sqlx::query(query)
            .bind(set.id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| decode(environment, flag_set, &row))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("{what} `{environment}/{flag_set}/{key}`")))
    }

    /// Writes (or with `None` deletes) a flag; the config version published, if anything changed.
    pub(super) async fn write_flag(
        &self,
        actor: &Actor,
        environment: &str,
        flag_set: &str,
        key: &str,
        input: Option<FlagInput>,
        precondition: Precondition,
    ) -> Result<Option<i64>> {
        item_key("flag", key)?;
        if let Some(input) = &input {
            check_flag_input(input)?;
        }
        let mut w = self.begin_env_write(actor, environment).await?;
        let set = w.existing_set(flag_set).await?;
        let what = format!("flag `{environment}/{flag_set}/{key}`");
        let before = w.flag(set.id, flag_set, key).await?;
        expect(&what, precondition, before.as_ref().map(|f| f.version))?;
        if input.is_none() && before.is_none() {
            return Err(StoreError::NotFound(what));
        }
        let summary = format!(
            "{} flag {flag_set}/{key}",
            if input.is_some() { "put" } else { "delete" }
        );
        w.apply_flag(set.id, flag_set, key, before, input).await?;
        w.finish(&summary, None).await
    }

    pub(super) async fn check_flag(
        &self,
        environment: &str,
        flag_set: &str,
        key: &str,
        input: &FlagInput,
    ) -> Result<()> {
        item_key("flag", key)?;
        check_flag_input(input)?;
        let mut tx = self.read().await?;
        let set = self.existing_set(&mut tx, environment, flag_set).await?;
        let segments = self.all_segments(&mut tx, &set.set, set.id).await?;
        let mut doc = SetDocument {
            metadata: set.set.metadata.clone(),
            ..SetDocument::default()
        };
        doc.flags.insert(key.to_owned(), input.definition.clone());
        doc.segments = segments.into_iter().map(|s| (s.key, s.rule)).collect();
        doc.check()
    }

    pub(super) async fn segments(
        &self,
        environment: &str,
        flag_set: &str,
        page: PageRequest,
    ) -> Result<Page<SegmentRecord>> {
        self.list_in_set(environment, flag_set, page, self.q.segment_list, segment_of, |s| {
            s.key.clone()
        })
        .await
    }

    pub(super) async fn segment(&self, environment: &str, flag_set: &str, key: &str) -> Result<SegmentRecord> {
        self.get_in_set(environment, flag_set, key, "segment", self.q.segment_select, segment_of)
            .await
    }

    pub(super) async fn write_segment(
        &self,
        actor: &Actor,
        environment: &str,
        flag_set: &str,
        key: &str,
        input: Option<SegmentInput>,
        precondition: Precondition,
    ) -> Result<Option<i64>> {
        item_key("segment", key)?;
        let mut w = self.begin_env_write(actor, environment).await?;
        let set = w.existing_set(flag_set).await?;
        let what = format!("segment `{environment}/{flag_set}/{key}`");
        let before = w.segment(set.id, flag_set, key).await?;
        expect(&what, precondition, before.as_ref().map(|s| s.version))?;
        if input.is_none() && before.is_none() {
            return Err(StoreError::NotFound(what));
        }
        let summary = format!(
            "{} segment {flag_set}/{key}",
            if input.is_some() { "put" } else { "delete" }
        );
        w.apply_segment(set.id, flag_set, key, before, input).await?;
        w.finish(&summary, None).await
    }

    pub(super) async fn import_document(
        &self,
        actor: &Actor,
        environment: &str,
        flag_set: &str,
        document: &Value,
    ) -> Result<Written<ImportSummary>> {
        scope_key("environment", environment)?;
        scope_key("flag set", flag_set)?;
        let content = SetDocument::from_document(document)?;
        // The environment is created in the same transaction when it is missing.
        let mut tx = self.write().await?;
        self.create_environment_in(&mut tx, actor, environment, EnvironmentInput::default(), now())
            .await?;
        let mut w = self.lock_environment(tx, actor, environment).await?;
        let set_input = match w.set(flag_set).await? {
            Some(row) => FlagSetInput {
                name: row.set.name,
                description: row.set.description,
                metadata: content.metadata.clone(),
            },
            None => FlagSetInput {
                name: flag_set.to_owned(),
                description: String::new(),
                metadata: content.metadata.clone(),
            },
        };
        w.apply_flag_set(flag_set, Some(set_input)).await?;
        let set = w.existing_set(flag_set).await?;
        let flags = w.store.all_flags(&mut w.tx, &set.set, set.id).await?;
        let segments = w.store.all_segments(&mut w.tx, &set.set, set.id).await?;
        let mut current_flags: BTreeMap<String, FlagRecord> = flags.into_iter().map(|f| (f.key.clone(), f)).collect();
        let mut current_segments: BTreeMap<String, SegmentRecord> =
            segments.into_iter().map(|s| (s.key.clone(), s)).collect();
        for (key, rule) in &content.segments {
            let before = current_segments.remove(key);
            let description = before.as_ref().map(|s| s.description.clone()).unwrap_or_default();
            let input = SegmentInput {
                rule: rule.clone(),
                description,
            };
            w.apply_segment(set.id, flag_set, key, before, Some(input)).await?;
        }
        for (key, definition) in &content.flags {
            let before = current_flags.remove(key);
            let mut input = before
                .as_ref()
                .map_or_else(|| FlagInput::new(Value::Null), FlagRecord::input);
            input.definition = definition.clone();
            w.apply_flag(set.id, flag_set, key, before, Some(input)).await?;
        }
        for (key, before) in current_flags {
            w.apply_flag(set.id, flag_set, &key, Some(before), None).await?;
        }
        for (key, before) in current_segments {
            w.apply_segment(set.id, flag_set, &key, Some(before), None).await?;
        }
        w.checked.insert(flag_set.to_owned());
        let changed = w.changes.len();
        let summary = format!("import flag set {flag_set} ({changed} changes)");
        let config_version = w.finish(&summary, Some("import")).await?;
        Ok(Written {
            value: ImportSummary {
                flags: content.flags.len(),
                segments: content.segments.len(),
                changed,
            },
            config_version,
        })
    }

    pub(super) async fn export_document(&self, environment: &str, flag_set: &str) -> Result<Value> {
        let mut tx = self.read().await?;
        let set = self.existing_set(&mut tx, environment, flag_set).await?;
        let flags = self.all_flags(&mut tx, &set.set, set.id).await?;
        let segments = self.all_segments(&mut tx, &set.set, set.id).await?;
        let doc = SetDocument {
            metadata: set.set.metadata,
            flags: flags.into_iter().map(|f| (f.key, f.definition)).collect(),
            segments: segments.into_iter().map(|s| (s.key, s.rule)).collect(),
            experiments: Map::new(),
        };
        Ok(doc.to_document(None))
    }

    pub(super) async fn environment_snapshot(&self, environment: &str) -> Result<EnvironmentSnapshot> {
        let mut tx = self.read().await?;
        let (env_id, config_version) = self.environment_id(&mut tx, environment).await?;
        let mut sets: BTreeMap<String, SetDocument> = BTreeMap::new();
        for row in sqlx::query(self.q.snapshot_flag_sets)
            .bind(env_id)
            .fetch_all(&mut *tx)
            .await?
        {
            let metadata = match json(&row, 1)? {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            sets.insert(
                row.try_get(0)?,
                SetDocument {
                    metadata,
                    ..SetDocument::default()
                },
            );
        }
        for row in sqlx::query(self.q.snapshot_flags)
            .bind(env_id)
            .fetch_all(&mut *tx)
            .await?
        {
            let set: String = row.try_get(0)?;
            if let Some(doc) = sets.get_mut(&set) {
                doc.flags.insert(row.try_get(1)?, json(&row, 2)?);
            }
        }
        for row in sqlx::query(self.q.snapshot_segments)
            .bind(env_id)
            .fetch_all(&mut *tx)
            .await?
        {
            let set: String = row.try_get(0)?;
            if let Some(doc) = sets.get_mut(&set) {
                doc.segments.insert(row.try_get(1)?, json(&row, 2)?);
            }
        }
        for row in sqlx::query(self.q.snapshot_experiments)
            .bind(env_id)
            .fetch_all(&mut *tx)
            .await?
        {
            let set: String = row.try_get(0)?;
            let key: String = row.try_get(1)?;
            let definition = super::experiments::definition_of(&json(&row, 2)?)?;
            if let Some(doc) = sets.get_mut(&set)
                && let Some(form) = super::experiments::core_form(&definition, false)
            {
                doc.experiments.insert(key, form);
            }
        }
        tx.commit().await?;
        Ok(EnvironmentSnapshot {
            environment: environment.to_owned(),
            config_version,
            flag_sets: sets
                .into_iter()
                .map(|(key, doc)| {
                    let document = doc.to_document(Some(format!("{environment}/{key}")));
                    (key, std::sync::Arc::new(document))
                })
                .collect(),
        })
    }
}

/// A flag's input on its own: the definition must be an object; tags short and few.
fn check_flag_input(input: &FlagInput) -> Result<()> {
    if !input.definition.is_object() {
        return Err(StoreError::invalid(
            "/definition",
            "a flag's definition is a JSON object (flagd's flag)",
        ));
    }
    if input.tags.len() > 64 || input.tags.iter().any(|t| t.is_empty() || t.len() > 64) {
        return Err(StoreError::invalid("/tags", "at most 64 tags of 1 to 64 bytes"));
    }
    Ok(())
}

impl EnvWrite<'_> {
    pub(super) fn version(&self) -> i64 {
        self.version
    }

    pub(super) fn env_id(&self) -> i64 {
        self.env_id
    }

    pub(super) fn tx(&mut self) -> &mut Transaction<'static, Any> {
        &mut self.tx
    }

    async fn set(&mut self, key: &str) -> Result<Option<SetRow>> {
        self.store
            .set_row(&mut self.tx, self.env_id, &self.environment, key)
            .await
    }

    async fn existing_set(&mut self, key: &str) -> Result<SetRow> {
        let environment = self.environment.clone();
        self.set(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("flag set `{environment}/{key}`")))
    }

    async fn flag(&mut self, set_id: i64, flag_set: &str, key: &str) -> Result<Option<FlagRecord>> {
        sqlx::query(self.store.q.flag_select)
            .bind(set_id)
            .bind(key)
            .fetch_optional(&mut *self.tx)
            .await?
            .map(|row| flag_of(&self.environment, flag_set, &row))
            .transpose()
    }

    async fn segment(&mut self, set_id: i64, flag_set: &str, key: &str) -> Result<Option<SegmentRecord>> {
        sqlx::query(self.store.q.segment_select)
            .bind(set_id)
            .bind(key)
            .fetch_optional(&mut *self.tx)
            .await?
            .map(|row| segment_of(&self.environment, flag_set, &row))
            .transpose()
    }

    fn record(&mut self, flag_set: &str, kind: EntityKind, key: &str, before: Option<Value>, after: Option<Value>) {
        let touched = self.touched.entry(flag_set.to_owned()).or_default();
        match kind {
            EntityKind::Flag => {
                touched.flags.insert(key.to_owned());
            }
            EntityKind::Segment | EntityKind::FlagSet | EntityKind::Experiment => touched.whole = true,
        }
        self.changes.push(Change {
            flag_set: flag_set.to_owned(),
            kind,
            key: key.to_owned(),
            before,
            after,
        });
    }

    /// Creates, updates or (with `None`) deletes a flag set's own row; deleting takes its flags
    /// and segments with it, each recorded so a rollback restores them.
    pub(super) async fn apply_flag_set(&mut self, key: &str, input: Option<FlagSetInput>) -> Result<()> {
        let before = self.set(key).await?;
        let before_body = before
            .as_ref()
            .map(|b| flag_set_body(&b.set.name, &b.set.description, &b.set.metadata));
        match (&before, input) {
            (None, None) => {}
            (Some(row), None) => {
                let flags = self.store.all_flags(&mut self.tx, &row.set, row.id).await?;
                let segments = self.store.all_segments(&mut self.tx, &row.set, row.id).await?;
                for flag in flags {
                    let body = flag_input_body(&flag.input());
                    self.record(key, EntityKind::Flag, &flag.key, Some(body), None);
                }
                for segment in segments {
                    let body = segment_body(&segment.rule, &segment.description);
                    self.record(key, EntityKind::Segment, &segment.key, Some(body), None);
                }
                for experiment in self
                    .store
                    .set_experiments(&mut self.tx, &self.environment, row.id)
                    .await?
                {
                    let body = super::experiments::experiment_body(&experiment.definition);
                    self.record(key, EntityKind::Experiment, &experiment.key, Some(body), None);
                }
                sqlx::query(self.store.q.flag_set_delete)
                    .bind(self.env_id)
                    .bind(key)
                    .execute(&mut *self.tx)
                    .await?;
                self.record(key, EntityKind::FlagSet, key, before_body, None);
            }
            (before, Some(input)) => {
                let name = if input.name.is_empty() {
                    key.to_owned()
                } else {
                    input.name
                };
                let after = flag_set_body(&name, &input.description, &input.metadata);
                if before_body.as_ref() == Some(&after) {
                    return Ok(());
                }
                let query = if before.is_some() {
                    self.store.q.flag_set_update
                } else {
                    self.store.q.flag_set_insert
                };
                sqlx::query(query)
                    .bind(self.env_id)
                    .bind(key)
                    .bind(&name)
                    .bind(&input.description)
                    .bind(to_text(&Value::Object(input.metadata)))
                    .bind(&self.actor)
                    .bind(self.now)
                    .execute(&mut *self.tx)
                    .await?;
                self.record(key, EntityKind::FlagSet, key, before_body, Some(after));
            }
        }
        Ok(())
    }

    /// Creates, replaces or (with `None`) deletes a flag, `before` being what is stored.
    pub(super) async fn apply_flag(
        &mut self,
        set_id: i64,
        flag_set: &str,
        key: &str,
        before: Option<FlagRecord>,
        input: Option<FlagInput>,
    ) -> Result<()> {
        let before_body = before.as_ref().map(|f| flag_input_body(&f.input()));
        let after_body = input.as_ref().map(flag_input_body);
        if before_body == after_body {
            return Ok(());
        }
        match input {
            None => {
                sqlx::query(self.store.q.flag_delete)
                    .bind(set_id)
                    .bind(key)
                    .execute(&mut *self.tx)
                    .await?;
            }
            Some(input) => {
                let query = if before.is_some() {
                    self.store.q.flag_update
                } else {
                    self.store.q.flag_insert
                };
                sqlx::query(query)
                    .bind(set_id)
                    .bind(key)
                    .bind(to_text(&input.definition))
                    .bind(&input.description)
                    .bind(&input.owner)
                    .bind(to_text(&Value::from(input.tags)))
                    .bind(&self.actor)
                    .bind(self.now)
                    .execute(&mut *self.tx)
                    .await?;
            }
        }
        self.record(flag_set, EntityKind::Flag, key, before_body, after_body);
        Ok(())
    }

    /// Creates, replaces or (with `None`) deletes a segment, `before` being what is stored.
    pub(super) async fn apply_segment(
        &mut self,
        set_id: i64,
        flag_set: &str,
        key: &str,
        before: Option<SegmentRecord>,
        input: Option<SegmentInput>,
    ) -> Result<()> {
        let before_body = before.as_ref().map(|s| segment_body(&s.rule, &s.description));
        let after_body = input.as_ref().map(|s| segment_body(&s.rule, &s.description));
        if before_body == after_body {
            return Ok(());
        }
        match input {
            None => {
                sqlx::query(self.store.q.segment_delete)
                    .bind(set_id)
                    .bind(key)
                    .execute(&mut *self.tx)
                    .await?;
            }
            Some(input) => {
                let query = if before.is_some() {
                    self.store.q.segment_update
                } else {
                    self.store.q.segment_insert
                };
                sqlx::query(query)
                    .bind(set_id)
                    .bind(key)
                    .bind(to_text(&input.rule))
                    .bind(&input.description)
                    .bind(&self.actor)
                    .bind(self.now)
                    .execute(&mut *self.tx)
                    .await?;
            }
        }
        self.record(flag_set, EntityKind::Segment, key, before_body, after_body);
        Ok(())
    }

    /// Writes an entity back to a body from the history (`None`: absent).
    pub(super) async fn restore(
        &mut self,
        flag_set: &str,
        kind: EntityKind,
        key: &str,
        body: Option<&Value>,
    ) -> Result<()> {
        match kind {
            EntityKind::FlagSet => self.apply_flag_set(key, body.map(flag_set_input_of)).await,
            EntityKind::Experiment => self.restore_experiment(flag_set, key, body).await,
            EntityKind::Flag | EntityKind::Segment => {
                let Some(set) = self.set(flag_set).await? else {
                    // The set is gone, and everything in it with it.
                    return Ok(());
                };
                if kind == EntityKind::Flag {
                    let before = self.flag(set.id, flag_set, key).await?;
                    self.apply_flag(set.id, flag_set, key, before, body.map(flag_input_of))
                        .await
                } else {
                    let before = self.segment(set.id, flag_set, key).await?;
                    self.apply_segment(set.id, flag_set, key, before, body.map(segment_input_of))
                        .await
                }
            }
        }
    }

    /// A flag set that must exist: its id and row.
    pub(super) async fn existing_set_row(&mut self, key: &str) -> Result<(i64, FlagSet)> {
        let row = self.existing_set(key).await?;
        Ok((row.id, row.set))
    }

    /// A flag set's id and row, if it exists.
    pub(super) async fn set_row_of(&mut self, key: &str) -> Result<Option<(i64, FlagSet)>> {
        Ok(self.set(key).await?.map(|row| (row.id, row.set)))
    }

    /// A flag of a set, as stored now.
    pub(super) async fn flag_in(&mut self, set: &FlagSet, flag_set: &str, key: &str) -> Result<Option<FlagRecord>> {
        let Some(row) = self.set(&set.key).await? else {
            return Ok(None);
        };
        self.flag(row.id, flag_set, key).await
    }

    /// A set's segments as flagd's `$evaluators`.
    pub(super) async fn segments_of(&mut self, set: &FlagSet) -> Result<Map<String, Value>> {
        let Some(row) = self.set(&set.key).await? else {
            return Ok(Map::new());
        };
        let segments = self.store.all_segments(&mut self.tx, &row.set, row.id).await?;
        Ok(segments.into_iter().map(|s| (s.key, s.rule)).collect())
    }

    /// Records a change made by another module's write.
    pub(super) fn record_change(
        &mut self,
        flag_set: &str,
        kind: EntityKind,
        key: &str,
        before: Option<Value>,
        after: Option<Value>,
    ) {
        self.record(flag_set, kind, key, before, after);
    }

    pub(super) fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Validates every flag set the write touched, then records the config version, what changed,
    /// an audit entry per change and the outbox row, and commits. `action` names the audit entries'
    /// action (default: create, update or delete per entity). A write that changed nothing
    /// publishes no version and returns `None`.
    pub(super) async fn finish(mut self, summary: &str, action: Option<&str>) -> Result<Option<i64>> {
        if self.changes.is_empty() {
            return Ok(None);
        }
        let touched = std::mem::take(&mut self.touched);
        for (key, touched) in &touched {
            if self.checked.contains(key) {
                continue;
            }
            let Some(set) = self.set(key).await? else { continue };
            let segments = self.store.all_segments(&mut self.tx, &set.set, set.id).await?;
            let mut doc = SetDocument {
                metadata: set.set.metadata.clone(),
                segments: segments.into_iter().map(|s| (s.key, s.rule)).collect(),
                ..SetDocument::default()
            };
            if touched.whole {
                let flags = self.store.all_flags(&mut self.tx, &set.set, set.id).await?;
                doc.flags = flags.into_iter().map(|f| (f.key, f.definition)).collect();
            } else {
                for flag in &touched.flags {
                    if let Some(f) = self.flag(set.id, key, flag).await? {
                        doc.flags.insert(f.key, f.definition);
                    }
                }
            }
            // The experiments evaluation will see, checked with the flags they allocate (a
            // flag-only write checks those of the flags it wrote: deleting a flag, or a variant,
            // that a running experiment allocates is refused).
            for experiment in self
                .store
                .set_experiments(&mut self.tx, &self.environment, set.id)
                .await?
            {
                let def = &experiment.definition;
                if !touched.whole && !touched.flags.contains(&def.input.flag) {
                    continue;
                }
                if let Some(form) = super::experiments::core_form(def, false) {
                    doc.experiments.insert(experiment.key.clone(), form);
                }
            }
            doc.check()?;
        }
        let q = self.store.q;
        sqlx::query(q.version_insert)
            .bind(self.env_id)
            .bind(self.version)
            .bind(&self.actor)
            .bind(self.now)
            .bind(summary)
            .execute(&mut *self.tx)
            .await?;
        let actor = Actor(self.actor.clone());
        for change in &self.changes {
            sqlx::query(q.change_insert)
                .bind(self.env_id)
                .bind(self.version)
                .bind(&change.flag_set)
                .bind(change.kind.as_str())
                .bind(&change.key)
                .bind(change.after.as_ref().map(to_text))
                .execute(&mut *self.tx)
                .await?;
            let entity = match change.kind {
                EntityKind::FlagSet => format!("{}/{}", self.environment, change.flag_set),
                _ => format!("{}/{}/{}", self.environment, change.flag_set, change.key),
            };
            let action = action.unwrap_or(match (&change.before, &change.after) {
                (None, _) => "create",
                (_, None) => "delete",
                _ => "update",
            });
            self.store
                .audit_in(
                    &mut self.tx,
                    self.now,
                    &actor,
                    action,
                    Some(&self.environment),
                    change.kind.as_str(),
                    &entity,
                    Some(self.version),
                    change.before.as_ref(),
                    change.after.as_ref(),
                )
                .await?;
        }
        self.store
            .announce(&mut self.tx, &self.environment, self.version, self.now)
            .await?;
        self.tx.commit().await?;
        Ok(Some(self.version))
    }
}
