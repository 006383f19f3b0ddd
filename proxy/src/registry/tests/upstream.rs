//! Content from the upstream: fetched once, cached, served stale when the upstream is gone, ranges
//! cut exactly cold and cached, corrupt bodies never cached, and names that do not resolve.

use super::*;

#[tokio::test]
async fn a_hub_miss_is_fetched_once_cached_and_served_stale_when_the_upstream_is_gone() {
    let w = World::new();
    let img = Image::new("app", &[3000, 2000, 1000]);
    w.up.push(HUB, "library/app", None, "1.0", &img);
    w.pull(HUB, "library/app", "1.0", &img, None).await;
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 3);
    assert_eq!(served(&w.proxy, "blob", "upstream"), 3);
    // Again: the tag is re-validated upstream, the layers come from the cache.
    w.pull(HUB, "library/app", "1.0", &img, None).await;
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        3,
        "a cached blob must not be fetched again"
    );
    let tag = format!("GET {HUB} /v2/library/app/manifests/1.0");
    assert_eq!(w.up.count(&tag), 2);
    assert_eq!(served(&w.proxy, "manifest", "upstream"), 2);
    assert_eq!(served(&w.proxy, "blob", "cache"), 3);
    // The upstream goes away: the tag mapping it last gave is served (stale-if-error), the
    // layers come from the cache (the upstream approved this repository moments ago).
    w.up.set(HUB, State::Down);
    w.pull(HUB, "library/app", "1.0", &img, None).await;
    assert_eq!(served(&w.proxy, "manifest", "stale"), 1);
    assert_eq!(served(&w.proxy, "blob", "cache"), 6);
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn sixty_four_concurrent_cold_gets_fetch_the_blob_once() {
    let w = World::new();
    let img = Image::new("big", &[1 << 20]);
    w.up.push(HUB, "library/big", None, "1", &img);
    let gate = Arc::new(Notify::new());
    *w.up.gate.lock().unwrap() = Some(gate.clone());
    let w = Arc::new(w);
    let layer = img.layer(0);
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (w, layer) = (w.clone(), layer.clone());
            tokio::spawn(async move { w.blob(HUB, "library/big", &layer, &[]).await })
        })
        .collect();
    // The download holds after its first byte until the other 63 clients have joined it.
    until("63 clients joined the download", async || {
        w.cache.blobs().stats().joins >= 63
    })
    .await;
    assert_eq!(w.cache.blobs().stats().joins, 63);
    gate.notify_one();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, img.layers[0], "every client gets the exact bytes");
    }
    assert_eq!(
        w.up.blob_gets.load(Ordering::SeqCst),
        1,
        "64 concurrent clients, one upstream fetch"
    );
}

#[tokio::test]
async fn ranges_and_open_ended_ranges_are_exact_cold_and_cached() {
    let w = World::new();
    let img = Image::new("ranged", &[64 << 10]);
    w.up.push(HUB, "library/ranged", None, "1", &img);
    let (layer, full) = (img.layer(0), img.layers[0].clone());
    let len = full.len();
    let past = format!("bytes={}-", len + 10);
    for round in ["cold", "cached"] {
        let got = w
            .blob(HUB, "library/ranged", &layer, &[("range", "bytes=10-99")])
            .await;
        assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{round}");
        assert_eq!(
            got.headers[header::CONTENT_RANGE],
            format!("bytes 10-99/{len}").as_str(),
            "{round}"
        );
        assert_eq!(got.body, full.slice(10..100), "{round}");

        let got = w
            .blob(HUB, "library/ranged", &layer, &[("range", "bytes=1000-")])
            .await;
        assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{round}");
        assert_eq!(
            got.headers[header::CONTENT_RANGE],
            format!("bytes 1000-{}/{len}", len - 1).as_str(),
            "{round}"
        );
        assert_eq!(
            got.headers[header::CONTENT_LENGTH],
            (len - 1000).to_string().as_str(),
            "{round}"
        );
        assert_eq!(got.body, full.slice(1000..), "{round}");

        let got = w
            .blob(HUB, "library/ranged", &layer, &[("range", past.as_str())])
            .await;
        assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE, "{round}");
        assert_eq!(
            got.headers[header::CONTENT_RANGE],
            format!("bytes */{len}").as_str(),
            "{round}"
        );
    }
    assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn corrupt_blobs_and_manifests_are_never_cached_or_linked() {
    let w = World::new();
    let img = Image::new("bad", &[4000]);
    w.up.push(QUAY, "x/bad", None, "v1", &img);
    w.up.corrupt.lock().unwrap().push(img.layer(0));
    for attempt in 1..=2 {
        let got = w.blob(QUAY, "x/bad", &img.layer(0), &[]).await;
        assert!(
            got.status != StatusCode::OK || got.truncated,
            "attempt {attempt}: the client must get an error, not a whole body"
        );
        assert!(
            got.body.len() < img.layers[0].len(),
            "attempt {attempt}: the corrupt blob is never delivered whole"
        );
        // The outcome settles in the background; then nothing is cached.
        until("the mismatch counted", async || {
            metric(&w.proxy, "digest_mismatches_total", &[]) >= f64::from(attempt)
        })
        .await;
        assert_eq!(
            metric(&w.proxy, "digest_mismatches_total", &[]),
            f64::from(attempt)
        );
        assert_eq!(w.cache.blobs().lookup(&img.layer(0)).await, None);
        // Nothing was cached, so the next attempt goes upstream again.
        assert_eq!(w.up.blob_gets.load(Ordering::SeqCst), attempt as usize);
    }
    // Upstream fixed: served whole.
    w.up.corrupt.lock().unwrap().clear();
    let got = w.blob(QUAY, "x/bad", &img.layer(0), &[]).await;
    assert_eq!(got.body, img.layers[0]);

    // A manifest asked for by a sha512 digest that its bytes do not have: 502, nothing cached.
    let wrong = Digest::compute(crate::oci::Algorithm::Sha512, b"something else");
    {
        let mut regs = w.up.registries.lock().unwrap();
        let repo = regs.get_mut(QUAY).unwrap().repos.get_mut("x/bad").unwrap();
        repo.manifests.insert(wrong.clone(), img.manifest.clone());
    }
    let got = w.manifest(QUAY, "x/bad", &wrong.to_string(), &[]).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(w.cache.manifests().get(&wrong).await.is_none());
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_no_registry() {
    let w = World::new();
    let got = w.get("nowhere.gcr.io", Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    let got = w.manifest("nowhere.gcr.io", "x", "latest", &[]).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    // Compared with a registry that is only down: /v2/ is answered locally.
    w.up.set(QUAY, State::Down);
    let got = w.get(QUAY, Method::GET, "/v2/", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
}
