//! cgroup v2: where it is mounted, what a cgroup's id is, which cgroups hold container runtimes.

use std::{
    collections::BTreeSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::runtimes::{self, RUNTIME_UNITS, RuntimeProc, Vetting};

/// How deep below the root the unit scan looks (`system.slice/x.service` is depth 2).
const UNIT_SCAN_DEPTH: usize = 3;

/// What a scan for runtimes found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Detection {
    /// Cgroup paths of the runtimes: their systemd units and the cgroups of vetted processes.
    pub(crate) cgroups: BTreeSet<String>,
    /// Processes named like a runtime whose cgroups do not count (impostors, or unverified),
    /// except those in a cgroup that is a target anyway (a runtime's unit).
    pub(crate) skipped: Vec<RuntimeProc>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); pullproxy needs the unified \
         hierarchy (boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup)"
    )]
    NoCgroup2,
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} does not exist under {mount}")]
    Missing { path: String, mount: PathBuf },
    #[error("{path} is not a cgroup path: it must be absolute and must not contain `..`")]
    BadPath { path: String },
}

/// The cgroup v2 mount. Paths handed to it are cgroup paths (`/system.slice/x.service`), as in
/// `/proc/<pid>/cgroup`, not filesystem paths.
#[derive(Debug, Clone)]
pub struct Cgroup2 {
    mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup v2 mount from `/proc/self/mountinfo` (on hybrid hosts it is
    /// `/sys/fs/cgroup/unified`, on most nodes `/sys/fs/cgroup`).
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// Parses mountinfo text; the first `cgroup2` mount wins.
    pub(crate) fn from_mountinfo(text: &str) -> Result<Self, CgroupError> {
        text.lines()
            .find_map(|line| {
                // `36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw`
                let (left, right) = line.split_once(" - ")?;
                let fstype = right.split_whitespace().next()?;
                let mount = left.split_whitespace().nth(4)?;
                (fstype == "cgroup2").then(|| Self {
                    mount: PathBuf::from(unescape_mountinfo(mount)),
                })
            })
            .ok_or(CgroupError::NoCgroup2)
    }

    #[cfg(test)]
    /// A cgroup v2 tree rooted at `mount` (tests).
    pub(crate) fn at(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Filesystem path of a cgroup path.
    pub fn dir(&self, cgroup: &str) -> Result<PathBuf, CgroupError> {
        let rel = cgroup
            .strip_prefix('/')
            .ok_or_else(|| CgroupError::BadPath {
                path: cgroup.into(),
            })?;
        if rel.split('/').any(|c| c == "..") {
            return Err(CgroupError::BadPath {
                path: cgroup.into(),
            });
        }
        Ok(self.mount.join(rel))
    }

    /// The cgroup's id: the inode number of its directory, as `bpf_get_current_cgroup_id()`
    /// reports it.
    pub fn id(&self, cgroup: &str) -> Result<u64, CgroupError> {
        let dir = self.dir(cgroup)?;
        match fs::metadata(&dir) {
            Ok(m) => Ok(m.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CgroupError::Missing {
                path: cgroup.into(),
                mount: self.mount.clone(),
            }),
            Err(source) => Err(CgroupError::Read { path: dir, source }),
        }
    }

    /// Finds the runtimes' cgroups: known systemd units near the top of the tree, and the cgroups
    /// of processes under `proc_root` that are runtimes (named like one and vetted, see
    /// [`runtimes::vet`]). The root cgroup is never returned: targeting it would redirect every
    /// process on the node.
    pub(crate) fn detect_runtimes(&self, proc_root: &Path) -> Detection {
        let mut units = BTreeSet::new();
        self.scan_units(Path::new("/"), 0, &mut units);
        process_cgroups(runtimes::running(proc_root), units)
    }

    /// Units are looked for only in slices (`/system.slice/containerd.service`), as systemd
    /// places them: a cgroup someone was delegated (a `Delegate=yes` service running as a user,
    /// a container's scope, a machine) is never a slice, so whoever owns it cannot make a
    /// directory inside it count as a runtime's unit.
    fn scan_units(&self, cgroup: &Path, depth: usize, found: &mut BTreeSet<String>) {
        if depth >= UNIT_SCAN_DEPTH {
            return;
        }
        let Ok(entries) = fs::read_dir(self.mount.join(cgroup.strip_prefix("/").unwrap_or(cgroup)))
        else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let child = cgroup.join(&name);
            if RUNTIME_UNITS.iter().any(|u| name == *u) {
                found.insert(child.to_string_lossy().into_owned());
            } else if name.to_string_lossy().ends_with(".slice") {
                self.scan_units(&child, depth + 1, found);
            }
        }
    }
}

/// `units` plus the cgroups of the processes vetted as runtimes; the others come back as
/// skipped unless a target cgroup holds them anyway.
fn process_cgroups(processes: Vec<RuntimeProc>, units: BTreeSet<String>) -> Detection {
    let mut found = Detection {
        cgroups: units,
        skipped: Vec::new(),
    };
    let (vetted, others): (Vec<_>, Vec<_>) = processes
        .into_iter()
        .map(|p| (process_cgroup(&p), p))
        .partition(|(_, p)| p.vetting == Vetting::Runtime);
    for (path, _) in vetted {
        // The root cgroup would make every process on the node a target.
        if let Some(path) = path.filter(|p| p != "/") {
            found.cgroups.insert(path);
        }
    }
    for (path, process) in others {
        let covered = path.is_some_and(|path| {
            found
                .cgroups
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/")))
        });
        if !covered {
            found.skipped.push(process);
        }
    }
    found
}

/// A process's cgroup v2 path. A path with `..` is another cgroup namespace's view (a pod with
/// hostPID): not resolvable here, and the unit scan finds systemd-managed runtimes anyway.
fn process_cgroup(process: &RuntimeProc) -> Option<String> {
    let text = fs::read_to_string(process.dir.join("cgroup")).ok()?;
    let path = unified_path(&text)?;
    (!path.split('/').any(|c| c == "..")).then(|| path.to_owned())
}

/// The cgroup v2 path in `/proc/<pid>/cgroup` text (`0::/path`).
pub(crate) fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// This process's cgroup v2 path, as it appears in the tree under this mount.
///
/// `/proc/self/cgroup` is relative to the cgroup namespace: in a pod it says `/` while the host's
/// tree is mounted. So the answer is checked (our pid must be in that cgroup's `cgroup.procs`)
/// and, when it is wrong, the tree is searched for the cgroup that holds our pid (`cgroup.procs`
/// shows pids as our own pid namespace sees them). `hint` is a previous answer to try first.
pub fn own_cgroup(cg: &Cgroup2, hint: Option<&str>) -> Result<String, CgroupError> {
    let pid = std::process::id();
    if let Some(hint) = hint
        && cg.holds(hint, pid)
    {
        return Ok(hint.to_owned());
    }
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let claimed = unified_path(&text).ok_or(CgroupError::NoCgroup2)?;
    if cg.holds(claimed, pid) {
        return Ok(claimed.to_owned());
    }
    Ok(cg.find_pid(pid).unwrap_or_else(|| claimed.to_owned()))
}

impl Cgroup2 {
    /// Whether `pid` is listed in the cgroup's `cgroup.procs`.
    fn holds(&self, cgroup: &str, pid: u32) -> bool {
        self.dir(cgroup)
            .ok()
            .and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .is_some_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
    }

    /// The cgroup whose `cgroup.procs` lists `pid`, searched breadth first.
    fn find_pid(&self, pid: u32) -> Option<String> {
        let mut queue = std::collections::VecDeque::from([String::from("/")]);
        while let Some(cgroup) = queue.pop_front() {
            if self.holds(&cgroup, pid) {
                return Some(cgroup);
            }
            let Ok(dir) = self.dir(&cgroup) else { continue };
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    queue.push_back(if cgroup == "/" {
                        format!("/{name}")
                    } else {
                        format!("{cgroup}/{name}")
                    });
                }
            }
        }
        None
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        let cg = Cgroup2::from_mountinfo(HYBRID).unwrap();
        assert_eq!(cg.mount(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn optional_fields_and_escapes_are_handled() {
        let text = "36 35 0:30 / /sys/fs/my\\040cgroup rw,nosuid shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate\n";
        let cg = Cgroup2::from_mountinfo(text).unwrap();
        assert_eq!(cg.mount(), Path::new("/sys/fs/my cgroup"));
    }

    #[test]
    fn no_cgroup2_is_a_clear_error() {
        let err = Cgroup2::from_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
            .unwrap_err();
        assert!(err.to_string().contains("no cgroup v2"), "{err}");
    }

    #[test]
    fn cgroup_paths_must_be_absolute_and_stay_inside() {
        let cg = Cgroup2::at("/sys/fs/cgroup");
        assert_eq!(
            cg.dir("/system.slice/containerd.service").unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/containerd.service")
        );
        assert!(cg.dir("system.slice").is_err());
        assert!(cg.dir("/a/../../etc").is_err());
    }

    #[test]
    fn proc_cgroup_v2_line_is_parsed() {
        let text = "4:memory:/x\n0::/system.slice/containerd.service\n";
        assert_eq!(unified_path(text), Some("/system.slice/containerd.service"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn own_cgroup_is_found_by_pid_when_the_namespaced_path_is_wrong() {
        let tmp = tempdir();
        let cg = Cgroup2::at(tmp.join("cg"));
        let pod = tmp.join("cg/kubepods.slice/pod1/ctr");
        fs::create_dir_all(&pod).unwrap();
        fs::write(tmp.join("cg/cgroup.procs"), "1\n2\n").unwrap();
        fs::write(
            pod.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(
            cg.find_pid(std::process::id()).as_deref(),
            Some("/kubepods.slice/pod1/ctr")
        );
        assert_eq!(cg.find_pid(u32::MAX), None);
        // A hint that still holds us is taken as it is.
        assert_eq!(
            own_cgroup(&cg, Some("/kubepods.slice/pod1/ctr")).unwrap(),
            "/kubepods.slice/pod1/ctr"
        );
        fs::remove_dir_all(tmp).unwrap();
    }

    #[test]
    fn detects_units_in_slices_only() {
        let tmp = tempdir();
        let cg = tmp.join("cg");
        for dir in [
            "system.slice/containerd.service",
            "system.slice/sshd.service",
            "kubepods.slice/x",
            // Delegated cgroups: a service running as a user, a container's scope, a machine.
            "system.slice/build.service/docker.service",
            "system.slice/docker-0123.scope/containerd.service",
            "machine.slice/machine-a.scope/crio.service",
            "docker/0123/containerd.service",
            // Nested slices are fine.
            "kube.slice/runtime.slice/k3s.service",
        ] {
            fs::create_dir_all(cg.join(dir)).unwrap();
        }
        let found = Cgroup2::at(&cg).detect_runtimes(&tmp.join("no-proc"));
        assert_eq!(
            found.cgroups.into_iter().collect::<Vec<_>>(),
            vec![
                "/kube.slice/runtime.slice/k3s.service",
                "/system.slice/containerd.service"
            ]
        );
        fs::remove_dir_all(tmp).unwrap();
    }

    #[test]
    fn only_vetted_runtime_processes_count_and_never_the_root_cgroup() {
        let tmp = tempdir();
        let processes = [
            (10, "/custom/docker", Vetting::Runtime),
            (
                11,
                "/user.slice/user-1000.slice/session-1.scope",
                Vetting::Impostor("uid 1000".into()),
            ),
            (12, "/", Vetting::Runtime),
            (
                13,
                "/../../system.slice/containerd.service",
                Vetting::Runtime,
            ),
            (
                14,
                "/system.slice/cron.service",
                Vetting::Unverified("denied".into()),
            ),
            // Unverified, but in its unit's cgroup: a target anyway, and not reported.
            (
                15,
                "/system.slice/containerd.service",
                Vetting::Unverified("denied".into()),
            ),
        ]
        .into_iter()
        .map(|(pid, cgroup, vetting)| {
            let dir = tmp.join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            RuntimeProc {
                pid,
                comm: "containerd".into(),
                dir,
                vetting,
            }
        })
        .collect();
        let units = BTreeSet::from(["/system.slice/containerd.service".to_owned()]);
        let found = process_cgroups(processes, units);
        assert_eq!(
            found.cgroups.into_iter().collect::<Vec<_>>(),
            vec!["/custom/docker", "/system.slice/containerd.service"]
        );
        let skipped: Vec<u32> = found.skipped.iter().map(|p| p.pid).collect();
        assert_eq!(skipped, vec![11, 14]);
        fs::remove_dir_all(tmp).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pullproxy-cgroup-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
