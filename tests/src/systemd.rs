//! The machine's own systemd: units and drop-ins a test installs under `/run/systemd/system`
//! (gone at reboot, removed by guards on drop), `systemctl`, and the real `containerd.service`
//! placed in a test's network namespace with the test's hosts file and CA bundle.
//!
//! Tests using this change the machine's services, so they run only where asked to
//! (`PULLPROXY_SYSTEMD_TESTS=1`, which `cargo xtask vm-test` sets in its throw-away guest) and
//! only on a node as pullproxy meets it in production: systemd as PID 1 and the pure cgroup v2
//! hierarchy at `/sys/fs/cgroup`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use pullproxy::redirect::{self, cgroup::Cgroup2};

use crate::{cri::CriClient, mountns::CA_BUNDLE_PATHS, netns::NetNs};

/// Where runtime units and drop-ins go: below `/run`, so nothing a test leaves survives a reboot.
const RUNTIME_UNITS: &str = "/run/systemd/system";

/// The variable that allows these tests to change this machine's services.
pub const OPT_IN: &str = "PULLPROXY_SYSTEMD_TESTS";

/// True when the systemd test `name` may run: root, systemd as PID 1, pure cgroup v2, and
/// [`OPT_IN`] set. Without the opt-in it prints a loud SKIPPED line and returns false; with it,
/// a machine that is not such a node is an error (the VM that sets it must be one).
pub fn may_run(name: &str) -> bool {
    if !crate::privileged::may_run(name) {
        return false;
    }
    if std::env::var(OPT_IN).is_err() {
        eprintln!(
            "\n*** SKIPPED {name}: it restarts this machine's containerd.service and installs \
             pullproxy.service; it runs in the test VM: `cargo xtask vm-test` (or set {OPT_IN}=1 \
             on a throw-away systemd machine). ***\n"
        );
        return false;
    }
    let booted = Path::new("/run/systemd/system").is_dir();
    let pure_v2 = redirect::preflight::fs_magic(Path::new("/sys/fs/cgroup"))
        == Some(redirect::preflight::CGROUP2_MAGIC);
    assert!(
        booted && pure_v2,
        "{name}: {OPT_IN} is set, but this machine is not systemd-booted with cgroup v2 at \
         /sys/fs/cgroup (systemd: {booted}, pure v2: {pure_v2})"
    );
    true
}

/// Returns from the calling test (after a loud message) unless [`may_run`] allows it.
#[macro_export]
macro_rules! require_systemd {
    () => {
        if !$crate::systemd::may_run(module_path!()) {
            return;
        }
    };
}

/// `systemctl <args>`; panics with its output when it fails.
pub fn systemctl(args: &[&str]) -> String {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .expect("running systemctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "systemctl {}: {}\n{stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One property of a unit (`systemctl show -p <property> --value`).
pub fn property(unit: &str, name: &str) -> String {
    systemctl(&["show", "-p", name, "--value", unit])
        .trim()
        .to_owned()
}

/// The unit's cgroup path (`/system.slice/containerd.service`) and that cgroup's id, which a
/// restart of the unit changes.
pub fn unit_cgroup(unit: &str) -> (String, u64) {
    let path = property(unit, "ControlGroup");
    assert!(!path.is_empty(), "{unit} has no cgroup: is it running?");
    let id = Cgroup2::discover()
        .expect("cgroup v2")
        .id(&path)
        .unwrap_or_else(|e| panic!("cgroup of {unit}: {e}"));
    (path, id)
}

/// The unit's log since `since` (a `journalctl --since` time such as `@1700000000`), one
/// message per line.
pub fn journal(unit: &str, since: &str) -> String {
    let out = Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-u", unit, "--since", since])
        .output()
        .expect("running journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The log of the unit's current run (its `InvocationID`), one message per line: exact where a
/// `--since` time, whole seconds, may take in the end of the previous run.
pub fn journal_of_this_run(unit: &str) -> String {
    let id = property(unit, "InvocationID");
    assert!(!id.is_empty(), "{unit} has no invocation: is it running?");
    let out = Command::new("journalctl")
        .args(["--no-pager", "-o", "cat"])
        .arg(format!("_SYSTEMD_INVOCATION_ID={id}"))
        .output()
        .expect("running journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Now, as `journalctl --since` takes it.
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    format!("@{secs}")
}

/// A file under [`RUNTIME_UNITS`] (a unit or a drop-in), removed on drop, with `systemctl
/// daemon-reload` after writing and after removing.
pub struct UnitFile {
    path: PathBuf,
}

impl UnitFile {
    /// Installs `text` as the unit `name` (`pullproxy.service`).
    pub fn unit(name: &str, text: &str) -> Self {
        Self::write(Path::new(RUNTIME_UNITS).join(name), text)
    }

    /// Installs `text` as the drop-in `<unit>.d/<name>.conf`.
    pub fn drop_in(unit: &str, name: &str, text: &str) -> Self {
        Self::write(
            Path::new(RUNTIME_UNITS)
                .join(format!("{unit}.d"))
                .join(format!("{name}.conf")),
            text,
        )
    }

    fn write(path: PathBuf, text: &str) -> Self {
        fs::create_dir_all(path.parent().expect("a directory"))
            .unwrap_or_else(|e| panic!("creating the directory of {}: {e}", path.display()));
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        systemctl(&["daemon-reload"]);
        Self { path }
    }
}

impl Drop for UnitFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent()
            && dir.extension().is_some_and(|e| e == "d")
        {
            let _ = fs::remove_dir(dir);
        }
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
}

/// The machine's `containerd.service`, unmodified but for a drop-in that runs it in the test's
/// network namespace with the test's `/etc/hosts` and CA bundle (bind mounts over the system
/// files, in the unit's own mount namespace). Restarted into that on creation and back to its
/// own configuration on drop.
pub struct ContainerdService {
    drop_in: Option<UnitFile>,
}

/// The unit.
pub const CONTAINERD_UNIT: &str = "containerd.service";
/// Its socket, where its default configuration puts it.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

impl ContainerdService {
    /// Restarts containerd.service in `ns`, resolving names with `hosts` and trusting `bundle`.
    pub fn place(ns: &NetNs, hosts: &Path, bundle: &Path) -> Self {
        let mut text = format!(
            "[Service]\nNetworkNamespacePath={}\nBindReadOnlyPaths={}:/etc/hosts\n",
            ns.path().display(),
            hosts.display()
        );
        for system in CA_BUNDLE_PATHS.iter().filter(|p| Path::new(p).exists()) {
            text.push_str(&format!(
                "BindReadOnlyPaths={}:{system}\n",
                bundle.display()
            ));
        }
        let me = Self {
            drop_in: Some(UnitFile::drop_in(CONTAINERD_UNIT, "pullproxy-test", &text)),
        };
        me.restart();
        me
    }

    /// `systemctl restart containerd`, then waits until its CRI plugin answers (the socket
    /// accepts before the plugin is initialized: "server is not initialized yet").
    pub fn restart(&self) {
        systemctl(&["restart", CONTAINERD_UNIT]);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let answered = CriClient::connect(Path::new(CONTAINERD_SOCKET))
                .ok()
                .is_some_and(|c| c.list_images().is_ok());
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd.service's CRI plugin does not answer on {CONTAINERD_SOCKET} after a \
                 restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A CRI client: `PullImage` makes the daemon itself fetch.
    pub fn cri(&self) -> CriClient {
        CriClient::connect(Path::new(CONTAINERD_SOCKET))
            .unwrap_or_else(|e| panic!("CRI client on {CONTAINERD_SOCKET}: {e}"))
    }
}

impl Drop for ContainerdService {
    fn drop(&mut self) {
        // Without the drop-in, back to its own namespace and files.
        drop(self.drop_in.take());
        let _ = Command::new("systemctl")
            .args(["restart", CONTAINERD_UNIT])
            .status();
    }
}
