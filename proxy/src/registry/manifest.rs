//! Manifests down the chain ([`super::chain`]): by digest from this node or the cache, a tag
//! from the hub or re-validated upstream every time (served from the cache only when the upstream
//! cannot be asked). What the hub or the upstream serves is verified against its digest (sha256
//! or sha512), cached, and its references linked to the repository.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header, request::Parts};
use http_body_util::BodyExt as _;
use tracing::warn;

use super::{
    ConnContext, RegistryProxy,
    chain::{Answer, Content, Failure, Pull, Stale},
    content::Ask,
    respond::{manifest_response, oci_error, relay},
    served::Source,
    small_response,
};
use crate::{
    cache::{MAX_MANIFEST_BYTES, Manifest, TagTarget},
    oci::{Digest, ErrorCode, ManifestRefs, Reference, RepositoryName, media_type},
    origins::client::{self, ProxyBody},
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::Small,
};

/// A manifest whose bytes do not hash to the digest it was asked for (or announced).
struct DigestDisagrees;

/// How long reading a manifest the hub is sending may take.
const HUB_MANIFEST_READ: std::time::Duration = std::time::Duration::from_secs(15);

/// A manifest request: a tag or a digest.
struct ManifestPull<'a> {
    reference: &'a Reference,
}

impl<H: HubSource, U: UpstreamSource> Content<H, U> for ManifestPull<'_> {
    const WHAT: &'static str = "manifest";
    const SEGMENT: &'static str = "manifests";
    type Cached = Manifest;

    fn digest(&self) -> Option<&Digest> {
        self.by_digest()
    }

    async fn node_copy(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Option<Answer> {
        let d = self.by_digest()?;
        if !p.cache.repos().hub_holds(q.registry(), q.name, d) {
            return None;
        }
        let m = p.cache.manifests().get(d).await?;
        Some((Source::Node, manifest_response(&m, q.method())))
    }

    /// Asked every time, tags too: the hub is authoritative for the tags it holds.
    fn hub_request(&self, q: &Pull<'_>) -> Option<(Method, HeaderMap)> {
        // Every Accept line the client sent (Go clients send one per media type): a registry
        // that sees only some of them converts the manifest (down to schema 1, even).
        let mut headers = HeaderMap::new();
        for accept in q.req.headers.get_all(header::ACCEPT) {
            headers.append(header::ACCEPT, accept.clone());
        }
        if headers.is_empty() {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(media_type::MANIFEST_ACCEPT),
            );
        }
        Some((q.method().clone(), headers))
    }

    /// The hub's manifest, read whole, verified, kept and recorded as the hub's.
    async fn keep_hub_answer(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        resp: Response<ProxyBody>,
    ) -> Option<Answer> {
        let (registry, name, reference, method) =
            (q.registry(), q.name, self.reference, q.method());
        if !resp.status().is_success() {
            return Some((Source::Hub, relay(resp, p.idle_timeout)));
        }
        let (parts, body) = resp.into_parts();
        let body = if *method == Method::GET {
            match tokio::time::timeout(HUB_MANIFEST_READ, read_manifest(body)).await {
                Ok(Some(bytes)) => bytes,
                _ => {
                    warn!(registry, repository = %name, %reference, "the hub's manifest could not be read whole");
                    return None;
                }
            }
        } else {
            Bytes::new()
        };
        match p
            .keep_manifest(registry, name, reference, method, &parts.headers, &body)
            .await
        {
            Ok(linked) => p.hub_served(registry, name, &linked).await,
            Err(DigestDisagrees) => {
                return Some((
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
        Some((Source::Hub, resp))
    }

    async fn node_copy_of_tag(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Option<Answer> {
        let Reference::Tag(tag) = self.reference else {
            return None;
        };
        let target = p.cache.tags().get(q.registry(), q.name, tag)?;
        if !p
            .cache
            .repos()
            .hub_holds(q.registry(), q.name, &target.digest)
        {
            return None;
        }
        let m = p.cache.manifests().get(&target.digest).await?;
        Some((Source::Node, manifest_response(&m, q.method())))
    }

    async fn cached(&self, p: &RegistryProxy<H, U>, _q: &Pull<'_>) -> Option<Manifest> {
        p.cache.manifests().get(self.by_digest()?).await
    }

    /// The cleared copy, or the upstream's manifest: verified, kept, linked (and offered to
    /// write-back, since it did not come from the hub).
    async fn fetch(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        cleared: Option<(Source, Manifest)>,
    ) -> Result<Answer, Failure> {
        let method = q.method();
        if let Some((source, m)) = cleared {
            return Ok((source, manifest_response(&m, method)));
        }
        let ask = q.ask();
        let upstream = p
            .upstream
            .small(&q.ctx.origin, method.clone(), &q.path, &q.req.headers)
            .await;
        let s = match upstream {
            Ok(s) => s,
            Err(e) => return Err(Failure::Error(e)),
        };
        p.metrics.ratelimit(&q.ctx.label, &s.headers);
        if s.status.is_server_error() {
            return Err(Failure::Status(Box::new(small_response(s))));
        }
        if !s.status.is_success() {
            p.content.refused(&ask, s.status, &s.headers).await;
            return Ok((Source::Upstream, small_response(s)));
        }
        match p.remember_manifest(&ask, self.reference, method, &s).await {
            Ok(digest) => {
                if p.hub.is_some()
                    && *method == Method::GET
                    && let (Some(wb), Some(digest)) = (&p.write_back, digest)
                {
                    let anonymous = !q.req.headers.contains_key(header::AUTHORIZATION);
                    wb.offer(q.registry(), q.name, &digest, anonymous).await;
                }
                Ok((Source::Upstream, small_response(s)))
            }
            Err(DigestDisagrees) => Ok((
                Source::Upstream,
                oci_error(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::ManifestInvalid,
                    "the upstream manifest does not match its digest",
                ),
            )),
        }
    }

    /// The cached manifest, to a client entitled to it without the upstream; when something is
    /// cached for this tag or digest but not for this client: not entitled.
    async fn stale(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Stale {
        let registry = q.registry();
        let (digest, something) = match self.reference {
            Reference::Tag(tag) => match p.cache.tags().get(registry, q.name, tag) {
                Some(target) => (target.digest, true),
                None => return Stale::Nothing,
            },
            Reference::Digest(d) => (d.clone(), p.cache.repos().holds(registry, q.name, d)),
        };
        if p.content.may_serve_offline(&q.ask(), &digest)
            && let Some(m) = p.cache.manifests().get(&digest).await
        {
            return Stale::Copy(manifest_response(&m, q.method()));
        }
        if something {
            Stale::NotEntitled
        } else {
            Stale::Nothing
        }
    }
}

impl ManifestPull<'_> {
    fn by_digest(&self) -> Option<&Digest> {
        match self.reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    pub(super) async fn manifest(
        &self,
        ctx: &ConnContext,
        req: &Parts,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Answer {
        let q = Pull::new(ctx, req, name, reference);
        self.serve(&q, &ManifestPull { reference }).await
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
