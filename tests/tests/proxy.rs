//! The pull proxy with real registries and real clients: `docker-registry` as the sealos hub
//! (htpasswd), `docker-registry` behind TLS as Docker Hub and as a private quay.io, and an
//! unmodified `skopeo` whose connections the kernel redirects to pullproxy. Some tests also talk
//! to the proxy port directly (many concurrent clients, exact ranges, hostile requests).

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use harness::{
    images::{self, Digest, Format, Image},
    nginx::NginxCache,
    process::Placement,
    pullproxy::sample,
    registry::{Registry, TokenAuth},
    registry_client::{Body, RegistryClient},
    require_root,
    skopeo::verify_dir_copy,
    testca,
    token::TokenIssuer,
    world::{
        CDN_HOST, CDN_IP, HUB_PASSWORD, HUB_USER, PRIVATE_PASSWORD, PRIVATE_USER, REDIRECTING_HOST,
        REDIRECTING_IP, SITE_IP, TOKEN_REGISTRY_HOST, TOKEN_REGISTRY_IP, TOKEN_SERVICE_HOST,
        TOKEN_SERVICE_IP, World, hosts,
    },
};
use pullproxy::private_state::too_open;
use serde_json::Value;

fn copy(
    world: &World,
    image: &str,
    creds: Option<(&str, &str)>,
) -> (tempfile::TempDir, harness::process::ToolRun) {
    let dest = tempfile::tempdir().unwrap();
    let out = world.skopeo().copy_to_dir(image, dest.path(), creds, false);
    (dest, out)
}

#[test]
fn hub_hit_is_served_from_the_hub_with_the_upstream_down() {
    require_root!();
    let mut w = World::new("pp-proxy");
    let image = images::busybox(Format::Docker);
    w.hub
        .client()
        .push_image("library/busybox", "latest", &image);
    w.upstream.stop();

    let (dir, out) = copy(
        &w,
        "docker://registry-1.docker.io/library/busybox:latest",
        None,
    );
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    w.settle();
    let manifests = w.sources("library/busybox", "manifest");
    let blobs = w.sources("library/busybox", "blob");
    assert!(
        !manifests.is_empty() && manifests.iter().all(|s| s == "hub"),
        "{manifests:?}"
    );
    assert_eq!(blobs.len(), image.layers.len() + 1, "{blobs:?}");
    assert!(blobs.iter().all(|s| s == "hub"), "{blobs:?}");
    // Hub lookups used the sealos mapping and pullproxy's credentials.
    assert!(
        w.hub.count(
            "GET",
            &format!("/v2/library/busybox/blobs/{}", image.layers[0].digest)
        ) >= 1
    );
}

#[test]
fn hub_miss_is_fetched_upstream_cached_and_served_when_the_upstream_is_gone() {
    require_root!();
    let mut w = World::without_write_back("pp-proxy");
    let image = images::multi_layer(Format::Oci, 3, 1 << 20, 31);
    w.upstream.client().push_image("library/app", "1.0", &image);
    let src = "docker://registry-1.docker.io/library/app:1.0";

    let (dir, out) = copy(&w, src, None);
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    for blob in image.blobs() {
        let path = format!("/v2/library/app/blobs/{}", blob.digest);
        w.upstream
            .wait_count("GET", &path, 1, Duration::from_secs(30));
        assert_eq!(w.upstream.blob_fetches("library/app", &blob.digest), 1);
    }

    // Again: the tag is re-validated upstream, the blobs come from the cache.
    let (dir, out) = copy(&w, src, None);
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    for blob in image.blobs() {
        assert_eq!(
            w.upstream.blob_fetches("library/app", &blob.digest),
            1,
            "a cached blob must not be fetched again"
        );
    }
    state_is_root_only(&w, &image.layers[0].digest);

    // The upstream goes away: the cached tag mapping is served (stale-if-error), and the blobs
    // come from the cache (the upstream approved these credentials for this repository minutes
    // ago).
    w.settle();
    let before = w.pulls("library/app").len();
    w.upstream.stop();
    let (dir, out) = copy(&w, src, None);
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    w.settle();
    let last: Vec<Value> = w.pulls("library/app").into_iter().skip(before).collect();
    let by_kind = |kind: &str| -> Vec<String> {
        last.iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r["source"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let manifests = by_kind("manifest");
    assert!(
        !manifests.is_empty() && manifests.iter().all(|s| s == "stale"),
        "{manifests:?}"
    );
    let blobs = by_kind("blob");
    assert_eq!(blobs.len(), image.layers.len() + 1, "{blobs:?}");
    assert!(blobs.iter().all(|s| s == "cache"), "{blobs:?}");
    // Every request of these successful pulls was sent whole: none is logged as abandoned.
    let pulls = w.pulls("library/app");
    let abandoned: Vec<&Value> = pulls.iter().filter(|r| !r["error"].is_null()).collect();
    assert!(abandoned.is_empty(), "{abandoned:?}");
}

/// A client that connects to pullproxy's port directly (no kernel record) for `host`.
fn direct(w: &World, host: &str) -> RegistryClient {
    RegistryClient::new(host, "127.0.0.1:15443".parse().unwrap())
        .netns(&w.node.ns)
        .tls(testca::client_config(&[&w.node.node_ca_pem()]))
}

#[test]
fn private_images_need_the_clients_own_credentials_even_when_cached() {
    require_root!();
    let mut w = World::new("pp-proxy");
    let image = images::multi_layer(Format::Docker, 1, 256 << 10, 77);
    w.private.client().push_image("team/secret", "1", &image);
    let src = "docker://quay.io/team/secret:1";

    let (dir, out) = copy(&w, src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();

    // Every blob is cached now; still, no credentials or wrong ones get nothing.
    let (_, out) = copy(&w, src, None);
    let err = out.expect_failure();
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    let (_, out) = copy(&w, src, Some((PRIVATE_USER, "wrong")));
    out.expect_failure();

    // Not even a single cached blob by digest, asked for directly.
    let client = direct(&w, "quay.io").anonymous();
    let resp = client
        .get_blob("team/secret", &image.layers[0].digest, None)
        .unwrap();
    assert_eq!(
        resp.status,
        401,
        "a refused client got {} bytes",
        resp.body.len()
    );
    assert!(
        resp.header("www-authenticate").is_some(),
        "the challenge is relayed"
    );
    assert!(resp.body.len() < 1024, "no blob bytes for a refused client");

    // And the right credentials still work, from the cache.
    let (dir, out) = copy(&w, src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();

    // Through any other door, the private layer and manifest stay closed: another repository of
    // the same registry, a public repository of another registry, a made-up name under an
    // intercepted wildcard (it does not resolve), each with no credentials and with alice's.
    let manifest = image.manifest.digest.to_string();
    for (host, repo) in [
        ("quay.io", "team/other"),
        ("registry-1.docker.io", "library/busybox"),
        ("a.b.gcr.io", "x"),
    ] {
        for client in [
            direct(&w, host).anonymous(),
            direct(&w, host).creds(PRIVATE_USER, PRIVATE_PASSWORD),
        ] {
            let blob = client
                .get_blob(repo, &image.layers[0].digest, None)
                .unwrap();
            let man = client.get_manifest(repo, &manifest).unwrap();
            for resp in [&blob, &man] {
                assert!(
                    !resp.is_success() && resp.body.len() < 1024,
                    "{host}/{repo}: {} with {} bytes",
                    resp.status,
                    resp.body.len()
                );
            }
        }
    }

    // The registry down: alice still pulls (stale), nobody else gets a byte.
    w.private.stop();
    let (dir, out) = copy(&w, src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    for client in [
        direct(&w, "quay.io").anonymous(),
        direct(&w, "quay.io").creds(PRIVATE_USER, "wrong"),
    ] {
        let resp = client
            .get_blob("team/secret", &image.layers[0].digest, None)
            .unwrap();
        assert!(
            [401, 503].contains(&resp.status) && resp.body.len() < 1024,
            "upstream down: {} with {} bytes",
            resp.status,
            resp.body.len()
        );
    }
}

#[test]
fn blobs_redirected_to_a_cdn_are_fetched_there_without_the_registrys_credentials() {
    require_root!();
    let w = World::new("pp-proxy");
    // A private registry that sends blob downloads to its CDN, as ghcr.io does.
    let registry = Registry::builder(SocketAddr::new(REDIRECTING_IP.parse().unwrap(), 443))
        .netns(&w.node.ns)
        .server_name(REDIRECTING_HOST)
        .tls(&w.upstream_leaf(&[REDIRECTING_HOST]))
        .htpasswd(PRIVATE_USER, PRIVATE_PASSWORD)
        .redirect_blobs(&format!("https://{CDN_HOST}"))
        .start();
    let mut cdn = NginxCache::builder(SocketAddr::new(CDN_IP.parse().unwrap(), 443))
        .netns(&w.node.ns)
        .server_name(CDN_HOST)
        .tls(&w.upstream_leaf(&[CDN_HOST]))
        .serve_files(&registry.storage())
        .workers(1)
        .start();
    let image = images::multi_layer(Format::Oci, 2, 256 << 10, 91);
    registry.client().push_image("team/app", "1", &image);
    let src = format!("docker://{REDIRECTING_HOST}/team/app:1");

    let (dir, out) = copy(&w, &src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();

    // The registry answered the blob GETs with redirects, pullproxy followed them to the CDN,
    // and no request to the CDN carried the registry's credentials.
    let redirected = registry
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path().contains("/blobs/") && r.status == 307)
        .count();
    assert!(
        redirected >= image.blobs().count(),
        "{:?}",
        registry.requests()
    );
    let log = cdn.access_log();
    let fetched: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("GET ") && l.contains(" 200 "))
        .collect();
    for blob in image.blobs() {
        assert!(
            fetched.iter().any(|l| l.contains(blob.digest.hex())),
            "{} was not fetched from the CDN:\n{log}",
            blob.digest
        );
    }
    assert!(
        log.lines().all(|l| l.ends_with("auth=-")),
        "a request to the CDN carried credentials:\n{log}"
    );

    // What came through the CDN was cached: with the CDN gone, the image is still served.
    cdn.stop();
    let (dir, out) = copy(&w, &src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    let log_after = cdn.access_log();
    assert_eq!(log_after, log, "the CDN was asked again");
}

#[test]
fn bearer_token_flow_works_through_the_proxy_and_gates_cached_content() {
    require_root!();
    let w = World::new("pp-proxy");
    // registry.gitlab.com wants bearer tokens from gitlab.com/jwt/auth, which hands one out to
    // alice (basic auth) and to nobody else.
    let issuer = TokenIssuer::new("gitlab-issuer", "container_registry");
    let realm = format!("https://{TOKEN_SERVICE_HOST}/jwt/auth");
    let mut registry = Registry::builder(SocketAddr::new(TOKEN_REGISTRY_IP.parse().unwrap(), 443))
        .netns(&w.node.ns)
        .server_name(TOKEN_REGISTRY_HOST)
        .tls(&w.upstream_leaf(&[TOKEN_REGISTRY_HOST]))
        .token_auth(TokenAuth {
            realm: realm.clone(),
            service: issuer.service.clone(),
            issuer: issuer.issuer.clone(),
            cert: issuer.cert_path(),
        })
        .start();
    let ttl = Duration::from_secs(3600);
    let files = tempfile::tempdir().unwrap();
    let pull = issuer.token(PRIVATE_USER, "team/app", &["pull"], ttl);
    issuer.write_response(&files.path().join("jwt/auth"), &pull, ttl);
    let token_service =
        NginxCache::builder(SocketAddr::new(TOKEN_SERVICE_IP.parse().unwrap(), 443))
            .netns(&w.node.ns)
            .server_name(TOKEN_SERVICE_HOST)
            .tls(&w.upstream_leaf(&[TOKEN_SERVICE_HOST]))
            .serve_files(files.path())
            .basic_auth(PRIVATE_USER, PRIVATE_PASSWORD)
            .workers(1)
            .start();
    let image = images::multi_layer(Format::Docker, 2, 256 << 10, 93);
    let push = issuer.token("ci", "team/app", &["pull", "push"], ttl);
    registry
        .client()
        .bearer(&push)
        .push_image("team/app", "1", &image);
    let src = format!("docker://{TOKEN_REGISTRY_HOST}/team/app:1");

    // The client is challenged (through pullproxy), gets its token from the token service (spliced,
    // TLS untouched) and pulls with it; pullproxy forwards the token and caches what it gets.
    let (dir, out) = copy(&w, &src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    let issued = token_service.access_log();
    assert!(
        issued
            .lines()
            .any(|l| l.starts_with("GET /jwt/auth 200 auth=Basic ")),
        "the client never got a token:\n{issued}"
    );
    let served = registry
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path().contains("/blobs/") && r.status == 200)
        .count();
    assert!(served >= image.blobs().count(), "{:?}", registry.requests());
    let metrics = w.scrape();
    assert!(
        sample(
            &metrics,
            r#"pullproxy_connections_total{decision="spliced"}"#
        ) >= 1.0,
        "the token request was not spliced:\n{metrics}"
    );
    assert!(
        !metrics.contains(&format!(r#"registry="{TOKEN_SERVICE_HOST}""#)),
        "pullproxy served the token service as a registry:\n{metrics}"
    );

    // No credentials, no token, no image: not even from pullproxy's cache.
    let (_, out) = copy(&w, &src, None);
    let err = out.expect_failure();
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    // A token for another repository does not open this one's cached blobs.
    let other = issuer.token(PRIVATE_USER, "team/other", &["pull"], ttl);
    let client = direct(&w, TOKEN_REGISTRY_HOST).bearer(&other);
    let resp = client
        .get_blob("team/app", &image.layers[0].digest, None)
        .unwrap();
    assert_eq!(resp.status, 401, "got {} bytes", resp.body.len());

    // The registry gone, the token service still up: alice still pulls, from the cache.
    registry.stop();
    let (dir, out) = copy(&w, &src, Some((PRIVATE_USER, PRIVATE_PASSWORD)));
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
}

#[test]
fn sixty_four_concurrent_cold_gets_fetch_the_blob_once() {
    require_root!();
    let w = Arc::new(World::new("pp-proxy"));
    let layer = images::random_layer(24 << 20, 0xc0ffee);
    let image = Image::build(
        Format::Docker,
        images::Platform::linux_amd64(),
        None,
        &[layer],
    );
    w.upstream.client().push_image("library/big", "1", &image);
    let blob = image.layers[0].clone();
    let barrier = Arc::new(std::sync::Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let (w, barrier, digest) = (w.clone(), barrier.clone(), blob.digest.clone());
            std::thread::spawn(move || {
                // 64 TLS downloads of 24 MiB at once: in the emulated guest of `cargo xtask
                // vm-test` a client can wait longer than the usual 30 s for its next bytes.
                let client = w.direct().timeout(Duration::from_secs(300));
                barrier.wait();
                client
                    .get_blob("library/big", &digest, None)
                    .expect("GET through pullproxy")
            })
        })
        .collect();
    for h in handles {
        let resp = h.join().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            Digest::of(&resp.body),
            blob.digest,
            "every client gets the exact bytes"
        );
    }
    let path = format!("/v2/library/big/blobs/{}", blob.digest);
    w.upstream
        .wait_count("GET", &path, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.upstream.blob_fetches("library/big", &blob.digest),
        1,
        "64 concurrent clients, one upstream fetch"
    );
}

#[test]
fn a_corrupted_upstream_blob_is_never_cached() {
    require_root!();
    let w = World::new("pp-proxy");
    let image = images::multi_layer(Format::Docker, 1, 2 << 20, 5);
    w.upstream.client().push_image("library/bad", "1", &image);
    let layer = image.layers[1].clone();
    // Flip bytes in the upstream's stored copy, keeping its size.
    let data = w
        .upstream
        .storage()
        .join("docker/registry/v2/blobs/sha256")
        .join(&layer.digest.hex()[..2])
        .join(layer.digest.hex())
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    for b in bytes.iter_mut().skip(1000).take(64) {
        *b ^= 0xff;
    }
    std::fs::write(&data, &bytes).unwrap();

    for attempt in 1..=2 {
        let resp = w.direct().get_blob("library/bad", &layer.digest, None);
        if let Ok(resp) = &resp {
            assert!(
                resp.status != 200 || Digest::of(&resp.body) != layer.digest,
                "the client must get an error or bytes it will reject"
            );
            assert!(
                resp.body.len() < layer.size as usize,
                "the corrupt blob is never delivered whole"
            );
        }
        let path = format!("/v2/library/bad/blobs/{}", layer.digest);
        w.upstream
            .wait_count("GET", &path, attempt, Duration::from_secs(30));
    }
    // Nothing cached: the second GET went upstream again, and the cache has no file for it.
    assert_eq!(w.upstream.blob_fetches("library/bad", &layer.digest), 2);
    let cached = w
        .node
        .cache_dir()
        .join("blobs/sha256")
        .join(layer.digest.hex());
    assert!(!cached.exists(), "{} must not exist", cached.display());
    assert!(
        w.proxy
            .wait_for(
                "upstream blob does not match its digest: not cached, clients got an error",
                Duration::from_secs(30),
                |_| true
            )
            .is_some(),
        "{}",
        w.proxy.dump()
    );
}

#[test]
fn ranges_and_open_ended_ranges_are_exact_cold_and_cached() {
    require_root!();
    let w = World::new("pp-proxy");
    let image = images::multi_layer(Format::Docker, 1, 1 << 20, 9);
    w.upstream
        .client()
        .push_image("library/ranged", "1", &image);
    let layer = image.layers[1].clone();
    let full = layer.bytes();
    let len = full.len();
    for round in ["cold", "cached"] {
        let resp = w
            .direct()
            .get_blob("library/ranged", &layer.digest, Some("bytes=10-99"))
            .unwrap();
        assert_eq!(resp.status, 206, "{round}: {}", resp.text());
        assert_eq!(
            resp.header("content-range"),
            Some(format!("bytes 10-99/{len}").as_str()),
            "{round}"
        );
        assert_eq!(resp.body, &full[10..100], "{round}");

        let resp = w
            .direct()
            .get_blob("library/ranged", &layer.digest, Some("bytes=1000-"))
            .unwrap();
        assert_eq!(resp.status, 206, "{round}");
        assert_eq!(
            resp.header("content-range"),
            Some(format!("bytes 1000-{}/{len}", len - 1).as_str())
        );
        assert_eq!(resp.body, &full[1000..], "{round}");
        assert_eq!(
            resp.header("content-length"),
            Some((len - 1000).to_string().as_str())
        );

        let past = format!("bytes={}-", len + 10);
        let resp = w
            .direct()
            .get_blob("library/ranged", &layer.digest, Some(&past))
            .unwrap();
        assert_eq!(resp.status, 416, "{round}");
        assert_eq!(
            resp.header("content-range"),
            Some(format!("bytes */{len}").as_str())
        );
    }
    assert_eq!(w.upstream.blob_fetches("library/ranged", &layer.digest), 1);
}

#[test]
fn malformed_requests_get_a_4xx_and_never_reach_the_disk_or_crash_the_proxy() {
    require_root!();
    let mut w = World::new("pp-proxy");
    let image = images::busybox(Format::Docker);
    w.upstream.client().push_image("library/ok", "1", &image);
    let client = w.direct();
    let cache_before = dir_listing(&w.node.cache_dir());
    for path in [
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
    ] {
        let resp = client.request("GET", path, &[], Body::Empty).unwrap();
        assert!(
            (400..500).contains(&resp.status),
            "{path}: got {} {}",
            resp.status,
            resp.text()
        );
        let json: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|_| panic!("{path}: an OCI error body, got {}", resp.text()));
        assert!(json["errors"][0]["code"].is_string(), "{path}: {json}");
    }
    // Huge headers are refused, not buffered without limit.
    let huge = "x".repeat(512 << 10);
    let resp = client.request(
        "GET",
        "/v2/library/ok/manifests/1",
        &[("X-Huge", &huge)],
        Body::Empty,
    );
    assert!(
        resp.as_ref()
            .map_or(true, |r| r.status == 431 || r.status >= 400),
        "{:?}",
        resp.map(|r| r.status)
    );
    // The proxy still serves, and nothing was written for the hostile requests.
    let resp = client.get_manifest("library/ok", "1").unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(w.proxy.find("invalid registry request refused").is_some());
    let after: Vec<_> = dir_listing(&w.node.cache_dir())
        .into_iter()
        .filter(|p| !cache_before.contains(p))
        .collect();
    assert!(
        after.iter().all(|p| [
            "blobs",
            "media-types",
            "tags",
            "links",
            "public",
            "writeback"
        ]
        .iter()
        .any(|d| p.starts_with(w.node.cache_dir().join(d)))),
        "{after:?}"
    );
    w.upstream.stop();
}

#[test]
fn a_rotated_hub_password_is_used_on_the_next_request() {
    require_root!();
    let mut w = World::new("pp-proxy");
    let image = images::busybox(Format::Oci);
    w.hub.client().push_image("library/rotate", "1", &image);
    let src = "docker://registry-1.docker.io/library/rotate:1";
    copy(&w, src, None).1.expect_success();
    w.settle();
    assert!(
        w.sources("library/rotate", "manifest")
            .iter()
            .all(|s| s == "hub")
    );

    // The hub's password changes; pullproxy's file still has the old one: the hub refuses (the
    // upstream does not have the image). What the hub served before still comes from this
    // node, as while the hub is down.
    w.hub.set_password("hub-secret-2");
    let before = w.pulls("library/rotate").len();
    copy(&w, src, None).1.expect_success();
    w.settle();
    let meanwhile: Vec<_> = w.pulls("library/rotate").into_iter().skip(before).collect();
    assert!(
        !meanwhile.is_empty() && meanwhile.iter().all(|r| r["source"] == "node"),
        "{meanwhile:?}"
    );
    assert!(
        w.proxy
            .wait_for(
                "the hub refused pullproxy's credentials; check hub.username and the password source",
                Duration::from_secs(30),
                |_| true
            )
            .is_some(),
        "{}",
        w.proxy.dump()
    );

    // The hub now refuses pullproxy: not ready (the hub is not optional), still healthy.
    let why = ready_becomes(&w, 503);
    assert!(why.contains("hub"), "{why}");
    assert_eq!(w.admin_get("/healthz").0, 200);
    assert_eq!(sample(&w.scrape(), "pullproxy_hub_up"), 0.0);

    // The credentials file is updated (as a Secret update would): the next pull uses it.
    std::fs::write(&w.hub_password_file, "hub-secret-2\n").unwrap();
    ready_becomes(&w, 200);
    let before = w.pulls("library/rotate").len();
    let (dir, out) = copy(&w, src, None);
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    w.settle();
    let after: Vec<_> = w.pulls("library/rotate").into_iter().skip(before).collect();
    // The tag is asked of the hub again (with the new password); the rest is this node's.
    assert!(
        after
            .iter()
            .any(|r| r["kind"] == "manifest" && r["source"] == "hub")
            && after
                .iter()
                .all(|r| r["source"] == "hub" || r["source"] == "node"),
        "{after:?}"
    );
    // No credential value ever reaches the logs.
    let logs = w.proxy.dump();
    for secret in [HUB_PASSWORD, "hub-secret-2"] {
        assert!(!logs.contains(secret), "a password leaked into the logs");
    }
}

/// `cat path` as nobody (uid and gid 65534, no groups).
fn cat_as_nobody(path: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .expect("setpriv")
}

/// pullproxy's cache and TLS state are root's alone: directories 0700, files 0600, and another
/// user cannot read the cached `layer`.
fn state_is_root_only(w: &World, layer: &Digest) {
    let cached = w.node.cache_dir().join("blobs/sha256").join(layer.hex());
    assert!(cached.is_file(), "{} is cached", cached.display());
    for dir in [w.node.cache_dir(), w.node.tls_dir()] {
        let open = too_open(&dir).unwrap();
        assert!(open.is_empty(), "readable by others: {open:?}");
    }
    // The node's own directory lets others through, so only pullproxy's modes stand in the way;
    // and nobody can read a file there that is meant for everyone, so a refusal means something.
    std::fs::set_permissions(w.node.state(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = w.node.state().join("readable-by-all");
    std::fs::write(&control, b"ok").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cat_as_nobody(&control);
    assert!(out.status.success() && out.stdout == b"ok", "{out:?}");
    let out = cat_as_nobody(&cached);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.stdout.is_empty() && said.contains("Permission denied"),
        "nobody read a cached blob: {out:?}"
    );
}

fn dir_listing(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Polls `/readyz` until it answers `status` (or 30 s pass); returns the body.
fn ready_becomes(w: &World, status: u16) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = w.admin_get("/readyz");
        if got == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {got}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_follow_real_pulls_pass_promtool_and_never_hold_credentials() {
    require_root!();
    let mut w = World::without_write_back("pp-proxy");
    let hub_image = images::busybox(Format::Docker);
    w.hub.client().push_image("library/onhub", "1", &hub_image);
    let up_image = images::multi_layer(Format::Oci, 2, 128 << 10, 41);
    w.upstream
        .client()
        .push_image("library/upstream", "1", &up_image);
    let private = images::multi_layer(Format::Docker, 1, 64 << 10, 42);
    w.private.client().push_image("team/secret", "1", &private);

    copy(&w, "docker://registry-1.docker.io/library/onhub:1", None)
        .1
        .expect_success();
    copy(&w, "docker://registry-1.docker.io/library/upstream:1", None)
        .1
        .expect_success();
    copy(&w, "docker://registry-1.docker.io/library/upstream:1", None)
        .1
        .expect_success();
    copy(
        &w,
        "docker://quay.io/team/secret:1",
        Some((PRIVATE_USER, PRIVATE_PASSWORD)),
    )
    .1
    .expect_success();
    copy(&w, "docker://quay.io/team/secret:1", None)
        .1
        .expect_failure();
    let bad = w
        .direct()
        .request("GET", "/v2/library/x/blobs/sha256:00", &[], Body::Empty)
        .unwrap();
    assert_eq!(bad.status, 400);
    w.settle();
    // An upstream that cannot be reached, for a blob nobody has: counted as an upstream error.
    w.upstream.stop();
    let missing = Digest::of(b"never pushed");
    let resp = w
        .direct()
        .get_blob("library/upstream", &missing, None)
        .unwrap();
    assert!(resp.status >= 500, "{}", resp.status);

    let text = w.scrape();
    let docker = r#"registry="registry-1.docker.io""#;
    for (prefix, at_least) in [
        (format!("pullproxy_requests_total{{{docker},kind=\"manifest\",source=\"hub\",status=\"200\"}}"), 1.0),
        (format!("pullproxy_requests_total{{{docker},kind=\"blob\",source=\"hub\",status=\"200\"}}"), 2.0),
        (format!("pullproxy_requests_total{{{docker},kind=\"blob\",source=\"upstream\",status=\"200\"}}"), 3.0),
        (format!("pullproxy_requests_total{{{docker},kind=\"blob\",source=\"cache\",status=\"200\"}}"), 3.0),
        ("pullproxy_requests_total{registry=\"quay.io\",kind=\"manifest\",source=\"upstream\",status=\"401\"}".to_owned(), 1.0),
        ("pullproxy_served_bytes_total{source=\"hub\"}".to_owned(), hub_image.blob_bytes() as f64),
        ("pullproxy_served_bytes_total{source=\"cache\"}".to_owned(), 1.0),
        ("pullproxy_request_duration_seconds_count{kind=\"blob\",source=\"upstream\"}".to_owned(), 3.0),
        ("pullproxy_hub_lookups_total{outcome=\"found\"}".to_owned(), 3.0),
        ("pullproxy_hub_lookups_total{outcome=\"not_found\"}".to_owned(), 3.0),
        (format!("pullproxy_upstream_fetches_total{{{docker},outcome=\"cached\"}}"), 3.0),
        ("pullproxy_redirect_connections_total{outcome=\"redirected\"}".to_owned(), 5.0),
        ("pullproxy_redirect_connections_total{outcome=\"rekeyed\"}".to_owned(), 5.0),
        ("pullproxy_connections_total{decision=\"terminated\"}".to_owned(), 5.0),
        ("pullproxy_tls_certificates_minted_total".to_owned(), 2.0),
        ("pullproxy_cache_entries".to_owned(), 3.0),
        ("pullproxy_cache_hits_total".to_owned(), 3.0),
        ("pullproxy_invalid_requests_total{reason=\"digest\"}".to_owned(), 1.0),
        ("pullproxy_hub_up".to_owned(), 1.0),
        (format!("pullproxy_upstream_errors_total{{{docker},reason=\"unreachable\"}}"), 1.0),
        ("pullproxy_redirect_target_cgroups".to_owned(), 1.0),
        ("pullproxy_build_info{version=".to_owned(), 1.0),
    ] {
        let v = sample(&text, &prefix);
        assert!(v >= at_least, "{prefix} is {v}, expected at least {at_least}\n{text}");
    }
    assert_eq!(sample(&text, "pullproxy_digest_mismatches_total"), 0.0);

    // Every metric the Grafana dashboard queries exists in a real scrape.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/pullproxy.json"
    ))
    .unwrap();
    let mut queried: Vec<&str> = dashboard
        .match_indices("pullproxy_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .map(|m| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(m, |m, suffix| m.strip_suffix(suffix).unwrap_or(m))
        })
        .collect();
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() > 10, "{queried:?}");
    for metric in queried {
        assert!(
            text.contains(&format!("# TYPE {metric} ")),
            "the dashboard queries {metric}, which pullproxy does not export"
        );
    }

    // The exposition is valid Prometheus text.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // No credential, nor its base64 form, anywhere in logs or metrics.
    let haystack = format!("{}\n{text}", w.proxy.dump());
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [
        PRIVATE_PASSWORD.to_owned(),
        HUB_PASSWORD.to_owned(),
        b64(&format!("{PRIVATE_USER}:{PRIVATE_PASSWORD}")),
        b64(&format!("{HUB_USER}:{HUB_PASSWORD}")),
    ] {
        assert!(
            !haystack.contains(&secret),
            "a credential leaked into logs or metrics"
        );
    }
}

#[test]
fn a_configured_insecure_registry_is_served_over_plain_http_and_cached() {
    require_root!();
    let w = World::without_write_back("pp-proxy");
    let image = images::multi_layer(Format::Docker, 1, 256 << 10, 51);
    w.insecure.client().push_image("team/plain", "1", &image);
    let src = "docker://insecure.registry/team/plain:1";
    for _ in 0..2 {
        let dest = tempfile::tempdir().unwrap();
        w.skopeo()
            .insecure()
            .copy_to_dir(src, dest.path(), None, false)
            .expect_success();
        verify_dir_copy(dest.path(), &image).unwrap();
    }
    w.settle();
    let blobs = w.sources("team/plain", "blob");
    assert_eq!(blobs.len(), 2 * (image.layers.len() + 1), "{blobs:?}");
    assert!(
        blobs.iter().any(|s| s == "upstream") && blobs.iter().any(|s| s == "cache"),
        "{blobs:?}"
    );
    for blob in image.blobs() {
        assert_eq!(w.insecure.blob_fetches("team/plain", &blob.digest), 1);
    }
}

#[test]
fn tls_to_a_host_that_is_not_a_registry_is_spliced_untouched() {
    require_root!();
    let w = World::new("pp-proxy");
    // curl in the target cgroup (so the kernel redirects it), trusting only the site's own CA:
    // the handshake succeeds only if pullproxy did not terminate it.
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{remote_ip}",
        "--cacert",
    ])
    .arg(w.upstream_ca_cert())
    .arg("https://site.example/v2/")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut proc = harness::process::Proc::spawn_at(
        curl,
        &Placement::new()
            .netns(&w.node.ns)
            .cgroup(&w.node.runtime)
            .mounts(hosts()),
    );
    let out = proc.child_mut().wait().unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    proc.child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    proc.child_mut()
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(out.success(), "curl: {stdout} {stderr}");
    assert!(stdout.starts_with("200 "), "{stdout}");
    // It did go through pullproxy (the kernel redirected it) and was spliced, not served.
    assert!(
        w.proxy
            .wait_for(
                "redirected connection",
                Duration::from_secs(30),
                |r| r["dst"] == format!("{SITE_IP}:443")
            )
            .is_some(),
        "{}",
        w.proxy.dump()
    );
    assert!(w.site.count("GET", "/v2/") >= 1);
    assert!(w.pulls("").iter().all(|r| r["registry"] != "site.example"));
}

/// Runs curl in the target cgroup (so the kernel redirects it) with the test's hosts file;
/// returns (pid, stdout).
fn curl_in_runtime(w: &World, args: &[&str]) -> (u32, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut proc = harness::process::Proc::spawn_at(
        cmd,
        &Placement::new()
            .netns(&w.node.ns)
            .cgroup(&w.node.runtime)
            .mounts(hosts()),
    );
    let pid = proc.pid();
    let mut out = String::new();
    use std::io::Read;
    proc.child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = proc.child_mut().wait();
    (pid, out)
}

#[test]
fn a_client_that_does_not_trust_the_node_ca_goes_direct_until_it_restarts() {
    require_root!();
    let w = World::new("pp-proxy");
    let upstream_ca = w.upstream_ca_cert().display().to_string();
    let url = "https://registry-1.docker.io/v2/";
    // One process: like a runtime that started before the node CA was installed, it trusts only
    // the real registry's CA. Its first attempt meets pullproxy's leaf and fails; it retries
    // (once a second, for up to 30 s: pullproxy marks the process when it sees the client's
    // alert, which on a loaded machine may take longer than one retry) until a connection goes
    // direct. Only the real registry's certificate passes `--cacert`, so the 200 is direct.
    let (pid, out) = curl_in_runtime(
        &w,
        &[
            "-sS",
            "--retry",
            "30",
            "--retry-all-errors",
            "--retry-delay",
            "1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            &upstream_ca,
            url,
        ],
    );
    assert_eq!(out, "200", "refused by the client, then served direct");
    let warning = w
        .proxy
        .wait_for(
            "the client does not trust the node CA (it started before the CA was installed): its connections go direct until it restarts; run `pullproxy ca status`",
            Duration::from_secs(30),
            |r| r["pid"] == u64::from(pid),
        );
    assert!(warning.is_some(), "{}", w.proxy.dump());
    assert!(w.node.counter(proxy_common::Counter::Untrusted) >= 1);

    // A new process (a restarted runtime, now trusting the node CA) is redirected again.
    let node_ca = w.node.state().join("node-ca.pem");
    std::fs::write(&node_ca, w.node.node_ca_pem()).unwrap();
    let (_, out) = curl_in_runtime(
        &w,
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            &node_ca.display().to_string(),
            url,
        ],
    );
    assert_eq!(out, "200");
    w.settle();
    assert!(
        w.proxy
            .all("pull")
            .iter()
            .any(|r| r["kind"] == "other" && r["comm"] == "curl"),
        "the new process must be served by pullproxy:\n{}",
        w.proxy.dump()
    );
}
