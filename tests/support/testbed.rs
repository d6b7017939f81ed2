//! Shared by the test suites that run the flagd-testbed (`crates/vexil-core/tests/testbed.rs` and
//! `tests/e2e/providers.rs`, which include this file with `#[path]`): loading the testbed's flags
//! the way its launchpad does, and preparing its `.feature` files for the gherkin crate.
//! `tests/e2e/raw.rs` includes it too.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The testbed launchpad's `allFlags.json`: every `flags/*.json` except `selector-*`, merged.
pub fn all_flags(testbed: &Path) -> Value {
    let mut merged = json!({ "flags": {}, "$evaluators": {} });
    let mut files: Vec<PathBuf> = std::fs::read_dir(testbed.join("flags"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("selector-"))
        .collect();
    files.sort();
    for file in files {
        let doc = load(&file);
        for section in ["flags", "$evaluators"] {
            if let Some(Value::Object(items)) = doc.get(section) {
                merged[section].as_object_mut().unwrap().extend(items.clone());
            }
        }
    }
    merged
}

/// A JSON file.
pub fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Copies the `.feature` files of `src` named in `only` (all when empty) into `out`, doubling the
/// backslashes of table cells that are not gherkin escapes (`\|`, `\\`, `\n`): the testbed writes
/// `\"` and `\u0000` in cells, which the official gherkin parsers keep as text but the gherkin
/// crate rejects; doubled, they read back as the same text.
pub fn prepare_features(src: &Path, out: &Path, only: &[&str]) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "feature") || (!only.is_empty() && !only.contains(&stem.as_str())) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let fixed: Vec<String> = text
            .lines()
            .map(|line| {
                if line.trim_start().starts_with('|') {
                    escape_cell_text(line)
                } else {
                    line.to_owned()
                }
            })
            .collect();
        std::fs::write(out.join(path.file_name().unwrap()), fixed.join("\n") + "\n").unwrap();
    }
    out.to_owned()
}

fn escape_cell_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some(&next @ ('|' | '\\' | 'n')) => {
                out.push(c);
                out.push(next);
                chars.next();
            }
            _ => out.push_str("\\\\"),
        }
    }
    out
}

/// Cucumber's report: on stderr with `VEXIL_E2E_VERBOSE=1`, else nowhere (the runners print their
/// own summaries, naming every failure).
#[allow(dead_code, reason = "the vexil-core runner keeps cucumber's default report")]
pub fn report_writer() -> cucumber::writer::Basic<Box<dyn std::io::Write>> {
    let out: Box<dyn std::io::Write> = if std::env::var_os("VEXIL_E2E_VERBOSE").is_some() {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::sink())
    };
    cucumber::writer::Basic::raw(
        out,
        cucumber::writer::Coloring::Never,
        cucumber::writer::Verbosity::Default,
    )
}
