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

pub fn experiment(e: store::ExperimentRecord) -> pb::Experiment {
    let d = e.definition;
    let salt = d.salt().to_owned();
    let input = d.input;
    pb::Experiment {
        environment: e.environment,
        flag_set: e.flag_set,
        key: e.key,
        id: d.id,
        status: d.status.as_str().to_owned(),
        flag: input.flag,
        name: input.name,
        description: input.description,
        hypothesis: input.hypothesis,
        audience: input.audience.and_then(value),
        traffic_percent: input.traffic_percent,
        weights: input
            .weights
            .into_iter()
            .map(|w| pb::VariantWeight {
                variant: w.variant,
                weight: w.weight,
            })
            .collect(),
        metrics: input
            .metrics
            .into_iter()
            .map(|m| pb::ExperimentMetric {
                key: m.key,
                kind: enum_name(&m.kind),
                role: enum_name(&m.role),
                lower_is_better: m.lower_is_better,
            })
            .collect(),
        salt,
        layer: input.layer.map(|l| pb::ExperimentLayer {
            key: l.key,
            start_percent: l.start_percent,
            end_percent: l.end_percent,
        }),
        winner: d.winner.unwrap_or_default(),
        started_at: d.started_at.map(timestamp),
        stopped_at: d.stopped_at.map(timestamp),
        version: e.version,
        created: stamp(e.created),
        updated: stamp(e.updated),
    }
}

/// The serialized (snake_case) name of a unit enum.
fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A unit enum from its serialized name (`""`: its default); the error names the field.
fn enum_of<T: serde::de::DeserializeOwned + Default>(field: &str, name: &str) -> Result<T, store::Problem> {
    if name.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_value(Value::String(name.to_owned())).map_err(|_| store::Problem {
        pointer: field.to_owned(),
        message: format!("`{name}` is not one of the allowed values"),
    })
}

/// An experiment's input from a put request; every problem at once.
pub fn experiment_input(r: &mut pb::PutExperimentRequest) -> Result<store::ExperimentInput, store::StoreError> {
    let mut problems = Vec::new();
    let mut metrics = Vec::new();
    for (i, m) in std::mem::take(&mut r.metrics).into_iter().enumerate() {
        let kind = enum_of(&format!("/metrics/{i}/kind"), &m.kind);
        let role = enum_of(&format!("/metrics/{i}/role"), &m.role);
        match (kind, role) {
            (Ok(kind), Ok(role)) => metrics.push(store::MetricSpec {
                key: m.key,
                kind,
                role,
                lower_is_better: m.lower_is_better,
            }),
            (kind, role) => problems.extend(kind.err().into_iter().chain(role.err())),
        }
    }
    if !problems.is_empty() {
        return Err(store::StoreError::Invalid(problems));
    }
    Ok(store::ExperimentInput {
        flag: std::mem::take(&mut r.flag),
        name: std::mem::take(&mut r.name),
        description: std::mem::take(&mut r.description),
        hypothesis: std::mem::take(&mut r.hypothesis),
        audience: r.audience.take().map(|a| json(Some(a))).filter(|a| !a.is_null()),
        traffic_percent: r.traffic_percent,
        weights: std::mem::take(&mut r.weights)
            .into_iter()
            .map(|w| store::VariantWeight {
                variant: w.variant,
                weight: w.weight,
            })
            .collect(),
        metrics,
        salt: (!r.salt.is_empty()).then(|| std::mem::take(&mut r.salt)),
        layer: r.layer.take().map(|l| store::LayerSpec {
            key: l.key,
            start_percent: l.start_percent,
            end_percent: l.end_percent,
        }),
    })
}

/// An experiment's results on the wire.
pub fn results(r: vexil_service::results::ExperimentResults, computed_at: store::Millis) -> pb::ExperimentResults {
    let method = match serde_json::to_value(r.method) {
        Ok(Value::Object(m)) => Some(JsonStruct::from(m)),
        _ => None,
    };
    pb::ExperimentResults {
        environment: r.environment,
        experiment: r.experiment,
        status: r.status.as_str().to_owned(),
        control: r.control,
        method,
        correction: enum_name(&r.correction),
        exposures: r
            .exposures
            .into_iter()
            .map(|e| pb::VariantExposure {
                variant: e.variant,
                units: e.units,
                expected_share: e.expected_share,
                observed_share: e.observed_share,
            })
            .collect(),
        sample_ratio: r.srm.map(|s| pb::SampleRatioCheck {
            chi_square: s.chi_square,
            p_value: s.p_value,
            threshold: s.threshold,
            mismatch: s.mismatch,
        }),
        metrics: r
            .metrics
            .into_iter()
            .map(|m| pb::MetricResult {
                metric: m.key,
                kind: enum_name(&m.kind),
                role: enum_name(&m.role),
                lower_is_better: m.lower_is_better,
                variants: m.variants.into_iter().map(variant_result).collect(),
            })
            .collect(),
        computed_at: Some(timestamp(computed_at)),
        from: r.window.from_ms.map(timestamp),
        until: Some(timestamp(r.window.until_ms)),
        cuped_days: i32::try_from(r.cuped_days).unwrap_or(i32::MAX),
    }
}

fn variant_result(v: vexil_service::results::VariantMetric) -> pb::VariantResult {
    let effect = |e: vexil_service::results::Effect| pb::Effect {
        estimate: e.estimate,
        lower: e.lower,
        upper: e.upper,
    };
    let mut out = pb::VariantResult {
        variant: v.variant,
        units: v.units,
        conversions: v.conversions,
        sum: v.sum,
        sum_squares: v.sum_squares,
        mean: v.mean,
        ..Default::default()
    };
    if let Some(c) = v.comparison {
        out.absolute = c.absolute.map(effect);
        out.relative = c.relative.map(effect);
        out.p_value = c.p_value;
        out.adjusted_p_value = c.adjusted_p_value;
        out.chance_to_win = c.chance_to_win;
        out.risk = c.risk;
        out.significant = c.significant;
        out.note = c.note.unwrap_or_default();
        out.verdict = enum_name(&c.verdict);
    }
    out
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
