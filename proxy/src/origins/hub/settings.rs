//! The `hub` section as the hub client and write-back need it: [`HubSettings`] and its checks.

use std::{path::PathBuf, time::Duration};

use http::Uri;

use super::mapping::{Mapping, TemplateError, check_template};

/// Where the hub password comes from.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    None,
    Inline(crate::secret::Secret),
    /// A file holding the password (trailing newline ignored).
    File(PathBuf),
    /// A `kubernetes.io/dockerconfigjson` Secret file; the entry for the hub's host is used.
    DockerConfigJson(PathBuf),
}

/// What the hub client and write-back need from the configuration (`hub`, with a URL).
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// `http://host[:port]` or `https://host[:port]`.
    pub(crate) url: Uri,
    /// When true, an unreachable hub does not make pullproxy unready.
    pub(crate) optional: bool,
    pub(crate) username: Option<String>,
    pub password: PasswordSource,
    pub mapping: Mapping,
    pub(crate) timeout: Duration,
    /// What write-back pushes into the hub.
    pub(crate) write_back: crate::config::WriteBackPolicy,
    /// Bytes per second write-back may upload, all uploads together.
    pub(crate) write_back_rate: u64,
}

/// Slowest `hub.write_back_rate`, in bytes per second.
const MIN_WRITE_BACK_RATE: u64 = 1 << 10;

/// A `hub` value the hub client cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubSettingsError {
    #[error("{url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{0:?} must be http://host[:port] or https://host[:port]")]
    Scheme(String),
    #[error(
        "{0:?} must not carry credentials (they would show in logs): set hub.username and \
         hub.password, hub.password_file or hub.dockerconfigjson"
    )]
    Credentials(String),
    #[error("set at most one of hub.password, hub.password_file and hub.dockerconfigjson")]
    PasswordSources,
    #[error("{}: {template:?} {reason}", .host.as_deref().unwrap_or("default"))]
    Template {
        /// The override's registry host; `None` for the default template.
        host: Option<String>,
        template: String,
        reason: TemplateError,
    },
    #[error("must be at least 1KiB (per second)")]
    WriteBackRate,
    #[error(transparent)]
    Zero(#[from] crate::config::Zero),
}

impl crate::config::SettingError for HubSettingsError {
    fn key(&self) -> &'static str {
        match self {
            Self::Url { .. } | Self::Scheme(_) | Self::Credentials(_) => "hub.url",
            Self::PasswordSources => "hub.password",
            Self::Template { .. } => "hub.mapping",
            Self::WriteBackRate => "hub.write_back_rate",
            Self::Zero(z) => crate::config::SettingError::key(z),
        }
    }
}

/// `url` with any `user:password@` in its authority replaced by `…@`, for errors.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .map_or(("", url), |(scheme, rest)| (scheme, rest));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => format!("…@{}", &rest[at + 1..]),
        Some(at) => format!("{scheme}://…@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The `hub` section, checked whole; `None` when `hub.url` is null (no hub).
impl TryFrom<&crate::config::Hub> for Option<HubSettings> {
    type Error = HubSettingsError;

    fn try_from(h: &crate::config::Hub) -> Result<Self, Self::Error> {
        let url = match &h.url {
            Some(url) => {
                let shown = without_userinfo(url);
                let uri: Uri =
                    url.parse()
                        .map_err(|e: http::uri::InvalidUri| HubSettingsError::Url {
                            url: shown.clone(),
                            reason: e.to_string(),
                        })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(HubSettingsError::Scheme(shown));
                }
                if shown != *url {
                    return Err(HubSettingsError::Credentials(shown));
                }
                Some(uri)
            }
            None => None,
        };
        let password = match (&h.password, &h.password_file, &h.dockerconfigjson) {
            (None, None, None) => PasswordSource::None,
            (Some(p), None, None) => PasswordSource::Inline(p.clone()),
            (None, Some(f), None) => PasswordSource::File(f.clone()),
            (None, None, Some(f)) => PasswordSource::DockerConfigJson(f.clone()),
            _ => return Err(HubSettingsError::PasswordSources),
        };
        let m = &h.mapping;
        let templates = std::iter::once((None, &m.default))
            .chain(m.overrides.iter().map(|(h, t)| (Some(h.as_str()), t)));
        for (host, template) in templates {
            check_template(template, host).map_err(|reason| HubSettingsError::Template {
                host: host.map(str::to_owned),
                template: template.clone(),
                reason,
            })?;
        }
        if h.write_back_rate.0 < MIN_WRITE_BACK_RATE {
            return Err(HubSettingsError::WriteBackRate);
        }
        let timeout = crate::config::nonzero_duration("hub.timeout", h.timeout)?;
        Ok(url.map(|url| HubSettings {
            url,
            optional: h.optional,
            username: h.username.clone(),
            password,
            mapping: Mapping {
                default: m.default.clone(),
                overrides: m.overrides.clone(),
            },
            timeout,
            write_back: h.write_back,
            write_back_rate: h.write_back_rate.0,
        }))
    }
}
