//! `FsBlobStore`: blobs as files under `<root>/blobs/<algo>/<hex>`, written through
//! `<root>/tmp/`, indexed by a size-weighted LRU moka cache that is rebuilt from disk at start.
//!
//! Verification at rebuild is lazy: hashing a large cache would delay start-up by minutes, so
//! files found on disk are indexed as *unverified*. Each one is hashed before its first use
//! ([`FsBlobStore::open`]) and by a background pass ([`FsBlobStore::verify_pending`]); a file
//! that fails is deleted and never served. Commits `fsync` before the rename, so a crash leaves
//! either the whole blob or nothing under a final name; re-verification guards against the rest
//! (disk errors, tampering).
//!
//! One process per cache directory: start-up deletes whatever is in `tmp/`.
//!
//! Everything is root's alone: directories 0700 and files 0600, narrowed at start where an older
//! version left them wider.
//!
//! Where each part lives: `index` the moka index and its eviction listener, `rebuild` start-up
//! and verification, `ingest` temp files and commits, `read` the `pread` reader.

mod index;
mod ingest;
mod read;
mod rebuild;

#[cfg(test)]
mod tests;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use futures_util::future::{BoxFuture, FutureExt};
use moka::sync::Cache;
use tracing::warn;

use super::{
    CacheError,
    store::{BlobIngest, BlobStore, IndexKey, StoreUsage, StoredBlob, Tally},
};
use crate::{
    oci::{Algorithm, Digest},
    private_state,
};
use index::{Slot, blob_path, build_index};
use ingest::{FsIngest, create_temp};
use read::FileContent;
use rebuild::VERIFY_STRIPES;

/// Opens a temp file for writing (and reading by followers). Replaceable in tests, to stand in
/// for a full or broken disk.
type TempOpener = dyn Fn(&Path) -> io::Result<File> + Send + Sync;

/// Blob files on a local filesystem.
#[derive(Clone)]
pub struct FsBlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    index: Cache<IndexKey, Slot>,
    tally: Arc<Tally>,
    /// Numbers temp files and reservations.
    temp_seq: AtomicU64,
    open_temp: Box<TempOpener>,
    verify_locks: Vec<tokio::sync::Mutex<()>>,
    /// Entries indexed at rebuild and not yet hashed, oldest first.
    pending: Mutex<Vec<Digest>>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError + use<> {
    let path = path.to_owned();
    move |source| CacheError::Io { op, path, source }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
}

impl FsBlobStore {
    /// Opens (creating if needed) the store under `root` with room for `max_bytes`, deleting
    /// temp leftovers and misnamed files, and indexing the blobs found, oldest first, so LRU
    /// evicts the oldest if the limit shrank. Narrows the modes of `root`, its directories and
    /// the blob files to root-only. Blocks on the filesystem: call it from `spawn_blocking` or
    /// before the runtime is busy.
    pub fn open(root: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, CacheError> {
        Self::open_with(root.into(), max_bytes, Box::new(create_temp))
    }

    fn open_with(
        root: PathBuf,
        max_bytes: u64,
        open_temp: Box<TempOpener>,
    ) -> Result<Self, CacheError> {
        let tmp = root.join("tmp");
        for dir in [root.clone(), root.join("blobs"), tmp.clone()]
            .into_iter()
            .chain(
                Algorithm::ALL
                    .iter()
                    .map(|a| root.join("blobs").join(a.as_str())),
            )
        {
            private_state::create_dir(&dir).map_err(io_err("creating", &dir))?;
        }
        let tally = Arc::new(Tally::default());
        let index = build_index(&root, max_bytes, tally.clone());
        let store = FsBlobStore {
            inner: Arc::new(Inner {
                root,
                tmp,
                max_bytes,
                index,
                tally,
                temp_seq: AtomicU64::new(0),
                open_temp,
                verify_locks: (0..VERIFY_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                pending: Mutex::default(),
            }),
        };
        store.rebuild()?;
        Ok(store)
    }

    /// Like [`FsBlobStore::open`], with temp files opened by `opener` (tests point it at
    /// `/dev/full` to get `ENOSPC`; chmod tricks do not work when tests run as root).
    #[cfg(test)]
    pub(crate) fn open_with_temp_opener(
        root: impl Into<PathBuf>,
        max_bytes: u64,
        opener: impl Fn(&Path) -> io::Result<File> + Send + Sync + 'static,
    ) -> Result<Self, CacheError> {
        Self::open_with(root.into(), max_bytes, Box::new(opener))
    }

    /// Where a committed blob lives.
    fn path_of(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.inner.root, digest)
    }

    /// Applies pending evictions now (and so deletes their files).
    #[cfg(test)]
    fn run_pending_tasks(&self) {
        self.inner.index.run_pending_tasks();
    }
}

impl BlobStore for FsBlobStore {
    fn open<'a>(
        &'a self,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<StoredBlob>, CacheError>> {
        async move {
            let Some(entry) = self.inner.entry(digest) else {
                return Ok(None);
            };
            if !entry.verified && self.verify(digest).await != Some(true) {
                return Ok(None);
            }
            let path = self.path_of(digest);
            let opened = blocking({
                let path = path.clone();
                move || {
                    let file = File::open(&path).map_err(io_err("opening", &path))?;
                    let len = file.metadata().map_err(io_err("reading size of", &path))?.len();
                    Ok((file, len))
                }
            })
            .await;
            match opened {
                Ok((file, len)) if len == entry.len => Ok(Some(StoredBlob {
                    len,
                    content: Arc::new(FileContent(Arc::new(file))),
                })),
                Ok((_, len)) => {
                    warn!(%digest, indexed = entry.len, on_disk = len, "cached blob changed size; dropping it");
                    self.inner.tally.corrupt();
                    self.inner.invalidate(digest);
                    Ok(None)
                }
                // Deleted behind the index's back (or by an eviction racing a re-commit):
                // forget it, the caller fetches again.
                Err(CacheError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    self.inner.invalidate(digest);
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn ingest<'a>(
        &'a self,
        digest: &'a Digest,
        len: Option<u64>,
    ) -> BoxFuture<'a, Result<Box<dyn BlobIngest>, CacheError>> {
        async move {
            let ingest = FsIngest::start(&self.inner, digest, len).await?;
            Ok(Box::new(ingest) as Box<dyn BlobIngest>)
        }
        .boxed()
    }

    fn remove(&self, digest: &Digest) {
        self.inner.invalidate(digest);
    }

    fn usage(&self) -> StoreUsage {
        self.inner.tally.usage()
    }
}
