//! `pullproxy doctor` against real things: a running pullproxy on a Node fixture (its pinned
//! programs), a real docker-registry as the hub with htpasswd auth (right and wrong passwords),
//! and a hub that is not there. The report is asserted on as data; the printed text is checked
//! for credentials that must never appear.

use std::{net::SocketAddr, path::Path, process::Command};

use harness::{node::Node, registry::Registry, require_root};
use pullproxy::{
    config::{ConfigError, DEFAULT_YAML},
    doctor::{self, Check, DoctorArgs, DoctorReport, Verdict},
    settings::Config,
};

/// Where the hub listens inside the node's network namespace.
const HUB: &str = "127.0.0.1:5000";
const USER: &str = "admin";
const RIGHT: &str = "right-hub-password-7c1f";
const WRONG: &str = "wrong-hub-password-03ab";

/// The node's overrides plus `extra`, loaded as pullproxy would load them.
fn load(node: &Node, extra: &[(&str, String)]) -> Result<Config, ConfigError> {
    let env = node
        .env()
        .into_iter()
        .chain(extra.iter().cloned())
        .map(|(k, v)| (k.to_owned(), v));
    Config::from_yaml(DEFAULT_YAML, "test", env)
}

fn config(node: &Node, extra: &[(&str, String)]) -> Config {
    load(node, extra).expect("valid test configuration")
}

/// Runs the doctor's checks from inside the node's network namespace (the hub lives there).
fn diagnose(node: &Node, config: &Config) -> DoctorReport {
    node.ns.run_in(|| {
        doctor::diagnose_blocking(config, &DoctorArgs::default()).expect("doctor runtime")
    })
}

fn printed(report: &DoctorReport) -> String {
    let mut out = Vec::new();
    report.write(&mut out, true).expect("write");
    String::from_utf8(out).expect("UTF-8")
}

fn findings(report: &DoctorReport, check: Check) -> Vec<(Verdict, String)> {
    report
        .of(check)
        .map(|f| (f.verdict, f.message.clone()))
        .collect()
}

#[test]
fn a_running_pullproxy_is_reported_attached() {
    require_root!();
    let node = Node::new("pp-doctor");
    let config = config(&node, &[]);
    let before = diagnose(&node, &config);
    let attached = findings(&before, Check::Attached);
    assert!(
        matches!(&attached[..], [(Verdict::Problem, m)] if m.contains("not attached")),
        "{attached:?}"
    );

    let guard = findings(&before, Check::Guard);
    assert!(
        matches!(&guard[..], [(Verdict::Problem, m)] if m.contains("bind guard is not attached")
            && m.contains("pp_bind4, pp_bind6")),
        "{guard:?}"
    );

    let _proxy = node.start_proxy(&[]);
    let report = diagnose(&node, &config);
    let attached = findings(&report, Check::Attached);
    assert!(
        matches!(&attached[..], [(Verdict::Ok, m)] if m.starts_with("7 program(s) attached at")
            && m.contains("pp_connect4") && m.contains("pp_sockops") && m.contains("pp_bind6")),
        "{attached:?}"
    );
    let guard = findings(&report, Check::Guard);
    assert!(
        matches!(&guard[..], [(Verdict::Ok, m)]
            if m.contains("only pullproxy's cgroup may bind port(s) 15090, 15443")
                && m.contains("0 bind(s) refused")),
        "{guard:?}"
    );
    let runtimes = findings(&report, Check::Runtimes);
    assert!(
        matches!(&runtimes[..], [(Verdict::Ok, m)] if m.contains(node.runtime.path())),
        "{runtimes:?}"
    );
    for check in [
        Check::Kernel,
        Check::BpfPrograms,
        Check::Cgroup2,
        Check::Privileges,
        Check::Bpffs,
        Check::Hub,
        Check::Cache,
    ] {
        assert!(
            report.of(check).all(|f| f.verdict == Verdict::Ok),
            "{check:?}: {}",
            printed(&report)
        );
    }
    // The node CA exists now; whether the host's store has it is the host's business.
    assert!(report.of(Check::Trust).next().is_some());

    // The binary prints the same, one line per finding with -v, and exits non-zero on problems.
    let mut cmd = Command::new(harness::pullproxy::binary());
    cmd.args(["doctor", "-v"]).env_clear();
    for (k, v) in node.env() {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("pullproxy doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok      attached   7 program(s) attached")),
        "{stdout}"
    );
    assert_eq!(out.status.success(), report.healthy(), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("pullproxy doctor: ")
    );
}

#[test]
fn hub_credentials_are_checked_and_never_printed() {
    require_root!();
    let node = Node::new("pp-doctor-hub");
    let hub_addr: SocketAddr = HUB.parse().unwrap();
    let _hub = Registry::builder(hub_addr)
        .netns(&node.ns)
        .htpasswd(USER, RIGHT)
        .start();
    let hub = |password: &str| node.hub_env(&format!("http://{HUB}"), USER, password).1;

    let report = diagnose(&node, &config(&node, &hub(WRONG)));
    let found = findings(&report, Check::Hub);
    assert!(
        matches!(&found[..], [(Verdict::Problem, m)]
            if m.contains("refused pullproxy's credentials (401)") && m.contains("hub-password")),
        "{found:?}"
    );
    let text = printed(&report);
    assert!(!text.contains(WRONG) && !text.contains(RIGHT), "{text}");

    // The right password: reachable, and (write-back is on by default) allowed to push.
    let report = diagnose(&node, &config(&node, &hub(RIGHT)));
    let found = findings(&report, Check::Hub);
    assert!(
        matches!(&found[..], [(Verdict::Ok, m), (Verdict::Ok, p)]
            if m.contains("reachable") && p.contains("may push")),
        "{found:?}"
    );
    assert!(!printed(&report).contains(RIGHT));
    // Without write-back, pushing is none of the doctor's business.
    let mut off = hub(RIGHT);
    off.push(("PULLPROXY_HUB__WRITE_BACK", "off".to_owned()));
    let found = findings(&diagnose(&node, &config(&node, &off)), Check::Hub);
    assert!(
        matches!(&found[..], [(Verdict::Ok, m)] if m.contains("reachable")),
        "{found:?}"
    );

    // Credentials in the URL itself never get this far: the configuration is refused, and the
    // error does not repeat them.
    let inline = [("PULLPROXY_HUB__URL", format!("http://{USER}:{WRONG}@{HUB}"))];
    let refused = load(&node, &inline)
        .expect_err("a password in hub.url")
        .to_string();
    assert!(
        refused.contains(&format!("\"http://…@{HUB}\" must not carry credentials"))
            && !refused.contains(WRONG),
        "{refused}"
    );
}

#[test]
fn a_missing_hub_is_unreachable() {
    require_root!();
    let node = Node::new("pp-doctor-nohub");
    // Nothing listens on this port in the node's namespace.
    let report = diagnose(
        &node,
        &config(
            &node,
            &[
                ("PULLPROXY_HUB__URL", "http://127.0.0.1:5999".to_owned()),
                ("PULLPROXY_HUB__TIMEOUT", "2s".to_owned()),
            ],
        ),
    );
    let found = findings(&report, Check::Hub);
    assert!(
        matches!(&found[..], [(Verdict::Problem, m)]
            if m.starts_with("hub http://127.0.0.1:5999 unreachable:") && m.contains("unready")),
        "{found:?}"
    );
    assert!(!report.healthy());

    // A credential file that is not there is named, and the hub counts as not asked.
    let missing = node.state().join("no-such-password");
    let report = diagnose(
        &node,
        &config(
            &node,
            &[
                ("PULLPROXY_HUB__URL", "http://127.0.0.1:5999".to_owned()),
                (
                    "PULLPROXY_HUB__PASSWORD_FILE",
                    missing.display().to_string(),
                ),
            ],
        ),
    );
    let text = printed(&report);
    assert!(
        text.contains(&format!(
            "cannot read the hub credentials: reading hub credentials from {}",
            missing.display()
        )),
        "{text}"
    );
    assert!(Path::new(&missing).to_str().is_some());
}
