//! The `vexil` binary.

use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use vexil_server::config::{Cli, Command};
use vexil_server::store_cli;

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
        Command::Serve(args) => {
            init_logging(args.log_json);
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let (stop, shutdown) = watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutting down");
                    let _ = stop.send(true);
                });
                vexil_server::serve(*args, shutdown).await
            })
        }
    }
}

/// Runs one of the store's commands on a runtime of its own.
fn run(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(command)
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("VEXIL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
