//! The one content rule. A cached blob or manifest is served for `(registry, repository)` only
//!
//! 1. if that repository is known to hold it: its digest came from a manifest fetched for that
//!    repository, or the upstream confirmed it there (the cache's repository links), and
//! 2. if the client is entitled to that repository: anonymous access to it was seen to work (a
//!    public mark), or the upstream accepted this client's own credentials for it. Whenever the
//!    upstream can be asked and no such fact is fresh, it is asked (a HEAD of the very resource
//!    with the client's headers) and its answer decides.
//!
//! When the upstream cannot be asked (down, silent, failing), only facts already known count:
//! credentials accepted within [`OFFLINE_FOR`] and public marks within [`PUBLIC_OFFLINE_FOR`]. A
//! name that does not resolve is no registry at all and never counts as "cannot ask". Everything
//! on the request path that serves cached content goes through [`ContentRule::may_serve`] or
//! [`ContentRule::may_serve_offline`]; every upstream success is reported to
//! [`ContentRule::confirmed`].

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderValue, Method, StatusCode, header, uri::PathAndQuery};
use tracing::{debug, warn};

use super::{access::Approvals, served::Source};
use crate::origins::sources::UpstreamSource;
use crate::{
    cache::Cache,
    oci::{BearerChallenge, Digest, RepositoryName},
    origins::upstream::{Origin, Small, UpstreamError},
    telemetry::unix_secs,
};

/// An upstream acceptance this recent is trusted without asking again.
pub(crate) const FRESH_FOR: Duration = Duration::from_secs(300);
/// An upstream acceptance this recent still counts when the upstream cannot be asked.
pub(crate) const OFFLINE_FOR: Duration = Duration::from_secs(24 * 3600);
/// A public mark this recent is trusted without asking again.
pub(crate) const PUBLIC_FRESH_FOR: Duration = FRESH_FOR;
/// A public mark this recent still counts when the upstream cannot be asked (it is persisted).
pub(crate) const PUBLIC_OFFLINE_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a repository's public-or-not is probed anonymously.
const PROBE_EVERY: Duration = Duration::from_secs(3600);
/// Registries whose last authentication challenge is remembered.
const CHALLENGES_KEPT: u64 = 1000;

/// Who asks for what: the connection's registry, the repository, the request path (for the
/// upstream to be asked about) and the client's headers (its credentials).
pub(crate) struct Ask<'a> {
    pub(crate) origin: &'a Origin,
    pub(crate) repo: &'a RepositoryName,
    pub(crate) path: &'a PathAndQuery,
    pub(crate) headers: &'a HeaderMap,
}

impl Ask<'_> {
    fn registry(&self) -> &str {
        self.origin.authority.as_str()
    }

    fn auth(&self) -> Option<&HeaderValue> {
        self.headers.get(header::AUTHORIZATION)
    }
}

/// The content rule's answer for cached content.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Serve the cached copy: [`Source::Cache`] when the upstream agreed (now or recently),
    /// [`Source::Stale`] when it could not be asked and known facts entitle the client.
    Serve(Source),
    /// The upstream refused this client; its answer goes back unchanged.
    Refused(Small),
    /// The upstream cannot be asked, and nothing known entitles this client.
    Unavailable,
    /// The registry does not exist (the name does not resolve, or only into the node).
    NoSuchHost(UpstreamError),
}

/// How fresh a fact must be.
#[derive(Debug, Clone, Copy)]
enum Window {
    Fresh,
    Offline,
}

/// The content rule over the cache's repository index and the upstream's approvals.
pub(crate) struct ContentRule<U> {
    cache: Arc<Cache>,
    upstream: Arc<U>,
    approvals: Approvals,
    /// Repositories probed for anonymous access recently (not probed again until it expires).
    probed: moka::sync::Cache<String, ()>,
    /// The last `WWW-Authenticate` challenge each registry sent: while it cannot be asked, a
    /// client without credentials is sent that challenge, so it authenticates (with the registry's
    /// own token service, or basic auth) and can be recognised as entitled.
    challenges: moka::sync::Cache<String, HeaderValue>,
}

impl<U: UpstreamSource> ContentRule<U> {
    pub(crate) fn new(cache: Arc<Cache>, upstream: Arc<U>) -> Self {
        Self {
            cache,
            upstream,
            approvals: Approvals::default(),
            probed: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(PROBE_EVERY)
                .build(),
            challenges: moka::sync::Cache::new(CHALLENGES_KEPT),
        }
    }

    /// Remembers the registry's challenge from a 401 it sent.
    pub(crate) fn learn_challenge(&self, registry: &str, status: StatusCode, headers: &HeaderMap) {
        if status != StatusCode::UNAUTHORIZED {
            return;
        }
        if let Some(v) = headers.get(header::WWW_AUTHENTICATE) {
            self.challenges
                .insert(registry.to_ascii_lowercase(), v.clone());
        }
    }

    /// The challenge to send a client without credentials while `registry` cannot be asked, for
    /// `repo` (a Bearer challenge gets that repository's pull scope), if the registry ever sent
    /// one.
    pub(crate) fn challenge(
        &self,
        registry: &str,
        repo: Option<&RepositoryName>,
    ) -> Option<HeaderValue> {
        let v = self.challenges.get(&registry.to_ascii_lowercase())?;
        let Some(bearer) = v.to_str().ok().and_then(BearerChallenge::parse) else {
            return Some(v);
        };
        let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = format!("Bearer realm=\"{}\"", quote(&bearer.realm));
        if let Some(service) = &bearer.service {
            out.push_str(&format!(",service=\"{}\"", quote(service)));
        }
        if let Some(repo) = repo {
            out.push_str(&format!(",scope=\"repository:{repo}:pull\""));
        }
        HeaderValue::from_str(&out).ok()
    }

    /// May this client get the cached `digest` as content of the asked repository? Asks the
    /// upstream when no fresh fact decides.
    pub(crate) async fn may_serve(&self, ask: &Ask<'_>, digest: &Digest) -> Verdict {
        let linked = self.linked(ask, digest);
        if linked && self.entitled(ask, Window::Fresh) {
            return Verdict::Serve(Source::Cache);
        }
        let mut headers = ask.headers.clone();
        headers.remove(header::RANGE);
        let answer = self
            .upstream
            .small(ask.origin, Method::HEAD, ask.path, &headers)
            .await;
        match answer {
            Ok(s) if s.status.is_success() => {
                self.confirmed(ask, std::slice::from_ref(digest)).await;
                Verdict::Serve(Source::Cache)
            }
            Ok(s) if s.status.is_server_error() => {
                debug!(registry = ask.registry(), status = %s.status, "upstream failing; cannot ask about access");
                self.offline(ask, digest)
            }
            Ok(s) => {
                self.refused(ask, s.status, &s.headers).await;
                Verdict::Refused(s)
            }
            Err(e) if e.cannot_ask() => {
                debug!(registry = ask.registry(), error = %e, "upstream cannot be asked about access");
                self.offline(ask, digest)
            }
            Err(e @ UpstreamError::NoSuchHost { .. }) => Verdict::NoSuchHost(e),
            Err(e) => {
                // A broken answer (bad redirect, too large): the upstream cannot be asked.
                debug!(registry = ask.registry(), error = %e, "upstream answer unusable");
                self.offline(ask, digest)
            }
        }
    }

    /// May this client get the cached `digest` when the upstream has just failed to answer?
    /// Only known facts count.
    pub(crate) fn may_serve_offline(&self, ask: &Ask<'_>, digest: &Digest) -> bool {
        self.linked(ask, digest) && self.entitled(ask, Window::Offline)
    }

    /// The upstream served the asked repository to this client, and with it `digests` (the
    /// resource itself and, for a manifest, what it references): link them and remember the
    /// acceptance. Without credentials that makes the repository public; with credentials an
    /// anonymous probe finds out (in the background, at most every [`PROBE_EVERY`]).
    pub(crate) async fn confirmed(&self, ask: &Ask<'_>, digests: &[Digest]) {
        let registry = ask.registry();
        if let Err(e) = self.cache.repos().link(registry, ask.repo, digests).await {
            warn!(registry, repository = %ask.repo, error = %e, "recording repository links failed");
        }
        self.approvals
            .approve(registry, ask.repo.as_str(), ask.auth());
        if ask.auth().is_none() {
            self.mark_public(registry, ask.repo).await;
        } else {
            self.probe_public(ask);
        }
    }

    /// The upstream refused this client (`status`): an earlier acceptance of these credentials
    /// no longer counts, and refusing a client without credentials means the repository is not
    /// public (any more).
    pub(crate) async fn refused(&self, ask: &Ask<'_>, status: StatusCode, headers: &HeaderMap) {
        self.learn_challenge(ask.registry(), status, headers);
        if !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return;
        }
        self.approvals
            .revoke(ask.registry(), ask.repo.as_str(), ask.auth());
        if ask.auth().is_none() {
            self.mark_private(ask.registry(), ask.repo).await;
        }
    }

    fn linked(&self, ask: &Ask<'_>, digest: &Digest) -> bool {
        self.cache.repos().holds(ask.registry(), ask.repo, digest)
    }

    fn entitled(&self, ask: &Ask<'_>, window: Window) -> bool {
        let (approved, public) = match window {
            Window::Fresh => (FRESH_FOR, PUBLIC_FRESH_FOR),
            Window::Offline => (OFFLINE_FOR, PUBLIC_OFFLINE_FOR),
        };
        let registry = ask.registry();
        self.approvals
            .approved_within(registry, ask.repo.as_str(), ask.auth(), approved)
            || self
                .cache
                .repos()
                .public_since(registry, ask.repo)
                .is_some_and(|at| unix_secs().saturating_sub(at) < public.as_secs())
    }

    fn offline(&self, ask: &Ask<'_>, digest: &Digest) -> Verdict {
        if self.may_serve_offline(ask, digest) {
            Verdict::Serve(Source::Stale)
        } else {
            Verdict::Unavailable
        }
    }

    async fn mark_public(&self, registry: &str, repo: &RepositoryName) {
        mark(&self.cache, registry, repo, true).await;
    }

    async fn mark_private(&self, registry: &str, repo: &RepositoryName) {
        mark(&self.cache, registry, repo, false).await;
    }

    /// Asks the upstream anonymously (in the background) whether the repository is public.
    fn probe_public(&self, ask: &Ask<'_>) {
        let registry = ask.registry().to_owned();
        let key = format!("{registry}/{}", ask.repo);
        if self.probed.contains_key(&key) {
            return;
        }
        self.probed.insert(key, ());
        let (cache, upstream) = (self.cache.clone(), self.upstream.clone());
        let (origin, repo, path) = (ask.origin.clone(), ask.repo.clone(), ask.path.clone());
        tokio::spawn(async move {
            match upstream.readable_anonymously(&origin, &path).await {
                Ok(public) => mark(&cache, &registry, &repo, public).await,
                Err(e) => {
                    debug!(%registry, repository = %repo, error = %e, "anonymous probe failed")
                }
            }
        });
    }
}

/// A public mark younger than this is not rewritten (every anonymous request would otherwise
/// write a file).
const REMARK_AFTER: u64 = 60;

/// Records in the repository index whether `repo` is public.
async fn mark(cache: &Cache, registry: &str, repo: &RepositoryName, public: bool) {
    let repos = cache.repos();
    let now = unix_secs();
    let result = if public {
        if repos
            .public_since(registry, repo)
            .is_some_and(|at| now.saturating_sub(at) < REMARK_AFTER)
        {
            return;
        }
        repos.mark_public(registry, repo, now).await
    } else {
        repos.mark_private(registry, repo).await
    };
    if let Err(e) = result {
        warn!(registry, repository = %repo, error = %e, "recording whether a repository is public failed");
    }
}
