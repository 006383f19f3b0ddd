//! Who may read what from the cache. Cached content is served only to a client whose own
//! credentials the upstream accepted for that repository (or when the upstream cannot be asked):
//! a private image is never handed to a client the upstream would refuse.

use std::time::Duration;

use http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

/// How long an upstream "yes" for (registry, repository, credentials) is trusted.
const TRUST_FOR: Duration = Duration::from_secs(300);

/// Recent upstream approvals. Keys hold a hash of the `Authorization` value, never the value.
pub struct AccessCache {
    approved: moka::sync::Cache<[u8; 32], ()>,
}

impl Default for AccessCache {
    fn default() -> Self {
        Self {
            approved: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TRUST_FOR)
                .build(),
        }
    }
}

impl AccessCache {
    /// Records that the upstream served `repository` of `registry` to these credentials.
    pub fn approve(&self, registry: &str, repository: &str, headers: &HeaderMap) {
        self.approved.insert(key(registry, repository, headers), ());
    }

    /// Whether the upstream recently served `repository` to these credentials.
    pub fn approved(&self, registry: &str, repository: &str, headers: &HeaderMap) -> bool {
        self.approved
            .contains_key(&key(registry, repository, headers))
    }
}

fn key(registry: &str, repository: &str, headers: &HeaderMap) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [registry.as_bytes(), repository.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            h.update([1]);
            h.update(v.as_bytes());
        }
        None => h.update([0]),
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn approval_is_per_registry_repository_and_credentials() {
        let a = AccessCache::default();
        a.approve("quay.io", "team/private", &auth(Some("Bearer good")));
        assert!(a.approved("quay.io", "team/private", &auth(Some("Bearer good"))));
        assert!(!a.approved("quay.io", "team/private", &auth(Some("Bearer other"))));
        assert!(!a.approved("quay.io", "team/private", &auth(None)));
        assert!(!a.approved("quay.io", "team/other", &auth(Some("Bearer good"))));
        assert!(!a.approved("docker.io", "team/private", &auth(Some("Bearer good"))));
        // Length-prefixed parts: moving a character across the boundary is another key.
        a.approve("ab", "c", &auth(None));
        assert!(!a.approved("a", "bc", &auth(None)));
    }
}
