//! Soak: a long run of every evaluation protocol at a fixed share of the mix's maximum throughput,
//! while the flag file is rewritten every few milliseconds (one write in ten invalid) and stream
//! subscribers come and go. It checks that no request fails, that no bulk answer mixes two
//! configuration versions, and samples the server's resident memory every second.
//!
//! Every valid generation `N` of the churned file carries `N` in its values (the `gen-*` flags,
//! whose every variant is `"gen-N"`) and in its metadata (`generation: N` on the flag set and on
//! every `gen-*` flag), so any answer can be traced to the configuration version it came from.
//! Invalid writes carry values (`"bad-K"`) and generations (above [`INVALID_GENERATION`]) that
//! must never be served.
//!
//! - `report`: the report types and their rendering as text;
//! - `generations`: the churned flag file and the checking of answers' generations;
//! - `clients`: the per-protocol clients that send requests;
//! - `streams`: the EventStream and SyncFlags subscribers.

mod clients;
mod generations;
mod report;
mod streams;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::Pacer;
use crate::flags::catalog;
use crate::process::Server;
use clients::{Clients, Input, inputs};
use generations::{Generations, Verdict, document, invalid_text, write_atomically};
pub use report::{Calibration, Churn, Latency, ProtoReport, Rss, SoakReport, StreamReport, table};
use streams::{StreamKind, StreamStats, subscriber};

/// Generations at or above this come from invalid writes: a server must never serve them.
pub const INVALID_GENERATION: u64 = 1_000_000_000;

/// A request that takes longer than this is an error (and the loop moves on).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request protocols of the mix, sent in equal shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// flagd.evaluation.v1 ResolveBoolean (gRPC).
    V1Boolean,
    /// flagd.evaluation.v1 ResolveString (gRPC).
    V1String,
    /// flagd.evaluation.v1 ResolveAll (gRPC; a bulk answer).
    V1All,
    /// flagd.evaluation.v2 ResolveBoolean (gRPC).
    V2Boolean,
    /// flagd.evaluation.v2 ResolveString (gRPC).
    V2String,
    /// flagd.evaluation.v1 ResolveString over the Connect protocol, JSON, HTTP/1.1.
    ConnectString,
    /// OFREP single-flag evaluation.
    OfrepSingle,
    /// OFREP bulk evaluation (a bulk answer).
    OfrepBulk,
    /// flagd.sync.v1 FetchAllFlags (a bulk answer).
    SyncFetchAll,
}

impl Proto {
    pub const ALL: [Proto; 9] = [
        Proto::V1Boolean,
        Proto::V1String,
        Proto::V1All,
        Proto::V2Boolean,
        Proto::V2String,
        Proto::ConnectString,
        Proto::OfrepSingle,
        Proto::OfrepBulk,
        Proto::SyncFetchAll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Proto::V1Boolean => "v1-boolean",
            Proto::V1String => "v1-string",
            Proto::V1All => "v1-resolve-all",
            Proto::V2Boolean => "v2-boolean",
            Proto::V2String => "v2-string",
            Proto::ConnectString => "connect-json-string",
            Proto::OfrepSingle => "ofrep-single",
            Proto::OfrepBulk => "ofrep-bulk",
            Proto::SyncFetchAll => "sync-fetch-all",
        }
    }

    fn index(self) -> usize {
        Proto::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub vexil: PathBuf,
    /// Scratch directory for the flag file and the server's log.
    pub dir: PathBuf,
    /// The open-loop phase.
    pub duration: Duration,
    /// The closed-loop phase that measures the mix's maximum throughput.
    pub calibrate: Duration,
    /// Share of the maximum throughput the open-loop phase runs at.
    pub share: f64,
    /// Concurrent requests (both phases).
    pub concurrency: usize,
    /// HTTP/2 connections for gRPC (evaluation and sync ports each).
    pub connections: usize,
    /// Time between two writes of the flag file.
    pub churn: Duration,
    /// Stream subscribers alive at any time (half EventStream, half SyncFlags).
    pub subscribers: usize,
    /// A subscriber lives a random time in this range, then is replaced.
    pub subscriber_life: (Duration, Duration),
    /// Catalog flags (static, targeting, fractional) beside the generation flags.
    pub flags: usize,
    /// Context attributes per request.
    pub attrs: usize,
    /// Extra arguments for `vexil start`.
    pub vexil_args: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Recording

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
struct ProtoStats {
    requests: u64,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    mixed: u64,
    first_mixed: Option<String>,
    first: Histogram<u64>,
    last: Histogram<u64>,
    all: Histogram<u64>,
}

impl ProtoStats {
    fn new() -> ProtoStats {
        ProtoStats {
            requests: 0,
            ok: 0,
            errors: 0,
            first_error: None,
            mixed: 0,
            first_mixed: None,
            first: histogram(),
            last: histogram(),
            all: histogram(),
        }
    }
}

/// Where a request's latency goes.
#[derive(Debug, Clone, Copy)]
enum Window {
    First,
    Middle,
    Last,
}

/// Per-protocol statistics of one phase (one lock per protocol: uncontended in practice).
#[derive(Debug)]
struct Stats {
    protos: Vec<Mutex<ProtoStats>>,
    record_latency: bool,
}

impl Stats {
    fn new(record_latency: bool) -> Stats {
        Stats {
            protos: Proto::ALL.iter().map(|_| Mutex::new(ProtoStats::new())).collect(),
            record_latency,
        }
    }

    fn record(&self, proto: Proto, latency: Duration, result: Result<Verdict, String>, window: Window) {
        let mut s = self.protos[proto.index()].lock().expect("stats lock");
        s.requests += 1;
        match result {
            Ok(verdict) => {
                s.ok += 1;
                if let Verdict::Mixed(what) = verdict {
                    s.mixed += 1;
                    s.first_mixed.get_or_insert(what);
                }
            }
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
            }
        }
        if self.record_latency {
            let ns = (latency.as_nanos().min(u128::from(u64::MAX)) as u64).max(1);
            let _ = s.all.record(ns);
            let _ = match window {
                Window::First => s.first.record(ns),
                Window::Last => s.last.record(ns),
                Window::Middle => Ok(()),
            };
        }
    }

    fn into_inner(self) -> Vec<ProtoStats> {
        self.protos
            .into_iter()
            .map(|m| m.into_inner().expect("stats lock"))
            .collect()
    }
}

/// Shared by every request loop.
#[derive(Debug)]
struct Load {
    clients: Clients,
    inputs: Vec<Input>,
    gens: Arc<Generations>,
}

/// Runs `concurrency` request loops from `start` to `end`: closed loop when `rate` is `None`,
/// else open loop at `rate` requests/s in total (latency from each request's intended start).
async fn drive(
    load: Arc<Load>,
    stats: Arc<Stats>,
    concurrency: usize,
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    window: Duration,
) {
    let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1e-6)));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (load, stats) = (load.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let mut pacer = Pacer::new(start, interval, w, concurrency);
            let mut i = w;
            loop {
                let intended = pacer.next().await;
                if intended >= end {
                    break;
                }
                let proto = Proto::ALL[i % Proto::ALL.len()];
                let input = &load.inputs[(i / Proto::ALL.len()) % load.inputs.len()];
                let result = tokio::time::timeout(REQUEST_TIMEOUT, load.clients.send(proto, i, input, &load.gens))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
                let done = Instant::now();
                let since = intended.saturating_duration_since(start);
                let w = if since < window {
                    Window::First
                } else if end.saturating_duration_since(intended) <= window {
                    Window::Last
                } else {
                    Window::Middle
                };
                stats.record(proto, done - intended, result, w);
                i += concurrency;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------
// The run

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Least-squares slope of `points` (x, y), or 0 with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

/// Runs a soak; the report says whether it passed.
pub async fn run(spec: &SoakSpec) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(spec.share > 0.0, "--share must be positive");
    anyhow::ensure!(!spec.churn.is_zero(), "--churn-ms must be positive");
    anyhow::ensure!(spec.concurrency > 0, "--concurrency must be positive");
    let catalog = catalog(spec.flags);
    let path = spec.dir.join("soak-flags.json");
    let gens = Arc::new(Generations::default());
    gens.written.store(1, Ordering::Release);
    write_atomically(&path, &document(&catalog, 1, "gen-1").to_string())?;

    let log_path = spec.dir.join("vexil.log");
    let log = std::fs::File::create(&log_path)?;
    let mut server = Server::vexil_with_stderr(&spec.vexil, &path, &spec.vexil_args, log.into())?;
    server.wait_ready(Duration::from_secs(60))?;
    let pid = server.pid();
    let ready_kb = rss_kb(pid).unwrap_or(0);
    let ports = server.ports;

    let clients = Clients::connect(ports.evaluation, ports.sync, ports.ofrep, spec.connections).await?;
    let load = Arc::new(Load {
        clients,
        inputs: inputs(&catalog, spec.attrs, 1024),
        gens: gens.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // RSS every second.
    let sampler = {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(Instant, u64)> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                match rss_kb(pid) {
                    Some(kb) => samples.push((Instant::now(), kb)),
                    None => break,
                }
            }
            if let Some(kb) = rss_kb(pid) {
                samples.push((Instant::now(), kb));
            }
            samples
        })
    };

    // Churn: a write every `churn`; every tenth is invalid.
    let churner = {
        let (mut stop, gens, catalog, churn) = (stop_rx.clone(), gens.clone(), catalog.clone(), spec.churn);
        tokio::spawn(async move {
            let mut churn_stats = Churn {
                writes: 0,
                generations: 1,
                invalid_writes: 0,
                max_generation_served: 0,
                write_errors: 0,
                first_error: None,
            };
            let mut tick = tokio::time::interval(churn);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            for k in 1u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let text = if k.is_multiple_of(10) {
                    churn_stats.invalid_writes += 1;
                    invalid_text(&catalog, k)
                } else {
                    churn_stats.generations += 1;
                    let n = churn_stats.generations;
                    // Announced before it is written: a served generation is never ahead of it.
                    gens.written.store(n, Ordering::Release);
                    document(&catalog, n, &format!("gen-{n}")).to_string()
                };
                churn_stats.writes += 1;
                if let Err(e) = write_atomically(&path, &text) {
                    churn_stats.write_errors += 1;
                    churn_stats.first_error.get_or_insert(e.to_string());
                }
            }
            churn_stats
        })
    };

    // Stream subscribers.
    let event_stats = Arc::new(Mutex::new(StreamStats::default()));
    let sync_stats = Arc::new(Mutex::new(StreamStats::default()));
    let mut subscribers = Vec::new();
    for s in 0..spec.subscribers {
        let (kind, port, stats) = if s % 2 == 0 {
            (StreamKind::EventStream, ports.evaluation, event_stats.clone())
        } else {
            (StreamKind::SyncFlags, ports.sync, sync_stats.clone())
        };
        subscribers.push(tokio::spawn(subscriber(
            kind,
            port,
            spec.subscriber_life,
            0x5eed_0000 + s as u64,
            stop_rx.clone(),
            gens.clone(),
            stats,
        )));
    }

    // Phase 1: the mix's maximum throughput, closed loop.
    let calibration_stats = Arc::new(Stats::new(false));
    let calibration_start = Instant::now();
    drive(
        load.clone(),
        calibration_stats.clone(),
        spec.concurrency,
        calibration_start,
        calibration_start + spec.calibrate,
        None,
        Duration::ZERO,
    )
    .await;
    let calibration_elapsed = calibration_start.elapsed();
    let calibration_protos = Arc::try_unwrap(calibration_stats)
        .map_err(|_| anyhow::anyhow!("calibration still running"))?
        .into_inner();
    let calibration_requests: u64 = calibration_protos.iter().map(|p| p.requests).sum();
    let calibration_ok: u64 = calibration_protos.iter().map(|p| p.ok).sum();
    let max_throughput = calibration_ok as f64 / spec.calibrate.as_secs_f64().max(1e-9);
    let target_rate = (max_throughput * spec.share).max(1.0);

    // Phase 2: open loop at a share of it.
    let window = Duration::from_secs(60)
        .min(spec.duration / 10)
        .max(Duration::from_millis(1));
    let soak_stats = Arc::new(Stats::new(true));
    let soak_start = Instant::now();
    let soak_end = soak_start + spec.duration;
    drive(
        load.clone(),
        soak_stats.clone(),
        spec.concurrency,
        soak_start,
        soak_end,
        Some(target_rate),
        window,
    )
    .await;
    let soak_elapsed = soak_start.elapsed().min(spec.duration).max(Duration::from_millis(1));

    let _ = stop_tx.send(true);
    let mut churn = churner.await?;
    for s in subscribers {
        let _ = s.await;
    }
    let samples = sampler.await?;
    let server_error = server
        .exit_status()
        .map(|s| format!("the server exited during the soak: {s}"));
    drop(load);
    drop(server);

    // Report.
    let protos = Arc::try_unwrap(soak_stats)
        .map_err(|_| anyhow::anyhow!("soak still running"))?
        .into_inner();
    churn.max_generation_served = gens.served.load(Ordering::Relaxed);
    let mut overall = (histogram(), histogram(), histogram());
    let mut protocols = Vec::new();
    let mut first_mixed = None;
    for (proto, s) in Proto::ALL.iter().zip(&protos) {
        let _ = overall.0.add(&s.first);
        let _ = overall.1.add(&s.last);
        let _ = overall.2.add(&s.all);
        if first_mixed.is_none() {
            first_mixed.clone_from(&s.first_mixed);
        }
        protocols.push(ProtoReport {
            protocol: *proto,
            name: proto.name(),
            requests: s.requests,
            ok: s.ok,
            errors: s.errors,
            first_error: s.first_error.clone(),
            mixed: s.mixed,
            first: Latency::of(&s.first),
            last: Latency::of(&s.last),
            all: Latency::of(&s.all),
        });
    }
    let calibration = Calibration {
        seconds: calibration_elapsed.as_secs_f64(),
        requests: calibration_requests,
        errors: calibration_protos.iter().map(|p| p.errors).sum(),
        first_error: Proto::ALL
            .iter()
            .zip(&calibration_protos)
            .find_map(|(p, s)| s.first_error.as_ref().map(|e| format!("{}: {e}", p.name()))),
        mixed: calibration_protos.iter().map(|p| p.mixed).sum(),
        max_throughput,
    };
    if first_mixed.is_none() {
        first_mixed = calibration_protos.iter().find_map(|p| p.first_mixed.clone());
    }
    let streams: Vec<StreamReport> = [("event-stream", &event_stats), ("sync-flags", &sync_stats)]
        .into_iter()
        .map(|(name, stats)| {
            let s = stats.lock().expect("stream stats");
            StreamReport {
                stream: name,
                sessions: s.sessions,
                messages: s.messages,
                changes: s.changes,
                errors: s.errors,
                first_error: s.first_error.clone(),
                mixed: s.mixed,
            }
        })
        .collect();
    for (name, stats) in [("event-stream", &event_stats), ("sync-flags", &sync_stats)] {
        let s = stats.lock().expect("stream stats");
        if first_mixed.is_none() {
            first_mixed = s.first_mixed.clone().map(|m| format!("{name}: {m}"));
        }
    }

    let rel: Vec<(f64, u64)> = samples
        .iter()
        .map(|(at, kb)| {
            let t = if *at >= soak_start {
                at.duration_since(soak_start).as_secs_f64()
            } else {
                -soak_start.duration_since(*at).as_secs_f64()
            };
            (t, *kb)
        })
        .collect();
    let during: Vec<&(f64, u64)> = rel.iter().filter(|(t, _)| *t >= 0.0).collect();
    let half = spec.duration.as_secs_f64() / 2.0;
    let late: Vec<(f64, f64)> = during
        .iter()
        .filter(|(t, _)| *t >= half)
        .map(|(t, kb)| (*t / 60.0, *kb as f64))
        .collect();
    let rss = Rss {
        ready_kb,
        start_kb: during.first().map_or(0, |s| s.1),
        end_kb: during.last().map_or(0, |s| s.1),
        peak_kb: rel.iter().map(|s| s.1).max().unwrap_or(0),
        slope_kb_per_min: slope(&late),
        samples: rel,
    };

    let requests: u64 = protocols.iter().map(|p| p.requests).sum();
    let errors = protocols.iter().map(|p| p.errors).sum::<u64>()
        + calibration.errors
        + streams.iter().map(|s| s.errors).sum::<u64>()
        + churn.write_errors
        + u64::from(server_error.is_some());
    let mixed_answers = protocols.iter().map(|p| p.mixed).sum::<u64>()
        + calibration.mixed
        + streams.iter().map(|s| s.mixed).sum::<u64>();
    Ok(SoakReport {
        duration_s: spec.duration.as_secs_f64(),
        share: spec.share,
        concurrency: spec.concurrency,
        connections: spec.connections,
        flags: spec.flags,
        attributes: spec.attrs,
        churn_ms: spec.churn.as_secs_f64() * 1000.0,
        subscribers: spec.subscribers,
        calibration,
        target_rate,
        achieved_rate: requests as f64 / soak_elapsed.as_secs_f64(),
        window_s: window.as_secs_f64(),
        requests,
        errors,
        mixed_answers,
        first_mixed,
        server_error,
        protocols,
        overall_first: Latency::of(&overall.0),
        overall_last: Latency::of(&overall.1),
        overall_all: Latency::of(&overall.2),
        streams,
        churn,
        rss,
        passed: errors == 0 && mixed_answers == 0,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    use super::generations::{Marks, generation_keys, sync_marks};
    use super::streams::Rng;
    use super::*;

    #[test]
    fn least_squares_slope() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), 3.0 * f64::from(i) + 7.0)).collect();
        assert!((slope(&points) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 6.0)]), 0.0);
    }

    #[test]
    fn generations_are_read_from_sync_payloads() {
        let catalog = catalog(6);
        let gens = Generations::default();
        gens.written.store(7, Ordering::Release);
        // What vexil sends is the document's flags with their metadata: the written one serves.
        let doc = document(&catalog, 7, "gen-7");
        let marks = sync_marks(&doc.to_string()).unwrap();
        assert_eq!(marks.gens, BTreeSet::from([7]));
        assert!(matches!(gens.judge(marks, true), Ok(Verdict::Ok)));
        assert_eq!(gens.served.load(Ordering::Relaxed), 7);

        // One flag from another version: mixed.
        let mut mixed = document(&catalog, 7, "gen-7");
        mixed["flags"]["gen-static"]["variants"]["b"] = json!("gen-6");
        let verdict = gens.judge(sync_marks(&mixed.to_string()).unwrap(), true).unwrap();
        assert!(matches!(verdict, Verdict::Mixed(_)), "{verdict:?}");

        // A generation not written yet, or an invalid write's values: errors.
        let ahead = document(&catalog, 8, "gen-8");
        assert!(gens.judge(sync_marks(&ahead.to_string()).unwrap(), true).is_err());
        let bad = document(&catalog, INVALID_GENERATION + 10, "bad-10");
        assert!(gens.judge(sync_marks(&bad.to_string()).unwrap(), true).is_err());
        // A bulk answer must carry a generation; a single one need not.
        assert!(gens.judge(Marks::default(), true).is_err());
        assert!(matches!(gens.judge(Marks::default(), false), Ok(Verdict::Ok)));
    }

    #[test]
    fn invalid_writes_do_not_parse_as_flag_documents() {
        let catalog = catalog(6);
        let truncated = invalid_text(&catalog, 10);
        assert!(serde_json::from_str::<Value>(&truncated).is_err());
        let broken: Value = serde_json::from_str(&invalid_text(&catalog, 20)).unwrap();
        assert_eq!(broken["flags"]["gen-broken"], json!(42));
        assert_eq!(broken["flags"]["gen-static"]["variants"]["a"], json!("bad-20"));
    }

    #[test]
    fn generation_flags_rotate_one_key() {
        assert!(generation_keys(1).contains(&"gen-rotating-1".to_owned()));
        assert!(!generation_keys(2).contains(&"gen-rotating-1".to_owned()));
        let doc = document(&catalog(3), 5, "gen-5");
        assert_eq!(doc["metadata"]["generation"], json!(5));
        assert_eq!(doc["flags"].as_object().unwrap().len(), 3 + 4);
    }

    #[test]
    fn subscriber_lifetimes_stay_in_range() {
        let mut rng = Rng(1);
        for _ in 0..1000 {
            let d = rng.between(Duration::from_secs(1), Duration::from_secs(10));
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(10));
        }
    }
}
