//! The `pullproxy` command line.
#![expect(
    unsafe_code,
    reason = "umask(2) at start-up, which libc exposes only as an unsafe fn"
)]
#![deny(clippy::unwrap_used)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pullproxy::{
    app,
    config::Config,
    doctor::{self, DoctorArgs},
    redirect, telemetry,
    tls::{self, CaCommand},
    warm,
};

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
    /// Fill this node's cache with images ahead of a rollout, pulled through the running
    /// pullproxy (not into the container runtime's image store).
    Warm {
        /// Images: `nginx`, `quay.io/team/app:1.2`, `registry.k8s.io/pause@sha256:...`.
        #[arg(required = true)]
        images: Vec<String>,
        /// User for registries or token services that want credentials.
        #[arg(long)]
        user: Option<String>,
        /// File holding that user's password.
        #[arg(long, requires = "user")]
        password_file: Option<PathBuf>,
    },
    /// Check this node: kernel, BPF, cgroups, privileges, bpffs, runtimes, attached programs,
    /// trust in the node CA, the hub and the cache. Exits non-zero when something needs fixing.
    Doctor(DoctorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig { file } => check_config(file),
        Command::Uninstall => uninstall(cli.config),
        Command::Ca(cmd) => Config::load(cli.config.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(tls::cli::run(cmd, &c.tls)?)),
        Command::Doctor(args) => run_doctor(cli.config, &args),
        Command::Warm {
            images,
            user,
            password_file,
        } => warm(cli.config, &images, user, password_file),
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
    let config = Config::load(Some(&file))?;
    for var in &config.ignored_env {
        println!("{var}: not a PULLPROXY_<SECTION>__<KEY> override; ignored");
    }
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

fn run_doctor(config: Option<PathBuf>, args: &DoctorArgs) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    if doctor::run(&config, args, &mut std::io::stdout().lock())? {
        Ok(())
    } else {
        anyhow::bail!("the node needs the fixes listed above")
    }
}

/// Prints warm-up progress, one line per step.
struct Printed;

impl warm::Progress for Printed {
    fn step(&self, image: &pullproxy::oci::ImageRef, message: &str) {
        println!("{image}: {message}");
    }
}

fn warm(
    config: Option<PathBuf>,
    images: &[String],
    user: Option<String>,
    password_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let refs = images
        .iter()
        .map(|i| i.parse().with_context(|| format!("{i:?}")))
        .collect::<anyhow::Result<Vec<pullproxy::oci::ImageRef>>>()?;
    let password = match &password_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        None => String::new(),
    };
    let warmer = warm::Warmer::new(&config, user.as_deref().map(|u| (u, password.as_str())))?;
    let failed = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let mut failed = 0;
            for image in &refs {
                if let Err(e) = warmer.warm(image, &Printed).await {
                    eprintln!("{image}: {}", telemetry::error_chain(&e));
                    failed += 1;
                }
            }
            failed
        });
    if failed > 0 {
        anyhow::bail!("{failed} of {} image(s) could not be warmed", refs.len());
    }
    Ok(())
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    // Whatever the daemon creates is root's alone, also where a library or a future file forgets
    // to say so (the cache and the node CA set their modes explicitly). Only here: `ca install`
    // writes the system trust store, which everyone must be able to read.
    // SAFETY: umask only replaces the process's file mode creation mask; it touches no memory
    // and cannot fail.
    unsafe { libc::umask(0o077) };
    let config = Config::load(config.as_deref())?;
    telemetry::init(&config.log);
    for var in &config.ignored_env {
        tracing::warn!(
            var,
            "environment variable is not a PULLPROXY_<SECTION>__<KEY> override; ignored"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(app::run(config))
        .map_err(anyhow::Error::from)
}
