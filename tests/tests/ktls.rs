//! pullproxy's kernel TLS path with real clients: cache hits sent with sendfile on a kernel TLS
//! socket, byte for byte, whole and in ranges, between misses on the same kept-alive
//! connection; a client's key update and close_notify; the clients and settings that keep TLS
//! in user space; and the benchmark's kernel-against-user-space figure. They need a kernel with
//! `tls` (the guests of `cargo xtask vm-test`) and are skipped loudly elsewhere.

use std::{io::Write as _, process::Command, sync::Arc};

use harness::{
    images::{self, Digest, Format, Image},
    process::Placement,
    pullproxy::sample,
    registry_client::RegistryClient,
    require_kernel_tls,
    world::World,
};
use pullproxy::accept::ktls;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject};

/// A World whose pullproxy waits long for handshakes: under emulation (the VM's TCG) a debug
/// build minting its first leaf certificate takes longer than the default 10 s, and these tests
/// are not about that deadline.
fn world(extra: &[(&'static str, String)]) -> World {
    let mut env = vec![("PULLPROXY_LISTEN__HANDSHAKE_TIMEOUT", "120s".to_owned())];
    env.extend_from_slice(extra);
    World::with_proxy_env("pp-ktls", &env)
}

/// An image whose one layer is big enough for several sendfile calls and an odd length.
fn image() -> Image {
    let layer = images::random_layer((5 << 20) + 4321, 0x6b71);
    Image::build(Format::Oci, images::Platform::linux_amd64(), None, &[layer])
}

/// A client of pullproxy's port for `registry-1.docker.io`, with `config`.
fn client(w: &World, config: ClientConfig) -> RegistryClient {
    RegistryClient::new(
        "registry-1.docker.io",
        "127.0.0.1:15443".parse().expect("addr"),
    )
    .netns(&w.node.ns)
    .tls(Arc::new(config))
    .anonymous()
    .timeout(std::time::Duration::from_secs(120))
}

/// A rustls client trusting the node CA: TLS `versions`, no ALPN (HTTP/1.1).
fn config(w: &World, versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    let pem = w.node.node_ca_pem();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("node CA")).expect("node CA");
    }
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn tls13(w: &World) -> ClientConfig {
    config(w, &[&rustls::version::TLS13])
}

/// A counter of pullproxy's kernel TLS metrics now.
fn counter(w: &World, series: &str) -> f64 {
    sample(&w.scrape(), &format!("pullproxy_tls_kernel_{series}"))
}

fn blob_path(digest: &Digest) -> String {
    format!("/v2/library/ktls/blobs/{digest}")
}

/// pushes [`image`] to the fake Docker Hub (not the hub: pullproxy fetches and caches it).
fn upstream_image(w: &World) -> Image {
    let image = image();
    w.upstream.client().push_image("library/ktls", "v1", &image);
    image
}

#[test]
fn cache_hits_go_out_with_sendfile_byte_exact_between_misses_on_one_connection() {
    require_kernel_tls!();
    let w = world(&[]);
    assert!(
        w.proxy.find(ktls::LOG_IN_USE).is_some(),
        "pullproxy did not say it uses kernel TLS:\n{}",
        w.proxy.dump()
    );
    let image = upstream_image(&w);
    let layer = &image.layers[0];
    let bytes = layer.bytes();
    let len = bytes.len();
    let mut c = client(&w, tls13(&w)).keep_alive().expect("connect");
    assert_eq!(
        c.tls().negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        "pullproxy prefers AES-128-GCM"
    );

    // A miss: the manifest comes from the upstream.
    let manifest = c
        .request(
            "GET",
            "/v2/library/ktls/manifests/v1",
            &[("Accept", images::MEDIA_TYPES.join(", ").as_str())],
        )
        .expect("manifest");
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    assert_eq!(manifest.body, image.manifest.bytes());
    // The blob, cold: fetched upstream and streamed (not a file yet).
    let cold = c
        .request("GET", &blob_path(&layer.digest), &[])
        .expect("cold");
    assert_eq!(cold.status, 200);
    assert!(cold.body == bytes, "the cold body, byte for byte");
    w.settle();
    let sent_cold = counter(&w, "sendfile_bytes_total");

    // Hits, on the same connection: whole, ranges (one across the 1 MiB chunk boundary, one
    // open-ended, one of the last byte), a HEAD, a miss in between, and whole again.
    let mut hit_bytes = 0;
    let whole = c
        .request("GET", &blob_path(&layer.digest), &[])
        .expect("hit");
    assert_eq!(whole.status, 200);
    assert!(whole.body == bytes, "the cached body, byte for byte");
    hit_bytes += len;
    for (range, start, end) in [
        (
            format!("bytes={}-{}", (1 << 20) - 7, (2 << 20) + 9),
            (1 << 20) - 7,
            (2 << 20) + 9,
        ),
        (format!("bytes={}-", len - 100_000), len - 100_000, len - 1),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1, len - 1),
        ("bytes=0-0".to_owned(), 0, 0),
    ] {
        let part = c
            .request(
                "GET",
                &blob_path(&layer.digest),
                &[("Range", range.as_str())],
            )
            .expect("range");
        assert_eq!(part.status, 206, "{range}");
        assert_eq!(
            part.header("Content-Range"),
            Some(format!("bytes {start}-{end}/{len}").as_str())
        );
        assert!(part.body == bytes[start..=end], "{range}, byte for byte");
        hit_bytes += end - start + 1;
    }
    let head = c
        .request("HEAD", &blob_path(&layer.digest), &[])
        .expect("head");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        Some(len.to_string().as_str())
    );
    let unknown = Digest::of(b"not pushed anywhere");
    let missing = c
        .request("GET", &blob_path(&unknown), &[])
        .expect("missing");
    assert_eq!(missing.status, 404, "{}", missing.text());
    let again = c
        .request("GET", &blob_path(&layer.digest), &[])
        .expect("hit");
    assert!(again.body == bytes);
    hit_bytes += len;
    drop(c);

    w.settle();
    // Six GETs and a HEAD from the cache; the cold GET and the unknown blob from upstream.
    let sources = w.sources("library/ktls", "blob");
    assert_eq!(
        sources.iter().filter(|s| *s == "cache").count(),
        7,
        "{sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|s| *s == "upstream").count(),
        2,
        "{sources:?}"
    );
    assert_eq!(
        counter(&w, "offload_total{outcome=\"kernel\"}"),
        1.0,
        "one connection"
    );
    assert_eq!(
        counter(&w, "sendfile_bytes_total") - sent_cold,
        hit_bytes as f64,
        "every cached body byte, and nothing else, went by sendfile"
    );
    assert_eq!(
        sent_cold, 0.0,
        "the cold fetch streams, it is not a file yet"
    );
}

/// `major.minor` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release.trim().split(['.', '-']);
    let mut next = || parts.next().and_then(|p| p.parse().ok()).expect("version");
    (next(), next())
}

#[test]
fn a_key_update_from_the_client_is_followed_or_ends_the_connection_cleanly() {
    require_kernel_tls!();
    let w = world(&[]);
    let image = upstream_image(&w);
    let layer = &image.layers[0];
    let bytes = layer.bytes();
    // Cached first, so the requests below are sendfile hits.
    let mut c = client(&w, tls13(&w)).keep_alive().expect("connect");
    assert_eq!(
        c.request("GET", &blob_path(&layer.digest), &[])
            .expect("cold")
            .status,
        200
    );
    w.settle();
    assert!(
        c.request("GET", &blob_path(&layer.digest), &[])
            .expect("hit")
            .body
            == bytes
    );

    // rustls asks for the server's keys to be updated too.
    c.tls().refresh_traffic_keys().expect("key update");
    let after = c.request("GET", &blob_path(&layer.digest), &[]);
    if kernel_version() >= (6, 14) {
        // The kernel takes new keys: the connection goes on, in both directions.
        let after = after.expect("a request after the key update");
        assert!(after.body == bytes);
        let again = c
            .request("GET", &blob_path(&layer.digest), &[])
            .expect("and another");
        assert!(again.body == bytes);
        assert_eq!(counter(&w, "key_updates_total{outcome=\"rekeyed\"}"), 1.0);
    } else {
        // Before 6.14 the kernel cannot take new keys: pullproxy ends the connection instead of
        // reading records it cannot decrypt, and the client's next connection works.
        assert!(
            after.is_err(),
            "a response under keys the kernel never got: {after:?}"
        );
        assert_eq!(
            counter(&w, "key_updates_total{outcome=\"unsupported\"}"),
            1.0
        );
        let mut fresh = client(&w, tls13(&w)).keep_alive().expect("reconnect");
        assert!(
            fresh
                .request("GET", &blob_path(&layer.digest), &[])
                .expect("hit")
                .body
                == bytes
        );
    }
}

#[test]
fn a_close_notify_from_the_client_is_answered_with_one() {
    require_kernel_tls!();
    let w = world(&[]);
    let mut c = client(&w, tls13(&w)).keep_alive().expect("connect");
    assert_eq!(c.request("GET", "/v2/", &[]).expect("ping").status, 200);
    c.tls().send_close_notify();
    c.flush_tls().expect("close_notify");
    // rustls reports a close without the server's close_notify as an error.
    assert_eq!(
        c.read_to_close().expect("a clean TLS close from pullproxy"),
        0
    );
    assert_eq!(counter(&w, "offload_total{outcome=\"kernel\"}"), 1.0);
}

/// curl with the node CA, inside the node, straight to pullproxy's port; its exit status and
/// what it wrote (`-w`).
fn curl(w: &World, args: &[&str], url_path: &str) -> (bool, String) {
    let ca = w.node.state().join("node-ca-for-curl.pem");
    std::fs::write(&ca, w.node.node_ca_pem()).expect("CA file");
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(&ca)
        .args([
            "--resolve",
            "registry-1.docker.io:15443:127.0.0.1",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_version} %{size_download}",
        ])
        .args(args)
        .arg(format!("https://registry-1.docker.io:15443{url_path}"));
    let done = harness::process::run_at(
        cmd,
        &Placement::new().netns(&w.node.ns),
        std::time::Duration::from_secs(120),
    )
    .expect("curl finished");
    (
        done.success(),
        format!("{} {}", done.stdout_text(), done.stderr),
    )
}

#[test]
fn clients_the_kernel_path_does_not_take_are_served_in_user_space_and_counted() {
    require_kernel_tls!();
    let w = world(&[]);
    let image = upstream_image(&w);
    let layer = &image.layers[0];
    let bytes = layer.bytes();
    let path = blob_path(&layer.digest);
    assert_eq!(
        client(&w, tls13(&w))
            .keep_alive()
            .expect("c")
            .request("GET", &path, &[])
            .expect("cold")
            .status,
        200
    );
    w.settle();

    // TLS 1.2: user space, whole and in a range.
    let mut old = client(&w, config(&w, &[&rustls::version::TLS12]))
        .keep_alive()
        .expect("TLS 1.2");
    assert!(old.request("GET", &path, &[]).expect("hit").body == bytes);
    let part = old
        .request("GET", &path, &[("Range", "bytes=10-19")])
        .expect("range");
    assert!(part.body == bytes[10..20]);
    drop(old);
    // HTTP/2 (curl offers h2 and HTTP/1.1; pullproxy prefers h2): user space.
    let (ok, out) = curl(&w, &["--http2"], &path);
    assert!(ok, "{out}");
    assert!(out.starts_with(&format!("2 {}", bytes.len())), "{out}");
    // HTTP/1.1 from the same curl: the kernel.
    let (ok, out) = curl(&w, &["--http1.1"], &path);
    assert!(ok, "{out}");
    assert!(out.starts_with(&format!("1.1 {}", bytes.len())), "{out}");
    for (outcome, n) in [("tls12", 1.0), ("http2", 1.0), ("kernel", 2.0)] {
        assert_eq!(
            counter(&w, &format!("offload_total{{outcome=\"{outcome}\"}}")),
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        counter(&w, "sendfile_bytes_total"),
        bytes.len() as f64,
        "only the HTTP/1.1 TLS 1.3 hit went by sendfile"
    );

    // Switched off in the configuration: everything in user space, said once at start.
    drop(w);
    let off = world(&[("PULLPROXY_LISTEN__KERNEL_TLS", "false".to_owned())]);
    assert!(
        off.proxy.find(ktls::LOG_OFF).is_some(),
        "{}",
        off.proxy.dump()
    );
    let image = upstream_image(&off);
    let mut c = client(&off, tls13(&off)).keep_alive().expect("connect");
    let path = blob_path(&image.layers[0].digest);
    assert_eq!(c.request("GET", &path, &[]).expect("cold").status, 200);
    off.settle();
    assert!(c.request("GET", &path, &[]).expect("hit").body == image.layers[0].bytes());
    assert_eq!(counter(&off, "offload_total{outcome=\"disabled\"}"), 1.0);
    assert_eq!(counter(&off, "offload_total{outcome=\"kernel\"}"), 0.0);
    assert_eq!(counter(&off, "sendfile_bytes_total"), 0.0);
}

/// The benchmark's fast path figure in this kernel: kernel TLS against user-space TLS. Its
/// numbers (a `FASTPATH-FIGURE-JSON` line on the console, which `cargo xtask vm-test` keeps as
/// `results/fastpath-guest-<kernel>.json`) are the benchmark's; what this test holds it to is that
/// both paths ran and served what they should.
#[test]
fn the_benchmarks_fast_path_figure_compares_kernel_and_user_space_tls() {
    require_kernel_tls!();
    let out = tempfile::NamedTempFile::new().expect("output file");
    let status = Command::new(harness::pullproxy::bench_binary())
        .args([
            "--only", "fastpath", "--sizes", "64", "--rounds", "3", "--out",
        ])
        .arg(out.path())
        .status()
        .expect("pp-bench");
    assert!(status.success(), "pp-bench: {status}");
    let text = std::fs::read_to_string(out.path()).expect("figure");
    let figure: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    // Straight to the process's stdout, which the test harness does not capture (println! it
    // does, for a test that passes): the guest's console carries it to the host.
    writeln!(
        std::io::stdout(),
        "FASTPATH-FIGURE-JSON {}",
        serde_json::to_string(&figure).expect("JSON")
    )
    .expect("stdout");
    let rows = figure["fastpath"]["rows"].as_array().expect("rows");
    assert_eq!(figure["fastpath"]["kernel_tls"], ktls::LOG_IN_USE);
    for system in ["pullproxy hub hit", "pullproxy cache hit"] {
        for client in ["loadgen", "curl"] {
            for tls in ["user", "kernel"] {
                let row = rows
                    .iter()
                    .find(|r| r["system"] == system && r["client"] == client && r["tls"] == tls)
                    .unwrap_or_else(|| panic!("no row for {system}, {client}, {tls}"));
                assert_eq!(row["mib_s"].as_array().map(Vec::len), Some(3));
                assert_eq!(row["vs_user"].is_object(), tls == "kernel");
            }
        }
    }
}
