//! The `pullproxy ca` commands: print the node CA, install it into the system trust store, and
//! tell which container runtimes must be restarted once to trust it.

use std::{
    io::{self, Write},
    path::PathBuf,
};

use super::{
    runtimes::{ProcFs, RuntimesError, TrustReport},
    store::{TrustStore, TrustStoreError},
};
use crate::node_ca::{
    FileError, TlsSettings,
    ca::{CaError, NodeCa},
    hosts::HostPatternError,
};

/// Errors of the `pullproxy ca` commands.
#[derive(Debug, thiserror::Error)]
pub enum CaCommandError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Hosts(#[from] HostPatternError),
    #[error(transparent)]
    Store(#[from] TrustStoreError),
    #[error(transparent)]
    Runtimes(#[from] RuntimesError),
    #[error("node CA trust is incomplete: {problems} problem(s) listed above")]
    TrustIncomplete { problems: usize },
}

/// `pullproxy ca ...`
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CaCommand {
    /// Print the node CA certificate (PEM) to stdout, generating the CA if there is none yet.
    Print,
    /// Install the node CA into the system trust store (Debian/Ubuntu or RHEL/Fedora layout).
    Install {
        /// Root directory of the system whose trust store is changed; a DaemonSet that mounts the
        /// host at /host passes `--root /host`.
        #[arg(long, default_value = "/", env = "PULLPROXY_HOST_ROOT")]
        root: PathBuf,
    },
    /// Tell whether the node CA is installed and which container runtimes started before it was
    /// (they must be restarted once). Exits non-zero when something needs doing.
    Status {
        /// Root directory of the system whose trust store is checked.
        #[arg(long, default_value = "/", env = "PULLPROXY_HOST_ROOT")]
        root: PathBuf,
        /// procfs that shows the host's processes (in a pod: hostPID).
        #[arg(long = "proc", default_value = "/proc")]
        proc_root: PathBuf,
    },
}

/// Runs a `pullproxy ca` command, printing to stdout (results) and stderr (notices).
pub fn run(command: CaCommand, settings: &TlsSettings) -> Result<(), CaCommandError> {
    run_with(
        command,
        settings,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    )
}

/// [`run`] with the output streams given, for tests.
pub(crate) fn run_with(
    command: CaCommand,
    settings: &TlsSettings,
    out: &mut dyn Write,
    notices: &mut dyn Write,
) -> Result<(), CaCommandError> {
    match command {
        CaCommand::Print => {
            let ca = load(settings, notices)?;
            write(out, ca.cert_pem())
        }
        CaCommand::Install { root } => {
            let ca = load(settings, notices)?;
            let installed = TrustStore::detect(&root)?.install(ca.cert_der())?;
            write(out, &format!("{installed}\n"))?;
            write(
                out,
                "container runtimes started before the CA was installed must be restarted once; \
                 `pullproxy ca status` lists them\n",
            )
        }
        CaCommand::Status { root, proc_root } => {
            let Some(ca) = NodeCa::read_certificate(settings)? else {
                write(
                    out,
                    &format!(
                        "no node CA at {} yet: start pullproxy or run `pullproxy ca install`\n",
                        settings.ca_cert_path().display()
                    ),
                )?;
                return Err(CaCommandError::TrustIncomplete { problems: 1 });
            };
            let report = TrustReport::collect(&root, &ProcFs::at(proc_root), &ca)?;
            for line in report.lines() {
                write(out, &format!("{line}\n"))?;
            }
            match report.problems() {
                0 => Ok(()),
                problems => Err(CaCommandError::TrustIncomplete { problems }),
            }
        }
    }
}

/// Loads (or generates) the CA exactly as the proxy does at start, so what is printed or
/// installed is what the proxy serves.
fn load(settings: &TlsSettings, notices: &mut dyn Write) -> Result<NodeCa, CaCommandError> {
    let hosts = settings.intercept_set()?;
    let (ca, ca_notices) = NodeCa::load_or_generate(settings, &hosts)?;
    for notice in ca_notices {
        write(notices, &format!("pullproxy: {notice}\n"))?;
    }
    Ok(ca)
}

fn write(out: &mut dyn Write, text: &str) -> Result<(), CaCommandError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(FileError::at("writing", "standard output"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use clap::Parser;
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    use super::*;
    use crate::trust::store::{Layout, tests::fake_root};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        ca: CaCommand,
    }

    #[test]
    fn arguments_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.ca);
        assert_eq!(parse(&["x", "print"]).unwrap(), CaCommand::Print);
        assert_eq!(
            parse(&["x", "install", "--root", "/host"]).unwrap(),
            CaCommand::Install {
                root: "/host".into()
            }
        );
        assert_eq!(
            parse(&["x", "status", "--proc", "/host/proc"]).unwrap(),
            CaCommand::Status {
                root: "/".into(),
                proc_root: "/host/proc".into()
            }
        );
        assert!(parse(&["x", "uninstall"]).is_err());
    }

    #[test]
    fn print_install_status_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TlsSettings::new(dir.path().join("state"));
        let (root, _) = fake_root(Layout::Debian);
        let proc = dir.path().join("proc");
        fs::create_dir(&proc).unwrap();
        fs::write(proc.join("stat"), "btime 1700000000\n").unwrap();
        let status = || CaCommand::Status {
            root: root.path().into(),
            proc_root: proc.clone(),
        };

        // Status never creates a CA.
        let mut out = Vec::new();
        let err = run_with(status(), &settings, &mut out, &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            CaCommandError::TrustIncomplete { problems: 1 }
        ));
        assert!(!settings.ca_cert_path().exists());

        let (mut pem, mut notices) = (Vec::new(), Vec::new());
        run_with(CaCommand::Print, &settings, &mut pem, &mut notices).unwrap();
        let ca = CertificateDer::from_pem_slice(&pem).unwrap();
        assert!(
            String::from_utf8(notices)
                .unwrap()
                .contains("generated the node CA")
        );

        let mut out = Vec::new();
        let install = CaCommand::Install {
            root: root.path().into(),
        };
        run_with(install.clone(), &settings, &mut out, &mut Vec::new()).unwrap();
        let said = String::from_utf8(out).unwrap();
        assert!(said.contains("marked block"), "{said}");

        let mut out = Vec::new();
        run_with(install, &settings, &mut out, &mut Vec::new()).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("nothing to do"));

        let mut out = Vec::new();
        run_with(status(), &settings, &mut out, &mut Vec::new()).unwrap();
        let said = String::from_utf8(out).unwrap();
        assert!(said.starts_with("node CA installed"), "{said}");
        assert!(said.contains("no container runtime running"), "{said}");
        let bundle = root.path().join("etc/ssl/certs/ca-certificates.crt");
        let bundle = fs::read(bundle).unwrap();
        assert!(CertificateDer::pem_slice_iter(&bundle).any(|c| c.unwrap() == ca));
    }
}
