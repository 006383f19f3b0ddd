//! The cache directory's health, for `pullproxy doctor`: writable, and room left on its
//! filesystem.

use std::{io, path::Path};

use super::CacheSettings;
use crate::diagnosis::{Check, Finding};

/// Less free space than this on the cache's filesystem is a problem: the cache stops filling
/// (pulls still work, uncached).
const MIN_FREE_BYTES: u64 = 1 << 30;

/// Whether the cache directory can be written (or created), and how much room is left.
pub(crate) fn diagnose(settings: &CacheSettings) -> Vec<Finding> {
    let dir = settings.dir.as_path();
    // The cache directory is created at start; before that, its nearest existing ancestor must
    // be writable.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    if let Err(e) = probe_writable(existing) {
        return vec![Finding::problem(
            Check::Cache,
            format!(
                "cache dir {}: {} is not writable ({e}); fix its ownership or point cache.dir \
                 elsewhere",
                dir.display(),
                existing.display()
            ),
        )];
    }
    let created = if existing == dir {
        ""
    } else {
        " (created at start)"
    };
    let finding = match free_bytes(existing) {
        Some(free) if free < MIN_FREE_BYTES => Finding::problem(
            Check::Cache,
            format!(
                "cache dir {}{created}: only {} free on its filesystem; pulls work but are no \
                 longer cached: free space or lower cache.max_size",
                dir.display(),
                human(free)
            ),
        ),
        Some(free) => Finding::ok(
            Check::Cache,
            format!(
                "cache dir {}{created} writable, {} free (cache.max_size {})",
                dir.display(),
                human(free),
                human(settings.max_bytes)
            ),
        ),
        None => Finding::ok(
            Check::Cache,
            format!("cache dir {}{created} writable", dir.display()),
        ),
    };
    vec![finding]
}

/// Creates and removes a file in `dir`.
fn probe_writable(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!(".pullproxy-doctor-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)
}

fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statvfs.
    let ret = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (ret == 0).then(|| st.f_bavail.saturating_mul(st.f_frsize))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnosis::Verdict;

    fn settings(dir: &Path) -> CacheSettings {
        CacheSettings {
            dir: dir.to_path_buf(),
            max_bytes: 20 << 30,
        }
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn a_writable_dir_is_ok_and_the_probe_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let found = diagnose(&settings(dir.path()));
        let [finding] = &found[..] else {
            panic!("{found:?}")
        };
        assert_eq!(finding.check, Check::Cache);
        // A tmpfs or disk with less than 1GiB free would be a problem; either way it is writable.
        let want = format!("cache dir {} writable", dir.path().display());
        assert!(finding.message.starts_with(&want), "{finding}");
        if finding.verdict == Verdict::Ok {
            assert!(
                finding.message.ends_with("free (cache.max_size 20.0 GiB)"),
                "{finding}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_dir_is_created_at_start_when_its_parent_is_writable() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("cache/pullproxy");
        let found = diagnose(&settings(&dir));
        let [finding] = &found[..] else {
            panic!("{found:?}")
        };
        assert!(
            finding
                .message
                .starts_with(&format!("cache dir {} (created at start)", dir.display())),
            "{finding}"
        );
        assert!(!dir.exists(), "doctor must not create the cache dir");
    }

    #[test]
    fn an_unwritable_ancestor_is_a_problem() {
        // A file where a directory should be refuses even root, unlike permission bits.
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let dir = file.join("cache");
        let found = diagnose(&settings(&dir));
        let [finding] = &found[..] else {
            panic!("{found:?}")
        };
        assert_eq!(finding.verdict, Verdict::Problem, "{finding}");
        assert!(
            finding.message.starts_with(&format!(
                "cache dir {}: {} is not writable (",
                dir.display(),
                file.display()
            )) && finding.message.ends_with("point cache.dir elsewhere"),
            "{finding}"
        );
    }
}
