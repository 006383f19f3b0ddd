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

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};
use tracing::{debug, info, warn};

use super::{
    CacheError,
    store::{
        BlobIngest, BlobRead, BlobStore, Held, IndexKey, Reservation, StoreUsage, StoredBlob,
        Tally, check_fits, check_proof, kib_capacity, kib_weight,
    },
};
use crate::{
    oci::{Algorithm, Digest, Verified},
    private_state,
};

mod mapped;

/// Read size when hashing a whole file.
const HASH_CHUNK: usize = 1024 * 1024;
/// Verification locks are striped by digest: the same blob is never hashed twice at once, and
/// different blobs rarely wait on each other.
const VERIFY_STRIPES: usize = 16;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    len: u64,
    /// False for files found at start-up until they have been hashed.
    verified: bool,
}

/// What the index holds: blob files, and room reserved for temp files being written.
#[derive(Debug, Clone)]
enum Slot {
    Blob(Entry),
    Reserved(Held),
}

impl From<Held> for Slot {
    fn from(held: Held) -> Self {
        Slot::Reserved(held)
    }
}

impl Inner {
    fn entry(&self, digest: &Digest) -> Option<Entry> {
        match self.index.get(&IndexKey::Blob(digest.clone())) {
            Some(Slot::Blob(entry)) => Some(entry),
            _ => None,
        }
    }

    fn insert(&self, digest: &Digest, entry: Entry) {
        self.tally.inserted(entry.len);
        self.index
            .insert(IndexKey::Blob(digest.clone()), Slot::Blob(entry));
    }

    fn invalidate(&self, digest: &Digest) {
        self.index.invalidate(&IndexKey::Blob(digest.clone()));
    }
}

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.encoded())
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

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where a committed blob lives.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.inner.root, digest)
    }

    /// Applies pending evictions now (and so deletes their files).
    pub fn run_pending_tasks(&self) {
        self.inner.index.run_pending_tasks();
    }

    fn rebuild(&self) -> Result<(), CacheError> {
        let inner = &self.inner;
        let removed_tmp = clear_dir(&inner.tmp)?;
        let mut found = Vec::new();
        let mut removed = 0usize;
        let blobs = inner.root.join("blobs");
        for entry in fs::read_dir(&blobs).map_err(io_err("listing", &blobs))? {
            let entry = entry.map_err(io_err("listing", &blobs))?;
            let name = entry.file_name();
            let algorithm = Algorithm::ALL
                .into_iter()
                .find(|a| name.to_str() == Some(a.as_str()));
            let Some(algorithm) = algorithm else {
                remove_any(&entry.path());
                removed += 1;
                continue;
            };
            let dir = entry.path();
            for file in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
                let file = file.map_err(io_err("listing", &dir))?;
                let path = file.path();
                let digest = file
                    .file_name()
                    .to_str()
                    .and_then(|n| Digest::new(algorithm, n).ok());
                let meta = file.metadata().ok().filter(|m| m.is_file());
                match (digest, meta) {
                    (Some(digest), Some(meta)) => {
                        private_state::restrict(&path, &meta, private_state::FILE_MODE)
                            .map_err(io_err("restricting", &path))?;
                        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((mtime, digest, meta.len()));
                    }
                    _ => {
                        remove_any(&path);
                        removed += 1;
                    }
                }
            }
        }
        found.sort();
        let mut pending = Vec::with_capacity(found.len());
        for (_, digest, len) in found {
            inner.insert(
                &digest,
                Entry {
                    len,
                    verified: false,
                },
            );
            pending.push(digest);
        }
        inner.index.run_pending_tasks();
        let usage = inner.tally.usage();
        info!(
            root = %inner.root.display(),
            blobs = usage.entries,
            bytes = usage.bytes,
            removed_temp = removed_tmp,
            removed_misnamed = removed,
            "blob cache index rebuilt"
        );
        *inner.pending.lock().expect("pending lock") = pending;
        Ok(())
    }

    /// Hashes every blob found at start-up that has not been verified yet, one at a time,
    /// deleting those that fail. Returns how many were found corrupt.
    pub async fn verify_pending(&self) -> usize {
        let pending = std::mem::take(&mut *self.inner.pending.lock().expect("pending lock"));
        let mut corrupt = 0;
        for digest in pending {
            if let Some(false) = self.verify(&digest).await {
                corrupt += 1;
            }
        }
        corrupt
    }

    /// Makes sure an indexed blob has been hashed. `Some(true)`: indexed and verified;
    /// `Some(false)`: it was corrupt and is gone; `None`: not indexed.
    async fn verify(&self, digest: &Digest) -> Option<bool> {
        // The hex of a digest is uniform already: its first characters pick the stripe.
        let stripe =
            usize::from_str_radix(&digest.encoded()[..4], 16).unwrap_or(0) % VERIFY_STRIPES;
        let _guard = self.inner.verify_locks[stripe].lock().await;
        let entry = self.inner.entry(digest)?;
        if entry.verified {
            return Some(true);
        }
        let path = self.path_of(digest);
        let expected = digest.clone();
        let outcome = blocking(move || Ok(hash_file(&path, &expected))).await;
        match outcome {
            Ok(Ok(true)) => {
                // Replacing the entry: the listener ignores `Replaced`, the file stays.
                self.inner.insert(
                    digest,
                    Entry {
                        len: entry.len,
                        verified: true,
                    },
                );
                Some(true)
            }
            Ok(Ok(false)) => {
                warn!(%digest, "cached blob does not match its digest; deleting it");
                self.inner.tally.corrupt();
                self.inner.invalidate(digest);
                Some(false)
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                self.inner.invalidate(digest);
                None
            }
            Ok(Err(e)) => {
                warn!(%digest, error = %e, "cannot read cached blob to verify it; dropping it");
                self.inner.tally.corrupt();
                self.inner.invalidate(digest);
                Some(false)
            }
            Err(e) => {
                warn!(%digest, error = %e, "verifying cached blob failed");
                None
            }
        }
    }
}

/// Hashes a file and compares it with its digest.
fn hash_file(path: &Path, digest: &Digest) -> io::Result<bool> {
    let mut file = File::open(path)?;
    let mut verifier = digest.verifier();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => verifier.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(verifier.finish().is_ok())
}

fn build_index(root: &Path, max_bytes: u64, tally: Arc<Tally>) -> Cache<IndexKey, Slot> {
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

fn create_temp(path: &Path) -> io::Result<File> {
    private_state::new_file().read(true).open(path)
}

/// Deletes everything inside `dir`; returns how many entries went.
fn clear_dir(dir: &Path) -> Result<usize, CacheError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        remove_any(&entry.path());
        n += 1;
    }
    Ok(n)
}

fn remove_any(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot delete stray cache file");
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
                    content: stored_content(Arc::new(file), len, digest),
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
            check_fits(digest, len, self.inner.max_bytes)?;
            let seq = self.inner.temp_seq.fetch_add(1, Ordering::Relaxed);
            let tmp_path = self.inner.tmp.join(format!(
                "{}-{}.{}.{seq}",
                digest.algorithm(),
                digest.encoded(),
                std::process::id()
            ));
            let inner = self.inner.clone();
            let file = blocking({
                let tmp_path = tmp_path.clone();
                move || (inner.open_temp)(&tmp_path).map_err(io_err("creating", &tmp_path))
            })
            .await?;
            let reservation = Reservation::new(
                self.inner.index.clone(),
                self.inner.tally.clone(),
                seq,
                digest.clone(),
                len,
                self.inner.max_bytes,
            );
            Ok(Box::new(FsIngest {
                inner: self.inner.clone(),
                digest: digest.clone(),
                tmp_path,
                file: Arc::new(file),
                written: 0,
                reservation: Arc::new(Mutex::new(reservation)),
            }) as Box<dyn BlobIngest>)
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

/// How a published blob is read: through a mapping from [`mapped::MAP_MIN`] bytes on, with
/// `pread`; `pread` alone where the file cannot be mapped.
fn stored_content(file: Arc<File>, len: u64, digest: &Digest) -> Arc<dyn BlobRead> {
    let pread = Arc::new(FileContent(file.clone()));
    if len < mapped::MAP_MIN {
        return pread;
    }
    match mapped::MappedContent::new(file, len, pread.clone()) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            debug!(%digest, error = %e, "cannot map cached blob; reading it with pread");
            pread
        }
    }
}

/// Reads an open file with `pread`, so any number of readers share one descriptor.
///
/// What the page cache holds (a hot blob: the common case) is read on the calling task with
/// `preadv2(RWF_NOWAIT)`, which returns what it can without waiting for the disk; only the rest
/// goes to a blocking thread. Handing every 256 KiB read of a cache hit to a blocking thread cost
/// about a sixth of its CPU in wake-ups and context switches. Reads go into uninitialised
/// capacity: zeroing each buffer first cost another 4%.
struct FileContent(Arc<File>);

impl BlobRead for FileContent {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        // pread refuses offsets past i64::MAX; nothing can be stored there anyway.
        if offset >= i64::MAX as u64 - len as u64 {
            return futures_util::future::ready(Ok(Bytes::new())).boxed();
        }
        let mut buf = Vec::with_capacity(len);
        loop {
            match pread_spare(&self.0, &mut buf, offset, libc::RWF_NOWAIT) {
                // End of file, or everything asked for: no thread needed.
                Ok(0) => return futures_util::future::ready(Ok(Bytes::from(buf))).boxed(),
                Ok(_) if buf.len() == len => {
                    return futures_util::future::ready(Ok(Bytes::from(buf))).boxed();
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EAGAIN (not cached), or a kernel without RWF_NOWAIT: read the rest blocking.
                Err(_) => break,
            }
        }
        let file = self.0.clone();
        let task = tokio::task::spawn_blocking(move || {
            while buf.len() < len {
                match pread_spare(&file, &mut buf, offset, 0) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(Bytes::from(buf))
        });
        async move { task.await.map_err(io::Error::other)? }.boxed()
    }

    fn file(&self) -> Option<Arc<File>> {
        Some(self.0.clone())
    }
}

/// One `preadv2` into `buf`'s spare capacity at `offset + buf.len()`; grows `buf` by what was
/// read and returns that count.
fn pread_spare(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let at = offset + buf.len() as u64;
    // SAFETY: `iov` describes the vector's spare capacity, valid for writes of `iov_len` bytes
    // for the duration of the call; `at` is below i64::MAX (checked by the caller).
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at as libc::off_t, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` (<= spare capacity) bytes after `len`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

struct FsIngest {
    inner: Arc<Inner>,
    digest: Digest,
    tmp_path: PathBuf,
    file: Arc<File>,
    written: u64,
    /// Shared with the blocking thread of a write, which grows it.
    reservation: Arc<Mutex<Reservation<Slot>>>,
}

impl BlobIngest for FsIngest {
    fn write(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, Result<(), CacheError>> {
        let file = self.file.clone();
        let reservation = self.reservation.clone();
        let path = self.tmp_path.clone();
        let written = self.written;
        async move {
            let n = blocking(move || {
                let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                reservation
                    .lock()
                    .expect("reservation lock")
                    .cover(written + n)?;
                for chunk in &chunks {
                    (&*file)
                        .write_all(chunk)
                        .map_err(io_err("writing", &path))?;
                }
                Ok(n)
            })
            .await?;
            self.written += n;
            Ok(())
        }
        .boxed()
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn content(&self) -> Arc<dyn BlobRead> {
        Arc::new(FileContent(self.file.clone()))
    }

    fn commit(self: Box<Self>, proof: Verified) -> BoxFuture<'static, Result<(), CacheError>> {
        async move {
            check_proof(&self.digest, self.written, &proof)?;
            blocking(move || {
                let this = self;
                // Data before name: after a crash the final name holds the whole blob or
                // does not exist.
                this.file
                    .sync_data()
                    .map_err(io_err("syncing", &this.tmp_path))?;
                let dest = blob_path(&this.inner.root, &this.digest);
                fs::rename(&this.tmp_path, &dest).map_err(io_err("renaming into", &dest))?;
                // The reservation first, so that the blob's entry does not evict for room the
                // blob already has.
                this.reservation.lock().expect("reservation lock").release();
                this.inner.insert(
                    &this.digest,
                    Entry {
                        len: this.written,
                        verified: true,
                    },
                );
                // Evict now rather than on some later access, so the disk stays under the
                // limit; this thread may delete files, which is why it runs here.
                this.inner.index.run_pending_tasks();
                Ok(())
            })
            .await
        }
        .boxed()
    }
}

impl Drop for FsIngest {
    /// An uncommitted temp file is discarded; after a commit the rename has moved it, and
    /// the `NotFound` is expected. Readers holding the descriptor keep their bytes.
    fn drop(&mut self) {
        match fs::remove_file(&self.tmp_path) {
            Ok(()) => debug!(digest = %self.digest, "discarded uncommitted blob"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %self.tmp_path.display(), error = %e, "cannot delete temp file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::conformance::{data, put, read};

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn blobs_live_at_their_digest_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        let bytes = data(3000, 1);
        let digest = put(&store, &bytes).await;
        let path = dir.path().join("blobs/sha256").join(digest.encoded());
        assert_eq!(store.path_of(&digest), path);
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert!(files_in(&dir.path().join("tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_large_blob_is_read_through_its_mapping_even_after_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 16 << 20).unwrap();
        let len = mapped::MAP_MIN as usize * 3 + 17;
        let bytes = data(len, 9);
        let digest = put(&store, &bytes).await;
        let blob = store.open(&digest).await.unwrap().unwrap();
        assert_eq!(read(&*blob.content, 0, len).await, bytes);
        // Evicted while a client reads it: the mapping outlives the name.
        store.remove(&digest);
        store.run_pending_tasks();
        assert!(!store.path_of(&digest).exists());
        let tail = read(&*blob.content, len as u64 - 5000, 10_000).await;
        assert_eq!(tail, bytes[len - 5000..]);
    }

    #[tokio::test]
    async fn uncommitted_temp_files_are_deleted_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        let digest = Digest::sha256_of(b"abc");
        let mut ingest = store.ingest(&digest, None).await.unwrap();
        ingest.write(vec![Bytes::from_static(b"ab")]).await.unwrap();
        assert_eq!(files_in(&dir.path().join("tmp")).len(), 1);
        drop(ingest);
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    }

    #[tokio::test]
    async fn eviction_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 2 * 1024).unwrap();
        let a = put(&store, &data(1024, 1)).await;
        let b = put(&store, &data(1024, 2)).await;
        let c = put(&store, &data(1024, 3)).await;
        store.run_pending_tasks();
        assert!(!store.path_of(&a).exists(), "oldest blob's file is gone");
        assert!(store.path_of(&b).exists() && store.path_of(&c).exists());
        let usage = store.usage();
        assert_eq!((usage.bytes, usage.entries, usage.evictions), (2048, 2, 1));
        store.remove(&b);
        store.run_pending_tasks();
        assert!(!store.path_of(&b).exists(), "explicit removal deletes too");
        assert_eq!(store.usage().evictions, 1, "a removal is not an eviction");
    }

    #[tokio::test]
    async fn reopen_rebuilds_the_index_and_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (a, b) = {
            let store = FsBlobStore::open(root, 1 << 20).unwrap();
            (
                put(&store, &data(3000, 1)).await,
                put(&store, &data(5000, 2)).await,
            )
        };
        // What a crash or a stranger could leave behind.
        fs::write(root.join("tmp/sha256-abc.1.2"), b"partial").unwrap();
        fs::create_dir(root.join("tmp/dir")).unwrap();
        fs::write(root.join("blobs/sha256/not-a-digest"), b"x").unwrap();
        fs::write(root.join("blobs/sha256").join("A".repeat(64)), b"x").unwrap();
        fs::write(root.join("blobs/sha512").join("a".repeat(64)), b"x").unwrap();
        fs::create_dir_all(root.join("blobs/md5/x")).unwrap();
        fs::create_dir(root.join("blobs/sha256").join("b".repeat(64))).unwrap();

        let store = FsBlobStore::open(root, 1 << 20).unwrap();
        assert!(files_in(&root.join("tmp")).is_empty());
        assert_eq!(files_in(&root.join("blobs")), ["sha256", "sha512"]);
        assert_eq!(files_in(&root.join("blobs/sha256")), {
            let mut v = vec![a.encoded().to_owned(), b.encoded().to_owned()];
            v.sort();
            v
        });
        assert!(files_in(&root.join("blobs/sha512")).is_empty());
        let usage = store.usage();
        assert_eq!((usage.bytes, usage.entries), (8000, 2));
        let blob = store.open(&b).await.unwrap().unwrap();
        assert_eq!(read(&*blob.content, 0, 5000).await, data(5000, 2));
    }

    #[tokio::test]
    async fn reopen_with_a_smaller_limit_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = {
            let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
            let old = put(&store, &data(1024, 1)).await;
            let new = put(&store, &data(1024, 2)).await;
            (old, new)
        };
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(dir.path().join("blobs/sha256").join(old.encoded()))
            .unwrap()
            .set_modified(past)
            .unwrap();
        let store = FsBlobStore::open(dir.path(), 1024).unwrap();
        assert!(store.open(&old).await.unwrap().is_none());
        assert!(!store.path_of(&old).exists());
        assert!(store.open(&new).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn corrupt_files_found_at_start_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let (tampered, truncated, good) = {
            let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
            (
                put(&store, &data(4000, 1)).await,
                put(&store, &data(4000, 2)).await,
                put(&store, &data(4000, 3)).await,
            )
        };
        let path = |d: &Digest| dir.path().join("blobs/sha256").join(d.encoded());
        let mut bytes = data(4000, 1);
        bytes[100] ^= 0xff;
        fs::write(path(&tampered), &bytes).unwrap();
        fs::write(path(&truncated), &data(4000, 2)[..10]).unwrap();

        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        // Verified on first use, before a byte is served.
        assert!(store.open(&tampered).await.unwrap().is_none());
        assert!(!path(&tampered).exists());
        assert!(store.open(&tampered).await.unwrap().is_none());
        // The background pass catches the rest.
        assert_eq!(store.verify_pending().await, 1);
        assert!(!path(&truncated).exists());
        assert!(store.open(&good).await.unwrap().is_some());
        let usage = store.usage();
        assert_eq!((usage.entries, usage.corrupt), (1, 2));
    }

    #[tokio::test]
    async fn a_file_changed_after_verification_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        let digest = put(&store, &data(4000, 1)).await;
        fs::write(store.path_of(&digest), b"short").unwrap();
        assert!(store.open(&digest).await.unwrap().is_none());
        assert!(!store.path_of(&digest).exists());
        let other = put(&store, &data(4000, 2)).await;
        fs::remove_file(store.path_of(&other)).unwrap();
        assert!(
            store.open(&other).await.unwrap().is_none(),
            "deleted behind our back"
        );
        assert_eq!(store.usage().entries, 0);
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_write_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open_with_temp_opener(dir.path(), 1 << 20, |_| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/full")
        })
        .unwrap();
        let digest = Digest::sha256_of(b"abc");
        let mut ingest = store.ingest(&digest, None).await.unwrap();
        let err = ingest
            .write(vec![Bytes::from_static(b"abc")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CacheError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{err}"
        );
        drop(ingest);
        assert!(store.open(&digest).await.unwrap().is_none());
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        assert_eq!(store.usage(), StoreUsage::default());
    }

    #[tokio::test]
    async fn a_blob_announced_over_the_limit_gets_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        let digest = Digest::sha256_of(b"big");
        let err = store
            .ingest(&digest, Some((1 << 20) + 1))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        // Exactly the limit fits.
        assert!(store.ingest(&digest, Some(1 << 20)).await.is_ok());
    }

    #[tokio::test]
    async fn temp_files_never_hold_more_than_their_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path(), 3 << 20).unwrap();
        let endless = data(512 * 1024, 9);
        let digest = Digest::sha256_of(b"never ends");
        let mut ingest = store.ingest(&digest, None).await.unwrap();
        let tmp = dir.path().join("tmp");
        let on_disk = || -> u64 {
            fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        };
        let mut batches = 0;
        let err = loop {
            match ingest.write(vec![Bytes::copy_from_slice(&endless)]).await {
                Ok(()) => batches += 1,
                Err(e) => break e,
            }
            assert!(on_disk() <= store.usage().in_flight);
            assert!(store.usage().in_flight <= 3 << 20);
        };
        assert_eq!(batches, 6, "3 MiB in 512 KiB batches, then no more");
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
        assert_eq!(on_disk(), 3 << 20, "the refused batch was not written");
        drop(ingest);
        assert_eq!(on_disk(), 0);
    }

    #[tokio::test]
    async fn state_is_root_only_and_an_old_world_readable_cache_is_narrowed() {
        use std::os::unix::fs::PermissionsExt;

        use crate::private_state::{tests::mode_of, too_open};

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let digest = {
            let store = FsBlobStore::open(&root, 1 << 20).unwrap();
            let digest = put(&store, &data(3000, 1)).await;
            let mut ingest = store.ingest(&Digest::sha256_of(b"x"), None).await.unwrap();
            ingest.write(vec![Bytes::from_static(b"x")]).await.unwrap();
            let temp = fs::read_dir(root.join("tmp")).unwrap().next().unwrap();
            assert_eq!(mode_of(&temp.unwrap().path()), 0o600);
            assert_eq!(too_open(&root).unwrap(), [], "as created");
            digest
        };
        // What an older version (umask 022, no explicit modes) left behind.
        let old = |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode));
        for d in ["", "blobs", "blobs/sha256", "blobs/sha512", "tmp"] {
            old(&root.join(d), 0o755).unwrap();
        }
        let blob = root.join("blobs/sha256").join(digest.encoded());
        old(&blob, 0o644).unwrap();
        let store = FsBlobStore::open(&root, 1 << 20).unwrap();
        assert_eq!(too_open(&root).unwrap(), [], "narrowed at open");
        assert!(store.open(&digest).await.unwrap().is_some());
    }
}
