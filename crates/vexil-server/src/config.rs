//! Command line and environment: flagd's `start` options, under `vexil serve` (alias `start`), and
//! the managed store's commands (`migrate`, `import`, `export`, `keys`).
//!
//! Every option reads `VEXIL_<NAME>`; where flagd has the option, `FLAGD_<NAME>` is read too (the
//! `VEXIL_` name wins), so a flagd deployment's environment keeps working. A configuration file
//! (`--config`, YAML or JSON, keyed by `vexil serve`'s long option names) comes after both:
//! command line > `VEXIL_*` > `FLAGD_*` > file > defaults. `docs/configuration.md` lists every
//! option.

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value};
use vexil_core::FractionalMode;
use vexil_service::{SourceSpec, StaticContext};

/// Vexil: a feature-flag server that speaks flagd's protocols (and more).
#[derive(Debug, Parser)]
#[command(name = "vexil", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: the managed store (an embedded SQLite file unless --database-url says
    /// otherwise) and any file sources. `vexil start` is flagd's command: the same options, with
    /// no store unless --database-url is given.
    #[command(alias = "start")]
    Serve(Box<ServeArgs>),
    /// Check flag definition files (JSON or YAML) against the flagd schema and the targeting
    /// compiler; exits non-zero on any problem.
    Validate(ValidateArgs),
    /// Bring the store's database schema up to date (`serve` does this at start too).
    Migrate(DatabaseArgs),
    /// Replace a managed flag set's flags, segments and metadata with a flagd document's (JSON or
    /// YAML), creating the environment and flag set when missing, in one config version.
    Import(ImportArgs),
    /// Print a managed flag set as a flagd JSON document (what `import` takes back).
    Export(ExportArgs),
    /// Manage API keys.
    Keys(KeysArgs),
    /// GET a running server's readiness URL, print the status line and body, and exit 0 on 200, 1
    /// otherwise (unreachable included): the container image's HEALTHCHECK, which has no shell or
    /// curl.
    Health(HealthArgs),
}

/// The store's database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `postgres://user:password@host/db` or `sqlite:<file>`.
    #[arg(long, env = "VEXIL_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// A `vexil serve` configuration file to take `database-url` from (its other keys are checked
    /// but not used).
    #[arg(long, env = "VEXIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The embedded database `vexil serve` uses when given none.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:vexil.db";

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The flagd document (`-` for standard input).
    pub file: String,
    /// The environment (created when missing).
    #[arg(long, short = 'e')]
    pub environment: String,
    /// The flag set (created when missing).
    #[arg(long)]
    pub flag_set: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The environment.
    #[arg(long, short = 'e')]
    pub environment: String,
    /// The flag set.
    #[arg(long)]
    pub flag_set: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create an API key and print it (it is shown this once; only its hash is stored).
    Create {
        /// The environment the key is scoped to (an admin key without one is global).
        #[arg(long, short = 'e')]
        environment: Option<String>,
        /// admin, evaluate or track.
        #[arg(long)]
        role: String,
        /// A name for people (default: the role and environment).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Files to check.
    #[arg(required = true)]
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The URL to GET (`http://` only).
    #[arg(long, env = "VEXIL_HEALTH_URL", default_value = DEFAULT_HEALTH_URL, value_parser = parse_http_url)]
    pub url: http::Uri,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value = "3", value_parser = parse_positive_seconds)]
    pub timeout: Duration,
}

/// What `vexil health` checks when given no URL: the management port's readiness.
pub const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:8014/readyz";

/// How the server logs (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A configuration file (YAML or JSON) whose keys are these options' long names, e.g.
    /// `port: 8013`; the command line and the environment override it.
    #[arg(long, env = "VEXIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A flag source: `file:<path>` (JSON or YAML). Repeatable; on duplicate keys within a flag
    /// set the later source wins. Env: comma-separated.
    #[arg(short = 'f', long = "uri", env = "VEXIL_URI", value_delimiter = ',')]
    pub uri: Vec<String>,
    /// Sources as flagd's JSON array: `[{"uri": "flags.json", "provider": "file"}]`.
    #[arg(short = 's', long, env = "VEXIL_SOURCES")]
    pub sources: Option<String>,
    /// gRPC evaluation port (flagd.evaluation.v1/v2, schema.v1, gRPC-web, Connect).
    #[arg(short = 'p', long, env = "VEXIL_PORT", default_value_t = 8013)]
    pub port: u16,
    /// Management port (/healthz, /readyz, /metrics).
    #[arg(short = 'm', long, env = "VEXIL_MANAGEMENT_PORT", default_value_t = 8014)]
    pub management_port: u16,
    /// flagd.sync.v1 port.
    #[arg(short = 'g', long, env = "VEXIL_SYNC_PORT", default_value_t = 8015)]
    pub sync_port: u16,
    /// OFREP (HTTP/JSON) port.
    #[arg(short = 'r', long, env = "VEXIL_OFREP_PORT", default_value_t = 8016)]
    pub ofrep_port: u16,
    /// Address to listen on.
    #[arg(long, env = "VEXIL_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Static evaluation context `key=value`, added to every evaluation (and sent as sync_context).
    #[arg(
        short = 'X',
        long = "context-value",
        env = "VEXIL_CONTEXT_VALUE",
        value_delimiter = ','
    )]
    pub context_value: Vec<String>,
    /// `Header=key`: the request header's value becomes context `key`.
    #[arg(
        short = 'H',
        long = "context-from-header",
        env = "VEXIL_CONTEXT_FROM_HEADER",
        value_delimiter = ','
    )]
    pub context_from_header: Vec<String>,
    /// Allowed CORS origins for browser clients (gRPC-web, Connect, OFREP); none given (the default)
    /// or `*`: any origin, as flagd.
    #[arg(short = 'C', long = "cors-origin", env = "VEXIL_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// TLS certificate (PEM chain) for the evaluation, sync and OFREP ports; needs --server-key-path.
    #[arg(
        short = 'c',
        long = "server-cert-path",
        env = "VEXIL_SERVER_CERT_PATH",
        requires = "server_key_path"
    )]
    pub server_cert_path: Option<std::path::PathBuf>,
    /// TLS private key (PEM) matching --server-cert-path.
    #[arg(
        short = 'k',
        long = "server-key-path",
        env = "VEXIL_SERVER_KEY_PATH",
        requires = "server_cert_path"
    )]
    pub server_key_path: Option<std::path::PathBuf>,
    /// End EventStream and SyncFlags streams after this many seconds (0: never).
    #[arg(long, env = "VEXIL_STREAM_DEADLINE", default_value = "0", value_parser = parse_seconds)]
    pub stream_deadline: Duration,
    /// Largest request body, in bytes.
    #[arg(short = 'B', long, env = "VEXIL_MAX_REQUEST_BODY", default_value_t = 1_000_000)]
    pub max_request_body: usize,
    /// Largest total size of request headers, in bytes.
    #[arg(short = 'R', long, env = "VEXIL_MAX_REQUEST_HEADER", default_value_t = 1_000_000)]
    pub max_request_header: usize,
    /// Most EventStream and SyncFlags streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "VEXIL_MAX_STREAMS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams: u64,
    /// Most client connections open at once, per port; more are answered 503 / UNAVAILABLE and
    /// closed.
    #[arg(long, env = "VEXIL_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Seconds a new connection may take to send its first request's headers (slow clients are
    /// disconnected).
    #[arg(long, env = "VEXIL_HEADER_READ_TIMEOUT", default_value = "10", value_parser = parse_positive_seconds)]
    pub header_read_timeout: Duration,
    /// Seconds a request's body may take to arrive after its headers (slow clients get 408 /
    /// `DEADLINE_EXCEEDED`).
    #[arg(long, env = "VEXIL_BODY_READ_TIMEOUT", default_value = "10", value_parser = parse_positive_seconds)]
    pub body_read_timeout: Duration,
    /// Seconds a connection with no request or stream in flight is kept open (0: forever).
    #[arg(long, env = "VEXIL_IDLE_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub idle_timeout: Duration,
    /// `fractional` bucketing generation: v3 (current spec, default), v2 (flagd 0.15–0.16), v1
    /// (flagd ≤ 0.14). Use the one your previous flagd ran to keep users in their buckets.
    #[arg(long, env = "VEXIL_FRACTIONAL", default_value = "v3", value_parser = parse_fractional)]
    pub fractional: FractionalMode,
    /// Seconds a source may keep failing to load before /readyz reports 412 (0: never).
    #[arg(long, env = "VEXIL_STALE_AFTER", default_value = "60", value_parser = parse_seconds)]
    pub stale_after: Duration,
    /// How often file sources are checked for changes, in milliseconds.
    #[arg(long, env = "VEXIL_POLL_INTERVAL_MS", default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// Answer flagd.sync.v1 GetMetadata with UNIMPLEMENTED.
    #[arg(long, env = "VEXIL_DISABLE_SYNC_METADATA")]
    pub disable_sync_metadata: bool,
    /// Log format: `text` (default) or `json` (one object per line). The level is `VEXIL_LOG`'s
    /// (a tracing filter such as `info` or `vexil_server=debug`).
    #[arg(long, env = "VEXIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The same as `--log-format json` (the option's former name).
    #[arg(long, env = "VEXIL_LOG_JSON", hide = true)]
    pub log_json: bool,
    /// On SIGTERM, /readyz answers 503 for this many seconds before the listeners close, so load
    /// balancers stop sending requests.
    #[arg(long, env = "VEXIL_SHUTDOWN_DELAY", default_value = "5", value_parser = parse_seconds)]
    pub shutdown_delay: Duration,
    /// Seconds in-flight requests and streams get to finish once the listeners are closed (after
    /// --shutdown-delay).
    #[arg(long, env = "VEXIL_SHUTDOWN_TIMEOUT", default_value = "20", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,
    /// A bootstrap admin API key (global), accepted besides the keys in the store. Prefer the
    /// environment or the configuration file to the command line, where other users can see it.
    #[arg(long, env = "VEXIL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The managed store's database: `postgres://…` or `sqlite:<file>`; `none`: no store.
    /// Default: `sqlite:vexil.db` for `serve`, none for flagd's `start`.
    #[arg(long, env = "VEXIL_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The environment whose flag sets requests without a selector see (beside the file
    /// sources); every environment's flag sets are served under `flagSetId=<environment>/<set>`.
    #[arg(long, env = "VEXIL_DEFAULT_ENVIRONMENT", default_value = "default")]
    pub default_environment: String,
    /// How often the store is checked for changes made by other processes, in milliseconds (the
    /// backstop for a missed change message). With --redis-url, Redis's snapshot versions are
    /// checked at this interval and the database's every tenth time (every time while Redis is
    /// down).
    #[arg(long, env = "VEXIL_STORE_POLL_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    pub store_poll_interval_ms: u64,
    /// Tracking: events per second each API key (or, without keys, each environment) may send;
    /// 0: unlimited. Over it, TrackingService answers RESOURCE_EXHAUSTED (HTTP 429, Retry-After).
    #[arg(long, env = "VEXIL_TRACK_RATE_LIMIT", default_value_t = 5000)]
    pub track_rate_limit: u32,
    /// Tracking: the burst above the rate (the most events one call may carry under the limit).
    #[arg(long, env = "VEXIL_TRACK_BURST", default_value_t = 10000)]
    pub track_burst: u32,
    /// Tracking: the event property keys an environment keeps, `<environment>=<key>,<key>,…`
    /// (repeatable); other keys are dropped. Default: any key (secrets are always scrubbed).
    #[arg(long = "track-properties", env = "VEXIL_TRACK_PROPERTIES", value_delimiter = ';')]
    pub track_properties: Vec<String>,
    /// Tracking: how long event ids are remembered, in days: a retry within it is counted once
    /// (the events themselves stay).
    #[arg(long, env = "VEXIL_TRACK_DEDUPE_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub track_dedupe_days: u32,
    /// Tracking: delete events older than this many days (0: keep them; on Postgres whole day
    /// partitions are dropped).
    #[arg(long, env = "VEXIL_EVENT_RETENTION_DAYS", default_value_t = 0)]
    pub event_retention_days: u32,
    /// How often the results of running experiments are computed in the background, in seconds
    /// (0: only on request). A results request with the default options gets the last ones.
    #[arg(long, env = "VEXIL_RESULTS_REFRESH_SECONDS", default_value_t = 300)]
    pub results_refresh_seconds: u64,
    /// Tracking: replace email addresses in event properties with `[email]`.
    #[arg(long, env = "VEXIL_TRACK_SCRUB_EMAILS")]
    pub track_scrub_emails: bool,
    /// Redis, for replicas sharing one database: `redis://[user:password@]host:port[/db]`. Changes
    /// are announced on its pub/sub and each environment's snapshot is cached there for replicas
    /// that start. Without it, changes are announced inside the process (one replica; others
    /// find changes by the version check). Needs the store.
    #[arg(long, env = "VEXIL_REDIS_URL")]
    pub redis_url: Option<String>,
    /// For a `rediss://` (TLS) --redis-url: a PEM file of the certificate authority (or the
    /// self-signed certificate) to verify the server with, instead of the system's roots.
    #[arg(long, env = "VEXIL_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<std::path::PathBuf>,
    /// Prefix of Vexil's Redis keys and channel (deployments sharing a Redis use different ones).
    #[arg(long, env = "VEXIL_REDIS_KEY_PREFIX", default_value = "vexil:")]
    pub redis_key_prefix: String,
    /// Require an API key (evaluate or admin, of the default environment) on flagd's protocols
    /// and OFREP too; without it they are open, as in flagd. Needs the store (the keys live there).
    #[arg(long, env = "VEXIL_FLAGD_KEYS")]
    pub flagd_keys: bool,
    /// Set when the command was flagd's `start`: no store unless --database-url names one.
    #[arg(skip)]
    pub flagd_start: bool,
}

/// The longest duration flagd accepts (Go's `time.Duration`, int64 nanoseconds): about 292 years.
/// Longer ones would overflow `Duration` (a panic in `from_secs_f64`) or `Instant` arithmetic.
const MAX_SECONDS: f64 = 9_223_372_036.0;

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let s = s.trim_end_matches('s');
    let secs = s
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| format!("`{s}` is not a number of seconds"))?;
    if secs > MAX_SECONDS {
        return Err(format!("`{s}` seconds is too long (at most {MAX_SECONDS} seconds)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_positive_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be more than 0 seconds"));
    }
    Ok(d)
}

fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("`{s}` is not an http:// URL with a host"));
    }
    Ok(uri)
}

fn parse_fractional(s: &str) -> Result<FractionalMode, String> {
    FractionalMode::parse(s).ok_or_else(|| format!("`{s}` is not a fractional mode (v1, v2 or v3)"))
}

impl Cli {
    /// Parses the process arguments in layers (see [`Cli::try_parse_layered`]), exiting with a
    /// message on a bad argument or configuration file.
    pub fn parse_with_flagd_env() -> Cli {
        Cli::parse_from_with_env(std::env::args_os(), |k| std::env::var(k).ok())
    }

    /// As [`Cli::parse_with_flagd_env`], with the arguments and environment given (the
    /// configuration file is read from disk).
    pub fn parse_from_with_env<I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Cli::try_parse_layered(args, env, |path| std::fs::read_to_string(path)).unwrap_or_else(|e| e.exit())
    }

    /// The command line in layers, each filling the options the ones before it left unset: the
    /// arguments, `VEXIL_*`, flagd's `FLAGD_*` (for `serve`), the configuration file (`--config`
    /// or `VEXIL_CONFIG`, read with `read`), then the defaults.
    ///
    /// clap reads `VEXIL_*` from the process itself; `env` is consulted too for the options that
    /// are still unset, so tests give their environment (and `VEXIL_CONFIG`) without touching the
    /// process's, and `read` stands for the file system.
    pub fn try_parse_layered<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
        read: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Cli, ParseError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let flagd_start = args.get(1).is_some_and(|a| a == "start");
        let cmd = Cli::command();
        let mut matches = cmd.clone().try_get_matches_from(args.clone())?;
        let (leaf_cmd, leaf) = leaf(&cmd, &matches);
        if leaf_cmd.get_arguments().any(|a| a.get_id() == "config") {
            // Options given on the command line or in the process's environment.
            let mut taken: HashSet<String> = leaf_cmd
                .get_arguments()
                .map(|a| a.get_id().as_str())
                .filter(|id| {
                    matches!(
                        leaf.value_source(id),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    )
                })
                .map(str::to_owned)
                .collect();
            let config = leaf.get_one::<PathBuf>("config").cloned();

            let mut extra = env_layer(leaf_cmd, &env, &mut taken);
            if leaf_cmd.get_name() == "serve" {
                for (id, more) in flagd_layer(&env, |id| !taken.contains(id)) {
                    taken.insert(id.to_owned());
                    extra.extend(more);
                }
            }
            if !extra.is_empty() {
                args.extend(extra.into_iter().map(OsString::from));
                matches = cmd.clone().try_get_matches_from(args.clone())?;
            }

            if let Some(path) = config.or_else(|| env("VEXIL_CONFIG").map(PathBuf::from)) {
                let (entries, mut problems) = match read(&path) {
                    Ok(text) => config_file(&text),
                    Err(e) => (Vec::new(), vec![format!("cannot read the file: {e}")]),
                };
                let mut from_file = Vec::new();
                for arg in leaf_cmd
                    .get_arguments()
                    .filter(|a| !taken.contains(a.get_id().as_str()))
                {
                    if let Some(entry) = entries.iter().find(|e| Some(e.key.as_str()) == arg.get_long()) {
                        from_file.extend(entry.args.iter().map(OsString::from));
                    }
                }
                if !from_file.is_empty() {
                    args.extend(from_file);
                    match cmd.clone().try_get_matches_from(args) {
                        Ok(m) => matches = m,
                        // Each entry passed on its own: options that need one another.
                        Err(e) => problems.push(clap_problem(&e)),
                    }
                }
                if !problems.is_empty() {
                    return Err(ParseError::Config { file: path, problems });
                }
            }
        }
        let mut cli = Cli::from_arg_matches(&matches)?;
        if let Command::Serve(serve) = &mut cli.command {
            serve.flagd_start = flagd_start;
        }
        Ok(cli)
    }
}

/// Why the command line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A bad argument, or `--help` / `--version` (which clap prints).
    #[error(transparent)]
    Arguments(#[from] clap::Error),
    /// Every problem with the configuration file.
    #[error("invalid configuration in {}:\n  - {}", .file.display(), .problems.join("\n  - "))]
    Config { file: PathBuf, problems: Vec<String> },
}

impl ParseError {
    /// Prints the error and exits as clap does: 2 for a bad argument or file, 0 for `--help`.
    pub fn exit(&self) -> ! {
        match self {
            ParseError::Arguments(e) => e.exit(),
            ParseError::Config { .. } => {
                eprintln!("{self}");
                std::process::exit(2)
            }
        }
    }
}

/// The innermost subcommand run (`keys create`, `serve`, …) and its matches.
fn leaf<'c, 'm>(cmd: &'c clap::Command, matches: &'m ArgMatches) -> (&'c clap::Command, &'m ArgMatches) {
    let (mut cmd, mut matches) = (cmd, matches);
    while let Some((name, sub)) = matches.subcommand() {
        let Some(sub_cmd) = cmd.find_subcommand(name) else {
            break;
        };
        (cmd, matches) = (sub_cmd, sub);
    }
    (cmd, matches)
}

/// `--option=value` arguments for the options not yet `taken` whose `VEXIL_*` variable `env` has
/// (the process's own were read by clap already).
fn env_layer(cmd: &clap::Command, env: &impl Fn(&str) -> Option<String>, taken: &mut HashSet<String>) -> Vec<String> {
    let mut extra = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(long), Some(var)) = (arg.get_long(), arg.get_env().and_then(|v| v.to_str())) else {
            continue;
        };
        if taken.contains(arg.get_id().as_str()) {
            continue;
        }
        let Some(value) = env(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        taken.insert(arg.get_id().to_string());
        // A switch's variable is `true` or `false`, as clap reads it; anything else is refused.
        match value.as_str() {
            "true" if !arg.get_action().takes_values() => extra.push(format!("--{long}")),
            "false" if !arg.get_action().takes_values() => {}
            _ => extra.push(format!("--{long}={value}")),
        }
    }
    extra
}

/// flagd's environment variables for the options flagd has.
const FLAGD_ENV: &[(&str, &str)] = &[
    ("uri", "FLAGD_URI"),
    ("sources", "FLAGD_SOURCES"),
    ("port", "FLAGD_PORT"),
    ("management_port", "FLAGD_MANAGEMENT_PORT"),
    ("sync_port", "FLAGD_SYNC_PORT"),
    ("ofrep_port", "FLAGD_OFREP_PORT"),
    ("context_value", "FLAGD_CONTEXT_VALUE"),
    ("context_from_header", "FLAGD_CONTEXT_FROM_HEADER"),
    ("cors_origin", "FLAGD_CORS_ORIGIN"),
    ("server_cert_path", "FLAGD_SERVER_CERT_PATH"),
    ("server_key_path", "FLAGD_SERVER_KEY_PATH"),
    ("stream_deadline", "FLAGD_STREAM_DEADLINE"),
    ("max_request_body", "FLAGD_MAX_REQUEST_BODY"),
    ("max_request_header", "FLAGD_MAX_REQUEST_HEADER"),
    ("disable_sync_metadata", "FLAGD_DISABLE_SYNC_METADATA"),
];

/// `--option value` arguments for every option that took its default but has a `FLAGD_*` value.
pub(crate) fn flagd_fallbacks(sub: &ArgMatches, env: &impl Fn(&str) -> Option<String>) -> Vec<String> {
    flagd_layer(env, |id| {
        matches!(sub.value_source(id), None | Some(ValueSource::DefaultValue))
    })
    .into_iter()
    .flat_map(|(_, args)| args)
    .collect()
}

/// For each option `unset` says is unset and whose `FLAGD_*` variable `env` has: its id and its
/// arguments (none for a false switch, which still counts as set).
fn flagd_layer(
    env: &impl Fn(&str) -> Option<String>,
    unset: impl Fn(&str) -> bool,
) -> Vec<(&'static str, Vec<String>)> {
    let mut layer = Vec::new();
    for &(id, var) in FLAGD_ENV {
        let Some(value) = env(var).filter(|_| unset(id)) else {
            continue;
        };
        let flag = format!("--{}", id.replace('_', "-"));
        let args = match id {
            "disable_sync_metadata" => {
                if matches!(value.as_str(), "1" | "true" | "TRUE" | "True") {
                    vec![flag]
                } else {
                    Vec::new()
                }
            }
            // flagd's FLAGD_URI is a single value or comma separated.
            "uri" => value
                .split(',')
                .filter(|v| !v.is_empty())
                .flat_map(|v| [flag.clone(), v.to_owned()])
                .collect(),
            _ => vec![flag, value],
        };
        layer.push((id, args));
    }
    layer
}

// === The configuration file ===

/// One key of the configuration file as command-line arguments.
#[derive(Debug)]
struct FileEntry {
    key: String,
    args: Vec<String>,
}

/// Options that also take a mapping, whose entries become `key=value`.
const PAIR_OPTIONS: &[&str] = &["context-value", "context-from-header", "track-properties"];

/// The configuration file's entries, each checked on its own against `vexil serve`'s options, and
/// every problem found (in file order).
fn config_file(text: &str) -> (Vec<FileEntry>, Vec<String>) {
    let mapping = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        Ok(serde_yaml::Value::Null) => return (Vec::new(), Vec::new()),
        Ok(other) => {
            let problem = format!("the file must map option names to values; it is {}", describe(&other));
            return (Vec::new(), vec![problem]);
        }
        Err(e) => return (Vec::new(), vec![format!("not valid YAML: {e}")]),
    };
    let cmd = Cli::command();
    let serve = cmd.find_subcommand("serve").expect("serve is a subcommand");
    let options: Vec<&Arg> = serve
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    let (mut entries, mut problems) = (Vec::new(), Vec::new());
    for (key, value) in &mapping {
        let Some(key) = key.as_str() else {
            problems.push(format!("{} is not an option name", describe(key)));
            continue;
        };
        let at = line_of(text, key).map(|n| format!("line {n}: ")).unwrap_or_default();
        if key == "config" {
            problems.push(format!("{at}`config` cannot be set in the configuration file itself"));
            continue;
        }
        let Some(arg) = options.iter().find(|a| a.get_long() == Some(key)) else {
            problems.push(format!("{at}unknown option `{key}`{}", suggestion(key, &options)));
            continue;
        };
        match entry_args(arg, key, value).and_then(|args| accepted(arg, key, args)) {
            Ok(args) => entries.push(FileEntry {
                key: key.to_owned(),
                args,
            }),
            Err(problem) => problems.push(format!("{at}{problem}")),
        }
    }
    (entries, problems)
}

/// `value` as `--key=…` arguments, by the option's kind: a switch takes true or false, a
/// repeatable option a list (or one value; for [`PAIR_OPTIONS`] a mapping too), `sources` a list
/// of sources, others one value.
fn entry_args(arg: &Arg, key: &str, value: &serde_yaml::Value) -> Result<Vec<String>, String> {
    use serde_yaml::Value as Yaml;
    if !arg.get_action().takes_values() {
        return match value {
            Yaml::Bool(true) => Ok(vec![format!("--{key}")]),
            Yaml::Bool(false) => Ok(Vec::new()),
            other => Err(format!("`{key}` must be true or false, not {}", describe(other))),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    let values = match value {
        Yaml::Null => return Err(format!("`{key}` has no value")),
        Yaml::Sequence(_) if key == "sources" => {
            vec![serde_json::to_string(value).map_err(|e| format!("`{key}`: {e}"))?]
        }
        Yaml::Sequence(items) if repeatable => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                scalar(item).ok_or_else(|| format!("`{key}` item {} is {}, not a single value", i + 1, describe(item)))
            })
            .collect::<Result<_, _>>()?,
        Yaml::Mapping(pairs) if PAIR_OPTIONS.contains(&key) => pairs
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    // track-properties: `prod: [plan, country]`.
                    Yaml::Sequence(items) => items
                        .iter()
                        .map(scalar)
                        .collect::<Option<Vec<_>>>()
                        .map(|v| v.join(",")),
                    v => scalar(v),
                };
                match (scalar(k), v) {
                    (Some(k), Some(v)) => Ok(format!("{k}={v}")),
                    _ => Err(format!("`{key}` entries must map a name to a value")),
                }
            })
            .collect::<Result<_, _>>()?,
        Yaml::Sequence(_) | Yaml::Mapping(_) | Yaml::Tagged(_) => {
            let wanted = if repeatable {
                "a list of values"
            } else {
                "a single value"
            };
            return Err(format!("`{key}` takes {wanted}, not {}", describe(value)));
        }
        scalar_value => vec![scalar(scalar_value).unwrap_or_default()],
    };
    Ok(values.into_iter().map(|v| format!("--{key}={v}")).collect())
}

/// A string, number or boolean as text.
fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn describe(value: &serde_yaml::Value) -> &'static str {
    match value {
        serde_yaml::Value::Null => "empty",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

/// `args` if the option's own parser takes them (on a command of that option alone, so an option
/// that needs another is checked later, with the rest).
fn accepted(arg: &Arg, key: &str, args: Vec<String>) -> Result<Vec<String>, String> {
    let alone = clap::Command::new("vexil").no_binary_name(true).arg(
        arg.clone()
            .env(None::<&'static str>)
            .requires(clap::builder::Resettable::Reset),
    );
    match alone.try_get_matches_from(&args) {
        Ok(_) => Ok(args),
        Err(e) => Err(format!("`{key}`: {}", clap_problem(&e))),
    }
}

/// clap's message for `e` on one line, without its `error:` prefix and usage.
fn clap_problem(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let invalid = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => Some(v.as_str()),
        _ => None,
    };
    if let (Some(value), Some(cause)) = (invalid, std::error::Error::source(e)) {
        return format!("invalid value `{value}`: {cause}");
    }
    if let (Some(value), Some(ContextValue::Strings(valid))) = (invalid, e.get(ContextKind::ValidValue)) {
        return format!("invalid value `{value}` (possible values: {})", valid.join(", "));
    }
    let text = e.render().to_string();
    let text = text.trim_start_matches("error: ");
    let message = text.split("\n\n").next().unwrap_or(text);
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The line (1-based) where `key` is set, preferring top-level lines (best effort: for messages).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let sets = |line: &str| {
        [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")]
            .iter()
            .any(|p| line.starts_with(p.as_str()))
    };
    let lines = || text.lines().enumerate();
    lines()
        .find(|(_, line)| sets(line))
        .or_else(|| lines().find(|(_, line)| sets(line.trim_start())))
        .map(|(i, _)| i + 1)
}

/// ` (did you mean `port`?)` when an option's name is close to `key` (a typo, snake_case,
/// camelCase, `--port` or an environment variable's name).
fn suggestion(key: &str, options: &[&Arg]) -> String {
    let wanted = kebab(key);
    options
        .iter()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|long| (edit_distance(&wanted, long), long))
        .filter(|&(d, long)| d <= 2.max(long.len() / 4))
        .min()
        .map(|(_, long)| format!(" (did you mean `{long}`?)"))
        .unwrap_or_default()
}

/// `key` in kebab-case: `managementPort`, `management_port`, `VEXIL_MANAGEMENT_PORT` and
/// `--management-port` all become `management-port`.
fn kebab(key: &str) -> String {
    let key = key.trim_start_matches('-');
    let key = ["VEXIL_", "FLAGD_"]
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key);
    let mut out = String::with_capacity(key.len() + 4);
    let mut previous_upper = true;
    for c in key.chars() {
        if c == '_' {
            out.push('-');
        } else if c.is_ascii_uppercase() {
            if !previous_upper && !out.ends_with('-') {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
        previous_upper = c.is_ascii_uppercase() || c == '_';
    }
    out
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

impl ServeArgs {
    /// The log format: `--log-format`, or JSON when the older `--log-json` is set.
    pub fn resolved_log_format(&self) -> LogFormat {
        if self.log_json {
            LogFormat::Json
        } else {
            self.log_format
        }
    }

    /// The store's database URL, if the server runs one.
    pub fn store_url(&self) -> Option<String> {
        match self.database_url.as_deref() {
            Some("none") => None,
            Some(url) => Some(url.to_owned()),
            None if self.flagd_start => None,
            None => Some(DEFAULT_DATABASE_URL.to_owned()),
        }
    }

    /// The sources and static context, or every problem with the options that give them (all at
    /// once, not the first only).
    pub fn check(&self) -> Result<(Vec<SourceSpec>, StaticContext), Vec<String>> {
        let (sources, mut problems) = self.sources_checked();
        let (statics, more) = self.static_checked();
        problems.extend(more);
        if problems.is_empty() {
            Ok((sources, statics))
        } else {
            Err(problems)
        }
    }

    /// The sources, in priority order: `--sources` entries, then `--uri`s.
    pub fn source_specs(&self) -> Result<Vec<SourceSpec>, String> {
        let (sources, problems) = self.sources_checked();
        if problems.is_empty() {
            Ok(sources)
        } else {
            Err(problems.join("; "))
        }
    }

    /// `-X` and `-H` as a [`StaticContext`].
    pub fn static_context(&self) -> Result<StaticContext, String> {
        let (statics, problems) = self.static_checked();
        if problems.is_empty() {
            Ok(statics)
        } else {
            Err(problems.join("; "))
        }
    }

    fn sources_checked(&self) -> (Vec<SourceSpec>, Vec<String>) {
        let mut problems = Vec::new();
        let mut uris: Vec<String> = Vec::new();
        if let Some(json) = &self.sources {
            match serde_json::from_str::<Vec<Map<String, Value>>>(json) {
                Err(e) => problems.push(format!("--sources is not a JSON array of sources: {e}")),
                Ok(list) => {
                    for (i, entry) in list.iter().enumerate() {
                        let Some(uri) = entry.get("uri").and_then(Value::as_str) else {
                            problems.push(format!("--sources entry {i} needs a `uri`"));
                            continue;
                        };
                        match entry.get("provider").and_then(Value::as_str) {
                            None | Some("file") | Some("fsnotify") | Some("fileinfo") => uris.push(uri.to_owned()),
                            Some(other) => {
                                problems.push(format!("--sources provider `{other}` is not supported yet (use file)"));
                            }
                        }
                    }
                }
            }
        }
        uris.extend(self.uri.iter().cloned());
        let mut sources = Vec::new();
        for uri in &uris {
            match SourceSpec::parse(uri) {
                Ok(spec) => sources.push(spec),
                Err(e) => problems.push(e),
            }
        }
        (sources, problems)
    }

    fn static_checked(&self) -> (StaticContext, Vec<String>) {
        let mut problems = Vec::new();
        let mut values = Map::new();
        for kv in &self.context_value {
            match kv.split_once('=') {
                Some((k, v)) => {
                    values.insert(k.to_owned(), Value::String(v.to_owned()));
                }
                None => problems.push(format!("--context-value `{kv}` is not key=value")),
            }
        }
        let mut from_headers = Vec::new();
        for hk in &self.context_from_header {
            match hk.split_once('=') {
                Some((h, k)) => from_headers.push((h.to_ascii_lowercase(), k.to_owned())),
                None => problems.push(format!("--context-from-header `{hk}` is not Header=key")),
            }
        }
        (StaticContext { values, from_headers }, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str], env: &[(&str, &str)]) -> ServeArgs {
        serve_with(args, env, None)
    }

    /// `args` with the environment `env` and, when given, a configuration file `vexil.yaml`
    /// holding `file` (named by `VEXIL_CONFIG` unless `args` name one).
    fn parse(args: &[&str], env: &[(&str, &str)], file: Option<&str>) -> Result<Cli, ParseError> {
        let mut env: std::collections::HashMap<String, String> =
            env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        if file.is_some() {
            env.entry("VEXIL_CONFIG".into()).or_insert_with(|| "vexil.yaml".into());
        }
        let read = |_: &Path| file.map(str::to_owned).ok_or_else(|| std::io::Error::other("no file"));
        Cli::try_parse_layered(args.iter().copied(), |k| env.get(k).cloned(), read)
    }

    fn serve_with(args: &[&str], env: &[(&str, &str)], file: Option<&str>) -> ServeArgs {
        match parse(args, env, file).unwrap_or_else(|e| panic!("{e}")).command {
            Command::Serve(s) => *s,
            _ => panic!("not serve"),
        }
    }

    /// The problems `file` has, for `vexil serve`.
    fn problems(file: &str) -> Vec<String> {
        match parse(&["vexil", "serve"], &[], Some(file)) {
            Err(ParseError::Config { problems, .. }) => problems,
            Err(e) => panic!("not a configuration error: {e}"),
            Ok(_) => panic!("accepted: {file}"),
        }
    }

    #[test]
    fn flagd_options_and_defaults() {
        let s = serve(
            &[
                "vexil",
                "start",
                "-f",
                "file:a.json",
                "--uri",
                "b.yaml",
                "-p",
                "9013",
                "-X",
                "env=prod",
            ],
            &[],
        );
        assert_eq!(s.uri, ["file:a.json", "b.yaml"]);
        assert_eq!(
            (s.port, s.management_port, s.sync_port, s.ofrep_port),
            (9013, 8014, 8015, 8016)
        );
        assert_eq!(s.fractional, FractionalMode::V3);
        let specs = s.source_specs().unwrap();
        assert_eq!(specs.iter().map(|s| s.name()).collect::<Vec<_>>(), ["a.json", "b.yaml"]);
        assert_eq!(
            s.static_context().unwrap().values.get("env"),
            Some(&Value::from("prod"))
        );
    }

    #[test]
    fn flagd_environment_is_a_fallback() {
        let s = serve(
            &["vexil", "serve", "-m", "9999"],
            &[
                ("FLAGD_PORT", "7013"),
                ("FLAGD_MANAGEMENT_PORT", "1"),
                ("FLAGD_URI", "file:x.json,file:y.json"),
            ],
        );
        assert_eq!(s.port, 7013);
        assert_eq!(s.management_port, 9999, "the command line wins");
        assert_eq!(s.uri, ["file:x.json", "file:y.json"]);
    }

    #[test]
    fn sources_json_and_bad_values() {
        let s = serve(
            &[
                "vexil",
                "serve",
                "--sources",
                r#"[{"uri":"a.json","provider":"file"}]"#,
                "-f",
                "b.json",
            ],
            &[],
        );
        assert_eq!(
            s.source_specs().unwrap().iter().map(|s| s.name()).collect::<Vec<_>>(),
            ["a.json", "b.json"]
        );
        let s = serve(
            &[
                "vexil",
                "serve",
                "--sources",
                r#"[{"uri":"x","provider":"kubernetes"}]"#,
            ],
            &[],
        );
        assert!(s.source_specs().unwrap_err().contains("kubernetes"));
        let s = serve(&["vexil", "serve", "-X", "novalue"], &[]);
        assert!(s.static_context().is_err());
        // Every problem at once.
        let s = serve(
            &[
                "vexil",
                "serve",
                "--sources",
                r#"[{"uri":"x","provider":"kubernetes"}, {"provider":"file"}]"#,
                "-X",
                "novalue",
                "-H",
                "nokey",
            ],
            &[],
        );
        let problems = s.check().unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].contains("kubernetes") && problems[1].contains("entry 1"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("novalue") && problems[3].contains("nokey"),
            "{problems:?}"
        );
        assert!(Cli::try_parse_from(["vexil", "serve", "--fractional", "v9"]).is_err());
    }

    #[test]
    fn serve_runs_the_embedded_store_and_flagd_start_none_unless_named() {
        assert_eq!(
            serve(&["vexil", "serve"], &[]).store_url().as_deref(),
            Some(DEFAULT_DATABASE_URL)
        );
        assert_eq!(serve(&["vexil", "start", "-f", "a.json"], &[]).store_url(), None);
        let named = serve(&["vexil", "start", "--database-url", "postgres://h/db"], &[]);
        assert_eq!(named.store_url().as_deref(), Some("postgres://h/db"));
        let from_env = serve(&["vexil", "serve"], &[]);
        assert_eq!(from_env.default_environment, "default");
        assert_eq!(
            serve(&["vexil", "serve", "--database-url", "none"], &[]).store_url(),
            None
        );
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let file = "
port: 3
management-port: 3
sync-port: 3
ofrep-port: 3
uri: [file:file.json]
context-value: {a: file}
cors-origin: https://file.example
disable-sync-metadata: false
track-scrub-emails: true
flagd-keys: true
";
        let s = serve_with(
            &[
                "vexil",
                "serve",
                "--port",
                "1",
                "-f",
                "cli.json",
                "--disable-sync-metadata",
            ],
            &[
                ("VEXIL_PORT", "2"),
                ("VEXIL_MANAGEMENT_PORT", "2"),
                ("VEXIL_SYNC_PORT", "2"),
                ("FLAGD_SYNC_PORT", "4"),
                ("FLAGD_OFREP_PORT", "4"),
                ("VEXIL_URI", "env.json"),
                ("VEXIL_CONTEXT_VALUE", "a=env"),
                ("VEXIL_TRACK_SCRUB_EMAILS", "false"),
            ],
            Some(file),
        );
        // A scalar: flag > VEXIL_ > FLAGD_ > file > default.
        assert_eq!(s.port, 1);
        assert_eq!(s.management_port, 2);
        assert_eq!(s.sync_port, 2, "VEXIL_ beats FLAGD_");
        assert_eq!(s.ofrep_port, 4, "FLAGD_ beats the file");
        // A list: the first layer that has it gives all of it.
        assert_eq!(s.uri, ["cli.json"]);
        assert_eq!(s.context_value, ["a=env"]);
        assert_eq!(s.cors_origin, ["https://file.example"]);
        assert!(s.context_from_header.is_empty());
        // A boolean.
        assert!(s.disable_sync_metadata, "the flag beats the file's false");
        assert!(!s.track_scrub_emails, "the environment's false beats the file's true");
        assert!(s.flagd_keys);
        assert!(!s.log_json);
        // Defaults.
        assert_eq!(s.stale_after, Duration::from_secs(60));
        assert_eq!(s.shutdown_delay, Duration::from_secs(5));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(s.resolved_log_format(), LogFormat::Text);

        let file_only = serve_with(&["vexil", "serve"], &[], Some(file));
        assert_eq!(
            (
                file_only.port,
                file_only.uri.as_slice(),
                file_only.context_value.as_slice()
            ),
            (3, &["file:file.json".to_owned()][..], &["a=file".to_owned()][..])
        );
        assert!(!file_only.disable_sync_metadata && file_only.track_scrub_emails);
    }

    #[test]
    fn file_values_take_yaml_json_and_command_line_forms() {
        let s = serve_with(
            &["vexil", "start"],
            &[],
            Some(
                "
uri: file:one.yaml
sources: [{uri: a.json, provider: file}]
context-value: [env=prod, tier=1]
context-from-header: {X-User: user}
track-properties: {prod: [plan, country], dev: any}
stream-deadline: 30s
shutdown-delay: 2.5
shutdown-timeout: 0
max-streams: 10
bind: 127.0.0.1
fractional: v2
log-json: true
admin-token: secret
database-url: none
",
            ),
        );
        assert!(s.flagd_start);
        assert_eq!(s.uri, ["file:one.yaml"]);
        assert_eq!(
            s.source_specs().unwrap().iter().map(|s| s.name()).collect::<Vec<_>>(),
            ["a.json", "one.yaml"]
        );
        assert_eq!(s.context_value, ["env=prod", "tier=1"]);
        assert_eq!(s.context_from_header, ["X-User=user"]);
        assert_eq!(s.track_properties, ["prod=plan,country", "dev=any"]);
        assert_eq!(s.stream_deadline, Duration::from_secs(30));
        assert_eq!(s.shutdown_delay, Duration::from_millis(2500));
        assert_eq!(s.shutdown_timeout, Duration::ZERO);
        assert_eq!(s.max_streams, 10);
        assert_eq!(s.bind, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(s.fractional, FractionalMode::V2);
        assert_eq!(s.resolved_log_format(), LogFormat::Json);
        assert_eq!(s.admin_token.as_deref(), Some("secret"));
        assert_eq!(s.store_url(), None);
        s.check().unwrap();

        // JSON is YAML.
        let s = serve_with(
            &["vexil", "serve"],
            &[],
            Some(r#"{"port": 9, "log-format": "json", "cors-origin": ["a", "b"], "flagd-keys": true}"#),
        );
        assert_eq!(
            (s.port, s.resolved_log_format(), s.flagd_keys),
            (9, LogFormat::Json, true)
        );
        assert_eq!(s.cors_origin, ["a", "b"]);
        // Empty and comment-only files configure nothing.
        assert_eq!(serve_with(&["vexil", "serve"], &[], Some("# nothing yet\n")).port, 8013);
    }

    #[test]
    fn config_is_named_by_flag_or_environment() {
        let read = |path: &Path| {
            assert_eq!(path, Path::new("/etc/vexil/custom.yaml"));
            Ok("port: 7".to_owned())
        };
        let cli =
            Cli::try_parse_layered(["vexil", "serve", "--config", "/etc/vexil/custom.yaml"], |_| None, read).unwrap();
        assert!(matches!(cli.command, Command::Serve(s) if s.port == 7));
        let cli = Cli::try_parse_layered(
            ["vexil", "serve"],
            |k| (k == "VEXIL_CONFIG").then(|| "/etc/vexil/custom.yaml".to_owned()),
            read,
        )
        .unwrap();
        assert!(matches!(cli.command, Command::Serve(s) if s.port == 7));
        // No file named: nothing is read.
        let cli = Cli::try_parse_layered(["vexil", "serve"], |_| None, |_| panic!("read")).unwrap();
        assert!(matches!(cli.command, Command::Serve(s) if s.port == 8013));
    }

    #[test]
    fn store_commands_take_the_database_url_from_the_file() {
        let file = Some("database-url: postgres://h/db\nport: 9\nuri: [a.json]\n");
        for args in [
            &["vexil", "migrate"][..],
            &["vexil", "import", "f.json", "-e", "prod", "--flag-set", "web"],
            &["vexil", "export", "-e", "prod", "--flag-set", "web"],
            &["vexil", "keys", "create", "--role", "admin"],
        ] {
            let database = match parse(args, &[], file).unwrap().command {
                Command::Migrate(d) => d,
                Command::Import(a) => a.database,
                Command::Export(a) => a.database,
                Command::Keys(KeysArgs {
                    command: KeysCommand::Create { database, .. },
                }) => database,
                other => panic!("{other:?}"),
            };
            assert_eq!(database.database_url, "postgres://h/db", "{args:?}");
        }
        let Command::Migrate(d) = parse(&["vexil", "migrate", "--database-url", "sqlite:x.db"], &[], file)
            .unwrap()
            .command
        else {
            panic!("not migrate")
        };
        assert_eq!(d.database_url, "sqlite:x.db", "the flag wins");
        // The whole file is checked, even keys the command does not use.
        let e = parse(&["vexil", "migrate"], &[], Some("database-url: sqlite:a.db\nport: x\n")).unwrap_err();
        assert!(e.to_string().contains("`port`"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        let p =
            problems("port: 1\nprot: 2\nmanagement_port: 3\nVEXIL_BIND: 0.0.0.0\nmanagementPort: 4\ncolour: blue\n");
        assert_eq!(
            p,
            [
                "line 2: unknown option `prot` (did you mean `port`?)",
                "line 3: unknown option `management_port` (did you mean `management-port`?)",
                "line 4: unknown option `VEXIL_BIND` (did you mean `bind`?)",
                "line 5: unknown option `managementPort` (did you mean `management-port`?)",
                "line 6: unknown option `colour`",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let file = "
port: [1, 2]
management-port: abc
log-format: xml
max-streams: 0
flagd-keys: yes please
shutdown-delay: soon
uri: {a: 1}
context-value: [[nested]]
bind: ~
config: other.yaml
server-cert-path: cert.pem
tyop: 1
";
        let p = problems(file);
        let expected = [
            "line 2: `port` takes a single value, not a list",
            "line 3: `management-port`: invalid value `abc`: invalid digit found in string",
            "line 4: `log-format`: invalid value `xml` (possible values: text, json)",
            "line 5: `max-streams`: invalid value `0`: 0 is not in 1..18446744073709551615",
            "line 6: `flagd-keys` must be true or false, not a string",
            "line 7: `shutdown-delay`: invalid value `soon`: `soon` is not a number of seconds",
            "line 8: `uri` takes a list of values, not a mapping",
            "line 9: `context-value` item 1 is a list, not a single value",
            "line 10: `bind` has no value",
            "line 11: `config` cannot be set in the configuration file itself",
            "line 13: unknown option `tyop`",
        ];
        assert_eq!(p[..11], expected, "{p:#?}");
        // Options needing one another are checked together, after each on its own.
        assert!(
            p[11].contains("--server-key-path") && p[11].contains("required"),
            "{p:#?}"
        );
        assert_eq!(p.len(), 12, "{p:#?}");

        let message = parse(&["vexil", "serve"], &[], Some(file)).unwrap_err().to_string();
        assert!(
            message.starts_with("invalid configuration in vexil.yaml:\n  - line 2: `port` takes"),
            "{message}"
        );
        assert_eq!(message.matches("\n  - ").count(), 12, "{message}");
    }

    #[test]
    fn unreadable_and_malformed_files() {
        assert_eq!(
            problems("port: 1\nuri: [a.json\nbind: 0.0.0.0\n").len(),
            1,
            "a syntax error is one problem"
        );
        let p = problems("port: 1\nuri: [a.json\nbind: 0.0.0.0\n");
        assert!(p[0].starts_with("not valid YAML: ") && p[0].contains("line 3"), "{p:?}");
        let p = problems("port: 1\n  bad indent: 2\n");
        assert!(p[0].contains("line 2"), "{p:?}");
        assert_eq!(
            problems("- port\n- 8013\n"),
            ["the file must map option names to values; it is a list"]
        );
        assert_eq!(problems("1: x\n"), ["a number is not an option name"]);
        let e = Cli::try_parse_layered(
            ["vexil", "serve", "--config", "missing.yaml"],
            |_| None,
            |p| std::fs::read_to_string(p),
        )
        .unwrap_err();
        let message = e.to_string();
        assert!(
            message.starts_with("invalid configuration in missing.yaml:\n  - cannot read the file: "),
            "{message}"
        );
        // A bad flag is clap's error, not the file's.
        let e = parse(&["vexil", "serve", "--port", "x"], &[], Some("port: 1")).unwrap_err();
        assert!(matches!(e, ParseError::Arguments(_)), "{e}");
    }

    #[test]
    fn the_example_configuration_loads() {
        let example = include_str!("../../../examples/vexil.yaml");
        let s = serve_with(&["vexil", "serve"], &[], Some(example));
        assert_eq!(s.uri, ["file:examples/flags.json"]);
        assert_eq!(s.resolved_log_format(), LogFormat::Json);
        assert_eq!(s.shutdown_delay, Duration::from_secs(5));
        let (sources, statics) = s.check().unwrap();
        assert_eq!(sources.len(), 1);
        assert!(!statics.values.is_empty());
    }

    #[test]
    fn every_serve_option_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let mut missing = Vec::new();
        for arg in serve.get_arguments().filter(|a| a.get_id() != "help") {
            let long = arg.get_long().expect("serve's options are named");
            if !doc.contains(&format!("`--{long}`")) {
                missing.push(format!("`--{long}`"));
            }
            if let Some(var) = arg.get_env().and_then(|v| v.to_str())
                && !doc.contains(&format!("`{var}`"))
            {
                missing.push(format!("`{var}`"));
            }
        }
        for (_, var) in FLAGD_ENV {
            if !doc.contains(&format!("`{var}`")) {
                missing.push(format!("`{var}`"));
            }
        }
        for sub in ["migrate", "import", "export", "keys", "health", "validate"] {
            if !doc.contains(&format!("`vexil {sub}")) {
                missing.push(format!("`vexil {sub}`"));
            }
        }
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {}",
            missing.join(", ")
        );
    }

    #[test]
    fn health_defaults_and_urls() {
        let Command::Health(h) = Cli::try_parse_from(["vexil", "health"]).unwrap().command else {
            panic!("not health")
        };
        assert_eq!(h.url.to_string(), DEFAULT_HEALTH_URL);
        assert_eq!(h.timeout, Duration::from_secs(3));
        assert!(Cli::try_parse_from(["vexil", "health", "--url", "https://h/readyz"]).is_err());
        assert!(Cli::try_parse_from(["vexil", "health", "--url", "/readyz"]).is_err());
        assert!(Cli::try_parse_from(["vexil", "health", "--timeout", "0"]).is_err());
    }

    #[test]
    fn suggestions_tolerate_case_and_separators() {
        assert_eq!(kebab("managementPort"), "management-port");
        assert_eq!(kebab("FLAGD_MAX_REQUEST_BODY"), "max-request-body");
        assert_eq!(kebab("--log-format"), "log-format");
        assert_eq!(edit_distance("prot", "port"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
