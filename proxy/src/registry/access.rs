//! Credentials the upstream accepted, per repository: remembered as a keyed hash (never the
//! value), with the time of the last acceptance, for a bounded time. Together with the public
//! marks of the cache's repository index, this is who is entitled to what.

use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

/// Longest any acceptance is remembered (the longest window anything asks about).
const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);

/// Upstream acceptances of `(registry, repository, credentials)`.
pub(crate) struct Approvals {
    /// Per-process random key: the hashes mean nothing outside this process.
    key: [u8; 32],
    approved: moka::sync::Cache<[u8; 32], Instant>,
}

impl Default for Approvals {
    fn default() -> Self {
        let mut key = [0u8; 32];
        crate::node_ca::crypto_provider()
            .secure_random
            .fill(&mut key)
            .expect("the system random source works");
        Self {
            key,
            approved: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(REMEMBER_FOR)
                .build(),
        }
    }
}

impl Approvals {
    /// Records that the upstream served `repository` of `registry` to these credentials now.
    pub(crate) fn approve(&self, registry: &str, repository: &str, auth: Option<&HeaderValue>) {
        self.approved
            .insert(self.hash(registry, repository, auth), Instant::now());
    }

    /// Forgets an acceptance: the upstream has just refused these credentials.
    pub(crate) fn revoke(&self, registry: &str, repository: &str, auth: Option<&HeaderValue>) {
        self.approved
            .invalidate(&self.hash(registry, repository, auth));
    }

    /// Whether the upstream served `repository` to these credentials within `window`.
    pub(crate) fn approved_within(
        &self,
        registry: &str,
        repository: &str,
        auth: Option<&HeaderValue>,
        window: Duration,
    ) -> bool {
        self.approved
            .get(&self.hash(registry, repository, auth))
            .is_some_and(|at| at.elapsed() < window)
    }

    fn hash(&self, registry: &str, repository: &str, auth: Option<&HeaderValue>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        for part in [
            registry.to_ascii_lowercase().as_bytes(),
            repository.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        match auth {
            Some(v) => {
                h.update([1]);
                h.update(v.as_bytes());
            }
            None => h.update([0]),
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &str) -> HeaderValue {
        v.parse().unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn approval_is_per_registry_repository_and_credentials() {
        let a = Approvals::default();
        let good = auth("Bearer good");
        a.approve("quay.io", "team/private", Some(&good));
        assert!(a.approved_within("quay.io", "team/private", Some(&good), HOUR));
        assert!(a.approved_within("Quay.IO", "team/private", Some(&good), HOUR));
        assert!(!a.approved_within("quay.io", "team/private", Some(&auth("Bearer other")), HOUR));
        assert!(!a.approved_within("quay.io", "team/private", None, HOUR));
        assert!(!a.approved_within("quay.io", "team/other", Some(&good), HOUR));
        assert!(!a.approved_within("docker.io", "team/private", Some(&good), HOUR));
        // Length-prefixed parts: moving a character across the boundary is another key.
        a.approve("ab", "c", None);
        assert!(!a.approved_within("a", "bc", None, HOUR));
        assert!(a.approved_within("ab", "c", None, HOUR));
        a.revoke("quay.io", "team/private", Some(&good));
        assert!(!a.approved_within("quay.io", "team/private", Some(&good), HOUR));
    }

    #[test]
    fn approvals_age_out_of_a_window() {
        let a = Approvals::default();
        a.approve("quay.io", "x", None);
        assert!(a.approved_within("quay.io", "x", None, HOUR));
        assert!(!a.approved_within("quay.io", "x", None, Duration::ZERO));
    }

    #[test]
    fn two_processes_hash_the_same_credentials_differently() {
        let (a, b) = (Approvals::default(), Approvals::default());
        let v = auth("Basic YWxpY2U6d29uZGVybGFuZA==");
        assert_ne!(
            a.hash("quay.io", "x", Some(&v)),
            b.hash("quay.io", "x", Some(&v))
        );
    }
}
