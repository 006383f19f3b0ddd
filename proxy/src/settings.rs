//! The loaded configuration: every section of the file ([`crate::config`]) as the subsystem
//! that owns it converted it, once, before anything binds. It stands above the subsystems, so
//! the file format imports none of them.

use std::path::{Path, PathBuf};

use crate::{
    accept::listen::ListenSettings,
    admin::AdminSettings,
    cache::CacheSettings,
    config::{ConfigError, Layered, Registries},
    node_ca::TlsSettings,
    origins::{hub::HubSettings, upstream::UpstreamSettings},
    redirect::RedirectSettings,
    telemetry::Log,
    warm::{Proxy, settings::WarmSettings},
};

/// A loaded configuration: every section as the subsystem that owns it converted it, once.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenSettings,
    pub admin: AdminSettings,
    pub redirect: RedirectSettings,
    pub registries: Registries,
    /// `None` when `hub.url` is null.
    pub hub: Option<HubSettings>,
    pub cache: CacheSettings,
    /// Its `intercept_hosts` are `registries.intercept` and the hosts of `hub.mapping.overrides`.
    pub tls: TlsSettings,
    pub upstream: UpstreamSettings,
    pub log: Log,
    pub warm: WarmSettings,
    /// `PULLPROXY_*` variables that are not overrides (logged as a warning at start).
    pub ignored_env: Vec<String>,
    /// The file this configuration was read from (the daemon watches it for `warm.images`).
    pub source: Option<PathBuf>,
}

impl Config {
    /// Loads the embedded defaults, `path` over them, then environment overrides, and converts.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = Self::convert(&Layered::load(path)?)?;
        config.source = path.map(Path::to_path_buf);
        Ok(config)
    }

    /// `text` (named `origin` in messages) over the embedded defaults, then the `PULLPROXY_*`
    /// overrides in `env`, converted.
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::convert(&Layered::new(Some((text, origin)), env)?)
    }

    /// The embedded defaults with the overrides in `env`, converted.
    #[cfg(test)]
    pub(crate) fn defaults_with(
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::convert(&Layered::new(None, env)?)
    }

    /// Each section converted by its owner, the first refusal told at the key's layer.
    fn convert(layered: &Layered) -> Result<Self, ConfigError> {
        let file = &layered.file;
        let listen = layered.owned(ListenSettings::try_from(&file.listen))?;
        let admin = layered.owned(AdminSettings::try_from(&file.admin))?;
        let redirect = layered.owned(RedirectSettings::from_section(
            &file.redirect,
            listen.port,
            admin.listen.port(),
        ))?;
        let hub = layered.owned(Option::<HubSettings>::try_from(&file.hub))?;
        let mut tls = layered.owned(TlsSettings::try_from(&file.tls))?;
        tls.intercept_hosts = (file.registries.intercept.iter())
            .chain(file.hub.mapping.overrides.keys())
            .cloned()
            .collect();
        Ok(Self {
            warm: layered.owned(WarmSettings::try_from(&file.warm))?,
            cache: layered.owned(CacheSettings::try_from(&file.cache))?,
            upstream: layered.owned(UpstreamSettings::try_from(&file.upstream))?,
            listen,
            admin,
            redirect,
            hub,
            tls,
            registries: file.registries.clone(),
            log: file.log.clone(),
            ignored_env: layered.ignored_env().to_vec(),
            source: None,
        })
    }
}

impl<'a> From<&'a Config> for Proxy<'a> {
    fn from(config: &'a Config) -> Self {
        Proxy {
            tls: &config.tls,
            listen: &config.listen,
            connect_timeout: config.upstream.connect_timeout,
            insecure: &config.registries.insecure,
        }
    }
}
