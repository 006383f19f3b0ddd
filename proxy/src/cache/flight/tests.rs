//! Tests of the blob cache: single-flight sharing, ranges, hits, digest mismatches, failing
//! disks and upstreams, slow and departing readers.

use std::{convert::Infallible, io, path::Path, sync::atomic::AtomicUsize};

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
        let upstream = UpstreamBlob::new(Some(announced), futures_util::stream::iter([Ok(sent)]));
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
