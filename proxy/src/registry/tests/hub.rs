//! The hub and the node tier: the hub answers first, this node keeps what it served and serves
//! it while the hub is down, and many clients of a hub blob cost the hub one download.

use super::*;

#[tokio::test]
async fn a_hub_hit_is_served_from_the_hub_with_the_upstream_down() {
    let w = World::new();
    let img = Image::new("onhub", &[1200, 300]);
    w.hub.put("library/onhub", "latest", &img);
    w.up.set(HUB, State::Down);
    w.pull(HUB, "library/onhub", "latest", &img, None).await;
    // Every answer came from the hub: the tag, and each layer from the hub repository the
    // mapping names, with pullproxy's credentials (the fake hub stands for both).
    assert_eq!(served(&w.proxy, "manifest", "hub"), 1);
    assert_eq!(served(&w.proxy, "blob", "hub"), 2);
    assert_eq!(metric(&w.proxy, "requests_total{", &[]), 3.0);
    for i in 0..2 {
        let lookup = format!("GET blobs {}", img.layer(i));
        assert_eq!(w.hub.count(&lookup), 1, "{lookup}");
    }
    assert!(
        w.up.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.contains("/blobs/") && !s.contains("/manifests/")),
        "the upstream was asked for content: {:?}",
        w.up.seen.lock().unwrap()
    );
}

#[tokio::test]
async fn the_hub_answers_first_and_its_range_answers_are_kept() {
    let s = scene().await;
    let hub_img = Image::new("hubbed", &[1000]);
    s.w.hub.put("library/hubbed", "latest", &hub_img);
    s.w.up.set(HUB, State::Down);
    let layer = hub_img.layer(0);
    let got = s.w.manifest(HUB, "library/hubbed", "latest", &[]).await;
    assert_eq!(got.body, hub_img.manifest);
    let got = s.w.blob(HUB, "library/hubbed", &layer, &[]).await;
    assert_eq!(got.body, hub_img.layers[0]);
    let got =
        s.w.blob(HUB, "library/hubbed", &layer, &[("range", "bytes=10-19")])
            .await;
    assert_eq!(
        (got.status, got.body.clone()),
        (StatusCode::PARTIAL_CONTENT, hub_img.layers[0].slice(10..20))
    );
    // Unsatisfiable: the hub's 416 goes back (it was a 503 when 416 counted as a miss).
    let got =
        s.w.blob(
            HUB,
            "library/hubbed",
            &layer,
            &[("range", "bytes=999999999999-")],
        )
        .await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Invalid: ignored, the whole blob (RFC 9110).
    for bad in ["bytes=50-2", "bytes=abc", "items=1-2", "bytes=1-2,4-5"] {
        let got =
            s.w.blob(HUB, "library/hubbed", &layer, &[("range", bad)])
                .await;
        assert_eq!(
            (got.status, got.body.len()),
            (StatusCode::OK, 1000),
            "{bad}"
        );
    }
    // From the cache the same way.
    s.w.up.set(HUB, State::Up);
    let l = s.library.layer(0);
    let got =
        s.w.blob(HUB, "library/busybox", &l, &[("range", "bytes=999999-")])
            .await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(got.headers[header::CONTENT_RANGE], "bytes */800");
    let got =
        s.w.blob(HUB, "library/busybox", &l, &[("range", "bytes=50-2")])
            .await;
    assert_eq!((got.status, got.body.len()), (StatusCode::OK, 800));
    // Hub down: the cache and upstream as usual.
    s.w.hub.down.store(true, Ordering::SeqCst);
    let got = s.w.blob(HUB, "library/busybox", &l, &[]).await;
    assert_eq!(got.body, s.library.layers[0]);
}

#[tokio::test]
async fn the_node_keeps_what_the_hub_served_and_serves_it_when_the_hub_is_down() {
    let w = World::new();
    let img = Image::new("tiered", &[2000, 300]);
    w.hub.put("library/tiered", "v1", &img);
    // The upstream does not have it at all: every byte comes from the hub, then this node.
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    assert_eq!(
        w.hub.count("GET blobs"),
        2,
        "each layer fetched from the hub once"
    );
    // Again: the tag is asked of the hub (it is authoritative), the layers come from disk.
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    assert_eq!(w.hub.count("GET blobs"), 2);
    assert_eq!(w.hub.count("GET manifests v1"), 2);
    // The hub down (and no upstream): everything pulled before still pulls.
    w.hub.down.store(true, Ordering::SeqCst);
    w.pull(HUB, "library/tiered", "v1", &img, None).await;
    let got = w
        .manifest(HUB, "library/tiered", &img.digest.to_string(), &[])
        .await;
    assert_eq!(got.body, img.manifest);
    let got = w
        .blob(
            HUB,
            "library/tiered",
            &img.layer(0),
            &[("range", "bytes=1000-")],
        )
        .await;
    assert_eq!(
        (got.status, got.body.clone()),
        (StatusCode::PARTIAL_CONTENT, img.layers[0].slice(1000..))
    );
    assert!(
        w.up.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.contains("/blobs/"))
    );
    // Not under another repository, nor a tag the hub never served.
    let got = w.blob(HUB, "library/other", &img.layer(0), &[]).await;
    assert_ne!(got.status, StatusCode::OK);
    let got = w.manifest(HUB, "library/tiered", "v2", &[]).await;
    assert_ne!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn a_tag_repushed_to_the_hub_is_served_on_the_next_pull() {
    let w = World::new();
    let (one, two) = (Image::new("one", &[100]), Image::new("two", &[200]));
    w.hub.put("team/app", "stable", &one);
    w.pull(HUB, "team/app", "stable", &one, None).await;
    w.hub.put("team/app", "stable", &two);
    w.pull(HUB, "team/app", "stable", &two, None).await;
    // With the hub gone, the tag is where the hub last said.
    w.hub.down.store(true, Ordering::SeqCst);
    let got = w.manifest(HUB, "team/app", "stable", &[]).await;
    assert_eq!(got.body, two.manifest);
}

#[tokio::test]
async fn many_clients_of_a_hub_blob_cost_the_hub_one_download() {
    let w = Arc::new(World::new());
    let img = Image::new("popular", &[256 << 10]);
    w.hub.put("library/popular", "v1", &img);
    let layer = img.layer(0);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (w, layer) = (w.clone(), layer.clone());
            tokio::spawn(async move { w.blob(HUB, "library/popular", &layer, &[]).await })
        })
        .collect();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.body, img.layers[0]);
    }
    assert_eq!(w.hub.count("GET blobs"), 1);
}

#[tokio::test]
async fn a_corrupt_hub_manifest_is_refused() {
    let w = World::new();
    let img = Image::new("liar", &[10]);
    let mut liar = img.clone();
    liar.manifest = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
    w.hub.put("x/liar", "v1", &liar);
    // The hub announces the original digest for other bytes.
    let got = w.manifest(HUB, "x/liar", "v1", &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(w.cache.manifests().get(&img.digest).await.is_none());
}
