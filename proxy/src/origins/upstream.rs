//! The real registry behind an intercepted connection. Requests carry the client's own
//! credentials (its `Authorization`), 401 challenges go back unchanged so the runtime's token flow
//! keeps working, and blob redirects (CDN, S3) are followed here, so the bytes pass through (and
//! into the cache); `Authorization` is dropped on any hop to another scheme, host or port, and a
//! hop may only go where [`AddressPolicy::Remote`](crate::origins::client::AddressPolicy) allows.
//! Manifest exchanges have a deadline and share a memory budget; blob bodies have an idle timeout
//! instead.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use crate::{
    cache::MAX_MANIFEST_BYTES,
    oci::{BearerChallenge, TokenAnswer},
    origins::client::{self, DialError, HttpClient, IdleTimeout, ProxyBody, UpstreamClients},
};

/// Client request headers passed to the upstream on registry reads.
const FORWARDED: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::RANGE,
    header::USER_AGENT,
];
/// Redirect hops followed for one blob or manifest.
const MAX_REDIRECTS: usize = 5;
/// Longest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;

/// Which registry an intercepted connection talks to, and where its runtime dialled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) scheme: Scheme,
    /// `host` or `host:port` as the client addressed it.
    pub(crate) authority: Authority,
    /// The connection's original destination (from the kernel record): requests for this origin
    /// go there. `None` for a client that connected to pullproxy directly: DNS decides.
    pub(crate) addr: Option<SocketAddr>,
}

impl Origin {
    /// The registry host (no port), lowercase.
    pub(crate) fn host(&self) -> &str {
        self.authority.host()
    }

    fn uri(&self, path: &PathAndQuery) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path.clone())
            .build()
            .expect("scheme, authority and path make a URI")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connect error, timeout, or a broken exchange: stale-if-error applies.
    #[error("upstream {host} unreachable: {reason}")]
    Unreachable { host: String, reason: String },
    /// The name does not resolve, or only to addresses pullproxy never dials: there is no such
    /// registry to ask, which is not the same as one that cannot be asked.
    #[error("upstream {host}: {reason}")]
    NoSuchHost { host: String, reason: String },
    #[error("upstream {host}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects { host: String },
    #[error("upstream {host} redirected to an unusable location {location:?}")]
    BadRedirect { host: String, location: String },
    #[error("upstream {host}: manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge { host: String },
}

impl UpstreamError {
    /// Whether the upstream could not be asked at all (down, silent, broken): then content the
    /// client is entitled to may be served from the cache (stale-if-error).
    pub(crate) fn cannot_ask(&self) -> bool {
        matches!(self, UpstreamError::Unreachable { .. })
    }

    /// What a failed client request means, from its error chain.
    fn from_client(host: &str, e: &hyper_util::client::legacy::Error) -> Self {
        let host = host.to_owned();
        match DialError::find(e) {
            Some(d) => UpstreamError::NoSuchHost {
                host,
                reason: d.to_string(),
            },
            None => UpstreamError::Unreachable {
                host,
                reason: crate::telemetry::error_chain(e),
            },
        }
    }

    /// Metric label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::NoSuchHost { .. } => "no_such_host",
            UpstreamError::TooManyRedirects { .. } => "too_many_redirects",
            UpstreamError::BadRedirect { .. } => "bad_redirect",
            UpstreamError::ManifestTooLarge { .. } => "manifest_too_large",
        }
    }
}

/// A manifest-sized answer, read completely within the deadline.
#[derive(Debug)]
pub(crate) struct Small {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Bytes of manifest-sized answers being read at once, all requests together: a registry
/// answering many requests with 4 MiB bodies must not make pullproxy hold them all.
const SMALL_BODY_BUDGET: usize = 64 << 20;
/// The unit the budget is taken in.
const BUDGET_UNIT: usize = 64 << 10;

/// The deadlines of upstream exchanges, from the configuration (`upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Connecting to a registry, the hub or a token service.
    pub connect_timeout: Duration,
    /// A whole manifest (and tags, `/v2/`) exchange.
    pub manifest_timeout: Duration,
    /// Longest silence inside a blob download (no total deadline: blobs can be huge).
    pub blob_idle_timeout: Duration,
}

impl TryFrom<&crate::config::Upstream> for UpstreamSettings {
    type Error = crate::config::Zero;

    fn try_from(u: &crate::config::Upstream) -> Result<Self, Self::Error> {
        use crate::config::nonzero_duration;
        Ok(Self {
            connect_timeout: nonzero_duration("upstream.connect_timeout", u.connect_timeout)?,
            manifest_timeout: nonzero_duration("upstream.manifest_timeout", u.manifest_timeout)?,
            blob_idle_timeout: nonzero_duration("upstream.blob_idle_timeout", u.blob_idle_timeout)?,
        })
    }
}

/// Talks to upstream registries.
#[derive(Clone)]
pub(crate) struct Upstream {
    clients: UpstreamClients,
    manifest_timeout: Duration,
    blob_idle_timeout: Duration,
    small_budget: Arc<tokio::sync::Semaphore>,
}

impl Upstream {
    pub(crate) fn new(
        clients: UpstreamClients,
        manifest_timeout: Duration,
        blob_idle_timeout: Duration,
    ) -> Self {
        Self::with_budget(
            clients,
            manifest_timeout,
            blob_idle_timeout,
            SMALL_BODY_BUDGET,
        )
    }

    fn with_budget(
        clients: UpstreamClients,
        manifest_timeout: Duration,
        blob_idle_timeout: Duration,
        budget_bytes: usize,
    ) -> Self {
        Self {
            clients,
            manifest_timeout,
            blob_idle_timeout,
            small_budget: Arc::new(tokio::sync::Semaphore::new(budget_bytes / BUDGET_UNIT)),
        }
    }

    /// A registry read whose answer is small (manifests, tag lists, `/v2/`): the whole exchange,
    /// redirects included, within the manifest deadline.
    pub(crate) async fn small(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        client_headers: &HeaderMap,
    ) -> Result<Small, UpstreamError> {
        let unreachable = |reason: String| UpstreamError::Unreachable {
            host: origin.host().to_owned(),
            reason,
        };
        let exchange = async {
            let resp = self.follow(origin, method, path, client_headers).await?;
            let (parts, mut body) = resp.into_parts();
            let mut buf = bytes::BytesMut::new();
            let mut permits = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| unreachable(crate::telemetry::error_chain(&e)))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if buf.len() + data.len() > MAX_MANIFEST_BYTES {
                    return Err(UpstreamError::ManifestTooLarge {
                        host: origin.host().to_owned(),
                    });
                }
                buf.extend_from_slice(&data);
                // Hold budget for what is buffered (waiting, within the deadline, if the whole
                // process is reading that much at once).
                while permits.len() * BUDGET_UNIT < buf.len() {
                    permits.push(
                        self.small_budget
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("the budget semaphore is never closed"),
                    );
                }
            }
            Ok(Small {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
            })
        };
        tokio::time::timeout(self.manifest_timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.manifest_timeout)))?
    }

    /// A blob read: the response head within the manifest deadline (redirects followed), the
    /// body streamed with the idle timeout.
    pub(crate) async fn blob(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        client_headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let head = tokio::time::timeout(
            self.manifest_timeout,
            self.follow(origin, method, path, client_headers),
        )
        .await
        .map_err(|_| UpstreamError::Unreachable {
            host: origin.host().to_owned(),
            reason: format!("no answer within {:?}", self.manifest_timeout),
        })??;
        let idle = self.blob_idle_timeout;
        Ok(head.map(|body| IdleTimeout::new(body, idle).boxed_unsync()))
    }

    /// Whether `path` (a manifest or blob of `origin`) can be read without credentials: a HEAD
    /// without `Authorization`, and when the registry answers with a Bearer challenge, a HEAD with
    /// an anonymous token from the challenge's realm (how Docker Hub serves public images).
    pub(crate) async fn readable_anonymously(
        &self,
        origin: &Origin,
        path: &PathAndQuery,
    ) -> Result<bool, UpstreamError> {
        let first = self
            .small(origin, Method::HEAD, path, &HeaderMap::new())
            .await?;
        if first.status.is_success() {
            return Ok(true);
        }
        let challenge = first
            .headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(BearerChallenge::parse);
        let (StatusCode::UNAUTHORIZED, Some(challenge)) = (first.status, challenge) else {
            return Ok(false);
        };
        let Some(token) = self.anonymous_token(origin, &challenge).await? else {
            return Ok(false);
        };
        let mut headers = HeaderMap::new();
        let Ok(mut auth) = HeaderValue::from_str(&format!("Bearer {token}")) else {
            return Ok(false);
        };
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        let second = self.small(origin, Method::HEAD, path, &headers).await?;
        Ok(second.status.is_success())
    }

    /// A token from `challenge`'s realm, asked for without credentials, dialled under the
    /// remote-address policy.
    async fn anonymous_token(
        &self,
        origin: &Origin,
        challenge: &BearerChallenge,
    ) -> Result<Option<String>, UpstreamError> {
        fetch_token(
            self.clients.dns(),
            challenge,
            origin.scheme == Scheme::HTTP,
            None,
            self.manifest_timeout,
        )
        .await
    }

    /// Sends a GET/HEAD with the forwarded client headers, following redirects.
    async fn follow(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        client_headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut headers = HeaderMap::new();
        for name in FORWARDED {
            for v in client_headers.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let mut uri = origin.uri(path);
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(client::empty())
                .expect("valid request");
            *req.headers_mut() = headers.clone();
            let host = uri.host().unwrap_or_default().to_owned();
            let resp = self
                .client_for(origin, &uri)
                .request(req)
                .await
                .map_err(|e| UpstreamError::from_client(&host, &e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let next = redirect_target(&uri, resp.headers()).ok_or_else(|| {
                UpstreamError::BadRedirect {
                    host: origin.host().to_owned(),
                    location: resp
                        .headers()
                        .get(header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                }
            })?;
            if !keeps_credentials(&uri, &next) {
                headers.remove(header::AUTHORIZATION);
            }
            uri = next;
        }
        Err(UpstreamError::TooManyRedirects {
            host: origin.host().to_owned(),
        })
    }

    /// The origin's own requests go where its connection was going; any other host (a redirect
    /// target) is resolved here, under the remote-address policy.
    fn client_for(&self, origin: &Origin, uri: &Uri) -> HttpClient {
        if uri.scheme() == Some(&origin.scheme) && uri.authority() == Some(&origin.authority) {
            self.clients.for_origin(origin.host(), origin.addr)
        } else {
            self.clients.dns().clone()
        }
    }

    /// Forwards any other request (writes, uploads, unknown paths) as it is, both bodies
    /// streaming; only hop-by-hop headers are dropped.
    pub(crate) async fn forward(
        &self,
        origin: &Origin,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = origin.uri(&path);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        let req = Request::from_parts(parts, body);
        let resp = self
            .clients
            .for_origin(origin.host(), origin.addr)
            .request(req)
            .await
            .map_err(|e| UpstreamError::from_client(origin.host(), &e))?;
        let idle = self.blob_idle_timeout;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            IdleTimeout::new(body, idle).boxed_unsync(),
        ))
    }
}

/// A token from `challenge`'s realm (the registry token flow), with `auth` if given. The realm must
/// be HTTPS, or plain HTTP when `plain_http` (a plain-HTTP registry). `None`: no usable token.
pub(crate) async fn fetch_token(
    client: &HttpClient,
    challenge: &BearerChallenge,
    plain_http: bool,
    auth: Option<HeaderValue>,
    timeout: Duration,
) -> Result<Option<String>, UpstreamError> {
    let Ok(url) = challenge.token_url().parse::<Uri>() else {
        return Ok(None);
    };
    let scheme_ok = match url.scheme_str() {
        Some("https") => true,
        Some("http") => plain_http,
        _ => false,
    };
    let Some(host) = url.host().map(str::to_owned).filter(|_| scheme_ok) else {
        return Ok(None);
    };
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(client::empty())
        .expect("valid request");
    if let Some(auth) = auth {
        req.headers_mut().insert(header::AUTHORIZATION, auth);
    }
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| UpstreamError::from_client(&host, &e))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_ANSWER)
            .collect()
            .await
            .map_err(|e| UpstreamError::Unreachable {
                host: host.clone(),
                reason: crate::telemetry::error_chain(e.as_ref()),
            })?
            .to_bytes();
        Ok(serde_json::from_slice::<TokenAnswer>(&body)
            .ok()
            .and_then(TokenAnswer::into_token))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UpstreamError::Unreachable {
            host: host.clone(),
            reason: format!("no token within {timeout:?}"),
        })?
}

/// Whether a redirect hop from `from` to `to` may carry the client's `Authorization`: only to the
/// same scheme, host and port. Never to a CDN or an object store, and never down to plain text.
fn keeps_credentials(from: &Uri, to: &Uri) -> bool {
    from.scheme() == to.scheme() && from.authority() == to.authority()
}

/// The absolute URI a redirect points to, resolved against `current`.
fn redirect_target(current: &Uri, headers: &HeaderMap) -> Option<Uri> {
    let location = headers.get(header::LOCATION)?.to_str().ok()?;
    let target: Uri = location.parse().ok()?;
    if target.scheme().is_some() {
        return matches!(target.scheme_str(), Some("http" | "https")).then_some(target);
    }
    // A path-absolute reference: same scheme and authority.
    if location.starts_with('/') && !location.starts_with("//") {
        return Uri::builder()
            .scheme(current.scheme()?.clone())
            .authority(current.authority()?.clone())
            .path_and_query(target.path_and_query()?.clone())
            .build()
            .ok();
    }
    None
}

/// Connection-level headers that must not cross a proxy (RFC 9110 7.6.1).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(l: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, l.parse().unwrap());
        h
    }

    #[test]
    fn redirects_resolve_absolute_and_path_references() {
        let cur: Uri = "https://registry-1.docker.io/v2/library/x/blobs/sha256:ab"
            .parse()
            .unwrap();
        let cdn = redirect_target(&cur, &loc("https://cdn.example/ab?sig=1")).unwrap();
        assert_eq!(cdn.host(), Some("cdn.example"));
        let same = redirect_target(&cur, &loc("/v2/other?x=1")).unwrap();
        assert_eq!(
            same.to_string(),
            "https://registry-1.docker.io/v2/other?x=1"
        );
        assert!(redirect_target(&cur, &loc("ftp://x/y")).is_none());
        assert!(redirect_target(&cur, &loc("relative/path")).is_none());
        assert!(redirect_target(&cur, &loc("//evil.example/x")).is_none());
    }

    #[test]
    fn credentials_stay_with_the_same_scheme_host_and_port() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        let from = u("https://ghcr.io/v2/a/blobs/sha256:ab");
        assert!(keeps_credentials(&from, &u("https://ghcr.io/v2/other")));
        assert!(!keeps_credentials(&from, &u("http://ghcr.io/v2/a")));
        assert!(!keeps_credentials(&from, &u("https://ghcr.io:8443/v2/a")));
        assert!(!keeps_credentials(
            &from,
            &u("https://pkg-containers.githubusercontent.com/x")
        ));
    }

    /// A plain-HTTP server on loopback answering every request with `answer`; counts requests.
    async fn serve(answer: String) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        (addr, hits)
    }

    fn upstream(budget_bytes: usize) -> Upstream {
        let connector = client::Connector::new(
            client::trusting_nothing(),
            client::AddressPolicy::Remote { admin_port: 15090 },
            Duration::from_secs(2),
        );
        Upstream::with_budget(
            UpstreamClients::new(connector),
            Duration::from_millis(500),
            Duration::from_secs(5),
            budget_bytes,
        )
    }

    fn origin_at(addr: std::net::SocketAddr) -> Origin {
        Origin {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("registry.test"),
            addr: Some(addr),
        }
    }

    #[tokio::test]
    async fn a_redirect_into_the_node_is_not_followed() {
        // The "metadata service" / admin port the registry points at: it must see nothing.
        let (inside, inside_hits) =
            serve("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".into()).await;
        for location in [
            format!("http://{inside}/metrics"),
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "http://localhost:15090/metrics".to_owned(),
        ] {
            let (registry, _) = serve(format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
            ))
            .await;
            let err = upstream(64 << 20)
                .small(
                    &origin_at(registry),
                    Method::GET,
                    &PathAndQuery::from_static("/v2/x/manifests/latest"),
                    &HeaderMap::new(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(err, UpstreamError::NoSuchHost { .. }),
                "{location}: {err}"
            );
            assert!(err.to_string().contains("never dials"), "{location}: {err}");
        }
        assert_eq!(inside_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn manifest_sized_answers_share_a_memory_budget() {
        let body = "x".repeat(100 << 10);
        let (registry, _) = serve(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let path = PathAndQuery::from_static("/v2/x/manifests/latest");
        // Within the budget: read whole.
        let s = upstream(1 << 20)
            .small(&origin_at(registry), Method::GET, &path, &HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(s.body.len(), 100 << 10);
        // A budget smaller than the answer: it is never held whole; the exchange runs out of time.
        let err = upstream(64 << 10)
            .small(&origin_at(registry), Method::GET, &path, &HeaderMap::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::AUTHORIZATION));
    }
}
