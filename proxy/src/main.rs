//! The `pullproxy` command line.
#![expect(
    unsafe_code,
    reason = "umask(2) at start-up, which libc exposes only as an unsafe fn"
)]
#![deny(clippy::unwrap_used)]

mod cli;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pullproxy::{doctor::DoctorArgs, trust::ca_command::CaCommand};

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
        Command::Run => cli::run::run(cli.config),
        Command::CheckConfig { file } => cli::check_config::run(file),
        Command::Uninstall => cli::uninstall::run(cli.config),
        Command::Ca(cmd) => cli::ca::run(cli.config, cmd),
        Command::Doctor(args) => cli::doctor::run(cli.config, &args),
        Command::Warm {
            images,
            user,
            password_file,
        } => cli::warm::run(cli.config, &images, user, password_file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
