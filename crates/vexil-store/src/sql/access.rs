//! API keys: created (the key shown once, its hash stored), listed, revoked, and checked.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlStore, now, number_start, page_of, stamp};
use crate::Result;
use crate::error::StoreError;
use crate::keys;
use crate::model::*;

/// A key row and its stored hash.
fn api_key_of(row: &AnyRow) -> Result<(ApiKey, String)> {
    let role: String = row.try_get(4)?;
    let role = Role::parse(&role).ok_or_else(|| StoreError::Internal(format!("unknown role `{role}`")))?;
    Ok((
        ApiKey {
            id: row.try_get(0)?,
            prefix: row.try_get(1)?,
            name: row.try_get(2)?,
            environment: row.try_get(3)?,
            role,
            created: stamp(row, 5)?,
            revoked_at: row.try_get(7)?,
        },
        row.try_get(8)?,
    ))
}

/// What the audit log keeps of a key: never the key or its hash.
fn audit_body(key: &ApiKey) -> serde_json::Value {
    json!({"name": key.name, "environment": key.environment, "role": key.role.as_str(), "revoked_at": key.revoked_at})
}

impl SqlStore {
    pub(super) async fn new_api_key(&self, actor: &Actor, input: ApiKeyInput) -> Result<CreatedKey> {
        if input.name.trim().is_empty() || input.name.len() > 200 {
            return Err(StoreError::invalid("/name", "a key needs a name of 1 to 200 bytes"));
        }
        if input.environment.is_none() && input.role != Role::Admin {
            return Err(StoreError::invalid(
                "/environment",
                format!("a {} key is scoped to an environment", input.role.as_str()),
            ));
        }
        let (secret, prefix, hash) = keys::generate()?;
        let mut tx = self.write().await?;
        let env_id = match &input.environment {
            Some(environment) => Some(self.environment_id(&mut tx, environment).await?.0),
            None => None,
        };
        let at = now();
        let id: i64 = sqlx::query(self.q.api_key_insert)
            .bind(&prefix)
            .bind(&hash)
            .bind(&input.name)
            .bind(env_id)
            .bind(input.role.as_str())
            .bind(&actor.0)
            .bind(at)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let key = ApiKey {
            id,
            prefix,
            name: input.name,
            environment: input.environment,
            role: input.role,
            created: Stamp {
                by: actor.0.clone(),
                at,
            },
            revoked_at: None,
        };
        let after = audit_body(&key);
        self.audit_in(
            &mut tx,
            at,
            actor,
            "create",
            key.environment.as_deref(),
            "api_key",
            &key.prefix,
            None,
            None,
            Some(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(CreatedKey { key, secret })
    }

    pub(super) async fn api_keys(&self, environment: Option<&str>, page: PageRequest) -> Result<Page<ApiKey>> {
        let after = number_start(&page)?.unwrap_or(0);
        let rows = sqlx::query(self.q.api_key_list)
            .bind(after)
            .bind(environment)
            .bind(i64::from(page.limit()) + 1)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(|row| api_key_of(row).map(|(key, _)| key))
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(items, page.limit(), |k| k.id.to_string()))
    }

    pub(super) async fn revoke(&self, actor: &Actor, id: i64) -> Result<ApiKey> {
        let mut tx = self.write().await?;
        let (before, _) = sqlx::query(self.q.api_key_by_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| api_key_of(&row))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("API key {id}")))?;
        if before.revoked_at.is_some() {
            return Ok(before);
        }
        let at = now();
        sqlx::query(self.q.api_key_revoke)
            .bind(id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        let after = ApiKey {
            revoked_at: Some(at),
            ..before.clone()
        };
        self.audit_in(
            &mut tx,
            at,
            actor,
            "revoke",
            before.environment.as_deref(),
            "api_key",
            &before.prefix,
            None,
            Some(&audit_body(&before)),
            Some(&audit_body(&after)),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    pub(super) async fn key_for(&self, secret: &str) -> Result<Option<ApiKey>> {
        let Some(prefix) = keys::prefix_of(secret) else {
            return Ok(None);
        };
        let Some(row) = sqlx::query(self.q.api_key_by_prefix)
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let (key, stored) = api_key_of(&row)?;
        Ok((keys::same_hash(&stored, &keys::hash(secret)) && key.revoked_at.is_none()).then_some(key))
    }
}
