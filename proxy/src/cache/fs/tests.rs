//! Tests of the file store: layout, eviction, rebuild at start-up, verification, full disks
//! and file modes.

use std::{fs, time::SystemTime};

use bytes::Bytes;

use super::*;
use crate::cache::conformance::{data, put, read};

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn blobs_live_at_their_digest_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
    let bytes = data(3000, 1);
    let digest = put(&store, &bytes).await;
    let path = dir.path().join("blobs/sha256").join(digest.encoded());
    assert_eq!(store.path_of(&digest), path);
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn uncommitted_temp_files_are_deleted_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
    let digest = Digest::sha256_of(b"abc");
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    ingest.write(vec![Bytes::from_static(b"ab")]).await.unwrap();
    assert_eq!(files_in(&dir.path().join("tmp")).len(), 1);
    drop(ingest);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
}

#[tokio::test]
async fn eviction_deletes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 2 * 1024).unwrap();
    let a = put(&store, &data(1024, 1)).await;
    let b = put(&store, &data(1024, 2)).await;
    let c = put(&store, &data(1024, 3)).await;
    store.run_pending_tasks();
    assert!(!store.path_of(&a).exists(), "oldest blob's file is gone");
    assert!(store.path_of(&b).exists() && store.path_of(&c).exists());
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries, usage.evictions), (2048, 2, 1));
    store.remove(&b);
    store.run_pending_tasks();
    assert!(!store.path_of(&b).exists(), "explicit removal deletes too");
    assert_eq!(store.usage().evictions, 1, "a removal is not an eviction");
}

#[tokio::test]
async fn reopen_rebuilds_the_index_and_cleans_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (a, b) = {
        let store = FsBlobStore::open(root, 1 << 20).unwrap();
        (
            put(&store, &data(3000, 1)).await,
            put(&store, &data(5000, 2)).await,
        )
    };
    // What a crash or a stranger could leave behind.
    fs::write(root.join("tmp/sha256-abc.1.2"), b"partial").unwrap();
    fs::create_dir(root.join("tmp/dir")).unwrap();
    fs::write(root.join("blobs/sha256/not-a-digest"), b"x").unwrap();
    fs::write(root.join("blobs/sha256").join("A".repeat(64)), b"x").unwrap();
    fs::write(root.join("blobs/sha512").join("a".repeat(64)), b"x").unwrap();
    fs::create_dir_all(root.join("blobs/md5/x")).unwrap();
    fs::create_dir(root.join("blobs/sha256").join("b".repeat(64))).unwrap();

    let store = FsBlobStore::open(root, 1 << 20).unwrap();
    assert!(files_in(&root.join("tmp")).is_empty());
    assert_eq!(files_in(&root.join("blobs")), ["sha256", "sha512"]);
    assert_eq!(files_in(&root.join("blobs/sha256")), {
        let mut v = vec![a.encoded().to_owned(), b.encoded().to_owned()];
        v.sort();
        v
    });
    assert!(files_in(&root.join("blobs/sha512")).is_empty());
    let usage = store.usage();
    assert_eq!((usage.bytes, usage.entries), (8000, 2));
    let blob = store.open(&b).await.unwrap().unwrap();
    assert_eq!(read(&*blob.content, 0, 5000).await, data(5000, 2));
}

#[tokio::test]
async fn reopen_with_a_smaller_limit_evicts_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = {
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        let old = put(&store, &data(1024, 1)).await;
        let new = put(&store, &data(1024, 2)).await;
        (old, new)
    };
    let past = SystemTime::now() - std::time::Duration::from_secs(3600);
    File::options()
        .write(true)
        .open(dir.path().join("blobs/sha256").join(old.encoded()))
        .unwrap()
        .set_modified(past)
        .unwrap();
    let store = FsBlobStore::open(dir.path(), 1024).unwrap();
    assert!(store.open(&old).await.unwrap().is_none());
    assert!(!store.path_of(&old).exists());
    assert!(store.open(&new).await.unwrap().is_some());
}

#[tokio::test]
async fn corrupt_files_found_at_start_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (tampered, truncated, good) = {
        let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
        (
            put(&store, &data(4000, 1)).await,
            put(&store, &data(4000, 2)).await,
            put(&store, &data(4000, 3)).await,
        )
    };
    let path = |d: &Digest| dir.path().join("blobs/sha256").join(d.encoded());
    let mut bytes = data(4000, 1);
    bytes[100] ^= 0xff;
    fs::write(path(&tampered), &bytes).unwrap();
    fs::write(path(&truncated), &data(4000, 2)[..10]).unwrap();

    let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
    // Verified on first use, before a byte is served.
    assert!(store.open(&tampered).await.unwrap().is_none());
    assert!(!path(&tampered).exists());
    assert!(store.open(&tampered).await.unwrap().is_none());
    // The background pass catches the rest.
    assert_eq!(store.verify_pending().await, 1);
    assert!(!path(&truncated).exists());
    assert!(store.open(&good).await.unwrap().is_some());
    let usage = store.usage();
    assert_eq!((usage.entries, usage.corrupt), (1, 2));
}

#[tokio::test]
async fn a_file_changed_after_verification_is_dropped_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
    let digest = put(&store, &data(4000, 1)).await;
    fs::write(store.path_of(&digest), b"short").unwrap();
    assert!(store.open(&digest).await.unwrap().is_none());
    assert!(!store.path_of(&digest).exists());
    let other = put(&store, &data(4000, 2)).await;
    fs::remove_file(store.path_of(&other)).unwrap();
    assert!(
        store.open(&other).await.unwrap().is_none(),
        "deleted behind our back"
    );
    assert_eq!(store.usage().entries, 0);
}

#[tokio::test]
async fn a_full_disk_fails_the_write_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open_with_temp_opener(dir.path(), 1 << 20, |_| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
    })
    .unwrap();
    let digest = Digest::sha256_of(b"abc");
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    let err = ingest
        .write(vec![Bytes::from_static(b"abc")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CacheError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    drop(ingest);
    assert!(store.open(&digest).await.unwrap().is_none());
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(store.usage(), StoreUsage::default());
}

#[tokio::test]
async fn a_blob_announced_over_the_limit_gets_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 1 << 20).unwrap();
    let digest = Digest::sha256_of(b"big");
    let err = store
        .ingest(&digest, Some((1 << 20) + 1))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    // Exactly the limit fits.
    assert!(store.ingest(&digest, Some(1 << 20)).await.is_ok());
}

#[tokio::test]
async fn temp_files_never_hold_more_than_their_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path(), 3 << 20).unwrap();
    let endless = data(512 * 1024, 9);
    let digest = Digest::sha256_of(b"never ends");
    let mut ingest = store.ingest(&digest, None).await.unwrap();
    let tmp = dir.path().join("tmp");
    let on_disk = || -> u64 {
        fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let mut batches = 0;
    let err = loop {
        match ingest.write(vec![Bytes::copy_from_slice(&endless)]).await {
            Ok(()) => batches += 1,
            Err(e) => break e,
        }
        assert!(on_disk() <= store.usage().in_flight);
        assert!(store.usage().in_flight <= 3 << 20);
    };
    assert_eq!(batches, 6, "3 MiB in 512 KiB batches, then no more");
    assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
    assert_eq!(on_disk(), 3 << 20, "the refused batch was not written");
    drop(ingest);
    assert_eq!(on_disk(), 0);
}

#[tokio::test]
async fn state_is_root_only_and_an_old_world_readable_cache_is_narrowed() {
    use std::os::unix::fs::PermissionsExt;

    use crate::private_state::{tests::mode_of, too_open};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let digest = {
        let store = FsBlobStore::open(&root, 1 << 20).unwrap();
        let digest = put(&store, &data(3000, 1)).await;
        let mut ingest = store.ingest(&Digest::sha256_of(b"x"), None).await.unwrap();
        ingest.write(vec![Bytes::from_static(b"x")]).await.unwrap();
        let temp = fs::read_dir(root.join("tmp")).unwrap().next().unwrap();
        assert_eq!(mode_of(&temp.unwrap().path()), 0o600);
        assert_eq!(too_open(&root).unwrap(), [], "as created");
        digest
    };
    // What an older version (umask 022, no explicit modes) left behind.
    let old = |p: &Path, mode| fs::set_permissions(p, fs::Permissions::from_mode(mode));
    for d in ["", "blobs", "blobs/sha256", "blobs/sha512", "tmp"] {
        old(&root.join(d), 0o755).unwrap();
    }
    let blob = root.join("blobs/sha256").join(digest.encoded());
    old(&blob, 0o644).unwrap();
    let store = FsBlobStore::open(&root, 1 << 20).unwrap();
    assert_eq!(too_open(&root).unwrap(), [], "narrowed at open");
    assert!(store.open(&digest).await.unwrap().is_some());
}
