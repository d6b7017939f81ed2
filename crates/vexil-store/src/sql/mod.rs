//! [`SqlStore`]: the store on Postgres or SQLite, through sqlx's runtime-chosen `Any` driver, with
//! the SQL of `queries.sql` and the migrations of `migrations/<backend>`.

mod access;
mod config;
mod events;
mod experiments;
mod history;
mod queries;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};

use crate::error::StoreError;
use crate::model::*;
use crate::{Result, Store};
use queries::Queries;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// The database behind a [`SqlStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// PostgreSQL (`postgres://…`): production, shared by replicas.
    Postgres,
    /// SQLite (`sqlite:<path>`): the embedded default, one file.
    Sqlite,
}

impl Backend {
    /// The backend a database URL names, if it names one of ours.
    pub fn of_url(url: &str) -> Option<Backend> {
        let scheme = url.split_once(':')?.0;
        match scheme {
            "postgres" | "postgresql" => Some(Backend::Postgres),
            "sqlite" => Some(Backend::Sqlite),
            _ => None,
        }
    }

    /// `postgres` or `sqlite`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// The store on a SQL database. Cloning shares the connection pool.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    q: &'static Queries,
    /// The URL without its password, for messages.
    shown: String,
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl SqlStore {
    /// Connects to the database at `url` and brings its schema up to date.
    ///
    /// `postgres://user:password@host/db` or `sqlite:path/to/file.db` (created when missing). The
    /// first connection is made before this returns, so a database that cannot be reached is an
    /// error here and not at the first request.
    pub async fn open(url: &str) -> Result<SqlStore> {
        let store = SqlStore::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating.
    pub async fn connect(url: &str) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or_else(|| {
            StoreError::invalid(
                "/database_url",
                format!("`{}` is not a postgres:// or sqlite: URL", redact(url)),
            )
        })?;
        let url = match backend {
            // Create the file when it is missing, as an embedded database should.
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            _ => url.to_owned(),
        };
        let options =
            AnyConnectOptions::from_str(&url).map_err(|e| StoreError::invalid("/database_url", e.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Postgres => 16,
                // WAL: readers do not wait for the writer (or each other); writers take turns.
                Backend::Sqlite => 8,
            })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (snapshot loads) run beside the writer; the busy timeout
                        // makes a second process's writer wait for the lock instead of failing.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(SqlStore {
            pool,
            backend,
            q: Queries::get(backend),
            shown: redact(&url),
        })
    }

    /// Applies the migrations the database has not had yet.
    pub async fn migrate(&self) -> Result<()> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// The database, its password hidden.
    pub fn database(&self) -> &str {
        &self.shown
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction. SQLite takes its write lock at `BEGIN IMMEDIATE`, so a transaction
    /// that reads before it writes cannot fail to upgrade its lock; on Postgres the first
    /// statement of a configuration write locks the environment's row.
    async fn write(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// A read transaction that sees one consistent state of the database.
    async fn read(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
            Backend::Sqlite => self.pool.begin().await?,
        })
    }
}

/// Now, in milliseconds since the epoch.
fn now() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Column `i` as JSON (stored as text).
fn json(row: &AnyRow, i: usize) -> Result<Value> {
    let text: String = row.try_get(i)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Internal(format!("stored JSON does not parse: {e}")))
}

/// Column `i` as JSON that may be NULL.
fn opt_json(row: &AnyRow, i: usize) -> Result<Option<Value>> {
    let text: Option<String> = row.try_get(i)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Internal(format!("stored JSON does not parse: {e}"))))
        .transpose()
}

/// Columns `i` (who) and `i + 1` (when) as a stamp.
fn stamp(row: &AnyRow, i: usize) -> Result<Stamp> {
    Ok(Stamp {
        by: row.try_get(i)?,
        at: row.try_get(i + 1)?,
    })
}

fn to_text(value: &Value) -> String {
    value.to_string()
}

/// Page tokens are opaque to clients: the hex of where the previous page ended.
fn page_token(last: &str) -> String {
    last.bytes().map(|b| format!("{b:02x}")).collect()
}

fn page_start(page: &PageRequest) -> Result<Option<String>> {
    let Some(token) = &page.token else {
        return Ok(None);
    };
    let bad = || StoreError::invalid("/page_token", "not a page token from a previous page");
    if token.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>>>()?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

/// The key a key-ordered page starts after (`""`: the beginning).
fn key_start(page: &PageRequest) -> Result<String> {
    Ok(page_start(page)?.unwrap_or_default())
}

/// The number a number-ordered page continues from, when it is not the first page.
fn number_start(page: &PageRequest) -> Result<Option<i64>> {
    page_start(page)?
        .map(|s| {
            s.parse()
                .map_err(|_| StoreError::invalid("/page_token", "not a page token from a previous page"))
        })
        .transpose()
}

/// A page from up to `limit + 1` rows: the extra row only says that there is a next page.
fn page_of<T>(mut items: Vec<T>, limit: u32, token: impl Fn(&T) -> String) -> Page<T> {
    let limit = limit as usize;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|last| page_token(&token(last)))
    } else {
        None
    };
    Page { items, next }
}

/// Checks a write's precondition against the stored version (`None`: no row).
fn expect(what: &str, expect: Precondition, stored: Option<i64>) -> Result<()> {
    match (expect, stored) {
        (Precondition::Any, _) | (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(what.to_owned())),
        (Precondition::Version(v), Some(s)) if v == s => Ok(()),
        (Precondition::Version(v), stored) => Err(StoreError::Conflict {
            what: what.to_owned(),
            expected: v,
            actual: stored.unwrap_or(0),
        }),
    }
}

impl Store for SqlStore {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn list_environments(&self, page: PageRequest) -> BoxFuture<'_, Result<Page<Environment>>> {
        Box::pin(self.environments(page))
    }

    fn get_environment(&self, key: String) -> BoxFuture<'_, Result<Environment>> {
        Box::pin(async move { self.environment(&key).await })
    }

    fn create_environment(
        &self,
        actor: Actor,
        key: String,
        input: EnvironmentInput,
    ) -> BoxFuture<'_, Result<Environment>> {
        Box::pin(async move { self.insert_environment(&actor, &key, input).await })
    }

    fn update_environment(
        &self,
        actor: Actor,
        key: String,
        input: EnvironmentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Environment>> {
        Box::pin(async move { self.change_environment(&actor, &key, input, expect).await })
    }

    fn delete_environment(&self, actor: Actor, key: String, expect: Precondition) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.remove_environment(&actor, &key, expect).await })
    }

    fn list_flag_sets(&self, environment: String, page: PageRequest) -> BoxFuture<'_, Result<Page<FlagSet>>> {
        Box::pin(async move { self.flag_sets(&environment, page).await })
    }

    fn get_flag_set(&self, environment: String, key: String) -> BoxFuture<'_, Result<FlagSet>> {
        Box::pin(async move { self.flag_set(&environment, &key).await })
    }

    fn put_flag_set(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        input: FlagSetInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<FlagSet>>> {
        Box::pin(async move {
            self.write_flag_set(&actor, &environment, &key, Some(input), expect)
                .await
        })
    }

    fn delete_flag_set(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>> {
        Box::pin(async move {
            let written = self.write_flag_set(&actor, &environment, &key, None, expect).await?;
            Ok(Written {
                value: (),
                config_version: written.config_version,
            })
        })
    }

    fn list_flags(
        &self,
        environment: String,
        flag_set: String,
        page: PageRequest,
    ) -> BoxFuture<'_, Result<Page<FlagRecord>>> {
        Box::pin(async move { self.flags(&environment, &flag_set, page).await })
    }

    fn get_flag(&self, environment: String, flag_set: String, key: String) -> BoxFuture<'_, Result<FlagRecord>> {
        Box::pin(async move { self.flag(&environment, &flag_set, &key).await })
    }

    fn put_flag(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: FlagInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<FlagRecord>>> {
        Box::pin(async move {
            let written = self
                .write_flag(&actor, &environment, &flag_set, &key, Some(input), expect)
                .await?;
            let value = self.flag(&environment, &flag_set, &key).await?;
            Ok(Written {
                value,
                config_version: written,
            })
        })
    }

    fn delete_flag(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>> {
        Box::pin(async move {
            let config_version = self
                .write_flag(&actor, &environment, &flag_set, &key, None, expect)
                .await?;
            Ok(Written {
                value: (),
                config_version,
            })
        })
    }

    fn validate_flag(
        &self,
        environment: String,
        flag_set: String,
        key: String,
        input: FlagInput,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.check_flag(&environment, &flag_set, &key, &input).await })
    }

    fn list_segments(
        &self,
        environment: String,
        flag_set: String,
        page: PageRequest,
    ) -> BoxFuture<'_, Result<Page<SegmentRecord>>> {
        Box::pin(async move { self.segments(&environment, &flag_set, page).await })
    }

    fn get_segment(&self, environment: String, flag_set: String, key: String) -> BoxFuture<'_, Result<SegmentRecord>> {
        Box::pin(async move { self.segment(&environment, &flag_set, &key).await })
    }

    fn put_segment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: SegmentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<SegmentRecord>>> {
        Box::pin(async move {
            let config_version = self
                .write_segment(&actor, &environment, &flag_set, &key, Some(input), expect)
                .await?;
            let value = self.segment(&environment, &flag_set, &key).await?;
            Ok(Written { value, config_version })
        })
    }

    fn delete_segment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>> {
        Box::pin(async move {
            let config_version = self
                .write_segment(&actor, &environment, &flag_set, &key, None, expect)
                .await?;
            Ok(Written {
                value: (),
                config_version,
            })
        })
    }

    fn list_experiments(
        &self,
        environment: String,
        page: PageRequest,
    ) -> BoxFuture<'_, Result<Page<ExperimentRecord>>> {
        Box::pin(async move { self.experiments(&environment, page).await })
    }

    fn get_experiment(&self, environment: String, key: String) -> BoxFuture<'_, Result<ExperimentRecord>> {
        Box::pin(async move { self.experiment(&environment, &key).await })
    }

    fn put_experiment(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        key: String,
        input: ExperimentInput,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<ExperimentRecord>>> {
        Box::pin(async move {
            let config_version = self
                .write_experiment(&actor, &environment, &flag_set, &key, input, expect)
                .await?;
            let value = self.experiment(&environment, &key).await?;
            Ok(Written { value, config_version })
        })
    }

    fn transition_experiment(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        to: ExperimentStatus,
        winner: Option<String>,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<ExperimentRecord>>> {
        Box::pin(async move {
            let config_version = self
                .transition_experiment(&actor, &environment, &key, to, winner, expect)
                .await?;
            let value = self.experiment(&environment, &key).await?;
            Ok(Written { value, config_version })
        })
    }

    fn delete_experiment(
        &self,
        actor: Actor,
        environment: String,
        key: String,
        expect: Precondition,
    ) -> BoxFuture<'_, Result<Written<()>>> {
        Box::pin(async move {
            let config_version = self.remove_experiment(&actor, &environment, &key, expect).await?;
            Ok(Written {
                value: (),
                config_version,
            })
        })
    }

    fn import(
        &self,
        actor: Actor,
        environment: String,
        flag_set: String,
        document: Value,
    ) -> BoxFuture<'_, Result<Written<ImportSummary>>> {
        Box::pin(async move { self.import_document(&actor, &environment, &flag_set, &document).await })
    }

    fn export(&self, environment: String, flag_set: String) -> BoxFuture<'_, Result<Value>> {
        Box::pin(async move { self.export_document(&environment, &flag_set).await })
    }

    fn list_versions(&self, environment: String, page: PageRequest) -> BoxFuture<'_, Result<Page<ConfigVersion>>> {
        Box::pin(async move { self.versions(&environment, page).await })
    }

    fn diff(&self, environment: String, from: i64, to: i64) -> BoxFuture<'_, Result<Vec<Change>>> {
        Box::pin(async move { self.changes(&environment, from, to).await })
    }

    fn rollback(&self, actor: Actor, environment: String, to: i64) -> BoxFuture<'_, Result<Written<Vec<Change>>>> {
        Box::pin(async move { self.roll_back(&actor, &environment, to).await })
    }

    fn audit(&self, filter: AuditFilter, page: PageRequest) -> BoxFuture<'_, Result<Page<AuditEntry>>> {
        Box::pin(async move { self.audit_log(&filter, page).await })
    }

    fn create_api_key(&self, actor: Actor, input: ApiKeyInput) -> BoxFuture<'_, Result<CreatedKey>> {
        Box::pin(async move { self.new_api_key(&actor, input).await })
    }

    fn list_api_keys(&self, environment: Option<String>, page: PageRequest) -> BoxFuture<'_, Result<Page<ApiKey>>> {
        Box::pin(async move { self.api_keys(environment.as_deref(), page).await })
    }

    fn revoke_api_key(&self, actor: Actor, id: i64) -> BoxFuture<'_, Result<ApiKey>> {
        Box::pin(async move { self.revoke(&actor, id).await })
    }

    fn authenticate(&self, secret: String) -> BoxFuture<'_, Result<Option<ApiKey>>> {
        Box::pin(async move { self.key_for(&secret).await })
    }

    fn has_api_keys(&self) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let count: i64 = sqlx::query(self.q.api_key_count)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            Ok(count > 0)
        })
    }

    fn config_versions(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>>> {
        Box::pin(async move {
            let rows = sqlx::query(self.q.environment_versions).fetch_all(&self.pool).await?;
            rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
        })
    }

    fn snapshot(&self, environment: String) -> BoxFuture<'_, Result<EnvironmentSnapshot>> {
        Box::pin(async move { self.environment_snapshot(&environment).await })
    }

    fn history(&self, environment: String, since: i64, limit: u32) -> BoxFuture<'_, Result<History>> {
        Box::pin(async move { self.version_history(&environment, since, limit).await })
    }

    fn pending_outbox(&self, limit: u32, min_age: std::time::Duration) -> BoxFuture<'_, Result<Vec<OutboxEntry>>> {
        Box::pin(async move {
            let age = i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
            let rows = sqlx::query(self.q.outbox_pending)
                .bind(i64::from(limit))
                .bind(now().saturating_sub(age))
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(OutboxEntry {
                        id: row.try_get(0)?,
                        environment: row.try_get(1)?,
                        config_version: row.try_get(2)?,
                    })
                })
                .collect()
        })
    }

    fn prune_outbox(&self, min_age: std::time::Duration) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let age = i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
            let done = sqlx::query(self.q.outbox_prune)
                .bind(now().saturating_sub(age))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    fn mark_published(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut tx = self.write().await?;
            let at = now();
            for id in ids {
                sqlx::query(self.q.outbox_mark)
                    .bind(id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend_and_hide_passwords() {
        assert_eq!(Backend::of_url("postgres://u:p@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("postgresql://h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("sqlite:vexil.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("mysql://h/db"), None);
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("sqlite:vexil.db"), "sqlite:vexil.db");
    }

    #[test]
    fn page_tokens_round_trip_and_bad_ones_are_invalid() {
        let token = page_token("new-banner");
        let page = PageRequest {
            token: Some(token),
            size: 0,
        };
        assert_eq!(key_start(&page).unwrap(), "new-banner");
        for bad in ["zz", "abc", "ff"] {
            let page = PageRequest {
                token: Some(bad.into()),
                size: 0,
            };
            assert!(matches!(key_start(&page), Err(StoreError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn preconditions() {
        assert!(expect("x", Precondition::Any, None).is_ok());
        assert!(expect("x", Precondition::Absent, None).is_ok());
        assert!(matches!(
            expect("x", Precondition::Absent, Some(1)),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(expect("x", Precondition::Version(2), Some(2)).is_ok());
        assert!(matches!(
            expect("x", Precondition::Version(2), Some(3)),
            Err(StoreError::Conflict {
                expected: 2,
                actual: 3,
                ..
            })
        ));
        assert!(matches!(
            expect("x", Precondition::Version(2), None),
            Err(StoreError::Conflict { actual: 0, .. })
        ));
    }
}
