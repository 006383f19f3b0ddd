//! `cargo xtask demo`: pullproxy in one minute, on this machine, touching nothing of it.
//!
//! Sets up a throw-away node (network namespace, cgroups, pins, state dirs), the sealos hub and
//! a fake Docker Hub inside it, pullproxy, and Debian's containerd with its default
//! configuration. Then `ctr images pull docker.io/library/busybox:latest` and a CRI `PullImage`
//! (the kubelet's path) are served from the hub while the "Docker Hub" is down, and the image
//! keeps its name and digest. Prints what pullproxy logged and its `pullproxy_requests_total`
//! metrics, then tears everything down. Needs root (`cargo xtask demo` re-runs through sudo).
//!
//! With `--nodes N` (N > 1) it runs on a cluster instead (`harness::cluster`): N nodes, each with
//! its own pullproxy and unmodified containerd, a shared hub and a fake internet on one bridge.
//! The nodes pull the same 208 MiB public image one after another, then all at once; it prints
//! where each node's requests were answered from and how many bytes of each blob the internet
//! served.

use std::time::{Duration, Instant};

use harness::{
    cluster::{Cluster, ClusterNode, PULL_ONCE_LAYERS, pull_once_image},
    containerd::{CTR_NAMESPACE, Containerd},
    images::{self, Format, Image},
    privileged::is_root,
    world::{self, HUB_IP, UPSTREAM_IP, World},
};
use serde_json::Value;

const IMAGE: &str = "docker.io/library/busybox:latest";

/// The cluster demo's public image, on the fake internet only.
const CLUSTER_REPO: &str = "library/app";
const CLUSTER_IMAGE: &str = "docker.io/library/app:1.0";

fn main() {
    if !is_root() {
        eprintln!("pp-demo needs root (eBPF, namespaces, cgroups): run `cargo xtask demo`");
        std::process::exit(2);
    }
    match nodes_arg(std::env::args().skip(1)) {
        Ok(None | Some(1)) => single_node(),
        Ok(Some(n)) => cluster(n),
        Err(why) => {
            eprintln!(
                "pp-demo: {why}
usage: pp-demo [--nodes N]"
            );
            std::process::exit(2);
        }
    }
}

/// `--nodes N` or `--nodes=N`, if given.
fn nodes_arg(mut args: impl Iterator<Item = String>) -> Result<Option<usize>, String> {
    let mut nodes = None;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--nodes") {
            Some("") => args.next().ok_or("--nodes needs a number")?,
            Some(rest) if rest.starts_with('=') => rest[1..].to_owned(),
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        let n: usize = value
            .parse()
            .map_err(|_| format!("--nodes {value:?} is not a number"))?;
        if n == 0 || n > harness::cluster::MAX_NODES {
            return Err(format!(
                "--nodes must be 1 to {}",
                harness::cluster::MAX_NODES
            ));
        }
        nodes = Some(n);
    }
    Ok(nodes)
}

/// The cluster demo: `n` nodes pull one public image one after another, then all at once.
fn cluster(n: usize) {
    let started = Instant::now();
    step(&format!(
        "Setting up {n} throw-away nodes on one bridge, with a shared sealos hub and a fake internet"
    ));
    let c = Cluster::new("pp-demo", n);
    say(&format!(
        "hub http://{}:5000, \"Docker Hub\" {}:443, nodes {}: each with its own pullproxy, \
         node CA, cache, pins and cgroups, and containerd 1.6 with its DEFAULT configuration \
         (up in {:.1?})",
        harness::cluster::HUB_IP,
        harness::cluster::UPSTREAM_IP,
        c.nodes
            .iter()
            .map(ClusterNode::ip)
            .collect::<Vec<_>>()
            .join(", "),
        c.bring_up_time()
    ));

    step(&format!(
        "Pushing a public image to \"Docker Hub\": {CLUSTER_IMAGE}, 3 layers, {} MiB",
        PULL_ONCE_LAYERS.iter().sum::<u64>() >> 20
    ));
    let image = pull_once_image(c.work_dir());
    c.upstream.client().push_image(CLUSTER_REPO, "1.0", &image);
    c.upstream.clear_requests();
    say(&format!(
        "manifest {}; the hub does not have it",
        image.digest()
    ));

    step(&format!(
        "One node after another: ctr images pull {CLUSTER_IMAGE}"
    ));
    for node in &c.nodes {
        let t = Instant::now();
        node.pull(CLUSTER_IMAGE).expect_success();
        report_node(node, &image, 1, t.elapsed());
    }
    report_internet(&c, &image);

    step("All nodes at the same moment (the image removed from containerd first)");
    for node in &c.nodes {
        node.remove_image(CLUSTER_IMAGE);
    }
    let took = c.on_every_node(|node| {
        let t = Instant::now();
        node.pull(CLUSTER_IMAGE).expect_success();
        t.elapsed()
    });
    for (node, took) in c.nodes.iter().zip(took) {
        report_node(node, &image, 2, took);
    }
    report_internet(&c, &image);

    step("Tearing everything down");
    drop(c);
    say(&format!("done in {:.1?}", started.elapsed()));
}

/// A node's pullproxy records of the demo image in pull number `round` (from 1): one line each.
fn report_node(node: &ClusterNode, image: &Image, round: usize, took: Duration) {
    let blobs = image.blobs().count();
    let records = node.wait_pulls(CLUSTER_REPO, round * blobs);
    // A pull's records are its manifests, then its blobs: this round's start after the last
    // blob record of the one before.
    let start = match (round - 1) * blobs {
        0 => 0,
        before => records
            .iter()
            .enumerate()
            .filter(|(_, r)| r["kind"] == "blob")
            .nth(before - 1)
            .map_or(records.len(), |(i, _)| i + 1),
    };
    let records = &records[start..];
    say(&format!(
        "node {} ({}): pulled in {took:.1?}; blobs from {}",
        node.index(),
        node.ip(),
        summary(&world::sources(records, "blob"))
    ));
    for r in records {
        say(&format!("  {}", describe(r)));
    }
}

/// "upstream x4" or "cache x3, upstream x1".
fn summary(sources: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for s in sources {
        *counts.entry(s).or_default() += 1;
    }
    counts
        .iter()
        .map(|(s, n)| format!("{s} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The internet's downloads of each blob so far: requests, bytes, and whole copies.
fn report_internet(c: &Cluster, image: &Image) {
    let traffic = c.internet_traffic(image, |d| c.answered_from(CLUSTER_REPO, d, "upstream"));
    say("\"Docker Hub\" served, per blob (from its access log):");
    for blob in image.blobs() {
        let t = traffic.get(&blob.digest).copied().unwrap_or_default();
        say(&format!(
            "  {}… {:>10} bytes: {} GETs, {:>11} bytes = {:.2} copies",
            &blob.digest.as_str()[..19],
            blob.size,
            t.requests,
            t.bytes,
            t.bytes as f64 / blob.size as f64
        ));
    }
}

/// The single-node demo: the hub serves unmodified containerd with "Docker Hub" down.
fn single_node() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_is_the_only_argument_and_a_count_of_1_to_max() {
        let parse = |args: &[&str]| nodes_arg(args.iter().map(|a| (*a).to_owned()));
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["--nodes", "4"]), Ok(Some(4)));
        assert_eq!(parse(&["--nodes=3"]), Ok(Some(3)));
        assert_eq!(parse(&["--nodes", "1"]), Ok(Some(1)));
        let too_many = (harness::cluster::MAX_NODES + 1).to_string();
        for bad in [
            &["--nodes"][..],
            &["--nodes", "0"],
            &["--nodes", &too_many],
            &["--nodes", "four"],
            &["--nodes4"],
            &["--verbose"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
