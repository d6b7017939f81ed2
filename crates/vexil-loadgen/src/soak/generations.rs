//! The churned flag file and the checking of answers against it: the documents of each valid
//! generation and the invalid writes, the atomic writes, the generations written and served, and
//! the generation marks read from an answer, judged fine, mixed or impossible.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use vexil_proto::JsonStruct;

use super::INVALID_GENERATION;
use crate::flags::GeneratedFlag;

// ---------------------------------------------------------------------------------------------
// The churned flag file

/// The keys of the generation flags of generation `n` (one key rotates, so keys come and go).
pub(super) fn generation_keys(n: u64) -> Vec<String> {
    let mut keys: Vec<String> = ["gen-static", "gen-targeting", "gen-fractional"]
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
    keys.push(format!("gen-rotating-{}", n % 3));
    keys
}

/// The string keys single-flag string requests use: the stable generation flags first.
pub(super) const GENERATION_KEYS: [&str; 3] = ["gen-static", "gen-targeting", "gen-fractional"];

/// A valid document of generation `n`: the catalog plus the generation flags, all values
/// `value` and metadata `generation: n`.
pub(super) fn document(catalog: &[GeneratedFlag], n: u64, value: &str) -> Value {
    let mut doc = crate::flags::document(catalog);
    let flags = doc["flags"].as_object_mut().expect("flags object");
    for key in generation_keys(n) {
        let mut flag = json!({
            "state": "ENABLED",
            "variants": {"a": value, "b": value},
            "defaultVariant": "a",
            "metadata": {"generation": n},
        });
        if key == "gen-targeting" {
            flag["targeting"] = json!({"if": [{"in": ["@example.com", {"var": "email"}]}, "b", null]});
        } else if key == "gen-fractional" {
            flag["targeting"] = json!({"fractional": [["a", 50], ["b", 50]]});
        }
        flags.insert(key, flag);
    }
    doc["metadata"] = json!({"generation": n});
    doc
}

/// The text of write number `k` when it is invalid: alternately truncated JSON and a flag that
/// is not an object (both rejected as a whole). Values and generations mark it as never servable.
pub(super) fn invalid_text(catalog: &[GeneratedFlag], k: u64) -> String {
    let mut doc = document(catalog, INVALID_GENERATION + k, &format!("bad-{k}"));
    if !(k / 10).is_multiple_of(2) {
        let text = doc.to_string();
        let mut cut = text.len() / 2;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text[..cut].to_owned()
    } else {
        doc["flags"]["gen-broken"] = json!(42);
        doc.to_string()
    }
}

pub(super) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

// ---------------------------------------------------------------------------------------------
// Checking answers

/// What the soak has written and seen, shared by every task.
#[derive(Debug, Default)]
pub(super) struct Generations {
    /// The newest valid generation written (set before the file is written).
    pub(super) written: AtomicU64,
    /// The highest generation seen in an answer.
    pub(super) served: AtomicU64,
}

/// Generation marks found in one answer.
#[derive(Debug, Default)]
pub(super) struct Marks {
    pub(super) gens: BTreeSet<u64>,
    bad: Option<String>,
}

impl Marks {
    /// A `gen-*` flag's value.
    pub(super) fn value(&mut self, key: &str, value: Option<&str>) {
        if !key.starts_with("gen-") {
            return;
        }
        match value.and_then(|v| v.strip_prefix("gen-")).and_then(|n| n.parse().ok()) {
            Some(n) => {
                self.gens.insert(n);
            }
            None => {
                self.bad
                    .get_or_insert_with(|| format!("flag {key} has value {value:?}, not from a valid write"));
            }
        }
    }

    /// A `generation` metadata entry.
    fn metadata(&mut self, generation: Option<f64>) {
        if let Some(g) = generation {
            self.gens.insert(g as u64);
        }
    }

    pub(super) fn metadata_json(&mut self, metadata: Option<&Value>) {
        self.metadata(metadata.and_then(|m| m.get("generation")).and_then(Value::as_f64));
    }

    pub(super) fn metadata_struct(&mut self, metadata: Option<&JsonStruct>) {
        self.metadata(metadata.and_then(|m| m.to_map().get("generation").and_then(Value::as_f64)));
    }
}

/// A checked answer: fine, or from two generations at once.
#[derive(Debug)]
pub(super) enum Verdict {
    Ok,
    Mixed(String),
}

impl Generations {
    /// Judges an answer's marks; `Err` for an answer no valid configuration could give.
    pub(super) fn judge(&self, marks: Marks, bulk: bool) -> Result<Verdict, String> {
        if let Some(bad) = marks.bad {
            return Err(bad);
        }
        let written = self.written.load(Ordering::Acquire);
        let Some(&newest) = marks.gens.last() else {
            return if bulk {
                Err("a bulk answer without any generation".into())
            } else {
                Ok(Verdict::Ok)
            };
        };
        if newest > written {
            return Err(format!(
                "generation {newest} served, but the newest valid write is {written}"
            ));
        }
        self.served.fetch_max(newest, Ordering::Relaxed);
        if marks.gens.len() > 1 {
            return Ok(Verdict::Mixed(format!("generations {:?} in one answer", marks.gens)));
        }
        Ok(Verdict::Ok)
    }
}

/// The marks of a sync payload (FetchAllFlags or SyncFlags): every variant of `gen-*` flags and
/// every flag's metadata.
pub(super) fn sync_marks(payload: &str) -> Result<Marks, String> {
    let doc: Value = serde_json::from_str(payload).map_err(|e| format!("sync payload is not JSON: {e}"))?;
    let flags = doc
        .get("flags")
        .and_then(Value::as_object)
        .ok_or("sync payload without flags")?;
    let mut marks = Marks::default();
    for (key, flag) in flags {
        if key.starts_with("gen-") {
            for v in flag.get("variants").and_then(Value::as_object).into_iter().flatten() {
                marks.value(key, Some(v.1.as_str().unwrap_or("?")));
            }
        }
        marks.metadata_json(flag.get("metadata"));
    }
    marks.metadata_json(doc.get("metadata"));
    Ok(marks)
}
