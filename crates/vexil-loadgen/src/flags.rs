//! Synthetic flag sets and contexts for load: a mix of static, targeting and fractional flags of
//! boolean and string type, and contexts of a chosen number of attributes.

use serde_json::{Map, Value, json};

/// What kind of decision a generated flag makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Static,
    Targeting,
    Fractional,
}

/// A generated flag's key, value type and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFlag {
    pub key: String,
    pub boolean: bool,
    pub kind: Kind,
}

/// `count` flags: kinds rotate static → targeting → fractional; every other flag is boolean.
pub fn catalog(count: usize) -> Vec<GeneratedFlag> {
    (0..count)
        .map(|i| {
            let kind = match i % 3 {
                0 => Kind::Static,
                1 => Kind::Targeting,
                _ => Kind::Fractional,
            };
            let boolean = (i / 3) % 2 == 0;
            let prefix = if boolean { "bool" } else { "string" };
            GeneratedFlag {
                key: format!("{prefix}-{i:05}"),
                boolean,
                kind,
            }
        })
        .collect()
}

/// The flagd flag document for `flags`.
pub fn document(flags: &[GeneratedFlag]) -> Value {
    let mut out = Map::new();
    for f in flags {
        let variants = if f.boolean {
            json!({"on": true, "off": false})
        } else {
            json!({"control": "Welcome!", "treatment": "Hello there!"})
        };
        let (a, b) = if f.boolean {
            ("on", "off")
        } else {
            ("treatment", "control")
        };
        let mut flag = json!({"state": "ENABLED", "variants": variants, "defaultVariant": b});
        match f.kind {
            Kind::Static => {}
            Kind::Targeting => {
                flag["targeting"] = json!({"if": [
                    {"in": ["@example.com", {"var": "email"}]}, a,
                    {"==": [{"var": "plan"}, "enterprise"]}, a,
                    null
                ]});
            }
            Kind::Fractional => {
                flag["targeting"] = json!({"fractional": [[a, 50], [b, 50]]});
            }
        }
        out.insert(f.key.clone(), flag);
    }
    json!({ "flags": out })
}

/// A context with `attributes` attributes (at least the ones targeting reads), varied by `n`.
pub fn context(attributes: usize, n: u64) -> Map<String, Value> {
    let mut ctx = Map::new();
    ctx.insert("targetingKey".into(), json!(format!("user-{n}")));
    ctx.insert(
        "email".into(),
        json!(if n.is_multiple_of(4) {
            format!("u{n}@example.com")
        } else {
            format!("u{n}@mail.org")
        }),
    );
    ctx.insert(
        "plan".into(),
        json!(if n.is_multiple_of(3) { "enterprise" } else { "free" }),
    );
    ctx.insert("country".into(), json!(["DE", "FR", "US", "BR"][(n % 4) as usize]));
    ctx.insert("appVersion".into(), json!(format!("2.{}.0", n % 10)));
    let mut i = 0;
    while ctx.len() < attributes {
        ctx.insert(format!("attr{i:02}"), json!(format!("value-{}", (n + i) % 97)));
        i += 1;
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_mixes_kinds_and_types() {
        let flags = catalog(12);
        assert_eq!(flags.iter().filter(|f| f.kind == Kind::Static).count(), 4);
        assert_eq!(flags.iter().filter(|f| f.kind == Kind::Fractional).count(), 4);
        assert_eq!(flags.iter().filter(|f| f.boolean).count(), 6);
        let doc = document(&flags);
        assert_eq!(doc["flags"].as_object().unwrap().len(), 12);
        assert!(doc["flags"]["bool-00001"]["targeting"]["if"].is_array());
        assert!(doc["flags"]["bool-00002"]["targeting"]["fractional"].is_array());
    }

    #[test]
    fn contexts_have_the_requested_size() {
        assert_eq!(context(5, 1).len(), 5);
        assert_eq!(context(50, 1).len(), 50);
        assert_ne!(context(5, 1), context(5, 2));
    }
}
