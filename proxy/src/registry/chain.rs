//! The source chain: the one walk of the tiers that manifests and blobs both go through.
//!
//! 1. **The node tier.** Content by digest that the hub served for this repository, and that this
//!    node kept, is served from here without asking the hub: it cannot change.
//! 2. **The hub**, asked with pullproxy's own credentials. What it has is kept on this node and
//!    served. What it does not have goes on down the chain. While it cannot be asked (down,
//!    refusing pullproxy's credentials), what it served before still counts: a tag it served is
//!    served from this node's copy; anything else goes on down the chain.
//! 3. **The cache**, for content by digest only (a tag is re-validated upstream every time), and
//!    only under the content rule ([`super::content`]): what it decides ([`Verdict`]) is handled
//!    here once, for both kinds.
//! 4. **The upstream**, with the client's own credentials. Its answer is relayed; content it
//!    serves is verified and cached.
//! 5. **When the upstream fails** (cannot be asked, or answers 5xx): the cached copy to a client
//!    entitled to it (stale-if-error), else the registry's challenge to a client without
//!    credentials (or 503: the client is not known to be entitled), else the upstream's error. A
//!    name that does not resolve is no registry at all: nothing stands in for it.
//!
//! What differs per kind — how the hub is asked and its answer kept, how the cache and the
//! upstream are read, how responses are built — is behind [`Content`], implemented by
//! `manifest.rs` and `blob.rs`.

use std::fmt::Display;

use http::{HeaderMap, Method, Response, StatusCode, request::Parts, uri::PathAndQuery};
use tracing::{debug, warn};

use super::{
    ConnContext, RegistryProxy,
    content::{Ask, Verdict},
    offline_challenge, path_of,
    respond::oci_error,
    served::Source,
    small_response,
};
use crate::{
    oci::{Digest, ErrorCode, RepositoryName},
    origins::client::ProxyBody,
    origins::hub::HubOutcome,
    origins::sources::{HubSource, UpstreamSource},
    origins::upstream::UpstreamError,
};

/// Where an answer came from, and the answer.
pub(super) type Answer = (Source, Response<ProxyBody>);

/// One manifest or blob request, as every tier sees it.
pub(super) struct Pull<'a> {
    pub(super) ctx: &'a ConnContext,
    pub(super) req: &'a Parts,
    pub(super) name: &'a RepositoryName,
    /// The tag or digest asked for, as the hub is asked for it and logs name it.
    pub(super) reference: String,
    pub(super) path: PathAndQuery,
}

impl<'a> Pull<'a> {
    pub(super) fn new(
        ctx: &'a ConnContext,
        req: &'a Parts,
        name: &'a RepositoryName,
        reference: &dyn Display,
    ) -> Self {
        Pull {
            ctx,
            req,
            name,
            reference: reference.to_string(),
            path: path_of(req),
        }
    }

    /// The request as the content rule sees it.
    pub(super) fn ask(&self) -> Ask<'_> {
        Ask {
            origin: &self.ctx.origin,
            repo: self.name,
            path: &self.path,
            headers: &self.req.headers,
        }
    }

    pub(super) fn registry(&self) -> &str {
        self.ctx.origin.authority.as_str()
    }

    pub(super) fn method(&self) -> &Method {
        &self.req.method
    }
}

/// What the hub said (also for tag lists, outside the chain).
pub(super) enum HubAnswer {
    /// It has the content: its answer.
    Found(Response<ProxyBody>),
    /// It does not have it (or there is no hub).
    Missing,
    /// It cannot be asked (down, refusing pullproxy's credentials): what it served before, and
    /// this node kept, still counts.
    Unavailable,
}

/// Why the upstream did not serve the content: what step 5 stands in for.
pub(super) enum Failure {
    /// It answered with a server error: relayed if nothing stands in.
    Status(Box<Response<ProxyBody>>),
    /// It could not be asked.
    Error(UpstreamError),
}

/// What the cache holds for a request while the upstream fails.
pub(super) enum Stale {
    /// A copy this client is entitled to: served as [`Source::Stale`].
    Copy(Response<ProxyBody>),
    /// Something, but this client is not known to be entitled to it.
    NotEntitled,
    Nothing,
}

/// What differs between manifests and blobs on the way down the chain (one value per request).
pub(super) trait Content<H: HubSource, U: UpstreamSource> {
    /// `manifest` or `blob`, for refusals and logs.
    const WHAT: &'static str;
    /// `manifests` or `blobs`: the path segment the hub is asked under.
    const SEGMENT: &'static str;
    /// The cache's copy as it comes to be served (a blob's is served by the download cache).
    type Cached;

    /// The digest asked for: only content by digest is served from the cache.
    fn digest(&self) -> Option<&Digest>;

    /// Tier 1: this node's copy of content by digest the hub served for this repository.
    async fn node_copy(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Option<Answer>;

    /// Tier 2: how the hub is asked (method and headers); `None`: it is not asked, because this
    /// node holds what it served (and if that copy is gone, the cache and upstream decide).
    fn hub_request(&self, q: &Pull<'_>) -> Option<(Method, HeaderMap)>;

    /// Tier 2: the hub's answer, kept on this node and served (or relayed, if it is no success).
    /// `None`: it could not be used (a manifest not read whole, a blob gone from this node): on to
    /// the cache.
    async fn keep_hub_answer(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        resp: Response<ProxyBody>,
    ) -> Option<Answer>;

    /// Tier 2, while the hub cannot be asked: this node's copy of what a tag pointed to when
    /// the hub last served it. Only manifests have tags.
    async fn node_copy_of_tag(&self, _p: &RegistryProxy<H, U>, _q: &Pull<'_>) -> Option<Answer> {
        None
    }

    /// Tier 3: the cached copy of [`Self::digest`], if the cache has it (for a blob: or is
    /// receiving it), for the content rule to clear.
    async fn cached(&self, p: &RegistryProxy<H, U>, q: &Pull<'_>) -> Option<Self::Cached>;

    /// Tier 4: the copy the content rule cleared (and as what), or the upstream's answer.
    async fn fetch(
        &self,
        p: &RegistryProxy<H, U>,
        q: &Pull<'_>,
        cleared: Option<(Source, Self::Cached)>,
    ) -> Result<Answer, Failure>;

    /// Tier 5: what the cache holds for this request now that the upstream failed. A blob the
    /// cache holds was cleared in tier 3 (the content rule itself falls back to known facts when
    /// the upstream cannot be asked), so by default: nothing.
    async fn stale(&self, _p: &RegistryProxy<H, U>, _q: &Pull<'_>) -> Stale {
        Stale::Nothing
    }
}

/// Hub trouble is logged at most this often (every request is counted in metrics).
const HUB_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl<H: HubSource, U: UpstreamSource> RegistryProxy<H, U> {
    /// Walks the chain for one request of `kind`: the first tier that answers, answers.
    pub(super) async fn serve<K: Content<H, U>>(&self, q: &Pull<'_>, kind: &K) -> Answer {
        // 1. The node tier.
        if let Some(answer) = kind.node_copy(self, q).await {
            return answer;
        }
        // 2. The hub.
        if let Some((method, headers)) = kind.hub_request(q) {
            let answer = match self
                .hub_lookup(q.ctx, &method, q.name, K::SEGMENT, &q.reference, headers)
                .await
            {
                HubAnswer::Found(resp) => kind.keep_hub_answer(self, q, resp).await,
                HubAnswer::Unavailable => kind.node_copy_of_tag(self, q).await,
                HubAnswer::Missing => None,
            };
            if let Some(answer) = answer {
                return answer;
            }
        }
        // 3. The cache, under the content rule.
        let mut cleared = None;
        if let Some(digest) = kind.digest()
            && let Some(copy) = kind.cached(self, q).await
        {
            match self.clear(q, digest, K::WHAT).await {
                Ok(source) => cleared = Some((source, copy)),
                Err(refusal) => return *refusal,
            }
        }
        // 4. The upstream (or the copy the content rule cleared); 5. when it fails.
        match kind.fetch(self, q, cleared).await {
            Ok(answer) => answer,
            Err(failure) => self.upstream_down(q, kind, failure).await,
        }
    }

    /// The content rule for a cached (or arriving) copy of `digest`: the source to serve it as,
    /// or the answer that refuses it.
    pub(super) async fn clear(
        &self,
        q: &Pull<'_>,
        digest: &Digest,
        what: &str,
    ) -> Result<Source, Box<Answer>> {
        let refusal = match self.content.may_serve(&q.ask(), digest).await {
            Verdict::Serve(source) => return Ok(source),
            Verdict::Refused(s) => (Source::Upstream, small_response(s)),
            Verdict::Unavailable => (Source::Local, self.not_entitled(q, what)),
            Verdict::NoSuchHost(e) => (Source::Local, self.upstream_failed(q.ctx, &e)),
        };
        Err(Box::new(refusal))
    }

    /// Tier 5: the upstream failed (counted); what the cache holds stands in where it may.
    async fn upstream_down<K: Content<H, U>>(
        &self,
        q: &Pull<'_>,
        kind: &K,
        failure: Failure,
    ) -> Answer {
        let label = &q.ctx.label;
        let reason = match &failure {
            Failure::Error(e @ UpstreamError::NoSuchHost { .. }) => {
                return (Source::Local, self.upstream_failed(q.ctx, e));
            }
            Failure::Status(resp) => {
                self.metrics.upstream_error(label, "server_error");
                format!("upstream answered {}", resp.status())
            }
            Failure::Error(e) => {
                self.metrics.upstream_error(label, e.reason());
                e.to_string()
            }
        };
        match kind.stale(self, q).await {
            Stale::Copy(resp) => {
                warn!(registry = q.registry(), repository = %q.name, reference = %q.reference, %reason, "upstream unavailable; serving the cached {}", K::WHAT);
                (Source::Stale, resp)
            }
            // The registry's challenge to a client without credentials, who may turn out
            // entitled once authenticated.
            Stale::NotEntitled => (Source::Local, self.not_entitled(q, K::WHAT)),
            Stale::Nothing => match failure {
                Failure::Status(resp) => (Source::Upstream, *resp),
                Failure::Error(e) => (Source::Local, super::failed(&e)),
            },
        }
    }

    /// The answer for cached content the client is not known to be entitled to while the
    /// upstream cannot be asked: the registry's challenge to a client without credentials, 503 to
    /// anyone else.
    fn not_entitled(&self, q: &Pull<'_>, what: &str) -> Response<ProxyBody> {
        if let Some(r) = offline_challenge(&self.content, q.ctx, &q.req.headers, Some(q.name)) {
            return r;
        }
        oci_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unsupported,
            &format!(
                "the upstream cannot be asked, and this client is not known to be entitled to \
                 the cached {what}"
            ),
        )
    }

    /// What the hub says about the content; hub trouble is logged (rate-limited) and counted.
    pub(super) async fn hub_lookup(
        &self,
        ctx: &ConnContext,
        method: &Method,
        name: &RepositoryName,
        kind: &str,
        reference: &str,
        headers: HeaderMap,
    ) -> HubAnswer {
        let Some(hub) = self.hub.as_ref() else {
            return HubAnswer::Missing;
        };
        let hub_repo = match hub.hub_repo(ctx.origin.host(), name) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.hub_lookup("invalid_name");
                if self.may_warn_about_hub() {
                    warn!(error = %e, "no hub repository for this image; serving from this node, the cache and upstream");
                }
                return HubAnswer::Missing;
            }
        };
        let outcome = hub
            .lookup(method.clone(), &hub_repo, kind, reference, headers)
            .await;
        self.metrics.hub_lookup(outcome.label());
        match outcome {
            HubOutcome::Found(resp) => return HubAnswer::Found(resp),
            HubOutcome::NotFound => {
                debug!(%hub_repo, kind, reference, "not on the hub");
                return HubAnswer::Missing;
            }
            HubOutcome::Unreachable(reason) if self.may_warn_about_hub() => {
                warn!(hub = %hub.url(), %reason, "hub unreachable; serving from this node, the cache and upstream")
            }
            HubOutcome::NoCredentials(reason) if self.may_warn_about_hub() => {
                warn!(hub = %hub.url(), %reason, "cannot read the hub credentials; serving from this node, the cache and upstream")
            }
            HubOutcome::Refused(status) if self.may_warn_about_hub() => warn!(
                hub = %hub.url(),
                status = status.as_u16(),
                "the hub refused pullproxy's credentials; check hub.username and the password source"
            ),
            _ => {}
        }
        HubAnswer::Unavailable
    }

    /// Records that the hub served `digests` for `name` (the node tier serves them from here).
    pub(super) async fn hub_served(
        &self,
        registry: &str,
        name: &RepositoryName,
        digests: &[Digest],
    ) {
        if let Err(e) = self.cache.repos().hub_link(registry, name, digests).await {
            warn!(registry, repository = %name, error = %e, "recording what the hub served failed");
        }
    }

    fn may_warn_about_hub(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::telemetry::unix_secs();
        let last = self.hub_warned.load(Ordering::Relaxed);
        now >= last + HUB_WARN_EVERY.as_secs()
            && self
                .hub_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}
