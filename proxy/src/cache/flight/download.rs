//! The task behind each flight: pulls the upstream body, hashes and writes it in batches,
//! publishes progress to the readers, verifies the digest and commits (or falls back to the
//! in-memory window when the temp file fails).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tracing::{debug, warn};

use super::{
    FlightError, FlightOutcome, Inner, UpstreamBlob, bump,
    state::{Flight, Phase},
};
use crate::{
    cache::{CacheError, store::BlobIngest},
    telemetry::error_chain,
};

/// Upstream chunks are gathered up to this size before one write (and one hash) per batch.
const WRITE_BATCH: usize = 256 * 1024;
/// Memory a flight may hold for readers once its temp file has failed.
pub(super) const WINDOW_MAX: u64 = 8 * 1024 * 1024;

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
pub(super) async fn download(inner: Arc<Inner>, flight: Arc<Flight>, upstream: UpstreamBlob) {
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
