//! The cluster's own registry (the sealos hub): which hub repository holds an image, basic auth
//! that follows credential-file rotation without a restart, and lookups whose outcomes ("has it",
//! "does not have it", "unreachable", "refused our credentials") stay distinct, because only the
//! first means "serve from the hub" and the last two deserve an operator's attention.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt as _;

use crate::{
    oci::{NameError, RepositoryName},
    origins::client::{self, BoxError, HttpClient, ProxyBody},
};

mod push;

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
            Self::Url { .. } | Self::Scheme(_) => "hub.url",
            Self::PasswordSources => "hub.password",
            Self::Template { .. } => "hub.mapping",
            Self::WriteBackRate => "hub.write_back_rate",
            Self::Zero(z) => crate::config::SettingError::key(z),
        }
    }
}

/// The `hub` section, checked whole; `None` when `hub.url` is null (no hub).
impl TryFrom<&crate::config::Hub> for Option<HubSettings> {
    type Error = HubSettingsError;

    fn try_from(h: &crate::config::Hub) -> Result<Self, Self::Error> {
        let url = match &h.url {
            Some(url) => {
                let uri: Uri =
                    url.parse()
                        .map_err(|e: http::uri::InvalidUri| HubSettingsError::Url {
                            url: url.clone(),
                            reason: e.to_string(),
                        })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(HubSettingsError::Scheme(url.clone()));
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

/// Repository on the hub for an image `{host}/{repo}`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub(crate) default: String,
    pub(crate) overrides: BTreeMap<String, String>,
}

/// The registry host a default template is checked with when the configuration loads.
const PROBE_HOST: &str = "docker.io";
/// The repository every template is checked with when the configuration loads. Valid names start
/// and end with `[a-z0-9]`, so a template that gives a valid name for this one gives one for every
/// name short enough.
const PROBE_REPO: &str = "library/nginx";

/// A hub repository the mapping cannot give: the template, the host or the length make it an
/// invalid repository name, which must never reach the hub's URL (a `..` or an empty segment
/// would address something else). The hub is skipped for that image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "hub mapping {template:?} gives no valid repository name for an image from {registry}: {reason}"
)]
pub struct MappingError {
    pub(crate) template: String,
    pub(crate) registry: String,
    pub(crate) reason: NameError,
}

/// A template the configuration must not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("must contain {{repo}}")]
    NoRepo,
    #[error("only {{host}} and {{repo}} may be used")]
    UnknownPlaceholder,
    #[error("gives {example:?} for {host}/{PROBE_REPO}, which is not a repository name: {reason}")]
    InvalidName {
        host: String,
        example: String,
        reason: NameError,
    },
}

impl Mapping {
    #[cfg(test)]
    /// The sealos convention: the registry host is dropped.
    pub(crate) fn sealos() -> Self {
        Self {
            default: "{repo}".into(),
            overrides: BTreeMap::new(),
        }
    }

    /// The hub repository for `repo` from `registry` (`docker.io/library/nginx` ->
    /// `library/nginx` by default). `registry` may be an alias (`registry-1.docker.io`); overrides
    /// match the alias or its canonical name. Fails when the result is not a valid repository
    /// name (a host that is no name component, or a name too long once the template adds to it).
    pub fn hub_repo(
        &self,
        registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        let canonical = canonical_registry(registry);
        let template = self
            .overrides
            .get(registry)
            .or_else(|| self.overrides.get(canonical))
            .unwrap_or(&self.default);
        expand(template, canonical, repo.as_str())
            .parse()
            .map_err(|reason| MappingError {
                template: template.clone(),
                registry: registry.to_owned(),
                reason,
            })
    }
}

/// Checks a template for the configuration: `{repo}` present, no other placeholder, and a valid
/// repository name for an image from `registry` (an override's host; `None` for the default
/// template, which is checked with `docker.io`).
pub(crate) fn check_template(template: &str, registry: Option<&str>) -> Result<(), TemplateError> {
    if !template.contains("{repo}") {
        return Err(TemplateError::NoRepo);
    }
    let rest = template.replace("{repo}", "").replace("{host}", "");
    if rest.contains(['{', '}']) {
        return Err(TemplateError::UnknownPlaceholder);
    }
    let host = canonical_registry(registry.unwrap_or(PROBE_HOST));
    let example = expand(template, host, PROBE_REPO);
    match example.parse::<RepositoryName>() {
        Ok(_) => Ok(()),
        Err(reason) => Err(TemplateError::InvalidName {
            host: host.to_owned(),
            example,
            reason,
        }),
    }
}

/// `template` with each `{host}` and `{repo}` replaced once, left to right: a host or repository
/// that itself contains a placeholder's text is not expanded again.
fn expand(template: &str, host: &str, repo: &str) -> String {
    let mut out = String::with_capacity(template.len() + host.len() + repo.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("{host}") {
            out.push_str(host);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{repo}") {
            out.push_str(repo);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The name images use for a registry host: Docker Hub's API hosts are `docker.io`.
pub fn canonical_registry(host: &str) -> &str {
    match host {
        "registry-1.docker.io" | "index.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

/// Outcome of a hub lookup.
#[derive(Debug)]
pub(crate) enum HubOutcome {
    /// The hub has it; its response (headers, and the body for GET).
    Found(Response<ProxyBody>),
    /// 404: the hub does not have it. Normal; fall back quietly.
    NotFound,
    /// The hub could not be asked (connect error, timeout, 5xx). Fall back, and warn.
    Unreachable(String),
    /// The hub refused our credentials (401/403). Fall back, and warn: the password is wrong.
    Refused(StatusCode),
    /// Our credentials could not be read (missing or malformed file). Fall back, and warn: the
    /// hub was not asked.
    NoCredentials(String),
}

impl HubOutcome {
    /// Metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            HubOutcome::Found(_) => "found",
            HubOutcome::NotFound => "not_found",
            HubOutcome::Unreachable(_) => "unreachable",
            HubOutcome::Refused(_) => "refused",
            HubOutcome::NoCredentials(_) => "no_credentials",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    #[error("reading hub credentials from {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a dockerconfigjson file")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has no entry for the hub {host}")]
    NoEntry { path: PathBuf, host: String },
    #[error("{path}: the entry for {host} has no usable auth")]
    BadEntry { path: PathBuf, host: String },
}

/// The hub's `Authorization` value, re-read when its file changes.
struct Credentials {
    username: Option<String>,
    source: PasswordSource,
    /// Hub `host[:port]`, to find the dockerconfigjson entry.
    authority: String,
    /// (file mtime, length, header) of the last read.
    cached: Mutex<Option<(SystemTime, u64, Option<HeaderValue>)>>,
}

impl Credentials {
    fn header(&self) -> Result<Option<HeaderValue>, CredentialError> {
        let path = match &self.source {
            PasswordSource::None => return Ok(self.username.as_deref().map(|u| basic(u, ""))),
            PasswordSource::Inline(p) => {
                return Ok(Some(basic(
                    self.username.as_deref().unwrap_or(""),
                    p.expose(),
                )));
            }
            PasswordSource::File(p) | PasswordSource::DockerConfigJson(p) => p,
        };
        let read_err = |source| CredentialError::Read {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let stamp = (meta.modified().map_err(read_err)?, meta.len());
        let mut cached = self.cached.lock().expect("credentials lock");
        if let Some((mtime, len, header)) = cached.as_ref()
            && (*mtime, *len) == stamp
        {
            return Ok(header.clone());
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let header = match &self.source {
            PasswordSource::File(_) => Some(basic(
                self.username.as_deref().unwrap_or(""),
                text.trim_end_matches(['\n', '\r']),
            )),
            _ => Some(dockerconfig_auth(path, &text, &self.authority)?),
        };
        *cached = Some((stamp.0, stamp.1, header.clone()));
        Ok(header)
    }
}

fn basic(user: &str, password: &str) -> HeaderValue {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value =
        HeaderValue::from_str(&format!("Basic {token}")).expect("base64 is a valid header");
    value.set_sensitive(true);
    value
}

/// The `Authorization` for `authority` from a dockerconfigjson document.
fn dockerconfig_auth(
    path: &Path,
    text: &str,
    authority: &str,
) -> Result<HeaderValue, CredentialError> {
    #[derive(serde::Deserialize)]
    struct Doc {
        auths: BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let doc: Doc = serde_json::from_str(text).map_err(|source| CredentialError::Json {
        path: path.into(),
        source,
    })?;
    let host = authority.split(':').next().unwrap_or(authority);
    let entry = [
        authority.to_owned(),
        host.to_owned(),
        format!("http://{authority}"),
        format!("https://{authority}"),
    ]
    .iter()
    .find_map(|k| doc.auths.get(k))
    .ok_or_else(|| CredentialError::NoEntry {
        path: path.into(),
        host: authority.into(),
    })?;
    let bad = || CredentialError::BadEntry {
        path: path.into(),
        host: authority.into(),
    };
    if let Some(auth) = &entry.auth {
        // `auth` is base64("user:password"); check it decodes, then send it as is.
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        if !decoded.contains(&b':') {
            return Err(bad());
        }
        let mut v = HeaderValue::from_str(&format!("Basic {}", auth.trim())).map_err(|_| bad())?;
        v.set_sensitive(true);
        return Ok(v);
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(basic(u, p)),
        _ => Err(bad()),
    }
}

/// Talks to the hub.
pub(crate) struct HubClient {
    client: HttpClient,
    base: Uri,
    credentials: Credentials,
    mapping: Mapping,
    timeout: Duration,
}

impl HubClient {
    pub(crate) fn new(client: HttpClient, settings: HubSettings) -> Self {
        let authority = settings
            .url
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        Self {
            client,
            credentials: Credentials {
                username: settings.username,
                source: settings.password,
                authority,
                cached: Mutex::new(None),
            },
            base: settings.url,
            mapping: settings.mapping,
            timeout: settings.timeout,
        }
    }

    /// The hub's base URL, for logs.
    pub(crate) fn url(&self) -> &Uri {
        &self.base
    }

    /// The hub repository for `repo` from `registry` ([`Mapping::hub_repo`]).
    pub(crate) fn hub_repo(
        &self,
        registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        self.mapping.hub_repo(registry, repo)
    }

    /// `GET /v2/`: is the hub up, and does it accept our credentials?
    pub(crate) async fn ping(&self) -> HubOutcome {
        self.send(Method::GET, "/v2/", HeaderMap::new()).await
    }

    /// Asks the hub for `/v2/<hub repo>/<kind>/<reference>` (`kind` is `manifests` or `blobs`),
    /// passing on `headers` (Accept, Range). Only the response head is awaited here (with the
    /// hub deadline); a GET body streams afterwards.
    pub(crate) async fn lookup(
        &self,
        method: Method,
        hub_repo: &RepositoryName,
        kind: &str,
        reference: &str,
        headers: HeaderMap,
    ) -> HubOutcome {
        self.send(
            method,
            &format!("/v2/{hub_repo}/{kind}/{reference}"),
            headers,
        )
        .await
    }

    async fn send(&self, method: Method, path: &str, headers: HeaderMap) -> HubOutcome {
        let resp = match self
            .exchange(method, path, headers, client::empty(), self.timeout)
            .await
        {
            Ok(resp) => resp,
            Err(HubError::Credentials(reason)) => return HubOutcome::NoCredentials(reason),
            Err(e) => return HubOutcome::Unreachable(e.to_string()),
        };
        match resp.status() {
            // 416: the hub has the blob, the range is outside it; the client gets that answer.
            s if s.is_success() || s == StatusCode::RANGE_NOT_SATISFIABLE => {
                HubOutcome::Found(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
            }
            StatusCode::NOT_FOUND => HubOutcome::NotFound,
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => HubOutcome::Refused(s),
            s => HubOutcome::Unreachable(format!("hub answered {s}")),
        }
    }

    /// One request to the hub with pullproxy's credentials; the response head within `timeout`.
    /// `path` is a path and query, or an absolute URL on the hub (an upload location).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: ProxyBody,
        timeout: Duration,
    ) -> Result<Response<hyper::body::Incoming>, HubError> {
        let auth = self
            .credentials
            .header()
            .map_err(|e| HubError::Credentials(crate::telemetry::error_chain(&e)))?;
        if let Some(auth) = auth {
            headers.insert(header::AUTHORIZATION, auth);
        }
        let uri = self.uri(path)?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .expect("valid request");
        *req.headers_mut() = headers;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(HubError::Unreachable(format!(
                "no answer within {timeout:?}"
            ))),
            Ok(Err(e)) => Err(HubError::Unreachable(crate::telemetry::error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// `path` on the hub: a path and query, or an absolute URL that must be on the hub itself
    /// (an upload location the hub handed out; never anywhere else, with our credentials).
    fn uri(&self, path: &str) -> Result<Uri, HubError> {
        let bad = |reason: String| HubError::BadLocation(format!("{path:?}: {reason}"));
        if path.starts_with('/') {
            return Uri::builder()
                .scheme(self.base.scheme_str().unwrap_or("http"))
                .authority(
                    self.base
                        .authority()
                        .map(|a| a.as_str())
                        .unwrap_or_default(),
                )
                .path_and_query(path)
                .build()
                .map_err(|e| bad(e.to_string()));
        }
        let uri: Uri = path
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        if uri.scheme() != self.base.scheme() || uri.authority() != self.base.authority() {
            return Err(bad("not on the hub".into()));
        }
        Ok(uri)
    }
}

/// What can go wrong talking to the hub.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HubError {
    #[error("hub credentials: {0}")]
    Credentials(String),
    #[error("hub unreachable: {0}")]
    Unreachable(String),
    #[error("hub refused pullproxy's credentials ({0})")]
    Refused(StatusCode),
    #[error("hub answered {status} to {what}")]
    Status {
        what: &'static str,
        status: StatusCode,
    },
    #[error("hub gave an unusable location {0}")]
    BadLocation(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap()
    }

    fn mapped(m: &Mapping, registry: &str, repo: &str) -> String {
        m.hub_repo(registry, &name(repo)).unwrap().to_string()
    }

    #[test]
    fn sealos_mapping_drops_the_host() {
        let m = Mapping::sealos();
        assert_eq!(
            mapped(&m, "registry-1.docker.io", "library/nginx"),
            "library/nginx"
        );
        assert_eq!(mapped(&m, "registry.k8s.io", "pause"), "pause");
        assert_eq!(mapped(&m, "quay.io", "coreos/etcd"), "coreos/etcd");
    }

    #[test]
    fn overrides_keep_the_host_or_add_a_prefix() {
        let mut m = Mapping::sealos();
        m.overrides.insert("quay.io".into(), "{host}/{repo}".into());
        m.overrides
            .insert("docker.io".into(), "mirror/{repo}".into());
        assert_eq!(mapped(&m, "quay.io", "coreos/etcd"), "quay.io/coreos/etcd");
        // Docker Hub's API host matches an override written for docker.io.
        assert_eq!(
            mapped(&m, "registry-1.docker.io", "library/nginx"),
            "mirror/library/nginx"
        );
        assert_eq!(mapped(&m, "ghcr.io", "a/b"), "a/b");
    }

    /// Found by the `hub_mapping` fuzz target: the loader accepted any template holding `{repo}`,
    /// and the mapping put whatever it gave into the hub's URL (`/v2/../library/nginx/...`).
    #[test]
    fn templates_that_give_no_repository_name_are_refused_at_load() {
        for template in [
            "../{repo}",
            "./{repo}",
            "/{repo}",
            "{repo}/",
            "a//{repo}",
            "{repo}/..",
            "{repo}-",
            "Mirror/{repo}",
            "mirror {repo}",
            "{host}:5000/{repo}",
        ] {
            let err = check_template(template, Some("quay.io")).unwrap_err();
            assert!(
                matches!(err, TemplateError::InvalidName { .. }),
                "{template:?}: {err}"
            );
        }
        assert_eq!(check_template("{host}", None), Err(TemplateError::NoRepo));
        assert_eq!(
            check_template("{registry}/{repo}", None),
            Err(TemplateError::UnknownPlaceholder)
        );
        for template in ["{repo}", "{host}/{repo}", "mirror/{repo}", "{host}-{repo}"] {
            assert_eq!(check_template(template, None), Ok(()), "{template:?}");
        }
        // An override is checked with its own host: an IP literal cannot be a name component.
        assert!(check_template("{host}/{repo}", Some("[::1]")).is_err());
        assert!(check_template("{repo}", Some("[::1]")).is_ok());
    }

    #[test]
    fn a_name_the_template_cannot_give_is_an_error_not_a_path() {
        let mut m = Mapping::sealos();
        m.default = "{host}/{repo}".into();
        // An insecure registry named by an IPv6 literal: not a name component.
        let err = m.hub_repo("[fd00::1]", &name("app")).unwrap_err();
        assert_eq!(err.registry, "[fd00::1]");
        assert!(
            err.to_string().contains("no valid repository name"),
            "{err}"
        );
        // Within the limit as a request's name, over it once the host is added.
        let long = ["a"; 126].join("/");
        assert!(m.hub_repo("quay.io", &name(&long)).is_err());
        assert_eq!(mapped(&m, "10.0.0.7", "app"), "10.0.0.7/app");
    }

    #[test]
    fn placeholders_are_expanded_once() {
        // A host that spells a placeholder is not expanded again (hosts come from the Host
        // header of configured insecure registries too).
        assert_eq!(expand("{host}/{repo}", "{repo}", "a"), "{repo}/a");
        assert_eq!(expand("{repo}", "h", "{host}"), "{host}");
        assert_eq!(expand("{x}{{repo}}", "h", "r"), "{x}{r}");
    }

    fn temp(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pullproxy-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn decode(v: &HeaderValue) -> String {
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }

    fn creds(source: PasswordSource) -> Credentials {
        Credentials {
            username: Some("admin".into()),
            source,
            authority: "sealos.hub:5000".into(),
            cached: Mutex::new(None),
        }
    }

    #[test]
    fn password_file_is_reread_when_it_changes() {
        let p = temp("password", "first\n");
        let c = creds(PasswordSource::File(p.clone()));
        assert_eq!(decode(&c.header().unwrap().unwrap()), "admin:first");
        // Same length, so the change must be seen through the mtime.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, "secnd\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(decode(&c.header().unwrap().unwrap()), "admin:secnd");
    }

    #[test]
    fn dockerconfigjson_entry_for_the_hub_is_used() {
        let auth = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
        let p = temp(
            "config.json",
            &format!(
                r#"{{"auths":{{"other.io":{{"auth":"eDp5"}},"sealos.hub:5000":{{"auth":"{auth}"}}}}}}"#
            ),
        );
        let c = creds(PasswordSource::DockerConfigJson(p));
        let header = c.header().unwrap().unwrap();
        assert!(header.is_sensitive());
        assert_eq!(decode(&header), "admin:s3cret");

        let p = temp(
            "plain.json",
            r#"{"auths":{"http://sealos.hub:5000":{"username":"u","password":"p"}}}"#,
        );
        assert_eq!(
            decode(
                &creds(PasswordSource::DockerConfigJson(p))
                    .header()
                    .unwrap()
                    .unwrap()
            ),
            "u:p"
        );
    }

    #[test]
    fn credential_errors_name_the_file_not_the_secret() {
        let p = temp(
            "none.json",
            r#"{"auths":{"other.io":{"auth":"c2VjcmV0OnBhc3M="}}}"#,
        );
        let err = creds(PasswordSource::DockerConfigJson(p.clone()))
            .header()
            .unwrap_err();
        let text = crate::telemetry::error_chain(&err);
        assert!(
            text.contains("sealos.hub:5000") && text.contains("none.json"),
            "{text}"
        );
        assert!(
            !text.contains("c2VjcmV0") && !text.contains("secret"),
            "{text}"
        );

        let p = temp(
            "broken.json",
            r#"{"auths":{"sealos.hub:5000":{"auth":"bm9jb2xvbg=="}}}"#,
        );
        let err = creds(PasswordSource::DockerConfigJson(p))
            .header()
            .unwrap_err();
        assert!(matches!(err, CredentialError::BadEntry { .. }));
    }
}
