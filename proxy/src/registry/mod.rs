//! The registry proxy: answers a terminated connection's OCI requests.
//!
//! - Manifests and blobs go down one chain of sources, written once in [`chain`]: this node's
//!   copy of what the hub served, the hub, the cache, the upstream (with the client's own
//!   credentials), and stale-if-error. `manifest.rs` and `blob.rs` hold only what differs.
//! - What is served from the cache is decided by one rule ([`content`]): the repository must be
//!   known to hold the content, and the client entitled to the repository.
//! - A tag the hub does not have is re-validated upstream every time (`imagePullPolicy: Always`
//!   stays correct); when the upstream cannot be asked, the cached mapping is served to entitled
//!   clients (stale-if-error).
//! - `/v2/`, tag lists and everything else go to the upstream.
//!
//! The hub and the upstream are reached through [`crate::origins::sources`]' traits, so everything here runs
//! in-process against fakes in the tests (`tests/`; the chain's own decisions in `tests/chain.rs`).

mod access;
mod blob;
mod chain;
pub(crate) mod content;
mod manifest;
mod metrics;
mod respond;
mod served;
#[cfg(test)]
mod tests;

use std::{
    fs::File,
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use http::{HeaderMap, Request, Response, StatusCode, header, request::Parts, uri::PathAndQuery};
use tracing::{debug, warn};

use self::{
    chain::HubAnswer,
    content::ContentRule,
    respond::{json, logged, oci_error, relay},
};
pub(crate) use self::{
    metrics::RegistryMetrics,
    respond::RequestRecord,
    served::{Kind, Source},
};
use crate::{
    cache::Cache,
    oci::{ErrorCode, RepositoryName, Route},
    origins::client::{self, ProxyBody},
    origins::hub::HubClient,
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::{Origin, Small, Upstream, UpstreamError},
    origins::writeback::WriteBack,
};

/// What is known about a terminated connection.
pub(crate) struct ConnContext {
    /// The registry the client talks to, and where its connection was going.
    pub(crate) origin: Origin,
    /// The process that opened the connection, as the kernel recorded it (absent when a client
    /// connected to the proxy port directly).
    pub(crate) caller: Option<Caller>,
    /// The registry's label in metrics: a configured name or pattern, never an open-ended
    /// client-chosen name (logs carry the full name).
    pub(crate) label: String,
    /// Where cached blobs' file ranges go when the connection's transport sends files itself
    /// (kernel TLS); `None`: bodies carry the bytes.
    pub(crate) files: Option<Box<dyn SendsFiles>>,
}

/// Who opened a redirected connection: what request logs and metrics name.
pub(crate) struct Caller {
    pub(crate) pid: u32,
    pub(crate) comm: String,
}

/// A connection's transport that sends cached file ranges itself (kernel TLS with `sendfile`),
/// so a cache hit's body is the range, not its bytes.
pub(crate) trait SendsFiles: Send + Sync {
    /// A body that has the transport send `start..end` of `file`.
    fn file_body(&self, file: Arc<File>, start: u64, end: u64) -> ProxyBody;
}

/// Serves registry requests.
pub(crate) struct RegistryProxy<H = HubClient, U = Upstream> {
    hub: Option<Arc<H>>,
    upstream: Arc<U>,
    cache: Arc<Cache>,
    content: ContentRule<U>,
    pub(crate) metrics: Arc<RegistryMetrics>,
    /// Idle timeout for relayed bodies.
    idle_timeout: Duration,
    /// When hub trouble was last logged (unix seconds).
    hub_warned: AtomicU64,
    /// Pushes what upstreams served into the hub.
    write_back: Option<WriteBack<H>>,
}

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    pub(crate) fn new(
        hub: Option<Arc<H>>,
        upstream: Arc<U>,
        cache: Arc<Cache>,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            hub,
            content: ContentRule::new(cache.clone(), upstream.clone()),
            upstream,
            cache,
            metrics: Arc::default(),
            idle_timeout,
            hub_warned: AtomicU64::new(0),
            write_back: None,
        }
    }

    /// Writes what upstreams serve (because the hub lacked it) back into the hub.
    pub(crate) fn with_write_back(mut self, write_back: WriteBack<H>) -> Self {
        self.write_back = Some(write_back);
        self
    }

    /// Answers one request of a terminated connection.
    pub(crate) async fn handle(
        &self,
        ctx: &ConnContext,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let route = Route::parse(req.method(), req.uri().path());
        let mut record = RequestRecord {
            metrics: self.metrics.clone(),
            registry: ctx.origin.authority.to_string(),
            label: ctx.label.clone(),
            repository: String::new(),
            reference: String::new(),
            method: req.method().clone(),
            kind: Kind::Other,
            comm: ctx
                .caller
                .as_ref()
                .map(|c| c.comm.clone())
                .unwrap_or_default(),
            pid: ctx.caller.as_ref().map_or(0, |c| c.pid),
            started: Instant::now(),
        };
        let route = match route {
            Err(e) => {
                self.metrics.invalid_request(e.reason());
                warn!(
                    registry = %record.registry,
                    path = %req.uri().path(),
                    error = %e,
                    "invalid registry request refused"
                );
                return logged(
                    record,
                    Source::Local,
                    oci_error(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
                );
            }
            Ok(Route::Other) => {
                record.reference = req.uri().path().to_owned();
                let resp = match self.upstream.forward(&ctx.origin, req).await {
                    Ok(resp) => resp,
                    Err(e) => self.upstream_failed(ctx, &e),
                };
                return logged(record, Source::Passthrough, resp);
            }
            Ok(route) => route,
        };
        // Registry reads have no body worth keeping; the head is what they are answered by.
        let (req, _) = req.into_parts();
        let (source, resp) = match route {
            Route::Base => self.base(ctx, &req).await,
            Route::TagsList { name } => {
                record.repository = name.to_string();
                self.tags(ctx, &req, &name).await
            }
            Route::Manifest { name, reference } => {
                record.kind = Kind::Manifest;
                record.repository = name.to_string();
                record.reference = reference.to_string();
                self.manifest(ctx, &req, &name, &reference).await
            }
            Route::Blob { name, digest } => {
                record.kind = Kind::Blob;
                record.repository = name.to_string();
                record.reference = digest.to_string();
                self.blob(ctx, &req, &name, &digest).await
            }
            Route::Other => unreachable!("forwarded above"),
        };
        logged(record, source, resp)
    }

    /// `/v2/`: the upstream's answer (a 401 challenge starts the client's token flow); when the
    /// upstream cannot be reached, pullproxy says "API v2 here" itself so hub and cached content
    /// stay reachable.
    async fn base(&self, ctx: &ConnContext, req: &Parts) -> (Source, Response<ProxyBody>) {
        match self
            .upstream
            .small(&ctx.origin, req.method.clone(), &path_of(req), &req.headers)
            .await
        {
            Ok(s) if !s.status.is_server_error() => {
                self.content
                    .learn_challenge(ctx.origin.authority.as_str(), s.status, &s.headers);
                (Source::Upstream, small_response(s))
            }
            Err(e @ UpstreamError::NoSuchHost { .. }) => {
                (Source::Local, self.upstream_failed(ctx, &e))
            }
            other => {
                debug!(registry = %ctx.origin.authority, upstream = ?other.err(), "answering /v2/ locally");
                // The registry's challenge, if it has one: clients authenticate as usual.
                let resp = offline_challenge(&self.content, ctx, &req.headers, None)
                    .unwrap_or_else(|| json(StatusCode::OK, "{}".into()));
                (Source::Local, resp)
            }
        }
    }

    /// Tag lists: the upstream's, or the hub's when the upstream cannot be asked.
    async fn tags(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
    ) -> (Source, Response<ProxyBody>) {
        let upstream = self
            .upstream
            .small(&ctx.origin, req.method.clone(), &path_of(req), &req.headers)
            .await;
        match upstream {
            Ok(s) if !s.status.is_server_error() => return (Source::Upstream, small_response(s)),
            Ok(s) => debug!(status = %s.status, "upstream tag list failed"),
            Err(e @ UpstreamError::NoSuchHost { .. }) => {
                return (Source::Local, self.upstream_failed(ctx, &e));
            }
            Err(e) => debug!(error = %e, "upstream tag list failed"),
        }
        match self
            .hub_lookup(ctx, &req.method, name, "tags", "list", HeaderMap::new())
            .await
        {
            HubAnswer::Found(resp) => (Source::Hub, relay(resp, self.idle_timeout)),
            HubAnswer::Missing | HubAnswer::Unavailable => (
                Source::Local,
                oci_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::NameUnknown,
                    "upstream unreachable and the hub has no such repository",
                ),
            ),
        }
    }

    /// The answer when the upstream failed and nothing local can stand in ([`failed`]); counted.
    fn upstream_failed(&self, ctx: &ConnContext, e: &UpstreamError) -> Response<ProxyBody> {
        self.metrics.upstream_error(&ctx.label, e.reason());
        failed(e)
    }
}

/// While the upstream cannot be asked, a client without credentials gets the registry's own
/// challenge (if it ever sent one): it then authenticates as usual and may turn out entitled.
fn offline_challenge<U: UpstreamSource>(
    content: &ContentRule<U>,
    ctx: &ConnContext,
    headers: &HeaderMap,
    repo: Option<&RepositoryName>,
) -> Option<Response<ProxyBody>> {
    if headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let challenge = content.challenge(ctx.origin.authority.as_str(), repo)?;
    let mut r = oci_error(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        "authentication required",
    );
    r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    Some(r)
}

/// The answer for an upstream that failed: a name that does not exist is 404 (`NAME_UNKNOWN`),
/// anything else 502.
fn failed(e: &UpstreamError) -> Response<ProxyBody> {
    match e {
        UpstreamError::NoSuchHost { .. } => oci_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            &e.to_string(),
        ),
        _ => oci_error(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Unsupported,
            &e.to_string(),
        ),
    }
}

fn path_of(req: &Parts) -> PathAndQuery {
    req.uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

fn small_response(s: Small) -> Response<ProxyBody> {
    let mut resp = Response::new(client::full(s.body));
    *resp.status_mut() = s.status;
    *resp.headers_mut() = s.headers;
    crate::origins::upstream::strip_hop_by_hop(resp.headers_mut());
    resp
}
