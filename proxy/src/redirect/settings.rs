//! What the redirect needs from the configuration: [`RedirectSettings`] and its checks.

use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;

use crate::config::{self, SettingError, TargetsConfig};

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
