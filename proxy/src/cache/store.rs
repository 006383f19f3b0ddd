//! The `BlobStore` contract: content-addressed bytes that are only visible once verified, and a
//! size limit that counts the bytes being written as well as the blobs stored.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use moka::{notification::RemovalCause, sync::Cache};

use super::CacheError;
use crate::oci::{Digest, Verified};

/// Room for an ingest's bytes is reserved ahead of its writes in steps of this size (one index
/// update per step, not per write), or a 64th of a smaller cache so that the room held but not
/// yet written stays small beside what the cache holds.
const RESERVE_STEP: u64 = 1024 * 1024;

/// The reservation step of a store with room for `max_bytes`.
pub(super) fn reserve_step(max_bytes: u64) -> u64 {
    (max_bytes / 64).clamp(1024, RESERVE_STEP)
}

/// Random-access reads of one blob's bytes, shared by every reader of that blob.
pub trait BlobRead: Send + Sync {
    /// Reads up to `len` bytes at `offset`; fewer only where the content ends.
    ///
    /// The read starts when this is called, not when the future is first polled, so a reader
    /// can read the next chunk while the previous one is being sent.
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>>;

    /// The open file holding the bytes, for a transport that sends files itself; `None` when
    /// they are not (only) in one file.
    fn file(&self) -> Option<Arc<std::fs::File>> {
        None
    }
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
///
/// What an ingest writes counts toward the store's size limit while it is written: before each
/// write the ingest reserves room in the store's LRU index (ahead, in steps of up to 1 MiB, never
/// beyond the length announced to [`BlobStore::ingest`]), which
/// evicts least recently used blobs like a new blob would. The commit swaps the reservation for
/// the blob's entry; dropping the ingest releases it.
pub trait BlobIngest: Send {
    /// Appends a batch of chunks in order. After an error the ingest is unusable: drop it.
    ///
    /// Fails with [`CacheError::TooLarge`] once the blob would not fit in the size limit even
    /// alone, and with [`CacheError::NoRoom`] once the index has taken the reservation back
    /// because the ingests in flight together no longer fit (the least recently grown goes
    /// first). Nothing is written beyond the reservation.
    fn write(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, Result<(), CacheError>>;

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

    /// Starts writing a blob. `len` is its length if known (an upstream `Content-Length`): a
    /// blob announced larger than the size limit is refused ([`CacheError::TooLarge`]) before
    /// anything is written.
    fn ingest<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
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
    /// Bytes reserved for ingests in progress (ahead of their writes, in steps of up to 1 MiB),
    /// counted against the size limit beside `bytes`.
    pub in_flight: u64,
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

/// The most bytes one entry of an index with room for `max_bytes` may weigh: the capacity, and
/// never more than a weight can say (beyond that an entry would be undercounted).
pub(super) fn largest_entry(max_bytes: u64) -> u64 {
    kib_capacity(max_bytes).min(u64::from(u32::MAX)) * 1024
}

/// Keys of a store's index: committed blobs, and the room reserved by ingests in progress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum IndexKey {
    Blob(Digest),
    /// An ingest's reservation, by a number unique within the store.
    Reservation(u64),
}

/// A reservation's value in the index: how many bytes it holds, and a flag the index raises when
/// it takes them back.
#[derive(Debug, Clone)]
pub(super) struct Held {
    bytes: u64,
    revoked: Arc<AtomicBool>,
}

impl Held {
    pub(super) fn weight(&self) -> u32 {
        kib_weight(self.bytes)
    }

    /// For the index's eviction listener. `Replaced` is the reservation growing (the new value
    /// shares the flag); anything else (evicted for room, or released) ends it.
    pub(super) fn removed(&self, cause: RemovalCause, tally: &Tally) {
        tally.released(self.bytes);
        if cause != RemovalCause::Replaced {
            self.revoked.store(true, Ordering::Release);
        }
    }
}

/// Room in a store's index for the bytes one ingest writes. Blocking where it grows: evictions
/// may delete files.
pub(super) struct Reservation<V: From<Held> + Clone + Send + Sync + 'static> {
    index: Cache<IndexKey, V>,
    tally: Arc<Tally>,
    key: IndexKey,
    digest: Digest,
    max_bytes: u64,
    /// The length announced for the blob, if any: no room is reserved ahead beyond it.
    announced: Option<u64>,
    bytes: u64,
    revoked: Arc<AtomicBool>,
}

impl<V: From<Held> + Clone + Send + Sync + 'static> Reservation<V> {
    /// An empty reservation (nothing in the index yet) for `digest`, announced as `announced`
    /// bytes long, in a store with room for `max_bytes`; `id` must be unique within the store.
    pub(super) fn new(
        index: Cache<IndexKey, V>,
        tally: Arc<Tally>,
        id: u64,
        digest: Digest,
        announced: Option<u64>,
        max_bytes: u64,
    ) -> Self {
        Reservation {
            index,
            tally,
            key: IndexKey::Reservation(id),
            digest,
            max_bytes,
            announced,
            bytes: 0,
            revoked: Arc::default(),
        }
    }

    /// Makes sure `total` bytes are reserved, growing the reservation (and so evicting least
    /// recently used entries) if needed.
    pub(super) fn cover(&mut self, total: u64) -> Result<(), CacheError> {
        if self.revoked.load(Ordering::Acquire) {
            return Err(self.no_room());
        }
        if total <= self.bytes {
            return Ok(());
        }
        let largest = largest_entry(self.max_bytes);
        if total > largest {
            self.release();
            return Err(too_large(&self.digest, total, self.max_bytes));
        }
        let ahead = total
            .next_multiple_of(reserve_step(self.max_bytes))
            .min(largest);
        let bytes = self
            .announced
            .map_or(ahead, |len| ahead.min(len.max(total)));
        self.tally.reserved(bytes);
        self.index.insert(
            self.key.clone(),
            V::from(Held {
                bytes,
                revoked: self.revoked.clone(),
            }),
        );
        self.bytes = bytes;
        // Evict now, so the room exists before the bytes are written.
        self.index.run_pending_tasks();
        if self.revoked.load(Ordering::Acquire) {
            let error = self.no_room();
            self.release();
            return Err(error);
        }
        Ok(())
    }

    /// Gives the room back (before a commit inserts the blob's own entry, or on drop); the
    /// reservation never grows again.
    pub(super) fn release(&mut self) {
        self.revoked.store(true, Ordering::Release);
        if self.bytes > 0 {
            self.index.invalidate(&self.key);
            self.bytes = 0;
        }
    }

    fn no_room(&self) -> CacheError {
        CacheError::NoRoom {
            digest: self.digest.clone(),
            reserved: self.bytes,
            max: self.max_bytes,
        }
    }
}

impl<V: From<Held> + Clone + Send + Sync + 'static> Drop for Reservation<V> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Refuses a blob of `len` bytes (or more) up front if the store cannot hold it.
pub(super) fn check_fits(
    digest: &Digest,
    len: Option<u64>,
    max_bytes: u64,
) -> Result<(), CacheError> {
    match len {
        Some(len) if len > largest_entry(max_bytes) => Err(too_large(digest, len, max_bytes)),
        _ => Ok(()),
    }
}

fn too_large(digest: &Digest, len: u64, max_bytes: u64) -> CacheError {
    CacheError::TooLarge {
        digest: digest.clone(),
        len,
        max: max_bytes,
    }
}

/// Exact usage counters, shared between a store and its index's eviction listener.
#[derive(Debug, Default)]
pub(super) struct Tally {
    bytes: AtomicU64,
    entries: AtomicU64,
    in_flight: AtomicU64,
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

    /// Every reservation insert, growing ones included (like [`Tally::inserted`]).
    fn reserved(&self, bytes: u64) {
        self.in_flight.fetch_add(bytes, Ordering::Relaxed);
    }

    fn released(&self, bytes: u64) {
        self.in_flight.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(super) fn corrupt(&self) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn usage(&self) -> StoreUsage {
        StoreUsage {
            bytes: self.bytes.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
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
        assert_eq!(largest_entry(10 * 1024 * 1024 + 1000), 10 * 1024 * 1024);
        assert_eq!(largest_entry(u64::MAX), u64::from(u32::MAX) * 1024);
        assert_eq!(reserve_step(20 << 30), 1 << 20);
        assert_eq!(reserve_step(1 << 20), 16 << 10);
        assert_eq!(reserve_step(3 * 1024), 1024);
    }
}
