//! "Where was this connection going, and who opened it?" The kernel records it at `connect()`;
//! the proxy takes the record on `accept()`. Behind a trait so the layers above are testable
//! without root: production reads the kernel map, tests use [`MemoryOriginalDst`].

use std::{
    collections::HashMap as StdHashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData};
use proxy_common::{FAMILY_V4, OrigDst, TupleKey};

/// The peer address of an accepted connection (the client's socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The local address an accepted connection arrived on (the proxy listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

/// Where the client meant to connect before the kernel redirected it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OrigDstAddr(pub SocketAddr);

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The task that opened the connection, as the kernel saw it at `connect()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientProcess {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) comm: String,
    pub(crate) cgroup_id: u64,
}

/// A redirected connection's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    pub(crate) addr: OrigDstAddr,
    pub(crate) process: ClientProcess,
}

/// Hands out the record of an accepted connection, once.
pub trait OriginalDstSource: Send + Sync + 'static {
    /// The record for the connection from `client` accepted on `local`, removed from the source.
    /// `None` when the connection was not redirected (someone connected to the port directly).
    fn take(&self, client: ClientAddr, local: ListenAddr) -> Option<OriginalDst>;
}

/// Reads the kernel's tuple map (written by the sockops program).
pub struct KernelOriginalDst {
    by_tuple: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
}

impl KernelOriginalDst {
    pub(crate) fn new(by_tuple: HashMap<MapData, TupleKey, OrigDst>) -> Self {
        Self {
            by_tuple: Mutex::new(by_tuple),
        }
    }
}

impl OriginalDstSource for KernelOriginalDst {
    fn take(&self, client: ClientAddr, local: ListenAddr) -> Option<OriginalDst> {
        let key = tuple_key(client, local);
        let mut map = self.by_tuple.lock().expect("tuple map lock");
        let rec = map.get(&key, 0).ok()?;
        // Gone already is fine: the LRU may have dropped it.
        let _ = map.remove(&key);
        Some(OriginalDst::from(rec))
    }
}

/// The key the sockops program stored the record under: source = client, destination = listener,
/// both IPv4-mapped.
pub(crate) fn tuple_key(client: ClientAddr, local: ListenAddr) -> TupleKey {
    TupleKey {
        src_addr: mapped(client.0.ip()),
        dst_addr: mapped(local.0.ip()),
        src_port: u32::from(client.0.port()),
        dst_port: u32::from(local.0.port()),
    }
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl From<OrigDst> for OriginalDst {
    fn from(rec: OrigDst) -> Self {
        let v6 = Ipv6Addr::from(rec.addr);
        let ip = if rec.family == FAMILY_V4 {
            IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED))
        } else {
            IpAddr::V6(v6)
        };
        let comm_len = rec
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(rec.comm.len());
        Self {
            addr: OrigDstAddr(SocketAddr::new(ip, rec.port as u16)),
            process: ClientProcess {
                pid: rec.pid,
                uid: rec.uid,
                comm: String::from_utf8_lossy(&rec.comm[..comm_len]).into_owned(),
                cgroup_id: rec.cgroup_id,
            },
        }
    }
}

/// An in-memory source for tests of the layers above the kernel.
#[derive(Default)]
pub(crate) struct MemoryOriginalDst {
    records: Mutex<StdHashMap<TupleKey, OriginalDst>>,
}

impl MemoryOriginalDst {
    #[cfg(test)]
    /// Records that the connection `client` -> `local` was originally going to `dst`.
    pub(crate) fn insert(&self, client: ClientAddr, local: ListenAddr, dst: OriginalDst) {
        self.records
            .lock()
            .expect("records lock")
            .insert(tuple_key(client, local), dst);
    }
}

impl OriginalDstSource for MemoryOriginalDst {
    fn take(&self, client: ClientAddr, local: ListenAddr) -> Option<OriginalDst> {
        self.records
            .lock()
            .expect("records lock")
            .remove(&tuple_key(client, local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(addr: [u8; 16], family: u32) -> OrigDst {
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"containerd");
        OrigDst {
            cgroup_id: 42,
            addr,
            comm,
            pid: 7,
            uid: 0,
            port: 443,
            family,
        }
    }

    #[test]
    fn ipv4_records_become_ipv4_addresses() {
        let addr = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        let dst = OriginalDst::from(rec(addr, FAMILY_V4));
        assert_eq!(dst.addr.0, "10.1.2.3:443".parse().unwrap());
        assert_eq!(dst.process.comm, "containerd");
        assert_eq!(dst.process.pid, 7);
    }

    #[test]
    fn ipv6_records_stay_ipv6() {
        let addr: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst = OriginalDst::from(rec(addr.octets(), proxy_common::FAMILY_V6));
        assert_eq!(dst.addr.0, "[fd00::1]:443".parse().unwrap());
    }

    #[test]
    fn tuple_keys_match_across_families() {
        // A dual-stack client connected through ::ffff:127.0.0.1 is accepted on the v4 listener.
        let a = tuple_key(
            ClientAddr("127.0.0.1:5000".parse().unwrap()),
            ListenAddr("127.0.0.1:15443".parse().unwrap()),
        );
        let b = tuple_key(
            ClientAddr("[::ffff:127.0.0.1]:5000".parse().unwrap()),
            ListenAddr("[::ffff:127.0.0.1]:15443".parse().unwrap()),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn memory_source_hands_out_each_record_once() {
        let src = MemoryOriginalDst::default();
        let client = ClientAddr("127.0.0.1:5000".parse().unwrap());
        let local = ListenAddr("127.0.0.1:15443".parse().unwrap());
        let dst = OriginalDst::from(rec(
            Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped().octets(),
            FAMILY_V4,
        ));
        src.insert(client, local, dst.clone());
        assert_eq!(src.take(client, local), Some(dst));
        assert_eq!(src.take(client, local), None);
    }
}
