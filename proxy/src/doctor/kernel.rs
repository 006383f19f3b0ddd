//! The kernel's part of `pullproxy doctor`: the kernel version and BPF program types, cgroup v2
//! and the attach cgroup, the privileges to load programs, bpffs under the pin directory; the
//! same checks the loader runs before it starts ([`crate::redirect::preflight`]).

use std::path::Path;

use aya::util::KernelVersion;

use super::{Check, DoctorReport};
use crate::{
    redirect::{
        LoaderError,
        cgroup::Cgroup2,
        preflight::{self, BPFFS, MIN_KERNEL},
    },
    settings::Config,
    telemetry::error_chain,
};

pub(super) fn check_kernel(report: &mut DoctorReport) {
    match KernelVersion::current() {
        Ok(v) if preflight::kernel_supported(v) => report.ok(
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
    let mut supported = Vec::new();
    for (name, kind) in preflight::PROGRAM_TYPES {
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

pub(super) fn check_cgroup(report: &mut DoctorReport, config: &Config) -> Option<Cgroup2> {
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

pub(super) fn check_privileges(report: &mut DoctorReport) {
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

pub(super) fn check_bpffs(report: &mut DoctorReport, pin_dir: &Path) {
    let root = Path::new(BPFFS);
    let probe = preflight::bpffs_probe(pin_dir);
    match preflight::fs_magic(probe) {
        Some(preflight::BPF_FS_MAGIC) => report.ok(
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
