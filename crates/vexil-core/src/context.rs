//! The request context as rules see it, written straight into the evaluation arena.
//!
//! A request's attributes come from wherever the request carried them: a JSON object, a protobuf
//! `Struct` still in its wire form, `-X` values, `-H` headers. Each source implements
//! [`Attributes`] and writes into an [`Object`] of the per-thread arena: no intermediate tree is
//! built, strings are borrowed rather than copied, and nothing is left to free afterwards.
//!
//! An object's entries are kept sorted by key, and a key written twice keeps the value written
//! last (a JSON object's or a protobuf map's semantics), so every source gives rules the same
//! context for the same attributes.

use datalogic_rs::DataValue;
use datalogic_rs::bumpalo::Bump;
use datalogic_rs::bumpalo::collections::Vec as BumpVec;
use datalogic_rs::datavalue::NumberValue;
use serde_json::{Map, Number, Value};

/// A source of context attributes.
pub trait Attributes {
    /// Writes every attribute into `out` (a key written twice keeps its last value).
    fn write<'a>(&'a self, out: &mut Object<'a>);
}

impl Attributes for Map<String, Value> {
    fn write<'a>(&'a self, out: &mut Object<'a>) {
        out.entries.reserve(self.len());
        for (k, v) in self {
            out.insert_json(k, v);
        }
    }
}

/// No attributes.
impl Attributes for () {
    fn write<'a>(&'a self, _: &mut Object<'a>) {}
}

impl<A: Attributes + ?Sized> Attributes for &A {
    fn write<'a>(&'a self, out: &mut Object<'a>) {
        (**self).write(out);
    }
}

/// One attribute value in the arena.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a>(pub(crate) DataValue<'a>);

impl<'a> Attr<'a> {
    /// `null`.
    pub const NULL: Attr<'static> = Attr(DataValue::Null);

    /// A boolean.
    #[inline]
    pub fn bool(b: bool) -> Attr<'a> {
        Attr(DataValue::Bool(b))
    }

    /// A string (borrowed).
    #[inline]
    pub fn string(s: &'a str) -> Attr<'a> {
        Attr(DataValue::String(s))
    }

    /// A number as the protobuf wire carries it (a double), converted as a JSON document of it
    /// would be: an integral one below 2^53 in magnitude is an integer, any other finite one a
    /// float, NaN and infinities `null`.
    #[inline]
    pub fn number(n: f64) -> Attr<'a> {
        Attr(if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
            DataValue::Number(NumberValue::Integer(n as i64))
        } else if n.is_finite() {
            DataValue::Number(NumberValue::from_f64(n))
        } else {
            DataValue::Null
        })
    }
}

/// An object being written in the arena.
#[derive(Debug)]
pub struct Object<'a> {
    arena: &'a Bump,
    entries: BumpVec<'a, (&'a str, DataValue<'a>)>,
    /// The keys kept (sorted; `None`: every key): a rule's context holds only what it can read.
    pub(crate) wanted: Option<&'a [Box<str>]>,
}

impl<'a> Object<'a> {
    #[inline]
    pub(crate) fn new(arena: &'a Bump, capacity: usize) -> Object<'a> {
        Object {
            arena,
            entries: BumpVec::with_capacity_in(capacity, arena),
            wanted: None,
        }
    }

    /// Whether a value written under `key` is kept: a source may skip building the values of
    /// keys that are not (they are dropped by [`Object::insert`] anyway).
    #[inline]
    pub fn wants(&self, key: &[u8]) -> bool {
        match self.wanted {
            None => true,
            Some(keys) => keys.iter().any(|k| k.as_bytes() == key),
        }
    }

    /// Whether `key` is kept, looked up once: a source writing from bytes gets the key as text
    /// without checking it is UTF-8 when a rule named it, and then writes with
    /// [`Object::insert_admitted`].
    #[inline]
    pub fn admit(&self, key: &[u8]) -> Admit<'a> {
        match self.wanted {
            None => Admit::Every,
            Some(keys) => match keys.iter().find(|k| k.as_bytes() == key) {
                Some(k) => Admit::Key(k),
                None => Admit::Skip,
            },
        }
    }

    /// Sets `key`, which [`Object::admit`] admitted (not looked up again).
    #[inline]
    pub fn insert_admitted(&mut self, key: &'a str, value: Attr<'a>) {
        self.entries.push((key, value.0));
    }

    /// Sets `key` (a later write of the same key wins).
    #[inline]
    pub fn insert(&mut self, key: &'a str, value: Attr<'a>) {
        if self.wants(key.as_bytes()) {
            self.entries.push((key, value.0));
        }
    }

    /// Sets `key` to a JSON value (borrowed: strings are not copied).
    pub fn insert_json(&mut self, key: &'a str, value: &'a Value) {
        if self.wants(key.as_bytes()) {
            let value = data_value(value, self.arena);
            self.entries.push((key, value));
        }
    }

    /// Makes objects and lists in this object's arena.
    #[inline]
    pub fn builder(&self) -> Builder<'a> {
        Builder(self.arena)
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished object: entries sorted by key, each key once with the value written last.
    #[inline]
    pub fn finish(self) -> Attr<'a> {
        Attr(DataValue::Object(self.into_entries()))
    }

    pub(crate) fn into_entries(mut self) -> &'a [(&'a str, DataValue<'a>)] {
        if !self.entries.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable: among equal keys the order of writing is kept, and the last one stays.
            self.entries.sort_by(|a, b| a.0.cmp(b.0));
            self.entries.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 = later.1;
                }
                same
            });
        }
        self.entries.into_bump_slice()
    }
}

/// Makes objects and lists in an evaluation arena.
#[derive(Debug, Clone, Copy)]
pub struct Builder<'a>(&'a Bump);

impl<'a> Builder<'a> {
    /// An empty object, to be inserted with [`Object::finish`].
    #[inline]
    pub fn object(self) -> Object<'a> {
        Object::new(self.0, 0)
    }

    /// An empty list, to be inserted with [`List::finish`].
    #[inline]
    pub fn list(self) -> List<'a> {
        List {
            arena: self.0,
            items: BumpVec::new_in(self.0),
        }
    }

    /// Copies `s` into the arena (for text that does not outlive the evaluation).
    pub fn alloc_str(self, s: &str) -> &'a str {
        self.0.alloc_str(s)
    }
}

/// What [`Object::admit`] says of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit<'a> {
    /// Every key is kept.
    Every,
    /// The key is kept: it is this text.
    Key(&'a str),
    /// The key is not kept.
    Skip,
}

/// A list being written in the arena.
#[derive(Debug)]
pub struct List<'a> {
    arena: &'a Bump,
    items: BumpVec<'a, DataValue<'a>>,
}

impl<'a> List<'a> {
    /// Appends `value`.
    #[inline]
    pub fn push(&mut self, value: Attr<'a>) {
        self.items.push(value.0);
    }

    /// Makes objects and lists in this list's arena.
    #[inline]
    pub fn builder(&self) -> Builder<'a> {
        Builder(self.arena)
    }

    /// The finished list.
    #[inline]
    pub fn finish(self) -> Attr<'a> {
        Attr(DataValue::Array(self.items.into_bump_slice()))
    }
}

/// The context `attributes` give rules, as JSON (without `$flagd`): for tests and diagnostics that
/// compare sources.
pub fn to_json(attributes: &dyn Attributes) -> Map<String, Value> {
    to_json_reading(attributes, None)
}

/// [`to_json`] of a context written for a rule that reads only the top-level keys `reads`
/// (`None`: every key).
pub fn to_json_reading(attributes: &dyn Attributes, reads: Option<&[Box<str>]>) -> Map<String, Value> {
    let arena = Bump::new();
    let mut root = Object::new(&arena, 0);
    root.wanted = reads;
    attributes.write(&mut root);
    let entries = root.into_entries();
    entries
        .iter()
        .filter(|(k, _)| *k != "$flagd")
        .map(|(k, v)| ((*k).to_owned(), json_value(v)))
        .collect()
}

fn json_value(v: &DataValue<'_>) -> Value {
    match v {
        DataValue::Null => Value::Null,
        DataValue::Bool(b) => Value::Bool(*b),
        DataValue::Number(NumberValue::Integer(i)) => Value::Number((*i).into()),
        DataValue::Number(n) => Number::from_f64(n.as_f64()).map_or(Value::Null, Value::Number),
        DataValue::String(s) => Value::String((*s).to_owned()),
        DataValue::Array(items) => Value::Array(items.iter().map(json_value).collect()),
        DataValue::Object(entries) => {
            Value::Object(entries.iter().map(|(k, v)| ((*k).to_owned(), json_value(v))).collect())
        }
        #[allow(unreachable_patterns)]
        _ => Value::Null,
    }
}

/// Borrows a JSON value into the arena (strings are not copied).
///
/// Inlined so scalars are written in place: returning a `DataValue` through a call made the caller
/// stall on store forwarding (measured with `perf annotate`), which cost more than the rest of the
/// conversion.
#[inline(always)]
pub(crate) fn data_value<'a>(value: &'a Value, arena: &'a Bump) -> DataValue<'a> {
    match value {
        Value::Null => DataValue::Null,
        Value::Bool(b) => DataValue::Bool(*b),
        Value::Number(n) => DataValue::Number(match n.as_i64() {
            Some(i) => NumberValue::Integer(i),
            None => NumberValue::from_f64(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(s) => DataValue::String(s),
        Value::Array(items) => DataValue::Array(array_value(items, arena)),
        Value::Object(map) => DataValue::Object(object_value(map, arena)),
    }
}

#[inline(never)]
fn array_value<'a>(items: &'a [Value], arena: &'a Bump) -> &'a [DataValue<'a>] {
    let mut out = BumpVec::with_capacity_in(items.len(), arena);
    for item in items {
        out.push(data_value(item, arena));
    }
    out.into_bump_slice()
}

#[inline(never)]
fn object_value<'a>(map: &'a Map<String, Value>, arena: &'a Bump) -> &'a [(&'a str, DataValue<'a>)] {
    let mut out = BumpVec::with_capacity_in(map.len(), arena);
    for (k, v) in map {
        out.push((k.as_str(), data_value(v, arena)));
    }
    out.into_bump_slice()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Attributes written in a fixed order, keys possibly repeated.
    struct Writes(Vec<(&'static str, Value)>);

    impl Attributes for Writes {
        fn write<'a>(&'a self, out: &mut Object<'a>) {
            for (k, v) in &self.0 {
                out.insert_json(k, v);
            }
        }
    }

    #[test]
    fn the_last_write_of_a_key_wins_and_keys_come_out_sorted() {
        let writes = Writes(vec![
            ("b", json!(1)),
            ("a", json!("first")),
            ("c", json!(null)),
            ("a", json!("second")),
            ("b", json!(2)),
            ("a", json!("third")),
        ]);
        let json = to_json(&writes);
        assert_eq!(Value::Object(json.clone()), json!({"a": "third", "b": 2, "c": null}));
        assert_eq!(json.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn nested_objects_and_lists_are_built_in_the_arena() {
        struct Nested;
        impl Attributes for Nested {
            fn write<'a>(&'a self, out: &mut Object<'a>) {
                let mut inner = out.builder().object();
                inner.insert("z", Attr::number(1.0));
                inner.insert("y", Attr::number(0.5));
                inner.insert("z", Attr::number(f64::NAN));
                let mut list = out.builder().list();
                list.push(Attr::bool(true));
                list.push(inner.finish());
                list.push(Attr::NULL);
                let owned = String::from("copied");
                list.push(Attr::string(out.builder().alloc_str(&owned)));
                out.insert("l", list.finish());
                out.insert("n", Attr::number(9_007_199_254_740_992.0));
            }
        }
        assert_eq!(
            Value::Object(to_json(&Nested)),
            json!({"l": [true, {"y": 0.5, "z": null}, null, "copied"], "n": 9_007_199_254_740_992_i64})
        );
    }

    #[test]
    fn a_json_object_is_itself() {
        let map = json!({"k": [1, {"x": "y"}], "f": 1.5, "$flagd": {"flagKey": "spoofed"}})
            .as_object()
            .cloned()
            .unwrap();
        let mut expected = map.clone();
        expected.remove("$flagd");
        assert_eq!(to_json(&map), expected);
    }
}
