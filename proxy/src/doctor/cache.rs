//! The cache directory, for `pullproxy doctor`: writable, and room left on its filesystem.

use std::{io, path::Path};

use super::{Check, DoctorReport};

/// Less free space than this on the cache's filesystem is a problem: the cache stops filling
/// (pulls still work, uncached).
const MIN_FREE_BYTES: u64 = 1 << 30;

pub(super) fn check_cache(report: &mut DoctorReport, dir: &Path, max_size: u64) {
    // The cache directory is created at start; before that, its nearest existing ancestor must
    // be writable.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    if let Err(e) = probe_writable(existing) {
        report.problem(
            Check::Cache,
            format!(
                "cache dir {}: {} is not writable ({e}); fix its ownership or point cache.dir \
                 elsewhere",
                dir.display(),
                existing.display()
            ),
        );
        return;
    }
    let created = if existing == dir {
        ""
    } else {
        " (created at start)"
    };
    match free_bytes(existing) {
        Some(free) if free < MIN_FREE_BYTES => report.problem(
            Check::Cache,
            format!(
                "cache dir {}{created}: only {} free on its filesystem; pulls work but are no \
                 longer cached: free space or lower cache.max_size",
                dir.display(),
                human(free)
            ),
        ),
        Some(free) => report.ok(
            Check::Cache,
            format!(
                "cache dir {}{created} writable, {} free (cache.max_size {})",
                dir.display(),
                human(free),
                human(max_size)
            ),
        ),
        None => report.ok(
            Check::Cache,
            format!("cache dir {}{created} writable", dir.display()),
        ),
    }
}

fn probe_writable(dir: &Path) -> io::Result<()> {
    tempfile_in(dir).map(drop)
}

/// Creates and removes a file in `dir`.
fn tempfile_in(dir: &Path) -> io::Result<()> {
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

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
