//! Blobs: the hub, then the cache under the content rule, then one upstream fetch per blob
//! however many clients ask (streamed to each, verified, cached).

use futures_util::TryStreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header, request::Parts};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tracing::{debug, warn};

use super::{
    ConnContext, HubAnswer, RegistryProxy, SendsFiles,
    content::{Ask, Verdict},
    not_entitled, path_of,
    respond::{api_version, digest_headers, relay},
    served::Source,
    small_response,
};
use crate::{
    cache::{BlobResponse, BlobSource, BodyRange, FlightOutcome, UpstreamBlob},
    oci::{ByteRange, Digest, RepositoryName},
    origins::client::{self, ProxyBody},
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::UpstreamError,
};

/// Why a blob could not be fetched upstream.
enum FetchError {
    /// The upstream answered, but not with the blob (401, 404, ...): relayed to the client.
    Status(Box<Response<ProxyBody>>),
    Failed(UpstreamError),
}

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    pub(super) async fn blob(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        digest: &Digest,
    ) -> (Source, Response<ProxyBody>) {
        let method = &req.method;
        // A Range header that does not parse is ignored, as RFC 9110 asks: the whole blob, 200.
        let range_header = req.headers.get(header::RANGE);
        let range = range_header
            .and_then(|v| v.to_str().ok())
            .and_then(ByteRange::parse);
        if let Some(answer) = self.blob_from_hub(ctx, req, name, digest, range).await {
            return answer;
        }

        let path = path_of(req);
        let ask = Ask {
            origin: &ctx.origin,
            repo: name,
            path: &path,
            headers: &req.headers,
        };
        // Content that is here (or arriving) goes to this client only under the content rule.
        let mut allowed = None;
        let blobs = self.cache.blobs();
        if blobs.in_flight(digest) || blobs.lookup(digest).await.is_some() {
            match self.check(ctx, &ask, digest).await {
                Ok(source) => allowed = Some(source),
                Err(refusal) => return *refusal,
            }
        }

        if method == Method::HEAD {
            if let (Some(source), Some(len)) = (allowed, blobs.lookup(digest).await) {
                return (source, blob_head(digest, len));
            }
            let mut headers = req.headers.clone();
            headers.remove(header::RANGE);
            return match self
                .upstream
                .small(&ctx.origin, Method::HEAD, &path, &headers)
                .await
            {
                Ok(s) if s.status.is_success() => {
                    self.content
                        .confirmed(&ask, std::slice::from_ref(digest))
                        .await;
                    (Source::Upstream, small_response(s))
                }
                Ok(s) => {
                    self.content.refused(&ask, s.status, &s.headers).await;
                    (Source::Upstream, small_response(s))
                }
                Err(e) => (Source::Local, self.upstream_failed(ctx, &e)),
            };
        }

        loop {
            match self.get_or_fetch(ctx, req, digest, range).await {
                Ok(blob) if blob.source == BlobSource::Fetched => {
                    // This request's own upstream GET succeeded: that was the check.
                    self.content
                        .confirmed(&ask, std::slice::from_ref(digest))
                        .await;
                    self.watch_flight(ctx, name, digest, &blob);
                    return (Source::Upstream, blob_response(digest, blob, None));
                }
                Ok(blob) => match allowed {
                    Some(source) => {
                        let source = if blob.source == BlobSource::Hit {
                            source
                        } else {
                            Source::Upstream
                        };
                        return (source, blob_response(digest, blob, ctx.files.as_deref()));
                    }
                    None => {
                        // Another request cached it or started fetching it since it was looked
                        // up: this client is checked like any other before it gets the bytes.
                        drop(blob);
                        match self.check(ctx, &ask, digest).await {
                            Ok(source) => allowed = Some(source),
                            Err(refusal) => return *refusal,
                        }
                    }
                },
                Err(FetchError::Status(resp)) => {
                    self.content
                        .refused(&ask, resp.status(), resp.headers())
                        .await;
                    return (Source::Upstream, *resp);
                }
                Err(FetchError::Failed(e)) => {
                    return (Source::Local, self.upstream_failed(ctx, &e));
                }
            }
        }
    }

    /// The node tier. A blob the hub served for this repository is served from this node's disk,
    /// also while the hub is down; one the hub has is fetched from it once (whole, verified and
    /// kept, however many clients ask) and served from there. `None`: the hub does not have it,
    /// or cannot be asked and this node has no copy from it.
    async fn blob_from_hub(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Option<(Source, Response<ProxyBody>)> {
        let registry = ctx.origin.authority.as_str();
        let blobs = self.cache.blobs();
        let here = blobs.lookup(digest).await.is_some() || blobs.in_flight(digest);
        let mut hub_body = None;
        if !(here && self.cache.repos().hub_holds(registry, name, digest)) {
            // Only the head when the bytes are here already (or the client asks only that).
            let method = if here || req.method == Method::HEAD {
                Method::HEAD
            } else {
                Method::GET
            };
            let key = digest.to_string();
            match self
                .hub_lookup(ctx, &method, name, "blobs", &key, HeaderMap::new())
                .await
            {
                HubAnswer::Found(resp) if resp.status() == StatusCode::OK => {
                    self.hub_served(registry, name, std::slice::from_ref(digest))
                        .await;
                    if req.method == Method::HEAD && !here {
                        return Some((Source::Hub, relay(resp, self.idle_timeout)));
                    }
                    if method == Method::GET {
                        hub_body = Some(resp);
                    }
                }
                HubAnswer::Found(other) => {
                    return Some((Source::Hub, relay(other, self.idle_timeout)));
                }
                HubAnswer::Missing | HubAnswer::Unavailable => return None,
            }
        }
        if req.method == Method::HEAD {
            let len = blobs.lookup(digest).await?;
            return Some((Source::Node, blob_head(digest, len)));
        }
        // The bytes from this node, from a download under way, or from the hub's answer in hand
        // (streamed to this client and into the cache at once).
        // Evicted since it was looked up: nothing in hand, so the cache and upstream path decides.
        let fetch = || async move {
            hub_body
                .map(upstream_blob)
                .ok_or(FetchError::Failed(UpstreamError::Unreachable {
                    host: "the hub".into(),
                    reason: "the node's copy was evicted".into(),
                }))
        };
        match blobs.get_or_fetch(digest, range, fetch).await {
            Ok(blob) => {
                let source = if blob.source == BlobSource::Hit {
                    Source::Node
                } else {
                    Source::Hub
                };
                if blob.source == BlobSource::Fetched {
                    self.watch_flight(ctx, name, digest, &blob);
                }
                Some((source, blob_response(digest, blob, ctx.files.as_deref())))
            }
            // Gone from the node and from the hub: the cache and upstream path decides.
            Err(_) => None,
        }
    }

    /// The content rule for a cached (or arriving) blob: the source to serve it as, or the
    /// response that refuses it.
    async fn check(
        &self,
        ctx: &ConnContext,
        ask: &Ask<'_>,
        digest: &Digest,
    ) -> Result<Source, Box<(Source, Response<ProxyBody>)>> {
        let refusal = match self.content.may_serve(ask, digest).await {
            Verdict::Serve(source) => return Ok(source),
            Verdict::Refused(s) => (Source::Upstream, small_response(s)),
            Verdict::Unavailable => (
                Source::Local,
                not_entitled(&self.content, ctx, ask.headers, ask.repo, "blob"),
            ),
            Verdict::NoSuchHost(e) => (Source::Local, self.upstream_failed(ctx, &e)),
        };
        Err(Box::new(refusal))
    }

    /// The blob from the cache, the download under way, or this request's own upstream GET (of
    /// the whole blob: that is what gets cached and verified; this client's range is cut from it).
    async fn get_or_fetch(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobResponse, FetchError> {
        let mut fetch_headers = req.headers.clone();
        fetch_headers.remove(header::RANGE);
        let path = path_of(req);
        let fetch = || async {
            let resp = self
                .upstream
                .blob(&ctx.origin, Method::GET, &path, &fetch_headers)
                .await
                .map_err(FetchError::Failed)?;
            if resp.status() != StatusCode::OK {
                return Err(FetchError::Status(Box::new(resp)));
            }
            Ok(upstream_blob(resp))
        };
        self.cache.blobs().get_or_fetch(digest, range, fetch).await
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
        let outcome = blob.outcome.clone();
        let metrics = self.metrics.clone();
        let registry_label = ctx.label.clone();
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
                Some(FlightOutcome::NoRoom { .. }) => "no_room",
                Some(FlightOutcome::DigestMismatch(_)) => "digest_mismatch",
                Some(FlightOutcome::UpstreamFailed { .. }) => "upstream_failed",
                Some(FlightOutcome::FetchFailed) | None => "fetch_failed",
            };
            metrics.upstream_fetch(&registry_label, label);
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
                Some(FlightOutcome::NoRoom { error }) => warn!(
                    %registry, %repository, %digest, %error,
                    "blob served but not cached: it does not fit in the cache"
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
}

/// A 200 answer's body as a blob download for the cache.
fn upstream_blob(resp: Response<ProxyBody>) -> UpstreamBlob {
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp
        .into_body()
        .into_data_stream()
        .map_err(|e| std::io::Error::other(crate::telemetry::error_chain(e.as_ref())));
    UpstreamBlob::new(len, body)
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

/// The response for `blob`. A cached blob on a connection whose transport sends files itself
/// (`files`) goes out as its file range; everything else streams its bytes.
fn blob_response(
    digest: &Digest,
    blob: BlobResponse,
    files: Option<&dyn SendsFiles>,
) -> Response<ProxyBody> {
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
    let body = match (files, blob.file) {
        (Some(files), Some(range)) => files.file_body(range.file, range.start, range.end),
        _ => StreamBody::new(
            blob.body
                .map_ok(Frame::data)
                .map_err(client::BoxError::from),
        )
        .boxed_unsync(),
    };
    let mut r = Response::new(body);
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
