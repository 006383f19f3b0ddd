//! The flights: the registry of downloads in progress by digest, and each flight's published
//! progress and the state its readers share (their offsets, and the in-memory window that
//! replaces a failed temp file).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use super::{FlightError, FlightOutcome, Inner};
use crate::{
    cache::store::{BlobRead, StoredBlob},
    oci::Digest,
};

impl Inner {
    pub(super) fn unregister(&self, flight: &Arc<Flight>) {
        let mut flights = self.flights.lock().expect("flights lock");
        if flights
            .get(&flight.digest)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            flights.remove(&flight.digest);
        }
    }
}

/// Held by the caller running a flight's fetch: if it is dropped armed (the fetch failed, or
/// the caller went away), the flight is unregistered and its waiters run their own fetch.
pub(super) struct LeadGuard<'a> {
    pub(super) inner: &'a Inner,
    pub(super) flight: &'a Arc<Flight>,
    pub(super) armed: bool,
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
pub(super) async fn wait_started(flight: &Flight) -> bool {
    let mut rx = flight.progress.subscribe();
    match rx.wait_for(|p| !matches!(p.phase, Phase::Connecting)).await {
        Ok(p) => !matches!(p.phase, Phase::FetchFailed),
        Err(_) => false,
    }
}

/// One download shared by its readers.
pub(super) struct Flight {
    pub(super) digest: Digest,
    pub(super) progress: watch::Sender<Progress>,
    pub(super) shared: Mutex<Shared>,
    /// Readers moved on: a full window may have room.
    pub(super) space: Notify,
}

#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub(super) phase: Phase,
    /// Upstream `Content-Length`, or the stored length.
    pub(super) len: Option<u64>,
    /// Bytes received and readable (from the file below `file_end`, from the window above).
    pub(super) received: u64,
    /// Bytes in the temp file.
    pub(super) file_end: u64,
    pub(super) outcome: Option<FlightOutcome>,
}

#[derive(Debug, Clone)]
pub(super) enum Phase {
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
pub(super) struct Shared {
    /// The temp file (or the stored blob), once the flight has one.
    pub(super) content: Option<Arc<dyn BlobRead>>,
    /// Bytes from `window_start` on, kept in memory when the temp file failed.
    pub(super) window: VecDeque<Bytes>,
    pub(super) window_start: u64,
    pub(super) window_bytes: u64,
    /// Reader id -> offset of its next read; what the window must keep.
    pub(super) readers: HashMap<u64, u64>,
    next_reader: u64,
    /// Where the temp file stopped, once it failed.
    pub(super) degraded_at: Option<u64>,
    /// The download stopped for want of readers: nobody may join.
    pub(super) closed: bool,
}

impl Shared {
    /// A new reader starts at 0: it needs the file intact up to where it failed and the
    /// window to hold everything since.
    pub(super) fn joinable(&self) -> bool {
        !self.closed && self.degraded_at.is_none_or(|at| self.window_start <= at)
    }

    pub(super) fn add_reader(&mut self) -> u64 {
        let id = self.next_reader;
        self.next_reader += 1;
        // From 0 until the range is known: keeping too much is safe, too little is not.
        self.readers.insert(id, 0);
        id
    }

    /// Drops window chunks every reader is past.
    pub(super) fn trim(&mut self) {
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

    pub(super) fn window_slice(&self, pos: u64, max: u64) -> Option<Bytes> {
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
    pub(super) fn new(digest: Digest) -> Self {
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
    pub(super) fn serve_stored(&self, blob: &StoredBlob) {
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
