//! One node with everything around it that a pull needs: the sealos hub (docker-registry with
//! htpasswd), a fake Docker Hub (TLS), a private quay.io (TLS and htpasswd), a plain-HTTP
//! registry configured as insecure and a TLS site that is not a registry, at addresses that
//! exist only in the node's network namespace, and a pullproxy that knows the hub and trusts the
//! fake upstreams' CA. Clients (skopeo, containerd, podman) get [`World::client_mounts`]: a hosts
//! file with the public names at the fake registries and a CA bundle with the node CA.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    mountns::MountSpec,
    node::Node,
    process::Placement,
    pullproxy::{Pullproxy, sample},
    registry::Registry,
    registry_client::RegistryClient,
    skopeo::Skopeo,
    testca::{self, Leaf, TestCa, ca_bundle},
};

/// The fake Docker Hub (and registry.k8s.io), inside the test namespace only.
pub const UPSTREAM_IP: &str = "10.204.0.1";
/// The fake sealos hub.
pub const HUB_IP: &str = "10.204.0.2";
/// A private quay.io that wants credentials.
pub const PRIVATE_IP: &str = "10.204.0.3";
/// A plain-HTTP registry on port 80, configured as insecure.
pub const INSECURE_IP: &str = "10.204.0.4";
/// A TLS site that is not a registry: its connections are spliced untouched.
pub const SITE_IP: &str = "10.204.0.5";
pub use crate::node::ADMIN_ADDR;
pub const HUB_USER: &str = "admin";
pub const HUB_PASSWORD: &str = "hub-secret-1";
pub const PRIVATE_USER: &str = "alice";
pub const PRIVATE_PASSWORD: &str = "wonderland";
/// The names the fake Docker Hub answers for.
pub const PUBLIC_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "index.docker.io",
    "docker.io",
    "registry.k8s.io",
];

/// Fields drop in declaration order: pullproxy, the registries, then the node.
pub struct World {
    pub proxy: Pullproxy,
    pub insecure: Registry,
    pub site: Registry,
    pub hub: Registry,
    pub upstream: Registry,
    pub private: Registry,
    /// The file pullproxy reads the hub password from (rewrite it to rotate).
    pub hub_password_file: PathBuf,
    /// System roots + node CA + upstream CA, for clients.
    pub bundle: PathBuf,
    proxy_env: Vec<(&'static str, String)>,
    /// The CA of the fake upstreams (pullproxy trusts it).
    ca: TestCa,
    pub node: Node,
}

impl World {
    /// A node named `prefix-...` with its registries and a running pullproxy.
    pub fn new(prefix: &str) -> Self {
        Self::with_proxy_env(prefix, &[])
    }

    /// [`World::new`] with write-back off, for tests of what the cache serves: with write-back
    /// on, the hub gets an image the upstream served in the background, and pulls after that
    /// come through the node tier (source `node`) instead, sooner or later as the machine's
    /// speed decides (tests/tests/cluster.rs tests write-back).
    pub fn without_write_back(prefix: &str) -> Self {
        Self::with_proxy_env(prefix, &[("PULLPROXY_HUB__WRITE_BACK", "off".to_owned())])
    }

    /// [`World::new`] with more `PULLPROXY_*` overrides for pullproxy (later entries win; they
    /// also apply to [`World::restart_proxy`]).
    pub fn with_proxy_env(prefix: &str, extra: &[(&'static str, String)]) -> Self {
        let node = Node::new(prefix);
        for ip in [UPSTREAM_IP, HUB_IP, PRIVATE_IP, INSECURE_IP, SITE_IP] {
            node.ns.add_addr(&format!("{ip}/32"));
        }
        let ca = TestCa::new("upstream");
        let upstream = Registry::builder(SocketAddr::new(ip(UPSTREAM_IP), 443))
            .netns(&node.ns)
            .tls(&ca.leaf(PUBLIC_HOSTS))
            .start();
        let private = Registry::builder(SocketAddr::new(ip(PRIVATE_IP), 443))
            .netns(&node.ns)
            .server_name("quay.io")
            .tls(&ca.leaf(&["quay.io"]))
            .htpasswd(PRIVATE_USER, PRIVATE_PASSWORD)
            .start();
        let hub = Registry::builder(SocketAddr::new(ip(HUB_IP), 5000))
            .netns(&node.ns)
            .server_name("sealos.hub")
            .htpasswd(HUB_USER, HUB_PASSWORD)
            .start();
        let insecure = Registry::builder(SocketAddr::new(ip(INSECURE_IP), 80))
            .netns(&node.ns)
            .server_name("insecure.registry")
            .start();
        let site = Registry::builder(SocketAddr::new(ip(SITE_IP), 443))
            .netns(&node.ns)
            .server_name("site.example")
            .tls(&ca.leaf(&["site.example"]))
            .start();
        let (hub_password_file, mut proxy_env) =
            node.hub_env(&format!("http://{HUB_IP}:5000"), HUB_USER, HUB_PASSWORD);
        proxy_env.extend([
            (
                "PULLPROXY_TLS__EXTRA_UPSTREAM_CAS",
                format!("[{}]", ca.cert_path().display()),
            ),
            (
                "PULLPROXY_REGISTRIES__INSECURE",
                "[insecure.registry]".to_owned(),
            ),
            ("PULLPROXY_ADMIN__HUB_CHECK_INTERVAL", "200ms".to_owned()),
        ]);
        proxy_env.extend_from_slice(extra);
        let proxy = node.start_proxy_with_mounts(hosts(), &proxy_env);
        // Clients trust the node CA (pullproxy generated it at start) and the upstream CA (for
        // when they reach the upstream directly).
        let bundle = ca_bundle(
            &node.state().join("bundle.pem"),
            &[&node.node_ca_pem(), &ca.cert_pem()],
        );
        Self {
            proxy,
            insecure,
            site,
            hub,
            upstream,
            private,
            hub_password_file,
            bundle,
            proxy_env,
            ca,
            node,
        }
    }

    /// The certificate file of the CA that signed the fake upstreams (and the TLS site).
    pub fn upstream_ca_cert(&self) -> PathBuf {
        self.ca.cert_path()
    }

    /// A certificate for more fake upstream sites, from the CA pullproxy trusts.
    pub fn upstream_leaf(&self, names: &[&str]) -> Leaf {
        self.ca.leaf(names)
    }

    /// SIGKILL pullproxy (a crash): the kernel programs stay pinned, and with no listener they
    /// let connections go direct.
    pub fn kill_proxy(&mut self) {
        self.proxy.kill();
    }

    /// Starts a new pullproxy with the same configuration and state (node CA, cache, pins).
    pub fn restart_proxy(&mut self) {
        self.proxy.kill();
        self.proxy = self.node.start_proxy_with_mounts(hosts(), &self.proxy_env);
    }

    /// What a client on this node sees: the public names at the fake registries, and a CA
    /// bundle trusting the node CA and the upstream CA.
    pub fn client_mounts(&self) -> MountSpec {
        hosts().ca_bundle(&self.bundle)
    }

    /// Where a container runtime runs: the node's namespace and target cgroup, with
    /// [`World::client_mounts`].
    pub fn runtime_placement(&self) -> Placement {
        Placement::new()
            .netns(&self.node.ns)
            .cgroup(&self.node.runtime)
            .mounts(self.client_mounts())
    }

    /// skopeo as a container runtime would run it: in the target cgroup (so the kernel redirects
    /// it), resolving registry names to the test's addresses.
    pub fn skopeo(&self) -> Skopeo {
        Skopeo::new(self.runtime_placement())
    }

    /// A client talking to the proxy port directly as `registry-1.docker.io`.
    pub fn direct(&self) -> RegistryClient {
        RegistryClient::new(
            "registry-1.docker.io",
            "127.0.0.1:15443".parse().expect("addr"),
        )
        .netns(&self.node.ns)
        .tls(testca::client_config(&[&self.node.node_ca_pem()]))
        .anonymous()
        .timeout(Duration::from_secs(30))
    }

    /// `GET` a path of pullproxy's admin listener inside the node: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.node.admin_get(path)
    }

    /// `/metrics` in the classic text format, as curl gets it.
    pub fn scrape(&self) -> String {
        self.node.scrape()
    }

    /// The proxy's per-request log records ("pull") for a repository.
    pub fn pulls(&self, repository: &str) -> Vec<Value> {
        self.proxy.pulls(repository)
    }

    /// The sources of the `kind` (manifest, blob) records of `repository`.
    pub fn sources(&self, repository: &str, kind: &str) -> Vec<String> {
        sources(&self.pulls(repository), kind)
    }

    /// Waits until the log records of every request pullproxy has answered so far have been
    /// read. pullproxy counts a request in `pullproxy_requests_total` right before it writes the
    /// request's record, when the response body is done: when its end is polled, or when hyper
    /// drops it in the same poll that writes its last bytes (proxy/src/registry/respond.rs), so
    /// a client that has its responses finds its requests counted. The records reach this
    /// process through a pipe and a reader thread, which can lag behind on a loaded machine or
    /// in an emulated guest.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counted = sample(&self.scrape(), "pullproxy_requests_total{");
            let logged = self.proxy.all("pull").len();
            if logged as f64 >= counted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pullproxy counted {counted} requests but only {logged} records were read from \
                 its log within 60 s:\n{}",
                self.proxy.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sources of the `kind` records among `records`.
pub fn sources(records: &[Value], kind: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| r["source"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// /etc/hosts for clients and pullproxy: the public names at the fake Docker Hub, quay.io at the
/// private registry, sealos.hub at the hub.
pub fn hosts() -> MountSpec {
    MountSpec::new()
        .hosts(PUBLIC_HOSTS, ip(UPSTREAM_IP))
        .hosts(&["quay.io"], ip(PRIVATE_IP))
        .hosts(&["sealos.hub"], ip(HUB_IP))
        .hosts(&["insecure.registry"], ip(INSECURE_IP))
        .hosts(&["site.example"], ip(SITE_IP))
}
