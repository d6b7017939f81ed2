//! The `vexil-loadgen` command. See `docs/benchmarks.md` for the commands behind every figure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use vexil_loadgen::baseline::{self, Canned};
use vexil_loadgen::driver::{self, LoadSpec};
use vexil_loadgen::fanout::{self, Protocol};
use vexil_loadgen::flags::{catalog, document};
use vexil_loadgen::process::{self, Server};
use vexil_loadgen::report::{self, Row};
use vexil_loadgen::workload::{Client, Req, Scenario, requests};
use vexil_loadgen::{replicas, soak, stalled};

/// Load generator for Vexil: throughput and latency beside a no-op baseline, change fan-out,
/// memory and startup.
#[derive(Debug, Parser)]
#[command(name = "vexil-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Throughput and latency of request scenarios, Vexil and then the baseline.
    Run(RunArgs),
    /// Time from a flag file edit to every stream subscriber being notified.
    Fanout(FanoutArgs),
    /// Resident memory of a server holding N flags (after a short warm-up).
    Memory(SizeArgs),
    /// Time from process start to ready with N flags.
    Startup(SizeArgs),
    /// A long run of every protocol at a share of the mix's maximum throughput, with flag-file
    /// churn and stream subscribers coming and going: errors, mixed answers, latency drift, RSS.
    Soak(SoakArgs),
    /// SyncFlags subscribers that never give flow-control credit back, under config churn: RSS.
    Stalled(StalledArgs),
    /// Memory per idle stream (EventStream or SyncFlags), N streams held open.
    IdleStreams(IdleArgs),
    /// The managed store: admin write → value served (p50/p99), and writes per second.
    Store(StoreArgs),
    /// Replicas sharing PostgreSQL and Redis: admin write on one → served by another, and → every
    /// ConfigService.Watch watcher on all of them.
    Propagation(PropagationArgs),
    /// Replicas sharing PostgreSQL and Redis: spawn → ready with N flags, from Redis's snapshot
    /// and from the database.
    ReplicaStartup(ReplicaStartupArgs),
    /// Experiments: tracked events per second (`/v1/track:batch`, `/v1/track`), the time of an
    /// experiment's results over N raw events, evaluation of an experiment flag beside a plain one.
    Experiments(ExperimentsArgs),
    /// The cost of OpenTelemetry tracing: the same scenarios with tracing off, sampled and on
    /// (every request traced), modes interleaved over rounds; spans counted by an in-process OTLP
    /// sink.
    Tracing(TracingArgs),
    /// Throughput of scenarios against a yardstick scenario (the first; grpc.health.v1 Check by
    /// default) on one running server, in short windows alternating within each round, from a raw
    /// HTTP/2 gRPC client: the speed target of issue #8 (`tools/health-ratio`).
    Ratio(RatioArgs),
    /// An OTLP/gRPC trace receiver that only counts spans and events (to point a server's
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` at, e.g. under `tools/health-ratio --callgrind`).
    #[command(hide = true)]
    OtlpSink {
        #[arg(long, default_value_t = 4317)]
        port: u16,
        /// Seconds between two printed counts.
        #[arg(long, default_value_t = 10.0)]
        every: f64,
    },
    /// The no-op baseline server (started by `run`).
    #[command(hide = true)]
    BaselineServer {
        #[arg(short = 'p')]
        port: u16,
        #[arg(short = 'm')]
        management_port: u16,
        #[arg(short = 'g')]
        _sync_port: u16,
        #[arg(short = 'r')]
        ofrep_port: u16,
        #[arg(long)]
        canned: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct Common {
    /// The vexil binary (default: next to this one).
    #[arg(long)]
    vexil: Option<PathBuf>,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenarios to run (repeatable).
    #[arg(long = "scenario", value_enum, default_values_t = [Scenario::ResolveBoolean])]
    scenarios: Vec<Scenario>,
    /// Flags in the served file.
    #[arg(long, default_value_t = 10)]
    flags: usize,
    /// Context attributes per request.
    #[arg(long, default_value_t = 5)]
    attrs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections for gRPC scenarios.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds per scenario and target.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Fixed total arrival rate (requests/s); default: closed loop, as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Run Vexil only.
    #[arg(long)]
    no_baseline: bool,
    /// Load an already running server at this host instead of starting one (no baseline, no
    /// server CPU figures; its flags must be those of `--flags`, e.g. from `--write-flags`).
    #[arg(long)]
    target: Option<String>,
    /// gRPC port of `--target`.
    #[arg(long, default_value_t = 8013)]
    target_port: u16,
    /// OFREP port of `--target`.
    #[arg(long, default_value_t = 8016)]
    target_ofrep_port: u16,
    /// Write the generated flag file here (to serve it from another machine) and exit.
    #[arg(long)]
    write_flags: Option<PathBuf>,
    /// Extra arguments for `vexil start` (e.g. `--vexil-arg=--fractional --vexil-arg=v2`).
    #[arg(long = "vexil-arg", allow_hyphen_values = true)]
    vexil_args: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 20)]
    changes: usize,
    #[arg(long, default_value_t = 10)]
    flags: usize,
    #[arg(long, value_enum, default_value_t = Protocol::EventStream)]
    protocol: Protocol,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct SizeArgs {
    /// Flag counts to measure (repeatable).
    #[arg(long = "flags", default_values_t = [10, 10_000])]
    flags: Vec<usize>,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct StalledArgs {
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    #[arg(long, default_value_t = 3000)]
    flags: usize,
    /// Milliseconds between flag file rewrites.
    #[arg(long, default_value_t = 200)]
    churn_ms: u64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct IdleArgs {
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    #[arg(long, value_enum, default_value_t = Protocol::EventStream)]
    protocol: Protocol,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The database (`postgres://…` or `sqlite:<file>`); default: a fresh SQLite file.
    #[arg(long)]
    database_url: Option<String>,
    /// Writes timed from PutFlag to the new value being served.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Concurrent writers for the throughput measurement.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds of the throughput measurement.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[command(flatten)]
    common: Common,
}

/// The shared PostgreSQL and Redis, and how replicas run on them.
#[derive(Debug, clap::Args)]
struct ReplicaArgs {
    /// The shared database (`postgres://…`); default: a throwaway PostgreSQL server.
    #[arg(long)]
    database_url: Option<String>,
    /// The shared Redis (`redis://…`); default: a throwaway Redis server.
    #[arg(long)]
    redis_url: Option<String>,
    /// The replicas' `--store-poll-interval-ms` (the backstop version check; high, so changes
    /// arrive by the change bus).
    #[arg(long, default_value_t = 1000)]
    store_poll_interval_ms: u64,
    /// Extra arguments for `vexil serve` (e.g. `--vexil-arg=--max-connections=50000`).
    #[arg(long = "vexil-arg", allow_hyphen_values = true)]
    vexil_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PropagationArgs {
    /// Replicas (at least 2: A takes the writes, B is asked for the value).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// ConfigService.Watch streams, round-robin over the replicas.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Measured writes (after 5 unmeasured ones), one at a time.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Watch streams per HTTP/2 connection (the server allows 200).
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Milliseconds a write may take to reach B and every watcher before it counts as missed.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(flatten)]
    replica: ReplicaArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct ReplicaStartupArgs {
    /// Flags in environment `bench` (imported with `vexil import`).
    #[arg(long, default_value_t = 10_000)]
    flags: usize,
    /// Runs of each case (median, min and max are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[command(flatten)]
    replica: ReplicaArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct ExperimentsArgs {
    /// Measurements to run (repeatable or comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        vexil_loadgen::experiments::What::Ingest,
        vexil_loadgen::experiments::What::Results,
        vexil_loadgen::experiments::What::Evaluation,
    ])]
    what: Vec<vexil_loadgen::experiments::What>,
    /// The database: a throwaway PostgreSQL (or the server of `VEXIL_TEST_DATABASE_URL`), a fresh
    /// SQLite file, or both; a new database for each measurement.
    #[arg(long, value_enum, default_value_t = vexil_loadgen::experiments::Database::Both)]
    database: vexil_loadgen::experiments::Database,
    /// Measured seconds of each ingest and evaluation run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Events per `/v1/track:batch` call.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Concurrent clients sending batches.
    #[arg(long, default_value_t = 4)]
    batch_clients: usize,
    /// Concurrent clients sending one event per `/v1/track` call.
    #[arg(long, default_value_t = 16)]
    single_clients: usize,
    /// Events loaded for the results measurement (repeatable: one fresh database each).
    #[arg(long = "events", default_values_t = [1_000_000])]
    events: Vec<u64>,
    /// Insert calls (1,000 events each) in flight while loading (PostgreSQL; SQLite loads with one).
    #[arg(long, default_value_t = 4)]
    load_concurrency: usize,
    /// Evaluation: concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Evaluation: HTTP/2 connections (gRPC).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Evaluation: the protocol.
    #[arg(long, value_enum, default_value_t = vexil_loadgen::experiments::EvalProtocol::Grpc)]
    protocol: vexil_loadgen::experiments::EvalProtocol,
    /// Extra arguments for `vexil serve`.
    #[arg(long = "vexil-arg", allow_hyphen_values = true)]
    vexil_args: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
struct RatioArgs {
    /// Scenarios (gRPC only; repeatable); the first is the yardstick.
    #[arg(long = "scenario", value_enum, default_values_t = [
        Scenario::Health,
        Scenario::ResolveTargeting,
        Scenario::ResolveBoolean,
    ])]
    scenarios: Vec<Scenario>,
    /// The running server's host.
    #[arg(long, default_value = "127.0.0.1")]
    target: String,
    /// Its gRPC evaluation port.
    #[arg(long, default_value_t = 8013)]
    target_port: u16,
    /// Its pid, to read its CPU time per request from /proc (same machine only).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Flags the server serves (as written by `run --flags N --write-flags`).
    #[arg(long, default_value_t = 10)]
    flags: usize,
    /// Context attributes per request.
    #[arg(long, default_value_t = 5)]
    attrs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Seconds per scenario window.
    #[arg(long, default_value_t = 3.0)]
    window: f64,
    /// Rounds; each runs every scenario's window once, the order rotating.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Unrecorded seconds per scenario before the first round.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct TracingArgs {
    /// Scenarios to run (repeatable).
    #[arg(long = "scenario", value_enum, default_values_t = [Scenario::ResolveBoolean, Scenario::OfrepSingle])]
    scenarios: Vec<Scenario>,
    /// Tracing modes to compare (repeatable or comma-separated).
    #[arg(long = "mode", value_enum, value_delimiter = ',', default_values_t = [
        vexil_loadgen::tracing::Mode::Off,
        vexil_loadgen::tracing::Mode::Sampled,
        vexil_loadgen::tracing::Mode::On,
    ])]
    modes: Vec<vexil_loadgen::tracing::Mode>,
    /// The sampled mode's `OTEL_TRACES_SAMPLER_ARG` (with `parentbased_traceidratio`).
    #[arg(long, default_value_t = 0.01)]
    sample_ratio: f64,
    /// Rounds; each runs every mode once (a fresh server each), starting with a different one.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per scenario, mode and round.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before each (its requests are counted against the spans).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Fixed total arrival rate (requests/s, open loop; latency from each request's intended
    /// start); default: closed loop, as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Flags in the served file.
    #[arg(long, default_value_t = 10)]
    flags: usize,
    /// Context attributes per request.
    #[arg(long, default_value_t = 5)]
    attrs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections for gRPC scenarios.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// More environment for the traced modes, `KEY=VALUE` (e.g.
    /// `--otel-env OTEL_BSP_MAX_QUEUE_SIZE=65536`; repeatable).
    #[arg(long = "otel-env", value_parser = key_value)]
    otel_env: Vec<(String, String)>,
    /// Extra arguments for `vexil start`.
    #[arg(long = "vexil-arg", allow_hyphen_values = true)]
    vexil_args: Vec<String>,
    #[command(flatten)]
    common: Common,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// Seconds of the open-loop phase.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Share of the measured maximum throughput the open-loop phase runs at.
    #[arg(long, default_value_t = 0.70)]
    share: f64,
    /// Seconds of the closed-loop phase that measures the maximum throughput.
    #[arg(long, default_value_t = 5.0)]
    calibrate: f64,
    /// Milliseconds between two writes of the flag file (one write in ten is invalid).
    #[arg(long, default_value_t = 100)]
    churn_ms: u64,
    /// Stream subscribers alive at any time (half EventStream, half SyncFlags).
    #[arg(long, default_value_t = 20)]
    subscribers: usize,
    /// Shortest and longest life of a subscriber, in seconds (then it is replaced).
    #[arg(long, default_values_t = [1.0, 10.0], num_args = 2, value_names = ["MIN", "MAX"])]
    subscriber_life: Vec<f64>,
    /// Catalog flags (static, targeting, fractional) beside the generation flags.
    #[arg(long, default_value_t = 10)]
    flags: usize,
    /// Context attributes per request.
    #[arg(long, default_value_t = 5)]
    attrs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections for gRPC (to the evaluation and the sync port each).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Extra arguments for `vexil start`.
    #[arg(long = "vexil-arg", allow_hyphen_values = true)]
    vexil_args: Vec<String>,
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Fanout(args) => fanout_cmd(args).await,
            Command::Memory(args) => memory(args).await,
            Command::Startup(args) => startup(args),
            Command::Soak(args) => soak_cmd(args).await,
            Command::Stalled(args) => stalled_cmd(args).await,
            Command::IdleStreams(args) => idle_cmd(args).await,
            Command::Store(args) => store_cmd(args).await,
            Command::Propagation(args) => propagation_cmd(args).await,
            Command::ReplicaStartup(args) => replica_startup_cmd(args),
            Command::Experiments(args) => experiments_cmd(args).await,
            Command::Tracing(args) => tracing_cmd(args).await,
            Command::Ratio(args) => ratio_cmd(args).await,
            Command::OtlpSink { port, every } => otlp_sink_cmd(port, every).await,
            Command::BaselineServer {
                port,
                management_port,
                ofrep_port,
                canned,
                ..
            } => {
                let canned: Canned = serde_json::from_slice(&std::fs::read(&canned)?)?;
                baseline::run(port, management_port, ofrep_port, canned).await
            }
        }
    })
}

fn scratch() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vexil-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_flags(dir: &Path, count: usize) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("flags-{count}.json"));
    std::fs::write(&path, document(&catalog(count)).to_string())?;
    Ok(path)
}

fn vexil_binary(common: &Common) -> anyhow::Result<PathBuf> {
    let path = common.vexil.clone().unwrap_or_else(process::default_vexil);
    anyhow::ensure!(
        path.exists(),
        "no vexil binary at {} (build it, or pass --vexil)",
        path.display()
    );
    Ok(path)
}

fn emit<T: serde::Serialize>(common: &Common, value: &T) -> anyhow::Result<()> {
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The baseline's answers: Vexil's own answers to the first request of each scenario.
async fn capture(client: &Client, pools: &[(Scenario, Arc<Vec<Req>>)]) -> anyhow::Result<Canned> {
    let mut canned = Canned::default();
    for (scenario, pool) in pools {
        match &pool[0] {
            Req::Bool(r) => canned.resolve_boolean = client.v1().resolve_boolean(r.clone()).await?.into_inner(),
            Req::Str(r) => canned.resolve_string = client.v1().resolve_string(r.clone()).await?.into_inner(),
            Req::All(r) => canned.resolve_all = client.v1().resolve_all(r.clone()).await?.into_inner(),
            Req::V2Bool(r) => canned.v2_boolean = client.v2().resolve_boolean(r.clone()).await?.into_inner(),
            // The baseline runs tonic's own health service: nothing to capture.
            Req::Health => {}
            Req::Http { path, body } => {
                let answer = client.fetch_http(path, body.clone()).await?;
                match scenario {
                    Scenario::OfrepBulk => canned.ofrep_bulk = answer,
                    _ => canned.ofrep_single = answer,
                }
            }
        }
    }
    Ok(canned)
}

async fn measure(
    target: &str,
    server: Option<&Server>,
    client: Arc<Client>,
    scenario: Scenario,
    pool: Arc<Vec<Req>>,
    spec: LoadSpec,
    args: &RunArgs,
) -> Row {
    let pid = server.map(Server::pid);
    let (m, (server_cpu0, own_cpu0)) = driver::drive(client, pool, spec, move || {
        (pid.and_then(cpu_of), process::own_cpu_seconds())
    })
    .await;
    let (server_cpu1, own_cpu1) = (pid.and_then(cpu_of), process::own_cpu_seconds());
    let secs = spec.duration.as_secs_f64();
    let mut row = Row::new(
        target,
        scenario.name(),
        args.flags,
        args.attrs,
        args.connections,
        spec,
        &m,
    );
    row.server_cpu = server_cpu0.zip(server_cpu1).map(|(a, b)| (b - a) / secs);
    row.loadgen_cpu = own_cpu0.zip(own_cpu1).map(|(a, b)| (b - a) / secs);
    row
}

fn cpu_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let flags = catalog(args.flags);
    let file = write_flags(&dir, args.flags)?;
    let spec = LoadSpec {
        concurrency: args.concurrency,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        rate: args.rate,
    };
    let pools: Vec<(Scenario, Arc<Vec<Req>>)> = args
        .scenarios
        .iter()
        .map(|s| (*s, Arc::new(requests(*s, &flags, args.attrs, 1024))))
        .collect();

    if let Some(path) = &args.write_flags {
        std::fs::copy(&file, path).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} flags to {}", args.flags, path.display());
        return Ok(());
    }
    if let Some(host) = &args.target {
        let client =
            Arc::new(Client::connect_to(host, args.target_port, args.target_ofrep_port, args.connections).await?);
        let mut rows = Vec::new();
        for (scenario, pool) in &pools {
            rows.push(measure(host, None, client.clone(), *scenario, pool.clone(), spec, &args).await);
        }
        print!("{}", report::table(&rows));
        return emit(&args.common, &rows);
    }

    let mut vexil = Server::vexil(&vexil_binary(&args.common)?, &file, &args.vexil_args)?;
    vexil.wait_ready(Duration::from_secs(60))?;
    let client = Arc::new(Client::connect(vexil.ports.evaluation, vexil.ports.ofrep, args.connections).await?);
    let canned = capture(&client, &pools).await?;
    let mut rows = Vec::new();
    for (scenario, pool) in &pools {
        rows.push(
            measure(
                "vexil",
                Some(&vexil),
                client.clone(),
                *scenario,
                pool.clone(),
                spec,
                &args,
            )
            .await,
        );
    }
    drop(client);
    drop(vexil);

    if !args.no_baseline {
        let canned_path = dir.join("canned.json");
        std::fs::write(&canned_path, serde_json::to_vec(&canned)?)?;
        let mut base = Server::baseline(&canned_path)?;
        base.wait_ready(Duration::from_secs(30))?;
        let client = Arc::new(Client::connect(base.ports.evaluation, base.ports.ofrep, args.connections).await?);
        for (i, (scenario, pool)) in pools.iter().enumerate() {
            let row = measure(
                "baseline",
                Some(&base),
                client.clone(),
                *scenario,
                pool.clone(),
                spec,
                &args,
            )
            .await;
            rows[i].vs_baseline = Some(rows[i].throughput / row.throughput.max(1e-9));
            rows.push(row);
        }
    }
    print!("{}", report::table(&rows));
    for r in rows.iter().filter(|r| r.errors > 0) {
        eprintln!(
            "{} {}: {} errors, first: {}",
            r.target,
            r.scenario,
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    emit(&args.common, &rows)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn fanout_cmd(args: FanoutArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let result = fanout::run(
        &vexil_binary(&args.common)?,
        &dir,
        args.flags,
        args.subscribers,
        args.changes,
        args.protocol,
    )
    .await?;
    println!(
        "fanout {:?}: {} subscribers, {} changes: edit → subscriber p50 {:.1} ms, p99 {:.1} ms; edit → last subscriber p50 {:.1} ms, p99 {:.1} ms; missed {}",
        result.protocol,
        result.subscribers,
        result.changes,
        result.p50_ms,
        result.p99_ms,
        result.last_p50_ms,
        result.last_p99_ms,
        result.missed
    );
    emit(&args.common, &result)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct SizeResult {
    flags: usize,
    median: f64,
    unit: &'static str,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn memory(args: SizeArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let binary = vexil_binary(&args.common)?;
    let mut results = Vec::new();
    for &count in &args.flags {
        let file = write_flags(&dir, count)?;
        let flags = catalog(count);
        let pool = Arc::new(requests(Scenario::ResolveBoolean, &flags, 5, 256));
        let mut samples = Vec::new();
        for _ in 0..args.runs.max(1) {
            let mut server = Server::vexil(&binary, &file, &[])?;
            server.wait_ready(Duration::from_secs(60))?;
            // A short warm-up so connection and per-thread buffers are counted.
            let client = Arc::new(Client::connect(server.ports.evaluation, server.ports.ofrep, 4).await?);
            let spec = LoadSpec {
                concurrency: 32,
                duration: Duration::from_secs(1),
                warmup: Duration::ZERO,
                rate: None,
            };
            driver::drive(client, pool.clone(), spec, || ()).await;
            samples.push(server.rss_bytes().context("reading the server's RSS")? as f64 / (1024.0 * 1024.0));
        }
        let m = median(samples);
        println!("memory: {count} flags: RSS {m:.1} MiB (median of {})", args.runs.max(1));
        results.push(SizeResult {
            flags: count,
            median: m,
            unit: "MiB",
        });
    }
    emit(&args.common, &results)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn startup(args: SizeArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let binary = vexil_binary(&args.common)?;
    let mut results = Vec::new();
    for &count in &args.flags {
        let file = write_flags(&dir, count)?;
        let mut samples = Vec::new();
        for _ in 0..args.runs.max(1) {
            let mut server = Server::vexil(&binary, &file, &[])?;
            samples.push(server.wait_ready(Duration::from_secs(60))?.as_secs_f64() * 1000.0);
        }
        let m = median(samples);
        println!(
            "startup: {count} flags: ready after {m:.0} ms (median of {})",
            args.runs.max(1)
        );
        results.push(SizeResult {
            flags: count,
            median: m,
            unit: "ms",
        });
    }
    emit(&args.common, &results)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn stalled_cmd(args: StalledArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let r = stalled::stalled(
        &vexil_binary(&args.common)?,
        &dir,
        args.subscribers,
        args.flags,
        Duration::from_millis(args.churn_ms),
        Duration::from_secs_f64(args.duration),
    )
    .await?;
    println!(
        "stalled: {} SyncFlags subscribers withholding credit, {} flags ({} kB payload), {} changes: RSS {:.1} MiB at start, {:.1} connected, peak {:.1}, end {:.1}; {:.1} KiB per subscriber from the churn",
        r.subscribers,
        r.flags,
        r.payload_bytes / 1000,
        r.changes,
        r.rss_start_mib,
        r.rss_connected_mib,
        r.rss_peak_mib,
        r.rss_end_mib,
        r.per_subscriber_kib
    );
    emit(&args.common, &r)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn idle_cmd(args: IdleArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let r = stalled::idle(&vexil_binary(&args.common)?, &dir, args.streams, args.protocol).await?;
    println!(
        "idle streams {:?}: {} streams over {} connections: RSS {:.1} → {:.1} MiB, {:.0} bytes per stream",
        r.protocol, r.streams, r.connections, r.rss_before_mib, r.rss_after_mib, r.bytes_per_stream
    );
    emit(&args.common, &r)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn soak_cmd(args: SoakArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let life = |i: usize| Duration::from_secs_f64(args.subscriber_life[i].max(0.0));
    let spec = soak::SoakSpec {
        vexil: vexil_binary(&args.common)?,
        dir: dir.clone(),
        duration: Duration::from_secs_f64(args.duration),
        calibrate: Duration::from_secs_f64(args.calibrate),
        share: args.share,
        concurrency: args.concurrency,
        connections: args.connections,
        churn: Duration::from_millis(args.churn_ms),
        subscribers: args.subscribers,
        subscriber_life: (life(0), life(1).max(life(0))),
        flags: args.flags,
        attrs: args.attrs,
        vexil_args: args.vexil_args.clone(),
    };
    let report = soak::run(&spec).await;
    let log = std::fs::read_to_string(dir.join("vexil.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    print!("{}", soak::table(&report));
    if !report.passed {
        // The server's own words for the failures above (its log is kept out of the report),
        // without the rejections of the soak's own invalid writes.
        let lines: Vec<String> = log
            .lines()
            .filter(|l| !l.contains("cannot load source"))
            .map(strip_ansi)
            .collect();
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("vexil: {line}");
        }
    }
    emit(&args.common, &report)?;
    anyhow::ensure!(
        report.passed,
        "soak failed: {} errors, {} mixed answers",
        report.errors,
        report.mixed_answers
    );
    Ok(())
}

/// `line` without terminal colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn store_cmd(args: StoreArgs) -> anyhow::Result<()> {
    let binary = vexil_binary(&args.common)?;
    let dir = scratch()?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", dir.join("store-bench.db").display()));
    let backend = if url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let server = vexil_loadgen::store::server(&binary, &url)?;
    let report = vexil_loadgen::store::measure(
        &server,
        backend,
        args.changes,
        args.writers,
        Duration::from_secs_f64(args.duration),
    )
    .await?;
    println!(
        "| {backend} | write → served p50 {} µs, p99 {} µs (n={}) | {:.0} writes/s with {} writers | write p50 {} µs, p99 {} µs |",
        report.propagation.p50_us,
        report.propagation.p99_us,
        report.propagation.count,
        report.writes_per_second,
        report.writers,
        report.write_latency.p50_us,
        report.write_latency.p99_us,
    );
    if let Some(path) = &args.common.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// The shared servers (throwaway ones unless given) and how replicas start on them.
fn replica_setup(
    args: &ReplicaArgs,
    common: &Common,
    max_streams: u64,
) -> anyhow::Result<(replicas::Backing, replicas::ReplicaSpec)> {
    let binary = vexil_binary(common)?;
    let backing = replicas::Backing::start(args.database_url.clone(), args.redis_url.clone());
    let spec = replicas::ReplicaSpec {
        binary,
        database_url: backing.database_url.clone(),
        store_poll_interval_ms: args.store_poll_interval_ms,
        max_streams,
        extra: args.vexil_args.clone(),
    };
    Ok((backing, spec))
}

async fn propagation_cmd(args: PropagationArgs) -> anyhow::Result<()> {
    // The server's default (20,000) unless more watchers share one replica.
    let per_replica = args.watchers.div_ceil(args.replicas.max(1)) as u64;
    let (backing, replica) = replica_setup(&args.replica, &args.common, per_replica.max(20_000))?;
    let spec = replicas::PropagationSpec {
        replica,
        redis_url: backing.redis_url.clone(),
        replicas: args.replicas,
        watchers: args.watchers,
        changes: args.changes,
        streams_per_connection: args.streams_per_connection,
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let r = replicas::propagation(&spec).await?;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "propagation: {} replicas, {} watchers, {} changes: write → served on B p50 {:.1} ms, p99 {:.1} ms; write → each watcher p50 {:.1} ms, p99 {:.1} ms; write → all watchers p50 {:.1} ms, p99 {:.1} ms; misses {}, B timeouts {}",
        r.replicas,
        r.watchers,
        r.changes,
        ms(r.write_to_served_on_b.p50_us),
        ms(r.write_to_served_on_b.p99_us),
        ms(r.write_to_each_watcher.p50_us),
        ms(r.write_to_each_watcher.p99_us),
        ms(r.write_to_all_watchers.p50_us),
        ms(r.write_to_all_watchers.p99_us),
        r.misses,
        r.served_timeouts,
    );
    let mib = |v: &[f64]| v.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" / ");
    println!(
        "replica RSS (MiB) after warm-up {}; after the last write {}",
        mib(&r.rss_after_warmup_mib),
        mib(&r.rss_end_mib)
    );
    emit(&args.common, &r)?;
    drop(backing);
    Ok(())
}

fn replica_startup_cmd(args: ReplicaStartupArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let (backing, replica) = replica_setup(&args.replica, &args.common, 20_000)?;
    let spec = replicas::StartupSpec {
        replica,
        redis_url: backing.redis_url.clone(),
        flags: args.flags,
        runs: args.runs,
        dir: dir.clone(),
    };
    let report = replicas::startup(&spec);
    let _ = std::fs::remove_dir_all(&dir);
    let r = report?;
    for c in &r.cases {
        println!(
            "replica startup, {} flags, {}: ready after {:.0} ms (median of {}; min {:.0}, max {:.0}; load path confirmed {}/{})",
            r.flags,
            c.case,
            c.median_ms,
            c.samples_ms.len(),
            c.min_ms,
            c.max_ms,
            c.confirmed,
            c.samples_ms.len()
        );
    }
    emit(&args.common, &r)?;
    drop(backing);
    Ok(())
}

async fn experiments_cmd(args: ExperimentsArgs) -> anyhow::Result<()> {
    let spec = vexil_loadgen::experiments::Spec {
        vexil: vexil_binary(&args.common)?,
        databases: args.database.each(),
        what: args.what.clone(),
        duration: Duration::from_secs_f64(args.seconds),
        warmup: Duration::from_secs_f64(args.warmup),
        batch_size: args.batch_size,
        batch_clients: args.batch_clients,
        single_clients: args.single_clients,
        events: args.events.clone(),
        load_concurrency: args.load_concurrency,
        concurrency: args.concurrency,
        connections: args.connections,
        protocol: args.protocol,
        vexil_args: args.vexil_args.clone(),
    };
    let report = vexil_loadgen::experiments::run(&spec, |line| eprintln!("{line}")).await?;
    print!("{}", vexil_loadgen::experiments::tables(&report));
    emit(&args.common, &report)
}

async fn tracing_cmd(args: TracingArgs) -> anyhow::Result<()> {
    let dir = scratch()?;
    let spec = vexil_loadgen::tracing::Spec {
        vexil: vexil_binary(&args.common)?,
        dir: dir.clone(),
        scenarios: args.scenarios.clone(),
        modes: args.modes.clone(),
        rounds: args.rounds,
        flags: args.flags,
        attrs: args.attrs,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        rate: args.rate,
        ratio: args.sample_ratio,
        otel_env: args.otel_env.clone(),
        vexil_args: args.vexil_args.clone(),
    };
    let report = vexil_loadgen::tracing::run(&spec, |line| eprintln!("{line}")).await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    print!("{}", vexil_loadgen::tracing::tables(&report));
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    emit(&args.common, &report)
}

async fn ratio_cmd(args: RatioArgs) -> anyhow::Result<()> {
    let spec = vexil_loadgen::ratio::Spec {
        host: args.target,
        port: args.target_port,
        server_pid: args.server_pid,
        scenarios: args.scenarios,
        flags: args.flags,
        attrs: args.attrs,
        concurrency: args.concurrency,
        connections: args.connections,
        window: Duration::from_secs_f64(args.window),
        rounds: args.rounds,
        warmup: Duration::from_secs_f64(args.warmup),
    };
    let report = vexil_loadgen::ratio::run(&spec, |line| eprintln!("{line}")).await?;
    print!("{}", vexil_loadgen::ratio::table(&report));
    emit(
        &Common {
            vexil: None,
            json: args.json,
        },
        &report,
    )
}

async fn otlp_sink_cmd(port: u16, every: f64) -> anyhow::Result<()> {
    let sink = vexil_loadgen::tracing::start_sink_at(([127, 0, 0, 1], port).into()).await?;
    eprintln!("OTLP sink at {}", sink.endpoint);
    let mut total = vexil_loadgen::tracing::Received::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(every.max(0.1)));
    tick.tick().await;
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = tokio::signal::ctrl_c() => true,
        };
        let r = sink.sink.take();
        total.exports += r.exports;
        total.spans += r.spans;
        total.events += r.events;
        total.evaluation_events += r.evaluation_events;
        for (op, o) in r.by_operation {
            let t = total.by_operation.entry(op).or_default();
            t.spans += o.spans;
            t.evaluation_events += o.evaluation_events;
        }
        println!("{}", serde_json::to_string(&total)?);
        if stop {
            return Ok(());
        }
    }
}
