//! The pull benchmark suite, run by `cargo xtask bench` (as root): one machine, one run, the same
//! images and the same client for every system.
//!
//! Systems: the hub itself (docker-registry, plain HTTP: the floor), the TLS upstream itself,
//! pullproxy (hub hit, cache hit, cold) with its clients redirected by the real kernel programs,
//! docker-registry in pull-through proxy mode and nginx `proxy_cache`, both in front of the same
//! upstream. Figures: blob throughput cold and warm, manifest `HEAD` latency, N clients pulling
//! one cold blob (upstream bytes and wall time), pullproxy's memory. Every number is reported as
//! a ratio against a baseline measured in the same round, with min/median/max over rounds.
//!
//! `pp-bench [--quick] [--rounds N] [--out FILE]` writes JSON (to FILE or stdout); `--sizes 16,256`
//! (MiB) and `--only latency,throughput,concurrency,memory` narrow a run down while working on
//! one figure; `--only fastpath` runs the TLS fast path figure, which no other run includes
//! (`cargo xtask bench` runs it on its own, at 256 MiB);
//! `pp-bench --profile hub|cache|cold|hub-cold|head [--seconds S]` sets the world up and repeats one
//! pullproxy workload (256 MiB blob GETs, or manifest HEADs) for S seconds (default 20), for
//! `perf record -a` to watch; `pp-bench client` is the load generator's process (see
//! `harness::loadgen`).

mod fastpath;
mod figures;
mod world;

use std::time::Instant;

use harness::loadgen;
use pullproxy_bench::{
    BenchResults, ConcurrencyRow, LatencyRow, Machine, MemoryReport, NotMeasured, Settings, Spread,
    State, Target, ThroughputRow, Tls, size_label, stats::loadavg,
};

use crate::world::{Via, World};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(loadgen::CLIENT_ARG) {
        return loadgen::client_main();
    }
    assert!(
        harness::privileged::is_root(),
        "pp-bench needs root (BPF, namespaces, cgroups)"
    );
    assert!(
        std::env::var_os("PULLPROXY_BIN").is_some(),
        "set PULLPROXY_BIN to the (release) pullproxy binary; `cargo xtask bench` does"
    );
    let mut quick = false;
    let mut rounds = None;
    let mut out = None;
    let mut profile: Option<String> = None;
    let mut sizes: Option<Vec<u64>> = None;
    let mut only: Option<Vec<String>> = None;
    let mut seconds = 20.0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()),
            "--out" => out = it.next().cloned(),
            "--profile" => profile = it.next().cloned(),
            "--sizes" => {
                sizes = it.next().map(|v| {
                    v.split(',')
                        .map(|m| m.parse::<u64>().expect("MiB") << 20)
                        .collect()
                })
            }
            "--only" => only = it.next().map(|v| v.split(',').map(str::to_owned).collect()),
            "--seconds" => seconds = it.next().and_then(|v| v.parse().ok()).expect("seconds"),
            other => panic!(
                "unknown argument {other} (pp-bench [--quick] [--rounds N] [--out FILE] \
                 [--sizes MIB,...] [--only latency,throughput,concurrency,memory|fastpath] \
                 [--profile hub|cache|cold|hub-cold|head [--seconds S]])"
            ),
        }
    }
    match profile.as_deref() {
        Some("hub-cold") => return fastpath::profile_cold_hub_hits(seconds),
        Some(workload) => return figures::profile(workload, seconds),
        None => {}
    }
    let settings = if quick {
        Settings {
            rounds: rounds.unwrap_or(1),
            concurrency_rounds: 1,
            sizes: vec![16 << 20],
            clients: vec![1, 16],
            head_requests: 100,
            small_blobs: 32,
            quick,
            only: None,
        }
    } else {
        let rounds = rounds.unwrap_or(5);
        Settings {
            rounds,
            concurrency_rounds: rounds.min(3),
            sizes: vec![16 << 20, 256 << 20, 1 << 30],
            clients: vec![1, 16, 64, 256],
            head_requests: 1000,
            small_blobs: 512,
            quick,
            only: None,
        }
    };
    let mut settings = settings;
    if let Some(sizes) = sizes {
        settings.sizes = sizes;
    }
    settings.only = only;
    let report = run(&settings);
    let text = serde_json::to_string_pretty(&report).expect("JSON");
    match out {
        Some(path) => std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path}: {e}")),
        None => println!("{text}"),
    }
}

fn run(s: &Settings) -> BenchResults {
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!("pp-bench: starting the world (registries, nginx, pullproxy)");
    let mut w = World::new();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut mem = MemoryReport {
        idle_start_rss: w.memory(Via::Pullproxy).rss,
        ..Default::default()
    };
    eprintln!("pp-bench: building and pushing the images");
    let fixtures: Vec<_> = s
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| w.fixture(&format!("b{}m", size >> 20), size, 0xbe_0000 + i as u64))
        .collect();
    if !s.only_fastpath() {
        // (The fast path figure checks its own systems' bytes.)
        eprintln!("pp-bench: checking every system serves the right bytes");
        figures::verify(&mut w, &fixtures[0]);
    }
    let latency = if s.runs("latency") {
        figures::head_latency(&mut w, s, &fixtures[0])
    } else {
        Vec::new()
    };
    let throughput = if s.runs("throughput") {
        figures::throughput(&mut w, s, &fixtures, &mut mem)
    } else {
        Vec::new()
    };
    let concurrency = if s.runs("concurrency") {
        figures::concurrency(&mut w, s, &fixtures[0], &mut mem)
    } else {
        Vec::new()
    };
    let fastpath = s
        .runs("fastpath")
        .then(|| fastpath::fastpath(&mut w, s, &fixtures));
    if s.runs("memory") {
        w.restart_proxy(&[]);
        std::thread::sleep(std::time::Duration::from_secs(1));
        mem.idle_end_rss = w.memory(Via::Pullproxy).rss;
        mem.full_cache = Some(figures::full_cache(&mut w, s, &fixtures));
    }
    let mut targets = if s.only_fastpath() {
        Vec::new()
    } else {
        targets(&throughput, &latency, &concurrency, &mem)
    };
    if let Some(f) = &fastpath {
        targets.extend(fastpath_targets(f));
    }
    drop(w);
    BenchResults {
        settings: s.clone(),
        machine: Machine::now(load_before),
        elapsed_s: started.elapsed().as_secs_f64(),
        throughput,
        head_latency: latency,
        concurrency,
        memory: mem,
        fastpath,
        containerd: NotMeasured {
            measured: false,
            why: "figure 3 (a containerd pull through pullproxy vs a hosts.toml mirror) is \
                  measured by pp-pullbench, which `cargo xtask bench` runs and merges in here"
                .to_owned(),
        },
        targets,
        measured_at: None,
    }
}

/// The project's targets, each with the measured spread and whether its median meets it.
fn targets(
    throughput: &[ThroughputRow],
    latency: &[LatencyRow],
    concurrency: &[ConcurrencyRow],
    mem: &MemoryReport,
) -> Vec<Target> {
    let mut out = Vec::new();
    let mut target = |name: String, goal: &str, value: Spread, met: bool| {
        out.push(Target {
            name,
            goal: goal.to_owned(),
            value,
            met,
        });
    };
    let row = |size: u64, system: &str, state: State| {
        throughput
            .iter()
            .find(|r| r.size == size && r.system == system && r.state == state)
    };
    let sizes: Vec<u64> = {
        let mut v: Vec<u64> = throughput.iter().map(|r| r.size).collect();
        v.dedup();
        v
    };
    for &size in &sizes {
        let label = size_label(size);
        let Some(pp) = row(size, "pullproxy cache", State::Warm) else {
            continue;
        };
        target(
            format!("{label} cache hit vs direct plain-HTTP hub"),
            ">= 0.8x",
            pp.vs_hub,
            pp.vs_hub.median >= 0.8,
        );
        for peer in [Via::Nginx, Via::Dproxy] {
            if let Some(p) = row(size, peer.label(), State::Warm) {
                let ratios: Vec<f64> = pp.mib_s.iter().zip(&p.mib_s).map(|(a, b)| a / b).collect();
                let s = Spread::of(&ratios);
                target(
                    format!("{label} cache hit vs {} warm", peer.label()),
                    ">= 1.0x",
                    s,
                    s.median >= 1.0,
                );
            }
        }
    }
    if let Some(l) = latency
        .iter()
        .find(|l| l.system == Via::PullproxyHub.label())
    {
        target(
            "added p99 of a hub-hit manifest HEAD (ms)".into(),
            "< 2 ms",
            l.added_p99_ms,
            l.added_p99_ms.median < 2.0,
        );
    }
    for c in concurrency
        .iter()
        .filter(|c| c.system == Via::Pullproxy.label())
    {
        target(
            format!(
                "{} concurrent cold pulls: upstream bytes / blob size",
                c.clients
            ),
            "= 1x",
            c.upstream_x,
            c.upstream_x.max <= 1.0 + 1e-9,
        );
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let idle = mib(mem.idle_start_rss);
    target(
        "pullproxy RSS idle (MiB)".into(),
        "< 64 MiB",
        Spread::of(&[idle]),
        idle < 64.0,
    );
    let cold: Vec<f64> = mem
        .cold_peak
        .values()
        .map(|v| mib(*v.iter().max().unwrap_or(&0)))
        .collect();
    if !cold.is_empty() {
        let s = Spread::of(&cold);
        target(
            "pullproxy peak RSS over cold pulls of each blob size (MiB; bounded: max/min)".into(),
            "no growth with blob size (< 1.5x)",
            s,
            s.max / s.min.max(1.0) < 1.5,
        );
    }
    out
}

/// The targets for the fast path: 256 MiB (or whatever sizes ran) cache hits at 0.8x
/// the hub and hub hits at 0.6x, per client and per place pullproxy's TLS ran.
fn fastpath_targets(f: &pullproxy_bench::Fastpath) -> Vec<Target> {
    f.rows
        .iter()
        .filter(|r| r.tls != Tls::None)
        .map(|r| {
            let (what, goal) = if r.system.contains("cache") {
                ("cache hit", 0.8)
            } else {
                ("hub hit", 0.6)
            };
            Target {
                name: format!(
                    "{} {what} vs direct plain-HTTP hub ({}, TLS in {})",
                    size_label(r.size),
                    r.client.name(),
                    if r.tls == Tls::Kernel {
                        "the kernel"
                    } else {
                        "user space"
                    },
                ),
                goal: format!(">= {goal}x"),
                value: r.vs_hub,
                met: r.vs_hub.median >= goal,
            }
        })
        .collect()
}
