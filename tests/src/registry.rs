//! Debian's `docker-registry` (CNCF distribution 2.8, the software of the sealos hub) as a test
//! server: its own storage, optional TLS and htpasswd auth, optional pull-through proxy mode, an
//! access log to count requests from, and stop/start to play an upstream going down.
//!
//! Facts about distribution 2.8.2 this relies on (checked here):
//! - the access log (Apache combined format) goes to stdout, the application log (JSON with
//!   `log.formatter: json`) to stderr; a request is logged when its handler returns;
//! - the htpasswd file is re-read when its modification time changes, so a password change
//!   needs no restart ([`Registry::set_password`]).

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{
    images::Digest,
    mountns::MountSpec,
    netns::NetNs,
    process::{Placement, Proc},
    registry_client::RegistryClient,
    testca::{Leaf, client_config},
};

/// The registry binary from Debian's `docker-registry` package.
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// The user agent of the harness's readiness probes; [`Registry::requests`] leaves them out.
const PROBE_AGENT: &str = "pullproxy-harness-readiness";

/// How long a registry may take to answer `/v2/` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Pull-through cache mode (`proxy:` in the config): the registry fetches what it lacks from
/// `url` and refuses pushes.
#[derive(Debug, Clone)]
pub struct RemoteProxy {
    /// `https://registry-1.docker.io`: resolved and trusted through the registry's own
    /// [`MountSpec`] (see [`RegistryBuilder::mounts`]).
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// How to start a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryBuilder {
    addr: SocketAddr,
    server_name: String,
    placement: Placement,
    tls: Option<Leaf>,
    auth: Option<Auth>,
    proxy: Option<RemoteProxy>,
}

/// How the registry authenticates clients.
#[derive(Debug, Clone)]
enum Auth {
    /// Basic auth against an htpasswd file holding `user`.
    Htpasswd { user: String, password: String },
}

impl RegistryBuilder {
    /// Runs the registry in `netns` (by default: in the test process's namespace).
    pub fn netns(mut self, netns: &NetNs) -> Self {
        self.placement = self.placement.netns(netns);
        self
    }

    /// The name clients use for it (SNI, `Host`; default `registry-1.docker.io`).
    pub fn server_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.server_name);
        self
    }

    /// Serves HTTPS with this certificate (its SANs must include the server name).
    pub fn tls(mut self, leaf: &Leaf) -> Self {
        self.tls = Some(leaf.clone());
        self
    }

    /// Requires basic auth for `user` (an htpasswd file made with `htpasswd -B`).
    pub fn htpasswd(mut self, user: &str, password: &str) -> Self {
        self.auth = Some(Auth::Htpasswd {
            user: user.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    /// Pull-through cache of another registry.
    pub fn proxy(mut self, remote: RemoteProxy) -> Self {
        self.proxy = Some(remote);
        self
    }

    /// A private mount namespace for the registry process (hosts and CAs for proxy mode).
    pub fn mounts(mut self, mounts: MountSpec) -> Self {
        self.placement = self.placement.mounts(mounts);
        self
    }

    /// Writes config, htpasswd and storage into a temp dir, starts the registry and waits until
    /// `/v2/` answers. Panics with the registry's log if it does not within 20 s.
    pub fn start(self) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("pp-registry-")
            .tempdir()
            .expect("temp dir for the registry");
        fs::create_dir(dir.path().join("storage")).expect("storage dir");
        let mut registry = Registry {
            proc: None,
            options: self,
            dir,
        };
        if let Some((user, password)) = registry.creds() {
            registry.write_htpasswd(user, password);
        }
        fs::write(registry.config_path(), registry.config_yaml()).expect("write registry config");
        registry.start();
        registry
    }
}

/// A running (or deliberately stopped) docker-registry; killed, and its storage removed, on drop.
pub struct Registry {
    // Drops first: the process dies before its directory goes.
    proc: Option<Proc>,
    options: RegistryBuilder,
    dir: TempDir,
}

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub method: String,
    /// Path and query, as requested.
    pub uri: String,
    pub status: u16,
    /// Response body bytes.
    pub bytes: u64,
    pub user_agent: String,
}

/// What a registry served of one blob: downloads (`GET`s answered 200 or 206, in any
/// repository) and the body bytes they carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobTraffic {
    pub requests: usize,
    pub bytes: u64,
}

impl AccessRecord {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// The blob this record downloaded (a `GET` of `/v2/<repo>/blobs/<digest>` answered with
    /// content), if it is one.
    pub fn blob_download(&self) -> Option<Digest> {
        if self.method != "GET" || !matches!(self.status, 200 | 206) {
            return None;
        }
        let (repo, digest) = self.path().strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
        if repo.is_empty() {
            return None;
        }
        Digest::parse(digest)
    }

    /// Parses a combined-log line:
    /// `10.0.0.1 - - [23/Nov/2026:18:31:57 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "curl/7.88.1"`.
    pub fn parse(line: &str) -> Option<Self> {
        let mut quoted = line.split('"');
        let _prefix = quoted.next()?;
        let request = quoted.next()?;
        let status_size = quoted.next()?;
        let _referer = quoted.next()?;
        let _gap = quoted.next()?;
        let user_agent = quoted.next()?.to_owned();
        let mut req = request.split(' ');
        let method = req.next()?.to_owned();
        let uri = req.next()?.to_owned();
        let mut ss = status_size.split_whitespace();
        let status = ss.next()?.parse().ok()?;
        let bytes = ss.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        Some(Self {
            method,
            uri,
            status,
            bytes,
            user_agent,
        })
    }
}

impl Registry {
    /// A registry listening on `addr`; see [`RegistryBuilder`].
    pub fn builder(addr: SocketAddr) -> RegistryBuilder {
        RegistryBuilder {
            addr,
            server_name: "registry-1.docker.io".to_owned(),
            placement: Placement::new(),
            tls: None,
            auth: None,
            proxy: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.options.addr
    }

    /// The registry process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn server_name(&self) -> &str {
        &self.options.server_name
    }

    /// `https://registry-1.docker.io` or `http://sealos.hub:5000`.
    pub fn url(&self) -> String {
        self.client().base_url()
    }

    /// A client for this registry, with its current credentials (if any) and TLS roots.
    pub fn client(&self) -> RegistryClient {
        let mut c = RegistryClient::new(&self.options.server_name, self.options.addr)
            .netns_path(self.options.placement.netns.clone());
        if let Some(leaf) = &self.options.tls {
            c = c.tls(client_config(&[&leaf.ca_pem]));
        }
        if let Some((user, password)) = self.creds() {
            c = c.creds(user, password);
        }
        c
    }

    /// The current credentials, if basic auth is on.
    pub fn creds(&self) -> Option<(&str, &str)> {
        match &self.options.auth {
            Some(Auth::Htpasswd { user, password }) => Some((user, password)),
            _ => None,
        }
    }

    /// The storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Replaces the password in the htpasswd file (atomically). distribution 2.8 re-reads the
    /// file when its mtime changes, so the running registry accepts only the new password from
    /// the next request on; no restart.
    pub fn set_password(&mut self, password: &str) {
        let user = self
            .creds()
            .map(|(u, _)| u.to_owned())
            .expect("set_password on a registry without htpasswd auth");
        self.write_htpasswd(&user, password);
        self.options.auth = Some(Auth::Htpasswd {
            user,
            password: password.to_owned(),
        });
    }

    /// Kills the registry (SIGKILL: the upstream is suddenly down). Storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the registry again on the same address and storage, and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "registry already running");
        let append = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .expect("registry log file")
        };
        let mut cmd = Command::new(DOCKER_REGISTRY);
        cmd.arg("serve")
            .arg(self.config_path())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(append("access.log"))
            .stderr(append("registry.log"));
        let started = Instant::now();
        self.proc = Some(Proc::spawn_at(cmd, &self.options.placement));
        let probe = self
            .client()
            .anonymous()
            .user_agent(PROBE_AGENT)
            .timeout(Duration::from_secs(2));
        loop {
            if let Ok(200 | 401) = probe.ping() {
                return;
            }
            let exited = self.proc.as_mut().is_some_and(Proc::exited);
            if exited || started.elapsed() > START_TIMEOUT {
                panic!(
                    "docker-registry on {} {} within {START_TIMEOUT:?}:\n{}",
                    self.options.addr,
                    if exited { "exited" } else { "did not answer" },
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stop, then start on the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// A fresh registry on the same address: stopped, its storage and access log emptied, and
    /// started again (configuration and credentials kept).
    pub fn reset(&mut self) {
        self.stop();
        let storage = self.storage();
        fs::remove_dir_all(&storage)
            .unwrap_or_else(|e| panic!("removing {}: {e}", storage.display()));
        fs::create_dir(&storage).expect("storage dir");
        self.clear_requests();
        self.start();
    }

    /// Whether the registry's storage holds the blob `digest` (committed, in any repository).
    pub fn stores(&self, digest: &Digest) -> bool {
        let hex = digest.hex();
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .exists()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }

    /// The application log (JSON lines), for panic messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Every request logged so far (readiness probes left out), oldest first.
    pub fn requests(&self) -> Vec<AccessRecord> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(AccessRecord::parse)
            .filter(|r| r.user_agent != PROBE_AGENT)
            .collect()
    }

    /// How many `method` requests for exactly `path` (query ignored) were logged.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path() == path)
            .count()
    }

    /// `GET`s of a blob that the registry answered with content (200 or 206).
    pub fn blob_fetches(&self, repo: &str, digest: &Digest) -> usize {
        let path = format!("/v2/{repo}/blobs/{digest}");
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path() == path && matches!(r.status, 200 | 206))
            .count()
    }

    /// Blob downloads logged so far, per digest: distribution's access log records each
    /// response's body bytes as written, so these are exact.
    pub fn blob_traffic(&self) -> BTreeMap<Digest, BlobTraffic> {
        let mut out = BTreeMap::<Digest, BlobTraffic>::new();
        for r in self.requests() {
            if let Some(digest) = r.blob_download() {
                let t = out.entry(digest).or_default();
                t.requests += 1;
                t.bytes += r.bytes;
            }
        }
        out
    }

    /// [`Self::blob_traffic`] of one blob.
    pub fn blob_served(&self, digest: &Digest) -> BlobTraffic {
        self.blob_traffic().remove(digest).unwrap_or_default()
    }

    /// Waits until the bytes logged for blob `digest` reach `at_least` (a request is logged
    /// when its handler returns, a moment after the client read the last byte); returns what
    /// was logged then, or at `timeout`.
    pub fn wait_blob_bytes(
        &self,
        digest: &Digest,
        at_least: u64,
        timeout: Duration,
    ) -> BlobTraffic {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.blob_served(digest);
            if t.bytes >= at_least || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until [`Self::count`] reaches `at_least` (the log line is written when the handler
    /// returns, a moment after the client saw the last byte); returns the final count.
    pub fn wait_count(
        &self,
        method: &str,
        path: &str,
        at_least: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count(method, path);
            if n >= at_least || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets the requests logged so far (the registry appends to the emptied file).
    pub fn clear_requests(&self) {
        fs::write(self.dir.path().join("access.log"), "").expect("truncate access log");
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn htpasswd_path(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    fn write_htpasswd(&self, user: &str, password: &str) {
        write_htpasswd(&self.htpasswd_path(), user, password);
    }

    fn config_yaml(&self) -> String {
        let o = &self.options;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut y = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: \"{addr}\"\n  secret: {secret:?}\n",
            storage = q(&self.storage()),
            addr = o.addr,
            secret = crate::unique("pp-registry-secret"),
        );
        if let Some(leaf) = &o.tls {
            y += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                q(&leaf.cert),
                q(&leaf.key)
            );
        }
        match &o.auth {
            Some(Auth::Htpasswd { .. }) => {
                y += &format!(
                    "auth:\n  htpasswd:\n    realm: pullproxy-test\n    path: {}\n",
                    q(&self.htpasswd_path())
                );
            }
            None => {}
        }
        if let Some(p) = &o.proxy {
            y += &format!("proxy:\n  remoteurl: {:?}\n", p.url);
            if let Some(u) = &p.username {
                y += &format!("  username: {u:?}\n");
            }
            if let Some(pw) = &p.password {
                y += &format!("  password: {pw:?}\n");
            }
        }
        y
    }
}

/// Replaces `path` (atomically) with an htpasswd file holding `user` with a bcrypt hash of
/// `password` (`htpasswd -B`, from apache2-utils).
pub fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let out = Command::new("htpasswd")
        .args(["-B", "-b", "-n", user, password])
        .output()
        .expect("run htpasswd (apache2-utils)");
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = path.with_extension("new");
    fs::write(&tmp, &out.stdout).expect("write htpasswd");
    fs::rename(&tmp, path).expect("replace htpasswd");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_parse() {
        let r = AccessRecord::parse(
            r#"10.204.0.1 - - [23/Nov/2026:18:31:57 +0000] "GET /v2/library/busybox/blobs/sha256:ab?x=1 HTTP/1.1" 206 87 "" "skopeo/1.9.3""#,
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path(), "/v2/library/busybox/blobs/sha256:ab");
        assert_eq!((r.status, r.bytes), (206, 87));
        assert_eq!(r.user_agent, "skopeo/1.9.3");
        assert_eq!(
            AccessRecord::parse(r#"::1 - - [x] "HEAD /v2/ HTTP/1.1" 200 - "" "ua""#)
                .unwrap()
                .bytes,
            0
        );
        assert!(AccessRecord::parse("garbage").is_none());
    }

    #[test]
    fn only_blob_gets_with_content_are_downloads() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let line = |method: &str, path: &str, status: u16| {
            AccessRecord::parse(&format!(
                r#"10.0.0.1 - - [x] "{method} {path} HTTP/1.1" {status} 10 "" "ua""#
            ))
            .unwrap()
        };
        let blob = format!("/v2/library/app/blobs/{digest}");
        assert_eq!(
            line("GET", &format!("{blob}?ns=docker.io"), 200).blob_download(),
            Digest::parse(&digest)
        );
        assert!(line("GET", &blob, 206).blob_download().is_some());
        assert!(line("HEAD", &blob, 200).blob_download().is_none());
        assert!(line("GET", &blob, 404).blob_download().is_none());
        assert!(line("GET", &blob, 307).blob_download().is_none());
        let manifest = format!("/v2/library/app/manifests/{digest}");
        assert!(line("GET", &manifest, 200).blob_download().is_none());
        assert!(
            line("GET", &format!("/v2/blobs/{digest}"), 200)
                .blob_download()
                .is_none()
        );
        assert!(
            line("GET", "/v2/app/blobs/sha256:short", 200)
                .blob_download()
                .is_none()
        );
    }
}
