//! The redirect's part of `pullproxy doctor`: the container runtimes whose connections are
//! redirected, the programs pinned and attached, and the bind guard.

use std::path::Path;

use proxy_common::Counter;

use super::{Check, DoctorReport};
use crate::{
    redirect::{self, cgroup::Cgroup2},
    settings::Config,
    telemetry::error_chain,
};

pub(super) fn check_runtimes(
    report: &mut DoctorReport,
    config: &Config,
    cgroup2: &Cgroup2,
    proc: &Path,
) {
    let (paths, how) = match &config.redirect.targets {
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

pub(super) fn check_attached(
    report: &mut DoctorReport,
    config: &Config,
    cgroup2: Option<&Cgroup2>,
) {
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
pub(super) fn check_guard(report: &mut DoctorReport, config: &Config) {
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
    let want = &config.redirect.guarded_ports;
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
    if guard.ports != *want {
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
