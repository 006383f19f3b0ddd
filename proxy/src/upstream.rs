//! The real registry behind an intercepted connection. Requests carry the client's own
//! credentials (its `Authorization`), 401 challenges go back unchanged so the runtime's token flow
//! keeps working, and blob redirects (CDN, S3) are followed here, so the bytes pass through (and
//! into the cache); `Authorization` is dropped on a cross-host hop. Manifest exchanges have a
//! deadline; blob bodies have an idle timeout instead.

use std::time::Duration;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, Method, Request, Response, StatusCode, Uri, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;

use crate::{
    cache::MAX_MANIFEST_BYTES,
    client::{self, BoxError, HttpClient, IdleTimeout, ProxyBody},
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

/// Which registry an intercepted connection talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    /// `host` or `host:port` as the client addressed it.
    pub authority: Authority,
}

impl Origin {
    /// The registry host (no port), lowercase.
    pub fn host(&self) -> &str {
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
    #[error("upstream {host}: more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects { host: String },
    #[error("upstream {host} redirected to an unusable location {location:?}")]
    BadRedirect { host: String, location: String },
    #[error("upstream {host}: manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge { host: String },
}

impl UpstreamError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::TooManyRedirects { .. } => "too_many_redirects",
            UpstreamError::BadRedirect { .. } => "bad_redirect",
            UpstreamError::ManifestTooLarge { .. } => "manifest_too_large",
        }
    }
}

/// A manifest-sized answer, read completely within the deadline.
#[derive(Debug)]
pub struct Small {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Talks to upstream registries.
#[derive(Clone)]
pub struct Upstream {
    client: HttpClient,
    manifest_timeout: Duration,
    blob_idle_timeout: Duration,
}

impl Upstream {
    pub fn new(
        client: HttpClient,
        manifest_timeout: Duration,
        blob_idle_timeout: Duration,
    ) -> Self {
        Self {
            client,
            manifest_timeout,
            blob_idle_timeout,
        }
    }

    /// A registry read whose answer is small (manifests, tag lists, `/v2/`): the whole exchange,
    /// redirects included, within the manifest deadline.
    pub async fn small(
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
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_MANIFEST_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::ManifestTooLarge {
                            host: origin.host().to_owned(),
                        }
                    } else {
                        unreachable(crate::telemetry::error_chain(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Small {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.manifest_timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.manifest_timeout)))?
    }

    /// A blob read: the response head within the manifest deadline (redirects followed), the
    /// body streamed with the idle timeout.
    pub async fn blob(
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
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unreachable {
                    host: uri.host().unwrap_or_default().to_owned(),
                    reason: crate::telemetry::error_chain(&e),
                })?;
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
            if next.authority() != uri.authority() {
                // Never hand the registry's credentials to a CDN or an object store.
                headers.remove(header::AUTHORIZATION);
            }
            uri = next;
        }
        Err(UpstreamError::TooManyRedirects {
            host: origin.host().to_owned(),
        })
    }

    /// Forwards any other request (writes, uploads, unknown paths) as it is, both bodies
    /// streaming; only hop-by-hop headers are dropped.
    pub async fn forward(
        &self,
        origin: &Origin,
        req: Request<Incoming>,
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
        let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Unreachable {
                host: origin.host().to_owned(),
                reason: crate::telemetry::error_chain(&e),
            })?;
        let idle = self.blob_idle_timeout;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            IdleTimeout::new(body, idle).boxed_unsync(),
        ))
    }
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
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
