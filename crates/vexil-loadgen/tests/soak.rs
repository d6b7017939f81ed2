//! `vexil-loadgen soak` against the debug `vexil` binary: a few seconds of every protocol, flag-file
//! churn and stream subscribers; no errors, no mixed answers. Speed and memory are not asserted.

use std::path::PathBuf;
use std::process::Command;

/// The `vexil` binary next to this package's binary (built here if it is missing).
fn vexil() -> PathBuf {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_vexil-loadgen"));
    let bin = loadgen.with_file_name("vexil");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "vexil-server", "--bin", "vexil"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building vexil failed");
    }
    bin
}

#[test]
fn a_short_soak_has_no_errors_and_no_mixed_answers() {
    let json = std::env::temp_dir().join(format!("vexil-loadgen-soak-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vexil-loadgen"))
        .arg("soak")
        .arg("--vexil")
        .arg(vexil())
        .args([
            "--duration",
            "5",
            "--calibrate",
            "1.5",
            "--flags",
            "6",
            "--subscribers",
            "6",
        ])
        .args([
            "--subscriber-life",
            "0.5",
            "2",
            "--concurrency",
            "8",
            "--connections",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();

    assert_eq!(report["errors"], 0, "{stdout}");
    assert_eq!(report["mixed_answers"], 0, "{stdout}");
    assert_eq!(report["passed"], true);
    let protocols = report["protocols"].as_array().unwrap();
    assert_eq!(protocols.len(), 9);
    for p in protocols {
        assert!(
            p["ok"].as_u64().unwrap() > 0,
            "no successful {} request:\n{stdout}",
            p["name"]
        );
        assert!(p["all"]["p99_us"].as_f64().unwrap() > 0.0);
    }
    for s in report["streams"].as_array().unwrap() {
        assert!(s["sessions"].as_u64().unwrap() >= 2, "{s}");
        assert!(s["messages"].as_u64().unwrap() > 0, "{s}");
        assert!(s["changes"].as_u64().unwrap() > 0, "{s}");
    }
    // Churn happened: new generations were written and served, and invalid writes were made.
    let churn = &report["churn"];
    assert!(churn["generations"].as_u64().unwrap() >= 5, "{churn}");
    assert!(churn["max_generation_served"].as_u64().unwrap() >= 5, "{churn}");
    assert!(churn["invalid_writes"].as_u64().unwrap() >= 1, "{churn}");
    assert!(report["rss"]["samples"].as_array().unwrap().len() >= 3);
    assert!(stdout.contains("PASS"), "{stdout}");
}
