//! The source chain's own decisions ([`crate::registry::chain`]), in-process against tiny fakes of the hub
//! and the upstream: once through a scripted [`Content`] that records which tiers were consulted,
//! and once through both real kinds, which must meet the tiers in the same order.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::BodyExt as _;

use super::until;
use crate::registry::{
    ConnContext, RegistryProxy,
    chain::{Answer, Content, Failure, Pull, Stale},
    served::Source,
    small_response,
};
use crate::{
    cache::Cache,
    oci::{Digest, Reference, RepositoryName, media_type},
    origins::client::{self, ProxyBody},
    origins::hub::{HubError, HubOutcome, MappingError},
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::{Origin, Small, UpstreamError},
};

const REGISTRY: &str = "quay.test";
const REPO: &str = "team/app";
const ALICE: &str = "Basic YWxpY2U6d29uZGVybGFuZA=="; // alice:wonderland
const BOB: &str = "Basic Ym9iOmJ1aWxkZXI="; // bob:builder

// ---------------------------------------------------------------------------------------------
// Fakes

/// The hub: content by reference, up or down; counts its lookups.
#[derive(Default)]
struct Hub {
    content: Mutex<HashMap<String, (&'static str, Bytes)>>,
    down: AtomicBool,
    lookups: AtomicUsize,
    url: Uri,
}

impl HubSource for Hub {
    fn url(&self) -> &Uri {
        &self.url
    }

    fn hub_repo(&self, _: &str, repo: &RepositoryName) -> Result<RepositoryName, MappingError> {
        Ok(repo.clone())
    }

    async fn lookup(
        &self,
        method: Method,
        _: &RepositoryName,
        _: &str,
        reference: &str,
        _: HeaderMap,
    ) -> HubOutcome {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return HubOutcome::Unreachable("hub down".into());
        }
        match self.content.lock().unwrap().get(reference) {
            Some((content_type, body)) => HubOutcome::Found(ok(&method, content_type, body)),
            None => HubOutcome::NotFound,
        }
    }

    async fn has(&self, _: &str, _: &str, _: &Digest) -> Result<bool, HubError> {
        Ok(false)
    }

    async fn upload_blob(&self, _: &str, _: &Digest, _: u64, _: ProxyBody) -> Result<(), HubError> {
        Ok(())
    }

    async fn put_manifest(&self, _: &str, _: &Digest, _: &str, _: Bytes) -> Result<(), HubError> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Up {
    Serving,
    /// Connection refused: cannot be asked.
    Down,
    /// Answers 503 to everything.
    Failing,
    /// The name does not resolve.
    Nowhere,
}

/// The upstream: content by path, public or behind one password; counts what it is asked.
struct Upstream {
    state: Mutex<Up>,
    content: Mutex<HashMap<String, (&'static str, Bytes)>>,
    password: Option<&'static str>,
    asked: AtomicUsize,
}

impl Upstream {
    fn new(password: Option<&'static str>) -> Self {
        Upstream {
            state: Mutex::new(Up::Serving),
            content: Mutex::default(),
            password,
            asked: AtomicUsize::new(0),
        }
    }

    fn set(&self, state: Up) {
        *self.state.lock().unwrap() = state;
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }

    fn answer(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let host = REGISTRY.to_owned();
        let status = match *self.state.lock().unwrap() {
            Up::Down => {
                let reason = "connection refused".into();
                return Err(UpstreamError::Unreachable { host, reason });
            }
            Up::Nowhere => {
                let reason = "does not resolve".into();
                return Err(UpstreamError::NoSuchHost { host, reason });
            }
            Up::Failing => StatusCode::SERVICE_UNAVAILABLE,
            Up::Serving => StatusCode::OK,
        };
        let mut resp = Response::new(client::empty());
        let refused = self.password.is_some_and(|pw| {
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(pw.as_bytes())
        });
        let found = self.content.lock().unwrap().get(path).cloned();
        *resp.status_mut() = match found {
            _ if status != StatusCode::OK => status,
            _ if refused => {
                let challenge = HeaderValue::from_static("Basic realm=\"fake\"");
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
                StatusCode::UNAUTHORIZED
            }
            Some((content_type, body)) => return Ok(ok(method, content_type, &body)),
            None => StatusCode::NOT_FOUND,
        };
        Ok(resp)
    }
}

impl UpstreamSource for Upstream {
    async fn small(
        &self,
        _: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Small, UpstreamError> {
        let (parts, body) = self.answer(&method, path.path(), headers)?.into_parts();
        Ok(Small {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        })
    }

    async fn blob(
        &self,
        _: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        self.answer(&method, path.path(), headers)
    }

    async fn forward(
        &self,
        _: &Origin,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        self.answer(req.method(), req.uri().path(), req.headers())
    }

    async fn readable_anonymously(
        &self,
        _: &Origin,
        path: &PathAndQuery,
    ) -> Result<bool, UpstreamError> {
        let resp = self.answer(&Method::HEAD, path.path(), &HeaderMap::new())?;
        Ok(resp.status().is_success())
    }
}

/// A 200 with `body` (none for HEAD), as a registry sends content by digest.
fn ok(method: &Method, content_type: &str, body: &Bytes) -> Response<ProxyBody> {
    let sent = if *method == Method::HEAD {
        Bytes::new()
    } else {
        body.clone()
    };
    let mut r = Response::new(client::full(sent));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    let digest = Digest::sha256_of(body).to_string();
    h.insert("docker-content-digest", digest.parse().unwrap());
    r
}

/// One node: a proxy with a cache of its own, over a hub and an upstream.
struct Node {
    proxy: RegistryProxy<Hub, Upstream>,
    cache: Arc<Cache>,
}

fn node(hub: &Arc<Hub>, up: &Arc<Upstream>) -> Node {
    let cache = Arc::new(Cache::in_memory(16 << 20));
    let proxy = RegistryProxy::new(
        Some(hub.clone()),
        up.clone(),
        cache.clone(),
        Duration::from_secs(30),
    );
    Node { proxy, cache }
}

fn ctx() -> ConnContext {
    ConnContext {
        origin: Origin {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static(REGISTRY),
            addr: None,
        },
        caller: None,
        label: REGISTRY.to_owned(),
        files: None,
    }
}

fn get(path: &str, auth: Option<&str>) -> Parts {
    let mut req = Request::get(path);
    if let Some(auth) = auth {
        req = req.header(header::AUTHORIZATION, auth);
    }
    req.body(()).unwrap().into_parts().0
}

async fn read(answer: Answer) -> (Source, StatusCode, Bytes) {
    let (source, resp) = answer;
    let (parts, body) = resp.into_parts();
    (
        source,
        parts.status,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn repo() -> RepositoryName {
    REPO.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The chain, scripted

/// What [`Script::stale`] finds.
#[derive(Clone, Copy)]
enum Cached {
    Copy,
    NotEntitled,
    Nothing,
}

/// A kind whose every tier is scripted, and which records the tiers the chain consulted.
struct Script {
    digest: Digest,
    node_copy: bool,
    /// The hub's answer cannot be used.
    unusable: bool,
    tag_copy: bool,
    cached: bool,
    stale: Cached,
    calls: Mutex<Vec<&'static str>>,
}

fn script() -> Script {
    Script {
        digest: Digest::sha256_of(b"scripted"),
        node_copy: false,
        unusable: false,
        tag_copy: false,
        cached: false,
        stale: Cached::Nothing,
        calls: Mutex::default(),
    }
}

impl Script {
    fn call(&self, tier: &'static str) {
        self.calls.lock().unwrap().push(tier);
    }

    fn calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

fn answer(source: Source) -> Answer {
    (source, Response::new(client::full("scripted")))
}

impl Content<Hub, Upstream> for Script {
    const WHAT: &'static str = "thing";
    const SEGMENT: &'static str = "things";
    type Cached = ();

    fn digest(&self) -> Option<&Digest> {
        Some(&self.digest)
    }

    async fn node_copy(&self, _: &RegistryProxy<Hub, Upstream>, _: &Pull<'_>) -> Option<Answer> {
        self.call("node");
        self.node_copy.then(|| answer(Source::Node))
    }

    fn hub_request(&self, q: &Pull<'_>) -> Option<(Method, HeaderMap)> {
        Some((q.method().clone(), HeaderMap::new()))
    }

    async fn keep_hub_answer(
        &self,
        _: &RegistryProxy<Hub, Upstream>,
        _: &Pull<'_>,
        resp: Response<ProxyBody>,
    ) -> Option<Answer> {
        self.call("hub");
        (!self.unusable).then_some((Source::Hub, resp))
    }

    async fn node_copy_of_tag(
        &self,
        _: &RegistryProxy<Hub, Upstream>,
        _: &Pull<'_>,
    ) -> Option<Answer> {
        self.call("tag");
        self.tag_copy.then(|| answer(Source::Node))
    }

    async fn cached(&self, _: &RegistryProxy<Hub, Upstream>, _: &Pull<'_>) -> Option<()> {
        self.call("cache");
        self.cached.then_some(())
    }

    async fn fetch(
        &self,
        p: &RegistryProxy<Hub, Upstream>,
        q: &Pull<'_>,
        cleared: Option<(Source, ())>,
    ) -> Result<Answer, Failure> {
        self.call("fetch");
        if let Some((source, ())) = cleared {
            return Ok(answer(source));
        }
        let upstream = p
            .upstream
            .small(&q.ctx.origin, Method::GET, &q.path, &q.req.headers);
        match upstream.await {
            Ok(s) if s.status.is_server_error() => {
                Err(Failure::Status(Box::new(small_response(s))))
            }
            Ok(s) => Ok((Source::Upstream, small_response(s))),
            Err(e) => Err(Failure::Error(e)),
        }
    }

    async fn stale(&self, _: &RegistryProxy<Hub, Upstream>, _: &Pull<'_>) -> Stale {
        self.call("stale");
        match self.stale {
            Cached::Copy => Stale::Copy(Response::new(client::full("stale"))),
            Cached::NotEntitled => Stale::NotEntitled,
            Cached::Nothing => Stale::Nothing,
        }
    }
}

/// The scripted kind's request path (what the content rule asks the upstream about).
const THING: &str = "/v2/team/app/things/ref";

/// A world for the scripted kind: the hub has `ref` unless told otherwise.
fn scripted(hub_has: bool) -> (Arc<Hub>, Arc<Upstream>, Node) {
    let hub = Arc::new(Hub::default());
    if hub_has {
        let thing = (
            "application/octet-stream",
            Bytes::from_static(b"from the hub"),
        );
        hub.content.lock().unwrap().insert("ref".into(), thing);
    }
    let up = Arc::new(Upstream::new(None));
    let thing = ("application/octet-stream", Bytes::from_static(b"upstream"));
    up.content.lock().unwrap().insert(THING.into(), thing);
    let node = node(&hub, &up);
    (hub, up, node)
}

async fn walk(node: &Node, kind: &Script, auth: Option<&str>) -> (Source, StatusCode, Bytes) {
    let (ctx, req, name) = (ctx(), get(THING, auth), repo());
    let q = Pull::new(&ctx, &req, &name, &"ref");
    read(node.proxy.serve(&q, kind).await).await
}

#[tokio::test]
async fn the_node_answers_before_the_hub_and_the_hub_before_the_cache() {
    let (hub, up, node) = scripted(true);
    let kind = Script {
        node_copy: true,
        cached: true,
        ..script()
    };
    assert_eq!(walk(&node, &kind, None).await.0, Source::Node);
    assert_eq!(kind.calls(), ["node"]);
    assert_eq!(hub.lookups.load(Ordering::SeqCst), 0);

    let kind = Script {
        cached: true,
        ..script()
    };
    let (source, status, body) = walk(&node, &kind, None).await;
    assert_eq!(
        (source, status, &body[..]),
        (Source::Hub, StatusCode::OK, &b"from the hub"[..])
    );
    assert_eq!(kind.calls(), ["node", "hub"]);
    assert_eq!(
        up.asked(),
        0,
        "neither the content rule nor the upstream was asked"
    );
}

#[tokio::test]
async fn while_the_hub_cannot_be_asked_the_nodes_copy_of_a_tag_stands_in() {
    let (hub, up, node) = scripted(true);
    hub.down.store(true, Ordering::SeqCst);
    let kind = Script {
        tag_copy: true,
        ..script()
    };
    assert_eq!(walk(&node, &kind, None).await.0, Source::Node);
    assert_eq!(kind.calls(), ["node", "tag"]);
    assert_eq!(up.asked(), 0);

    // Without a copy: on to the cache and the upstream.
    let kind = script();
    assert_eq!(walk(&node, &kind, None).await.0, Source::Upstream);
    assert_eq!(kind.calls(), ["node", "tag", "cache", "fetch"]);
}

#[tokio::test]
async fn a_hub_without_it_or_with_an_unusable_answer_leaves_it_to_the_cache() {
    // Missing: the node's copy of a tag is not what the hub serves now.
    let (_, _, node) = scripted(false);
    let kind = Script {
        tag_copy: true,
        ..script()
    };
    assert_eq!(walk(&node, &kind, None).await.0, Source::Upstream);
    assert_eq!(kind.calls(), ["node", "cache", "fetch"]);

    let (_, _, node) = scripted(true);
    let kind = Script {
        unusable: true,
        tag_copy: true,
        ..script()
    };
    assert_eq!(walk(&node, &kind, None).await.0, Source::Upstream);
    assert_eq!(kind.calls(), ["node", "hub", "cache", "fetch"]);
}

#[tokio::test]
async fn the_cache_serves_only_what_the_content_rule_clears() {
    // Never linked to the repository: the upstream is asked, and its yes clears the copy.
    let (_, up, public) = scripted(false);
    let kind = Script {
        cached: true,
        ..script()
    };
    assert_eq!(walk(&public, &kind, None).await.0, Source::Cache);
    assert_eq!(kind.calls(), ["node", "cache", "fetch"]);
    assert_eq!(
        up.asked(),
        1,
        "the content rule's HEAD; fetch served the cleared copy"
    );

    // A private repository refuses this client: its answer, and nothing is fetched.
    let hub = Arc::new(Hub::default());
    let up = Arc::new(Upstream::new(Some(ALICE)));
    up.content
        .lock()
        .unwrap()
        .insert(THING.into(), ("a", Bytes::new()));
    let node = node(&hub, &up);
    let (source, status, _) = walk(&node, &kind, Some(BOB)).await;
    assert_eq!(
        (source, status),
        (Source::Upstream, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(kind.calls(), ["node", "cache"]);

    // The upstream cannot be asked and nothing known entitles the client: 503, or the
    // registry's challenge (learned from that 401) to a client without credentials.
    up.set(Up::Down);
    let (source, status, _) = walk(&node, &kind, Some(BOB)).await;
    assert_eq!(
        (source, status),
        (Source::Local, StatusCode::SERVICE_UNAVAILABLE)
    );
    let (source, status, _) = walk(&node, &kind, None).await;
    assert_eq!((source, status), (Source::Local, StatusCode::UNAUTHORIZED));
    assert_eq!(kind.calls(), ["node", "cache", "node", "cache"]);

    // No such registry: 404, never the cache.
    up.set(Up::Nowhere);
    let (source, status, _) = walk(&node, &kind, None).await;
    assert_eq!((source, status), (Source::Local, StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn when_the_upstream_fails_a_stale_copy_then_the_challenge_then_its_error() {
    let (_, up, node) = scripted(false);
    up.set(Up::Down);
    let stale = |stale| Script { stale, ..script() };

    let kind = stale(Cached::Copy);
    let (source, status, body) = walk(&node, &kind, None).await;
    assert_eq!(
        (source, status, &body[..]),
        (Source::Stale, StatusCode::OK, &b"stale"[..])
    );
    assert_eq!(kind.calls(), ["node", "cache", "fetch", "stale"]);

    let kind = stale(Cached::NotEntitled);
    let (source, status, _) = walk(&node, &kind, Some(BOB)).await;
    assert_eq!(
        (source, status),
        (Source::Local, StatusCode::SERVICE_UNAVAILABLE)
    );

    let kind = stale(Cached::Nothing);
    let (source, status, _) = walk(&node, &kind, None).await;
    assert_eq!((source, status), (Source::Local, StatusCode::BAD_GATEWAY));

    // A 5xx is the upstream's own answer when nothing stands in.
    up.set(Up::Failing);
    let (source, status, _) = walk(&node, &kind, None).await;
    assert_eq!(
        (source, status),
        (Source::Upstream, StatusCode::SERVICE_UNAVAILABLE)
    );

    // A name that does not resolve is no registry: nothing stands in for it.
    up.set(Up::Nowhere);
    let kind = stale(Cached::Copy);
    let (source, status, _) = walk(&node, &kind, None).await;
    assert_eq!((source, status), (Source::Local, StatusCode::NOT_FOUND));
    assert_eq!(kind.calls(), ["node", "cache", "fetch"]);
}

#[tokio::test]
async fn an_upstream_failure_is_counted_once() {
    let (_, up, node) = scripted(false);
    up.set(Up::Down);
    assert_eq!(
        walk(&node, &script(), None).await.1,
        StatusCode::BAD_GATEWAY
    );
    up.set(Up::Failing);
    let kind = Script {
        stale: Cached::Copy,
        ..script()
    };
    assert_eq!(walk(&node, &kind, None).await.0, Source::Stale);

    let mut reg = prometheus_client::registry::Registry::default();
    node.proxy.metrics.register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    for reason in ["unreachable", "server_error"] {
        let line = text
            .lines()
            .find(|l| l.starts_with("upstream_errors_total") && l.contains(reason))
            .unwrap_or_else(|| panic!("no {reason} count in\n{text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// Both kinds, the same order

/// A manifest by digest or a blob, as the hub and the upstream hold it.
struct Item {
    digest: Digest,
    bytes: Bytes,
    manifest: bool,
}

fn items() -> [Item; 2] {
    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","layers":[]}}"#,
        media_type::OCI_MANIFEST
    ));
    let blob = Bytes::from_static(b"the bytes of a layer");
    [
        Item {
            digest: Digest::sha256_of(&manifest),
            bytes: manifest,
            manifest: true,
        },
        Item {
            digest: Digest::sha256_of(&blob),
            bytes: blob,
            manifest: false,
        },
    ]
}

impl Item {
    fn content(&self) -> (&'static str, Bytes) {
        let content_type = if self.manifest {
            media_type::OCI_MANIFEST
        } else {
            "application/octet-stream"
        };
        (content_type, self.bytes.clone())
    }

    fn path(&self) -> String {
        let kind = if self.manifest { "manifests" } else { "blobs" };
        format!("/v2/{REPO}/{kind}/{}", self.digest)
    }

    fn on_hub(&self, hub: &Hub) {
        let reference = self.digest.to_string();
        hub.content
            .lock()
            .unwrap()
            .insert(reference, self.content());
    }

    fn upstream(&self, password: Option<&'static str>) -> Arc<Upstream> {
        let up = Arc::new(Upstream::new(password));
        up.content
            .lock()
            .unwrap()
            .insert(self.path(), self.content());
        up
    }

    /// GETs it through `node` and waits until a blob that came whole is stored.
    async fn get(&self, node: &Node, auth: Option<&str>) -> (Source, StatusCode, Bytes) {
        let (ctx, req, name) = (ctx(), get(&self.path(), auth), repo());
        let answer = if self.manifest {
            let reference = Reference::Digest(self.digest.clone());
            node.proxy.manifest(&ctx, &req, &name, &reference).await
        } else {
            node.proxy.blob(&ctx, &req, &name, &self.digest).await
        };
        let got = read(answer).await;
        if !self.manifest && got.2 == self.bytes {
            until("the blob stored", async || {
                node.cache.blobs().lookup(&self.digest).await.is_some()
            })
            .await;
        }
        got
    }
}

#[tokio::test]
async fn a_manifest_by_digest_and_a_blob_meet_the_hub_the_node_and_the_cache_in_that_order() {
    for item in items() {
        let what = if item.manifest { "manifest" } else { "blob" };
        let hub = Arc::new(Hub::default());
        item.on_hub(&hub);
        let up = item.upstream(None);
        let first = node(&hub, &up);
        let ok = |source| (source, StatusCode::OK, item.bytes.clone());

        // The hub answers first: neither the content rule nor the upstream is asked.
        assert_eq!(item.get(&first, None).await, ok(Source::Hub), "{what}");
        assert_eq!(up.asked(), 0, "{what}");

        // The hub down: this node's copy of what it served, without asking it.
        hub.down.store(true, Ordering::SeqCst);
        let lookups = hub.lookups.load(Ordering::SeqCst);
        assert_eq!(item.get(&first, None).await, ok(Source::Node), "{what}");
        assert_eq!(hub.lookups.load(Ordering::SeqCst), lookups, "{what}");
        assert_eq!(up.asked(), 0, "{what}");

        // Another node, and a hub without it: the upstream, then the cache, which fresh facts
        // clear without asking again.
        let other = node(&Arc::new(Hub::default()), &up);
        assert_eq!(item.get(&other, None).await, ok(Source::Upstream), "{what}");
        let asked = up.asked();
        assert_eq!(item.get(&other, None).await, ok(Source::Cache), "{what}");
        assert_eq!(up.asked(), asked, "{what}");
    }
}

#[tokio::test]
async fn for_both_kinds_the_upstream_down_leaves_the_cache_to_entitled_clients_only() {
    for item in items() {
        let what = if item.manifest { "manifest" } else { "blob" };
        let up = item.upstream(Some(ALICE));
        let node = node(&Arc::new(Hub::default()), &up);
        let got = item.get(&node, Some(ALICE)).await;
        assert_eq!(
            got,
            (Source::Upstream, StatusCode::OK, item.bytes.clone()),
            "{what}"
        );
        // Cached now, but the upstream refuses anyone else (and its challenge is learned).
        let (source, status, _) = item.get(&node, None).await;
        assert_eq!(
            (source, status),
            (Source::Upstream, StatusCode::UNAUTHORIZED),
            "{what}"
        );

        up.set(Up::Down);
        let got = item.get(&node, Some(ALICE)).await;
        assert_eq!(
            got,
            (Source::Cache, StatusCode::OK, item.bytes.clone()),
            "{what}"
        );
        let (source, status, _) = item.get(&node, Some(BOB)).await;
        let unavailable = (Source::Local, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((source, status), unavailable, "{what}");
        let (source, status, _) = item.get(&node, None).await;
        assert_eq!(
            (source, status),
            (Source::Local, StatusCode::UNAUTHORIZED),
            "{what}"
        );
    }
}
