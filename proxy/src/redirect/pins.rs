//! The pin directory on bpffs: read back (also while pullproxy is down), and removed.

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, PerCpuArray};
use proxy_common::{Counter, maps};
use tracing::{info, warn};

use super::{LoaderError, PROGRAMS, bpf_sys, preflight};

/// The kernel counters of an installed redirect, read from its pins (also while pullproxy is
/// down).
pub fn pinned_counters(pin_dir: &Path) -> Result<Vec<(Counter, u64)>, LoaderError> {
    let map_err = |source| LoaderError::Map {
        map: maps::COUNTERS,
        source,
    };
    let path = pin_dir
        .join(format!("maps-{}", proxy_common::MAPS_LAYOUT))
        .join(maps::COUNTERS);
    let data = MapData::from_pin(path).map_err(map_err)?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err)?;
    Ok(sum_counters(&PerCpuArray::try_from(map).map_err(map_err)?))
}

/// The pinned link of each program, if any: its link id, program id and cgroup.
pub fn pinned_links(pin_dir: &Path) -> Vec<(&'static str, Option<bpf_sys::CgroupLinkInfo>)> {
    PROGRAMS
        .iter()
        .map(|name| {
            let info = bpf_sys::obj_get(&pin_dir.join("links").join(name))
                .and_then(|fd| bpf_sys::cgroup_link_info(fd.as_fd()))
                .ok();
            (*name, info)
        })
        .collect()
}

pub(super) fn sum_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(Counter, u64)> {
    Counter::ALL
        .iter()
        .map(|c| {
            let total = map
                .get(&(*c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (*c, total)
        })
        .collect()
}

/// Removes every pin under `pin_dir`: the links (which detaches the programs) and the maps.
/// Returns what was removed.
pub fn uninstall(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    // Links first: removing them detaches the programs.
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort_by_key(|p| p.file_name() != Some(std::ffi::OsStr::new("links")));
    for dir in dirs {
        removed.extend(remove_pins(&dir)?);
    }
    match fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(removed)
}

/// Makes sure `pin_dir` is on bpffs, mounting bpffs at `/sys/fs/bpf` when nothing is there.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoaderError> {
    let root = Path::new(preflight::BPFFS);
    let probe = preflight::bpffs_probe(pin_dir);
    if preflight::fs_magic(probe) == Some(preflight::BPF_FS_MAGIC) {
        return Ok(());
    }
    if probe == root {
        mount_bpffs(root).map_err(|source| LoaderError::Bpffs {
            path: root.into(),
            source: if source.raw_os_error() == Some(libc::EPERM) {
                io::Error::other(
                    "not mounted, and mounting it needs CAP_SYS_ADMIN: mount bpffs on the host \
                     (mount -t bpf bpf /sys/fs/bpf) and into the pod",
                )
            } else {
                source
            },
        })?;
        info!(path = %root.display(), "mounted bpffs");
        return Ok(());
    }
    Err(LoaderError::Bpffs {
        path: probe.into(),
        source: io::Error::other("not a bpffs mount"),
    })
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: all pointers are valid C strings; data is null.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes map pins of other layouts (an older pullproxy's): after the swap no program uses
/// them any more.
pub(super) fn remove_other_layouts(pin_dir: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let is_maps = name == "maps" || name.to_string_lossy().starts_with("maps-");
        if is_maps && path != current {
            match remove_pins(&path) {
                Ok(_) => info!(dir = %path.display(), "removed maps of an older layout"),
                Err(e) => warn!(dir = %path.display(), error = %e, "removing old maps failed"),
            }
        }
    }
}

/// Unpins every object in `dir` and removes it. Returns what was removed.
fn remove_pins(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        fs::remove_file(&path)?;
        removed.push(path);
    }
    fs::remove_dir(dir)?;
    Ok(removed)
}
