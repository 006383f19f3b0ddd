//! Loading and attaching the kernel programs (or swapping them into an earlier run's links).

use std::{collections::BTreeSet, fs, io, net::IpAddr, os::fd::AsFd, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, Program, SockOps, links::FdLink},
};
use ipnet::IpNet;
use proxy_common::{globals, maps};
use tracing::{info, warn};

use super::{
    LoaderError, PROGRAMS, RedirectSettings, Redirector, bpf_sys,
    cgroup::{Cgroup2, CgroupError},
    guard,
    marks::Marks,
    pins::{ensure_bpffs, remove_other_layouts},
    preflight,
};
use crate::accept::original_dst::KernelOriginalDst;

/// The kernel object built from `proxy-ebpf` (empty in cargo-fuzz builds, which never load it:
/// see build.rs).
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pullproxy"));

impl Redirector {
    /// Loads and attaches the programs (or swaps them into the pinned links of an earlier run),
    /// writes the ports, exclusions and guarded ports, and marks the target cgroups and this
    /// process's own (replacing an earlier run's marks). Call it before binding the listeners:
    /// from here on only this process's cgroup may bind the guarded ports. Returns the
    /// redirector and the original-destination source the proxy reads on accept.
    pub fn install(settings: RedirectSettings) -> Result<(Self, KernelOriginalDst), LoaderError> {
        preflight::check()?;
        let cgroup2 = Cgroup2::discover()?;
        let attach_dir = cgroup2.dir(&settings.attach_cgroup)?;
        let attach_id = cgroup2.id(&settings.attach_cgroup)?;
        let attach_fd = fs::File::open(&attach_dir).map_err(|source| CgroupError::Read {
            path: attach_dir.clone(),
            source,
        })?;
        ensure_bpffs(&settings.pin_dir)?;
        let map_dir = settings
            .pin_dir
            .join(format!("maps-{}", proxy_common::MAPS_LAYOUT));
        let link_dir = settings.pin_dir.join("links");
        for dir in [&map_dir, &link_dir] {
            fs::create_dir_all(dir).map_err(|source| LoaderError::Bpffs {
                path: dir.clone(),
                source,
            })?;
        }

        let log_level: u8 = if settings.kernel_log { 0xff } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .override_global(globals::PROXY_PORT, &settings.proxy_port, true)
            .load(KERNEL_OBJECT)
            .map_err(|e| classify_load_error(Box::new(e)))?;
        if settings.kernel_log {
            start_kernel_log(&mut ebpf);
        }

        for name in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or_else(|| {
                LoaderError::Load(format!("program {name} missing from the object").into())
            })?;
            load_program(program).map_err(|e| classify_load_error(e.into()))?;
            let pin = link_dir.join(name);
            if swap_into_pinned_link(program, &pin, attach_id, name)? {
                continue;
            }
            attach_and_pin(program, &attach_fd, &pin).map_err(|source| {
                if is_errno(source.as_ref(), libc::EPERM) {
                    LoaderError::Conflict {
                        program: name,
                        cgroup: settings.attach_cgroup.clone(),
                    }
                } else {
                    LoaderError::Attach {
                        program: name,
                        cgroup: settings.attach_cgroup.clone(),
                        source,
                    }
                }
            })?;
            info!(program = name, cgroup = %settings.attach_cgroup, "attached");
        }

        let mut ports: Array<MapData, u16> = take_map(&mut ebpf, maps::PORTS)?;
        sync_ports(&mut ports, &settings.ports, settings.proxy_port)?;
        let mut v4: LpmTrie<MapData, [u8; 4], u8> = take_map(&mut ebpf, maps::EXCLUDE_V4)?;
        let mut v6: LpmTrie<MapData, [u8; 16], u8> = take_map(&mut ebpf, maps::EXCLUDE_V6)?;
        sync_excludes(&mut v4, &mut v6, &settings.exclude)?;
        let mut guard_ports = take_map(&mut ebpf, maps::GUARD_PORTS)?;
        guard::sync_ports(&mut guard_ports, &settings.guarded_ports)?;
        guard::arm(&mut take_map(&mut ebpf, maps::GUARD_NETNS)?)?;

        let by_tuple = take_map(&mut ebpf, maps::BY_TUPLE)?;
        remove_other_layouts(&settings.pin_dir, &map_dir);
        let mut redirector = Self {
            cgroups: take_map(&mut ebpf, maps::CGROUPS)?,
            generation: take_map(&mut ebpf, maps::GENERATION)?,
            untrusted: take_map(&mut ebpf, maps::UNTRUSTED)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            cgroup2,
            settings,
            applied: Marks::new(),
            unmarked: BTreeSet::new(),
            skipped: BTreeSet::new(),
            own: None,
            _ebpf: ebpf,
        };
        redirector.refresh_targets()?;
        Ok((redirector, KernelOriginalDst::new(by_tuple)))
    }
}

fn load_program(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        other => unreachable!("unexpected program type {:?}", other.prog_type()),
    }
}

/// If a link from an earlier run is pinned at `pin` and attached to the same cgroup, swaps this
/// program into it in place and returns true. A link on another cgroup (the attach point changed)
/// is removed.
fn swap_into_pinned_link(
    program: &mut Program,
    pin: &Path,
    attach_id: u64,
    name: &'static str,
) -> Result<bool, LoaderError> {
    let link = match bpf_sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(LoaderError::Bpffs {
                path: pin.into(),
                source,
            });
        }
    };
    let info = bpf_sys::cgroup_link_info(link.as_fd()).map_err(|source| LoaderError::Bpffs {
        path: pin.into(),
        source,
    })?;
    if info.link_type != bpf_sys::LINK_TYPE_CGROUP || info.cgroup_id != attach_id {
        warn!(
            program = name,
            "pinned link is attached elsewhere; re-attaching"
        );
        fs::remove_file(pin).map_err(|source| LoaderError::Bpffs {
            path: pin.into(),
            source,
        })?;
        return Ok(false);
    }
    let fd = program.fd().map_err(|e| LoaderError::Load(Box::new(e)))?;
    bpf_sys::link_update(link.as_fd(), fd).map_err(|source| LoaderError::Attach {
        program: name,
        cgroup: format!("id {attach_id}"),
        source: Box::new(source),
    })?;
    info!(
        program = name,
        link_id = info.id,
        "swapped into pinned link"
    );
    Ok(true)
}

fn attach_and_pin(
    program: &mut Program,
    cgroup: &fs::File,
    pin: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Links are always multi-attach; `Single` is the mode aya accepts with links (the explicit
    // multi modes return EINVAL).
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            let id = CgroupSockAddr::attach(p, cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        Program::SockOps(p) => {
            let id = SockOps::attach(p, cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        other => unreachable!("unexpected program type {:?}", other.prog_type()),
    };
    link.pin(pin)?;
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoaderError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoaderError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| LoaderError::Map { map: name, source })
}

/// Sets the slot of every redirected port to the proxy port and clears every other slot a
/// previous run may have set.
fn sync_ports(
    map: &mut Array<MapData, u16>,
    ports: &[u16],
    proxy_port: u16,
) -> Result<(), LoaderError> {
    let map_err = |source| LoaderError::Map {
        map: maps::PORTS,
        source,
    };
    let stale: Vec<u32> = map
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let v = v.ok()?;
            (v != 0 && !ports.contains(&(i as u16))).then_some(i as u32)
        })
        .collect();
    for slot in stale {
        map.set(slot, &0, 0).map_err(map_err)?;
    }
    for port in ports {
        map.set(u32::from(*port), &proxy_port, 0).map_err(map_err)?;
    }
    Ok(())
}

fn sync_excludes(
    v4: &mut LpmTrie<MapData, [u8; 4], u8>,
    v6: &mut LpmTrie<MapData, [u8; 16], u8>,
    exclude: &[IpNet],
) -> Result<(), LoaderError> {
    let old4: Vec<Key<[u8; 4]>> = v4.keys().filter_map(Result::ok).collect();
    for k in old4 {
        let _ = v4.remove(&k);
    }
    let old6: Vec<Key<[u8; 16]>> = v6.keys().filter_map(Result::ok).collect();
    for k in old6 {
        let _ = v6.remove(&k);
    }
    for net in exclude {
        let prefix = u32::from(net.prefix_len());
        let result = match net.network() {
            IpAddr::V4(a) => v4.insert(&Key::new(prefix, a.octets()), &1u8, 0),
            IpAddr::V6(a) => v6.insert(&Key::new(prefix, a.octets()), &1u8, 0),
        };
        result.map_err(|source| LoaderError::Map {
            map: if net.addr().is_ipv4() {
                maps::EXCLUDE_V4
            } else {
                maps::EXCLUDE_V6
            },
            source,
        })?;
    }
    Ok(())
}

/// Forwards aya-log records from the kernel to `tracing` (through the `log` bridge).
fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer fd and keeps it open for as long as the
            // AsyncFd (which owns the logger) exists.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            };
            match registered {
                Ok(mut fd) => {
                    tokio::spawn(async move {
                        loop {
                            let Ok(mut guard) = fd.readable_mut().await else {
                                break;
                            };
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
                Err(e) => warn!(error = %e, "kernel log reader"),
            }
        }
        Err(e) => warn!(error = %e, "kernel logging requested but unavailable"),
    }
}

fn classify_load_error(e: Box<dyn std::error::Error + Send + Sync>) -> LoaderError {
    // Only EPERM: the verifier reports a rejected program with EACCES too.
    if is_errno(e.as_ref(), libc::EPERM) {
        LoaderError::NoPermission {
            detail: crate::telemetry::error_chain(e.as_ref()),
        }
    } else {
        LoaderError::Load(e)
    }
}

/// Whether an `io::Error` with this errno is anywhere in the error's source chain.
fn is_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_errno_anywhere_in_the_chain() {
        let e: Box<dyn std::error::Error + Send + Sync> =
            Box::new(io::Error::from_raw_os_error(libc::EPERM));
        assert!(matches!(
            classify_load_error(e),
            LoaderError::NoPermission { .. }
        ));
        let e: Box<dyn std::error::Error + Send + Sync> =
            Box::new(io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(classify_load_error(e), LoaderError::Load(_)));
    }
}
