//! The per-protocol clients: gRPC channels for flagd evaluation v1/v2 and sync, an HTTP/1.1
//! client for Connect and OFREP, the precomputed request inputs, and the sending of one request
//! of any protocol with its answer's generation marks checked.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use vexil_proto::JsonStruct;
use vexil_proto::flagd::evaluation::{v1, v2};
use vexil_proto::flagd::sync::v1 as sync;

use super::Proto;
use super::generations::{GENERATION_KEYS, Generations, Marks, Verdict, sync_marks};
use crate::flags::{GeneratedFlag, context};
use crate::workload::to_struct;

#[derive(Debug)]
pub(super) struct Clients {
    v1: Vec<v1::service_client::ServiceClient<Channel>>,
    v2: Vec<v2::service_client::ServiceClient<Channel>>,
    sync: Vec<sync::flag_sync_service_client::FlagSyncServiceClient<Channel>>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    evaluation_port: u16,
    ofrep_port: u16,
}

/// One request's inputs.
#[derive(Debug)]
pub(super) struct Input {
    bool_key: String,
    string_key: String,
    pcontext: JsonStruct,
    /// `{"context": …}` (OFREP).
    ofrep_body: Bytes,
    /// `{"flagKey": …, "context": …}` (Connect).
    connect_body: Bytes,
}

pub(super) fn inputs(catalog: &[GeneratedFlag], attrs: usize, count: usize) -> Vec<Input> {
    let booleans: Vec<&str> = catalog.iter().filter(|f| f.boolean).map(|f| f.key.as_str()).collect();
    let strings: Vec<&str> = catalog.iter().filter(|f| !f.boolean).map(|f| f.key.as_str()).collect();
    (0..count)
        .map(|i| {
            let ctx = context(attrs, i as u64);
            let bool_key = booleans.get(i % booleans.len().max(1)).copied().unwrap_or("gen-static");
            // Half the string requests read a generation flag, half a catalog flag.
            let string_key = if i % 2 == 0 || strings.is_empty() {
                GENERATION_KEYS[(i / 2) % GENERATION_KEYS.len()]
            } else {
                strings[(i / 2) % strings.len()]
            };
            Input {
                bool_key: bool_key.to_owned(),
                string_key: string_key.to_owned(),
                pcontext: to_struct(&ctx),
                ofrep_body: Bytes::from(json!({ "context": ctx }).to_string()),
                connect_body: Bytes::from(json!({ "flagKey": string_key, "context": ctx }).to_string()),
            }
        })
        .collect()
}

pub(super) fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Clients {
    pub(super) async fn connect(
        evaluation: u16,
        sync_port: u16,
        ofrep: u16,
        connections: usize,
    ) -> anyhow::Result<Clients> {
        let (mut v1s, mut v2s, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..connections.max(1) {
            let channel = endpoint(evaluation)?.connect().await?;
            v1s.push(v1::service_client::ServiceClient::new(channel.clone()));
            v2s.push(v2::service_client::ServiceClient::new(channel));
            let channel = endpoint(sync_port)?.connect().await?;
            syncs.push(sync::flag_sync_service_client::FlagSyncServiceClient::new(channel));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Clients {
            v1: v1s,
            v2: v2s,
            sync: syncs,
            http,
            evaluation_port: evaluation,
            ofrep_port: ofrep,
        })
    }

    /// A POST with a JSON body on loopback; the answer's JSON.
    async fn post_json(&self, port: u16, path: &str, body: Bytes) -> Result<Value, String> {
        let request = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = self.http.request(request).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("answer is not JSON: {e}"))
    }

    /// Sends one request of `proto` and checks its answer.
    pub(super) async fn send(
        &self,
        proto: Proto,
        n: usize,
        input: &Input,
        gens: &Generations,
    ) -> Result<Verdict, String> {
        let mut marks = Marks::default();
        let mut bulk = false;
        let c = n % self.v1.len();
        match proto {
            Proto::V1Boolean => {
                let r = self.v1[c]
                    .clone()
                    .resolve_boolean(v1::ResolveBooleanRequest {
                        flag_key: input.bool_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V1String => {
                let r = self.v1[c]
                    .clone()
                    .resolve_string(v1::ResolveStringRequest {
                        flag_key: input.string_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.value(&input.string_key, Some(&r.value));
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V1All => {
                bulk = true;
                let r = self.v1[c]
                    .clone()
                    .resolve_all(v1::ResolveAllRequest {
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                for (key, flag) in &r.flags {
                    let value = match &flag.value {
                        Some(v1::any_flag::Value::StringValue(s)) => Some(s.as_str()),
                        _ => None,
                    };
                    marks.value(key, value);
                    marks.metadata_struct(flag.metadata.as_ref());
                }
            }
            Proto::V2Boolean => {
                let r = self.v2[c]
                    .clone()
                    .resolve_boolean(v2::ResolveBooleanRequest {
                        flag_key: input.bool_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::V2String => {
                let r = self.v2[c]
                    .clone()
                    .resolve_string(v2::ResolveStringRequest {
                        flag_key: input.string_key.clone(),
                        context: Some(input.pcontext.clone()),
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks.value(&input.string_key, r.value.as_deref());
                marks.metadata_struct(r.metadata.as_ref());
            }
            Proto::ConnectString => {
                let r = self
                    .post_json(
                        self.evaluation_port,
                        "/flagd.evaluation.v1.Service/ResolveString",
                        input.connect_body.clone(),
                    )
                    .await?;
                marks.value(&input.string_key, r.get("value").and_then(Value::as_str));
                marks.metadata_json(r.get("metadata"));
            }
            Proto::OfrepSingle => {
                // Alternately a boolean catalog flag and a generation flag.
                let key = if n.is_multiple_of(2) {
                    &input.bool_key
                } else {
                    &input.string_key
                };
                let r = self
                    .post_json(
                        self.ofrep_port,
                        &format!("/ofrep/v1/evaluate/flags/{key}"),
                        input.ofrep_body.clone(),
                    )
                    .await?;
                if key.starts_with("gen-") {
                    marks.value(key, r.get("value").and_then(Value::as_str));
                }
                marks.metadata_json(r.get("metadata"));
            }
            Proto::OfrepBulk => {
                bulk = true;
                let r = self
                    .post_json(self.ofrep_port, "/ofrep/v1/evaluate/flags", input.ofrep_body.clone())
                    .await?;
                let flags = r
                    .get("flags")
                    .and_then(Value::as_array)
                    .ok_or("bulk answer without flags")?;
                for flag in flags {
                    let key = flag.get("key").and_then(Value::as_str).unwrap_or("");
                    marks.value(key, flag.get("value").and_then(Value::as_str));
                    marks.metadata_json(flag.get("metadata"));
                }
                marks.metadata_json(r.get("metadata"));
            }
            Proto::SyncFetchAll => {
                bulk = true;
                let r = self.sync[n % self.sync.len()]
                    .clone()
                    .fetch_all_flags(sync::FetchAllFlagsRequest::default())
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                marks = sync_marks(&r.flag_configuration)?;
            }
        }
        gens.judge(marks, bulk)
    }
}

pub(super) fn endpoint(port: u16) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5)))
}
