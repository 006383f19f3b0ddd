//! `cargo xtask demo`: pullproxy in one minute, on this machine, touching nothing of it.
//!
//! Sets up a throw-away node (network namespace, cgroups, pins, state dirs), the sealos hub and
//! a fake Docker Hub inside it, pullproxy, and Debian's containerd with its default
//! configuration. Then `ctr images pull docker.io/library/busybox:latest` and a CRI `PullImage`
//! (the kubelet's path) are served from the hub while the "Docker Hub" is down, and the image
//! keeps its name and digest. Prints what pullproxy logged and its `pullproxy_requests_total`
//! metrics, then tears everything down. Needs root (`cargo xtask demo` re-runs through sudo).

use std::time::Instant;

use harness::{
    containerd::{CTR_NAMESPACE, Containerd},
    images::{self, Format},
    privileged::is_root,
    world::{self, HUB_IP, UPSTREAM_IP, World},
};
use serde_json::Value;

const IMAGE: &str = "docker.io/library/busybox:latest";

fn main() {
    if !is_root() {
        eprintln!("pp-demo needs root (eBPF, namespaces, cgroups): run `cargo xtask demo`");
        std::process::exit(2);
    }
    let started = Instant::now();

    step("Setting up a throw-away node: a network namespace, cgroups, a bpffs pin dir");
    let mut w = World::new("pp-demo");
    say(&format!(
        "sealos hub (docker-registry, htpasswd user admin) at http://{HUB_IP}:5000, \
         a fake registry-1.docker.io at {UPSTREAM_IP}:443, pullproxy (pid {}) on 127.0.0.1:15443",
        w.proxy.pid()
    ));
    let image = images::busybox(Format::Docker);
    w.hub
        .client()
        .push_image("library/busybox", "latest", &image);
    say(&format!(
        "pushed a busybox image to the hub as library/busybox:latest ({})",
        image.digest()
    ));
    w.upstream.stop();
    say("\"Docker Hub\" is now down: whatever gets pulled must come from the hub");

    step("Starting containerd 1.6 with its DEFAULT configuration");
    let ctd = Containerd::start(w.runtime_placement());
    say(&format!(
        "containerd pid {}: no config.toml, no hosts.toml, no mirrors; its cgroup is a \
         redirect target, so the kernel sends its registry connections to pullproxy",
        ctd.pid()
    ));

    step(&format!("ctr images pull {IMAGE}"));
    let out = ctd.pull(IMAGE, None);
    out.expect_success();
    print_indented(&final_progress(&out.stdout_text()));
    let stored = ctd
        .image(CTR_NAMESPACE, IMAGE)
        .expect("containerd lists the image");
    say(&format!(
        "ctr images ls: {} -> {} (the digest pushed to the hub: {})",
        stored.name,
        stored.digest,
        if stored.digest == image.digest().as_str() {
            "same"
        } else {
            "DIFFERENT"
        }
    ));

    step("ctr run: the pulled image runs");
    let run = ctd.run_once(
        IMAGE,
        &["echo", "hello from an image served by the sealos hub"],
    );
    run.expect_success();
    print_indented(&run.stdout_text());

    step(&format!(
        "CRI PullImage {IMAGE} (what the kubelet does; containerd itself fetches)"
    ));
    ctd.remove_image(CTR_NAMESPACE, IMAGE);
    // Failures panic (never `exit`): unwinding runs the guards that tear the node down.
    let id = ctd
        .cri()
        .pull_image(IMAGE, None)
        .unwrap_or_else(|e| panic!("PullImage failed: {e}\n{}", ctd.log()));
    say(&format!("PullImage -> image id {id}"));

    w.settle();
    step("What pullproxy logged (one \"pull\" record per request)");
    for r in w.pulls("library/busybox") {
        say(&describe(&r));
    }
    let sources = world::sources(&w.pulls("library/busybox"), "blob");
    let metrics = w.scrape();
    step("GET http://127.0.0.1:15090/metrics | grep pullproxy_requests_total");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("pullproxy_requests_total"))
    {
        say(line);
    }

    step("Tearing everything down");
    drop(ctd);
    drop(w);
    say(&format!(
        "done in {:.1?}: {} blob requests, all from the hub: {}",
        started.elapsed(),
        sources.len(),
        sources.iter().all(|s| s == "hub")
    ));
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn say(line: &str) {
    println!("    {line}");
}

fn print_indented(text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        say(line.trim_end());
    }
}

/// ctr, writing to a pipe, prints its progress table again on every refresh, with colours: keep
/// the last table and what follows it, without escape sequences.
fn final_progress(out: &str) -> String {
    let plain = strip_ansi(out);
    let first = plain.lines().next().unwrap_or_default().to_owned();
    let start = plain.rfind(&first).unwrap_or(0);
    plain[start..].to_owned()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One pull record as a line: `HEAD manifest library/busybox:latest <- hub 200 (ctr, 0 B)`.
fn describe(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    let reference = s("reference");
    let sep = if reference.starts_with("sha256:") {
        "@"
    } else {
        ":"
    };
    let short = if reference.len() > 19 {
        format!("{}…", &reference[..19])
    } else {
        reference
    };
    format!(
        "{:4} {:8} {}/{}{sep}{short} <- {} {} ({} bytes, by {} pid {})",
        s("method"),
        s("kind"),
        s("registry"),
        s("repository"),
        s("source"),
        r["status"],
        r["bytes"],
        s("comm"),
        r["pid"],
    )
}
