//! What the content rule rests on, kept across restarts: which repositories are known to hold
//! which digests (a digest came from a manifest fetched for that repository, or the upstream
//! confirmed it there, like distribution's repository-scoped blob links), which digests the hub
//! served for a repository (the node tier), and which repositories were seen readable without
//! credentials, and when.

use std::fmt;

use super::{CacheError, records::RecordDir};
use crate::oci::{Digest, RepositoryName};

/// Digests remembered per repository; the oldest links go first beyond it (the content is then
/// fetched again, never served unconfirmed).
pub const MAX_LINKS_PER_REPOSITORY: usize = 8192;
/// A links record holds at most this many bytes on disk.
pub(super) const MAX_LINKS_RECORD_BYTES: u64 = 1 << 20;

/// Repository links and public marks.
pub struct RepoIndex {
    /// `registry/repository` -> digests the upstream vouched for, oldest first.
    links: RecordDir<Vec<String>>,
    /// `registry/repository` -> digests the hub served for it, oldest first.
    hub_links: RecordDir<Vec<String>>,
    /// `registry/repository` -> unix seconds when anonymous access last worked.
    public: RecordDir<u64>,
}

impl fmt::Debug for RepoIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepoIndex")
            .field("repositories", &self.links.len())
            .field("from_the_hub", &self.hub_links.len())
            .field("public", &self.public.len())
            .finish()
    }
}

impl RepoIndex {
    pub(super) fn new(
        links: RecordDir<Vec<String>>,
        hub_links: RecordDir<Vec<String>>,
        public: RecordDir<u64>,
    ) -> Self {
        RepoIndex {
            links,
            hub_links,
            public,
        }
    }

    /// Whether `repository` of `registry` is known (from its upstream) to hold `digest`.
    pub fn holds(&self, registry: &str, repository: &RepositoryName, digest: &Digest) -> bool {
        contains(&self.links, registry, repository, digest)
    }

    /// Records that `repository` of `registry` holds `digests` (its upstream said so).
    pub async fn link(
        &self,
        registry: &str,
        repository: &RepositoryName,
        digests: &[Digest],
    ) -> Result<(), CacheError> {
        add(&self.links, registry, repository, digests).await
    }

    /// Whether the hub served `digest` for `repository` of `registry`.
    pub fn hub_holds(&self, registry: &str, repository: &RepositoryName, digest: &Digest) -> bool {
        contains(&self.hub_links, registry, repository, digest)
    }

    /// Records that the hub served `digests` for `repository` of `registry`.
    pub async fn hub_link(
        &self,
        registry: &str,
        repository: &RepositoryName,
        digests: &[Digest],
    ) -> Result<(), CacheError> {
        add(&self.hub_links, registry, repository, digests).await
    }

    /// When anonymous access to `repository` last worked (unix seconds), if it ever did.
    pub fn public_since(&self, registry: &str, repository: &RepositoryName) -> Option<u64> {
        self.public.get(&repo_key(registry, repository).ok()?)
    }

    /// Records that anonymous access to `repository` worked at `now` (unix seconds).
    pub async fn mark_public(
        &self,
        registry: &str,
        repository: &RepositoryName,
        now: u64,
    ) -> Result<(), CacheError> {
        self.public.put(repo_key(registry, repository)?, now).await
    }

    /// Forgets that `repository` was public (the upstream now wants credentials for it).
    pub async fn mark_private(
        &self,
        registry: &str,
        repository: &RepositoryName,
    ) -> Result<(), CacheError> {
        self.public.remove(&repo_key(registry, repository)?).await
    }
}

fn contains(
    dir: &RecordDir<Vec<String>>,
    registry: &str,
    repository: &RepositoryName,
    digest: &Digest,
) -> bool {
    let Ok(key) = repo_key(registry, repository) else {
        return false;
    };
    let digest = digest.to_string();
    dir.with(&key, |links| links.is_some_and(|l| l.contains(&digest)))
}

async fn add(
    dir: &RecordDir<Vec<String>>,
    registry: &str,
    repository: &RepositoryName,
    digests: &[Digest],
) -> Result<(), CacheError> {
    let key = repo_key(registry, repository)?;
    let mut links = dir.get(&key).unwrap_or_default();
    let before = links.len();
    for d in digests {
        let d = d.to_string();
        if !links.contains(&d) {
            links.push(d);
        }
    }
    if links.len() == before {
        return Ok(());
    }
    if links.len() > MAX_LINKS_PER_REPOSITORY {
        let excess = links.len() - MAX_LINKS_PER_REPOSITORY;
        links.drain(..excess);
    }
    dir.put(key, links).await
}

/// `host[:port]/repository`, the registry validated and lowercased.
fn repo_key(registry: &str, repository: &RepositoryName) -> Result<String, CacheError> {
    Ok(format!(
        "{}/{repository}",
        super::manifest::registry_key(registry)?
    ))
}

#[cfg(test)]
mod tests {
    use crate::cache::{Cache, CacheSettings};
    use crate::oci::{Digest, RepositoryName};

    async fn open(dir: &std::path::Path) -> Cache {
        Cache::open(&CacheSettings {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn links_are_per_registry_and_repository_and_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let repo: RepositoryName = "alice/secret".parse().unwrap();
        let other: RepositoryName = "pub/open".parse().unwrap();
        let d = Digest::sha256_of(b"layer");
        {
            let cache = open(dir.path()).await;
            let repos = cache.repos();
            assert!(!repos.holds("registry-1.docker.io", &repo, &d));
            repos
                .link("Registry-1.Docker.io", &repo, std::slice::from_ref(&d))
                .await
                .unwrap();
            repos
                .hub_link("quay.io", &other, std::slice::from_ref(&d))
                .await
                .unwrap();
            repos.mark_public("quay.io", &other, 1234).await.unwrap();
        }
        let cache = open(dir.path()).await;
        let repos = cache.repos();
        assert!(repos.holds("registry-1.docker.io", &repo, &d));
        assert!(!repos.holds("quay.io", &repo, &d));
        assert!(!repos.holds("registry-1.docker.io", &other, &d));
        assert!(!repos.holds("registry-1.docker.io", &repo, &Digest::sha256_of(b"x")));
        assert!(!repos.holds("a/b", &repo, &d));
        // What the hub served is kept apart from what upstreams vouched for.
        assert!(repos.hub_holds("quay.io", &other, &d));
        assert!(!repos.holds("quay.io", &other, &d));
        assert!(!repos.hub_holds("registry-1.docker.io", &repo, &d));
        assert_eq!(repos.public_since("quay.io", &other), Some(1234));
        assert_eq!(repos.public_since("quay.io", &repo), None);
        repos.mark_private("quay.io", &other).await.unwrap();
        drop(cache);
        let cache = open(dir.path()).await;
        assert_eq!(cache.repos().public_since("quay.io", &other), None);
    }

    #[tokio::test]
    async fn a_repository_keeps_its_newest_links() {
        let cache = Cache::in_memory(1 << 20);
        let repo: RepositoryName = "many/layers".parse().unwrap();
        let digests: Vec<Digest> = (0..super::MAX_LINKS_PER_REPOSITORY + 10)
            .map(|i| Digest::sha256_of(&i.to_le_bytes()))
            .collect();
        cache
            .repos()
            .link("quay.io", &repo, &digests)
            .await
            .unwrap();
        assert!(!cache.repos().holds("quay.io", &repo, &digests[0]));
        assert!(!cache.repos().holds("quay.io", &repo, &digests[9]));
        assert!(cache.repos().holds("quay.io", &repo, &digests[10]));
        assert!(
            cache
                .repos()
                .holds("quay.io", &repo, digests.last().unwrap())
        );
    }
}
