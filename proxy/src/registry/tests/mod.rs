//! The request policy, in-process: a real [`RegistryProxy`] and cache (in memory) against fakes of
//! the hub and of several upstream registries that hold public and private repositories, can be
//! down, or do not exist. Every row of the trust-boundary cases is here: other repositories, other
//! registries, made-up names, wrong and missing credentials, upstream up and down, HEAD, GET,
//! Range, and joining a download in flight.
//!
//! Shared set-up lives here (the [`World`] of one node, the trust-boundary [`Scene`]) and in the
//! fakes' modules; the tests are grouped by theme.

mod access;
mod chain;
mod entitlement;
mod fake_hub;
mod fake_upstream;
mod hub;
mod malformed;
mod origins;
mod upstream;
mod writeback;

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

use self::{
    fake_hub::FakeHub,
    fake_upstream::{FakeUpstream, Image, State},
};
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
    /// What arrived of the body (all of it unless `truncated`).
    body: Bytes,
    headers: HeaderMap,
    /// The body ended in an error: the client saw a broken response.
    truncated: bool,
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
        send(&self.proxy, https(authority), method, path, hdrs).await
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
        pull(&self.proxy, &https(authority), repo, tag, image, auth).await;
    }
}

/// The origin of a client's connection to `authority` on port 443.
/// Polls `done` until it holds. Something the proxy does in the background is waited for
/// this way: a minute is plenty on a busy machine, and a wait that never ends is a failure
/// naming `what`, not a hung test.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn https(authority: &str) -> Origin {
    Origin {
        scheme: Scheme::HTTPS,
        authority: Authority::try_from(authority).unwrap(),
        addr: None,
    }
}

/// Pulls `repo:tag` through `proxy` like a runtime: the manifest, then every layer; each must
/// be exactly `image`'s.
async fn pull<H: HubSource, U: UpstreamSource>(
    proxy: &RegistryProxy<H, U>,
    origin: &Origin,
    repo: &str,
    tag: &str,
    image: &Image,
    auth: Option<&str>,
) {
    let hdrs: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let at = &origin.authority;
    let path = format!("/v2/{repo}/manifests/{tag}");
    let m = send(proxy, origin.clone(), Method::GET, &path, &hdrs).await;
    assert_eq!(m.status, StatusCode::OK, "{at}/{repo}:{tag}");
    assert_eq!(m.body, image.manifest);
    for (i, layer) in image.layers.iter().enumerate() {
        let path = format!("/v2/{repo}/blobs/{}", image.layer(i));
        let b = send(proxy, origin.clone(), Method::GET, &path, &hdrs).await;
        assert_eq!(b.status, StatusCode::OK, "{at}/{repo} layer {i}");
        assert_eq!(&b.body, layer);
    }
}

/// One request to `proxy` on a connection to `origin`, as a client sends it; the whole answer.
async fn send<H: HubSource, U: UpstreamSource>(
    proxy: &RegistryProxy<H, U>,
    origin: Origin,
    method: Method,
    path: &str,
    hdrs: &[(&str, &str)],
) -> Got {
    let ctx = ConnContext {
        label: origin.authority.to_string(),
        origin,
        caller: None,
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
    let resp = proxy.handle(&ctx, req).await;
    let (parts, mut body) = resp.into_parts();
    let (mut bytes, mut truncated) = (bytes::BytesMut::new(), false);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Err(_) => {
                truncated = true;
                break;
            }
        }
    }
    Got {
        status: parts.status,
        body: bytes.freeze(),
        headers: parts.headers,
        truncated,
    }
}

/// The sum of `proxy`'s samples whose line (`name{labels}`, without the `pullproxy_` prefix)
/// starts with `name` and holds every one of `labels`: what the request log and `/metrics` say
/// about where answers came from.
fn metric<H: HubSource, U: UpstreamSource>(
    proxy: &RegistryProxy<H, U>,
    name: &str,
    labels: &[&str],
) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    proxy.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.starts_with(name) && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// How many `kind` requests (`manifest`, `blob`) `proxy` answered from `source` (`hub`, `node`,
/// `cache`, `stale`, `upstream`, `local`).
fn served<H: HubSource, U: UpstreamSource>(
    proxy: &RegistryProxy<H, U>,
    kind: &str,
    source: &str,
) -> u64 {
    let labels = [format!("kind=\"{kind}\""), format!("source=\"{source}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    metric(proxy, "requests_total{", &labels) as u64
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

/// Who asks: nobody, alice, or alice with a wrong password.
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
