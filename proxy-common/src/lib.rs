//! Types shared by the kernel programs (`proxy-ebpf`) and user space (`proxy`): map names, keys,
//! values and counter indexes. Every type is `#[repr(C)]` with no implicit padding, so both sides
//! agree on the bytes; the layout tests below pin the sizes. Its only `unsafe` is the user-space
//! `aya::Pod` impls, which promise exactly that.
#![no_std]

/// Version of the map layout. Maps are pinned under `<pin dir>/maps-<version>/`, so a pullproxy
/// whose maps differ never reuses an older, incompatible pinned map: it creates its own and
/// swaps its programs into the pinned links. Bump it whenever a map's type, key or value changes.
pub const MAPS_LAYOUT: &str = "v4";

/// Names of the maps, as pinned under `<pin dir>/maps-<MAPS_LAYOUT>/`.
pub mod maps {
    /// Array indexed by destination port (host order): the proxy port to redirect to, or 0.
    pub const PORTS: &str = "PP_PORTS";
    /// cgroup id -> [`super::CgroupRole`] as `u32`.
    pub const CGROUPS: &str = "PP_CGROUPS";
    /// LPM trie of IPv4 destinations that always go direct.
    pub const EXCLUDE_V4: &str = "PP_EXCLUDE_V4";
    /// LPM trie of IPv6 destinations that always go direct.
    pub const EXCLUDE_V6: &str = "PP_EXCLUDE_V6";
    /// Socket cookie -> [`super::OrigDst`], written at `connect()`.
    pub const BY_COOKIE: &str = "PP_BY_COOKIE";
    /// [`super::TupleKey`] -> [`super::OrigDst`], written by sockops once the 4-tuple is known.
    pub const BY_TUPLE: &str = "PP_BY_TUPLE";
    /// Per-CPU `u64` counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "PP_COUNTERS";
    /// One `u64`: bumped by user space after every change to [`CGROUPS`], which invalidates
    /// [`ROLE_CACHE`].
    pub const GENERATION: &str = "PP_GENERATION";
    /// LRU cache: cgroup id -> [`super::CachedRole`], so a connect() does not walk the caller's
    /// cgroup ancestry every time.
    pub const ROLE_CACHE: &str = "PP_ROLE_CACHE";
    /// LRU: tgid -> `u64` (unused) of processes that rejected the node CA's certificate (they
    /// started before it was installed). Their connections go direct until they restart.
    pub const UNTRUSTED: &str = "PP_UNTRUSTED";
    /// Hash: TCP port (host order, `u16`) -> `u32` (unused) of the ports only pullproxy may
    /// bind: its proxy port and its admin port. Written by user space.
    pub const GUARD_PORTS: &str = "PP_GUARD_PORTS";
    /// One `u64`: the network namespace cookie in which pullproxy last bound a guarded port (0:
    /// none yet). The bind guard acts only there, so a pod in its own network namespace may still
    /// use the same port numbers. Written by the bind programs.
    pub const GUARD_NETNS: &str = "PP_GUARD_NETNS";
}

/// Names of the globals set at load time.
pub mod globals {
    /// `u16`: the proxy's listening port (host order). `getpeername` hooks act only on sockets
    /// whose peer is this port on loopback.
    pub const PROXY_PORT: &str = "PP_PROXY_PORT";
}

/// Names of the kernel programs in the object file.
pub mod programs {
    pub const CONNECT4: &str = "pp_connect4";
    pub const CONNECT6: &str = "pp_connect6";
    pub const GETPEERNAME4: &str = "pp_getpeername4";
    pub const GETPEERNAME6: &str = "pp_getpeername6";
    pub const SOCKOPS: &str = "pp_sockops";
    pub const BIND4: &str = "pp_bind4";
    pub const BIND6: &str = "pp_bind6";
}

/// Capacity of the cookie and tuple maps. Both are LRU maps: a record whose connection never
/// reached the proxy (refused, timed out) ages out instead of filling the map.
pub const MAX_PENDING: u32 = 65_536;
/// Capacity of the cgroup map (targets plus the proxy's own cgroup).
pub const MAX_CGROUPS: u32 = 1_024;
/// Capacity of each exclusion trie.
pub const MAX_EXCLUDES: u32 = 256;
/// Size of the port array: one slot per TCP port.
pub const PORT_SLOTS: u32 = 65_536;
/// Capacity of the cgroup decision cache.
pub const MAX_CACHED_ROLES: u32 = 16_384;
/// Capacity of the map of processes that do not trust the node CA.
pub const MAX_UNTRUSTED: u32 = 4_096;
/// Capacity of the guarded-port map (the proxy port and the admin port need two).
pub const MAX_GUARD_PORTS: u32 = 8;
/// How many cgroup levels above the caller's own cgroup are checked for a target or bypass mark.
/// A runtime that puts helpers in child cgroups of its unit is still matched.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// What a cgroup is to the redirect. The deepest marked cgroup on the caller's path decides.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupRole {
    /// Connections from here (and below) are redirected to the proxy.
    Target = 1,
    /// Connections from here (and below) are never redirected: the proxy's own cgroup.
    Bypass = 2,
}

/// What the kernel decided for a cgroup, valid while `generation` equals the current one.
/// 16 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedRole {
    pub generation: u64,
    /// 0: neither target nor bypass; otherwise a [`CgroupRole`].
    pub role: u32,
    pub _reserved: u32,
}

/// Where a redirected connection was going, recorded by `connect4`/`connect6`.
///
/// Addresses are 16 bytes in IPv4-mapped form for IPv4 (`::ffff:a.b.c.d`), so one type serves both
/// families. 56 bytes, no padding: the `u64` comes first and every other field is a multiple of 4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Original destination address, network order, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// `comm` of the connecting thread, NUL padded.
    pub comm: [u8; 16],
    /// Process id (tgid) of the connecting task.
    pub pid: u32,
    /// Real uid of the connecting task.
    pub uid: u32,
    /// Original destination port, host order (u32 so the struct has no padding).
    pub port: u32,
    /// [`FAMILY_V4`] when the caller asked for an IPv4 address (also through a dual-stack socket),
    /// [`FAMILY_V6`] otherwise.
    pub family: u32,
}

pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

/// A TCP connection's 4-tuple as seen from the connecting side (source = the client socket,
/// destination = the proxy listener). Addresses IPv4-mapped, network order; ports host order.
/// 40 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u32,
    pub dst_port: u32,
}

/// Indexes into the per-CPU counter array. Only connections whose destination port is in the port
/// map are counted; everything else leaves the hook before any counter is touched. The bind guard
/// counts only the binds it refuses.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Rewritten to the proxy.
    Redirected = 0,
    /// Caller's cgroup is neither a target nor below one.
    NotTarget = 1,
    /// Caller is the proxy itself (or below its cgroup).
    Bypass = 2,
    /// Destination is loopback or unspecified.
    Loopback = 3,
    /// Destination is in an excluded CIDR.
    Excluded = 4,
    /// The proxy listener was not there: the connection went direct (fail open).
    NoListener = 5,
    /// Recording the original destination failed; the connection went direct.
    RecordFailed = 6,
    /// sockops found the record and keyed it by 4-tuple.
    Rekeyed = 7,
    /// `getpeername()` answered with the original destination.
    PeerRestored = 8,
    /// The process rejected the node CA's certificate before (it does not trust it yet): its
    /// connections go direct until it restarts.
    Untrusted = 9,
    /// The bind guard refused a `bind()` of a guarded port (the proxy's or the admin listener's)
    /// by a process outside pullproxy's cgroup. Not a connection: see [`Counter::is_connection`].
    BindRefused = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 11] = [
        Counter::Redirected,
        Counter::NotTarget,
        Counter::Bypass,
        Counter::Loopback,
        Counter::Excluded,
        Counter::NoListener,
        Counter::RecordFailed,
        Counter::Rekeyed,
        Counter::PeerRestored,
        Counter::Untrusted,
        Counter::BindRefused,
    ];
    /// Size of the counter array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable label for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::NotTarget => "not_target",
            Counter::Bypass => "bypass",
            Counter::Loopback => "loopback",
            Counter::Excluded => "excluded",
            Counter::NoListener => "no_listener",
            Counter::RecordFailed => "record_failed",
            Counter::Rekeyed => "rekeyed",
            Counter::PeerRestored => "peer_restored",
            Counter::Untrusted => "untrusted_client",
            Counter::BindRefused => "bind_refused",
        }
    }

    /// Whether this counts `connect()` calls (and what became of them), as opposed to refused
    /// binds: the two go to different metrics, so the connection outcomes still add up.
    pub const fn is_connection(self) -> bool {
        !matches!(self, Counter::BindRefused)
    }
}

/// `aya::Pod` for the types user space reads from and writes to maps.
#[cfg(feature = "user")]
#[expect(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait: maps copy these as raw bytes"
)]
mod pod {
    use super::{CachedRole, OrigDst, TupleKey};

    // SAFETY: plain `#[repr(C)]` data without padding or pointers (the layout tests below pin
    // that); every bit pattern is a valid value.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as for `OrigDst`.
    unsafe impl aya::Pod for TupleKey {}
    // SAFETY: as for `OrigDst`.
    unsafe impl aya::Pod for CachedRole {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<OrigDst>(), 8 + 16 + 16 + 4 * 4);
        assert_eq!(align_of::<OrigDst>(), 8);
        assert_eq!(size_of::<TupleKey>(), 16 + 16 + 4 + 4);
        assert_eq!(size_of::<CachedRole>(), 16);
    }

    #[test]
    fn counter_indexes_match_their_position() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
