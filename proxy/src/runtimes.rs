//! The node's container runtimes: which process names and systemd units they have, and which of
//! them are running. The redirect needs their cgroups, the TLS checks their start times.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Systemd units of the container runtimes pullproxy serves.
pub const RUNTIME_UNITS: &[&str] = &[
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
pub const RUNTIME_COMMS: &[&str] = &[
    "containerd",
    "dockerd",
    "crio",
    "k3s-server",
    "k3s-agent",
    "rke2",
];

/// A running runtime process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeProc {
    pub pid: u32,
    /// One of [`RUNTIME_COMMS`].
    pub comm: String,
    /// Its `/proc/<pid>` directory under the procfs root that was scanned.
    pub dir: PathBuf,
}

/// The runtime processes under `proc_root` (`/proc`, the host's procfs mounted in a pod, or a
/// fake one in tests), by pid. Processes that exit while being read are skipped.
pub fn running(proc_root: &Path) -> Vec<RuntimeProc> {
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

    #[test]
    fn only_runtime_processes_are_found() {
        let root = std::env::temp_dir().join(format!("pullproxy-runtimes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, comm) in [
            (7, "containerd"),
            (8, "bash"),
            (9, "k3s-server"),
            (10, "containerd-shim"),
        ] {
            let d = root.join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        }
        fs::create_dir_all(root.join("self")).unwrap();
        let found: Vec<_> = running(&root)
            .into_iter()
            .map(|p| (p.pid, p.comm))
            .collect();
        assert_eq!(
            found,
            vec![(7, "containerd".into()), (9, "k3s-server".into())]
        );
        fs::remove_dir_all(root).unwrap();
    }
}
