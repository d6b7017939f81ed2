//! Checks on what the store is asked to write, before anything is written, and the flagd documents
//! flag sets are served and validated as.

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value, json};
use vexil_core::parse::{self, escape_pointer};
use vexil_core::{Engine, FractionalMode};

use crate::error::{Problem, StoreError};

/// The longest key of anything.
const MAX_KEY_LEN: usize = 256;

/// Environment and flag set keys: they form flagd's `flagSetId` (`<environment>/<set>`) and URL
/// paths, so a letter or digit first, then letters, digits, `.`, `_` or `-`, at most 64.
pub(crate) fn scope_key(what: &str, key: &str) -> Result<(), StoreError> {
    let ok = key.len() <= 64
        && key.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "/key",
            format!(
                "{what} key `{key}` must start with a letter or digit and hold only letters, digits, `.`, `_` and `-` (at most 64)"
            ),
        ))
    }
}

/// Flag and segment keys: anything flagd accepts that fits in a path segment: not empty, at most
/// 256 bytes, no control characters and no `/`.
pub(crate) fn item_key(what: &str, key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty() && key.len() <= MAX_KEY_LEN && !key.chars().any(|c| c.is_control() || c == '/');
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "/key",
            format!(
                "{what} key `{}` must be 1 to {MAX_KEY_LEN} bytes without `/` or control characters",
                key.escape_debug()
            ),
        ))
    }
}

/// The identity of a managed flag set comes from the store: `flagSetId` in its metadata or a
/// flag's would serve it under another name, so it is refused.
fn no_flag_set_id(metadata: Option<&Value>, pointer: &str, problems: &mut Vec<Problem>) {
    if metadata
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key("flagSetId"))
    {
        problems.push(Problem {
            pointer: format!("{pointer}/flagSetId"),
            message: "`flagSetId` is set by the store (`<environment>/<flag set>`) and cannot be given".into(),
        });
    }
}

/// One flag set's content, to validate or serve as a flagd document.
#[derive(Debug, Default)]
pub(crate) struct SetDocument {
    pub metadata: Map<String, Value>,
    pub flags: Map<String, Value>,
    pub segments: Map<String, Value>,
    /// Experiments evaluation sees, in the core's `$experiments` form.
    pub experiments: Map<String, Value>,
}

impl SetDocument {
    /// The flagd document, `flagSetId` added to its metadata when given.
    pub fn to_document(&self, flag_set_id: Option<String>) -> Value {
        let mut metadata = self.metadata.clone();
        if let Some(id) = flag_set_id {
            metadata.insert("flagSetId".into(), id.into());
        }
        let mut doc = Map::new();
        doc.insert("flags".into(), Value::Object(self.flags.clone()));
        if !self.segments.is_empty() {
            doc.insert("$evaluators".into(), Value::Object(self.segments.clone()));
        }
        if !metadata.is_empty() {
            doc.insert("metadata".into(), Value::Object(metadata));
        }
        if !self.experiments.is_empty() {
            doc.insert("$experiments".into(), Value::Object(self.experiments.clone()));
        }
        Value::Object(doc)
    }

    /// Checks the content with the parser and targeting compiler evaluation uses, strictly (every
    /// schema violation is an error, and so is a rule that does not compile).
    pub fn check(&self) -> Result<(), StoreError> {
        let mut problems = Vec::new();
        no_flag_set_id(Some(&Value::Object(self.metadata.clone())), "/metadata", &mut problems);
        for (key, flag) in &self.flags {
            no_flag_set_id(
                flag.get("metadata"),
                &format!("/flags/{}/metadata", escape_pointer(key)),
                &mut problems,
            );
        }
        if let Err(e) = parse::check_value(&self.to_document(None), engine()) {
            match StoreError::from_diagnostics(&e.diagnostics) {
                StoreError::Invalid(found) => problems.extend(found),
                other => return Err(other),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Invalid(problems))
        }
    }

    /// Splits a flagd document into a set's content: flags (the map form or flagd's array form),
    /// `$evaluators` and metadata, then checks it. A `flagSetId` in the document's metadata or a
    /// flag's is dropped: an imported set is named by the store (`<environment>/<set>`), and a flagd
    /// file often names its own.
    pub fn from_document(document: &Value) -> Result<SetDocument, StoreError> {
        let Some(object) = document.as_object() else {
            return Err(StoreError::invalid("", "a flag document is a JSON object"));
        };
        let flags = match object.get("flags") {
            Some(Value::Object(flags)) => flags.clone(),
            Some(Value::Array(list)) => {
                let mut flags = Map::new();
                for (i, flag) in list.iter().enumerate() {
                    let key = flag.get("key").and_then(Value::as_str).ok_or_else(|| {
                        StoreError::invalid(
                            format!("/flags/{i}/key"),
                            "a flag in the array form needs a string `key`",
                        )
                    })?;
                    let mut flag = flag.clone();
                    if let Some(o) = flag.as_object_mut() {
                        o.remove("key");
                    }
                    flags.insert(key.to_owned(), flag);
                }
                flags
            }
            None => Map::new(),
            Some(_) => return Err(StoreError::invalid("/flags", "`flags` is an object of flags")),
        };
        let segments = match object.get("$evaluators") {
            Some(Value::Object(s)) => s.clone(),
            None => Map::new(),
            Some(_) => {
                return Err(StoreError::invalid(
                    "/$evaluators",
                    "`$evaluators` is an object of rules",
                ));
            }
        };
        let metadata = match object.get("metadata") {
            Some(Value::Object(m)) => m.clone(),
            None => Map::new(),
            Some(_) => return Err(StoreError::invalid("/metadata", "`metadata` is an object")),
        };
        for key in flags.keys() {
            item_key("flag", key).map_err(|e| at(e, &format!("/flags/{}", escape_pointer(key))))?;
        }
        for key in segments.keys() {
            item_key("segment", key).map_err(|e| at(e, &format!("/$evaluators/{}", escape_pointer(key))))?;
        }
        let mut set = SetDocument {
            metadata,
            flags,
            segments,
            experiments: Map::new(),
        };
        set.metadata.remove("flagSetId");
        for flag in set.flags.values_mut() {
            if let Some(Value::Object(metadata)) = flag.get_mut("metadata") {
                metadata.remove("flagSetId");
            }
        }
        set.check()?;
        Ok(set)
    }
}

/// A key problem reported at `pointer` instead of `/key`.
fn at(e: StoreError, pointer: &str) -> StoreError {
    match e {
        StoreError::Invalid(mut problems) => {
            for p in &mut problems {
                p.pointer = pointer.to_owned();
            }
            StoreError::Invalid(problems)
        }
        other => other,
    }
}

/// The engine rules are checked with (compiling is all it does here).
fn engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| Arc::new(Engine::new(FractionalMode::default())))
}

/// A flag's body as the history and audit log keep it.
pub(crate) fn flag_body(definition: &Value, description: &str, owner: &str, tags: &[String]) -> Value {
    json!({"definition": definition, "description": description, "owner": owner, "tags": tags})
}

/// A segment's body as the history and audit log keep it.
pub(crate) fn segment_body(rule: &Value, description: &str) -> Value {
    json!({"rule": rule, "description": description})
}

/// A flag set's own body as the history and audit log keep it.
pub(crate) fn flag_set_body(name: &str, description: &str, metadata: &Map<String, Value>) -> Value {
    json!({"name": name, "description": description, "metadata": metadata})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_keys_are_path_and_selector_safe() {
        for ok in ["production", "eu-west.1", "a", "A_b"] {
            scope_key("environment", ok).unwrap();
        }
        for bad in ["", "-x", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(scope_key("environment", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn item_keys_are_what_flagd_takes_except_slashes() {
        for ok in ["new-banner", "my.flag", "Flag With Spaces", "ü"] {
            item_key("flag", ok).unwrap();
        }
        for bad in ["", "a/b", "a\nb", &"x".repeat(257)] {
            assert!(item_key("flag", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_document_with_problems_reports_each_with_its_pointer() {
        let doc = json!({
            "flags": {
                "a": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "off"},
                "b": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "targeting": {"nope": [1]}}
            }
        });
        let StoreError::Invalid(problems) = SetDocument::from_document(&doc).unwrap_err() else {
            panic!("not invalid")
        };
        let pointers: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert!(pointers.iter().any(|p| p.starts_with("/flags/a")), "{problems:?}");
        assert!(
            pointers.iter().any(|p| p.starts_with("/flags/b/targeting")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_written_flag_set_cannot_name_its_own_flag_set() {
        let mut set = SetDocument::default();
        set.flags.insert(
            "c".into(),
            json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on", "metadata": {"flagSetId": "x"}}),
        );
        set.metadata.insert("flagSetId".into(), json!("y"));
        let StoreError::Invalid(problems) = set.check().unwrap_err() else {
            panic!("not invalid")
        };
        let pointers: Vec<&str> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(pointers, ["/metadata/flagSetId", "/flags/c/metadata/flagSetId"]);
    }

    #[test]
    fn the_array_form_and_evaluators_are_read() {
        let doc = json!({
            "flags": [{"key": "a", "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                       "targeting": {"if": [{"$ref": "beta"}, "on", null]}}],
            "$evaluators": {"beta": {"in": ["@beta.", {"var": "email"}]}},
            "metadata": {"team": "web"}
        });
        let set = SetDocument::from_document(&doc).unwrap();
        assert_eq!(set.flags.keys().collect::<Vec<_>>(), ["a"]);
        assert!(set.flags["a"].get("key").is_none());
        let served = set.to_document(Some("prod/web".into()));
        let named = json!({"metadata": {"flagSetId": "theirs", "team": "web"},
                           "flags": {"a": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                                           "metadata": {"flagSetId": "other"}}}});
        let imported = SetDocument::from_document(&named).unwrap();
        assert_eq!(
            imported.to_document(Some("prod/web".into()))["metadata"],
            json!({"team": "web", "flagSetId": "prod/web"})
        );
        assert!(imported.flags["a"]["metadata"].get("flagSetId").is_none());
        assert_eq!(served["metadata"], json!({"team": "web", "flagSetId": "prod/web"}));
        assert_eq!(served["$evaluators"]["beta"], doc["$evaluators"]["beta"]);
    }
}
