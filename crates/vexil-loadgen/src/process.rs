//! Servers under test as child processes, and what `/proc` says about them (CPU time, RSS).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The four ports of a flagd-compatible server.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ports {
    pub evaluation: u16,
    pub management: u16,
    pub sync: u16,
    pub ofrep: u16,
}

impl Ports {
    /// Four free loopback ports.
    pub fn free() -> anyhow::Result<Ports> {
        let listeners: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let p: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        Ok(Ports {
            evaluation: p[0],
            management: p[1],
            sync: p[2],
            ofrep: p[3],
        })
    }
}

/// A running child process, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub ports: Ports,
    pub started: Instant,
}

impl Server {
    /// `vexil start` serving `flags`.
    pub fn vexil(binary: &Path, flags: &Path, extra: &[String]) -> anyhow::Result<Server> {
        Server::vexil_with_stderr(binary, flags, extra, Stdio::inherit())
    }

    /// As [`Server::vexil`], its standard error going to `stderr` (e.g. a log file).
    pub fn vexil_with_stderr(binary: &Path, flags: &Path, extra: &[String], stderr: Stdio) -> anyhow::Result<Server> {
        Server::vexil_with_env(binary, flags, extra, &[], stderr)
    }

    /// As [`Server::vexil_with_stderr`], with `env` changing the environment it inherits: each
    /// variable set to `Some` value, or removed with `None`.
    pub fn vexil_with_env(
        binary: &Path,
        flags: &Path,
        extra: &[String],
        env: &[(String, Option<String>)],
        stderr: Stdio,
    ) -> anyhow::Result<Server> {
        let ports = Ports::free()?;
        let mut cmd = Command::new(binary);
        cmd.arg("start")
            .arg("--uri")
            .arg(format!("file:{}", flags.display()))
            .args(port_args(ports))
            .args(["--bind", "127.0.0.1"])
            .args(extra)
            .env(
                "VEXIL_LOG",
                std::env::var("VEXIL_LOADGEN_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            );
        for (key, value) in env {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        Server::spawn(cmd, ports, stderr).with_context(|| format!("starting {}", binary.display()))
    }

    /// This tool's no-op baseline server.
    pub fn baseline(canned: &Path) -> anyhow::Result<Server> {
        let ports = Ports::free()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("baseline-server")
            .args(port_args(ports))
            .arg("--canned")
            .arg(canned);
        Server::spawn(cmd, ports, Stdio::inherit()).context("starting the baseline server")
    }

    /// Any command serving on `ports` (its standard error inherited).
    pub fn spawn_command(cmd: Command, ports: Ports) -> anyhow::Result<Server> {
        Server::spawn(cmd, ports, Stdio::inherit())
    }

    fn spawn(mut cmd: Command, ports: Ports, stderr: Stdio) -> anyhow::Result<Server> {
        let started = Instant::now();
        let child = cmd.stdout(Stdio::null()).stderr(stderr).spawn()?;
        Ok(Server { child, ports, started })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/readyz` answers 200; returns the time since the process started.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited: {status}");
            }
            if http_status(self.ports.management, "/readyz") == Some(200) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends the process `signal` (a name such as `INT` or `TERM`, through `kill(1)`); see
    /// [`Server::exit_status`] for when it has ended.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {}: {status}", self.pid());
        Ok(())
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_args(p: Ports) -> Vec<String> {
    ["-p", "-m", "-g", "-r"]
        .iter()
        .zip([p.evaluation, p.management, p.sync, p.ofrep])
        .flat_map(|(flag, port)| [(*flag).to_owned(), port.to_string()])
        .collect()
}

/// CPU seconds this process has used.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds("/proc/self/stat")
}

/// CPU time of every thread of process `pid` in nanoseconds (the first field of each
/// `/proc/<pid>/task/*/schedstat`: nanosecond resolution where `stat` counts 10 ms ticks). Threads
/// that have ended are not counted, so compare two readings of a process whose threads persist.
pub fn thread_cpu_nanos(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // the thread ended while we looked
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// utime + stime from a `/proc/<pid>/stat` file, in seconds (clock ticks are 100 Hz on Linux).
fn cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// `GET http://127.0.0.1:<port><path>` status, if it answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// `GET http://127.0.0.1:<port><path>`: status and body, if it answers (within 5 s).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Some((status, body.to_owned()))
}

/// The `vexil` binary next to this one (both are built into the same target directory).
pub fn default_vexil() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vexil")))
        .unwrap_or_else(|| PathBuf::from("vexil"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_time() {
        let before = own_cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        std::hint::black_box(x);
        assert!(own_cpu_seconds().unwrap() >= before);
        // This thread alone has used a few milliseconds by now (other test threads may come and go).
        assert!(thread_cpu_nanos(std::process::id()).unwrap() > 1_000_000);
    }

    #[test]
    fn port_arguments() {
        let args = port_args(Ports {
            evaluation: 1,
            management: 2,
            sync: 3,
            ofrep: 4,
        });
        assert_eq!(args, ["-p", "1", "-m", "2", "-g", "3", "-r", "4"]);
    }
}
