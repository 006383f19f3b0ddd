//! pullproxy's state on disk (cache, node CA) is its owner's alone: directories 0700, files 0600,
//! set explicitly rather than left to the umask, and narrowed where an older version left them
//! wider.

use std::{
    fs::{self, DirBuilder, Metadata, OpenOptions, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Mode of every state directory.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every state file.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with [`DIR_MODE`], or narrows an existing `dir` to it.
/// Parents that exist already are left as they are: they may not be pullproxy's.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    restrict(dir, &fs::metadata(dir)?, DIR_MODE)
}

/// Sets `path` to `mode` unless `meta` (its metadata, as already read) says it has it.
pub(crate) fn restrict(path: &Path, meta: &Metadata, mode: u32) -> io::Result<()> {
    if meta.mode() & 0o7777 == mode {
        return Ok(());
    }
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Options that create a new file with [`FILE_MODE`] from the start (no moment with wider
/// permissions) and refuse a path that exists, a planted symlink included. Add `read` if needed.
pub(crate) fn new_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true).mode(FILE_MODE);
    options
}

/// Every directory under `root` (itself included) whose mode is not [`DIR_MODE`] and every
/// other entry whose mode is not [`FILE_MODE`], with that mode; symlinks are not followed. What
/// a check of the state on disk reports.
pub fn too_open(root: &Path) -> io::Result<Vec<(PathBuf, u32)>> {
    let mut wrong = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.mode() & 0o7777;
        if mode != if meta.is_dir() { DIR_MODE } else { FILE_MODE } {
            wrong.push((path.clone(), mode));
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(wrong)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The permission bits of `path`.
    pub(crate) fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn directories_are_created_or_narrowed_to_0700() {
        let root = tempfile::tempdir().unwrap();
        let fresh = root.path().join("a/b");
        create_dir(&fresh).unwrap();
        assert_eq!(mode_of(&fresh), 0o700);
        assert_eq!(
            mode_of(&root.path().join("a")),
            0o700,
            "created parents too"
        );

        let old = root.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, Permissions::from_mode(0o755)).unwrap();
        create_dir(&old).unwrap();
        assert_eq!(mode_of(&old), 0o700);
        // A parent that existed keeps its mode.
        fs::set_permissions(&old, Permissions::from_mode(0o755)).unwrap();
        create_dir(&old.join("child")).unwrap();
        assert_eq!(mode_of(&old), 0o755);
    }

    #[test]
    fn new_files_are_0600_and_never_follow_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        create_dir(&root).unwrap();
        let path = root.join("f");
        new_file().open(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        let link = root.join("link");
        std::os::unix::fs::symlink(root.join("target"), &link).unwrap();
        assert!(new_file().open(&link).is_err());
        assert!(!root.join("target").exists());

        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(too_open(&root).unwrap().len(), 2);
        restrict(&path, &fs::metadata(&path).unwrap(), FILE_MODE).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        // The symlink (0777) is what is left to report.
        assert_eq!(too_open(&root).unwrap(), [(link, 0o777)]);
    }
}
