//! Test cgroups under the cgroup v2 mount, removed on drop (their processes killed first). Under
//! systemd they go below the test process's own cgroup when systemd delegated it (`Delegate=yes`),
//! because systemd owns every cgroup it did not delegate.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use pullproxy::redirect::cgroup::{self, Cgroup2};

/// A cgroup the test created. Children are removed before their parent as guards drop in
/// reverse order of creation.
pub struct Cgroup {
    path: String,
    dir: PathBuf,
}

impl Cgroup {
    /// A new top-level cgroup of the test: directly below the root of the cgroup v2 hierarchy,
    /// or below this process's own cgroup when that is delegated (see [`test_parent`]).
    pub fn new_root(prefix: &str) -> Self {
        let parent = test_parent();
        let parent = if parent == "/" { "" } else { parent };
        Self::create(format!("{parent}/{}", crate::unique(prefix)))
    }

    /// A child of this cgroup.
    pub fn child(&self, name: &str) -> Self {
        Self::create(format!("{}/{name}", self.path))
    }

    fn create(path: String) -> Self {
        let dir = Cgroup2::discover()
            .expect("cgroup v2 mount")
            .dir(&path)
            .expect("cgroup path");
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self { path, dir }
    }

    /// The cgroup path (`/pp-test-1-0/target`), as in `/proc/<pid>/cgroup`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The last component of the path (`target`): unique for a top-level test cgroup, whose
    /// parent path (a delegated unit's cgroup) may hold dots and slashes that bpffs pin names and
    /// flat temp directories must not.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// The directory in the cgroup filesystem.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup id (the directory's inode number).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.dir).expect("cgroup dir").ino()
    }

    /// Removes and recreates the directory (what systemd does when a unit restarts): same path,
    /// new id. The cgroup must be empty.
    pub fn recreate(&self) {
        remove(&self.dir);
        fs::create_dir(&self.dir).expect("recreate cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.dir.exists() {
            // Kill whatever a failed test left behind, then remove the directory.
            let _ = fs::write(self.dir.join("cgroup.kill"), "1");
            remove(&self.dir);
        }
    }
}

/// The cgroup tests create theirs in. systemd owns the cgroup tree except subtrees it delegated
/// (its CGROUP_DELEGATION rules): a process in a `Delegate=yes` unit may create cgroups below its
/// own, and nowhere else. systemd marks a delegated cgroup with the `trusted.delegate` extended
/// attribute (`user.delegate` for unprivileged managers), so that mark decides: this process's
/// cgroup when delegated, otherwise the root (a machine without systemd, or a test run from a
/// shell, as on the development hosts).
pub fn test_parent() -> &'static str {
    static PARENT: OnceLock<String> = OnceLock::new();
    PARENT.get_or_init(|| {
        let cg = Cgroup2::discover().expect("cgroup v2 mount");
        let own = cgroup::own_cgroup(&cg, None).expect("this process's cgroup");
        let dir = cg.dir(&own).expect("cgroup path");
        if own != "/" && is_delegated(&dir) {
            own
        } else {
            "/".to_owned()
        }
    })
}

/// Whether systemd marked this cgroup directory as delegated.
fn is_delegated(dir: &Path) -> bool {
    let path = crate::mountns::c_path(dir);
    [c"trusted.delegate", c"user.delegate"].iter().any(|name| {
        let mut value = [0u8; 8];
        // SAFETY: valid C strings; the buffer is writable for its length.
        let len = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        len > 0 && value[..len as usize].starts_with(b"1")
    })
}

/// rmdir, retrying while the kernel finishes tearing down exiting processes.
fn remove(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
