//! [`EventStore`] on both backends: idempotent batch inserts of tracked events, and experiment
//! results aggregated from the raw rows in SQL, one row per variant.
//!
//! The schema is `migrations/<backend>/0003_events.sql`. On Postgres `events` is partitioned by
//! `server_time`, one partition per UTC day (`events_pYYYYMMDD`), which the insert path creates
//! (outside its transaction) before it first writes into a day; retention drops whole days.
//!
//! Times are bound as milliseconds since the epoch. The SQL of this file is not in `queries.sql`:
//! its statements are built for the size of each batch, and the results queries differ in their
//! time arithmetic, so each backend has its own text.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{Any, AssertSqlSafe, Row, Transaction};

use super::{Backend, SqlStore, now};
use crate::Result;
use crate::error::StoreError;
use crate::events::{EventStore, ExposureCount, Inserted, MetricQuery, NewEvent, VariantTotals};

const DAY_MS: i64 = 86_400_000;

/// Rows per multi-row `INSERT`: with 12 parameters an event, 12 000 parameters a statement, under
/// SQLite's limit of 32 766 and Postgres's of 65 535.
const ROWS_PER_INSERT: usize = 1000;
/// Rows per multi-row `INSERT` on SQLite (see `SqlStore::rows_per_insert`).
const SQLITE_ROWS_PER_INSERT: usize = 50;
const EVENT_COLUMNS: usize = 12;
const ID_COLUMNS: usize = 3;
const _: () = assert!(ROWS_PER_INSERT * EVENT_COLUMNS <= 32_766);

/// Time bounds stand for "no bound" (0001-01-01 and the end of 9999, valid `timestamptz`s), so the
/// results queries have one text whatever is asked; bounds given are clamped to them.
const MIN_MS: i64 = -62_135_596_800_000;
const MAX_MS: i64 = 253_402_300_800_000;
/// The longest covariate window taken (longer ones are this): keeps the time arithmetic in range.
const MAX_WINDOW_MS: i64 = 100 * 366 * DAY_MS;

/// How long partition DDL waits for its lock on `events` (held by every query on the table): a
/// long results query must not stall ingestion behind it for longer than this.
const DDL_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '3s'";

/// Day partitions known to exist, by database (the store's URL without its password) and day
/// number since the epoch: each day's `CREATE TABLE IF NOT EXISTS` runs once per process.
static PARTITIONS: Mutex<BTreeSet<(String, i64)>> = Mutex::new(BTreeSet::new());

const EVENT_INSERT: &str = "INSERT INTO events (environment, event_id, kind, unit, flag, experiment, variant, metric, \
                            value, properties, client_time, server_time) VALUES ";
const LOCK_EVENTS: &str = "LOCK TABLE ONLY events IN ROW EXCLUSIVE MODE";
const ID_INSERT: &str = "INSERT INTO event_ids (environment, event_id, received_at) VALUES ";
const ID_INSERT_END: &str = " ON CONFLICT (environment, event_id) DO NOTHING RETURNING environment, event_id";

/// Distinct units per variant: a unit's variant is the one it was exposed to, when it was exposed
/// to only one. `$1` environment, `$2` experiment, `$3`..`$4` the time range.
const EXPOSURES_POSTGRES: &str = "
SELECT variant, CAST(COUNT(*) AS BIGINT)
FROM (
    SELECT MIN(variant) AS variant
    FROM events
    WHERE environment = $1 AND experiment = $2 AND kind = 'exposure' AND variant IS NOT NULL
        AND server_time >= vx_ts($3) AND server_time < vx_ts($4)
    GROUP BY unit
    HAVING MIN(variant) = MAX(variant)
) AS exposed
GROUP BY variant
ORDER BY variant";

const EXPOSURES_SQLITE: &str = "
SELECT variant, CAST(COUNT(*) AS BIGINT)
FROM (
    SELECT MIN(variant) AS variant
    FROM events
    WHERE environment = $1 AND experiment = $2 AND kind = 'exposure' AND variant IS NOT NULL
        AND server_time >= $3 AND server_time < $4
    GROUP BY unit
    HAVING MIN(variant) = MAX(variant)
) AS exposed
GROUP BY variant
ORDER BY variant";

/// A metric's totals per variant. `exposed`: each unit exposed (in the range) to one variant,
/// with its first exposure. `per_unit`: the unit's metric events from `first_at - window` to the
/// end of the range, split at its first exposure into its value (`v`, after; `n` such events) and
/// its covariate (`c`, before); a unit without events has 0 of each. Then sums per variant.
/// `$1` environment, `$2` experiment, `$3` metric, `$4`..`$5` the time range, `$6` the covariate
/// window in ms (0: none, the covariate range is empty).
const TOTALS_POSTGRES: &str = "
WITH exposed AS (
    SELECT unit, MIN(variant) AS variant, MIN(server_time) AS first_at
    FROM events
    WHERE environment = $1 AND experiment = $2 AND kind = 'exposure' AND variant IS NOT NULL
        AND server_time >= vx_ts($4) AND server_time < vx_ts($5)
    GROUP BY unit
    HAVING MIN(variant) = MAX(variant)
),
per_unit AS (
    SELECT x.variant,
        COUNT(CASE WHEN e.server_time >= x.first_at THEN 1 END) AS n,
        COALESCE(SUM(CASE WHEN e.server_time >= x.first_at THEN COALESCE(e.value, 1.0) END), 0.0) AS v,
        COALESCE(SUM(CASE WHEN e.server_time < x.first_at THEN COALESCE(e.value, 1.0) END), 0.0) AS c,
        COUNT(CASE WHEN e.server_time < x.first_at THEN 1 END) AS cn
    FROM exposed AS x
    LEFT JOIN events AS e
        ON e.environment = $1 AND e.metric = $3 AND e.kind IN ('conversion', 'custom')
        AND e.unit = x.unit
        AND e.server_time >= x.first_at - $6 * INTERVAL '1 millisecond'
        AND e.server_time < vx_ts($5)
    GROUP BY x.variant, x.unit
)
SELECT variant,
    CAST(COUNT(*) AS BIGINT),
    CAST(COUNT(CASE WHEN n > 0 THEN 1 END) AS BIGINT),
    CAST(SUM(v) AS DOUBLE PRECISION),
    CAST(SUM(v * v) AS DOUBLE PRECISION),
    CAST(SUM(c) AS DOUBLE PRECISION),
    CAST(SUM(c * c) AS DOUBLE PRECISION),
    CAST(SUM(v * c) AS DOUBLE PRECISION),
    CAST(COUNT(CASE WHEN cn > 0 THEN 1 END) AS BIGINT),
    CAST(COUNT(CASE WHEN n > 0 AND cn > 0 THEN 1 END) AS BIGINT)
FROM per_unit
GROUP BY variant
ORDER BY variant";

const TOTALS_SQLITE: &str = "
WITH exposed AS (
    SELECT unit, MIN(variant) AS variant, MIN(server_time) AS first_at
    FROM events
    WHERE environment = $1 AND experiment = $2 AND kind = 'exposure' AND variant IS NOT NULL
        AND server_time >= $4 AND server_time < $5
    GROUP BY unit
    HAVING MIN(variant) = MAX(variant)
),
per_unit AS (
    SELECT x.variant,
        COUNT(CASE WHEN e.server_time >= x.first_at THEN 1 END) AS n,
        COALESCE(SUM(CASE WHEN e.server_time >= x.first_at THEN COALESCE(e.value, 1.0) END), 0.0) AS v,
        COALESCE(SUM(CASE WHEN e.server_time < x.first_at THEN COALESCE(e.value, 1.0) END), 0.0) AS c,
        COUNT(CASE WHEN e.server_time < x.first_at THEN 1 END) AS cn
    FROM exposed AS x
    LEFT JOIN events AS e
        ON e.environment = $1 AND e.metric = $3 AND e.kind IN ('conversion', 'custom')
        AND e.unit = x.unit
        AND e.server_time >= x.first_at - $6
        AND e.server_time < $5
    GROUP BY x.variant, x.unit
)
SELECT variant,
    CAST(COUNT(*) AS BIGINT),
    CAST(COUNT(CASE WHEN n > 0 THEN 1 END) AS BIGINT),
    CAST(SUM(v) AS DOUBLE PRECISION),
    CAST(SUM(v * v) AS DOUBLE PRECISION),
    CAST(SUM(c) AS DOUBLE PRECISION),
    CAST(SUM(c * c) AS DOUBLE PRECISION),
    CAST(SUM(v * c) AS DOUBLE PRECISION),
    CAST(COUNT(CASE WHEN cn > 0 THEN 1 END) AS BIGINT),
    CAST(COUNT(CASE WHEN n > 0 AND cn > 0 THEN 1 END) AS BIGINT)
FROM per_unit
GROUP BY variant
ORDER BY variant";

/// Settings of a results query's transaction (Postgres). The planner cannot count exposed units
/// (the partitioned table has no statistics of its own, an exposure's columns are correlated, and
/// "exposed to one variant" filters on aggregates): it expects a handful and joins them to the
/// metric's events by a nested loop, which with a million units is many times slower than hashing
/// them, and hours slower while a new day's partition has no statistics yet. Without nested loops
/// the join is a hash join whatever the estimates (an experiment of a few units pays a scan of the
/// metric's events instead of a few lookups). JIT compiling costs more than it saves here; the
/// memory keeps the per-unit aggregates off disk.
const RESULTS_SETTINGS: &str = "SELECT set_config('enable_nestloop', 'off', true), set_config('jit', 'off', true), \
                                set_config('work_mem', '64MB', true)";

const PRUNE_IDS_POSTGRES: &str = "DELETE FROM event_ids WHERE received_at < vx_ts($1)";
const PRUNE_IDS_SQLITE: &str = "DELETE FROM event_ids WHERE received_at < $1";
const DELETE_EVENTS_POSTGRES: &str = "DELETE FROM events WHERE server_time < vx_ts($1)";
const DELETE_EVENTS_SQLITE: &str = "DELETE FROM events WHERE server_time < $1";
const DAY_PARTITIONS: &str = "SELECT CAST(c.relname AS TEXT) FROM pg_inherits AS i \
                              JOIN pg_class AS c ON c.oid = i.inhrelid \
                              WHERE i.inhparent = CAST('events' AS regclass) ORDER BY 1";

/// The day (since the epoch, UTC) a time falls in.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The civil (proleptic Gregorian) date of a day number since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // In range by construction: 1..=31 and 1..=12.
    (year, month as u32, day as u32)
}

/// The day number since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYYMMDD` of a day in years 1000 to 9999 (the only days that get a partition).
fn day_name(day: i64) -> Option<String> {
    let (y, m, d) = civil_from_days(day);
    (1000..=9999).contains(&y).then(|| format!("{y:04}{m:02}{d:02}"))
}

/// The partition of a day: `events_pYYYYMMDD`.
fn partition_name(day: i64) -> Option<String> {
    day_name(day).map(|n| format!("events_p{n}"))
}

/// The day a partition name stands for, if it is a day partition's.
fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("events_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i64 = digits[..4].parse().ok()?;
    let month: u32 = digits[4..6].parse().ok()?;
    let day: u32 = digits[6..].parse().ok()?;
    let n = days_from_civil(year, month, day);
    // Only names this file writes (a valid date, written back the same).
    (day_name(n).as_deref() == Some(digits)).then_some(n)
}

/// The DDL that creates a day's partition.
fn create_partition(day: i64) -> Option<String> {
    let name = partition_name(day)?;
    let bound = |d: i64| {
        let (y, m, dd) = civil_from_days(d);
        format!("'{y:04}-{m:02}-{dd:02} 00:00:00+00'")
    };
    Some(format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF events FOR VALUES FROM ({}) TO ({})",
        bound(day),
        bound(day + 1)
    ))
}

/// `head` then `rows` groups of `columns` placeholders, numbered on, each shaped by `row` (which
/// gets the group's first parameter number), then `tail`.
fn values_sql(head: &str, rows: usize, columns: usize, row: impl Fn(&mut String, usize), tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 8);
    sql.push_str(head);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        row(&mut sql, r * columns + 1);
    }
    sql.push_str(tail);
    sql
}

/// One row of `events`: `($n, …, $n+11)`, times and JSON converted on Postgres.
fn event_row(backend: Backend) -> impl Fn(&mut String, usize) {
    move |sql, n| {
        use std::fmt::Write;
        let _ = match backend {
            Backend::Postgres => write!(
                sql,
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, vx_json(${}), vx_ts(${}), vx_ts(${}))",
                n,
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5,
                n + 6,
                n + 7,
                n + 8,
                n + 9,
                n + 10,
                n + 11
            ),
            Backend::Sqlite => write!(
                sql,
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                n,
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5,
                n + 6,
                n + 7,
                n + 8,
                n + 9,
                n + 10,
                n + 11
            ),
        };
    }
}

/// One row of `event_ids`: `($n, $n+1, $n+2)`.
fn id_row(backend: Backend) -> impl Fn(&mut String, usize) {
    move |sql, n| {
        use std::fmt::Write;
        let _ = match backend {
            Backend::Postgres => write!(sql, "(${}, ${}, vx_ts(${}))", n, n + 1, n + 2),
            Backend::Sqlite => write!(sql, "(${}, ${}, ${})", n, n + 1, n + 2),
        };
    }
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn count(row: &AnyRow, i: usize) -> Result<u64> {
    let n: i64 = row.try_get(i)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The SQLSTATE of a database error.
fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

impl SqlStore {
    fn database_key(&self) -> &str {
        &self.shown
    }

    /// Makes sure `days` have their partitions (Postgres), each in a short transaction of its own
    /// before the insert's: partition DDL locks `events` whole, which must not last as long as
    /// an insert. A day whose partition cannot be made is not an error: its rows go to the
    /// default partition, which holds them just as well (and retention deletes them from there).
    async fn ensure_partitions(&self, days: &BTreeSet<i64>) -> Result<()> {
        let missing: Vec<i64> = {
            let known = PARTITIONS.lock().unwrap_or_else(|p| p.into_inner());
            let key = self.database_key().to_owned();
            days.iter()
                .copied()
                .filter(|&d| !known.contains(&(key.clone(), d)))
                .collect()
        };
        for day in missing {
            if self.create_partition(day).await? {
                PARTITIONS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((self.database_key().to_owned(), day));
            }
        }
        Ok(())
    }

    /// Creates a day's partition if it does not exist. `true` when it exists now, or when it
    /// never will (the day's rows are in the default partition, or the day has no partition
    /// name): asking again would not change anything. `false` when it could not take its lock in
    /// time: the next batch tries again.
    async fn create_partition(&self, day: i64) -> Result<bool> {
        let Some(ddl) = create_partition(day) else {
            return Ok(true);
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(DDL_LOCK_TIMEOUT)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        let created = sqlx::query(AssertSqlSafe(ddl))
            .persistent(false)
            .execute(&mut *tx)
            .await;
        match created {
            Ok(_) => {
                tx.commit().await?;
                Ok(true)
            }
            Err(e) => {
                drop(tx);
                match sqlstate(&e).as_deref() {
                    // Created by a concurrent insert meanwhile (duplicate_table, or the
                    // unique_violation on pg_type that `IF NOT EXISTS` can race into).
                    Some("42P07" | "23505") => Ok(true),
                    // check_violation: the default partition holds rows of that day already; they
                    // stay there, and so will the day's next ones.
                    Some("23514") => {
                        tracing::warn!(day, error = %e, "events of this day are in the default partition");
                        Ok(true)
                    }
                    // lock_not_available, deadlock_detected: results queries hold the table.
                    Some("55P03" | "40P01") => {
                        tracing::warn!(day, error = %e, "could not create an event partition now");
                        Ok(false)
                    }
                    _ => Err(e.into()),
                }
            }
        }
    }

    /// Rows per multi-row `INSERT`. SQLite (through sqlx) looks each bound parameter up by name,
    /// a cost that grows with the square of the parameters in a statement: 1,000 rows (12,000
    /// parameters) took about 0.3 s, so it gets short statements; Postgres takes long ones.
    fn rows_per_insert(&self) -> usize {
        match self.backend {
            Backend::Postgres => ROWS_PER_INSERT,
            Backend::Sqlite => SQLITE_ROWS_PER_INSERT,
        }
    }

    async fn store_events(&self, events: Vec<NewEvent>) -> Result<Vec<Inserted>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // The first event of each id: the only candidates; later ones in the batch are duplicates.
        let mut first: HashMap<(&str, &str), usize> = HashMap::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            first.entry((&e.environment, &e.event_id)).or_insert(i);
        }
        if self.backend == Backend::Postgres {
            // Each day the batch writes into, and the day after its last one, so that the next
            // day's partition is usually made before anything needs it.
            let mut days: BTreeSet<i64> = first.values().map(|&i| day_of(events[i].server_time_ms)).collect();
            if let Some(&last) = days.last() {
                days.insert(last + 1);
            }
            self.ensure_partitions(&days).await?;
        }

        // Ids in key order: two batches sharing ids take their row locks in the same order.
        let mut candidates: Vec<(&(&str, &str), &usize)> = first.iter().collect();
        candidates.sort_unstable();
        let received = now();
        let mut tx = self.write().await?;
        if self.backend == Backend::Postgres {
            // Take the table's lock before any id's: partition DDL queued on the table then waits
            // for this transaction instead of both waiting on an id another writer holds.
            sqlx::query(LOCK_EVENTS).persistent(false).execute(&mut *tx).await?;
        }
        let mut new = vec![false; events.len()];
        for chunk in candidates.chunks(self.rows_per_insert()) {
            let sql = values_sql(ID_INSERT, chunk.len(), ID_COLUMNS, id_row(self.backend), ID_INSERT_END);
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for ((environment, event_id), _) in chunk {
                query = query.bind(*environment).bind(*event_id).bind(received);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let environment: String = row.try_get(0)?;
                let event_id: String = row.try_get(1)?;
                let i = first
                    .get(&(environment.as_str(), event_id.as_str()))
                    .ok_or_else(|| StoreError::Internal(format!("event id `{event_id}` came back unasked")))?;
                new[*i] = true;
            }
        }
        let fresh: Vec<&NewEvent> = events.iter().zip(&new).filter(|(_, n)| **n).map(|(e, _)| e).collect();
        for chunk in fresh.chunks(self.rows_per_insert()) {
            self.insert_rows(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(new
            .into_iter()
            .map(|n| if n { Inserted::New } else { Inserted::Duplicate })
            .collect())
    }

    /// One multi-row `INSERT` of events.
    async fn insert_rows(&self, tx: &mut Transaction<'static, Any>, events: &[&NewEvent]) -> Result<()> {
        let sql = values_sql(EVENT_INSERT, events.len(), EVENT_COLUMNS, event_row(self.backend), "");
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for e in events {
            query = query
                .bind(e.environment.as_str())
                .bind(e.event_id.as_str())
                .bind(e.kind.as_str())
                .bind(e.unit.as_str())
                .bind(e.flag.as_deref())
                .bind(e.experiment.as_deref())
                .bind(e.variant.as_deref())
                .bind(e.metric.as_deref())
                .bind(e.value)
                .bind(Value::Object(e.properties.clone()).to_string())
                .bind(e.client_time_ms)
                .bind(e.server_time_ms);
        }
        query.execute(&mut **tx).await?;
        Ok(())
    }

    /// The transaction a results query runs in: one consistent view, planned for aggregating.
    async fn results(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.read().await?;
        if self.backend == Backend::Postgres {
            sqlx::query(RESULTS_SETTINGS).execute(&mut *tx).await?;
        }
        Ok(tx)
    }

    async fn exposures(
        &self,
        environment: &str,
        experiment: &str,
        from_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<Vec<ExposureCount>> {
        let sql = match self.backend {
            Backend::Postgres => EXPOSURES_POSTGRES,
            Backend::Sqlite => EXPOSURES_SQLITE,
        };
        let (from, until) = range(from_ms, until_ms);
        let mut tx = self.results().await?;
        let rows = sqlx::query(sql)
            .bind(environment)
            .bind(experiment)
            .bind(from)
            .bind(until)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                Ok(ExposureCount {
                    variant: row.try_get(0)?,
                    units: count(row, 1)?,
                })
            })
            .collect()
    }

    async fn totals(&self, query: &MetricQuery) -> Result<Vec<VariantTotals>> {
        let sql = match self.backend {
            Backend::Postgres => TOTALS_POSTGRES,
            Backend::Sqlite => TOTALS_SQLITE,
        };
        let (from, until) = range(query.from_ms, query.until_ms);
        let window = query.covariate_window.map_or(0, |w| ms(w).min(MAX_WINDOW_MS));
        let mut tx = self.results().await?;
        let rows = sqlx::query(sql)
            .bind(query.environment.as_str())
            .bind(query.experiment.as_str())
            .bind(query.metric.as_str())
            .bind(from)
            .bind(until)
            .bind(window)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                Ok(VariantTotals {
                    variant: row.try_get(0)?,
                    units: count(row, 1)?,
                    converted: count(row, 2)?,
                    sum: row.try_get(3)?,
                    sum_squares: row.try_get(4)?,
                    covariate_sum: row.try_get(5)?,
                    covariate_sum_squares: row.try_get(6)?,
                    cross_sum: row.try_get(7)?,
                    pre_converted: count(row, 8)?,
                    both_converted: count(row, 9)?,
                })
            })
            .collect()
    }

    async fn prune_ids(&self, older_than: Duration) -> Result<u64> {
        let sql = match self.backend {
            Backend::Postgres => PRUNE_IDS_POSTGRES,
            Backend::Sqlite => PRUNE_IDS_SQLITE,
        };
        let before = now().saturating_sub(ms(older_than)).max(MIN_MS);
        let done = sqlx::query(sql).bind(before).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn delete_before(&self, before_ms: i64) -> Result<u64> {
        let before = before_ms.clamp(MIN_MS, MAX_MS);
        let mut deleted = 0;
        let sql = match self.backend {
            Backend::Postgres => {
                deleted += self.drop_days_before(before).await?;
                DELETE_EVENTS_POSTGRES
            }
            Backend::Sqlite => DELETE_EVENTS_SQLITE,
        };
        // What is left before the cutoff: the part of its day before it, and the default partition.
        let done = sqlx::query(sql).bind(before).execute(&self.pool).await?;
        Ok(deleted + done.rows_affected())
    }

    /// Drops a partition, with its rows: how many there were (0 when another replica's retention
    /// dropped it first). Its count locks only the partition; the drop locks the whole table, for
    /// a moment, if it can get the lock in time.
    async fn drop_partition(&self, name: &str) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(DDL_LOCK_TIMEOUT)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        let counted = sqlx::query(AssertSqlSafe(format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {name}")))
            .persistent(false)
            .fetch_one(&mut *tx)
            .await;
        let rows: i64 = match counted {
            Ok(row) => row.try_get(0)?,
            // undefined_table: gone already.
            Err(e) if sqlstate(&e).as_deref() == Some("42P01") => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}")))
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u64::try_from(rows).unwrap_or(0))
    }

    /// Drops the day partitions that end at or before `before`, counting their rows first.
    async fn drop_days_before(&self, before: i64) -> Result<u64> {
        let names: Vec<String> = sqlx::query(DAY_PARTITIONS)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut deleted = 0;
        for name in names {
            let Some(day) = partition_day(&name) else {
                continue;
            };
            if (day + 1).saturating_mul(DAY_MS) > before {
                continue;
            }
            let rows = self.drop_partition(&name).await?;
            PARTITIONS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(self.database_key().to_owned(), day));
            deleted += rows;
        }
        Ok(deleted)
    }
}

/// A query's time range as bounds both backends take (`None`: unbounded).
fn range(from_ms: Option<i64>, until_ms: Option<i64>) -> (i64, i64) {
    (
        from_ms.unwrap_or(MIN_MS).clamp(MIN_MS, MAX_MS),
        until_ms.unwrap_or(MAX_MS).clamp(MIN_MS, MAX_MS),
    )
}

impl EventStore for SqlStore {
    fn insert_events(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Inserted>>> {
        Box::pin(self.store_events(events))
    }

    fn exposure_counts(
        &self,
        environment: String,
        experiment: String,
        from_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> BoxFuture<'_, Result<Vec<ExposureCount>>> {
        Box::pin(async move { self.exposures(&environment, &experiment, from_ms, until_ms).await })
    }

    fn metric_totals(&self, query: MetricQuery) -> BoxFuture<'_, Result<Vec<VariantTotals>>> {
        Box::pin(async move { self.totals(&query).await })
    }

    fn prune_event_ids(&self, older_than: Duration) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.prune_ids(older_than))
    }

    fn delete_events_before(&self, before_ms: i64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.delete_before(before_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        for day in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day, "{y}-{m}-{d}");
        }
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(DAY_MS), 1);
    }

    #[test]
    fn partitions_are_named_by_day_and_read_back() {
        let day = days_from_civil(2024, 3, 9);
        assert_eq!(partition_name(day).as_deref(), Some("events_p20240309"));
        assert_eq!(partition_day("events_p20240309"), Some(day));
        assert_eq!(partition_day("events_default"), None);
        assert_eq!(partition_day("events_p20240230"), None);
        assert_eq!(partition_name(days_from_civil(10_000, 1, 1)), None);
        assert_eq!(
            create_partition(day).unwrap(),
            "CREATE TABLE IF NOT EXISTS events_p20240309 PARTITION OF events \
             FOR VALUES FROM ('2024-03-09 00:00:00+00') TO ('2024-03-10 00:00:00+00')"
        );
    }

    #[test]
    fn multi_row_statements_number_their_parameters() {
        let sql = values_sql(ID_INSERT, 2, ID_COLUMNS, id_row(Backend::Postgres), ID_INSERT_END);
        assert!(
            sql.contains("VALUES ($1, $2, vx_ts($3)), ($4, $5, vx_ts($6)) ON CONFLICT"),
            "{sql}"
        );
        let sql = values_sql(EVENT_INSERT, 2, EVENT_COLUMNS, event_row(Backend::Sqlite), "");
        assert!(sql.ends_with("$22, $23, $24)"), "{sql}");
    }
}
