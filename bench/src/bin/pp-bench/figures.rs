//! The measurements. Each round runs every system once, in an order that rotates from round to
//! round, so no system always runs first (or right after a restart); every ratio is taken
//! within a round, against the baseline measured in that round.

use std::collections::BTreeMap;

use harness::{loadgen::Outcome, process::Memory};
use pullproxy_bench::{
    ConcurrencyRow, FullCache, LatencyRow, MemoryReport, Settings, Spread, State, ThroughputRow,
    size_label, stats::percentile,
};

use crate::world::{Fixture, Via, World};

const MIB: f64 = 1024.0 * 1024.0;

/// `rotate(v, r)`: `v` starting at its `r`-th element.
pub fn rotated<T: Copy>(v: &[T], round: usize) -> Vec<T> {
    let mut v = v.to_vec();
    let n = v.len();
    v.rotate_left(round % n);
    v
}

fn record(map: &mut BTreeMap<String, Vec<u64>>, key: String, m: Memory) {
    map.entry(key).or_default().push(m.hwm);
}

/// Correctness first: each system serves the 16 MiB blob with the right bytes, cold and warm,
/// and pullproxy's log says where each came from (so the kernel redirect is in the path).
pub fn verify(w: &mut World, f: &Fixture) {
    let size = f.layer().size;
    for via in [
        Via::Hub,
        Via::Upstream,
        Via::PullproxyHub,
        Via::Pullproxy,
        Via::Dproxy,
        Via::Nginx,
    ] {
        let mut job = w.job(via, "GET", vec![f.blob_path(via)]);
        job.verify = true;
        let digest = f.layer().digest.to_string();
        if Via::CACHING.contains(&via) {
            let out = w.run(via, &job);
            out.expect(
                &format!("verified cold GET via {}", via.label()),
                200,
                Some(size),
            );
            if via == Via::Pullproxy {
                expect_source(w, via, &digest, "upstream");
            }
            w.settle_cached(via, &f.layer().digest);
        }
        let out = w.run(via, &job);
        out.expect(
            &format!("verified GET via {}", via.label()),
            200,
            Some(size),
        );
        match via {
            Via::PullproxyHub => expect_source(w, via, &digest, "hub"),
            Via::Pullproxy => expect_source(w, via, &digest, "cache"),
            _ => {}
        }
    }
}

fn expect_source(w: &World, via: Via, reference: &str, want: &str) {
    let got = w.last_source(via.repo(), reference);
    assert_eq!(
        got.as_deref(),
        Some(want),
        "pullproxy's last pull of {} {reference} (was the client redirected?)",
        via.repo()
    );
}

/// Figure 1a: blob throughput, cold and warm, per size and system.
pub fn throughput(
    w: &mut World,
    s: &Settings,
    fixtures: &[Fixture],
    mem: &mut MemoryReport,
) -> Vec<ThroughputRow> {
    let order = [
        Via::Hub,
        Via::Upstream,
        Via::PullproxyHub,
        Via::Pullproxy,
        Via::Dproxy,
        Via::Nginx,
    ];
    // (size index, via, cold) -> MiB/s per round
    let mut samples: BTreeMap<(usize, String, bool), Vec<f64>> = BTreeMap::new();
    let mut keys: Vec<(usize, Via, bool)> = Vec::new();
    for round in 0..s.rounds {
        for (i, f) in fixtures.iter().enumerate() {
            let size = f.layer().size;
            let digest = f.layer().digest.clone();
            eprintln!(
                "pp-bench: throughput {} round {}/{}",
                size_label(size),
                round + 1,
                s.rounds
            );
            for via in rotated(&order, round + i) {
                let path = f.blob_path(via);
                if Via::CACHING.contains(&via) {
                    w.make_cold(via);
                    w.page_in_upstream(&digest);
                    w.reset_peak(via);
                    let out = w.run(via, &w.job(via, "GET", vec![path.clone()]));
                    out.expect(&format!("cold GET via {}", via.label()), 200, Some(size));
                    if via == Via::Pullproxy {
                        record(&mut mem.cold_peak, size_label(size), w.memory(via));
                        expect_source(w, via, digest.as_str(), "upstream");
                    }
                    push(&mut samples, &mut keys, (i, via, true), mib_s(&out));
                    w.settle_cached(via, &digest);
                }
                let mut job = w.job(via, "GET", vec![path]);
                job.repeat = warm_repeat(size);
                // Warm means warm: one untimed GET first (this host's kernel reclaims page cache
                // that went unused for a while, and the last read of this file may be a round ago).
                job.warmup = 1;
                w.reset_peak(via);
                let out = w.run(via, &job);
                out.expect(&format!("warm GET via {}", via.label()), 200, Some(size));
                match via {
                    Via::Pullproxy => {
                        record(&mut mem.warm_peak, size_label(size), w.memory(via));
                        expect_source(w, via, digest.as_str(), "cache");
                    }
                    Via::PullproxyHub => expect_source(w, via, digest.as_str(), "hub"),
                    _ => {}
                }
                push(&mut samples, &mut keys, (i, via, false), mib_s(&out));
            }
        }
    }
    keys.iter()
        .map(|&(i, via, cold)| {
            let get = |v: Via, c: bool| samples[&(i, v.label().to_owned(), c)].clone();
            let values = get(via, cold);
            let hub = get(Via::Hub, false);
            let upstream = get(Via::Upstream, false);
            let ratio = |base: &[f64]| {
                Spread::of(
                    &values
                        .iter()
                        .zip(base)
                        .map(|(v, b)| v / b)
                        .collect::<Vec<_>>(),
                )
            };
            ThroughputRow {
                size: fixtures[i].layer().size,
                system: system_name(via),
                state: if cold { State::Cold } else { State::Warm },
                mib_s_spread: Spread::of(&values),
                vs_hub: ratio(&hub),
                vs_upstream: ratio(&upstream),
                mib_s: values,
            }
        })
        .collect()
}

/// A row's system name: the caching systems' warm state is a cache hit.
fn system_name(via: Via) -> String {
    match via {
        Via::Pullproxy => "pullproxy cache".into(),
        other => other.label().into(),
    }
}

fn push(
    samples: &mut BTreeMap<(usize, String, bool), Vec<f64>>,
    keys: &mut Vec<(usize, Via, bool)>,
    key: (usize, Via, bool),
    value: f64,
) {
    if !keys.contains(&key) {
        keys.push(key);
    }
    samples
        .entry((key.0, key.1.label().to_owned(), key.2))
        .or_default()
        .push(value);
}

/// Warm GETs per measurement: at least 256 MiB, so small blobs are not timed by one request.
pub fn warm_repeat(size: u64) -> usize {
    ((256u64 << 20) / size).clamp(1, 16) as usize
}

fn mib_s(out: &Outcome) -> f64 {
    out.bytes() as f64 / MIB / out.wall_s
}

pub fn head_latency(w: &mut World, s: &Settings, f: &Fixture) -> Vec<LatencyRow> {
    let order = [
        Via::Hub,
        Via::PullproxyHub,
        Via::Upstream,
        Via::Pullproxy,
        Via::Dproxy,
        Via::Nginx,
    ];
    let mut p50: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut p99: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..s.rounds {
        eprintln!("pp-bench: manifest HEAD round {}/{}", round + 1, s.rounds);
        for via in rotated(&order, round) {
            let mut job = w.job(via, "HEAD", vec![f.manifest_path(via)]);
            job.warmup = 20;
            job.repeat = s.head_requests;
            let out = w.run(via, &job);
            out.expect(&format!("HEAD via {}", via.label()), 200, Some(0));
            if via == Via::PullproxyHub {
                expect_source(w, via, &f.tag, "hub");
            }
            let ms: Vec<f64> = out.durations().iter().map(|d| d * 1e3).collect();
            p50.entry(via.label())
                .or_default()
                .push(percentile(&ms, 0.5));
            p99.entry(via.label())
                .or_default()
                .push(percentile(&ms, 0.99));
        }
    }
    let hub50 = p50[Via::Hub.label()].clone();
    let hub99 = p99[Via::Hub.label()].clone();
    let zip = |a: &[f64], b: &[f64], f: fn(f64, f64) -> f64| {
        Spread::of(&a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect::<Vec<_>>())
    };
    order
        .iter()
        .map(|via| {
            let (a, b) = (&p50[via.label()], &p99[via.label()]);
            LatencyRow {
                system: via.label().into(),
                what: match via {
                    Via::Pullproxy => "tag not on the hub: re-validated upstream",
                    Via::PullproxyHub => "tag on the hub",
                    Via::Dproxy | Via::Nginx => "tag: passed to the upstream",
                    _ => "tag",
                }
                .to_owned(),
                p50_ms: Spread::of(a),
                p99_ms: Spread::of(b),
                p50_vs_hub: zip(a, &hub50, |x, y| x / y),
                p99_vs_hub: zip(b, &hub99, |x, y| x / y),
                added_p99_ms: zip(b, &hub99, |x, y| x - y),
            }
        })
        .collect()
}

pub fn concurrency(
    w: &mut World,
    s: &Settings,
    f: &Fixture,
    mem: &mut MemoryReport,
) -> Vec<ConcurrencyRow> {
    let order = [
        Via::Hub,
        Via::Upstream,
        Via::Pullproxy,
        Via::Dproxy,
        Via::Nginx,
    ];
    let size = f.layer().size;
    let digest = f.layer().digest.clone();
    let max_n = *s.clients.iter().max().expect("client counts");
    mem.concurrent_clients = max_n;
    let mut rows = Vec::new();
    for &n in &s.clients {
        let mut wall: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        let mut upstream_x: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
        for round in 0..s.concurrency_rounds {
            eprintln!(
                "pp-bench: {n} concurrent clients, round {}/{}",
                round + 1,
                s.concurrency_rounds
            );
            for via in rotated(&order, round) {
                if Via::CACHING.contains(&via) {
                    w.make_cold(via);
                }
                w.page_in_upstream(&digest);
                w.page_in_hub(&digest);
                w.upstream.clear_requests();
                w.reset_peak(via);
                let mut job = w.job(via, "GET", vec![f.blob_path(via)]);
                job.connections = n;
                let out = w.run(via, &job);
                out.expect(
                    &format!("{n} concurrent GETs via {}", via.label()),
                    200,
                    Some(size),
                );
                if n == max_n && via != Via::Hub && via != Via::Upstream {
                    record(
                        &mut mem.concurrent_peak,
                        via.label().to_owned(),
                        w.memory(via),
                    );
                }
                wall.entry(via).or_default().push(out.wall_s);
                let fetched = if via == Via::Hub {
                    0
                } else {
                    w.upstream_blob_bytes(&digest)
                };
                upstream_x
                    .entry(via)
                    .or_default()
                    .push(fetched as f64 / size as f64);
            }
        }
        let hub = wall[&Via::Hub].clone();
        for via in order {
            let ratios: Vec<f64> = wall[&via].iter().zip(&hub).map(|(a, b)| a / b).collect();
            rows.push(ConcurrencyRow {
                clients: n,
                system: via.label().into(),
                upstream_x: Spread::of(&upstream_x[&via]),
                wall_s: Spread::of(&wall[&via]),
                wall_vs_hub: Spread::of(&ratios),
            });
        }
    }
    rows
}

/// Figure 5's last part: pullproxy with a cache filled past its limit.
pub fn full_cache(w: &mut World, s: &Settings, fixtures: &[Fixture]) -> FullCache {
    use crate::world::SMALL_CACHE;
    eprintln!("pp-bench: memory with a full cache ({SMALL_CACHE})");
    let extra = [("PULLPROXY_CACHE__MAX_SIZE", SMALL_CACHE.to_owned())];
    w.restart_proxy(&extra);
    let small = w.small_blobs(s.small_blobs, 64 * 1024);
    w.reset_peak(Via::Pullproxy);
    let mut job = w.job(Via::Pullproxy, "GET", small);
    job.connections = 4;
    let out = w.run(Via::Pullproxy, &job);
    out.expect("small blobs through pullproxy", 200, None);
    for f in fixtures {
        let out = w.run(
            Via::Pullproxy,
            &w.job(Via::Pullproxy, "GET", vec![f.blob_path(Via::Pullproxy)]),
        );
        out.expect("filling the cache", 200, Some(f.layer().size));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let m = w.memory(Via::Pullproxy);
    let (files, bytes_on_disk) = cache_usage(&w.node.cache_dir().join("blobs/sha256"));
    w.stop_proxy();
    w.start_proxy(&extra);
    // Let the background re-verification of the blobs found on disk finish.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let restarted = w.memory(Via::Pullproxy);
    FullCache {
        max_size: SMALL_CACHE.into(),
        files,
        bytes_on_disk,
        peak: m.hwm,
        rss_after: m.rss,
        rss_restarted: restarted.rss,
    }
}

fn cache_usage(dir: &std::path::Path) -> (usize, u64) {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
}

/// Repeats one pullproxy workload for `seconds` (bounded), printing pullproxy's pid, for a
/// profiler to watch: `hub` (hub hits), `cache` (cache hits), `cold` (restart with an empty cache,
/// then a pull from the upstream) of a 256 MiB blob, or `head` (hub-hit manifest HEADs). The
/// cold hub hit has its own loop ([`crate::fastpath::profile_cold_hub_hits`]).
pub fn profile(workload: &str, seconds: f64) {
    let mut w = World::new();
    let f = w.fixture("profile", 256 << 20, 0x9f0f);
    let via = match workload {
        "hub" | "head" => Via::PullproxyHub,
        "cache" | "cold" => Via::Pullproxy,
        other => panic!("unknown workload {other}: hub, cache, cold, hub-cold or head"),
    };
    if workload == "cache" {
        w.run(via, &w.job(via, "GET", vec![f.blob_path(via)]));
        w.settle_cached(via, &f.layer().digest);
    }
    let started = std::time::Instant::now();
    let mut runs = 0;
    let mut secs = 0.0;
    let mut bytes = 0u64;
    let cpu_start = cpu_seconds(w.proxy().pid());
    while started.elapsed().as_secs_f64() < seconds {
        if workload == "cold" {
            w.make_cold(via);
        }
        eprintln!("pp-bench: pullproxy pid {}", w.proxy().pid());
        let out = if workload == "head" {
            let mut job = w.job(via, "HEAD", vec![f.manifest_path(via)]);
            job.repeat = 1000;
            w.run(via, &job)
        } else {
            w.run(via, &w.job(via, "GET", vec![f.blob_path(via)]))
        };
        out.expect(workload, 200, None);
        runs += 1;
        secs += out.wall_s;
        bytes += out.bytes();
        let per = out.bytes() as f64 / MIB / out.wall_s;
        eprintln!(
            "pp-bench: {workload} run {runs}: {:.3} s, {per:.0} MiB/s, p50 {:.3} ms",
            out.wall_s,
            percentile(&out.durations(), 0.5) * 1e3
        );
    }
    eprintln!("pp-bench: {runs} runs, {:.3} s each", secs / runs as f64);
    if workload != "cold" {
        let cpu = cpu_seconds(w.proxy().pid()) - cpu_start;
        eprintln!(
            "pp-bench: pullproxy used {cpu:.2} CPU s, {:.3} CPU s per GiB",
            cpu / (bytes as f64 / (1u64 << 30) as f64)
        );
    }
}

/// User plus system CPU seconds of this process's children that have exited and been waited
/// for.
#[expect(
    unsafe_code,
    reason = "getrusage: libc exposes it only as an unsafe fn"
)]
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the one it is given, which outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// User plus system CPU seconds of a process so far (`/proc/<pid>/stat`, in clock ticks).
#[expect(
    unsafe_code,
    reason = "sysconf(_SC_CLK_TCK): libc exposes it only as an unsafe fn"
)]
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
