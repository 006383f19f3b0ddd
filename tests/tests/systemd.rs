//! pullproxy on a node as systemd runs it: the real `containerd.service` restarted into a new
//! cgroup, and pullproxy itself as `deploy/systemd/pullproxy.service` (started, stopped,
//! restarted, killed, uninstalled). They change the machine's services, so they run in the VM
//! of `cargo xtask vm-test` (systemd as PID 1, pure cgroup v2) and are skipped loudly elsewhere.
//! The registries are the harness's World, inside the test's network namespace; containerd and
//! pullproxy.service join that namespace through drop-ins.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use harness::{
    images::{self, Format, Image},
    registry_client::{Body, RegistryClient},
    require_systemd,
    systemd::{self, CONTAINERD_UNIT, ContainerdService, UnitFile, journal, systemctl},
    testca::ca_bundle,
    world::{self, ADMIN_ADDR, HUB_IP, HUB_PASSWORD, HUB_USER, World},
};
use proxy_common::Counter;
use pullproxy::redirect;
use serde_json::Value;

/// Both tests restart the machine's containerd.service and attach at the root cgroup: one at a
/// time.
static MACHINE: Mutex<()> = Mutex::new(());

fn machine() -> MutexGuard<'static, ()> {
    MACHINE.lock().unwrap_or_else(|e| e.into_inner())
}

/// pullproxy's default `redirect.rescan_interval`: how soon a restarted runtime's new cgroup
/// must be redirected.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// What a loaded 2-core machine (or an emulated guest) may add to that: the test asserts on
/// the order of magnitude, and reports the time it measured.
const SCHEDULING_ALLOWANCE: Duration = Duration::from_secs(10);

/// The hosts file containerd.service gets: the World's names.
fn hosts_file(w: &World) -> PathBuf {
    let path = w.node.state().join("hosts");
    fs::write(&path, world::hosts().hosts_file()).expect("hosts file");
    path
}

/// Waits (generously) until `logs` holds a "cgroup marked" record for cgroup `id` as a target.
fn wait_marked(logs: impl Fn() -> Vec<Value>, id: u64, deadline: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if logs()
            .iter()
            .any(|r| r["message"] == "cgroup marked" && r["id"] == id && r["role"] == "Target")
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "cgroup {id} was not marked as a target within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_restarted_containerd_service_is_redirected_again_within_the_rescan_interval() {
    require_systemd!();
    let _machine = machine();
    // pullproxy as on a node: attached at the root, targets found automatically.
    let mut w = World::with_proxy_env(
        "pp-sd",
        &[
            ("PULLPROXY_REDIRECT__ATTACH_CGROUP", "/".to_owned()),
            ("PULLPROXY_REDIRECT__TARGETS", "auto".to_owned()),
            (
                "PULLPROXY_REDIRECT__RESCAN_INTERVAL",
                format!("{}ms", RESCAN_INTERVAL.as_millis()),
            ),
        ],
    );
    let first = images::busybox(Format::Docker);
    let second = images::multi_layer(Format::Docker, 1, 64 << 10, 31);
    w.hub
        .client()
        .push_image("library/busybox", "latest", &first);
    w.hub
        .client()
        .push_image("library/after", "restart", &second);
    // Only pullproxy can serve these now: a pull that goes direct fails.
    w.upstream.stop();

    let ctd = ContainerdService::place(&w.node.ns, &hosts_file(&w), &w.bundle);
    let (path, first_id) = systemd::unit_cgroup(CONTAINERD_UNIT);
    assert_eq!(path, "/system.slice/containerd.service");
    let logs = || w.proxy.all("cgroup marked");
    wait_marked(logs, first_id, Duration::from_secs(60));
    ctd.cri()
        .pull_image("docker.io/library/busybox:latest", None)
        .expect("PullImage through pullproxy");
    w.settle();
    let served = w.pulls("library/busybox");
    assert!(
        !served.is_empty()
            && served
                .iter()
                .all(|r| r["source"] == "hub" && r["comm"] == "containerd"),
        "{served:#?}"
    );

    // systemd removes the unit's cgroup on stop and makes a new one on start.
    ctd.restart();
    let (_, second_id) = systemd::unit_cgroup(CONTAINERD_UNIT);
    assert_ne!(first_id, second_id, "a restarted unit gets a new cgroup");
    let took = wait_marked(logs, second_id, Duration::from_secs(60));
    eprintln!("the new cgroup was a target {took:?} after `systemctl restart` returned");
    assert!(
        took <= RESCAN_INTERVAL + SCHEDULING_ALLOWANCE,
        "the new cgroup became a target after {took:?}"
    );
    ctd.cri()
        .pull_image("docker.io/library/after:restart", None)
        .expect("PullImage by the restarted containerd, through pullproxy");
    w.settle();
    // Its busybox layer is in containerd's store since the first pull; the rest is fetched.
    let served = w.pulls("library/after");
    assert!(!world::sources(&served, "blob").is_empty(), "{served:#?}");
    assert!(
        served
            .iter()
            .all(|r| r["source"] == "hub" && r["comm"] == "containerd"),
        "{served:#?}"
    );
}

/// Where the unit runs pullproxy from, reads its optional configuration, and keeps its state.
const BINARY: &str = "/usr/local/bin/pullproxy";
const CONFIG_DIR: &str = "/etc/pullproxy";
const STATE_DIR: &str = "/var/lib/pullproxy";
/// The default `redirect.pin_dir`.
const PIN_DIR: &str = "/sys/fs/bpf/pullproxy";
const UNIT: &str = "pullproxy.service";

/// `deploy/systemd/pullproxy.service` installed as shipped, with the binary under test at its
/// path and a configuration file for the World's hub; a drop-in only moves it into the test's
/// network namespace. Everything is removed on drop, the pins included.
struct Service {
    _netns: UnitFile,
    _unit: UnitFile,
}

impl Service {
    fn install(w: &World) -> Self {
        assert!(
            !Path::new(BINARY).exists() && !Path::new(CONFIG_DIR).exists(),
            "{BINARY} or {CONFIG_DIR} exists: this machine has a pullproxy of its own"
        );
        fs::copy(harness::pullproxy::binary(), BINARY).expect("installing the binary");
        fs::create_dir_all(CONFIG_DIR).expect("config dir");
        fs::write(
            Path::new(CONFIG_DIR).join("hub-password"),
            format!("{HUB_PASSWORD}\n"),
        )
        .expect("hub password");
        fs::copy(
            w.upstream_ca_cert(),
            Path::new(CONFIG_DIR).join("upstream-ca.pem"),
        )
        .expect("upstream CA");
        fs::write(
            Path::new(CONFIG_DIR).join("pullproxy.yaml"),
            format!(
                "hub:\n  url: http://{HUB_IP}:5000\n  username: {HUB_USER}\n  password_file: \
                 {CONFIG_DIR}/hub-password\ntls:\n  extra_upstream_cas: [{CONFIG_DIR}/upstream-ca.pem]\n\
                 log:\n  format: json\n  level: info,pullproxy=debug\n"
            ),
        )
        .expect("pullproxy.yaml");
        let unit = UnitFile::unit(UNIT, include_str!("../../deploy/systemd/pullproxy.service"));
        let netns = UnitFile::drop_in(
            UNIT,
            "netns",
            &format!(
                "[Service]\nNetworkNamespacePath={}\n",
                w.node.ns.path().display()
            ),
        );
        Self {
            _netns: netns,
            _unit: unit,
        }
    }

    /// `systemctl start`, then waits for `/readyz`.
    fn start(&self, w: &World) {
        systemctl(&["start", UNIT]);
        wait_ready(w);
    }

    fn main_pid() -> u32 {
        systemd::property(UNIT, "MainPID")
            .parse()
            .expect("MainPID is a number")
    }

    /// The service's JSON log records since `since`.
    fn logs(since: &str) -> Vec<Value> {
        records(&journal(UNIT, since))
    }

    /// The JSON log records of the service's current run.
    fn logs_of_this_run() -> Vec<Value> {
        records(&systemd::journal_of_this_run(UNIT))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::process::Command::new("systemctl")
            .args(["stop", UNIT])
            .status();
        let _ = std::process::Command::new(BINARY).arg("uninstall").status();
        let _ = fs::remove_file(BINARY);
        let _ = fs::remove_dir_all(CONFIG_DIR);
        let _ = fs::remove_dir_all(STATE_DIR);
    }
}

/// The JSON records among journal lines.
fn records(journal: &str) -> Vec<Value> {
    journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until pullproxy's admin listener in the World's namespace says ready.
fn wait_ready(w: &World) {
    let admin = RegistryClient::new("127.0.0.1", ADMIN_ADDR.parse().expect("addr"))
        .netns(&w.node.ns)
        .anonymous()
        .timeout(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if admin
            .request("GET", "/readyz", &[], Body::Empty)
            .is_ok_and(|r| r.status == 200)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pullproxy.service is not ready:\n{}",
            journal(UNIT, "-10min")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn counter(which: Counter) -> u64 {
    redirect::pinned_counters(Path::new(PIN_DIR))
        .expect("pinned counters")
        .into_iter()
        .find(|(c, _)| *c == which)
        .map(|(_, v)| v)
        .expect("a known counter")
}

/// Blob fetches the upstream saw for `image` in `repo`, summed.
fn upstream_fetches(w: &World, repo: &str, image: &Image) -> usize {
    image
        .blobs()
        .map(|b| w.upstream.blob_fetches(repo, &b.digest))
        .sum()
}

#[test]
fn pullproxy_service_redirects_fails_open_when_stopped_swaps_programs_on_restart_and_uninstalls() {
    require_systemd!();
    let _machine = machine();
    let mut w = World::new("pp-svc");
    // The World's own pullproxy would hold the ports the service binds in this namespace.
    w.kill_proxy();
    let image = images::multi_layer(Format::Docker, 2, 128 << 10, 57);
    let repo = "library/svc";
    let name = "docker.io/library/svc:1";
    w.hub.client().push_image(repo, "1", &image);
    w.upstream.client().push_image(repo, "1", &image);

    let service = Service::install(&w);
    let since = systemd::now();
    service.start(&w);

    // Hardening as shipped: exactly the chart's capabilities, state readable by root only.
    let status = fs::read_to_string(format!("/proc/{}/status", Service::main_pid()))
        .expect("the service's status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff");
    assert_eq!(
        eff,
        (1 << 39) | (1 << 38) | (1 << 12),
        "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and nothing else: {eff:#x}"
    );
    let mode = fs::metadata(STATE_DIR)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "{STATE_DIR} mode {mode:o}");
    let links = redirect::pinned_links(Path::new(PIN_DIR));
    assert!(links.iter().all(|(_, l)| l.is_some()), "{links:?}");

    // containerd trusts the service's node CA (generated in its state directory).
    let node_ca = fs::read_to_string(
        Path::new(STATE_DIR)
            .join("tls")
            .join(pullproxy::node_ca::CA_CERT_FILE),
    )
    .expect("the service's node CA");
    let bundle = ca_bundle(
        &w.node.state().join("service-bundle.pem"),
        &[
            &node_ca,
            &fs::read_to_string(w.upstream_ca_cert()).expect("upstream CA"),
        ],
    );
    let ctd = ContainerdService::place(&w.node.ns, &hosts_file(&w), &bundle);
    let (_, cgroup_id) = systemd::unit_cgroup(CONTAINERD_UNIT);
    wait_marked(|| Service::logs(&since), cgroup_id, Duration::from_secs(60));

    // Started: containerd's pull is redirected and served from the hub.
    let redirected = counter(Counter::Redirected);
    ctd.cri()
        .pull_image(name, None)
        .expect("PullImage through the service");
    assert!(counter(Counter::Redirected) > redirected);
    assert_eq!(upstream_fetches(&w, repo, &image), 0, "served from the hub");
    ctd.cri().remove_image(name).expect("RemoveImage");

    // Stopped: the programs stay pinned and let connections go direct (fail open).
    systemctl(&["stop", UNIT]);
    let links_stopped = redirect::pinned_links(Path::new(PIN_DIR));
    assert!(
        links_stopped.iter().all(|(_, l)| l.is_some()),
        "pins survive a stop: {links_stopped:?}"
    );
    let no_listener = counter(Counter::NoListener);
    ctd.cri().pull_image(name, None).expect("PullImage direct");
    assert!(counter(Counter::NoListener) > no_listener);
    // containerd collects removed content lazily: some blobs may still be in its store.
    assert!(
        upstream_fetches(&w, repo, &image) > 0,
        "fetched direct from the upstream"
    );
    ctd.cri().remove_image(name).expect("RemoveImage");

    // Started and restarted: the same links, new programs swapped into them.
    service.start(&w);
    let before = redirect::pinned_links(Path::new(PIN_DIR));
    systemctl(&["restart", UNIT]);
    wait_ready(&w);
    let after = redirect::pinned_links(Path::new(PIN_DIR));
    for ((name, before), (_, after)) in before.iter().zip(&after) {
        let (before, after) = (before.expect("pinned"), after.expect("pinned"));
        assert_eq!(before.id, after.id, "{name}: the link survives the restart");
        assert_ne!(before.prog_id, after.prog_id, "{name}: a new program in it");
    }
    // This run's records only: the start before it swapped programs too, possibly within the
    // same second. journald may still be writing them; wait for the count, then check it.
    let swapped = || {
        Service::logs_of_this_run()
            .iter()
            .filter(|r| r["message"] == "swapped into pinned link")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while swapped() < links.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        swapped(),
        links.len(),
        "every program swapped in place, once"
    );

    // Killed: Restart=on-failure brings it back, again into the same links.
    let pid = Service::main_pid();
    systemctl(&["kill", "--signal=SIGKILL", UNIT]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Service::main_pid() == pid || Service::main_pid() == 0 {
        assert!(
            Instant::now() < deadline,
            "pullproxy.service was not restarted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(&w);
    let revived = redirect::pinned_links(Path::new(PIN_DIR));
    for ((name, before), (_, after)) in before.iter().zip(&revived) {
        assert_eq!(
            before.expect("pinned").id,
            after.expect("pinned").id,
            "{name}: the link survives a crash"
        );
    }
    w.upstream.clear_requests();
    ctd.cri()
        .pull_image(name, None)
        .expect("PullImage after the restarts");
    assert_eq!(
        upstream_fetches(&w, repo, &image),
        0,
        "served from the hub again"
    );
    ctd.cri().remove_image(name).expect("RemoveImage");

    // Uninstalled: the pins are gone, and with them the programs.
    systemctl(&["stop", UNIT]);
    let out = std::process::Command::new(BINARY)
        .arg("uninstall")
        .output()
        .expect("pullproxy uninstall");
    assert!(out.status.success(), "{out:?}");
    assert!(!Path::new(PIN_DIR).exists(), "{PIN_DIR} removed");
    assert!(
        redirect::pinned_links(Path::new(PIN_DIR))
            .iter()
            .all(|(_, l)| l.is_none())
    );
    ctd.cri()
        .pull_image(name, None)
        .expect("PullImage with nothing attached");
    assert!(
        upstream_fetches(&w, repo, &image) > 0,
        "fetched direct from the upstream"
    );
    drop(ctd);
    drop(service);
}
