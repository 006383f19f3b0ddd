//! Reading stored blobs and temp files: `pread` on a shared descriptor, from the page cache
//! without a thread switch when it can.

use std::{fs::File, io, sync::Arc};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};

use crate::cache::store::BlobRead;

/// Reads an open file with `pread`, so any number of readers share one descriptor.
///
/// What the page cache holds (a hot blob: the common case) is read on the calling task with
/// `preadv2(RWF_NOWAIT)`, which returns what it can without waiting for the disk; only the rest
/// goes to a blocking thread. Handing every 256 KiB read of a cache hit to a blocking thread cost
/// about a sixth of its CPU in wake-ups and context switches. Reads go into uninitialised
/// capacity: zeroing each buffer first cost another 4%.
pub(super) struct FileContent(pub(super) Arc<File>);

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
