//! Connection budgets: a limit for the whole listener and one per client, where a client is the
//! process the kernel record names (cgroup and pid), all connections without a record together
//! (local processes connecting to the port directly), or, on the admin listener, a peer address.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::gauge::Gauge;

use super::CloseReason;

/// Whose budget a connection is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// A redirected connection: the process that called `connect()`, as the kernel recorded it.
    /// The cgroup is part of the key because pids are per pid namespace.
    Process { cgroup_id: u64, pid: u32 },
    /// Every connection to the proxy port without a kernel record: they share one budget, so
    /// local users connecting directly can never take the runtimes' share.
    Direct,
    /// A connection to the admin listener, by source address.
    Peer(IpAddr),
}

impl ClientKey {
    /// The key of an admin connection from `ip` (IPv4-mapped addresses count as IPv4).
    pub(crate) fn peer(ip: IpAddr) -> Self {
        Self::Peer(ip.to_canonical())
    }
}

/// How many connections a listener holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// All connections of the listener.
    pub(crate) total: usize,
    /// Connections of one [`ClientKey::Process`] or [`ClientKey::Peer`].
    pub(crate) per_client: usize,
    /// All [`ClientKey::Direct`] connections together.
    pub(crate) direct: usize,
}

impl Limits {
    /// These limits, lowered where needed so that the listener holds at most `room` connections.
    pub(crate) fn within(self, room: usize) -> Self {
        let total = self.total.min(room.max(1));
        Self {
            total,
            per_client: self.per_client.min(total),
            direct: self.direct.min(total),
        }
    }
}

/// Counts open connections against [`Limits`].
#[derive(Clone)]
pub(crate) struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    counts: Mutex<Counts>,
    /// Open connections, for `/metrics`.
    open: Gauge,
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Only keys with at least one open connection are present.
    by_client: HashMap<ClientKey, usize>,
}

/// An admitted connection's place in the budget, given back when dropped.
pub(crate) struct Permit {
    inner: Arc<Inner>,
    key: ClientKey,
}

impl Limiter {
    pub(crate) fn new(limits: Limits, open: Gauge) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                counts: Mutex::new(Counts::default()),
                open,
            }),
        }
    }

    pub(crate) fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Admits one more connection of `key`, or says which limit it is over. The client's own
    /// budget is checked first: a client over its share is told so even when the listener is full.
    pub(crate) fn admit(&self, key: ClientKey) -> Result<Permit, CloseReason> {
        let limits = self.inner.limits;
        let mut counts = self.inner.counts.lock().expect("limiter lock");
        let (budget, over) = match key {
            ClientKey::Direct => (limits.direct, CloseReason::LimitDirect),
            ClientKey::Process { .. } | ClientKey::Peer(_) => {
                (limits.per_client, CloseReason::LimitClient)
            }
        };
        let mine = counts.by_client.get(&key).copied().unwrap_or(0);
        if mine >= budget {
            return Err(over);
        }
        if counts.total >= limits.total {
            return Err(CloseReason::LimitGlobal);
        }
        counts.total += 1;
        *counts.by_client.entry(key).or_insert(0) += 1;
        self.inner.open.inc();
        Ok(Permit {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Open connections: all of them, and those of `key`.
    pub(crate) fn open(&self, key: ClientKey) -> (usize, usize) {
        let counts = self.inner.counts.lock().expect("limiter lock");
        (
            counts.total,
            counts.by_client.get(&key).copied().unwrap_or(0),
        )
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.inner.counts.lock().expect("limiter lock");
        counts.total -= 1;
        if let Some(n) = counts.by_client.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.by_client.remove(&self.key);
            }
        }
        self.inner.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32) -> ClientKey {
        ClientKey::Process { cgroup_id: 7, pid }
    }

    fn limiter(total: usize, per_client: usize, direct: usize) -> (Limiter, Gauge) {
        let gauge = Gauge::default();
        let limits = Limits {
            total,
            per_client,
            direct,
        };
        (Limiter::new(limits, gauge.clone()), gauge)
    }

    #[test]
    fn each_client_has_its_own_budget_and_gets_it_back() {
        let (l, gauge) = limiter(100, 2, 3);
        let a: Vec<Permit> = (0..2).map(|_| l.admit(process(1)).unwrap()).collect();
        assert_eq!(l.admit(process(1)).err(), Some(CloseReason::LimitClient));
        // Another process, and the same pid in another cgroup, are other clients.
        let b = l.admit(process(2)).unwrap();
        let other_cgroup = ClientKey::Process {
            cgroup_id: 8,
            pid: 1,
        };
        let c = l.admit(other_cgroup).unwrap();
        assert_eq!(gauge.get(), 4);
        assert_eq!(l.open(process(1)), (4, 2));
        drop(a);
        assert_eq!(l.open(process(1)), (2, 0));
        assert!(
            l.admit(process(1)).is_ok(),
            "a closed connection frees its place"
        );
        drop((b, c));
        assert_eq!(gauge.get(), 0);
        assert!(l.inner.counts.lock().unwrap().by_client.is_empty());
    }

    #[test]
    fn direct_connections_share_one_budget_and_cannot_starve_the_runtimes() {
        let (l, _) = limiter(10, 4, 3);
        let direct: Vec<Permit> = (0..3)
            .map(|_| l.admit(ClientKey::Direct).unwrap())
            .collect();
        assert_eq!(
            l.admit(ClientKey::Direct).err(),
            Some(CloseReason::LimitDirect)
        );
        // The runtimes still have the rest of the listener.
        let runtime: Vec<Permit> = (0..4).map(|_| l.admit(process(9)).unwrap()).collect();
        assert_eq!(l.open(ClientKey::Direct), (7, 3));
        drop(direct);
        assert!(l.admit(ClientKey::Direct).is_ok());
        drop(runtime);
    }

    #[test]
    fn the_listener_limit_holds_across_clients() {
        let (l, gauge) = limiter(5, 2, 2);
        let held: Vec<Permit> = (0..4)
            .map(|i| l.admit(process(i / 2)).unwrap())
            .chain([l.admit(ClientKey::Direct).unwrap()])
            .collect();
        assert_eq!(l.admit(process(3)).err(), Some(CloseReason::LimitGlobal));
        assert_eq!(
            l.admit(ClientKey::Direct).err(),
            Some(CloseReason::LimitGlobal)
        );
        // A client over its own budget is told that, not that the listener is full.
        assert_eq!(l.admit(process(0)).err(), Some(CloseReason::LimitClient));
        // Refusals leave nothing behind.
        assert_eq!(gauge.get(), 5);
        assert_eq!(l.inner.counts.lock().unwrap().by_client.len(), 3);
        drop(held);
        assert_eq!(l.open(ClientKey::Direct), (0, 0));
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn admin_peers_are_keyed_by_address_with_mapped_ipv4_folded() {
        let (l, _) = limiter(10, 1, 1);
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _held = l.admit(ClientKey::peer(v4)).unwrap();
        assert_eq!(
            l.admit(ClientKey::peer(mapped)).err(),
            Some(CloseReason::LimitClient)
        );
        assert!(
            l.admit(ClientKey::peer("10.0.0.2".parse().unwrap()))
                .is_ok()
        );
    }

    #[test]
    fn limits_shrink_to_the_room_there_is() {
        let l = Limits {
            total: 4096,
            per_client: 512,
            direct: 128,
        };
        assert_eq!(l.within(100_000), l);
        let small = Limits {
            total: 200,
            per_client: 200,
            direct: 128,
        };
        assert_eq!(l.within(200), small);
        assert_eq!(
            l.within(0).total,
            1,
            "never zero: the listener must still serve"
        );
    }

    #[test]
    fn permits_are_counted_correctly_from_many_threads() {
        let (l, gauge) = limiter(1000, 1000, 1000);
        std::thread::scope(|s| {
            for t in 0..8 {
                let l = &l;
                s.spawn(move || {
                    for _ in 0..500 {
                        let p = l.admit(process(t)).unwrap();
                        drop(p);
                    }
                });
            }
        });
        assert_eq!(gauge.get(), 0);
        assert_eq!(l.open(process(0)), (0, 0));
    }
}
