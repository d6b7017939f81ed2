//! `vexil validate`: checks flag files strictly (every schema violation is an error) and compiles
//! their targeting, printing every problem with the flag and JSON pointer.

use std::sync::Arc;

use vexil_core::parse::{self, Format, Strictness};
use vexil_core::{Engine, FractionalMode, Snapshot, SourceConfig};

/// Checks `files`; returns the number of files with problems. Writes a report to `out`.
pub fn run(files: &[String], out: &mut impl std::io::Write) -> std::io::Result<usize> {
    let mut failed = 0;
    for path in files {
        let problems = check(path);
        if problems.is_empty() {
            writeln!(out, "{path}: ok")?;
        } else {
            failed += 1;
            for p in problems {
                writeln!(out, "{path}: {p}")?;
            }
        }
    }
    Ok(failed)
}

fn check(path: &str) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("error: cannot read: {e}")],
    };
    let parsed = match parse::parse_str(&text, Format::from_path(path), Strictness::Strict) {
        Ok(p) => p,
        Err(e) => return e.diagnostics.iter().map(ToString::to_string).collect(),
    };
    let mut problems: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
    let engine = Arc::new(Engine::new(FractionalMode::default()));
    let (_, warnings) = Snapshot::build(
        engine,
        vec![SourceConfig {
            name: path.to_owned(),
            config: parsed.config,
        }],
    );
    problems.extend(
        warnings
            .iter()
            .map(|w| format!("error: {}", w.to_string().trim_start_matches("warning: "))),
    );
    problems
}
