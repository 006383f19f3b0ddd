//! The `pullproxy` command line.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pullproxy::{
    config::Config,
    original_dst::{MemoryOriginalDst, OriginalDstSource},
    redirect::{self, Redirector},
    server, telemetry,
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "pullproxy",
    version,
    about = "Transparent, node-local pull proxy for container images"
)]
struct Cli {
    /// Configuration file (default: the embedded configuration).
    #[arg(long, short, global = true, env = "PULLPROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and the kernel redirect (the default).
    Run,
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Detach the kernel programs and remove everything pinned under the pin directory.
    Uninstall,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig { file } => check_config(file),
        Command::Uninstall => uninstall(cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    Config::load(Some(&file))?;
    println!("{}: ok", file.display());
    Ok(())
}

fn uninstall(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let removed = redirect::uninstall(&config.redirect.pin_dir)
        .with_context(|| format!("removing pins under {}", config.redirect.pin_dir.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}", config.redirect.pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    telemetry::init(&config.log);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = server::bind(&config.listen.addresses, config.listen.port)?;
    info!(port = config.listen.port, "listening");
    let records: Arc<dyn OriginalDstSource> = if config.redirect.enabled {
        let (redirector, records) = Redirector::install(config.redirect_settings())?;
        let redirector = Arc::new(Mutex::new(redirector));
        tokio::spawn(Redirector::watch_targets(redirector));
        Arc::new(records)
    } else {
        warn!("redirect.enabled is false: no connection is redirected to the proxy");
        Arc::new(MemoryOriginalDst::default())
    };
    info!("ready");
    tokio::select! {
        () = server::serve(listeners, records) => {
            error!("all listeners stopped");
            anyhow::bail!("listeners stopped")
        }
        signal = shutdown_signal() => {
            signal?;
            info!("shutting down; the kernel programs stay pinned and fail open while pullproxy is down");
            Ok(())
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
