//! `google.protobuf.Struct` as a JSON object: every generated message's `Struct` field is a
//! [`JsonStruct`], decoded from the wire straight into `serde_json` values and encoded from them,
//! with no intermediate protobuf `Struct`/`Value` tree.
//!
//! Wire format (`google/protobuf/struct.proto`): a `Struct` is a map `1: {1: key, 2: Value}`; a
//! `Value` is a oneof of `1` null (enum), `2` number (double), `3` string, `4` bool, `5` `Struct`
//! and `6` `ListValue` (`1: repeated Value`). Conversions:
//! - protobuf numbers are doubles: an integral one below 2^53 in magnitude becomes a JSON integer,
//!   any other finite one a JSON float, NaN and infinities `null`; JSON numbers are sent as doubles;
//! - a key repeated in a `Struct` keeps its last value (a protobuf map merge); a message field
//!   repeated inside a `Value` merges as protobuf says (objects merge, lists append);
//! - an empty `Value` is `null`; unknown fields are skipped;
//! - nesting counts against prost's recursion limit exactly as prost's own `Struct` does (a map
//!   entry, a `Value` and a `Struct` are three levels), so hostile input is a `DecodeError`.

// Hand-written: linted as the rest of the workspace (the crate root allows lints for generated code).
#![warn(clippy::all, missing_debug_implementations, rust_2018_idioms)]

use std::mem;

use prost::DecodeError;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{
    self, DecodeContext, WireType, double, encode_key, encode_varint, encoded_len_varint, int32, key_len, message,
    skip_field, string,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// A `google.protobuf.Struct`, held as the JSON object it stands for.
///
/// Its serde form is the plain JSON object (the proto3 JSON mapping of `Struct`); numbers read
/// from JSON go through a double, as they would on the protobuf wire.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonStruct(pub Map<String, Value>);

impl From<Map<String, Value>> for JsonStruct {
    fn from(map: Map<String, Value>) -> Self {
        JsonStruct(map)
    }
}

impl From<JsonStruct> for Map<String, Value> {
    fn from(s: JsonStruct) -> Self {
        s.0
    }
}

/// A protobuf number (a double) as JSON: integral ones below 2^53 as integers (as flagd's
/// float64 would print), NaN and infinities as `null`.
pub fn json_number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

// === impl JsonStruct ===

impl prost::Message for JsonStruct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_fields(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return skip_field(wire_type, tag, buf, ctx);
        }
        let mut entry = Entry::default();
        message::merge(wire_type, &mut entry, buf, ctx)?;
        self.0.insert(entry.key, entry.value.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        fields_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

impl Serialize for JsonStruct {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonStruct {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::deserialize(deserializer)?;
        map.values_mut().for_each(as_on_the_wire);
        Ok(JsonStruct(map))
    }
}

/// Every number of `v` as the wire would carry it: through a double.
fn as_on_the_wire(v: &mut Value) {
    match v {
        Value::Number(n) => *v = json_number(n.as_f64().unwrap_or(0.0)),
        Value::Array(items) => items.iter_mut().for_each(as_on_the_wire),
        Value::Object(map) => map.values_mut().for_each(as_on_the_wire),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

// === decoding: a map entry, a Value and a ListValue as messages of their own ===

/// One entry of a `Struct`'s map.
#[derive(Debug, Default)]
struct Entry {
    key: String,
    value: JsonValue,
}

impl prost::Message for Entry {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_entry(&self.key, &self.value.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => string::merge(wire_type, &mut self.key, buf, ctx),
            2 => message::merge(wire_type, &mut self.value, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        entry_len(&self.key, &self.value.0)
    }

    fn clear(&mut self) {
        *self = Entry::default();
    }
}

/// A `google.protobuf.Value` (an empty one is `null`).
#[derive(Debug, Default)]
struct JsonValue(Value);

impl prost::Message for JsonValue {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_value(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                let mut null = 0;
                int32::merge(wire_type, &mut null, buf, ctx)?;
                self.0 = Value::Null;
            }
            2 => {
                let mut n = 0.0;
                double::merge(wire_type, &mut n, buf, ctx)?;
                self.0 = json_number(n);
            }
            3 => {
                let mut s = String::new();
                string::merge(wire_type, &mut s, buf, ctx)?;
                self.0 = Value::String(s);
            }
            4 => {
                let mut b = false;
                encoding::bool::merge(wire_type, &mut b, buf, ctx)?;
                self.0 = Value::Bool(b);
            }
            5 => {
                let mut object = match mem::take(&mut self.0) {
                    Value::Object(map) => JsonStruct(map),
                    _ => JsonStruct::default(),
                };
                message::merge(wire_type, &mut object, buf, ctx)?;
                self.0 = Value::Object(object.0);
            }
            6 => {
                let mut list = match mem::take(&mut self.0) {
                    Value::Array(items) => JsonList(items),
                    _ => JsonList::default(),
                };
                message::merge(wire_type, &mut list, buf, ctx)?;
                self.0 = Value::Array(list.0);
            }
            _ => skip_field(wire_type, tag, buf, ctx)?,
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        value_len(&self.0)
    }

    fn clear(&mut self) {
        self.0 = Value::Null;
    }
}

/// A `google.protobuf.ListValue`.
#[derive(Debug, Default)]
struct JsonList(Vec<Value>);

impl prost::Message for JsonList {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_list(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return skip_field(wire_type, tag, buf, ctx);
        }
        let mut value = JsonValue::default();
        message::merge(wire_type, &mut value, buf, ctx)?;
        self.0.push(value.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        list_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

// === encoding, from borrowed JSON ===

/// A length-delimited field: key, length, then the body.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn fields_len(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| delimited_len(1, entry_len(k, v))).sum()
}

fn encode_fields(map: &Map<String, Value>, buf: &mut impl BufMut) {
    for (k, v) in map {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(entry_len(k, v) as u64, buf);
        encode_entry(k, v, buf);
    }
}

/// A map entry leaves out an empty key, as prost does.
fn entry_len(key: &str, value: &Value) -> usize {
    let key = if key.is_empty() { 0 } else { delimited_len(1, key.len()) };
    key + delimited_len(2, value_len(value))
}

fn encode_entry(key: &str, value: &Value, buf: &mut impl BufMut) {
    if !key.is_empty() {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(key.len() as u64, buf);
        buf.put_slice(key.as_bytes());
    }
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len(value) as u64, buf);
    encode_value(value, buf);
}

fn value_len(value: &Value) -> usize {
    match value {
        Value::Null => int32::encoded_len(1, &0),
        Value::Number(n) => double::encoded_len(2, &n.as_f64().unwrap_or(0.0)),
        Value::String(s) => string::encoded_len(3, s),
        Value::Bool(b) => encoding::bool::encoded_len(4, b),
        Value::Object(map) => delimited_len(5, fields_len(map)),
        Value::Array(items) => delimited_len(6, list_len(items)),
    }
}

fn encode_value(value: &Value, buf: &mut impl BufMut) {
    match value {
        Value::Null => int32::encode(1, &0, buf),
        Value::Number(n) => double::encode(2, &n.as_f64().unwrap_or(0.0), buf),
        Value::String(s) => string::encode(3, s, buf),
        Value::Bool(b) => encoding::bool::encode(4, b, buf),
        Value::Object(map) => {
            encode_key(5, WireType::LengthDelimited, buf);
            encode_varint(fields_len(map) as u64, buf);
            encode_fields(map, buf);
        }
        Value::Array(items) => {
            encode_key(6, WireType::LengthDelimited, buf);
            encode_varint(list_len(items) as u64, buf);
            encode_list(items, buf);
        }
    }
}

fn list_len(items: &[Value]) -> usize {
    items.iter().map(|v| delimited_len(1, value_len(v))).sum()
}

fn encode_list(items: &[Value], buf: &mut impl BufMut) {
    for v in items {
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(value_len(v) as u64, buf);
        encode_value(v, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use pbjson_types::value::Kind;
    use pbjson_types::{ListValue, Struct};
    use prost::Message;
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// A document with every kind of value, numbers of every sort, nested.
    fn document() -> Map<String, Value> {
        object(json!({
            "null": null,
            "t": true,
            "f": false,
            "zero": 0,
            "int": 42,
            "neg": -7,
            "frac": 1.5,
            "negfrac": -0.25,
            "big": 9_007_199_254_740_993_u64,
            "huge": 1e300,
            "": "empty key",
            "s": "snow ☃",
            "empty": {},
            "list": [1, "two", null, false, [], {"deep": [{"er": 3.25}]}],
            "nested": {"a": {"b": {"c": [1, 2, {"d": null}]}}},
        }))
    }

    /// What the wire makes of `doc`: every number through a double.
    fn as_sent(doc: &Map<String, Value>) -> Map<String, Value> {
        let mut v = Value::Object(doc.clone());
        as_on_the_wire(&mut v);
        object(v)
    }

    fn pb_value(v: &Value) -> pbjson_types::Value {
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(items) => Kind::ListValue(ListValue {
                values: items.iter().map(pb_value).collect(),
            }),
            Value::Object(map) => Kind::StructValue(pb_struct(map)),
        };
        pbjson_types::Value { kind: Some(kind) }
    }

    fn pb_struct(map: &Map<String, Value>) -> Struct {
        Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), pb_value(v))).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let doc = document();
        let bytes = JsonStruct(doc.clone()).encode_to_vec();
        assert_eq!(bytes.len(), JsonStruct(doc.clone()).encoded_len());
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(back.0, as_sent(&doc));
        // Integral doubles come back as integers, others as floats; beyond 2^53 a float.
        assert_eq!(back.0["int"], json!(42));
        assert!(back.0["int"].is_i64());
        assert_eq!(back.0["neg"], json!(-7));
        assert_eq!(back.0["frac"], json!(1.5));
        assert_eq!(back.0["big"], json!(9_007_199_254_740_992.0));
        assert!(back.0["big"].is_f64());
        // And what came back encodes to the same bytes.
        assert_eq!(back.encode_to_vec(), bytes);
    }

    #[test]
    fn encodes_as_prost_struct_does() {
        let doc = document();
        let ours = JsonStruct(doc.clone()).encode_to_vec();
        let theirs = pb_struct(&doc);
        assert_eq!(Struct::decode(&ours[..]).unwrap(), theirs);
        // Entry by entry the bytes are prost's (a map's order is its own).
        for (k, v) in &doc {
            let one: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
            assert_eq!(
                JsonStruct(one.clone()).encode_to_vec(),
                pb_struct(&one).encode_to_vec(),
                "{k}"
            );
        }
    }

    #[test]
    fn decodes_what_prost_struct_encodes() {
        let doc = document();
        let bytes = pb_struct(&doc).encode_to_vec();
        assert_eq!(JsonStruct::decode(&bytes[..]).unwrap().0, as_sent(&doc));
    }

    #[test]
    fn numbers_convert_as_before() {
        let cases = [
            (0.0, json!(0)),
            (-0.0, json!(0)),
            (3.0, json!(3)),
            (-3.0, json!(-3)),
            (0.5, json!(0.5)),
            (9_007_199_254_740_991.0, json!(9_007_199_254_740_991_i64)),
            (9_007_199_254_740_992.0, json!(9_007_199_254_740_992.0)),
            (-1e20, json!(-1e20)),
            (f64::NAN, Value::Null),
            (f64::INFINITY, Value::Null),
            (f64::NEG_INFINITY, Value::Null),
        ];
        for (n, expected) in cases {
            let s = Struct {
                fields: HashMap::from([(
                    "n".to_owned(),
                    pbjson_types::Value {
                        kind: Some(Kind::NumberValue(n)),
                    },
                )]),
            };
            let back = JsonStruct::decode(&s.encode_to_vec()[..]).unwrap();
            assert_eq!(back.0["n"], expected, "{n}");
            assert_eq!(back.0["n"].is_f64(), expected.is_f64(), "{n}");
        }
    }

    #[test]
    fn a_later_key_wins_and_messages_merge_as_protobuf_does() {
        let first = pb_struct(&object(json!({"k": 1, "o": {"a": 1}, "l": [1]}))).encode_to_vec();
        let second = pb_struct(&object(json!({"k": "two"}))).encode_to_vec();
        let bytes = [first, second].concat();
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(Value::Object(back.0), json!({"k": "two", "o": {"a": 1}, "l": [1]}));
        // Inside one Value, a repeated struct_value merges and list_value appends (as prost does).
        let mut value = Vec::new();
        for part in [json!({"a": 1}), json!({"b": 2})] {
            value.extend(pb_value(&part).encode_to_vec());
        }
        for part in [json!([1]), json!([2])] {
            value.extend(pb_value(&part).encode_to_vec());
        }
        let theirs = pbjson_types::Value::decode(&value[..]).unwrap();
        let mut ours = JsonValue::default();
        ours.merge(&value[..]).unwrap();
        assert_eq!(ours.0, json!([1, 2]));
        assert_eq!(theirs, pb_value(&json!([1, 2])));
        let mut objects = Vec::new();
        for part in [json!({"a": 1}), json!({"b": 2})] {
            objects.extend(pb_value(&part).encode_to_vec());
        }
        let mut ours = JsonValue::default();
        ours.merge(&objects[..]).unwrap();
        assert_eq!(ours.0, json!({"a": 1, "b": 2}));
        assert_eq!(
            pbjson_types::Value::decode(&objects[..]).unwrap(),
            pb_value(&json!({"a": 1, "b": 2}))
        );
    }

    /// `body` as a length-delimited field `tag`.
    fn delimited(tag: u32, body: &[u8], buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(body.len() as u64, buf);
        buf.extend(body);
    }

    #[test]
    fn empty_values_are_null_and_unknown_fields_are_skipped() {
        let mut bytes = Vec::new();
        // An unknown Struct field.
        encode_key(9, WireType::Varint, &mut bytes);
        encode_varint(5, &mut bytes);
        // {key "a", unknown 9: "x", value: {}}
        let mut entry = Vec::new();
        string::encode(1, &"a".to_owned(), &mut entry);
        string::encode(9, &"x".to_owned(), &mut entry);
        delimited(2, &[], &mut entry);
        delimited(1, &entry, &mut bytes);
        // {key "b", value: {unknown 7: 1.0}}
        let mut value = Vec::new();
        double::encode(7, &1.0, &mut value);
        let mut entry = Vec::new();
        string::encode(1, &"b".to_owned(), &mut entry);
        delimited(2, &value, &mut entry);
        delimited(1, &entry, &mut bytes);
        // {value: "no key"}: the empty key.
        let mut entry = Vec::new();
        delimited(2, &pb_value(&json!("no key")).encode_to_vec(), &mut entry);
        delimited(1, &entry, &mut bytes);
        let back = JsonStruct::decode(&bytes[..]).unwrap();
        assert_eq!(Value::Object(back.0), json!({"a": null, "b": null, "": "no key"}));
        assert_eq!(Struct::decode(&bytes[..]).unwrap().fields.len(), 3);
    }

    /// Bytes built back to front (each level's length is what is already built), reversed.
    struct Backwards(Vec<u8>);

    impl Backwards {
        fn prepend(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
            let mut head = Vec::new();
            f(&mut head);
            self.0.extend(head.iter().rev());
        }

        /// Wraps everything so far in a length-delimited field `tag`.
        fn wrap(&mut self, tag: u32) {
            let len = self.0.len() as u64;
            self.prepend(|head| {
                encode_key(tag, WireType::LengthDelimited, head);
                encode_varint(len, head);
            });
        }

        fn bytes(mut self) -> Vec<u8> {
            self.0.reverse();
            self.0
        }
    }

    /// `depth` levels of `{"k": {"k": …}}`.
    fn nested_structs(depth: usize) -> Vec<u8> {
        let mut b = Backwards(Vec::new());
        for _ in 0..depth {
            b.wrap(5); // Value.struct_value
            b.wrap(2); // entry value
            b.prepend(|head| string::encode(1, &"k".to_owned(), head));
            b.wrap(1); // Struct.fields
        }
        b.bytes()
    }

    /// `{"k": [[[…]]]}`, `depth` lists deep.
    fn nested_lists(depth: usize) -> Vec<u8> {
        let mut b = Backwards(Vec::new());
        b.wrap(6); // Value.list_value: []
        for _ in 0..depth {
            b.wrap(1); // ListValue.values
            b.wrap(6); // Value.list_value
        }
        b.wrap(2);
        b.prepend(|head| string::encode(1, &"k".to_owned(), head));
        b.wrap(1);
        b.bytes()
    }

    #[test]
    fn deep_nesting_is_an_error_at_prosts_limit() {
        let ok = nested_structs(33);
        assert_eq!(JsonStruct::decode(&ok[..]).unwrap().encode_to_vec(), ok);
        assert!(Struct::decode(&ok[..]).is_ok());
        for depth in [34, 10_000] {
            let bytes = nested_structs(depth);
            assert!(JsonStruct::decode(&bytes[..]).is_err(), "{depth}");
            assert!(Struct::decode(&bytes[..]).is_err(), "{depth}");
        }
        let lists = nested_lists(10_000);
        assert!(JsonStruct::decode(&lists[..]).is_err());
        assert!(Struct::decode(&lists[..]).is_err());
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error() {
        let bytes = JsonStruct(document()).encode_to_vec();
        for end in 1..bytes.len() {
            let ours = JsonStruct::decode(&bytes[..end]);
            let theirs = Struct::decode(&bytes[..end]);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{end}");
        }
        for garbage in [
            &[0xff][..],
            &[0x0a, 0x05, 0x12],
            &[0x0a, 0x02, 0x12, 0x7f],
            &[0x0b],
            &[0x0a; 16],
        ] {
            assert!(JsonStruct::decode(garbage).is_err(), "{garbage:?}");
        }
        // A number with the wrong wire type, a string that is not UTF-8.
        let bad_number = [0x0a, 0x05, 0x12, 0x03, 0x10, 0x01, 0x00];
        assert!(JsonStruct::decode(&bad_number[..]).is_err());
        let bad_string = [0x0a, 0x05, 0x12, 0x03, 0x1a, 0x01, 0xff];
        assert!(JsonStruct::decode(&bad_string[..]).is_err());
    }

    #[test]
    fn serde_is_the_plain_json_object() {
        let doc = object(json!({"a": [1, 2.5, null], "b": {"c": true}}));
        assert_eq!(
            serde_json::to_value(JsonStruct(doc.clone())).unwrap(),
            Value::Object(doc.clone())
        );
        let back: JsonStruct = serde_json::from_value(json!({"a": [1.0, 2.5, null], "b": {"c": true}})).unwrap();
        assert_eq!(back.0, doc);
        assert!(serde_json::from_value::<JsonStruct>(json!([1])).is_err());
    }
}
