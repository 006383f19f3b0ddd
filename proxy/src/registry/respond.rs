//! Responses: relayed ones (hop-by-hop headers dropped), locally built ones with the exact
//! registry headers (cached manifests and blobs, whole, ranges, heads), OCI error bodies, and the one log line per request, written when the body
//! has been sent (so it carries the bytes and the duration).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, StreamBody};
use tracing::info;

use crate::{
    cache::{BlobResponse, BodyRange, Manifest},
    oci::{Digest, ErrorCode, error_body},
    origins::client::{self, BoxError, IdleTimeout, ProxyBody},
    origins::upstream::strip_hop_by_hop,
};

use super::{
    SendsFiles,
    served::{Kind, Source},
};

/// The facts of one request, logged and counted once its body is done.
#[derive(Debug, Clone)]
pub(crate) struct RequestRecord {
    pub(crate) metrics: std::sync::Arc<super::metrics::RegistryMetrics>,
    pub(crate) registry: String,
    /// The registry's bounded metric label.
    pub(crate) label: String,
    pub(crate) repository: String,
    /// Tag or digest (empty for other requests).
    pub(crate) reference: String,
    pub(crate) method: http::Method,
    pub(crate) kind: Kind,
    pub(crate) comm: String,
    pub(crate) pid: u32,
    pub(crate) started: Instant,
}

impl RequestRecord {
    /// Writes the request's line and counts it.
    fn finish(&self, source: Source, status: StatusCode, bytes: u64, error: Option<&str>) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.request(
            &self.label,
            self.kind,
            source,
            status.as_u16(),
            bytes,
            seconds,
        );
        info!(
            registry = %self.registry,
            repository = %self.repository,
            reference = %self.reference,
            method = %self.method,
            kind = self.kind.label(),
            source = source.label(),
            status = status.as_u16(),
            bytes,
            duration_ms = seconds * 1e3,
            comm = %self.comm,
            pid = self.pid,
            error,
            "pull"
        );
    }
}

/// Wraps `resp` so its request is logged when the body ends (or is dropped unfinished).
pub(crate) fn logged(
    record: RequestRecord,
    source: Source,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let status = resp.status();
    // What a complete response body holds: nothing for HEAD, else the announced length if any.
    let expected = if record.method == http::Method::HEAD {
        Some(0)
    } else {
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    resp.map(|body| {
        Logged {
            inner: body,
            record: Some(record),
            source,
            status,
            bytes: 0,
            expected,
        }
        .boxed_unsync()
    })
}

/// Counts bytes and writes the request's log line once.
struct Logged {
    inner: ProxyBody,
    record: Option<RequestRecord>,
    source: Source,
    status: StatusCode,
    bytes: u64,
    /// The body's announced length (`Content-Length`, or 0 for HEAD), when known.
    expected: Option<u64>,
}

impl Logged {
    fn done(&mut self, error: Option<&str>) {
        if let Some(record) = self.record.take() {
            record.finish(self.source, self.status, self.bytes, error);
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.done(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e = crate::telemetry::error_chain(e.as_ref());
                this.done(Some(&e));
            }
            Poll::Ready(None) => this.done(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.record.is_some() {
            // A body can be dropped without its end being polled: hyper stops reading once the
            // announced length is sent, and HEAD bodies are never read. It is unfinished only if
            // fewer bytes than announced went out (or, without a length, its end was not reached).
            let complete = body_complete(self.bytes, self.expected, self.inner.is_end_stream());
            let unfinished = (!complete).then_some("client went away before the body was sent");
            self.done(unfinished);
        }
    }
}

/// Whether a body whose end may not have been polled was sent whole: `bytes` went out of an
/// announced `expected` length (or, without one, the stream `ended`).
fn body_complete(bytes: u64, expected: Option<u64>, ended: bool) -> bool {
    match expected {
        Some(len) => bytes >= len,
        None => ended,
    }
}

/// Relays a hub or upstream response: status and headers as they came, hop-by-hop headers
/// dropped, the body streamed with the idle timeout.
pub(crate) fn relay<B>(resp: Response<B>, idle: std::time::Duration) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, IdleTimeout::new(body, idle).boxed_unsync())
}

/// An OCI error response (`{"errors":[...]}`).
pub(crate) fn oci_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<ProxyBody> {
    json(status, error_body(code, message))
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(client::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    api_version(r)
}

/// `Docker-Content-Digest` and a strong `ETag` for content served by digest.
fn digest_headers(h: &mut http::HeaderMap, digest: &Digest) {
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
}

/// Adds `Docker-Distribution-API-Version: registry/2.0`, which clients look for.
fn api_version(mut r: Response<ProxyBody>) -> Response<ProxyBody> {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// A cached manifest (for HEAD, its head).
pub(super) fn manifest_response(m: &Manifest, method: &Method) -> Response<ProxyBody> {
    let body = if *method == Method::HEAD {
        client::empty()
    } else {
        client::full(m.bytes.clone())
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    digest_headers(h, &m.digest);
    api_version(r)
}

/// A cached blob's head.
pub(super) fn blob_head(digest: &Digest, len: u64) -> Response<ProxyBody> {
    let mut r = Response::new(client::empty());
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    blob_headers(r, digest)
}

/// What every blob response from pullproxy carries: ranges accepted, the type, the digest and
/// the API version.
fn blob_headers(mut r: Response<ProxyBody>, digest: &Digest) -> Response<ProxyBody> {
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    digest_headers(h, digest);
    api_version(r)
}

/// The response for `blob`. A cached blob on a connection whose transport sends files itself
/// (`files`) goes out as its file range; everything else streams its bytes.
pub(super) fn blob_response(
    digest: &Digest,
    blob: BlobResponse,
    files: Option<&dyn SendsFiles>,
) -> Response<ProxyBody> {
    let (status, length, content_range) = match blob.range {
        BodyRange::Full => (StatusCode::OK, blob.len, None),
        BodyRange::Partial(r) => (
            StatusCode::PARTIAL_CONTENT,
            Some(r.end - r.start + 1),
            blob.len.map(|total| r.content_range(total)),
        ),
        BodyRange::Unsatisfiable(u) => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Some(0),
            Some(u.content_range()),
        ),
    };
    let body = match (files, blob.file) {
        (Some(files), Some(range)) => files.file_body(range.file, range.start, range.end),
        _ => StreamBody::new(
            blob.body
                .map_ok(Frame::data)
                .map_err(client::BoxError::from),
        )
        .boxed_unsync(),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Some(len) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    blob_headers(r, digest)
}

#[cfg(test)]
mod tests {
    use super::body_complete;

    #[test]
    fn a_body_is_complete_when_its_announced_length_went_out() {
        // hyper stops polling once Content-Length bytes are written: not an abandoned body.
        assert!(body_complete(446, Some(446), false));
        assert!(!body_complete(100, Some(446), false));
        // HEAD: nothing is announced to be sent.
        assert!(body_complete(0, Some(0), false));
        // No length: only the end of the stream says it is whole.
        assert!(!body_complete(4096, None, false));
        assert!(body_complete(4096, None, true));
    }
}
