//! `BlobCache`: serves blobs from the store, or fetches a missing blob once from upstream and
//! streams it to every client that asks while it is being written to the cache.
//!
//! How a download is shared (a *flight*):
//!
//! - One task per flight pulls the upstream body, hashes each batch and appends it to the
//!   store's temp file in parallel (both on blocking threads), then publishes how far the file
//!   has got on a `watch` channel. It never waits for readers.
//! - Every client — the one that started the fetch and any that join later — reads the temp
//!   file at its own offset with `pread`, waking on the channel when it has caught up. Joiners
//!   and ranges are therefore served from whatever has arrived, and a slow reader only slows
//!   itself.
//! - The final byte of the blob is held back until the digest has been verified, so no client
//!   ever receives a complete body that does not match; on a mismatch every body ends with an
//!   error instead, and nothing is stored.
//! - If the disk fails (the temp file cannot be created or a write fails), or the blob does not
//!   fit in the cache's size limit (announced larger, grown larger, or squeezed out by the other
//!   downloads in flight: the store counts bytes being written), the flight carries on without
//!   the file: bytes from that point go into an in-memory window that readers consume,
//!   and that window is bounded, so here the download does wait for the slowest reader (one
//!   that stalls past a timeout is cut off so the others can finish). Such a flight takes
//!   joiners only while the window still holds every byte since the file failed; after that,
//!   a new client starts a new fetch. The blob is not cached; the write error (or the lack of
//!   room) is counted. Resuming from upstream with a `Range` request was the alternative; it
//!   would need the fetch closure to speak ranges and keep credentials valid for longer,
//!   for a case (disk full) that should stay rare.
//! - If the fetch itself fails (say 401), the client that ran it gets its own error back;
//!   clients waiting on it run their own fetch instead, with their own credentials. So
//!   `fetch` runs once per blob when it succeeds, and at most once more per waiting client
//!   when it does not.

use std::{
    collections::{HashMap, VecDeque},
    fmt, io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt, future::BoxFuture, stream::BoxStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::{
    CacheError,
    store::{BlobIngest, BlobRead, BlobStore, StoredBlob},
};
use crate::{
    oci::{ByteRange, Digest, DigestMismatch, ResolvedRange, Unsatisfiable},
    telemetry::error_chain,
};

/// Size of the reads that serve a body: large enough that a 256 MiB hit is ~1000 reads, small
/// enough that many concurrent clients do not add up to much memory.
pub const READ_CHUNK: usize = 256 * 1024;
/// Upstream chunks are gathered up to this size before one write (and one hash) per batch.
const WRITE_BATCH: usize = 256 * 1024;
/// Memory a flight may hold for readers once its temp file has failed.
const WINDOW_MAX: u64 = 8 * 1024 * 1024;
/// How long a full window may wait for its slowest reader before that reader is cut off.
const READER_STALL: Duration = Duration::from_secs(30);

/// What `fetch` returns: the upstream body of the blob.
pub struct UpstreamBlob {
    len: Option<u64>,
    body: BoxStream<'static, io::Result<Bytes>>,
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
pub struct Outcome(Option<watch::Receiver<Progress>>);

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

/// The bytes of a response, in chunks of at most [`READ_CHUNK`].
pub struct BlobBody(BoxStream<'static, io::Result<Bytes>>);

impl BlobBody {
    fn empty() -> Self {
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

/// Counters for metrics; a snapshot of [`BlobCache::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes of stored blobs.
    pub bytes: u64,
    pub entries: u64,
    /// Bytes reserved for downloads being written, counted against the size limit.
    pub in_flight_bytes: u64,
    pub evictions: u64,
    /// Stored blobs that failed re-verification and were dropped.
    pub corrupt: u64,
    pub hits: u64,
    /// Upstream fetches started.
    pub fetches: u64,
    /// Requests that joined a fetch in progress.
    pub joins: u64,
    /// Downloads that could not be cached because the disk failed (served anyway).
    pub write_errors: u64,
    /// Downloads that could not be cached because they did not fit in the size limit (served
    /// anyway).
    pub no_room: u64,
    /// Downloads whose content did not match their digest.
    pub digest_mismatches: u64,
    /// Downloads that failed after the fetch returned (error, short or long body).
    pub upstream_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    fetches: AtomicU64,
    joins: AtomicU64,
    write_errors: AtomicU64,
    no_room: AtomicU64,
    digest_mismatches: AtomicU64,
    upstream_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The blob cache with single-flight fetching. Cheap to clone.
#[derive(Clone)]
pub struct BlobCache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn BlobStore>,
    flights: Mutex<HashMap<Digest, Arc<Flight>>>,
    counters: Counters,
    reader_stall: Duration,
}

impl BlobCache {
    /// A cache over `store`; flights are tracked per `BlobCache`, so share one (it clones).
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Self::with_reader_stall(store, READER_STALL)
    }

    fn with_reader_stall(store: Arc<dyn BlobStore>, reader_stall: Duration) -> Self {
        BlobCache {
            inner: Arc::new(Inner {
                store,
                flights: Mutex::default(),
                counters: Counters::default(),
                reader_stall,
            }),
        }
    }

    /// The store underneath (shared with the manifest store).
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.inner.store
    }

    /// Length of a cached blob, for `HEAD`. Does not count as a hit.
    pub async fn lookup(&self, digest: &Digest) -> Option<u64> {
        match self.inner.store.open(digest).await {
            Ok(blob) => blob.map(|b| b.len),
            Err(e) => {
                warn!(%digest, error = %e, "cache lookup failed; treating as a miss");
                None
            }
        }
    }

    /// Whether a download of `digest` is under way that a new request could join.
    pub fn in_flight(&self, digest: &Digest) -> bool {
        self.inner
            .flights
            .lock()
            .expect("flights lock")
            .get(digest)
            .is_some_and(|f| f.shared.lock().expect("flight lock").joinable())
    }

    /// Serves `digest` (the whole blob or `range`) from the cache, or from the one upstream
    /// fetch for it, calling `fetch` only if no fetch for this blob is under way.
    ///
    /// `Err` is only ever the error of this caller's own `fetch`: cache failures fall back to
    /// upstream, and a failure of a fetch this caller waited on makes it run its own.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        fetch: F,
    ) -> Result<BlobResponse, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamBlob, E>>,
    {
        if let Some(response) = self.serve_hit(digest, range).await {
            return Ok(response);
        }
        let (slot, leading) = self.inner.join_or_register(digest);
        if leading {
            return self.lead(slot, range, fetch).await;
        }
        if wait_started(&slot.flight).await {
            bump(&self.inner.counters.joins);
            return Ok(attach(slot, range, BlobSource::Joined));
        }
        drop(slot);
        debug!(%digest, "the fetch this request waited on failed; fetching with its own request");
        let slot = self.inner.register_if_free(digest);
        self.lead(slot, range, fetch).await
    }

    /// Counters for metrics.
    pub fn stats(&self) -> CacheStats {
        let usage = self.inner.store.usage();
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            bytes: usage.bytes,
            entries: usage.entries,
            in_flight_bytes: usage.in_flight,
            evictions: usage.evictions,
            corrupt: usage.corrupt,
            hits: get(&c.hits),
            fetches: get(&c.fetches),
            joins: get(&c.joins),
            write_errors: get(&c.write_errors),
            no_room: get(&c.no_room),
            digest_mismatches: get(&c.digest_mismatches),
            upstream_failures: get(&c.upstream_failures),
        }
    }

    async fn serve_hit(&self, digest: &Digest, range: Option<ByteRange>) -> Option<BlobResponse> {
        let blob = match self.inner.store.open(digest).await {
            Ok(blob) => blob?,
            Err(e) => {
                warn!(%digest, error = %e, "cannot open cached blob; fetching it instead");
                return None;
            }
        };
        bump(&self.inner.counters.hits);
        Some(self.hit_response(digest, blob, range, None))
    }

    fn hit_response(
        &self,
        digest: &Digest,
        blob: StoredBlob,
        range: Option<ByteRange>,
        progress: Option<watch::Receiver<Progress>>,
    ) -> BlobResponse {
        let (range, start, end) = match range.map(|r| r.resolve(blob.len)) {
            None => (BodyRange::Full, 0, blob.len),
            Some(Ok(r)) => (BodyRange::Partial(r), r.start, r.end + 1),
            Some(Err(u)) => (BodyRange::Unsatisfiable(u), 0, 0),
        };
        let file = match range {
            BodyRange::Unsatisfiable(_) => None,
            _ => blob
                .content
                .file()
                .map(|file| FileRange { file, start, end }),
        };
        BlobResponse {
            source: BlobSource::Hit,
            len: Some(blob.len),
            range,
            file,
            body: hit_body(
                self.inner.store.clone(),
                digest.clone(),
                blob.content,
                start,
                end,
            ),
            outcome: Outcome(progress),
        }
    }

    /// Runs this caller's fetch for a flight it registered (or a private one).
    async fn lead<F, Fut, E>(
        &self,
        slot: ReaderSlot,
        range: Option<ByteRange>,
        fetch: F,
    ) -> Result<BlobResponse, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamBlob, E>>,
    {
        let flight = slot.flight.clone();
        // Until the fetch has answered, dropping this future (client gone) or a fetch error
        // must release whoever waits on this flight.
        let mut guard = LeadGuard {
            inner: &self.inner,
            flight: &flight,
            armed: true,
        };
        // A flight for this blob may have finished between our miss and our registration.
        if let Ok(Some(blob)) = self.inner.store.open(&flight.digest).await {
            guard.armed = false;
            flight.serve_stored(&blob);
            self.inner.unregister(&flight);
            bump(&self.inner.counters.hits);
            let progress = Some(flight.progress.subscribe());
            return Ok(self.hit_response(&flight.digest, blob, range, progress));
        }
        bump(&self.inner.counters.fetches);
        let upstream = fetch().await?;
        guard.armed = false;
        drop(guard);
        // The length first, so this caller's range resolves before the task has started.
        flight.progress.send_modify(|p| p.len = upstream.len);
        tokio::spawn(download(self.inner.clone(), flight, upstream));
        Ok(attach(slot, range, BlobSource::Fetched))
    }
}

impl Inner {
    /// Joins the flight for `digest` or registers a new one; the reader is registered under the
    /// same lock, so a flight that stops taking joiners never gains an unseen reader.
    fn join_or_register(&self, digest: &Digest) -> (ReaderSlot, bool) {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(flight) = flights.get(digest)
            && let Some(slot) = ReaderSlot::join(flight)
        {
            return (slot, false);
        }
        // No flight, or one that can no longer give a new reader every byte: replace it (it
        // goes on for its own readers; `unregister` will not remove this one).
        let flight = Arc::new(Flight::new(digest.clone()));
        flights.insert(digest.clone(), flight.clone());
        (ReaderSlot::new(flight), true)
    }

    /// A new flight, registered for joiners unless another joinable flight holds the digest.
    fn register_if_free(&self, digest: &Digest) -> ReaderSlot {
        let flight = Arc::new(Flight::new(digest.clone()));
        let mut flights = self.flights.lock().expect("flights lock");
        let taken = flights
            .get(digest)
            .is_some_and(|f| f.shared.lock().expect("flight lock").joinable());
        if !taken {
            flights.insert(digest.clone(), flight.clone());
        }
        ReaderSlot::new(flight)
    }

    fn unregister(&self, flight: &Arc<Flight>) {
        let mut flights = self.flights.lock().expect("flights lock");
        if flights
            .get(&flight.digest)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            flights.remove(&flight.digest);
        }
    }
}

struct LeadGuard<'a> {
    inner: &'a Inner,
    flight: &'a Arc<Flight>,
    armed: bool,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.unregister(self.flight);
            self.flight.progress.send_modify(|p| {
                p.phase = Phase::FetchFailed;
                p.outcome = Some(FlightOutcome::FetchFailed);
            });
        }
    }
}

/// Waits until a joined flight's fetch has answered; false if it failed.
async fn wait_started(flight: &Flight) -> bool {
    let mut rx = flight.progress.subscribe();
    match rx.wait_for(|p| !matches!(p.phase, Phase::Connecting)).await {
        Ok(p) => !matches!(p.phase, Phase::FetchFailed),
        Err(_) => false,
    }
}

/// One download shared by its readers.
struct Flight {
    digest: Digest,
    progress: watch::Sender<Progress>,
    shared: Mutex<Shared>,
    /// Readers moved on: a full window may have room.
    space: Notify,
}

#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    /// Upstream `Content-Length`, or the stored length.
    len: Option<u64>,
    /// Bytes received and readable (from the file below `file_end`, from the window above).
    received: u64,
    /// Bytes in the temp file.
    file_end: u64,
    outcome: Option<FlightOutcome>,
}

#[derive(Debug, Clone)]
enum Phase {
    /// The fetch has not answered yet.
    Connecting,
    /// The fetch returned an error; waiters run their own.
    FetchFailed,
    Streaming,
    /// Every byte received and the digest verified.
    Verified,
    Failed(FlightError),
}

#[derive(Default)]
struct Shared {
    /// The temp file (or the stored blob), once the flight has one.
    content: Option<Arc<dyn BlobRead>>,
    /// Bytes from `window_start` on, kept in memory when the temp file failed.
    window: VecDeque<Bytes>,
    window_start: u64,
    window_bytes: u64,
    /// Reader id -> offset of its next read; what the window must keep.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    /// Where the temp file stopped, once it failed.
    degraded_at: Option<u64>,
    /// The download stopped for want of readers: nobody may join.
    closed: bool,
}

impl Shared {
    /// A new reader starts at 0: it needs the file intact up to where it failed and the
    /// window to hold everything since.
    fn joinable(&self) -> bool {
        !self.closed && self.degraded_at.is_none_or(|at| self.window_start <= at)
    }

    fn add_reader(&mut self) -> u64 {
        let id = self.next_reader;
        self.next_reader += 1;
        // From 0 until the range is known: keeping too much is safe, too little is not.
        self.readers.insert(id, 0);
        id
    }

    /// Drops window chunks every reader is past.
    fn trim(&mut self) {
        let keep_from = self.readers.values().min().copied().unwrap_or(u64::MAX);
        while let Some(front) = self.window.front() {
            let end = self.window_start + front.len() as u64;
            if end > keep_from {
                break;
            }
            self.window_start = end;
            self.window_bytes -= front.len() as u64;
            self.window.pop_front();
        }
    }

    fn window_slice(&self, pos: u64, max: u64) -> Option<Bytes> {
        let mut offset = self.window_start;
        for chunk in &self.window {
            let end = offset + chunk.len() as u64;
            if pos >= offset && pos < end {
                let start = (pos - offset) as usize;
                let stop = (pos + max).min(end) - offset;
                return Some(chunk.slice(start..stop as usize));
            }
            offset = end;
        }
        None
    }
}

impl Flight {
    fn new(digest: Digest) -> Self {
        Flight {
            digest,
            progress: watch::Sender::new(Progress {
                phase: Phase::Connecting,
                len: None,
                received: 0,
                file_end: 0,
                outcome: None,
            }),
            shared: Mutex::default(),
            space: Notify::new(),
        }
    }

    /// Turns a registered flight into a view of a blob that is already stored.
    fn serve_stored(&self, blob: &StoredBlob) {
        self.shared.lock().expect("flight lock").content = Some(blob.content.clone());
        self.progress.send_modify(|p| {
            p.phase = Phase::Verified;
            p.len = Some(blob.len);
            p.received = blob.len;
            p.file_end = blob.len;
            p.outcome = Some(FlightOutcome::AlreadyCached);
        });
    }
}

/// A reader's registration with a flight; removing it on drop lets the window move on.
struct ReaderSlot {
    flight: Arc<Flight>,
    id: u64,
}

impl ReaderSlot {
    fn new(flight: Arc<Flight>) -> Self {
        let id = flight.shared.lock().expect("flight lock").add_reader();
        ReaderSlot { flight, id }
    }

    /// Registers a reader if the flight can still serve one from the start.
    fn join(flight: &Arc<Flight>) -> Option<Self> {
        let mut shared = flight.shared.lock().expect("flight lock");
        if !shared.joinable() {
            return None;
        }
        let id = shared.add_reader();
        Some(ReaderSlot {
            flight: flight.clone(),
            id,
        })
    }

    fn advance(&self, pos: u64) {
        let mut shared = self.flight.shared.lock().expect("flight lock");
        if let Some(p) = shared.readers.get_mut(&self.id) {
            *p = pos;
        }
        if !shared.window.is_empty() {
            shared.trim();
            self.flight.space.notify_one();
        }
    }

    fn window_read(&self, pos: u64, max: u64) -> Result<Bytes, FlightError> {
        let shared = self.flight.shared.lock().expect("flight lock");
        if !shared.readers.contains_key(&self.id) {
            return Err(FlightError::TooSlow);
        }
        shared.window_slice(pos, max).ok_or(FlightError::TooSlow)
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        let mut shared = self.flight.shared.lock().expect("flight lock");
        shared.readers.remove(&self.id);
        shared.trim();
        self.flight.space.notify_one();
    }
}

/// Builds the response for a reader of a flight whose fetch has answered.
fn attach(slot: ReaderSlot, range: Option<ByteRange>, source: BlobSource) -> BlobResponse {
    let rx = slot.flight.progress.subscribe();
    let p = rx.borrow().clone();
    let verified = matches!(p.phase, Phase::Verified);
    let len = p.len.or(verified.then_some(p.received));
    // Without a length a range cannot be resolved: serve the whole blob (200).
    let (body_range, start, end) = match (range, len) {
        (Some(r), Some(len)) => match r.resolve(len) {
            Ok(r) => (BodyRange::Partial(r), r.start, Some(r.end + 1)),
            Err(u) => {
                return BlobResponse {
                    source,
                    len: Some(len),
                    range: BodyRange::Unsatisfiable(u),
                    body: BlobBody::empty(),
                    file: None,
                    outcome: Outcome(Some(rx)),
                };
            }
        },
        (_, len) => (BodyRange::Full, 0, len),
    };
    slot.advance(start);
    let reader = FlightReader {
        slot,
        rx: rx.clone(),
        pos: start,
        end,
        content: None,
        done: false,
    };
    let body = futures_util::stream::unfold(reader, |mut r| async move {
        let item = r.next_chunk().await?;
        Some((item, r))
    });
    BlobResponse {
        source,
        len,
        range: body_range,
        body: BlobBody(body.boxed()),
        file: None,
        outcome: Outcome(Some(rx)),
    }
}

struct FlightReader {
    slot: ReaderSlot,
    rx: watch::Receiver<Progress>,
    pos: u64,
    /// Exclusive end; `None` until the blob's length is known.
    end: Option<u64>,
    content: Option<Arc<dyn BlobRead>>,
    done: bool,
}

impl FlightReader {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        loop {
            let p = self.rx.borrow_and_update().clone();
            if let Phase::Failed(e) = p.phase {
                return self.fail(e);
            }
            let verified = matches!(p.phase, Phase::Verified);
            let end = self.end.or(verified.then_some(p.received));
            if end.is_some_and(|e| self.pos >= e) {
                self.done = true;
                return None;
            }
            // The last byte of the blob waits for the digest check.
            let mut limit = if verified || p.len.is_some_and(|l| p.received < l) {
                p.received
            } else {
                p.received.saturating_sub(1)
            };
            if let Some(end) = end {
                limit = limit.min(end);
            }
            if self.pos < limit {
                let want = (limit - self.pos).min(READ_CHUNK as u64);
                let chunk = if self.pos < p.file_end {
                    self.read_file(self.pos, want.min(p.file_end - self.pos))
                        .await
                } else {
                    self.slot
                        .window_read(self.pos, want)
                        .map_err(io::Error::other)
                };
                return match chunk {
                    Ok(bytes) if !bytes.is_empty() => {
                        self.pos += bytes.len() as u64;
                        self.slot.advance(self.pos);
                        Some(Ok(bytes))
                    }
                    Ok(_) => {
                        self.done = true;
                        Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "temp file is shorter than what was written to it",
                        )))
                    }
                    Err(e) => {
                        self.done = true;
                        Some(Err(e))
                    }
                };
            }
            if self.rx.changed().await.is_err() {
                return self.fail(FlightError::Abandoned);
            }
        }
    }

    fn fail(&mut self, e: FlightError) -> Option<io::Result<Bytes>> {
        self.done = true;
        Some(Err(io::Error::other(e)))
    }

    async fn read_file(&mut self, pos: u64, len: u64) -> io::Result<Bytes> {
        let content = match &self.content {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .slot
                    .flight
                    .shared
                    .lock()
                    .expect("flight lock")
                    .content
                    .clone();
                let c = c.ok_or_else(|| io::Error::other(FlightError::Abandoned))?;
                self.content = Some(c.clone());
                c
            }
        };
        content.read_at(pos, len as usize).await
    }
}

/// Streams `start..end` of a stored blob, reading the next chunk while the current one is sent.
fn hit_body(
    store: Arc<dyn BlobStore>,
    digest: Digest,
    content: Arc<dyn BlobRead>,
    start: u64,
    end: u64,
) -> BlobBody {
    struct State {
        store: Arc<dyn BlobStore>,
        digest: Digest,
        content: Arc<dyn BlobRead>,
        pos: u64,
        end: u64,
        ahead: Option<BoxFuture<'static, io::Result<Bytes>>>,
    }
    impl State {
        fn read(&self) -> BoxFuture<'static, io::Result<Bytes>> {
            let len = (self.end - self.pos).min(READ_CHUNK as u64) as usize;
            self.content.read_at(self.pos, len)
        }
    }
    let state = State {
        store,
        digest,
        content,
        pos: start,
        end,
        ahead: None,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        if s.pos >= s.end {
            return None;
        }
        let read = match s.ahead.take() {
            Some(read) => read,
            None => s.read(),
        };
        let result = match read.await {
            Ok(bytes) if bytes.is_empty() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "cached blob is shorter than its index entry",
            )),
            other => other,
        };
        match result {
            Ok(bytes) => {
                s.pos += bytes.len() as u64;
                if s.pos < s.end {
                    s.ahead = Some(s.read());
                }
                Some((Ok(bytes), s))
            }
            Err(e) => {
                // Never serve this file again: the next request fetches the blob anew.
                warn!(digest = %s.digest, error = %e, "reading cached blob failed; dropping it");
                s.store.remove(&s.digest);
                s.pos = s.end;
                Some((Err(e), s))
            }
        }
    });
    BlobBody(body.boxed())
}

/// Ends a flight: publishes the phase and outcome, and releases the digest for new flights.
struct Finish {
    inner: Arc<Inner>,
    flight: Arc<Flight>,
    done: bool,
}

impl Finish {
    fn end(&mut self, phase: Option<Phase>, outcome: FlightOutcome) {
        self.done = true;
        self.inner.unregister(&self.flight);
        self.flight.progress.send_modify(|p| {
            if let Some(phase) = phase {
                p.phase = phase;
            }
            p.outcome = Some(outcome);
        });
    }

    fn fail(&mut self, error: FlightError) {
        let outcome = match &error {
            FlightError::DigestMismatch(m) => {
                bump(&self.inner.counters.digest_mismatches);
                FlightOutcome::DigestMismatch(m.clone())
            }
            other => {
                bump(&self.inner.counters.upstream_failures);
                FlightOutcome::UpstreamFailed {
                    error: other.to_string(),
                }
            }
        };
        warn!(digest = %self.flight.digest, %error, "blob download failed; nothing cached");
        self.end(Some(Phase::Failed(error)), outcome);
    }
}

impl Drop for Finish {
    /// A panic or runtime shutdown must not leave readers waiting forever.
    fn drop(&mut self) {
        if !self.done {
            self.fail(FlightError::Abandoned);
        }
    }
}

/// The flight's task: pulls upstream, hashes, writes, publishes, verifies, commits.
async fn download(inner: Arc<Inner>, flight: Arc<Flight>, upstream: UpstreamBlob) {
    let mut finish = Finish {
        inner: inner.clone(),
        flight: flight.clone(),
        done: false,
    };
    let digest = &flight.digest;
    let expected_len = upstream.len;
    // The temp file, or why there is none (the outcome if the download succeeds).
    let mut ingest: Result<Box<dyn BlobIngest>, FlightOutcome> =
        match inner.store.ingest(digest, expected_len).await {
            Ok(ingest) => Ok(ingest),
            Err(e) => Err(degrade(&inner, &flight, 0, &e)),
        };
    flight.shared.lock().expect("flight lock").content = ingest.as_ref().ok().map(|i| i.content());
    flight.progress.send_modify(|p| {
        p.phase = Phase::Streaming;
        p.len = expected_len;
    });

    let mut verifier = digest.verifier();
    let mut body = upstream.body;
    let (mut received, mut file_end) = (0u64, 0u64);
    let mut ended = false;
    while !ended {
        // Wait for one chunk, then take whatever else is already there, up to a batch.
        let mut batch = Vec::new();
        let mut size = 0u64;
        let mut failure = None;
        match body.next().await {
            None => break,
            Some(Err(e)) => failure = Some(e),
            Some(Ok(b)) => {
                size += b.len() as u64;
                batch.push(b);
            }
        }
        while failure.is_none() && size < WRITE_BATCH as u64 {
            match body.next().now_or_never() {
                Some(Some(Ok(b))) => {
                    size += b.len() as u64;
                    batch.push(b);
                }
                Some(Some(Err(e))) => failure = Some(e),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        batch.retain(|b| !b.is_empty());
        if !batch.is_empty() {
            if let Some(expected) = expected_len
                && received + size > expected
            {
                return finish.fail(FlightError::Length {
                    expected,
                    received: received + size,
                });
            }
            let hashing = tokio::task::spawn_blocking({
                let batch = batch.clone();
                move || {
                    batch.iter().for_each(|b| verifier.update(b));
                    verifier
                }
            });
            let writing = async {
                match ingest.as_mut() {
                    Ok(i) => Some(i.write(batch.clone()).await),
                    Err(_) => None,
                }
            };
            let (hashed, written) = tokio::join!(hashing, writing);
            verifier = match hashed {
                Ok(v) => v,
                Err(_) => return finish.fail(FlightError::Abandoned),
            };
            match written {
                Some(Ok(())) => file_end += size,
                Some(Err(e)) => ingest = Err(degrade(&inner, &flight, file_end, &e)),
                None => {}
            }
            if let Err(outcome) = &ingest
                && !push_window(&inner, &flight, batch, size).await
            {
                debug!(%digest, "every reader left an uncacheable download; stopping it");
                return finish.end(Some(Phase::Failed(FlightError::Abandoned)), outcome.clone());
            }
            received += size;
            flight.progress.send_modify(|p| {
                p.received = received;
                p.file_end = file_end;
            });
        }
        if let Some(e) = failure {
            return finish.fail(FlightError::Upstream(e.to_string()));
        }
    }
    if let Some(expected) = expected_len
        && received != expected
    {
        return finish.fail(FlightError::Length { expected, received });
    }
    let proof = match verifier.finish() {
        Ok(proof) => proof,
        Err(mismatch) => return finish.fail(FlightError::DigestMismatch(mismatch)),
    };
    flight.progress.send_modify(|p| p.phase = Phase::Verified);
    let outcome = match ingest {
        Ok(ingest) => match ingest.commit(proof).await {
            Ok(()) => FlightOutcome::Cached,
            Err(e) => {
                warn!(%digest, error = %e, "storing a verified blob failed; served uncached");
                bump(&inner.counters.write_errors);
                FlightOutcome::WriteFailed {
                    error: e.to_string(),
                }
            }
        },
        Err(outcome) => outcome,
    };
    debug!(%digest, ?outcome, bytes = received, "blob download finished");
    finish.end(None, outcome);
}

/// The temp file failed or ran out of room: serve what follows from memory, and count it.
/// Returns the flight's outcome should the download succeed.
fn degrade(inner: &Inner, flight: &Flight, file_end: u64, error: &CacheError) -> FlightOutcome {
    let no_room = error.is_no_room();
    let error = error_chain(error);
    let outcome = if no_room {
        debug!(digest = %flight.digest, error, "blob does not fit in the cache; serving it uncached");
        bump(&inner.counters.no_room);
        FlightOutcome::NoRoom { error }
    } else {
        warn!(digest = %flight.digest, error, "cannot write blob to the cache; serving it uncached");
        bump(&inner.counters.write_errors);
        FlightOutcome::WriteFailed { error }
    };
    let mut shared = flight.shared.lock().expect("flight lock");
    shared.window_start = file_end;
    shared.degraded_at = Some(file_end);
    outcome
}

/// Adds a batch to the window, waiting for room. False if no reader is left to serve.
async fn push_window(inner: &Inner, flight: &Flight, batch: Vec<Bytes>, size: u64) -> bool {
    loop {
        {
            let mut shared = flight.shared.lock().expect("flight lock");
            shared.trim();
            if shared.readers.is_empty() {
                shared.closed = true;
                return false;
            }
            if shared.window.is_empty() || shared.window_bytes + size <= WINDOW_MAX {
                shared.window_bytes += size;
                shared.window.extend(batch);
                return true;
            }
        }
        let woken = tokio::time::timeout(inner.reader_stall, flight.space.notified()).await;
        if woken.is_err() {
            let mut shared = flight.shared.lock().expect("flight lock");
            if let Some(slowest) = shared.readers.values().min().copied() {
                shared.readers.retain(|_, pos| *pos > slowest);
                warn!(digest = %flight.digest, offset = slowest, "cutting off a stalled reader of an uncached download");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, path::Path, sync::atomic::AtomicUsize};

    use tokio::sync::mpsc;

    use super::*;
    use crate::cache::{
        FsBlobStore, MemoryBlobStore,
        conformance::{data, put},
    };

    type Chunks = mpsc::UnboundedSender<io::Result<Bytes>>;

    /// An upstream whose chunks the test sends by hand.
    fn manual_upstream(len: Option<u64>) -> (Chunks, UpstreamBlob) {
        let (tx, rx) = mpsc::unbounded_channel();
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, UpstreamBlob::new(len, body))
    }

    /// An upstream that sends `bytes` in 64 KiB chunks, pausing between them.
    fn paced_upstream(bytes: &[u8], pause: Duration) -> UpstreamBlob {
        let chunks: Vec<Bytes> = bytes
            .chunks(64 * 1024)
            .map(Bytes::copy_from_slice)
            .collect();
        let body = futures_util::stream::iter(chunks).then(move |c| async move {
            tokio::time::sleep(pause).await;
            Ok(c)
        });
        UpstreamBlob::new(Some(bytes.len() as u64), body)
    }

    /// `blob` through `cache`, from an upstream that has all of it at once.
    async fn fetch(
        cache: &BlobCache,
        digest: &Digest,
        range: Option<ByteRange>,
        blob: &[u8],
    ) -> BlobResponse {
        cache
            .get_or_fetch(digest, range, || {
                ready(paced_upstream(blob, Duration::ZERO))
            })
            .await
            .unwrap()
    }

    fn ready(upstream: UpstreamBlob) -> impl Future<Output = Result<UpstreamBlob, Infallible>> {
        futures_util::future::ready(Ok(upstream))
    }

    async fn never() -> Result<UpstreamBlob, Infallible> {
        panic!("this request should not have fetched")
    }

    /// Reads a body to its end: the bytes, and the error it ended with, if any.
    async fn drain(body: BlobBody) -> (Vec<u8>, Option<io::Error>) {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(item) = body.next().await {
            match item {
                Ok(b) => {
                    assert!(b.len() <= READ_CHUNK);
                    out.extend_from_slice(&b);
                }
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    async fn drain_ok(body: BlobBody) -> Vec<u8> {
        let (bytes, err) = drain(body).await;
        assert!(err.is_none(), "body failed: {err:?}");
        bytes
    }

    fn flight_error(e: &io::Error) -> &FlightError {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<FlightError>())
            .unwrap_or_else(|| panic!("not a flight error: {e:?}"))
    }

    fn fs_cache(dir: &Path) -> BlobCache {
        BlobCache::new(Arc::new(FsBlobStore::open(dir, 1 << 30).unwrap()))
    }

    fn memory_cache() -> (Arc<MemoryBlobStore>, BlobCache) {
        let store = Arc::new(MemoryBlobStore::new(1 << 30));
        (store.clone(), BlobCache::new(store))
    }

    fn range(h: &str) -> Option<ByteRange> {
        Some(ByteRange::parse(h).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_cold_requests_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs_cache(dir.path());
        let blob = data(3 * 1024 * 1024 + 17, 1);
        let digest = Digest::sha256_of(&blob);
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (cache, digest, blob, fetches) =
                (cache.clone(), digest.clone(), blob.clone(), fetches.clone());
            tasks.spawn(async move {
                let upstream_blob = blob.clone();
                let response = cache
                    .get_or_fetch(&digest, None, || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, Infallible>(paced_upstream(
                            &upstream_blob,
                            Duration::from_millis(1),
                        ))
                    })
                    .await
                    .unwrap();
                assert_eq!(response.len, Some(blob.len() as u64));
                assert_eq!(response.range, BodyRange::Full);
                let source = response.source;
                assert!(
                    drain_ok(response.body).await == blob,
                    "a client got wrong bytes"
                );
                source
            });
        }
        let mut sources = Vec::new();
        while let Some(source) = tasks.join_next().await {
            sources.push(source.unwrap());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(
            sources
                .iter()
                .filter(|s| **s == BlobSource::Fetched)
                .count(),
            1
        );
        let stats = cache.stats();
        assert_eq!((stats.fetches, stats.joins + stats.hits), (1, 63));
        // The flight finishes (commit) shortly after the last byte is read.
        let hit = cache.get_or_fetch(&digest, None, never).await.unwrap();
        let hit = match hit.source {
            BlobSource::Hit => hit,
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                cache.get_or_fetch(&digest, None, never).await.unwrap()
            }
        };
        assert_eq!(hit.source, BlobSource::Hit);
        assert_eq!(drain_ok(hit.body).await, blob);
    }

    #[tokio::test]
    async fn a_joiner_gets_bytes_that_arrived_before_it_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs_cache(dir.path());
        let blob = data(1_000_000, 2);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(Some(blob.len() as u64));
        let leader = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        assert_eq!(leader.source, BlobSource::Fetched);
        let mut leader_body = leader.body;
        tx.send(Ok(Bytes::copy_from_slice(&blob[..500_000])))
            .unwrap();
        // The leader sees the first half before the rest exists.
        let mut seen = Vec::new();
        while seen.len() < 500_000 {
            seen.extend_from_slice(&leader_body.next().await.unwrap().unwrap());
        }

        let joiner = cache.get_or_fetch(&digest, None, never).await.unwrap();
        assert_eq!(joiner.source, BlobSource::Joined);
        let late_range = cache
            .get_or_fetch(&digest, range("bytes=700000-"), never)
            .await
            .unwrap();
        assert_eq!(
            late_range.range,
            BodyRange::Partial(ResolvedRange {
                start: 700_000,
                end: 999_999
            })
        );
        let early_range = cache
            .get_or_fetch(&digest, range("bytes=100-199"), never)
            .await
            .unwrap();
        // Ranges that have arrived are served at once.
        assert_eq!(drain_ok(early_range.body).await, &blob[100..200]);

        let joiner_task = tokio::spawn(drain_ok(joiner.body));
        let range_task = tokio::spawn(drain_ok(late_range.body));
        tx.send(Ok(Bytes::copy_from_slice(&blob[500_000..])))
            .unwrap();
        drop(tx);
        seen.extend_from_slice(&drain_ok(leader_body).await);
        assert_eq!(seen, blob);
        assert_eq!(joiner_task.await.unwrap(), blob);
        assert_eq!(range_task.await.unwrap(), &blob[700_000..]);
        let stats = cache.stats();
        assert_eq!((stats.fetches, stats.joins), (1, 3));
    }

    #[tokio::test]
    async fn ranges_on_a_cached_blob() {
        let (store, cache) = memory_cache();
        let blob = data(1024 * 1024, 3);
        let digest = put(&*store, &blob).await;
        let cases = [
            ("bytes=0-99", Some((0, 99))),
            ("bytes=1000-", Some((1000, 1024 * 1024 - 1))),
            ("bytes=-10", Some((1024 * 1024 - 10, 1024 * 1024 - 1))),
            ("bytes=5-99999999", Some((5, 1024 * 1024 - 1))),
            ("bytes=1048576-", None),
        ];
        for (header, want) in cases {
            let r = cache
                .get_or_fetch(&digest, range(header), never)
                .await
                .unwrap();
            assert_eq!(r.source, BlobSource::Hit);
            assert_eq!(r.len, Some(1024 * 1024));
            match want {
                Some((start, end)) => {
                    assert_eq!(r.range, BodyRange::Partial(ResolvedRange { start, end }));
                    assert_eq!(
                        drain_ok(r.body).await,
                        &blob[start as usize..=end as usize],
                        "{header}"
                    );
                }
                None => {
                    assert_eq!(
                        r.range,
                        BodyRange::Unsatisfiable(Unsatisfiable { len: 1024 * 1024 })
                    );
                    assert!(drain_ok(r.body).await.is_empty());
                }
            }
        }
        assert_eq!(cache.lookup(&digest).await, Some(1024 * 1024));
        assert_eq!(cache.stats().hits, 5);
    }

    #[tokio::test]
    async fn a_hit_from_files_names_the_file_range_of_its_body() {
        use std::os::unix::fs::FileExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cache = fs_cache(dir.path());
        let blob = data(300_000, 9);
        let digest = put(&**cache.store(), &blob).await;
        for (header, want) in [
            (None, Some(0..300_000)),
            (Some("bytes=7-1006"), Some(7..1007)),
        ] {
            let r = cache
                .get_or_fetch(&digest, header.and_then(range), never)
                .await
                .unwrap();
            let file = r.file.clone().expect("a file range for a hit from files");
            assert_eq!(Some(file.start..file.end), want);
            let mut from_file = vec![0; (file.end - file.start) as usize];
            file.file.read_exact_at(&mut from_file, file.start).unwrap();
            assert_eq!(from_file, drain_ok(r.body).await, "{header:?}");
        }
        let r = cache
            .get_or_fetch(&digest, range("bytes=300000-"), never)
            .await
            .unwrap();
        assert!(r.file.is_none(), "an unsatisfiable range has no bytes");
        // The in-memory store has no files.
        let (store, memory) = memory_cache();
        let digest = put(&*store, &blob).await;
        let r = memory.get_or_fetch(&digest, None, never).await.unwrap();
        assert!(r.file.is_none());
    }

    #[tokio::test]
    async fn a_hit_streams_in_large_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs_cache(dir.path());
        let blob = data(4 * READ_CHUNK + 1, 4);
        let digest = put(&**cache.store(), &blob).await;
        let response = cache.get_or_fetch(&digest, None, never).await.unwrap();
        let outcome = response.outcome.clone();
        let sizes: Vec<usize> = response.body.map(|c| c.unwrap().len()).collect().await;
        assert_eq!(sizes, [READ_CHUNK, READ_CHUNK, READ_CHUNK, READ_CHUNK, 1]);
        assert_eq!(outcome.wait().await, None);
    }

    #[tokio::test]
    async fn an_upstream_of_unknown_length_is_served_whole() {
        let (store, cache) = memory_cache();
        let blob = data(300_000, 5);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(None);
        let response = cache
            .get_or_fetch(&digest, range("bytes=10-20"), || ready(upstream))
            .await
            .unwrap();
        // No length, no range: the whole blob with 200.
        assert_eq!((response.len, response.range), (None, BodyRange::Full));
        tx.send(Ok(Bytes::copy_from_slice(&blob))).unwrap();
        drop(tx);
        assert_eq!(drain_ok(response.body).await, blob);
        assert_eq!(response.outcome.wait().await, Some(FlightOutcome::Cached));
        assert!(store.open(&digest).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_digest_mismatch_is_never_cached_nor_delivered_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs_cache(dir.path());
        let blob = data(600_000, 6);
        let digest = Digest::sha256_of(&blob);
        let mut evil = blob.clone();
        evil[599_999] ^= 1;
        let (tx, upstream) = manual_upstream(Some(evil.len() as u64));
        let leader = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        let joiner = cache.get_or_fetch(&digest, None, never).await.unwrap();
        tx.send(Ok(Bytes::copy_from_slice(&evil))).unwrap();
        drop(tx);
        for body in [leader.body, joiner.body] {
            let (bytes, err) = drain(body).await;
            assert!(
                bytes.len() < evil.len(),
                "the last byte waits for the check"
            );
            assert!(matches!(
                flight_error(&err.expect("body must fail")),
                FlightError::DigestMismatch(_)
            ));
        }
        let outcome = joiner.outcome.wait().await.unwrap();
        assert!(
            matches!(&outcome, FlightOutcome::DigestMismatch(m) if m.expected == digest),
            "{outcome:?}"
        );
        let stats = cache.stats();
        assert_eq!((stats.digest_mismatches, stats.entries), (1, 0));
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
        // Not cached: the next request fetches again.
        let fetched = fetch(&cache, &digest, None, &blob).await;
        assert_eq!(fetched.source, BlobSource::Fetched);
        assert_eq!(drain_ok(fetched.body).await, blob);
        assert_eq!(fetched.outcome.wait().await, Some(FlightOutcome::Cached));
    }

    /// Serves `blob` to `n` concurrent clients through `cache` and checks each got every byte.
    async fn serve_to_many(cache: &BlobCache, blob: &[u8], n: usize) -> Vec<Outcome> {
        let digest = Digest::sha256_of(blob);
        let (tx, upstream) = manual_upstream(Some(blob.len() as u64));
        let mut responses = vec![
            cache
                .get_or_fetch(&digest, None, || ready(upstream))
                .await
                .unwrap(),
        ];
        for _ in 1..n {
            responses.push(cache.get_or_fetch(&digest, None, never).await.unwrap());
        }
        let outcomes = responses.iter().map(|r| r.outcome.clone()).collect();
        let readers: Vec<_> = responses
            .into_iter()
            .map(|r| tokio::spawn(drain_ok(r.body)))
            .collect();
        for chunk in blob.chunks(100_000) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        for reader in readers {
            assert!(reader.await.unwrap() == blob, "a client missed bytes");
        }
        outcomes
    }

    #[tokio::test]
    async fn a_full_disk_still_serves_every_client_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open_with_temp_opener(dir.path(), 1 << 30, |_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/full")
        })
        .unwrap();
        let cache = BlobCache::new(Arc::new(store));
        let blob = data(2_000_000, 7);
        let outcomes = serve_to_many(&cache, &blob, 8).await;
        let outcome = outcomes[0].clone().wait().await.unwrap();
        assert!(
            matches!(&outcome, FlightOutcome::WriteFailed { error } if error.contains("No space")),
            "{outcome:?}"
        );
        let stats = cache.stats();
        assert_eq!(
            (stats.write_errors, stats.entries, stats.fetches),
            (1, 0, 1)
        );
        assert_eq!(cache.lookup(&Digest::sha256_of(&blob)).await, None);
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    /// Bytes in the files under `dir` (what a directory listing shows on disk).
    fn bytes_under(dir: &Path) -> u64 {
        let mut total = 0;
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let meta = entry.as_ref().unwrap().metadata().unwrap();
                if meta.is_dir() {
                    stack.push(entry.unwrap().path());
                } else {
                    total += meta.len();
                }
            }
        }
        total
    }

    /// Sends `blob` in 256 KiB chunks and reads the body along, checking after each chunk
    /// (once the client has read every byte of it the flight may release, so the flight has
    /// written it) that the files under `dir` hold at most `max` bytes. Returns the body read
    /// and the most bytes seen on disk.
    async fn stream_checking_disk(
        tx: Chunks,
        mut body: BlobBody,
        blob: &[u8],
        dir: &Path,
        max: u64,
    ) -> (Vec<u8>, u64) {
        let mut got = Vec::new();
        let mut most = 0;
        let mut sent = 0;
        for chunk in blob.chunks(256 * 1024) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
            sent += chunk.len();
            // The last byte received waits for the end (and the digest check).
            while got.len() < sent - 1 {
                got.extend_from_slice(&body.next().await.unwrap().unwrap());
            }
            let on_disk = bytes_under(dir);
            assert!(
                on_disk <= max,
                "{on_disk} bytes on disk after {sent} received; the limit is {max}"
            );
            most = most.max(on_disk);
        }
        drop(tx);
        got.extend_from_slice(&drain_ok(body).await);
        (got, most)
    }

    #[tokio::test]
    async fn an_upstream_body_without_a_length_cannot_fill_the_disk() {
        const MAX: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsBlobStore::open(dir.path(), MAX).unwrap());
        let cache = BlobCache::new(store.clone());
        let mut old = Vec::new();
        for seed in 0..3 {
            old.push(put(&*store, &data(1 << 20, 50 + seed)).await);
        }
        // A hostile upstream: no Content-Length and more than twice the cache.
        let blob = data(10 << 20, 60);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(None);
        let response = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        let outcome = response.outcome.clone();
        let (got, most) = stream_checking_disk(tx, response.body, &blob, dir.path(), MAX).await;
        assert!(got == blob, "the client gets every byte");
        assert!(
            most > MAX - (1 << 20),
            "the download did reach the limit: {most}"
        );
        let outcome = outcome.wait().await.unwrap();
        assert!(
            matches!(&outcome, FlightOutcome::NoRoom { error } if error.contains("cache.max_size")),
            "{outcome:?}"
        );
        assert_eq!(cache.lookup(&digest).await, None, "nothing cached");
        for d in &old {
            assert_eq!(cache.lookup(d).await, None, "evicted to make room");
        }
        let stats = cache.stats();
        assert_eq!(
            (
                stats.no_room,
                stats.write_errors,
                stats.in_flight_bytes,
                stats.bytes
            ),
            (1, 0, 0, 0)
        );
        assert_eq!(bytes_under(dir.path()), 0);

        // The cache keeps working.
        let small = data(300_000, 61);
        let r = fetch(&cache, &Digest::sha256_of(&small), None, &small).await;
        assert_eq!(drain_ok(r.body).await, small);
        assert_eq!(r.outcome.wait().await, Some(FlightOutcome::Cached));
        assert_eq!(cache.stats().bytes, small.len() as u64);
    }

    #[tokio::test]
    async fn a_blob_announced_larger_than_the_cache_is_never_written() {
        const MAX: u64 = 4 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsBlobStore::open(dir.path(), MAX).unwrap());
        let cache = BlobCache::new(store.clone());
        let kept = put(&*store, &data(1 << 20, 70)).await;
        let blob = data(5 << 20, 71);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(Some(blob.len() as u64));
        let response = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        assert_eq!(response.len, Some(blob.len() as u64));
        let outcome = response.outcome.clone();
        // Never more than the blob already cached: no temp file at all.
        let (got, most) = stream_checking_disk(tx, response.body, &blob, dir.path(), 1 << 20).await;
        assert!(got == blob, "the client gets every byte");
        assert_eq!(most, 1 << 20);
        assert!(matches!(
            outcome.wait().await,
            Some(FlightOutcome::NoRoom { .. })
        ));
        assert_eq!(cache.lookup(&digest).await, None);
        assert_eq!(cache.lookup(&kept).await, Some(1 << 20), "nothing evicted");
        let stats = cache.stats();
        assert_eq!(
            (stats.no_room, stats.evictions, stats.write_errors),
            (1, 0, 0)
        );
    }

    #[tokio::test]
    async fn no_temp_file_at_all_still_serves_every_client() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open_with_temp_opener(dir.path(), 1 << 30, |_| {
            Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem))
        })
        .unwrap();
        let cache = BlobCache::new(Arc::new(store));
        let blob = data(1_500_000, 8);
        let outcomes = serve_to_many(&cache, &blob, 4).await;
        assert!(matches!(
            outcomes[3].clone().wait().await,
            Some(FlightOutcome::WriteFailed { .. })
        ));
        let stats = cache.stats();
        assert_eq!(
            (stats.write_errors, stats.entries, stats.fetches),
            (1, 0, 1)
        );
    }

    #[tokio::test]
    async fn an_uncacheable_flight_that_dropped_bytes_takes_no_new_joiners() {
        let (store, cache) = memory_cache();
        store.fail_ingests(true);
        let blob = data(600_000, 17);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(Some(blob.len() as u64));
        let first = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        let mut body = first.body;
        tx.send(Ok(Bytes::copy_from_slice(&blob[..300_000])))
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 300_000 {
            seen.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
        // The only reader is past those bytes, so they are gone from memory: a newcomer
        // cannot be served from this flight and fetches for itself.
        let second = fetch(&cache, &digest, None, &blob).await;
        assert_eq!(second.source, BlobSource::Fetched);
        tx.send(Ok(Bytes::copy_from_slice(&blob[300_000..])))
            .unwrap();
        drop(tx);
        seen.extend_from_slice(&drain_ok(body).await);
        assert_eq!(seen, blob);
        assert_eq!(drain_ok(second.body).await, blob);
        assert_eq!(cache.stats().fetches, 2);
    }

    #[tokio::test]
    async fn a_disk_failing_midway_still_serves_every_client() {
        let (store, cache) = memory_cache();
        store.fail_writes_after(Some(700_000));
        let blob = data(2_000_000, 9);
        let outcomes = serve_to_many(&cache, &blob, 6).await;
        assert!(matches!(
            outcomes[0].clone().wait().await,
            Some(FlightOutcome::WriteFailed { .. })
        ));
        assert_eq!(cache.stats().write_errors, 1);
        assert!(
            store
                .open(&Digest::sha256_of(&blob))
                .await
                .unwrap()
                .is_none()
        );

        // Once that flight is over, a new request fetches anew.
        store.fail_writes_after(None);
        let again = fetch(&cache, &Digest::sha256_of(&blob), range("bytes=-5"), &blob).await;
        assert_eq!(again.source, BlobSource::Fetched);
        assert_eq!(drain_ok(again.body).await, &blob[blob.len() - 5..]);
        assert_eq!(again.outcome.wait().await, Some(FlightOutcome::Cached));
    }

    #[tokio::test]
    async fn a_stalled_reader_of_an_uncacheable_download_is_cut_off() {
        let store = Arc::new(MemoryBlobStore::new(1 << 30));
        store.fail_ingests(true);
        let cache = BlobCache::with_reader_stall(store, Duration::from_millis(100));
        let blob = data((WINDOW_MAX as usize) * 2, 10);
        let digest = Digest::sha256_of(&blob);
        let response = fetch(&cache, &digest, None, &blob).await;
        let stalled = cache.get_or_fetch(&digest, None, never).await.unwrap();
        let mut stalled_body = stalled.body;
        // Reads one chunk, then stops reading while the other client goes on.
        stalled_body.next().await.unwrap().unwrap();
        assert_eq!(drain_ok(response.body).await, blob);
        let (_, err) = drain(stalled_body).await;
        assert_eq!(flight_error(&err.expect("cut off")), &FlightError::TooSlow);
    }

    #[tokio::test]
    async fn a_slow_reader_does_not_hold_up_a_cached_download() {
        let (store, cache) = memory_cache();
        let blob = data(3_000_000, 11);
        let digest = Digest::sha256_of(&blob);
        let fast = fetch(&cache, &digest, None, &blob).await;
        let slow = cache.get_or_fetch(&digest, None, never).await.unwrap();
        assert_eq!(drain_ok(fast.body).await, blob);
        assert_eq!(fast.outcome.wait().await, Some(FlightOutcome::Cached));
        assert!(store.open(&digest).await.unwrap().is_some());
        // The slow one still gets everything when it finally reads.
        assert_eq!(drain_ok(slow.body).await, blob);
    }

    #[tokio::test]
    async fn clients_leaving_do_not_stop_the_download() {
        let (store, cache) = memory_cache();
        let blob = data(1_000_000, 12);
        let digest = Digest::sha256_of(&blob);
        let response = cache
            .get_or_fetch(&digest, None, || {
                ready(paced_upstream(&blob, Duration::from_millis(1)))
            })
            .await
            .unwrap();
        let outcome = response.outcome.clone();
        drop(response);
        assert_eq!(outcome.wait().await, Some(FlightOutcome::Cached));
        assert!(store.open(&digest).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_upstream_failure_midway_fails_every_body_and_caches_nothing() {
        let (store, cache) = memory_cache();
        let blob = data(1_000_000, 13);
        let digest = Digest::sha256_of(&blob);
        let (tx, upstream) = manual_upstream(Some(blob.len() as u64));
        let leader = cache
            .get_or_fetch(&digest, None, || ready(upstream))
            .await
            .unwrap();
        let joiner = cache.get_or_fetch(&digest, None, never).await.unwrap();
        tx.send(Ok(Bytes::copy_from_slice(&blob[..400_000])))
            .unwrap();
        tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
            .unwrap();
        for body in [leader.body, joiner.body] {
            let (bytes, err) = drain(body).await;
            assert!(bytes.len() <= 400_000);
            assert!(matches!(
                flight_error(&err.expect("must fail")),
                FlightError::Upstream(m) if m.contains("reset")
            ));
        }
        assert!(matches!(
            leader.outcome.wait().await,
            Some(FlightOutcome::UpstreamFailed { .. })
        ));
        assert!(store.open(&digest).await.unwrap().is_none());
        assert_eq!(cache.stats().upstream_failures, 1);
        let again = fetch(&cache, &digest, None, &blob).await;
        assert_eq!(again.source, BlobSource::Fetched);
        assert_eq!(drain_ok(again.body).await, blob);
    }

    #[tokio::test]
    async fn bodies_shorter_or_longer_than_announced_fail() {
        let (store, cache) = memory_cache();
        let blob = data(10_000, 14);
        let digest = Digest::sha256_of(&blob);
        for (announced, sent) in [(20_000u64, &blob[..]), (5_000, &blob[..])] {
            let sent = Bytes::copy_from_slice(sent);
            let upstream =
                UpstreamBlob::new(Some(announced), futures_util::stream::iter([Ok(sent)]));
            let r = cache
                .get_or_fetch(&digest, None, || ready(upstream))
                .await
                .unwrap();
            let (_, err) = drain(r.body).await;
            assert!(matches!(
                flight_error(&err.expect("must fail")),
                FlightError::Length { expected, .. } if *expected == announced
            ));
        }
        assert!(store.open(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_failed_fetch_goes_to_its_caller_and_waiters_use_their_own() {
        let (_store, cache) = memory_cache();
        let blob = data(50_000, 15);
        let digest = Digest::sha256_of(&blob);
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let (cache, digest) = (cache.clone(), digest.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, None, || async move {
                        fail_rx.await.ok();
                        Err::<UpstreamBlob, _>("401 from upstream")
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiter = {
            let (cache, digest, blob) = (cache.clone(), digest.clone(), blob.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, None, || async move {
                        Ok::<_, &str>(paced_upstream(&blob, Duration::ZERO))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        fail_tx.send(()).unwrap();
        assert_eq!(leader.await.unwrap().unwrap_err(), "401 from upstream");
        let waiter = waiter.await.unwrap().unwrap();
        assert_eq!(waiter.source, BlobSource::Fetched);
        assert_eq!(drain_ok(waiter.body).await, blob);
        assert_eq!(cache.stats().fetches, 2);
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_before_the_answer_releases_its_waiters() {
        let (_store, cache) = memory_cache();
        let blob = data(50_000, 16);
        let digest = Digest::sha256_of(&blob);
        let leader = {
            let (cache, digest) = (cache.clone(), digest.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, None, || async {
                        std::future::pending::<Result<UpstreamBlob, Infallible>>().await
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiter = {
            let (cache, digest, blob) = (cache.clone(), digest.clone(), blob.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, None, || {
                        ready(paced_upstream(&blob, Duration::ZERO))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let waiter = waiter.await.unwrap().unwrap();
        assert_eq!(drain_ok(waiter.body).await, blob);
    }

    #[tokio::test]
    async fn an_empty_blob_is_fetched_verified_and_cached() {
        let (store, cache) = memory_cache();
        let digest = Digest::sha256_of(b"");
        let r = cache
            .get_or_fetch(&digest, None, || {
                ready(UpstreamBlob::new(Some(0), futures_util::stream::empty()))
            })
            .await
            .unwrap();
        assert!(drain_ok(r.body).await.is_empty());
        assert_eq!(r.outcome.wait().await, Some(FlightOutcome::Cached));
        assert_eq!(store.open(&digest).await.unwrap().unwrap().len, 0);
    }

    #[tokio::test]
    async fn a_registered_flight_finds_a_blob_stored_meanwhile() {
        let (store, cache) = memory_cache();
        let blob = data(10_000, 18);
        // As if another flight committed between this request's miss and its registration.
        let (slot, leading) = cache.inner.join_or_register(&Digest::sha256_of(&blob));
        assert!(leading);
        let digest = put(&*store, &blob).await;
        let joiner = cache.get_or_fetch(&digest, range("bytes=0-9"), never);
        let r = cache.lead(slot, None, never).await.unwrap();
        assert_eq!(r.source, BlobSource::Hit);
        assert_eq!(
            r.outcome.clone().wait().await,
            Some(FlightOutcome::AlreadyCached)
        );
        assert_eq!(drain_ok(r.body).await, blob);
        assert_eq!(drain_ok(joiner.await.unwrap().body).await, &blob[..10]);
        assert_eq!(cache.stats().fetches, 0);
    }
}
