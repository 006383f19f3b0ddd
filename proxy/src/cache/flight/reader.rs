//! What clients read: a flight's readers (each reading the temp file at its own offset, or the
//! window once the file failed) and the body of a hit, read straight from the store.

use std::{io, sync::Arc};

use bytes::Bytes;
use futures_util::{StreamExt, future::BoxFuture};
use tokio::sync::watch;
use tracing::warn;

use super::{
    BlobBody, BlobResponse, BlobSource, BodyRange, FlightError, Inner, Outcome,
    state::{Flight, Phase, Progress},
};
use crate::{
    cache::store::{BlobRead, BlobStore},
    oci::{ByteRange, Digest},
};

impl Inner {
    /// Joins the flight for `digest` or registers a new one; the reader is registered under the
    /// same lock, so a flight that stops taking joiners never gains an unseen reader.
    pub(super) fn join_or_register(&self, digest: &Digest) -> (ReaderSlot, bool) {
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
    pub(super) fn register_if_free(&self, digest: &Digest) -> ReaderSlot {
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
}

/// Size of the reads that serve a body: large enough that a 256 MiB hit is ~1000 reads, small
/// enough that many concurrent clients do not add up to much memory.
pub const READ_CHUNK: usize = 256 * 1024;

/// A reader's registration with a flight; removing it on drop lets the window move on.
pub(super) struct ReaderSlot {
    pub(super) flight: Arc<Flight>,
    id: u64,
}

impl ReaderSlot {
    pub(super) fn new(flight: Arc<Flight>) -> Self {
        let id = flight.shared.lock().expect("flight lock").add_reader();
        ReaderSlot { flight, id }
    }

    /// Registers a reader if the flight can still serve one from the start.
    pub(super) fn join(flight: &Arc<Flight>) -> Option<Self> {
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
pub(super) fn attach(
    slot: ReaderSlot,
    range: Option<ByteRange>,
    source: BlobSource,
) -> BlobResponse {
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
pub(super) fn hit_body(
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
