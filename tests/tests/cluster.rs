//! The cluster test bed (`harness::cluster`) as it stands before the cluster tier: four nodes,
//! each with its own pullproxy and unmodified containerd, one shared sealos hub and a fake
//! internet on one bridge. Without write-back every node fetches a public image from the internet
//! or from its own cache, so N nodes cost the internet N times the image; these tests pin that
//! down with the internet registry's exact per-blob byte counts and each node's own logs and
//! metrics, so that the cluster tier's tests can build on a world known to work.

use std::{collections::BTreeSet, time::Instant};

use harness::{
    cluster::{Cluster, ClusterNode, SETTLE_TIMEOUT, pull_once_image},
    containerd::CTR_NAMESPACE,
    images::{self, Format, Image},
    registry::BlobTraffic,
    require_root,
};
use proxy_common::Counter;
use serde_json::Value;

const NODES: usize = 4;
/// The public image, as the internet (the fake Docker Hub) holds it.
const REPO: &str = "library/app";
const NAME: &str = "docker.io/library/app:1.0";

/// Every blob record of `records` has source `want` and was fetched by `comm`, and there is one
/// per blob of `image`, with the blob's bytes.
fn assert_blobs(n: &ClusterNode, records: &[Value], image: &Image, want: &[&str], comm: &str) {
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
                && r["bytes"].as_u64() == size
                && r["comm"] == comm,
            "node {}: expected a whole blob from {want:?} for {comm}: {r}",
            n.index()
        );
    }
}

/// The internet's downloads of each blob of `image` are `times` whole copies, exactly.
fn assert_internet_served(c: &Cluster, image: &Image, times: u64) {
    for blob in image.blobs() {
        let got = c
            .upstream
            .wait_blob_bytes(&blob.digest, times * blob.size, SETTLE_TIMEOUT);
        assert_eq!(
            got,
            BlobTraffic {
                requests: times as usize,
                bytes: times * blob.size
            },
            "the internet served blob {} ({} bytes) {times} times?",
            blob.digest,
            blob.size
        );
    }
}

#[test]
fn four_nodes_pull_a_public_image_each_from_the_internet_or_their_own_cache() {
    require_root!();
    let mut c = Cluster::new("pp-cl", NODES);
    eprintln!("timing: {NODES}-node cluster up in {:?}", c.bring_up_time());

    // Every node reaches the hub over the bridge, and the nodes are apart: own CA, own pins,
    // cache and state.
    let cas: BTreeSet<String> = c.nodes.iter().map(|n| n.node.node_ca_pem()).collect();
    assert_eq!(cas.len(), NODES, "every node has a CA of its own");
    let places: BTreeSet<_> = c
        .nodes
        .iter()
        .flat_map(|n| {
            [
                n.node.pins().to_owned(),
                n.node.cache_dir(),
                n.node.state().to_owned(),
            ]
        })
        .collect();
    assert_eq!(places.len(), 3 * NODES);
    for n in &c.nodes {
        assert_eq!(n.metric("pullproxy_hub_up"), 1.0, "node {}", n.index());
    }

    // The hub is shared: what it holds, every node pulls from it.
    let small = images::multi_layer(Format::Docker, 1, 64 << 10, 0xc1);
    c.hub_push("library/onhub", "1", &small);
    assert!(c.hub_repositories().contains(&"library/onhub".to_owned()));
    assert_eq!(c.hub_tags("library/onhub"), ["1"]);
    assert!(c.hub_missing("library/onhub", &small).is_empty());
    let outs = c.on_every_node(|n| n.pull("docker.io/library/onhub:1"));
    for (n, out) in c.nodes.iter().zip(&outs) {
        out.expect_success();
        let pulls = n.wait_pulls("library/onhub", small.layers.len() + 1);
        assert_blobs(n, &pulls, &small, &["hub"], "ctr");
    }
    for blob in small.blobs() {
        let n = NODES as u64;
        let served = c
            .hub
            .wait_blob_bytes(&blob.digest, n * blob.size, SETTLE_TIMEOUT);
        assert_eq!(
            served.requests, NODES,
            "the hub served {} to each node",
            blob.digest
        );
    }

    // The public image of the issue, on the internet only.
    let built = Instant::now();
    let image = pull_once_image(c.work_dir());
    eprintln!(
        "timing: {} MiB image built in {:?}",
        image.blob_bytes() >> 20,
        built.elapsed()
    );
    assert_eq!(image.layers.len(), 3);
    assert!(image.layers.iter().map(|l| l.size).sum::<u64>() >= 200 << 20);
    c.upstream.client().push_image(REPO, "1.0", &image);
    c.upstream.clear_requests();
    let blob_count = image.blobs().count();

    // 1. One node after another, cold: each node fetches every blob from the internet once.
    for n in &c.nodes {
        let started = Instant::now();
        n.pull(NAME).expect_success();
        eprintln!(
            "timing: node {} pulled in {:?}",
            n.index(),
            started.elapsed()
        );
        let pulls = n.wait_pulls(REPO, blob_count);
        assert_blobs(n, &pulls, &image, &["upstream"], "ctr");
        assert!(n.node.counter(Counter::Redirected) >= 1);
    }
    assert_internet_served(&c, &image, NODES as u64);
    let docker = r#"registry="registry-1.docker.io""#;
    for n in &c.nodes {
        let metrics = n.scrape();
        let fetched = harness::pullproxy::sample(
            &metrics,
            &format!("pullproxy_upstream_fetches_total{{{docker},outcome=\"cached\"}}"),
        );
        assert_eq!(fetched, blob_count as f64, "node {}:\n{metrics}", n.index());
        let logged: u64 = n
            .proxy
            .all("pull")
            .iter()
            .filter(|r| r["source"] == "upstream")
            .filter_map(|r| r["bytes"].as_u64())
            .sum();
        assert_eq!(
            harness::pullproxy::sample(
                &metrics,
                r#"pullproxy_served_bytes_total{source="upstream"}"#
            ),
            logged as f64,
            "node {}: metrics and logs agree",
            n.index()
        );
        for blob in image.blobs() {
            assert_eq!(
                n.cached_len(&blob.digest),
                Some(blob.size),
                "node {} caches {}",
                n.index(),
                blob.digest
            );
        }
    }
    // No write-back yet: the hub never saw the image.
    assert_eq!(
        c.hub_missing(REPO, &image).len(),
        1 + blob_count,
        "the hub holds none of it"
    );
    assert!(c.hub_tags(REPO).is_empty());

    // 2. The hub goes down and every pullproxy restarts (state kept); all nodes pull at the
    // same moment: each from its own cache, the internet serves no blob again.
    c.hub_stop();
    for n in &mut c.nodes {
        n.restart_proxy();
    }
    for n in &c.nodes {
        assert_eq!(
            n.wait_metric("pullproxy_hub_up", 0.0),
            0.0,
            "node {}",
            n.index()
        );
        n.remove_image(NAME);
    }
    let before = c.upstream.blob_traffic();
    let outs = c.on_every_node(|n| n.pull(NAME));
    for (n, out) in c.nodes.iter().zip(&outs) {
        out.expect_success();
        let pulls = n.wait_pulls(REPO, blob_count);
        assert_blobs(n, &pulls, &image, &["cache"], "ctr");
    }
    assert_eq!(c.upstream.blob_traffic(), before, "no blob fetched again");

    // 3. The internet goes down too: the kubelet's path (CRI, the daemon fetches) still gets
    // the image on every node at once, from each node's cache.
    c.upstream_stop();
    for n in &c.nodes {
        n.remove_image(NAME);
    }
    let since: Vec<usize> = c.nodes.iter().map(|n| n.proxy.pulls(REPO).len()).collect();
    let ids = c.on_every_node(|n| n.cri_pull(NAME));
    for ((n, id), since) in c.nodes.iter().zip(ids).zip(since) {
        let id =
            id.unwrap_or_else(|e| panic!("node {}: PullImage: {e}\n{}", n.index(), n.ctd.log()));
        assert_eq!(id, image.config.digest.as_str());
        let pulls = n.wait_pulls(REPO, 2 * blob_count);
        assert_blobs(
            n,
            &pulls[since..],
            &image,
            &["cache", "stale"],
            "containerd",
        );
    }
    c.upstream_start();
    c.hub_start();

    // 4. Cold caches, all nodes at the same moment: without a cluster tier each node fetches
    // the whole image itself.
    for n in &mut c.nodes {
        n.kill_proxy();
        std::fs::remove_dir_all(n.node.cache_dir()).expect("empty the cache");
        n.restart_proxy();
    }
    for n in &c.nodes {
        assert_eq!(
            n.wait_metric("pullproxy_hub_up", 1.0),
            1.0,
            "node {}",
            n.index()
        );
        n.remove_image(NAME);
    }
    let outs = c.on_every_node(|n| n.pull(NAME));
    for (n, out) in c.nodes.iter().zip(&outs) {
        out.expect_success();
        let pulls = n.wait_pulls(REPO, blob_count);
        assert_blobs(n, &pulls, &image, &["upstream"], "ctr");
        let stored = n.ctd.image(CTR_NAMESPACE, NAME).expect("pulled");
        assert_eq!(stored.digest, image.digest().as_str());
    }
    assert_internet_served(&c, &image, 2 * NODES as u64);
}
