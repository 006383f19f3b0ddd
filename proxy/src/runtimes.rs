//! The node's container runtimes: which process names and systemd units they have, which of them
//! are running, and whether a process named like one really is one (a name is not proof: any user
//! can run a copy of `sleep` called `containerd`). The redirect needs their cgroups, the TLS
//! checks their start times.

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Systemd units of the container runtimes pullproxy serves.
pub(crate) const RUNTIME_UNITS: &[&str] = &[
    "containerd.service",
    "docker.service",
    "crio.service",
    "k3s.service",
    "k3s-agent.service",
    "rke2-server.service",
    "rke2-agent.service",
];

/// Process names (`/proc/<pid>/comm`) of the runtimes that pull images. k3s and rke2 also run an
/// embedded `containerd`.
pub(crate) const RUNTIME_COMMS: &[&str] = &[
    "containerd",
    "dockerd",
    "crio",
    "k3s-server",
    "k3s-agent",
    "rke2",
];

/// Write permission for group or others.
const GROUP_OTHER_WRITE: u32 = 0o022;

/// A running process named like a runtime, and whether it is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeProc {
    pub(crate) pid: u32,
    /// One of [`RUNTIME_COMMS`].
    pub(crate) comm: String,
    /// Its `/proc/<pid>` directory under the procfs root that was scanned.
    pub(crate) dir: PathBuf,
    pub(crate) vetting: Vetting,
}

/// Whether a process named like a runtime is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vetting {
    /// Runs as root in the node's pid namespace from an executable only root can have put there.
    Runtime,
    /// Fails a check (the reason says which): whatever its name, it is not a runtime.
    Impostor(String),
    /// Could not be checked from here (the reason says why): not treated as a runtime where it
    /// matters (the redirect), still listed where it only informs (trust in the node CA).
    Unverified(String),
}

impl fmt::Display for Vetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vetting::Runtime => f.write_str("a container runtime"),
            Vetting::Impostor(why) => write!(f, "not a container runtime: {why}"),
            Vetting::Unverified(why) => write!(f, "not verified: {why}"),
        }
    }
}

/// Owner and permissions of a file, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileFacts {
    pub(crate) path: PathBuf,
    pub(crate) uid: u32,
    pub(crate) mode: u32,
}

/// Why a file could not be inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreadable {
    /// The kernel refused (another process's `exe` needs ptrace access: CAP_SYS_PTRACE for a
    /// process with capabilities the reader lacks), as opposed to the process being gone.
    pub(crate) denied: bool,
    pub(crate) reason: String,
}

/// What `/proc/<pid>` says about a process, as far as vetting it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcFacts {
    /// Effective uid (second field of `Uid:` in `status`); `None` when unreadable.
    pub(crate) euid: Option<u32>,
    /// How many pid namespaces the process has a pid in, from this procfs's down (`NSpid:`): 1
    /// means it lives in the procfs's own namespace (the node's), more means in a container.
    pub(crate) pid_namespaces: usize,
    /// The executable it runs (`exe`, followed).
    pub(crate) exe: Result<FileFacts, Unreadable>,
    /// The directory holding it, resolved in the process's own root.
    pub(crate) exe_dir: Result<FileFacts, Unreadable>,
}

impl ProcFacts {
    /// Reads the facts of the process at `dir` (`/proc/<pid>`).
    pub(crate) fn read(dir: &Path) -> Self {
        let status = fs::read_to_string(dir.join("status")).ok();
        let field = |name: &str| {
            status
                .as_deref()?
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::to_owned)
        };
        let euid = field("Uid:").and_then(|v| v.split_whitespace().nth(1)?.parse().ok());
        // Kernels before 4.1 have no NSpid line: one namespace is all they can show.
        let pid_namespaces = field("NSpid:").map_or(1, |v| v.split_whitespace().count().max(1));
        let (exe, exe_dir) = match fs::read_link(dir.join("exe")) {
            Ok(target) => {
                // An executable replaced since start (a package upgrade) reads "... (deleted)";
                // the running inode is what `exe` still stats.
                let text = target.to_string_lossy();
                let path = PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text));
                let exe = stat(&dir.join("exe"), &path);
                let exe_dir = match path.parent().filter(|_| path.is_absolute()) {
                    Some(parent) => stat(
                        &dir.join("root")
                            .join(parent.strip_prefix("/").unwrap_or(parent)),
                        parent,
                    ),
                    None => Err(Unreadable {
                        denied: false,
                        reason: format!("executable path {} is not absolute", path.display()),
                    }),
                };
                (exe, exe_dir)
            }
            Err(e) => {
                let unreadable = unreadable(&dir.join("exe"), &e);
                (Err(unreadable.clone()), Err(unreadable))
            }
        };
        Self {
            euid,
            pid_namespaces,
            exe,
            exe_dir,
        }
    }
}

/// `stat` of `at` (following links), reported under `shown`.
fn stat(at: &Path, shown: &Path) -> Result<FileFacts, Unreadable> {
    fs::metadata(at)
        .map(|m| FileFacts {
            path: shown.to_owned(),
            uid: m.uid(),
            mode: m.mode(),
        })
        .map_err(|e| unreadable(at, &e))
}

fn unreadable(path: &Path, e: &io::Error) -> Unreadable {
    Unreadable {
        denied: e.kind() == io::ErrorKind::PermissionDenied,
        reason: format!("{}: {e}", path.display()),
    }
}

/// Judges a process named like a runtime: it must run with effective uid 0, in the node's pid
/// namespace (not a container's), from a root-owned executable that neither group nor others may
/// write, in a root-owned directory that neither group nor others may write (so nothing in `/tmp`
/// or a user's home: only root can have put it there).
pub(crate) fn vet(facts: &ProcFacts) -> Vetting {
    let Some(euid) = facts.euid else {
        return Vetting::Unverified("its status is unreadable (it exited?)".into());
    };
    if euid != 0 {
        return Vetting::Impostor(format!("it runs as uid {euid}, not root"));
    }
    if facts.pid_namespaces > 1 {
        return Vetting::Impostor(
            "it runs in a container (a pid namespace of its own), not on the node".into(),
        );
    }
    for (what, file) in [("executable", &facts.exe), ("directory", &facts.exe_dir)] {
        let file = match file {
            Ok(f) => f,
            Err(u) if u.denied => {
                return Vetting::Unverified(format!(
                    "{} (reading another root process's executable needs CAP_SYS_PTRACE; \
                     runtimes started as systemd units are found without it)",
                    u.reason
                ));
            }
            Err(u) => return Vetting::Unverified(u.reason.clone()),
        };
        if file.uid != 0 {
            return Vetting::Impostor(format!(
                "its {what} {} belongs to uid {}, not root",
                file.path.display(),
                file.uid
            ));
        }
        if file.mode & GROUP_OTHER_WRITE != 0 {
            return Vetting::Impostor(format!(
                "its {what} {} is writable by group or others (mode {:o})",
                file.path.display(),
                file.mode & 0o7777
            ));
        }
    }
    Vetting::Runtime
}

/// The processes under `proc_root` (`/proc`, the host's procfs mounted in a pod, or a fake one in
/// tests) named like a runtime, by pid, each vetted. Processes that exit while being read are
/// skipped.
pub(crate) fn running(proc_root: &Path) -> Vec<RuntimeProc> {
    let mut found: Vec<RuntimeProc> = fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path();
            let comm = fs::read_to_string(dir.join("comm")).ok()?;
            let comm = comm.trim_end_matches('\n');
            RUNTIME_COMMS.contains(&comm).then(|| RuntimeProc {
                pid,
                comm: comm.to_owned(),
                vetting: vet(&ProcFacts::read(&dir)),
                dir,
            })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_file(path: &str, mode: u32) -> Result<FileFacts, Unreadable> {
        Ok(FileFacts {
            path: path.into(),
            uid: 0,
            mode,
        })
    }

    /// containerd as a package installs it.
    fn real() -> ProcFacts {
        ProcFacts {
            euid: Some(0),
            pid_namespaces: 1,
            exe: root_file("/usr/bin/containerd", 0o100755),
            exe_dir: root_file("/usr/bin", 0o40755),
        }
    }

    #[test]
    fn a_root_process_from_a_root_only_directory_is_a_runtime() {
        assert_eq!(vet(&real()), Vetting::Runtime);
        // Read-only and setuid bits do not matter; only write access for others does.
        let mut f = real();
        f.exe = root_file("/usr/local/bin/containerd", 0o100500);
        f.exe_dir = root_file("/usr/local/bin", 0o40555);
        assert_eq!(vet(&f), Vetting::Runtime);
    }

    #[test]
    fn a_spoofed_name_is_not_enough() {
        // `cp /bin/sleep ~/containerd` run by a user.
        let mut f = real();
        f.euid = Some(1000);
        assert!(matches!(vet(&f), Vetting::Impostor(why) if why.contains("uid 1000")));
        // Root running a copy from /tmp (sticky, world-writable).
        let mut f = real();
        f.exe = root_file("/tmp/containerd", 0o100755);
        f.exe_dir = root_file("/tmp", 0o41777);
        assert!(
            matches!(vet(&f), Vetting::Impostor(why) if why.contains("/tmp is writable by group or others (mode 1777)"))
        );
        // Root running a file a user owns, or one in a user's directory.
        let mut f = real();
        f.exe = Ok(FileFacts {
            path: "/home/u/containerd".into(),
            uid: 1000,
            mode: 0o100755,
        });
        assert!(matches!(vet(&f), Vetting::Impostor(why) if why.contains("belongs to uid 1000")));
        let mut f = real();
        f.exe_dir = Ok(FileFacts {
            path: "/home/u/bin".into(),
            uid: 1000,
            mode: 0o40755,
        });
        assert!(matches!(vet(&f), Vetting::Impostor(why) if why.contains("directory /home/u/bin")));
        // A group-writable executable.
        let mut f = real();
        f.exe = root_file("/usr/bin/containerd", 0o100775);
        assert!(matches!(vet(&f), Vetting::Impostor(_)));
        // A root container whose image ships a binary named containerd.
        let mut f = real();
        f.pid_namespaces = 2;
        assert!(matches!(vet(&f), Vetting::Impostor(why) if why.contains("container")));
    }

    #[test]
    fn what_cannot_be_inspected_is_unverified_not_a_runtime() {
        let mut f = real();
        f.exe = Err(Unreadable {
            denied: true,
            reason: "/proc/7/exe: Permission denied (os error 13)".into(),
        });
        assert!(matches!(vet(&f), Vetting::Unverified(why) if why.contains("CAP_SYS_PTRACE")));
        let mut f = real();
        f.euid = None;
        assert!(matches!(vet(&f), Vetting::Unverified(_)));
        // A user's process is refused before its executable is even looked at.
        let mut f = real();
        f.euid = Some(65534);
        f.exe = Err(Unreadable {
            denied: true,
            reason: String::new(),
        });
        assert!(matches!(vet(&f), Vetting::Impostor(_)));
    }

    #[test]
    fn facts_are_read_from_proc_including_a_replaced_executable() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let exe = bin.join("containerd");
        fs::write(&exe, "").unwrap();
        let proc_dir = root.path().join("proc/7");
        fs::create_dir_all(&proc_dir).unwrap();
        fs::write(
            proc_dir.join("status"),
            "Name:\tcontainerd\nUid:\t1000\t0\t0\t0\nNSpid:\t7\t1\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(&exe, proc_dir.join("exe")).unwrap();
        // The process's root is this filesystem's root.
        std::os::unix::fs::symlink("/", proc_dir.join("root")).unwrap();
        let facts = ProcFacts::read(&proc_dir);
        assert_eq!(facts.euid, Some(0));
        assert_eq!(facts.pid_namespaces, 2);
        let me = fs::metadata(&exe).unwrap();
        assert_eq!(
            facts.exe,
            Ok(FileFacts {
                path: exe.clone(),
                uid: me.uid(),
                mode: me.mode()
            })
        );
        assert_eq!(facts.exe_dir.as_ref().map(|d| &d.path), Ok(&bin));

        // `exe` of a process whose file was replaced: the link text ends in " (deleted)".
        let other = root.path().join("proc/8");
        fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(format!("{} (deleted)", exe.display()), other.join("exe"))
            .unwrap();
        std::os::unix::fs::symlink("/", other.join("root")).unwrap();
        let facts = ProcFacts::read(&other);
        assert_eq!(facts.euid, None);
        assert_eq!(facts.pid_namespaces, 1);
        // The link text names no existing file here (the kernel's `exe` would still stat the
        // running inode), but the directory is found without the suffix.
        assert!(facts.exe.is_err());
        assert_eq!(facts.exe_dir.as_ref().map(|d| &d.path), Ok(&bin));
    }

    #[test]
    fn only_processes_named_like_runtimes_are_listed() {
        let root = tempfile::tempdir().unwrap();
        for (pid, comm) in [
            (7, "containerd"),
            (8, "bash"),
            (9, "k3s-server"),
            (10, "containerd-shim"),
        ] {
            let d = root.path().join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        }
        fs::write(
            root.path().join("9/status"),
            "Uid:\t1000\t1000\t1000\t1000\n",
        )
        .unwrap();
        fs::create_dir_all(root.path().join("self")).unwrap();
        let found: Vec<_> = running(root.path())
            .into_iter()
            .map(|p| (p.pid, p.comm, p.vetting))
            .collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].0, found[0].1.as_str()), (7, "containerd"));
        // No status to read: cannot be checked.
        assert!(matches!(found[0].2, Vetting::Unverified(_)));
        assert_eq!((found[1].0, found[1].1.as_str()), (9, "k3s-server"));
        assert!(matches!(&found[1].2, Vetting::Impostor(why) if why.contains("uid 1000")));
    }
}
