//! `vexil.v1.EvaluationService`: the same snapshot and rules as flagd's protocols, scoped to a
//! managed environment (and optionally one flag set), answering with the environment's config
//! version.

use std::sync::Arc;

use serde_json::Value;
use tonic::{Request, Response, Status};
use vexil_core::{Attributes, Resolution, Selector, ValueType};
use vexil_proto::JsonStruct;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::bootstrap_service_server::BootstrapService;
use vexil_proto::vexil::v1::evaluation_service_server::EvaluationService;

use super::Managed;
use super::auth::Need;
use super::convert;
use crate::app::App;
use crate::error::{ErrorKind, grpc_status};

/// Most flags one EvaluateBatch may name.
const MAX_BATCH: usize = 10_000;

const PROTOCOL: &str = "vexil.v1";

#[derive(Debug, Clone)]
pub struct EvaluationApi {
    pub app: App,
    pub managed: Arc<Managed>,
}

impl EvaluationApi {
    /// The environment a request evaluates in (the one asked for, else the key's, else the default
    /// one), which the caller must be allowed to evaluate in.
    async fn scope<T>(&self, request: &Request<T>, asked: &str) -> Result<String, Status> {
        let environment = if asked.is_empty() {
            match self.managed.access.key_scope(request.metadata()).await? {
                Some(scope) => scope,
                None => self.managed.source.default_environment().to_owned(),
            }
        } else {
            asked.to_owned()
        };
        self.managed.check(request, Need::Evaluate(&environment)).await?;
        Ok(environment)
    }

    /// A batch request's evaluations (EvaluateBatch, Bootstrap): at most [`MAX_BATCH`] keys (none:
    /// every flag of the environment or flag set), for the request's context with `-X` and `-H`
    /// over it; each key and result handed to `each`.
    fn evaluate_keys(
        &self,
        environment: &str,
        metadata: &tonic::metadata::MetadataMap,
        flag_set: &str,
        keys: &[String],
        context: Option<&JsonStruct>,
        each: impl FnMut(&str, &Resolution<'_>),
    ) -> Result<(), Status> {
        if keys.len() > MAX_BATCH {
            return Err(grpc_status(
                ErrorKind::InvalidArgument,
                format!("at most {MAX_BATCH} flag keys per request (got {})", keys.len()),
            ));
        }
        let own: &dyn Attributes = match context {
            Some(c) => c,
            None => &(),
        };
        let context = self
            .app
            .flags()
            .context(own, |name| metadata.get(name).and_then(|v| v.to_str().ok()));
        self.evaluate_many(&selector(environment, flag_set), keys, &context, each);
        Ok(())
    }

    /// Evaluates `keys` (none: every flag `selector` sees) and hands each key and result to `each`.
    fn evaluate_many(
        &self,
        selector: &Selector,
        keys: &[String],
        context: &dyn Attributes,
        mut each: impl FnMut(&str, &Resolution<'_>),
    ) {
        let flags = self.app.flags();
        if keys.is_empty() {
            flags.evaluate_all(PROTOCOL, selector, context, |flag, res| each(flag.key(), res));
        } else {
            for key in keys {
                flags.evaluate(PROTOCOL, key, selector, context, ValueType::Any, |_, res| {
                    each(key, res)
                });
            }
        }
    }

    fn config_version(&self, environment: &str) -> i64 {
        self.managed
            .source
            .environment(environment)
            .map_or(0, |e| e.config_version)
    }
}

fn selector(environment: &str, flag_set: &str) -> Selector {
    if flag_set.is_empty() {
        Selector::Environment(environment.to_owned())
    } else {
        Selector::FlagSet(Some(format!("{environment}/{flag_set}")))
    }
}

fn value_type(t: i32) -> Result<ValueType, Status> {
    Ok(match pb::ValueType::try_from(t) {
        Ok(pb::ValueType::Any) => ValueType::Any,
        Ok(pb::ValueType::Boolean) => ValueType::Boolean,
        Ok(pb::ValueType::String) => ValueType::String,
        Ok(pb::ValueType::Integer) => ValueType::Integer,
        Ok(pb::ValueType::Float) => ValueType::Float,
        Ok(pb::ValueType::Object) => ValueType::Object,
        Err(_) => {
            return Err(grpc_status(
                ErrorKind::InvalidArgument,
                format!("unknown value type {t}"),
            ));
        }
    })
}

fn typed(value: &Value) -> Option<pb::evaluate_response::Typed> {
    use pb::evaluate_response::Typed;
    Some(match value {
        Value::Bool(b) => Typed::BoolValue(*b),
        Value::String(s) => Typed::StringValue(s.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Typed::IntValue(i),
            None => Typed::DoubleValue(n.as_f64()?),
        },
        Value::Object(m) => Typed::ObjectValue(JsonStruct::from(m.clone())),
        Value::Null | Value::Array(_) => return None,
    })
}

fn response(key: &str, r: &Resolution<'_>, config_version: i64) -> pb::EvaluateResponse {
    pb::EvaluateResponse {
        flag_key: key.to_owned(),
        value: r.value.and_then(|v| convert::value(v.clone())),
        typed: r.value.and_then(typed),
        variant: r.variant.unwrap_or_default().to_owned(),
        reason: r.reason.as_str().to_owned(),
        error_code: r.error.as_ref().map(|e| e.code.as_str().to_owned()).unwrap_or_default(),
        error_message: r.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
        metadata: r.metadata.map(|m| JsonStruct::from(m.clone())),
        config_version,
    }
}

#[tonic::async_trait]
impl EvaluationService for EvaluationApi {
    async fn evaluate(&self, request: Request<pb::EvaluateRequest>) -> Result<Response<pb::EvaluateResponse>, Status> {
        let asked = request.get_ref().environment.clone();
        let environment = self.scope(&request, &asked).await?;
        let (metadata, _, r) = request.into_parts();
        let ty = value_type(r.r#type)?;
        let selector = selector(&environment, &r.flag_set);
        let own: &dyn Attributes = match &r.context {
            Some(c) => c,
            None => &(),
        };
        let context = self
            .app
            .flags()
            .context(own, |name| metadata.get(name).and_then(|v| v.to_str().ok()));
        let version = self.config_version(&environment);
        let answer = self
            .app
            .flags()
            .evaluate(PROTOCOL, &r.flag_key, &selector, &context, ty, |_, res| {
                response(&r.flag_key, res, version)
            });
        Ok(Response::new(answer))
    }

    async fn evaluate_batch(
        &self,
        request: Request<pb::EvaluateBatchRequest>,
    ) -> Result<Response<pb::EvaluateBatchResponse>, Status> {
        let asked = request.get_ref().environment.clone();
        let environment = self.scope(&request, &asked).await?;
        let (metadata, _, r) = request.into_parts();
        let version = self.config_version(&environment);
        let mut results = Vec::new();
        self.evaluate_keys(
            &environment,
            &metadata,
            &r.flag_set,
            &r.flag_keys,
            r.context.as_ref(),
            |key, res| {
                results.push(response(key, res, version));
            },
        )?;
        Ok(Response::new(pb::EvaluateBatchResponse {
            results,
            config_version: version,
        }))
    }
}

#[tonic::async_trait]
impl BootstrapService for EvaluationApi {
    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::BootstrapResponse>, Status> {
        let asked = request.get_ref().environment.clone();
        let environment = self.scope(&request, &asked).await?;
        let (metadata, _, r) = request.into_parts();
        let config_version = self.config_version(&environment);
        let mut flags = std::collections::BTreeMap::new();
        self.evaluate_keys(
            &environment,
            &metadata,
            &r.flag_set,
            &r.flag_keys,
            r.context.as_ref(),
            |key, res| {
                flags.insert(key.to_owned(), bootstrapped(res));
            },
        )?;
        let etag = etag(config_version, &flags);
        Ok(Response::new(pb::BootstrapResponse {
            environment,
            config_version,
            etag,
            flags: flags.into_iter().collect(),
        }))
    }
}

/// One flag of a bootstrap payload.
fn bootstrapped(r: &Resolution<'_>) -> pb::BootstrappedFlag {
    pb::BootstrappedFlag {
        value: r.value.and_then(|v| convert::value(v.clone())),
        variant: r.variant.unwrap_or_default().to_owned(),
        reason: r.reason.as_str().to_owned(),
        error_code: r.error.as_ref().map(|e| e.code.as_str().to_owned()).unwrap_or_default(),
        metadata: r.metadata.map(|m| JsonStruct::from(m.clone())),
        experiment: r.split.as_ref().map(|split| pb::ExperimentAssignment {
            id: split.experiment.id.clone(),
            key: split.experiment.key.clone(),
            variant: r.variant.unwrap_or_default().to_owned(),
        }),
    }
}

/// A strong ETag of a payload: SHA-256 of its config version and its flags in key order (the
/// same content gives the same tag on every replica).
fn etag(config_version: i64, flags: &std::collections::BTreeMap<String, pb::BootstrappedFlag>) -> String {
    use prost::Message as _;
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(config_version.to_be_bytes());
    for (key, flag) in flags {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        let encoded = flag.encode_to_vec();
        hash.update((encoded.len() as u64).to_be_bytes());
        hash.update(&encoded);
    }
    let digest = hash.finalize();
    format!(
        "\"{}\"",
        digest[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}
