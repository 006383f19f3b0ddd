//! The wiring of the pull proxy that only a real process shows, with real registries and real
//! clients: the kernel redirect, TLS termination and the splice of hosts that are not registries,
//! a client that does not trust the node CA, a plain-HTTP registry through the listener, metrics
//! through the admin port, hostile bytes at the HTTP layer, and root-only files on disk.
//! `docker-registry` plays the sealos hub (htpasswd), Docker Hub and a private quay.io behind TLS;
//! an unmodified `skopeo` is the client whose connections the kernel redirects to pullproxy.
//!
//! What pullproxy decides for a request (hub, cache, upstream, stale, who is entitled, ranges,
//! corrupt bodies, CDN redirects, hub credentials) is tested in-process, in seconds and without
//! root: `proxy/src/registry/tests/`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use harness::{
    images::{self, Digest, Format},
    process::Placement,
    pullproxy::sample,
    registry_client::Body,
    require_root,
    skopeo::verify_dir_copy,
    world::{HUB_PASSWORD, HUB_USER, PRIVATE_PASSWORD, PRIVATE_USER, SITE_IP, World, hosts},
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

/// What pullproxy keeps on the node is root's alone (the in-process registry tests cover what it
/// serves from there, `registry::tests::upstream`).
#[test]
fn cached_blobs_and_tls_state_are_root_only() {
    require_root!();
    let w = World::without_write_back("pp-proxy");
    let image = images::multi_layer(Format::Oci, 1, 256 << 10, 31);
    w.upstream.client().push_image("library/app", "1.0", &image);
    let (dir, out) = copy(&w, "docker://registry-1.docker.io/library/app:1.0", None);
    out.expect_success();
    verify_dir_copy(dir.path(), &image).unwrap();
    // The blob goes into the cache once its download is verified, which may finish just after
    // the client has its bytes.
    let layer = &image.layers[0].digest;
    let cached = w.node.cache_dir().join("blobs/sha256").join(layer.hex());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cached.is_file() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    state_is_root_only(&w, layer);
}

/// Hostile bytes over a real connection: paths hyper decodes before pullproxy sees them, and a
/// header too large to buffer. Which paths are refused, and that nothing is asked for them, is
/// `registry::tests::malformed`; here, that the listener hands them over the same way, answers
/// with an OCI error, keeps serving, and writes nothing to disk for them.
#[test]
fn hostile_requests_on_the_wire_get_a_4xx_and_never_reach_the_disk_or_crash_the_proxy() {
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
        "/v2/library/ok/blobs/sha256:../../../../etc/passwd",
        "/v2/library/ok//manifests/latest",
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
