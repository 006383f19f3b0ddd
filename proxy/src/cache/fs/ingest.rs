//! Writing a blob: a temp file under `tmp/` whose room is reserved in the index as it grows,
//! committed by `fsync` and rename once its digest is proven, deleted otherwise.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use tracing::{debug, warn};

use super::{
    Inner, blocking,
    index::{Entry, Slot, blob_path},
    io_err,
    read::FileContent,
};
use crate::{
    cache::{
        CacheError,
        store::{BlobIngest, BlobRead, Reservation, check_fits, check_proof},
    },
    oci::{Digest, Verified},
    private_state,
};

/// Opens a temp file outside tests: new, root's alone, and readable by the flight's readers.
pub(super) fn create_temp(path: &Path) -> io::Result<File> {
    private_state::new_file().read(true).open(path)
}

/// A blob being written to its temp file.
pub(super) struct FsIngest {
    inner: Arc<Inner>,
    digest: Digest,
    tmp_path: PathBuf,
    file: Arc<File>,
    written: u64,
    /// Shared with the blocking thread of a write, which grows it.
    reservation: Arc<Mutex<Reservation<Slot>>>,
}

impl FsIngest {
    /// Creates the temp file for `digest` and reserves room for it (for `len` if announced),
    /// refusing a blob announced larger than the store.
    pub(super) async fn start(
        inner: &Arc<Inner>,
        digest: &Digest,
        len: Option<u64>,
    ) -> Result<Self, CacheError> {
        check_fits(digest, len, inner.max_bytes)?;
        let seq = inner.temp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp_path = inner.tmp.join(format!(
            "{}-{}.{}.{seq}",
            digest.algorithm(),
            digest.encoded(),
            std::process::id()
        ));
        let opener = inner.clone();
        let file = blocking({
            let tmp_path = tmp_path.clone();
            move || (opener.open_temp)(&tmp_path).map_err(io_err("creating", &tmp_path))
        })
        .await?;
        let reservation = Reservation::new(
            inner.index.clone(),
            inner.tally.clone(),
            seq,
            digest.clone(),
            len,
            inner.max_bytes,
        );
        Ok(FsIngest {
            inner: inner.clone(),
            digest: digest.clone(),
            tmp_path,
            file: Arc::new(file),
            written: 0,
            reservation: Arc::new(Mutex::new(reservation)),
        })
    }
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
