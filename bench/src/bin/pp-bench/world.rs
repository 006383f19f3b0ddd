//! The benchmark's world, inside one simulated node: a TLS upstream registry (the "Docker Hub"),
//! the sealos hub (plain HTTP, htpasswd), pullproxy with the real kernel redirect, docker-registry
//! in pull-through proxy mode and nginx as a caching reverse proxy, both in front of the same
//! upstream; the images every system is pulled with; and where each kind of client runs.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use harness::{
    cgroup::Cgroup,
    images::{self, Blob, Digest, Format, Image, MEDIA_TYPES},
    loadgen::{Job, Outcome},
    mountns::MountSpec,
    nginx::NginxCache,
    node::Node,
    process::{self, Memory, Placement},
    pullproxy::Pullproxy,
    registry::{Registry, RemoteProxy},
    testca::{TestCa, ca_bundle},
};

/// The fake Docker Hub (TLS), where the kernel sends redirected clients' original connections.
pub const UPSTREAM_IP: &str = "10.205.0.1";
/// The sealos hub (plain HTTP on 5000).
pub const HUB_IP: &str = "10.205.0.2";
/// docker-registry in proxy mode (TLS).
pub const DPROXY_IP: &str = "10.205.0.3";
/// nginx (TLS).
pub const NGINX_IP: &str = "10.205.0.4";
pub const HUB_USER: &str = "admin";
pub const HUB_PASSWORD: &str = "bench-hub-secret";
/// Names clients use for the upstream.
pub const REGISTRY_NAMES: &[&str] = &["registry-1.docker.io", "docker.io", "index.docker.io"];
/// The repository on the upstream (pulled through pullproxy's cache and the peers).
pub const REPO: &str = "library/bench";
/// The same images on the hub, under another name, for hub hits.
pub const HUB_REPO: &str = "library/hubbed";
/// Cache size of pullproxy in the memory phase with a full cache.
pub const SMALL_CACHE: &str = "320MiB";

/// How a client reaches content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// The hub itself, plain HTTP with basic auth: the floor.
    Hub,
    /// The TLS upstream itself.
    Upstream,
    /// pullproxy, the client redirected by the kernel; content on the hub.
    PullproxyHub,
    /// pullproxy, the client redirected by the kernel; content not on the hub.
    Pullproxy,
    /// docker-registry in pull-through proxy mode.
    Dproxy,
    Nginx,
}

impl Via {
    /// The three systems that cache what they fetch upstream.
    pub const CACHING: [Via; 3] = [Via::Pullproxy, Via::Dproxy, Via::Nginx];

    pub fn label(self) -> &'static str {
        match self {
            Via::Hub => "hub (direct, plain HTTP)",
            Via::Upstream => "upstream (direct, TLS)",
            Via::PullproxyHub => "pullproxy hub hit",
            Via::Pullproxy => "pullproxy",
            Via::Dproxy => "distribution proxy",
            Via::Nginx => "nginx proxy_cache",
        }
    }

    /// The repository a client asks for.
    pub fn repo(self) -> &'static str {
        match self {
            Via::Hub | Via::PullproxyHub => HUB_REPO,
            _ => REPO,
        }
    }

    /// `GET` the blob (or `HEAD` the manifest) this system is asked for.
    pub fn base(self) -> &'static str {
        match self {
            Via::Hub => "http://sealos.hub:5000",
            _ => "https://registry-1.docker.io",
        }
    }
}

/// A bench image: one big layer, on the upstream and (under [`HUB_REPO`]) on the hub.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub tag: String,
    pub image: Image,
}

impl Fixture {
    pub fn layer(&self) -> &Blob {
        &self.image.layers[0]
    }

    pub fn blob_path(&self, via: Via) -> String {
        format!("/v2/{}/blobs/{}", via.repo(), self.layer().digest)
    }

    pub fn manifest_path(&self, via: Via) -> String {
        format!("/v2/{}/manifests/{}", via.repo(), self.tag)
    }
}

/// Fields drop in declaration order: servers first, then cgroups, CA files and the node.
pub struct World {
    proxy: Option<Pullproxy>,
    pub nginx: NginxCache,
    pub dproxy: Registry,
    pub hub: Registry,
    pub upstream: Registry,
    clients: Cgroup,
    bundle: PathBuf,
    /// Keeps the CA's files (upstream and peers' certificates) alive.
    _ca: TestCa,
    /// The bench binary, started again as the client process.
    exe: PathBuf,
    /// pullproxy settings besides the node's.
    proxy_env: Vec<(&'static str, String)>,
    /// Big-layer files (deleted with the world).
    pub fixtures_dir: tempfile::TempDir,
    pub node: Node,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP")
}

impl World {
    /// Starts every server (pullproxy last, with the kernel redirect).
    pub fn new() -> Self {
        let node = Node::new("pp-bench");
        for a in [UPSTREAM_IP, HUB_IP, DPROXY_IP, NGINX_IP] {
            node.ns.add_addr(&format!("{a}/32"));
        }
        let ca = TestCa::new("bench-upstream");
        let upstream_leaf = ca.leaf(REGISTRY_NAMES);
        let upstream = Registry::builder(SocketAddr::new(ip(UPSTREAM_IP), 443))
            .netns(&node.ns)
            .tls(&upstream_leaf)
            .start();
        let hub = Registry::builder(SocketAddr::new(ip(HUB_IP), 5000))
            .netns(&node.ns)
            .server_name("sealos.hub")
            .htpasswd(HUB_USER, HUB_PASSWORD)
            .start();
        // The peers resolve and trust the upstream as pullproxy's clients would see it.
        let peer_bundle = ca_bundle(&node.state().join("peer-bundle.pem"), &[&ca.cert_pem()]);
        let dproxy = Registry::builder(SocketAddr::new(ip(DPROXY_IP), 443))
            .netns(&node.ns)
            .tls(&ca.leaf(REGISTRY_NAMES))
            .proxy(RemoteProxy {
                url: "https://registry-1.docker.io".into(),
                username: None,
                password: None,
            })
            .mounts(
                MountSpec::new()
                    .hosts(REGISTRY_NAMES, ip(UPSTREAM_IP))
                    .ca_bundle(&peer_bundle),
            )
            .start();
        let nginx = NginxCache::builder(SocketAddr::new(ip(NGINX_IP), 443))
            .netns(&node.ns)
            .tls(&ca.leaf(REGISTRY_NAMES))
            .upstream(SocketAddr::new(ip(UPSTREAM_IP), 443), &ca.cert_path())
            .start();
        let (_, mut proxy_env) =
            node.hub_env(&format!("http://{HUB_IP}:5000"), HUB_USER, HUB_PASSWORD);
        proxy_env.extend([
            (
                "PULLPROXY_TLS__EXTRA_UPSTREAM_CAS",
                format!("[{}]", ca.cert_path().display()),
            ),
            // What a node runs: a line per request, no debug logging.
            ("PULLPROXY_LOG__LEVEL", "info".to_owned()),
            // Connections are made before the clock starts; under emulation (the fast path
            // figure in vm-test's guest) the first handshake, which mints a leaf, takes long.
            ("PULLPROXY_LISTEN__HANDSHAKE_TIMEOUT", "120s".to_owned()),
        ]);
        let proxy = node.start_proxy(&proxy_env);
        let bundle = ca_bundle(
            &node.state().join("client-bundle.pem"),
            &[&node.node_ca_pem(), &ca.cert_pem()],
        );
        Self {
            proxy: Some(proxy),
            nginx,
            dproxy,
            hub,
            upstream,
            clients: Cgroup::new_root("pp-bench-clients"),
            bundle,
            _ca: ca,
            exe: std::env::current_exe().expect("current exe"),
            proxy_env,
            fixtures_dir: tempfile::Builder::new()
                .prefix("pp-bench-fixtures-")
                .tempdir()
                .expect("fixtures dir"),
            node,
        }
    }

    pub fn proxy(&self) -> &Pullproxy {
        self.proxy.as_ref().expect("pullproxy runs")
    }

    /// Builds an image with one `size`-byte layer and pushes it to the upstream ([`REPO`]) and
    /// the hub ([`HUB_REPO`]) as `tag`.
    pub fn fixture(&self, tag: &str, size: u64, seed: u64) -> Fixture {
        let image = images::big_image(Format::Oci, self.fixtures_dir.path(), &[size], seed);
        self.upstream.client().push_image(REPO, tag, &image);
        self.hub.client().push_image(HUB_REPO, tag, &image);
        Fixture {
            tag: tag.to_owned(),
            image,
        }
    }

    /// Pushes `count` small random blobs to the upstream (for filling a cache); their paths.
    pub fn small_blobs(&self, count: usize, size: usize) -> Vec<String> {
        let client = self.upstream.client();
        (0..count)
            .map(|i| {
                let layer = images::random_layer(size, 0x5a11_0000 + i as u64);
                let blob = Blob {
                    media_type: "application/octet-stream".into(),
                    digest: layer.digest,
                    size: layer.size,
                    content: layer.content,
                };
                client.push_blob(REPO, &blob);
                format!("/v2/{REPO}/blobs/{}", blob.digest)
            })
            .collect()
    }

    /// Where a client of `via` runs: the node's network namespace; the redirect's target cgroup
    /// for pullproxy (the kernel sends its connections to the proxy), a cgroup outside the
    /// node's attach point otherwise; a hosts file naming the system's address, and a CA bundle
    /// with the node CA and the test CA.
    pub fn placement(&self, via: Via) -> Placement {
        let target = match via {
            Via::Hub => HUB_IP,
            Via::Upstream | Via::Pullproxy | Via::PullproxyHub => UPSTREAM_IP,
            Via::Dproxy => DPROXY_IP,
            Via::Nginx => NGINX_IP,
        };
        let mounts = MountSpec::new()
            .hosts(REGISTRY_NAMES, ip(target))
            .hosts(&["sealos.hub"], ip(HUB_IP))
            .ca_bundle(&self.bundle);
        let at = Placement::new().netns(&self.node.ns).mounts(mounts);
        match via {
            Via::Pullproxy | Via::PullproxyHub => at.cgroup(&self.node.runtime),
            _ => at.cgroup(&self.clients),
        }
    }

    /// A job for `via` (credentials for the hub, manifest media types for `HEAD`).
    pub fn job(&self, via: Via, method: &str, paths: Vec<String>) -> Job {
        let mut job = Job::new(via.base(), method, paths);
        if via == Via::Hub {
            job.basic_auth = Some((HUB_USER.into(), HUB_PASSWORD.into()));
        }
        if method == "HEAD" {
            job.headers
                .push(("Accept".into(), MEDIA_TYPES.join(", ").to_string()));
        }
        job
    }

    /// Runs `job` in a client process placed for `via`.
    pub fn run(&self, via: Via, job: &Job) -> Outcome {
        job.run_at(&self.exe, &self.placement(via))
    }

    /// Empties the cache of a caching system (restarting it), so that the next pull is cold.
    pub fn make_cold(&mut self, via: Via) {
        match via {
            Via::Pullproxy => self.restart_proxy(&[]),
            Via::Dproxy => {
                self.dproxy.stop();
                let storage = self.dproxy.storage();
                std::fs::remove_dir_all(&storage).expect("clear proxy storage");
                std::fs::create_dir(&storage).expect("proxy storage");
                self.dproxy.start();
            }
            Via::Nginx => self.nginx.restart_cold(),
            other => panic!("{other:?} has no cache"),
        }
    }

    /// Stops pullproxy, deletes its cache and starts it again with `extra` settings.
    pub fn restart_proxy(&mut self, extra: &[(&'static str, String)]) {
        self.stop_proxy();
        let cache = self.node.cache_dir();
        if cache.exists() {
            std::fs::remove_dir_all(&cache).expect("clear pullproxy cache");
        }
        self.start_proxy(extra);
    }

    pub fn stop_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.stop();
        }
    }

    /// Starts pullproxy (keeping whatever its cache directory holds).
    pub fn start_proxy(&mut self, extra: &[(&'static str, String)]) {
        assert!(self.proxy.is_none(), "pullproxy already runs");
        let mut env = self.proxy_env.clone();
        env.extend_from_slice(extra);
        self.proxy = Some(self.node.start_proxy(&env));
    }

    /// Waits until a fetched blob is committed to a caching system's store, so that the next
    /// request is a plain hit (not a join of the finishing download).
    pub fn settle_cached(&self, via: Via, digest: &Digest) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let cached = || match via {
            Via::Pullproxy => self
                .node
                .cache_dir()
                .join("blobs/sha256")
                .join(digest.hex())
                .exists(),
            Via::Dproxy => self
                .dproxy
                .storage()
                .join("docker/registry/v2/blobs/sha256")
                .join(&digest.hex()[..2])
                .join(digest.hex())
                .join("data")
                .exists(),
            // nginx renames its temp file into place when the response has been read: no name
            // to look for (keys are hashed), so give it a moment.
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                true
            }
        };
        while !cached() {
            assert!(
                Instant::now() < deadline,
                "{} never stored {digest}",
                via.label()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the upstream's stored copy of a blob (untimed), so that a cold pull measures the
    /// network path, not this host's disk: the kernel here reclaims page cache that went unused
    /// for a while.
    pub fn page_in_upstream(&self, digest: &Digest) {
        page_in(&self.upstream.storage(), digest);
    }

    /// The same for the hub's copy.
    pub fn page_in_hub(&self, digest: &Digest) {
        page_in(&self.hub.storage(), digest);
    }

    /// The upstream's blob `GET` bytes for `digest` logged since the last
    /// [`Registry::clear_requests`], once the log has settled (a request is logged when its
    /// handler returns).
    pub fn upstream_blob_bytes(&self, digest: &Digest) -> u64 {
        let sum = || self.upstream.blob_served(digest).bytes;
        // Stable for 300 ms.
        let mut last = sum();
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stable_since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let now = sum();
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
        }
        last
    }

    /// Resident memory of a system's processes (nginx: master and workers).
    pub fn memory(&self, via: Via) -> Memory {
        let pids = self.pids(via);
        pids.iter()
            .filter_map(|p| process::memory(*p))
            .fold(Memory::default(), |a, b| a + b)
    }

    /// Resets the peak memory of a system's processes.
    pub fn reset_peak(&self, via: Via) {
        for p in self.pids(via) {
            process::reset_peak(p);
        }
    }

    fn pids(&self, via: Via) -> Vec<u32> {
        match via {
            Via::Pullproxy | Via::PullproxyHub => vec![self.proxy().pid()],
            Via::Dproxy => self.dproxy.pid().into_iter().collect(),
            Via::Nginx => {
                let master = self.nginx.pid().expect("nginx runs");
                let mut pids = vec![master];
                pids.extend(process::children(master));
                pids
            }
            Via::Hub => self.hub.pid().into_iter().collect(),
            Via::Upstream => self.upstream.pid().into_iter().collect(),
        }
    }

    /// The source of the last `pull` log line pullproxy wrote for `path`'s resource.
    pub fn last_source(&self, repo: &str, reference: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self
                .proxy()
                .all("pull")
                .into_iter()
                .rev()
                .find(|r| r["repository"] == repo && r["reference"] == reference)
                .and_then(|r| r["source"].as_str().map(str::to_owned));
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads a registry's stored blob to the end (into the page cache).
fn page_in(storage: &std::path::Path, digest: &Digest) {
    let data = storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&digest.hex()[..2])
        .join(digest.hex())
        .join("data");
    let mut file = std::fs::File::open(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    std::io::copy(&mut file, &mut std::io::sink())
        .unwrap_or_else(|e| panic!("{}: {e}", data.display()));
}
