//! Stream subscribers: EventStream and SyncFlags sessions that live a random time, read every
//! message (SyncFlags payloads checked for mixed generations) and are replaced until the soak
//! stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use vexil_proto::flagd::evaluation::v1;
use vexil_proto::flagd::sync::v1 as sync;

use super::REQUEST_TIMEOUT;
use super::clients::{endpoint, status_text};
use super::generations::{Generations, Verdict, sync_marks};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamKind {
    EventStream,
    SyncFlags,
}

#[derive(Debug, Default)]
pub(super) struct StreamStats {
    pub(super) sessions: u64,
    pub(super) messages: u64,
    pub(super) changes: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) mixed: u64,
    pub(super) first_mixed: Option<String>,
}

impl StreamStats {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// A small deterministic generator (splitmix64) for subscriber lifetimes.
#[derive(Debug)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(super) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(if span == 0 { 0 } else { self.next() % (span + 1) })
    }
}

/// One subscription living until `until` (or `stop`), reading every message.
async fn subscribe_once(
    kind: StreamKind,
    port: u16,
    until: Instant,
    stop: &mut watch::Receiver<bool>,
    gens: &Generations,
    stats: &Mutex<StreamStats>,
) -> Result<(), String> {
    let channel = tokio::time::timeout(REQUEST_TIMEOUT, endpoint(port).map_err(|e| e.to_string())?.connect())
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| format!("connecting: {e}"))?;
    stats.lock().expect("stream stats").sessions += 1;
    let mut first = true;
    match kind {
        StreamKind::EventStream => {
            let mut client = v1::service_client::ServiceClient::new(channel);
            let mut stream = client
                .event_stream(v1::EventStreamRequest {})
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m.map_err(|s| status_text(&s))?,
                    _ = tokio::time::sleep_until(until) => return Ok(()),
                    _ = stop.changed() => return Ok(()),
                };
                let Some(msg) = msg else {
                    return Err("the server ended the stream".into());
                };
                let mut s = stats.lock().expect("stream stats");
                s.messages += 1;
                if first && msg.r#type != "provider_ready" {
                    return Err(format!("first event is {:?}, not provider_ready", msg.r#type));
                }
                if msg.r#type == "configuration_change" {
                    s.changes += 1;
                }
                first = false;
            }
        }
        StreamKind::SyncFlags => {
            let mut client = sync::flag_sync_service_client::FlagSyncServiceClient::new(channel);
            let mut stream = client
                .sync_flags(sync::SyncFlagsRequest::default())
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m.map_err(|s| status_text(&s))?,
                    _ = tokio::time::sleep_until(until) => return Ok(()),
                    _ = stop.changed() => return Ok(()),
                };
                let Some(msg) = msg else {
                    return Err("the server ended the stream".into());
                };
                let verdict = gens.judge(sync_marks(&msg.flag_configuration)?, true)?;
                let mut s = stats.lock().expect("stream stats");
                s.messages += 1;
                if !first {
                    s.changes += 1;
                }
                if let Verdict::Mixed(what) = verdict {
                    s.mixed += 1;
                    s.first_mixed.get_or_insert(what);
                }
                first = false;
            }
        }
    }
}

/// A subscriber slot: subscribes for a random lifetime, closes, and subscribes again until `stop`.
pub(super) async fn subscriber(
    kind: StreamKind,
    port: u16,
    life: (Duration, Duration),
    seed: u64,
    mut stop: watch::Receiver<bool>,
    gens: Arc<Generations>,
    stats: Arc<Mutex<StreamStats>>,
) {
    let mut rng = Rng(seed);
    while !*stop.borrow() {
        let until = Instant::now() + rng.between(life.0, life.1);
        if let Err(e) = subscribe_once(kind, port, until, &mut stop, &gens, &stats).await {
            stats.lock().expect("stream stats").error(e);
            // Do not spin on a server that refuses.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
