//! Blobs down the chain ([`super::chain`]): from this node's copy of what the hub served, the
//! hub, the cache under the content rule, then one upstream fetch per blob however many clients
//! ask (streamed to each, verified, cached). Every tier's bytes go through the download cache's
//! single flight, and every client is checked before it joins one.

use futures_util::TryStreamExt as _;
use http::{HeaderMap, Method, Response, StatusCode, header, request::Parts};
use http_body_util::BodyExt;
use tracing::{debug, warn};

use super::{
    ConnContext, RegistryProxy,
    chain::{Answer, Content, Failure, Pull},
    respond::{blob_head, blob_response, relay},
    served::Source,
    small_response,
};
use crate::{
    cache::{BlobResponse, BlobSource, FlightOutcome, UpstreamBlob},
    oci::{ByteRange, Digest, RepositoryName},
    origins::client::ProxyBody,
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::UpstreamError,
};

/// Why a blob could not be fetched upstream.
enum FetchError {
    /// The upstream answered, but not with the blob (401, 404, ...): relayed to the client.
    Status(Box<Response<ProxyBody>>),
    Failed(UpstreamError),
}

/// A blob request.
struct BlobPull<'a> {
    digest: &'a Digest,
    /// The client's range; one that does not parse is ignored, as RFC 9110 asks: the whole blob.
    range: Option<ByteRange>,
    /// Whether this node had the bytes (or was receiving them) when the request came in.
    here: bool,
    /// Whether they are here, and because the hub served them for this repository.
    node_holds: bool,
}

impl<H: HubSource, U: UpstreamSource> Content<H, U> for BlobPull<'_> {
    const WHAT: &'static str = "blob";
    const SEGMENT: &'static str = "blobs";
    /// The bytes are served by the download cache (in [`Content::fetch`]), once cleared.
    type Cached = ();

    fn digest(&self) -> Option<&Digest> {
        Some(self.digest)
    }

    async fn node_copy(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Option<Answer> {
        if !self.node_holds {
            return None;
        }
        self.serve_from_node(p, q, None).await
    }

    fn hub_request(&self, q: &Pull<'_>) -> Option<(Method, HeaderMap)> {
        if self.node_holds {
            return None;
        }
        // Only the head when the bytes are here already (or the client asks only that).
        let method = if self.here || *q.method() == Method::HEAD {
            Method::HEAD
        } else {
            Method::GET
        };
        Some((method, HeaderMap::new()))
    }

    /// A blob the hub has is served from this node's copy, or fetched from the hub once (whole,
    /// verified and kept, however many clients ask).
    async fn keep_hub_answer(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        resp: Response<ProxyBody>,
    ) -> Option<Answer> {
        if resp.status() != StatusCode::OK {
            return Some((Source::Hub, relay(resp, p.idle_timeout)));
        }
        p.hub_served(q.registry(), q.name, std::slice::from_ref(self.digest))
            .await;
        if *q.method() == Method::HEAD && !self.here {
            return Some((Source::Hub, relay(resp, p.idle_timeout)));
        }
        // The hub was sent a GET exactly when the bytes were neither here nor only a HEAD asked.
        let hub_body = (!self.here).then_some(resp);
        self.serve_from_node(p, q, hub_body).await
    }

    async fn cached(&self, p: &RegistryProxy<H, U>, _q: &Pull<'_>) -> Option<()> {
        let blobs = p.cache.blobs();
        (blobs.in_flight(self.digest) || blobs.lookup(self.digest).await.is_some()).then_some(())
    }

    /// The cleared copy, the download under way, or this request's own upstream fetch; a client
    /// that was not cleared is checked like any other before it gets bytes someone else fetched.
    async fn fetch(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        cleared: Option<(Source, ())>,
    ) -> Result<Answer, Failure> {
        let (ctx, digest) = (q.ctx, self.digest);
        let mut allowed = cleared.map(|(source, ())| source);
        if *q.method() == Method::HEAD {
            return self.head(p, q, allowed).await;
        }
        let ask = q.ask();
        loop {
            match p.get_or_fetch(q, digest, self.range).await {
                Ok(blob) if blob.source == BlobSource::Fetched => {
                    // This request's own upstream GET succeeded: that was the check.
                    p.content
                        .confirmed(&ask, std::slice::from_ref(digest))
                        .await;
                    p.watch_flight(ctx, q.name, digest, &blob);
                    return Ok((Source::Upstream, blob_response(digest, blob, None)));
                }
                Ok(blob) => match allowed {
                    Some(source) => {
                        let source = if blob.source == BlobSource::Hit {
                            source
                        } else {
                            Source::Upstream
                        };
                        let files = ctx.files.as_deref();
                        return Ok((source, blob_response(digest, blob, files)));
                    }
                    None => {
                        // Another request cached it or started fetching it since it was looked
                        // up: this client is checked like any other before it gets the bytes.
                        drop(blob);
                        match p.clear(q, digest, "blob").await {
                            Ok(source) => allowed = Some(source),
                            Err(refusal) => return Ok(*refusal),
                        }
                    }
                },
                Err(FetchError::Status(resp)) if resp.status().is_server_error() => {
                    return Err(Failure::Status(resp));
                }
                Err(FetchError::Status(resp)) => {
                    p.content.refused(&ask, resp.status(), resp.headers()).await;
                    return Ok((Source::Upstream, *resp));
                }
                Err(FetchError::Failed(e)) => return Err(Failure::Error(e)),
            }
        }
    }
}

impl BlobPull<'_> {
    /// HEAD: the cleared copy's length, or the upstream's answer.
    async fn head<H: HubSource, U: UpstreamSource>(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        allowed: Option<Source>,
    ) -> Result<Answer, Failure> {
        let digest = self.digest;
        if let (Some(source), Some(len)) = (allowed, p.cache.blobs().lookup(digest).await) {
            return Ok((source, blob_head(digest, len)));
        }
        let mut headers = q.req.headers.clone();
        headers.remove(header::RANGE);
        let ask = q.ask();
        match p
            .upstream
            .small(&q.ctx.origin, Method::HEAD, &q.path, &headers)
            .await
        {
            Ok(s) if s.status.is_success() => {
                p.content
                    .confirmed(&ask, std::slice::from_ref(digest))
                    .await;
                Ok((Source::Upstream, small_response(s)))
            }
            Ok(s) if s.status.is_server_error() => {
                Err(Failure::Status(Box::new(small_response(s))))
            }
            Ok(s) => {
                p.content.refused(&ask, s.status, &s.headers).await;
                Ok((Source::Upstream, small_response(s)))
            }
            Err(e) => Err(Failure::Error(e)),
        }
    }

    /// The bytes from this node, from a download under way, or from the hub's answer in hand
    /// (streamed to this client and into the cache at once); for HEAD, this node's length.
    /// `None`: gone from the node (evicted since it was looked up) and not from the hub either:
    /// the cache and upstream decide.
    async fn serve_from_node<H: HubSource, U: UpstreamSource>(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        hub_body: Option<Response<ProxyBody>>,
    ) -> Option<Answer> {
        let (digest, blobs) = (self.digest, p.cache.blobs());
        if *q.method() == Method::HEAD {
            let len = blobs.lookup(digest).await?;
            return Some((Source::Node, blob_head(digest, len)));
        }
        let fetch = || async move {
            hub_body
                .map(upstream_blob)
                .ok_or(FetchError::Failed(UpstreamError::Unreachable {
                    host: "the hub".into(),
                    reason: "the node's copy was evicted".into(),
                }))
        };
        let blob = blobs.get_or_fetch(digest, self.range, fetch).await.ok()?;
        let source = if blob.source == BlobSource::Hit {
            Source::Node
        } else {
            Source::Hub
        };
        if blob.source == BlobSource::Fetched {
            p.watch_flight(q.ctx, q.name, digest, &blob);
        }
        Some((source, blob_response(digest, blob, q.ctx.files.as_deref())))
    }
}

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    pub(super) async fn blob(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        digest: &Digest,
    ) -> Answer {
        let range = req
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(ByteRange::parse);
        let blobs = self.cache.blobs();
        let here = blobs.lookup(digest).await.is_some() || blobs.in_flight(digest);
        let kind = BlobPull {
            digest,
            range,
            here,
            node_holds: here
                && self
                    .cache
                    .repos()
                    .hub_holds(ctx.origin.authority.as_str(), name, digest),
        };
        self.serve(&Pull::new(ctx, req, name, digest), &kind).await
    }

    /// The blob from the cache, the download under way, or this request's own upstream GET (of
    /// the whole blob: that is what gets cached and verified; this client's range is cut from it).
    async fn get_or_fetch(
        &self,
        q: &Pull<'_>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobResponse, FetchError> {
        let mut fetch_headers = q.req.headers.clone();
        fetch_headers.remove(header::RANGE);
        let fetch = || async {
            let resp = self
                .upstream
                .blob(&q.ctx.origin, Method::GET, &q.path, &fetch_headers)
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
