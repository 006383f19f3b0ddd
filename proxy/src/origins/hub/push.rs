//! Pushing into the hub (write-back): blobs by monolithic upload, manifests by digest, and the
//! check that pullproxy's hub credentials may push at all.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{HubClient, HubError};
use crate::{oci::Digest, origins::client::ProxyBody};

/// How long an upload may take before its response head (the body streams under a rate limit,
/// so this is generous).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The repository `doctor` starts (and cancels) an upload in to learn whether it may push.
pub(crate) const PUSH_PROBE_REPOSITORY: &str = "pullproxy/push-check";

impl HubClient {
    /// Whether the hub has `digest` in `hub_repo` (`kind`: `blobs` or `manifests`).
    pub(crate) async fn has(
        &self,
        hub_repo: &str,
        kind: &str,
        digest: &Digest,
    ) -> Result<bool, HubError> {
        let resp = self
            .exchange(
                Method::HEAD,
                &format!("/v2/{hub_repo}/{kind}/{digest}"),
                HeaderMap::new(),
                crate::origins::client::empty(),
                self.timeout,
            )
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(HubError::Refused(s)),
            status => Err(HubError::Status {
                what: "a HEAD",
                status,
            }),
        }
    }

    /// Uploads a blob of `len` bytes into `hub_repo` in one go: `POST` an upload, then `PUT`
    /// the bytes to the location the hub gave, with the digest (the hub verifies it).
    pub(crate) async fn upload_blob(
        &self,
        hub_repo: &str,
        digest: &Digest,
        len: u64,
        body: ProxyBody,
    ) -> Result<(), HubError> {
        let location = self.start_upload(hub_repo).await?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let resp = self
            .exchange(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                headers,
                body,
                UPLOAD_TIMEOUT,
            )
            .await?;
        expect_created(resp.status(), "a blob upload")
    }

    /// Puts a manifest by its digest into `hub_repo` (no tag: see the write-back module).
    pub(crate) async fn put_manifest(
        &self,
        hub_repo: &str,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), HubError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|_| HubError::BadLocation(format!("media type {media_type:?}")))?,
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let resp = self
            .exchange(
                Method::PUT,
                &format!("/v2/{hub_repo}/manifests/{digest}"),
                headers,
                crate::origins::client::full(bytes),
                self.timeout,
            )
            .await?;
        expect_created(resp.status(), "a manifest put")
    }

    /// Whether pullproxy's credentials may push: starts an upload in
    /// [`PUSH_PROBE_REPOSITORY`] and cancels it.
    pub(crate) async fn can_push(&self) -> Result<bool, HubError> {
        let location = match self.start_upload(PUSH_PROBE_REPOSITORY).await {
            Ok(location) => location,
            Err(HubError::Refused(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Best effort: an abandoned upload is purged by the registry anyway.
        let _ = self
            .exchange(
                Method::DELETE,
                &location,
                HeaderMap::new(),
                crate::origins::client::empty(),
                self.timeout,
            )
            .await;
        Ok(true)
    }

    /// `POST /v2/<repo>/blobs/uploads/`: the location to send the bytes to.
    async fn start_upload(&self, hub_repo: &str) -> Result<String, HubError> {
        let resp = self
            .exchange(
                Method::POST,
                &format!("/v2/{hub_repo}/blobs/uploads/"),
                HeaderMap::new(),
                crate::origins::client::empty(),
                self.timeout,
            )
            .await?;
        match resp.status() {
            StatusCode::ACCEPTED => resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| HubError::BadLocation("no Location for an upload".into())),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(HubError::Refused(s)),
            status => Err(HubError::Status {
                what: "starting an upload",
                status,
            }),
        }
    }
}

fn expect_created(status: StatusCode, what: &'static str) -> Result<(), HubError> {
    match status {
        StatusCode::CREATED => Ok(()),
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(HubError::Refused(s)),
        status => Err(HubError::Status { what, status }),
    }
}
