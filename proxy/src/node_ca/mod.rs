//! The node CA and what it signs: which server names pullproxy terminates (the intercepted
//! hosts), the CA itself (generated or supplied by the operator), and the leaf certificates it
//! mints for terminated connections.

pub(crate) mod ca;
pub(crate) mod hosts;
pub(crate) mod mint;

use std::{path::PathBuf, sync::Arc};

use rustls::crypto::CryptoProvider;

pub(crate) use self::{
    ca::NodeCa,
    hosts::{HostPatternError, InterceptSet},
    mint::{LeafMinter, server_config},
};

/// File name of the generated node CA certificate inside the state directory.
pub const CA_CERT_FILE: &str = "node-ca.crt";
/// File name of the generated node CA key inside the state directory.
pub(crate) const CA_KEY_FILE: &str = "node-ca.key";

/// What the TLS layer needs from the configuration.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Directory for pullproxy's own TLS state; the generated node CA lives here.
    pub state_dir: PathBuf,
    /// The node CA certificate (PEM). `None`: [`CA_CERT_FILE`] in `state_dir`.
    pub ca_cert: Option<PathBuf>,
    /// The node CA private key (PEM, PKCS#8). `None`: [`CA_KEY_FILE`] in `state_dir`.
    pub ca_key: Option<PathBuf>,
    /// The CA was supplied by the operator (files, a mounted Secret): pullproxy never rewrites
    /// it, and minting for a host its name constraints do not cover is an error. Otherwise
    /// pullproxy generates the CA and regenerates it when the intercepted hosts outgrow it.
    pub(crate) ca_supplied: bool,
    /// Hosts to intercept in addition to [`DEFAULT_REGISTRY_HOSTS`]: exact names, `*.suffix`, or
    /// `"*"` for every server name.
    pub(crate) intercept_hosts: Vec<String>,
    /// PEM files of CAs trusted for upstream connections in addition to the system roots.
    pub(crate) extra_upstream_cas: Vec<PathBuf>,
}

/// A `tls` value the node CA cannot be set up with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSettingsError {
    #[error("set both tls.ca_cert and tls.ca_key, or neither")]
    HalfCa,
}

impl crate::config::SettingError for TlsSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::HalfCa => "tls.ca_cert",
        }
    }
}

/// The `tls` section, intercepting the default hosts only: the configuration adds the hosts its
/// other sections name.
impl TryFrom<&crate::config::Tls> for TlsSettings {
    type Error = TlsSettingsError;

    fn try_from(t: &crate::config::Tls) -> Result<Self, Self::Error> {
        if t.ca_cert.is_some() != t.ca_key.is_some() {
            return Err(TlsSettingsError::HalfCa);
        }
        Ok(Self {
            state_dir: t.state_dir.clone(),
            ca_cert: t.ca_cert.clone(),
            ca_key: t.ca_key.clone(),
            ca_supplied: t.ca_cert.is_some(),
            intercept_hosts: Vec::new(),
            extra_upstream_cas: t.extra_upstream_cas.clone(),
        })
    }
}

impl TlsSettings {
    #[cfg(test)]
    /// Settings with a generated CA under `state_dir`, the default hosts and no extra CAs.
    pub(crate) fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            ca_cert: None,
            ca_key: None,
            ca_supplied: false,
            intercept_hosts: Vec::new(),
            extra_upstream_cas: Vec::new(),
        }
    }

    /// Where the node CA certificate is read from (and written to, when generated).
    pub(crate) fn ca_cert_path(&self) -> PathBuf {
        self.ca_cert
            .clone()
            .unwrap_or_else(|| self.state_dir.join(CA_CERT_FILE))
    }

    /// Where the node CA key is read from (and written to, when generated).
    pub(crate) fn ca_key_path(&self) -> PathBuf {
        self.ca_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join(CA_KEY_FILE))
    }

    /// The intercepted hosts: the defaults plus `intercept_hosts`.
    pub(crate) fn intercept_set(&self) -> Result<InterceptSet, HostPatternError> {
        InterceptSet::with_defaults(&self.intercept_hosts)
    }
}

/// The one crypto provider of this crate. Named explicitly everywhere so that nothing depends on
/// a process-wide default being installed.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// An I/O error with what was being done to which file: the node CA's, the trust store's, the
/// upstream CAs' files, /proc.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct FileError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl FileError {
    /// The error of `action` on `path`, for `map_err`.
    pub(crate) fn at(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self {
            action,
            path,
            source,
        }
    }
}
