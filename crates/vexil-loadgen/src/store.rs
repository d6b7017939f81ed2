//! The managed store's figures (`vexil-loadgen store`): how long an admin write takes to be served
//! by the process that took it, and how many writes per second the store takes.
//!
//! - **Propagation:** a flag is written through `vexil.v1.AdminService.PutFlag`, alternating its
//!   default variant, and `EvaluationService.Evaluate` is asked in a loop until it answers the new
//!   variant: write → served, one write at a time.
//! - **Write throughput:** `writers` clients each write their own flags as fast as the store lets
//!   them, for `duration` seconds: writes per second and the latency of one write (each is a
//!   transaction with a new config version, the history, an audit entry and an outbox row).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use vexil_proto::JsonStruct;
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::admin_service_client::AdminServiceClient;
use vexil_proto::vexil::v1::evaluation_service_client::EvaluationServiceClient;

use crate::process::{Ports, Server};

pub(crate) const ENVIRONMENT: &str = "bench";
pub(crate) const FLAG_SET: &str = "web";

/// Latency percentiles of one measurement, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

/// What `vexil-loadgen store` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    pub backend: String,
    /// Admin write → the new value served by the same process.
    pub propagation: Percentiles,
    /// One PutFlag call, under `writers` concurrent writers.
    pub write_latency: Percentiles,
    pub writers: usize,
    pub writes_per_second: f64,
}

fn definition(variant: &str) -> Option<JsonStruct> {
    let flag = serde_json::json!({"state": "ENABLED", "variants": {"a": "a", "b": "b"}, "defaultVariant": variant});
    match flag {
        serde_json::Value::Object(map) => Some(JsonStruct::from(map)),
        _ => None,
    }
}

pub(crate) fn put(key: &str, variant: &str) -> pb::PutFlagRequest {
    pb::PutFlagRequest {
        environment: ENVIRONMENT.into(),
        flag_set: FLAG_SET.into(),
        key: key.into(),
        definition: definition(variant),
        ..Default::default()
    }
}

/// Starts `vexil start --database-url <url>` on free ports (the store only, no file).
pub fn server(binary: &Path, database_url: &str) -> anyhow::Result<Server> {
    let ports = Ports::free()?;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("start")
        .args(["--database-url", database_url, "--default-environment", ENVIRONMENT])
        .args(["-p", &ports.evaluation.to_string(), "-m", &ports.management.to_string()])
        .args(["-g", &ports.sync.to_string(), "-r", &ports.ofrep.to_string()])
        .args(["--bind", "127.0.0.1"])
        .env(
            "VEXIL_LOG",
            std::env::var("VEXIL_LOADGEN_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let mut server = Server::spawn_command(cmd, ports).context("starting vexil with a store")?;
    server.wait_ready(Duration::from_secs(60))?;
    Ok(server)
}

/// Creates environment `bench` (unless it exists) and its flag set `web`.
pub(crate) async fn create_flag_set(admin: &mut AdminServiceClient<tonic::transport::Channel>) -> anyhow::Result<()> {
    match admin
        .create_environment(pb::CreateEnvironmentRequest {
            key: ENVIRONMENT.into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::AlreadyExists => {}
        Err(status) => return Err(status.into()),
    }
    admin
        .put_flag_set(pb::PutFlagSetRequest {
            environment: ENVIRONMENT.into(),
            flag_set: FLAG_SET.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Runs both measurements against `server`.
pub async fn measure(
    server: &Server,
    backend: &str,
    changes: usize,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<StoreReport> {
    let url = format!("http://127.0.0.1:{}", server.ports.evaluation);
    let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut evaluation = EvaluationServiceClient::new(channel.clone());
    create_flag_set(&mut admin).await?;

    let mut propagation = Histogram::<u64>::new(3)?;
    for i in 0..changes + 5 {
        let variant = if i.is_multiple_of(2) { "a" } else { "b" };
        let started = Instant::now();
        admin.put_flag(put("propagated", variant)).await?;
        loop {
            let answer = evaluation
                .evaluate(pb::EvaluateRequest {
                    environment: ENVIRONMENT.into(),
                    flag_set: FLAG_SET.into(),
                    flag_key: "propagated".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if answer.variant == variant {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("write {i} was not served within 30 s");
            }
        }
        // The first few warm the connection and the statements up.
        if i >= 5 {
            propagation.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        }
    }

    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let mut admin = AdminServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3)?;
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let variant = if n.is_multiple_of(2) { "a" } else { "b" };
                    admin.put_flag(put(&format!("w{w}-{}", n % 50), variant)).await?;
                    latencies.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
                    n += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let started = Instant::now();
    let mut write_latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        write_latency.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    Ok(StoreReport {
        backend: backend.to_owned(),
        propagation: Percentiles::of(&propagation),
        writes_per_second: write_latency.len() as f64 / elapsed,
        write_latency: Percentiles::of(&write_latency),
        writers,
    })
}
