//! The kernel redirect: loads the programs embedded in this binary, attaches them at a stable
//! ancestor cgroup, pins maps and links under the pin directory so a restarted proxy resumes
//! without re-attaching, keeps the target cgroup ids current as runtimes restart, and guards the
//! proxy's ports so only pullproxy can bind them. `diagnose.rs` tells `pullproxy doctor` whether
//! the node can run all this and whether a running pullproxy's programs are in place.

pub mod bpf_sys;
pub mod cgroup;
mod diagnose;
pub(crate) mod guard;
mod loader;
pub mod marks;
pub(crate) mod metrics;
mod pins;
pub mod preflight;
mod settings;
mod targets;

use std::{collections::BTreeSet, io, path::PathBuf};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use proxy_common::{CgroupRole, Counter, maps, programs};

pub(crate) use self::diagnose::diagnose;
use self::{
    cgroup::{Cgroup2, CgroupError},
    marks::Marks,
    pins::sum_counters,
    preflight::MIN_KERNEL,
};
pub use self::{
    pins::{pinned_counters, pinned_links, uninstall},
    settings::{RedirectSettings, RedirectSettingsError, Targets},
};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("kernel {found} is too old: pullproxy needs Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error(
        "no permission to load BPF programs ({detail}): run as root, or grant CAP_BPF, CAP_PERFMON \
         and CAP_NET_ADMIN"
    )]
    NoPermission { detail: String },
    #[error("loading the kernel programs failed")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "cannot attach {program} at cgroup {cgroup}: another BPF program is attached there or above \
         in exclusive (non-multi) mode (EPERM); detach it (bpftool cgroup tree) or set \
         redirect.attach_cgroup to a cgroup below it"
    )]
    Conflict {
        program: &'static str,
        cgroup: String,
    },
    #[error("attaching {program} at cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("bpffs at {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pullproxy runs in cgroup {cgroup}, which is a redirect target: its own upstream connections \
         would loop. Run it in a cgroup of its own (for example `systemd-run --scope`)"
    )]
    ProxyInTarget { cgroup: String },
    #[error("cannot mark pullproxy's own cgroup {cgroup} in the kernel map")]
    OwnCgroup {
        cgroup: String,
        #[source]
        source: marks::MarkError,
    },
}

/// The installed redirect: the maps user space writes and reads. Programs and links live on in
/// bpffs after this is dropped; [`uninstall`] removes them.
pub struct Redirector {
    cgroup2: Cgroup2,
    settings: RedirectSettings,
    cgroups: HashMap<MapData, u64, u32>,
    /// Bumped after every change to `cgroups`: invalidates the kernel's decision cache.
    generation: Array<MapData, u64>,
    /// Processes that rejected the node CA: not redirected until they restart.
    untrusted: HashMap<MapData, u32, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// What the cgroup map holds, as last synced.
    applied: Marks,
    /// Target cgroups found but not marked because the map is full.
    unmarked: BTreeSet<u64>,
    /// Pids of processes named like a runtime that were not counted, as last logged.
    skipped: BTreeSet<u32>,
    /// This process's cgroup as last found (searching for it can walk the tree).
    own: Option<String>,
    /// Keeps the aya-log reader alive when kernel logging is on.
    _ebpf: Ebpf,
}

/// The programs, each pinned as a link under its own name.
const PROGRAMS: [&str; 7] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCKOPS,
    programs::BIND4,
    programs::BIND6,
];

/// The bind guard's programs, among [`PROGRAMS`].
pub(crate) const GUARD_PROGRAMS: [&str; 2] = [programs::BIND4, programs::BIND6];

impl Redirector {
    /// Stops redirecting process `pid`: it rejected the node CA's certificate, so it started
    /// before the CA was installed and will not trust it until it restarts (a restarted process
    /// has a new pid and is redirected again). Until then its pulls go direct instead of failing.
    pub(crate) fn distrust(&mut self, pid: u32) -> Result<(), LoaderError> {
        self.untrusted
            .insert(&pid, &crate::telemetry::unix_secs(), 0)
            .map_err(|source| LoaderError::Map {
                map: maps::UNTRUSTED,
                source,
            })
    }

    /// The kernel's counters, summed over CPUs.
    pub(crate) fn counters(&self) -> Vec<(Counter, u64)> {
        sum_counters(&self.counters)
    }

    /// How many target cgroups were found but are not marked because the map is full.
    pub(crate) fn unmarked_targets(&self) -> usize {
        self.unmarked.len()
    }

    /// Ids of the cgroups currently marked as targets.
    pub(crate) fn target_cgroups(&self) -> Vec<(String, u64)> {
        self.applied
            .iter()
            .filter(|(_, (r, _))| *r == CgroupRole::Target)
            .map(|(id, (_, p))| (p.clone(), *id))
            .collect()
    }
}
