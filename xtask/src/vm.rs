//! `cargo xtask vm-test`: the privileged suites in a Debian guest on another kernel (6.1, 6.12)
//! under qemu (TCG), with systemd as PID 1, pure cgroup v2 and the real `containerd.service`.
//!
//! The guest image (root fs, kernel, initramfs) is built once per recipe and kernel version and
//! cached in `~/.cache/pullproxy/vm/`. The host builds the test binaries; the guest boots with
//! no network, sees the work tree read-only over virtio-9p, runs the suites as root with
//! `CI=true`, and its output streams to this process's stdout over a second serial port.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use pullproxy_bench::BenchResults;
use sha2::{Digest as _, Sha256};

use crate::{
    cmd::{cmd, is_root, output, root, run, say, target_dir},
    setup,
};

/// The guests' Debian release; its security suite carries both kernels.
const SUITE: &str = "bookworm";

/// The kernels a guest can boot: Debian packages that install one kernel and its modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 12's own kernel (6.1 LTS).
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 LTS kernel Debian 12 ships in its security suite.
    #[value(name = "6.12")]
    V6_12,
}

impl Kernel {
    fn package(self) -> &'static str {
        match self {
            Self::V6_1 => "linux-image-amd64",
            Self::V6_12 => "linux-image-6.12-amd64",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }
}

/// The suites `vm-test` runs unless told otherwise (tests/tests/<name>.rs).
pub const DEFAULT_SUITES: &[&str] = &["redirect", "proxy", "containerd", "systemd", "ktls"];

/// The suites `cargo xtask test` runs in the 6.1 guest under CI: what only the guest shows (pure
/// cgroup v2 at the root, systemd as PID 1 moving `containerd.service` to new cgroups, the unit
/// file) within CI's 45 minutes on two cores. The others take longer under emulation and
/// exercise the same proxy code the host runs them against.
pub const CI_SUITES: &[&str] = &["redirect", "systemd"];

/// The limit for the guest's run in CI, boot included.
pub const CI_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What `cargo xtask vm-test` was asked for.
pub struct VmArgs {
    pub kernel: Kernel,
    pub suites: Vec<String>,
    /// Hard limit for the guest's whole run, boot included.
    pub timeout: Duration,
    /// Passed to every test binary (a name filter, `--test-threads=1`, ...).
    pub args: Vec<String>,
}

/// Packages of the guest besides the kernel, each with why it is there.
const GUEST_PACKAGES: &[(&str, &str)] = &[
    (
        "systemd",
        "PID 1: units, cgroup delegation, bpffs mounted at boot",
    ),
    ("systemd-sysv", "/sbin/init"),
    (
        "kmod",
        "modprobe for the kernel's module requests (overlay, tls, ...)",
    ),
    ("util-linux", "mount, nsenter, setpriv"),
    ("iproute2", "ip netns: every test's network namespace"),
    ("ca-certificates", "the system CA bundle clients read"),
    (
        "busybox-static",
        "the initramfs's shell and the runnable test images",
    ),
    (
        "containerd",
        "the runtime: containerd.service, enabled with its default config",
    ),
    ("runc", "containerd's and podman's OCI runtime"),
    ("docker-registry", "the hub and the fake upstreams"),
    ("skopeo", "a client in the target cgroup"),
    ("podman", "a client in the target cgroup"),
    ("apache2-utils", "htpasswd for the registries"),
    (
        "nginx-light",
        "the benchmark world the ktls suite's fast path figure starts",
    ),
    ("prometheus", "promtool checks the metrics"),
    ("curl", "TLS clients in the proxy suite"),
    (
        "bpftool",
        "an exclusive program on an ancestor (redirect suite)",
    ),
];

/// Units the image never starts: daemons the tests run themselves, and timers and gettys that
/// only cost CPU in a guest that lives for one run.
const MASKED_UNITS: &[&str] = &[
    "nginx.service",
    "docker-registry.service",
    "prometheus.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@.service",
    "getty-static.service",
    "serial-getty@.service",
    "podman-restart.service",
    "podman-auto-update.service",
    "podman-auto-update.timer",
    "podman.socket",
    "e2scrub_reap.service",
];

/// Tmpfs mounts of the guest. The root is an overlay (tmpfs over the read-only image), and
/// overlayfs cannot be the upper layer of another overlay: containerd's and podman's snapshots,
/// and the tests' temporary directories, need a filesystem of their own.
const FSTAB: &str = "\
tmpfs /tmp tmpfs mode=1777,size=75% 0 0
tmpfs /var/lib/containerd tmpfs mode=0711 0 0
tmpfs /var/lib/containers tmpfs mode=0700 0 0
";

/// The initramfs's `/init`: loads the 9p and overlay modules, mounts the image (shared
/// read-only over virtio-9p, tag `root`) under a tmpfs overlay and hands over to systemd. Any
/// failure ends init, which panics the kernel, which ends qemu (`-no-reboot`).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m" || { echo "init: insmod $m failed"; exit 1; }
done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 root /lower \
    || { echo "init: mounting the image (9p tag root) failed"; exit 1; }
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || { echo "init: overlay root failed"; exit 1; }
umount /proc
umount /dev
exec switch_root /newroot /sbin/init
"#;

/// Modules the initramfs loads (their dependencies come along from modules.dep).
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// The unit that runs the suites once the guest is up, then powers it off. `Delegate=yes`:
/// the tests create cgroups, and systemd's rule is that a process creates cgroups only below
/// one delegated to it (the harness puts its cgroups there; tests/src/cgroup.rs).
const RUNNER_UNIT: &str = "\
[Unit]
Description=pullproxy test suites from the host's work tree (cargo xtask vm-test)
After=multi-user.target containerd.service
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/pullproxy-vm-test
StandardOutput=file:/dev/ttyS1
StandardError=inherit
Delegate=yes

[Install]
WantedBy=multi-user.target
";

/// The runner's entry point: mounts the run directory the host shares (tag `run`) and runs the
/// script `cargo xtask vm-test` wrote there for this run.
const RUNNER: &str = "#!/bin/sh
mkdir -p /run/pullproxy-vm
mount -t 9p -o trans=virtio,version=9p2000.L run /run/pullproxy-vm || {
    echo 'vm-test: mounting the run directory (9p tag run) failed'
    echo 'vm-test: status 125'
    exit 1
}
exec /run/pullproxy-vm/run.sh
";

/// Where the guest's test output starts each line it prints itself.
const MARK: &str = "vm-test:";

/// qemu's packages: the x86 system emulator, its modules (TCG is one), its data files and the
/// BIOS. They are unpacked, not installed: Debian's `qemu-system-x86` conflicts with a newer
/// `qemu-utils` some hosts have (backports).
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];
/// How the `ktls` suite's fast path test prints the benchmark's figure on the guest's console
/// (`tests/tests/ktls.rs`), followed by the JSON.
const FIGURE_LINE: &str = "FASTPATH-FIGURE-JSON ";

/// Keeps the fast path figure a guest printed as `results/fastpath-guest-<kernel>.json`, which
/// the benchmark report shows beside the host's.
fn keep_figure(a: &VmArgs, figure: &str) {
    let kernel = a.kernel.label();
    let name = format!("fastpath-guest-{kernel}.json");
    let how = format!(
        "cargo xtask vm-test --kernel {kernel}: qemu TCG, pullproxy release, pp-bench debug"
    );
    match crate::bench::store::<BenchResults>(
        &root().join("results"),
        &name,
        figure.as_bytes(),
        Some(&how),
    ) {
        Ok(()) => say(format!(
            "kept the guest's fast path figure as results/{name}"
        )),
        Err(e) => eprintln!("vm-test: the guest's fast path figure: {e:#}"),
    }
}

/// The shared libraries qemu-system-x86 links that a minimal host may lack.
const QEMU_LIBRARIES: &[&str] = &[
    "libaio1",
    "libcapstone4",
    "libfdt1",
    "libfuse3-3",
    "libibverbs1",
    "libnuma1",
    "libpixman-1-0",
    "libpmem1",
    "librdmacm1",
    "libslirp0",
    "liburing2",
    "libvdeplug2",
];

pub fn vm_test(a: &VmArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "vm-test builds the guest's root fs as root (mmdebstrap) and shares files with \
             their owners (9p passthrough): run it as root"
        );
    }
    for suite in &a.suites {
        if !root()
            .join("tests/tests")
            .join(format!("{suite}.rs"))
            .exists()
        {
            bail!("no test suite tests/tests/{suite}.rs");
        }
    }
    let qemu = ensure_qemu()?;
    let image = ensure_image(a.kernel)?;
    // The release build, as shipped: in a guest already about ten times slower than the host, a
    // debug pullproxy took twice as long to become healthy (8 s against 4 s).
    let pullproxy = crate::build(false)?;
    let binaries = build_suites(&a.suites)?;
    // The ktls suite runs the benchmark's fast path figure: `pp-bench`, another package's
    // binary, which `cargo test` does not build (the guest has no cargo to build it).
    run(cmd("cargo").args(["build", "--package", "pullproxy-bench", "--bin", "pp-bench"]))?;
    let dir = cache_dir()?
        .join("runs")
        .join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let result = boot_and_run(&qemu, &image, &dir, &pullproxy, &binaries, a);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// `~/.cache/pullproxy/vm`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    Ok(setup::cache_dir()?.join("vm"))
}

/// Builds the suites' test binaries (`cargo test --no-run`) and returns (suite, executable).
fn build_suites(suites: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut c = cmd("cargo");
    c.args([
        "test",
        "--package",
        "pullproxy-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for s in suites {
        c.args(["--test", s]);
    }
    say("building the test binaries for the guest");
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if msg["reason"] == "compiler-artifact"
            && is_test
            && let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    suites
        .iter()
        .map(|s| {
            found
                .iter()
                .find(|(name, _)| name == s)
                .cloned()
                .with_context(|| format!("cargo built no test binary for {s}"))
        })
        .collect()
}

/// The Debian version apt would install of `package` (`apt-cache show`), after one
/// `apt-get update` if the package lists do not know it yet.
fn candidate(package: &str) -> anyhow::Result<(String, String)> {
    let show = || {
        output(Command::new("apt-cache").args(["show", "--no-all-versions", package])).and_then(
            |text| {
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_owned())
                };
                Some((field("Version:")?, field("Depends:").unwrap_or_default()))
            },
        )
    };
    if let Some(found) = show() {
        return Ok(found);
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    show().with_context(|| format!("apt knows no package {package}"))
}

/// Unpacks qemu (see [`QEMU_PACKAGES`]) into the cache and installs the libraries it lacks;
/// returns the directory it was unpacked into.
fn ensure_qemu() -> anyhow::Result<PathBuf> {
    let (version, _) = candidate(QEMU_PACKAGES[0])?;
    let dir = cache_dir()?.join(format!("qemu-{}", version.replace([':', '+', '~'], "_")));
    let binary = dir.join("usr/bin/qemu-system-x86_64");
    if !binary.exists() {
        say(format!(
            "unpacking qemu {version} into {} (apt-get download + dpkg-deb -x)",
            dir.display()
        ));
        let work = cache_dir()?.join("qemu-download");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        run(Command::new("apt-get")
            .arg("download")
            .args(QEMU_PACKAGES)
            .current_dir(&work))?;
        let unpacked = work.join("root");
        for deb in fs::read_dir(&work)?.flatten().map(|e| e.path()) {
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            }
        }
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&unpacked, &dir)?;
        fs::remove_dir_all(&work)?;
    }
    if !missing_libraries(&binary).is_empty() {
        say("installing the shared libraries qemu links");
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(QEMU_LIBRARIES)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        let missing = missing_libraries(&binary);
        if !missing.is_empty() {
            bail!(
                "{} still lacks {}: add their packages to QEMU_LIBRARIES in xtask/src/vm.rs",
                binary.display(),
                missing.join(", ")
            );
        }
    }
    Ok(dir)
}

/// Libraries `ldd` cannot find for `binary`.
fn missing_libraries(binary: &Path) -> Vec<String> {
    output(Command::new("ldd").arg(binary))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("not found"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// A built guest image.
struct Image {
    dir: PathBuf,
    /// `uname -r` of its kernel.
    release: String,
}

impl Image {
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
}

/// Everything the image is made of, as text: a change to any of it (or a new kernel version in
/// the archive) makes a new image.
fn recipe(kernel: Kernel, kernel_version: &str) -> String {
    let mut r = format!(
        "suite {SUITE}\nkernel {} {kernel_version}\n",
        kernel.package()
    );
    for (p, _) in GUEST_PACKAGES {
        let _ = writeln!(r, "package {p}");
    }
    for u in MASKED_UNITS {
        let _ = writeln!(r, "masked {u}");
    }
    for m in INITRAMFS_MODULES {
        let _ = writeln!(r, "module {m}");
    }
    for text in [FSTAB, INIT, RUNNER_UNIT, RUNNER] {
        r.push_str(text);
    }
    r
}

/// The cached image for `kernel`, built first if the recipe changed.
fn ensure_image(kernel: Kernel) -> anyhow::Result<Image> {
    let (version, _) = candidate(kernel.package())?;
    let recipe = recipe(kernel, &version);
    let key = hex(&Sha256::digest(recipe.as_bytes()))[..16].to_owned();
    let base = cache_dir()?;
    let dir = base.join(format!("{}-{key}", kernel.label()));
    let release_file = dir.join("release");
    if let Ok(release) = fs::read_to_string(&release_file) {
        return Ok(Image {
            dir,
            release: release.trim().to_owned(),
        });
    }
    let started = Instant::now();
    say(format!(
        "building the {} guest image ({} {version}) in {}: once per recipe, a few minutes",
        kernel.label(),
        kernel.package(),
        dir.display()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let rootfs = dir.join("rootfs");
    let include: Vec<&str> = GUEST_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .chain([kernel.package()])
        .collect();
    if output(Command::new("mmdebstrap").arg("--version")).is_none() {
        say("installing mmdebstrap (builds the guest's root fs)");
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "mmdebstrap",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // No mirror argument: mmdebstrap then uses Debian's default mirror with the release's
    // updates and security suites (the 6.12 kernel is in the latter).
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", include.join(",")))
        .arg(SUITE)
        .arg(&rootfs))?;
    let release = configure_rootfs(&rootfs)?;
    fs::copy(
        rootfs.join(format!("boot/vmlinuz-{release}")),
        dir.join("vmlinuz"),
    )
    .context("copying the kernel out of the image")?;
    write_initramfs(&rootfs, &release, &dir.join("initrd.img"))?;
    fs::write(&release_file, format!("{release}\n"))?;
    fs::write(dir.join("recipe"), &recipe)?;
    say(format!(
        "guest image {} ({release}) built in {:.0?}",
        dir.display(),
        started.elapsed()
    ));
    // Older images of this kernel are dead weight (a root fs is about a gigabyte).
    for entry in fs::read_dir(&base)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{}-", kernel.label())) && entry.path() != dir {
            say(format!("removing the outdated image {name}"));
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(Image { dir, release })
}

/// Writes the guest's configuration into the fresh root fs; returns its kernel release.
fn configure_rootfs(rootfs: &Path) -> anyhow::Result<String> {
    let release = fs::read_dir(rootfs.join("lib/modules"))
        .context("the image has no /lib/modules")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the image has no kernel modules")?;
    let write = |path: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        let p = rootfs.join(path);
        fs::create_dir_all(p.parent().expect("a file in a directory"))?;
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("etc/fstab", FSTAB, 0o644)?;
    write("etc/hostname", "pullproxy-vm\n", 0o644)?;
    // A fixed machine id: without one, every boot is systemd's "first boot".
    write(
        "etc/machine-id",
        &format!(
            "{}\n",
            hex(&Sha256::digest(release.as_bytes()))[..32].to_owned()
        ),
        0o444,
    )?;
    write("usr/local/sbin/pullproxy-vm-test", RUNNER, 0o755)?;
    write(
        "etc/systemd/system/pullproxy-vm-test.service",
        RUNNER_UNIT,
        0o644,
    )?;
    let wants = rootfs.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    let link = wants.join("pullproxy-vm-test.service");
    let _ = fs::remove_file(&link);
    symlink("/etc/systemd/system/pullproxy-vm-test.service", &link)?;
    for unit in MASKED_UNITS {
        let link = rootfs.join("etc/systemd/system").join(unit);
        let _ = fs::remove_file(&link);
        symlink("/dev/null", &link)?;
    }
    if !wants.join("containerd.service").exists() {
        bail!("containerd.service is not enabled in the image");
    }
    Ok(release)
}

/// The initramfs: busybox, [`INIT`] and the modules it loads (uncompressed), as a newc cpio.
fn write_initramfs(rootfs: &Path, release: &str, out: &Path) -> anyhow::Result<()> {
    let modules = rootfs.join("lib/modules").join(release);
    let dep = fs::read_to_string(modules.join("modules.dep")).context("modules.dep")?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    for m in INITRAMFS_MODULES {
        module_with_deps(m, &dep, &builtin, &mut order)?;
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.dir(d);
    }
    cpio.device("dev/console", 5, 1);
    cpio.device("dev/null", 1, 3);
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read(rootfs.join("bin/busybox")).context("busybox-static in the image")?,
    );
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut names = String::new();
    for rel in &order {
        let path = modules.join(rel);
        let bytes = decompressed(&path)?;
        let name = Path::new(rel)
            .file_name()
            .expect("module file")
            .to_string_lossy()
            .split(".ko")
            .next()
            .expect("a module name")
            .to_owned()
            + ".ko";
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        names.push_str(&name);
        names.push('\n');
    }
    cpio.file("modules/order", 0o644, names.as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// Appends `module`'s dependencies, then `module` itself (paths relative to the modules
/// directory), to `order`; built-in modules need nothing.
fn module_with_deps(
    module: &str,
    dep: &str,
    builtin: &str,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    let file_is = |path: &str| {
        let base = path.rsplit('/').next().unwrap_or(path);
        let stem = base.split(".ko").next().unwrap_or(base);
        stem.replace('-', "_") == module.replace('-', "_")
    };
    if builtin.lines().any(file_is) {
        return Ok(());
    }
    let (path, deps) = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(path, _)| file_is(path))
        .with_context(|| format!("kernel module {module} is neither built in nor a module"))?;
    // modules.dep lists a module's dependencies, each after the ones it needs itself: load them
    // last to first.
    for d in deps.split_whitespace().rev() {
        if !order.iter().any(|o| o == d) {
            order.push(d.to_owned());
        }
    }
    if !order.iter().any(|o| o == path) {
        order.push(path.to_owned());
    }
    Ok(())
}

/// A module file's bytes, decompressed when Debian ships it compressed (.ko.xz, .ko.zst):
/// busybox's insmod loads plain ELF.
fn decompressed(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// A cpio archive in the kernel's initramfs format ("newc").
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }
    fn device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The user and system CPU time process `pid` (every thread) has used so far: `utime` and
/// `stime` of `/proc/<pid>/stat`, in Linux's fixed USER_HZ of 100 ticks a second.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, and it may hold spaces) start with
    // field 3 of proc(5); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
}

/// A path in single quotes for the guest's `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: mounts the host's work tree (and the target directory when it is
/// elsewhere) at the same paths, runs each suite as root with CI=true, and reports per-suite
/// times and an overall status line that the host parses.
fn run_script(pullproxy: &Path, binaries: &[(String, PathBuf)], a: &VmArgs) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by cargo xtask vm-test for one run.\n");
    let _ = writeln!(
        s,
        "echo \"{MARK} guest up: $(uname -r), cgroup $(stat -fc %T /sys/fs/cgroup), \
         first command $(cut -d' ' -f1 /proc/uptime) s after the kernel started\""
    );
    for (tag, path) in shares() {
        let p = sh_quote(&path.display().to_string());
        let _ = writeln!(
            s,
            "mkdir -p {p} && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 {tag} {p} \
             || {{ echo '{MARK} mounting {tag} failed'; echo '{MARK} status 125'; exit 1; }}"
        );
    }
    // One test at a time (`-- --test-threads=N` overrides it): the two emulated CPUs are slow
    // enough that two tests' registries, runtimes and clients sharing them push Go clients past
    // their fixed 10 s TLS handshake deadline.
    let _ = writeln!(
        s,
        "export CI=true PULLPROXY_SYSTEMD_TESTS=1 PULLPROXY_KTLS_TESTS=1 RUST_BACKTRACE=1 \
         RUST_TEST_THREADS=1 HOME=/root \
         PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PULLPROXY_BIN={} \
         PP_BENCH_BIN={}",
        sh_quote(&pullproxy.display().to_string()),
        sh_quote(&target_dir().join("debug/pp-bench").display().to_string())
    );
    let _ = writeln!(
        s,
        "cd {} || exit 1",
        sh_quote(&root().join("tests").display().to_string())
    );
    s.push_str("status=0\n");
    for (suite, exe) in binaries {
        let mut argv = sh_quote(&exe.display().to_string());
        for arg in &a.args {
            argv.push(' ');
            argv.push_str(&sh_quote(arg));
        }
        let _ = writeln!(
            s,
            "echo '{MARK} suite {suite}'\nstart=$(cut -d. -f1 /proc/uptime)\n{argv}\nrc=$?\n\
             echo \"{MARK} suite {suite} exit $rc after $(( $(cut -d. -f1 /proc/uptime) - start )) s\"\n\
             [ $rc = 0 ] || status=1"
        );
    }
    let _ = writeln!(s, "echo \"{MARK} status $status\"");
    s
}

/// The host directories the guest mounts at the same paths: the work tree, and the target
/// directory when it lies outside it.
fn shares() -> Vec<(&'static str, PathBuf)> {
    let mut v = vec![("work", root())];
    let target = target_dir();
    if !target.starts_with(root()) {
        v.push(("target", target));
    }
    v
}

fn boot_and_run(
    qemu: &Path,
    image: &Image,
    dir: &Path,
    pullproxy: &Path,
    binaries: &[(String, PathBuf)],
    a: &VmArgs,
) -> anyhow::Result<()> {
    let script = dir.join("run.sh");
    fs::write(&script, run_script(pullproxy, binaries, a))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let console = dir.join("console.log");
    let mut c = Command::new(qemu.join("usr/bin/qemu-system-x86_64"));
    // Unpacked, qemu finds its modules (the TCG accelerator is one) only when told where.
    c.env(
        "QEMU_MODULE_DIR",
        qemu.join("usr/lib/x86_64-linux-gnu/qemu"),
    )
    .arg("-L")
    .arg(qemu.join("usr/share/seabios"))
    .arg("-L")
    .arg(qemu.join("usr/share/qemu"))
    // /dev/kvm on these hosts cannot run an ordinary guest: TCG, everything emulated.
    .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "4096"])
    .args([
        "-nic",
        "none",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(image.kernel())
    .arg("-initrd")
    .arg(image.initrd())
    .arg("-append")
    .arg(
        "console=ttyS0 panic=1 systemd.unified_cgroup_hierarchy=1 \
             systemd.show_status=error loglevel=4",
    );
    let mut virtfs = |tag: &str, path: &Path, readonly: bool| {
        c.arg("-virtfs").arg(format!(
            "local,path={},mount_tag={tag},security_model=passthrough{}",
            path.display(),
            if readonly { ",readonly=on" } else { "" }
        ));
    };
    virtfs("root", &image.rootfs(), true);
    virtfs("run", dir, false);
    for (tag, path) in shares() {
        virtfs(tag, &path, true);
    }
    c.stdin(Stdio::null()).stdout(Stdio::piped());
    say(format!(
        "booting the guest ({}, TCG, 2 vCPUs, no network); limit {:?}",
        image.release, a.timeout
    ));
    let started = Instant::now();
    let mut child = c.spawn().context("starting qemu")?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    {
        let (done, timed_out, limit) = (done.clone(), timed_out.clone(), a.timeout);
        std::thread::spawn(move || {
            while started.elapsed() < limit {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            timed_out.store(true, Ordering::Relaxed);
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
    }
    let mut status = None;
    // qemu's CPU time says what a run costs on an idle machine, whatever else shared the cores
    // meanwhile (the wall-clock time does not): the guest's own lines show both.
    let mut cpu = None;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        if let Some(figure) = line.strip_prefix(FIGURE_LINE) {
            keep_figure(a, figure);
            continue;
        }
        if !line.starts_with(MARK) {
            println!("{line}");
            continue;
        }
        cpu = cpu_time(pid).or(cpu);
        let cpu_text = cpu.map(|c| format!(", {c:.0?} of CPU")).unwrap_or_default();
        println!(
            "{line} [qemu: {:.0?} since start{cpu_text}]",
            started.elapsed()
        );
        if let Some(code) = line.strip_prefix(&format!("{MARK} status ")) {
            status = code.trim().parse::<i32>().ok();
        }
    }
    let exit = child.wait()?;
    done.store(true, Ordering::Relaxed);
    let cpu_text = cpu.map(|c| format!(", {c:.0?} of CPU")).unwrap_or_default();
    say(format!(
        "guest finished after {:.0?} (qemu {exit}{cpu_text})",
        started.elapsed()
    ));
    match status {
        Some(0) => Ok(()),
        Some(code) => bail!("the suites failed in the guest (status {code})"),
        None => {
            let log = fs::read_to_string(&console).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- the guest's console (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            if timed_out.load(Ordering::Relaxed) {
                bail!("the guest did not finish within {:?}", a.timeout)
            }
            bail!("the guest stopped without reporting a status")
        }
    }
}
