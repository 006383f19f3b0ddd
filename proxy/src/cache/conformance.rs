//! One conformance suite for every `BlobStore`: the real store and the fake must behave alike,
//! or tests of the layers above would prove nothing.

use std::{any::Any, sync::Arc};

use bytes::Bytes;

use super::{
    BlobIngest, BlobRead, BlobStore, CacheError, FsBlobStore, MemoryBlobStore, StoreUsage,
    store::reserve_step,
};
use crate::oci::{Digest, Verified};

/// A store under test and whatever must live as long as it (a temp dir).
pub(super) type Made = (Arc<dyn BlobStore>, Box<dyn Any>);

/// Writes and commits `data` (in a few batches) and returns its digest.
pub(super) async fn put(store: &dyn BlobStore, data: &[u8]) -> Digest {
    let digest = Digest::sha256_of(data);
    let mut ingest = store
        .ingest(&digest, Some(data.len() as u64))
        .await
        .unwrap();
    let mut verifier = digest.verifier();
    for part in data.chunks(1000) {
        verifier.update(part);
        ingest
            .write(vec![Bytes::copy_from_slice(part)])
            .await
            .unwrap();
    }
    ingest.commit(verifier.finish().unwrap()).await.unwrap();
    digest
}

/// Reads `len` bytes at `offset` however the store splits them.
pub(super) async fn read(content: &dyn BlobRead, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < len {
        let chunk = content
            .read_at(offset + out.len() as u64, len - out.len())
            .await
            .unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    out
}

pub(super) fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(super) async fn missing_blob_is_none(store: Arc<dyn BlobStore>) {
    let digest = Digest::sha256_of(b"never stored");
    assert!(store.open(&digest).await.unwrap().is_none());
    assert_eq!(store.usage(), StoreUsage::default());
}

pub(super) async fn committed_blob_reads_back(store: Arc<dyn BlobStore>) {
    let bytes = data(10_000, 1);
    let digest = put(&*store, &bytes).await;
    let blob = store.open(&digest).await.unwrap().unwrap();
    assert_eq!(blob.len, 10_000);
    assert_eq!(read(&*blob.content, 0, 10_000).await, bytes);
    assert_eq!(read(&*blob.content, 1234, 100).await, &bytes[1234..1334]);
    assert_eq!(read(&*blob.content, 9_990, 100).await, &bytes[9_990..]);
    assert!(blob.content.read_at(10_000, 10).await.unwrap().is_empty());
    assert!(blob.content.read_at(u64::MAX, 10).await.unwrap().is_empty());
    let usage = store.usage();
    assert_eq!(
        (usage.bytes, usage.entries, usage.in_flight),
        (10_000, 1, 0)
    );
}

pub(super) async fn empty_blob_is_a_blob(store: Arc<dyn BlobStore>) {
    let digest = put(&*store, b"").await;
    let blob = store.open(&digest).await.unwrap().unwrap();
    assert_eq!(blob.len, 0);
    assert!(blob.content.read_at(0, 10).await.unwrap().is_empty());
}

pub(super) async fn nothing_is_visible_before_commit(store: Arc<dyn BlobStore>) {
    let bytes = data(5000, 2);
    let digest = Digest::sha256_of(&bytes);
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    ingest
        .write(vec![Bytes::copy_from_slice(&bytes[..2500])])
        .await
        .unwrap();
    assert!(store.open(&digest).await.unwrap().is_none());
    // The ingest's own reader follows what was written so far.
    assert_eq!(ingest.written(), 2500);
    let content = ingest.content();
    assert_eq!(read(&*content, 0, 2500).await, &bytes[..2500]);
    ingest
        .write(vec![Bytes::copy_from_slice(&bytes[2500..])])
        .await
        .unwrap();
    assert_eq!(read(&*content, 2500, 2500).await, &bytes[2500..]);
    assert!(store.usage().in_flight >= 5000, "room is reserved ahead");
    drop(ingest);
    assert!(store.open(&digest).await.unwrap().is_none());
    assert_eq!(
        store.usage(),
        StoreUsage::default(),
        "dropping releases the room"
    );
}

pub(super) async fn commit_demands_the_right_proof(store: Arc<dyn BlobStore>) {
    let bytes = data(3000, 3);
    let digest = Digest::sha256_of(&bytes);

    // A proof for other content.
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    ingest
        .write(vec![Bytes::copy_from_slice(&bytes)])
        .await
        .unwrap();
    let other = Digest::sha256_of(b"other");
    let mut v = other.verifier();
    v.update(b"other");
    let err = ingest.commit(v.finish().unwrap()).await.unwrap_err();
    assert!(matches!(err, CacheError::Unverified { .. }), "{err}");

    // A proof for the digest, but not for what was written (only half arrived).
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    ingest
        .write(vec![Bytes::copy_from_slice(&bytes[..1500])])
        .await
        .unwrap();
    let mut v = digest.verifier();
    v.update(&bytes);
    let err = ingest.commit(v.finish().unwrap()).await.unwrap_err();
    assert!(matches!(err, CacheError::Unverified { .. }), "{err}");

    assert!(store.open(&digest).await.unwrap().is_none());
    assert_eq!(store.usage().entries, 0);
}

pub(super) async fn remove_forgets_but_open_readers_keep_reading(store: Arc<dyn BlobStore>) {
    let bytes = data(4000, 4);
    let digest = put(&*store, &bytes).await;
    let blob = store.open(&digest).await.unwrap().unwrap();
    store.remove(&digest);
    assert!(store.open(&digest).await.unwrap().is_none());
    assert_eq!(read(&*blob.content, 0, 4000).await, bytes);
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries, usage.evictions), (0, 0, 0));
}

pub(super) async fn committing_twice_keeps_one_entry(store: Arc<dyn BlobStore>) {
    let bytes = data(2048, 5);
    let digest = put(&*store, &bytes).await;
    put(&*store, &bytes).await;
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries), (2048, 1));
    let blob = store.open(&digest).await.unwrap().unwrap();
    assert_eq!(read(&*blob.content, 0, 2048).await, bytes);
}

/// Made with room for three 1 KiB blobs.
pub(super) async fn least_recently_used_is_evicted(store: Arc<dyn BlobStore>) {
    let a = put(&*store, &data(1024, 10)).await;
    let b = put(&*store, &data(1024, 11)).await;
    let c = put(&*store, &data(1024, 12)).await;
    assert!(store.open(&a).await.unwrap().is_some());
    let d = put(&*store, &data(1024, 13)).await;
    assert!(
        store.open(&b).await.unwrap().is_none(),
        "b was least recently used"
    );
    for kept in [&a, &c, &d] {
        assert!(store.open(kept).await.unwrap().is_some());
    }
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries, usage.evictions), (3072, 3, 1));
}

const MIB: usize = 1024 * 1024;

/// Writes `bytes` in one batch.
async fn write(ingest: &mut Box<dyn BlobIngest>, bytes: &[u8]) -> Result<(), CacheError> {
    ingest.write(vec![Bytes::copy_from_slice(bytes)]).await
}

fn proof_of(bytes: &[u8]) -> Verified {
    let mut verifier = Digest::sha256_of(bytes).verifier();
    verifier.update(bytes);
    verifier.finish().unwrap()
}

/// Made with room for 4 MiB.
pub(super) async fn bytes_being_written_count_toward_the_limit(store: Arc<dyn BlobStore>) {
    let step = reserve_step(4 * MIB as u64);
    let a = put(&*store, &data(MIB, 20)).await;
    let b = put(&*store, &data(MIB, 21)).await;
    let big = data(2 * MIB + MIB / 2, 22);
    let digest = Digest::sha256_of(&big);
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    write(&mut ingest, &big[..1000]).await.unwrap();
    let usage = store.usage();
    assert_eq!(
        (usage.bytes, usage.in_flight, usage.evictions),
        (2 * MIB as u64, step, 0),
        "one step reserved ahead, beside both blobs"
    );
    // 2.5 MiB written need more room than is left: the least recently used blob makes way.
    write(&mut ingest, &big[1000..]).await.unwrap();
    assert!(store.open(&a).await.unwrap().is_none(), "a was evicted");
    assert!(store.open(&b).await.unwrap().is_some());
    let usage = store.usage();
    assert_eq!(
        (usage.bytes, usage.entries, usage.in_flight, usage.evictions),
        (MIB as u64, 1, (big.len() as u64).next_multiple_of(step), 1)
    );
    // The commit swaps the reservation for the blob's exact size, evicting nothing more.
    ingest.commit(proof_of(&big)).await.unwrap();
    let usage = store.usage();
    assert_eq!(
        (usage.bytes, usage.entries, usage.in_flight, usage.evictions),
        (MIB as u64 + big.len() as u64, 2, 0, 1)
    );
    assert!(store.open(&b).await.unwrap().is_some());
    let blob = store.open(&digest).await.unwrap().unwrap();
    assert_eq!(read(&*blob.content, 0, big.len()).await, big);
}

/// Made with room for 2 MiB.
pub(super) async fn a_blob_larger_than_the_limit_is_never_written_past_it(
    store: Arc<dyn BlobStore>,
) {
    let big = data(3 * MIB, 30);
    let digest = Digest::sha256_of(&big);
    // Announced larger: refused before a byte is written.
    let err = store
        .ingest(&digest, Some(big.len() as u64))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, CacheError::TooLarge { len, .. } if len == big.len() as u64),
        "{err}"
    );
    assert!(err.is_no_room());
    // Not announced (no Content-Length): written until it would not fit even alone.
    let kept = put(&*store, &data(MIB, 31)).await;
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    write(&mut ingest, &big[..MIB + MIB / 2]).await.unwrap();
    assert!(
        store.open(&kept).await.unwrap().is_none(),
        "evicted for room"
    );
    assert_eq!(store.usage().in_flight, (MIB + MIB / 2) as u64);
    let err = write(&mut ingest, &big[MIB + MIB / 2..]).await.unwrap_err();
    assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
    assert_eq!(store.usage().in_flight, 0, "released at once");
    assert_eq!(ingest.written(), (MIB + MIB / 2) as u64);
    // Unusable after the error, whatever is written.
    let err = write(&mut ingest, b"x").await.unwrap_err();
    assert!(err.is_no_room(), "{err}");
    drop(ingest);
    assert!(store.open(&digest).await.unwrap().is_none());
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries, usage.in_flight), (0, 0, 0));
}

/// Made with room for 4 MiB.
pub(super) async fn ingests_in_flight_cannot_overcommit_the_limit(store: Arc<dyn BlobStore>) {
    let first = data(2 * MIB + 1000, 40);
    let second = data(2 * MIB + 1000, 41);
    let mut one = store
        .ingest(&Digest::sha256_of(&first), None)
        .await
        .unwrap();
    let mut two = store
        .ingest(&Digest::sha256_of(&second), None)
        .await
        .unwrap();
    let step = reserve_step(4 * MIB as u64);
    write(&mut one, &first[..2 * MIB]).await.unwrap();
    write(&mut two, &second[..2 * MIB]).await.unwrap();
    assert_eq!(store.usage().in_flight, 4 * MIB as u64);
    // The first grows past what is left: the least recently grown reservation gives way.
    write(&mut one, &first[2 * MIB..]).await.unwrap();
    assert_eq!(store.usage().in_flight, 2 * MIB as u64 + step);
    let err = write(&mut two, &second[2 * MIB..]).await.unwrap_err();
    assert!(matches!(err, CacheError::NoRoom { .. }), "{err}");
    drop(two);
    assert_eq!(store.usage().in_flight, 2 * MIB as u64 + step);
    one.commit(proof_of(&first)).await.unwrap();
    let usage = store.usage();
    assert_eq!(
        (usage.bytes, usage.entries, usage.in_flight, usage.evictions),
        (first.len() as u64, 1, 0, 0),
        "a reservation taken back is not a blob evicted"
    );
    assert!(
        store
            .open(&Digest::sha256_of(&second))
            .await
            .unwrap()
            .is_none()
    );
}

/// Runs every check against one kind of store; `$make(max_bytes)` returns a [`Made`].
macro_rules! blob_store_conformance {
    ($kind:ident, $make:expr) => {
        mod $kind {
            use super::*;

            fn make(max_bytes: u64) -> Made {
                ($make)(max_bytes)
            }

            #[tokio::test]
            async fn missing_blob_is_none() {
                let (store, _keep) = make(1 << 20);
                super::missing_blob_is_none(store).await;
            }

            #[tokio::test]
            async fn committed_blob_reads_back() {
                let (store, _keep) = make(1 << 20);
                super::committed_blob_reads_back(store).await;
            }

            #[tokio::test]
            async fn empty_blob_is_a_blob() {
                let (store, _keep) = make(1 << 20);
                super::empty_blob_is_a_blob(store).await;
            }

            #[tokio::test]
            async fn nothing_is_visible_before_commit() {
                let (store, _keep) = make(1 << 20);
                super::nothing_is_visible_before_commit(store).await;
            }

            #[tokio::test]
            async fn commit_demands_the_right_proof() {
                let (store, _keep) = make(1 << 20);
                super::commit_demands_the_right_proof(store).await;
            }

            #[tokio::test]
            async fn remove_forgets_but_open_readers_keep_reading() {
                let (store, _keep) = make(1 << 20);
                super::remove_forgets_but_open_readers_keep_reading(store).await;
            }

            #[tokio::test]
            async fn committing_twice_keeps_one_entry() {
                let (store, _keep) = make(1 << 20);
                super::committing_twice_keeps_one_entry(store).await;
            }

            #[tokio::test]
            async fn least_recently_used_is_evicted() {
                let (store, _keep) = make(3 * 1024);
                super::least_recently_used_is_evicted(store).await;
            }

            #[tokio::test]
            async fn bytes_being_written_count_toward_the_limit() {
                let (store, _keep) = make(4 * MIB as u64);
                super::bytes_being_written_count_toward_the_limit(store).await;
            }

            #[tokio::test]
            async fn a_blob_larger_than_the_limit_is_never_written_past_it() {
                let (store, _keep) = make(2 * MIB as u64);
                super::a_blob_larger_than_the_limit_is_never_written_past_it(store).await;
            }

            #[tokio::test]
            async fn ingests_in_flight_cannot_overcommit_the_limit() {
                let (store, _keep) = make(4 * MIB as u64);
                super::ingests_in_flight_cannot_overcommit_the_limit(store).await;
            }
        }
    };
}

blob_store_conformance!(memory, |max_bytes| -> Made {
    (Arc::new(MemoryBlobStore::new(max_bytes)), Box::new(()))
});

blob_store_conformance!(fs, |max_bytes| -> Made {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), max_bytes).unwrap();
    (Arc::new(store), Box::new(dir))
});
