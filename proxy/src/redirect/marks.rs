//! Keeping the kernel's cgroup map (target and bypass marks) equal to what a rescan found: stale
//! entries leave first, pullproxy's own mark goes in next, then the targets; a full map is logged
//! and counted and never stops the rescan.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{CgroupRole, MAX_CGROUPS};
use tracing::{info, warn};

/// Cgroup id -> (role, cgroup path): what should be, or what is, in the kernel map.
pub(crate) type Marks = BTreeMap<u64, (CgroupRole, String)>;

/// Why a mark could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("the cgroup map is full ({MAX_CGROUPS} entries)")]
    Full,
    #[error("writing the cgroup map")]
    Map(#[source] MapError),
}

/// The kernel's cgroup map, as far as the sync needs it (a fake in tests).
pub(crate) trait CgroupMarks {
    /// Every id in the map.
    fn ids(&self) -> Vec<u64>;
    /// Writes `id`'s role (inserting or replacing).
    fn mark(&mut self, id: u64, role: CgroupRole) -> Result<(), MarkError>;
    /// Removes `id`; one that is already gone is fine.
    fn unmark(&mut self, id: u64);
}

impl CgroupMarks for HashMap<MapData, u64, u32> {
    fn ids(&self) -> Vec<u64> {
        self.keys().filter_map(Result::ok).collect()
    }

    fn mark(&mut self, id: u64, role: CgroupRole) -> Result<(), MarkError> {
        self.insert(&id, &(role as u32), 0).map_err(|e| match &e {
            // A full hash map refuses a new key with E2BIG.
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                MarkError::Full
            }
            _ => MarkError::Map(e),
        })
    }

    fn unmark(&mut self, id: u64) {
        let _ = self.remove(&id);
    }
}

/// What a sync did.
#[derive(Debug, Default)]
pub(crate) struct SyncOutcome {
    /// What the map holds now (of what was desired): the next sync's `applied`.
    pub(crate) applied: Marks,
    /// Whether the map changed (the kernel's decision cache must be invalidated).
    pub(crate) changed: bool,
    /// Desired cgroups left out because the map was full.
    pub(crate) full: BTreeSet<u64>,
    /// pullproxy's own (bypass) mark could not be written: its binds would be refused and its
    /// upstream connections might loop. The caller treats this as an error.
    pub(crate) bypass_failed: Option<MarkError>,
}

/// Makes `map` hold exactly `desired`, given `applied` (what the last sync left there). Stale
/// entries (earlier runs, cgroups that are gone) are removed before anything is inserted, so
/// they never take the room of current ones; the bypass mark is written before the targets.
/// A write that fails is logged and left out of `applied`, so the next sync retries it.
pub(crate) fn sync(map: &mut impl CgroupMarks, applied: &Marks, desired: &Marks) -> SyncOutcome {
    let mut out = SyncOutcome::default();
    for id in map.ids() {
        if !desired.contains_key(&id) {
            map.unmark(id);
            out.changed = true;
            if let Some((_, path)) = applied.get(&id) {
                info!(cgroup = %path, id, "cgroup unmarked");
            }
        }
    }
    let bypass_first = desired
        .iter()
        .filter(|(_, (r, _))| *r == CgroupRole::Bypass)
        .chain(
            desired
                .iter()
                .filter(|(_, (r, _))| *r != CgroupRole::Bypass),
        );
    for (id, (role, path)) in bypass_first {
        if applied.get(id).map(|(r, _)| r) == Some(role) {
            out.applied.insert(*id, (*role, path.clone()));
            continue;
        }
        match map.mark(*id, *role) {
            Ok(()) => {
                info!(cgroup = %path, id, role = ?role, "cgroup marked");
                out.applied.insert(*id, (*role, path.clone()));
                out.changed = true;
            }
            Err(e) if *role == CgroupRole::Bypass => out.bypass_failed = Some(e),
            Err(MarkError::Full) => {
                out.full.insert(*id);
            }
            Err(e) => {
                warn!(cgroup = %path, id, error = %crate::telemetry::error_chain(&e), "cannot mark cgroup")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map with a capacity, like the kernel's hash map.
    struct FakeMap {
        entries: BTreeMap<u64, CgroupRole>,
        capacity: usize,
    }

    impl CgroupMarks for FakeMap {
        fn ids(&self) -> Vec<u64> {
            self.entries.keys().copied().collect()
        }

        fn mark(&mut self, id: u64, role: CgroupRole) -> Result<(), MarkError> {
            if !self.entries.contains_key(&id) && self.entries.len() >= self.capacity {
                return Err(MarkError::Full);
            }
            self.entries.insert(id, role);
            Ok(())
        }

        fn unmark(&mut self, id: u64) {
            self.entries.remove(&id);
        }
    }

    fn targets(ids: impl IntoIterator<Item = u64>) -> Marks {
        ids.into_iter()
            .map(|id| (id, (CgroupRole::Target, format!("/t/{id}"))))
            .collect()
    }

    #[test]
    fn stale_entries_leave_before_new_ones_arrive_so_a_full_map_still_converges() {
        // A map full of an earlier run's marks (another pullproxy's bypass among them).
        let mut map = FakeMap {
            entries: (1..=4).map(|id| (id, CgroupRole::Target)).collect(),
            capacity: 4,
        };
        map.entries.insert(4, CgroupRole::Bypass);
        let mut desired = targets(10..13);
        desired.insert(20, (CgroupRole::Bypass, "/pullproxy".into()));
        let out = sync(&mut map, &Marks::new(), &desired);
        assert_eq!(out.applied, desired);
        assert!(out.full.is_empty() && out.changed && out.bypass_failed.is_none());
        assert_eq!(map.ids(), vec![10, 11, 12, 20]);
        assert_eq!(map.entries[&20], CgroupRole::Bypass);
    }

    #[test]
    fn a_full_map_is_counted_keeps_the_bypass_and_never_stops_the_rescan() {
        let mut map = FakeMap {
            entries: BTreeMap::new(),
            capacity: 3,
        };
        // The bypass sorts last by id, but goes in first.
        let mut desired = targets(1..=5);
        desired.insert(99, (CgroupRole::Bypass, "/pullproxy".into()));
        let out = sync(&mut map, &Marks::new(), &desired);
        assert!(out.bypass_failed.is_none());
        assert_eq!(map.entries.get(&99), Some(&CgroupRole::Bypass));
        assert_eq!(out.applied.len(), 3);
        assert_eq!(out.full, BTreeSet::from([3, 4, 5]));
        // Left out of `applied`, so the next sync retries them; once room is made they go in.
        map.capacity = 6;
        let again = sync(&mut map, &out.applied, &desired);
        assert_eq!(again.applied, desired);
        assert!(again.full.is_empty());
    }

    #[test]
    fn an_unchanged_set_writes_nothing_and_a_vanished_target_is_removed() {
        let mut map = FakeMap {
            entries: BTreeMap::new(),
            capacity: 8,
        };
        let desired = targets([1, 2]);
        let first = sync(&mut map, &Marks::new(), &desired);
        let second = sync(&mut map, &first.applied, &desired);
        assert!(!second.changed);
        assert_eq!(second.applied, desired);
        let third = sync(&mut map, &second.applied, &targets([2]));
        assert!(third.changed);
        assert_eq!(map.ids(), vec![2]);
    }

    #[test]
    fn a_bypass_that_cannot_be_written_is_reported() {
        let mut map = FakeMap {
            entries: BTreeMap::new(),
            capacity: 0,
        };
        let desired = Marks::from([(7, (CgroupRole::Bypass, "/pullproxy".into()))]);
        let out = sync(&mut map, &Marks::new(), &desired);
        assert!(matches!(out.bypass_failed, Some(MarkError::Full)));
        assert!(out.applied.is_empty());
    }
}
