//! Replicas sharing one PostgreSQL database and one Redis (`vexil-loadgen propagation` and
//! `vexil-loadgen replica-startup`): how fast an admin write reaches the other replicas and their
//! watchers, and how fast a new replica is ready with a large environment.
//!
//! Both start throwaway PostgreSQL and Redis servers (`vexil-testkit`, from the installed
//! binaries) unless `--database-url` / `--redis-url` name servers, and `vexil serve` replicas on
//! free ports (`--database-url`, `--redis-url`, `--store-poll-interval-ms`; 1000 ms by default, so
//! the figures come from the change bus and not from the version check that backs it up).
//!
//! - **Propagation:** `replicas` replicas; environment `bench`, flag set `web`, one string flag
//!   written through replica A's `vexil.v1.AdminService`. `watchers` `vexil.v1.ConfigService.Watch`
//!   streams (`since_version: 0`) are spread round-robin over the replicas, at most
//!   `streams_per_connection` per HTTP/2 connection (hyper serves 200 by default); each reads its
//!   snapshot first. Then, one write at a time, the flag is written through A (its value
//!   alternating) at T0, taken before the call, and while the write is in flight
//!   `EvaluationService.Evaluate` is asked on replica B in a loop: **write → served on B** is T0 to
//!   the first answer with the new value. Every watcher task timestamps each `ConfigEvent` as it
//!   arrives and sends (version, instant) to the collector over a channel, so collecting does not
//!   serialize them: **write → each watcher** is T0 to the receipt of the write's `changes` event by
//!   one watcher (all `watchers` samples of every write in one histogram), **write → all watchers**
//!   T0 to the last receipt (one sample per write). The next write waits until every watcher has
//!   the version and B serves it, or `timeout` has passed (counted, never waited on further). The
//!   first writes warm connections and statements up and are not recorded (their misses are
//!   counted).
//! - **Replica startup:** `flags` flags (the [`crate::flags`] catalog: static, targeting and
//!   fractional) imported into `bench/web` with `vexil import`; one replica started with Redis,
//!   until its `vexil_config_cache_writes_total` says it has written the environment's snapshot to
//!   Redis. Then, `runs` times each, a new replica is spawned and timed to `/readyz` answering 200
//!   on its management port: with Redis holding the snapshot (checked: its
//!   `vexil_store_loads_total{from="cache"}` is 1), from the database alone (no `--redis-url`;
//!   checked: `{from="database"}` is at least 1), and with Redis but a key prefix nothing is
//!   cached under (the cold cache: read from the database too).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::admin_service_client::AdminServiceClient;
use vexil_proto::vexil::v1::config_service_client::ConfigServiceClient;
use vexil_proto::vexil::v1::evaluation_service_client::EvaluationServiceClient;

use crate::process::{Ports, Server, http_get};
use crate::store::{ENVIRONMENT, FLAG_SET, Percentiles, create_flag_set, put};

/// The flag the propagation measurement writes.
const FLAG: &str = "propagated";
/// Unrecorded writes before the measured ones.
const WARMUP: usize = 5;

/// The PostgreSQL and Redis the replicas share: the URLs given, else throwaway servers (stopped
/// and removed when this is dropped).
#[derive(Debug)]
pub struct Backing {
    pub database_url: String,
    pub redis_url: String,
    _postgres: Option<vexil_testkit::PostgresServer>,
    _redis: Option<vexil_testkit::RedisServer>,
}

impl Backing {
    /// Starts what is not given (blocks while the servers start, a few seconds).
    pub fn start(database_url: Option<String>, redis_url: Option<String>) -> Backing {
        let postgres = database_url
            .is_none()
            .then(vexil_testkit::PostgresServer::start_dedicated);
        let redis = redis_url.is_none().then(vexil_testkit::redis);
        Backing {
            database_url: database_url
                .or_else(|| postgres.as_ref().map(|p| p.url("postgres")))
                .unwrap_or_default(),
            redis_url: redis_url
                .or_else(|| redis.as_ref().map(|r| r.url().to_owned()))
                .unwrap_or_default(),
            _postgres: postgres,
            _redis: redis,
        }
    }
}

/// How replicas are started.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub binary: PathBuf,
    pub database_url: String,
    pub store_poll_interval_ms: u64,
    /// `--max-streams` (the server's default is 20,000).
    pub max_streams: u64,
    /// Extra arguments for `vexil serve`.
    pub extra: Vec<String>,
}

impl ReplicaSpec {
    /// Spawns `vexil serve` on free ports, with Redis (and its key prefix) if given; does not wait
    /// for it to be ready.
    pub fn spawn(&self, redis: Option<(&str, &str)>) -> anyhow::Result<Server> {
        let ports = Ports::free()?;
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.arg("serve")
            .args([
                "--database-url",
                &self.database_url,
                "--default-environment",
                ENVIRONMENT,
            ])
            .args(["--store-poll-interval-ms", &self.store_poll_interval_ms.to_string()])
            .args(["--max-streams", &self.max_streams.to_string()])
            .args(["-p", &ports.evaluation.to_string(), "-m", &ports.management.to_string()])
            .args(["-g", &ports.sync.to_string(), "-r", &ports.ofrep.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(&self.extra)
            .env(
                "VEXIL_LOG",
                std::env::var("VEXIL_LOADGEN_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some((url, prefix)) = redis {
            cmd.args(["--redis-url", url, "--redis-key-prefix", prefix]);
        }
        Server::spawn_command(cmd, ports).context("starting a vexil replica")
    }
}

/// What `vexil-loadgen propagation` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PropagationReport {
    pub replicas: usize,
    pub watchers: usize,
    /// Measured writes (after the warm-up ones).
    pub changes: usize,
    pub warmup_changes: usize,
    pub store_poll_interval_ms: u64,
    /// HTTP/2 connections the watchers share, over all replicas.
    pub watch_connections: usize,
    pub timeout_ms: u64,
    /// PutFlag on replica A (T0 to its answer).
    pub write: Percentiles,
    /// T0 → the new value served by `Evaluate` on replica B.
    pub write_to_served_on_b: Percentiles,
    /// T0 → one watcher received the version's `changes` event: every (watcher, write).
    pub write_to_each_watcher: Percentiles,
    /// As `write_to_each_watcher`, per replica the watchers are connected to (A first, then B, …).
    pub write_to_each_watcher_by_replica: Vec<Percentiles>,
    /// T0 → the last watcher received it: one sample per write that every watcher received.
    pub write_to_all_watchers: Percentiles,
    /// (watcher, write) pairs not received within the timeout, warm-up writes included.
    pub misses: u64,
    /// Writes some watcher did not receive within the timeout.
    pub incomplete_changes: u64,
    /// Writes replica B did not serve within the timeout.
    pub served_timeouts: u64,
    /// Events received after their write's timeout.
    pub late_events: u64,
    /// Events of a version a watcher had already received.
    pub duplicate_events: u64,
    /// Events of a version no write of this run published.
    pub unexpected_events: u64,
    /// Snapshot events after a watcher's first (sent to a watcher that fell too far behind).
    pub resnapshots: u64,
    /// Watch streams that ended (with the first error, if any).
    pub watcher_disconnects: u64,
    pub first_disconnect: Option<String>,
    /// Each replica's resident memory after the warm-up writes and after the last write, in MiB:
    /// what a replica keeps per change (its kept history is bounded) shows as growth.
    pub rss_after_warmup_mib: Vec<f64>,
    pub rss_end_mib: Vec<f64>,
}

/// What a watcher task tells the collector.
#[derive(Debug)]
enum Note {
    /// The first event (the snapshot) arrived, at this version.
    Ready { id: usize, version: i64 },
    /// A later event.
    Event {
        id: usize,
        version: i64,
        at: Instant,
        snapshot: bool,
    },
    /// The stream ended (or could not be opened).
    Ended { id: usize, error: Option<String> },
}

async fn connect(port: u16) -> anyhow::Result<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    Ok(Endpoint::from_shared(url)?.connect().await?)
}

/// One watcher: `ConfigService.Watch` from the start, every event timestamped on receipt.
async fn watcher(id: usize, channel: Channel, tx: mpsc::UnboundedSender<Note>) {
    let mut client = ConfigServiceClient::new(channel);
    let request = pb::WatchRequest {
        environment: ENVIRONMENT.into(),
        flag_set: FLAG_SET.into(),
        since_version: 0,
    };
    let mut stream = match client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = tx.send(Note::Ended {
                id,
                error: Some(status.to_string()),
            });
            return;
        }
    };
    let mut first = true;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let at = Instant::now();
                let snapshot = matches!(event.event, Some(pb::config_event::Event::Snapshot(_)));
                let note = if first && snapshot {
                    Note::Ready {
                        id,
                        version: event.config_version,
                    }
                } else {
                    Note::Event {
                        id,
                        version: event.config_version,
                        at,
                        snapshot,
                    }
                };
                first = false;
                if tx.send(note).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Note::Ended { id, error: None });
                return;
            }
            Err(status) => {
                let _ = tx.send(Note::Ended {
                    id,
                    error: Some(status.to_string()),
                });
                return;
            }
        }
    }
}

/// The collector's view of the watchers.
#[derive(Debug)]
struct Watchers {
    /// The last version each watcher received.
    last: Vec<i64>,
    alive: Vec<bool>,
    alive_count: usize,
    late: u64,
    duplicates: u64,
    unexpected: u64,
    resnapshots: u64,
    disconnects: u64,
    first_disconnect: Option<String>,
}

impl Watchers {
    fn ended(&mut self, id: usize, error: Option<String>) {
        if self.alive[id] {
            self.alive[id] = false;
            self.alive_count -= 1;
            self.disconnects += 1;
            if self.first_disconnect.is_none() {
                self.first_disconnect = Some(error.unwrap_or_else(|| "the server ended the stream".into()));
            }
        }
    }
}

/// Histograms of one receipt round.
#[derive(Debug)]
struct Receipts<'a> {
    each: &'a mut Histogram<u64>,
    by_replica: &'a mut [Histogram<u64>],
    record: bool,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Reads watcher notes until every live watcher has `version` or `deadline` passes; returns how
/// many received it and the instant of the last receipt.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Note>,
    w: &mut Watchers,
    version: i64,
    t0: Instant,
    deadline: Instant,
    receipts: Receipts<'_>,
) -> anyhow::Result<(usize, Instant)> {
    let replicas = receipts.by_replica.len();
    let (mut seen, mut latest) = (0usize, t0);
    while seen < w.alive_count {
        let note = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(note)) => note,
            Ok(None) | Err(_) => break,
        };
        match note {
            Note::Event {
                id,
                version: v,
                at,
                snapshot,
            } => {
                if snapshot {
                    w.resnapshots += 1;
                }
                if v == version {
                    if w.last[id] >= version {
                        w.duplicates += 1;
                        continue;
                    }
                    w.last[id] = v;
                    seen += 1;
                    latest = latest.max(at);
                    if receipts.record {
                        let us = micros(at.saturating_duration_since(t0));
                        receipts.each.record(us)?;
                        receipts.by_replica[id % replicas].record(us)?;
                    }
                } else if v < version {
                    if v <= w.last[id] {
                        w.duplicates += 1;
                    } else {
                        w.late += 1;
                        w.last[id] = v;
                    }
                } else {
                    w.unexpected += 1;
                }
            }
            Note::Ended { id, error } => {
                if w.alive[id] && w.last[id] == version {
                    seen -= 1;
                }
                w.ended(id, error);
            }
            Note::Ready { .. } => w.unexpected += 1,
        }
    }
    Ok((seen, latest))
}

/// Asks `Evaluate` on replica B until it answers `value`; the time since `t0` of that answer, or
/// `None` past `deadline`.
async fn served(
    evaluation: &mut EvaluationServiceClient<Channel>,
    value: &str,
    t0: Instant,
    deadline: Instant,
) -> anyhow::Result<Option<Duration>> {
    loop {
        let answer = evaluation
            .evaluate(pb::EvaluateRequest {
                environment: ENVIRONMENT.into(),
                flag_set: FLAG_SET.into(),
                flag_key: FLAG.into(),
                ..Default::default()
            })
            .await
            .context("Evaluate on replica B")?
            .into_inner();
        let at = Instant::now();
        if matches!(&answer.typed, Some(pb::evaluate_response::Typed::StringValue(v)) if v == value) {
            return Ok(Some(at - t0));
        }
        if at > deadline {
            return Ok(None);
        }
    }
}

/// How the propagation measurement runs.
#[derive(Debug, Clone)]
pub struct PropagationSpec {
    pub replica: ReplicaSpec,
    pub redis_url: String,
    pub replicas: usize,
    pub watchers: usize,
    pub changes: usize,
    pub streams_per_connection: usize,
    pub timeout: Duration,
}

/// Runs the propagation measurement.
pub async fn propagation(spec: &PropagationSpec) -> anyhow::Result<PropagationReport> {
    anyhow::ensure!(spec.replicas >= 2, "--replicas must be at least 2 (A writes, B serves)");
    let redis = Some((spec.redis_url.as_str(), "vexil:"));
    // A first, alone: it brings the schema up to date; then the others together.
    let mut servers = vec![spec.replica.spawn(redis)?];
    servers[0].wait_ready(Duration::from_secs(120))?;
    for _ in 1..spec.replicas {
        servers.push(spec.replica.spawn(redis)?);
    }
    for server in &mut servers[1..] {
        server.wait_ready(Duration::from_secs(120))?;
    }

    let admin_channel = connect(servers[0].ports.evaluation).await?;
    let mut admin = AdminServiceClient::new(admin_channel);
    create_flag_set(&mut admin).await?;
    admin.put_flag(put(FLAG, "a")).await.context("seeding the flag")?;
    // Every replica serves the seeded flag before the watchers start (so their snapshots have it).
    let seeded = Instant::now();
    for (r, server) in servers.iter().enumerate() {
        let mut evaluation = EvaluationServiceClient::new(connect(server.ports.evaluation).await?);
        if served(&mut evaluation, "a", seeded, seeded + Duration::from_secs(30))
            .await?
            .is_none()
        {
            bail!("replica {r} did not serve the seeded flag within 30 s");
        }
    }
    let mut evaluation = EvaluationServiceClient::new(connect(servers[1].ports.evaluation).await?);

    // The watchers: round-robin over the replicas, a few connections per replica.
    let per_replica: Vec<usize> = (0..spec.replicas)
        .map(|r| (spec.watchers + spec.replicas - 1 - r) / spec.replicas)
        .collect();
    let per_connection = spec.streams_per_connection.max(1);
    let mut channels: Vec<Vec<Channel>> = Vec::new();
    for (r, server) in servers.iter().enumerate() {
        let mut list = Vec::new();
        for _ in 0..per_replica[r].div_ceil(per_connection).max(1) {
            list.push(connect(server.ports.evaluation).await?);
        }
        channels.push(list);
    }
    let watch_connections = channels.iter().map(Vec::len).sum();
    let (tx, mut rx) = mpsc::unbounded_channel::<Note>();
    let mut tasks = Vec::with_capacity(spec.watchers);
    for id in 0..spec.watchers {
        let (replica, nth) = (id % spec.replicas, id / spec.replicas);
        let channel = channels[replica][nth / per_connection].clone();
        tasks.push(tokio::spawn(watcher(id, channel, tx.clone())));
    }
    drop(tx);
    let mut w = Watchers {
        last: vec![0; spec.watchers],
        alive: vec![true; spec.watchers],
        alive_count: spec.watchers,
        late: 0,
        duplicates: 0,
        unexpected: 0,
        resnapshots: 0,
        disconnects: 0,
        first_disconnect: None,
    };
    let mut ready = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready < spec.watchers {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Note::Ready { id, version })) => {
                w.last[id] = version;
                ready += 1;
            }
            Ok(Some(Note::Ended { id, error })) => bail!(
                "watcher {id} could not start: {}",
                error.unwrap_or_else(|| "the stream ended".into())
            ),
            Ok(Some(Note::Event { .. })) => w.unexpected += 1,
            Ok(None) | Err(_) => bail!("{ready} of {} watchers had their snapshot after 60 s", spec.watchers),
        }
    }

    let histogram = || Histogram::<u64>::new(3);
    let (mut write, mut on_b, mut each, mut all) = (histogram()?, histogram()?, histogram()?, histogram()?);
    let mut by_replica: Vec<Histogram<u64>> = (0..spec.replicas).map(|_| histogram()).collect::<Result<_, _>>()?;
    let (mut misses, mut incomplete, mut served_timeouts) = (0u64, 0u64, 0u64);
    let rss = |servers: &[Server]| -> Vec<f64> {
        servers
            .iter()
            .map(|s| s.rss_bytes().map_or(0.0, |b| b as f64 / (1024.0 * 1024.0)))
            .collect()
    };
    let mut rss_after_warmup = Vec::new();
    for i in 0..spec.changes + WARMUP {
        if i == WARMUP {
            rss_after_warmup = rss(&servers);
        }
        let value = if i.is_multiple_of(2) { "b" } else { "a" };
        let record = i >= WARMUP;
        let t0 = Instant::now();
        let deadline = t0 + spec.timeout;
        let written = async {
            let version = admin.put_flag(put(FLAG, value)).await?.into_inner().config_version;
            let wrote = t0.elapsed();
            let receipts = Receipts {
                each: &mut each,
                by_replica: &mut by_replica,
                record,
            };
            let (seen, last) = collect(&mut rx, &mut w, version, t0, deadline, receipts).await?;
            anyhow::Ok((wrote, seen, last))
        };
        let (written, on_b_took) = tokio::join!(written, served(&mut evaluation, value, t0, deadline));
        let (wrote, seen, last) = written.with_context(|| format!("write {i}"))?;
        misses += (spec.watchers - seen) as u64;
        if seen < spec.watchers {
            incomplete += 1;
        }
        let on_b_took = on_b_took?;
        if on_b_took.is_none() {
            served_timeouts += 1;
        }
        if record {
            write.record(micros(wrote))?;
            if let Some(took) = on_b_took {
                on_b.record(micros(took))?;
            }
            if seen == spec.watchers {
                all.record(micros(last - t0))?;
            }
        }
    }
    for task in tasks {
        task.abort();
    }
    Ok(PropagationReport {
        replicas: spec.replicas,
        watchers: spec.watchers,
        changes: spec.changes,
        warmup_changes: WARMUP,
        store_poll_interval_ms: spec.replica.store_poll_interval_ms,
        watch_connections,
        timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
        write: Percentiles::of(&write),
        write_to_served_on_b: Percentiles::of(&on_b),
        write_to_each_watcher: Percentiles::of(&each),
        write_to_each_watcher_by_replica: by_replica.iter().map(Percentiles::of).collect(),
        write_to_all_watchers: Percentiles::of(&all),
        misses,
        incomplete_changes: incomplete,
        served_timeouts,
        late_events: w.late,
        duplicate_events: w.duplicates,
        unexpected_events: w.unexpected,
        resnapshots: w.resnapshots,
        watcher_disconnects: w.disconnects,
        first_disconnect: w.first_disconnect,
        rss_after_warmup_mib: rss_after_warmup,
        rss_end_mib: rss(&servers),
    })
}

/// The value of a sample (`name` with its labels, exactly as exposed) in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls a server's `/metrics` until `check` holds for its text; the last text either way.
fn metrics_until(port: u16, timeout: Duration, check: impl Fn(&str) -> bool) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = match http_get(port, "/metrics") {
            Some((200, body)) => body,
            _ => String::new(),
        };
        if check(&text) {
            return (true, text);
        }
        if Instant::now() > deadline {
            return (false, text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One way a replica starts, over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct StartupCase {
    pub case: &'static str,
    /// Spawn → `/readyz` 200, in milliseconds.
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
    /// Runs whose `/metrics` confirmed the load path (`vexil_store_loads_total`).
    pub confirmed: usize,
    /// `vexil_store_loads_total{from="cache"}` and `{from="database"}` of each run.
    pub cache_loads: Vec<f64>,
    pub database_loads: Vec<f64>,
    /// `vexil_flags` of each run once ready.
    pub flags_served: Vec<f64>,
}

/// What `vexil-loadgen replica-startup` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub flags: usize,
    pub runs: usize,
    pub document_bytes: usize,
    /// `vexil import` of the document, in milliseconds.
    pub import_ms: f64,
    /// The first replica: spawn → ready, and spawn → its snapshot written to Redis.
    pub seed_ready_ms: f64,
    pub seed_cache_written_ms: f64,
    pub cases: Vec<StartupCase>,
}

/// Whether a replica's `/metrics` text shows the load path of a startup case.
type Confirm = fn(&str) -> bool;

/// How the startup measurement runs.
#[derive(Debug, Clone)]
pub struct StartupSpec {
    pub replica: ReplicaSpec,
    pub redis_url: String,
    pub flags: usize,
    pub runs: usize,
    /// Where the generated flag document is written.
    pub dir: PathBuf,
}

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn import(binary: &Path, database_url: &str, file: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(binary)
        .arg("import")
        .arg(file)
        .args(["--environment", ENVIRONMENT, "--flag-set", FLAG_SET])
        .args(["--database-url", database_url])
        .output()
        .context("running vexil import")?;
    anyhow::ensure!(
        out.status.success(),
        "vexil import failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs the startup measurement.
pub fn startup(spec: &StartupSpec) -> anyhow::Result<StartupReport> {
    let file = spec.dir.join(format!("replica-startup-{}.json", spec.flags));
    let text = crate::flags::document(&crate::flags::catalog(spec.flags)).to_string();
    std::fs::write(&file, &text)?;
    let started = Instant::now();
    import(&spec.replica.binary, &spec.replica.database_url, &file)?;
    let import_ms = started.elapsed().as_secs_f64() * 1000.0;

    // The replica that puts the snapshot into Redis (and keeps running, as a deployment's would).
    let redis = (spec.redis_url.as_str(), "vexil:");
    let mut seed = spec.replica.spawn(Some(redis))?;
    let seed_ready_ms = seed.wait_ready(Duration::from_secs(300))?.as_secs_f64() * 1000.0;
    let (written, text_seen) = metrics_until(seed.ports.management, Duration::from_secs(120), |t| {
        sample(t, "vexil_config_cache_writes_total").is_some_and(|n| n >= 1.0)
    });
    if !written {
        bail!(
            "the first replica did not write its snapshot to Redis within 120 s (vexil_config_cache_writes_total: {:?})",
            sample(&text_seen, "vexil_config_cache_writes_total")
        );
    }
    let seed_cache_written_ms = seed.started.elapsed().as_secs_f64() * 1000.0;

    let cases: [(&'static str, Confirm); 3] = [
        ("redis_snapshot", |t| {
            sample(t, "vexil_store_loads_total{from=\"cache\"}") == Some(1.0)
        }),
        ("database_only", |t| {
            sample(t, "vexil_store_loads_total{from=\"database\"}").is_some_and(|n| n >= 1.0)
        }),
        ("redis_cold_prefix", |t| {
            sample(t, "vexil_store_loads_total{from=\"database\"}").is_some_and(|n| n >= 1.0)
                && sample(t, "vexil_store_loads_total{from=\"cache\"}").unwrap_or(0.0) == 0.0
        }),
    ];
    let mut results: Vec<StartupCase> = cases
        .iter()
        .map(|(case, _)| StartupCase {
            case,
            median_ms: 0.0,
            min_ms: 0.0,
            max_ms: 0.0,
            samples_ms: Vec::new(),
            confirmed: 0,
            cache_loads: Vec::new(),
            database_loads: Vec::new(),
            flags_served: Vec::new(),
        })
        .collect();
    // The cases interleaved, so drift over the runs affects them alike.
    for run in 0..spec.runs.max(1) {
        for (i, (case, confirm)) in cases.iter().enumerate() {
            let prefix = format!("vexil-cold-{run}:");
            let redis = match *case {
                "redis_snapshot" => Some(redis),
                "redis_cold_prefix" => Some((spec.redis_url.as_str(), prefix.as_str())),
                _ => None,
            };
            let mut server = spec.replica.spawn(redis)?;
            let ready = server.wait_ready(Duration::from_secs(300))?;
            let (confirmed, text) = metrics_until(server.ports.management, Duration::from_secs(5), |t| {
                confirm(t) && sample(t, "vexil_flags").is_some_and(|n| n >= spec.flags as f64)
            });
            let r = &mut results[i];
            r.samples_ms.push(ready.as_secs_f64() * 1000.0);
            r.confirmed += usize::from(confirmed);
            let get = |name: &str| sample(&text, name).unwrap_or(f64::NAN);
            r.cache_loads.push(get("vexil_store_loads_total{from=\"cache\"}"));
            r.database_loads.push(get("vexil_store_loads_total{from=\"database\"}"));
            r.flags_served.push(get("vexil_flags"));
        }
    }
    drop(seed);
    for r in &mut results {
        r.median_ms = median(&r.samples_ms);
        r.min_ms = r.samples_ms.iter().copied().fold(f64::INFINITY, f64::min);
        r.max_ms = r.samples_ms.iter().copied().fold(0.0, f64::max);
    }
    let _ = std::fs::remove_file(&file);
    Ok(StartupReport {
        flags: spec.flags,
        runs: spec.runs.max(1),
        document_bytes: text.len(),
        import_ms,
        seed_ready_ms,
        seed_cache_written_ms,
        cases: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prometheus_samples() {
        let text = "# HELP vexil_store_loads_total x\n# TYPE vexil_store_loads_total counter\n\
                    vexil_store_loads_total{from=\"cache\"} 1\nvexil_store_loads_total{from=\"database\"} 0\n\
                    vexil_flags 10000\nvexil_flags_other 3\n";
        assert_eq!(sample(text, "vexil_store_loads_total{from=\"cache\"}"), Some(1.0));
        assert_eq!(sample(text, "vexil_store_loads_total{from=\"database\"}"), Some(0.0));
        assert_eq!(sample(text, "vexil_flags"), Some(10000.0));
        assert_eq!(sample(text, "vexil_config_cache_writes_total"), None);
    }
}
