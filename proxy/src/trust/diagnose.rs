//! Trust in the node CA, for `pullproxy doctor`: installed in the system trust store, and every
//! running container runtime started after it was.

use std::path::Path;

use super::{
    runtimes::{ProcFs, RuntimeTrust, TrustReport},
    store::InstallState,
};
use crate::{
    diagnosis::{Check, Finding, Verdict},
    node_ca::{NodeCa, TlsSettings},
    telemetry::error_chain,
};

/// Whether the node CA of `settings` is in the trust store under `root`, and whether the
/// container runtimes visible in `proc_root` started late enough to trust it.
pub(crate) fn diagnose(settings: &TlsSettings, root: &Path, proc_root: &Path) -> Vec<Finding> {
    let ca = match NodeCa::read_certificate(settings) {
        Ok(Some(ca)) => ca,
        Ok(None) => {
            return vec![Finding::problem(
                Check::Trust,
                format!(
                    "no node CA at {} yet: start pullproxy (it generates one) or run `pullproxy ca \
                     install`",
                    settings.ca_cert_path().display()
                ),
            )];
        }
        Err(e) => return vec![Finding::problem(Check::Trust, error_chain(&e))],
    };
    let trust = match TrustReport::collect(root, &ProcFs::at(proc_root), &ca) {
        Ok(t) => t,
        Err(e) => return vec![Finding::problem(Check::Trust, error_chain(&e))],
    };
    let mut findings = Vec::new();
    // The first line is the install state, then one per runtime (or "no runtime running").
    let install_ok = matches!(trust.install, InstallState::Installed { .. });
    if let Some(first) = trust.lines().into_iter().next() {
        let verdict = if install_ok {
            Verdict::Ok
        } else {
            Verdict::Problem
        };
        findings.push(Finding::new(Check::Trust, verdict, first));
    }
    if trust.runtimes.is_empty() {
        findings.push(Finding::note(
            Check::Trust,
            format!(
                "no container runtime process visible in {} (a pod without hostPID sees none): \
                 whether the runtimes trust the node CA is not checked here",
                proc_root.display()
            ),
        ));
    }
    for check in &trust.runtimes {
        let verdict = match check.trust {
            RuntimeTrust::Trusts => Verdict::Ok,
            RuntimeTrust::NeedsRestart | RuntimeTrust::CaNotInstalled => Verdict::Problem,
        };
        findings.push(Finding::new(Check::Trust, verdict, check.to_string()));
    }
    findings
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::{
        settings::Config,
        trust::{
            runtimes::tests::fake_proc,
            store::{Layout, TrustStore, tests::fake_root},
        },
    };

    /// TLS settings whose state directory is `state`, where a generated node CA would live.
    fn tls(state: &Path) -> TlsSettings {
        let env = [(
            "PULLPROXY_TLS__STATE_DIR".to_owned(),
            state.display().to_string(),
        )];
        Config::defaults_with(env).unwrap().tls
    }

    /// Writes a node CA certificate where `settings` reads it from.
    fn write_ca(settings: &TlsSettings) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(settings.ca_cert_path(), cert.pem()).unwrap();
        cert.der().clone()
    }

    fn verdicts(findings: &[Finding]) -> Vec<(Check, Verdict)> {
        findings.iter().map(|f| (f.check, f.verdict)).collect()
    }

    #[test]
    fn without_a_node_ca_there_is_nothing_to_trust() {
        let state = tempfile::tempdir().unwrap();
        let (root, _) = fake_root(Layout::Debian);
        let proc = fake_proc(&[]);
        let settings = tls(state.path());
        let found = diagnose(&settings, root.path(), proc.path());
        assert_eq!(
            found,
            vec![Finding::problem(
                Check::Trust,
                format!(
                    "no node CA at {} yet: start pullproxy (it generates one) or run `pullproxy \
                     ca install`",
                    settings.ca_cert_path().display()
                )
            )]
        );
    }

    #[test]
    fn the_install_state_and_each_runtime_are_judged() {
        let state = tempfile::tempdir().unwrap();
        let (root, _) = fake_root(Layout::Debian);
        let settings = tls(state.path());
        let ca = write_ca(&settings);

        // Not installed, and no runtime visible: a problem, and a note that says where to look.
        let empty = fake_proc(&[]);
        let found = diagnose(&settings, root.path(), empty.path());
        assert_eq!(
            verdicts(&found),
            [
                (Check::Trust, Verdict::Problem),
                (Check::Trust, Verdict::Note)
            ],
            "{found:?}"
        );
        assert!(found[0].message.starts_with("node CA not installed ("));
        assert!(
            found[1].message.starts_with(&format!(
                "no container runtime process visible in {} ",
                empty.path().display()
            )),
            "{found:?}"
        );

        // Installed now, but the runtime started at boot, before the install: it must restart.
        TrustStore::detect(root.path())
            .unwrap()
            .install(&ca)
            .unwrap();
        let proc = fake_proc(&[(123, "containerd", 100)]);
        let found = diagnose(&settings, root.path(), proc.path());
        assert_eq!(
            verdicts(&found),
            [
                (Check::Trust, Verdict::Ok),
                (Check::Trust, Verdict::Problem)
            ],
            "{found:?}"
        );
        assert!(found[0].message.starts_with("node CA installed ("));
        assert!(
            found[1]
                .message
                .starts_with("containerd (pid 123) started before"),
            "{found:?}"
        );
    }
}
