//! Requests that are not registry requests: refused before anything is asked or stored.

use super::*;

#[tokio::test]
async fn malformed_requests_are_refused_before_anything_is_asked() {
    let w = World::new();
    let img = Image::new("ok", &[100]);
    w.up.push(QUAY, "library/ok", None, "1", &img);
    let paths = [
        "/v2/../etc/blobs/sha256:00",
        "/v2/x/blobs/sha256:zz",
        "/v2/UPPER/manifests/latest",
        "/v2/x/manifests/bad%20tag",
        "/v2/x/blobs/md5:abcd",
        "/v2/../../etc/passwd/manifests/latest",
        "/v2/library/%2e%2e/%2e%2e/etc/manifests/latest",
        "/v2/library/ok%2fx/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "/v2/library/ok/blobs/sha256:1234",
        "/v2/library/ok/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
        "/v2/library/ok/blobs/sha256:../../../../etc/passwd",
        "/v2/Library/OK/manifests/latest",
        "/v2/library/ok/manifests/bad:tag",
        "/v2/library/ok//manifests/latest",
        "/v2/library/ok/manifests/..",
    ];
    for path in paths {
        let got = w.get(QUAY, Method::GET, path, &[]).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{path}");
        let json: serde_json::Value = serde_json::from_slice(&got.body)
            .unwrap_or_else(|_| panic!("{path}: an OCI error body, got {:?}", got.body));
        assert!(json["errors"][0]["code"].is_string(), "{path}: {json}");
    }
    // Nothing was asked of the upstream or the hub, no download started, each was counted.
    assert_eq!(w.up.seen.lock().unwrap().len(), 0);
    assert_eq!(w.hub.seen.lock().unwrap().len(), 0);
    assert_eq!(w.cache.blobs().stats().fetches, 0);
    assert_eq!(
        metric(&w.proxy, "invalid_requests_total", &[]),
        paths.len() as f64
    );
    // The proxy still serves.
    w.pull(QUAY, "library/ok", "1", &img, None).await;
}
