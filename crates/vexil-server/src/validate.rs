//! `vexil validate`: checks flag files strictly (every schema violation is an error, and so is a
//! rule that does not compile), printing every problem with the flag and JSON pointer: the same
//! check the managed store runs before it stores a flag set.

use vexil_core::parse::{self, Format};
use vexil_core::{Engine, FractionalMode};

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
    let engine = Engine::new(FractionalMode::default());
    match parse::read_document(&text, Format::from_path(path)).and_then(|doc| parse::check_value(&doc, &engine)) {
        Ok(_) => Vec::new(),
        Err(e) => e.diagnostics.iter().map(ToString::to_string).collect(),
    }
}
