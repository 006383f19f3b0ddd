//! Cached manifests (content-addressed, in the blob store, with their media type) and the tag
//! index that maps `(registry, repository, tag)` to a manifest digest across restarts.

use std::{fmt, sync::Arc};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{CacheError, READ_CHUNK, records::RecordDir, store::BlobStore};
use crate::oci::{Digest, ManifestRefs, RepositoryName, Tag};

/// Largest manifest cached (the limit distribution registries apply to manifests they accept).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Longest media type accepted: it is sent back as a `Content-Type` header.
const MAX_MEDIA_TYPE_LEN: usize = 255;

/// A cached manifest: its exact bytes and the media type the registry served it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// Manifests by digest. The bytes live in the blob store (same budget, same LRU, same
/// verification as layers: a manifest is just a small blob); the media type, which the bytes
/// do not reliably carry, lives in a record beside them.
pub struct ManifestStore {
    store: Arc<dyn BlobStore>,
    media_types: RecordDir<String>,
}

impl fmt::Debug for ManifestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestStore").finish_non_exhaustive()
    }
}

impl ManifestStore {
    pub(super) fn new(store: Arc<dyn BlobStore>, media_types: RecordDir<String>) -> Self {
        ManifestStore { store, media_types }
    }

    /// The cached manifest, or `None` if it is not cached (or no longer verifies).
    pub async fn get(&self, digest: &Digest) -> Option<Manifest> {
        let media_type = self.media_types.get(&digest.to_string())?;
        let blob = match self.store.open(digest).await {
            Ok(blob) => blob?,
            Err(e) => {
                warn!(%digest, error = %e, "cannot open cached manifest");
                return None;
            }
        };
        if blob.len > MAX_MANIFEST_BYTES as u64 {
            return None;
        }
        let mut bytes = BytesMut::with_capacity(blob.len as usize);
        while (bytes.len() as u64) < blob.len {
            let want = (blob.len - bytes.len() as u64).min(READ_CHUNK as u64) as usize;
            match blob.content.read_at(bytes.len() as u64, want).await {
                Ok(chunk) if !chunk.is_empty() => bytes.extend_from_slice(&chunk),
                Ok(_) => return None,
                Err(e) => {
                    warn!(%digest, error = %e, "reading cached manifest failed; dropping it");
                    self.store.remove(digest);
                    return None;
                }
            }
        }
        Some(Manifest {
            digest: digest.clone(),
            media_type,
            bytes: bytes.freeze(),
        })
    }

    /// Caches a manifest after checking that `bytes` hash to `digest` (for a manifest fetched
    /// by tag, pass [`Digest::sha256_of`] the bytes, or the upstream's `Docker-Content-Digest`
    /// to have it checked).
    ///
    /// The media type recorded is the one the manifest declares itself (`mediaType`), else
    /// `served_as` (the `Content-Type` it came with); once recorded it never changes, so a later
    /// answer with another `Content-Type` for the same bytes cannot make them unusable for
    /// everyone else.
    pub async fn put(
        &self,
        digest: &Digest,
        served_as: &str,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(CacheError::ManifestTooLarge {
                len: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let refs = ManifestRefs::parse(&bytes);
        let media_type = refs.media_type().unwrap_or(served_as);
        check_media_type(media_type)?;
        let mut verifier = digest.verifier();
        verifier.update(&bytes);
        let proof = verifier.finish()?;
        // The media type first: a stored manifest is never without one.
        let key = digest.to_string();
        if self.media_types.get(&key).is_none() {
            self.media_types.put(key, media_type.to_owned()).await?;
        }
        if matches!(self.store.open(digest).await, Ok(Some(_))) {
            return Ok(());
        }
        let mut ingest = self.store.ingest(digest, Some(bytes.len() as u64)).await?;
        ingest.write(vec![bytes]).await?;
        ingest.commit(proof).await
    }
}

/// A media type must be a plain header value: visible ASCII, not empty, not too long.
fn check_media_type(media_type: &str) -> Result<(), CacheError> {
    let ok = !media_type.is_empty()
        && media_type.len() <= MAX_MEDIA_TYPE_LEN
        && media_type.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CacheError::InvalidMediaType)
    }
}

/// Where a tag pointed when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTarget {
    pub digest: Digest,
    pub media_type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TagRecord {
    digest: String,
    media_type: String,
}

/// `(registry host, repository, tag) -> (digest, media type)`, persisted, so a tag can be served
/// from the cache when its upstream cannot be reached (stale-if-error).
pub struct TagIndex {
    records: RecordDir<TagRecord>,
}

impl fmt::Debug for TagIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TagIndex")
            .field("tags", &self.records.len())
            .finish()
    }
}

impl TagIndex {
    pub(super) fn new(records: RecordDir<TagRecord>) -> Self {
        TagIndex { records }
    }

    /// Where the tag pointed last time. Registry hosts compare case-insensitively.
    pub fn get(&self, registry: &str, repository: &RepositoryName, tag: &Tag) -> Option<TagTarget> {
        let key = tag_key(registry, repository, tag).ok()?;
        let record = self.records.get(&key)?;
        Some(TagTarget {
            digest: record.digest.parse().ok()?,
            media_type: record.media_type,
        })
    }

    /// Records where the tag points now.
    pub async fn put(
        &self,
        registry: &str,
        repository: &RepositoryName,
        tag: &Tag,
        target: &TagTarget,
    ) -> Result<(), CacheError> {
        check_media_type(&target.media_type)?;
        let key = tag_key(registry, repository, tag)?;
        let record = TagRecord {
            digest: target.digest.to_string(),
            media_type: target.media_type.clone(),
        };
        self.records.put(key, record).await
    }
}

/// `host[:port]/repository:tag`: unambiguous because a host has no `/` and a repository no `:`.
fn tag_key(registry: &str, repository: &RepositoryName, tag: &Tag) -> Result<String, CacheError> {
    Ok(format!("{}/{repository}:{tag}", registry_key(registry)?))
}

/// A registry `host[:port]` as records key it: validated (it becomes part of a record key, and
/// is compared), lowercased.
pub(super) fn registry_key(registry: &str) -> Result<String, CacheError> {
    let host_ok = !registry.is_empty()
        && registry.len() <= 255
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    if !host_ok {
        return Err(CacheError::InvalidRegistry);
    }
    Ok(registry.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, CacheSettings};
    use crate::oci::media_type::{OCI_INDEX, OCI_MANIFEST};

    const MANIFEST: &[u8] =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;

    async fn open(dir: &std::path::Path) -> Cache {
        Cache::open(&CacheSettings {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn manifests_keep_bytes_and_media_type_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(MANIFEST);
        {
            let cache = open(dir.path()).await;
            assert_eq!(cache.manifests().get(&digest).await, None);
            cache
                .manifests()
                .put(&digest, OCI_MANIFEST, Bytes::from_static(MANIFEST))
                .await
                .unwrap();
            let m = cache.manifests().get(&digest).await.unwrap();
            assert_eq!(m.media_type, OCI_MANIFEST);
            assert_eq!(m.bytes, MANIFEST);
        }
        let cache = open(dir.path()).await;
        let m = cache.manifests().get(&digest).await.unwrap();
        assert_eq!(
            (m.media_type.as_str(), &m.bytes[..]),
            (OCI_MANIFEST, MANIFEST)
        );
        // Manifests are blobs too: the same bytes are served by digest from the blob cache.
        assert_eq!(
            cache.blobs().lookup(&digest).await,
            Some(MANIFEST.len() as u64)
        );
    }

    #[tokio::test]
    async fn the_first_media_type_stays_and_the_declared_one_wins() {
        let cache = Cache::in_memory(1 << 20);
        let digest = Digest::sha256_of(MANIFEST);
        // MANIFEST declares the OCI manifest type: a wrong Content-Type does not change it.
        cache
            .manifests()
            .put(
                &digest,
                "application/octet-stream",
                Bytes::from_static(MANIFEST),
            )
            .await
            .unwrap();
        assert_eq!(
            cache.manifests().get(&digest).await.unwrap().media_type,
            OCI_MANIFEST
        );
        // Without a declaration, the first Content-Type recorded stays.
        let bare: &[u8] = br#"{"schemaVersion":2}"#;
        let d = Digest::sha256_of(bare);
        for served_as in [OCI_INDEX, "text/plain"] {
            cache
                .manifests()
                .put(&d, served_as, Bytes::from_static(bare))
                .await
                .unwrap();
        }
        assert_eq!(
            cache.manifests().get(&d).await.unwrap().media_type,
            OCI_INDEX
        );
    }

    #[tokio::test]
    async fn manifests_that_do_not_match_their_digest_are_refused() {
        let cache = Cache::in_memory(1 << 20);
        let digest = Digest::sha256_of(b"other");
        let err = cache
            .manifests()
            .put(&digest, OCI_MANIFEST, Bytes::from_static(MANIFEST))
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::DigestMismatch(_)), "{err}");
        assert_eq!(cache.manifests().get(&digest).await, None);
        assert_eq!(cache.blobs().stats().entries, 0);
    }

    #[tokio::test]
    async fn manifest_limits() {
        let cache = Cache::in_memory(16 << 20);
        let big = Bytes::from(vec![b' '; MAX_MANIFEST_BYTES + 1]);
        let err = cache
            .manifests()
            .put(&Digest::sha256_of(&big), OCI_MANIFEST, big)
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::ManifestTooLarge { .. }), "{err}");
        // A manifest that declares no media type takes the served one, which must be sane.
        let bare: &[u8] = br#"{"schemaVersion":2}"#;
        let digest = Digest::sha256_of(bare);
        for bad in ["", "text/plain\r\nX-Evil: 1", &"a".repeat(256)] {
            let err = cache
                .manifests()
                .put(&digest, bad, Bytes::from_static(bare))
                .await
                .unwrap_err();
            assert!(matches!(err, CacheError::InvalidMediaType), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn tag_index_survives_restarts_and_moves() {
        let dir = tempfile::tempdir().unwrap();
        let repo: RepositoryName = "library/nginx".parse().unwrap();
        let tag: Tag = "latest".parse().unwrap();
        let first = TagTarget {
            digest: Digest::sha256_of(b"one"),
            media_type: OCI_INDEX.into(),
        };
        let second = TagTarget {
            digest: Digest::sha256_of(b"two"),
            media_type: OCI_MANIFEST.into(),
        };
        {
            let cache = open(dir.path()).await;
            assert_eq!(cache.tags().get("registry-1.docker.io", &repo, &tag), None);
            cache
                .tags()
                .put("registry-1.docker.io", &repo, &tag, &first)
                .await
                .unwrap();
            cache
                .tags()
                .put("Registry-1.Docker.IO", &repo, &tag, &second)
                .await
                .unwrap();
        }
        let cache = open(dir.path()).await;
        let tags = cache.tags();
        assert_eq!(tags.get("registry-1.docker.io", &repo, &tag), Some(second));
        assert_eq!(tags.get("quay.io", &repo, &tag), None);
        let other: Tag = "stable".parse().unwrap();
        assert_eq!(tags.get("registry-1.docker.io", &repo, &other), None);
    }

    #[tokio::test]
    async fn tag_index_refuses_hosts_that_are_not_hosts() {
        let cache = Cache::in_memory(1 << 20);
        let repo: RepositoryName = "a".parse().unwrap();
        let tag: Tag = "t".parse().unwrap();
        let target = TagTarget {
            digest: Digest::sha256_of(b"x"),
            media_type: OCI_MANIFEST.into(),
        };
        for host in ["", "a/b", "a b", "évil", "a\0"] {
            let err = cache
                .tags()
                .put(host, &repo, &tag, &target)
                .await
                .unwrap_err();
            assert!(matches!(err, CacheError::InvalidRegistry), "{host:?}");
        }
        cache
            .tags()
            .put("[::1]:5000", &repo, &tag, &target)
            .await
            .unwrap();
        assert_eq!(cache.tags().get("[::1]:5000", &repo, &tag), Some(target));
    }
}
