//! The registry proxy: answers a terminated connection's OCI requests.
//!
//! - Manifests and blobs: the hub first (when it has the image under its mapped name), then the
//!   cache, then the upstream (with the client's own credentials), caching on the way.
//! - A tag the hub does not have is re-validated upstream every time (`imagePullPolicy: Always`
//!   stays correct); when the upstream cannot be asked, the cached mapping is served
//!   (stale-if-error).
//! - Cached content goes only to clients the upstream accepted for that repository, whenever the
//!   upstream can be asked ([`access`]).
//! - `/v2/`, tag lists and everything else go to the upstream.

mod access;
mod metrics;
mod respond;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, uri::PathAndQuery,
};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tracing::{debug, warn};

use self::respond::{api_version, json, logged, oci_error, relay};
pub use self::{
    access::AccessCache,
    metrics::RegistryMetrics,
    respond::{Kind, RequestRecord, Source},
};
use crate::{
    cache::{
        BlobResponse, BlobSource, BodyRange, Cache, FlightOutcome, Manifest, TagTarget,
        UpstreamBlob,
    },
    client::{self, ProxyBody},
    hub::{HubClient, HubOutcome},
    oci::{Digest, ErrorCode, Reference, RepositoryName, Route, media_type},
    original_dst::{ClientAddr, OriginalDst},
    upstream::{Origin, Small, Upstream, UpstreamError},
};

/// What is known about a terminated connection.
pub struct ConnContext {
    /// The registry the client talks to.
    pub origin: Origin,
    /// The kernel record (absent when a client connected to the proxy port directly).
    pub orig: Option<OriginalDst>,
    pub peer: ClientAddr,
}

/// Serves registry requests.
pub struct RegistryProxy {
    pub hub: Option<Arc<HubClient>>,
    pub upstream: Upstream,
    pub cache: Arc<Cache>,
    pub access: AccessCache,
    pub metrics: Arc<RegistryMetrics>,
    /// Idle timeout for relayed bodies.
    pub idle_timeout: Duration,
    hub_warned: AtomicU64,
}

/// Hub trouble is logged at most this often (every request is counted in metrics).
const HUB_WARN_EVERY: Duration = Duration::from_secs(30);

/// Why a blob could not be fetched upstream.
enum FetchError {
    /// The upstream answered, but not with the blob (401, 404, ...): relayed to the client.
    Status(Response<ProxyBody>),
    Unreachable(UpstreamError),
}

impl RegistryProxy {
    pub fn new(
        hub: Option<Arc<HubClient>>,
        upstream: Upstream,
        cache: Arc<Cache>,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            hub,
            upstream,
            cache,
            access: AccessCache::default(),
            metrics: Arc::default(),
            idle_timeout,
            hub_warned: AtomicU64::new(0),
        }
    }

    /// Answers one request of a terminated connection.
    pub async fn handle(&self, ctx: &ConnContext, req: Request<Incoming>) -> Response<ProxyBody> {
        let route = Route::parse(req.method(), req.uri().path());
        let mut record = RequestRecord {
            metrics: self.metrics.clone(),
            registry: ctx.origin.authority.to_string(),
            repository: String::new(),
            reference: String::new(),
            method: req.method().clone(),
            kind: Kind::Other,
            comm: ctx
                .orig
                .as_ref()
                .map(|o| o.process.comm.clone())
                .unwrap_or_default(),
            pid: ctx.orig.as_ref().map_or(0, |o| o.process.pid),
            started: Instant::now(),
        };
        match route {
            Err(e) => {
                self.metrics.invalid_request(e.reason());
                warn!(
                    registry = %record.registry,
                    path = %req.uri().path(),
                    error = %e,
                    "invalid registry request refused"
                );
                logged(
                    record,
                    Source::Local,
                    oci_error(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
                )
            }
            Ok(Route::Other) => {
                record.reference = req.uri().path().to_owned();
                let resp = match self.upstream.forward(&ctx.origin, req).await {
                    Ok(resp) => resp,
                    Err(e) => self.unreachable(&ctx.origin, &e),
                };
                logged(record, Source::Passthrough, resp)
            }
            Ok(Route::Base) => {
                let (source, resp) = self.base(ctx, &req).await;
                logged(record, source, resp)
            }
            Ok(Route::TagsList { name }) => {
                record.repository = name.to_string();
                let (source, resp) = self.tags(ctx, &req, &name).await;
                logged(record, source, resp)
            }
            Ok(Route::Manifest { name, reference }) => {
                record.kind = Kind::Manifest;
                record.repository = name.to_string();
                record.reference = reference.to_string();
                let (source, resp) = self.manifest(ctx, &req, &name, &reference).await;
                logged(record, source, resp)
            }
            Ok(Route::Blob { name, digest }) => {
                record.kind = Kind::Blob;
                record.repository = name.to_string();
                record.reference = digest.to_string();
                let (source, resp) = self.blob(ctx, &req, &name, &digest).await;
                logged(record, source, resp)
            }
        }
    }

    /// `/v2/`: the upstream's answer (a 401 challenge starts the client's token flow); when the
    /// upstream cannot be reached, pullproxy says "API v2 here" itself so hub and cached content
    /// stay reachable.
    async fn base(
        &self,
        ctx: &ConnContext,
        req: &Request<Incoming>,
    ) -> (Source, Response<ProxyBody>) {
        match self
            .upstream
            .small(
                &ctx.origin,
                req.method().clone(),
                &path_of(req),
                req.headers(),
            )
            .await
        {
            Ok(s) if !s.status.is_server_error() => (Source::Upstream, small_response(s)),
            other => {
                debug!(registry = %ctx.origin.authority, upstream = ?other.err(), "answering /v2/ locally");
                (Source::Local, json(StatusCode::OK, "{}".into()))
            }
        }
    }

    /// Tag lists: the upstream's, or the hub's when the upstream cannot be asked.
    async fn tags(
        &self,
        ctx: &ConnContext,
        req: &Request<Incoming>,
        name: &RepositoryName,
    ) -> (Source, Response<ProxyBody>) {
        let upstream = self
            .upstream
            .small(
                &ctx.origin,
                req.method().clone(),
                &path_of(req),
                req.headers(),
            )
            .await;
        match upstream {
            Ok(s) if !s.status.is_server_error() => return (Source::Upstream, small_response(s)),
            Ok(s) => debug!(status = %s.status, "upstream tag list failed"),
            Err(e) => debug!(error = %e, "upstream tag list failed"),
        }
        match self
            .hub_lookup(ctx, req.method(), name, "tags", "list", HeaderMap::new())
            .await
        {
            Some(resp) => (Source::Hub, relay(resp, self.idle_timeout)),
            None => (
                Source::Local,
                oci_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::NameUnknown,
                    "upstream unreachable and the hub has no such repository",
                ),
            ),
        }
    }

    async fn manifest(
        &self,
        ctx: &ConnContext,
        req: &Request<Incoming>,
        name: &RepositoryName,
        reference: &Reference,
    ) -> (Source, Response<ProxyBody>) {
        let method = req.method();
        // Every Accept line the client sent (Go clients send one per media type): a registry
        // that sees only some of them converts the manifest (down to schema 1, even).
        let mut hub_headers = HeaderMap::new();
        for accept in req.headers().get_all(header::ACCEPT) {
            hub_headers.append(header::ACCEPT, accept.clone());
        }
        if hub_headers.is_empty() {
            hub_headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(media_type::MANIFEST_ACCEPT),
            );
        }
        if let Some(resp) = self
            .hub_lookup(
                ctx,
                method,
                name,
                "manifests",
                &reference.to_string(),
                hub_headers,
            )
            .await
        {
            return (Source::Hub, relay(resp, self.idle_timeout));
        }
        let registry = ctx.origin.authority.as_str();

        // A manifest by digest never changes: serve it from the cache to a client allowed to
        // read the repository.
        if let Reference::Digest(digest) = reference
            && let Some(m) = self.cache.manifests().get(digest).await
        {
            match self.check_access(ctx, req, name).await {
                Access::Granted => return (Source::Cache, manifest_response(&m, method)),
                Access::CannotAsk => return (Source::Stale, manifest_response(&m, method)),
                Access::Refused(resp) => return (Source::Upstream, resp),
            }
        }

        let upstream = self
            .upstream
            .small(&ctx.origin, method.clone(), &path_of(req), req.headers())
            .await;
        match upstream {
            Ok(s) if s.status.is_success() => {
                self.access.approve(registry, name.as_str(), req.headers());
                if let Err(DigestDisagrees) = self
                    .remember_manifest(registry, name, reference, method, &s)
                    .await
                {
                    return (
                        Source::Upstream,
                        oci_error(
                            StatusCode::BAD_GATEWAY,
                            ErrorCode::ManifestInvalid,
                            "the upstream manifest does not match its digest",
                        ),
                    );
                }
                (Source::Upstream, small_response(s))
            }
            Ok(s) if !s.status.is_server_error() => (Source::Upstream, small_response(s)),
            result => {
                // Unreachable (or failing): serve what the cache knows, if anything.
                let why = match &result {
                    Ok(s) => {
                        self.metrics.upstream_error(registry, "server_error");
                        format!("upstream answered {}", s.status)
                    }
                    Err(e) => {
                        self.metrics.upstream_error(registry, e.reason());
                        e.to_string()
                    }
                };
                match self.stale_manifest(registry, name, reference).await {
                    Some(m) => {
                        warn!(registry, repository = %name, %reference, reason = %why, "upstream unavailable; serving the cached manifest");
                        (Source::Stale, manifest_response(&m, method))
                    }
                    None => match result {
                        Ok(s) => (Source::Upstream, small_response(s)),
                        Err(e) => (Source::Local, self.unreachable(&ctx.origin, &e)),
                    },
                }
            }
        }
    }

    /// Caches what the upstream answered for a manifest: the bytes by digest (GET) and where the
    /// tag points. A manifest whose bytes do not match the digest asked for is refused.
    async fn remember_manifest(
        &self,
        registry: &str,
        name: &RepositoryName,
        reference: &Reference,
        method: &Method,
        s: &Small,
    ) -> Result<(), DigestDisagrees> {
        let content_type = s
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let header_digest: Option<Digest> = s
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let digest = if *method == Method::GET {
            let computed = Digest::sha256_of(&s.body);
            let expected = match reference {
                Reference::Digest(d) => Some(d),
                Reference::Tag(_) => header_digest.as_ref(),
            };
            if let Some(expected) = expected
                && expected.algorithm() == computed.algorithm()
                && *expected != computed
            {
                self.metrics.digest_mismatch();
                warn!(registry, repository = %name, %reference, %computed, "upstream manifest does not match its digest; not cached");
                return Err(DigestDisagrees);
            }
            let digest = match reference {
                Reference::Digest(d) => d.clone(),
                Reference::Tag(_) => computed,
            };
            if media_type::is_manifest(&content_type)
                && let Err(e) = self
                    .cache
                    .manifests()
                    .put(&digest, &content_type, s.body.clone())
                    .await
            {
                warn!(registry, repository = %name, error = %e, "caching a manifest failed");
            }
            Some(digest)
        } else {
            header_digest
        };
        if let (Reference::Tag(tag), Some(digest)) = (reference, digest)
            && media_type::is_manifest(&content_type)
        {
            let target = TagTarget {
                digest,
                media_type: content_type,
            };
            if let Err(e) = self.cache.tags().put(registry, name, tag, &target).await {
                warn!(registry, repository = %name, error = %e, "recording a tag failed");
            }
        }
        Ok(())
    }

    async fn stale_manifest(
        &self,
        registry: &str,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Option<Manifest> {
        let digest = match reference {
            Reference::Tag(tag) => self.cache.tags().get(registry, name, tag)?.digest,
            Reference::Digest(d) => d.clone(),
        };
        self.cache.manifests().get(&digest).await
    }

    async fn blob(
        &self,
        ctx: &ConnContext,
        req: &Request<Incoming>,
        name: &RepositoryName,
        digest: &Digest,
    ) -> (Source, Response<ProxyBody>) {
        let method = req.method();
        let mut hub_headers = HeaderMap::new();
        if let Some(range) = req.headers().get(header::RANGE) {
            hub_headers.insert(header::RANGE, range.clone());
        }
        if let Some(resp) = self
            .hub_lookup(ctx, method, name, "blobs", &digest.to_string(), hub_headers)
            .await
        {
            return (Source::Hub, relay(resp, self.idle_timeout));
        }
        let cached = self.cache.blobs().lookup(digest).await;
        let source = match self.check_access(ctx, req, name).await {
            Access::Granted => Source::Cache,
            Access::CannotAsk if cached.is_some() => Source::Stale,
            Access::CannotAsk => {
                return (
                    Source::Local,
                    oci_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::BlobUnknown,
                        "the upstream is unreachable and the blob is not cached",
                    ),
                );
            }
            Access::Refused(resp) => return (Source::Upstream, resp),
        };
        if *method == Method::HEAD {
            return match cached {
                Some(len) => (source, blob_head(digest, len)),
                None => match self
                    .upstream
                    .small(&ctx.origin, Method::HEAD, &path_of(req), req.headers())
                    .await
                {
                    Ok(s) => (Source::Upstream, small_response(s)),
                    Err(e) => (Source::Local, self.unreachable(&ctx.origin, &e)),
                },
            };
        }

        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::oci::ByteRange::parse);
        // The upstream fetch is always of the whole blob (that is what gets cached and verified);
        // this client's range is cut from it.
        let mut fetch_headers = req.headers().clone();
        fetch_headers.remove(header::RANGE);
        let path = path_of(req);
        let fetch = || async {
            let resp = self
                .upstream
                .blob(&ctx.origin, Method::GET, &path, &fetch_headers)
                .await
                .map_err(FetchError::Unreachable)?;
            if resp.status() != StatusCode::OK {
                return Err(FetchError::Status(resp));
            }
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = resp
                .into_body()
                .into_data_stream()
                .map_err(|e| std::io::Error::other(crate::telemetry::error_chain(e.as_ref())));
            Ok(UpstreamBlob::new(len, body))
        };
        match self.cache.blobs().get_or_fetch(digest, range, fetch).await {
            Ok(blob) => {
                if blob.source != BlobSource::Hit {
                    self.access.approve(
                        ctx.origin.authority.as_str(),
                        name.as_str(),
                        req.headers(),
                    );
                }
                let source = if blob.source == BlobSource::Hit {
                    source
                } else {
                    Source::Upstream
                };
                self.watch_flight(ctx, name, digest, &blob);
                (source, blob_response(digest, blob))
            }
            Err(FetchError::Status(resp)) => (Source::Upstream, resp),
            Err(FetchError::Unreachable(e)) => (Source::Local, self.unreachable(&ctx.origin, &e)),
        }
    }

    /// Logs and counts how a blob download ended, once it has (digest mismatches and disk
    /// trouble matter to an operator even when the client already went away).
    fn watch_flight(
        &self,
        ctx: &ConnContext,
        name: &RepositoryName,
        digest: &Digest,
        blob: &BlobResponse,
    ) {
        if blob.source != BlobSource::Fetched {
            return;
        }
        let outcome = blob.outcome.clone();
        let metrics = self.metrics.clone();
        let (registry, repository, digest) = (
            ctx.origin.authority.to_string(),
            name.to_string(),
            digest.to_string(),
        );
        tokio::spawn(async move {
            let outcome = outcome.wait().await;
            let label = match &outcome {
                Some(FlightOutcome::Cached) => "cached",
                Some(FlightOutcome::AlreadyCached) => "already_cached",
                Some(FlightOutcome::WriteFailed { .. }) => "write_failed",
                Some(FlightOutcome::DigestMismatch(_)) => "digest_mismatch",
                Some(FlightOutcome::UpstreamFailed { .. }) => "upstream_failed",
                Some(FlightOutcome::FetchFailed) | None => "fetch_failed",
            };
            metrics.upstream_fetch(&registry, label);
            match outcome {
                Some(FlightOutcome::DigestMismatch(m)) => {
                    metrics.digest_mismatch();
                    warn!(
                        %registry, %repository, %digest, mismatch = %m,
                        "upstream blob does not match its digest: not cached, clients got an error"
                    )
                }
                Some(FlightOutcome::WriteFailed { error }) => warn!(
                    %registry, %repository, %digest, %error,
                    "blob served but not cached: the cache could not be written"
                ),
                Some(FlightOutcome::UpstreamFailed { error }) => warn!(
                    %registry, %repository, %digest, %error, "upstream failed mid-blob"
                ),
                other => {
                    debug!(%registry, %repository, %digest, outcome = ?other, "blob flight ended")
                }
            }
        });
    }

    /// Whether this client may read cached content of `name`: yes if the upstream recently
    /// served that repository to the same credentials, otherwise the upstream is asked (a HEAD
    /// of the very resource, with the client's headers).
    async fn check_access(
        &self,
        ctx: &ConnContext,
        req: &Request<Incoming>,
        name: &RepositoryName,
    ) -> Access {
        let registry = ctx.origin.authority.as_str();
        if self.access.approved(registry, name.as_str(), req.headers()) {
            return Access::Granted;
        }
        let mut headers = req.headers().clone();
        headers.remove(header::RANGE);
        match self
            .upstream
            .small(&ctx.origin, Method::HEAD, &path_of(req), &headers)
            .await
        {
            Ok(s) if s.status.is_success() => {
                self.access.approve(registry, name.as_str(), req.headers());
                Access::Granted
            }
            Ok(s) if s.status.is_server_error() => Access::CannotAsk,
            Ok(s) => Access::Refused(small_response(s)),
            Err(e) => {
                self.metrics.upstream_error(registry, e.reason());
                debug!(error = %e, "upstream cannot be asked about access");
                Access::CannotAsk
            }
        }
    }

    /// The hub's response if it has the content; hub trouble is logged (rate-limited) and
    /// falls through to the cache and the upstream.
    async fn hub_lookup(
        &self,
        ctx: &ConnContext,
        method: &Method,
        name: &RepositoryName,
        kind: &str,
        reference: &str,
        headers: HeaderMap,
    ) -> Option<Response<Incoming>> {
        let hub = self.hub.as_ref()?;
        let hub_repo = match hub.hub_repo(ctx.origin.host(), name) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.hub_lookup("invalid_name");
                if self.may_warn_about_hub() {
                    warn!(error = %e, "no hub repository for this image; serving from the cache and upstream");
                }
                return None;
            }
        };
        let outcome = hub
            .lookup(method.clone(), &hub_repo, kind, reference, headers)
            .await;
        self.metrics.hub_lookup(outcome.label());
        match outcome {
            HubOutcome::Found(resp) => return Some(resp),
            HubOutcome::NotFound => debug!(%hub_repo, kind, reference, "not on the hub"),
            HubOutcome::Unreachable(reason) if self.may_warn_about_hub() => {
                warn!(hub = %hub.url(), %reason, "hub unreachable; serving from the cache and upstream")
            }
            HubOutcome::NoCredentials(reason) if self.may_warn_about_hub() => {
                warn!(hub = %hub.url(), %reason, "cannot read the hub credentials; serving from the cache and upstream")
            }
            HubOutcome::Refused(status) if self.may_warn_about_hub() => warn!(
                hub = %hub.url(),
                status = status.as_u16(),
                "the hub refused pullproxy's credentials; check hub.username and the password source"
            ),
            _ => {}
        }
        None
    }

    /// The answer when the upstream cannot be asked and nothing local can stand in; counted.
    fn unreachable(&self, origin: &Origin, e: &UpstreamError) -> Response<ProxyBody> {
        self.metrics
            .upstream_error(origin.authority.as_str(), e.reason());
        oci_error(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Unsupported,
            &e.to_string(),
        )
    }

    fn may_warn_about_hub(&self) -> bool {
        let now = crate::telemetry::unix_secs();
        let last = self.hub_warned.load(Ordering::Relaxed);
        now >= last + HUB_WARN_EVERY.as_secs()
            && self
                .hub_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// An upstream manifest whose bytes do not hash to the digest it was asked for (or announced).
struct DigestDisagrees;

/// Whether a client may be served cached content.
enum Access {
    Granted,
    /// The upstream could not be asked: stale-if-error applies.
    CannotAsk,
    /// The upstream said no (401, 403, 404): its answer goes to the client.
    Refused(Response<ProxyBody>),
}

fn path_of(req: &Request<Incoming>) -> PathAndQuery {
    req.uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

fn small_response(s: Small) -> Response<ProxyBody> {
    let mut resp = Response::new(client::full(s.body));
    *resp.status_mut() = s.status;
    *resp.headers_mut() = s.headers;
    crate::upstream::strip_hop_by_hop(resp.headers_mut());
    resp
}

fn manifest_response(m: &Manifest, method: &Method) -> Response<ProxyBody> {
    let body = if *method == Method::HEAD {
        client::empty()
    } else {
        client::full(m.bytes.clone())
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    digest_headers(h, &m.digest);
    api_version(r)
}

fn blob_head(digest: &Digest, len: u64) -> Response<ProxyBody> {
    let mut r = Response::new(client::empty());
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    digest_headers(h, digest);
    api_version(r)
}

fn blob_response(digest: &Digest, blob: BlobResponse) -> Response<ProxyBody> {
    let (status, length, content_range) = match blob.range {
        BodyRange::Full => (StatusCode::OK, blob.len, None),
        BodyRange::Partial(r) => (
            StatusCode::PARTIAL_CONTENT,
            Some(r.end - r.start + 1),
            blob.len.map(|total| r.content_range(total)),
        ),
        BodyRange::Unsatisfiable(u) => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Some(0),
            Some(u.content_range()),
        ),
    };
    let body = StreamBody::new(
        blob.body
            .map_ok(Frame::data)
            .map_err(client::BoxError::from),
    );
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Some(len) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    digest_headers(h, digest);
    api_version(r)
}

fn digest_headers(h: &mut HeaderMap, digest: &Digest) {
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
}
