//! The cost of pullproxy on a cold pull: the wall time of a pull of a multi-layer image from the
//! sealos hub by an unmodified containerd 1.6 (default configuration) through pullproxy, against
//! the same containerd configured with a `hosts.toml` mirror pointing straight at the hub
//! (`config_path` + `hosts.toml`, the configuration change pullproxy makes unnecessary). Two
//! paths: `ctr images pull` (ctr fetches, with `--hosts-dir` for the mirror) and CRI
//! `PullImage` (the daemon fetches, as for the kubelet; the mirror through `config_path`). Both
//! include unpacking. Not a test: it prints a small JSON report.
//!
//! Each round starts a fresh containerd (empty content store: a cold pull) per variant and
//! path, the two variants in alternating order. Both pull the same bytes from the same hub; the
//! mirror variant runs in a non-target cgroup so the kernel leaves its connections alone.
//!
//! Usage: `pp-pullbench [--rounds N] [--layers N] [--layer-mib N]` (as root).

use std::time::{Duration, Instant};

use harness::{
    containerd::{Containerd, mirror_hosts_toml},
    images::{self, Format},
    privileged::is_root,
    process::Placement,
    world::{self, HUB_IP, HUB_PASSWORD, HUB_USER, World},
};
use pullproxy_bench::{ContainerdImage, ContainerdResults, PullComparison, PullSamples, Spread};

const REPO: &str = "library/pullbench";

struct Options {
    rounds: usize,
    layers: usize,
    layer_mib: usize,
}

fn options() -> Options {
    let mut o = Options {
        rounds: 5,
        layers: 5,
        layer_mib: 8,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&format!("{flag} needs a number")));
        match flag.as_str() {
            "--rounds" => o.rounds = value,
            "--layers" => o.layers = value,
            "--layer-mib" => o.layer_mib = value,
            other => usage(&format!("unknown option {other}")),
        }
    }
    if o.rounds == 0 {
        usage("--rounds must be at least 1");
    }
    o
}

#[expect(
    clippy::exit,
    reason = "bad arguments: nothing is set up yet that Drop would undo"
)]
fn usage(why: &str) -> ! {
    eprintln!("pp-pullbench: {why}\nusage: pp-pullbench [--rounds N] [--layers N] [--layer-mib N]");
    std::process::exit(2);
}

fn main() {
    if !is_root() {
        eprintln!("pp-pullbench needs root (eBPF, namespaces, cgroups)");
        std::process::exit(2);
    }
    let o = options();
    let w = World::new("pp-pullbench");
    let image = images::multi_layer(Format::Docker, o.layers, o.layer_mib << 20, 0xbe7c);
    w.hub.client().push_image(REPO, "1", &image);
    let reference = format!("docker.io/{REPO}:1");
    eprintln!(
        "pp-pullbench: {} rounds, image {} ({} layers, {} bytes of blobs) on the hub",
        o.rounds,
        image.digest(),
        image.layers.len(),
        image.blob_bytes()
    );

    let [ctr, cri] = [Path::Ctr, Path::Cri].map(|path| {
        let mut via_proxy = Vec::new();
        let mut via_mirror = Vec::new();
        for round in 0..o.rounds {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for through_pullproxy in order {
                if through_pullproxy {
                    via_proxy.push(pull_through_pullproxy(&w, path, &reference));
                } else {
                    via_mirror.push(pull_from_a_mirror(&w, path, &reference));
                }
            }
            eprintln!(
                "{} round {}: pullproxy {:.3}s, hosts.toml mirror {:.3}s",
                path.name(),
                round + 1,
                via_proxy[round].as_secs_f64(),
                via_mirror[round].as_secs_f64()
            );
        }
        let ratios: Vec<f64> = via_proxy
            .iter()
            .zip(&via_mirror)
            .map(|(p, m)| p.as_secs_f64() / m.as_secs_f64())
            .collect();
        PullComparison {
            pullproxy_s: Spread::of(&secs(&via_proxy)),
            mirror_s: Spread::of(&secs(&via_mirror)),
            ratio_pullproxy_over_mirror: Spread::of(&ratios),
            first_round_ratio: ratios[0],
            samples: PullSamples {
                pullproxy_s: secs(&via_proxy),
                mirror_s: secs(&via_mirror),
            },
        }
    });
    let report = ContainerdResults {
        what: "cold pull wall time (fetch + unpack), containerd 1.6: default config through \
               pullproxy vs hosts.toml mirror straight to the hub"
            .to_owned(),
        image: ContainerdImage {
            digest: image.digest().as_str().to_owned(),
            layers: image.layers.len(),
            blob_bytes: image.blob_bytes(),
        },
        rounds: o.rounds,
        ctr,
        cri,
        measured_at: None,
    };

    // Every blob the pullproxy variant got came from the hub (nothing was measured by mistake
    // against the cache or the upstream).
    w.settle();
    let sources = world::sources(&w.pulls(REPO), "blob");
    assert!(
        !sources.is_empty() && sources.iter().all(|s| s == "hub"),
        "pullproxy served blobs from {sources:?}"
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("report JSON")
    );
}

/// Who fetches: `ctr` itself, or the daemon through CRI.
#[derive(Clone, Copy)]
enum Path {
    Ctr,
    Cri,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Ctr => "ctr",
            Path::Cri => "cri",
        }
    }
}

/// Pulls `reference` with `path` on `ctd` and returns the wall time.
fn timed_pull(
    ctd: &Containerd,
    path: Path,
    reference: &str,
    creds: Option<(&str, &str)>,
) -> Duration {
    match path {
        Path::Ctr => {
            let out = ctd.pull(reference, creds);
            out.expect_success();
            out.finished.elapsed
        }
        Path::Cri => {
            let cri = ctd.cri();
            let started = Instant::now();
            cri.pull_image(reference, creds)
                .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", ctd.log()));
            started.elapsed()
        }
    }
}

/// A fresh containerd with its default configuration in the target cgroup: pullproxy serves it.
fn pull_through_pullproxy(w: &World, path: Path, reference: &str) -> Duration {
    let ctd = Containerd::start(w.runtime_placement());
    timed_pull(&ctd, path, reference, None)
}

/// A fresh containerd whose `hosts.toml` sends docker.io pulls straight to the hub (plain HTTP,
/// basic auth given by the client), in a cgroup the kernel programs leave alone.
fn pull_from_a_mirror(w: &World, path: Path, reference: &str) -> Duration {
    let hosts_toml = mirror_hosts_toml(&format!("http://{HUB_IP}:5000"));
    let at = Placement::new()
        .netns(&w.node.ns)
        .cgroup(&w.node.other)
        .mounts(w.client_mounts());
    let ctd = Containerd::builder(at)
        .hosts_toml("docker.io", &hosts_toml)
        .start();
    timed_pull(&ctd, path, reference, Some((HUB_USER, HUB_PASSWORD)))
}

fn secs(d: &[Duration]) -> Vec<f64> {
    d.iter().map(Duration::as_secs_f64).collect()
}
