//! `cargo xtask <command>`: sets up a fresh machine, builds, runs, lints and tests pullproxy.
#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod fuzz;
mod report;
mod setup;
mod vm;

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::cmd::{cmd, ebpf_cmd, is_root, root, run, say};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test pullproxy")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (eBPF nightly, rust-src, bpf-linker); with --test, also the
    /// Debian packages the tests use and helm.
    Setup {
        #[arg(long)]
        test: bool,
    },
    /// Build the pullproxy binary (kernel programs embedded).
    Build {
        /// Debug build instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build and run pullproxy as root with the embedded default configuration; arguments after
    /// `--` go to pullproxy (e.g. `cargo xtask run -- --config my.yaml`).
    Run {
        #[arg(long)]
        debug: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy (-D warnings) on every crate, the eBPF crate with its nightly.
    Lint,
    /// Build in release and run the benchmarks (as root): the pull suite against the hub,
    /// docker-registry's proxy mode and nginx, containerd through pullproxy vs a mirror, a
    /// cluster of nodes vs a registry mirror, and the kernel hook's cost. Writes JSON, a
    /// Markdown report and PNG plots under `results/`.
    Bench {
        /// Rounds per measurement (min/median/max are reported over rounds); default 5 for the
        /// suite and containerd (3 for the concurrency figure), 3 for the cluster and 7 for the
        /// hook benchmark.
        #[arg(long)]
        rounds: Option<usize>,
        /// A smoke run: one small blob, one round, few clients, a cluster of 2 nodes pulling a
        /// 32 MiB image.
        #[arg(long)]
        quick: bool,
        /// Only render `results/bench.md` and the plots again from the JSON there.
        #[arg(long)]
        report_only: bool,
        /// Run only these benchmarks (comma-separated: hook, suite, fastpath, containerd,
        /// cluster); the report takes the others from the JSON already in `results/`.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Render deploy/manifests/ from the Helm chart with its default values (helm is installed
    /// like the other test tools); the deployment tests fail while they differ.
    Manifests,
    /// Show pullproxy at work on this machine, then tear it all down: unmodified containerd
    /// (default configuration) pulls docker.io/library/busybox, served from a local sealos hub.
    /// Runs as root (through sudo when needed); touches nothing of the host's.
    Demo {
        /// Run on a cluster of N nodes (N > 1) on one bridge, with a shared hub and a fake
        /// internet: they pull one 208 MiB public image one after another, then all at once,
        /// and the demo shows where each request was served from and what the internet sent.
        #[arg(long)]
        nodes: Option<usize>,
    },
    /// Build the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer, the eBPF nightly) and run each for a
    /// bounded time over its committed corpus: the request router with names, tags, digests and
    /// ranges, the TLS ClientHello peek, the hub mapping and the configuration loader. Prints
    /// executions, coverage and new corpus entries per target; a crash fails the command.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets run at the same time, one core each.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Install what the tests need, lint, run every test (privileged tests as root), then every
    /// fuzz target for a short time. Arguments after `--` go to `cargo test` (e.g. a test name
    /// filter; then the fuzz targets are skipped).
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the privileged suites as root in a Debian guest on another kernel (qemu, TCG): systemd
    /// as PID 1, pure cgroup v2, the real containerd.service. The guest image is built once and
    /// cached in ~/.cache/pullproxy/vm/. Arguments after `--` go to every test binary.
    VmTest {
        /// The guest's kernel.
        #[arg(long, value_enum, default_value = "6.1")]
        kernel: vm::Kernel,
        /// A suite to run (tests/tests/<suite>.rs); repeat for more. Default: redirect, proxy,
        /// containerd and systemd.
        #[arg(long = "suite")]
        suites: Vec<String>,
        /// Hard limit for the guest's run in minutes, boot included.
        #[arg(long, default_value_t = 80)]
        timeout_minutes: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup { test } => {
            setup::build_deps()?;
            if test {
                setup::test_deps()?;
                setup::ensure_helm()?;
            }
            Ok(())
        }
        Task::Build { debug } => build(debug).map(drop),
        Task::Run { debug, args } => run_pullproxy(debug, &args),
        Task::Lint => lint(),
        Task::Test { args } => test(&args),
        Task::Fuzz {
            seconds,
            jobs,
            targets,
        } => fuzz::fuzz(&fuzz::FuzzArgs {
            seconds,
            jobs,
            targets,
        }),
        Task::Bench {
            rounds,
            quick,
            report_only,
            only,
        } => bench::bench(&bench::BenchArgs {
            rounds,
            quick,
            report_only,
            only,
        }),
        Task::Manifests => manifests(),
        Task::VmTest {
            kernel,
            suites,
            timeout_minutes,
            args,
        } => vm::vm_test(&vm::VmArgs {
            kernel,
            suites: if suites.is_empty() {
                vm::DEFAULT_SUITES.iter().map(|s| (*s).to_owned()).collect()
            } else {
                suites
            },
            timeout: std::time::Duration::from_secs(timeout_minutes * 60),
            args,
        }),
        Task::Demo { nodes } => demo(nodes),
    }
}

/// Builds `pullproxy` and returns the binary's path.
fn build(debug: bool) -> anyhow::Result<std::path::PathBuf> {
    setup::build_deps()?;
    let mut c = cmd("cargo");
    c.args(["build", "--package", "proxy", "--bin", "pullproxy"]);
    if !debug {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(cmd::target_dir()
        .join(if debug { "debug" } else { "release" })
        .join("pullproxy"))
}

fn run_pullproxy(debug: bool, args: &[String]) -> anyhow::Result<()> {
    let binary = build(debug)?;
    let mut c = if is_root() {
        Command::new(&binary)
    } else {
        say("pullproxy loads eBPF programs and needs root: re-running it through sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&binary);
        c
    };
    c.args(args);
    // Replace this process so signals (Ctrl-C) go straight to pullproxy.
    let err = c.exec();
    Err(err).with_context(|| format!("executing {}", binary.display()))
}

/// The plain manifests: what the chart renders with its default values, for `kubectl apply`.
/// tests/tests/deploy.rs renders the same way and compares.
const MANIFESTS: &[(&str, &[&str])] = &[
    ("pullproxy.yaml", &["--no-hooks"]),
    (
        "uninstall.yaml",
        &[
            "--set",
            "uninstall.standalone=true",
            "--show-only",
            "templates/uninstall-standalone.yaml",
        ],
    ),
];

fn manifests() -> anyhow::Result<()> {
    let helm = setup::ensure_helm()?;
    let dir = root().join("deploy/manifests");
    for (file, args) in MANIFESTS {
        let mut c = cmd(&helm);
        c.args([
            "template",
            "pullproxy",
            "deploy/helm/pullproxy",
            "--namespace",
            "kube-system",
        ])
        .args(*args);
        say(format!("rendering deploy/manifests/{file}"));
        let out = c.output().context("running helm template")?;
        if !out.status.success() {
            bail!(
                "helm template failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = format!(
            "# Rendered from deploy/helm/pullproxy with its default values by `cargo xtask \
             manifests`; do not edit.\n{}",
            String::from_utf8(out.stdout).context("helm output is not UTF-8")?
        );
        std::fs::write(dir.join(file), text)?;
    }
    Ok(())
}

/// Builds every target of the workspace (tests, benchmarks, tools, pullproxy) in one cargo
/// invocation, as the invoking user (not under sudo), and returns the directory of the binaries
/// the end-to-end tests run (pullproxy, and `pp-bench` for the ktls suite). One invocation means one feature resolution: `cargo test` afterwards
/// reuses every artifact, where a separate `cargo build -p proxy` would compile the dependencies
/// a second time with other features.
fn build_for_tests() -> anyhow::Result<std::path::PathBuf> {
    run(cmd("cargo").args([
        "build",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
    ]))?;
    Ok(cmd::target_dir().join("debug"))
}

fn demo(nodes: Option<usize>) -> anyhow::Result<()> {
    setup::build_deps()?;
    setup::test_deps()?;
    // pullproxy and the demo in one invocation (one feature resolution, one build).
    run(cmd("cargo").args([
        "build",
        "--package",
        "proxy",
        "--bin",
        "pullproxy",
        "--package",
        "pullproxy-tests",
        "--bin",
        "pp-demo",
    ]))?;
    let bin = cmd::target_dir().join("debug");
    let mut c = if is_root() {
        Command::new(bin.join("pp-demo"))
    } else {
        say("the demo loads eBPF programs and creates namespaces: pp-demo runs through `sudo -E`");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin.join("pp-demo"));
        c
    };
    if let Some(n) = nodes {
        c.arg("--nodes").arg(n.to_string());
    }
    c.env("PULLPROXY_BIN", bin.join("pullproxy"));
    run(&mut c)
}

fn lint() -> anyhow::Result<()> {
    setup::build_deps()?;
    run(cmd("cargo").args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are a workspace of their own (built by `cargo xtask fuzz`).
    run(cmd("cargo").args([
        "fmt",
        "--all",
        "--check",
        "--manifest-path",
        "fuzz/Cargo.toml",
    ]))?;
    run(cmd("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The fuzz targets on the stable toolchain: a change to the parsers' API breaks them here,
    // not only in the nightly fuzz build. The shared target directory reuses the workspace's
    // checked dependencies.
    run(cmd("cargo")
        .args([
            "clippy",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--all-targets",
        ])
        .arg("--target-dir")
        .arg(cmd::target_dir())
        .args(["--", "-D", "warnings"]))?;
    // The kernel crate only builds for the BPF target with its nightly (picked up from
    // proxy-ebpf/rust-toolchain.toml because cargo runs in that directory).
    run(ebpf_cmd("cargo").args([
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--bins",
        "--",
        "-D",
        "warnings",
    ]))?;
    dependency_rules()
}

/// `deny.toml`: licenses, bans and sources always; RustSec advisories when the advisory
/// database (a git repository on github.com) can be fetched. A machine that cannot reach it says
/// so loudly and checks the rest; one that can fails on any advisory that matches.
fn dependency_rules() -> anyhow::Result<()> {
    setup::ensure_cargo_deny()?;
    run(cmd("cargo").args(["deny", "check", "bans", "licenses", "sources"]))?;
    if run(cmd("cargo").args(["deny", "fetch", "db"])).is_err() {
        say(
            "ADVISORIES NOT CHECKED: the RustSec advisory database could not be fetched \
             (the error is above); licenses, bans and sources were checked",
        );
        return Ok(());
    }
    run(cmd("cargo").args(["deny", "--offline", "check", "advisories"]))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci && !is_root() {
        bail!("CI=true but not running as root: the privileged end-to-end tests cannot run");
    }
    setup::build_deps()?;
    setup::test_deps()?;
    let helm = setup::ensure_helm()?;
    lint()?;
    let bin = build_for_tests()?;
    let mut c = cmd("cargo");
    c.args(["test", "--workspace", "--exclude", "proxy-ebpf"]);
    c.env("PULLPROXY_BIN", bin.join("pullproxy"));
    c.env("PP_BENCH_BIN", bin.join("pp-bench"));
    c.env("PULLPROXY_HELM", &helm);
    c.args(args);
    if !is_root() {
        say("privileged tests need root: test binaries will run through `sudo -E`");
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run(&mut c)?;
    if !args.is_empty() {
        say(
            "a test filter was given: skipping the fuzz targets and the guest (`cargo xtask fuzz` \
             and `cargo xtask vm-test` run them)",
        );
        return Ok(());
    }
    fuzz::fuzz(&fuzz::FuzzArgs {
        seconds: TEST_FUZZ_SECONDS,
        jobs: 2,
        targets: Vec::new(),
    })?;
    if !ci {
        say(format!(
            "SKIPPED outside CI: the {} suites in the 6.1 guest (pure cgroup v2, systemd; \
             `cargo xtask vm-test --kernel 6.1` runs every suite there)",
            vm::CI_SUITES.join(", ")
        ));
        return Ok(());
    }
    vm::vm_test(&vm::VmArgs {
        kernel: vm::Kernel::V6_1,
        suites: vm::CI_SUITES.iter().map(|s| (*s).to_owned()).collect(),
        timeout: vm::CI_TIMEOUT,
        args: Vec::new(),
    })
}

/// Seconds each fuzz target runs in `cargo xtask test`, two at a time (CI has 2 cores to itself):
/// long enough to get well past the seeds' easy mutations, short enough that the whole fuzz step,
/// build included, stays within about four minutes.
const TEST_FUZZ_SECONDS: u64 = 20;
