//! The cluster's own registry (the sealos hub): which hub repository holds an image, basic auth
//! that follows credential-file rotation without a restart, and lookups whose outcomes ("has it",
//! "does not have it", "unreachable", "refused our credentials") stay distinct, because only the
//! first means "serve from the hub" and the last two deserve an operator's attention (and
//! `pullproxy doctor`'s, through `diagnose.rs`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt as _;

pub(crate) use self::diagnose::diagnose;
pub use self::{
    mapping::{Mapping, MappingError, TemplateError, canonical_registry},
    settings::{HubSettings, HubSettingsError, PasswordSource},
};
use crate::{
    oci::RepositoryName,
    origins::client::{self, BoxError, HttpClient, ProxyBody},
};

mod diagnose;
mod mapping;
mod push;
mod settings;

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
