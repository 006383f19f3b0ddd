//! The bind guard's user-space side: which ports only pullproxy may bind (its proxy port and its
//! admin port), in which network namespace, and what the pins say about it when pullproxy is not
//! running. The decision itself is made by the kernel programs `pp_bind4`/`pp_bind6`.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData};
use proxy_common::maps;
use tracing::{debug, info};

use super::LoaderError;

/// The guard as pinned: what `pullproxy doctor` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinnedGuard {
    /// Ports only pullproxy's cgroup may bind, ascending.
    pub(crate) ports: Vec<u16>,
    /// Cookie of the network namespace where they are guarded; 0 while pullproxy has not bound
    /// them yet (the guard is not armed).
    pub(crate) netns: u64,
}

/// Makes the guarded-port map hold exactly `ports`.
pub(crate) fn sync_ports(
    map: &mut HashMap<MapData, u16, u32>,
    ports: &[u16],
) -> Result<(), LoaderError> {
    let map_err = |source| LoaderError::Map {
        map: maps::GUARD_PORTS,
        source,
    };
    let stale: Vec<u16> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|p| !ports.contains(p))
        .collect();
    for port in stale {
        map.remove(&port).map_err(map_err)?;
    }
    for port in ports {
        map.insert(port, &1, 0).map_err(map_err)?;
    }
    info!(
        ?ports,
        "bind guard: only pullproxy's cgroup may bind these ports"
    );
    Ok(())
}

/// Arms the guard in this process's network namespace before pullproxy binds, so no other
/// process can take the ports in between. On kernels without `SO_NETNS_COOKIE` (before 5.14)
/// the bind programs arm it themselves when pullproxy binds.
pub(crate) fn arm(netns: &mut Array<MapData, u64>) -> Result<(), LoaderError> {
    let cookie = match own_netns_cookie() {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no SO_NETNS_COOKIE: the bind guard arms when pullproxy binds");
            return Ok(());
        }
    };
    netns.set(0, &cookie, 0).map_err(|source| LoaderError::Map {
        map: maps::GUARD_NETNS,
        source,
    })
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+): the value
/// `bpf_get_netns_cookie()` returns in the bind programs.
fn own_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The guard of an installed redirect, read from its pins (also while pullproxy is down).
pub(crate) fn pinned(pin_dir: &Path) -> Result<PinnedGuard, LoaderError> {
    let dir = pin_dir.join(format!("maps-{}", proxy_common::MAPS_LAYOUT));
    let open = |name: &'static str| {
        let map_err = |source| LoaderError::Map { map: name, source };
        let data = MapData::from_pin(dir.join(name)).map_err(map_err)?;
        Map::from_map_data(data).map_err(map_err)
    };
    let ports: HashMap<MapData, u16, u32> =
        HashMap::try_from(open(maps::GUARD_PORTS)?).map_err(|source| LoaderError::Map {
            map: maps::GUARD_PORTS,
            source,
        })?;
    let netns: Array<MapData, u64> =
        Array::try_from(open(maps::GUARD_NETNS)?).map_err(|source| LoaderError::Map {
            map: maps::GUARD_NETNS,
            source,
        })?;
    let mut ports: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    ports.sort_unstable();
    Ok(PinnedGuard {
        ports,
        netns: netns.get(&0, 0).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netns_cookie_is_stable_within_a_namespace() {
        // Kernels before 5.14 lack the option; then there is nothing to compare.
        let Ok(first) = own_netns_cookie() else {
            return;
        };
        assert_ne!(first, 0);
        assert_eq!(own_netns_cookie().unwrap(), first);
    }
}
