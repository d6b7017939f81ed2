//! Test harness: runs the real `vexil` binary on loopback ports and stops it with SIGTERM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vendored flagd-testbed.
pub fn testbed() -> PathBuf {
    root().join("tests/conformance/flagd-testbed")
}

/// The `vexil` binary. `cargo test --workspace` builds it (vexil-server has integration tests);
/// when it is missing or older than the sources (a run of only this package after an edit), it is
/// built here, once per test process.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root().join("target"), PathBuf::from);
        let bin = target.join("debug").join("vexil");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let sources = ["crates", "proto", "Cargo.lock"]
            .iter()
            .filter_map(|p| newest(&root().join(p)))
            .max();
        if built.is_none() || sources.is_some_and(|s| Some(s) > built) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-q", "-p", "vexil-server", "--bin", "vexil"])
                .current_dir(root())
                .status()
                .expect("cargo build runs");
            assert!(status.success(), "building vexil failed");
        }
        bin
    })
}

/// The newest modification time of the files under `path`.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest(&e.path()))
        .max()
}

/// The four ports of one server.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub evaluation: u16,
    pub management: u16,
    pub sync: u16,
    pub ofrep: u16,
}

fn free_ports() -> Ports {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let p: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
    Ports {
        evaluation: p[0],
        management: p[1],
        sync: p[2],
        ofrep: p[3],
    }
}

/// How waiting for a server ended.
enum Waited {
    Done,
    Exited(std::process::ExitStatus),
    TimedOut,
}

/// A running `vexil start`.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    pub ports: Ports,
    cwd: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

impl Server {
    /// Starts `vexil start <args>` on free ports and waits until `/readyz` answers 200.
    pub fn start(args: &[&str]) -> Server {
        Server::new(None, args, &[]).started(|s| s.http_status("/readyz") == Some(200), "ready")
    }

    /// Starts `vexil start <args>` and waits only until `/healthz` answers.
    pub fn start_unready(args: &[&str]) -> Server {
        Server::new(None, args, &[]).started(|s| s.http_status("/healthz") == Some(200), "up")
    }

    /// Starts `vexil start <args>` with working directory `dir` (source names are the paths as
    /// given, so relative `--uri`s name sources like flagd's testbed does) and waits until ready.
    pub fn start_in(dir: &Path, args: &[&str]) -> Server {
        Server::new(Some(dir), args, &[]).started(|s| s.http_status("/readyz") == Some(200), "ready")
    }

    /// Stops the server and starts it again with the same ports and arguments after `down`.
    pub fn restart_after(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.launch();
        let what = "ready again";
        match self.wait_for(|s| s.http_status("/readyz") == Some(200)) {
            Waited::Done => {}
            Waited::Exited(status) => panic!("vexil exited before it was {what}: {status}"),
            Waited::TimedOut => panic!("vexil was not {what} within 30 s"),
        }
    }

    /// Starts `vexil start <args>` with the environment variables `env` and waits until ready.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::new(None, args, env).started(|s| s.http_status("/readyz") == Some(200), "ready")
    }

    fn new(cwd: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server {
            child: None,
            ports: free_ports(),
            cwd: cwd.map(Path::to_owned),
            args: owned(args),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    /// Launches the server and waits until `ok`. Free ports are found by binding and releasing
    /// them, so another process (a test's PostgreSQL or Redis, another server) may take one before
    /// the server binds it: a server that exits before it is `what` is started again on other
    /// ports, twice at most.
    fn started(mut self, ok: impl Fn(&Server) -> bool, what: &str) -> Server {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            self.launch();
            match self.wait_for(&ok) {
                Waited::Done => return self,
                Waited::Exited(status) if attempt < ATTEMPTS => {
                    eprintln!(
                        "vexil exited before it was {what} ({status}; a port taken meanwhile?): starting it on other ports"
                    );
                    self.ports = free_ports();
                }
                Waited::Exited(status) => panic!("vexil exited before it was {what}, {ATTEMPTS} times: {status}"),
                Waited::TimedOut => panic!("vexil was not {what} within 30 s"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits up to 30 s until `ok`, or until the process exits.
    fn wait_for(&mut self, ok: impl Fn(&Server) -> bool) -> Waited {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if ok(self) {
                return Waited::Done;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Waited::Exited(status);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Waited::TimedOut
    }

    fn launch(&mut self) {
        let ports = self.ports;
        let p = |n: u16| n.to_string();
        let child = Command::new(binary())
            .arg("start")
            .args([
                "-p",
                &p(ports.evaluation),
                "-m",
                &p(ports.management),
                "-g",
                &p(ports.sync),
                "-r",
                &p(ports.ofrep),
            ])
            .args(["--bind", "127.0.0.1", "--poll-interval-ms", "50"])
            .args(&self.args)
            .current_dir(self.cwd.clone().unwrap_or_else(root))
            .env(
                "VEXIL_LOG",
                std::env::var("VEXIL_LOG").unwrap_or_else(|_| "error".into()),
            )
            // Tests stop servers with SIGTERM: no drain delay unless a test asks for one.
            .env("VEXIL_SHUTDOWN_DELAY", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vexil starts");
        self.child = Some(child);
    }

    /// The status of `GET http://127.0.0.1:<management><path>`, if it answers.
    pub fn http_status(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.ports.management)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.evaluation)
    }

    pub fn sync_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.sync)
    }

    pub fn ofrep_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.ofrep)
    }

    pub fn management_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.management)
    }

    /// Sends SIGTERM (a graceful stop) without waiting.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
    }

    /// Waits up to `within` for the process to exit; its exit status's success, or `None` when it
    /// is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<bool> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vexil-e2e-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `text` to `name` atomically (write + rename, as editors and ConfigMaps do).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = path.with_file_name(format!(".{file_name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
