//! `pullproxy doctor`: checks that a node can run pullproxy and that a running one works (kernel
//! and BPF support, cgroup v2, privileges, bpffs, container runtimes, attached programs, the bind
//! guard, trust in the node CA, the hub, the cache directory), as a report tests can assert on and one line per
//! finding for the operator. Nothing here changes the system, and no credential is ever printed.

use std::{
    fmt,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{programs::ProgramType, util::KernelVersion};
use proxy_common::Counter;

use crate::{
    client::{self, AddressPolicy, Connector},
    config::Config,
    hub::{HubClient, HubOutcome},
    redirect::{self, LoaderError, MIN_KERNEL, cgroup::Cgroup2},
    telemetry::error_chain,
    tls::{self, NodeCa, ProcFs, TrustReport, runtimes::RuntimeTrust, trust_store::InstallState},
};

/// Where pullproxy expects bpffs (and mounts it when it may).
const BPFFS: &str = "/sys/fs/bpf";
/// Less free space than this on the cache's filesystem is a problem: the cache stops filling
/// (pulls still work, uncached).
const MIN_FREE_BYTES: u64 = 1 << 30;

/// `pullproxy doctor [--root DIR] [--proc DIR] [--verbose]`
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DoctorArgs {
    /// Root directory of the system whose trust store is checked (a pod that mounts the host's
    /// trust store at /host passes `--root /host`).
    #[arg(long, default_value = "/", env = "PULLPROXY_HOST_ROOT")]
    pub root: PathBuf,
    /// procfs that shows the host's processes (in a pod: hostPID).
    #[arg(long = "proc", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Print every finding, not only problems and notes.
    #[arg(long, short)]
    pub verbose: bool,
}

impl Default for DoctorArgs {
    fn default() -> Self {
        Self {
            root: "/".into(),
            proc_root: "/proc".into(),
            verbose: false,
        }
    }
}

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Kernel,
    BpfPrograms,
    Cgroup2,
    Privileges,
    Bpffs,
    Runtimes,
    Attached,
    Guard,
    Trust,
    Hub,
    Cache,
}

impl Check {
    fn label(self) -> &'static str {
        match self {
            Check::Kernel => "kernel",
            Check::BpfPrograms => "bpf",
            Check::Cgroup2 => "cgroup",
            Check::Privileges => "privileges",
            Check::Bpffs => "bpffs",
            Check::Runtimes => "runtimes",
            Check::Attached => "attached",
            Check::Guard => "guard",
            Check::Trust => "trust",
            Check::Hub => "hub",
            Check::Cache => "cache",
        }
    }
}

/// How a finding came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Something the operator must fix; the message says how.
    Problem,
    /// Could not be checked from here; the message says why and where to check instead.
    Note,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: Check,
    pub verdict: Verdict,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Problem => "PROBLEM",
            Verdict::Note => "note",
        };
        write!(f, "{tag:<7} {:<10} {}", self.check.label(), self.message)
    }
}

/// Everything `pullproxy doctor` found.
#[derive(Debug, Clone, Default)]
pub struct DoctorReport {
    pub findings: Vec<Finding>,
}

impl DoctorReport {
    fn push(&mut self, check: Check, verdict: Verdict, message: impl Into<String>) {
        self.findings.push(Finding {
            check,
            verdict,
            message: message.into(),
        });
    }

    fn ok(&mut self, check: Check, message: impl Into<String>) {
        self.push(check, Verdict::Ok, message);
    }

    fn problem(&mut self, check: Check, message: impl Into<String>) {
        self.push(check, Verdict::Problem, message);
    }

    fn note(&mut self, check: Check, message: impl Into<String>) {
        self.push(check, Verdict::Note, message);
    }

    /// The findings that need the operator.
    pub fn problems(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.verdict == Verdict::Problem)
    }

    /// The findings of one check.
    pub fn of(&self, check: Check) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.check == check)
    }

    /// Whether nothing needs fixing.
    pub fn healthy(&self) -> bool {
        self.problems().next().is_none()
    }

    /// Writes problems and notes (every finding with `verbose`), then a summary line.
    pub fn write(&self, out: &mut dyn Write, verbose: bool) -> io::Result<()> {
        for finding in &self.findings {
            if verbose || finding.verdict != Verdict::Ok {
                writeln!(out, "{finding}")?;
            }
        }
        let problems = self.problems().count();
        let checked = self.findings.len();
        if problems == 0 {
            writeln!(out, "pullproxy doctor: all {checked} findings ok")
        } else {
            writeln!(
                out,
                "pullproxy doctor: {problems} problem(s) in {checked} findings"
            )
        }
    }
}

/// Runs every check against the configuration and this system.
pub async fn diagnose(config: &Config, args: &DoctorArgs) -> DoctorReport {
    let mut report = DoctorReport::default();
    check_kernel(&mut report);
    let cgroup2 = check_cgroup(&mut report, config);
    check_privileges(&mut report);
    check_bpffs(&mut report, &config.redirect.pin_dir);
    if let Some(cgroup2) = &cgroup2 {
        check_runtimes(&mut report, config, cgroup2, &args.proc_root);
    }
    check_attached(&mut report, config, cgroup2.as_ref());
    check_guard(&mut report, config);
    check_trust(&mut report, config, args);
    check_hub(&mut report, config).await;
    check_cache(&mut report, &config.cache.dir, config.cache.max_size.0);
    report
}

/// [`diagnose`] on a runtime of its own, for callers without one.
pub fn diagnose_blocking(config: &Config, args: &DoctorArgs) -> io::Result<DoctorReport> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(diagnose(config, args)))
}

/// `pullproxy doctor`: prints the report to `out`; `Ok(true)` when nothing needs fixing.
pub fn run(config: &Config, args: &DoctorArgs, out: &mut dyn Write) -> io::Result<bool> {
    let report = diagnose_blocking(config, args)?;
    report.write(out, args.verbose)?;
    Ok(report.healthy())
}

fn check_kernel(report: &mut DoctorReport) {
    match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) => report.ok(
            Check::Kernel,
            format!(
                "Linux {v} (>= {}.{}: cgroup BPF links, socket lookup from connect hooks)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        Ok(v) => report.problem(
            Check::Kernel,
            format!(
                "Linux {v} is too old: pullproxy needs {}.{} or newer; upgrade the node's kernel",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        Err(e) => report.note(
            Check::Kernel,
            format!("cannot read the kernel version ({e}); loading the programs will tell"),
        ),
    }
    // Probing loads a tiny program of each type, which needs the same privileges as pullproxy.
    let probes = [
        ("cgroup sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
    ];
    let mut supported = Vec::new();
    for (name, kind) in probes {
        match aya::sys::is_program_supported(kind) {
            Ok(true) => supported.push(name),
            Ok(false) => report.problem(
                Check::BpfPrograms,
                format!(
                    "the kernel does not support {name} BPF programs: it needs CONFIG_BPF_SYSCALL \
                     and CONFIG_CGROUP_BPF"
                ),
            ),
            Err(e) => report.note(
                Check::BpfPrograms,
                format!(
                    "cannot probe {name} BPF programs ({}); run doctor with pullproxy's privileges",
                    error_chain(&e)
                ),
            ),
        }
    }
    if !supported.is_empty() {
        report.ok(
            Check::BpfPrograms,
            format!("{} programs supported", supported.join(" and ")),
        );
    }
}

fn check_cgroup(report: &mut DoctorReport, config: &Config) -> Option<Cgroup2> {
    let cgroup2 = match Cgroup2::discover() {
        Ok(c) => c,
        Err(e) => {
            report.problem(Check::Cgroup2, error_chain(&e));
            return None;
        }
    };
    let attach = &config.redirect.attach_cgroup;
    match cgroup2.id(attach) {
        Ok(id) => report.ok(
            Check::Cgroup2,
            format!(
                "cgroup v2 at {}; attach cgroup {attach} (id {id})",
                cgroup2.mount().display()
            ),
        ),
        Err(e) => report.problem(
            Check::Cgroup2,
            format!(
                "redirect.attach_cgroup: {}; set it to an existing cgroup such as /",
                error_chain(&e)
            ),
        ),
    }
    Some(cgroup2)
}

/// Capability bits pullproxy's loader cares about, in the order they are reported.
const CAPS: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

fn check_privileges(report: &mut DoctorReport) {
    let held = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s))
        .map(|eff| {
            CAPS.iter()
                .filter(|(bit, _)| eff & (1 << bit) != 0)
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
        });
    let held = match held {
        Some(h) if h.is_empty() => {
            "none of CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN".into()
        }
        Some(h) => h.join(", "),
        None => "unknown".into(),
    };
    // The loader's own preflight decides whether `pullproxy run` starts; report exactly that.
    match redirect::preflight() {
        Ok(()) => report.ok(
            Check::Privileges,
            format!("may load and attach BPF programs (holds {held})"),
        ),
        Err(e @ LoaderError::NoPermission { .. }) => report.problem(
            Check::Privileges,
            format!("{} (holds {held})", error_chain(&e)),
        ),
        // Kernel and cgroup failures are reported by their own checks.
        Err(_) => {}
    }
}

/// The `CapEff` mask of `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn check_bpffs(report: &mut DoctorReport, pin_dir: &Path) {
    let root = Path::new(BPFFS);
    let probe = if pin_dir.starts_with(root) {
        root
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    };
    match redirect::fs_magic(probe) {
        Some(redirect::BPF_FS_MAGIC) => report.ok(
            Check::Bpffs,
            format!(
                "bpffs mounted at {}; pins go to {}",
                probe.display(),
                pin_dir.display()
            ),
        ),
        _ if probe == root => report.problem(
            Check::Bpffs,
            format!(
                "no bpffs at {BPFFS}: mount it on the host (`mount -t bpf bpf {BPFFS}`; systemd \
                 does at boot) so pins outlive pullproxy, or grant CAP_SYS_ADMIN so it mounts one"
            ),
        ),
        _ => report.problem(
            Check::Bpffs,
            format!(
                "{} is not on bpffs: set redirect.pin_dir below {BPFFS}",
                pin_dir.display()
            ),
        ),
    }
}

fn check_runtimes(report: &mut DoctorReport, config: &Config, cgroup2: &Cgroup2, proc: &Path) {
    let settings = config.redirect_settings();
    let (paths, how) = match &settings.targets {
        redirect::Targets::Auto => {
            let found = cgroup2.detect_runtimes(proc);
            for p in &found.skipped {
                report.note(
                    Check::Runtimes,
                    format!(
                        "{} (pid {}) is named like a container runtime but is {}: its cgroup is \
                         not redirected",
                        p.comm, p.pid, p.vetting
                    ),
                );
            }
            (found.cgroups.into_iter().collect::<Vec<_>>(), "found")
        }
        redirect::Targets::Paths(p) => (p.clone(), "configured"),
    };
    if paths.is_empty() {
        report.problem(
            Check::Runtimes,
            "no container runtime cgroup found (containerd, dockerd, cri-o, k3s, rke2): nothing \
             is redirected; start the runtime or list its cgroup in redirect.targets",
        );
        return;
    }
    for path in paths {
        match cgroup2.id(&path) {
            Ok(id) => report.ok(
                Check::Runtimes,
                format!("runtime cgroup {path} (id {id}) {how}: its connections are redirected"),
            ),
            Err(e) => report.problem(
                Check::Runtimes,
                format!(
                    "runtime cgroup {path} {how} but unusable ({}): its connections are not \
                     redirected",
                    error_chain(&e)
                ),
            ),
        }
    }
}

fn check_attached(report: &mut DoctorReport, config: &Config, cgroup2: Option<&Cgroup2>) {
    let pin_dir = &config.redirect.pin_dir;
    if !config.redirect.enabled {
        report.note(
            Check::Attached,
            "redirect.enabled is false: pullproxy attaches nothing and serves only explicit clients",
        );
        return;
    }
    let links = redirect::pinned_links(pin_dir);
    let expected_cgroup = cgroup2.and_then(|c| c.id(&config.redirect.attach_cgroup).ok());
    let missing: Vec<&str> = links
        .iter()
        .filter(|(_, l)| l.is_none())
        .map(|(n, _)| *n)
        .collect();
    if missing.len() == links.len() {
        report.problem(
            Check::Attached,
            format!(
                "pullproxy's programs are not attached (nothing pinned under {}): start pullproxy",
                pin_dir.display()
            ),
        );
        return;
    }
    if !missing.is_empty() {
        report.problem(
            Check::Attached,
            format!(
                "only some programs are pinned under {} ({} missing): restart pullproxy, which \
                 attaches the missing ones",
                pin_dir.display(),
                missing.join(", ")
            ),
        );
    }
    let mut attached = Vec::new();
    for (name, link) in &links {
        let Some(link) = link else { continue };
        match expected_cgroup {
            Some(want) if link.cgroup_id != want => report.problem(
                Check::Attached,
                format!(
                    "{name} is attached to cgroup id {} but redirect.attach_cgroup {} is id \
                     {want}: restart pullproxy to move it",
                    link.cgroup_id, config.redirect.attach_cgroup
                ),
            ),
            _ => attached.push(format!("{name} (link {}, prog {})", link.id, link.prog_id)),
        }
    }
    if !attached.is_empty() {
        let counters = match redirect::pinned_counters(pin_dir) {
            Ok(c) => {
                let shown: Vec<String> = c
                    .iter()
                    .filter(|(c, v)| *v > 0 && c.is_connection())
                    .map(|(c, v)| format!("{} {v}", c.name()))
                    .collect();
                if shown.is_empty() {
                    "; no connection seen yet".to_owned()
                } else {
                    format!("; connections: {}", shown.join(", "))
                }
            }
            Err(_) => String::new(),
        };
        report.ok(
            Check::Attached,
            format!(
                "{} program(s) attached at {}: {}{counters}",
                attached.len(),
                config.redirect.attach_cgroup,
                attached.join(", ")
            ),
        );
    }
}

/// The bind guard: attached, which ports, armed (pullproxy bound them since the programs were
/// installed), and how many binds it refused.
fn check_guard(report: &mut DoctorReport, config: &Config) {
    if !config.redirect.enabled {
        return;
    }
    let pin_dir = &config.redirect.pin_dir;
    let links = redirect::pinned_links(pin_dir);
    let missing: Vec<&str> = redirect::GUARD_PROGRAMS
        .iter()
        .copied()
        .filter(|name| !links.iter().any(|(n, l)| n == name && l.is_some()))
        .collect();
    let want = config.guarded_ports();
    if !missing.is_empty() {
        report.problem(
            Check::Guard,
            format!(
                "the bind guard is not attached ({} missing): while pullproxy is down any local \
                 process may listen on port {} and receive the runtimes' redirected connections; \
                 start pullproxy, which attaches it",
                missing.join(", "),
                config.listen.port
            ),
        );
        return;
    }
    let guard = match redirect::guard::pinned(pin_dir) {
        Ok(g) => g,
        Err(e) => {
            report.problem(
                Check::Guard,
                format!("cannot read the bind guard's maps: {}", error_chain(&e)),
            );
            return;
        }
    };
    let refused = redirect::pinned_counters(pin_dir)
        .ok()
        .and_then(|c| c.into_iter().find(|(c, _)| *c == Counter::BindRefused))
        .map_or(0, |(_, v)| v);
    let ports: Vec<String> = guard.ports.iter().map(u16::to_string).collect();
    if guard.ports != want {
        report.problem(
            Check::Guard,
            format!(
                "the bind guard protects port(s) {} but this configuration uses {want:?}: \
                 restart pullproxy to update it",
                ports.join(", ")
            ),
        );
    } else if guard.netns == 0 {
        report.problem(
            Check::Guard,
            format!(
                "the bind guard for port(s) {} is attached but not armed: pullproxy has not bound \
                 them since it was installed; start pullproxy",
                ports.join(", ")
            ),
        );
    } else {
        report.ok(
            Check::Guard,
            format!(
                "bind guard attached: only pullproxy's cgroup may bind port(s) {} in its network \
                 namespace; {refused} bind(s) refused",
                ports.join(", ")
            ),
        );
    }
}

fn check_trust(report: &mut DoctorReport, config: &Config, args: &DoctorArgs) {
    let settings = config.tls_settings();
    let ca = match NodeCa::read_certificate(&settings) {
        Ok(Some(ca)) => ca,
        Ok(None) => {
            report.problem(
                Check::Trust,
                format!(
                    "no node CA at {} yet: start pullproxy (it generates one) or run `pullproxy ca \
                     install`",
                    settings.ca_cert_path().display()
                ),
            );
            return;
        }
        Err(e) => {
            report.problem(Check::Trust, error_chain(&e));
            return;
        }
    };
    let procfs = ProcFs::at(&args.proc_root);
    let trust = match TrustReport::collect(&args.root, &procfs, &ca) {
        Ok(t) => t,
        Err(e) => {
            report.problem(Check::Trust, error_chain(&e));
            return;
        }
    };
    let lines = trust.lines();
    // The first line is the install state, then one per runtime (or "no runtime running").
    let install_ok = matches!(trust.install, InstallState::Installed { .. });
    if let Some(first) = lines.first() {
        report.push(
            Check::Trust,
            if install_ok {
                Verdict::Ok
            } else {
                Verdict::Problem
            },
            first.clone(),
        );
    }
    if trust.runtimes.is_empty() {
        report.note(
            Check::Trust,
            format!(
                "no container runtime process visible in {} (a pod without hostPID sees none): \
                 whether the runtimes trust the node CA is not checked here",
                args.proc_root.display()
            ),
        );
    }
    for check in &trust.runtimes {
        let verdict = match check.trust {
            RuntimeTrust::Trusts => Verdict::Ok,
            RuntimeTrust::NeedsRestart | RuntimeTrust::CaNotInstalled => Verdict::Problem,
        };
        report.push(Check::Trust, verdict, check.to_string());
    }
}

async fn check_hub(report: &mut DoctorReport, config: &Config) {
    let Some(settings) = config.hub_settings() else {
        report.ok(Check::Hub, "no hub configured (hub.url is null)");
        return;
    };
    let shown = redacted_url(&settings.url);
    let tls_settings = config.tls_settings();
    let client_tls = match tls::upstream_client_config(&tls_settings.extra_upstream_cas, None) {
        Ok((c, _)) => c,
        Err(e) => {
            report.problem(
                Check::Hub,
                format!("cannot build a TLS client for the hub: {}", error_chain(&e)),
            );
            return;
        }
    };
    let http = client::build(Connector::new(
        client_tls,
        AddressPolicy::Any,
        config.upstream.connect_timeout,
    ));
    let hub = Arc::new(HubClient::new(http, settings));
    let optional = if config.hub.optional {
        " (hub.optional: pulls fall back to cache and upstream)"
    } else {
        " (pullproxy stays unready until it is; set hub.optional: true to serve without it)"
    };
    match hub.ping().await {
        HubOutcome::Found(_) => {
            report.ok(
                Check::Hub,
                format!("hub {shown} reachable and accepts pullproxy's credentials"),
            );
            check_push_rights(report, config, &hub, &shown).await;
        }
        HubOutcome::NotFound => report.problem(
            Check::Hub,
            format!("hub {shown} answers 404 on /v2/: hub.url does not point at a registry"),
        ),
        HubOutcome::Refused(status) => report.problem(
            Check::Hub,
            format!(
                "hub {shown} refused pullproxy's credentials ({}): fix hub.username and the \
                 password in {}",
                status.as_u16(),
                credential_source(config)
            ),
        ),
        HubOutcome::Unreachable(reason) => report.problem(
            Check::Hub,
            format!("hub {shown} unreachable: {reason}{optional}"),
        ),
        HubOutcome::NoCredentials(reason) => report.problem(
            Check::Hub,
            format!("cannot read the hub credentials: {reason}{optional}"),
        ),
    }
}

/// With write-back on, pullproxy's hub credentials must be allowed to push.
async fn check_push_rights(
    report: &mut DoctorReport,
    config: &Config,
    hub: &HubClient,
    shown: &str,
) {
    let policy = config.hub.write_back;
    if policy == crate::writeback::Policy::Off {
        return;
    }
    match hub.can_push().await {
        Ok(true) => report.ok(
            Check::Hub,
            format!("pullproxy's hub credentials may push (hub.write_back: {policy})"),
        ),
        Ok(false) => report.problem(
            Check::Hub,
            format!(
                "hub {shown} does not let pullproxy's credentials push, and hub.write_back is \
                 {policy}: give the user push rights, or set hub.write_back: off"
            ),
        ),
        Err(e) => report.problem(
            Check::Hub,
            format!("cannot tell whether pullproxy may push into hub {shown}: {e}"),
        ),
    }
}

/// Where the hub password comes from, named without its value.
fn credential_source(config: &Config) -> String {
    let h = &config.hub;
    if let Some(f) = &h.password_file {
        format!("hub.password_file ({})", f.display())
    } else if let Some(f) = &h.dockerconfigjson {
        format!("hub.dockerconfigjson ({})", f.display())
    } else if h.password.is_some() {
        "hub.password".into()
    } else {
        "hub.password_file (none is configured)".into()
    }
}

/// The hub URL without any `user:password@`.
fn redacted_url(url: &http::Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.host().unwrap_or_default();
    match url.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

fn check_cache(report: &mut DoctorReport, dir: &Path, max_size: u64) {
    // The cache directory is created at start; before that, its nearest existing ancestor must
    // be writable.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    if let Err(e) = probe_writable(existing) {
        report.problem(
            Check::Cache,
            format!(
                "cache dir {}: {} is not writable ({e}); fix its ownership or point cache.dir \
                 elsewhere",
                dir.display(),
                existing.display()
            ),
        );
        return;
    }
    let created = if existing == dir {
        ""
    } else {
        " (created at start)"
    };
    match free_bytes(existing) {
        Some(free) if free < MIN_FREE_BYTES => report.problem(
            Check::Cache,
            format!(
                "cache dir {}{created}: only {} free on its filesystem; pulls work but are no \
                 longer cached: free space or lower cache.max_size",
                dir.display(),
                human(free)
            ),
        ),
        Some(free) => report.ok(
            Check::Cache,
            format!(
                "cache dir {}{created} writable, {} free (cache.max_size {})",
                dir.display(),
                human(free),
                human(max_size)
            ),
        ),
        None => report.ok(
            Check::Cache,
            format!("cache dir {}{created} writable", dir.display()),
        ),
    }
}

fn probe_writable(dir: &Path) -> io::Result<()> {
    tempfile_in(dir).map(drop)
}

/// Creates and removes a file in `dir`.
fn tempfile_in(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!(".pullproxy-doctor-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)
}

fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statvfs.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (ret == 0).then(|| st.f_bavail.saturating_mul(st.f_frsize))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_status() {
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000000c000001000\n"),
            Some(0xc0_0000_1000)
        );
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn urls_lose_their_credentials() {
        let url: http::Uri = "http://admin:s3cret@sealos.hub:5000/".parse().unwrap();
        assert_eq!(redacted_url(&url), "http://sealos.hub:5000");
        let url: http::Uri = "https://hub.example".parse().unwrap();
        assert_eq!(redacted_url(&url), "https://hub.example");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn the_report_prints_problems_and_a_summary() {
        let mut report = DoctorReport::default();
        report.ok(Check::Kernel, "Linux 6.18.0");
        report.problem(
            Check::Hub,
            "hub http://h:5000 unreachable: connection refused",
        );
        report.note(Check::Trust, "not checked here");
        let mut out = Vec::new();
        report.write(&mut out, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "PROBLEM hub        hub http://h:5000 unreachable: connection refused\n\
             note    trust      not checked here\n\
             pullproxy doctor: 1 problem(s) in 3 findings\n"
        );
        assert!(!report.healthy());
        let mut healthy = DoctorReport::default();
        healthy.ok(Check::Kernel, "Linux 6.18.0");
        let mut out = Vec::new();
        healthy.write(&mut out, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ok      kernel     Linux 6.18.0\npullproxy doctor: all 1 findings ok\n"
        );
    }
}
