//! The store's index: a size-weighted LRU moka cache of the blob files (and of the room
//! reserved for temp files being written) whose eviction listener deletes the evicted files.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};
use tracing::{debug, warn};

use super::Inner;
use crate::{
    cache::store::{Held, IndexKey, Tally, kib_capacity, kib_weight},
    oci::Digest,
};

/// A blob file in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) len: u64,
    /// False for files found at start-up until they have been hashed.
    pub(super) verified: bool,
}

/// What the index holds: blob files, and room reserved for temp files being written.
#[derive(Debug, Clone)]
pub(super) enum Slot {
    Blob(Entry),
    Reserved(Held),
}

impl From<Held> for Slot {
    fn from(held: Held) -> Self {
        Slot::Reserved(held)
    }
}

impl Inner {
    pub(super) fn entry(&self, digest: &Digest) -> Option<Entry> {
        match self.index.get(&IndexKey::Blob(digest.clone())) {
            Some(Slot::Blob(entry)) => Some(entry),
            _ => None,
        }
    }

    pub(super) fn insert(&self, digest: &Digest, entry: Entry) {
        self.tally.inserted(entry.len);
        self.index
            .insert(IndexKey::Blob(digest.clone()), Slot::Blob(entry));
    }

    pub(super) fn invalidate(&self, digest: &Digest) {
        self.index.invalidate(&IndexKey::Blob(digest.clone()));
    }
}

/// Where a committed blob lives under the store's `root`.
pub(super) fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.encoded())
}

pub(super) fn build_index(root: &Path, max_bytes: u64, tally: Arc<Tally>) -> Cache<IndexKey, Slot> {
    let root = root.to_owned();
    Cache::builder()
        .max_capacity(kib_capacity(max_bytes))
        .weigher(|_: &IndexKey, slot: &Slot| match slot {
            Slot::Blob(e) => kib_weight(e.len),
            Slot::Reserved(held) => held.weight(),
        })
        .eviction_policy(EvictionPolicy::lru())
        .eviction_listener(move |key: Arc<IndexKey>, slot: Slot, cause| {
            let entry = match slot {
                Slot::Blob(entry) => entry,
                // Its temp file belongs to its ingest, which learns that it must stop.
                Slot::Reserved(held) => return held.removed(cause, &tally),
            };
            tally.removed(entry.len, cause == RemovalCause::Size);
            // `Replaced` is the same blob re-indexed (verified, or committed again): its file
            // is the one now indexed and must stay.
            let IndexKey::Blob(digest) = &*key else {
                return;
            };
            if cause == RemovalCause::Replaced {
                return;
            }
            let path = blob_path(&root, digest);
            match fs::remove_file(&path) {
                Ok(()) => debug!(%digest, ?cause, "blob removed from cache"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "cannot delete cached blob"),
            }
        })
        .build()
}
