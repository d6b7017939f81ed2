//! The configuration file and `vexil health` against the built binary: a server configured by its
//! file alone serves on the file's ports (with the environment overriding the file), a bad file
//! stops the start with every problem listed, and `vexil health` exits 0 on a ready server and 1
//! otherwise.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vexil_e2e::{Scratch, binary};

const DEADLINE: Duration = Duration::from_secs(30);

/// `n` loopback ports free when asked.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A `vexil` process, killed on drop.
struct Vexil(Child);

impl Vexil {
    /// Sends SIGTERM and waits (at most 30 s) for the exit.
    fn stop(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Vexil {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `vexil <args>` to its end (at most 30 s) and returns its exit code, stdout and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut child = Vexil(
        Command::new(binary())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vexil starts"),
    );
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vexil {args:?} still running after 30 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.code(), stdout, stderr)
}

/// `GET path` on a loopback port: the status and body, if it answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Some((status, body))
}

const FLAGS: &str =
    r#"{"flags": {"banner": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}}}"#;

#[tokio::test]
async fn a_server_configured_by_its_file_serves_and_is_healthy() {
    let dir = Scratch::new("config-file");
    let flags = dir.write("flags.json", FLAGS);
    let [evaluation, management, sync, ofrep, unused] = free_ports(5)[..] else {
        unreachable!()
    };
    let config = dir.write(
        "vexil.yaml",
        &format!(
            "# every port from here, but OFREP's: the environment's VEXIL_OFREP_PORT wins
port: {evaluation}
management-port: {management}
sync-port: {sync}
ofrep-port: {unused}
bind: 127.0.0.1
uri:
  - file:{}
database-url: none
poll-interval-ms: 50
context-value: {{tier: gold}}
log-format: json
shutdown-delay: 0
",
            flags.display()
        ),
    );
    let log = dir.0.join("vexil.log");
    let mut server = Vexil(
        Command::new(binary())
            .args(["start", "--config"])
            .arg(&config)
            .env("VEXIL_OFREP_PORT", ofrep.to_string())
            .env("VEXIL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("vexil starts"),
    );
    let deadline = Instant::now() + DEADLINE;
    while get(management, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "vexil exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "not ready on the configured management port");
        std::thread::sleep(Duration::from_millis(25));
    }

    // OFREP on the environment's port, with the file's flags and static context.
    let http = reqwest::Client::new();
    let response = http
        .post(format!("http://127.0.0.1:{ofrep}/ofrep/v1/evaluate/flags/banner"))
        .header("content-type", "application/json")
        .body(r#"{"context": {}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["value"], Value::Bool(true), "{body}");
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "the file's OFREP port was overridden"
    );
    for port in [evaluation, sync] {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "nothing on {port}");
    }

    // `vexil health`: 0 on 200 (URL by flag or environment), 1 on another status.
    let readyz = format!("http://127.0.0.1:{management}/readyz");
    let (code, stdout, stderr) = run(&["health", "--url", &readyz], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("HTTP/1.0 200 OK\n") || stdout.starts_with("HTTP/1.1 200 OK\n"),
        "{stdout}"
    );
    let (code, ..) = run(&["health"], &[("VEXIL_HEALTH_URL", &readyz)]);
    assert_eq!(code, Some(0));
    let (code, stdout, _) = run(&["health", "--url", &format!("http://127.0.0.1:{ofrep}/nope")], &[]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains(" 404 "), "{stdout}");

    assert!(server.stop().is_some_and(|s| s.success()), "vexil did not stop cleanly");
    // `log-format: json`: one JSON object per line.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.trim().is_empty(), "nothing logged at info");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<Value>(line).is_ok(), "not a JSON line: {line}");
    }
}

#[test]
fn a_bad_configuration_file_stops_the_start_with_every_problem() {
    let dir = Scratch::new("config-bad");
    let config = dir.write(
        "vexil.yaml",
        "prot: 8013\nmanagement-port: abc\nlog-format: xml\nflagd-keys: yes please\nuri: {a: 1}\n",
    );
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = run(&["serve", "--config", config], &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.starts_with(&format!("invalid configuration in {config}:\n")),
        "{stderr}"
    );
    for problem in [
        "  - line 1: unknown option `prot` (did you mean `port`?)",
        "  - line 2: `management-port`: invalid value `abc`",
        "  - line 3: `log-format`: invalid value `xml` (possible values: text, json)",
        "  - line 4: `flagd-keys` must be true or false, not a string",
        "  - line 5: `uri` takes a list of values, not a mapping",
    ] {
        assert!(stderr.contains(problem), "missing {problem:?} in:\n{stderr}");
    }

    // The same file through VEXIL_CONFIG, for a store command; and an unreadable one.
    let (code, _, stderr) = run(&["migrate"], &[("VEXIL_CONFIG", config)]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.matches("\n  - ").count(), 5, "{stderr}");
    let missing = dir.0.join("missing.yaml");
    let (code, _, stderr) = run(&["serve", "--config", missing.to_str().unwrap()], &[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("cannot read the file"), "{stderr}");
}

#[test]
fn an_unreadable_otlp_certificate_authority_stops_the_start_naming_it() {
    let dir = Scratch::new("config-otlp-ca");
    let flags = dir.write("flags.json", FLAGS);
    let uri = format!("file:{}", flags.display());
    let ports: Vec<String> = free_ports(4).iter().map(u16::to_string).collect();
    let missing = dir.0.join("no-such-ca.pem");
    let missing = missing.to_str().unwrap();
    for protocol in ["grpc", "http/protobuf"] {
        let (code, stdout, stderr) = run(
            &[
                "start", "--uri", &uri, "-p", &ports[0], "-m", &ports[1], "-g", &ports[2], "-r", &ports[3],
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", missing),
            ],
        );
        assert_eq!(code, Some(1), "{protocol}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("cannot read OTEL_EXPORTER_OTLP_CERTIFICATE {missing}")),
            "{protocol}: {stderr}"
        );
    }
}

#[test]
fn health_of_a_closed_port_is_1() {
    let [port] = free_ports(1)[..] else { unreachable!() };
    let url = format!("http://127.0.0.1:{port}/readyz");
    let (code, stdout, stderr) = run(&["health", "--url", &url, "--timeout", "2"], &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
    // A URL it cannot check is a usage error.
    let (code, ..) = run(&["health", "--url", "https://example.com/readyz"], &[]);
    assert_eq!(code, Some(2));
}
