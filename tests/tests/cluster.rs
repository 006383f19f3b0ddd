//! Pull once per cluster, on the cluster test bed (`harness::cluster`): four nodes, each with its
//! own pullproxy and unmodified containerd, one shared sealos hub and a fake internet on one
//! bridge. With write-back, an image the internet serves to one node goes into the hub and every
//! other node gets hub hits; the node tier keeps what the hub served, so with the hub down every
//! image pulled before still pulls. Everything is counted from the internet's and the hub's own
//! access logs (bytes per blob) and each node's logs and metrics.

use std::{collections::BTreeSet, time::Instant};

use harness::{
    cluster::{Cluster, ClusterNode, SETTLE_TIMEOUT, pull_once_image},
    containerd::CTR_NAMESPACE,
    images::{self, Format, Image},
    registry::BlobTraffic,
    require_root,
    world::{PRIVATE_PASSWORD, PRIVATE_USER},
};
use serde_json::Value;

const NODES: usize = 4;
/// The public image, as the internet (the fake Docker Hub) holds it.
const REPO: &str = "library/app";
const NAME: &str = "docker.io/library/app:1.0";

/// Every blob record of `records` has a source in `want` and carries the whole blob, one per
/// blob of `image`.
fn assert_blobs(n: &ClusterNode, records: &[Value], image: &Image, want: &[&str]) {
    let blobs: Vec<&Value> = records.iter().filter(|r| r["kind"] == "blob").collect();
    let want_digests: BTreeSet<String> = image.blobs().map(|b| b.digest.to_string()).collect();
    let got_digests: BTreeSet<String> = blobs
        .iter()
        .map(|r| r["reference"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        (blobs.len(), &got_digests),
        (want_digests.len(), &want_digests),
        "node {}: one request per blob:\n{records:#?}",
        n.index()
    );
    for r in blobs {
        let size = image
            .blobs()
            .find(|b| r["reference"] == b.digest.as_str())
            .map(|b| b.size);
        assert!(
            want.contains(&r["source"].as_str().unwrap_or_default())
                && r["status"] == 200
                && r["bytes"].as_u64() == size,
            "node {}: expected a whole blob from {want:?}: {r}",
            n.index()
        );
    }
}

/// The internet's downloads of each blob of `image`, in whole copies (exact bytes).
fn internet_copies(c: &Cluster, image: &Image, at_least: u64) -> Vec<BlobTraffic> {
    image
        .blobs()
        .map(|b| {
            c.upstream
                .wait_blob_bytes(&b.digest, at_least * b.size, SETTLE_TIMEOUT)
        })
        .collect()
}

#[test]
fn a_public_image_costs_the_internet_one_copy_per_cluster_and_survives_the_hub() {
    require_root!();
    let mut c = Cluster::new("pp-cl", NODES);
    eprintln!("timing: {NODES}-node cluster up in {:?}", c.bring_up_time());
    let image = pull_once_image(c.work_dir());
    assert_eq!(image.layers.len(), 3);
    assert!(image.layers.iter().map(|l| l.size).sum::<u64>() >= 200 << 20);
    c.upstream.client().push_image(REPO, "1.0", &image);
    c.upstream.clear_requests();
    let blob_count = image.blobs().count();

    // One node after another, cold. The first fetches from the internet and writes the image
    // back into the hub (by digest); the others get every blob from the hub.
    let first = &c.nodes[0];
    first.pull(NAME).expect_success();
    assert_blobs(
        first,
        &first.wait_pulls(REPO, blob_count),
        &image,
        &["upstream"],
    );
    let outcomes = first.wait_written_back();
    assert!(outcomes.contains(r#"outcome="pushed"} 1"#), "{outcomes}");
    assert!(
        c.hub_missing(REPO, &image).is_empty(),
        "the hub holds the manifest and every blob"
    );
    assert!(c.hub_tags(REPO).is_empty(), "tags are never written back");
    for n in &c.nodes[1..] {
        let started = Instant::now();
        n.pull(NAME).expect_success();
        eprintln!(
            "timing: node {} pulled in {:?}",
            n.index(),
            started.elapsed()
        );
        assert_blobs(n, &n.wait_pulls(REPO, blob_count), &image, &["hub"]);
        let stored = n.ctd.image(CTR_NAMESPACE, NAME).expect("pulled");
        assert_eq!(
            stored.digest,
            image.digest().as_str(),
            "the image keeps its digest"
        );
    }
    let copies = internet_copies(&c, &image, 1);
    for (blob, traffic) in image.blobs().zip(&copies) {
        assert_eq!(
            *traffic,
            BlobTraffic {
                requests: 1,
                bytes: blob.size
            },
            "the internet served {} once, to one node",
            blob.digest
        );
    }
    eprintln!("result: sequential pulls on {NODES} nodes cost the internet 1.00x the image");
    for n in &c.nodes[1..] {
        let saved = n.metric("pullproxy_upstream_saved_bytes_total");
        assert!(
            saved >= image.blob_bytes() as f64,
            "node {}: {saved}",
            n.index()
        );
    }

    // The hub down: every node pulls again from its own disk (node tier / cache).
    c.hub_stop();
    for n in &c.nodes {
        assert_eq!(n.wait_metric("pullproxy_hub_up", 0.0), 0.0);
        n.remove_image(NAME);
    }
    let before = c.upstream.blob_traffic();
    let outs = c.on_every_node(|n| n.pull(NAME));
    for (n, out) in c.nodes.iter().zip(&outs) {
        out.expect_success();
        let pulls = n.wait_pulls(REPO, 2 * blob_count);
        assert_blobs(
            n,
            &pulls[pulls.len() - blob_count - 1..],
            &image,
            &["node", "cache"],
        );
    }
    assert_eq!(
        c.upstream.blob_traffic(),
        before,
        "no blob from the internet again"
    );
    c.hub_start();

    // A tag the hub holds is the hub's: re-pushed while it is up, the next pull gets the new one.
    let v1 = images::multi_layer(Format::Docker, 1, 32 << 10, 0xa1);
    let v2 = images::multi_layer(Format::Docker, 1, 32 << 10, 0xa2);
    c.hub_push("team/svc", "stable", &v1);
    let node = &c.nodes[2];
    assert_eq!(node.wait_metric("pullproxy_hub_up", 1.0), 1.0);
    node.pull("docker.io/team/svc:stable").expect_success();
    c.hub_push("team/svc", "stable", &v2);
    node.pull("docker.io/team/svc:stable").expect_success();
    let stored = node
        .ctd
        .image(CTR_NAMESPACE, "docker.io/team/svc:stable")
        .expect("pulled");
    assert_eq!(stored.digest, v2.digest().as_str(), "the re-pushed tag");
}

#[test]
fn simultaneous_cold_pulls_and_what_never_goes_into_the_hub() {
    require_root!();
    let mut c = Cluster::new("pp-cs", NODES);
    let image = pull_once_image(c.work_dir());
    c.upstream.client().push_image(REPO, "1.0", &image);
    c.upstream.clear_requests();

    // All four at the same moment: none of them finds the image in the hub yet.
    let outs = c.on_every_node(|n| n.pull(NAME));
    for out in &outs {
        out.expect_success();
    }
    let copies = internet_copies(&c, &image, 1);
    let total: u64 = copies.iter().map(|t| t.bytes).sum();
    let ratio = total as f64 / image.blob_bytes() as f64;
    eprintln!("result: {NODES} simultaneous cold pulls cost the internet {ratio:.2}x the image");
    assert!(
        (1.0..=NODES as f64).contains(&ratio),
        "{ratio:.2}x: {copies:?}"
    );
    for n in &c.nodes {
        n.wait_written_back();
    }
    assert!(c.hub_missing(REPO, &image).is_empty());

    // A private image (quay.io, basic auth) pulled with credentials: never written back under
    // the default `public`.
    let secret = images::multi_layer(Format::Docker, 2, 256 << 10, 0x5e);
    c.private.client().push_image("team/secret", "1", &secret);
    let n = &c.nodes[1];
    n.ctd
        .pull(
            "quay.io/team/secret:1",
            Some((PRIVATE_USER, PRIVATE_PASSWORD)),
        )
        .expect_success();
    let outcomes = n.wait_written_back();
    assert!(
        outcomes.contains(r#"outcome="skipped_private"} 1"#),
        "{outcomes}"
    );
    assert_eq!(
        c.hub_missing("team/secret", &secret).len(),
        secret.blobs().count() + 1,
        "nothing of it is in the hub"
    );

    // Warm-up: `pullproxy warm` fills a node's cache; then a pull works with the hub and the
    // internet both down.
    let warm_image = images::multi_layer(Format::Docker, 2, 512 << 10, 0x3a);
    c.upstream
        .client()
        .push_image("library/warmed", "1", &warm_image);
    let n = &c.nodes[3];
    let out = n.warm(&["docker.io/library/warmed:1"]);
    out.expect_success();
    let done = format!("done: {} blob(s)", warm_image.blobs().count());
    assert!(out.stdout_text().contains(&done), "{}", out.stdout_text());
    c.hub_stop();
    c.upstream_stop();
    c.nodes[3]
        .pull("docker.io/library/warmed:1")
        .expect_success();
}

#[test]
fn write_back_killed_halfway_never_shows_a_broken_image_and_finishes_after_a_restart() {
    require_root!();
    // Slow uploads: the push of ~200 MiB takes long enough to be killed in the middle.
    let mut c = Cluster::builder("pp-ck")
        .nodes(1)
        .proxy_env("PULLPROXY_HUB__WRITE_BACK_RATE", "8MiB")
        .start();
    let image = pull_once_image(c.work_dir());
    c.upstream.client().push_image(REPO, "1.0", &image);
    let n = &mut c.nodes[0];
    n.pull(NAME).expect_success();
    // Kill pullproxy once some bytes went into the hub, but not all.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let sent = n.metric("pullproxy_writeback_bytes_total");
        if sent > 0.0 {
            assert!(sent < image.blob_bytes() as f64, "too late to kill: {sent}");
            break;
        }
        assert!(Instant::now() < deadline, "write-back never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    n.kill_proxy();
    let missing = c.hub_missing(REPO, &image);
    assert!(
        missing.contains(image.digest()),
        "a manifest without all its blobs in the hub: missing {missing:?}"
    );
    // Restarted (state kept, full speed): the job resumes from its record and completes.
    c.nodes[0].restart_proxy_with(&[("PULLPROXY_HUB__WRITE_BACK_RATE", "1GiB")]);
    let outcomes = c.nodes[0].wait_written_back();
    assert!(outcomes.contains(r#"outcome="pushed"} 1"#), "{outcomes}");
    assert!(c.hub_missing(REPO, &image).is_empty());
}
