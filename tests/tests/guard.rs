//! The trust boundary around the redirect, with real processes: only pullproxy may bind its ports
//! (the bind guard), also while it is down, and only real container runtimes become redirect
//! targets. Each test has its own Node (network namespace, cgroup subtree, pins).

use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use harness::{
    cgroup::Cgroup,
    netns::NetNs,
    node::Node,
    origin::Origin,
    probe,
    process::{Placement, sibling_binary},
    pullproxy::{Pullproxy, run_expecting_failure},
    registry_client::{Body, RegistryClient},
    require_root,
    squatter::{EPERM, NOBODY, Squat},
};
use proxy_common::Counter;

/// A "registry" address inside the node's namespace.
const ORIGIN: &str = "10.203.0.1:443";

/// Every way to reach the proxy port (15443) and the admin port (15090) a squatter might try.
const GUARDED: &[&str] = &[
    "tcp:127.0.0.1:15443",
    "tcp:0.0.0.0:15443",
    "tcp:[::1]:15443",
    "tcp:[::]:15443",
    "tcp:[::ffff:127.0.0.1]:15443",
    "tcp:127.0.0.1:15090",
    "tcp:0.0.0.0:15090",
];
/// What the guard must leave alone: other ports, and UDP on the guarded ones.
const FREE: &[&str] = &[
    "tcp:127.0.0.1:15444",
    "tcp:0.0.0.0:8080",
    "tcp:[::]:15091",
    "udp:127.0.0.1:15443",
];

fn node_with_origin(prefix: &str) -> (Node, Origin) {
    let node = Node::new(prefix);
    node.ns.add_addr("10.203.0.1/32");
    let origin = Origin::start(&node.ns, ORIGIN.parse().unwrap());
    (node, origin)
}

fn redirected(node: &Node) -> bool {
    let p = probe::connect(&node.ns, &node.runtime, ORIGIN.parse().unwrap()).expect("probe");
    assert!(
        p.reply.starts_with(&format!("origin {ORIGIN} saw")),
        "the connection must reach the origin, through the proxy or directly: {p:?}"
    );
    p.redirected()
}

#[test]
fn a_stopped_proxys_ports_cannot_be_taken_and_a_restart_in_a_new_cgroup_takes_them_back() {
    require_root!();
    let (node, _origin) = node_with_origin("pp-guard");
    let mut proxy = node.start_proxy(&[]);
    assert!(redirected(&node));
    // Crash: the pins stay, and so does the guard.
    proxy.kill();
    let refused_before = node.counter(Counter::BindRefused);

    // Unprivileged squatters beside the runtime and in the runtime's own (target) cgroup, and a
    // root one: the guard is about who is pullproxy, not about privileges.
    let in_node = |cg: &Cgroup| Placement::new().netns(&node.ns).cgroup(cg);
    let squatters = [
        Squat::at(in_node(&node.other)).user(NOBODY).bind(GUARDED),
        Squat::at(in_node(&node.runtime)).user(NOBODY).bind(GUARDED),
        Squat::at(in_node(&node.other)).bind(GUARDED),
    ];
    for s in &squatters {
        assert!(
            s.not(Some(EPERM)).is_empty(),
            "every bind of a guarded port must fail with EPERM: {:?}",
            s.attempts
        );
    }
    let refused = (squatters.len() * GUARDED.len()) as u64;
    assert_eq!(
        node.counter(Counter::BindRefused) - refused_before,
        refused,
        "each refused bind is counted once"
    );

    // Everything else still binds, for everyone (one at a time: each holds what it bound).
    for (cg, user) in [(&node.other, Some(NOBODY)), (&node.runtime, None)] {
        let squat = Squat::at(in_node(cg));
        let s = match user {
            Some(uid) => squat.user(uid),
            None => squat,
        }
        .bind(FREE);
        assert!(s.not(None).is_empty(), "{:?}", s.attempts);
    }
    assert_eq!(node.counter(Counter::BindRefused) - refused_before, refused);

    // Another network namespace (a pod's) is not pullproxy's: its own port 15443 is its own.
    let pod = NetNs::new("pp-guard-pod");
    let s = Squat::at(Placement::new().netns(&pod).cgroup(&node.other))
        .user(NOBODY)
        .bind(&["tcp:127.0.0.1:15443", "tcp:0.0.0.0:15090"]);
    assert!(s.not(None).is_empty(), "{:?}", s.attempts);
    drop(s);

    // Meanwhile the runtime's connections go direct (fail open), to nobody else.
    let no_listener = node.counter(Counter::NoListener);
    assert!(!redirected(&node));
    assert_eq!(node.counter(Counter::NoListener), no_listener + 1);

    // pullproxy comes back in a new cgroup (a new pod): it replaces the old bypass mark with its
    // own, binds its ports and serves again.
    let moved = node.root.child("pullproxy-2");
    let proxy = Pullproxy::start(&in_node(&moved), &node.env());
    assert!(redirected(&node), "{}", proxy.dump());
    // The old cgroup is nobody's now: a process left there cannot bind a guarded port either
    // (127.0.0.2 is free; only the guard stands in the way).
    let old = Squat::at(in_node(&node.proxy_cg)).bind(&["tcp:127.0.0.2:15090"]);
    assert!(old.not(Some(EPERM)).is_empty(), "{:?}", old.attempts);
    let own = proxy
        .all("cgroup marked")
        .into_iter()
        .filter(|r| r["role"] == "Bypass")
        .map(|r| r["cgroup"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(own, vec![moved.path().to_owned()], "{}", proxy.dump());

    // The refusals are their own metric, not a connection outcome.
    let metrics = RegistryClient::new("127.0.0.1", "127.0.0.1:15090".parse().unwrap())
        .netns(&node.ns)
        .anonymous()
        .request("GET", "/metrics", &[], Body::Empty)
        .expect("GET /metrics")
        .text();
    let total = node.counter(Counter::BindRefused);
    assert!(total > refused, "{total}");
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("pullproxy_guard_refused_binds_total {total}")),
        "{metrics}"
    );
    assert!(!metrics.contains("bind_refused"), "{metrics}");
    drop(squatters);
}

#[test]
fn a_listener_from_before_the_guard_is_named_and_nothing_is_attached() {
    require_root!();
    let (node, _origin) = node_with_origin("pp-guard-first");
    // No pullproxy has run on this node: nothing stops a user from listening on the port.
    let squatter = Squat::at(Placement::new().netns(&node.ns).cgroup(&node.other))
        .user(NOBODY)
        .bind(&["tcp:127.0.0.1:15443"]);
    assert!(squatter.not(None).is_empty(), "{:?}", squatter.attempts);
    let stderr = run_expecting_failure(&node.ns, &node.proxy_cg, &node.env(), &[]);
    assert!(
        stderr.contains("port 15443 is already in use")
            && stderr.contains(&format!("pid {} (pp-listen), uid {NOBODY}", squatter.pid)),
        "the error must name the holder:\n{stderr}"
    );
    // The start was refused before anything was attached: the runtime's connections keep going
    // direct instead of to the squatter.
    assert!(!node.pins().exists(), "{stderr}");
    assert!(!redirected(&node));

    // Without the redirect there is no guard, and the bind error itself names the holder.
    let mut env = node.env();
    env.push(("PULLPROXY_REDIRECT__ENABLED", "false".to_owned()));
    let stderr = run_expecting_failure(&node.ns, &node.proxy_cg, &env, &[]);
    assert!(
        stderr.contains("binding 127.0.0.1:15443")
            && stderr.contains(&format!("pid {} (pp-listen)", squatter.pid))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );
}

/// Copies `pp-listen` to `dir/name` with mode 0755 (root-owned: the tests run as root).
fn install(src: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy to {}: {e}", dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod");
    dst
}

/// Removes a file on drop.
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn only_real_runtimes_become_targets() {
    require_root!();
    let (node, _origin) = node_with_origin("pp-guard-rt");
    let listen = sibling_binary("pp-listen");
    // A runtime as a package installs it: root's file in a directory only root may write.
    let sbin = node.state().join("sbin");
    fs::create_dir(&sbin).expect("sbin");
    fs::set_permissions(&sbin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let real_exe = install(&listen, &sbin, "containerd");
    // Root running a copy straight from /tmp.
    let tmp_exe = Removed(install(
        &listen,
        &std::env::temp_dir(),
        &format!("{}-containerd", node.root.path().trim_start_matches('/')),
    ));
    let real_cg = node.root.child("real");
    let nobody_cg = node.root.child("spoof-nobody");
    let tmp_cg = node.root.child("spoof-tmp");
    let at = |cg: &Cgroup| Placement::new().netns(&node.ns).cgroup(cg);
    let real = Squat::at(at(&real_cg))
        .exe(&real_exe)
        .comm("containerd")
        .bind(&[]);
    // `cp /bin/sleep /tmp/containerd` as any user: here, nobody with a root-owned copy.
    let spoof_nobody = Squat::at(at(&nobody_cg))
        .exe(&real_exe)
        .user(NOBODY)
        .comm("containerd")
        .bind(&[]);
    let spoof_tmp = Squat::at(at(&tmp_cg))
        .exe(&tmp_exe.0)
        .comm("containerd")
        .bind(&[]);

    let proxy = node.start_proxy(&[("PULLPROXY_REDIRECT__TARGETS", "auto".to_owned())]);
    // One rescan marks every target it found at once: once the real one is marked, the scan that
    // judged the impostors is complete.
    let marked = proxy.wait_for("cgroup marked", Duration::from_secs(30), |r| {
        r["cgroup"] == real_cg.path()
    });
    assert!(marked.is_some(), "{}", proxy.dump());
    let targets: Vec<String> = proxy
        .all("cgroup marked")
        .into_iter()
        .filter(|r| r["role"] == "Target")
        .map(|r| r["cgroup"].as_str().unwrap_or_default().to_owned())
        .collect();
    for spoof in [&nobody_cg, &tmp_cg] {
        assert!(
            !targets.iter().any(|t| t == spoof.path()),
            "{} must not be a target: {targets:?}",
            spoof.path()
        );
    }
    let verdict = |pid: u32| {
        proxy
            .all("process named like a container runtime is not redirected")
            .into_iter()
            .find(|r| r["pid"] == pid)
            .map(|r| r["verdict"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no verdict for pid {pid}:\n{}", proxy.dump()))
    };
    assert!(
        verdict(spoof_nobody.pid).contains(&format!("runs as uid {NOBODY}, not root")),
        "{}",
        verdict(spoof_nobody.pid)
    );
    assert!(
        verdict(spoof_tmp.pid).contains("is writable by group or others (mode 1777)"),
        "{}",
        verdict(spoof_tmp.pid)
    );
    assert!(
        proxy
            .all("process named like a container runtime is not redirected")
            .iter()
            .all(|r| r["pid"] != real.pid),
        "{}",
        proxy.dump()
    );

    // And the kernel agrees: connections from the real runtime's cgroup are redirected, from
    // the impostors' they go direct.
    let from = |cg: &Cgroup| probe::connect(&node.ns, cg, ORIGIN.parse().unwrap()).expect("probe");
    assert!(from(&real_cg).redirected());
    assert!(!from(&nobody_cg).redirected());
    assert!(!from(&tmp_cg).redirected());
}
