//! The store's model to `vexil.v1` messages and back.

use serde_json::{Map, Value};
use vexil_proto::JsonStruct;
use vexil_proto::vexil::v1 as pb;
use vexil_store as store;

use crate::error::{ErrorKind, grpc_status};

pub fn timestamp(ms: store::Millis) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn millis(ts: &pbjson_types::Timestamp) -> store::Millis {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

fn stamp(s: store::Stamp) -> Option<pb::Stamp> {
    Some(pb::Stamp {
        by: s.by,
        at: Some(timestamp(s.at)),
    })
}

/// JSON as a `google.protobuf.Value`.
pub fn value(v: Value) -> Option<pbjson_types::Value> {
    serde_json::from_value(v).ok()
}

/// A `google.protobuf.Value` as JSON (`null` when absent).
pub fn json(v: Option<pbjson_types::Value>) -> Value {
    v.and_then(|v| serde_json::to_value(v).ok()).unwrap_or(Value::Null)
}

/// A JSON object as a `google.protobuf.Struct`.
pub fn structure(v: Value) -> Option<JsonStruct> {
    match v {
        Value::Object(map) => Some(JsonStruct::from(map)),
        _ => None,
    }
}

pub fn object(s: Option<JsonStruct>) -> Map<String, Value> {
    s.map(JsonStruct::into_map).unwrap_or_default()
}

pub fn environment(e: store::Environment) -> pb::Environment {
    pb::Environment {
        key: e.key,
        name: e.name,
        description: e.description,
        config_version: e.config_version,
        version: e.version,
        created: stamp(e.created),
        updated: stamp(e.updated),
    }
}

pub fn flag_set(s: store::FlagSet) -> pb::FlagSet {
    pb::FlagSet {
        environment: s.environment,
        key: s.key,
        name: s.name,
        description: s.description,
        metadata: Some(JsonStruct::from(s.metadata)),
        version: s.version,
        created: stamp(s.created),
        updated: stamp(s.updated),
    }
}

pub fn flag(f: store::FlagRecord) -> pb::Flag {
    pb::Flag {
        environment: f.environment,
        flag_set: f.flag_set,
        key: f.key,
        definition: structure(f.definition),
        description: f.description,
        owner: f.owner,
        tags: f.tags,
        version: f.version,
        created: stamp(f.created),
        updated: stamp(f.updated),
    }
}

pub fn segment(s: store::SegmentRecord) -> pb::Segment {
    pb::Segment {
        environment: s.environment,
        flag_set: s.flag_set,
        key: s.key,
        rule: value(s.rule),
        description: s.description,
        version: s.version,
        created: stamp(s.created),
        updated: stamp(s.updated),
    }
}

pub fn config_version(v: store::ConfigVersion) -> pb::ConfigVersion {
    pb::ConfigVersion {
        environment: v.environment,
        version: v.version,
        created: stamp(v.created),
        summary: v.summary,
    }
}

pub fn change(c: store::Change) -> pb::Change {
    pb::Change {
        flag_set: c.flag_set,
        kind: c.kind.as_str().to_owned(),
        key: c.key,
        before: c.before.and_then(value),
        after: c.after.and_then(value),
    }
}

pub fn audit_entry(e: store::AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        id: e.id,
        at: Some(timestamp(e.at)),
        actor: e.actor,
        action: e.action,
        environment: e.environment.unwrap_or_default(),
        entity_kind: e.entity_kind,
        entity: e.entity,
        config_version: e.config_version.unwrap_or(0),
        before: e.before.and_then(value),
        after: e.after.and_then(value),
    }
}

pub fn api_key(k: store::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id,
        prefix: k.prefix,
        name: k.name,
        environment: k.environment.unwrap_or_default(),
        role: k.role.as_str().to_owned(),
        created: stamp(k.created),
        revoked_at: k.revoked_at.map(timestamp),
    }
}

/// A write's precondition from its request fields.
pub fn precondition(version: Option<i64>, create_only: bool) -> store::Precondition {
    match (create_only, version) {
        (true, _) => store::Precondition::Absent,
        (false, Some(v)) => store::Precondition::Version(v),
        (false, None) => store::Precondition::Any,
    }
}

/// A list request's page.
pub fn page(size: i32, token: String) -> Result<store::PageRequest, tonic::Status> {
    let size =
        u32::try_from(size).map_err(|_| grpc_status(ErrorKind::InvalidArgument, "page_size must not be negative"))?;
    Ok(store::PageRequest {
        token: (!token.is_empty()).then_some(token),
        size,
    })
}

pub fn next_token(next: Option<String>) -> String {
    next.unwrap_or_default()
}

/// The environment or flag set named by a request: required.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        Err(grpc_status(
            ErrorKind::InvalidArgument,
            format!("`{field}` is required"),
        ))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_before_and_after_the_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(millis(&timestamp(ms)), ms, "{ms}");
        }
    }

    #[test]
    fn preconditions_from_requests() {
        assert_eq!(precondition(None, false), store::Precondition::Any);
        assert_eq!(precondition(Some(3), false), store::Precondition::Version(3));
        assert_eq!(precondition(Some(3), true), store::Precondition::Absent);
    }
}
