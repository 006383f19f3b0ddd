//! Requests that are not registry requests: refused before anything is asked or stored.

use super::*;

#[tokio::test]
async fn malformed_requests_are_refused_before_anything_is_asked() {
    let w = World::new();
    for path in [
        "/v2/../etc/blobs/sha256:00",
        "/v2/x/blobs/sha256:zz",
        "/v2/UPPER/manifests/latest",
        "/v2/x/manifests/bad%20tag",
        "/v2/x/blobs/md5:abcd",
    ] {
        let got = w.get(QUAY, Method::GET, path, &[]).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert_eq!(w.up.seen.lock().unwrap().len(), 0);
}
