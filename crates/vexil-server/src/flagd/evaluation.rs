//! flagd's evaluation services on port 8013: `flagd.evaluation.v1`, `flagd.evaluation.v2` and the
//! legacy `schema.v1`. Handlers are thin: request → [`App::evaluate`] → the version's encoding.
//!
//! The three versions differ only in how they report "use the caller's code default" (no default
//! variant, or a disabled flag): v1 answers `NOT_FOUND` for a missing default variant and zero
//! values for a disabled flag, v2 leaves value and variant unset, schema.v1 reports `FALLBACK`.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tonic::{Request, Response, Status};
use vexil_core::{Reason, Selector, ValueType};
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::pbjson_types::Struct;
use vexil_proto::schema::v1 as schema_v1;

use super::events::{self, EventStream};
use crate::app::{App, Evaluated};
use crate::convert::{json_to_struct, struct_to_json};
use crate::error::{self, ErrorKind};

/// Which flagd evaluation API is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    V1,
    V2,
    SchemaV1,
}

impl Api {
    fn protocol(self) -> &'static str {
        match self {
            Api::V1 => "flagd.evaluation.v1",
            Api::V2 => "flagd.evaluation.v2",
            Api::SchemaV1 => "schema.v1",
        }
    }
}

/// What a typed Resolve* answers: value (None = zero value / unset), reason, variant, metadata.
struct Answer {
    value: Option<Value>,
    reason: String,
    variant: Option<String>,
    metadata: Struct,
}

/// The selector of a request: the `Flagd-Selector` header.
pub(crate) fn selector<T>(request: &Request<T>) -> Result<Selector, Status> {
    crate::selector::from_headers(request.metadata().as_ref(), "")
        .map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, e))
}

/// The evaluation context: the request's `context` merged with `-X` values and `-H` headers.
pub(crate) fn context<T>(app: &App, request: &Request<T>, context: Option<Struct>) -> Map<String, Value> {
    let own = context.map(struct_to_json).unwrap_or_default();
    let metadata = request.metadata();
    app.context(own, |name| metadata.get(name).and_then(|v| v.to_str().ok()))
}

fn answer(api: Api, ev: Evaluated) -> Result<Answer, Status> {
    if let Some(err) = &ev.error {
        return Err(error::status(err.code, &err.message));
    }
    let metadata = json_to_struct(&ev.metadata);
    if ev.value.is_none() {
        // The caller's code default applies (no default variant, or a disabled flag).
        return match (api, ev.reason) {
            (Api::V2, reason) => Ok(Answer {
                value: None,
                reason: reason.as_str().into(),
                variant: None,
                metadata,
            }),
            (Api::V1, Reason::Default) => Err(error::status(
                vexil_core::ErrorCode::FlagNotFound,
                "the flag has no default variant (use flagd.evaluation.v2 for the code default)",
            )),
            (Api::SchemaV1, Reason::Default) => Ok(Answer {
                value: None,
                reason: "FALLBACK".into(),
                variant: Some(String::new()),
                metadata,
            }),
            (_, reason) => Ok(Answer {
                value: None,
                reason: reason.as_str().into(),
                variant: Some(String::new()),
                metadata,
            }),
        };
    }
    Ok(Answer {
        value: ev.value,
        reason: ev.reason.as_str().into(),
        variant: ev.variant,
        metadata,
    })
}

fn resolve<T>(
    app: &App,
    api: Api,
    request: &Request<T>,
    key: &str,
    ctx: Option<Struct>,
    ty: ValueType,
) -> Result<Answer, Status> {
    let selector = selector(request)?;
    let context = context(app, request, ctx);
    answer(api, app.evaluate(api.protocol(), key, &selector, &context, ty))
}

fn as_bool(v: &Value) -> bool {
    v.as_bool().unwrap_or_default()
}
fn as_string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}
fn as_float(v: &Value) -> f64 {
    v.as_f64().unwrap_or_default()
}
/// flagd resolves integers as float64 and truncates (`0.5` → `0`).
fn as_int(v: &Value) -> i64 {
    v.as_f64().unwrap_or_default() as i64
}
fn as_object(v: &Value) -> Struct {
    v.as_object().map(json_to_struct).unwrap_or_default()
}

/// `impl Service for $ty` of one API: the five typed Resolve* methods plus `$extra` methods.
/// (The whole impl is generated so `async_trait` sees the methods expanded.)
macro_rules! service_impl {
    ($ty:ty, $pkg:ident, $api:expr, unset = $unset:tt, { $($extra:tt)* }) => {
        service_impl!(@impl $ty, $pkg, $api, $unset, { $($extra)* },
            resolve_boolean, ResolveBooleanRequest, ResolveBooleanResponse, ValueType::Boolean, as_bool, scalar;
            resolve_string, ResolveStringRequest, ResolveStringResponse, ValueType::String, as_string, scalar;
            resolve_float, ResolveFloatRequest, ResolveFloatResponse, ValueType::Float, as_float, scalar;
            resolve_int, ResolveIntRequest, ResolveIntResponse, ValueType::Integer, as_int, scalar;
            resolve_object, ResolveObjectRequest, ResolveObjectResponse, ValueType::Object, as_object, message);
    };
    (@impl $ty:ty, $pkg:ident, $api:expr, $unset:tt, { $($extra:tt)* }, $($method:ident, $req:ident, $resp:ident, $vt:expr, $conv:ident, $kind:ident);*) => {
        #[tonic::async_trait]
        impl $pkg::service_server::Service for $ty {
            $(
                async fn $method(&self, request: Request<$pkg::$req>) -> Result<Response<$pkg::$resp>, Status> {
                    let key = request.get_ref().flag_key.clone();
                    let ctx = request.get_ref().context.clone();
                    let a = resolve(&self.app, $api, &request, &key, ctx, $vt)?;
                    Ok(Response::new(service_impl!(@build $unset, $kind, $pkg, $resp, a, $conv)))
                }
            )*
            $($extra)*
        }
    };
    // v1/schema.v1 scalars: the zero value when there is none.
    (@build false, scalar, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp {
            value: $a.value.as_ref().map($conv).unwrap_or_default(),
            reason: $a.reason,
            variant: $a.variant.unwrap_or_default(),
            metadata: Some($a.metadata),
        }
    };
    // v1/schema.v1 objects: the value is a message, unset when there is none.
    (@build false, message, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp {
            value: $a.value.as_ref().map($conv),
            reason: $a.reason,
            variant: $a.variant.unwrap_or_default(),
            metadata: Some($a.metadata),
        }
    };
    // v2: value and variant unset when there is none.
    (@build true, $kind:ident, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp { value: $a.value.as_ref().map($conv), reason: $a.reason, variant: $a.variant, metadata: Some($a.metadata) }
    };
}

/// `flagd.evaluation.v1.Service`.
#[derive(Debug, Clone)]
pub struct EvaluationV1 {
    pub app: App,
}

service_impl!(EvaluationV1, v1, Api::V1, unset = false, {
    async fn resolve_all(
        &self,
        request: Request<v1::ResolveAllRequest>,
    ) -> Result<Response<v1::ResolveAllResponse>, Status> {
        let ctx = request.get_ref().context.clone();
        let (flags, selector) = resolve_all(&self.app, Api::V1, &request, ctx)?;
        Ok(Response::new(v1::ResolveAllResponse {
            flags,
            metadata: Some(json_to_struct(&selector.metadata())),
        }))
    }

    type EventStreamStream = EventStream<v1::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let selector = selector(&request)?;
        Ok(Response::new(events::stream(&self.app, selector, |kind, data| {
            v1::EventStreamResponse {
                r#type: kind.into(),
                data,
            }
        })?))
    }
});

/// flagd's ResolveAll: every flag the selector sees, resolved as its default variant's type;
/// flags without a default variant and disabled flags are left out.
fn resolve_all<T>(
    app: &App,
    api: Api,
    request: &Request<T>,
    ctx: Option<Struct>,
) -> Result<(HashMap<String, v1::AnyFlag>, Selector), Status> {
    let selector = selector(request)?;
    let context = context(app, request, ctx);
    let mut flags = HashMap::new();
    app.evaluate_all(api.protocol(), &selector, &context, |key, default_type, ev| {
        let Some(ty) = default_type else { return };
        if ev.reason != Reason::Disabled {
            flags.insert(key.to_owned(), any_flag(ty, ev));
        }
    });
    Ok((flags, selector))
}

fn any_flag(ty: ValueType, ev: Evaluated) -> v1::AnyFlag {
    use v1::any_flag::Value as V;
    let metadata = Some(json_to_struct(&ev.metadata));
    let value = ev.value.as_ref().filter(|v| ty.accepts(v));
    let (reason, variant, value) = match (&ev.error, value) {
        (None, Some(v)) => {
            let value = match ty {
                ValueType::Boolean => V::BoolValue(as_bool(v)),
                ValueType::String => V::StringValue(as_string(v)),
                ValueType::Object => V::ObjectValue(as_object(v)),
                _ => V::DoubleValue(as_float(v)),
            };
            (
                ev.reason.as_str().to_owned(),
                ev.variant.unwrap_or_default(),
                Some(value),
            )
        }
        // Errors, and a targeted variant of another type than the default (flagd: TYPE_MISMATCH):
        // flagd sends the zero value of the flag's type (flagd-web reads a missing value as
        // TYPE_MISMATCH rather than the error).
        _ => {
            let zero = match ty {
                ValueType::Boolean => V::BoolValue(false),
                ValueType::String => V::StringValue(String::new()),
                ValueType::Object => V::ObjectValue(Struct::default()),
                _ => V::DoubleValue(0.0),
            };
            (Reason::Error.as_str().to_owned(), String::new(), Some(zero))
        }
    };
    v1::AnyFlag {
        reason,
        variant,
        value,
        metadata,
    }
}

/// `flagd.evaluation.v2.Service`.
#[derive(Debug, Clone)]
pub struct EvaluationV2 {
    pub app: App,
}

service_impl!(EvaluationV2, v2, Api::V2, unset = true, {
    type EventStreamStream = EventStream<v2::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<v2::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let selector = selector(&request)?;
        Ok(Response::new(events::stream(&self.app, selector, |kind, data| {
            v2::EventStreamResponse {
                r#type: kind.into(),
                data,
            }
        })?))
    }
});

/// Legacy `schema.v1.Service` (deprecated by flagd, still served).
#[derive(Debug, Clone)]
pub struct SchemaV1 {
    pub app: App,
}

service_impl!(SchemaV1, schema_v1, Api::SchemaV1, unset = false, {
    async fn resolve_all(
        &self,
        request: Request<schema_v1::ResolveAllRequest>,
    ) -> Result<Response<schema_v1::ResolveAllResponse>, Status> {
        use schema_v1::any_flag::Value as S;
        use v1::any_flag::Value as V;
        let ctx = request.get_ref().context.clone();
        let (flags, _) = resolve_all(&self.app, Api::SchemaV1, &request, ctx)?;
        // schema.v1's AnyFlag is evaluation.v1's without metadata.
        let flags = flags
            .into_iter()
            .map(|(key, f)| {
                let value = f.value.map(|v| match v {
                    V::BoolValue(b) => S::BoolValue(b),
                    V::StringValue(s) => S::StringValue(s),
                    V::DoubleValue(d) => S::DoubleValue(d),
                    V::ObjectValue(o) => S::ObjectValue(o),
                });
                (
                    key,
                    schema_v1::AnyFlag {
                        reason: f.reason,
                        variant: f.variant,
                        value,
                    },
                )
            })
            .collect();
        Ok(Response::new(schema_v1::ResolveAllResponse { flags }))
    }

    type EventStreamStream = EventStream<schema_v1::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<schema_v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let selector = selector(&request)?;
        Ok(Response::new(events::stream(&self.app, selector, |kind, data| {
            schema_v1::EventStreamResponse {
                r#type: kind.into(),
                data,
            }
        })?))
    }
});
