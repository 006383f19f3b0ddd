//! Test cgroups under the cgroup v2 mount, removed on drop (their processes killed first).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use pullproxy::redirect::cgroup::Cgroup2;

/// A cgroup the test created. Children are removed before their parent as guards drop in
/// reverse order of creation.
pub struct Cgroup {
    path: String,
    dir: PathBuf,
}

impl Cgroup {
    /// A new cgroup directly below the root of the cgroup v2 hierarchy.
    pub fn new_root(prefix: &str) -> Self {
        Self::create(format!("/{}", crate::unique(prefix)))
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
