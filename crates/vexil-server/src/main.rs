//! The `vexil` binary.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};
use vexil_server::Stop;
use vexil_server::config::{Cli, Command, HealthArgs, LogFormat};
use vexil_server::store_cli;
use vexil_server::telemetry::{self, OtelSettings, Tracing};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_with_flagd_env();
    match cli.command {
        Command::Validate(args) => {
            let failed = vexil_server::validate::run(&args.files, &mut std::io::stdout())?;
            std::process::exit(i32::from(failed > 0));
        }
        Command::Migrate(args) => run(store_cli::migrate(&args, &mut std::io::stdout())),
        Command::Import(args) => run(store_cli::import(&args, &mut std::io::stdout())),
        Command::Export(args) => run(store_cli::export(&args, &mut std::io::stdout())),
        Command::Keys(args) => run(store_cli::keys(&args.command, &mut std::io::stdout())),
        Command::Health(args) => {
            let healthy = run(health(&args))?;
            std::process::exit(i32::from(!healthy));
        }
        Command::Serve(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                // OpenTelemetry only when the OTEL_* variables ask for it (the exporter needs the
                // runtime); every problem with them is reported at once.
                let otel = OtelSettings::from_env(|k| std::env::var(k).ok()).map_err(|problems| {
                    anyhow::anyhow!("invalid OpenTelemetry configuration:\n  - {}", problems.join("\n  - "))
                })?;
                let tracing = match &otel {
                    OtelSettings::Off => None,
                    OtelSettings::Otlp { .. } => Some(Tracing::install(&otel)?),
                };
                init_logging(args.resolved_log_format(), tracing.as_ref());
                if let OtelSettings::Otlp { endpoint, protocol, .. } = &otel {
                    tracing::info!(%endpoint, protocol = protocol.as_str(), "exporting traces over OTLP");
                }
                let (stop, signals) = watch::channel(Stop::Running);
                tokio::spawn(async move {
                    let first = next_signal().await;
                    tracing::info!(signal = ?first, "shutting down");
                    let _ = stop.send(first);
                    let _ = next_signal().await;
                    let _ = stop.send(Stop::Now);
                    std::future::pending::<()>().await;
                });
                let result = vexil_server::serve(*args, signals).await;
                if let Some(tracing) = tracing {
                    // Spans still queued are exported before exit.
                    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
                }
                result
            })
        }
    }
}

/// Runs one of the short commands on a runtime of its own.
fn run<T>(command: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(command)
}

/// Logs to standard error in `format`, filtered by `VEXIL_LOG` (default `info`); with `tracing`,
/// spans also go to OpenTelemetry (filtered on their own: the log level does not hide them).
fn init_logging(format: LogFormat, tracing: Option<&Tracing>) {
    let mut filter = EnvFilter::try_from_env("VEXIL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Request spans and evaluation events are for the trace exporter, not the log.
    for target in [telemetry::REQUEST_TARGET, telemetry::EVALUATION_TARGET] {
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(tracing.map(Tracing::layer))
        .init();
}

/// `vexil health`: GETs the URL (HTTP/1.0, plain), prints the status line and body, and says
/// whether the status was 200.
async fn health(args: &HealthArgs) -> anyhow::Result<bool> {
    let url = &args.url;
    match tokio::time::timeout(args.timeout, get(url)).await {
        Ok(Ok(response)) => {
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            let status = head.lines().next().unwrap_or_default();
            println!("{status}");
            if !body.trim().is_empty() {
                println!("{}", body.trim_end());
            }
            Ok(status.split_whitespace().nth(1) == Some("200"))
        }
        Ok(Err(e)) => {
            eprintln!("vexil health: {url}: {e}");
            Ok(false)
        }
        Err(_) => {
            eprintln!("vexil health: {url}: no answer within {:?}", args.timeout);
            Ok(false)
        }
    }
}

/// The raw answer to `GET url` (its first 64 KiB).
async fn get(url: &http::Uri) -> std::io::Result<String> {
    let host = url.host().unwrap_or("127.0.0.1");
    let port = url.port_u16().unwrap_or(80);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut stream = tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
    let authority = url.authority().map_or(host, |a| a.as_str());
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: vexil-health\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response).await?;
    if response.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "empty answer"));
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The next signal, as what it asks: SIGTERM (Kubernetes, Docker) a graceful drain, Ctrl-C (a
/// person at a terminal) to stop without the drain delay.
async fn next_signal() -> Stop {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return Stop::Now;
            }
        };
        tokio::select! {
            _ = ctrl_c => Stop::Now,
            _ = term.recv() => Stop::Drain,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        Stop::Now
    }
}
