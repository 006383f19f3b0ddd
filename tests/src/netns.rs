//! A network namespace of the test's own, with loopback up and test addresses on `lo`. Addresses
//! in it exist nowhere else, so "original destinations" are never real hosts. A [`Switch`] joins
//! several such namespaces into one network without touching the host's.

use std::{fs::File, os::fd::AsRawFd, path::PathBuf, process::Command};

/// A named network namespace (`ip netns`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `lo` up.
    pub fn new(prefix: &str) -> Self {
        let name = crate::unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns(2)` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Adds an address (`10.203.0.1/32`, `fd00::1/128`) to the namespace's `lo`.
    pub fn add_addr(&self, cidr: &str) {
        let mut args = vec!["addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args);
    }

    /// Runs `ip -n <ns> args...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates (listeners,
    /// clients) belong to the namespace for their whole life.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns file");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

/// A Linux bridge in a network namespace of its own: namespaces plugged into it with veth pairs
/// share one Ethernet segment, and nothing of it exists in the host's namespace. Deleting the
/// switch's namespace (on drop) deletes the bridge and every port still on it; a member's end of
/// its pair goes with the member's namespace.
pub struct Switch {
    ns: NetNs,
}

/// The bridge's name inside the switch's namespace.
const BRIDGE: &str = "br0";

impl Switch {
    pub fn new(prefix: &str) -> Self {
        let ns = NetNs::new(prefix);
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ns.ip(&["link", "set", BRIDGE, "up"]);
        Self { ns }
    }

    /// Plugs `member` in: a veth pair whose switch end `port` (at most 15 characters, unique on
    /// this switch) joins the bridge and whose member end is `ifname` in `member`, up with the
    /// addresses `cidrs` (`10.210.0.11/24`). Safe to call from several threads at once.
    pub fn plug(&self, port: &str, member: &NetNs, ifname: &str, cidrs: &[&str]) {
        self.ns.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            member.name(),
        ]);
        self.ns.ip(&["link", "set", port, "master", BRIDGE, "up"]);
        for cidr in cidrs {
            member.ip(&["addr", "add", cidr, "dev", ifname]);
        }
        member.ip(&["link", "set", ifname, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
