//! The configuration file's format: YAML (serde-saphyr), the default embedded from
//! `config/pullproxy.yaml`, `--config FILE` and `PULLPROXY_<SECTION>__<KEY>` environment
//! overrides, layered key by key (`layers`) into the sections below. Each subsystem converts its
//! own section (`TryFrom<&config::X>`, errors naming the key through [`SettingError`]);
//! `settings::Config` gathers the converted sections. This module imports none of them.

mod layers;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{secret::Secret, telemetry::Log};

/// The default configuration, embedded in the binary. Every key is documented there.
pub const DEFAULT_YAML: &str = include_str!("../../../config/pullproxy.yaml");

/// Prefix of environment overrides: `PULLPROXY_LISTEN__PORT=15443` sets `listen.port`.
pub const ENV_PREFIX: &str = "PULLPROXY_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not YAML. The message has the line and column but no snippet of the file: the line could
    /// hold a secret.
    #[error("{origin}: {message}")]
    Yaml { origin: String, message: String },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
    #[error("{at}: {key}: {message}")]
    Located {
        at: String,
        key: String,
        message: String,
    },
}

/// Why a subsystem refuses a value of its section: the key at fault, and (as `Display`) why, in
/// words that never repeat a secret.
pub trait SettingError: std::error::Error + 'static {
    /// The dotted key, such as `listen.port`.
    fn key(&self) -> &'static str;
}

/// A deadline or a limit set to zero, which would refuse everything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Zero {
    #[error("must be longer than 0s")]
    Duration(&'static str),
    #[error("must be at least 1")]
    Count(&'static str),
}

impl SettingError for Zero {
    fn key(&self) -> &'static str {
        match self {
            Zero::Duration(key) | Zero::Count(key) => key,
        }
    }
}

/// `d`, unless it is zero.
pub fn nonzero_duration(key: &'static str, d: Duration) -> Result<Duration, Zero> {
    if d.is_zero() {
        Err(Zero::Duration(key))
    } else {
        Ok(d)
    }
}

/// `n`, unless it is zero.
pub fn nonzero_count(key: &'static str, n: usize) -> Result<usize, Zero> {
    if n == 0 { Err(Zero::Count(key)) } else { Ok(n) }
}

/// The configuration file's format: what the layered YAML and overrides deserialize into.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Listen,
    pub admin: Admin,
    pub redirect: Redirect,
    pub registries: Registries,
    pub hub: Hub,
    pub cache: Cache,
    pub tls: Tls,
    pub upstream: Upstream,
    pub log: Log,
    pub warm: Warm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warm {
    /// Images this node's cache is filled with at start and whenever this list changes.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// How often the hub is checked for `/readyz` and `pullproxy_hub_up`.
    #[serde(with = "humantime_serde")]
    pub hub_check_interval: Duration,
    /// Connections the admin listener holds at once.
    pub max_connections: usize,
    /// Of those, connections from one source address.
    pub max_connections_per_client: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Server names whose TLS is terminated, besides the well-known public registries and the
    /// hosts named in `hub.mapping.overrides`; `"*"` terminates every server name.
    pub intercept: Vec<String>,
    /// Registries spoken to in plain HTTP (`host` or `host:port`).
    pub insecure: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hub {
    /// Base URL of the cluster's registry; `null` disables the hub.
    pub url: Option<String>,
    /// When true, an unreachable hub does not make pullproxy unready.
    pub optional: bool,
    pub username: Option<String>,
    /// Inline password (prefer `password_file` or `dockerconfigjson`).
    pub password: Option<Secret>,
    /// File holding the password; re-read when it changes.
    pub password_file: Option<PathBuf>,
    /// A `kubernetes.io/dockerconfigjson` Secret file; re-read when it changes.
    pub dockerconfigjson: Option<PathBuf>,
    pub mapping: HubMapping,
    /// Deadline for a hub lookup (manifest HEAD/GET, blob HEAD).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Push images the upstream served (because the hub lacked them) into the hub: `public`,
    /// `all` or `off`.
    pub write_back: WriteBackPolicy,
    /// Bytes per second write-back may upload into the hub, all uploads together.
    pub write_back_rate: ByteSize,
}

/// What write-back may push into the hub (`hub.write_back`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteBackPolicy {
    /// Only what the upstream serves without credentials.
    Public,
    /// Everything, private content included (it becomes readable by every client of the cluster).
    All,
    Off,
}

impl std::fmt::Display for WriteBackPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteBackPolicy::Public => "public",
            WriteBackPolicy::All => "all",
            WriteBackPolicy::Off => "off",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubMapping {
    /// Repository on the hub for an image `{host}/{repo}`; the sealos convention is `{repo}`.
    pub default: String,
    /// Per registry host, e.g. `quay.io: "quay.io/{repo}"`.
    pub overrides: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    pub dir: PathBuf,
    /// Size limit of the cached blobs: `20GiB`, `512MiB`, or bytes.
    pub max_size: ByteSize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// pullproxy's TLS state; the generated node CA lives here.
    pub state_dir: PathBuf,
    /// An operator-supplied node CA (certificate and PKCS#8 key, both or neither).
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// CA files trusted for upstream connections besides the system roots.
    pub extra_upstream_cas: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for a whole manifest (and tags, `/v2/`) exchange.
    #[serde(with = "humantime_serde")]
    pub manifest_timeout: Duration,
    /// Longest silence allowed inside a blob download (no total deadline: blobs can be huge).
    #[serde(with = "humantime_serde")]
    pub blob_idle_timeout: Duration,
}

/// A size in bytes, written as `20GiB`, `512MiB`, `64KiB`, `10GB` or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Number(n) => Ok(ByteSize(n)),
            Repr::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Port of the proxy on every address in `addresses`; the kernel redirects to it.
    pub port: u16,
    /// Loopback addresses to listen on (127.0.0.1 and ::1).
    pub addresses: Vec<IpAddr>,
    /// From accept to a completed TLS handshake, ClientHello included (both listeners).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// From the first byte of a request head to the whole head.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with no request in flight and no byte of the next one.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A response write waiting on a client that does not read.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connections the proxy port holds at once.
    pub max_connections: usize,
    /// Of those, connections of one client process (by the kernel's record of its cgroup and
    /// pid).
    pub max_connections_per_client: usize,
    /// Of those, connections without a kernel record (processes connecting to the port
    /// directly), all together.
    pub max_direct_connections: usize,
    /// Hand terminated HTTP/1.1 TLS 1.3 connections to the kernel's TLS where it has it.
    pub kernel_tls: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub enabled: bool,
    pub ports: Vec<u16>,
    pub exclude: Vec<IpNet>,
    pub attach_cgroup: String,
    pub targets: TargetsConfig,
    pub pin_dir: PathBuf,
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
    pub kernel_log: bool,
}

/// `auto`, or a list of cgroup paths. Text other than `auto` is refused while deserializing, so
/// that an environment override such as `[/a, /b]` is read as the list it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetsConfig {
    Auto,
    Paths(Vec<String>),
}

impl<'de> Deserialize<'de> for TargetsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Targets;
        impl<'de> serde::de::Visitor<'de> for Targets {
            type Value = TargetsConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`auto` or a list of cgroup paths")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TargetsConfig, E> {
                if v == "auto" {
                    Ok(TargetsConfig::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TargetsConfig, A::Error> {
                let mut paths = Vec::new();
                while let Some(p) = seq.next_element()? {
                    paths.push(p);
                }
                Ok(TargetsConfig::Paths(paths))
            }
        }
        d.deserialize_any(Targets)
    }
}

/// The layered configuration file, and where each key was set (for errors that name it).
pub struct Layered {
    pub file: ConfigFile,
    layers: layers::Layers,
}

impl Layered {
    /// Reads `path` (if any) over the embedded defaults, then the `PULLPROXY_*` overrides of the
    /// process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.into(),
                    source,
                })?,
            ),
            None => None,
        };
        let origin = path.map(|p| p.display().to_string());
        Self::new(text.as_deref().zip(origin.as_deref()), std::env::vars())
    }

    /// The embedded defaults with `file` (text, name for messages) and then the `PULLPROXY_*`
    /// overrides in `env` layered over them key by key.
    pub fn new(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut layers = layers::Layers::new(DEFAULT_YAML, file)?;
        layers.apply_env(env, |tree| typed(tree).map(drop))?;
        let file = typed(&layers.tree).map_err(|(at, msg)| layers.error_at(&at, msg))?;
        Ok(Layered { file, layers })
    }

    /// A subsystem's conversion of its section, a refusal told at the layer that set the key.
    pub fn owned<T, E: SettingError>(&self, converted: Result<T, E>) -> Result<T, ConfigError> {
        converted.map_err(|e| {
            self.layers
                .error_at(e.key(), crate::telemetry::error_chain(&e))
        })
    }

    /// `PULLPROXY_*` variables that are not overrides (logged as a warning at start).
    pub fn ignored_env(&self) -> &[String] {
        &self.layers.ignored_env
    }
}

/// The typed configuration from a merged tree, or the key (a serde path such as
/// `listen.addresses[1]`) where it does not fit and why.
fn typed(tree: &serde_json::Value) -> Result<ConfigFile, (String, String)> {
    serde_path_to_error::deserialize(tree)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod size_tests {
    use super::ByteSize;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!("20GiB".parse::<ByteSize>().unwrap().0, 20 << 30);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("10GB".parse::<ByteSize>().unwrap().0, 10_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("GiB".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
    }
}
