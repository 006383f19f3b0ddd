//! A bpffs instance of the test's own. Every `mount -t bpf` makes a new, empty instance, so a
//! test pins into a mount it created instead of relying on the host's `/sys/fs/bpf` (a fresh
//! machine has none there, and pullproxy without CAP_SYS_ADMIN cannot mount one). Processes the
//! test starts in private mount namespaces see it too: they get a copy of the mounts. Unmounting
//! releases whatever a failed test left pinned.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::mountns::c_path;

/// A mounted bpffs, unmounted and removed on drop.
pub struct Bpffs {
    at: PathBuf,
}

impl Bpffs {
    /// Mounts a new bpffs at `at` (created if missing).
    pub fn mount(at: impl Into<PathBuf>) -> Self {
        let at = at.into();
        fs::create_dir_all(&at).unwrap_or_else(|e| panic!("mkdir {}: {e}", at.display()));
        let target = c_path(&at);
        // SAFETY: valid C strings; no data argument.
        let ret = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if ret != 0 {
            panic!(
                "mount -t bpf bpf {}: {}",
                at.display(),
                io::Error::last_os_error()
            );
        }
        Self { at }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let target = c_path(&self.at);
        // SAFETY: a valid C string. MNT_DETACH: a process that still holds the mount (a child in
        // a private mount namespace) keeps its copy until it exits.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir(&self.at);
    }
}
