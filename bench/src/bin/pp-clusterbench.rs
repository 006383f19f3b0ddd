//! The cluster figure of "pull once per cluster": N nodes (4 by default) pull the same public
//! image (3 layers, [`pull_once_image_sized`]: 208 MiB by default, the cluster test's) with CRI
//! `PullImage`, the kubelet's path, on the cluster test bed (`harness::cluster`). Two systems:
//!
//! - **pullproxy**: every node's unmodified containerd redirected to its own pullproxy, which has
//!   the shared hub, the node tier and write-back (the default, `public`);
//! - **mirror**: the same nodes' containerd with a `hosts.toml` mirror for docker.io pointing at
//!   docker-registry in pull-through proxy mode (distribution's proxy, the usual "registry
//!   mirror") in the hub's namespace; pullproxy is stopped on every node, so containerd's own
//!   mirror configuration is what acts.
//!
//! Both stand in front of the same fake Docker Hub. Two patterns: **staggered** (node 1, then 2,
//! 3, ..., each pull after the one before finished; node 2 starts only once what node 1 pulled
//! settled into the shared store, pullproxy's write-back into the hub or the mirror's storage,
//! as in a rollout whose pulls are minutes apart) and
//! **simultaneous** (all nodes at once). Measured: the blob bytes the internet served (exact, from
//! its access log), also as a multiple of the image's blob bytes; the bytes the hub or the mirror
//! served the nodes; the total pull time (wall time from the first pull's start to the last
//! pull's end, not counting that wait) and each node's pull time.
//!
//! Every measurement starts from nothing: pullproxy's caches, the hub, the mirror's storage and
//! containerd's content store (a fresh containerd) are empty. The world stays up across rounds;
//! the order of the systems alternates from round to round. Not a test: it prints JSON.
//!
//! Usage: `pp-clusterbench [--rounds N] [--nodes N] [--image-mib N] [--quick]` (as root;
//! `--quick`: one round, two nodes, a 32 MiB image, unless given).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use harness::{
    cluster::{
        Cluster, ClusterNode, MAX_NODES, MIRROR_URL, PULL_ONCE_LAYERS, SETTLE_TIMEOUT,
        pull_once_image_sized,
    },
    containerd::{CRI_NAMESPACE, mirror_hosts_toml},
    images::{Digest, Image},
    privileged::is_root,
    registry::Registry,
    world,
};
use pullproxy_bench::{
    ClusterImage, ClusterResults, ClusterRow, ClusterSample, Machine, Pattern, Spread, System,
    stats::loadavg,
};

/// The public image, as the fake Docker Hub holds it.
const REPO: &str = "library/app";
const NAME: &str = "docker.io/library/app:1.0";

/// The largest `--image-mib`: the image is written to disk once and pulled into every node.
const MAX_IMAGE_MIB: u64 = 4096;

struct Options {
    rounds: usize,
    nodes: usize,
    /// The image's layer bytes.
    image_bytes: u64,
    quick: bool,
}

fn options() -> Options {
    let mut rounds = None;
    let mut nodes = None;
    let mut image_mib = None;
    let mut quick = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut number = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{flag} needs a number")))
        };
        match flag.as_str() {
            "--rounds" => rounds = Some(number()),
            "--nodes" => nodes = Some(number()),
            "--image-mib" => image_mib = Some(number() as u64),
            "--quick" => quick = true,
            other => usage(&format!("unknown option {other}")),
        }
    }
    let o = Options {
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        nodes: nodes.unwrap_or(if quick { 2 } else { 4 }),
        image_bytes: image_mib.unwrap_or(if quick {
            32
        } else {
            PULL_ONCE_LAYERS.iter().sum::<u64>() >> 20
        }) << 20,
        quick,
    };
    if !(1..=MAX_IMAGE_MIB).contains(&(o.image_bytes >> 20)) {
        usage(&format!("--image-mib must be 1 to {MAX_IMAGE_MIB}"));
    }
    if o.rounds == 0 {
        usage("--rounds must be at least 1");
    }
    if !(2..=MAX_NODES).contains(&o.nodes) {
        usage(&format!("--nodes must be 2 to {MAX_NODES}"));
    }
    o
}

#[expect(
    clippy::exit,
    reason = "bad arguments: nothing is set up yet that Drop would undo"
)]
fn usage(why: &str) -> ! {
    eprintln!(
        "pp-clusterbench: {why}\nusage: pp-clusterbench [--rounds N] [--nodes N] [--image-mib N] [--quick]"
    );
    std::process::exit(2);
}

fn main() {
    if !is_root() {
        eprintln!("pp-clusterbench needs root (eBPF, namespaces, cgroups)");
        std::process::exit(2);
    }
    let o = options();
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!("pp-clusterbench: starting {} nodes", o.nodes);
    let mut c = Cluster::builder("pp-cb")
        .nodes(o.nodes)
        // What a node runs: a line per request, no debug logging.
        .proxy_env("PULLPROXY_LOG__LEVEL", "info")
        .start();
    c.start_mirror();
    let image = pull_once_image_sized(c.work_dir(), o.image_bytes);
    c.upstream.client().push_image(REPO, "1.0", &image);
    eprintln!(
        "pp-clusterbench: {} nodes up in {:.1?}; image {} ({} layers, {} bytes of blobs) on the \
         fake Docker Hub; {} rounds",
        o.nodes,
        c.bring_up_time(),
        image.digest(),
        image.layers.len(),
        image.blob_bytes(),
        o.rounds
    );

    let mut samples: BTreeMap<(System, Pattern), Vec<ClusterSample>> = BTreeMap::new();
    for round in 0..o.rounds {
        let systems = if round % 2 == 0 {
            [System::Pullproxy, System::Mirror]
        } else {
            [System::Mirror, System::Pullproxy]
        };
        let mut position = 0;
        for system in systems {
            for pattern in [Pattern::Staggered, Pattern::Simultaneous] {
                let sample = measure(&mut c, &image, system, pattern, round, position);
                eprintln!(
                    "round {}/{} {} {}: internet {:.2}x ({} bytes, {} GETs), {} {:.2}x, total \
                     {:.1} s (nodes {}), settle wait {:.1} s, load {:.1}",
                    round + 1,
                    o.rounds,
                    system.name(),
                    pattern.name(),
                    sample.upstream_x,
                    sample.upstream_bytes,
                    sample.upstream_requests,
                    if system == System::Pullproxy {
                        "hub"
                    } else {
                        "mirror"
                    },
                    sample.served_x,
                    sample.total_s,
                    sample
                        .node_s
                        .iter()
                        .map(|s| format!("{s:.1}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    sample.settle_wait_s,
                    sample.load_1m,
                );
                samples.entry((system, pattern)).or_default().push(sample);
                position += 1;
            }
        }
    }

    let results: Vec<_> = samples
        .iter()
        .map(|((system, pattern), xs)| summary(*system, *pattern, xs, o.nodes))
        .collect();
    let loads: Vec<f64> = samples.values().flatten().map(|s| s.load_1m).collect();
    let report = ClusterResults {
        what: "N nodes pull the same public image (CRI PullImage, containerd 1.6): pullproxy on \
               every node with the shared hub and write-back, vs containerd with a hosts.toml \
               mirror pointing at distribution's pull-through proxy; both in front of the same \
               fake Docker Hub"
            .to_owned(),
        nodes: o.nodes,
        rounds: o.rounds,
        quick: o.quick,
        pull: "CRI PullImage (the kubelet's path), anonymous, into a fresh containerd".to_owned(),
        staggered: "node 1, then 2, 3, ...: each pull after the one before finished; node 2 \
                    starts once what node 1 pulled settled into the shared store: pullproxy's \
                    write-back into the hub, the mirror's own storage (total_s leaves that wait \
                    out, wall_s includes it)"
            .to_owned(),
        simultaneous: "all nodes released at the same moment".to_owned(),
        image: ClusterImage {
            digest: image.digest().as_str().to_owned(),
            layers: image.layers.iter().map(|l| l.size).collect(),
            blob_bytes: image.blob_bytes(),
        },
        bring_up_s: c.bring_up_time().as_secs_f64(),
        machine: Machine {
            load_1m_during: Some(Spread::of(&loads)),
            ..Machine::now(load_before)
        },
        elapsed_s: started.elapsed().as_secs_f64(),
        results,
        measured_at: None,
    };
    drop(c);
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report JSON")
    );
}

/// Spreads over the rounds of one system and pattern, with the samples.
fn summary(system: System, pattern: Pattern, xs: &[ClusterSample], nodes: usize) -> ClusterRow {
    let of = |f: &dyn Fn(&ClusterSample) -> f64| Spread::of(&xs.iter().map(f).collect::<Vec<_>>());
    ClusterRow {
        system,
        pattern,
        upstream_x: of(&|s| s.upstream_x),
        upstream_bytes: of(&|s| s.upstream_bytes as f64),
        served_x: of(&|s| s.served_x),
        total_s: of(&|s| s.total_s),
        wall_s: of(&|s| s.wall_s),
        settle_wait_s: of(&|s| s.settle_wait_s),
        node_s: (0..nodes).map(|i| of(&|s| s.node_s[i])).collect(),
        samples: xs.to_vec(),
    }
}

/// Empties everything `system` keeps, then pulls the image on every node in `pattern`.
fn measure(
    c: &mut Cluster,
    image: &Image,
    system: System,
    pattern: Pattern,
    round: usize,
    position: usize,
) -> ClusterSample {
    prepare(c, system);
    c.upstream.clear_requests();
    let base = Instant::now();
    let mut settle_wait = Duration::ZERO;
    let mut writeback = String::new();
    let times: Vec<(Duration, Duration)> = match pattern {
        Pattern::Staggered => {
            let mut times = Vec::new();
            for (i, n) in c.nodes.iter().enumerate() {
                times.push(timed_pull(n, base));
                if i == 0 {
                    let waited = Instant::now();
                    match system {
                        System::Pullproxy => {
                            writeback = n.wait_written_back();
                            if !writeback.contains(r#"outcome="pushed"} 1"#) {
                                eprintln!(
                                    "warning: node 1's write-back did not push the image: \
                                     {writeback}"
                                );
                            }
                        }
                        System::Mirror => mirror_stored(c, image),
                    }
                    settle_wait = waited.elapsed();
                }
            }
            times
        }
        Pattern::Simultaneous => c.on_every_node(|n| timed_pull(n, base)),
    };
    for n in &c.nodes {
        let stored = n
            .ctd
            .image(CRI_NAMESPACE, NAME)
            .unwrap_or_else(|| panic!("node {}: {NAME} not in containerd", n.index() + 1));
        assert_eq!(
            stored.digest,
            image.digest().as_str(),
            "node {}: the pulled image",
            n.index() + 1
        );
    }
    let blob_count = image.blobs().count();
    let (served_by, sources) = match system {
        System::Pullproxy => {
            let sources = c
                .nodes
                .iter()
                .map(|n| {
                    let mut count = BTreeMap::new();
                    for s in world::sources(&n.wait_pulls(REPO, blob_count), "blob") {
                        *count.entry(s).or_default() += 1;
                    }
                    count
                })
                .collect();
            (&c.hub, sources)
        }
        System::Mirror => {
            mirror_stored(c, image);
            (c.mirror.as_ref().expect("the mirror runs"), Vec::new())
        }
    };
    // The hub serves each node once per blob it answered from the hub; the mirror every node
    // every blob (the mirror and the hub log a download when its handler returns).
    let served_copies = |d: &Digest| -> u64 {
        match system {
            System::Pullproxy => c.answered_from(REPO, d, "hub") as u64,
            System::Mirror => c.nodes.len() as u64,
        }
    };
    let served = served_bytes(served_by, image, served_copies);
    let traffic = c.internet_traffic(image, |d| match system {
        System::Pullproxy => c.answered_from(REPO, d, "upstream"),
        System::Mirror => 1,
    });
    let upstream_bytes: u64 = traffic.values().map(|t| t.bytes).sum();
    let image_bytes = image.blob_bytes() as f64;
    let first_start = times.iter().map(|t| t.0).min().unwrap_or_default();
    let last_end = times.iter().map(|t| t.1).max().unwrap_or_default();
    let wall = last_end - first_start;
    ClusterSample {
        round,
        position,
        upstream_bytes,
        upstream_x: upstream_bytes as f64 / image_bytes,
        upstream_requests: traffic.values().map(|t| t.requests).sum(),
        served_x: served as f64 / image_bytes,
        total_s: (wall - settle_wait).as_secs_f64(),
        wall_s: wall.as_secs_f64(),
        settle_wait_s: settle_wait.as_secs_f64(),
        node_start_s: times
            .iter()
            .map(|t| (t.0 - first_start).as_secs_f64())
            .collect(),
        node_s: times.iter().map(|t| (t.1 - t.0).as_secs_f64()).collect(),
        sources,
        writeback,
        load_1m: loadavg().first().copied().unwrap_or(0.0),
    }
}

/// Fresh state for `system` on every node, in parallel: nothing in any cache, an empty
/// containerd. pullproxy: the nodes' pullproxies killed, the hub emptied, each pullproxy
/// restarted with an empty cache, containerd with its default configuration. The mirror: the
/// pullproxies stopped (connections go direct), the mirror emptied, containerd with the mirror's
/// `hosts.toml`.
fn prepare(c: &mut Cluster, system: System) {
    for n in &mut c.nodes {
        n.kill_proxy();
    }
    match system {
        System::Pullproxy => c.hub_reset(),
        System::Mirror => c.mirror.as_mut().expect("the mirror runs").reset(),
    }
    let hosts_toml = mirror_hosts_toml(MIRROR_URL);
    std::thread::scope(|s| {
        for n in &mut c.nodes {
            let hosts_toml = &hosts_toml;
            s.spawn(move || match system {
                System::Pullproxy => {
                    n.restart_proxy_empty();
                    n.restart_containerd(None);
                }
                System::Mirror => n.restart_containerd(Some(hosts_toml)),
            });
        }
    });
}

/// Waits until the mirror's storage holds every blob of `image` (or [`SETTLE_TIMEOUT`] passed):
/// distribution stores a blob from an upstream fetch of its own, beside the one it serves.
fn mirror_stored(c: &Cluster, image: &Image) {
    let mirror = c.mirror.as_ref().expect("the mirror runs");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !image.blobs().all(|b| mirror.stores(&b.digest)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A CRI pull of the image on `n`: its start and end since `base`.
fn timed_pull(n: &ClusterNode, base: Instant) -> (Duration, Duration) {
    let start = base.elapsed();
    n.cri_pull(NAME).unwrap_or_else(|e| {
        panic!(
            "node {}: PullImage {NAME}: {e}\ncontainerd log:\n{}",
            n.index() + 1,
            n.ctd.log()
        )
    });
    (start, base.elapsed())
}

/// The blob bytes of `image` that `registry` served, once it logged `copies(digest)` whole
/// copies of each blob (or [`SETTLE_TIMEOUT`] passed).
fn served_bytes(registry: &Registry, image: &Image, copies: impl Fn(&Digest) -> u64) -> u64 {
    image
        .blobs()
        .map(|b| {
            registry
                .wait_blob_bytes(&b.digest, copies(&b.digest) * b.size, SETTLE_TIMEOUT)
                .bytes
        })
        .sum()
}
