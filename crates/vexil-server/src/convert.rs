//! Hand conversions between protobuf well-known types and JSON (the only place that knows both).

use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value as PValue};
use serde_json::{Map, Number, Value};
use vexil_core::{Metadata, Selector};
use vexil_proto::pbjson_types;

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: Struct) -> Map<String, Value> {
    s.fields.into_iter().map(|(k, v)| (k, value_to_json(v))).collect()
}

fn value_to_json(v: PValue) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

/// Protobuf numbers are doubles; integral ones become JSON integers (as flagd's float64 would print).
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// A JSON object as a protobuf `Struct`.
pub fn json_to_struct(m: &Map<String, Value>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
    }
}

/// A flag's metadata as flagd reports it in a response: the selector's reflection (`{"flagSetId": …}`
/// or `{"source": …}`) with the flag's own metadata over it.
pub fn metadata_struct(selector: &Selector, flag: Option<&Metadata>) -> Struct {
    let mut fields: std::collections::HashMap<String, PValue> = selector
        .metadata()
        .into_iter()
        .map(|(k, v)| (k, json_to_value(&v)))
        .collect();
    for (k, v) in flag.into_iter().flatten() {
        fields.insert(k.clone(), json_to_value(v));
    }
    Struct { fields }
}

/// A JSON value as a protobuf `Value`.
pub fn json_to_value(v: &Value) -> PValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    PValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trip() {
        let doc = json!({"a": 1, "b": 1.5, "c": [true, null, "x"], "d": {"e": {}}});
        let back = struct_to_json(json_to_struct(doc.as_object().unwrap()));
        assert_eq!(Value::Object(back), doc);
    }
}
