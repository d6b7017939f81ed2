//! The flagd schemas' own positive and negative examples (flagd-schemas 0.2.13, vendored in
//! `tests/conformance/flagd-schemas/test`) as test cases for validation and parsing.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vexil_core::parse::{self, Severity, Strictness};
use vexil_core::schema::{self, Schema};

fn examples(dir: &str) -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/flagd-schemas/test")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let doc = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p, doc)
        })
        .collect()
}

#[test]
fn positive_flag_examples_are_valid_and_parse_strictly() {
    for (path, doc) in examples("flags/positive") {
        // Each example names the schema it follows (flags.json, or flagd.json for flag arrays).
        let schema = match doc["$schema"].as_str() {
            Some(s) if s.ends_with("flagd.json") => Schema::Flagd,
            _ => Schema::Flags,
        };
        assert_eq!(schema::check(schema, &doc), vec![], "{}", path.display());
        let parsed = parse::parse_value(&doc, Strictness::Strict).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(parsed.warnings.is_empty(), "{}: {:?}", path.display(), parsed.warnings);
        assert!(!parsed.config.flags.is_empty(), "{}", path.display());
    }
}

#[test]
fn negative_flag_examples_are_rejected_with_the_flag_and_path() {
    for (path, doc) in examples("flags/negative") {
        let violations = schema::check(Schema::Flags, &doc);
        assert!(!violations.is_empty(), "{} should violate flags.json", path.display());
        if path.ends_with("with-array-flags.json") {
            // Arrays of flags are what flagd.json (the daemon's schema) adds to flags.json.
            assert_eq!(schema::check(Schema::Flagd, &doc), vec![], "{}", path.display());
            continue;
        }
        let err = parse::parse_value(&doc, Strictness::Strict)
            .expect_err(&format!("{} must not parse strictly", path.display()));
        for d in err.diagnostics.iter().filter(|d| d.severity == Severity::Error) {
            assert!(
                d.pointer.starts_with("/flags/") || d.pointer.starts_with("/metadata"),
                "{}: {d}",
                path.display()
            );
            if d.pointer.starts_with("/flags/") {
                assert!(d.flag.is_some(), "{}: {d} names no flag", path.display());
            }
        }
    }
}

#[test]
fn negative_flag_examples_still_load_as_flagd_would() {
    // flagd only warns on schema violations; documents its Go decoder accepts still load.
    for (path, doc) in examples("flags/negative") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let result = parse::parse_value(&doc, Strictness::Flagd);
        match name.as_str() {
            // A default variant that names no variant rejects the whole document in flagd too.
            "empty-variants.json" | "missing-variants.json" => {
                let err = result.expect_err(&name);
                let d = &err.diagnostics[0];
                assert_eq!(d.flag.as_deref(), Some("myBoolFlag"), "{name}: {d}");
                assert_eq!(d.pointer, "/flags/myBoolFlag/defaultVariant", "{name}: {d}");
            }
            // Valid for the daemon's schema, which allows arrays of flags.
            "with-array-flags.json" => {
                let parsed = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(parsed.warnings.is_empty(), "{name}: {:?}", parsed.warnings);
                assert_eq!(parsed.config.flags[0].key, "myBoolFlag");
            }
            _ => {
                let parsed = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(!parsed.warnings.is_empty(), "{name}: schema violations are reported");
                for w in &parsed.warnings {
                    assert!(
                        w.pointer.starts_with("/flags/") || w.pointer.starts_with("/metadata/"),
                        "{name}: {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn flagd_examples_are_valid() {
    for (path, doc) in examples("flagd/positive") {
        assert_eq!(schema::check(Schema::Flagd, &doc), vec![], "{}", path.display());
        let parsed = parse::parse_value(&doc, Strictness::Strict).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!parsed.config.flags.is_empty());
    }
}

#[test]
fn targeting_examples() {
    for (path, doc) in examples("targeting/positive") {
        assert_eq!(schema::check(Schema::Targeting, &doc), vec![], "{}", path.display());
    }
    for (path, doc) in examples("targeting/negative") {
        assert!(
            !schema::check(Schema::Targeting, &doc).is_empty(),
            "{} should be invalid",
            path.display()
        );
    }
}
