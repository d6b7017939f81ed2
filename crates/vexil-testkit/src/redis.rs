//! Redis: a throwaway server per call.

use std::env;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Result, ServerProcess, ServerSpec, Watchdog};

/// Names an existing Redis server for [`redis()`] to return instead of starting one, e.g.
/// `redis://127.0.0.1:6379`.
pub const REDIS_URL_ENV: &str = "VEXIL_TEST_REDIS_URL";

const MISSING: &str = "Redis server binary (redis-server) not found: install the `redis-server` package \
                       (Debian/Ubuntu: apt-get install redis-server)";

/// A fresh throwaway Redis server for the caller (free port on 127.0.0.1, no persistence, its own
/// temporary directory), stopped and removed when the value is dropped or the test process exits,
/// however it exits. When [`REDIS_URL_ENV`] is set, that server instead (and then
/// [`RedisServer::stop`] and [`RedisServer::start`] panic).
///
/// Blocks while the server starts; callable from sync code and from any runtime.
///
/// # Panics
///
/// If the server cannot be started, e.g. when Redis is not installed.
pub fn redis() -> RedisServer {
    match env::var(REDIS_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => RedisServer {
            kind: Kind::External { url },
        },
        _ => RedisServer::launch().unwrap_or_else(|message| panic!("{message}")),
    }
}

/// A Redis server for one test; see [`redis()`].
pub struct RedisServer {
    kind: Kind,
}

enum Kind {
    /// The server of [`REDIS_URL_ENV`].
    External {
        url: String,
    },
    Throwaway {
        server: ServerProcess<Redis>,
        url: String,
    },
}

impl RedisServer {
    fn launch() -> Result<Self> {
        let binary = process::find_in_path(env::var_os("PATH").as_deref(), &["redis-server"])
            .map(|dir| dir.join("redis-server"))
            .ok_or_else(|| format!("{MISSING} (searched PATH)"))?;
        let dir = process::create_temp_dir("redis")?;
        let watchdog = Watchdog::spawn(&dir, Redis::KILL_SIGNAL).inspect_err(|_| {
            let _ = std::fs::remove_dir(&dir);
        })?;
        let server = ServerProcess::launch(
            Redis {
                binary,
                dir: dir.clone(),
            },
            dir,
            watchdog,
        )?;
        let url = format!("redis://127.0.0.1:{}", server.port());
        Ok(Self {
            kind: Kind::Throwaway { server, url },
        })
    }

    /// The server's URL: `redis://127.0.0.1:PORT` for a throwaway server.
    pub fn url(&self) -> &str {
        match &self.kind {
            Kind::External { url } | Kind::Throwaway { url, .. } => url,
        }
    }

    /// The port on 127.0.0.1 of a throwaway server (`None` for the server of [`REDIS_URL_ENV`]).
    pub fn port(&self) -> Option<u16> {
        match &self.kind {
            Kind::External { .. } => None,
            Kind::Throwaway { server, .. } => Some(server.port()),
        }
    }

    /// The temporary directory of a throwaway server (`None` for the server of [`REDIS_URL_ENV`]).
    pub fn dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::External { .. } => None,
            Kind::Throwaway { server, .. } => Some(server.dir()),
        }
    }

    /// Stops the server and returns once its process has exited. Does nothing if it is stopped.
    ///
    /// # Panics
    ///
    /// With [`REDIS_URL_ENV`] set (that server is not ours to stop), and if the server does not stop.
    pub fn stop(&self) {
        self.throwaway("stop")
            .stop()
            .unwrap_or_else(|message| panic!("{message}"));
    }

    /// Starts a stopped server again, on the same port (empty: nothing is persisted), and returns
    /// once it answers. Does nothing if it runs.
    ///
    /// # Panics
    ///
    /// With [`REDIS_URL_ENV`] set, and if the server does not start (e.g. when another process took
    /// its port meanwhile).
    pub fn start(&self) {
        self.throwaway("start")
            .start()
            .unwrap_or_else(|message| panic!("{message}"));
    }

    fn throwaway(&self, what: &str) -> &ServerProcess<Redis> {
        match &self.kind {
            Kind::Throwaway { server, .. } => server,
            Kind::External { .. } => panic!(
                "RedisServer::{what}() needs a throwaway server started by the testkit: unset {REDIS_URL_ENV} \
                 (the server it names is not ours to stop)"
            ),
        }
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("RedisServer");
        match &self.kind {
            // The URL may hold a password.
            Kind::External { .. } => debug.field("external", &REDIS_URL_ENV),
            Kind::Throwaway { server, url } => debug.field("url", url).field("server", server),
        }
        .finish()
    }
}

/// How to run a throwaway `redis-server`.
#[derive(Debug)]
struct Redis {
    binary: PathBuf,
    dir: PathBuf,
}

impl ServerSpec for Redis {
    const NAME: &'static str = "Redis";
    const LOG_FILE: &'static str = "redis.log";
    /// Shutdown (with nothing to save).
    const STOP_SIGNAL: &'static str = "TERM";
    const KILL_SIGNAL: &'static str = "TERM";

    fn command(&self, port: u16) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .env("LC_ALL", "C");
        command
    }

    /// The server on `port` answers `INFO server` with our process id.
    fn is_ready(&self, port: u16, pid: u32) -> bool {
        let probe = || -> io::Result<bool> {
            let stream =
                TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.set_write_timeout(Some(Duration::from_secs(5)))?;
            (&stream).write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")?;
            let mut reader = BufReader::new(&stream);
            let mut header = String::new();
            reader.read_line(&mut header)?;
            // A bulk string, `$<len>`; while loading, an error such as `-LOADING`.
            let Some(len) = header
                .strip_prefix('$')
                .and_then(|len| len.trim().parse::<usize>().ok())
            else {
                return Ok(false);
            };
            let mut info = vec![0; len];
            reader.read_exact(&mut info)?;
            let expected = format!("process_id:{pid}");
            Ok(String::from_utf8_lossy(&info)
                .lines()
                .any(|line| line.trim() == expected))
        };
        probe().unwrap_or(false)
    }
}
