//! The redirect's health, for `pullproxy doctor`: the kernel version and BPF program types,
//! cgroup v2 and the attach cgroup, the privileges to load programs, bpffs under the pin
//! directory (the same checks the loader runs before it starts, [`super::preflight`]); then the
//! container runtimes whose connections are redirected, the programs pinned and attached, and
//! the bind guard.

use std::path::Path;

use aya::util::KernelVersion;
use proxy_common::Counter;

use super::{
    GUARD_PROGRAMS, LoaderError, RedirectSettings, Targets,
    cgroup::Cgroup2,
    guard, pinned_counters, pinned_links,
    preflight::{self, BPFFS, MIN_KERNEL},
};
use crate::{
    diagnosis::{Check, Finding},
    telemetry::error_chain,
};

/// Whether this node can run the redirect of `settings`, and whether a running pullproxy's is
/// in place: runtimes are looked for in `proc_root`.
pub(crate) fn diagnose(settings: &RedirectSettings, proc_root: &Path) -> Vec<Finding> {
    let mut findings = Vec::new();
    check_kernel(&mut findings);
    let cgroup2 = check_cgroup(&mut findings, settings);
    check_privileges(&mut findings);
    check_bpffs(&mut findings, &settings.pin_dir);
    if let Some(cgroup2) = &cgroup2 {
        check_runtimes(&mut findings, settings, cgroup2, proc_root);
    }
    check_attached(&mut findings, settings, cgroup2.as_ref());
    check_guard(&mut findings, settings);
    findings
}

fn check_kernel(findings: &mut Vec<Finding>) {
    match KernelVersion::current() {
        Ok(v) if preflight::kernel_supported(v) => findings.push(Finding::ok(
            Check::Kernel,
            format!(
                "Linux {v} (>= {}.{}: cgroup BPF links, socket lookup from connect hooks)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )),
        Ok(v) => findings.push(Finding::problem(
            Check::Kernel,
            format!(
                "Linux {v} is too old: pullproxy needs {}.{} or newer; upgrade the node's kernel",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )),
        Err(e) => findings.push(Finding::note(
            Check::Kernel,
            format!("cannot read the kernel version ({e}); loading the programs will tell"),
        )),
    }
    // Probing loads a tiny program of each type, which needs the same privileges as pullproxy.
    let mut supported = Vec::new();
    for (name, kind) in preflight::PROGRAM_TYPES {
        match aya::sys::is_program_supported(kind) {
            Ok(true) => supported.push(name),
            Ok(false) => findings.push(Finding::problem(
                Check::BpfPrograms,
                format!(
                    "the kernel does not support {name} BPF programs: it needs CONFIG_BPF_SYSCALL \
                     and CONFIG_CGROUP_BPF"
                ),
            )),
            Err(e) => findings.push(Finding::note(
                Check::BpfPrograms,
                format!(
                    "cannot probe {name} BPF programs ({}); run doctor with pullproxy's privileges",
                    error_chain(&e)
                ),
            )),
        }
    }
    if !supported.is_empty() {
        findings.push(Finding::ok(
            Check::BpfPrograms,
            format!("{} programs supported", supported.join(" and ")),
        ));
    }
}

fn check_cgroup(findings: &mut Vec<Finding>, settings: &RedirectSettings) -> Option<Cgroup2> {
    let cgroup2 = match Cgroup2::discover() {
        Ok(c) => c,
        Err(e) => {
            findings.push(Finding::problem(Check::Cgroup2, error_chain(&e)));
            return None;
        }
    };
    let attach = &settings.attach_cgroup;
    match cgroup2.id(attach) {
        Ok(id) => findings.push(Finding::ok(
            Check::Cgroup2,
            format!(
                "cgroup v2 at {}; attach cgroup {attach} (id {id})",
                cgroup2.mount().display()
            ),
        )),
        Err(e) => findings.push(Finding::problem(
            Check::Cgroup2,
            format!(
                "redirect.attach_cgroup: {}; set it to an existing cgroup such as /",
                error_chain(&e)
            ),
        )),
    }
    Some(cgroup2)
}

fn check_privileges(findings: &mut Vec<Finding>) {
    let held = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| preflight::effective_caps(&s))
        .map(|eff| {
            preflight::CAPS
                .iter()
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
    match preflight::check() {
        Ok(()) => findings.push(Finding::ok(
            Check::Privileges,
            format!("may load and attach BPF programs (holds {held})"),
        )),
        Err(e @ LoaderError::NoPermission { .. }) => findings.push(Finding::problem(
            Check::Privileges,
            format!("{} (holds {held})", error_chain(&e)),
        )),
        // Kernel and cgroup failures are reported by their own checks.
        Err(_) => {}
    }
}

fn check_bpffs(findings: &mut Vec<Finding>, pin_dir: &Path) {
    let root = Path::new(BPFFS);
    let probe = preflight::bpffs_probe(pin_dir);
    match preflight::fs_magic(probe) {
        Some(preflight::BPF_FS_MAGIC) => findings.push(Finding::ok(
            Check::Bpffs,
            format!(
                "bpffs mounted at {}; pins go to {}",
                probe.display(),
                pin_dir.display()
            ),
        )),
        _ if probe == root => findings.push(Finding::problem(
            Check::Bpffs,
            format!(
                "no bpffs at {BPFFS}: mount it on the host (`mount -t bpf bpf {BPFFS}`; systemd \
                 does at boot) so pins outlive pullproxy, or grant CAP_SYS_ADMIN so it mounts one"
            ),
        )),
        _ => findings.push(Finding::problem(
            Check::Bpffs,
            format!(
                "{} is not on bpffs: set redirect.pin_dir below {BPFFS}",
                pin_dir.display()
            ),
        )),
    }
}

fn check_runtimes(
    findings: &mut Vec<Finding>,
    settings: &RedirectSettings,
    cgroup2: &Cgroup2,
    proc: &Path,
) {
    let (paths, how) = match &settings.targets {
        Targets::Auto => {
            let found = cgroup2.detect_runtimes(proc);
            for p in &found.skipped {
                findings.push(Finding::note(
                    Check::Runtimes,
                    format!(
                        "{} (pid {}) is named like a container runtime but is {}: its cgroup is \
                         not redirected",
                        p.comm, p.pid, p.vetting
                    ),
                ));
            }
            (found.cgroups.into_iter().collect::<Vec<_>>(), "found")
        }
        Targets::Paths(p) => (p.clone(), "configured"),
    };
    if paths.is_empty() {
        findings.push(Finding::problem(
            Check::Runtimes,
            "no container runtime cgroup found (containerd, dockerd, cri-o, k3s, rke2): nothing \
             is redirected; start the runtime or list its cgroup in redirect.targets",
        ));
        return;
    }
    for path in paths {
        match cgroup2.id(&path) {
            Ok(id) => findings.push(Finding::ok(
                Check::Runtimes,
                format!("runtime cgroup {path} (id {id}) {how}: its connections are redirected"),
            )),
            Err(e) => findings.push(Finding::problem(
                Check::Runtimes,
                format!(
                    "runtime cgroup {path} {how} but unusable ({}): its connections are not \
                     redirected",
                    error_chain(&e)
                ),
            )),
        }
    }
}

fn check_attached(
    findings: &mut Vec<Finding>,
    settings: &RedirectSettings,
    cgroup2: Option<&Cgroup2>,
) {
    let pin_dir = &settings.pin_dir;
    if !settings.enabled {
        findings.push(Finding::note(
            Check::Attached,
            "redirect.enabled is false: pullproxy attaches nothing and serves only explicit clients",
        ));
        return;
    }
    let links = pinned_links(pin_dir);
    let expected_cgroup = cgroup2.and_then(|c| c.id(&settings.attach_cgroup).ok());
    let missing: Vec<&str> = links
        .iter()
        .filter(|(_, l)| l.is_none())
        .map(|(n, _)| *n)
        .collect();
    if missing.len() == links.len() {
        findings.push(Finding::problem(
            Check::Attached,
            format!(
                "pullproxy's programs are not attached (nothing pinned under {}): start pullproxy",
                pin_dir.display()
            ),
        ));
        return;
    }
    if !missing.is_empty() {
        findings.push(Finding::problem(
            Check::Attached,
            format!(
                "only some programs are pinned under {} ({} missing): restart pullproxy, which \
                 attaches the missing ones",
                pin_dir.display(),
                missing.join(", ")
            ),
        ));
    }
    let mut attached = Vec::new();
    for (name, link) in &links {
        let Some(link) = link else { continue };
        match expected_cgroup {
            Some(want) if link.cgroup_id != want => findings.push(Finding::problem(
                Check::Attached,
                format!(
                    "{name} is attached to cgroup id {} but redirect.attach_cgroup {} is id \
                     {want}: restart pullproxy to move it",
                    link.cgroup_id, settings.attach_cgroup
                ),
            )),
            _ => attached.push(format!("{name} (link {}, prog {})", link.id, link.prog_id)),
        }
    }
    if !attached.is_empty() {
        let counters = match pinned_counters(pin_dir) {
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
        findings.push(Finding::ok(
            Check::Attached,
            format!(
                "{} program(s) attached at {}: {}{counters}",
                attached.len(),
                settings.attach_cgroup,
                attached.join(", ")
            ),
        ));
    }
}

/// The bind guard: attached, which ports, armed (pullproxy bound them since the programs were
/// installed), and how many binds it refused.
fn check_guard(findings: &mut Vec<Finding>, settings: &RedirectSettings) {
    if !settings.enabled {
        return;
    }
    let pin_dir = &settings.pin_dir;
    let links = pinned_links(pin_dir);
    let missing: Vec<&str> = GUARD_PROGRAMS
        .iter()
        .copied()
        .filter(|name| !links.iter().any(|(n, l)| n == name && l.is_some()))
        .collect();
    let want = &settings.guarded_ports;
    if !missing.is_empty() {
        findings.push(Finding::problem(
            Check::Guard,
            format!(
                "the bind guard is not attached ({} missing): while pullproxy is down any local \
                 process may listen on port {} and receive the runtimes' redirected connections; \
                 start pullproxy, which attaches it",
                missing.join(", "),
                settings.proxy_port
            ),
        ));
        return;
    }
    let guard = match guard::pinned(pin_dir) {
        Ok(g) => g,
        Err(e) => {
            findings.push(Finding::problem(
                Check::Guard,
                format!("cannot read the bind guard's maps: {}", error_chain(&e)),
            ));
            return;
        }
    };
    let refused = pinned_counters(pin_dir)
        .ok()
        .and_then(|c| c.into_iter().find(|(c, _)| *c == Counter::BindRefused))
        .map_or(0, |(_, v)| v);
    let ports: Vec<String> = guard.ports.iter().map(u16::to_string).collect();
    if guard.ports != *want {
        findings.push(Finding::problem(
            Check::Guard,
            format!(
                "the bind guard protects port(s) {} but this configuration uses {want:?}: \
                 restart pullproxy to update it",
                ports.join(", ")
            ),
        ));
    } else if guard.netns == 0 {
        findings.push(Finding::problem(
            Check::Guard,
            format!(
                "the bind guard for port(s) {} is attached but not armed: pullproxy has not bound \
                 them since it was installed; start pullproxy",
                ports.join(", ")
            ),
        ));
    } else {
        findings.push(Finding::ok(
            Check::Guard,
            format!(
                "bind guard attached: only pullproxy's cgroup may bind port(s) {} in its network \
                 namespace; {refused} bind(s) refused",
                ports.join(", ")
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{diagnosis::Verdict, settings::Config};

    /// The default redirect settings, pinning under `pin_dir` (not bpffs: nothing is pinned).
    fn settings(pin_dir: &Path) -> RedirectSettings {
        let mut settings = Config::defaults_with([]).unwrap().redirect;
        settings.pin_dir = pin_dir.join("pullproxy");
        settings
    }

    fn run(check: impl FnOnce(&mut Vec<Finding>)) -> Vec<(Check, Verdict, String)> {
        let mut findings = Vec::new();
        check(&mut findings);
        findings
            .into_iter()
            .map(|f| (f.check, f.verdict, f.message))
            .collect()
    }

    #[test]
    fn a_disabled_redirect_has_nothing_attached_and_no_guard() {
        let pins = tempfile::tempdir().unwrap();
        let mut settings = settings(pins.path());
        settings.enabled = false;
        assert_eq!(
            run(|f| check_attached(f, &settings, None)),
            [(
                Check::Attached,
                Verdict::Note,
                "redirect.enabled is false: pullproxy attaches nothing and serves only explicit \
                 clients"
                    .to_owned()
            )]
        );
        assert_eq!(run(|f| check_guard(f, &settings)), []);
    }

    #[test]
    fn nothing_pinned_is_nothing_attached_and_no_guard() {
        let pins = tempfile::tempdir().unwrap();
        let settings = settings(pins.path());
        assert_eq!(
            run(|f| check_attached(f, &settings, None)),
            [(
                Check::Attached,
                Verdict::Problem,
                format!(
                    "pullproxy's programs are not attached (nothing pinned under {}): start \
                     pullproxy",
                    settings.pin_dir.display()
                )
            )]
        );
        assert_eq!(
            run(|f| check_guard(f, &settings)),
            [(
                Check::Guard,
                Verdict::Problem,
                format!(
                    "the bind guard is not attached (pp_bind4, pp_bind6 missing): while pullproxy \
                     is down any local process may listen on port {} and receive the runtimes' \
                     redirected connections; start pullproxy, which attaches it",
                    settings.proxy_port
                )
            )]
        );
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_a_problem() {
        let pins = tempfile::tempdir().unwrap();
        let settings = settings(pins.path());
        assert_eq!(
            run(|f| check_bpffs(f, &settings.pin_dir)),
            [(
                Check::Bpffs,
                Verdict::Problem,
                format!(
                    "{} is not on bpffs: set redirect.pin_dir below /sys/fs/bpf",
                    settings.pin_dir.display()
                )
            )]
        );
    }

    #[test]
    fn configured_runtime_cgroups_are_each_judged() {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir(tree.path().join("runtime")).unwrap();
        let cgroup2 = Cgroup2::at(tree.path());
        let id = cgroup2.id("/runtime").unwrap();
        let mut settings = settings(tree.path());
        settings.targets = Targets::Paths(vec!["/runtime".into(), "/gone".into()]);
        assert_eq!(
            run(|f| check_runtimes(f, &settings, &cgroup2, tree.path())),
            [
                (
                    Check::Runtimes,
                    Verdict::Ok,
                    format!(
                        "runtime cgroup /runtime (id {id}) configured: its connections are \
                         redirected"
                    )
                ),
                (
                    Check::Runtimes,
                    Verdict::Problem,
                    format!(
                        "runtime cgroup /gone configured but unusable (cgroup /gone does not \
                         exist under {}): its connections are not redirected",
                        tree.path().display()
                    )
                ),
            ]
        );
    }

    #[test]
    fn no_runtime_found_is_a_problem() {
        let tree = tempfile::tempdir().unwrap();
        let proc = tempfile::tempdir().unwrap();
        let settings = settings(tree.path());
        assert_eq!(settings.targets, Targets::Auto);
        let found = run(|f| check_runtimes(f, &settings, &Cgroup2::at(tree.path()), proc.path()));
        assert_eq!(
            found,
            [(
                Check::Runtimes,
                Verdict::Problem,
                "no container runtime cgroup found (containerd, dockerd, cri-o, k3s, rke2): \
                 nothing is redirected; start the runtime or list its cgroup in redirect.targets"
                    .to_owned()
            )]
        );
    }
}
