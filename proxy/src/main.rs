//! The `pullproxy` command line.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pullproxy::{
    cache::Cache,
    client::{self, Connector, KnownAddrs},
    config::Config,
    hub::HubClient,
    original_dst::{MemoryOriginalDst, OriginalDstSource},
    redirect::{self, Redirector},
    registry::RegistryProxy,
    server::{self, Server},
    telemetry,
    tls::{self, CaCommand, LeafMinter, NodeCa},
    upstream::Upstream,
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
    /// The node CA: print it, install it into the system trust store, or check who trusts it.
    #[command(subcommand)]
    Ca(CaCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig { file } => check_config(file),
        Command::Uninstall => uninstall(cli.config),
        Command::Ca(cmd) => Config::load(cli.config.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(tls::cli::run(cmd, &c.tls_settings())?)),
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
    let tls_settings = config.tls_settings();
    let intercept = tls_settings.intercept_set()?;
    let (ca, notices) = NodeCa::load_or_generate(&tls_settings, &intercept)?;
    for notice in notices {
        warn!("{notice}");
    }
    let ca = Arc::new(ca);
    let minter = Arc::new(LeafMinter::new(ca.clone(), Arc::new(intercept)));
    let (client_tls, roots) =
        tls::upstream_client_config(&tls_settings.extra_upstream_cas, Some(&ca))?;
    info!(
        system = roots.system,
        extra = roots.extra,
        node_ca_skipped = roots.node_ca_skipped,
        "upstream trust roots"
    );
    let known = KnownAddrs::default();
    let http = client::build(Connector::new(
        client_tls,
        known.clone(),
        config.upstream.connect_timeout,
    ));
    let hub = config
        .hub_settings()
        .map(|s| HubClient::new(http.clone(), s));
    let cache_settings = config.cache_settings();
    let cache = Cache::open(&cache_settings)
        .await
        .with_context(|| format!("opening the cache in {}", cache_settings.dir.display()))?;
    let proxy = Arc::new(RegistryProxy::new(
        hub,
        Upstream::new(
            http,
            config.upstream.manifest_timeout,
            config.upstream.blob_idle_timeout,
        ),
        cache,
        config.upstream.blob_idle_timeout,
    ));

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
    let server = Arc::new(Server {
        records,
        acceptor: tokio_rustls::TlsAcceptor::from(tls::server_config(minter.clone())),
        minter,
        insecure: config.registries.insecure.clone(),
        known,
        proxy,
    });
    info!("ready");
    tokio::select! {
        () = server.serve(listeners) => {
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
