//! Change fan-out: N subscribers on EventStream or SyncFlags; the flag file is edited K times and
//! the time from each edit to each subscriber's notification is measured.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::sync::mpsc;
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

use crate::process::Server;

/// Which stream subscribers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// flagd.evaluation.v1 EventStream (RPC providers).
    EventStream,
    /// flagd.sync.v1 SyncFlags (in-process providers).
    Sync,
}

/// Fan-out figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanoutResult {
    pub protocol: Protocol,
    pub subscribers: usize,
    pub changes: usize,
    pub flags: usize,
    /// Edit → a subscriber notified, over every (subscriber, change), in milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Edit → the last subscriber notified, over the changes, in milliseconds.
    pub last_p50_ms: f64,
    pub last_p99_ms: f64,
    /// Notifications that did not arrive within 10 s.
    pub missed: usize,
}

const PER_CONNECTION: usize = 100;

/// Writes `text` to `path` by a temporary file and a rename (as editors and ConfigMaps do).
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Runs the fan-out measurement against a `vexil` started here.
pub async fn run(
    vexil: &Path,
    dir: &Path,
    flags: usize,
    subscribers: usize,
    changes: usize,
    protocol: Protocol,
) -> anyhow::Result<FanoutResult> {
    let path = dir.join("fanout-flags.json");
    let mut doc = crate::flags::document(&crate::flags::catalog(flags));
    let toggle = |doc: &mut Value, k: usize| {
        doc["flags"]["fanout-toggle"] = serde_json::json!({
            "state": "ENABLED", "variants": {"a": "a", "b": "b"}, "defaultVariant": if k.is_multiple_of(2) { "a" } else { "b" }
        });
    };
    toggle(&mut doc, 0);
    write_atomically(&path, &doc.to_string())?;
    let mut server = Server::vexil(vexil, &path, &[])?;
    server.wait_ready(Duration::from_secs(60))?;

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let connections = subscribers.div_ceil(PER_CONNECTION).max(1);
    let mut channels = Vec::new();
    for _ in 0..connections {
        let endpoint = match protocol {
            Protocol::EventStream => format!("http://127.0.0.1:{}", server.ports.evaluation),
            Protocol::Sync => format!("http://127.0.0.1:{}", server.ports.sync),
        };
        channels.push(tonic::transport::Endpoint::from_shared(endpoint)?.connect().await?);
    }
    let mut tasks = Vec::new();
    for s in 0..subscribers {
        let channel = channels[s % connections].clone();
        let (tx, ready_tx) = (tx.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            match protocol {
                Protocol::EventStream => {
                    let mut client = v1::service_client::ServiceClient::new(channel);
                    let Ok(stream) = client.event_stream(v1::EventStreamRequest {}).await else {
                        return;
                    };
                    let mut stream = stream.into_inner();
                    while let Ok(Some(msg)) = stream.message().await {
                        if first {
                            first = false;
                            let _ = ready_tx.send(());
                        } else if msg.r#type == "configuration_change" {
                            let _ = tx.send((s, Instant::now()));
                        }
                    }
                }
                Protocol::Sync => {
                    let mut client = sync::flag_sync_service_client::FlagSyncServiceClient::new(channel);
                    let Ok(stream) = client.sync_flags(sync::SyncFlagsRequest::default()).await else {
                        return;
                    };
                    let mut stream = stream.into_inner();
                    while let Ok(Some(_)) = stream.message().await {
                        if first {
                            first = false;
                            let _ = ready_tx.send(());
                        } else {
                            let _ = tx.send((s, Instant::now()));
                        }
                    }
                }
            }
        }));
    }
    drop((tx, ready_tx));
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..subscribers {
        tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), ready_rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("subscribers did not all connect within 60 s"))?;
    }

    let mut every = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut last = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut missed = 0;
    for k in 1..=changes {
        tokio::time::sleep(Duration::from_millis(100)).await;
        toggle(&mut doc, k);
        let text = doc.to_string();
        let edited = Instant::now();
        write_atomically(&path, &text)?;
        let mut seen = 0;
        let mut latest = edited;
        let wait_until = edited + Duration::from_secs(10);
        while seen < subscribers {
            match tokio::time::timeout(wait_until.saturating_duration_since(Instant::now()), rx.recv()).await {
                Ok(Some((_, at))) => {
                    seen += 1;
                    latest = latest.max(at);
                    every.record((at - edited).as_nanos() as u64)?;
                }
                _ => break,
            }
        }
        missed += subscribers - seen;
        last.record((latest - edited).as_nanos() as u64)?;
    }
    for t in tasks {
        t.abort();
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    Ok(FanoutResult {
        protocol,
        subscribers,
        changes,
        flags,
        p50_ms: ms(&every, 0.5),
        p99_ms: ms(&every, 0.99),
        last_p50_ms: ms(&last, 0.5),
        last_p99_ms: ms(&last, 0.99),
        missed,
    })
}
