//! Debian's `nginx` as a caching TLS reverse proxy in front of a registry, the way
//! docker-registry-proxy caches pulls: TLS terminated with a leaf for the registry's name, blob
//! responses stored in a `proxy_cache` keyed by the URI and shared between concurrent misses
//! with `proxy_cache_lock` (one upstream fetch, the others wait for the cache entry), everything
//! else (manifests, `/v2/`) passed through, over kept-alive, verified TLS connections to the
//! upstream. Used by the benchmarks as a peer of pullproxy.
//!
//! Checked on Debian 12's nginx 1.22 (what `nginx-light` installs): built with the SSL module and
//! the (default) proxy module, which holds `proxy_cache`.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{
    netns::NetNs,
    process::{Placement, Proc},
    registry_client::RegistryClient,
    testca::{Leaf, client_config},
};

/// The binary from Debian's `nginx` package (`nginx-light` depends on it).
pub const NGINX: &str = "/usr/sbin/nginx";

/// How long nginx may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start an [`NginxCache`].
#[derive(Debug, Clone)]
pub struct NginxBuilder {
    listen: SocketAddr,
    server_name: String,
    placement: Placement,
    tls: Option<Leaf>,
    upstream: Option<(SocketAddr, PathBuf)>,
}

impl NginxBuilder {
    /// Runs nginx in `netns`.
    pub fn netns(mut self, netns: &NetNs) -> Self {
        self.placement = self.placement.netns(netns);
        self
    }

    /// The registry name clients ask for, and the name verified on the upstream's certificate.
    pub fn server_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.server_name);
        self
    }

    /// The certificate served to clients (its SANs must include the server name).
    pub fn tls(mut self, leaf: &Leaf) -> Self {
        self.tls = Some(leaf.clone());
        self
    }

    /// The upstream registry (HTTPS at `addr`), verified against the CA file `ca`.
    pub fn upstream(mut self, addr: SocketAddr, ca: &Path) -> Self {
        self.upstream = Some((addr, ca.to_owned()));
        self
    }

    /// Writes the configuration, checks it with `nginx -t`, starts nginx and waits until it
    /// answers `/v2/`.
    pub fn start(self) -> NginxCache {
        let dir = tempfile::Builder::new()
            .prefix("pp-nginx-")
            .tempdir()
            .expect("temp dir for nginx");
        let mut nginx = NginxCache {
            proc: None,
            options: self,
            dir,
        };
        fs::create_dir_all(nginx.cache_dir()).expect("nginx cache dir");
        fs::write(nginx.config_path(), nginx.config()).expect("write nginx.conf");
        // `nginx -t` binds the listen address: it must run in the namespace that has it.
        let mut check = match &nginx.options.placement.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(NGINX);
                c
            }
            None => Command::new(NGINX),
        };
        let out = check
            .args(["-t", "-q", "-c"])
            .arg(nginx.config_path())
            .output()
            .expect("run nginx -t (install nginx-light)");
        assert!(
            out.status.success(),
            "nginx rejects its configuration:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            nginx.config()
        );
        nginx.start();
        nginx
    }
}

/// A running nginx; killed, and its cache removed, on drop.
pub struct NginxCache {
    proc: Option<Proc>,
    options: NginxBuilder,
    dir: TempDir,
}

impl NginxCache {
    /// nginx listening on `listen` (a TLS leaf and an upstream are required).
    pub fn builder(listen: SocketAddr) -> NginxBuilder {
        NginxBuilder {
            listen,
            server_name: "registry-1.docker.io".to_owned(),
            placement: Placement::new(),
            tls: None,
            upstream: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.options.listen
    }

    /// The master process (its workers are its children).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Where cached responses live.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The error log, for panic messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Stops nginx: SIGTERM (the master stops its workers and waits for them), and SIGKILL for
    /// any worker still there after that.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let workers = crate::process::children(p.pid());
            p.terminate();
            for w in workers {
                crate::process::kill(w);
            }
        }
    }

    /// Stop, empty the cache, start: the next request is a miss.
    pub fn restart_cold(&mut self) {
        self.stop();
        let cache = self.cache_dir();
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(&cache).expect("nginx cache dir");
        self.start();
    }

    /// Starts nginx in the foreground and waits until `/v2/` answers through it.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "nginx already running");
        let mut cmd = Command::new(NGINX);
        cmd.arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let started = Instant::now();
        self.proc = Some(Proc::spawn_at(cmd, &self.options.placement));
        let leaf = self.options.tls.as_ref().expect("nginx needs a TLS leaf");
        let probe = RegistryClient::new(&self.options.server_name, self.options.listen)
            .netns_path(self.options.placement.netns.clone())
            .tls(client_config(&[&leaf.ca_pem]))
            .timeout(Duration::from_secs(2));
        loop {
            if let Ok(200 | 401) = probe.ping() {
                return;
            }
            let exited = self.proc.as_mut().is_some_and(Proc::exited);
            if exited || started.elapsed() > START_TIMEOUT {
                panic!(
                    "nginx on {} {} within {START_TIMEOUT:?}:\n{}",
                    self.options.listen,
                    if exited { "exited" } else { "did not answer" },
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        let server = self.proxy_server();
        format!(
            r#"daemon off;
master_process on;
user root;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    keepalive_requests 100000;
{server}
}}
"#,
            // One per CPU this process may use, as `worker_processes auto` would be.
            workers = std::thread::available_parallelism().map_or(1, usize::from),
        )
    }

    /// The caching reverse proxy's `server` block.
    fn proxy_server(&self) -> String {
        let o = &self.options;
        let d = self.dir.path().display();
        let leaf = o.tls.as_ref().expect("nginx needs a TLS leaf");
        let (upstream, ca) = o.upstream.as_ref().expect("nginx needs an upstream");
        let name = &o.server_name;
        // Blob responses of any size are cached (the temp-file limit does not apply to cached
        // responses); waiting misses poll the lock, as nginx does, until the entry exists.
        format!(
            r#"    proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:16m max_size=64g inactive=30d use_temp_path=off;
    upstream registry {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen} ssl;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Host {name};
        proxy_set_header Connection "";
        proxy_ssl_server_name on;
        proxy_ssl_name {name};
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_session_reuse on;
        proxy_read_timeout 900s;
        location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
            proxy_pass https://registry;
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 30d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 900s;
            proxy_cache_lock_age 900s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie X-Accel-Expires;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
        location / {{
            proxy_pass https://registry;
            proxy_buffering off;
        }}
    }}"#,
            listen = o.listen,
            cert = leaf.cert.display(),
            key = leaf.key.display(),
            ca = ca.display(),
        )
    }
}

impl Drop for NginxCache {
    fn drop(&mut self) {
        self.stop();
    }
}
