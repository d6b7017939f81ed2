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
    for _ in 0..200 {
        if http_status(ports.management, "/readyz") == Some(200) {
            break;
        }
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
