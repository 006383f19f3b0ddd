//! Which container runtimes run without the node CA: Go runtimes read the system roots once per
//! process, so one started before the CA was installed must be restarted once to trust it.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rustls_pki_types::CertificateDer;

use crate::runtimes::Vetting;

use super::store::{InstallState, TrustStore, TrustStoreError};
use crate::node_ca::FileError;

/// Errors of telling which container runtimes trust the node CA.
#[derive(Debug, thiserror::Error)]
pub enum RuntimesError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error(transparent)]
    Store(#[from] TrustStoreError),
    #[error("reading {path}: {reason}")]
    Proc { path: PathBuf, reason: String },
}

/// A procfs to read processes from: `/proc`, or a fake one in tests.
#[derive(Debug, Clone)]
pub(crate) struct ProcFs {
    root: PathBuf,
    /// `USER_HZ`: the unit of start times in `/proc/<pid>/stat`.
    clock_ticks: u64,
}

/// A running container runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeProcess {
    pub(crate) pid: u32,
    /// The process name, one of [`crate::runtimes::RUNTIME_COMMS`].
    pub(crate) comm: String,
    /// Wall-clock start: boot time plus the start time in clock ticks. A clock stepped since
    /// boot shifts it by the same amount.
    pub(crate) started: SystemTime,
}

/// Whether a runtime trusts the node CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuntimeTrust {
    /// Started after the CA was installed.
    Trusts,
    /// Started before the CA was installed: restart it once.
    NeedsRestart,
    /// The CA is not installed yet; the runtime needs a restart after installing it.
    CaNotInstalled,
}

/// One runtime and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeCheck {
    pub(crate) process: RuntimeProcess,
    pub(crate) trust: RuntimeTrust,
}

impl fmt::Display for RuntimeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RuntimeProcess { pid, comm, .. } = &self.process;
        match self.trust {
            RuntimeTrust::Trusts => write!(
                f,
                "{comm} (pid {pid}) started after the node CA was installed: ok"
            ),
            RuntimeTrust::NeedsRestart => write!(
                f,
                "{comm} (pid {pid}) started before the node CA was installed: restart it once so \
                 it trusts the CA"
            ),
            RuntimeTrust::CaNotInstalled => write!(
                f,
                "{comm} (pid {pid}) does not trust the node CA: install it, then restart {comm} \
                 once"
            ),
        }
    }
}

impl ProcFs {
    /// A procfs of this kernel mounted at `root` (the host's, seen from a pod).
    pub(crate) fn at(root: impl Into<PathBuf>) -> Self {
        Self::new(root, clock_ticks())
    }

    /// A procfs at `root` whose start times count `clock_ticks` per second.
    pub(crate) fn new(root: impl Into<PathBuf>, clock_ticks: u64) -> Self {
        Self {
            root: root.into(),
            clock_ticks: clock_ticks.max(1),
        }
    }

    /// The running container runtimes, by pid. Processes that exit while being read are
    /// skipped, and so are impostors (named like a runtime, but not one). Unverified ones are
    /// kept: this only informs, and from a pod without CAP_SYS_PTRACE no runtime can be verified.
    pub(crate) fn runtimes(&self) -> Result<Vec<RuntimeProcess>, RuntimesError> {
        let boot = self.boot_time()?;
        let mut found = Vec::new();
        let running = crate::runtimes::running(&self.root).into_iter();
        for process in running.filter(|p| !matches!(p.vetting, Vetting::Impostor(_))) {
            let Ok(stat) = fs::read_to_string(process.dir.join("stat")) else {
                continue;
            };
            let ticks = start_ticks(&stat).ok_or_else(|| RuntimesError::Proc {
                path: process.dir.join("stat"),
                reason: "no start time (field 22)".into(),
            })?;
            found.push(RuntimeProcess {
                pid: process.pid,
                comm: process.comm,
                started: boot + ticks_to_duration(ticks, self.clock_ticks),
            });
        }
        found.sort_by_key(|p| p.pid);
        Ok(found)
    }

    /// Boot time: `btime` in `/proc/stat`.
    fn boot_time(&self) -> Result<SystemTime, RuntimesError> {
        let path = self.root.join("stat");
        let stat = fs::read_to_string(&path).map_err(FileError::at("reading", &path))?;
        stat.lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .ok_or(RuntimesError::Proc {
                path,
                reason: "no btime line".into(),
            })
    }
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from the last `)`.
fn start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the command name.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // USER_HZ is 100 on every architecture Kubernetes nodes run on.
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Judges each runtime against the install state. A runtime started in the same second as the
/// install counts as started before it: boot time has whole-second resolution, and telling an
/// operator to restart once too often is cheaper than a pull failing on an unknown authority.
pub(crate) fn check_runtimes(
    processes: &[RuntimeProcess],
    install: &InstallState,
) -> Vec<RuntimeCheck> {
    processes
        .iter()
        .map(|process| {
            let trust = match install {
                InstallState::Installed { since, .. } => {
                    if process.started > *since + Duration::from_secs(1) {
                        RuntimeTrust::Trusts
                    } else {
                        RuntimeTrust::NeedsRestart
                    }
                }
                _ => RuntimeTrust::CaNotInstalled,
            };
            RuntimeCheck {
                process: process.clone(),
                trust,
            }
        })
        .collect()
}

/// Everything `pullproxy ca status` (and later `doctor`) reports about trust in the node CA.
#[derive(Debug, Clone)]
pub(crate) struct TrustReport {
    pub(crate) store: TrustStore,
    pub(crate) install: InstallState,
    pub(crate) runtimes: Vec<RuntimeCheck>,
}

impl TrustReport {
    /// Reads the trust store under `root` and the runtimes in `proc`.
    pub(crate) fn collect(
        root: &Path,
        proc: &ProcFs,
        ca: &CertificateDer<'_>,
    ) -> Result<Self, RuntimesError> {
        let store = TrustStore::detect(root)?;
        let install = store.state(ca)?;
        let runtimes = check_runtimes(&proc.runtimes()?, &install);
        Ok(Self {
            store,
            install,
            runtimes,
        })
    }

    /// Things the operator must act on.
    pub(crate) fn problems(&self) -> usize {
        let install = usize::from(!matches!(self.install, InstallState::Installed { .. }));
        let runtimes = self
            .runtimes
            .iter()
            .filter(|r| r.trust == RuntimeTrust::NeedsRestart)
            .count();
        install + runtimes
    }

    /// One line per finding, each saying what to do.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut lines = vec![match &self.install {
            InstallState::Installed { evidence, since } => format!(
                "node CA installed ({} modified {})",
                evidence.display(),
                humantime::format_rfc3339_seconds(*since)
            ),
            InstallState::AnchorOnly { anchor, bundle } => format!(
                "node CA written to {} but {} does not contain it yet: run `{}` on the host, or \
                 `pullproxy ca install`",
                anchor.display(),
                bundle.display(),
                self.store.refresh_command()
            ),
            InstallState::NotInstalled { bundle } => format!(
                "node CA not installed ({} does not contain it): run `pullproxy ca install`",
                bundle.display()
            ),
        }];
        if self.runtimes.is_empty() {
            lines.push(format!(
                "no container runtime running (looked for {})",
                crate::runtimes::RUNTIME_COMMS.join(", ")
            ));
        }
        lines.extend(self.runtimes.iter().map(ToString::to_string));
        lines
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const BOOT: u64 = 1_700_000_000;

    /// A fake /proc: a boot time and processes with (pid, comm, start in ticks at 100 Hz).
    pub(crate) fn fake_proc(processes: &[(u32, &str, u64)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("stat"),
            format!("cpu  1 2 3 4\nbtime {BOOT}\nprocesses 9\n"),
        )
        .unwrap();
        fs::create_dir(dir.path().join("self")).unwrap();
        for (pid, comm, start) in processes {
            let p = dir.path().join(pid.to_string());
            fs::create_dir(&p).unwrap();
            fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            // State (field 3), fields 4..=21, starttime (22), then more; the name has a space
            // and a ')' to trip naive parsers.
            let middle = vec!["0"; 18].join(" ");
            fs::write(
                p.join("stat"),
                format!("{pid} ({comm} x) y) S {middle} {start} 0 0 0\n"),
            )
            .unwrap();
        }
        dir
    }

    fn at(secs_after_boot: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(BOOT + secs_after_boot)
    }

    #[test]
    fn runtimes_are_found_with_their_start_time() {
        let proc = fake_proc(&[
            (123, "containerd", 1_000),
            (77, "bash", 5),
            (456, "dockerd", 250_050),
            (789, "k3s-agent", 100),
            (790, "containerd", 100),
        ]);
        // A user's process named containerd is no runtime, so it needs no restart either.
        fs::write(
            proc.path().join("790/status"),
            "Uid:\t1000\t1000\t1000\t1000\n",
        )
        .unwrap();
        let found = ProcFs::new(proc.path(), 100).runtimes().unwrap();
        let summary: Vec<(u32, &str, SystemTime)> = found
            .iter()
            .map(|p| (p.pid, p.comm.as_str(), p.started))
            .collect();
        assert_eq!(
            summary,
            vec![
                (123, "containerd", at(10)),
                (456, "dockerd", at(2_500) + Duration::from_millis(500)),
                (789, "k3s-agent", at(1)),
            ]
        );
    }

    #[test]
    fn runtimes_started_before_the_install_must_restart() {
        let proc = fake_proc(&[(123, "containerd", 1_000), (456, "crio", 90_000)]);
        let processes = ProcFs::new(proc.path(), 100).runtimes().unwrap();
        let install = InstallState::Installed {
            evidence: "/etc/ssl/certs/ca-certificates.crt".into(),
            since: at(500),
        };
        let checks = check_runtimes(&processes, &install);
        assert_eq!(checks[0].trust, RuntimeTrust::NeedsRestart);
        assert_eq!(
            checks[0].to_string(),
            "containerd (pid 123) started before the node CA was installed: restart it once so \
             it trusts the CA"
        );
        assert_eq!(checks[1].trust, RuntimeTrust::Trusts);

        // The same second as the install: too close to call, so restart.
        let same_second = RuntimeProcess {
            pid: 1,
            comm: "containerd".into(),
            started: at(500) + Duration::from_millis(400),
        };
        assert_eq!(
            check_runtimes(&[same_second], &install)[0].trust,
            RuntimeTrust::NeedsRestart
        );

        let missing = InstallState::NotInstalled {
            bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
        };
        assert!(
            check_runtimes(&processes, &missing)
                .iter()
                .all(|c| c.trust == RuntimeTrust::CaNotInstalled)
        );
    }

    #[test]
    fn a_report_counts_what_needs_doing() {
        use crate::trust::store::Layout;
        use crate::trust::store::tests::{fake_root, node_ca_der};

        let (root, _) = fake_root(Layout::Debian);
        let ca = node_ca_der();
        // Every fake runtime started at boot, long before any install made now.
        let proc = fake_proc(&[(123, "containerd", 100)]);
        let procfs = ProcFs::new(proc.path(), 100);

        let before = TrustReport::collect(root.path(), &procfs, &ca).unwrap();
        assert_eq!(before.problems(), 1, "{:?}", before.lines());
        assert!(before.lines()[0].contains("pullproxy ca install"));

        TrustStore::detect(root.path())
            .unwrap()
            .install(&ca)
            .unwrap();
        let after = TrustReport::collect(root.path(), &procfs, &ca).unwrap();
        let lines = after.lines();
        assert_eq!(after.problems(), 1, "{lines:?}");
        assert!(lines[0].starts_with("node CA installed"), "{lines:?}");
        assert!(
            lines[1].contains("containerd (pid 123) started before"),
            "{lines:?}"
        );
    }

    #[test]
    fn stat_parsing_is_robust() {
        assert_eq!(start_ticks("1 (a) S 1 2 3"), None);
        assert_eq!(start_ticks("no parens"), None);
        let fields = (3..=22)
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(start_ticks(&format!("9 (we)ird) {fields} 23")), Some(22));
    }
}
