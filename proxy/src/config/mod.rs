//! Configuration: YAML (serde-saphyr), the default embedded from `config/pullproxy.yaml`,
//! `--config FILE` and `PULLPROXY_<SECTION>__<KEY>` environment overrides, layered key by key
//! (`layers`). Invalid configuration is an error that names the key and where it was set, before
//! anything binds.

mod layers;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::redirect::{RedirectSettings, Targets};
use crate::secret::Secret;
use crate::telemetry::Log;

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
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    /// `PULLPROXY_*` variables that are not overrides (logged as a warning at start).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
    /// The file this configuration was read from (the daemon watches it for `warm.images`).
    #[serde(skip)]
    pub source: Option<PathBuf>,
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
    pub listen: std::net::SocketAddr,
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
    pub write_back: crate::origins::writeback::Policy,
    /// Bytes per second write-back may upload into the hub, all uploads together.
    pub write_back_rate: ByteSize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubMapping {
    /// Repository on the hub for an image `{host}/{repo}`; the sealos convention is `{repo}`.
    pub default: String,
    /// Per registry host, e.g. `quay.io: "quay.io/{repo}"`.
    pub overrides: std::collections::BTreeMap<String, String>,
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

impl Config {
    /// Loads the embedded defaults, `path` over them, then environment overrides, and validates.
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
        let mut config = Self::layered(text.as_deref().zip(origin.as_deref()), std::env::vars())?;
        config.source = path.map(Path::to_path_buf);
        Ok(config)
    }

    /// `text` (named `origin` in messages) over the embedded defaults, then the `PULLPROXY_*`
    /// overrides in `env`, validated.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::layered(Some((text, origin)), env)
    }

    /// The embedded defaults with `file` (text, name for messages) and then the `PULLPROXY_*`
    /// overrides in `env` layered over them key by key, then validated.
    fn layered(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut layers = layers::Layers::new(DEFAULT_YAML, file)?;
        layers.apply_env(env, |tree| typed(tree).map(drop))?;
        let mut config = typed(&layers.tree).map_err(|(at, msg)| layers.error_at(&at, msg))?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } => layers.error_at(key, message),
            other => other,
        })?;
        config.ignored_env = layers.ignored_env;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.listen.port == 0 {
            return invalid("listen.port", "must be a port number, not 0".into());
        }
        if self.listen.addresses.is_empty() {
            return invalid("listen.addresses", "needs at least one address".into());
        }
        if let Some(a) = self.listen.addresses.iter().find(|a| !a.is_loopback()) {
            return invalid(
                "listen.addresses",
                format!("{a} is not a loopback address; the proxy only listens on loopback"),
            );
        }
        let r = &self.redirect;
        if r.enabled && r.ports.is_empty() {
            return invalid(
                "redirect.ports",
                "needs at least one port when enabled".into(),
            );
        }
        if r.ports.contains(&0) {
            return invalid("redirect.ports", "0 is not a port".into());
        }
        if !r.attach_cgroup.starts_with('/') {
            return invalid(
                "redirect.attach_cgroup",
                format!(
                    "{:?} must be an absolute cgroup path such as \"/\"",
                    r.attach_cgroup
                ),
            );
        }
        self.targets()?;
        if !r.pin_dir.is_absolute()
            || r.pin_dir
                .components()
                .any(|c| c.as_os_str().to_string_lossy().contains('.'))
        {
            return invalid(
                "redirect.pin_dir",
                format!(
                    "{} must be an absolute path without `.` in any name (bpffs refuses such names)",
                    r.pin_dir.display()
                ),
            );
        }
        if r.rescan_interval < Duration::from_millis(100) {
            return invalid("redirect.rescan_interval", "must be at least 100ms".into());
        }
        if let Some(url) = &self.hub.url {
            let uri: http::Uri = url.parse().map_err(|e| ConfigError::Invalid {
                key: "hub.url",
                message: format!("{url:?}: {e}"),
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return invalid(
                    "hub.url",
                    format!("{url:?} must be http://host[:port] or https://host[:port]"),
                );
            }
        }
        let sources = [
            self.hub.password.is_some(),
            self.hub.password_file.is_some(),
            self.hub.dockerconfigjson.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return invalid(
                "hub.password",
                "set at most one of hub.password, hub.password_file and hub.dockerconfigjson"
                    .into(),
            );
        }
        let mapping = &self.hub.mapping;
        let templates = std::iter::once((None, &mapping.default))
            .chain(mapping.overrides.iter().map(|(h, t)| (Some(h.as_str()), t)));
        for (host, template) in templates {
            if let Err(e) = crate::origins::hub::check_template(template, host) {
                return invalid(
                    "hub.mapping",
                    format!("{}: {template:?} {e}", host.unwrap_or("default")),
                );
            }
        }
        if self.tls.ca_cert.is_some() != self.tls.ca_key.is_some() {
            return invalid(
                "tls.ca_cert",
                "set both tls.ca_cert and tls.ca_key, or neither".into(),
            );
        }
        if let Some((image, e)) = self
            .warm
            .images
            .iter()
            .find_map(|i| i.parse::<crate::oci::ImageRef>().err().map(|e| (i, e)))
        {
            return invalid("warm.images", format!("{image:?}: {e}"));
        }
        if self.hub.write_back_rate.0 < 1 << 10 {
            return invalid(
                "hub.write_back_rate",
                "must be at least 1KiB (per second)".into(),
            );
        }
        if self.cache.max_size.0 < 1 << 20 {
            return invalid("cache.max_size", "must be at least 1MiB".into());
        }
        let l = &self.listen;
        // A per-client limit above its listener's is not an error: lowering max_connections
        // alone must not make the other defaults invalid; the listener's limit caps them.
        for (key, n) in [
            ("listen.max_connections", l.max_connections),
            (
                "listen.max_connections_per_client",
                l.max_connections_per_client,
            ),
            ("listen.max_direct_connections", l.max_direct_connections),
            ("admin.max_connections", self.admin.max_connections),
            (
                "admin.max_connections_per_client",
                self.admin.max_connections_per_client,
            ),
        ] {
            if n == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        for (key, d) in [
            ("listen.handshake_timeout", l.handshake_timeout),
            ("listen.header_timeout", l.header_timeout),
            ("listen.idle_timeout", l.idle_timeout),
            ("listen.write_timeout", l.write_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.manifest_timeout", self.upstream.manifest_timeout),
            (
                "upstream.blob_idle_timeout",
                self.upstream.blob_idle_timeout,
            ),
            ("hub.timeout", self.hub.timeout),
        ] {
            if d.is_zero() {
                return invalid(key, "must be longer than 0s".into());
            }
        }
        Ok(())
    }

    fn targets(&self) -> Result<Targets, ConfigError> {
        match &self.redirect.targets {
            TargetsConfig::Auto => Ok(Targets::Auto),
            TargetsConfig::Paths(p) if p.is_empty() => Err(ConfigError::Invalid {
                key: "redirect.targets",
                message: "an empty list redirects nothing; use `auto` or name cgroups".into(),
            }),
            TargetsConfig::Paths(p) => match p.iter().find(|p| !p.starts_with('/')) {
                Some(bad) => Err(ConfigError::Invalid {
                    key: "redirect.targets",
                    message: format!("{bad:?} must be an absolute cgroup path"),
                }),
                None => Ok(Targets::Paths(p.clone())),
            },
        }
    }

    /// What the TLS layer needs: every host the configuration names is intercepted too.
    pub fn tls_settings(&self) -> crate::node_ca::TlsSettings {
        let mut hosts = self.registries.intercept.clone();
        hosts.extend(self.hub.mapping.overrides.keys().cloned());
        crate::node_ca::TlsSettings {
            state_dir: self.tls.state_dir.clone(),
            ca_cert: self.tls.ca_cert.clone(),
            ca_key: self.tls.ca_key.clone(),
            ca_supplied: self.tls.ca_cert.is_some(),
            intercept_hosts: hosts,
            extra_upstream_cas: self.tls.extra_upstream_cas.clone(),
        }
    }

    /// Where the cache lives and how big it may grow.
    pub fn cache_settings(&self) -> crate::cache::CacheSettings {
        crate::cache::CacheSettings {
            dir: self.cache.dir.clone(),
            max_bytes: self.cache.max_size.0,
        }
    }

    /// What the hub client needs; `None` when no hub is configured.
    pub fn hub_settings(&self) -> Option<crate::origins::hub::HubSettings> {
        use crate::origins::hub::PasswordSource;
        let h = &self.hub;
        let url = h.url.as_ref()?.parse().expect("validated at load");
        let password = match (&h.password, &h.password_file, &h.dockerconfigjson) {
            (Some(p), _, _) => PasswordSource::Inline(p.clone()),
            (_, Some(f), _) => PasswordSource::File(f.clone()),
            (_, _, Some(f)) => PasswordSource::DockerConfigJson(f.clone()),
            _ => PasswordSource::None,
        };
        Some(crate::origins::hub::HubSettings {
            url,
            username: h.username.clone(),
            password,
            mapping: crate::origins::hub::Mapping {
                default: h.mapping.default.clone(),
                overrides: h.mapping.overrides.clone(),
            },
            timeout: h.timeout,
        })
    }

    /// The deadlines of both listeners' connections.
    pub fn deadlines(&self) -> crate::accept::conn::Deadlines {
        let l = &self.listen;
        crate::accept::conn::Deadlines {
            handshake: l.handshake_timeout,
            header: l.header_timeout,
            idle: l.idle_timeout,
            write: l.write_timeout,
        }
    }

    /// Connection limits of the proxy port.
    pub fn proxy_limits(&self) -> crate::accept::conn::Limits {
        let l = &self.listen;
        crate::accept::conn::Limits {
            total: l.max_connections,
            per_client: l.max_connections_per_client,
            direct: l.max_direct_connections,
        }
        .within(l.max_connections)
    }

    /// Connection limits of the admin listener: every client is a source address.
    pub fn admin_limits(&self) -> crate::accept::conn::Limits {
        let a = &self.admin;
        crate::accept::conn::Limits {
            total: a.max_connections,
            per_client: a.max_connections_per_client,
            direct: a.max_connections_per_client,
        }
        .within(a.max_connections)
    }

    /// What the kernel redirect needs.
    /// The ports only pullproxy may bind (the bind guard): the proxy port, and the admin
    /// listener's, whose squatter could answer Prometheus and the kubelet's probes.
    pub fn guarded_ports(&self) -> Vec<u16> {
        let mut ports = vec![self.listen.port, self.admin.listen.port()];
        ports.retain(|p| *p != 0);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn redirect_settings(&self) -> RedirectSettings {
        let r = &self.redirect;
        RedirectSettings {
            attach_cgroup: r.attach_cgroup.clone(),
            pin_dir: r.pin_dir.clone(),
            ports: r.ports.clone(),
            proxy_port: self.listen.port,
            guarded_ports: self.guarded_ports(),
            exclude: r.exclude.clone(),
            targets: self.targets().expect("validated at load"),
            rescan_interval: r.rescan_interval,
            kernel_log: r.kernel_log,
        }
    }
}

/// The typed configuration from a merged tree, or the key (a serde path such as
/// `listen.addresses[1]`) where it does not fit and why.
fn typed(tree: &serde_json::Value) -> Result<Config, (String, String)> {
    serde_path_to_error::deserialize(tree)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn defaults() -> Config {
        Config::layered(None, no_env()).unwrap()
    }

    fn error(text: &str, vars: &[(&str, &str)]) -> String {
        let err = Config::from_yaml(text, "x.yaml", env(vars)).unwrap_err();
        crate::telemetry::error_chain(&err)
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = defaults();
        assert_eq!(c.redirect.ports, vec![443, 80]);
        assert_eq!(c.redirect_settings().targets, Targets::Auto);
        let again = Config::from_yaml(DEFAULT_YAML, "default", no_env()).unwrap();
        assert_eq!(again.cache.dir, c.cache.dir);
    }

    #[test]
    fn a_file_setting_one_key_of_a_section_keeps_the_other_defaults() {
        let d = defaults();
        let c = Config::from_yaml("cache: {max_size: 1GiB}\n", "x.yaml", no_env()).unwrap();
        assert_eq!(c.cache.max_size.0, 1 << 30);
        assert_eq!(c.cache.dir, d.cache.dir);

        let c = Config::from_yaml("log:\n  level: debug\n", "x.yaml", no_env()).unwrap();
        assert_eq!(
            (c.log.level.as_str(), c.log.format),
            ("debug", d.log.format)
        );

        let text = "admin:\n  listen: 0.0.0.0:9090\nhub:\n  mapping:\n    overrides:\n      quay.io: \"quay.io/{repo}\"\n";
        let c = Config::from_yaml(text, "x.yaml", no_env()).unwrap();
        assert_eq!(c.admin.listen.port(), 9090);
        assert_eq!(c.admin.hub_check_interval, d.admin.hub_check_interval);
        assert_eq!(c.hub.mapping.default, "{repo}");
        assert_eq!(c.hub.mapping.overrides["quay.io"], "quay.io/{repo}");
        assert_eq!(c.hub.url, d.hub.url);

        // Lists replace, they do not append.
        let c = Config::from_yaml("redirect: {ports: [8443]}\n", "x.yaml", no_env()).unwrap();
        assert_eq!(c.redirect.ports, vec![8443]);

        // A file of comments only is the defaults.
        let c = Config::from_yaml("# nothing yet\n", "x.yaml", no_env()).unwrap();
        assert_eq!(c.listen.port, d.listen.port);
    }

    #[test]
    fn the_guard_covers_the_proxy_and_admin_ports_once_each() {
        let c = Config::from_yaml("# defaults\n", "x.yaml", no_env()).unwrap();
        assert_eq!(c.guarded_ports(), vec![15090, 15443]);
        assert_eq!(c.redirect_settings().guarded_ports, vec![15090, 15443]);
        let text = "listen: {port: 9000}\nadmin: {listen: \"0.0.0.0:9000\"}\n";
        let c = Config::from_yaml(text, "x.yaml", no_env()).unwrap();
        assert_eq!(c.guarded_ports(), vec![9000]);
    }

    #[test]
    fn hub_templates_must_give_repository_names() {
        let err = error("hub:\n  mapping:\n    default: \"../{repo}\"\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: hub.mapping"),
            "{err}"
        );
        assert!(
            err.contains("default") && err.contains("../library/nginx"),
            "{err}"
        );
        let err = error(
            "hub:\n  mapping:\n    overrides:\n      quay.io: \"{repo}/\"\n",
            &[],
        );
        assert!(
            err.contains("quay.io") && err.contains("not a repository name"),
            "{err}"
        );
        let c = Config::from_yaml(
            "hub: {mapping: {overrides: {quay.io: \"{host}/{repo}\"}}}\n",
            "x.yaml",
            no_env(),
        )
        .unwrap();
        let mapping = c.hub_settings().unwrap().mapping;
        let repo = "coreos/etcd".parse().unwrap();
        assert_eq!(
            mapping.hub_repo("quay.io", &repo).unwrap().as_str(),
            "quay.io/coreos/etcd"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = error("cache:\n  max_size: 1GiB\n  max_sise: 2GiB\n", &[]);
        assert!(err.starts_with("x.yaml line 3 column 3: cache"), "{err}");
        assert!(err.contains("max_sise"), "{err}");

        let err = error("log: {level: debug}\ncahce:\n  dir: /x\n", &[]);
        assert!(err.starts_with("x.yaml line 2 column 1"), "{err}");
        assert!(err.contains("cahce"), "{err}");

        let text = DEFAULT_YAML.replace("  kernel_log: false", "  kernel_logs: false");
        let line = text
            .lines()
            .position(|l| l.contains("kernel_logs"))
            .unwrap()
            + 1;
        let err = error(&text, &[]);
        assert!(
            err.starts_with(&format!("x.yaml line {line} column 3")),
            "{err}"
        );
        assert!(err.contains("kernel_logs"), "{err}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        let err = error("listen:\n  port: many\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: listen.port: "),
            "{err}"
        );

        let err = error("redirect:\n  targets: [relative/path]\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: redirect.targets: "),
            "{err}"
        );
        let err = error("redirect:\n  targets: everything\n", &[]);
        assert!(err.contains("`auto` or a list"), "{err}");

        let err = error("listen:\n  addresses:\n  - 10.0.0.1\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: listen.addresses: "),
            "{err}"
        );
        assert!(err.contains("not a loopback"), "{err}");

        let err = error("- a\n- b\n", &[]);
        assert!(err.contains("mapping of sections"), "{err}");
    }

    #[test]
    fn environment_overrides_layer_over_the_file() {
        let vars = env(&[
            ("PULLPROXY_LISTEN__PORT", "16000"),
            ("PULLPROXY_REDIRECT__TARGETS", "[/a, /b]"),
            ("PULLPROXY_REDIRECT__KERNEL_LOG", "true"),
            ("PULLPROXY_CACHE__MAX_SIZE", "2GiB"),
            ("PULLPROXY_UPSTREAM__BLOB_IDLE_TIMEOUT", "90s"),
            ("UNRELATED", "x"),
        ]);
        let c = Config::from_yaml("cache: {max_size: 1GiB}\n", "x.yaml", vars).unwrap();
        assert_eq!(c.listen.port, 16000);
        assert_eq!(
            c.redirect_settings().targets,
            Targets::Paths(vec!["/a".into(), "/b".into()])
        );
        assert!(c.redirect.kernel_log);
        assert_eq!(c.cache.max_size.0, 2 << 30);
        assert_eq!(c.upstream.blob_idle_timeout, Duration::from_secs(90));
        assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);

        // An empty variable unsets an optional key.
        let c = Config::layered(None, env(&[("PULLPROXY_HUB__URL", "")])).unwrap();
        assert!(c.hub.url.is_none());

        let err = error("", &[("PULLPROXY_LISTEN__PROT", "1")]);
        assert!(
            err.contains("PULLPROXY_LISTEN__PROT") && err.contains("listen.prot"),
            "{err}"
        );
        let err = error("", &[("PULLPROXY_LISTEN__PORT", "many")]);
        assert!(err.contains("PULLPROXY_LISTEN__PORT"), "{err}");
        // A semantic error in an overridden key names the variable, not the file.
        let err = error(
            "listen: {port: 15443}\n",
            &[("PULLPROXY_REDIRECT__PIN_DIR", "/sys/fs/bpf/a.b")],
        );
        assert!(
            err.starts_with("environment override PULLPROXY_REDIRECT__PIN_DIR: redirect.pin_dir"),
            "{err}"
        );
    }

    #[test]
    fn connection_deadlines_and_limits_are_layered_and_validated() {
        let d = defaults();
        assert_eq!(d.deadlines().idle, Duration::from_secs(60));
        assert!(d.proxy_limits().direct < d.proxy_limits().total);
        assert!(d.admin_limits().total < d.proxy_limits().direct);
        let c = Config::from_yaml(
            "listen: {idle_timeout: 2s, max_direct_connections: 5}\n",
            "x.yaml",
            env(&[
                ("PULLPROXY_LISTEN__WRITE_TIMEOUT", "90s"),
                ("PULLPROXY_ADMIN__MAX_CONNECTIONS_PER_CLIENT", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.deadlines().idle, Duration::from_secs(2));
        assert_eq!(c.deadlines().write, Duration::from_secs(90));
        assert_eq!(c.deadlines().header, d.deadlines().header);
        assert_eq!(c.proxy_limits().direct, 5);
        assert_eq!(c.proxy_limits().total, d.proxy_limits().total);
        assert_eq!(c.admin_limits().per_client, 3);

        let err = error("listen:\n  header_timeout: 0s\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: listen.header_timeout: must be longer"),
            "{err}"
        );
        let err = error("", &[("PULLPROXY_LISTEN__MAX_CONNECTIONS_PER_CLIENT", "0")]);
        assert!(
            err.contains("PULLPROXY_LISTEN__MAX_CONNECTIONS_PER_CLIENT")
                && err.contains("must be at least 1"),
            "{err}"
        );
        // Lowering the listener's limit alone caps the per-client ones.
        let c = Config::from_yaml("listen: {max_connections: 100}\n", "x.yaml", no_env()).unwrap();
        let l = c.proxy_limits();
        assert_eq!((l.total, l.per_client, l.direct), (100, 100, 100));
        let c = Config::from_yaml("admin: {max_connections: 4}\n", "x.yaml", no_env()).unwrap();
        assert_eq!(c.admin_limits().per_client, 4);
    }

    #[test]
    fn variables_that_are_not_overrides_are_ignored() {
        let vars = env(&[
            ("PULLPROXY_BIN", "/usr/bin/pullproxy"),
            ("PULLPROXY_CONFIG", "/etc/pullproxy.yaml"),
            ("PULLPROXY_METRICS_SERVICE_HOST", "10.96.0.7"),
            ("PULLPROXY_METRICS_PORT_9090_TCP", "tcp://10.96.0.7:9090"),
            ("PULLPROXY_NOSUCH__KEY", "1"),
            ("PULLPROXY___X", "1"),
            ("PULLPROXY_LOG__LEVEL", "debug"),
        ]);
        let c = Config::layered(None, vars).unwrap();
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.ignored_env.len(), 6, "{:?}", c.ignored_env);
        assert!(c.ignored_env.contains(&"PULLPROXY_BIN".to_owned()));
    }

    #[test]
    fn secrets_are_taken_verbatim_and_never_shown() {
        for pw in [
            "123456", "null", "pw #x", "true", "[a]", "{x: 1}", "~", " lead",
        ] {
            let c = Config::layered(None, env(&[("PULLPROXY_HUB__PASSWORD", pw)])).unwrap();
            let got = c.hub.password.as_ref().map(Secret::expose);
            assert_eq!(got, Some(pw), "PULLPROXY_HUB__PASSWORD={pw:?}");
        }
        let c = Config::layered(None, env(&[("PULLPROXY_HUB__PASSWORD", "s3cr3t #x")])).unwrap();
        let debug = format!("{c:?} {:?}", c.hub_settings());
        assert!(!debug.contains("s3cr3t"), "{debug}");
        let c = Config::layered(None, env(&[("PULLPROXY_HUB__USERNAME", "0123")])).unwrap();
        assert_eq!(c.hub.username.as_deref(), Some("0123"));

        // In a file, YAML types apply: an unquoted number is refused, without repeating it.
        let err = error("hub:\n  password: 918273645\n", &[]);
        assert!(
            err.starts_with("x.yaml line 2 column 3: hub.password"),
            "{err}"
        );
        assert!(!err.contains("918273645"), "{err}");
        let err = error("hub:\n  password: [918273645]\n", &[]);
        assert!(!err.contains("918273645"), "{err}");
        // Nor does a syntax error on its line.
        let err = error("hub:\n  password: \"918273645\n  url: x\n", &[]);
        assert!(
            err.starts_with("x.yaml: ") && err.contains("line 2"),
            "{err}"
        );
        assert!(!err.contains("918273645"), "{err}");
        // A semantic error about the password does not show it either.
        let err = error(
            "hub:\n  password: \"s3cr3t-value\"\n  password_file: /x\n",
            &[],
        );
        assert!(err.contains("at most one"), "{err}");
        assert!(!err.contains("s3cr3t-value"), "{err}");
    }
}

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
