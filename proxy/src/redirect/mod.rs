//! The kernel redirect: loads the programs embedded in this binary, attaches them at a stable
//! ancestor cgroup, pins maps and links under the pin directory so a restarted proxy resumes
//! without re-attaching, keeps the target cgroup ids current as runtimes restart, and guards the
//! proxy's ports so only pullproxy can bind them.

pub mod bpf_sys;
pub mod cgroup;
pub(crate) mod guard;
pub mod marks;
pub(crate) mod metrics;
pub mod preflight;

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, Program, SockOps, links::FdLink},
};
use ipnet::IpNet;
use proxy_common::{CgroupRole, Counter, globals, maps, programs};
use tracing::{debug, info, warn};

use self::{
    cgroup::{Cgroup2, CgroupError},
    marks::Marks,
    preflight::MIN_KERNEL,
};
use crate::{
    accept::original_dst::KernelOriginalDst,
    config::{self, SettingError, TargetsConfig},
    runtimes::RuntimeProc,
    telemetry::error_chain,
};

/// The kernel object built from `proxy-ebpf` (empty in cargo-fuzz builds, which never load it:
/// see build.rs).
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pullproxy"));

/// Which cgroups' connections are redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// The container runtimes found on this node (systemd units and runtime processes).
    Auto,
    /// Exactly these cgroup paths.
    Paths(Vec<String>),
}

/// What the redirect needs from the configuration.
#[derive(Debug, Clone)]
pub struct RedirectSettings {
    /// Whether the programs are installed at all; without them only explicit clients are served.
    pub enabled: bool,
    /// Cgroup path where the programs are attached; every target must be at or below it.
    pub attach_cgroup: String,
    /// bpffs directory for the pinned maps and links.
    pub pin_dir: PathBuf,
    /// Destination ports that are redirected.
    pub ports: Vec<u16>,
    /// The proxy's listening port on 127.0.0.1 and ::1.
    pub proxy_port: u16,
    /// Ports only pullproxy's own cgroup may bind (the bind guard): the proxy port and the admin
    /// listener's port.
    pub guarded_ports: Vec<u16>,
    /// Destinations that always go direct.
    pub exclude: Vec<IpNet>,
    pub targets: Targets,
    /// How often target cgroups are re-resolved (a restarted runtime gets a new cgroup id).
    pub rescan_interval: Duration,
    /// Kernel-side debug logging through aya-log (costs on every connect).
    pub kernel_log: bool,
}

/// A `redirect` value the kernel programs cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectSettingsError {
    #[error("needs at least one port when enabled")]
    NoPorts,
    #[error("0 is not a port")]
    PortZero,
    #[error("{0:?} must be an absolute cgroup path such as \"/\"")]
    AttachCgroup(String),
    #[error("an empty list redirects nothing; use `auto` or name cgroups")]
    NoTargets,
    #[error("{0:?} must be an absolute cgroup path")]
    Target(String),
    #[error(
        "{} must be an absolute path without `.` in any name (bpffs refuses such names)",
        .0.display()
    )]
    PinDir(PathBuf),
    #[error("must be at least 100ms")]
    RescanInterval,
}

impl SettingError for RedirectSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::NoPorts | Self::PortZero => "redirect.ports",
            Self::AttachCgroup(_) => "redirect.attach_cgroup",
            Self::NoTargets | Self::Target(_) => "redirect.targets",
            Self::PinDir(_) => "redirect.pin_dir",
            Self::RescanInterval => "redirect.rescan_interval",
        }
    }
}

/// Shortest `redirect.rescan_interval`: each rescan walks the runtimes' processes and cgroups.
const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(100);

impl RedirectSettings {
    /// The `redirect` section, sending to the proxy on `proxy_port` and guarding that port and
    /// the admin listener's `admin_port` (the ports of `listen` and `admin`).
    pub fn from_section(
        r: &config::Redirect,
        proxy_port: u16,
        admin_port: u16,
    ) -> Result<Self, RedirectSettingsError> {
        if r.enabled && r.ports.is_empty() {
            return Err(RedirectSettingsError::NoPorts);
        }
        if r.ports.contains(&0) {
            return Err(RedirectSettingsError::PortZero);
        }
        if !r.attach_cgroup.starts_with('/') {
            return Err(RedirectSettingsError::AttachCgroup(r.attach_cgroup.clone()));
        }
        let targets = match &r.targets {
            TargetsConfig::Auto => Targets::Auto,
            TargetsConfig::Paths(p) if p.is_empty() => {
                return Err(RedirectSettingsError::NoTargets);
            }
            TargetsConfig::Paths(p) => match p.iter().find(|p| !p.starts_with('/')) {
                Some(bad) => return Err(RedirectSettingsError::Target(bad.clone())),
                None => Targets::Paths(p.clone()),
            },
        };
        if !r.pin_dir.is_absolute()
            || r.pin_dir
                .components()
                .any(|c| c.as_os_str().to_string_lossy().contains('.'))
        {
            return Err(RedirectSettingsError::PinDir(r.pin_dir.clone()));
        }
        if r.rescan_interval < MIN_RESCAN_INTERVAL {
            return Err(RedirectSettingsError::RescanInterval);
        }
        // The admin listener's squatter could answer Prometheus and the kubelet's probes.
        let mut guarded_ports = vec![proxy_port, admin_port];
        guarded_ports.retain(|p| *p != 0);
        guarded_ports.sort_unstable();
        guarded_ports.dedup();
        Ok(Self {
            enabled: r.enabled,
            attach_cgroup: r.attach_cgroup.clone(),
            pin_dir: r.pin_dir.clone(),
            ports: r.ports.clone(),
            proxy_port,
            guarded_ports,
            exclude: r.exclude.clone(),
            targets,
            rescan_interval: r.rescan_interval,
            kernel_log: r.kernel_log,
        })
    }
}

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

    /// Re-resolves target and bypass cgroups and writes the changes to the kernel map. A full
    /// map leaves targets out (logged, and counted in `pullproxy_redirect_target_cgroups_unmarked`)
    /// but never stops the rescan; failing to mark pullproxy's own cgroup is an error.
    pub(crate) fn refresh_targets(&mut self) -> Result<(), LoaderError> {
        let mut desired = Marks::new();
        let paths: BTreeSet<String> = match &self.settings.targets {
            Targets::Auto => {
                let found = self.cgroup2.detect_runtimes(Path::new("/proc"));
                self.log_skipped(&found.skipped);
                found.cgroups
            }
            Targets::Paths(p) => p.iter().cloned().collect(),
        };
        for path in paths {
            match self.cgroup2.id(&path) {
                Ok(id) => {
                    desired.insert(id, (CgroupRole::Target, path));
                }
                Err(CgroupError::Missing { .. }) => {
                    debug!(cgroup = %path, "target cgroup does not exist (yet)")
                }
                Err(e) => {
                    warn!(cgroup = %path, error = error_chain(&e), "cannot resolve target cgroup")
                }
            }
        }
        let own = cgroup::own_cgroup(&self.cgroup2, self.own.as_deref())?;
        self.own = Some(own.clone());
        let own_id = self.cgroup2.id(&own)?;
        if desired.contains_key(&own_id) {
            return Err(LoaderError::ProxyInTarget { cgroup: own });
        }
        desired.insert(own_id, (CgroupRole::Bypass, own.clone()));

        if desired == self.applied {
            return Ok(());
        }
        let outcome = marks::sync(&mut self.cgroups, &self.applied, &desired);
        if let Some(source) = outcome.bypass_failed {
            return Err(LoaderError::OwnCgroup {
                cgroup: own,
                source,
            });
        }
        if outcome.full != self.unmarked {
            if !outcome.full.is_empty() {
                let paths: Vec<&str> = outcome
                    .full
                    .iter()
                    .filter_map(|id| desired.get(id).map(|(_, p)| p.as_str()))
                    .collect();
                warn!(
                    count = paths.len(),
                    cgroups = ?paths,
                    capacity = proxy_common::MAX_CGROUPS,
                    "the cgroup map is full: these target cgroups are not redirected"
                );
            }
            self.unmarked = outcome.full;
        }
        if outcome.changed {
            let next = self.generation.get(&0, 0).unwrap_or(0).wrapping_add(1);
            self.generation
                .set(0, &next, 0)
                .map_err(|source| LoaderError::Map {
                    map: maps::GENERATION,
                    source,
                })?;
        }
        if !desired.values().any(|(r, _)| *r == CgroupRole::Target) {
            warn!("no target cgroup found: nothing is redirected until a container runtime starts");
        }
        self.applied = outcome.applied;
        Ok(())
    }

    /// Logs processes named like a runtime that do not count, once per process.
    fn log_skipped(&mut self, skipped: &[RuntimeProc]) {
        let now: BTreeSet<u32> = skipped.iter().map(|p| p.pid).collect();
        for p in skipped.iter().filter(|p| !self.skipped.contains(&p.pid)) {
            warn!(pid = p.pid, comm = %p.comm, verdict = %p.vetting, "process named like a container runtime is not redirected");
        }
        self.skipped = now;
    }

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

    /// Re-resolves targets every `rescan_interval`, so a runtime restarted into a new cgroup is
    /// redirected again without restarting pullproxy.
    pub(crate) async fn watch_targets(this: Arc<Mutex<Self>>) {
        let interval = this
            .lock()
            .expect("redirector lock")
            .settings
            .rescan_interval;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut guard = this.lock().expect("redirector lock");
            if let Err(e) = guard.refresh_targets() {
                warn!(error = error_chain(&e), "refreshing target cgroups failed");
            }
        }
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

fn sum_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(Counter, u64)> {
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
fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoaderError> {
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

/// Removes map pins of other layouts (an older pullproxy's): after the swap no program uses
/// them any more.
fn remove_other_layouts(pin_dir: &Path, current: &Path) {
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
