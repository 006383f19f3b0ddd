//! Start-up and verification: rebuilding the index from the files on disk (clearing temp
//! leftovers and misnamed files), and hashing each file found there before its first use.

use std::{
    fs::{self, File},
    io::{self, Read},
    path::Path,
    time::SystemTime,
};

use tracing::{info, warn};

use super::{FsBlobStore, blocking, index::Entry, io_err};
use crate::{
    cache::CacheError,
    oci::{Algorithm, Digest},
    private_state,
};

/// Read size when hashing a whole file.
const HASH_CHUNK: usize = 1024 * 1024;
/// Verification locks are striped by digest: the same blob is never hashed twice at once, and
/// different blobs rarely wait on each other.
pub(super) const VERIFY_STRIPES: usize = 16;

impl FsBlobStore {
    /// Empties `tmp/`, deletes what is misnamed under `blobs/`, and indexes the blob files
    /// found, oldest first, as unverified.
    pub(super) fn rebuild(&self) -> Result<(), CacheError> {
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
    pub(crate) async fn verify_pending(&self) -> usize {
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
    pub(super) async fn verify(&self, digest: &Digest) -> Option<bool> {
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
