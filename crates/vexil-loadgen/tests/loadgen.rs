//! The load generator's own tests: its driver and clients against its baseline server, and the CLI.

use std::sync::Arc;
use std::time::Duration;

use vexil_loadgen::baseline::{self, Canned};
use vexil_loadgen::driver::{self, LoadSpec};
use vexil_loadgen::flags::catalog;
use vexil_loadgen::process::{Ports, http_status};
use vexil_loadgen::workload::{Client, Scenario, requests};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_every_scenario_against_the_baseline() {
    let ports = Ports::free().unwrap();
    let canned = Canned {
        ofrep_single: r#"{"key":"k","value":true}"#.into(),
        ofrep_bulk: r#"{"flags":[]}"#.into(),
        ..Canned::default()
    };
    tokio::spawn(baseline::run(ports.evaluation, ports.management, ports.ofrep, canned));
    // Ready within a generous deadline (a loaded machine takes seconds to schedule the task).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while http_status(ports.management, "/readyz") != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the baseline server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = Arc::new(Client::connect(ports.evaluation, ports.ofrep, 2).await.unwrap());
    let flags = catalog(12);
    for scenario in [
        Scenario::ResolveBoolean,
        Scenario::ResolveString,
        Scenario::ResolveAll,
        Scenario::V2Boolean,
        Scenario::OfrepSingle,
        Scenario::OfrepBulk,
    ] {
        let pool = Arc::new(requests(scenario, &flags, 5, 32));
        let spec = LoadSpec {
            concurrency: 4,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            rate: None,
        };
        let (m, ()) = driver::drive(client.clone(), pool, spec, || ()).await;
        assert!(m.requests > 10, "{scenario:?}: {} requests", m.requests);
        assert_eq!(m.errors, 0, "{scenario:?}: {:?}", m.first_error);
        assert!(m.quantile_us(0.99) > 0.0);
    }

    // Open loop: the arrival rate is what was asked for.
    let pool = Arc::new(requests(Scenario::ResolveBoolean, &flags, 5, 32));
    let spec = LoadSpec {
        concurrency: 4,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(100),
        rate: Some(200.0),
    };
    let (m, ()) = driver::drive(client, pool, spec, || ()).await;
    assert!(
        (150..=250).contains(&m.requests),
        "{} requests at 200/s for 1 s",
        m.requests
    );
}

#[test]
fn a_missing_vexil_binary_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vexil-loadgen"))
        .args(["run", "--vexil", "/nonexistent/vexil", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vexil binary at /nonexistent/vexil"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_a_running_server_given_by_address_and_writes_json() {
    let ports = Ports::free().unwrap();
    let canned = Canned {
        ofrep_single: r#"{"key":"k","value":true}"#.into(),
        ..Canned::default()
    };
    tokio::spawn(baseline::run(ports.evaluation, ports.management, ports.ofrep, canned));
    // Ready within a generous deadline (a loaded machine takes seconds to schedule the task).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while http_status(ports.management, "/readyz") != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the baseline server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = std::env::temp_dir().join(format!("vexil-loadgen-target-{}.json", std::process::id()));
    let (p, r) = (ports.evaluation.to_string(), ports.ofrep.to_string());
    let args = [
        "run",
        "--target",
        "127.0.0.1",
        "--target-port",
        &p,
        "--target-ofrep-port",
        &r,
        "--scenario",
        "ofrep-single",
        "--scenario",
        "resolve-boolean",
    ];
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_vexil-loadgen"))
        .args(args)
        .args(["--duration", "0.5", "--warmup", "0.1", "--concurrency", "4", "--json"])
        .arg(&out)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["p99_us"].as_f64().unwrap() > 0.0);
    }
    std::fs::remove_file(&out).unwrap();

    let flags = std::env::temp_dir().join(format!("vexil-loadgen-flags-{}.json", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_vexil-loadgen"))
        .args(["run", "--flags", "30", "--write-flags"])
        .arg(&flags)
        .status()
        .unwrap();
    assert!(status.success());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&flags).unwrap()).unwrap();
    assert_eq!(doc["flags"].as_object().unwrap().len(), 30);
    std::fs::remove_file(&flags).unwrap();
}
