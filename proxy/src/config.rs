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
    pub redirect: Redirect,
    pub log: Log,
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
