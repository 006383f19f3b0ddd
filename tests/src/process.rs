//! Child processes placed in a test's network namespace, cgroup and (optionally) private mount
//! namespace, killed on drop.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::{cgroup::Cgroup, mountns::MountSpec, netns::NetNs};

/// Where a child runs: a network namespace, a cgroup and a private mount namespace, each
/// optional. Holds paths, not guards, so a long-lived helper (a registry that is stopped and
/// started again) can keep it; the guards must outlive every spawn.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// A network namespace file (`/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    /// A cgroup directory in the cgroup filesystem.
    pub cgroup: Option<PathBuf>,
    /// A private mount namespace with its own hosts file and CA bundle.
    pub mounts: Option<MountSpec>,
    /// An existing mount namespace to join instead (`/proc/<pid>/ns/mnt`): a client such as
    /// `ctr` then sees exactly the files of the daemon it talks to. Exclusive with `mounts`.
    pub join_mounts: Option<PathBuf>,
}

impl Placement {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn netns(mut self, netns: &NetNs) -> Self {
        self.netns = Some(netns.path());
        self
    }

    pub fn cgroup(mut self, cgroup: &Cgroup) -> Self {
        self.cgroup = Some(cgroup.dir().to_owned());
        self
    }

    pub fn mounts(mut self, mounts: MountSpec) -> Self {
        self.mounts = Some(mounts);
        self
    }

    /// Joins the mount namespace of process `pid` (see [`Placement::join_mounts`]).
    pub fn mounts_of(mut self, pid: u32) -> Self {
        self.join_mounts = Some(PathBuf::from(format!("/proc/{pid}/ns/mnt")));
        self
    }
}

/// A running child, killed (and reaped) when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Spawns `cmd` after moving it into `cgroup` and entering `netns` (between fork and exec,
    /// so the process is never briefly elsewhere).
    pub fn spawn(cmd: Command, netns: Option<&NetNs>, cgroup: Option<&Cgroup>) -> Self {
        let mut at = Placement::new();
        at.netns = netns.map(NetNs::path);
        at.cgroup = cgroup.map(|c| c.dir().to_owned());
        Self::spawn_at(cmd, &at)
    }

    /// Spawns `cmd` in `at`: between fork and exec the child joins the cgroup, then the network
    /// namespace, then unshares its mount namespace and applies the mounts (or joins an existing
    /// mount namespace). The order matters: the cgroup must be joined through the host's cgroup
    /// filesystem, before any mount changes.
    pub fn spawn_at(mut cmd: Command, at: &Placement) -> Self {
        assert!(
            at.mounts.is_none() || at.join_mounts.is_none(),
            "a child either gets new mounts or joins a mount namespace, not both"
        );
        let ns = at
            .netns
            .as_ref()
            .map(|p| File::open(p).unwrap_or_else(|e| panic!("open netns {}: {e}", p.display())));
        let mnt_ns = at.join_mounts.as_ref().map(|p| {
            File::open(p).unwrap_or_else(|e| panic!("open mount namespace {}: {e}", p.display()))
        });
        let procs = at.cgroup.as_ref().map(|dir| {
            CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).expect("path")
        });
        let mounts = at.mounts.as_ref().map(MountSpec::prepare);
        // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close, setns,
        // unshare, mount) on data prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" means the writing process itself.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(ns) = &ns
                    && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(mounts) = &mounts {
                    mounts.apply()?;
                }
                if let Some(mnt_ns) = &mnt_ns
                    && libc::setns(mnt_ns.as_raw_fd(), libc::CLONE_NEWNS) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL and reap: a crash, as far as the process is concerned.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 seconds.
    pub fn terminate(&mut self) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A binary built next to the running test binary (`target/<profile>/<name>`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    dir.join(name)
}

/// The children of `pid` (every thread's `children` list in `/proc`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// SIGKILL to `pid` (a process a test started indirectly, e.g. a server's worker), ignoring
/// one that is gone.
pub fn kill(pid: u32) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now, bytes.
    pub rss: u64,
    /// `VmHWM`: the peak of `VmRSS` since start or [`reset_peak`], bytes.
    pub hwm: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;

    fn add(self, other: Memory) -> Memory {
        Memory {
            rss: self.rss + other.rss,
            hwm: self.hwm + other.hwm,
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid`; `None` if it is gone.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// Resets `VmHWM` of `pid` to its current `VmRSS` (`clear_refs` 5), so the next [`memory`]
/// reports the peak of what happened in between.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// How a command run to completion by [`run_at`] ended.
#[derive(Debug)]
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// One run of a client tool (`ctr`, `podman`, `skopeo`): its arguments, credentials redacted,
/// and what it did.
#[derive(Debug)]
pub struct ToolRun {
    pub tool: &'static str,
    pub args: Vec<String>,
    pub finished: Finished,
}

impl ToolRun {
    pub fn success(&self) -> bool {
        self.finished.success()
    }

    pub fn stdout_text(&self) -> String {
        self.finished.stdout_text()
    }

    /// Panics with the command and what it printed unless it succeeded.
    pub fn expect_success(&self) -> &Self {
        assert!(
            self.success(),
            "{} {} failed ({}):\n{}{}",
            self.tool,
            self.args.join(" "),
            self.finished.status,
            self.finished.stdout_text(),
            self.finished.stderr
        );
        self
    }

    /// Panics unless it failed; returns stderr, for matching the reason.
    pub fn expect_failure(&self) -> &str {
        assert!(
            !self.success(),
            "{} {} was expected to fail:\n{}",
            self.tool,
            self.args.join(" "),
            self.finished.stdout_text()
        );
        &self.finished.stderr
    }

    /// stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.finished.stdout).unwrap_or_else(|e| {
            panic!(
                "{} {} printed no JSON ({e}):\n{}",
                self.tool,
                self.args.join(" "),
                self.stdout_text()
            )
        })
    }
}

/// `args` with the value of every flag in `secret` replaced, given as `--flag value` or
/// `--flag=value`: what a command line may show in a message.
pub fn redacted<S: AsRef<str>>(args: &[S], secret: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut secret_next = false;
    for a in args.iter().map(AsRef::as_ref) {
        if secret_next {
            out.push("<redacted>".to_owned());
            secret_next = false;
            continue;
        }
        secret_next = secret.contains(&a);
        match a.split_once('=') {
            Some((flag, _)) if secret.contains(&flag) => out.push(format!("{flag}=<redacted>")),
            _ => out.push(a.to_owned()),
        }
    }
    out
}

/// Runs `cmd` in `at` to completion, stdout and stderr captured (in anonymous files, so a chatty
/// child never blocks on a full pipe). Kills it and returns `Err` with what it printed so far
/// after `timeout`.
pub fn run_at(mut cmd: Command, at: &Placement, timeout: Duration) -> Result<Finished, String> {
    use std::io::{Read as _, Seek as _};
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("stdout handle"))
        .stderr(err.try_clone().expect("stderr handle"));
    let read = |mut f: &File| {
        let mut buf = Vec::new();
        let _ = f.rewind();
        let _ = f.read_to_end(&mut buf);
        buf
    };
    let started = Instant::now();
    let mut proc = Proc::spawn_at(cmd, at);
    loop {
        if let Some(status) = proc.child_mut().try_wait().expect("wait for child") {
            return Ok(Finished {
                status,
                stdout: read(&out),
                stderr: String::from_utf8_lossy(&read(&err)).into_owned(),
                elapsed: started.elapsed(),
            });
        }
        if started.elapsed() > timeout {
            proc.kill();
            return Err(format!(
                "still running after {timeout:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&read(&err))
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
