//! flagd's evaluation services on port 8013: `flagd.evaluation.v1`, `flagd.evaluation.v2` and the
//! legacy `schema.v1`. Handlers are thin: request → [`vexil_service::Flags::evaluate`] → the version's encoding.
//!
//! The three versions differ only in how they report "use the caller's code default" (no default
//! variant, or a disabled flag): v1 answers `NOT_FOUND` for a missing default variant and zero
//! values for a disabled flag, v2 leaves value and variant unset, schema.v1 reports `FALLBACK`.

use std::collections::HashMap;

use serde_json::Value;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use vexil_core::{Attributes, Metadata, Reason, Resolution, Selector, ValueType};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::schema::v1 as schema_v1;
use vexil_service::RequestContext;

use super::events::{self, EventStream};
use crate::app::App;
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

/// What a typed Resolve* answers, borrowed from the resolution: value (None = zero value / unset),
/// reason, variant, metadata.
struct Answer<'r> {
    value: Option<&'r Value>,
    reason: &'static str,
    variant: Option<&'r str>,
    metadata: JsonStruct,
}

/// The selector of a request: the `Flagd-Selector` header.
pub(crate) fn selector(metadata: &MetadataMap) -> Result<Selector, Status> {
    crate::selector::from_headers(metadata.as_ref(), "").map_err(|e| error::grpc_status(ErrorKind::InvalidArgument, e))
}

/// The evaluation context: the request's `context` with `-X` values and `-H` headers over it.
fn context<'r>(app: &'r App, metadata: &'r MetadataMap, own: &'r Option<JsonStruct>) -> RequestContext<'r> {
    let own: &dyn Attributes = match own {
        Some(own) => own,
        None => &(),
    };
    app.flags()
        .context(own, |name| metadata.get(name).and_then(|v| v.to_str().ok()))
}

/// A flag's metadata as flagd reports it in a response: the selector's reflection (`{"flagSetId": …}`
/// or `{"source": …}`) with the flag's own metadata over it.
fn metadata(selector: &Selector, flag: Option<&Metadata>) -> JsonStruct {
    let mut metadata = selector.metadata();
    for (k, v) in flag.into_iter().flatten() {
        metadata.insert(k.clone(), v.clone());
    }
    JsonStruct::from(metadata)
}

fn answer<'r>(api: Api, r: &Resolution<'r>, selector: &Selector) -> Result<Answer<'r>, Status> {
    if let Some(err) = &r.error {
        return Err(error::status(err.code, &err.message));
    }
    let metadata = metadata(selector, r.metadata);
    if r.value.is_none() {
        // The caller's code default applies (no default variant, or a disabled flag).
        return match (api, r.reason) {
            (Api::V2, reason) => Ok(Answer {
                value: None,
                reason: reason.as_str(),
                variant: None,
                metadata,
            }),
            (Api::V1, Reason::Default) => Err(error::status(
                vexil_core::ErrorCode::FlagNotFound,
                "the flag has no default variant (use flagd.evaluation.v2 for the code default)",
            )),
            (Api::SchemaV1, Reason::Default) => Ok(Answer {
                value: None,
                reason: "FALLBACK",
                variant: Some(""),
                metadata,
            }),
            (_, reason) => Ok(Answer {
                value: None,
                reason: reason.as_str(),
                variant: Some(""),
                metadata,
            }),
        };
    }
    Ok(Answer {
        value: r.value,
        reason: r.reason.as_str(),
        variant: r.variant,
        metadata,
    })
}

/// A typed Resolve*: the request taken apart (nothing copied), evaluated, and the answer built
/// into `Resp` by `build` from the result borrowed from the snapshot.
fn resolve<Req, Resp>(
    app: &App,
    api: Api,
    request: Request<Req>,
    ty: ValueType,
    parts: impl FnOnce(Req) -> (String, Option<JsonStruct>),
    build: impl FnOnce(Answer<'_>) -> Resp,
) -> Result<Response<Resp>, Status> {
    let (metadata, _, message) = request.into_parts();
    let selector = selector(&metadata)?;
    let (key, ctx) = parts(message);
    let context = context(app, &metadata, &ctx);
    app.flags()
        .evaluate(api.protocol(), &key, &selector, &context, ty, |_, r| {
            answer(api, r, &selector).map(build)
        })
        .map(Response::new)
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
fn as_object(v: &Value) -> JsonStruct {
    v.as_object().cloned().map(JsonStruct::from).unwrap_or_default()
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
                    resolve(&self.app, $api, request, $vt, |m| (m.flag_key, m.context), |a| {
                        service_impl!(@build $unset, $kind, $pkg, $resp, a, $conv)
                    })
                }
            )*
            $($extra)*
        }
    };
    // v1/schema.v1 scalars: the zero value when there is none.
    (@build false, scalar, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp {
            value: $a.value.map($conv).unwrap_or_default(),
            reason: $a.reason.to_owned(),
            variant: $a.variant.unwrap_or_default().to_owned(),
            metadata: Some($a.metadata),
        }
    };
    // v1/schema.v1 objects: the value is a message, unset when there is none.
    (@build false, message, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp {
            value: $a.value.map($conv),
            reason: $a.reason.to_owned(),
            variant: $a.variant.unwrap_or_default().to_owned(),
            metadata: Some($a.metadata),
        }
    };
    // v2: value and variant unset when there is none.
    (@build true, $kind:ident, $pkg:ident, $resp:ident, $a:ident, $conv:ident) => {
        $pkg::$resp {
            value: $a.value.map($conv),
            reason: $a.reason.to_owned(),
            variant: $a.variant.map(str::to_owned),
            metadata: Some($a.metadata),
        }
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
        let (flags, selector) = resolve_all(&self.app, Api::V1, request, |m| m.context)?;
        Ok(Response::new(v1::ResolveAllResponse {
            flags,
            metadata: Some(JsonStruct::from(selector.metadata())),
        }))
    }

    type EventStreamStream = EventStream<v1::EventStreamResponse>;

    async fn event_stream(
        &self,
        request: Request<v1::EventStreamRequest>,
    ) -> Result<Response<Self::EventStreamStream>, Status> {
        let selector = selector(request.metadata())?;
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
    request: Request<T>,
    ctx: impl FnOnce(T) -> Option<JsonStruct>,
) -> Result<(HashMap<String, v1::AnyFlag>, Selector), Status> {
    let (metadata, _, message) = request.into_parts();
    let selector = selector(&metadata)?;
    let own = ctx(message);
    let context = context(app, &metadata, &own);
    let mut flags = HashMap::new();
    app.flags()
        .evaluate_all(api.protocol(), &selector, &context, |flag, r| {
            let Some(ty) = flag.default_type() else { return };
            if r.reason != Reason::Disabled {
                flags.insert(flag.key().to_owned(), any_flag(ty, r, &selector));
            }
        });
    Ok((flags, selector))
}

fn any_flag(ty: ValueType, r: &Resolution<'_>, selector: &Selector) -> v1::AnyFlag {
    use v1::any_flag::Value as V;
    let metadata = Some(metadata(selector, r.metadata));
    let value = r.value.filter(|v| ty.accepts(v));
    let (reason, variant, value) = match (&r.error, value) {
        (None, Some(v)) => {
            let value = match ty {
                ValueType::Boolean => V::BoolValue(as_bool(v)),
                ValueType::String => V::StringValue(as_string(v)),
                ValueType::Object => V::ObjectValue(as_object(v)),
                _ => V::DoubleValue(as_float(v)),
            };
            (r.reason, r.variant.unwrap_or_default(), value)
        }
        // Errors, and a targeted variant of another type than the default (flagd: TYPE_MISMATCH):
        // flagd sends the zero value of the flag's type (flagd-web reads a missing value as
        // TYPE_MISMATCH rather than the error).
        _ => {
            let zero = match ty {
                ValueType::Boolean => V::BoolValue(false),
                ValueType::String => V::StringValue(String::new()),
                ValueType::Object => V::ObjectValue(JsonStruct::default()),
                _ => V::DoubleValue(0.0),
            };
            (Reason::Error, "", zero)
        }
    };
    v1::AnyFlag {
        reason: reason.as_str().to_owned(),
        variant: variant.to_owned(),
        value: Some(value),
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
        let selector = selector(request.metadata())?;
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
        let (flags, _) = resolve_all(&self.app, Api::SchemaV1, request, |m| m.context)?;
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
        let selector = selector(request.metadata())?;
        Ok(Response::new(events::stream(&self.app, selector, |kind, data| {
            schema_v1::EventStreamResponse {
                r#type: kind.into(),
                data,
            }
        })?))
    }
});
