//! Warm-up: fill this node's cache with images ahead of a rollout (not the runtime's image store).
//! A warm-up is a pull through pullproxy itself, as a client on this node would make it: it
//! connects to the proxy port with the registry's name, so the same policy (hub, node tier,
//! cache, upstream, the content rule, write-back) applies to it and nothing new is exposed.
//!
//! `pullproxy warm IMAGE...` runs one on demand (with credentials if given); `warm.images` in the
//! configuration is warmed by the daemon at start and whenever that list changes in the file
//! (anonymously: public images, and whatever the hub holds).

pub mod settings;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::BodyExt as _;
use tracing::{info, warn};

use self::settings::WarmSettings;
use crate::{
    accept::listen::ListenSettings,
    config::Layered,
    node_ca::TlsSettings,
    oci::{BearerChallenge, Digest, ImageRef, ManifestRefs, Reference, media_type},
    origins::client::{self, AddressPolicy, Connector, HttpClient, UpstreamClients},
    origins::upstream::{UpstreamError, fetch_token},
};

/// Deadline for one manifest or token exchange; blobs only need to keep flowing.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the daemon looks at its configuration file for a new `warm.images`.
const CONFIG_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Why warming an image failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("reading the node CA {path}: {reason}")]
    NodeCa { path: PathBuf, reason: String },
    #[error("{what}: {status}")]
    Status { what: String, status: StatusCode },
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    #[error("{0}: no manifest for this node's platform (linux/{1}) in the index")]
    NoPlatform(String, &'static str),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Progress of one image, for the command line or the log.
pub trait Progress: Send + Sync {
    fn step(&self, image: &ImageRef, message: &str);
}

/// Warms images through the proxy listening on this node.
pub struct Warmer {
    /// Clients that dial pullproxy's port for any registry name.
    to_proxy: UpstreamClients,
    proxy_addr: SocketAddr,
    /// For token services (dialled directly).
    tokens: HttpClient,
    insecure: Vec<String>,
    /// Basic credentials, for registries and token services that want them.
    basic: Option<HeaderValue>,
}

/// The pullproxy a warmer pulls through, from its loaded configuration
/// (`settings::Config` makes one).
pub struct Proxy<'a> {
    /// Its node CA, and the CAs it trusts upstream (token services are dialled directly).
    pub tls: &'a TlsSettings,
    /// Where it listens.
    pub listen: &'a ListenSettings,
    /// `upstream.connect_timeout`.
    pub connect_timeout: Duration,
    /// `registries.insecure`: registries spoken to in plain HTTP.
    pub insecure: &'a [String],
}

impl Warmer {
    /// A warmer for `proxy`, trusting its node CA (and the system roots, for token services);
    /// `basic` is `user:password` to authenticate with, if any.
    pub fn new(proxy: &Proxy<'_>, basic: Option<(&str, &str)>) -> Result<Self, WarmError> {
        let tls_settings = proxy.tls;
        let ca_path = tls_settings.ca_cert_path();
        // The node CA (pullproxy's port speaks for every registry with it), plus the roots
        // pullproxy trusts upstream (token services are dialled directly).
        let mut cas = tls_settings.extra_upstream_cas.clone();
        cas.push(ca_path.clone());
        let (tls, _) = crate::origins::tls::upstream_client_config(&cas, None).map_err(|e| {
            WarmError::NodeCa {
                path: ca_path,
                reason: crate::telemetry::error_chain(&e),
            }
        })?;
        let ip = proxy
            .listen
            .addresses
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .or_else(|| proxy.listen.addresses.first().copied())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let connect = proxy.connect_timeout;
        Ok(Warmer {
            to_proxy: UpstreamClients::new(Connector::new(
                tls.clone(),
                AddressPolicy::Any,
                connect,
            )),
            proxy_addr: SocketAddr::new(ip, proxy.listen.port),
            tokens: client::build(Connector::new(tls, AddressPolicy::Any, connect)),
            insecure: proxy.insecure.to_vec(),
            basic: basic.map(|(u, p)| basic_auth(u, p)),
        })
    }

    /// Pulls `image` through pullproxy: its manifest (this node's platform of an index) and every
    /// blob, read to the end so they are cached. Returns the blob bytes read.
    pub async fn warm(&self, image: &ImageRef, progress: &dyn Progress) -> Result<u64, WarmError> {
        let session = Session::new(self, image);
        let (top, body) = session.manifest(&image.reference).await?;
        let mut refs = ManifestRefs::parse(&body);
        if !refs.manifests().is_empty() {
            let arch = go_arch();
            let child = platform_child(&body, arch)
                .ok_or_else(|| WarmError::NoPlatform(image.to_string(), arch))?;
            progress.step(image, &format!("index {top}: linux/{arch} is {child}"));
            let (_, body) = session.manifest(&Reference::Digest(child)).await?;
            refs = ManifestRefs::parse(&body);
        }
        let blobs = refs.blobs();
        let mut total = 0;
        for (i, blob) in blobs.iter().enumerate() {
            let n = session.blob(blob).await?;
            total += n;
            progress.step(
                image,
                &format!("blob {}/{} {blob} ({})", i + 1, blobs.len(), mib(n)),
            );
        }
        progress.step(
            image,
            &format!("done: {} blob(s), {}", blobs.len(), mib(total)),
        );
        Ok(total)
    }
}

/// One image's requests: the registry's origin at pullproxy's port, and a token once one is
/// needed.
struct Session<'a> {
    warmer: &'a Warmer,
    client: HttpClient,
    base: String,
    repo: String,
    plain_http: bool,
    auth: tokio::sync::Mutex<Option<HeaderValue>>,
}

impl<'a> Session<'a> {
    fn new(warmer: &'a Warmer, image: &ImageRef) -> Self {
        let plain_http = warmer.insecure.iter().any(|e| {
            e.eq_ignore_ascii_case(&image.registry) || e.eq_ignore_ascii_case(image.host())
        });
        let scheme = if plain_http { "http" } else { "https" };
        Session {
            warmer,
            client: warmer
                .to_proxy
                .for_origin(image.host(), Some(warmer.proxy_addr)),
            base: format!("{scheme}://{}", image.registry),
            repo: image.repository.to_string(),
            plain_http,
            auth: tokio::sync::Mutex::new(None),
        }
    }

    /// A manifest by tag or digest: its digest and bytes.
    async fn manifest(&self, reference: &Reference) -> Result<(Digest, bytes::Bytes), WarmError> {
        let what = format!("{}/{}:{reference}", self.base, self.repo);
        let path = format!("/v2/{}/manifests/{reference}", self.repo);
        let resp = self.get(&path, true).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(WarmError::Status { what, status });
        }
        let announced = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = tokio::time::timeout(EXCHANGE_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| io_err(&what, "timed out"))?
            .map_err(|e| io_err(&what, &crate::telemetry::error_chain(&e)))?
            .to_bytes();
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(_) => announced.unwrap_or_else(|| Digest::sha256_of(&body)),
        };
        Ok((digest, body))
    }

    /// A blob, read to its end; its length.
    async fn blob(&self, digest: &Digest) -> Result<u64, WarmError> {
        let what = format!("{}/{}@{digest}", self.base, self.repo);
        let resp = self
            .get(&format!("/v2/{}/blobs/{digest}", self.repo), false)
            .await?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(WarmError::Status { what, status });
        }
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| io_err(&what, &crate::telemetry::error_chain(&e)))?;
            if let Some(data) = frame.data_ref() {
                n += data.len() as u64;
            }
        }
        Ok(n)
    }

    /// A GET through pullproxy; a 401 is answered once, with a token or basic credentials.
    async fn get(
        &self,
        path: &str,
        manifest: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, WarmError> {
        let first = self.send(path, manifest).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        let challenge = first
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default();
        let auth = match BearerChallenge::parse(&challenge) {
            Some(bearer) => fetch_token(
                &self.warmer.tokens,
                &bearer,
                self.plain_http,
                self.warmer.basic.clone(),
                EXCHANGE_TIMEOUT,
            )
            .await?
            .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()),
            None => self.warmer.basic.clone(),
        };
        let Some(mut auth) = auth else {
            return Ok(first);
        };
        auth.set_sensitive(true);
        *self.auth.lock().await = Some(auth);
        self.send(path, manifest).await
    }

    async fn send(
        &self,
        path: &str,
        manifest: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, WarmError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| io_err(path, &e.to_string()))?;
        let mut headers = HeaderMap::new();
        if manifest {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(media_type::MANIFEST_ACCEPT),
            );
        }
        if let Some(auth) = self.auth.lock().await.clone() {
            headers.insert(header::AUTHORIZATION, auth);
        }
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(client::empty())
            .expect("valid request");
        *req.headers_mut() = headers;
        tokio::time::timeout(EXCHANGE_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| io_err(path, "no answer in time"))?
            .map_err(|e| io_err(path, &crate::telemetry::error_chain(&e)))
    }
}

/// The child of an index for `linux/<arch>`.
fn platform_child(index: &[u8], arch: &str) -> Option<Digest> {
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Platform {
        os: String,
        architecture: String,
    }
    let index: Index = serde_json::from_slice(index).ok()?;
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .and_then(|m| m.digest.parse().ok())
}

/// This machine's architecture as OCI platforms name it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn basic_auth(user: &str, password: &str) -> HeaderValue {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut v = HeaderValue::from_str(&format!("Basic {token}")).expect("base64 is a header");
    v.set_sensitive(true);
    v
}

fn io_err(what: &str, reason: &str) -> WarmError {
    WarmError::Io {
        what: what.to_owned(),
        reason: reason.to_owned(),
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
}

/// Progress as log lines (the daemon).
struct Logged;

impl Progress for Logged {
    fn step(&self, image: &ImageRef, message: &str) {
        info!(image = %image, "warm: {message}");
    }
}

/// The daemon's warm-up: `images` now, then again whenever `warm.images` changes in the file at
/// `config_path` (checked every [`CONFIG_CHECK_EVERY`]).
pub(crate) async fn run_daemon(
    warmer: Arc<Warmer>,
    images: Vec<ImageRef>,
    config_path: Option<PathBuf>,
) {
    let mut current = images;
    warm_all(&warmer, &current).await;
    let Some(path) = config_path else {
        return;
    };
    let mut stamp = modified(&path);
    loop {
        tokio::time::sleep(CONFIG_CHECK_EVERY).await;
        let now = modified(&path);
        if now == stamp {
            continue;
        }
        stamp = now;
        let warm = Layered::load(Some(&path))
            .and_then(|file| file.owned(WarmSettings::try_from(&file.file.warm)));
        match warm {
            Ok(warm) if warm.images != current => {
                info!(images = warm.images.len(), "warm.images changed");
                current = warm.images;
                warm_all(&warmer, &current).await;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(path = %path.display(), error = %crate::telemetry::error_chain(&e), "cannot re-read the configuration for warm.images")
            }
        }
    }
}

async fn warm_all(warmer: &Warmer, images: &[ImageRef]) {
    for image in images {
        if let Err(e) = warmer.warm(image, &Logged).await {
            warn!(image = %image, error = %crate::telemetry::error_chain(&e), "warm: failed");
        }
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_for_this_platform_is_picked() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"manifests":[{{"digest":"{}","platform":{{"os":"linux","architecture":"arm64"}}}},{{"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}},{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        assert_eq!(
            platform_child(index.as_bytes(), "amd64")
                .unwrap()
                .to_string(),
            d('b')
        );
        assert_eq!(
            platform_child(index.as_bytes(), "arm64")
                .unwrap()
                .to_string(),
            d('a')
        );
        assert_eq!(platform_child(index.as_bytes(), "s390x"), None);
        assert_eq!(platform_child(b"{}", "amd64"), None);
    }
}
