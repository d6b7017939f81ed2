//! PostgreSQL: the shared throwaway server, dedicated servers, and test databases.

use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::process::{self, Result, ServerProcess, ServerSpec, Watchdog};

/// Names an existing PostgreSQL server for [`postgres()`] to use instead of starting one, e.g.
/// `postgres://user:password@host:5432/postgres`; its user must be allowed to `CREATE DATABASE`.
pub const DATABASE_URL_ENV: &str = "VEXIL_TEST_DATABASE_URL";

/// The superuser of the throwaway servers (trust authentication: no password).
const USER: &str = "vexil";

/// Where Debian and Ubuntu install the server binaries, one directory per major version.
const LIB_DIR: &str = "/usr/lib/postgresql";

const MISSING: &str = "PostgreSQL server binaries (initdb, postgres) not found: install the `postgresql` package \
                       (Debian/Ubuntu: apt-get install postgresql)";

/// The PostgreSQL server shared by the tests of this process, started on first use.
///
/// It is a throwaway server in a temporary directory, on a free port of 127.0.0.1, that lives as long
/// as the test process and is removed when the process exits, however it exits; or, when
/// [`DATABASE_URL_ENV`] is set, that existing server. Give each test a database of its own with
/// [`PostgresServer::database`].
///
/// Blocks while the server starts (a few seconds); callable from sync code and from any runtime.
///
/// # Panics
///
/// If the server cannot be started, e.g. when PostgreSQL is not installed. Every later call panics
/// with the same message, without trying again.
pub fn postgres() -> &'static PostgresServer {
    static SERVER: OnceLock<Result<PostgresServer>> = OnceLock::new();
    let server = SERVER.get_or_init(|| match env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Ok(PostgresServer {
            kind: Kind::External { url },
        }),
        _ => PostgresServer::launch(false),
    });
    server.as_ref().unwrap_or_else(|message| panic!("{message}"))
}

/// A PostgreSQL server for tests: the shared one from [`postgres()`], or a dedicated one from
/// [`PostgresServer::start_dedicated`] that a test may stop and start.
pub struct PostgresServer {
    kind: Kind,
}

enum Kind {
    /// The server of [`DATABASE_URL_ENV`]: not ours to stop.
    External { url: String },
    /// A server we started; `dedicated` ones may be stopped and started.
    Throwaway {
        server: Box<ServerProcess<Postgres>>,
        dedicated: bool,
    },
}

impl PostgresServer {
    /// Starts a throwaway server of the caller's own, with its own directory and port, that
    /// [`stop`](Self::stop) and [`start`](Self::start) can take down and bring back. Dropping it
    /// stops it and removes its directory. [`DATABASE_URL_ENV`] does not apply.
    ///
    /// # Panics
    ///
    /// If the server cannot be started, e.g. when PostgreSQL is not installed.
    pub fn start_dedicated() -> PostgresServer {
        Self::launch(true).unwrap_or_else(|message| panic!("{message}"))
    }

    fn launch(dedicated: bool) -> Result<Self> {
        let binaries = Binaries::find(env::var_os("PATH").as_deref(), Path::new(LIB_DIR))?;
        let dir = process::create_temp_dir("pg")?;
        let watchdog = Watchdog::spawn(&dir, Postgres::KILL_SIGNAL).inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })?;
        // From here on the watchdog removes `dir`, whatever happens.
        let run_as = process::unprivileged_user_if_root(&dir)?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|err| format!("cannot hand {} to uid {uid}: {err}", dir.display()))?;
        }
        let data = dir.join("data");
        init_data_dir(&binaries.initdb, &data, &dir, run_as, &watchdog)?;
        let spec = Postgres {
            binary: binaries.postgres,
            data,
            socket_dir: dir.clone(),
            run_as,
        };
        let server = Box::new(ServerProcess::launch(spec, dir, watchdog)?);
        Ok(Self {
            kind: Kind::Throwaway { server, dedicated },
        })
    }

    /// The URL of database `db` on this server, for sqlx: `postgres://vexil@127.0.0.1:PORT/db` for a
    /// throwaway server.
    pub fn url(&self, db: &str) -> String {
        match &self.kind {
            Kind::External { url } => with_database(url, db),
            Kind::Throwaway { server, .. } => format!("postgres://{USER}@127.0.0.1:{}/{db}", server.port()),
        }
    }

    /// The port on 127.0.0.1 of a throwaway server (`None` for the server of [`DATABASE_URL_ENV`]).
    pub fn port(&self) -> Option<u16> {
        match &self.kind {
            Kind::External { .. } => None,
            Kind::Throwaway { server, .. } => Some(server.port()),
        }
    }

    /// The temporary directory of a throwaway server (data, socket and log; `None` for the server
    /// of [`DATABASE_URL_ENV`]).
    pub fn dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::External { .. } => None,
            Kind::Throwaway { server, .. } => Some(server.dir()),
        }
    }

    /// Creates a fresh database, `vexil_test_<pid>_<n>`, for one test. It is dropped (best effort)
    /// when the returned value is.
    ///
    /// # Panics
    ///
    /// If the server cannot be reached (e.g. a dedicated server that is stopped) or refuses.
    pub async fn database(&self) -> TestDatabase {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let admin_url = self.admin_url();
        let mut conn = PgConnection::connect(&admin_url).await.unwrap_or_else(|err| {
            panic!(
                "cannot connect to the test PostgreSQL server at {}: {err}",
                redact(&admin_url)
            )
        });
        let name = loop {
            let name = format!(
                "vexil_test_{}_{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let create = format!("CREATE DATABASE {}", quote_ident(&name));
            match sqlx::raw_sql(AssertSqlSafe(create)).execute(&mut conn).await {
                Ok(_) => break name,
                // Left on an external server by an earlier process that had our pid.
                Err(err) if is_duplicate_database(&err) => {}
                Err(err) => panic!("cannot create test database {name} at {}: {err}", redact(&admin_url)),
            }
        };
        // The database exists either way; a failed goodbye changes nothing.
        let _ = conn.close().await;
        TestDatabase {
            url: self.url(&name),
            name,
            admin_url,
        }
    }

    /// The URL to connect to for creating and dropping databases.
    fn admin_url(&self) -> String {
        match &self.kind {
            Kind::External { url } => url.clone(),
            Kind::Throwaway { .. } => self.url("postgres"),
        }
    }

    /// Stops a dedicated server (fast shutdown: sessions are ended) and returns once its process has
    /// exited. Does nothing if it is stopped.
    ///
    /// # Panics
    ///
    /// On the shared server from [`postgres()`], and if the server does not stop.
    pub fn stop(&self) {
        self.dedicated("stop")
            .stop()
            .unwrap_or_else(|message| panic!("{message}"));
    }

    /// Starts a stopped dedicated server again, on the same port and data, and returns once it
    /// accepts connections: URLs from before the stop work again. Does nothing if it runs.
    ///
    /// # Panics
    ///
    /// On the shared server from [`postgres()`], and if the server does not start (e.g. when
    /// another process took its port meanwhile).
    pub fn start(&self) {
        self.dedicated("start")
            .start()
            .unwrap_or_else(|message| panic!("{message}"));
    }

    fn dedicated(&self, what: &str) -> &ServerProcess<Postgres> {
        match &self.kind {
            Kind::Throwaway {
                server,
                dedicated: true,
            } => server,
            Kind::Throwaway { dedicated: false, .. } | Kind::External { .. } => panic!(
                "PostgresServer::{what}() needs a server of the test's own, from PostgresServer::start_dedicated(): \
                 the shared server of postgres() serves the other tests too"
            ),
        }
    }
}

impl fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("PostgresServer");
        match &self.kind {
            Kind::External { url } => debug.field("external", &redact(url)),
            Kind::Throwaway { server, dedicated } => debug.field("server", server).field("dedicated", dedicated),
        }
        .finish()
    }
}

/// A database of one test's own, dropped (best effort) when this value is dropped: keep it alive
/// as long as the test uses the database.
#[must_use = "the database is dropped when this value is dropped"]
pub struct TestDatabase {
    url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// The database's URL, for sqlx.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("url", &redact(&self.url))
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for TestDatabase {
    /// Drops the database, ending the sessions still connected to it. On a thread of its own with
    /// a runtime of its own, so that it works in sync code and inside any runtime; errors are
    /// ignored (e.g. a dedicated server that is stopped: its directory goes away with it).
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let drop_database = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&self.name));
        let dropper = thread::Builder::new()
            .name("vexil-testkit-dropdb".to_owned())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                runtime.block_on(async {
                    let drop = async {
                        let mut conn = PgConnection::connect(&admin_url).await?;
                        sqlx::raw_sql(AssertSqlSafe(drop_database)).execute(&mut conn).await?;
                        conn.close().await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(30), drop).await;
                });
            });
        if let Ok(dropper) = dropper {
            let _ = dropper.join();
        }
    }
}

/// The binaries a throwaway server needs.
#[derive(Debug, PartialEq, Eq)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    /// From the first directory of `path` that has both, else from the newest `lib_dir/<version>/bin`.
    fn find(path: Option<&OsStr>, lib_dir: &Path) -> Result<Self> {
        const NAMES: [&str; 2] = ["initdb", "postgres"];
        let dir = process::find_in_path(path, &NAMES)
            .or_else(|| newest_version_bin(lib_dir, &NAMES))
            .ok_or_else(|| format!("{MISSING} (searched PATH and {}/*/bin)", lib_dir.display()))?;
        Ok(Self {
            initdb: dir.join("initdb"),
            postgres: dir.join("postgres"),
        })
    }
}

/// The `bin` directory with all of `names` under the highest version in `lib_dir` (`16` > `9.6`).
fn newest_version_bin(lib_dir: &Path, names: &[&str]) -> Option<PathBuf> {
    fs::read_dir(lib_dir)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            names
                .iter()
                .all(|name| process::is_executable(&bin.join(name)))
                .then_some((version, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

/// Runs the command as `run_as` (uid, gid) if given.
fn run_as(command: &mut Command, run_as: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command
}

/// `initdb` into `data`: superuser `vexil`, trust authentication, UTF-8, locale C, no fsync.
fn init_data_dir(initdb: &Path, data: &Path, dir: &Path, user: Option<(u32, u32)>, watchdog: &Watchdog) -> Result<()> {
    let mut command = Command::new(initdb);
    command
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"])
        .env("LC_ALL", "C")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = run_as(&mut command, user)
        .spawn()
        .map_err(|err| format!("cannot run {}: {err}", initdb.display()))?;
    watchdog.watch(Some(child.id()));
    let output = child.wait_with_output();
    watchdog.watch(None);
    let output = output.map_err(|err| format!("cannot wait for {}: {err}", initdb.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}):\n{}{}",
            initdb.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// How to run a throwaway `postgres`.
#[derive(Debug)]
struct Postgres {
    binary: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl ServerSpec for Postgres {
    const NAME: &'static str = "PostgreSQL";
    const LOG_FILE: &'static str = "postgres.log";
    /// Fast shutdown.
    const STOP_SIGNAL: &'static str = "INT";
    /// Immediate shutdown: the data is thrown away.
    const KILL_SIGNAL: &'static str = "QUIT";

    fn command(&self, port: u16) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=200"])
            .env("LC_ALL", "C");
        run_as(&mut command, self.run_as);
        command
    }

    /// Our postmaster says it is ready (so it did bind the port), and a session can start.
    fn is_ready(&self, port: u16, pid: u32) -> bool {
        postmaster_ready(&self.data, pid) && accepts_sessions(port)
    }
}

/// Whether `data/postmaster.pid` names `pid` and (PostgreSQL 10 and later) says `ready`.
fn postmaster_ready(data: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    // Line 8 is the status; before PostgreSQL 10 there is none, and the session check decides.
    lines.first().is_some_and(|line| line.trim() == pid.to_string())
        && lines.get(7).is_none_or(|status| status.trim() == "ready")
}

/// Whether the server on `port` lets user `vexil` start a session on database `postgres`: sends
/// the protocol's startup message and expects an authentication message back (during startup the
/// server answers with an error instead).
fn accepts_sessions(port: u16) -> bool {
    let probe = || -> io::Result<bool> {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        // Protocol 3.0, then name/value pairs, each NUL-terminated, and a final NUL.
        let mut body = 196_608_u32.to_be_bytes().to_vec();
        for field in ["user", USER, "database", "postgres", ""] {
            body.extend_from_slice(field.as_bytes());
            body.push(0);
        }
        let len = u32::try_from(body.len() + 4).expect("a startup message of a few bytes");
        stream.write_all(&len.to_be_bytes())?;
        stream.write_all(&body)?;
        let mut tag = [0_u8];
        stream.read_exact(&mut tag)?;
        let authenticated = tag[0] == b'R';
        if authenticated {
            // Terminate: a polite goodbye, of no consequence if lost.
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
        }
        Ok(authenticated)
    };
    probe().unwrap_or(false)
}

/// `url` with its database (path) replaced by `db`, the query string kept.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let authority = base.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |slash| authority + slash);
    format!("{}/{db}{query}", &base[..path])
}

/// `url` with the password, if any, replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |scheme_end| scheme_end + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?'])
        .map_or(url.len(), |end| authority_start + end);
    let authority = &url[authority_start..authority_end];
    match authority
        .rfind('@')
        .and_then(|at| Some((authority[..at].find(':')?, at)))
    {
        Some((colon, at)) => format!(
            "{}{}:***{}",
            &url[..authority_start],
            &authority[..colon],
            &url[authority_start + at..]
        ),
        None => url.to_owned(),
    }
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether `err` is PostgreSQL's `duplicate_database` (42P04).
fn is_duplicate_database(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|err| err.code())
        .is_some_and(|code| code == "42P04")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(with_database("postgres://u@h:5432", "t1"), "postgres://u@h:5432/t1");
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable&application_name=x", "t1"),
            "postgres://u@h/t1?sslmode=disable&application_name=x"
        );
        assert_eq!(
            with_database("postgresql:///postgres?host=/run/postgresql", "t1"),
            "postgresql:///t1?host=/run/postgresql"
        );
    }

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
        assert_eq!(redact("postgres://h:5432/db"), "postgres://h:5432/db");
    }

    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(quote_ident("vexil_test_1_2"), "\"vexil_test_1_2\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    fn fake_bin(dir: &Path, names: &[&str]) {
        fs::create_dir_all(dir).expect("create a fake bin dir");
        for name in names {
            let file = dir.join(name);
            fs::write(&file, "#!/bin/sh\n").expect("write a fake binary");
            fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).expect("make it executable");
        }
    }

    #[test]
    fn binaries_come_from_path_else_from_the_newest_version() {
        let root = process::create_temp_dir("unit-bin").expect("temp dir");
        let lib = root.join("lib");
        fake_bin(&lib.join("9.6/bin"), &["initdb", "postgres"]);
        fake_bin(&lib.join("16/bin"), &["initdb", "postgres"]);
        fake_bin(&lib.join("17/bin"), &["initdb"]); // incomplete: skipped
        fs::create_dir_all(lib.join("common")).expect("a non-version entry");
        let path_dir = root.join("path");
        fake_bin(&path_dir, &["initdb", "postgres"]);
        let only_initdb = root.join("only-initdb");
        fake_bin(&only_initdb, &["initdb"]);

        let found = Binaries::find(Some(path_dir.as_os_str()), &lib).expect("in PATH");
        assert_eq!(found.postgres, path_dir.join("postgres"));
        let found = Binaries::find(Some(only_initdb.as_os_str()), &lib).expect("in lib");
        assert_eq!(
            found,
            Binaries {
                initdb: lib.join("16/bin/initdb"),
                postgres: lib.join("16/bin/postgres")
            }
        );

        let message = Binaries::find(None, &root.join("nowhere")).expect_err("nothing installed");
        assert!(message.starts_with(MISSING), "{message}");
        assert!(message.contains("apt-get install postgresql"), "{message}");
        fs::remove_dir_all(root).expect("remove the temp dir");
    }
}
