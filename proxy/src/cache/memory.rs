//! `MemoryBlobStore`: the in-memory fake of the blob store, for tests of the layers above. It
//! can be told to fail, to stand in for a full or broken disk.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};

use super::{
    CacheError,
    store::{
        BlobIngest, BlobRead, BlobStore, StoreUsage, StoredBlob, Tally, check_proof, kib_capacity,
        kib_weight,
    },
};
use crate::oci::{Digest, Verified};

/// Blobs held in memory under the same size-bounded LRU index as the real store.
pub struct MemoryBlobStore {
    index: Cache<Digest, Bytes>,
    tally: Arc<Tally>,
    faults: Arc<Mutex<Faults>>,
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
            .weigher(|_: &Digest, b: &Bytes| kib_weight(b.len() as u64))
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |_, b: Bytes, cause| {
                listener_tally.removed(b.len() as u64, cause == RemovalCause::Size);
            })
            .build();
        MemoryBlobStore {
            index,
            tally,
            faults: Arc::default(),
        }
    }

    /// Makes every new ingest fail to start, as if no temp file could be created.
    pub fn fail_ingests(&self, fail: bool) {
        self.faults.lock().unwrap().fail_ingest = fail;
    }

    /// Makes writes fail with `StorageFull` once an ingest would hold more than `limit` bytes
    /// (`Some(0)`: the first write fails), as a disk filling up would.
    pub fn fail_writes_after(&self, limit: Option<u64>) {
        self.faults.lock().unwrap().fail_writes_after = limit;
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
        let blob = self.index.get(digest).map(|bytes| StoredBlob {
            len: bytes.len() as u64,
            content: Arc::new(Committed(bytes)),
        });
        futures_util::future::ready(Ok(blob)).boxed()
    }

    fn ingest<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Box<dyn BlobIngest>, CacheError>> {
        let faults = *self.faults.lock().unwrap();
        let result = if faults.fail_ingest {
            Err(CacheError::Io {
                op: "creating temp file",
                path: PathBuf::from("memory"),
                source: io::Error::from(io::ErrorKind::ReadOnlyFilesystem),
            })
        } else {
            Ok(Box::new(MemoryIngest {
                digest: digest.clone(),
                buf: Arc::default(),
                index: self.index.clone(),
                tally: self.tally.clone(),
                faults: self.faults.clone(),
            }) as Box<dyn BlobIngest>)
        };
        futures_util::future::ready(result).boxed()
    }

    fn remove(&self, digest: &Digest) {
        self.index.invalidate(digest);
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
    index: Cache<Digest, Bytes>,
    tally: Arc<Tally>,
    faults: Arc<Mutex<Faults>>,
}

impl BlobIngest for MemoryIngest {
    fn write(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, io::Result<()>> {
        let mut buf = self.buf.lock().unwrap();
        let len: usize = chunks.iter().map(Bytes::len).sum();
        let limit = self.faults.lock().unwrap().fail_writes_after;
        let result = if limit.is_some_and(|l| (buf.len() + len) as u64 > l) {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        } else {
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            Ok(())
        };
        futures_util::future::ready(result).boxed()
    }

    fn written(&self) -> u64 {
        self.buf.lock().unwrap().len() as u64
    }

    fn content(&self) -> Arc<dyn BlobRead> {
        Arc::new(Growing(self.buf.clone()))
    }

    fn commit(self: Box<Self>, proof: Verified) -> BoxFuture<'static, Result<(), CacheError>> {
        let result = check_proof(&self.digest, self.written(), &proof).map(|()| {
            let bytes = Bytes::from(self.buf.lock().unwrap().clone());
            self.tally.inserted(bytes.len() as u64);
            self.index.insert(self.digest.clone(), bytes);
            self.index.run_pending_tasks();
        });
        futures_util::future::ready(result).boxed()
    }
}

struct Growing(Arc<Mutex<Vec<u8>>>);

impl BlobRead for Growing {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let buf = self.0.lock().unwrap();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
        let end = start.saturating_add(len).min(buf.len());
        futures_util::future::ready(Ok(Bytes::copy_from_slice(&buf[start..end]))).boxed()
    }
}
