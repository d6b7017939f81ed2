//! The evaluation context a request is evaluated with: flagd's `MergeContextsAndHeaders`.

use serde_json::{Map, Value};

/// Context that the server adds to every request: flagd's `-X key=value` (static values) and
/// `-H Header=key` (a request header's value under a context key).
#[derive(Debug, Clone, Default)]
pub struct StaticContext {
    /// `-X` values.
    pub values: Map<String, Value>,
    /// `-H` mappings: lowercase header name → context key.
    pub from_headers: Vec<(String, String)>,
}

impl StaticContext {
    /// Whether requests are evaluated with exactly their own context.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.from_headers.is_empty()
    }
}

/// Merges the request's context with the static values (which win) and the header-mapped values
/// (which win over both). `header` looks a header up by lowercase name.
pub fn merge_context<'h>(
    mut request: Map<String, Value>,
    statics: &StaticContext,
    header: impl Fn(&str) -> Option<&'h str>,
) -> Map<String, Value> {
    for (k, v) in &statics.values {
        request.insert(k.clone(), v.clone());
    }
    for (name, key) in &statics.from_headers {
        if let Some(value) = header(name) {
            request.insert(key.clone(), Value::String(value.to_owned()));
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn static_values_win_over_the_request_and_headers_over_both() {
        let statics = StaticContext {
            values: json!({"env": "prod", "region": "eu"}).as_object().unwrap().clone(),
            from_headers: vec![
                ("x-region".into(), "region".into()),
                ("x-missing".into(), "other".into()),
            ],
        };
        let request = json!({"env": "dev", "user": "ann"}).as_object().unwrap().clone();
        let merged = merge_context(request, &statics, |h| (h == "x-region").then_some("us"));
        assert_eq!(
            Value::Object(merged),
            json!({"env": "prod", "region": "us", "user": "ann"})
        );
    }
}
