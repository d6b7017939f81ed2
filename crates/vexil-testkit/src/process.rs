//! What the servers share: finding binaries, temporary directories, free ports, the watchdog that
//! cleans up after the test process however it ends, and a server process that can be stopped and
//! started again on the same port.

use std::env;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Errors are messages for the panic that ends the test.
pub(crate) type Result<T> = std::result::Result<T, String>;

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping server may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Fresh ports tried when the one picked was taken before the server could bind it.
const PORT_ATTEMPTS: usize = 5;

/// Locks a mutex, ignoring poisoning: a panicking test must not stop the cleanup of another.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The first directory of `path` (a `PATH`-style list) that holds all of `names` as executables.
pub(crate) fn find_in_path(path: Option<&OsStr>, names: &[&str]) -> Option<PathBuf> {
    env::split_paths(path?).find(|dir| names.iter().all(|name| is_executable(&dir.join(name))))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Creates `vexil-testkit-<kind>-<pid>-<n>` (mode 0700) in the system's temporary directory.
pub(crate) fn create_temp_dir(kind: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = env::temp_dir();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("vexil-testkit-{kind}-{}-{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left behind by an earlier process that had our pid: not ours, leave it.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(format!("cannot create a temporary directory {}: {err}", dir.display())),
        }
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|err| format!("cannot bind 127.0.0.1:0 to find a free port: {err}"))?;
    let addr = listener
        .local_addr()
        .map_err(|err| format!("cannot read the free port: {err}"))?;
    Ok(addr.port())
}

/// Sends `signal` (a name such as `QUIT`) to `pid` with the shell's `kill`.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    // A process that is already gone is fine; anything else shows up when waiting for it.
    let _ = Command::new("/bin/sh")
        .args(["-c", r#"kill -s "$1" "$2" 2>/dev/null"#, "sh", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Signals `child` and waits until it has exited, killing it if it takes longer than [`STOP_TIMEOUT`].
fn shut_down(child: &mut Child, signal: &str) -> Result<()> {
    send_signal(child.id(), signal);
    match wait_timeout(child, STOP_TIMEOUT) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            // Best effort: the error that matters is reported below.
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "process {} did not stop within {STOP_TIMEOUT:?} of SIG{signal}; killed it",
                child.id()
            ))
        }
        Err(err) => Err(format!("cannot wait for process {}: {err}", child.id())),
    }
}

/// PostgreSQL refuses to run as root. When `dir` (just created by us) belongs to root, we are root:
/// returns the uid and gid of the unprivileged user to run PostgreSQL as (`postgres`, else `nobody`).
pub(crate) fn unprivileged_user_if_root(dir: &Path) -> Result<Option<(u32, u32)>> {
    let owner = fs::metadata(dir)
        .map_err(|err| format!("cannot stat {}: {err}", dir.display()))?
        .uid();
    if owner != 0 {
        return Ok(None);
    }
    let id = |flag: &str, user: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, user])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
    };
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|user| Some((id("-u", user)?, id("-g", user)?)))
        .map(Some)
        .ok_or_else(|| {
            "running as root, and PostgreSQL refuses to: no unprivileged user (`postgres` or `nobody`) to run it as"
                .to_owned()
        })
}

/// Runs when the watchdog's standard input reaches end of file: when the test process has closed it
/// or has died, however it died. It sends `$2` to the last pid written to it (an empty line means
/// none), waits for that process to be gone (a zombie counts as gone: on some machines nothing reaps
/// orphans), and removes the directory `$1`.
const WATCHDOG_SCRIPT: &str = r#"
dir=$1 sig=$2 pid=
while IFS= read -r line; do pid=$line; done
if [ -n "$pid" ] && kill -s "$sig" "$pid" 2>/dev/null; then
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ -r "/proc/$pid/stat" ]; then
            case $(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) in Z*|X*|'') break ;; esac
        fi
        if [ "$i" -ge 300 ]; then kill -s KILL "$pid" 2>/dev/null; break; fi
        sleep 0.1
        i=$((i + 1))
    done
fi
rm -rf "$dir"
"#;

/// A shell that removes a directory, and stops the server process running in it, once the test
/// process is gone. A Rust static is never dropped, and the test process may be killed with
/// SIGKILL: the watchdog holds the read end of a pipe whose only write end is in this process, so
/// it learns of our exit from the kernel however we exit.
#[derive(Debug)]
pub(crate) struct Watchdog {
    stdin: Mutex<Option<ChildStdin>>,
    process: Mutex<Child>,
}

impl Watchdog {
    /// Starts the watchdog of `dir`; `signal` is what it sends to the watched process.
    pub(crate) fn spawn(dir: &Path, signal: &str) -> Result<Self> {
        let mut process = Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("sh")
            .arg(dir)
            .arg(signal)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that a Ctrl-C in the terminal does not kill it before it cleans up.
            .process_group(0)
            .spawn()
            .map_err(|err| format!("cannot start the cleanup watchdog (`sh`): {err}"))?;
        let stdin = process.stdin.take();
        Ok(Self {
            stdin: Mutex::new(stdin),
            process: Mutex::new(process),
        })
    }

    /// Tells the watchdog which process to stop (`None`: none) if the test process dies.
    pub(crate) fn watch(&self, pid: Option<u32>) {
        if let Some(stdin) = lock(&self.stdin).as_mut() {
            let line = pid.map(|pid| pid.to_string()).unwrap_or_default();
            // Nothing to do if the watchdog is gone: nothing else would clean up either.
            let _ = writeln!(stdin, "{line}").and_then(|()| stdin.flush());
        }
    }
}

impl Drop for Watchdog {
    /// Closes the pipe and waits for the watchdog: the directory is gone when this returns.
    fn drop(&mut self) {
        drop(lock(&self.stdin).take());
        let _ = lock(&self.process).wait();
    }
}

/// Why a server did not come up.
enum StartError {
    /// The port was taken between picking it and binding it.
    PortInUse(String),
    Failed(String),
}

/// How to run one kind of server.
pub(crate) trait ServerSpec: Send + Sync {
    /// The server's name in messages, e.g. `PostgreSQL`.
    const NAME: &'static str;
    /// The log file's name in the server's directory.
    const LOG_FILE: &'static str;
    /// For [`ServerProcess::stop`]: a shutdown that ends with the process exiting.
    const STOP_SIGNAL: &'static str;
    /// For teardown, here and in the watchdog: the fastest clean stop.
    const KILL_SIGNAL: &'static str;

    /// The server's command for `port` (standard streams and process group are set by the caller).
    fn command(&self, port: u16) -> Command;

    /// Whether the server with process id `pid` accepts connections on `port`: a check that another
    /// server answering on that port does not pass.
    fn is_ready(&self, port: u16, pid: u32) -> bool;
}

/// A server process in a temporary directory of its own, with its watchdog.
#[derive(Debug)]
pub(crate) struct ServerProcess<S: ServerSpec> {
    spec: S,
    dir: PathBuf,
    log: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
    // Dropped last (fields drop in order): removes `dir` once the server is stopped.
    watchdog: Watchdog,
}

impl<S: ServerSpec> ServerProcess<S> {
    /// Starts the server on a free port and waits until it accepts connections. `dir` is the
    /// server's directory, `watchdog` the one watching it.
    pub(crate) fn launch(spec: S, dir: PathBuf, watchdog: Watchdog) -> Result<Self> {
        let log = dir.join(S::LOG_FILE);
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match run(&spec, &dir, &log, port, &watchdog) {
                Ok(child) => {
                    return Ok(Self {
                        spec,
                        dir,
                        log,
                        port,
                        child: Mutex::new(Some(child)),
                        watchdog,
                    });
                }
                Err(StartError::PortInUse(message)) => last = message,
                Err(StartError::Failed(message)) => return Err(message),
            }
        }
        Err(format!(
            "{} could not get a free port in {PORT_ATTEMPTS} attempts; last: {last}",
            S::NAME
        ))
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the server again, on the same port; does nothing if it runs.
    pub(crate) fn start(&self) -> Result<()> {
        let mut child = lock(&self.child);
        if let Some(running) = child.as_mut() {
            match running.try_wait() {
                Ok(None) => return Ok(()),
                // It exited on its own: start it again.
                Ok(Some(_)) | Err(_) => *child = None,
            }
        }
        match run(&self.spec, &self.dir, &self.log, self.port, &self.watchdog) {
            Ok(started) => {
                *child = Some(started);
                Ok(())
            }
            Err(StartError::PortInUse(message) | StartError::Failed(message)) => Err(message),
        }
    }

    /// Stops the server and waits until its process has exited; does nothing if it is stopped.
    pub(crate) fn stop(&self) -> Result<()> {
        self.stop_with(S::STOP_SIGNAL)
    }

    fn stop_with(&self, signal: &str) -> Result<()> {
        let mut child = lock(&self.child);
        let Some(mut running) = child.take() else {
            return Ok(());
        };
        let stopped = shut_down(&mut running, signal);
        self.watchdog.watch(None);
        stopped.map_err(|err| format!("stopping {}: {err}", S::NAME))
    }
}

impl<S: ServerSpec> Drop for ServerProcess<S> {
    fn drop(&mut self) {
        // Errors are of no use in a drop; the watchdog removes the directory either way.
        let _ = self.stop_with(S::KILL_SIGNAL);
    }
}

/// Starts the server on `port` and waits until it accepts connections.
fn run<S: ServerSpec>(
    spec: &S,
    dir: &Path,
    log: &Path,
    port: u16,
    watchdog: &Watchdog,
) -> std::result::Result<Child, StartError> {
    let failed = |what: &str, err: io::Error| StartError::Failed(format!("{}: {what}: {err}", S::NAME));
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|err| failed("cannot open its log", err))?;
    let log_start = log_file
        .metadata()
        .map_err(|err| failed("cannot stat its log", err))?
        .len();
    let stderr = log_file
        .try_clone()
        .map_err(|err| failed("cannot duplicate its log's descriptor", err))?;
    let mut child = spec
        .command(port)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|err| failed("cannot start it", err))?;
    watchdog.watch(Some(child.id()));

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                watchdog.watch(None);
                let output = read_log(log, log_start);
                let message = format!(
                    "{} exited ({status}) before accepting connections on port {port}; its log:\n{output}",
                    S::NAME
                );
                return Err(if output.contains("Address already in use") {
                    StartError::PortInUse(message)
                } else {
                    StartError::Failed(message)
                });
            }
            Err(err) => return Err(failed("cannot wait for it", err)),
        }
        if spec.is_ready(port, child.id()) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = shut_down(&mut child, S::KILL_SIGNAL);
            watchdog.watch(None);
            return Err(StartError::Failed(format!(
                "{} did not accept connections on port {port} within {READY_TIMEOUT:?}; its log:\n{}",
                S::NAME,
                read_log(log, log_start)
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The log from byte `start` on (what the latest run wrote).
fn read_log(log: &Path, start: u64) -> String {
    let mut text = Vec::new();
    let read = fs::File::open(log).and_then(|mut file| {
        file.seek(SeekFrom::Start(start))?;
        file.read_to_end(&mut text)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&text).into_owned(),
        Err(err) => format!("(cannot read {}: {err})", log.display()),
    }
}
