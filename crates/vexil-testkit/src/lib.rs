//! Throwaway servers for Vexil's tests, started from the installed binaries, so that `cargo test`
//! works on any machine that has PostgreSQL and Redis installed, whether or not a server runs.
//!
//! - [`postgres()`]: one PostgreSQL server per test process, started on first use; give each test a
//!   database of its own with [`PostgresServer::database`]. [`PostgresServer::start_dedicated`]
//!   starts a server of the test's own that it can [`stop`](PostgresServer::stop) and
//!   [`start`](PostgresServer::start) again on the same port, for tests of an outage.
//! - [`redis()`]: a Redis server per call, which can be stopped and started again too.
//! - [`sqlite()`]: a database file in a temporary directory.
//!
//! Servers listen on a free port of 127.0.0.1 and keep everything (data, Unix socket, log) in a
//! directory `vexil-testkit-<kind>-<pid>-<n>` of the system's temporary directory. Each has a
//! watchdog, a small `sh` process reading a pipe whose write end only the test process holds: when
//! the test process exits, however it exits (a panic, `process::exit`, SIGKILL), the pipe closes and
//! the watchdog stops the server and removes its directory. Dropping a dedicated PostgreSQL server
//! or a Redis server does the same at once. Servers of others are never touched: the system's
//! PostgreSQL and Redis, if any, are neither used nor needed.
//!
//! PostgreSQL's `initdb` and `postgres` are looked for in `PATH`, then in the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu); `redis-server` in `PATH`. The PostgreSQL
//! server is tuned for tests (no fsync, no synchronous commit, no full-page writes, 200
//! connections), its superuser is `vexil` with trust authentication. PostgreSQL refuses to run as
//! root: as root it runs as the `postgres` user (else `nobody`).
//!
//! Missing binaries fail the test, naming the package to install; a test is never skipped.
//!
//! # Environment
//!
//! - `TMPDIR`: where the directories go (the system's temporary directory). On a RAM disk such as
//!   `/dev/shm`, `CREATE DATABASE` is several times faster than on a slow disk.
//! - `VEXIL_TEST_DATABASE_URL` ([`DATABASE_URL_ENV`]): an existing PostgreSQL server for
//!   [`postgres()`] to use instead of starting one, e.g. `postgres://user:password@host:5432/postgres`;
//!   its user must be allowed to `CREATE DATABASE`. Test databases are created on it and dropped
//!   when their [`TestDatabase`] is. Dedicated servers are still started locally.
//! - `VEXIL_TEST_REDIS_URL` ([`REDIS_URL_ENV`]): an existing Redis server for [`redis()`] to return,
//!   e.g. `redis://127.0.0.1:6379`; [`RedisServer::stop`] and [`RedisServer::start`] then panic.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), sqlx::Error> {
//! let db = vexil_testkit::postgres().database().await;
//! let pool = sqlx::PgPool::connect(db.url()).await?;
//! sqlx::query("CREATE TABLE flags (key text PRIMARY KEY)").execute(&pool).await?;
//! # Ok(())
//! # }
//! ```

mod postgres;
mod process;
mod redis;
mod sqlite;

pub use postgres::{DATABASE_URL_ENV, PostgresServer, TestDatabase, postgres};
pub use redis::{REDIS_URL_ENV, RedisServer, redis};
pub use sqlite::{TestSqlite, sqlite};
