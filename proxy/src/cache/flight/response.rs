//! What `BlobCache::get_or_fetch` is handed (the upstream body) and what it gives back: the
//! response with its source, range, body, and how the download behind it ended.

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream::BoxStream};
use tokio::sync::watch;

use super::state::Progress;
use crate::oci::{DigestMismatch, ResolvedRange, Unsatisfiable};

/// What `fetch` returns: the upstream body of the blob.
pub struct UpstreamBlob {
    pub(super) len: Option<u64>,
    pub(super) body: BoxStream<'static, io::Result<Bytes>>,
}

impl UpstreamBlob {
    /// `len` is the upstream `Content-Length` if it sent one.
    pub fn new(
        len: Option<u64>,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    ) -> Self {
        UpstreamBlob {
            len,
            body: body.boxed(),
        }
    }
}

impl fmt::Debug for UpstreamBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBlob")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Where a response's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobSource {
    /// The blob was already cached.
    Hit,
    /// This request ran the upstream fetch.
    Fetched,
    /// This request joined a fetch another request started.
    Joined,
}

/// Which part of the blob the body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRange {
    /// The whole blob: answer 200. Also when a range was asked for a blob of unknown length.
    Full,
    /// Answer 206 with `Content-Range`.
    Partial(ResolvedRange),
    /// Answer 416 with `Content-Range: bytes */LEN`; the body is empty.
    Unsatisfiable(Unsatisfiable),
}

/// How a flight ended, for logs and metrics ([`BlobResponse::outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlightOutcome {
    /// Verified and stored.
    Cached,
    /// Another request stored it first; served from the store.
    AlreadyCached,
    /// Verified and served, but not stored: the disk failed.
    WriteFailed { error: String },
    /// Verified and served, but not stored: it did not fit in the cache's size limit, alone or
    /// beside the other downloads in flight.
    NoRoom { error: String },
    /// The bytes did not hash to the digest: bodies ended with an error, nothing stored.
    DigestMismatch(DigestMismatch),
    /// Upstream failed, ended early or sent too much: bodies ended with an error.
    UpstreamFailed { error: String },
    /// The fetch returned an error before any byte.
    FetchFailed,
}

/// Why a body ended with an error; the `io::Error` a body yields wraps one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlightError {
    #[error("upstream failed mid-blob: {0}")]
    Upstream(String),
    #[error("upstream sent {received} bytes of a blob announced as {expected}")]
    Length { expected: u64, received: u64 },
    #[error(transparent)]
    DigestMismatch(DigestMismatch),
    #[error("reader fell too far behind a download that could not be cached")]
    TooSlow,
    #[error("the download stopped unexpectedly")]
    Abandoned,
}

/// Where a cached blob's bytes lie: a range of an open file.
#[derive(Clone)]
pub struct FileRange {
    pub file: Arc<std::fs::File>,
    pub start: u64,
    /// Exclusive.
    pub end: u64,
}

impl fmt::Debug for FileRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileRange({}..{})", self.start, self.end)
    }
}

/// A blob (or part of it) to send: how long, from where, and the bytes.
pub struct BlobResponse {
    pub source: BlobSource,
    /// Length of the whole blob, if known (upstream sent `Content-Length`, or it is cached).
    pub len: Option<u64>,
    pub range: BodyRange,
    pub body: BlobBody,
    /// For a hit from a file store: the same bytes as `body`, as a file range, so that a
    /// transport that sends files itself can send them instead of `body`.
    pub file: Option<FileRange>,
    /// How the download behind this response ended, once it has.
    pub outcome: Outcome,
}

/// Tells how a flight ended ([`Outcome::wait`]); separate from the body so the caller can hand
/// the body to the client and still log or count the outcome.
#[derive(Clone)]
pub struct Outcome(pub(super) Option<watch::Receiver<Progress>>);

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Outcome")
    }
}

impl Outcome {
    /// Waits for the flight to end and tells how; `None` for a plain hit. Does not need the
    /// body to be read.
    pub async fn wait(self) -> Option<FlightOutcome> {
        let mut rx = self.0?;
        let p = rx.wait_for(|p| p.outcome.is_some()).await.ok()?;
        p.outcome.clone()
    }
}

impl fmt::Debug for BlobResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobResponse")
            .field("source", &self.source)
            .field("len", &self.len)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// The bytes of a response, in chunks of at most [`READ_CHUNK`](super::READ_CHUNK).
pub struct BlobBody(pub(super) BoxStream<'static, io::Result<Bytes>>);

impl BlobBody {
    pub(super) fn empty() -> Self {
        BlobBody(futures_util::stream::empty().boxed())
    }
}

impl fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlobBody")
    }
}

impl Stream for BlobBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_next_unpin(cx)
    }
}
