//! Configuration: YAML (serde-saphyr), the default embedded from `config/pullproxy.yaml`,
//! `--config FILE`, and `PULLPROXY_<SECTION>__<KEY>` environment overrides. Invalid configuration
//! is an error that names the key, before anything binds.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::redirect::{RedirectSettings, Targets};

/// The default configuration, embedded in the binary. Every key is documented there.
pub const DEFAULT_YAML: &str = include_str!("../../config/pullproxy.yaml");

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
    #[error("{origin}")]
    Yaml {
        origin: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: std::net::SocketAddr,
    /// How often the hub is checked for `/readyz` and `pullproxy_hub_up`.
    #[serde(with = "humantime_serde")]
    pub hub_check_interval: Duration,
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
    pub password: Option<String>,
    /// File holding the password; re-read when it changes.
    pub password_file: Option<PathBuf>,
    /// A `kubernetes.io/dockerconfigjson` Secret file; re-read when it changes.
    pub dockerconfigjson: Option<PathBuf>,
    pub mapping: HubMapping,
    /// Deadline for a hub lookup (manifest HEAD/GET, blob HEAD).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
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

/// `auto`, or a list of cgroup paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetsConfig {
    Keyword(String),
    Paths(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter: `info`, `pullproxy=debug`, ...
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Loads `path` (or the embedded default), applies environment overrides, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.into(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (
                DEFAULT_YAML.to_owned(),
                "embedded default config".to_owned(),
            ),
        };
        Self::from_yaml(&text, &origin, std::env::vars())
    }

    /// Parses YAML text, applies overrides from `env` (`PULLPROXY_*`), and validates.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let yaml_err = |source| ConfigError::Yaml {
            origin: origin.to_owned(),
            source: Box::new(source),
        };
        // Parse once as typed config: errors carry line, column and the key.
        let mut config: Config = serde_saphyr::from_str(text).map_err(yaml_err)?;
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        if !overrides.is_empty() {
            let mut tree: serde_json::Value = serde_saphyr::from_str(text).map_err(yaml_err)?;
            for (var, value) in &overrides {
                apply_override(&mut tree, var, value)?;
            }
            config = serde_json::from_value(tree).map_err(|e| ConfigError::Env {
                var: overrides
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: e.to_string(),
            })?;
        }
        config.validate()?;
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
        for (host, template) in std::iter::once((&"default".to_owned(), &self.hub.mapping.default))
            .chain(&self.hub.mapping.overrides)
        {
            if !template.contains("{repo}") {
                return invalid(
                    "hub.mapping",
                    format!("{host}: {template:?} must contain {{repo}}"),
                );
            }
            let rest = template.replace("{repo}", "").replace("{host}", "");
            if rest.contains('{') || rest.contains('}') {
                return invalid(
                    "hub.mapping",
                    format!("{host}: {template:?}: only {{host}} and {{repo}} may be used"),
                );
            }
        }
        if self.tls.ca_cert.is_some() != self.tls.ca_key.is_some() {
            return invalid(
                "tls.ca_cert",
                "set both tls.ca_cert and tls.ca_key, or neither".into(),
            );
        }
        if self.cache.max_size.0 < 1 << 20 {
            return invalid("cache.max_size", "must be at least 1MiB".into());
        }
        for (key, d) in [
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
            TargetsConfig::Keyword(k) if k == "auto" => Ok(Targets::Auto),
            TargetsConfig::Keyword(k) => Err(ConfigError::Invalid {
                key: "redirect.targets",
                message: format!("{k:?}: expected `auto` or a list of cgroup paths"),
            }),
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
    pub fn tls_settings(&self) -> crate::tls::TlsSettings {
        let mut hosts = self.registries.intercept.clone();
        hosts.extend(self.hub.mapping.overrides.keys().cloned());
        crate::tls::TlsSettings {
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
    pub fn hub_settings(&self) -> Option<crate::hub::HubSettings> {
        use crate::hub::PasswordSource;
        let h = &self.hub;
        let url = h.url.as_ref()?.parse().expect("validated at load");
        let password = match (&h.password, &h.password_file, &h.dockerconfigjson) {
            (Some(p), _, _) => PasswordSource::Inline(p.clone()),
            (_, Some(f), _) => PasswordSource::File(f.clone()),
            (_, _, Some(f)) => PasswordSource::DockerConfigJson(f.clone()),
            _ => PasswordSource::None,
        };
        Some(crate::hub::HubSettings {
            url,
            username: h.username.clone(),
            password,
            mapping: crate::hub::Mapping {
                default: h.mapping.default.clone(),
                overrides: h.mapping.overrides.clone(),
            },
            timeout: h.timeout,
        })
    }

    /// What the kernel redirect needs.
    pub fn redirect_settings(&self) -> RedirectSettings {
        let r = &self.redirect;
        RedirectSettings {
            attach_cgroup: r.attach_cgroup.clone(),
            pin_dir: r.pin_dir.clone(),
            ports: r.ports.clone(),
            proxy_port: self.listen.port,
            exclude: r.exclude.clone(),
            targets: self.targets().expect("validated at load"),
            rescan_interval: r.rescan_interval,
            kernel_log: r.kernel_log,
        }
    }
}

/// Sets the value at the path named by `var` (`PULLPROXY_A__B` -> `a.b`) in the YAML tree; the
/// value is parsed as YAML, so numbers, booleans and lists work.
fn apply_override(tree: &mut serde_json::Value, var: &str, value: &str) -> Result<(), ConfigError> {
    let env_err = |message: String| ConfigError::Env {
        var: var.to_owned(),
        message,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(env_err("empty key segment".into()));
    }
    let parsed: serde_json::Value = serde_saphyr::from_str(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    let mut node = tree;
    for (i, seg) in path.iter().enumerate() {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| env_err(format!("{} is not a section", path[..i].join("."))))?;
        if i + 1 == path.len() {
            if !obj.contains_key(seg) {
                return Err(env_err(format!("unknown key {}", path.join("."))));
            }
            obj.insert(seg.clone(), parsed);
            return Ok(());
        }
        node = obj
            .get_mut(seg)
            .ok_or_else(|| env_err(format!("unknown section {}", path[..=i].join("."))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_yaml(DEFAULT_YAML, "default", no_env()).unwrap();
        assert_eq!(c.redirect.ports, vec![443, 80]);
        assert_eq!(c.redirect_settings().targets, Targets::Auto);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = DEFAULT_YAML.replace("  kernel_log: false", "  kernel_logs: false");
        let err = Config::from_yaml(&text, "x.yaml", no_env()).unwrap_err();
        let err = crate::telemetry::error_chain(&err);
        assert!(err.starts_with("x.yaml: "), "{err}");
        assert!(err.contains("kernel_logs") && err.contains("line"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let text = DEFAULT_YAML.replace("targets: auto", "targets: [relative/path]");
        let err = Config::from_yaml(&text, "x.yaml", no_env())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("redirect.targets"), "{err}");
        let env = vec![(
            "PULLPROXY_REDIRECT__PIN_DIR".to_owned(),
            "/sys/fs/bpf/a.b".to_owned(),
        )];
        let err = Config::from_yaml(DEFAULT_YAML, "x.yaml", env)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("redirect.pin_dir"), "{err}");
        let text = DEFAULT_YAML.replace("  - 127.0.0.1", "  - 10.0.0.1");
        let err = Config::from_yaml(&text, "x.yaml", no_env())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("listen.addresses"), "{err}");
    }

    #[test]
    fn environment_overrides_apply_and_are_checked() {
        let env = vec![
            ("PULLPROXY_LISTEN__PORT".to_owned(), "16000".to_owned()),
            (
                "PULLPROXY_REDIRECT__TARGETS".to_owned(),
                "[/a, /b]".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::from_yaml(DEFAULT_YAML, "default", env).unwrap();
        assert_eq!(c.listen.port, 16000);
        assert_eq!(
            c.redirect_settings().targets,
            Targets::Paths(vec!["/a".into(), "/b".into()])
        );

        let env = vec![("PULLPROXY_LISTEN__PROT".to_owned(), "1".to_owned())];
        let err = Config::from_yaml(DEFAULT_YAML, "default", env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PULLPROXY_LISTEN__PROT") && err.contains("listen.prot"),
            "{err}"
        );

        let env = vec![("PULLPROXY_LISTEN__PORT".to_owned(), "many".to_owned())];
        let err = Config::from_yaml(DEFAULT_YAML, "default", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PULLPROXY_LISTEN__PORT"), "{err}");
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
