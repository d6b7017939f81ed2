//! Config versions (list, diff, roll back) and the audit log.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, number_start, opt_json, page_of, stamp, to_text};
use crate::Result;
use crate::error::StoreError;
use crate::model::*;

/// An entity of an environment's configuration: flag set, kind, key.
type EntityId = (String, EntityKind, String);

impl SqlStore {
    pub(super) async fn versions(&self, environment: &str, page: PageRequest) -> Result<Page<ConfigVersion>> {
        let mut tx = self.read().await?;
        let (env_id, _) = self.environment_id(&mut tx, environment).await?;
        let before = number_start(&page)?.unwrap_or(i64::MAX);
        let rows = sqlx::query(self.q.version_list)
            .bind(env_id)
            .bind(before)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&mut *tx)
            .await?;
        let items = rows
            .iter()
            .map(|row| {
                Ok(ConfigVersion {
                    environment: environment.to_owned(),
                    version: row.try_get(0)?,
                    created: stamp(row, 1)?,
                    summary: row.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |v| v.version.to_string()))
    }

    /// The body at version `at` of every entity changed after `low` up to `high` (absent: it did
    /// not exist at `at`).
    async fn state_at(
        &self,
        tx: &mut Transaction<'static, Any>,
        env_id: i64,
        at: i64,
        low: i64,
        high: i64,
    ) -> Result<BTreeMap<EntityId, Value>> {
        let rows = sqlx::query(self.q.state_at)
            .bind(env_id)
            .bind(at)
            .bind(low)
            .bind(high)
            .fetch_all(&mut **tx)
            .await?;
        let mut state = BTreeMap::new();
        for row in &rows {
            let kind: String = row.try_get(1)?;
            let kind = EntityKind::parse(&kind)
                .ok_or_else(|| StoreError::Internal(format!("unknown entity kind `{kind}`")))?;
            if let Some(body) = opt_json(row, 3)? {
                state.insert((row.try_get(0)?, kind, row.try_get(2)?), body);
            }
        }
        Ok(state)
    }

    /// Every entity changed after `low` up to `high`.
    async fn changed_between(
        &self,
        tx: &mut Transaction<'static, Any>,
        env_id: i64,
        low: i64,
        high: i64,
    ) -> Result<Vec<EntityId>> {
        let rows = sqlx::query(self.q.changes_between)
            .bind(env_id)
            .bind(low)
            .bind(high)
            .fetch_all(&mut **tx)
            .await?;
        let mut ids = rows
            .iter()
            .map(|row| {
                let kind: String = row.try_get(1)?;
                let kind = EntityKind::parse(&kind)
                    .ok_or_else(|| StoreError::Internal(format!("unknown entity kind `{kind}`")))?;
                Ok((row.try_get(0)?, kind, row.try_get(2)?))
            })
            .collect::<Result<Vec<EntityId>>>()?;
        ids.sort();
        Ok(ids)
    }

    pub(super) async fn changes(&self, environment: &str, from: i64, to: i64) -> Result<Vec<Change>> {
        let mut tx = self.read().await?;
        let (env_id, current) = self.environment_id(&mut tx, environment).await?;
        for (name, v) in [("from", from), ("to", to)] {
            if !(0..=current).contains(&v) {
                return Err(StoreError::invalid(
                    format!("/{name}"),
                    format!("config version {v} of `{environment}` does not exist (0 to {current})"),
                ));
            }
        }
        let (low, high) = (from.min(to), from.max(to));
        let entities = self.changed_between(&mut tx, env_id, low, high).await?;
        let mut at_from = self.state_at(&mut tx, env_id, from, low, high).await?;
        let mut at_to = self.state_at(&mut tx, env_id, to, low, high).await?;
        Ok(entities
            .into_iter()
            .filter_map(|id| {
                let before = at_from.remove(&id);
                let after = at_to.remove(&id);
                (before != after).then_some(Change {
                    flag_set: id.0,
                    kind: id.1,
                    key: id.2,
                    before,
                    after,
                })
            })
            .collect())
    }

    pub(super) async fn version_history(&self, environment: &str, since: i64, limit: u32) -> Result<History> {
        let mut tx = self.read().await?;
        let (env_id, current) = self.environment_id(&mut tx, environment).await?;
        let since = since.max(0);
        if current - since > i64::from(limit) {
            return Ok(History {
                current,
                versions: None,
            });
        }
        let rows = sqlx::query(self.q.version_changes)
            .bind(env_id)
            .bind(since)
            .bind(current)
            .fetch_all(&mut *tx)
            .await?;
        // Versions are numbered 1, 2, … without gaps: one entry for each, changes or not.
        let mut versions: Vec<VersionChanges> = (since + 1..=current)
            .map(|version| VersionChanges {
                version,
                changes: Vec::new(),
            })
            .collect();
        for row in &rows {
            let version: i64 = row.try_get(0)?;
            let kind: String = row.try_get(2)?;
            let kind = EntityKind::parse(&kind)
                .ok_or_else(|| StoreError::Internal(format!("unknown entity kind `{kind}`")))?;
            let slot = usize::try_from(version - since - 1)
                .ok()
                .and_then(|i| versions.get_mut(i))
                .ok_or_else(|| StoreError::Internal(format!("change at version {version} out of range")))?;
            slot.changes.push(Change {
                flag_set: row.try_get(1)?,
                kind,
                key: row.try_get(3)?,
                before: None,
                after: opt_json(row, 4)?,
            });
        }
        Ok(History {
            current,
            versions: Some(versions),
        })
    }

    pub(super) async fn roll_back(&self, actor: &Actor, environment: &str, to: i64) -> Result<Written<Vec<Change>>> {
        let mut w = self.begin_env_write(actor, environment).await?;
        let current = w.version() - 1;
        if !(0..current).contains(&to) {
            return Err(StoreError::invalid(
                "/version",
                format!(
                    "cannot roll `{environment}` back to version {to}: its versions before the current {current} are 0 to {}",
                    current - 1
                ),
            ));
        }
        let env_id = w.env_id();
        let entities = self.changed_between(w.tx(), env_id, to, current).await?;
        let mut target = self.state_at(w.tx(), env_id, to, to, current).await?;
        // Flag sets that come back first, then what is in them, then the sets that go.
        let (sets, items): (Vec<EntityId>, Vec<EntityId>) =
            entities.into_iter().partition(|id| id.1 == EntityKind::FlagSet);
        let (coming, going): (Vec<EntityId>, Vec<EntityId>) = sets.into_iter().partition(|id| target.contains_key(id));
        for id in coming.iter().chain(&items) {
            let body = target.remove(id);
            w.restore(&id.0, id.1, &id.2, body.as_ref()).await?;
        }
        for id in &going {
            w.restore(&id.0, id.1, &id.2, None).await?;
        }
        let changes = w.changes().to_vec();
        let config_version = w
            .finish(&format!("roll back to version {to}"), Some("rollback"))
            .await?;
        Ok(Written {
            value: changes,
            config_version,
        })
    }

    /// Appends an audit entry in `tx`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn audit_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        at: Millis,
        actor: &Actor,
        action: &str,
        environment: Option<&str>,
        entity_kind: &str,
        entity: &str,
        config_version: Option<i64>,
        before: Option<&Value>,
        after: Option<&Value>,
    ) -> Result<()> {
        sqlx::query(self.q.audit_insert)
            .bind(at)
            .bind(&actor.0)
            .bind(action)
            .bind(environment)
            .bind(entity_kind)
            .bind(entity)
            .bind(config_version)
            .bind(before.map(to_text))
            .bind(after.map(to_text))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub(super) async fn audit_log(&self, filter: &AuditFilter, page: PageRequest) -> Result<Page<AuditEntry>> {
        let before = number_start(&page)?.unwrap_or(i64::MAX);
        let rows = sqlx::query(self.q.audit_list)
            .bind(before)
            .bind(filter.environment.as_deref())
            .bind(filter.entity_kind.as_deref())
            .bind(filter.entity.as_deref())
            .bind(filter.actor.as_deref())
            .bind(filter.since)
            .bind(filter.until)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: row.try_get(0)?,
                    at: row.try_get(1)?,
                    actor: row.try_get(2)?,
                    action: row.try_get(3)?,
                    environment: row.try_get(4)?,
                    entity_kind: row.try_get(5)?,
                    entity: row.try_get(6)?,
                    config_version: row.try_get(7)?,
                    before: opt_json(row, 8)?,
                    after: opt_json(row, 9)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |e| e.id.to_string()))
    }
}
