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
//!
//! Where each part lives: `response` holds what `get_or_fetch` is handed and gives back,
//! `state` the flights (registry, progress, shared window), `download` the task that runs a
//! flight, and `reader` the bodies read from a flight or from the store.

mod download;
mod reader;
mod response;
mod state;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, warn};

pub use reader::READ_CHUNK;
pub use response::{
    BlobBody, BlobResponse, BlobSource, BodyRange, FileRange, FlightError, FlightOutcome, Outcome,
    UpstreamBlob,
};

use super::store::{BlobStore, StoredBlob};
use crate::oci::{ByteRange, Digest};
use download::download;
use reader::{ReaderSlot, attach, hit_body};
use state::{Flight, LeadGuard, Progress, wait_started};

/// How long a full window may wait for its slowest reader before that reader is cut off.
const READER_STALL: Duration = Duration::from_secs(30);

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
