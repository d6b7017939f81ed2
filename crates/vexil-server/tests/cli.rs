//! The `vexil` command line: `validate`, help, and bad arguments. (Having an integration test also
//! makes `cargo test --workspace` build the `vexil` binary that `tests/` drives.)

use std::process::Command;

fn vexil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vexil"))
}

#[test]
fn validate_reports_every_problem_with_flag_and_path() {
    let dir = std::env::temp_dir().join(format!("vexil-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        r#"{"flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}}}"#,
    )
    .unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "flags:\n  f:\n    state: ON\n    variants: {a: 1, b: x}\n    defaultVariant: c\n",
    )
    .unwrap();

    let out = vexil().arg("validate").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("good.json: ok\n"));

    let out = vexil().arg("validate").arg(&good).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("flag `f` at /flags/f/defaultVariant: default variant `c` is not one of the variants (a, b)"),
        "{report}"
    );
    let out = vexil().args(["validate", "/nonexistent/flags.json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn examples_validate() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/flags.json");
    let out = vexil().args(["validate", example]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn bad_arguments_are_rejected_with_a_message() {
    let out = vexil().args(["start", "--fractional", "v7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a fractional mode"));
    let out = vexil()
        .args([
            "start",
            "--uri",
            "https://example.com/flags.json",
            "-p",
            "0",
            "-m",
            "0",
            "-g",
            "0",
            "-r",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported yet"));
    // Every problem is reported, not the first only.
    let out = vexil()
        .args([
            "start",
            "--uri",
            "s3://bucket/flags.json",
            "-X",
            "novalue",
            "-H",
            "nokey",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in ["s3://", "novalue", "nokey"] {
        assert!(stderr.contains(problem), "{problem} in {stderr}");
    }
    let help = vexil().args(["start", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--uri",
        "--port",
        "--context-value",
        "--server-cert-path",
        "--stale-after",
        "--fractional",
    ] {
        assert!(help.contains(option), "{option} in --help");
    }
}
