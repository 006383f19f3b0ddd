//! One simulated node per test: a network namespace, a cgroup subtree where the kernel programs
//! are attached (with a "runtime" target cgroup, an "other" one and pullproxy's own), a pin
//! directory and state directories of its own, and the `PULLPROXY_*` overrides that confine a
//! pullproxy to all of it. Tests using separate nodes run in parallel without touching the host.

use std::path::{Path, PathBuf};

use proxy_common::Counter;
use pullproxy::redirect;

use crate::{
    bpffs::Bpffs,
    cgroup::Cgroup,
    mountns::MountSpec,
    netns::NetNs,
    process::Placement,
    pullproxy::Pullproxy,
    registry_client::{Body, RegistryClient},
};

/// pullproxy's admin listener (`/metrics`, `/healthz`, `/readyz`) inside a node: the default.
pub const ADMIN_ADDR: &str = "127.0.0.1:15090";

/// Fields drop in declaration order: cgroups (children first), pins, the node's bpffs, state,
/// then the namespace.
pub struct Node {
    /// The target cgroup: what a container runtime would be in.
    pub runtime: Cgroup,
    /// A non-target cgroup beside it.
    pub other: Cgroup,
    /// pullproxy's own cgroup.
    pub proxy_cg: Cgroup,
    /// The attach point of the kernel programs.
    pub root: Cgroup,
    pins: PinDir,
    /// The node's own bpffs (what the DaemonSet mounts from the host): the pins live in it.
    _bpffs: Bpffs,
    state: State,
    pub ns: NetNs,
}

/// A pin directory, uninstalled (programs detached, maps removed) on drop.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = redirect::uninstall(&self.0);
    }
}

/// The node's state directory (TLS, cache, credentials), removed on drop.
struct State(PathBuf);

impl Drop for State {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Node {
    pub fn new(prefix: &str) -> Self {
        let ns = NetNs::new(prefix);
        let root = Cgroup::new_root(prefix);
        let name = root.name().to_owned();
        let state = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&state).expect("state dir");
        let bpffs = Bpffs::mount(state.join("bpf"));
        Self {
            runtime: root.child("runtime"),
            other: root.child("other"),
            proxy_cg: root.child("pullproxy"),
            pins: PinDir(bpffs.path().join("pullproxy")),
            _bpffs: bpffs,
            state: State(state),
            root,
            ns,
        }
    }

    /// The pin directory of this node's kernel programs.
    pub fn pins(&self) -> &Path {
        &self.pins.0
    }

    /// A directory for this node's files (removed with the node).
    pub fn state(&self) -> &Path {
        &self.state.0
    }

    /// pullproxy's TLS state directory (the node CA is generated there).
    pub fn tls_dir(&self) -> PathBuf {
        self.state().join("tls")
    }

    /// pullproxy's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.state().join("cache")
    }

    /// The node CA pullproxy generated (after it started).
    pub fn node_ca_pem(&self) -> String {
        let path = self.tls_dir().join(pullproxy::node_ca::CA_CERT_FILE);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Overrides confining pullproxy to this node: attach at the node's cgroup, target the
    /// runtime cgroup, pins and state in the node's directories, no hub.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "PULLPROXY_REDIRECT__ATTACH_CGROUP",
                self.root.path().to_owned(),
            ),
            (
                "PULLPROXY_REDIRECT__TARGETS",
                format!("[{}]", self.runtime.path()),
            ),
            (
                "PULLPROXY_REDIRECT__PIN_DIR",
                self.pins().display().to_string(),
            ),
            ("PULLPROXY_REDIRECT__RESCAN_INTERVAL", "250ms".to_owned()),
            (
                "PULLPROXY_TLS__STATE_DIR",
                self.tls_dir().display().to_string(),
            ),
            (
                "PULLPROXY_CACHE__DIR",
                self.cache_dir().display().to_string(),
            ),
            ("PULLPROXY_HUB__URL", String::new()),
        ]
    }

    /// Overrides giving pullproxy a hub at `url` whose password it reads from a file in the node's
    /// state (returned too, so that a test can rotate or name it).
    pub fn hub_env(
        &self,
        url: &str,
        user: &str,
        password: &str,
    ) -> (PathBuf, Vec<(&'static str, String)>) {
        let password_file = self.state().join("hub-password");
        std::fs::write(&password_file, format!("{password}\n")).expect("hub password");
        let env = vec![
            ("PULLPROXY_HUB__URL", url.to_owned()),
            ("PULLPROXY_HUB__USERNAME", user.to_owned()),
            (
                "PULLPROXY_HUB__PASSWORD_FILE",
                password_file.display().to_string(),
            ),
        ];
        (password_file, env)
    }

    /// Starts pullproxy in its own cgroup with [`Node::env`] plus `extra` (later entries win).
    pub fn start_proxy(&self, extra: &[(&'static str, String)]) -> Pullproxy {
        self.start_proxy_at(
            Placement::new().netns(&self.ns).cgroup(&self.proxy_cg),
            extra,
        )
    }

    /// Like [`Node::start_proxy`] with a mount namespace (hosts file) for pullproxy itself:
    /// needed when clients connect to the proxy port directly, so there is no kernel record of
    /// the upstream address and pullproxy resolves the registry name.
    pub fn start_proxy_with_mounts(
        &self,
        mounts: MountSpec,
        extra: &[(&'static str, String)],
    ) -> Pullproxy {
        self.start_proxy_at(
            Placement::new()
                .netns(&self.ns)
                .cgroup(&self.proxy_cg)
                .mounts(mounts),
            extra,
        )
    }

    fn start_proxy_at(&self, at: Placement, extra: &[(&'static str, String)]) -> Pullproxy {
        let mut env = self.env();
        env.extend_from_slice(extra);
        Pullproxy::start(&at, &env)
    }

    /// `GET` a path of pullproxy's admin listener inside the node: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let admin = RegistryClient::new("127.0.0.1", ADMIN_ADDR.parse().expect("addr"))
            .netns(&self.ns)
            .anonymous();
        let resp = admin
            .request("GET", path, &[], Body::Empty)
            .unwrap_or_else(|e| panic!("GET {ADMIN_ADDR}{path}: {e}"));
        (resp.status, resp.text())
    }

    /// pullproxy's `/metrics` in the classic text format, as curl gets it.
    pub fn scrape(&self) -> String {
        let (status, text) = self.admin_get("/metrics");
        assert_eq!(status, 200, "/metrics: {text}");
        text
    }

    /// A kernel counter of this node's redirect, read from the pins.
    pub fn counter(&self, which: Counter) -> u64 {
        redirect::pinned_counters(self.pins())
            .expect("pinned counters")
            .into_iter()
            .find(|(c, _)| *c == which)
            .map(|(_, v)| v)
            .expect("known counter")
    }
}
