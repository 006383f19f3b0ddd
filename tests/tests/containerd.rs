//! Unmodified containerd 1.6 (its default configuration: no config file, no `hosts.toml`, no
//! mirrors) pulling `docker.io/...` and `quay.io/...` on a node where pullproxy runs: through
//! `ctr` (which fetches in its own process) and through CRI `PullImage` (where the daemon
//! fetches, as for the kubelet). Also podman and skopeo as further clients in the target
//! cgroup. The registries are the harness's World: the sealos hub, a fake Docker Hub and a
//! private quay.io, all inside the test's network namespace.

use harness::{
    containerd::{CTR_NAMESPACE, Containerd},
    images::{self, Format},
    require_root,
    world::{self, World},
};
use serde_json::Value;

/// Fields drop in declaration order: containerd (and everything in its mount namespace) before
/// the world it runs in.
struct Fixture {
    ctd: Containerd,
    w: World,
}

impl Fixture {
    fn new() -> Self {
        let w = World::new("pp-ctd");
        let ctd = Containerd::start(w.runtime_placement());
        Self { ctd, w }
    }
}

/// Every record is from the source `want`, and there is at least one of `kind`.
fn assert_all_from(records: &[Value], kind: &str, want: &str) {
    let sources = world::sources(records, kind);
    assert!(
        !sources.is_empty() && sources.iter().all(|s| s == want),
        "{kind} sources {sources:?}, expected all {want}:\n{records:#?}"
    );
}

#[test]
fn ctr_pull_is_served_from_the_hub_with_the_upstream_down() {
    require_root!();
    let mut f = Fixture::new();
    let image = images::busybox(Format::Docker);
    f.w.hub
        .client()
        .push_image("library/busybox", "latest", &image);
    f.w.upstream.stop();

    let name = "docker.io/library/busybox:latest";
    f.ctd.pull(name, None).expect_success();
    f.w.settle();

    let pulls = f.w.pulls("library/busybox");
    assert_all_from(&pulls, "manifest", "hub");
    assert_all_from(&pulls, "blob", "hub");
    // ctr fetched (not the daemon), from the target cgroup, redirected by the kernel.
    assert!(pulls.iter().all(|r| r["comm"] == "ctr"), "{pulls:#?}");
    assert_eq!(
        world::sources(&pulls, "blob").len(),
        image.layers.len() + 1,
        "config and every layer once"
    );
    // The image keeps its name and digest.
    let stored = f
        .ctd
        .image(CTR_NAMESPACE, name)
        .unwrap_or_else(|| panic!("{name} not in ctr images ls"));
    assert_eq!(stored.digest, image.digest().as_str());
    assert_eq!(stored.media_type, Format::Docker.manifest_type());
}
