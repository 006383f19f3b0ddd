//! Tests of the blob cache: single-flight sharing, ranges, hits, digest mismatches, failing
//! disks and upstreams, slow and departing readers.

use std::{convert::Infallible, fs::File, io, path::Path, sync::atomic::AtomicUsize};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{download::WINDOW_MAX, *};
use crate::{
    cache::{
        FsBlobStore, MemoryBlobStore,
        conformance::{data, put},
    },
    oci::{ResolvedRange, Unsatisfiable},
};

/// Opens the temp files of a store on a disk the test makes fail.
type TempOpener = Box<dyn Fn(&Path) -> io::Result<File> + Send + Sync>;

/// What a flight test sets up: the store under the cache, its limits, and the one blob the test
/// is about (the upstream's content). [`Scenario::build`] makes the [`Scene`].
struct Scenario {
    store: StoreKind,
    max_bytes: u64,
    reader_stall: Duration,
    /// `data(len, seed)`.
    blob: (usize, u8),
    /// Whether an upstream fed by hand announces the blob's length (`Content-Length`).
    announce_len: bool,
}

enum StoreKind {
    /// A `MemoryBlobStore`, whose disk failures the test switches on ([`Scene::memory`]).
    Memory,
    /// An `FsBlobStore` in a fresh temp directory, with its temp files opened by the opener
    /// if there is one.
    Files(Option<TempOpener>),
}

impl Scenario {
    fn new(store: StoreKind) -> Self {
        Scenario {
            store,
            max_bytes: 1 << 30,
            reader_stall: READER_STALL,
            blob: (0, 0),
            announce_len: true,
        }
    }

    /// Over a store in memory.
    fn memory() -> Self {
        Self::new(StoreKind::Memory)
    }

    /// Over blob files in a temp directory.
    fn files() -> Self {
        Self::new(StoreKind::Files(None))
    }

    /// Over blob files whose temp files are opened by `opener` (a full or read-only disk).
    fn files_with_temp(opener: impl Fn(&Path) -> io::Result<File> + Send + Sync + 'static) -> Self {
        Self::new(StoreKind::Files(Some(Box::new(opener))))
    }

    /// The store's size limit (1 GiB unless set).
    fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How long a full window waits for a stalled reader.
    fn reader_stall(mut self, stall: Duration) -> Self {
        self.reader_stall = stall;
        self
    }

    /// The blob: `data(len, seed)` (empty unless set).
    fn blob(mut self, len: usize, seed: u8) -> Self {
        self.blob = (len, seed);
        self
    }

    /// Upstreams fed by hand send no `Content-Length`.
    fn no_content_length(mut self) -> Self {
        self.announce_len = false;
        self
    }

    fn build(self) -> Scene {
        let (store, memory, dir): (Arc<dyn BlobStore>, _, _) = match self.store {
            StoreKind::Memory => {
                let store = Arc::new(MemoryBlobStore::new(self.max_bytes));
                (store.clone(), Some(store), None)
            }
            StoreKind::Files(opener) => {
                let dir = tempfile::tempdir().unwrap();
                let store = match opener {
                    None => FsBlobStore::open(dir.path(), self.max_bytes),
                    Some(opener) => {
                        FsBlobStore::open_with_temp_opener(dir.path(), self.max_bytes, opener)
                    }
                };
                (Arc::new(store.unwrap()), None, Some(dir))
            }
        };
        let blob = data(self.blob.0, self.blob.1);
        Scene {
            cache: BlobCache::with_reader_stall(store, self.reader_stall),
            memory,
            dir,
            announced: self.announce_len.then_some(blob.len() as u64),
            digest: Digest::sha256_of(&blob),
            blob,
        }
    }
}

/// A cache, its store and the blob, ready for requests.
struct Scene {
    cache: BlobCache,
    /// The store, for [`Scenario::memory`].
    memory: Option<Arc<MemoryBlobStore>>,
    /// The store's directory, for [`Scenario::files`].
    dir: Option<tempfile::TempDir>,
    /// What an upstream fed by hand announces.
    announced: Option<u64>,
    blob: Vec<u8>,
    digest: Digest,
}

impl Scene {
    /// The store in memory, to make it fail.
    fn memory(&self) -> &MemoryBlobStore {
        self.memory
            .as_deref()
            .expect("a scenario over a store in memory")
    }

    /// The directory of the blob files.
    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("a scenario over files").path()
    }

    /// Stores `bytes` straight into the store, as an earlier download would have.
    async fn put(&self, bytes: &[u8]) -> Digest {
        put(&**self.cache.store(), bytes).await
    }

    /// The length of the blob in the store, asking the store itself (not the cache's
    /// `lookup`, which hides store errors).
    async fn stored_len(&self) -> Option<u64> {
        let stored = self.cache.store().open(&self.digest).await.unwrap();
        stored.map(|b| b.len)
    }

    /// Whether the store's `tmp/` is empty.
    fn temp_is_empty(&self) -> bool {
        std::fs::read_dir(self.dir().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    }

    /// The blob (or `range`) through the cache, from an upstream that has all of it at once.
    async fn fetch(&self, range: Option<ByteRange>) -> BlobResponse {
        fetch(&self.cache, &self.blob, range).await
    }

    /// A request that must not fetch: a hit or a joiner.
    async fn join(&self, range: Option<ByteRange>) -> BlobResponse {
        self.cache
            .get_or_fetch(&self.digest, range, never)
            .await
            .unwrap()
    }

    /// A request that fetches `upstream` unless it can hit or join.
    async fn lead(&self, range: Option<ByteRange>, upstream: UpstreamBlob) -> BlobResponse {
        self.cache
            .get_or_fetch(&self.digest, range, || ready(upstream))
            .await
            .unwrap()
    }

    /// A request that fetches from an upstream the test feeds by hand, which announces the
    /// blob's length unless the scenario says otherwise.
    async fn lead_by_hand(&self, range: Option<ByteRange>) -> (Upstream, BlobResponse) {
        let (up, upstream) = manual_upstream(self.announced);
        (up, self.lead(range, upstream).await)
    }

    /// Serves the blob to `n` concurrent clients and checks each got every byte.
    async fn serve_to_many(&self, n: usize) -> Vec<Outcome> {
        let (up, leader) = self.lead_by_hand(None).await;
        let mut responses = vec![leader];
        for _ in 1..n {
            responses.push(self.join(None).await);
        }
        let outcomes = responses.iter().map(|r| r.outcome.clone()).collect();
        let readers: Vec<_> = responses
            .into_iter()
            .map(|r| tokio::spawn(drain_ok(r.body)))
            .collect();
        for chunk in self.blob.chunks(100_000) {
            up.send(chunk);
            tokio::task::yield_now().await;
        }
        up.end();
        for reader in readers {
            assert!(reader.await.unwrap() == self.blob, "a client missed bytes");
        }
        outcomes
    }

    /// Sends the blob in 256 KiB chunks and reads the body along, checking after each chunk
    /// (once the client has read every byte of it the flight may release, so the flight has
    /// written it) that the files under the store's directory hold at most `max` bytes.
    /// Returns the body read and the most bytes seen on disk.
    async fn stream_checking_disk(
        &self,
        up: Upstream,
        mut body: BlobBody,
        max: u64,
    ) -> (Vec<u8>, u64) {
        let mut got = Vec::new();
        let mut most = 0;
        let mut sent = 0;
        for chunk in self.blob.chunks(256 * 1024) {
            up.send(chunk);
            sent += chunk.len();
            // The last byte received waits for the end (and the digest check).
            read_to(&mut body, &mut got, sent - 1).await;
            let on_disk = bytes_under(self.dir());
            assert!(
                on_disk <= max,
                "{on_disk} bytes on disk after {sent} received; the limit is {max}"
            );
            most = most.max(on_disk);
        }
        up.end();
        got.extend_from_slice(&drain_ok(body).await);
        (got, most)
    }
}

/// The test's end of an upstream body fed by hand.
struct Upstream(mpsc::UnboundedSender<io::Result<Bytes>>);

impl Upstream {
    fn send(&self, bytes: &[u8]) {
        self.0.send(Ok(Bytes::copy_from_slice(bytes))).unwrap();
    }

    /// Makes the body fail with `error`.
    fn fail(&self, error: io::Error) {
        self.0.send(Err(error)).unwrap();
    }

    /// Ends the body.
    fn end(self) {}
}

/// An upstream whose chunks the test sends by hand.
fn manual_upstream(len: Option<u64>) -> (Upstream, UpstreamBlob) {
    let (tx, rx) = mpsc::unbounded_channel();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (Upstream(tx), UpstreamBlob::new(len, body))
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
async fn fetch(cache: &BlobCache, blob: &[u8], range: Option<ByteRange>) -> BlobResponse {
    cache
        .get_or_fetch(&Digest::sha256_of(blob), range, || {
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

/// Reads `body` into `got` until it holds at least `len` bytes.
async fn read_to(body: &mut BlobBody, got: &mut Vec<u8>, len: usize) {
    while got.len() < len {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
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

fn range(h: &str) -> Option<ByteRange> {
    Some(ByteRange::parse(h).unwrap())
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

/// Opens `/dev/full`, where every write fails with `ENOSPC`.
fn dev_full(_: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/full")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_share_one_fetch() {
    let s = Scenario::files().blob(3 * 1024 * 1024 + 17, 1).build();
    let fetches = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (cache, digest, blob, fetches) = (
            s.cache.clone(),
            s.digest.clone(),
            s.blob.clone(),
            fetches.clone(),
        );
        tasks.spawn(async move {
            let upstream_blob = blob.clone();
            let response = cache
                .get_or_fetch(&digest, None, || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(paced_upstream(&upstream_blob, Duration::from_millis(1)))
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
    let stats = s.cache.stats();
    assert_eq!((stats.fetches, stats.joins + stats.hits), (1, 63));
    // The flight finishes (commit) shortly after the last byte is read.
    let hit = s.join(None).await;
    let hit = match hit.source {
        BlobSource::Hit => hit,
        _ => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.join(None).await
        }
    };
    assert_eq!(hit.source, BlobSource::Hit);
    assert_eq!(drain_ok(hit.body).await, s.blob);
}

#[tokio::test]
async fn a_joiner_gets_bytes_that_arrived_before_it_and_after() {
    let s = Scenario::files().blob(1_000_000, 2).build();
    let (up, leader) = s.lead_by_hand(None).await;
    assert_eq!(leader.source, BlobSource::Fetched);
    let mut leader_body = leader.body;
    up.send(&s.blob[..500_000]);
    // The leader sees the first half before the rest exists.
    let mut seen = Vec::new();
    read_to(&mut leader_body, &mut seen, 500_000).await;

    let joiner = s.join(None).await;
    assert_eq!(joiner.source, BlobSource::Joined);
    let late_range = s.join(range("bytes=700000-")).await;
    assert_eq!(
        late_range.range,
        BodyRange::Partial(ResolvedRange {
            start: 700_000,
            end: 999_999
        })
    );
    let early_range = s.join(range("bytes=100-199")).await;
    // Ranges that have arrived are served at once.
    assert_eq!(drain_ok(early_range.body).await, &s.blob[100..200]);

    let joiner_task = tokio::spawn(drain_ok(joiner.body));
    let range_task = tokio::spawn(drain_ok(late_range.body));
    up.send(&s.blob[500_000..]);
    up.end();
    seen.extend_from_slice(&drain_ok(leader_body).await);
    assert_eq!(seen, s.blob);
    assert_eq!(joiner_task.await.unwrap(), s.blob);
    assert_eq!(range_task.await.unwrap(), &s.blob[700_000..]);
    let stats = s.cache.stats();
    assert_eq!((stats.fetches, stats.joins), (1, 3));
}

#[tokio::test]
async fn ranges_on_a_cached_blob() {
    let s = Scenario::memory().blob(1024 * 1024, 3).build();
    s.put(&s.blob).await;
    let cases = [
        ("bytes=0-99", Some((0, 99))),
        ("bytes=1000-", Some((1000, 1024 * 1024 - 1))),
        ("bytes=-10", Some((1024 * 1024 - 10, 1024 * 1024 - 1))),
        ("bytes=5-99999999", Some((5, 1024 * 1024 - 1))),
        ("bytes=1048576-", None),
    ];
    for (header, want) in cases {
        let r = s.join(range(header)).await;
        assert_eq!(r.source, BlobSource::Hit);
        assert_eq!(r.len, Some(1024 * 1024));
        match want {
            Some((start, end)) => {
                assert_eq!(r.range, BodyRange::Partial(ResolvedRange { start, end }));
                assert_eq!(
                    drain_ok(r.body).await,
                    &s.blob[start as usize..=end as usize],
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
    assert_eq!(s.cache.lookup(&s.digest).await, Some(1024 * 1024));
    assert_eq!(s.cache.stats().hits, 5);
}

#[tokio::test]
async fn a_hit_from_files_names_the_file_range_of_its_body() {
    use std::os::unix::fs::FileExt as _;
    let s = Scenario::files().blob(300_000, 9).build();
    s.put(&s.blob).await;
    for (header, want) in [
        (None, Some(0..300_000)),
        (Some("bytes=7-1006"), Some(7..1007)),
    ] {
        let r = s.join(header.and_then(range)).await;
        let file = r.file.clone().expect("a file range for a hit from files");
        assert_eq!(Some(file.start..file.end), want);
        let mut from_file = vec![0; (file.end - file.start) as usize];
        file.file.read_exact_at(&mut from_file, file.start).unwrap();
        assert_eq!(from_file, drain_ok(r.body).await, "{header:?}");
    }
    let r = s.join(range("bytes=300000-")).await;
    assert!(r.file.is_none(), "an unsatisfiable range has no bytes");
    // The in-memory store has no files.
    let memory = Scenario::memory().blob(300_000, 9).build();
    memory.put(&memory.blob).await;
    let r = memory.join(None).await;
    assert!(r.file.is_none());
}

#[tokio::test]
async fn a_hit_streams_in_large_chunks() {
    let s = Scenario::files().blob(4 * READ_CHUNK + 1, 4).build();
    s.put(&s.blob).await;
    let response = s.join(None).await;
    let outcome = response.outcome.clone();
    let sizes: Vec<usize> = response.body.map(|c| c.unwrap().len()).collect().await;
    assert_eq!(sizes, [READ_CHUNK, READ_CHUNK, READ_CHUNK, READ_CHUNK, 1]);
    assert_eq!(outcome.wait().await, None);
}

#[tokio::test]
async fn an_upstream_of_unknown_length_is_served_whole() {
    let s = Scenario::memory()
        .blob(300_000, 5)
        .no_content_length()
        .build();
    let (up, response) = s.lead_by_hand(range("bytes=10-20")).await;
    // No length, no range: the whole blob with 200.
    assert_eq!((response.len, response.range), (None, BodyRange::Full));
    up.send(&s.blob);
    up.end();
    assert_eq!(drain_ok(response.body).await, s.blob);
    assert_eq!(response.outcome.wait().await, Some(FlightOutcome::Cached));
    assert!(s.stored_len().await.is_some());
}

#[tokio::test]
async fn a_digest_mismatch_is_never_cached_nor_delivered_whole() {
    let s = Scenario::files().blob(600_000, 6).build();
    let mut evil = s.blob.clone();
    evil[599_999] ^= 1;
    let (up, leader) = s.lead_by_hand(None).await;
    let joiner = s.join(None).await;
    up.send(&evil);
    up.end();
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
        matches!(&outcome, FlightOutcome::DigestMismatch(m) if m.expected == s.digest),
        "{outcome:?}"
    );
    let stats = s.cache.stats();
    assert_eq!((stats.digest_mismatches, stats.entries), (1, 0));
    assert!(s.temp_is_empty());
    // Not cached: the next request fetches again.
    let fetched = s.fetch(None).await;
    assert_eq!(fetched.source, BlobSource::Fetched);
    assert_eq!(drain_ok(fetched.body).await, s.blob);
    assert_eq!(fetched.outcome.wait().await, Some(FlightOutcome::Cached));
}

#[tokio::test]
async fn the_last_byte_waits_for_the_digest_check_even_when_every_byte_has_arrived() {
    let s = Scenario::files().blob(600_000, 6).build();
    let mut evil = s.blob.clone();
    evil[599_999] ^= 1;
    let (up, leader) = s.lead_by_hand(None).await;
    let mut body = leader.body;
    // Every byte arrives in one batch, but the upstream has not ended: the digest cannot be
    // checked yet, so the client gets all but the last byte and no more.
    up.send(&evil);
    let mut got = Vec::new();
    read_to(&mut body, &mut got, evil.len() - 1).await;
    assert_eq!(
        got.len(),
        evil.len() - 1,
        "the last byte went out unchecked"
    );
    up.end();
    let (rest, err) = drain(body).await;
    assert!(
        rest.is_empty(),
        "{} more bytes after the mismatch",
        rest.len()
    );
    assert!(matches!(
        flight_error(&err.expect("body must fail")),
        FlightError::DigestMismatch(_)
    ));
}

#[tokio::test]
async fn a_full_disk_still_serves_every_client_in_full() {
    let s = Scenario::files_with_temp(dev_full)
        .blob(2_000_000, 7)
        .build();
    let outcomes = s.serve_to_many(8).await;
    let outcome = outcomes[0].clone().wait().await.unwrap();
    assert!(
        matches!(&outcome, FlightOutcome::WriteFailed { error } if error.contains("No space")),
        "{outcome:?}"
    );
    let stats = s.cache.stats();
    assert_eq!(
        (stats.write_errors, stats.entries, stats.fetches),
        (1, 0, 1)
    );
    assert_eq!(s.cache.lookup(&s.digest).await, None);
    assert!(s.temp_is_empty());
}

#[tokio::test]
async fn an_upstream_body_without_a_length_cannot_fill_the_disk() {
    const MAX: u64 = 4 << 20;
    // A hostile upstream: no Content-Length and more than twice the cache.
    let s = Scenario::files()
        .max_bytes(MAX)
        .blob(10 << 20, 60)
        .no_content_length()
        .build();
    let mut old = Vec::new();
    for seed in 0..3 {
        old.push(s.put(&data(1 << 20, 50 + seed)).await);
    }
    let (up, response) = s.lead_by_hand(None).await;
    let outcome = response.outcome.clone();
    let (got, most) = s.stream_checking_disk(up, response.body, MAX).await;
    assert!(got == s.blob, "the client gets every byte");
    assert!(
        most > MAX - (1 << 20),
        "the download did reach the limit: {most}"
    );
    let outcome = outcome.wait().await.unwrap();
    assert!(
        matches!(&outcome, FlightOutcome::NoRoom { error } if error.contains("cache.max_size")),
        "{outcome:?}"
    );
    assert_eq!(s.cache.lookup(&s.digest).await, None, "nothing cached");
    for d in &old {
        assert_eq!(s.cache.lookup(d).await, None, "evicted to make room");
    }
    let stats = s.cache.stats();
    assert_eq!(
        (
            stats.no_room,
            stats.write_errors,
            stats.in_flight_bytes,
            stats.bytes
        ),
        (1, 0, 0, 0)
    );
    assert_eq!(bytes_under(s.dir()), 0);

    // The cache keeps working.
    let small = data(300_000, 61);
    let r = fetch(&s.cache, &small, None).await;
    assert_eq!(drain_ok(r.body).await, small);
    assert_eq!(r.outcome.wait().await, Some(FlightOutcome::Cached));
    assert_eq!(s.cache.stats().bytes, small.len() as u64);
}

#[tokio::test]
async fn a_blob_announced_larger_than_the_cache_is_never_written() {
    const MAX: u64 = 4 << 20;
    let s = Scenario::files().max_bytes(MAX).blob(5 << 20, 71).build();
    let kept = s.put(&data(1 << 20, 70)).await;
    let (up, response) = s.lead_by_hand(None).await;
    assert_eq!(response.len, Some(s.blob.len() as u64));
    let outcome = response.outcome.clone();
    // Never more than the blob already cached: no temp file at all.
    let (got, most) = s.stream_checking_disk(up, response.body, 1 << 20).await;
    assert!(got == s.blob, "the client gets every byte");
    assert_eq!(most, 1 << 20);
    assert!(matches!(
        outcome.wait().await,
        Some(FlightOutcome::NoRoom { .. })
    ));
    assert_eq!(s.cache.lookup(&s.digest).await, None);
    assert_eq!(
        s.cache.lookup(&kept).await,
        Some(1 << 20),
        "nothing evicted"
    );
    let stats = s.cache.stats();
    assert_eq!(
        (stats.no_room, stats.evictions, stats.write_errors),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn no_temp_file_at_all_still_serves_every_client() {
    let s = Scenario::files_with_temp(|_| Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem)))
        .blob(1_500_000, 8)
        .build();
    let outcomes = s.serve_to_many(4).await;
    assert!(matches!(
        outcomes[3].clone().wait().await,
        Some(FlightOutcome::WriteFailed { .. })
    ));
    let stats = s.cache.stats();
    assert_eq!(
        (stats.write_errors, stats.entries, stats.fetches),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn an_uncacheable_flight_that_dropped_bytes_takes_no_new_joiners() {
    let s = Scenario::memory().blob(600_000, 17).build();
    s.memory().fail_ingests(true);
    let (up, first) = s.lead_by_hand(None).await;
    let mut body = first.body;
    up.send(&s.blob[..300_000]);
    let mut seen = Vec::new();
    read_to(&mut body, &mut seen, 300_000).await;
    // The only reader is past those bytes, so they are gone from memory: a newcomer
    // cannot be served from this flight and fetches for itself.
    let second = s.fetch(None).await;
    assert_eq!(second.source, BlobSource::Fetched);
    up.send(&s.blob[300_000..]);
    up.end();
    seen.extend_from_slice(&drain_ok(body).await);
    assert_eq!(seen, s.blob);
    assert_eq!(drain_ok(second.body).await, s.blob);
    assert_eq!(s.cache.stats().fetches, 2);
}

#[tokio::test]
async fn a_disk_failing_midway_still_serves_every_client() {
    let s = Scenario::memory().blob(2_000_000, 9).build();
    s.memory().fail_writes_after(Some(700_000));
    let outcomes = s.serve_to_many(6).await;
    assert!(matches!(
        outcomes[0].clone().wait().await,
        Some(FlightOutcome::WriteFailed { .. })
    ));
    assert_eq!(s.cache.stats().write_errors, 1);
    assert!(s.stored_len().await.is_none());

    // Once that flight is over, a new request fetches anew.
    s.memory().fail_writes_after(None);
    let again = s.fetch(range("bytes=-5")).await;
    assert_eq!(again.source, BlobSource::Fetched);
    assert_eq!(drain_ok(again.body).await, &s.blob[s.blob.len() - 5..]);
    assert_eq!(again.outcome.wait().await, Some(FlightOutcome::Cached));
}

#[tokio::test]
async fn a_stalled_reader_of_an_uncacheable_download_is_cut_off() {
    let s = Scenario::memory()
        .reader_stall(Duration::from_millis(100))
        .blob((WINDOW_MAX as usize) * 2, 10)
        .build();
    s.memory().fail_ingests(true);
    let response = s.fetch(None).await;
    let stalled = s.join(None).await;
    let mut stalled_body = stalled.body;
    // Reads one chunk, then stops reading while the other client goes on.
    stalled_body.next().await.unwrap().unwrap();
    assert_eq!(drain_ok(response.body).await, s.blob);
    let (_, err) = drain(stalled_body).await;
    assert_eq!(flight_error(&err.expect("cut off")), &FlightError::TooSlow);
}

#[tokio::test]
async fn a_slow_reader_does_not_hold_up_a_cached_download() {
    let s = Scenario::memory().blob(3_000_000, 11).build();
    let fast = s.fetch(None).await;
    let slow = s.join(None).await;
    assert_eq!(drain_ok(fast.body).await, s.blob);
    assert_eq!(fast.outcome.wait().await, Some(FlightOutcome::Cached));
    assert!(s.stored_len().await.is_some());
    // The slow one still gets everything when it finally reads.
    assert_eq!(drain_ok(slow.body).await, s.blob);
}

#[tokio::test]
async fn clients_leaving_do_not_stop_the_download() {
    let s = Scenario::memory().blob(1_000_000, 12).build();
    let response = s
        .lead(None, paced_upstream(&s.blob, Duration::from_millis(1)))
        .await;
    let outcome = response.outcome.clone();
    drop(response);
    assert_eq!(outcome.wait().await, Some(FlightOutcome::Cached));
    assert!(s.stored_len().await.is_some());
}

#[tokio::test]
async fn an_upstream_failure_midway_fails_every_body_and_caches_nothing() {
    let s = Scenario::memory().blob(1_000_000, 13).build();
    let (up, leader) = s.lead_by_hand(None).await;
    let joiner = s.join(None).await;
    up.send(&s.blob[..400_000]);
    up.fail(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
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
    assert!(s.stored_len().await.is_none());
    assert_eq!(s.cache.stats().upstream_failures, 1);
    let again = s.fetch(None).await;
    assert_eq!(again.source, BlobSource::Fetched);
    assert_eq!(drain_ok(again.body).await, s.blob);
}

#[tokio::test]
async fn bodies_shorter_or_longer_than_announced_fail() {
    let s = Scenario::memory().blob(10_000, 14).build();
    for (announced, sent) in [(20_000u64, &s.blob[..]), (5_000, &s.blob[..])] {
        let sent = Bytes::copy_from_slice(sent);
        let upstream = UpstreamBlob::new(Some(announced), futures_util::stream::iter([Ok(sent)]));
        let r = s.lead(None, upstream).await;
        let (_, err) = drain(r.body).await;
        assert!(matches!(
            flight_error(&err.expect("must fail")),
            FlightError::Length { expected, .. } if *expected == announced
        ));
    }
    assert!(s.stored_len().await.is_none());
}

#[tokio::test]
async fn a_failed_fetch_goes_to_its_caller_and_waiters_use_their_own() {
    let s = Scenario::memory().blob(50_000, 15).build();
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
    let leader = {
        let (cache, digest) = (s.cache.clone(), s.digest.clone());
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
        let (cache, blob) = (s.cache.clone(), s.blob.clone());
        tokio::spawn(async move { fetch(&cache, &blob, None).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    fail_tx.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap_err(), "401 from upstream");
    let waiter = waiter.await.unwrap();
    assert_eq!(waiter.source, BlobSource::Fetched);
    assert_eq!(drain_ok(waiter.body).await, s.blob);
    assert_eq!(s.cache.stats().fetches, 2);
}

#[tokio::test]
async fn a_leader_that_goes_away_before_the_answer_releases_its_waiters() {
    let s = Scenario::memory().blob(50_000, 16).build();
    let leader = {
        let (cache, digest) = (s.cache.clone(), s.digest.clone());
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
        let (cache, blob) = (s.cache.clone(), s.blob.clone());
        tokio::spawn(async move { fetch(&cache, &blob, None).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    leader.abort();
    let waiter = waiter.await.unwrap();
    assert_eq!(drain_ok(waiter.body).await, s.blob);
}

#[tokio::test]
async fn an_empty_blob_is_fetched_verified_and_cached() {
    let s = Scenario::memory().build();
    assert_eq!(s.digest, Digest::sha256_of(b""));
    let r = s
        .lead(
            None,
            UpstreamBlob::new(Some(0), futures_util::stream::empty()),
        )
        .await;
    assert!(drain_ok(r.body).await.is_empty());
    assert_eq!(r.outcome.wait().await, Some(FlightOutcome::Cached));
    assert_eq!(s.stored_len().await, Some(0));
}

#[tokio::test]
async fn a_registered_flight_finds_a_blob_stored_meanwhile() {
    let s = Scenario::memory().blob(10_000, 18).build();
    // As if another flight committed between this request's miss and its registration.
    let (slot, leading) = s.cache.inner.join_or_register(&s.digest);
    assert!(leading);
    s.put(&s.blob).await;
    let joiner = s.join(range("bytes=0-9"));
    let r = s.cache.lead(slot, None, never).await.unwrap();
    assert_eq!(r.source, BlobSource::Hit);
    assert_eq!(
        r.outcome.clone().wait().await,
        Some(FlightOutcome::AlreadyCached)
    );
    assert_eq!(drain_ok(r.body).await, s.blob);
    assert_eq!(drain_ok(joiner.await.body).await, &s.blob[..10]);
    assert_eq!(s.cache.stats().fetches, 0);
}
