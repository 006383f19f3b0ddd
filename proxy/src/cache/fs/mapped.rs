//! Cache hits of large blobs read through a read-only mapping of the blob file: the bytes go
//! from the page cache straight into the TLS records, without the copy into a read buffer that
//! `pread` makes (a fifth of a user-space TLS cache hit's CPU in the fast path's profile).
//!
//! Touching a mapped page that cannot be read (a disk error, or a file cut short behind the
//! cache's back) raises SIGBUS, which would end the process. So each chunk's pages are faulted
//! in with `MADV_POPULATE_READ` before the chunk is handed out: the kernel reports such a page
//! as an error instead (EFAULT, EIO), and the reader gets an ordinary I/O error, on which the
//! cache drops the file as it does for a failed `pread`. Only a page that is reclaimed between
//! that check and the send, and then fails to read back, could still fault. Chunks not wholly
//! in the page cache (`mincore`) are faulted in on a blocking thread, like `pread`'s slow path.
//! Kernels before 5.14 lack `MADV_POPULATE_READ`; there every read falls back to `pread`.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    ptr::NonNull,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};

use crate::cache::store::BlobRead;

/// Blobs smaller than this are read with `pread`: a mapping per open costs two syscalls and a
/// TLB flush at `munmap`, more than copying a small blob.
pub(super) const MAP_MIN: u64 = 1 << 20;

/// Set once the kernel has refused `MADV_POPULATE_READ` (before 5.14): from then on every read
/// uses `pread`.
static NO_POPULATE: AtomicBool = AtomicBool::new(false);

/// A stored blob read through its mapping, or through `fallback` (`pread`) where the kernel
/// cannot fault pages in safely.
pub(super) struct MappedContent {
    map: Arc<Map>,
    fallback: Arc<dyn BlobRead>,
}

impl MappedContent {
    /// Maps the first `len` bytes of `file` (a published blob: it never changes or shrinks).
    pub(super) fn new(file: Arc<File>, len: u64, fallback: Arc<dyn BlobRead>) -> io::Result<Self> {
        Ok(MappedContent {
            map: Arc::new(Map::new(file, len)?),
            fallback,
        })
    }
}

impl BlobRead for MappedContent {
    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'static, io::Result<Bytes>> {
        let size = self.map.len as u64;
        if offset >= size || len == 0 {
            return futures_util::future::ready(Ok(Bytes::new())).boxed();
        }
        if NO_POPULATE.load(Ordering::Relaxed) {
            return self.fallback.read_at(offset, len);
        }
        // Both fit in usize: they are at most the mapping's length.
        let start = offset as usize;
        let end = (offset + len as u64).min(size) as usize;
        let chunk = Chunk {
            map: self.map.clone(),
            start,
            end,
        };
        if self.map.resident(start, end) {
            return handed_out(chunk.populate(), chunk, &*self.fallback, offset, len);
        }
        let fallback = self.fallback.clone();
        let task = tokio::task::spawn_blocking(move || (chunk.populate(), chunk));
        async move {
            let (populated, chunk) = task.await.map_err(io::Error::other)?;
            handed_out(populated, chunk, &*fallback, offset, len).await
        }
        .boxed()
    }

    fn file(&self) -> Option<Arc<File>> {
        Some(self.map.file.clone())
    }
}

/// The chunk once its pages are in, or the error; `pread` where the kernel cannot populate
/// (EINVAL: before 5.14).
fn handed_out(
    populated: io::Result<()>,
    chunk: Chunk,
    fallback: &dyn BlobRead,
    offset: u64,
    len: usize,
) -> BoxFuture<'static, io::Result<Bytes>> {
    match populated {
        Ok(()) => futures_util::future::ready(Ok(Bytes::from_owner(chunk))).boxed(),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            NO_POPULATE.store(true, Ordering::Relaxed);
            fallback.read_at(offset, len)
        }
        Err(e) => futures_util::future::ready(Err(e)).boxed(),
    }
}

/// A shared read-only mapping of a whole file, unmapped when the last chunk is dropped.
struct Map {
    ptr: NonNull<u8>,
    len: usize,
    /// Kept open for `sendfile` (kernel TLS) and so the descriptor outlives the mapping's use.
    file: Arc<File>,
}

// SAFETY: the mapping is read-only and never remapped or written through; `Map` only hands out
// shared slices of it, which any thread may read.
unsafe impl Send for Map {}
// SAFETY: as for `Send`: no method mutates the mapping.
unsafe impl Sync for Map {}

impl Map {
    fn new(file: Arc<File>, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        // SAFETY: a fresh read-only shared mapping chosen by the kernel (null hint) of an open
        // descriptor; nothing else in the process is at that address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Map { ptr, len, file })
    }

    /// The page-aligned span holding `start..end`, as (address, length).
    fn pages(&self, start: usize, end: usize) -> (*mut libc::c_void, usize) {
        let first = start - start % page_size();
        // SAFETY: `first <= start < self.len`: the address is inside the mapping.
        let addr = unsafe { self.ptr.as_ptr().add(first) };
        (addr.cast(), end - first)
    }

    /// Whether every page of `start..end` is in the page cache, so faulting them in will not
    /// wait for the disk.
    fn resident(&self, start: usize, end: usize) -> bool {
        let (addr, len) = self.pages(start, end);
        let mut pages = vec![0u8; len.div_ceil(page_size())];
        // SAFETY: `addr..addr+len` lies in this live mapping and `pages` has one byte per page
        // of it, as mincore requires.
        let ret = unsafe { libc::mincore(addr, len, pages.as_mut_ptr()) };
        ret == 0 && pages.iter().all(|p| p & 1 == 1)
    }

    /// Faults in the pages of `start..end`, so reading them cannot raise SIGBUS: a page that
    /// cannot be read is an error here instead.
    fn populate(&self, start: usize, end: usize) -> io::Result<()> {
        let (addr, len) = self.pages(start, end);
        loop {
            // SAFETY: `addr..addr+len` lies in this live mapping; MADV_POPULATE_READ only
            // faults pages in, it changes no memory.
            let ret = unsafe { libc::madvise(addr, len, libc::MADV_POPULATE_READ) };
            if ret == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if !matches!(e.kind(), io::ErrorKind::Interrupted) {
                return Err(e);
            }
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: this is the mapping `new` made, and no slice of it outlives the last `Arc`
        // to the map (every `Chunk` holds one).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `start..end` of a mapping, as the owner of a `Bytes`.
struct Chunk {
    map: Arc<Map>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn populate(&self) -> io::Result<()> {
        self.map.populate(self.start, self.end)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start..end` lies within the mapping (checked in `read_at`), which lives as
        // long as `self.map`; the file is a published blob that is never written again.
        unsafe {
            std::slice::from_raw_parts(self.map.ptr.as_ptr().add(self.start), self.end - self.start)
        }
    }
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A stand-in for `pread` that says where the read went.
    struct Refuse;
    impl BlobRead for Refuse {
        fn read_at(&self, _: u64, _: usize) -> BoxFuture<'static, io::Result<Bytes>> {
            futures_util::future::ready(Err(io::Error::other("fell back to pread"))).boxed()
        }
    }

    fn blob(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    fn mapped(f: &tempfile::NamedTempFile, len: usize) -> MappedContent {
        let file = Arc::new(File::open(f.path()).unwrap());
        MappedContent::new(file, len as u64, Arc::new(Refuse)).unwrap()
    }

    #[tokio::test]
    async fn reads_are_the_files_bytes_at_any_offset_and_stop_at_its_end() {
        let len = 3 * 4096 * 64 + 123;
        let (f, data) = blob(len);
        let content = mapped(&f, len);
        for (offset, want) in [
            (0, 10),
            (1, 4096),
            (4095, 2),
            (5000, 300_000),
            (len - 5, 100),
        ] {
            let got = content.read_at(offset as u64, want).await.unwrap();
            let end = (offset + want).min(len);
            assert_eq!(&got[..], &data[offset..end], "{offset}+{want}");
        }
        assert!(content.read_at(len as u64, 10).await.unwrap().is_empty());
        assert!(content.read_at(u64::MAX, 10).await.unwrap().is_empty());
        assert!(content.file().is_some(), "sendfile still gets the file");
    }

    #[tokio::test]
    async fn a_chunk_outlives_its_reader() {
        let (f, data) = blob(2 * 4096);
        let got = mapped(&f, data.len()).read_at(4096, 4096).await.unwrap();
        assert_eq!(&got[..], &data[4096..]);
    }

    #[tokio::test]
    async fn a_file_cut_short_behind_the_caches_back_is_an_error_not_a_crash() {
        let len = 64 * 4096;
        let (f, data) = blob(len);
        let content = mapped(&f, len);
        assert_eq!(&content.read_at(0, 4096).await.unwrap()[..], &data[..4096]);
        // What no cache file should ever see: truncated while mapped. Touching those pages
        // would raise SIGBUS; the read must fail instead, and the process live on.
        f.as_file().set_len(8 * 4096).unwrap();
        let err = content.read_at(32 * 4096, 4096).await.unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::EFAULT | libc::EIO)),
            "{err}"
        );
        assert_eq!(&content.read_at(0, 4096).await.unwrap()[..], &data[..4096]);
    }

    #[test]
    fn an_empty_file_is_not_mapped() {
        let (f, _) = blob(0);
        let file = Arc::new(File::open(f.path()).unwrap());
        assert!(MappedContent::new(file, 0, Arc::new(Refuse)).is_err());
    }
}
