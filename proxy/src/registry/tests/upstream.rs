//! Content from the upstream: fetched once, cached, served stale when the upstream is gone, ranges
//! cut exactly cold and cached, corrupt bodies never cached, and names that do not resolve.

use super::*;

#[tokio::test]
async fn corrupt_blobs_and_manifests_are_never_cached_or_linked() {
    let w = World::new();
    let img = Image::new("bad", &[4000]);
    w.up.push(QUAY, "x/bad", None, "v1", &img);
    w.up.corrupt.lock().unwrap().push(img.layer(0));
    let got = w.blob(QUAY, "x/bad", &img.layer(0), &[]).await;
    assert_ne!(got.body, img.layers[0]);
    // The outcome settles in the background; then nothing is cached.
    for _ in 0..200 {
        if w.cache.blobs().lookup(&img.layer(0)).await.is_none()
            && !w.cache.blobs().in_flight(&img.layer(0))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(w.cache.blobs().lookup(&img.layer(0)).await, None);
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
