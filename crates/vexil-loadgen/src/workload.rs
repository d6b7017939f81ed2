//! Scenarios: what requests a run sends, and the clients that send them.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value, json};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};

use crate::flags::{GeneratedFlag, context};

/// What a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// flagd.evaluation.v1 ResolveBoolean over gRPC (static, targeting and fractional flags).
    ResolveBoolean,
    /// flagd.evaluation.v1 ResolveBoolean over gRPC on targeting flags only (`if`/`in`/`==`: the
    /// request context is converted and a rule runs on every request).
    ResolveTargeting,
    /// flagd.evaluation.v1 ResolveString over gRPC, targeting and fractional flags only.
    ResolveString,
    /// flagd.evaluation.v1 ResolveAll over gRPC.
    ResolveAll,
    /// flagd.evaluation.v2 ResolveBoolean over gRPC.
    V2Boolean,
    /// OFREP single-flag evaluation (HTTP/1.1 JSON).
    OfrepSingle,
    /// OFREP bulk evaluation (HTTP/1.1 JSON).
    OfrepBulk,
    /// grpc.health.v1 Check over gRPC: the same stack doing no evaluation (the yardstick of the
    /// ResolveBoolean speed target).
    Health,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ResolveBoolean => "resolve-boolean",
            Scenario::ResolveTargeting => "resolve-targeting",
            Scenario::ResolveString => "resolve-string",
            Scenario::ResolveAll => "resolve-all",
            Scenario::V2Boolean => "v2-boolean",
            Scenario::OfrepSingle => "ofrep-single",
            Scenario::OfrepBulk => "ofrep-bulk",
            Scenario::Health => "health",
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Scenario::OfrepSingle | Scenario::OfrepBulk)
    }
}

/// One prepared request.
#[derive(Debug, Clone)]
pub enum Req {
    Bool(v1::ResolveBooleanRequest),
    Str(v1::ResolveStringRequest),
    All(v1::ResolveAllRequest),
    V2Bool(v2::ResolveBooleanRequest),
    Health,
    Http { path: String, body: Bytes },
}

/// A JSON context as a protobuf `Struct` (strings, numbers and booleans; anything else is null).
pub fn to_struct(m: &Map<String, Value>) -> JsonStruct {
    let fields: Map<String, Value> = m
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => v.clone(),
                _ => Value::Null,
            };
            (k.clone(), v)
        })
        .collect();
    JsonStruct::from(fields)
}

/// `pool` requests of `scenario` over `flags`, with contexts of `attributes` attributes.
pub fn requests(scenario: Scenario, flags: &[GeneratedFlag], attributes: usize, pool: usize) -> Vec<Req> {
    let booleans: Vec<&GeneratedFlag> = flags.iter().filter(|f| f.boolean).collect();
    let targeting: Vec<&GeneratedFlag> = booleans
        .iter()
        .copied()
        .filter(|f| f.kind == crate::flags::Kind::Targeting)
        .collect();
    let strings: Vec<&GeneratedFlag> = flags
        .iter()
        .filter(|f| !f.boolean && f.kind != crate::flags::Kind::Static)
        .collect();
    (0..pool)
        .map(|i| {
            let ctx = context(attributes, i as u64);
            let pick =
                |set: &[&GeneratedFlag]| set.get(i % set.len().max(1)).map(|f| f.key.clone()).unwrap_or_default();
            match scenario {
                Scenario::ResolveBoolean => Req::Bool(v1::ResolveBooleanRequest {
                    flag_key: pick(&booleans),
                    context: Some(to_struct(&ctx)),
                }),
                Scenario::ResolveTargeting => Req::Bool(v1::ResolveBooleanRequest {
                    flag_key: pick(&targeting),
                    context: Some(to_struct(&ctx)),
                }),
                Scenario::ResolveString => Req::Str(v1::ResolveStringRequest {
                    flag_key: pick(&strings),
                    context: Some(to_struct(&ctx)),
                }),
                Scenario::ResolveAll => Req::All(v1::ResolveAllRequest {
                    context: Some(to_struct(&ctx)),
                }),
                Scenario::V2Boolean => Req::V2Bool(v2::ResolveBooleanRequest {
                    flag_key: pick(&booleans),
                    context: Some(to_struct(&ctx)),
                }),
                Scenario::OfrepSingle => Req::Http {
                    path: format!("/ofrep/v1/evaluate/flags/{}", pick(&booleans)),
                    body: Bytes::from(json!({ "context": ctx }).to_string()),
                },
                Scenario::OfrepBulk => Req::Http {
                    path: "/ofrep/v1/evaluate/flags".into(),
                    body: Bytes::from(json!({ "context": ctx }).to_string()),
                },
                Scenario::Health => Req::Health,
            }
        })
        .collect()
}

/// Sends requests to one server over a fixed set of connections.
#[derive(Debug)]
pub struct Client {
    v1: Vec<v1::service_client::ServiceClient<Channel>>,
    v2: Vec<v2::service_client::ServiceClient<Channel>>,
    health: Vec<HealthClient<Channel>>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    http_base: String,
    next: AtomicUsize,
}

impl Client {
    /// `connections` HTTP/2 connections to `grpc_port` on loopback; an HTTP/1.1 pool for `http_port`.
    pub async fn connect(grpc_port: u16, http_port: u16, connections: usize) -> anyhow::Result<Client> {
        Client::connect_to("127.0.0.1", grpc_port, http_port, connections).await
    }

    /// As [`Client::connect`], to `host`.
    pub async fn connect_to(host: &str, grpc_port: u16, http_port: u16, connections: usize) -> anyhow::Result<Client> {
        let mut v1s = Vec::new();
        let mut v2s = Vec::new();
        let mut healths = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}:{grpc_port}"))?
                .tcp_nodelay(true)
                .connect()
                .await?;
            v1s.push(v1::service_client::ServiceClient::new(channel.clone()));
            healths.push(HealthClient::new(channel.clone()));
            v2s.push(v2::service_client::ServiceClient::new(channel));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Client {
            v1: v1s,
            v2: v2s,
            health: healths,
            http,
            http_base: format!("http://{host}:{http_port}"),
            next: AtomicUsize::new(0),
        })
    }

    /// Sends one request and reads the whole answer; `Err` describes a failure.
    pub async fn send(&self, req: &Req) -> Result<(), String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let err = |e: tonic::Status| format!("{:?}", e.code());
        match req {
            Req::Bool(r) => self.v1[i % self.v1.len()]
                .clone()
                .resolve_boolean(r.clone())
                .await
                .map(drop)
                .map_err(err),
            Req::Str(r) => self.v1[i % self.v1.len()]
                .clone()
                .resolve_string(r.clone())
                .await
                .map(drop)
                .map_err(err),
            Req::All(r) => self.v1[i % self.v1.len()]
                .clone()
                .resolve_all(r.clone())
                .await
                .map(drop)
                .map_err(err),
            Req::V2Bool(r) => self.v2[i % self.v2.len()]
                .clone()
                .resolve_boolean(r.clone())
                .await
                .map(drop)
                .map_err(err),
            Req::Health => self.health[i % self.health.len()]
                .clone()
                .check(HealthCheckRequest::default())
                .await
                .map(drop)
                .map_err(err),
            Req::Http { path, body } => {
                let request = http::Request::post(format!("{}{path}", self.http_base))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                    .map_err(|e| e.to_string())?;
                let response = self.http.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
        }
    }

    /// The raw answer to `req`, for capturing canned baseline responses.
    pub async fn fetch_http(&self, path: &str, body: Bytes) -> anyhow::Result<String> {
        let request = http::Request::post(format!("{}{path}", self.http_base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = self.http.request(request).await?;
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec())?)
    }

    pub fn v1(&self) -> v1::service_client::ServiceClient<Channel> {
        self.v1[0].clone()
    }

    pub fn v2(&self) -> v2::service_client::ServiceClient<Channel> {
        self.v2[0].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::catalog;

    #[test]
    fn requests_cover_the_pool_and_pick_the_right_flags() {
        let flags = catalog(30);
        let reqs = requests(Scenario::ResolveString, &flags, 5, 16);
        assert_eq!(reqs.len(), 16);
        for r in &reqs {
            let Req::Str(r) = r else { panic!("string requests") };
            assert!(r.flag_key.starts_with("string-"));
            assert_eq!(r.context.as_ref().unwrap().to_map().len(), 5);
        }
        let bulk = requests(Scenario::OfrepBulk, &flags, 50, 2);
        let Req::Http { path, body } = &bulk[0] else {
            panic!("http")
        };
        assert_eq!(path, "/ofrep/v1/evaluate/flags");
        let parsed: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(parsed["context"].as_object().unwrap().len(), 50);
    }

    #[test]
    fn the_targeting_scenario_asks_for_boolean_targeting_flags_only() {
        let flags = catalog(30);
        let targeting: Vec<&str> = flags
            .iter()
            .filter(|f| f.boolean && f.kind == crate::flags::Kind::Targeting)
            .map(|f| f.key.as_str())
            .collect();
        let reqs = requests(Scenario::ResolveTargeting, &flags, 5, 16);
        let mut seen: Vec<&str> = reqs
            .iter()
            .map(|r| match r {
                Req::Bool(r) => r.flag_key.as_str(),
                _ => panic!("boolean requests"),
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, targeting);
    }
}
