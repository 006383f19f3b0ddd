//! The `BlobStore` contract: content-addressed bytes that are only visible once verified.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::CacheError;
use crate::oci::{Digest, Verified};

/// Random-access reads of one blob's bytes, shared by every reader of that blob.
pub trait BlobRead: Send + Sync {
    /// Reads up to `len` bytes at `offset`; fewer only where the content ends.
    ///
    /// The read starts when this is called, not when the future is first polled, so a reader
    /// can read the next chunk while the previous one is being sent.
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>>;
}

/// A verified blob, open for reading. The handle keeps working if the blob is evicted while it
/// is read (an open file outlives its name).
#[derive(Clone)]
pub struct StoredBlob {
    pub len: u64,
    pub content: Arc<dyn BlobRead>,
}

/// A blob being written. Nothing is visible under the digest until [`BlobIngest::commit`]
/// succeeds; dropping an uncommitted ingest discards what was written.
pub trait BlobIngest: Send {
    /// Appends a batch of chunks in order. After an error the ingest is unusable: drop it.
    fn write(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, io::Result<()>>;

    /// Bytes appended so far.
    fn written(&self) -> u64;

    /// Reads what has been written so far (readers never read past [`BlobIngest::written`]);
    /// keeps working after the commit.
    fn content(&self) -> Arc<dyn BlobRead>;

    /// Publishes the blob under its digest. `proof` must be for this digest and exactly the
    /// bytes written, or the commit is refused ([`CacheError::Unverified`]).
    fn commit(self: Box<Self>, proof: Verified) -> BoxFuture<'static, Result<(), CacheError>>;
}

/// Content-addressed blob storage with a size-bounded LRU index.
///
/// Implementations: [`super::FsBlobStore`] (files on disk) and [`super::MemoryBlobStore`] (a
/// fake for tests of the layers above); both pass the same conformance suite.
pub trait BlobStore: Send + Sync {
    /// Opens a stored blob, counting as a use for LRU. `None` if it is not stored (or no longer
    /// passes verification).
    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<StoredBlob>, CacheError>>;

    /// Starts writing a blob.
    fn ingest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Box<dyn BlobIngest>, CacheError>>;

    /// Forgets a blob and frees its space. Readers that already opened it keep their bytes.
    fn remove(&self, digest: &Digest);

    /// What the store holds right now.
    fn usage(&self) -> StoreUsage;
}

/// Counters a store keeps for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Bytes of committed blobs (exact, not the KiB weights).
    pub bytes: u64,
    pub entries: u64,
    /// Blobs dropped to stay under the size limit.
    pub evictions: u64,
    /// Stored blobs found corrupt (wrong length or content) and dropped.
    pub corrupt: u64,
}

/// The index weighs entries in KiB, rounded up, because moka weights are `u32`: bytes would cap
/// a single entry at 4 GiB. Empty blobs weigh 1 so they still count as something.
pub(super) fn kib_weight(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// The index capacity for `max_bytes`, in the same KiB unit as [`kib_weight`].
pub(super) fn kib_capacity(max_bytes: u64) -> u64 {
    max_bytes / 1024
}

/// Exact usage counters, shared between a store and its index's eviction listener.
#[derive(Debug, Default)]
pub(super) struct Tally {
    bytes: AtomicU64,
    entries: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
}

impl Tally {
    /// Every index insert, including one that replaces an entry (the listener sees the old
    /// entry leave with `Replaced`, so the sums stay exact).
    pub(super) fn inserted(&self, len: u64) {
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn removed(&self, len: u64, evicted: bool) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
        if evicted {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn corrupt(&self) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn usage(&self) -> StoreUsage {
        StoreUsage {
            bytes: self.bytes.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
        }
    }
}

/// Checks a commit proof against what an ingest wrote.
pub(super) fn check_proof(
    digest: &Digest,
    written: u64,
    proof: &Verified,
) -> Result<(), CacheError> {
    if proof.digest() != digest || proof.len() != written {
        return Err(CacheError::Unverified {
            digest: digest.clone(),
            written,
            proven: proof.digest().clone(),
            proven_len: proof.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_up_to_kib() {
        assert_eq!(kib_weight(0), 1);
        assert_eq!(kib_weight(1), 1);
        assert_eq!(kib_weight(1024), 1);
        assert_eq!(kib_weight(1025), 2);
        assert_eq!(kib_weight(u64::MAX), u32::MAX);
        assert_eq!(kib_capacity(10 * 1024 * 1024), 10 * 1024);
    }
}
