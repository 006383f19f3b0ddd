//! Trust in the node CA, for `pullproxy doctor`: installed in the system trust store, and every
//! running container runtime started after it was.

use super::{Check, DoctorArgs, DoctorReport, Verdict};
use crate::{
    node_ca::NodeCa,
    settings::Config,
    telemetry::error_chain,
    trust::{
        runtimes::{ProcFs, RuntimeTrust, TrustReport},
        store::InstallState,
    },
};

pub(super) fn check_trust(report: &mut DoctorReport, config: &Config, args: &DoctorArgs) {
    let settings = &config.tls;
    let ca = match NodeCa::read_certificate(settings) {
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
