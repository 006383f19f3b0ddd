//! `MemoryBlobStore`: the in-memory fake of the blob store, for tests of the layers above. It
//! can be told to fail, to stand in for a full or broken disk.

use std::{
    io,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};

use super::{
    CacheError,
    store::{
        BlobIngest, BlobRead, BlobStore, Held, IndexKey, Reservation, StoreUsage, StoredBlob,
        Tally, check_fits, check_proof, kib_capacity, kib_weight,
    },
};
use crate::oci::{Digest, Verified};

/// Blobs held in memory under the same size-bounded LRU index as the real store, with the same
/// reservations for ingests in progress.
pub struct MemoryBlobStore {
    max_bytes: u64,
    index: Cache<IndexKey, Slot>,
    tally: Arc<Tally>,
    faults: Arc<Mutex<Faults>>,
    reservations: AtomicU64,
}

#[derive(Debug, Clone)]
enum Slot {
    Blob(Bytes),
    Reserved(Held),
}

impl From<Held> for Slot {
    fn from(held: Held) -> Self {
        Slot::Reserved(held)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    fail_ingest: bool,
    fail_writes_after: Option<u64>,
}

impl MemoryBlobStore {
    /// A store that holds at most `max_bytes` (in KiB-rounded weights, like the real one).
    pub fn new(max_bytes: u64) -> Self {
        let tally = Arc::new(Tally::default());
        let listener_tally = tally.clone();
        let index = Cache::builder()
            .max_capacity(kib_capacity(max_bytes))
            .weigher(|_: &IndexKey, slot: &Slot| match slot {
                Slot::Blob(b) => kib_weight(b.len() as u64),
                Slot::Reserved(held) => held.weight(),
            })
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |_, slot: Slot, cause| match slot {
                Slot::Blob(b) => {
                    listener_tally.removed(b.len() as u64, cause == RemovalCause::Size)
                }
                Slot::Reserved(held) => held.removed(cause, &listener_tally),
            })
            .build();
        MemoryBlobStore {
            max_bytes,
            index,
            tally,
            faults: Arc::default(),
            reservations: AtomicU64::new(0),
        }
    }

    /// Makes every new ingest fail to start, as if no temp file could be created.
    pub fn fail_ingests(&self, fail: bool) {
        self.faults.lock().expect("faults lock").fail_ingest = fail;
    }

    /// Makes writes fail with `StorageFull` once an ingest would hold more than `limit` bytes
    /// (`Some(0)`: the first write fails), as a disk filling up would.
    pub fn fail_writes_after(&self, limit: Option<u64>) {
        self.faults.lock().expect("faults lock").fail_writes_after = limit;
    }

    /// Applies pending evictions now (tests check usage right after an insert).
    pub fn run_pending_tasks(&self) {
        self.index.run_pending_tasks();
    }
}

impl BlobStore for MemoryBlobStore {
    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<StoredBlob>, CacheError>> {
        let blob = match self.index.get(&IndexKey::Blob(digest.clone())) {
            Some(Slot::Blob(bytes)) => Some(StoredBlob {
                len: bytes.len() as u64,
                content: Arc::new(Committed(bytes)),
            }),
            _ => None,
        };
        futures_util::future::ready(Ok(blob)).boxed()
    }

    fn ingest<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, Result<Box<dyn BlobIngest>, CacheError>> {
        let faults = *self.faults.lock().expect("faults lock");
        let result = if faults.fail_ingest {
            Err(CacheError::Io {
                op: "creating temp file",
                path: PathBuf::from("memory"),
                source: io::Error::from(io::ErrorKind::ReadOnlyFilesystem),
            })
        } else {
            check_fits(digest, len, self.max_bytes).map(|()| {
                let id = self.reservations.fetch_add(1, Ordering::Relaxed);
                Box::new(MemoryIngest {
                    digest: digest.clone(),
                    buf: Arc::default(),
                    index: self.index.clone(),
                    tally: self.tally.clone(),
                    faults: self.faults.clone(),
                    reservation: Reservation::new(
                        self.index.clone(),
                        self.tally.clone(),
                        id,
                        digest.clone(),
                        len,
                        self.max_bytes,
                    ),
                }) as Box<dyn BlobIngest>
            })
        };
        futures_util::future::ready(result).boxed()
    }

    fn remove(&self, digest: &Digest) {
        self.index.invalidate(&IndexKey::Blob(digest.clone()));
    }

    fn usage(&self) -> StoreUsage {
        self.tally.usage()
    }
}

struct Committed(Bytes);

impl BlobRead for Committed {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.0.len());
        let end = start.saturating_add(len).min(self.0.len());
        futures_util::future::ready(Ok(self.0.slice(start..end))).boxed()
    }
}

struct MemoryIngest {
    digest: Digest,
    buf: Arc<Mutex<Vec<u8>>>,
    index: Cache<IndexKey, Slot>,
    tally: Arc<Tally>,
    faults: Arc<Mutex<Faults>>,
    reservation: Reservation<Slot>,
}

impl BlobIngest for MemoryIngest {
    fn write(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, Result<(), CacheError>> {
        let mut buf = self.buf.lock().expect("ingest buffer lock");
        let total = (buf.len() + chunks.iter().map(Bytes::len).sum::<usize>()) as u64;
        let limit = self.faults.lock().expect("faults lock").fail_writes_after;
        let result = if limit.is_some_and(|l| total > l) {
            Err(CacheError::Io {
                op: "writing",
                path: PathBuf::from("memory"),
                source: io::Error::from(io::ErrorKind::StorageFull),
            })
        } else {
            self.reservation.cover(total).map(|()| {
                chunks.iter().for_each(|c| buf.extend_from_slice(c));
            })
        };
        futures_util::future::ready(result).boxed()
    }

    fn written(&self) -> u64 {
        self.buf.lock().expect("ingest buffer lock").len() as u64
    }

    fn content(&self) -> Arc<dyn BlobRead> {
        Arc::new(Growing(self.buf.clone()))
    }

    fn commit(mut self: Box<Self>, proof: Verified) -> BoxFuture<'static, Result<(), CacheError>> {
        let result = check_proof(&self.digest, self.written(), &proof).map(|()| {
            let bytes = Bytes::from(self.buf.lock().expect("ingest buffer lock").clone());
            // The reservation first, as in the real store.
            self.reservation.release();
            self.tally.inserted(bytes.len() as u64);
            self.index
                .insert(IndexKey::Blob(self.digest.clone()), Slot::Blob(bytes));
            self.index.run_pending_tasks();
        });
        futures_util::future::ready(result).boxed()
    }
}

struct Growing(Arc<Mutex<Vec<u8>>>);

impl BlobRead for Growing {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let buf = self.0.lock().expect("blob buffer lock");
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
        let end = start.saturating_add(len).min(buf.len());
        futures_util::future::ready(Ok(Bytes::copy_from_slice(&buf[start..end]))).boxed()
    }
}
