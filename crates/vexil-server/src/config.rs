//! Command line and environment: flagd's `start` options, under `vexil serve` (alias `start`), and
//! the managed store's commands (`migrate`, `import`, `export`, `keys`).
//!
//! Every option reads `VEXIL_<NAME>`; where flagd has the option, `FLAGD_<NAME>` is read too (the
//! `VEXIL_` name wins), so a flagd deployment's environment keeps working.

use std::net::IpAddr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
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
}

/// The store's database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `postgres://user:password@host/db` or `sqlite:<file>`.
    #[arg(long, env = "VEXIL_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
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
pub struct ServeArgs {
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
    /// Log as JSON lines.
    #[arg(long, env = "VEXIL_LOG_JSON")]
    pub log_json: bool,
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

fn parse_fractional(s: &str) -> Result<FractionalMode, String> {
    FractionalMode::parse(s).ok_or_else(|| format!("`{s}` is not a fractional mode (v1, v2 or v3)"))
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

impl Cli {
    /// Parses the process arguments, falling back to flagd's `FLAGD_*` variables for options given
    /// neither on the command line nor as `VEXIL_*`.
    pub fn parse_with_flagd_env() -> Cli {
        Cli::parse_from_with_env(std::env::args_os(), |k| std::env::var(k).ok())
    }

    /// As [`Cli::parse_with_flagd_env`], with the arguments and environment given.
    pub fn parse_from_with_env<I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let matches = Cli::command().get_matches_from(args.clone());
        let Some(("serve" | "start", sub)) = matches.subcommand() else {
            return Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        };
        let extra = flagd_fallbacks(sub, &env);
        let mut cli = if extra.is_empty() {
            Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
        } else {
            let mut args = args.clone();
            args.extend(extra.into_iter().map(Into::into));
            Cli::try_parse_from(args).unwrap_or_else(|e| e.exit())
        };
        if let Command::Serve(serve) = &mut cli.command {
            serve.flagd_start = args.get(1).is_some_and(|a| a == "start");
        }
        cli
    }
}

/// `--option value` arguments for every option that took its default but has a `FLAGD_*` value.
pub(crate) fn flagd_fallbacks(sub: &ArgMatches, env: &impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut extra = Vec::new();
    for &(id, var) in FLAGD_ENV {
        let defaulted = matches!(sub.value_source(id), None | Some(ValueSource::DefaultValue));
        let Some(value) = env(var).filter(|_| defaulted) else {
            continue;
        };
        let flag = format!("--{}", id.replace('_', "-"));
        match id {
            "disable_sync_metadata" => {
                if matches!(value.as_str(), "1" | "true" | "TRUE" | "True") {
                    extra.push(flag);
                }
            }
            "uri" => {
                // flagd's FLAGD_URI is a single value or comma separated.
                for v in value.split(',').filter(|v| !v.is_empty()) {
                    extra.push(flag.clone());
                    extra.push(v.to_owned());
                }
            }
            _ => {
                extra.push(flag);
                extra.push(value);
            }
        }
    }
    extra
}

impl ServeArgs {
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
        let env: std::collections::HashMap<String, String> =
            env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let cli = Cli::parse_from_with_env(args.iter().copied(), |k| env.get(k).cloned());
        match cli.command {
            Command::Serve(s) => *s,
            _ => panic!("not serve"),
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
}
