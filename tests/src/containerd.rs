//! Debian's containerd 1.6 as an unmodified container runtime under test: its default
//! configuration (no config file, no `hosts.toml`, no mirrors), isolated in a test's network
//! namespace, a (target) cgroup and a private mount namespace in which every directory its
//! defaults use is a per-test one:
//!
//! | default path          | what it holds                                    |
//! |-----------------------|--------------------------------------------------|
//! | `/var/lib/containerd` | content store, metadata, snapshots               |
//! | `/run/containerd`     | the sockets, shim and runc state                 |
//! | `/etc/containerd`     | the configuration: empty, so the defaults apply  |
//! | `/opt/containerd`     | the `opt` plugin's directory (it creates `bin/`) |
//!
//! The host's own containerd files are never touched; the only trace on the host is the empty
//! mount points, created when missing (what installing containerd would create anyway).
//!
//! `ctr` runs in the daemon's mount namespace (it finds the socket at the default path, and it
//! fetches images in its own process, with the same hosts file and CA bundle) and in the same
//! cgroup. [`Containerd::cri`] talks to the CRI plugin, where the daemon itself fetches.
//!
//! On drop (also when a test fails) every container is force-deleted through `ctr` (runc
//! removes its cgroups), then every process in the daemon's mount namespace (the daemon, its
//! shims) is killed; the namespace, and with it every snapshot mount, goes away with the last of
//! them, and then the directories are removed. Give `ctr run` a one-component `--cgroup`
//! (as [`Containerd::run_once`] does): the default `/<namespace>/<id>` leaves an empty
//! `/<namespace>` directory in every cgroup v1 hierarchy.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{
    cri::CriClient,
    process::{Placement, Proc, ToolRun, redacted, run_at},
};

/// The daemon from Debian's `containerd` package.
pub const CONTAINERD: &str = "/usr/bin/containerd";
/// Its command-line client.
pub const CTR: &str = "/usr/bin/ctr";

/// `ctr` flags whose value holds credentials.
const CTR_SECRET_FLAGS: &[&str] = &["--user", "-u"];

/// The namespace `ctr` uses by default.
pub const CTR_NAMESPACE: &str = "default";
/// The namespace of images pulled through CRI (the kubelet's).
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A `hosts.toml` for docker.io that sends pulls and resolves to the registry mirror at
/// `mirror_url` (`http://10.0.0.5:5000`) first, falling back to Docker Hub itself: the usual
/// "registry mirror" configuration, for [`ContainerdBuilder::hosts_toml`].
pub fn mirror_hosts_toml(mirror_url: &str) -> String {
    format!(
        "server = \"https://registry-1.docker.io\"\n\n\
         [host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Directories of the default configuration, each replaced by `<temp>/<name>`.
const DEFAULT_DIRS: &[(&str, &str)] = &[
    ("lib", "/var/lib/containerd"),
    ("run", "/run/containerd"),
    ("etc", "/etc/containerd"),
    ("opt", "/opt/containerd"),
];

/// Where `hosts.toml` files live when [`ContainerdBuilder::hosts_toml`] configures some: the
/// directory the containerd documentation suggests.
const CERTS_D: &str = "/etc/containerd/certs.d";

/// How long containerd may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `ctr` command may run by default.
const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    placement: Placement,
    hosts_toml: Vec<(String, String)>,
    ctr_timeout: Duration,
}

impl ContainerdBuilder {
    /// Registry host configuration, `hosts.toml` for `host` (`docker.io`): the configuration
    /// change pullproxy makes unnecessary, for comparisons. Sets the CRI plugin's `config_path`,
    /// and `ctr` pulls use the same directory (`--hosts-dir`).
    pub fn hosts_toml(mut self, host: &str, toml: &str) -> Self {
        self.hosts_toml.push((host.to_owned(), toml.to_owned()));
        self
    }

    /// How long [`Containerd::ctr`] (and so a pull) may run (default 2 minutes): pulls of
    /// hundreds of MiB on several nodes of a busy machine at once need more.
    pub fn ctr_timeout(mut self, timeout: Duration) -> Self {
        self.ctr_timeout = timeout;
        self
    }

    /// Starts the daemon and waits until it serves its socket.
    pub fn start(self) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("pp-containerd-")
            .tempdir()
            .expect("temp dir for containerd");
        let mut mounts = self.placement.mounts.clone().unwrap_or_default();
        for (name, target) in DEFAULT_DIRS {
            let source = dir.path().join(name);
            fs::create_dir(&source).expect("containerd state dir");
            // The mount point must exist; an empty directory is all the host ever sees.
            fs::create_dir_all(target)
                .unwrap_or_else(|e| panic!("creating the mount point {target}: {e}"));
            mounts = mounts.bind(source, target);
        }
        if !self.hosts_toml.is_empty() {
            let etc = dir.path().join("etc");
            fs::write(
                etc.join("config.toml"),
                format!(
                    "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{CERTS_D}\"\n"
                ),
            )
            .expect("config.toml");
            for (host, toml) in &self.hosts_toml {
                let d = etc.join("certs.d").join(host);
                fs::create_dir_all(&d).expect("certs.d");
                fs::write(d.join("hosts.toml"), toml).expect("hosts.toml");
            }
        }
        let log = fs::File::create(dir.path().join("containerd.log")).expect("containerd log");
        let mut cmd = Command::new(CONTAINERD);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let mut placement = self.placement.clone();
        placement.mounts = Some(mounts);
        let started = Instant::now();
        let proc = Proc::spawn_at(cmd, &placement);
        let pid = proc.pid();
        let mount_ns = ns_inode(pid).expect("containerd's mount namespace");
        // Drop kills every process in this namespace: it must never be the host's.
        assert_ne!(
            Some(mount_ns),
            ns_inode(std::process::id()),
            "containerd must run in a mount namespace of its own"
        );
        let mut ctd = Containerd {
            proc: Some(proc),
            pid,
            mount_ns,
            placement: self.placement,
            hosts_dir: !self.hosts_toml.is_empty(),
            ctr_timeout: self.ctr_timeout,
            dir,
        };
        loop {
            if std::os::unix::net::UnixStream::connect(ctd.socket()).is_ok() {
                break;
            }
            let exited = ctd.proc.as_mut().is_some_and(Proc::exited);
            if exited || started.elapsed() > START_TIMEOUT {
                panic!(
                    "containerd {} within {START_TIMEOUT:?}:\n{}",
                    if exited { "exited" } else { "did not serve" },
                    ctd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        ctd
    }
}

/// A running containerd; see the module documentation.
pub struct Containerd {
    proc: Option<Proc>,
    pid: u32,
    /// The inode of the daemon's mount namespace: processes in it are the daemon's.
    mount_ns: u64,
    /// Network namespace and cgroup (clients run there too).
    placement: Placement,
    hosts_dir: bool,
    ctr_timeout: Duration,
    dir: TempDir,
}

/// An image as `ctr images ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// `docker.io/library/busybox:latest`
    pub name: String,
    /// The media type of the target (manifest or index).
    pub media_type: String,
    /// The target digest: what the name points to.
    pub digest: String,
}

impl Containerd {
    /// containerd with its default configuration at `placement`: a network namespace, a cgroup
    /// (a redirect target) and the client mounts (hosts file, CA bundle) of the node; the
    /// harness adds the per-test state directories.
    pub fn builder(placement: Placement) -> ContainerdBuilder {
        ContainerdBuilder {
            placement,
            hosts_toml: Vec::new(),
            ctr_timeout: CTR_TIMEOUT,
        }
    }

    /// [`Containerd::builder`] and start.
    pub fn start(placement: Placement) -> Self {
        Self::builder(placement).start()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The gRPC socket (as seen from the host: inside the per-test `/run/containerd`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/containerd.sock")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The per-test `/var/lib/containerd`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("lib")
    }

    /// Where `ctr` (and other clients of this daemon) run: its network namespace, cgroup and
    /// mount namespace.
    pub fn client_placement(&self) -> Placement {
        let mut at = self.placement.clone();
        at.mounts = None;
        at.mounts_of(self.pid)
    }

    /// `ctr <args>`, killed after `timeout`.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> ToolRun {
        let mut cmd = Command::new(CTR);
        cmd.args(args).env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        let redacted = redacted(args, CTR_SECRET_FLAGS);
        let finished = run_at(cmd, &self.client_placement(), timeout).unwrap_or_else(|e| {
            panic!(
                "ctr {}: {e}\ncontainerd log:\n{}",
                redacted.join(" "),
                self.log()
            )
        });
        ToolRun {
            tool: "ctr",
            args: redacted,
            finished,
        }
    }

    /// `ctr <args>` (2 minutes at most, or [`ContainerdBuilder::ctr_timeout`]).
    pub fn ctr(&self, args: &[&str]) -> ToolRun {
        self.ctr_with_timeout(args, self.ctr_timeout)
    }

    /// `ctr images pull [--user u:p] [--all-platforms] <reference>`: fetched by `ctr` itself,
    /// then unpacked by the daemon.
    pub fn pull(&self, reference: &str, user: Option<(&str, &str)>) -> ToolRun {
        self.pull_with(reference, user, &[])
    }

    /// [`Containerd::pull`] with extra `ctr images pull` flags.
    pub fn pull_with(
        &self,
        reference: &str,
        user: Option<(&str, &str)>,
        flags: &[&str],
    ) -> ToolRun {
        let user = user.map(|(u, p)| format!("{u}:{p}"));
        let mut args = vec!["images", "pull"];
        if self.hosts_dir {
            args.extend(["--hosts-dir", CERTS_D]);
        }
        if let Some(u) = &user {
            args.extend(["--user", u]);
        }
        args.extend(flags);
        args.push(reference);
        self.ctr(&args)
    }

    /// Images in a containerd namespace (`ctr -n <ns> images ls`).
    pub fn images(&self, namespace: &str) -> Vec<ImageRecord> {
        let out = self.ctr(&["-n", namespace, "images", "ls"]);
        out.expect_success();
        parse_images(&out.stdout_text())
    }

    /// The image `name` in `namespace`, if containerd has it.
    pub fn image(&self, namespace: &str, name: &str) -> Option<ImageRecord> {
        self.images(namespace).into_iter().find(|i| i.name == name)
    }

    /// `ctr images rm --sync <name>`: the image and (garbage collected at once) its content.
    pub fn remove_image(&self, namespace: &str, name: &str) {
        self.ctr(&["-n", namespace, "images", "rm", "--sync", name])
            .expect_success();
    }

    /// Runs `argv` once in a container of image `name` (`ctr run --rm`) and returns what it
    /// printed. The container exits by itself, so nothing outlives the call. It gets a network
    /// namespace of its own: with the host's, runc would bind-mount `/etc/hosts`, which here is
    /// a bind of an already unlinked file, and the kernel refuses to bind those.
    pub fn run_once(&self, name: &str, argv: &[&str]) -> ToolRun {
        let id = crate::unique("pp-run");
        // A cgroup path of one component: runc removes it with the container. (The default,
        // `/<namespace>/<id>`, leaves an empty `/default` behind in every v1 hierarchy.)
        let cgroup = format!("/{id}");
        let mut args = vec!["run", "--rm", "--cgroup", &cgroup, name, &id];
        args.extend(argv);
        self.ctr(&args)
    }

    /// A CRI client on the daemon's socket: `PullImage` makes the daemon itself fetch, as for
    /// the kubelet.
    pub fn cri(&self) -> CriClient {
        CriClient::connect(&self.socket())
            .unwrap_or_else(|e| panic!("CRI client on {}: {e}", self.socket().display()))
    }

    /// Force-deletes every task (running container) and container in every containerd
    /// namespace while the daemon still runs: a container's processes live in namespaces and
    /// cgroups of their own, and would outlive the daemon and its shims.
    fn delete_containers(&self) {
        let quick = Duration::from_secs(15);
        let lines = |args: &[&str]| -> Vec<String> {
            let out = self.ctr_with_timeout(args, quick);
            if !out.success() {
                return Vec::new();
            }
            out.stdout_text()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        };
        for ns in lines(&["namespaces", "ls", "-q"]) {
            for task in lines(&["-n", &ns, "tasks", "ls", "-q"]) {
                self.ctr_with_timeout(&["-n", &ns, "tasks", "rm", "-f", &task], quick);
            }
            for container in lines(&["-n", &ns, "containers", "ls", "-q"]) {
                self.ctr_with_timeout(&["-n", &ns, "containers", "rm", &container], quick);
            }
        }
    }

    /// Deletes the containers, then kills every process in the daemon's mount namespace (the
    /// daemon first, then shims) and waits until they are gone: the namespace and its mounts
    /// go with them.
    fn kill_all(&mut self) {
        if self.proc.as_mut().is_some_and(|p| !p.exited()) {
            self.delete_containers();
        }
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_in_mount_ns(self.mount_ns);
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("warning: processes left in containerd's mount namespace: {left:?}");
                return;
            }
            for pid in left {
                // SAFETY: a signal to a process the test started (it is in the daemon's private
                // mount namespace, which only the daemon and its children enter).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.kill_all();
        // `dir` (TempDir) is removed after this, with no mount left on anything in it.
    }
}

/// The inode of a process's mount namespace.
fn ns_inode(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| m.ino())
}

/// Pids (other than zombies' and ours) whose mount namespace has inode `ns`.
fn processes_in_mount_ns(ns: u64) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && ns_inode(pid) == Some(ns))
        .filter(|&pid| !is_zombie(pid))
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true)
}

/// Parses `ctr images ls`: `REF TYPE DIGEST SIZE PLATFORMS LABELS`, whitespace-separated.
fn parse_images(out: &str) -> Vec<ImageRecord> {
    out.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            Some(ImageRecord {
                name: cols.next()?.to_owned(),
                media_type: cols.next()?.to_owned(),
                digest: cols.next()?.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_ls_parses_name_type_and_digest() {
        let out = "REF                              TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS \n\
docker.io/library/busybox:latest application/vnd.docker.distribution.manifest.v2+json sha256:1111111111111111111111111111111111111111111111111111111111111111 1.0 MiB linux/amd64 -      \n";
        let images = parse_images(out);
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].name, "docker.io/library/busybox:latest");
        assert_eq!(
            images[0].media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert!(images[0].digest.starts_with("sha256:1111"));
    }

    #[test]
    fn user_values_never_reach_messages() {
        assert_eq!(
            redacted(
                &["images", "pull", "--user", "alice:pw", "x"],
                CTR_SECRET_FLAGS
            ),
            ["images", "pull", "--user", "<redacted>", "x"]
        );
        assert_eq!(
            redacted(&["--user=alice:pw", "x"], CTR_SECRET_FLAGS),
            ["--user=<redacted>", "x"]
        );
    }
}
