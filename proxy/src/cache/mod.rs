//! The node-local cache: content-addressed blobs and manifests on disk under a size-bounded LRU
//! index, one upstream fetch per blob however many clients ask, and a persistent tag index.
//!
//! What the HTTP handler uses:
//!
//! - [`Cache::open`]`(&CacheSettings) -> Result<Cache, CacheError>` (or [`Cache::in_memory`] in
//!   tests), then [`Cache::blobs`], [`Cache::manifests`], [`Cache::tags`].
//! - [`BlobCache::lookup`]`(&Digest) -> Option<u64>`: length of a cached blob (for `HEAD`).
//! - [`BlobCache::get_or_fetch`]`(&Digest, Option<ByteRange>, fetch) -> Result<BlobResponse, E>`,
//!   where `fetch: FnOnce() -> impl Future<Output = Result<UpstreamBlob, E>>` runs only if this
//!   request has to fetch (it should send this client's credentials and follow redirects).
//!   `Err(E)` is only ever this caller's own fetch error, unchanged (a 401 to relay, say).
//!   [`BlobResponse`] has the [`BlobSource`] (hit, fetched, joined), the blob's length if known,
//!   the [`BodyRange`] (200, 206 or 416), the [`BlobBody`] (`Stream<Item = io::Result<Bytes>>`)
//!   and an [`Outcome`] to learn how the download ended (cached, digest mismatch, write
//!   failed...) without reading the body.
//! - [`ManifestStore::get`]`(&Digest) -> Option<Manifest>` and
//!   [`ManifestStore::put`]`(&Digest, media_type, Bytes)`.
//! - [`TagIndex::get`]`(registry, &RepositoryName, &Tag) -> Option<TagTarget>` and
//!   [`TagIndex::put`].
//! - [`RepoIndex`]: which repository holds which digest (links), and which repositories were
//!   readable anonymously: what the registry's content rule decides with.
//! - [`BlobCache::stats`]`() -> CacheStats` for metrics.
//!
//! On disk, under `dir`: `blobs/<algo>/<hex>` (blobs and manifests), `tmp/` (partial writes,
//! emptied at start), `media-types/`, `tags/`, `links/`, `hub-links/` and `public/` (one small
//! JSON record per entry), all root's alone (directories 0700, files 0600). Temp files count
//! toward the size limit while they are written (see `store.rs`). See
//! `flight/` for how downloads are shared and what happens when the disk fails, `fs/` for
//! start-up and verification, `diagnose.rs` for what `pullproxy doctor` reports of the directory.

mod diagnose;
mod flight;
mod fs;
mod manifest;
mod memory;
pub mod metrics;
mod records;
mod repos;
mod store;

#[cfg(test)]
mod conformance;

use std::{io, path::PathBuf, sync::Arc};

pub(crate) use diagnose::diagnose;
pub use flight::{
    BlobBody, BlobCache, BlobResponse, BlobSource, BodyRange, CacheStats, FileRange, FlightError,
    FlightOutcome, Outcome, READ_CHUNK, UpstreamBlob,
};
pub use fs::FsBlobStore;
pub use manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestStore, TagIndex, TagTarget};
pub use memory::MemoryBlobStore;
pub(crate) use records::{MAX_RECORD_BYTES, RecordDir};
pub use repos::{MAX_LINKS_PER_REPOSITORY, RepoIndex};
pub use store::{BlobIngest, BlobRead, BlobStore, StoreUsage, StoredBlob};

use crate::oci::{Digest, DigestMismatch};

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// The cache directory; created if missing. One proxy process per directory.
    pub dir: PathBuf,
    /// Bytes of blobs and manifests kept before the least recently used are evicted.
    pub max_bytes: u64,
}

/// Smallest `cache.max_size`.
const MIN_MAX_BYTES: u64 = 1 << 20;

/// A `cache` value the cache cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheSettingsError {
    #[error("must be at least 1MiB")]
    MaxSizeTooSmall,
}

impl crate::config::SettingError for CacheSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::MaxSizeTooSmall => "cache.max_size",
        }
    }
}

impl TryFrom<&crate::config::Cache> for CacheSettings {
    type Error = CacheSettingsError;

    fn try_from(c: &crate::config::Cache) -> Result<Self, Self::Error> {
        if c.max_size.0 < MIN_MAX_BYTES {
            return Err(CacheSettingsError::MaxSizeTooSmall);
        }
        Ok(Self {
            dir: c.dir.clone(),
            max_bytes: c.max_size.0,
        })
    }
}

/// Errors of the cache layer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blocking cache task failed: {0}")]
    Task(String),
    #[error(
        "refusing to commit {digest}: {written} bytes were written but the proof is for \
         {proven} ({proven_len} bytes)"
    )]
    Unverified {
        digest: Digest,
        written: u64,
        proven: Digest,
        proven_len: u64,
    },
    #[error(transparent)]
    DigestMismatch(#[from] DigestMismatch),
    #[error("manifest is {len} bytes; at most {max} are cached")]
    ManifestTooLarge { len: usize, max: usize },
    #[error("media type must be 1 to 255 visible ascii characters")]
    InvalidMediaType,
    #[error("registry host must be 1 to 255 characters of [a-z0-9.-_:[]]")]
    InvalidRegistry,
    #[error("record of {len} bytes; at most {max} are kept")]
    RecordTooLarge { len: usize, max: u64 },
    #[error("{digest} is {len} bytes or more; the cache holds at most {max} (cache.max_size)")]
    TooLarge { digest: Digest, len: u64, max: u64 },
    #[error(
        "no room left for {digest} after {reserved} bytes: the downloads in flight need more \
         than the cache's {max} bytes (cache.max_size)"
    )]
    NoRoom {
        digest: Digest,
        reserved: u64,
        max: u64,
    },
}

impl CacheError {
    /// The blob did not fit in the size limit (alone, or beside the other downloads in
    /// flight): not a disk failure.
    pub fn is_no_room(&self) -> bool {
        matches!(
            self,
            CacheError::TooLarge { .. } | CacheError::NoRoom { .. }
        )
    }
}

/// The blob cache, manifest store, tag index and repository index over one store.
pub struct Cache {
    blobs: BlobCache,
    manifests: ManifestStore,
    tags: TagIndex,
    repos: RepoIndex,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("stats", &self.blobs.stats())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens the cache in `settings.dir`: rebuilds the index from disk, loads the tag and
    /// media-type records, and starts verifying the blobs found on disk in the background.
    pub async fn open(settings: &CacheSettings) -> Result<Cache, CacheError> {
        let settings = settings.clone();
        let (store, records) = tokio::task::spawn_blocking(move || {
            let store = FsBlobStore::open(&settings.dir, settings.max_bytes)?;
            let tmp = settings.dir.join("tmp");
            let dir = |name: &str| settings.dir.join(name);
            let small = records::MAX_RECORD_BYTES;
            let records = Records {
                media_types: RecordDir::open(dir("media-types"), tmp.clone(), small)?,
                tags: RecordDir::open(dir("tags"), tmp.clone(), small)?,
                links: RecordDir::open(dir("links"), tmp.clone(), repos::MAX_LINKS_RECORD_BYTES)?,
                hub_links: RecordDir::open(
                    dir("hub-links"),
                    tmp.clone(),
                    repos::MAX_LINKS_RECORD_BYTES,
                )?,
                public: RecordDir::open(dir("public"), tmp, small)?,
            };
            Ok::<_, CacheError>((store, records))
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        let verifier = store.clone();
        tokio::spawn(async move {
            let corrupt = verifier.verify_pending().await;
            if corrupt > 0 {
                tracing::warn!(corrupt, "dropped cached blobs that failed verification");
            }
        });
        Ok(Cache::with_parts(Arc::new(store), records))
    }

    /// A cache in memory (a [`MemoryBlobStore`]), for tests of the layers above.
    pub fn in_memory(max_bytes: u64) -> Cache {
        Cache::with_store(Arc::new(MemoryBlobStore::new(max_bytes)))
    }

    /// A cache over any store, with its records kept in memory only.
    pub fn with_store(store: Arc<dyn BlobStore>) -> Cache {
        Cache::with_parts(
            store,
            Records {
                media_types: RecordDir::in_memory(records::MAX_RECORD_BYTES),
                tags: RecordDir::in_memory(records::MAX_RECORD_BYTES),
                links: RecordDir::in_memory(repos::MAX_LINKS_RECORD_BYTES),
                hub_links: RecordDir::in_memory(repos::MAX_LINKS_RECORD_BYTES),
                public: RecordDir::in_memory(records::MAX_RECORD_BYTES),
            },
        )
    }

    fn with_parts(store: Arc<dyn BlobStore>, records: Records) -> Cache {
        Cache {
            blobs: BlobCache::new(store.clone()),
            manifests: ManifestStore::new(store, records.media_types),
            tags: TagIndex::new(records.tags),
            repos: RepoIndex::new(records.links, records.hub_links, records.public),
        }
    }

    /// Blobs: lookups and single-flight fetches.
    pub fn blobs(&self) -> &BlobCache {
        &self.blobs
    }

    /// Manifests by digest, with their media type.
    pub fn manifests(&self) -> &ManifestStore {
        &self.manifests
    }

    /// Where tags pointed when last seen.
    pub fn tags(&self) -> &TagIndex {
        &self.tags
    }

    /// Which repositories hold which digests, and which are public.
    pub fn repos(&self) -> &RepoIndex {
        &self.repos
    }
}

/// The record directories beside the blobs.
struct Records {
    media_types: RecordDir<String>,
    tags: RecordDir<manifest::TagRecord>,
    links: RecordDir<Vec<String>>,
    hub_links: RecordDir<Vec<String>>,
    public: RecordDir<u64>,
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use bytes::Bytes;

    use super::*;
    use crate::{
        oci::{RepositoryName, Tag, media_type::OCI_MANIFEST},
        private_state::too_open,
    };

    /// Opens a cache in `dir` and writes one of everything it keeps.
    async fn fill(dir: &std::path::Path) {
        let cache = Cache::open(&CacheSettings {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
        })
        .await
        .unwrap();
        let manifest: &[u8] = br#"{"schemaVersion":2}"#;
        let digest = Digest::sha256_of(manifest);
        cache
            .manifests()
            .put(&digest, OCI_MANIFEST, Bytes::from_static(manifest))
            .await
            .unwrap();
        let repo: RepositoryName = "library/app".parse().unwrap();
        let tag: Tag = "1.0".parse().unwrap();
        let target = TagTarget {
            digest: digest.clone(),
            media_type: OCI_MANIFEST.into(),
        };
        cache
            .tags()
            .put("quay.io", &repo, &tag, &target)
            .await
            .unwrap();
        cache
            .repos()
            .link("quay.io", &repo, &[digest])
            .await
            .unwrap();
        cache
            .repos()
            .mark_public("quay.io", &repo, 1)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_directory_and_file_of_the_cache_is_root_only() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache");
        fill(&dir).await;
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.len(),
            7,
            "blobs, tmp and the record directories: {names:?}"
        );
        assert_eq!(too_open(&dir).unwrap(), [], "as created");

        // What an older version (no explicit modes, umask 022) left: all of it readable.
        let mut stack = vec![dir.clone()];
        while let Some(path) = stack.pop() {
            let is_dir = path.is_dir();
            let mode = if is_dir { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            if is_dir {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
        }
        assert_eq!(
            too_open(&dir).unwrap().len(),
            15,
            "{:?}",
            too_open(&dir).unwrap()
        );
        fill(&dir).await;
        assert_eq!(too_open(&dir).unwrap(), [], "narrowed at open");
    }
}
