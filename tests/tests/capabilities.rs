//! The capabilities the DaemonSet grants (`capabilities` in the chart's values.yaml) measured, not
//! guessed: a real pullproxy runs as uid 0 with exactly that set as its bounding, inheritable and
//! so effective set (what `capabilities: {drop: [ALL], add: [...]}` gives a root container), on a
//! Node fixture, and must load, pin, attach, redirect and serve; without any one of them it must
//! not start. `pullproxy uninstall` must work with no capability at all (the hook runs that way).
//! As in the DaemonSet's container, pullproxy also runs in a cgroup namespace of its own with the
//! cgroup v2 tree mounted read-only.
//!
//! pullproxy's preflight (`check_privileges` in proxy/src/redirect/preflight.rs) refuses to start
//! without a fixed list before the kernel is asked. To measure what the kernel itself enforces,
//! [`Preflight::Masked`] shows pullproxy a full `CapEff` in `/proc/self/status` (a bind mount in
//! the process's private mount namespace); the kernel still sees the real, reduced set.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use harness::{
    mountns::MountSpec,
    node::Node,
    origin::Origin,
    probe,
    process::{Placement, Proc},
    pullproxy::binary,
    require_root,
};
use serde_json::Value;

/// A "registry" address inside the node's network namespace.
const ORIGIN: &str = "10.203.0.1:443";

/// The capabilities the chart grants, from its values.yaml: what is measured here is what ships.
fn chart_caps() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/pullproxy/values.yaml");
    let text = std::fs::read_to_string(&path).expect("chart values");
    let values: Value = serde_saphyr::from_str(&text).expect("values.yaml is YAML");
    values["capabilities"]
        .as_array()
        .expect("capabilities list in values.yaml")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .collect()
}

/// The command prefix that puts pullproxy where the DaemonSet does: a cgroup namespace of its own,
/// the cgroup v2 tree read-only, then uid 0 with exactly `caps` (Kubernetes names: `NET_ADMIN`).
/// The namespaces are made while the prefix still holds every capability.
fn pod_like(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_ascii_lowercase()))
        .collect();
    let cgroup = pullproxy::redirect::cgroup::Cgroup2::discover().expect("cgroup v2");
    vec![
        "unshare".into(),
        "--cgroup".into(),
        "--mount".into(),
        "--propagation=slave".into(),
        "sh".into(),
        "-c".into(),
        r#"mount -o remount,bind,ro "$0" && exec "$@""#.into(),
        cgroup.mount().display().to_string(),
        "setpriv".into(),
        format!("--inh-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
    ]
}

/// Whether pullproxy's own capability preflight sees the real set or a full one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Preflight {
    Real,
    Masked,
}

/// A `CapEff` line with every capability, for [`Preflight::Masked`].
fn full_caps_status(node: &Node) -> PathBuf {
    let path = node.state().join("status-full-caps");
    std::fs::write(&path, "Name:\tpullproxy\nCapEff:\t000001ffffffffff\n").expect("write status");
    path
}

/// A pullproxy that became ready.
struct Running {
    _proc: Proc,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Starts `pullproxy run` on `node` with exactly `caps`; Ok when it logs "ready", Err(stderr)
/// when it exits first.
fn start(node: &Node, caps: &[String], preflight: Preflight) -> Result<Running, String> {
    let wrapper = pod_like(caps);
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(binary())
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PULLPROXY_LOG__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in node.env() {
        cmd.env(k, v);
    }
    let mut at = Placement::new().netns(&node.ns).cgroup(&node.proxy_cg);
    if preflight == Preflight::Masked {
        at = at.mounts(MountSpec::new().bind(full_caps_status(node), "/proc/self/status"));
    }
    let mut proc = Proc::spawn_at(cmd, &at);
    let stderr = proc.child_mut().stderr.take().expect("stderr");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("logs").push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = logs
            .lock()
            .expect("logs")
            .iter()
            .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == "ready"));
        if ready {
            return Ok(Running { _proc: proc, logs });
        }
        if let Ok(Some(status)) = proc.child_mut().try_wait() {
            let _ = reader.join();
            let mut stderr = logs.lock().expect("logs").join("\n");
            if stderr.is_empty() {
                stderr = format!("(nothing on stderr; {status})");
            }
            return Err(stderr);
        }
        assert!(
            Instant::now() < deadline,
            "pullproxy neither became ready nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /healthz` on the admin listener inside the node's namespace.
fn healthz(node: &Node) -> String {
    node.ns.run_in(|| {
        let addr: SocketAddr = "127.0.0.1:15090".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("admin");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

/// `pullproxy uninstall` for this node's pins with no capability at all.
fn uninstall_without_capabilities(node: &Node) -> String {
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(binary())
        .arg("uninstall")
        .env_clear()
        .env("PULLPROXY_REDIRECT__PIN_DIR", node.pins())
        .output()
        .expect("running pullproxy uninstall");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "uninstall failed without capabilities: {text}"
    );
    text
}

fn without(caps: &[String], cap: &str) -> Vec<String> {
    caps.iter().filter(|c| *c != cap).cloned().collect()
}

#[test]
fn the_chart_set_is_enough_for_the_kernel_and_each_capability_is_needed() {
    require_root!();
    let caps = chart_caps();
    assert!(!caps.is_empty());
    let node = Node::new("pp-caps");
    node.ns.add_addr("10.203.0.1/32");
    let _origin = Origin::start(&node.ns, ORIGIN.parse().unwrap());

    {
        let proxy = start(&node, &caps, Preflight::Masked).unwrap_or_else(|stderr| {
            panic!("pullproxy did not start with exactly {caps:?}:\n{stderr}")
        });
        let p = probe::connect(&node.ns, &node.runtime, ORIGIN.parse().unwrap())
            .expect("probe through the proxy");
        assert!(p.redirected(), "not redirected with {caps:?}: {p:?}");
        assert!(
            p.reply.starts_with(&format!("origin {ORIGIN} saw")),
            "the proxy must serve the redirected connection: {p:?}\n{}",
            proxy.logs.lock().unwrap().join("\n")
        );
        assert!(healthz(&node).starts_with("HTTP/1.1 200"));
        // In its own cgroup namespace /proc/self/cgroup says "/": pullproxy must still find and
        // mark its real cgroup, and connections from outside the targets still go direct.
        let other = probe::connect(&node.ns, &node.other, ORIGIN.parse().unwrap()).expect("probe");
        assert!(!other.redirected(), "{other:?}");
        let own: Vec<String> = proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "cgroup marked" && v["role"] == "Bypass")
            .map(|v| v["cgroup"].to_string())
            .collect();
        assert_eq!(
            own,
            vec![format!("\"{}\"", node.proxy_cg.path())],
            "the bypass mark must be pullproxy's own cgroup, not the namespace root"
        );
    }
    // The uninstall hook runs with no capability: removing root's pins detaches the programs.
    let said = uninstall_without_capabilities(&node);
    assert!(said.contains("removed"), "{said}");
    assert!(!node.pins().exists(), "{said}");
    let p = probe::connect(&node.ns, &node.runtime, ORIGIN.parse().unwrap()).expect("probe");
    assert!(!p.redirected(), "still redirected after uninstall: {p:?}");

    for cap in &caps {
        let fewer = without(&caps, cap);
        let stderr = match start(&node, &fewer, Preflight::Masked) {
            Ok(_) => panic!("pullproxy started without CAP_{cap} ({fewer:?}): {cap} is not needed"),
            Err(stderr) => stderr,
        };
        let error = stderr
            .lines()
            .find(|l| l.starts_with("pullproxy: "))
            .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
        // A verifier rejection spans many lines; its reason is the one that says "prohibited".
        let reason = stderr
            .lines()
            .find(|l| l.contains("prohibited"))
            .unwrap_or_default();
        eprintln!("measured: without CAP_{cap}, the kernel refuses: {error} {reason}");
        let _ = pullproxy::redirect::uninstall(node.pins());
    }
}

#[test]
fn the_preflight_names_each_missing_capability() {
    require_root!();
    let caps = chart_caps();
    let node = Node::new("pp-caps-pre");
    for cap in &caps {
        let stderr = match start(&node, &without(&caps, cap), Preflight::Real) {
            Ok(_) => panic!("pullproxy started without CAP_{cap}"),
            Err(stderr) => stderr,
        };
        assert!(
            stderr.contains("no permission to load BPF programs")
                && stderr.contains(&format!("CAP_{cap}")),
            "the error must name CAP_{cap}:\n{stderr}"
        );
        assert!(!node.pins().exists(), "a refused start pins nothing");
    }
}

#[test]
fn pullproxy_starts_with_exactly_the_chart_set() {
    require_root!();
    let caps = chart_caps();
    let node = Node::new("pp-caps-run");
    node.ns.add_addr("10.203.0.1/32");
    let _origin = Origin::start(&node.ns, ORIGIN.parse().unwrap());
    let _proxy = start(&node, &caps, Preflight::Real)
        .unwrap_or_else(|stderr| panic!("pullproxy refused {caps:?}:\n{stderr}"));
    let p = probe::connect(&node.ns, &node.runtime, ORIGIN.parse().unwrap()).expect("probe");
    assert!(p.redirected() && p.reply.starts_with("origin"), "{p:?}");
}

#[test]
fn the_trust_init_container_needs_no_capability() {
    require_root!();
    // The host's trust store as the init container sees it: only the two directories the chart
    // mounts below /host, no update-ca-certificates to run.
    let host = tempfile::tempdir().expect("tempdir");
    let anchors = host.path().join("usr/local/share/ca-certificates");
    let certs = host.path().join("etc/ssl/certs");
    std::fs::create_dir_all(&anchors).unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    let bundle = certs.join("ca-certificates.crt");
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", &bundle).expect("system bundle");
    let state = host.path().join("state");
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(binary())
        .args(["ca", "install", "--root"])
        .arg(host.path())
        .env_clear()
        .env("PULLPROXY_TLS__STATE_DIR", &state)
        .output()
        .expect("pullproxy ca install");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let ca =
        std::fs::read_to_string(state.join(pullproxy::node_ca::CA_CERT_FILE)).expect("node CA");
    let ca_body: String = ca.lines().filter(|l| !l.starts_with("-----")).collect();
    let in_bundle: String = std::fs::read_to_string(&bundle)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(in_bundle.contains(&ca_body), "{said}");
    assert!(anchors.join("pullproxy-node-ca.crt").exists(), "{said}");
    eprintln!("measured: `pullproxy ca install --root` with no capability: {said}");
}
