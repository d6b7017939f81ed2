//! What slow and idle stream subscribers cost the server.
//!
//! - `stalled`: N SyncFlags subscribers that read only what HTTP/2's initial window allows and
//!   never give credit back, while the flag file changes every `churn` — the server's RSS over
//!   time, against a server with no subscribers.
//! - `idle`: N streams (EventStream or SyncFlags) opened over connections of 100 streams each and
//!   left open with nothing changing: RSS per idle stream.
//!
//! Raw HTTP/2 (the `h2` crate), so the measurement controls every window update.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

use crate::fanout::{Protocol, write_atomically};
use crate::process::Server;
use crate::wire::{grpc_frame, h2_connect};

/// Figures of a stalled-subscriber run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StalledResult {
    pub subscribers: usize,
    pub flags: usize,
    pub payload_bytes: usize,
    pub changes: usize,
    /// RSS once ready, before any subscriber, in MiB.
    pub rss_start_mib: f64,
    /// RSS with the subscribers connected, before the first change.
    pub rss_connected_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
    /// (end − connected) / subscribers, in KiB: what the churn made each stalled subscriber cost.
    pub per_subscriber_kib: f64,
}

/// Figures of an idle-streams run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleResult {
    pub protocol: Protocol,
    pub streams: usize,
    pub connections: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// (after − before) / streams, in bytes.
    pub bytes_per_stream: f64,
}

const STREAMS_PER_CONNECTION: usize = 100;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rss(server: &Server) -> anyhow::Result<u64> {
    server
        .rss_bytes()
        .ok_or_else(|| anyhow::anyhow!("cannot read the server's RSS"))
}

/// Opens a server stream at `path` with `request` and returns its body after the first bytes.
async fn open_stream(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    request: Bytes,
    give_credit_back: bool,
) -> anyhow::Result<h2::RecvStream> {
    let head = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut ready = client.clone().ready().await?;
    let (response, mut send) = ready.send_request(head, false)?;
    send.send_data(request, true)?;
    let response = tokio::time::timeout(Duration::from_secs(30), response).await??;
    anyhow::ensure!(
        response.headers().get("grpc-status").is_none(),
        "refused: {:?}",
        response.headers()
    );
    let mut body = response.into_body();
    // Idle streams read their whole first message and give the credit back; stalled ones read
    // one chunk and give nothing back.
    let mut received = 0usize;
    let mut wanted = 5usize;
    let mut head = Vec::with_capacity(5);
    while received < wanted {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.data())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the stream ended at once"))??;
        received += chunk.len();
        if head.len() < 5 {
            head.extend(chunk.iter().take(5 - head.len()));
            if head.len() == 5 {
                wanted = 5 + u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            }
        }
        if !give_credit_back {
            break;
        }
        body.flow_control().release_capacity(chunk.len())?;
    }
    Ok(body)
}

/// Runs the stalled-subscriber measurement.
pub async fn stalled(
    vexil: &Path,
    dir: &Path,
    subscribers: usize,
    flags: usize,
    churn: Duration,
    duration: Duration,
) -> anyhow::Result<StalledResult> {
    let path = dir.join("stalled-flags.json");
    let mut doc = crate::flags::document(&crate::flags::catalog(flags));
    write_atomically(&path, &doc.to_string())?;
    let mut server = Server::vexil(vexil, &path, &[])?;
    server.wait_ready(Duration::from_secs(60))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = rss(&server)?;

    let mut sync_client = sync::flag_sync_service_client::FlagSyncServiceClient::connect(format!(
        "http://127.0.0.1:{}",
        server.ports.sync
    ))
    .await?;
    let payload_bytes = sync_client
        .fetch_all_flags(sync::FetchAllFlagsRequest::default())
        .await?
        .into_inner()
        .flag_configuration
        .len();

    // Each subscriber on its own connection: the connection window is withheld too.
    let request = grpc_frame(&sync::SyncFlagsRequest::default());
    let mut held = Vec::new();
    for _ in 0..subscribers {
        let mut client = h2_connect(server.ports.sync).await?;
        let body = open_stream(
            &mut client,
            "/flagd.sync.v1.FlagSyncService/SyncFlags",
            request.clone(),
            false,
        )
        .await?;
        held.push((client, body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss(&server)?;

    let started = Instant::now();
    let mut changes = 0;
    let mut peak = rss_connected;
    while started.elapsed() < duration {
        changes += 1;
        doc["flags"]["string-00003"]["variants"]["control"] = Value::String(format!("Welcome! {changes}"));
        write_atomically(&path, &doc.to_string())?;
        tokio::time::sleep(churn).await;
        peak = peak.max(rss(&server)?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_end = rss(&server)?;
    peak = peak.max(rss_end);
    drop(held);
    Ok(StalledResult {
        subscribers,
        flags,
        payload_bytes,
        changes,
        rss_start_mib: mib(rss_start),
        rss_connected_mib: mib(rss_connected),
        rss_peak_mib: mib(peak),
        rss_end_mib: mib(rss_end),
        per_subscriber_kib: (rss_end as f64 - rss_connected as f64) / 1024.0 / subscribers.max(1) as f64,
    })
}

/// Runs the idle-streams measurement.
pub async fn idle(vexil: &Path, dir: &Path, streams: usize, protocol: Protocol) -> anyhow::Result<IdleResult> {
    let path = dir.join("idle-flags.json");
    write_atomically(&path, &crate::flags::document(&crate::flags::catalog(10)).to_string())?;
    let limit = (streams + 100).to_string();
    let extra = [
        "--max-streams".to_owned(),
        limit.clone(),
        "--max-connections".to_owned(),
        limit,
    ];
    let mut server = Server::vexil(vexil, &path, &extra)?;
    server.wait_ready(Duration::from_secs(60))?;
    let (port, route, request) = match protocol {
        Protocol::EventStream => (
            server.ports.evaluation,
            "/flagd.evaluation.v1.Service/EventStream",
            grpc_frame(&v1::EventStreamRequest::default()),
        ),
        Protocol::Sync => (
            server.ports.sync,
            "/flagd.sync.v1.FlagSyncService/SyncFlags",
            grpc_frame(&sync::SyncFlagsRequest::default()),
        ),
    };
    // Warm the connection path once, then measure.
    {
        let mut client = h2_connect(port).await?;
        drop(open_stream(&mut client, route, request.clone(), true).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(&server)?;
    let connections = streams.div_ceil(STREAMS_PER_CONNECTION);
    let mut held = Vec::with_capacity(streams);
    let mut clients = Vec::with_capacity(connections);
    for c in 0..connections {
        let client = h2_connect(port).await?;
        let n = STREAMS_PER_CONNECTION.min(streams - c * STREAMS_PER_CONNECTION);
        let opened = futures::future::try_join_all((0..n).map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            async move { open_stream(&mut client, route, request, true).await }
        }))
        .await?;
        held.extend(opened);
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(&server)?;
    drop(held);
    Ok(IdleResult {
        protocol,
        streams,
        connections,
        rss_before_mib: mib(before),
        rss_after_mib: mib(after),
        bytes_per_stream: (after as f64 - before as f64) / streams.max(1) as f64,
    })
}
