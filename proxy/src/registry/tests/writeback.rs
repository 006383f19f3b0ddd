//! Write-back: what upstreams served goes into the hub (by policy, never a manifest without its
//! blobs, an index only whole), and a failing hub never fails a pull.

use super::*;

/// Waits until `hub_repo` of the fake hub holds every one of `digests`.
async fn pushed(hub: &FakeHub, hub_repo: &str, digests: &[Digest]) {
    until(&format!("{hub_repo} holds {digests:?}"), async || {
        let there = hub.pushed_to(hub_repo);
        digests.iter().all(|d| there.contains(d))
    })
    .await;
}

#[tokio::test]
async fn a_public_image_from_upstream_is_written_back_and_the_next_node_gets_hub_hits() {
    let w = World::with_write_back(Policy::Public);
    let img = Image::new("wb", &[3000, 500]);
    w.up.push(HUB, "library/wb", None, "v1", &img);
    w.pull(HUB, "library/wb", "v1", &img, None).await;
    let all = [img.layer(0), img.layer(1), img.digest.clone()];
    pushed(&w.hub, "library/wb", &all).await;
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 2);
    // Another node: the tag is still asked of the upstream (tags are not written back), the
    // manifest and every layer come from the hub.
    let other = World::node(w.up.clone(), w.hub.clone(), None);
    let hub_gets = w.hub.count("GET blobs");
    other.pull(HUB, "library/wb", "v1", &img, None).await;
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        2,
        "no upstream blob download"
    );
    assert_eq!(
        w.hub.count("GET blobs"),
        hub_gets + 2,
        "both layers from the hub"
    );
}

#[tokio::test]
async fn private_images_are_written_back_only_with_all() {
    for (policy, expect) in [(Policy::Public, false), (Policy::All, true)] {
        let w = World::with_write_back(policy);
        let img = Image::new("secret-wb", &[700]);
        w.up.push(HUB, "alice/wb", Some(ALICE), "v1", &img);
        w.pull(HUB, "alice/wb", "v1", &img, Some(ALICE)).await;
        if expect {
            pushed(&w.hub, "alice/wb", &[img.layer(0), img.digest.clone()]).await;
        } else {
            // The job ends (skipped) without a byte pushed.
            until("the job ended", async || {
                w.proxy.write_back.as_ref().unwrap().pending() == 0
            })
            .await;
            assert_eq!(w.proxy.write_back.as_ref().unwrap().pending(), 0);
            assert!(w.hub.pushed_to("alice/wb").is_empty(), "{policy:?}");
        }
    }
}

#[tokio::test]
async fn a_job_waits_for_blobs_still_being_pulled() {
    let w = World::with_write_back(Policy::Public);
    let img = Image::new("slowpull", &[900, 100]);
    w.up.push(QUAY, "x/slow", None, "v1", &img);
    // Only the manifest so far: nothing can be pushed (never a manifest without its blobs).
    let got = w.manifest(QUAY, "x/slow", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(w.hub.pushed_to("x/slow").is_empty());
    // The client goes on with the layers: then it all goes in.
    for i in 0..2 {
        w.blob(QUAY, "x/slow", &img.layer(i), &[]).await;
    }
    pushed(
        &w.hub,
        "x/slow",
        &[img.layer(0), img.layer(1), img.digest.clone()],
    )
    .await;
}

#[tokio::test]
async fn a_hub_that_refuses_pushes_never_fails_a_pull() {
    let w = World::with_write_back(Policy::All);
    w.hub.read_only.store(true, Ordering::SeqCst);
    let img = Image::new("ro", &[400]);
    w.up.push(QUAY, "x/ro", None, "v1", &img);
    w.pull(QUAY, "x/ro", "v1", &img, None).await;
    w.pull(QUAY, "x/ro", "v1", &img, None).await;
    assert!(w.hub.pushed_to("x/ro").is_empty());
}

#[tokio::test]
async fn an_index_goes_in_only_with_every_platform_and_the_held_ones_go_in_anyway() {
    let w = World::with_write_back(Policy::Public);
    let (amd, arm) = (Image::new("amd", &[300]), Image::new("arm", &[310]));
    let index = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":{}}},{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
        media_type::OCI_INDEX,
        media_type::OCI_MANIFEST,
        amd.digest,
        amd.manifest.len(),
        media_type::OCI_MANIFEST,
        arm.digest,
        arm.manifest.len()
    ));
    let index_digest = Digest::sha256_of(&index);
    w.up.push(QUAY, "multi/app", None, "amd", &amd);
    w.up.push(QUAY, "multi/app", None, "arm", &arm);
    {
        let mut regs = w.up.registries.lock().unwrap();
        let repo = regs
            .get_mut(QUAY)
            .unwrap()
            .repos
            .get_mut("multi/app")
            .unwrap();
        repo.manifests.insert(index_digest.clone(), index.clone());
        repo.tags.insert("v1".into(), index_digest.clone());
    }
    // This node is amd64: the index, then its platform's manifest and layer.
    let got = w.manifest(QUAY, "multi/app", "v1", &[]).await;
    assert_eq!(got.body, index);
    w.manifest(QUAY, "multi/app", &amd.digest.to_string(), &[])
        .await;
    w.blob(QUAY, "multi/app", &amd.layer(0), &[]).await;
    pushed(&w.hub, "multi/app", &[amd.layer(0), amd.digest.clone()]).await;
    // The arm platform was never on this node: the index must not be in the hub (it would be an
    // image whose arm manifest is missing).
    until("the job ended", async || {
        w.proxy.write_back.as_ref().unwrap().pending() == 0
    })
    .await;
    let there = w.hub.pushed_to("multi/app");
    assert!(!there.contains(&index_digest), "{there:?}");
    assert!(!there.contains(&arm.digest));
}

#[tokio::test]
async fn jobs_survive_a_restart_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let w = World::new();
    let img = Image::new("restart", &[600]);
    w.up.push(QUAY, "x/restart", None, "v1", &img);
    w.hub.down.store(true, Ordering::SeqCst);
    // Node one pulls with the hub down: the job stays in its records.
    let cache = Arc::new(
        Cache::open(&crate::cache::CacheSettings {
            dir: dir.path().into(),
            max_bytes: 64 << 20,
        })
        .await
        .unwrap(),
    );
    {
        let proxy = RegistryProxy::new(
            Some(w.hub.clone()),
            w.up.clone(),
            cache.clone(),
            Duration::from_secs(30),
        )
        .with_write_back(WriteBack::start_with(
            w.hub.clone(),
            cache.clone(),
            Policy::Public,
            Jobs::open(dir.path()).unwrap(),
            1 << 30,
            Duration::from_secs(3600),
        ));
        let node = World {
            proxy,
            up: w.up.clone(),
            hub: w.hub.clone(),
            cache: cache.clone(),
        };
        node.pull(QUAY, "x/restart", "v1", &img, None).await;
    }
    assert!(w.hub.pushed_to("x/restart").is_empty());
    // "Restart": a new write-back over the same records, the hub back.
    w.hub.down.store(false, Ordering::SeqCst);
    let _wb = WriteBack::start_with(
        w.hub.clone(),
        cache,
        Policy::Public,
        Jobs::open(dir.path()).unwrap(),
        1 << 30,
        Duration::from_millis(20),
    );
    pushed(&w.hub, "x/restart", &[img.layer(0), img.digest.clone()]).await;
}
