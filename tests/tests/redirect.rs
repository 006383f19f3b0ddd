//! The kernel redirect with real processes: each test gets its own network namespace, its own
//! cgroup subtree (where the programs are attached) and its own pin directory, so tests run in
//! parallel and never touch the host's connections.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use harness::{
    cgroup::Cgroup,
    node::{Node, PinDir},
    origin::Origin,
    probe::{self, Probe},
    process::Placement,
    pullproxy::Pullproxy,
    require_root,
};
use proxy_common::Counter;
use pullproxy::redirect;

/// An IPv4 "registry" address that exists only inside the test's namespace.
const ORIGIN_V4: &str = "10.203.0.1:443";
/// An IPv6 one.
const ORIGIN_V6: &str = "[fd00:203::1]:443";

/// One test's world: a node and two "registries" (plain TCP origins) inside it. Fields drop in
/// declaration order: the origins before the node.
struct World {
    origins: Vec<Origin>,
    node: Node,
}

impl World {
    fn new() -> Self {
        let node = Node::new("pp-redirect");
        node.ns.add_addr("10.203.0.1/32");
        node.ns.add_addr("fd00:203::1/128");
        let origins = vec![
            Origin::start(&node.ns, ORIGIN_V4.parse().unwrap()),
            Origin::start(&node.ns, ORIGIN_V6.parse().unwrap()),
        ];
        Self { origins, node }
    }

    fn start_proxy(&self, extra: &[(&'static str, String)]) -> Pullproxy {
        self.node.start_proxy(extra)
    }

    fn probe(&self, from: &Cgroup, dst: &str) -> Probe {
        probe::connect(&self.node.ns, from, dst.parse().unwrap())
            .unwrap_or_else(|e| panic!("probe to {dst} from {} failed: {e}", from.path()))
    }

    fn counter(&self, which: Counter) -> u64 {
        self.node.counter(which)
    }
}

fn assert_redirected_to_origin(p: &Probe, dst: &str) {
    let dst: SocketAddr = dst.parse().unwrap();
    assert!(p.redirected(), "expected a redirect to loopback: {p:?}");
    assert_eq!(
        p.peer, dst,
        "getpeername must report the original destination"
    );
    assert!(
        p.reply.starts_with(&format!("origin {dst} saw")),
        "bytes must reach the original destination through the proxy: {p:?}"
    );
}

fn assert_direct(p: &Probe, dst: &str) {
    assert!(!p.redirected(), "expected a direct connection: {p:?}");
    assert_eq!(p.peer, dst.parse::<SocketAddr>().unwrap());
    assert!(p.reply.starts_with("origin"), "{p:?}");
}

#[test]
fn ipv4_is_redirected_and_the_proxy_learns_pid_and_comm() {
    require_root!();
    let w = World::new();
    let proxy = w.start_proxy(&[]);
    let p = w.probe(&w.node.runtime, ORIGIN_V4);
    assert_redirected_to_origin(&p, ORIGIN_V4);
    let rec = proxy
        .wait_for("redirected connection", Duration::from_secs(30), |_| true)
        .unwrap_or_else(|| panic!("no redirect record logged:\n{}", proxy.dump()));
    assert_eq!(rec["dst"], ORIGIN_V4);
    assert_eq!(rec["pid"], u64::from(p.pid), "{rec}");
    assert_eq!(rec["comm"], "pp-probe", "{rec}");
    assert_eq!(rec["cgroup_id"], w.node.runtime.id(), "{rec}");
    assert!(w.counter(Counter::Redirected) >= 1);
    assert!(w.counter(Counter::Rekeyed) >= 1);
    assert!(w.counter(Counter::PeerRestored) >= 1);
}

#[test]
fn v4_mapped_destination_on_a_dual_stack_socket_is_redirected() {
    require_root!();
    let w = World::new();
    let proxy = w.start_proxy(&[]);
    let dst = "[::ffff:10.203.0.1]:443";
    let p = w.probe(&w.node.runtime, dst);
    assert!(p.redirected(), "{p:?}");
    assert_eq!(p.local.ip().to_string(), "::ffff:127.0.0.1", "{p:?}");
    assert_eq!(p.peer, dst.parse::<SocketAddr>().unwrap());
    assert!(p.reply.starts_with("origin 10.203.0.1:443 saw"), "{p:?}");
    // The proxy reaches the original over IPv4.
    assert!(
        proxy
            .wait_for(
                "redirected connection",
                Duration::from_secs(30),
                |r| r["dst"] == ORIGIN_V4
            )
            .is_some(),
        "{}",
        proxy.dump()
    );
}

#[test]
fn ipv6_is_redirected_to_the_v6_listener() {
    require_root!();
    let w = World::new();
    let proxy = w.start_proxy(&[]);
    let p = w.probe(&w.node.runtime, ORIGIN_V6);
    assert_redirected_to_origin(&p, ORIGIN_V6);
    assert_eq!(p.local.ip().to_string(), "::1", "{p:?}");
    assert!(
        proxy
            .wait_for(
                "redirected connection",
                Duration::from_secs(30),
                |r| r["dst"] == ORIGIN_V6
            )
            .is_some(),
        "{}",
        proxy.dump()
    );
}

#[test]
fn excluded_cidr_goes_direct() {
    require_root!();
    let w = World::new();
    let _proxy = w.start_proxy(&[(
        "PULLPROXY_REDIRECT__EXCLUDE",
        "[10.203.0.0/24, fd00:203::/64]".to_owned(),
    )]);
    assert_direct(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
    assert_direct(&w.probe(&w.node.runtime, ORIGIN_V6), ORIGIN_V6);
    assert_eq!(w.counter(Counter::Excluded), 2);
    assert_eq!(w.counter(Counter::Redirected), 0);
}

#[test]
fn process_outside_the_target_cgroups_goes_direct() {
    require_root!();
    let w = World::new();
    let _proxy = w.start_proxy(&[]);
    assert_direct(&w.probe(&w.node.other, ORIGIN_V4), ORIGIN_V4);
    assert!(w.counter(Counter::NotTarget) >= 1);
    // A cgroup below a target is a target too (runtimes put helpers in child cgroups).
    let below = w.node.runtime.child("shim");
    assert_redirected_to_origin(&w.probe(&below, ORIGIN_V4), ORIGIN_V4);
}

#[test]
fn the_proxys_own_upstream_connections_are_never_redirected() {
    require_root!();
    let w = World::new();
    // pullproxy runs *below* the target cgroup: without the bypass mark its own connection to
    // the origin would be redirected back to itself.
    let inner = w.node.runtime.child("pullproxy");
    let proxy = Pullproxy::start(
        &Placement::new().netns(&w.node.ns).cgroup(&inner),
        &w.node.env(),
    );
    let p = w.probe(&w.node.runtime, ORIGIN_V4);
    assert_redirected_to_origin(&p, ORIGIN_V4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        proxy.all("redirected connection").len(),
        1,
        "one client connection must give exactly one redirect:\n{}",
        proxy.dump()
    );
    assert!(
        w.counter(Counter::Bypass) >= 1,
        "the proxy's connect must hit the bypass"
    );
    drop(proxy);
}

#[test]
fn stopped_proxy_fails_open_and_a_restart_resumes_without_reattaching() {
    require_root!();
    let w = World::new();
    let mut proxy = w.start_proxy(&[]);
    assert_redirected_to_origin(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
    let links_before = redirect::pinned_links(w.node.pins());
    assert!(
        links_before.iter().all(|(_, l)| l.is_some()),
        "{links_before:?}"
    );

    proxy.kill();
    let p = w.probe(&w.node.runtime, ORIGIN_V4);
    assert_direct(&p, ORIGIN_V4);
    assert!(w.counter(Counter::NoListener) >= 1);
    let p6 = w.probe(&w.node.runtime, ORIGIN_V6);
    assert_direct(&p6, ORIGIN_V6);

    let proxy = w.start_proxy(&[]);
    assert_eq!(
        proxy.all("swapped into pinned link").len(),
        7,
        "{}",
        proxy.dump()
    );
    assert!(proxy.find("attached").is_none(), "{}", proxy.dump());
    let links_after = redirect::pinned_links(w.node.pins());
    for ((name, before), (_, after)) in links_before.iter().zip(&links_after) {
        let (before, after) = (before.unwrap(), after.unwrap());
        assert_eq!(
            before.id, after.id,
            "{name}: the link must survive the restart"
        );
        assert_ne!(
            before.prog_id, after.prog_id,
            "{name}: the new program is swapped in"
        );
    }
    assert_redirected_to_origin(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
}

#[test]
fn recreated_target_cgroup_is_redirected_again() {
    require_root!();
    let w = World::new();
    let _proxy = w.start_proxy(&[]);
    assert_redirected_to_origin(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
    let old_id = w.node.runtime.id();
    w.node.runtime.recreate();
    assert_ne!(
        w.node.runtime.id(),
        old_id,
        "a recreated cgroup gets a new id"
    );
    let started = Instant::now();
    loop {
        let p = w.probe(&w.node.runtime, ORIGIN_V4);
        if p.redirected() {
            assert_redirected_to_origin(&p, ORIGIN_V4);
            break;
        }
        // The rescan runs every 250 ms here; the bound is generous so that a busy machine
        // cannot fail the test, while a rescan that never picks the cgroup up does.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still direct {:?} after the cgroup was recreated",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "redirected again {:?} after the recreate",
        started.elapsed()
    );
    assert!(!w.origins.is_empty());
}

#[test]
fn an_exclusive_program_on_an_ancestor_is_a_clear_error() {
    require_root!();
    let w = World::new();
    // Borrow a loaded connect4 program from a first pullproxy...
    let first = w.start_proxy(&[]);
    let prog_id = redirect::pinned_links(w.node.pins())
        .into_iter()
        .find(|(n, _)| *n == "pp_connect4")
        .and_then(|(_, l)| l)
        .expect("pinned connect4 link")
        .prog_id;
    // ...and attach it in exclusive (non-multi) mode where the second one wants to go.
    let blocker = w.node.root.child("blocker");
    let status = std::process::Command::new("bpftool")
        .args(["cgroup", "attach"])
        .arg(blocker.dir())
        .args(["cgroup_inet4_connect", "id", &prog_id.to_string()])
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool cgroup attach failed");
    let below = blocker.child("below");
    let pins = PinDir(PathBuf::from(format!("{}-second", w.node.pins().display())));
    let mut env = w.node.env();
    env.push(("PULLPROXY_REDIRECT__ATTACH_CGROUP", below.path().to_owned()));
    env.push(("PULLPROXY_REDIRECT__PIN_DIR", pins.0.display().to_string()));
    env.push(("PULLPROXY_LISTEN__PORT", "15444".to_owned()));
    env.push(("PULLPROXY_ADMIN__LISTEN", "127.0.0.1:15091".to_owned()));
    let stderr = harness::pullproxy::run_expecting_failure(&w.node.ns, &w.node.proxy_cg, &env, &[]);
    assert!(
        stderr.contains("exclusive (non-multi) mode (EPERM)") && stderr.contains(below.path()),
        "{stderr}"
    );
    let _ = std::process::Command::new("bpftool")
        .args(["cgroup", "detach"])
        .arg(blocker.dir())
        .args(["cgroup_inet4_connect", "id", &prog_id.to_string()])
        .status();
    drop(first);
}

#[test]
fn missing_privileges_are_named() {
    require_root!();
    let w = World::new();
    let stderr = harness::pullproxy::run_expecting_failure(
        &w.node.ns,
        &w.node.proxy_cg,
        &w.node.env(),
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
    );
    assert!(
        stderr.contains("no permission to load BPF programs") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    assert!(
        !w.node.pins().exists(),
        "nothing may be pinned by a refused start"
    );
}

#[test]
fn kernel_debug_logging_reaches_the_logs_when_asked_for() {
    require_root!();
    let w = World::new();
    let proxy = w.start_proxy(&[("PULLPROXY_REDIRECT__KERNEL_LOG", "true".to_owned())]);
    assert_redirected_to_origin(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
    let line = proxy.wait_for(
        "redirected v4 connect to port 443 -> 15443",
        Duration::from_secs(30),
        |_| true,
    );
    assert!(line.is_some(), "no kernel log record:\n{}", proxy.dump());

    // Off by default: no kernel records at all.
    let w = World::new();
    let proxy = w.start_proxy(&[]);
    assert_redirected_to_origin(&w.probe(&w.node.runtime, ORIGIN_V4), ORIGIN_V4);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        proxy
            .find("redirected v4 connect to port 443 -> 15443")
            .is_none()
    );
}
