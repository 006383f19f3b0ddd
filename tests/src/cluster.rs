//! Several nodes on one network, the test bed of "pull once per cluster": N node network
//! namespaces, one for the sealos hub and one for the fake internet (a public Docker Hub and a
//! private quay.io), joined by a Linux bridge in a switch namespace of its own, so nothing touches
//! the host's network. Every node is a [`Node`] (cgroups, bpffs and pins, state, node CA) with
//! its own pullproxy, pointed at the shared hub, and Debian's containerd with its default
//! configuration, resolving the registry names to the fake internet. Nodes share nothing but
//! the network.
//!
//! | address      | what                                                                  |
//! |--------------|-----------------------------------------------------------------------|
//! | `10.210.0.2` | the hub: docker-registry with htpasswd on `:5000`                     |
//! | `10.210.0.3` | the fake Docker Hub (TLS, [`PUBLIC_HOSTS`])                           |
//! | `10.210.0.4` | a private `quay.io` (TLS, htpasswd)                                   |
//! | `10.210.0.5` | a registry mirror beside the hub, when started ([`Cluster::start_mirror`]) |
//! | `10.210.0.11`... | node 0, 1, ...                                                    |
//!
//! The upstream registries' access logs record each response's body bytes, so a test can tell
//! exactly how often the internet served a layer ([`Cluster::internet_traffic`]). For
//! comparisons the cluster can also run without pullproxy: a node's containerd restarted with a
//! `hosts.toml` mirror ([`ClusterNode::restart_containerd`]) and distribution's pull-through
//! proxy as that mirror. Everything is
//! removed on drop, also when a test panics: nodes (containerd, pullproxy, cgroups, pins, state),
//! registries, then the namespaces, the switch last.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Barrier,
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    containerd::{CRI_NAMESPACE, CTR_NAMESPACE, Containerd},
    images::{self, Digest, Format, Image},
    mountns::MountSpec,
    netns::{NetNs, Switch},
    node::Node,
    process::{Placement, ToolRun},
    pullproxy::{self, Pullproxy},
    registry::{BlobTraffic, Registry, RemoteProxy},
    testca::{TestCa, ca_bundle},
    world::{HUB_PASSWORD, HUB_USER, PRIVATE_PASSWORD, PRIVATE_USER, PUBLIC_HOSTS},
};

/// The sealos hub, shared by every node.
pub const HUB_IP: &str = "10.210.0.2";
/// The fake Docker Hub.
pub const UPSTREAM_IP: &str = "10.210.0.3";
/// A private quay.io that wants credentials, beside the Docker Hub in the internet namespace.
pub const PRIVATE_IP: &str = "10.210.0.4";
/// A registry mirror in the hub's namespace (see [`Cluster::start_mirror`]).
pub const MIRROR_IP: &str = "10.210.0.5";
/// The hub's URL as every pullproxy is given it.
pub const HUB_URL: &str = "http://10.210.0.2:5000";
/// The mirror's URL, for a `hosts.toml`.
pub const MIRROR_URL: &str = "http://10.210.0.5:5000";
/// The last octet of node 0's address; node `i` has `FIRST_NODE_HOST + i`.
const FIRST_NODE_HOST: usize = 11;
/// Nodes that fit into the /24 after the first node address.
pub const MAX_NODES: usize = 200;
/// The prefix length of every address on the bridge.
const PREFIX_LEN: u8 = 24;

/// How long a pull on a node may take: hundreds of MiB on several nodes of a 2-core machine
/// that other builds share.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long pullproxy may take to write the log records of a pull that the client finished, and
/// a registry to log a request whose response was read.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to report itself ready (hub reachable over the bridge).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a registry's access log must stay unchanged before its traffic counts as complete.
const QUIET: Duration = Duration::from_secs(1);

/// Layer sizes of [`pull_once_image`]: three layers, 208 MiB together.
pub const PULL_ONCE_LAYERS: [u64; 3] = [96 << 20, 64 << 20, 48 << 20];

/// The image of the "pull once per cluster" issue: three uncompressed layers of random bytes,
/// 208 MiB together, written (and hashed) into `dir` in about a second per layer, in parallel.
/// Uncompressed because random data does not compress, and containerd unpacks `tar` layers as
/// it does `tar+gzip` ones.
pub fn pull_once_image(dir: &Path) -> Image {
    pull_once_image_sized(dir, PULL_ONCE_LAYERS.iter().sum())
}

/// [`pull_once_image`] with `total` bytes of layers instead of 208 MiB, split in the same
/// proportions (for a benchmark that must fit a time budget).
pub fn pull_once_image_sized(dir: &Path, total: u64) -> Image {
    let whole: u64 = PULL_ONCE_LAYERS.iter().sum();
    let sizes = PULL_ONCE_LAYERS.map(|l| total / whole * l + total % whole * l / whole);
    images::big_image(Format::Oci, dir, &sizes, 0xc1_0500)
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    prefix: String,
    nodes: usize,
    proxy_env: Vec<(&'static str, String)>,
}

impl ClusterBuilder {
    /// How many nodes (default 2, at most [`MAX_NODES`]).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// A `PULLPROXY_*` override for every node's pullproxy, after the cluster's own (so it may
    /// replace one of them): e.g. a key of the cluster tier, `PULLPROXY_HUB__WRITE_BACK`.
    pub fn proxy_env(mut self, key: &'static str, value: &str) -> Self {
        self.proxy_env.push((key, value.to_owned()));
        self
    }

    /// Creates the network, starts the registries and the nodes (each node on a thread of its
    /// own, beside the registries), and waits until every node's pullproxy reports ready.
    /// Panics with what failed; whatever was created by then is removed.
    pub fn start(self) -> Cluster {
        assert!(
            (1..=MAX_NODES).contains(&self.nodes),
            "a cluster has 1 to {MAX_NODES} nodes, not {}",
            self.nodes
        );
        let started = Instant::now();
        let p = &self.prefix;
        let switch = Switch::new(&format!("{p}-sw"));
        let hub_ns = NetNs::new(&format!("{p}-hub"));
        switch.plug("hub", &hub_ns, "eth0", &[&cidr(HUB_IP), &cidr(MIRROR_IP)]);
        let internet = NetNs::new(&format!("{p}-net"));
        switch.plug(
            "net",
            &internet,
            "eth0",
            &[&cidr(UPSTREAM_IP), &cidr(PRIVATE_IP)],
        );
        let ca = TestCa::new("cluster-upstream");
        let work = tempfile::Builder::new()
            .prefix("pp-cluster-")
            .tempdir()
            .expect("cluster work dir");
        let mut common = vec![
            (
                "PULLPROXY_TLS__EXTRA_UPSTREAM_CAS",
                format!("[{}]", ca.cert_path().display()),
            ),
            // Nodes see the hub go away and come back within a fraction of a second.
            ("PULLPROXY_ADMIN__HUB_CHECK_INTERVAL", "200ms".to_owned()),
        ];
        common.extend(self.proxy_env.iter().cloned());
        let upstream_ca_pem = ca.cert_pem();
        let (hub, upstream, private, nodes) = std::thread::scope(|s| {
            let hub = s.spawn(|| {
                Registry::builder(SocketAddr::new(ip(HUB_IP), 5000))
                    .netns(&hub_ns)
                    .server_name("sealos.hub")
                    .htpasswd(HUB_USER, HUB_PASSWORD)
                    .start()
            });
            let upstream = s.spawn(|| {
                Registry::builder(SocketAddr::new(ip(UPSTREAM_IP), 443))
                    .netns(&internet)
                    .tls(&ca.leaf(PUBLIC_HOSTS))
                    .start()
            });
            let private = s.spawn(|| {
                Registry::builder(SocketAddr::new(ip(PRIVATE_IP), 443))
                    .netns(&internet)
                    .server_name("quay.io")
                    .tls(&ca.leaf(&["quay.io"]))
                    .htpasswd(PRIVATE_USER, PRIVATE_PASSWORD)
                    .start()
            });
            let nodes: Vec<_> = (0..self.nodes)
                .map(|i| {
                    let (switch, common, ca_pem) = (&switch, &common, &upstream_ca_pem);
                    s.spawn(move || ClusterNode::start(p, i, switch, common, ca_pem))
                })
                .collect();
            // Join everything before failing: a panic then drops (tears down) whatever did
            // start rather than leaving it running.
            let hub = hub.join();
            let upstream = upstream.join();
            let private = private.join();
            let nodes: Vec<_> = nodes.into_iter().map(|n| n.join()).collect();
            (
                joined(hub),
                joined(upstream),
                joined(private),
                nodes.into_iter().map(joined).collect::<Vec<_>>(),
            )
        });
        let mut cluster = Cluster {
            nodes,
            hub,
            upstream,
            private,
            mirror: None,
            work,
            ca,
            started_in: Duration::ZERO,
            _internet: internet,
            hub_ns,
            _switch: switch,
        };
        for n in &cluster.nodes {
            n.wait_ready();
        }
        cluster.started_in = started.elapsed();
        cluster
    }
}

/// The running cluster; see the module documentation. Fields drop in declaration order: the
/// nodes first, then the registries, then the namespaces and the switch.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    /// The sealos hub (docker-registry, htpasswd [`HUB_USER`]), shared by every node.
    pub hub: Registry,
    /// The fake Docker Hub: anonymous, public images.
    pub upstream: Registry,
    /// The private quay.io: [`PRIVATE_USER`] / [`PRIVATE_PASSWORD`].
    pub private: Registry,
    /// The registry mirror, once started ([`Cluster::start_mirror`]).
    pub mirror: Option<Registry>,
    /// Scratch space for the test (image fixtures), removed with the cluster.
    work: TempDir,
    /// The CA of the fake internet's registries: every pullproxy reads its certificate, and the
    /// registries their leaves, from its directory (also when restarted).
    ca: TestCa,
    started_in: Duration,
    _internet: NetNs,
    hub_ns: NetNs,
    _switch: Switch,
}

impl Cluster {
    /// A cluster of `n` nodes, named `prefix-...`, with the cluster's default configuration.
    pub fn new(prefix: &str, n: usize) -> Self {
        Self::builder(prefix).nodes(n).start()
    }

    pub fn builder(prefix: &str) -> ClusterBuilder {
        ClusterBuilder {
            prefix: prefix.to_owned(),
            nodes: 2,
            proxy_env: Vec::new(),
        }
    }

    /// Wall time from [`ClusterBuilder::start`] until every node was ready.
    pub fn bring_up_time(&self) -> Duration {
        self.started_in
    }

    /// A directory for the test's own files (image fixtures), removed with the cluster.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Runs `f` on every node at the same moment (a thread per node, released together) and
    /// returns the results in node order. A panic on any node is raised here after all finished.
    pub fn on_every_node<T: Send>(&self, f: impl Fn(&ClusterNode) -> T + Sync) -> Vec<T> {
        let barrier = Barrier::new(self.nodes.len());
        let results: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = self
                .nodes
                .iter()
                .map(|n| {
                    let (f, barrier) = (&f, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        f(n)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join()).collect()
        });
        results.into_iter().map(joined).collect()
    }

    /// Kills the hub (SIGKILL: it is suddenly gone); its storage is kept.
    pub fn hub_stop(&mut self) {
        self.hub.stop();
    }

    /// Starts the hub again on the same storage and waits until it answers.
    pub fn hub_start(&mut self) {
        self.hub.start();
    }

    /// An empty hub: restarted with its storage wiped (stop the nodes' pullproxies first, or
    /// they see it go away for a moment).
    pub fn hub_reset(&mut self) {
        self.hub.reset();
    }

    /// Starts the usual "registry mirror" in the hub's namespace at [`MIRROR_URL`]:
    /// docker-registry in pull-through proxy mode (plain HTTP, anonymous) in front of the fake
    /// Docker Hub, which it resolves and trusts like any client. Nodes use it through
    /// [`ClusterNode::restart_containerd`] with a `hosts.toml`
    /// ([`crate::containerd::mirror_hosts_toml`]).
    pub fn start_mirror(&mut self) -> &mut Registry {
        assert!(self.mirror.is_none(), "the mirror runs already");
        let bundle = ca_bundle(
            &self.work.path().join("mirror-bundle.pem"),
            &[&self.ca.cert_pem()],
        );
        let mirror = Registry::builder(SocketAddr::new(ip(MIRROR_IP), 5000))
            .netns(&self.hub_ns)
            .server_name("mirror.local")
            .mounts(hosts().ca_bundle(bundle))
            .proxy(RemoteProxy {
                url: "https://registry-1.docker.io".to_owned(),
                username: None,
                password: None,
            })
            .start();
        self.mirror.insert(mirror)
    }

    /// Pushes `image` into the hub as `repo:tag` (the sealos repository name: `library/nginx`
    /// for `docker.io/library/nginx`); returns its digest.
    pub fn hub_push(&self, repo: &str, tag: &str, image: &Image) -> Digest {
        self.hub.client().push_image(repo, tag, image)
    }

    /// The repositories the hub holds.
    pub fn hub_repositories(&self) -> Vec<String> {
        self.hub
            .client()
            .catalog()
            .unwrap_or_else(|e| panic!("hub catalog: {e}"))
    }

    /// The tags of `repo` in the hub (none for a repository it does not know).
    pub fn hub_tags(&self, repo: &str) -> Vec<String> {
        self.hub
            .client()
            .tags(repo)
            .unwrap_or_else(|e| panic!("hub tags of {repo}: {e}"))
    }

    /// What of `image` the hub lacks in `repo` (manifest, then blobs); empty when it holds all.
    pub fn hub_missing(&self, repo: &str, image: &Image) -> Vec<Digest> {
        self.hub
            .client()
            .missing(repo, image)
            .unwrap_or_else(|e| panic!("hub content of {repo}: {e}"))
    }

    /// Kills both internet registries (the Docker Hub and quay.io); storage is kept.
    pub fn upstream_stop(&mut self) {
        self.upstream.stop();
        self.private.stop();
    }

    /// Starts both internet registries again and waits until they answer.
    pub fn upstream_start(&mut self) {
        self.upstream.start();
        self.private.start();
    }

    /// How many requests for blob `digest` of `repository` the nodes' current pullproxies
    /// answered from `source` (their "pull" records): each answer from `upstream` is a download
    /// the internet logs, each from `hub` one the hub logs.
    pub fn answered_from(&self, repository: &str, digest: &Digest, source: &str) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| n.proxy.pulls(repository))
            .filter(|r| r["kind"] == "blob" && r["source"] == source)
            .filter(|r| r["reference"] == digest.as_str())
            .count()
    }

    /// The fake Docker Hub's downloads of each blob of `image` so far (requests and exact
    /// bytes, from its access log), once it logged at least `at_least(digest)` downloads of
    /// each blob and then nothing new for a second: a download is logged when its handler
    /// returns, a moment after the client read the last byte. After [`SETTLE_TIMEOUT`], what
    /// was logged by then.
    pub fn internet_traffic(
        &self,
        image: &Image,
        at_least: impl Fn(&Digest) -> usize,
    ) -> BTreeMap<Digest, BlobTraffic> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let of_image = || -> BTreeMap<Digest, BlobTraffic> {
            let mut all = self.upstream.blob_traffic();
            image
                .blobs()
                .map(|b| {
                    let t = all.remove(&b.digest).unwrap_or_default();
                    (b.digest.clone(), t)
                })
                .collect()
        };
        let mut last = of_image();
        let mut unchanged_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = of_image();
            if now != last {
                last = now;
                unchanged_since = Instant::now();
                continue;
            }
            let complete = last.iter().all(|(d, t)| t.requests >= at_least(d));
            if (complete && unchanged_since.elapsed() >= QUIET) || Instant::now() > deadline {
                return last;
            }
        }
    }
}

/// One node of a [`Cluster`]: a [`Node`], its pullproxy and its containerd. Fields drop in
/// declaration order: containerd, pullproxy, then the node.
pub struct ClusterNode {
    /// Debian's containerd with its default configuration, in the node's target cgroup (or
    /// with a `hosts.toml`, see [`Self::restart_containerd`]).
    pub ctd: Containerd,
    /// The node's pullproxy. Its logs are those of the current process: a restart starts a new
    /// record.
    pub proxy: Pullproxy,
    index: usize,
    proxy_env: Vec<(&'static str, String)>,
    /// The CA bundle containerd trusts: this node's CA and the internet's.
    bundle: PathBuf,
    pub node: Node,
}

impl ClusterNode {
    fn start(
        prefix: &str,
        index: usize,
        switch: &Switch,
        common: &[(&'static str, String)],
        upstream_ca_pem: &str,
    ) -> Self {
        let node = Node::new(&format!("{prefix}-n{index}"));
        switch.plug(
            &format!("n{index}"),
            &node.ns,
            "eth0",
            &[&cidr(&node_ip(index))],
        );
        let (_, mut proxy_env) = node.hub_env(HUB_URL, HUB_USER, HUB_PASSWORD);
        proxy_env.extend_from_slice(common);
        let proxy = node.start_proxy_with_mounts(hosts(), &proxy_env);
        // containerd trusts this node's CA (generated by pullproxy at its first start) and the
        // internet's, for connections that go direct while pullproxy is down.
        let bundle = ca_bundle(
            &node.state().join("bundle.pem"),
            &[&node.node_ca_pem(), upstream_ca_pem],
        );
        let ctd = start_containerd(&node, &bundle, None);
        Self {
            ctd,
            proxy,
            index,
            proxy_env,
            bundle,
            node,
        }
    }

    /// Replaces the node's containerd with a fresh one (empty content store, no images): its
    /// default configuration, or with `docker_io_hosts_toml` as the `hosts.toml` of docker.io
    /// (for `ctr` and CRI pulls alike).
    pub fn restart_containerd(&mut self, docker_io_hosts_toml: Option<&str>) {
        self.ctd = start_containerd(&self.node, &self.bundle, docker_io_hosts_toml);
    }

    /// The node's number in the cluster, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's address on the bridge.
    pub fn ip(&self) -> String {
        node_ip(self.index)
    }

    /// `ctr images pull <reference>` (anonymous): `ctr` itself fetches, redirected to this
    /// node's pullproxy.
    pub fn pull(&self, reference: &str) -> ToolRun {
        self.ctd.pull(reference, None)
    }

    /// CRI `PullImage` (anonymous), the kubelet's path: the containerd daemon fetches. Returns
    /// the image id.
    pub fn cri_pull(&self, reference: &str) -> Result<String, tonic::Status> {
        self.ctd
            .cri()
            .timeout(PULL_TIMEOUT)
            .pull_image(reference, None)
    }

    /// Removes `reference` from containerd, content included, so that the next pull fetches
    /// every blob again: from `ctr`'s namespace, and through CRI from the kubelet's (where CRI
    /// also keeps the image under its digest and its id).
    pub fn remove_image(&self, reference: &str) {
        if self.ctd.image(CTR_NAMESPACE, reference).is_some() {
            self.ctd.remove_image(CTR_NAMESPACE, reference);
        }
        if self.ctd.image(CRI_NAMESPACE, reference).is_some() {
            self.ctd
                .cri()
                .remove_image(reference)
                .unwrap_or_else(|e| panic!("node {}: RemoveImage {reference}: {e}", self.index));
        }
    }

    /// `pullproxy warm <images>` on this node, with the node's configuration: pulls them
    /// through the node's pullproxy into its cache.
    pub fn warm(&self, images: &[&str]) -> ToolRun {
        let mut cmd = std::process::Command::new(crate::pullproxy::binary());
        cmd.arg("warm").args(images).env_clear();
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in self
            .node
            .env()
            .into_iter()
            .chain(self.proxy_env.iter().cloned())
        {
            cmd.env(k, v);
        }
        let finished = crate::process::run_at(
            cmd,
            &Placement::new().netns(&self.node.ns).mounts(hosts()),
            PULL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("node {}: pullproxy warm: {e}", self.index));
        ToolRun {
            tool: "pullproxy warm",
            args: images.iter().map(|s| (*s).to_owned()).collect(),
            finished,
        }
    }

    /// SIGKILL the node's pullproxy (a crash): connections go direct until it is back.
    pub fn kill_proxy(&mut self) {
        self.proxy.kill();
    }

    /// Starts a new pullproxy (killing the current one, if it runs) with the same configuration
    /// and state: node CA, cache, pins.
    pub fn restart_proxy(&mut self) {
        self.proxy.kill();
        self.proxy = self.node.start_proxy_with_mounts(hosts(), &self.proxy_env);
    }

    /// A pullproxy with nothing of the node's past: killed, its cache directory (blobs, node
    /// tier, repository links, public marks, write-back jobs) removed, started again with the
    /// same configuration and node CA; returns once it reports ready.
    pub fn restart_proxy_empty(&mut self) {
        self.proxy.kill();
        let cache = self.node.cache_dir();
        if cache.exists() {
            std::fs::remove_dir_all(&cache)
                .unwrap_or_else(|e| panic!("removing {}: {e}", cache.display()));
        }
        self.restart_proxy();
        self.wait_ready();
    }

    /// Waits until the write-back queue of the node's pullproxy is empty and at least one job
    /// ended (or [`SETTLE_TIMEOUT`] passed); returns the `pullproxy_writebacks_total` samples
    /// (outcomes) then.
    pub fn wait_written_back(&self) -> String {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let text = self.scrape();
            let queued = pullproxy::sample(&text, "pullproxy_writeback_queue ");
            let ended = pullproxy::sample(&text, "pullproxy_writebacks_total");
            if (queued == 0.0 && ended > 0.0) || Instant::now() > deadline {
                return text
                    .lines()
                    .filter(|l| l.starts_with("pullproxy_writebacks_total"))
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// [`Self::restart_proxy`] with further `PULLPROXY_*` overrides from now on (later entries
    /// win), e.g. a new configuration key on one node only.
    pub fn restart_proxy_with(&mut self, env: &[(&'static str, &str)]) {
        self.proxy_env
            .extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        self.restart_proxy();
    }

    /// The pullproxy records ("pull") of `repository`, after waiting until there are at least
    /// `blobs` blob records among them.
    pub fn wait_pulls(&self, repository: &str, blobs: usize) -> Vec<Value> {
        self.proxy
            .wait_pulls(repository, "blob", blobs, SETTLE_TIMEOUT)
    }

    /// pullproxy's `/metrics` text.
    pub fn scrape(&self) -> String {
        self.node.scrape()
    }

    /// A metric of this node's pullproxy: the samples starting with `prefix`, summed (see
    /// [`pullproxy::sample`]).
    pub fn metric(&self, prefix: &str) -> f64 {
        pullproxy::sample(&self.scrape(), prefix)
    }

    /// Waits until [`Self::metric`] of `prefix` is `want` (the hub check, for one, runs every
    /// 200 ms); returns the last value read, `want` or not, after [`SETTLE_TIMEOUT`].
    pub fn wait_metric(&self, prefix: &str, want: f64) -> f64 {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let v = self.metric(prefix);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The size of the blob `digest` in this node's pullproxy cache, if it holds it.
    pub fn cached_len(&self, digest: &Digest) -> Option<u64> {
        let path = self
            .node
            .cache_dir()
            .join("blobs/sha256")
            .join(digest.hex());
        std::fs::metadata(path).ok().map(|m| m.len())
    }

    /// Waits until pullproxy's `/readyz` answers 200: programs attached, listeners bound and
    /// the hub reachable over the bridge.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let (status, body) = self.node.admin_get("/readyz");
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready after {READY_TIMEOUT:?}: {status} {body}\n{}",
                self.index,
                self.proxy.dump()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A containerd on `node`: in its target cgroup, with the cluster's hosts file and `bundle`, and
/// `docker_io_hosts_toml` if given.
fn start_containerd(node: &Node, bundle: &Path, docker_io_hosts_toml: Option<&str>) -> Containerd {
    let mut builder = Containerd::builder(
        Placement::new()
            .netns(&node.ns)
            .cgroup(&node.runtime)
            .mounts(hosts().ca_bundle(bundle)),
    )
    .ctr_timeout(PULL_TIMEOUT);
    if let Some(toml) = docker_io_hosts_toml {
        builder = builder.hosts_toml("docker.io", toml);
    }
    builder.start()
}

/// The value of a joined thread, or its panic, raised again.
fn joined<T>(r: std::thread::Result<T>) -> T {
    r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Node `index`'s address.
pub fn node_ip(index: usize) -> String {
    assert!(index < MAX_NODES, "node {index}: at most {MAX_NODES} nodes");
    format!("10.210.0.{}", FIRST_NODE_HOST + index)
}

fn cidr(ip: &str) -> String {
    format!("{ip}/{PREFIX_LEN}")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("cluster address")
}

/// /etc/hosts on every node, for containerd and pullproxy: the public names at the fake Docker
/// Hub, quay.io at the private registry, sealos.hub at the hub.
pub fn hosts() -> MountSpec {
    MountSpec::new()
        .hosts(PUBLIC_HOSTS, ip(UPSTREAM_IP))
        .hosts(&["quay.io"], ip(PRIVATE_IP))
        .hosts(&["sealos.hub"], ip(HUB_IP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_stay_in_the_subnet_and_clear_of_the_servers() {
        assert_eq!(node_ip(0), "10.210.0.11");
        assert_eq!(node_ip(MAX_NODES - 1), "10.210.0.210");
        for server in [HUB_IP, UPSTREAM_IP, PRIVATE_IP, MIRROR_IP] {
            assert!((0..MAX_NODES).all(|i| node_ip(i) != server));
        }
        assert!(std::panic::catch_unwind(|| node_ip(MAX_NODES)).is_err());
        assert!(HUB_URL.contains(HUB_IP));
        assert!(MIRROR_URL.contains(MIRROR_IP));
    }

    #[test]
    fn hosts_send_registry_names_to_the_internet_and_the_hub() {
        let hosts = hosts().hosts_file();
        assert!(hosts.contains(&format!("{UPSTREAM_IP}\tregistry-1.docker.io\n")));
        assert!(hosts.contains(&format!("{PRIVATE_IP}\tquay.io\n")));
        assert!(hosts.contains(&format!("{HUB_IP}\tsealos.hub\n")));
    }
}
