//! The request policy, in-process: a real [`RegistryProxy`] and cache (in memory) against fakes of
//! the hub and of several upstream registries that hold public and private repositories, can be
//! down, or do not exist. Every row of the trust-boundary cases is here: other repositories, other
//! registries, made-up names, wrong and missing credentials, upstream up and down, HEAD, GET,
//! Range, and joining a download in flight.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::BodyExt as _;
use tokio::sync::Notify;

use super::{ConnContext, RegistryProxy};
use crate::{
    cache::Cache,
    config::WriteBackPolicy as Policy,
    oci::{Digest, Reference, RepositoryName, Route, media_type},
    origins::client::{self, BoxError, ProxyBody},
    origins::hub::{HubError, HubOutcome, MappingError},
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::{Origin, Small, UpstreamError},
    origins::writeback::{Jobs, WriteBack},
};

const ALICE: &str = "Basic YWxpY2U6d29uZGVybGFuZA=="; // alice:wonderland
const WRONG: &str = "Basic YWxpY2U6d3Jvbmc="; // alice:wrong

// ---------------------------------------------------------------------------------------------
// Fakes

/// One image: a manifest and its layers.
#[derive(Clone)]
struct Image {
    manifest: Bytes,
    digest: Digest,
    layers: Vec<Bytes>,
}

impl Image {
    fn new(name: &str, layer_sizes: &[usize]) -> Image {
        let layers: Vec<Bytes> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Bytes::from(
                    format!("{name}-layer-{i}-")
                        .bytes()
                        .cycle()
                        .take(*n)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let descs: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":{},"digest":"{}"}}"#,
                    l.len(),
                    Digest::sha256_of(l)
                )
            })
            .collect();
        let manifest = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","layers":[{}]}}"#,
            media_type::OCI_MANIFEST,
            descs.join(",")
        ));
        Image {
            digest: Digest::sha256_of(&manifest),
            manifest,
            layers,
        }
    }

    fn layer(&self, i: usize) -> Digest {
        Digest::sha256_of(&self.layers[i])
    }
}

#[derive(Default)]
struct Repo {
    /// `Authorization` the repository wants; `None`: public.
    password: Option<&'static str>,
    tags: HashMap<String, Digest>,
    manifests: HashMap<Digest, Bytes>,
    blobs: HashMap<Digest, Bytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    /// Connection refused: cannot be asked.
    Down,
    /// Answers 503 to everything.
    Failing,
}

#[derive(Default)]
struct FakeRegistry {
    repos: HashMap<String, Repo>,
    down: bool,
    failing: bool,
}

/// Upstream registries by authority; any other name does not resolve.
#[derive(Default)]
struct FakeUpstream {
    registries: Mutex<HashMap<String, FakeRegistry>>,
    /// Requests seen, as `METHOD authority path`.
    seen: Mutex<Vec<String>>,
    /// When set, blob GET bodies send their first byte and wait for this.
    gate: Mutex<Option<Arc<Notify>>>,
    /// Bodies served for these digests are corrupted (one byte flipped).
    corrupt: Mutex<Vec<Digest>>,
    /// Blob GETs that started sending a body.
    blob_gets: AtomicUsize,
}

impl FakeUpstream {
    fn push(
        &self,
        authority: &str,
        repo: &str,
        password: Option<&'static str>,
        tag: &str,
        image: &Image,
    ) {
        let mut regs = self.registries.lock().unwrap();
        let r = regs
            .entry(authority.to_owned())
            .or_default()
            .repos
            .entry(repo.to_owned())
            .or_default();
        r.password = password;
        r.tags.insert(tag.to_owned(), image.digest.clone());
        r.manifests
            .insert(image.digest.clone(), image.manifest.clone());
        for l in &image.layers {
            r.blobs.insert(Digest::sha256_of(l), l.clone());
        }
    }

    fn set(&self, authority: &str, state: State) {
        let mut regs = self.registries.lock().unwrap();
        let r = regs.entry(authority.to_owned()).or_default();
        r.down = state == State::Down;
        r.failing = state == State::Failing;
    }

    fn count(&self, what: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.contains(what))
            .count()
    }

    /// The registry's answer: status, headers, body (for GET), or why it cannot be asked.
    fn answer(
        &self,
        origin: &Origin,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(StatusCode, HeaderMap, Bytes), UpstreamError> {
        let authority = origin.authority.as_str();
        self.seen
            .lock()
            .unwrap()
            .push(format!("{method} {authority} {path}"));
        let regs = self.registries.lock().unwrap();
        let Some(reg) = regs.get(authority) else {
            return Err(UpstreamError::NoSuchHost {
                host: authority.to_owned(),
                reason: "does not resolve".into(),
            });
        };
        if reg.down {
            return Err(UpstreamError::Unreachable {
                host: authority.to_owned(),
                reason: "connection refused".into(),
            });
        }
        let mut h = HeaderMap::new();
        if reg.failing {
            return Ok((StatusCode::SERVICE_UNAVAILABLE, h, Bytes::new()));
        }
        let route = Route::parse(method, path).expect("the proxy only asks valid paths");
        let (name, found) = match &route {
            Route::Manifest { name, reference } => {
                let repo = reg.repos.get(name.as_str());
                let digest = match reference {
                    Reference::Tag(t) => repo.and_then(|r| r.tags.get(t.as_str()).cloned()),
                    Reference::Digest(d) => Some(d.clone()),
                };
                let body = digest
                    .as_ref()
                    .and_then(|d| repo.and_then(|r| r.manifests.get(d)).cloned());
                if let (Some(d), Some(_)) = (&digest, &body) {
                    h.insert("docker-content-digest", d.to_string().parse().unwrap());
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(media_type::OCI_MANIFEST),
                    );
                }
                (name.clone(), body)
            }
            Route::Blob { name, digest } => {
                let body = reg
                    .repos
                    .get(name.as_str())
                    .and_then(|r| r.blobs.get(digest))
                    .cloned();
                (name.clone(), body)
            }
            Route::Base | Route::TagsList { .. } | Route::Other => {
                return Ok((StatusCode::OK, h, Bytes::from_static(b"{}")));
            }
        };
        let wanted = reg.repos.get(name.as_str()).and_then(|r| r.password);
        if let Some(pw) = wanted
            && headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(pw.as_bytes())
        {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fake\""),
            );
            return Ok((StatusCode::UNAUTHORIZED, h, Bytes::new()));
        }
        match found {
            Some(body) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                Ok((StatusCode::OK, h, body))
            }
            None => Ok((StatusCode::NOT_FOUND, h, Bytes::new())),
        }
    }
}

impl UpstreamSource for FakeUpstream {
    async fn small(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Small, UpstreamError> {
        let (status, headers, body) = self.answer(origin, &method, path.path(), headers)?;
        Ok(Small {
            status,
            headers,
            body: if method == Method::HEAD {
                Bytes::new()
            } else {
                body
            },
        })
    }

    async fn blob(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (status, headers, mut body) = self.answer(origin, &method, path.path(), headers)?;
        if let Ok(Route::Blob { digest, .. }) = Route::parse(&method, path.path())
            && self.corrupt.lock().unwrap().contains(&digest)
            && !body.is_empty()
        {
            let mut v = body.to_vec();
            v[0] ^= 0xff;
            body = Bytes::from(v);
        }
        let gate = self.gate.lock().unwrap().clone();
        if status == StatusCode::OK {
            self.blob_gets.fetch_add(1, Ordering::SeqCst);
        }
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        tokio::spawn(async move {
            if body.is_empty() {
                return;
            }
            let _ = tx.send_data(body.slice(..1)).await;
            if let Some(gate) = gate {
                gate.notified().await;
            }
            let _ = tx.send_data(body.slice(1..)).await;
        });
        let mut resp = Response::new(rx.boxed_unsync());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    async fn forward(
        &self,
        origin: &Origin,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (status, headers, body) =
            self.answer(origin, req.method(), req.uri().path(), req.headers())?;
        let mut resp = Response::new(client::full(body));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    async fn readable_anonymously(
        &self,
        origin: &Origin,
        path: &PathAndQuery,
    ) -> Result<bool, UpstreamError> {
        let (status, _, _) = self.answer(origin, &Method::HEAD, path.path(), &HeaderMap::new())?;
        Ok(status.is_success())
    }
}

/// What a hub repository got by write-back: digest -> (media type, bytes).
type Pushed = HashMap<Digest, (String, Bytes)>;

/// The hub: `hub repository -> image`, up or down.
#[derive(Default)]
struct FakeHub {
    /// Hub repository -> (tag, image).
    repos: Mutex<HashMap<String, (String, Image)>>,
    down: std::sync::atomic::AtomicBool,
    url: Uri,
    /// Lookups seen, as `METHOD kind reference`.
    seen: Mutex<Vec<String>>,
    /// What was pushed into it: `hub repository` -> digest -> (media type, bytes).
    pushed: Mutex<HashMap<String, Pushed>>,
    /// Pushes refused (credentials without push rights).
    read_only: std::sync::atomic::AtomicBool,
}

impl FakeHub {
    fn put(&self, repo: &str, tag: &str, image: &Image) {
        self.repos
            .lock()
            .unwrap()
            .insert(repo.to_owned(), (tag.to_owned(), image.clone()));
    }

    fn count(&self, what: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.starts_with(what))
            .count()
    }
}

impl HubSource for FakeHub {
    fn url(&self) -> &Uri {
        &self.url
    }

    fn hub_repo(
        &self,
        _registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        Ok(repo.clone())
    }

    async fn lookup(
        &self,
        method: Method,
        hub_repo: &RepositoryName,
        kind: &str,
        reference: &str,
        _headers: HeaderMap,
    ) -> HubOutcome {
        self.seen
            .lock()
            .unwrap()
            .push(format!("{method} {kind} {reference}"));
        if self.down.load(Ordering::SeqCst) {
            return HubOutcome::Unreachable("hub down".into());
        }
        let Some((tag, image)) = self.repos.lock().unwrap().get(hub_repo.as_str()).cloned() else {
            return self.pushed_content(&method, hub_repo.as_str(), reference);
        };
        let mut headers = HeaderMap::new();
        let body = match kind {
            "manifests" if reference == tag || reference == image.digest.to_string() => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(media_type::OCI_MANIFEST),
                );
                headers.insert(
                    "docker-content-digest",
                    image.digest.to_string().parse().unwrap(),
                );
                Some(image.manifest.clone())
            }
            "blobs" => image
                .layers
                .iter()
                .find(|l| Digest::sha256_of(l).to_string() == reference)
                .cloned(),
            _ => None,
        };
        let Some(body) = body else {
            return HubOutcome::NotFound;
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut resp = Response::new(client::full(if method == Method::HEAD {
            Bytes::new()
        } else {
            body
        }));
        *resp.headers_mut() = headers;
        HubOutcome::Found(resp)
    }

    async fn has(&self, hub_repo: &str, _kind: &str, digest: &Digest) -> Result<bool, HubError> {
        self.reachable()?;
        Ok(self
            .pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .is_some_and(|r| r.contains_key(digest)))
    }

    async fn upload_blob(
        &self,
        hub_repo: &str,
        digest: &Digest,
        len: u64,
        body: ProxyBody,
    ) -> Result<(), HubError> {
        self.reachable()?;
        let bytes = body
            .collect()
            .await
            .map_err(|e| HubError::Unreachable(e.to_string()))?
            .to_bytes();
        if bytes.len() as u64 != len || Digest::compute(digest.algorithm(), &bytes) != *digest {
            return Err(HubError::Status {
                what: "a blob upload",
                status: StatusCode::BAD_REQUEST,
            });
        }
        self.store(hub_repo, digest, "application/octet-stream", bytes);
        Ok(())
    }

    async fn put_manifest(
        &self,
        hub_repo: &str,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), HubError> {
        self.reachable()?;
        // As distribution does: a manifest whose blobs are not there is refused.
        let missing = crate::oci::ManifestRefs::parse(&bytes)
            .digests()
            .into_iter()
            .any(|d| {
                !self
                    .pushed
                    .lock()
                    .unwrap()
                    .get(hub_repo)
                    .is_some_and(|r| r.contains_key(&d))
            });
        if missing {
            return Err(HubError::Status {
                what: "a manifest put",
                status: StatusCode::BAD_REQUEST,
            });
        }
        self.store(hub_repo, digest, media_type, bytes);
        Ok(())
    }
}

impl FakeHub {
    /// What write-back pushed, by digest, as a registry serves it.
    fn pushed_content(&self, method: &Method, hub_repo: &str, reference: &str) -> HubOutcome {
        let Ok(digest) = reference.parse::<Digest>() else {
            return HubOutcome::NotFound;
        };
        let found = self
            .pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .and_then(|r| r.get(&digest).cloned());
        let Some((media_type, bytes)) = found else {
            return HubOutcome::NotFound;
        };
        let mut resp = Response::new(client::full(if *method == Method::HEAD {
            Bytes::new()
        } else {
            bytes.clone()
        }));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        h.insert(header::CONTENT_TYPE, media_type.parse().unwrap());
        h.insert("docker-content-digest", digest.to_string().parse().unwrap());
        HubOutcome::Found(resp)
    }

    /// Blobs and manifests write-back put into `hub_repo`.
    fn pushed_to(&self, hub_repo: &str) -> Vec<Digest> {
        self.pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn reachable(&self) -> Result<(), HubError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(HubError::Unreachable("hub down".into()));
        }
        if self.read_only.load(Ordering::SeqCst) {
            return Err(HubError::Refused(StatusCode::FORBIDDEN));
        }
        Ok(())
    }

    fn store(&self, hub_repo: &str, digest: &Digest, media_type: &str, bytes: Bytes) {
        self.pushed
            .lock()
            .unwrap()
            .entry(hub_repo.to_owned())
            .or_default()
            .insert(digest.clone(), (media_type.to_owned(), bytes));
    }
}

// ---------------------------------------------------------------------------------------------
// The world

struct World {
    proxy: RegistryProxy<FakeHub, FakeUpstream>,
    up: Arc<FakeUpstream>,
    hub: Arc<FakeHub>,
    cache: Arc<Cache>,
}

/// What a client got.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    body: Bytes,
    headers: HeaderMap,
}

impl World {
    fn new() -> World {
        let up = Arc::new(FakeUpstream::default());
        let hub = Arc::new(FakeHub {
            url: "http://sealos.hub:5000".parse().unwrap(),
            ..FakeHub::default()
        });
        World::node(up, hub, None)
    }

    /// Another node of the same cluster: the same upstreams and hub, a cache of its own, and
    /// write-back with `policy` (jobs that wait retry quickly).
    fn node(up: Arc<FakeUpstream>, hub: Arc<FakeHub>, write_back: Option<(Policy, Jobs)>) -> World {
        let cache = Arc::new(Cache::in_memory(64 << 20));
        let mut proxy = RegistryProxy::new(
            Some(hub.clone()),
            up.clone(),
            cache.clone(),
            Duration::from_secs(30),
        );
        if let Some((policy, jobs)) = write_back {
            proxy = proxy.with_write_back(WriteBack::start_with(
                hub.clone(),
                cache.clone(),
                policy,
                jobs,
                1 << 30,
                Duration::from_millis(20),
            ));
        }
        World {
            proxy,
            up,
            hub,
            cache,
        }
    }

    fn with_write_back(policy: Policy) -> World {
        let w = World::new();
        World::node(w.up, w.hub, Some((policy, Jobs::in_memory())))
    }

    async fn get(&self, authority: &str, method: Method, path: &str, hdrs: &[(&str, &str)]) -> Got {
        let ctx = ConnContext {
            origin: Origin {
                scheme: Scheme::HTTPS,
                authority: Authority::try_from(authority).unwrap(),
                addr: None,
            },
            caller: None,
            label: authority.to_owned(),
            files: None,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(client::empty())
            .unwrap();
        for (k, v) in hdrs {
            req.headers_mut().append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let resp = self.proxy.handle(&ctx, req).await;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Got {
            status: parts.status,
            body,
            headers: parts.headers,
        }
    }

    async fn blob(&self, authority: &str, repo: &str, d: &Digest, hdrs: &[(&str, &str)]) -> Got {
        self.get(
            authority,
            Method::GET,
            &format!("/v2/{repo}/blobs/{d}"),
            hdrs,
        )
        .await
    }

    async fn manifest(&self, authority: &str, repo: &str, r: &str, hdrs: &[(&str, &str)]) -> Got {
        self.get(
            authority,
            Method::GET,
            &format!("/v2/{repo}/manifests/{r}"),
            hdrs,
        )
        .await
    }

    /// Pulls `repo:tag` of `authority` like a runtime: the manifest, then every layer.
    async fn pull(
        &self,
        authority: &str,
        repo: &str,
        tag: &str,
        image: &Image,
        auth: Option<&str>,
    ) {
        let hdrs: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let m = self.manifest(authority, repo, tag, &hdrs).await;
        assert_eq!(m.status, StatusCode::OK, "{authority}/{repo}:{tag}");
        assert_eq!(m.body, image.manifest);
        for (i, layer) in image.layers.iter().enumerate() {
            let b = self.blob(authority, repo, &image.layer(i), &hdrs).await;
            assert_eq!(b.status, StatusCode::OK, "{authority}/{repo} layer {i}");
            assert_eq!(&b.body, layer);
        }
    }
}

/// The world of the trust-boundary report: alice's private image on Docker Hub, pulled with her
/// credentials; a public image on quay.io, pulled anonymously; and a public image on Docker Hub.
struct Scene {
    w: World,
    secret: Image,
    open: Image,
    library: Image,
}

const HUB: &str = "registry-1.docker.io";
const QUAY: &str = "quay.io";

async fn scene() -> Scene {
    let w = World::new();
    let secret = Image::new("secret", &[3000, 70]);
    let open = Image::new("open", &[500]);
    let library = Image::new("library", &[800]);
    w.up.push(HUB, "alice/secret", Some(ALICE), "v1", &secret);
    w.up.push(QUAY, "pub/open", None, "v1", &open);
    w.up.push(HUB, "library/busybox", None, "latest", &library);
    w.pull(HUB, "alice/secret", "v1", &secret, Some(ALICE))
        .await;
    w.pull(QUAY, "pub/open", "v1", &open, None).await;
    w.pull(HUB, "library/busybox", "latest", &library, None)
        .await;
    Scene {
        w,
        secret,
        open,
        library,
    }
}

// ---------------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug)]
enum Creds {
    Anonymous,
    Owner,
    WrongPassword,
}

impl Creds {
    fn headers(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Creds::Anonymous => vec![],
            Creds::Owner => vec![("authorization", ALICE)],
            Creds::WrongPassword => vec![("authorization", WRONG)],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// 200 (or 206) with exactly the content's bytes (or range).
    Content,
    /// Anything but the content: this status.
    Status(u16),
}

/// One way of asking for a blob: method, headers, and the byte range it should get.
struct Ask {
    kind: &'static str,
    method: Method,
    headers: Vec<(&'static str, &'static str)>,
    range: Option<(usize, usize)>,
}

struct Row {
    what: &'static str,
    registry: &'static str,
    repo: &'static str,
    creds: Creds,
    upstream: State,
}

/// Every way of asking for alice's private layer (and manifest) that must fail, and the ways
/// that must work, upstream up, down and failing.
#[tokio::test]
async fn private_content_goes_only_to_entitled_clients_of_the_repository_that_holds_it() {
    use Creds::{Anonymous, Owner, WrongPassword};
    use State::*;
    let rows = [
        // The owner, upstream up: served (from the cache).
        (
            Row {
                what: "owner",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Up,
            },
            Want::Content,
        ),
        // Upstream up: the upstream's refusal goes back.
        (
            Row {
                what: "anonymous, same repo",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "wrong password, same repo",
                registry: HUB,
                repo: "alice/secret",
                creds: WrongPassword,
                upstream: Up,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "anonymous, a public repo of another registry",
                registry: QUAY,
                repo: "pub/open",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "owner's credentials, a public repo of another registry",
                registry: QUAY,
                repo: "pub/open",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "anonymous, a public repo of the same registry",
                registry: HUB,
                repo: "library/busybox",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "owner, a repo that does not hold it",
                registry: HUB,
                repo: "alice/other",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "a made-up name under a wildcard",
                registry: "a.b.gcr.io",
                repo: "x",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "a made-up name, owner's credentials",
                registry: "a.b.gcr.io",
                repo: "alice/secret",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        // Upstream down: only what is known counts. A client without credentials is sent the
        // registry's challenge (learned from an earlier 401), one with wrong ones 503.
        (
            Row {
                what: "owner, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Down,
            },
            Want::Content,
        ),
        (
            Row {
                what: "anonymous, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Down,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "wrong password, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: WrongPassword,
                upstream: Down,
            },
            Want::Status(503),
        ),
        (
            Row {
                what: "anonymous, public repo of another registry, that registry down",
                registry: QUAY,
                repo: "pub/open",
                creds: Anonymous,
                upstream: Down,
            },
            Want::Status(503),
        ),
        (
            Row {
                what: "owner, other repo, upstream down",
                registry: HUB,
                repo: "alice/other",
                creds: Owner,
                upstream: Down,
            },
            Want::Status(503),
        ),
        // Upstream failing (5xx) is the same as down.
        (
            Row {
                what: "owner, upstream failing",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Failing,
            },
            Want::Content,
        ),
        (
            Row {
                what: "anonymous, upstream failing",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Failing,
            },
            Want::Status(401),
        ),
    ];
    let s = scene().await;
    let layer = s.secret.layer(0);
    let layer_bytes = s.secret.layers[0].clone();
    for (row, want) in &rows {
        s.w.up.set(HUB, Up);
        s.w.up.set(QUAY, Up);
        if row.registry != "a.b.gcr.io" {
            s.w.up.set(row.registry, row.upstream);
        }
        let creds = row.creds.headers();
        let with_range = |r| [creds.clone(), vec![("range", r)]].concat();
        let cases = [
            Ask {
                kind: "GET",
                method: Method::GET,
                headers: creds.clone(),
                range: None,
            },
            Ask {
                kind: "HEAD",
                method: Method::HEAD,
                headers: creds.clone(),
                range: None,
            },
            Ask {
                kind: "Range",
                method: Method::GET,
                headers: with_range("bytes=100-"),
                range: Some((100, layer_bytes.len() - 1)),
            },
            Ask {
                kind: "closed Range",
                method: Method::GET,
                headers: with_range("bytes=5-9"),
                range: Some((5, 9)),
            },
        ];
        for Ask {
            kind,
            method,
            headers: hdrs,
            range,
        } in cases
        {
            let path = format!("/v2/{}/blobs/{layer}", row.repo);
            let got = s.w.get(row.registry, method.clone(), &path, &hdrs).await;
            let label = format!(
                "{} ({kind} of the private layer via {}/{})",
                row.what, row.registry, row.repo
            );
            match want {
                Want::Content => {
                    let (status, expect) = match (range, &method) {
                        (_, &Method::HEAD) => (StatusCode::OK, Bytes::new()),
                        (Some((a, b)), _) => {
                            (StatusCode::PARTIAL_CONTENT, layer_bytes.slice(a..=b))
                        }
                        (None, _) => (StatusCode::OK, layer_bytes.clone()),
                    };
                    assert_eq!(got.status, status, "{label}");
                    assert_eq!(got.body, expect, "{label}");
                }
                Want::Status(code) => {
                    assert_eq!(got.status.as_u16(), *code, "{label}");
                    assert!(
                        !got.body
                            .windows(32)
                            .any(|w| layer_bytes.windows(32).any(|l| l == w)),
                        "{label}: private bytes in the answer"
                    );
                }
            }
        }
        // The private manifest by digest, the same way.
        let got =
            s.w.manifest(row.registry, row.repo, &s.secret.digest.to_string(), &creds)
                .await;
        let label = format!(
            "{} (the private manifest via {}/{})",
            row.what, row.registry, row.repo
        );
        match want {
            Want::Content => {
                assert_eq!(got.status, StatusCode::OK, "{label}");
                assert_eq!(got.body, s.secret.manifest, "{label}");
            }
            Want::Status(code) => {
                assert_eq!(got.status.as_u16(), *code, "{label}");
                assert_ne!(got.body, s.secret.manifest, "{label}");
            }
        }
    }
}

#[tokio::test]
async fn the_cache_is_only_asked_about_when_the_facts_are_stale() {
    let s = scene().await;
    let layer = s.secret.layer(0);
    let private_head = format!("HEAD {HUB} /v2/alice/secret/blobs/{layer}");
    let public_head = format!("HEAD {QUAY} /v2/pub/open/blobs/");
    // A fresh approval: the owner's next pull is served without asking.
    let got =
        s.w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(s.w.up.count(&private_head), 0);
    // A public image, anonymously: the public mark is fresh, nothing is asked either.
    let got = s.w.blob(QUAY, "pub/open", &s.open.layer(0), &[]).await;
    assert_eq!(got.body, s.open.layers[0]);
    assert_eq!(s.w.up.count(&public_head), 0);
    // A client with other credentials is checked with the upstream, which refuses.
    let got =
        s.w.blob(HUB, "alice/secret", &layer, &[("authorization", WRONG)])
            .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.w.up.count(&private_head), 1);
}

#[tokio::test]
async fn public_images_are_served_to_anyone_when_the_upstream_is_down() {
    let s = scene().await;
    s.w.up.set(QUAY, State::Down);
    for creds in [Creds::Anonymous, Creds::Owner, Creds::WrongPassword] {
        let got =
            s.w.blob(QUAY, "pub/open", &s.open.layer(0), &creds.headers())
                .await;
        assert_eq!(got.status, StatusCode::OK, "{creds:?}");
        assert_eq!(got.body, s.open.layers[0]);
        let got = s.w.manifest(QUAY, "pub/open", "v1", &creds.headers()).await;
        assert_eq!(got.status, StatusCode::OK, "{creds:?}: the tag, stale");
        assert_eq!(got.body, s.open.manifest);
    }
    // The public blob is still not served under another repository or a made-up name.
    let got =
        s.w.blob(HUB, "library/busybox", &s.open.layer(0), &[])
            .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got =
        s.w.blob("x.gcr.io", "pub/open", &s.open.layer(0), &[])
            .await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn private_tags_are_served_stale_only_to_their_owner() {
    let s = scene().await;
    s.w.up.set(HUB, State::Down);
    let got =
        s.w.manifest(HUB, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, s.secret.manifest);
    for creds in [Creds::Anonymous, Creds::WrongPassword] {
        let got =
            s.w.manifest(HUB, "alice/secret", "v1", &creds.headers())
                .await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{creds:?}");
        assert_ne!(got.body, s.secret.manifest);
    }
    // The tag of another registry is never the same tag.
    s.w.up.set(QUAY, State::Down);
    let got =
        s.w.manifest(QUAY, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn joining_a_download_in_flight_needs_the_same_entitlement() {
    let w = World::new();
    let secret = Image::new("slow-secret", &[64 << 10]);
    w.up.push(HUB, "alice/secret", Some(ALICE), "v1", &secret);
    w.up.push(QUAY, "pub/open", None, "v1", &Image::new("o", &[10]));
    let layer = secret.layer(0);
    let gate = Arc::new(Notify::new());
    *w.up.gate.lock().unwrap() = Some(gate.clone());
    let w = Arc::new(w);
    // Alice's download starts and stalls after the first byte.
    let owner = {
        let w = w.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
                .await
        })
    };
    while !w.cache.blobs().in_flight(&layer) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // While it is in flight: the same digest for an anonymous client, another repository and a
    // wrong password is refused; it is never joined.
    let got = w.blob(HUB, "alice/secret", &layer, &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let got = w.blob(QUAY, "pub/open", &layer, &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got = w
        .blob(HUB, "alice/secret", &layer, &[("authorization", WRONG)])
        .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // Alice's second client joins it (no second download), and both get every byte.
    let second = {
        let w = w.clone();
        let layer = layer.clone();
        tokio::spawn(async move {
            w.blob(HUB, "alice/secret", &layer, &[("authorization", ALICE)])
                .await
        })
    };
    while w.cache.blobs().stats().joins == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.notify_one();
    for h in [owner, second] {
        let got = h.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, secret.layers[0]);
    }
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        1,
        "one upstream download"
    );
}

#[tokio::test]
async fn a_blob_cached_for_one_repository_is_served_to_another_only_once_its_upstream_confirms() {
    let w = World::new();
    let shared = Image::new("shared", &[900]);
    w.up.push(QUAY, "team/a", None, "v1", &shared);
    w.up.push(QUAY, "team/b", None, "v1", &shared);
    w.pull(QUAY, "team/a", "v1", &shared, None).await;
    // team/b also holds it upstream: confirmed by a HEAD, then served from the cache.
    let gets = w.up.blob_gets.load(Ordering::SeqCst);
    let got = w.blob(QUAY, "team/b", &shared.layer(0), &[]).await;
    assert_eq!(got.body, shared.layers[0]);
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        gets,
        "no second download"
    );
    assert!(
        w.cache
            .repos()
            .holds(QUAY, &"team/b".parse().unwrap(), &shared.layer(0))
    );
    // team/c does not: 404, and no link.
    let got = w.blob(QUAY, "team/c", &shared.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(
        !w.cache
            .repos()
            .holds(QUAY, &"team/c".parse().unwrap(), &shared.layer(0))
    );
}

#[tokio::test]
async fn public_marks_come_from_an_anonymous_probe_when_clients_send_credentials() {
    let w = World::new();
    let img = Image::new("tokened", &[100]);
    w.up.push(HUB, "library/nginx", None, "latest", &img);
    // Docker Hub's clients always send a (per-pull) token, even for public images.
    w.pull(HUB, "library/nginx", "latest", &img, Some("Bearer token-1"))
        .await;
    let repo: RepositoryName = "library/nginx".parse().unwrap();
    for _ in 0..1000 {
        if w.cache.repos().public_since(HUB, &repo).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        w.cache.repos().public_since(HUB, &repo).is_some(),
        "probed public"
    );
    // Upstream down, a new token: the public image is still served.
    w.up.set(HUB, State::Down);
    let got = w
        .blob(
            HUB,
            "library/nginx",
            &img.layer(0),
            &[("authorization", "Bearer token-2")],
        )
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, img.layers[0]);
}

#[tokio::test]
async fn a_private_repository_is_probed_private_and_new_tokens_get_nothing_offline() {
    let w = World::new();
    let img = Image::new("tok", &[100]);
    w.up.push(HUB, "alice/tok", Some("Bearer alice-1"), "v1", &img);
    w.pull(HUB, "alice/tok", "v1", &img, Some("Bearer alice-1"))
        .await;
    // Let the background probe run (it finds the repository private).
    for _ in 0..100 {
        if w.up.count(&format!("HEAD {HUB} /v2/alice/tok")) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let repo: RepositoryName = "alice/tok".parse().unwrap();
    assert_eq!(w.cache.repos().public_since(HUB, &repo), None);
    w.up.set(HUB, State::Down);
    let got = w
        .blob(
            HUB,
            "alice/tok",
            &img.layer(0),
            &[("authorization", "Bearer alice-2")],
        )
        .await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_repository_that_turns_private_loses_its_public_mark() {
    let s = scene().await;
    let repo: RepositoryName = "pub/open".parse().unwrap();
    assert!(s.w.cache.repos().public_since(QUAY, &repo).is_some());
    s.w.up.push(QUAY, "pub/open", Some(ALICE), "v1", &s.open);
    // Past the fresh window the upstream is asked again; here a digest never cached forces it.
    let got = s.w.manifest(QUAY, "pub/open", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.w.cache.repos().public_since(QUAY, &repo), None);
    s.w.up.set(QUAY, State::Down);
    // Not served: the registry's challenge instead (anonymous is not enough any more).
    let got = s.w.blob(QUAY, "pub/open", &s.open.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_ne!(got.body, s.open.layers[0]);
}

#[tokio::test]
async fn the_hub_answers_first_and_its_range_answers_are_kept() {
    let s = scene().await;
    let hub_img = Image::new("hubbed", &[1000]);
    s.w.hub.put("library/hubbed", "latest", &hub_img);
    s.w.up.set(HUB, State::Down);
    let layer = hub_img.layer(0);
    let got = s.w.manifest(HUB, "library/hubbed", "latest", &[]).await;
    assert_eq!(got.body, hub_img.manifest);
    let got = s.w.blob(HUB, "library/hubbed", &layer, &[]).await;
    assert_eq!(got.body, hub_img.layers[0]);
    let got =
        s.w.blob(HUB, "library/hubbed", &layer, &[("range", "bytes=10-19")])
            .await;
    assert_eq!(
        (got.status, got.body.clone()),
        (StatusCode::PARTIAL_CONTENT, hub_img.layers[0].slice(10..20))
    );
    // Unsatisfiable: the hub's 416 goes back (it was a 503 when 416 counted as a miss).
    let got =
        s.w.blob(
            HUB,
            "library/hubbed",
            &layer,
            &[("range", "bytes=999999999999-")],
        )
        .await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Invalid: ignored, the whole blob (RFC 9110).
    for bad in ["bytes=50-2", "bytes=abc", "items=1-2", "bytes=1-2,4-5"] {
        let got =
            s.w.blob(HUB, "library/hubbed", &layer, &[("range", bad)])
                .await;
        assert_eq!(
            (got.status, got.body.len()),
            (StatusCode::OK, 1000),
            "{bad}"
        );
    }
    // From the cache the same way.
    s.w.up.set(HUB, State::Up);
    let l = s.library.layer(0);
    let got =
        s.w.blob(HUB, "library/busybox", &l, &[("range", "bytes=999999-")])
            .await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(got.headers[header::CONTENT_RANGE], "bytes */800");
    let got =
        s.w.blob(HUB, "library/busybox", &l, &[("range", "bytes=50-2")])
            .await;
    assert_eq!((got.status, got.body.len()), (StatusCode::OK, 800));
    // Hub down: the cache and upstream as usual.
    s.w.hub.down.store(true, Ordering::SeqCst);
    let got = s.w.blob(HUB, "library/busybox", &l, &[]).await;
    assert_eq!(got.body, s.library.layers[0]);
}

#[tokio::test]
async fn corrupt_blobs_and_manifests_are_never_cached_or_linked() {
    let w = World::new();
    let img = Image::new("bad", &[4000]);
    w.up.push(QUAY, "x/bad", None, "v1", &img);
    w.up.corrupt.lock().unwrap().push(img.layer(0));
    let got = w.blob(QUAY, "x/bad", &img.layer(0), &[]).await;
    assert_ne!(got.body, img.layers[0]);
    // The outcome settles in the background; then nothing is cached.
    for _ in 0..200 {
        if w.cache.blobs().lookup(&img.layer(0)).await.is_none()
            && !w.cache.blobs().in_flight(&img.layer(0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(w.cache.blobs().lookup(&img.layer(0)).await, None);
    // Upstream fixed: served whole.
    w.up.corrupt.lock().unwrap().clear();
    let got = w.blob(QUAY, "x/bad", &img.layer(0), &[]).await;
    assert_eq!(got.body, img.layers[0]);

    // A manifest asked for by a sha512 digest that its bytes do not have: 502, nothing cached.
    let wrong = Digest::compute(crate::oci::Algorithm::Sha512, b"something else");
    {
        let mut regs = w.up.registries.lock().unwrap();
        let repo = regs.get_mut(QUAY).unwrap().repos.get_mut("x/bad").unwrap();
        repo.manifests.insert(wrong.clone(), img.manifest.clone());
    }
    let got = w.manifest(QUAY, "x/bad", &wrong.to_string(), &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(w.cache.manifests().get(&wrong).await.is_none());
}

#[tokio::test]
async fn malformed_requests_are_refused_before_anything_is_asked() {
    let w = World::new();
    for path in [
        "/v2/../etc/blobs/sha256:00",
        "/v2/x/blobs/sha256:zz",
        "/v2/UPPER/manifests/latest",
        "/v2/x/manifests/bad%20tag",
        "/v2/x/blobs/md5:abcd",
    ] {
        let got = w.get(QUAY, Method::GET, path, &[]).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert_eq!(w.up.seen.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_no_registry() {
    let w = World::new();
    let got = w.get("nowhere.gcr.io", Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got = w.manifest("nowhere.gcr.io", "x", "latest", &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    // Compared with a registry that is only down: /v2/ is answered locally.
    w.up.set(QUAY, State::Down);
    let got = w.get(QUAY, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn offline_a_client_without_credentials_is_sent_the_registrys_challenge() {
    let s = scene().await;
    // An anonymous request taught pullproxy the registry's challenge.
    let got = s.w.manifest(HUB, "alice/secret", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    s.w.up.set(HUB, State::Down);
    // /v2/ and the private tag: the challenge, so the client authenticates...
    let got = s.w.get(HUB, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        got.headers[header::WWW_AUTHENTICATE],
        "Basic realm=\"fake\""
    );
    let got = s.w.manifest(HUB, "alice/secret", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let got = s.w.blob(HUB, "alice/secret", &s.secret.layer(0), &[]).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    // ...and then gets what its credentials were approved for.
    let got =
        s.w.get(HUB, Method::GET, "/v2/", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.status, StatusCode::OK);
    let got =
        s.w.manifest(HUB, "alice/secret", "v1", &[("authorization", ALICE)])
            .await;
    assert_eq!(got.body, s.secret.manifest);
    // Public content needs no credentials, and registries that never challenged say so.
    let got =
        s.w.blob(HUB, "library/busybox", &s.library.layer(0), &[])
            .await;
    assert_eq!(got.body, s.library.layers[0]);
    s.w.up.set(QUAY, State::Down);
    let got = s.w.get(QUAY, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[test]
fn bearer_challenges_are_rescoped_to_the_repository_asked_for() {
    let rule = super::content::ContentRule::new(
        Arc::new(Cache::in_memory(1 << 20)),
        Arc::new(FakeUpstream::default()),
    );
    let mut h = HeaderMap::new();
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#,
        ),
    );
    rule.learn_challenge(HUB, StatusCode::UNAUTHORIZED, &h);
    let repo: RepositoryName = "library/nginx".parse().unwrap();
    assert_eq!(
        rule.challenge(HUB, Some(&repo)).unwrap(),
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#
    );
    assert_eq!(rule.challenge(QUAY, Some(&repo)), None);
    // Only 401s teach a challenge.
    rule.learn_challenge(QUAY, StatusCode::FORBIDDEN, &h);
    assert_eq!(rule.challenge(QUAY, None), None);
}

#[tokio::test]
async fn the_node_keeps_what_the_hub_served_and_serves_it_when_the_hub_is_down() {
    let w = World::new();
    let img = Image::new("tiered", &[2000, 300]);
    w.hub.put("library/tiered", "v1", &img);
    // The upstream does not have it at all: every byte comes from the hub, then this node.
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    assert_eq!(
        w.hub.count("GET blobs"),
        2,
        "each layer fetched from the hub once"
    );
    // Again: the tag is asked of the hub (it is authoritative), the layers come from disk.
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    assert_eq!(w.hub.count("GET blobs"), 2);
    assert_eq!(w.hub.count("GET manifests v1"), 2);
    // The hub down (and no upstream): everything pulled before still pulls.
    w.hub.down.store(true, Ordering::SeqCst);
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    let got = w
        .manifest(HUB, "library/tiered", &img.digest.to_string(), &[])
        .await;
    assert_eq!(got.body, img.manifest);
    let got = w
        .blob(
            HUB,
            "library/tiered",
            &img.layer(0),
            &[("range", "bytes=1000-")],
        )
        .await;
    assert_eq!(
        (got.status, got.body.clone()),
        (StatusCode::PARTIAL_CONTENT, img.layers[0].slice(1000..))
    );
    assert!(
        w.up.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.contains("/blobs/"))
    );
    // Not under another repository, nor a tag the hub never served.
    let got = w.blob(HUB, "library/other", &img.layer(0), &[]).await;
    assert_ne!(got.status, StatusCode::OK);
    let got = w.manifest(HUB, "library/tiered", "v2", &[]).await;
    assert_ne!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn a_tag_repushed_to_the_hub_is_served_on_the_next_pull() {
    let w = World::new();
    let (one, two) = (Image::new("one", &[100]), Image::new("two", &[200]));
    w.hub.put("team/app", "stable", &one);
    w.pull(HUB, "team/app", "stable", &one, None).await;
    w.hub.put("team/app", "stable", &two);
    w.pull(HUB, "team/app", "stable", &two, None).await;
    // With the hub gone, the tag is where the hub last said.
    w.hub.down.store(true, Ordering::SeqCst);
    let got = w.manifest(HUB, "team/app", "stable", &[]).await;
    assert_eq!(got.body, two.manifest);
}

#[tokio::test]
async fn many_clients_of_a_hub_blob_cost_the_hub_one_download() {
    let w = Arc::new(World::new());
    let img = Image::new("popular", &[256 << 10]);
    w.hub.put("library/popular", "v1", &img);
    let layer = img.layer(0);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (w, layer) = (w.clone(), layer.clone());
            tokio::spawn(async move { w.blob(HUB, "library/popular", &layer, &[]).await })
        })
        .collect();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.body, img.layers[0]);
    }
    assert_eq!(w.hub.count("GET blobs"), 1);
}

#[tokio::test]
async fn a_corrupt_hub_manifest_is_refused() {
    let w = World::new();
    let img = Image::new("liar", &[10]);
    let mut liar = img.clone();
    liar.manifest = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
    w.hub.put("x/liar", "v1", &liar);
    // The hub announces the original digest for other bytes.
    let got = w.manifest(HUB, "x/liar", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(w.cache.manifests().get(&img.digest).await.is_none());
}

/// Waits until `hub_repo` of the fake hub holds every one of `digests`.
async fn pushed(hub: &FakeHub, hub_repo: &str, digests: &[Digest]) {
    for _ in 0..2000 {
        let there = hub.pushed_to(hub_repo);
        if digests.iter().all(|d| there.contains(d)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{hub_repo} never got all of {digests:?}: {:?}",
        hub.pushed_to(hub_repo)
    );
}

#[tokio::test]
async fn a_public_image_from_upstream_is_written_back_and_the_next_node_gets_hub_hits() {
    let w = World::with_write_back(Policy::Public);
    let img = Image::new("wb", &[3000, 500]);
    w.up.push(HUB, "library/wb", None, "v1", &img);
    w.pull(HUB, "library/wb", "v1", &img, None).await;
    let all = [img.layer(0), img.layer(1), img.digest.clone()];
    pushed(&w.hub, "library/wb", &all).await;
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 2);
    // Another node: the tag is still asked of the upstream (tags are not written back), the
    // manifest and every layer come from the hub.
    let other = World::node(w.up.clone(), w.hub.clone(), None);
    let hub_gets = w.hub.count("GET blobs");
    other.pull(HUB, "library/wb", "v1", &img, None).await;
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        2,
        "no upstream blob download"
    );
    assert_eq!(
        w.hub.count("GET blobs"),
        hub_gets + 2,
        "both layers from the hub"
    );
}

#[tokio::test]
async fn private_images_are_written_back_only_with_all() {
    for (policy, expect) in [(Policy::Public, false), (Policy::All, true)] {
        let w = World::with_write_back(policy);
        let img = Image::new("secret-wb", &[700]);
        w.up.push(HUB, "alice/wb", Some(ALICE), "v1", &img);
        w.pull(HUB, "alice/wb", "v1", &img, Some(ALICE)).await;
        if expect {
            pushed(&w.hub, "alice/wb", &[img.layer(0), img.digest.clone()]).await;
        } else {
            // The job ends (skipped) without a byte pushed.
            for _ in 0..400 {
                if w.proxy.write_back.as_ref().unwrap().pending() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(w.proxy.write_back.as_ref().unwrap().pending(), 0);
            assert!(w.hub.pushed_to("alice/wb").is_empty(), "{policy:?}");
        }
    }
}

#[tokio::test]
async fn a_job_waits_for_blobs_still_being_pulled() {
    let w = World::with_write_back(Policy::Public);
    let img = Image::new("slowpull", &[900, 100]);
    w.up.push(QUAY, "x/slow", None, "v1", &img);
    // Only the manifest so far: nothing can be pushed (never a manifest without its blobs).
    let got = w.manifest(QUAY, "x/slow", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(w.hub.pushed_to("x/slow").is_empty());
    // The client goes on with the layers: then it all goes in.
    for i in 0..2 {
        w.blob(QUAY, "x/slow", &img.layer(i), &[]).await;
    }
    pushed(
        &w.hub,
        "x/slow",
        &[img.layer(0), img.layer(1), img.digest.clone()],
    )
    .await;
}

#[tokio::test]
async fn a_hub_that_refuses_pushes_never_fails_a_pull() {
    let w = World::with_write_back(Policy::All);
    w.hub.read_only.store(true, Ordering::SeqCst);
    let img = Image::new("ro", &[400]);
    w.up.push(QUAY, "x/ro", None, "v1", &img);
    w.pull(QUAY, "x/ro", "v1", &img, None).await;
    w.pull(QUAY, "x/ro", "v1", &img, None).await;
    assert!(w.hub.pushed_to("x/ro").is_empty());
}

#[tokio::test]
async fn an_index_goes_in_only_with_every_platform_and_the_held_ones_go_in_anyway() {
    let w = World::with_write_back(Policy::Public);
    let (amd, arm) = (Image::new("amd", &[300]), Image::new("arm", &[310]));
    let index = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":{}}},{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
        media_type::OCI_INDEX,
        media_type::OCI_MANIFEST,
        amd.digest,
        amd.manifest.len(),
        media_type::OCI_MANIFEST,
        arm.digest,
        arm.manifest.len()
    ));
    let index_digest = Digest::sha256_of(&index);
    w.up.push(QUAY, "multi/app", None, "amd", &amd);
    w.up.push(QUAY, "multi/app", None, "arm", &arm);
    {
        let mut regs = w.up.registries.lock().unwrap();
        let repo = regs
            .get_mut(QUAY)
            .unwrap()
            .repos
            .get_mut("multi/app")
            .unwrap();
        repo.manifests.insert(index_digest.clone(), index.clone());
        repo.tags.insert("v1".into(), index_digest.clone());
    }
    // This node is amd64: the index, then its platform's manifest and layer.
    let got = w.manifest(QUAY, "multi/app", "v1", &[]).await;
    assert_eq!(got.body, index);
    w.manifest(QUAY, "multi/app", &amd.digest.to_string(), &[])
        .await;
    w.blob(QUAY, "multi/app", &amd.layer(0), &[]).await;
    pushed(&w.hub, "multi/app", &[amd.layer(0), amd.digest.clone()]).await;
    // The arm platform was never on this node: the index must not be in the hub (it would be an
    // image whose arm manifest is missing).
    for _ in 0..400 {
        if w.proxy.write_back.as_ref().unwrap().pending() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let there = w.hub.pushed_to("multi/app");
    assert!(!there.contains(&index_digest), "{there:?}");
    assert!(!there.contains(&arm.digest));
}

#[tokio::test]
async fn jobs_survive_a_restart_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let w = World::new();
    let img = Image::new("restart", &[600]);
    w.up.push(QUAY, "x/restart", None, "v1", &img);
    w.hub.down.store(true, Ordering::SeqCst);
    // Node one pulls with the hub down: the job stays in its records.
    let cache = Arc::new(
        Cache::open(&crate::cache::CacheSettings {
            dir: dir.path().into(),
            max_bytes: 64 << 20,
        })
        .await
        .unwrap(),
    );
    {
        let proxy = RegistryProxy::new(
            Some(w.hub.clone()),
            w.up.clone(),
            cache.clone(),
            Duration::from_secs(30),
        )
        .with_write_back(WriteBack::start_with(
            w.hub.clone(),
            cache.clone(),
            Policy::Public,
            Jobs::open(dir.path()).unwrap(),
            1 << 30,
            Duration::from_secs(3600),
        ));
        let node = World {
            proxy,
            up: w.up.clone(),
            hub: w.hub.clone(),
            cache: cache.clone(),
        };
        node.pull(QUAY, "x/restart", "v1", &img, None).await;
    }
    assert!(w.hub.pushed_to("x/restart").is_empty());
    // "Restart": a new write-back over the same records, the hub back.
    w.hub.down.store(false, Ordering::SeqCst);
    let _wb = WriteBack::start_with(
        w.hub.clone(),
        cache,
        Policy::Public,
        Jobs::open(dir.path()).unwrap(),
        1 << 30,
        Duration::from_millis(20),
    );
    pushed(&w.hub, "x/restart", &[img.layer(0), img.digest.clone()]).await;
}
