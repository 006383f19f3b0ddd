//! The harness on its own, without pullproxy: a docker-registry standing in for Docker Hub at an
//! address that exists only in the test's network namespace, images built and pushed by the
//! harness, and an unmodified skopeo that finds and trusts that registry only through its
//! private mount namespace (hosts file, CA bundle). If these fail, end-to-end tests of the proxy
//! cannot mean anything.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use harness::{
    images::{self, Digest, Format, Image},
    mountns::MountSpec,
    netns::NetNs,
    process::Placement,
    registry::{Registry, RemoteProxy},
    require_root,
    skopeo::{Skopeo, verify_dir_copy},
    testca::{TestCa, UPSTREAM_HOSTS, ca_bundle},
};

/// The fake Docker Hub's address, inside the test namespace only.
const UPSTREAM_IP: &str = "10.204.0.1";
/// The fake sealos hub's.
const HUB_IP: &str = "10.204.0.2";
/// A pull-through mirror's.
const MIRROR_IP: &str = "10.204.0.3";

/// A namespace with a TLS docker-registry answering for the public registry names. Fields drop
/// in order: the registry process before the namespace it lives in.
struct Upstream {
    registry: Registry,
    ca: TestCa,
    ns: NetNs,
}

impl Upstream {
    fn start() -> Self {
        let ns = NetNs::new("pp-selftest");
        ns.add_addr(&format!("{UPSTREAM_IP}/32"));
        let ca = TestCa::new("upstream");
        let started = Instant::now();
        let registry = Registry::builder(SocketAddr::new(ip(UPSTREAM_IP), 443))
            .netns(&ns)
            .tls(&ca.upstream_leaf())
            .start();
        eprintln!("timing: TLS registry ready in {:?}", started.elapsed());
        Self { registry, ca, ns }
    }

    /// What a client needs to see this registry as the real ones: hosts and the CA bundle.
    fn mounts(&self) -> MountSpec {
        let bundle = ca_bundle(&self.ca.dir().join("bundle.pem"), &[&self.ca.cert_pem()]);
        MountSpec::new()
            .hosts(UPSTREAM_HOSTS, ip(UPSTREAM_IP))
            .ca_bundle(bundle)
    }

    fn skopeo(&self) -> Skopeo {
        Skopeo::new(Placement::new().netns(&self.ns).mounts(self.mounts()))
    }

    fn push(&self, repo: &str, tag: &str, image: &Image) -> Digest {
        let started = Instant::now();
        let digest = self.registry.client().push_image(repo, tag, image);
        eprintln!(
            "timing: pushed {repo}:{tag} ({} blobs, {} bytes) in {:?}",
            image.layers.len() + 1,
            image.blob_bytes(),
            started.elapsed()
        );
        digest
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn skopeo_inspects_and_copies_from_a_fake_docker_hub() {
    require_root!();
    let up = Upstream::start();
    let busybox = images::busybox(Format::Docker);
    let busybox_oci = images::busybox(Format::Oci);
    let layered = images::multi_layer(Format::Oci, 4, 4 << 20, 100);
    assert_eq!(
        up.push("library/busybox", "latest", &busybox),
        *busybox.digest()
    );
    up.push("library/busybox-oci", "1.0", &busybox_oci);
    up.push("library/layered", "latest", &layered);
    let skopeo = up.skopeo();

    let out = skopeo.inspect(
        "docker://registry-1.docker.io/library/busybox:latest",
        None,
        false,
    );
    let info = out.expect_success().json();
    eprintln!("timing: skopeo inspect took {:?}", out.finished.elapsed);
    assert_eq!(info["Digest"], busybox.digest().as_str(), "{info}");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Layers"][0], busybox.layers[0].digest.as_str());

    let raw = skopeo.inspect(
        "docker://registry-1.docker.io/library/busybox-oci:1.0",
        None,
        true,
    );
    assert_eq!(
        Digest::of(&raw.expect_success().finished.stdout),
        *busybox_oci.digest(),
        "inspect --raw must print the manifest exactly as pushed"
    );

    // A copy fetches every blob exactly once, and the files match the pushed digests.
    let dest = tempfile::tempdir().unwrap();
    let copy = skopeo.copy_to_dir(
        "docker://registry-1.docker.io/library/layered:latest",
        dest.path(),
        None,
        false,
    );
    copy.expect_success();
    eprintln!(
        "timing: skopeo copy of {} bytes took {:?}",
        layered.blob_bytes(),
        copy.finished.elapsed
    );
    verify_dir_copy(dest.path(), &layered).unwrap();
    for blob in layered.blobs() {
        // The access log line is written as the handler returns, just after the last byte.
        let path = format!("/v2/library/layered/blobs/{}", blob.digest);
        up.registry
            .wait_count("GET", &path, 1, Duration::from_secs(30));
        assert_eq!(
            up.registry.blob_fetches("library/layered", &blob.digest),
            1,
            "{}",
            blob.digest
        );
    }

    // The names and the trust exist only in skopeo's mount namespace: without the bundle the
    // same registry is an unknown authority, and the host's files never changed.
    let untrusting = Skopeo::new(
        Placement::new()
            .netns(&up.ns)
            .mounts(MountSpec::new().hosts(UPSTREAM_HOSTS, ip(UPSTREAM_IP))),
    );
    let refused = untrusting.inspect(
        "docker://registry-1.docker.io/library/busybox:latest",
        None,
        false,
    );
    let stderr = refused.expect_failure();
    assert!(stderr.contains("certificate"), "{stderr}");
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    assert!(!hosts.contains(UPSTREAM_IP), "host /etc/hosts changed");
}

#[test]
fn htpasswd_hub_refuses_wrong_credentials_and_follows_a_password_change() {
    require_root!();
    let ns = NetNs::new("pp-selftest-hub");
    ns.add_addr(&format!("{HUB_IP}/32"));
    let mut hub = Registry::builder(SocketAddr::new(ip(HUB_IP), 5000))
        .netns(&ns)
        .server_name("sealos.hub")
        .htpasswd("admin", "passw0rd")
        .start();
    assert_eq!(hub.url(), "http://sealos.hub:5000");
    let busybox = images::busybox(Format::Docker);
    hub.client()
        .push_image("library/busybox", "latest", &busybox);

    let client = hub.client();
    assert_eq!(client.ping().unwrap(), 200);
    assert_eq!(client.clone().anonymous().ping().unwrap(), 401);
    let wrong = client.clone().creds("admin", "nope");
    let r = wrong.get_manifest("library/busybox", "latest").unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.header("Www-Authenticate"),
        Some("Basic realm=\"pullproxy-test\"")
    );

    let skopeo = Skopeo::new(
        Placement::new()
            .netns(&ns)
            .mounts(MountSpec::new().hosts(&["sealos.hub"], ip(HUB_IP))),
    )
    .insecure();
    let image = "docker://sealos.hub:5000/library/busybox:latest";
    let ok = skopeo.inspect(image, Some(("admin", "passw0rd")), false);
    assert_eq!(
        ok.expect_success().json()["Digest"],
        busybox.digest().as_str()
    );
    let stderr = skopeo
        .inspect(image, Some(("admin", "nope")), false)
        .expect_failure()
        .to_owned();
    assert!(
        stderr.contains("unauthorized") || stderr.contains("401"),
        "{stderr}"
    );

    // A password change takes effect without a restart (distribution re-reads htpasswd).
    hub.set_password("rotated");
    let r = client.get_manifest("library/busybox", "latest").unwrap();
    assert_eq!(r.status, 401, "the old password must stop working");
    assert_eq!(hub.client().ping().unwrap(), 200);
    skopeo
        .inspect(image, Some(("admin", "rotated")), false)
        .expect_success();
}

#[test]
fn multi_platform_indexes_round_trip_with_digests_unchanged() {
    require_root!();
    let up = Upstream::start();
    let skopeo = up.skopeo();
    let client = up.registry.client();
    for (format, repo) in [
        (Format::Oci, "library/multi"),
        (Format::Docker, "library/multi-docker"),
    ] {
        let index = images::multi_platform(format);
        let started = Instant::now();
        assert_eq!(client.push_index(repo, "latest", &index), *index.digest());
        eprintln!("timing: pushed {repo} index in {:?}", started.elapsed());
        let src = format!("docker://registry-1.docker.io/{repo}:latest");

        let raw = skopeo.inspect(&src, None, true);
        assert_eq!(
            Digest::of(&raw.expect_success().finished.stdout),
            *index.digest()
        );
        // Without --raw skopeo picks this host's platform out of the index.
        let info = skopeo.inspect(&src, None, false).expect_success().json();
        assert_eq!(info["Architecture"], "amd64", "{info}");
        assert_eq!(
            info["Layers"][0],
            index.image_for("amd64").layers[0].digest.as_str()
        );

        // Through skopeo to another repository and back: every digest survives.
        let dst = format!("docker://registry-1.docker.io/{repo}-copy:v1");
        skopeo
            .run(&["copy", "--all", "--preserve-digests", &src, &dst])
            .expect_success();
        let copy_repo = format!("{repo}-copy");
        let head = client.head_manifest(&copy_repo, "v1").unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("Docker-Content-Digest"),
            Some(index.digest().as_str())
        );
        for image in &index.images {
            let m = client
                .get_manifest(&copy_repo, image.digest().as_str())
                .unwrap();
            assert_eq!(
                m.status,
                200,
                "{} {}",
                image.platform.architecture,
                m.text()
            );
            assert_eq!(Digest::of(&m.body), *image.digest());
            for blob in image.blobs() {
                assert!(client.has_blob(&copy_repo, &blob.digest).unwrap());
            }
        }
    }
}

#[test]
fn registry_survives_a_restart_serves_ranges_and_counts_fetches() {
    require_root!();
    let mut up = Upstream::start();
    let busybox = images::busybox(Format::Oci);
    up.push("library/busybox", "latest", &busybox);
    let client = up.registry.client();
    let layer = &busybox.layers[0];
    let bytes = layer.bytes();

    let full = client
        .get_blob("library/busybox", &layer.digest, None)
        .unwrap();
    assert_eq!(full.status, 200);
    assert_eq!(Digest::of(&full.body), layer.digest);
    let open = client
        .get_blob("library/busybox", &layer.digest, Some("bytes=1000-"))
        .unwrap();
    assert_eq!(open.status, 206, "open-ended ranges (containerd 2.1)");
    assert_eq!(open.body, bytes[1000..]);
    let closed = client
        .get_blob("library/busybox", &layer.digest, Some("bytes=0-99"))
        .unwrap();
    assert_eq!((closed.status, &closed.body[..]), (206, &bytes[..100]));
    let path = format!("/v2/library/busybox/blobs/{}", layer.digest);
    assert_eq!(
        up.registry
            .wait_count("GET", &path, 3, Duration::from_secs(30)),
        3
    );
    assert_eq!(
        up.registry.blob_fetches("library/busybox", &layer.digest),
        3
    );

    up.registry.stop();
    assert!(
        client.ping().is_err(),
        "a stopped registry refuses connections"
    );
    let started = Instant::now();
    up.registry.start();
    eprintln!("timing: registry restart took {:?}", started.elapsed());
    let m = client.get_manifest("library/busybox", "latest").unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(Digest::of(&m.body), *busybox.digest());
    up.registry.clear_requests();
    assert_eq!(up.registry.requests(), vec![]);
}

#[test]
fn pull_through_registry_fetches_from_the_fake_upstream() {
    require_root!();
    let up = Upstream::start();
    let busybox = images::busybox(Format::Docker);
    up.push("library/busybox", "latest", &busybox);
    up.ns.add_addr(&format!("{MIRROR_IP}/32"));
    // The mirror process itself resolves and trusts the fake Docker Hub like any client.
    let mirror = Registry::builder(SocketAddr::new(ip(MIRROR_IP), 5000))
        .netns(&up.ns)
        .server_name("mirror.local")
        .mounts(up.mounts())
        .proxy(RemoteProxy {
            url: "https://registry-1.docker.io".to_owned(),
            username: None,
            password: None,
        })
        .start();
    let client = mirror.client();
    let m = client.get_manifest("library/busybox", "latest").unwrap();
    assert_eq!(m.status, 200, "{}\n{}", m.text(), mirror.log());
    assert_eq!(Digest::of(&m.body), *busybox.digest());
    let layer = &busybox.layers[0].digest;
    let get = || {
        let b = client.get_blob("library/busybox", layer, None).unwrap();
        assert_eq!(Digest::of(&b.body), *layer);
    };
    get();
    // distribution 2.8 serves a miss from one upstream GET and stores the blob from a second,
    // concurrent one; once stored, the mirror answers from its own storage.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mirror.stores(layer) {
        assert!(Instant::now() < deadline, "the mirror never stored {layer}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once stored, the mirror answers from its own storage: more GETs through it never make the
    // upstream's count (one or two fetches, see above) grow past two. Registries log a request
    // when its handler returns, so counts are waited for, never read once.
    for _ in 0..3 {
        get();
    }
    let path = format!("/v2/library/busybox/blobs/{layer}");
    let served = mirror.wait_count("GET", &path, 4, Duration::from_secs(30));
    assert_eq!(served, 4, "the mirror's log shows every GET");
    let upstream_fetches = up.registry.blob_fetches("library/busybox", layer);
    assert!((1..=2).contains(&upstream_fetches), "{upstream_fetches}");
}
