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
    netns::NetNs,
    origin::Origin,
    probe::{self, Probe},
    pullproxy::Pullproxy,
    require_root,
};
use proxy_common::Counter;
use pullproxy::redirect;

/// An IPv4 "registry" address that exists only inside the test's namespace.
const ORIGIN_V4: &str = "10.203.0.1:443";
/// An IPv6 one.
const ORIGIN_V6: &str = "[fd00:203::1]:443";

/// One test's world. Fields drop in declaration order: processes first, cgroups children before
/// parents, the pins, then the namespace.
struct World {
    origins: Vec<Origin>,
    target: Cgroup,
    other: Cgroup,
    proxy_cg: Cgroup,
    root: Cgroup,
    pins: Pins,
    ns: NetNs,
}

/// Removes the test's pin directory (detaching its programs) on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = redirect::uninstall(&self.0);
    }
}

impl World {
    fn new() -> Self {
        let ns = NetNs::new("pp-redirect");
        ns.add_addr("10.203.0.1/32");
        ns.add_addr("fd00:203::1/128");
        let root = Cgroup::new_root("pp-redirect");
        let pins = Pins(PathBuf::from("/sys/fs/bpf").join(root.path().trim_start_matches('/')));
        let origins = vec![
            Origin::start(&ns, ORIGIN_V4.parse().unwrap()),
            Origin::start(&ns, ORIGIN_V6.parse().unwrap()),
        ];
        Self {
            origins,
            target: root.child("runtime"),
            other: root.child("other"),
            proxy_cg: root.child("pullproxy"),
            root,
            pins,
            ns,
        }
    }

    /// Overrides that confine pullproxy to this world: attach at the world's cgroup, target the
    /// "runtime" cgroup, pins in the world's own directory.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "PULLPROXY_REDIRECT__ATTACH_CGROUP",
                self.root.path().to_owned(),
            ),
            (
                "PULLPROXY_REDIRECT__TARGETS",
                format!("[{}]", self.target.path()),
            ),
            (
                "PULLPROXY_REDIRECT__PIN_DIR",
                self.pins.0.display().to_string(),
            ),
            ("PULLPROXY_REDIRECT__RESCAN_INTERVAL", "250ms".to_owned()),
            (
                "PULLPROXY_TLS__STATE_DIR",
                std::env::temp_dir()
                    .join(self.root.path().trim_start_matches('/'))
                    .display()
                    .to_string(),
            ),
            ("PULLPROXY_HUB__URL", "null".to_owned()),
        ]
    }

    fn start_proxy(&self, extra: &[(&'static str, String)]) -> Pullproxy {
        let mut env = self.env();
        env.extend_from_slice(extra);
        Pullproxy::start(&self.ns, &self.proxy_cg, &env)
    }

    fn probe(&self, from: &Cgroup, dst: &str) -> Probe {
        probe::connect(&self.ns, from, dst.parse().unwrap())
            .unwrap_or_else(|e| panic!("probe to {dst} from {} failed: {e}", from.path()))
    }

    fn counter(&self, which: Counter) -> u64 {
        redirect::pinned_counters(&self.pins.0)
            .expect("pinned counters")
            .into_iter()
            .find(|(c, _)| *c == which)
            .map(|(_, v)| v)
            .unwrap()
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
    let p = w.probe(&w.target, ORIGIN_V4);
    assert_redirected_to_origin(&p, ORIGIN_V4);
    let rec = proxy
        .wait_for("redirected connection", Duration::from_secs(5), |_| true)
        .unwrap_or_else(|| panic!("no redirect record logged:\n{}", proxy.dump()));
    assert_eq!(rec["dst"], ORIGIN_V4);
    assert_eq!(rec["pid"], u64::from(p.pid), "{rec}");
    assert_eq!(rec["comm"], "pp-probe", "{rec}");
    assert_eq!(rec["cgroup_id"], w.target.id(), "{rec}");
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
    let p = w.probe(&w.target, dst);
    assert!(p.redirected(), "{p:?}");
    assert_eq!(p.local.ip().to_string(), "::ffff:127.0.0.1", "{p:?}");
    assert_eq!(p.peer, dst.parse::<SocketAddr>().unwrap());
    assert!(p.reply.starts_with("origin 10.203.0.1:443 saw"), "{p:?}");
    // The proxy reaches the original over IPv4.
    assert!(
        proxy
            .wait_for(
                "redirected connection",
                Duration::from_secs(5),
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
    let p = w.probe(&w.target, ORIGIN_V6);
    assert_redirected_to_origin(&p, ORIGIN_V6);
    assert_eq!(p.local.ip().to_string(), "::1", "{p:?}");
    assert!(
        proxy
            .wait_for(
                "redirected connection",
                Duration::from_secs(5),
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
    assert_direct(&w.probe(&w.target, ORIGIN_V4), ORIGIN_V4);
    assert_direct(&w.probe(&w.target, ORIGIN_V6), ORIGIN_V6);
    assert_eq!(w.counter(Counter::Excluded), 2);
    assert_eq!(w.counter(Counter::Redirected), 0);
}

#[test]
fn process_outside_the_target_cgroups_goes_direct() {
    require_root!();
    let w = World::new();
    let _proxy = w.start_proxy(&[]);
    assert_direct(&w.probe(&w.other, ORIGIN_V4), ORIGIN_V4);
    assert!(w.counter(Counter::NotTarget) >= 1);
    // A cgroup below a target is a target too (runtimes put helpers in child cgroups).
    let below = w.target.child("shim");
    assert_redirected_to_origin(&w.probe(&below, ORIGIN_V4), ORIGIN_V4);
}

#[test]
fn the_proxys_own_upstream_connections_are_never_redirected() {
    require_root!();
    let w = World::new();
    // pullproxy runs *below* the target cgroup: without the bypass mark its own connection to
    // the origin would be redirected back to itself.
    let inner = w.target.child("pullproxy");
    let proxy = Pullproxy::start(&w.ns, &inner, &w.env());
    let p = w.probe(&w.target, ORIGIN_V4);
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
    assert_redirected_to_origin(&w.probe(&w.target, ORIGIN_V4), ORIGIN_V4);
    let links_before = redirect::pinned_links(&w.pins.0);
    assert!(
        links_before.iter().all(|(_, l)| l.is_some()),
        "{links_before:?}"
    );

    proxy.kill();
    let p = w.probe(&w.target, ORIGIN_V4);
    assert_direct(&p, ORIGIN_V4);
    assert!(w.counter(Counter::NoListener) >= 1);
    let p6 = w.probe(&w.target, ORIGIN_V6);
    assert_direct(&p6, ORIGIN_V6);

    let proxy = w.start_proxy(&[]);
    assert_eq!(
        proxy.all("swapped into pinned link").len(),
        5,
        "{}",
        proxy.dump()
    );
    assert!(proxy.find("attached").is_none(), "{}", proxy.dump());
    let links_after = redirect::pinned_links(&w.pins.0);
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
    assert_redirected_to_origin(&w.probe(&w.target, ORIGIN_V4), ORIGIN_V4);
}

#[test]
fn recreated_target_cgroup_is_redirected_again_within_five_seconds() {
    require_root!();
    let w = World::new();
    let _proxy = w.start_proxy(&[]);
    assert_redirected_to_origin(&w.probe(&w.target, ORIGIN_V4), ORIGIN_V4);
    let old_id = w.target.id();
    w.target.recreate();
    assert_ne!(w.target.id(), old_id, "a recreated cgroup gets a new id");
    let started = Instant::now();
    loop {
        let p = w.probe(&w.target, ORIGIN_V4);
        if p.redirected() {
            assert_redirected_to_origin(&p, ORIGIN_V4);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
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
    let prog_id = redirect::pinned_links(&w.pins.0)
        .into_iter()
        .find(|(n, _)| *n == "pp_connect4")
        .and_then(|(_, l)| l)
        .expect("pinned connect4 link")
        .prog_id;
    // ...and attach it in exclusive (non-multi) mode where the second one wants to go.
    let blocker = w.root.child("blocker");
    let status = std::process::Command::new("bpftool")
        .args(["cgroup", "attach"])
        .arg(blocker.dir())
        .args(["cgroup_inet4_connect", "id", &prog_id.to_string()])
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool cgroup attach failed");
    let below = blocker.child("below");
    let pins = Pins(PathBuf::from(format!("{}-second", w.pins.0.display())));
    let mut env = w.env();
    env.push(("PULLPROXY_REDIRECT__ATTACH_CGROUP", below.path().to_owned()));
    env.push(("PULLPROXY_REDIRECT__PIN_DIR", pins.0.display().to_string()));
    env.push(("PULLPROXY_LISTEN__PORT", "15444".to_owned()));
    let stderr = harness::pullproxy::run_expecting_failure(&w.ns, &w.proxy_cg, &env, &[]);
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
        &w.ns,
        &w.proxy_cg,
        &w.env(),
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
        !w.pins.0.exists(),
        "nothing may be pinned by a refused start"
    );
}
