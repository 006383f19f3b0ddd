//! pullproxy's kernel programs.
//!
//! `pp_connect4`/`pp_connect6` rewrite a container runtime's TCP `connect()` to a registry port so
//! it reaches the local proxy instead, after recording where it was going under the socket cookie.
//! `pp_sockops` re-keys that record by the connection's 4-tuple once the kernel has chosen the
//! source port, which is what the proxy sees on `accept()`. `pp_getpeername4`/`pp_getpeername6`
//! answer `getpeername()` with the original destination, so the runtime's view is unchanged.
//! `pp_bind4`/`pp_bind6` are the bind guard: only pullproxy's own cgroup may bind its ports, so
//! while it is down nobody else can listen there and receive the runtimes' connections.
//!
//! Every connect-side program returns "allow": an internal error must never make `connect()`
//! fail. The redirect only happens when the proxy's listener exists in the caller's network
//! namespace, so a stopped proxy means direct connections (fail open). The bind guard refuses
//! exactly one thing: a TCP `bind()` of a guarded port, in pullproxy's network namespace, from
//! any other cgroup.
//!
//! Kernel programs are `unsafe` by nature: BPF helpers are raw foreign functions, map values and
//! context fields are raw pointers, and the loader finds programs and the license by unmangled
//! symbol names. Each block says why it is sound; the verifier checks the memory accesses again.
#![expect(
    unsafe_code,
    reason = "BPF helpers, raw map and context pointers, unmangled symbols; see the module doc"
)]
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use proxy_common::{
    CachedRole, CgroupRole, Counter, FAMILY_V4, FAMILY_V6, MAX_CACHED_ROLES, MAX_CGROUP_DEPTH,
    MAX_CGROUPS, MAX_EXCLUDES, MAX_GUARD_PORTS, MAX_PENDING, MAX_UNTRUSTED, OrigDst, PORT_SLOTS,
    TupleKey,
};

/// The proxy's port, set at load (`proxy_common::globals::PROXY_PORT`).
#[unsafe(no_mangle)]
static PP_PROXY_PORT: Global<u16> = Global::new(0);

// Map names must equal the constants in `proxy_common::maps`; the loader fails on a mismatch.
// An array indexed by port: a non-matching connect() costs one bounds-checked load.
#[map]
static PP_PORTS: Array<u16> = Array::pinned(PORT_SLOTS, 0);
#[map]
static PP_CGROUPS: HashMap<u64, u32> = HashMap::pinned(MAX_CGROUPS, 0);
#[map]
static PP_EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_EXCLUDES, 0);
#[map]
static PP_EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_EXCLUDES, 0);
#[map]
static PP_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static PP_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(MAX_PENDING, 0);
#[map]
static PP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);
#[map]
static PP_GENERATION: Array<u64> = Array::pinned(1, 0);
#[map]
static PP_ROLE_CACHE: LruHashMap<u64, CachedRole> = LruHashMap::pinned(MAX_CACHED_ROLES, 0);
#[map]
static PP_UNTRUSTED: LruHashMap<u32, u64> = LruHashMap::pinned(MAX_UNTRUSTED, 0);
#[map]
static PP_GUARD_PORTS: HashMap<u16, u32> = HashMap::pinned(MAX_GUARD_PORTS, 0);
#[map]
static PP_GUARD_NETNS: Array<u64> = Array::pinned(1, 0);

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[cgroup_sock_addr(connect4)]
pub fn pp_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn pp_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn pp_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn pp_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true);
    1
}

#[cgroup_sock_addr(bind4)]
pub fn pp_bind4(ctx: SockAddrContext) -> i32 {
    i32::from(may_bind(&ctx))
}

#[cgroup_sock_addr(bind6)]
pub fn pp_bind6(ctx: SockAddrContext) -> i32 {
    i32::from(may_bind(&ctx))
}

// Named `pp_sockops`: a `#[sock_ops]` function named `sockops` fails to link.
#[sock_ops]
pub fn pp_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

fn try_connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every cgroup/connect4 program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    // `user_port` is 32 bits wide holding the port in network order.
    let port = u16::from_be(sa.user_port as u16);
    let Some(proxy_port) = proxy_port(port) else {
        return;
    };
    let dst = sa.user_ip4.to_ne_bytes();
    if is_loopback_v4(dst) {
        return count(Counter::Loopback);
    }
    if !should_redirect_from_here() {
        return;
    }
    if PP_EXCLUDE_V4.get(&Key::new(32, dst)).is_some() {
        return count(Counter::Excluded);
    }
    if !listener_v4(ctx, proxy_port) {
        return count(Counter::NoListener);
    }
    if !record(ctx, mapped(dst), port, FAMILY_V4) {
        return count(Counter::RecordFailed);
    }
    sa.user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
    sa.user_port = u32::from(proxy_port.to_be());
    count(Counter::Redirected);
    debug!(
        ctx,
        "redirected v4 connect to port {} -> {}", port, proxy_port
    );
}

fn try_connect6(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every cgroup/connect6 program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let port = u16::from_be(sa.user_port as u16);
    let Some(proxy_port) = proxy_port(port) else {
        return;
    };
    let dst = ip6_bytes(sa.user_ip6);
    let v4 = v4_of_mapped(&dst);
    let loopback = match v4 {
        Some(v4) => is_loopback_v4(v4),
        None => dst == LOOPBACK_V6 || dst == [0; 16],
    };
    if loopback {
        return count(Counter::Loopback);
    }
    if !should_redirect_from_here() {
        return;
    }
    let excluded = match v4 {
        Some(v4) => PP_EXCLUDE_V4.get(&Key::new(32, v4)).is_some(),
        None => PP_EXCLUDE_V6.get(&Key::new(128, dst)).is_some(),
    };
    if excluded {
        return count(Counter::Excluded);
    }
    let listening = match v4 {
        Some(_) => listener_v4(ctx, proxy_port),
        None => listener_v6(ctx, proxy_port),
    };
    if !listening {
        return count(Counter::NoListener);
    }
    let family = if v4.is_some() { FAMILY_V4 } else { FAMILY_V6 };
    if !record(ctx, dst, port, family) {
        return count(Counter::RecordFailed);
    }
    // A v4-mapped destination on a dual-stack socket stays v4-mapped: the socket is connected to
    // the IPv4 listener at 127.0.0.1 through `::ffff:127.0.0.1`.
    let target = if v4.is_some() {
        mapped(LOOPBACK_V4)
    } else {
        LOOPBACK_V6
    };
    sa.user_ip6 = ip6_words(target);
    sa.user_port = u32::from(proxy_port.to_be());
    count(Counter::Redirected);
    debug!(
        ctx,
        "redirected v6 connect to port {} -> {}", port, proxy_port
    );
}

fn try_getpeername(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: the kernel hands every cgroup/getpeername program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Only a socket whose peer is the proxy listener can have been redirected: everything else
    // (this hook also runs for every accept() with an address) leaves before any lookup.
    if u16::from_be(sa.user_port as u16) != PP_PROXY_PORT.load() {
        return;
    }
    let loopback = if v6 {
        let peer = ip6_bytes(sa.user_ip6);
        peer == LOOPBACK_V6 || peer == mapped(LOOPBACK_V4)
    } else {
        sa.user_ip4 == u32::from_ne_bytes(LOOPBACK_V4)
    };
    if !loopback {
        return;
    }
    // SAFETY: the helper only reads the socket behind `ctx`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PP_BY_COOKIE.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: a value pointer from a map lookup is valid for the program's run; fields are copied
    // out at once.
    let (addr, port) = unsafe { ((*orig).addr, (*orig).port) };
    if v6 {
        sa.user_ip6 = ip6_words(addr);
    } else {
        sa.user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    }
    sa.user_port = u32::from((port as u16).to_be());
    count(Counter::PeerRestored);
}

fn try_sockops(ctx: &SockOpsContext) {
    // This runs for every callback of every TCP socket below the attach point (about nine per
    // connection): leave on the operation first.
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return;
    }
    // Read every field before branching on the family: the verifier rejected a load where the
    // v4 and v6 branches merged ("invalid bpf_context access" on the merged path).
    let family = ctx.family();
    let local4 = ctx.local_ip4();
    let remote4 = ctx.remote_ip4();
    let local6 = ctx.local_ip6();
    let remote6 = ctx.remote_ip6();
    let local_port = ctx.local_port();
    let remote_port = ctx.remote_port();
    // Only connections to the proxy can have a record.
    if u32::from_be(remote_port) != u32::from(PP_PROXY_PORT.load()) {
        return;
    }
    // SAFETY: the helper only reads the socket behind `ctx`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PP_BY_COOKIE.get_ptr(&cookie) else {
        return;
    };
    let (src_addr, dst_addr) = match family {
        AF_INET => (mapped(local4.to_ne_bytes()), mapped(remote4.to_ne_bytes())),
        AF_INET6 => (ip6_bytes(local6), ip6_bytes(remote6)),
        _ => return,
    };
    let key = TupleKey {
        src_addr,
        dst_addr,
        // `local_port` is host order; `remote_port` is network order in the upper 16 bits.
        src_port: local_port,
        dst_port: u32::from_be(remote_port),
    };
    // SAFETY: as in `try_getpeername`; the value is copied into the other map.
    let orig = unsafe { *orig };
    if PP_BY_TUPLE.insert(&key, &orig, 0).is_ok() {
        count(Counter::Rekeyed);
    }
}

/// The bind guard: whether this `bind()` may proceed (false: it fails with EPERM). Refused only
/// for a TCP socket binding a guarded port, from a cgroup other than pullproxy's own, in the
/// network namespace where pullproxy binds its ports. Any address counts (`0.0.0.0`, `::`,
/// `::ffff:127.0.0.1` reach the same port). Same code for v4 and v6: the port and the type are
/// the only fields read.
#[inline(always)]
fn may_bind(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands every cgroup/bind program a valid `bpf_sock_addr`.
    let sa = unsafe { &*ctx.sock_addr };
    // SOCK_STREAM covers TCP and MPTCP, whose listeners accept plain TCP connections too.
    if sa.type_ != SOCK_STREAM {
        return true;
    }
    let port = u16::from_be(sa.user_port as u16);
    if PP_GUARD_PORTS.get_ptr(&port).is_none() {
        return true;
    }
    // SAFETY: helpers that only read the current task and socket.
    let (own, netns) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    // Exactly pullproxy's cgroup (no ancestor walk): nothing below it is pullproxy.
    // SAFETY: the value is copied out at once.
    if unsafe { PP_CGROUPS.get(&own).copied() } == Some(CgroupRole::Bypass as u32) {
        // pullproxy binds here: this is the namespace whose ports are guarded from now on.
        let _ = PP_GUARD_NETNS.set(0, &netns, 0);
        return true;
    }
    // Before pullproxy ever bound (0), and in every other namespace (a pod's), the port is free.
    if PP_GUARD_NETNS.get(0).copied().unwrap_or(0) != netns {
        return true;
    }
    count(Counter::BindRefused);
    false
}

/// The proxy port for a registry destination port, if it is one.
#[inline(always)]
fn proxy_port(port: u16) -> Option<u16> {
    PP_PORTS
        .get(u32::from(port))
        .copied()
        .filter(|proxy| *proxy != 0)
}

/// Whether the calling task's cgroup, or the deepest marked cgroup above it, is a target, and the
/// calling process has not rejected the node CA before. Counts the reason when it is not.
#[inline(always)]
fn should_redirect_from_here() -> bool {
    // SAFETY: helper without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    let generation = PP_GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: the value is copied out at once.
    let role = match unsafe { PP_ROLE_CACHE.get(&own).copied() } {
        Some(cached) if cached.generation == generation => cached.role,
        _ => {
            let role = resolve_role(own);
            let cached = CachedRole {
                generation,
                role,
                _reserved: 0,
            };
            // A full cache only means the next connect() resolves again.
            let _ = PP_ROLE_CACHE.insert(&own, &cached, 0);
            role
        }
    };
    match role {
        r if r == CgroupRole::Target as u32 => {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if PP_UNTRUSTED.get_ptr(&tgid).is_some() {
                count(Counter::Untrusted);
                return false;
            }
            true
        }
        0 => {
            count(Counter::NotTarget);
            false
        }
        _ => {
            count(Counter::Bypass);
            false
        }
    }
}

/// The role of cgroup `own` for the calling task: its own mark, or the deepest mark above it
/// (0: none).
#[inline(always)]
fn resolve_role(own: u64) -> u32 {
    // SAFETY: the value is copied out at once.
    let mut role = unsafe { PP_CGROUPS.get(&own).copied() };
    if role.is_none() {
        // Walk from the root down; a deeper mark overrides a higher one.
        for level in 0..MAX_CGROUP_DEPTH {
            // SAFETY: helper with a plain integer argument.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id == 0 || id == own {
                break;
            }
            // SAFETY: the value is copied out at once.
            if let Some(r) = unsafe { PP_CGROUPS.get(&id).copied() } {
                role = Some(r);
            }
        }
    }
    role.unwrap_or(0)
}

/// Whether something listens on 127.0.0.1:`port` in the caller's network namespace.
#[inline(always)]
fn listener_v4(ctx: &SockAddrContext, port: u16) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(LOOPBACK_V4),
                daddr: u32::from_ne_bytes(LOOPBACK_V4),
                sport: 0,
                dport: port.to_be(),
            },
        },
    };
    lookup_listener(
        ctx,
        &mut tuple,
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>(),
    )
}

/// Whether something listens on [::1]:`port` in the caller's network namespace.
#[inline(always)]
fn listener_v6(ctx: &SockAddrContext, port: u16) -> bool {
    let lo = ip6_words(LOOPBACK_V6);
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: lo,
                daddr: lo,
                sport: 0,
                dport: port.to_be(),
            },
        },
    };
    lookup_listener(
        ctx,
        &mut tuple,
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>(),
    )
}

#[inline(always)]
fn lookup_listener(ctx: &SockAddrContext, tuple: &mut bpf_sock_tuple, size: usize) -> bool {
    // SAFETY: `tuple` is a valid, initialised tuple of `size` bytes; a non-null result is
    // released before returning, as the verifier demands.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut c_void);
    }
    true
}

/// Store where this socket was going, under its cookie. False if the record could not be stored.
#[inline(always)]
fn record(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u32) -> bool {
    // SAFETY: helpers that only read the current task and socket.
    let (cookie, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    let orig = OrigDst {
        cgroup_id,
        addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        port: u32::from(port),
        family,
    };
    PP_BY_COOKIE.insert(&cookie, &orig, 0).is_ok()
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = PP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only written by programs on this CPU, which do not nest here.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn is_loopback_v4(addr: [u8; 4]) -> bool {
    addr[0] == 127 || addr == [0; 4]
}

#[inline(always)]
fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = v4[0];
    out[13] = v4[1];
    out[14] = v4[2];
    out[15] = v4[3];
    out
}

#[inline(always)]
fn v4_of_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let mut prefix = [0u8; 12];
    prefix.copy_from_slice(&addr[..12]);
    (prefix == V4_MAPPED_PREFIX).then(|| [addr[12], addr[13], addr[14], addr[15]])
}

/// The kernel's `__u32[4]` (each word in network order) as 16 address bytes.
#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// 16 address bytes as the kernel's `__u32[4]`.
#[inline(always)]
fn ip6_words(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
