//! The evaluation context a request is evaluated with: flagd's `MergeContextsAndHeaders`.

use serde_json::{Map, Value};
use vexil_core::context::{Attr, Attributes, Object};

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

/// A request's context as rules see it: the request's own attributes, then the static values
/// (which win), then the header-mapped values (which win over both). Nothing is merged or copied
/// up front: each part is written into the rules' arena when a rule runs.
pub struct RequestContext<'r> {
    own: &'r dyn Attributes,
    statics: &'r Map<String, Value>,
    headers: Vec<(&'r str, &'r str)>,
}

impl<'r> RequestContext<'r> {
    /// `own` with `statics` over it; `header` looks a request header up by lowercase name.
    pub fn new(own: &'r dyn Attributes, statics: &'r StaticContext, header: impl Fn(&str) -> Option<&'r str>) -> Self {
        let headers = statics
            .from_headers
            .iter()
            .filter_map(|(name, key)| header(name).map(|value| (key.as_str(), value)))
            .collect();
        RequestContext {
            own,
            statics: &statics.values,
            headers,
        }
    }
}

impl Attributes for RequestContext<'_> {
    fn write<'a>(&'a self, out: &mut Object<'a>) {
        self.own.write(out);
        self.statics.write(out);
        for (key, value) in &self.headers {
            out.insert(key, Attr::string(value));
        }
    }
}

impl std::fmt::Debug for RequestContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequestContext")
            .field(&vexil_core::context::to_json(self))
            .finish()
    }
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
        let request = json!({"env": "dev", "user": "ann", "region": "mars"})
            .as_object()
            .unwrap()
            .clone();
        let merged = RequestContext::new(&request, &statics, |h| (h == "x-region").then_some("us"));
        assert_eq!(
            Value::Object(vexil_core::context::to_json(&merged)),
            json!({"env": "prod", "region": "us", "user": "ann"})
        );
        let without_header = RequestContext::new(&request, &statics, |_| None);
        assert_eq!(
            Value::Object(vexil_core::context::to_json(&without_header)),
            json!({"env": "prod", "region": "eu", "user": "ann"})
        );
    }
}
