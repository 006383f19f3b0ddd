//! What the registry proxy asks: the hub and the upstream, as two small traits. Production uses
//! [`HubClient`] and [`Upstream`]; tests exercise the whole request policy in-process against
//! fakes of both.

use std::future::Future;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, uri::PathAndQuery};

use crate::{
    oci::{Digest, RepositoryName},
    origins::client::ProxyBody,
    origins::hub::{HubClient, HubError, HubOutcome, MappingError},
    origins::upstream::{Origin, Small, Upstream, UpstreamError},
};

/// The cluster's registry: lookups, and the pushes of write-back.
pub(crate) trait HubSource: Send + Sync + 'static {
    /// The hub's base URL, for logs.
    fn url(&self) -> &Uri;
    /// The hub repository that stands for `repo` of `registry`.
    fn hub_repo(
        &self,
        registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError>;
    /// `/v2/<hub repo>/<kind>/<reference>` with pullproxy's own hub credentials.
    fn lookup(
        &self,
        method: Method,
        hub_repo: &RepositoryName,
        kind: &str,
        reference: &str,
        headers: HeaderMap,
    ) -> impl Future<Output = HubOutcome> + Send;
    /// Whether the hub has `digest` in `hub_repo` (`kind`: `blobs` or `manifests`).
    fn has(
        &self,
        hub_repo: &str,
        kind: &str,
        digest: &Digest,
    ) -> impl Future<Output = Result<bool, HubError>> + Send;
    /// Uploads a blob into `hub_repo`.
    fn upload_blob(
        &self,
        hub_repo: &str,
        digest: &Digest,
        len: u64,
        body: ProxyBody,
    ) -> impl Future<Output = Result<(), HubError>> + Send;
    /// Puts a manifest by digest into `hub_repo`.
    fn put_manifest(
        &self,
        hub_repo: &str,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), HubError>> + Send;
}

/// The registry a connection was going to.
pub(crate) trait UpstreamSource: Send + Sync + 'static {
    /// A manifest-sized exchange, read whole within the manifest deadline.
    fn small(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> impl Future<Output = Result<Small, UpstreamError>> + Send;
    /// A blob: the head within the deadline, the body streamed.
    fn blob(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send;
    /// Any other request, forwarded as it is.
    fn forward(
        &self,
        origin: &Origin,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send;
    /// Whether `path` can be read without credentials (anonymous token flow included).
    fn readable_anonymously(
        &self,
        origin: &Origin,
        path: &PathAndQuery,
    ) -> impl Future<Output = Result<bool, UpstreamError>> + Send;
}

impl HubSource for HubClient {
    fn url(&self) -> &Uri {
        HubClient::url(self)
    }

    fn hub_repo(
        &self,
        registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        HubClient::hub_repo(self, registry, repo)
    }

    fn lookup(
        &self,
        method: Method,
        hub_repo: &RepositoryName,
        kind: &str,
        reference: &str,
        headers: HeaderMap,
    ) -> impl Future<Output = HubOutcome> + Send {
        HubClient::lookup(self, method, hub_repo, kind, reference, headers)
    }

    fn has(
        &self,
        hub_repo: &str,
        kind: &str,
        digest: &Digest,
    ) -> impl Future<Output = Result<bool, HubError>> + Send {
        HubClient::has(self, hub_repo, kind, digest)
    }

    fn upload_blob(
        &self,
        hub_repo: &str,
        digest: &Digest,
        len: u64,
        body: ProxyBody,
    ) -> impl Future<Output = Result<(), HubError>> + Send {
        HubClient::upload_blob(self, hub_repo, digest, len, body)
    }

    fn put_manifest(
        &self,
        hub_repo: &str,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), HubError>> + Send {
        HubClient::put_manifest(self, hub_repo, digest, media_type, bytes)
    }
}

impl UpstreamSource for Upstream {
    fn small(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> impl Future<Output = Result<Small, UpstreamError>> + Send {
        Upstream::small(self, origin, method, path, headers)
    }

    fn blob(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send {
        Upstream::blob(self, origin, method, path, headers)
    }

    fn forward(
        &self,
        origin: &Origin,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send {
        Upstream::forward(self, origin, req)
    }

    fn readable_anonymously(
        &self,
        origin: &Origin,
        path: &PathAndQuery,
    ) -> impl Future<Output = Result<bool, UpstreamError>> + Send {
        Upstream::readable_anonymously(self, origin, path)
    }
}
