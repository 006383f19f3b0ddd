//! `pullproxy doctor`: checks that a node can run pullproxy and that a running one works (kernel
//! and BPF support, cgroup v2, privileges, bpffs, container runtimes, attached programs, the bind
//! guard, trust in the node CA, the hub, the cache directory), as a report tests can assert on
//! and one line per finding for the operator. Nothing here changes the system, and no credential
//! is ever printed.
//!
//! Each subsystem judges its own state with a `diagnose()` that returns its [`Finding`]s
//! ([`crate::diagnosis`]); this module only gathers them in order and prints them.

use std::{
    io::{self, Write},
    path::PathBuf,
};

pub use crate::diagnosis::{Check, Finding, Verdict};
use crate::{cache, origins::hub, redirect, settings::Config, trust};

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

/// Everything `pullproxy doctor` found.
#[derive(Debug, Clone, Default)]
pub struct DoctorReport {
    pub findings: Vec<Finding>,
}

impl DoctorReport {
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
    // In the report's order: the redirect (kernel to bind guard), trust, the hub, the cache.
    let mut findings = redirect::diagnose(&config.redirect, &args.proc_root);
    findings.extend(trust::diagnose(&config.tls, &args.root, &args.proc_root));
    let connect_timeout = config.upstream.connect_timeout;
    findings.extend(
        hub::diagnose(
            config.hub.as_ref(),
            &config.tls.extra_upstream_cas,
            connect_timeout,
        )
        .await,
    );
    findings.extend(cache::diagnose(&config.cache));
    DoctorReport { findings }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_prints_problems_and_a_summary() {
        let report = DoctorReport {
            findings: vec![
                Finding::ok(Check::Kernel, "Linux 6.18.0"),
                Finding::problem(
                    Check::Hub,
                    "hub http://h:5000 unreachable: connection refused",
                ),
                Finding::note(Check::Trust, "not checked here"),
            ],
        };
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
        let healthy = DoctorReport {
            findings: vec![Finding::ok(Check::Kernel, "Linux 6.18.0")],
        };
        let mut out = Vec::new();
        healthy.write(&mut out, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ok      kernel     Linux 6.18.0\npullproxy doctor: all 1 findings ok\n"
        );
    }
}
