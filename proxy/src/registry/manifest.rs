//! Manifests: the hub, then (by digest) the cache under the content rule, then the upstream;
//! tags are always re-validated upstream and served from the cache only when it cannot be asked.
//! What the upstream serves is verified against its digest (sha256 or sha512), cached, and its
//! references linked to the repository.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header, request::Parts};
use http_body_util::BodyExt as _;
use tracing::warn;

use super::{
    ConnContext, HubAnswer, RegistryProxy,
    content::{Ask, Verdict},
    not_entitled, path_of,
    respond::{api_version, digest_headers, oci_error, relay},
    served::Source,
    small_response,
};
use crate::{
    cache::{MAX_MANIFEST_BYTES, Manifest, TagTarget},
    oci::{Digest, ErrorCode, ManifestRefs, Reference, RepositoryName, media_type},
    origins::client::{self, ProxyBody},
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::{Small, UpstreamError},
};

/// A manifest whose bytes do not hash to the digest it was asked for (or announced).
struct DigestDisagrees;

/// What the node tier did with a manifest request.
enum FromHub {
    /// Answered it (the hub's answer, or this node's copy of what the hub served).
    Served((Source, Response<ProxyBody>)),
    /// The hub does not have it (or there is no hub).
    Missing,
    /// The hub cannot be asked and this node has nothing from it for this request.
    Unavailable,
}

/// How long reading a manifest the hub is sending may take.
const HUB_MANIFEST_READ: std::time::Duration = std::time::Duration::from_secs(15);

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    pub(super) async fn manifest(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        reference: &Reference,
    ) -> (Source, Response<ProxyBody>) {
        let method = &req.method;
        // Every Accept line the client sent (Go clients send one per media type): a registry
        // that sees only some of them converts the manifest (down to schema 1, even).
        let mut hub_headers = HeaderMap::new();
        for accept in req.headers.get_all(header::ACCEPT) {
            hub_headers.append(header::ACCEPT, accept.clone());
        }
        if hub_headers.is_empty() {
            hub_headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(media_type::MANIFEST_ACCEPT),
            );
        }
        let not_from_hub = match self
            .manifest_from_hub(ctx, req, name, reference, hub_headers)
            .await
        {
            FromHub::Served(answer) => return answer,
            // Not from the hub (it lacks it, or cannot say): write-back checks before pushing.
            FromHub::Missing | FromHub::Unavailable => self.hub.is_some(),
        };

        let path = path_of(req);
        let ask = Ask {
            origin: &ctx.origin,
            repo: name,
            path: &path,
            headers: &req.headers,
        };
        // A manifest by digest never changes: the cached copy, under the content rule.
        if let Reference::Digest(digest) = reference
            && let Some(m) = self.cache.manifests().get(digest).await
        {
            return match self.content.may_serve(&ask, digest).await {
                Verdict::Serve(source) => (source, manifest_response(&m, method)),
                Verdict::Refused(s) => (Source::Upstream, small_response(s)),
                Verdict::Unavailable => (
                    Source::Local,
                    not_entitled(&self.content, ctx, &req.headers, name, "manifest"),
                ),
                Verdict::NoSuchHost(e) => (Source::Local, self.upstream_failed(ctx, &e)),
            };
        }

        let registry = ctx.origin.authority.as_str();
        let upstream = self
            .upstream
            .small(&ctx.origin, method.clone(), &path, &req.headers)
            .await;
        if let Ok(s) = &upstream {
            self.metrics.ratelimit(&ctx.label, &s.headers);
        }
        let why = match upstream {
            Ok(s) if s.status.is_success() => {
                return match self.remember_manifest(&ask, reference, method, &s).await {
                    Ok(digest) => {
                        if not_from_hub
                            && *method == Method::GET
                            && let (Some(wb), Some(digest)) = (&self.write_back, digest)
                        {
                            let anonymous = !req.headers.contains_key(header::AUTHORIZATION);
                            wb.offer(registry, name, &digest, anonymous).await;
                        }
                        (Source::Upstream, small_response(s))
                    }
                    Err(DigestDisagrees) => (
                        Source::Upstream,
                        oci_error(
                            StatusCode::BAD_GATEWAY,
                            ErrorCode::ManifestInvalid,
                            "the upstream manifest does not match its digest",
                        ),
                    ),
                };
            }
            Ok(s) if !s.status.is_server_error() => {
                self.content.refused(&ask, s.status, &s.headers).await;
                return (Source::Upstream, small_response(s));
            }
            Err(e @ UpstreamError::NoSuchHost { .. }) => {
                return (Source::Local, self.upstream_failed(ctx, &e));
            }
            other => other,
        };
        // The upstream cannot be asked (or is failing): what the cache knows, to a client
        // entitled to it.
        let reason = match &why {
            Ok(s) => {
                self.metrics.upstream_error(&ctx.label, "server_error");
                format!("upstream answered {}", s.status)
            }
            Err(e) => {
                self.metrics.upstream_error(&ctx.label, e.reason());
                e.to_string()
            }
        };
        if let Some(m) = self.stale_manifest(&ask, reference).await {
            warn!(registry, repository = %name, %reference, %reason, "upstream unavailable; serving the cached manifest");
            return (Source::Stale, manifest_response(&m, method));
        }
        // Something is cached for this tag, but not for this client: the registry's challenge
        // to a client without credentials, who may turn out entitled once authenticated.
        if self.stale_candidate(&ask, reference) {
            return (
                Source::Local,
                not_entitled(&self.content, ctx, &req.headers, name, "manifest"),
            );
        }
        match why {
            Ok(s) => (Source::Upstream, small_response(s)),
            Err(e) => (Source::Local, self.upstream_failed(ctx, &e)),
        }
    }

    /// Whether the cache has a manifest for `reference` of the asked repository at all.
    fn stale_candidate(&self, ask: &Ask<'_>, reference: &Reference) -> bool {
        match reference {
            Reference::Tag(tag) => self
                .cache
                .tags()
                .get(ask.origin.authority.as_str(), ask.repo, tag)
                .is_some(),
            Reference::Digest(d) => {
                self.cache
                    .repos()
                    .holds(ask.origin.authority.as_str(), ask.repo, d)
            }
        }
    }

    /// The cached manifest for `reference` if this client may have it without the upstream.
    async fn stale_manifest(&self, ask: &Ask<'_>, reference: &Reference) -> Option<Manifest> {
        let registry = ask.origin.authority.as_str();
        let digest = match reference {
            Reference::Tag(tag) => self.cache.tags().get(registry, ask.repo, tag)?.digest,
            Reference::Digest(d) => d.clone(),
        };
        if !self.content.may_serve_offline(ask, &digest) {
            return None;
        }
        self.cache.manifests().get(&digest).await
    }

    /// Takes in what the upstream answered for a manifest (see [`Self::keep_manifest`]), tells
    /// the content rule the upstream vouched for it, and returns its digest if known.
    async fn remember_manifest(
        &self,
        ask: &Ask<'_>,
        reference: &Reference,
        method: &Method,
        s: &Small,
    ) -> Result<Option<Digest>, DigestDisagrees> {
        let linked = self
            .keep_manifest(
                ask.origin.authority.as_str(),
                ask.repo,
                reference,
                method,
                &s.headers,
                &s.body,
            )
            .await?;
        if !linked.is_empty() {
            self.content.confirmed(ask, &linked).await;
        }
        // keep_manifest puts the manifest itself last.
        Ok(linked.last().cloned())
    }

    /// The node tier for manifests. By digest, what the hub served for this repository is served
    /// from this node. Otherwise the hub is asked (tags every time: the hub is authoritative for
    /// the tags it holds); what it serves is verified, kept and recorded. While it cannot be
    /// asked, a tag it served before is served from this node. Otherwise on to the cache and the
    /// upstream.
    async fn manifest_from_hub(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        reference: &Reference,
        accept: HeaderMap,
    ) -> FromHub {
        let registry = ctx.origin.authority.as_str();
        let method = &req.method;
        if let Reference::Digest(d) = reference
            && self.cache.repos().hub_holds(registry, name, d)
            && let Some(m) = self.cache.manifests().get(d).await
        {
            return FromHub::Served((Source::Node, manifest_response(&m, method)));
        }
        let resp = match self
            .hub_lookup(
                ctx,
                method,
                name,
                "manifests",
                &reference.to_string(),
                accept,
            )
            .await
        {
            HubAnswer::Found(resp) => resp,
            HubAnswer::Missing => return FromHub::Missing,
            HubAnswer::Unavailable => {
                return match self.node_copy_of_hub_tag(registry, name, reference).await {
                    Some(m) => FromHub::Served((Source::Node, manifest_response(&m, method))),
                    None => FromHub::Unavailable,
                };
            }
        };
        if !resp.status().is_success() {
            return FromHub::Served((Source::Hub, relay(resp, self.idle_timeout)));
        }
        let (parts, body) = resp.into_parts();
        let body = if *method == Method::GET {
            match tokio::time::timeout(HUB_MANIFEST_READ, read_manifest(body)).await {
                Ok(Some(bytes)) => bytes,
                _ => {
                    warn!(registry, repository = %name, %reference, "the hub's manifest could not be read whole");
                    return FromHub::Unavailable;
                }
            }
        } else {
            Bytes::new()
        };
        match self
            .keep_manifest(registry, name, reference, method, &parts.headers, &body)
            .await
        {
            Ok(linked) => self.hub_served(registry, name, &linked).await,
            Err(DigestDisagrees) => {
                return FromHub::Served((
                    Source::Hub,
                    oci_error(
                        StatusCode::BAD_GATEWAY,
                        ErrorCode::ManifestInvalid,
                        "the hub's manifest does not match its digest",
                    ),
                ));
            }
        }
        let mut resp = Response::from_parts(parts, client::full(body));
        crate::origins::upstream::strip_hop_by_hop(resp.headers_mut());
        FromHub::Served((Source::Hub, resp))
    }

    /// While the hub cannot be asked: this node's copy of the manifest a tag pointed to when the
    /// hub last served it.
    async fn node_copy_of_hub_tag(
        &self,
        registry: &str,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Option<Manifest> {
        let Reference::Tag(tag) = reference else {
            return None;
        };
        let target = self.cache.tags().get(registry, name, tag)?;
        if !self.cache.repos().hub_holds(registry, name, &target.digest) {
            return None;
        }
        self.cache.manifests().get(&target.digest).await
    }

    /// Takes in a manifest answer (hub or upstream): the bytes, verified against the digest asked
    /// for (or announced), cached by digest (GET), where the tag points; returns the digests to
    /// link to the repository (the manifest and everything it references).
    async fn keep_manifest(
        &self,
        registry: &str,
        name: &RepositoryName,
        reference: &Reference,
        method: &Method,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Vec<Digest>, DigestDisagrees> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let announced: Option<Digest> = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => announced,
        };
        let mut linked = Vec::new();
        let digest = if *method == Method::GET {
            let digest = match expected {
                Some(expected) => {
                    let computed = Digest::compute(expected.algorithm(), body);
                    if computed != expected {
                        self.metrics.digest_mismatch();
                        warn!(registry, repository = %name, %reference, %computed, %expected, "manifest does not match its digest; not cached");
                        return Err(DigestDisagrees);
                    }
                    expected
                }
                None => Digest::sha256_of(body),
            };
            if media_type::is_manifest(&content_type) {
                if let Err(e) = self
                    .cache
                    .manifests()
                    .put(&digest, &content_type, body.clone())
                    .await
                {
                    warn!(registry, repository = %name, error = %e, "caching a manifest failed");
                }
                linked = ManifestRefs::parse(body).digests();
            }
            Some(digest)
        } else {
            expected
        };
        let Some(digest) = digest else {
            return Ok(linked);
        };
        if let Reference::Tag(tag) = reference
            && media_type::is_manifest(&content_type)
        {
            let target = TagTarget {
                digest: digest.clone(),
                media_type: content_type,
            };
            if let Err(e) = self.cache.tags().put(registry, name, tag, &target).await {
                warn!(registry, repository = %name, error = %e, "recording a tag failed");
            }
        }
        linked.push(digest);
        Ok(linked)
    }
}

/// A manifest body, whole, if it is no larger than a manifest may be.
async fn read_manifest(mut body: ProxyBody) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > MAX_MANIFEST_BYTES {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
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
