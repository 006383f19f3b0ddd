//! Figure 4, the TLS fast path: warm hub hits (served from the node's copy of what the hub gave,
//! since the node tier) and cache hits of one blob through pullproxy against the hub itself (plain
//! HTTP), with two clients (the suite's load generator, and curl with OpenSSL, HTTP/1.1), and
//! pullproxy's TLS in user space and, where the kernel has `tls`, in the kernel (pullproxy
//! restarted between the two, its cache kept). Besides throughput, pullproxy's CPU seconds per GiB
//! served. Every ratio is against the hub with the same client in the same round.

use std::{collections::BTreeMap, process::Command, time::Duration};

use harness::pullproxy::sample;
use pullproxy::accept::ktls;
use pullproxy_bench::{Client, Fastpath, FastpathRow, Settings, Spread, Tls, size_label};

use crate::{
    figures::{children_cpu_seconds, cpu_seconds, rotated, warm_repeat},
    world::{Fixture, HUB_PASSWORD, HUB_USER, Via, World},
};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Measures the figure for each fixture.
pub fn fastpath(w: &mut World, s: &Settings, fixtures: &[Fixture]) -> Fastpath {
    // The cache holds each blob before any round (pullproxy restarts keep its cache), and every
    // measured path serves the right bytes (hashed by the client).
    for f in fixtures {
        for via in [Via::Pullproxy, Via::Pullproxy, Via::PullproxyHub, Via::Hub] {
            let mut job = w.job(via, "GET", vec![f.blob_path(via)]);
            job.verify = true;
            let out = w.run(via, &job);
            out.expect(
                &format!("verified GET via {}", via.label()),
                200,
                Some(f.layer().size),
            );
            if via == Via::Pullproxy {
                w.settle_cached(Via::Pullproxy, &f.layer().digest);
            }
        }
    }
    let (kernel_tls, modes) = if w.proxy().find(ktls::LOG_IN_USE).is_some() {
        (ktls::LOG_IN_USE.to_owned(), vec![Tls::User, Tls::Kernel])
    } else if let Some(line) = w.proxy().find(ktls::LOG_UNAVAILABLE) {
        (
            format!(
                "{}: {}",
                ktls::LOG_UNAVAILABLE,
                line["reason"].as_str().unwrap_or("")
            ),
            vec![Tls::User],
        )
    } else {
        // A pullproxy from before kernel TLS: it knows no `listen.kernel_tls` either.
        ("no kernel TLS in this pullproxy".into(), vec![Tls::User])
    };
    let kernel_capable = modes.contains(&Tls::Kernel);
    eprintln!("pp-bench: fast path: {kernel_tls}");
    // (fixture, system, cold, tls, client) -> per round MiB/s, pullproxy's and the client's CPU
    // s/GiB
    let mut mib_s: BTreeMap<(usize, Via, bool, Tls, Client), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(usize, Via, bool, Tls, Client), Vec<f64>> = BTreeMap::new();
    let mut client_cpu: BTreeMap<(usize, Via, bool, Tls, Client), Vec<f64>> = BTreeMap::new();
    let clients = [Client::Loadgen, Client::Curl];
    for round in 0..s.rounds {
        for (i, f) in fixtures.iter().enumerate() {
            eprintln!(
                "pp-bench: fast path {} round {}/{}",
                size_label(f.layer().size),
                round + 1,
                s.rounds
            );
            for client in rotated(&clients, round) {
                let hub = measure(w, Via::Hub, client, f);
                let key = (i, Via::Hub, false, Tls::None, client);
                mib_s.entry(key).or_default().push(hub.rate);
                client_cpu.entry(key).or_default().push(hub.client_cpu);
            }
            for tls in rotated(&modes, round + i) {
                if kernel_capable {
                    restart(w, tls, fixtures);
                }
                let before = offload(w);
                for client in rotated(&clients, round + 1) {
                    for via in rotated(&[Via::PullproxyHub, Via::Pullproxy], round) {
                        let m = measure(w, via, client, f);
                        let key = (i, via, false, tls, client);
                        mib_s.entry(key).or_default().push(m.rate);
                        cpu.entry(key).or_default().push(m.proxy_cpu());
                        client_cpu.entry(key).or_default().push(m.client_cpu);
                    }
                }
                check_path(w, tls, kernel_capable, before, f);
                for client in rotated(&clients, round) {
                    let m = cold_hub_hit(w, tls, client, f);
                    let key = (i, Via::PullproxyHub, true, tls, client);
                    mib_s.entry(key).or_default().push(m.rate);
                    cpu.entry(key).or_default().push(m.proxy_cpu());
                    client_cpu.entry(key).or_default().push(m.client_cpu);
                }
            }
        }
    }
    if kernel_capable {
        // Leave pullproxy as it starts by default.
        restart(w, Tls::Kernel, fixtures);
    }
    let rows = mib_s
        .iter()
        .map(|(&(i, via, cold, tls, client), values)| {
            let hub = &mib_s[&(i, Via::Hub, false, Tls::None, client)];
            let ratio = |a: &[f64], b: &[f64]| {
                Spread::of(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
            };
            let user = (tls == Tls::Kernel).then_some((i, via, cold, Tls::User, client));
            let this_cpu = cpu.get(&(i, via, cold, tls, client));
            FastpathRow {
                size: fixtures[i].layer().size,
                system: match (via, cold) {
                    (Via::Pullproxy, _) => "pullproxy cache hit".into(),
                    (_, true) => COLD_HUB_HIT.into(),
                    (other, false) => other.label().into(),
                },
                tls,
                client,
                mib_s_spread: Spread::of(values),
                vs_hub: ratio(values, hub),
                cpu_s_per_gib: this_cpu.map(|c| Spread::of(c)),
                client_cpu_s_per_gib: client_cpu
                    .get(&(i, via, cold, tls, client))
                    .map(|c| Spread::of(c)),
                vs_user: user.map(|k| ratio(values, &mib_s[&k])),
                cpu_vs_user: user.zip(this_cpu).map(|(k, c)| ratio(c, &cpu[&k])),
                mib_s: values.clone(),
            }
        })
        .collect();
    Fastpath { kernel_tls, rows }
}

/// Stops pullproxy and starts it with its TLS where `tls` says, keeping its cache; then gets
/// each blob once, untimed: a restarted pullproxy hashes the blobs it finds on disk before it
/// serves them, and that must not count as serving.
fn restart(w: &mut World, tls: Tls, fixtures: &[Fixture]) {
    w.stop_proxy();
    start(w, tls);
    for f in fixtures {
        let out = w.run(
            Via::Pullproxy,
            &w.job(Via::Pullproxy, "GET", vec![f.blob_path(Via::Pullproxy)]),
        );
        out.expect("a blob after a restart", 200, Some(f.layer().size));
    }
}

/// How the report names a hub hit the node has no copy of.
const COLD_HUB_HIT: &str = "pullproxy hub hit, cold (streamed from the hub)";

/// One GET of `f`'s blob through pullproxy from the hub while the node has no copy of it:
/// pullproxy restarted (TLS where `tls` says) after its copy was deleted, the hub's copy read
/// into the page cache, so the body streams from the hub over plain HTTP while it is stored.
/// Returns once the blob is stored again, so the warm measurements that follow find it.
fn cold_hub_hit(w: &mut World, tls: Tls, client: Client, f: &Fixture) -> Gets {
    let digest = &f.layer().digest;
    w.stop_proxy();
    let copy = w.node.cache_dir().join("blobs/sha256").join(digest.hex());
    match std::fs::remove_file(&copy) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            panic!("deleting the node's copy {}: {e}", copy.display())
        }
        _ => {}
    }
    start(w, tls);
    w.page_in_hub(digest);
    let gets = timed_gets(w, Via::PullproxyHub, client, f, 0, 1);
    w.settle_cached(Via::Pullproxy, digest);
    gets
}

/// Repeats [`cold_hub_hit`] of a 256 MiB blob with user-space TLS and the load generator for
/// `seconds`, for a profiler to watch (`pp-bench --profile hub-cold`).
pub fn profile_cold_hub_hits(seconds: f64) {
    let mut w = World::new();
    let f = w.fixture("profile", 256 << 20, 0x9f0f);
    let started = std::time::Instant::now();
    let (mut runs, mut rate, mut cpu) = (0, 0.0, 0.0);
    while started.elapsed().as_secs_f64() < seconds {
        let gets = cold_hub_hit(&mut w, Tls::User, Client::Loadgen, &f);
        let (r, c) = (gets.rate, gets.proxy_cpu());
        eprintln!("pp-bench: pullproxy pid {}", w.proxy().pid());
        eprintln!(
            "pp-bench: hub-cold run {}: {r:.0} MiB/s, {c:.3} CPU s per GiB",
            runs + 1
        );
        (runs, rate, cpu) = (runs + 1, rate + r, cpu + c);
    }
    eprintln!(
        "pp-bench: {runs} runs, {:.0} MiB/s, {:.3} CPU s per GiB (means)",
        rate / runs as f64,
        cpu / runs as f64
    );
}

/// Starts pullproxy with its TLS where `tls` says.
fn start(w: &mut World, tls: Tls) {
    let on = (tls == Tls::Kernel).to_string();
    w.start_proxy(&[("PULLPROXY_LISTEN__KERNEL_TLS", on)]);
}

/// Warm GETs of `f`'s blob through `via` with `client` (one untimed first).
fn measure(w: &World, via: Via, client: Client, f: &Fixture) -> Gets {
    timed_gets(w, via, client, f, 1, warm_repeat(f.layer().size))
}

/// What one client's GETs measured.
struct Gets {
    /// MiB/s over the timed GETs.
    rate: f64,
    /// pullproxy's CPU seconds per GiB over all the GETs, when pullproxy served them.
    proxy_cpu: Option<f64>,
    /// The client's CPU seconds per GiB over all the GETs.
    client_cpu: f64,
}

impl Gets {
    fn proxy_cpu(&self) -> f64 {
        self.proxy_cpu.expect("pullproxy served the GETs")
    }
}

/// `repeat` timed GETs of `f`'s blob through `via` with `client`, after `untimed` ones, on one
/// connection.
fn timed_gets(
    w: &World,
    via: Via,
    client: Client,
    f: &Fixture,
    untimed: usize,
    repeat: usize,
) -> Gets {
    let size = f.layer().size;
    let path = f.blob_path(via);
    let pid = (via != Via::Hub).then(|| w.proxy().pid());
    let cpu_before = pid.map(cpu_seconds);
    // The client runs as a child of this process, alone: the CPU its exit adds to this
    // process's children's is its own.
    let client_before = children_cpu_seconds();
    let rate = match client {
        Client::Loadgen => {
            let mut job = w.job(via, "GET", vec![path]);
            job.repeat = repeat;
            job.warmup = untimed;
            let out = w.run(via, &job);
            out.expect(&format!("GET via {}", via.label()), 200, Some(size));
            out.bytes() as f64 / MIB / out.wall_s
        }
        Client::Curl => curl(w, via, &path, untimed, repeat, size),
    };
    let gib = (untimed + repeat) as f64 * size as f64 / GIB;
    Gets {
        rate,
        proxy_cpu: pid
            .zip(cpu_before)
            .map(|(pid, before)| (cpu_seconds(pid) - before) / gib),
        client_cpu: (children_cpu_seconds() - client_before) / gib,
    }
}

/// `repeat` timed GETs (after `untimed` ones) of `path` through `via` by one curl on one
/// connection; MiB/s over the timed ones.
fn curl(w: &World, via: Via, path: &str, untimed: usize, repeat: usize, size: u64) -> f64 {
    let url = format!("{}{path}", via.base());
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--fail",
        "--http1.1",
        "--write-out",
        "%{http_code} %{size_download} %{time_total}\\n",
    ]);
    if via == Via::Hub {
        cmd.args(["--user", &format!("{HUB_USER}:{HUB_PASSWORD}")]);
    }
    for _ in 0..untimed + repeat {
        cmd.args(["--output", "/dev/null", &url]);
    }
    let done = harness::process::run_at(cmd, &w.placement(via), Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("curl via {}: {e}", via.label()));
    assert!(done.success(), "curl via {}: {}", via.label(), done.stderr);
    let lines: Vec<(u16, u64, f64)> = done
        .stdout_text()
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let mut next = || f.next().unwrap_or_else(|| panic!("curl wrote {l:?}"));
            (
                next().parse().expect("status"),
                next().parse().expect("bytes"),
                next().parse().expect("seconds"),
            )
        })
        .collect();
    assert_eq!(lines.len(), untimed + repeat, "one line per transfer");
    for (status, bytes, _) in &lines {
        assert_eq!((*status, *bytes), (200, size), "curl via {}", via.label());
    }
    let timed = &lines[untimed..];
    let secs: f64 = timed.iter().map(|l| l.2).sum();
    (repeat as u64 * size) as f64 / MIB / secs
}

/// pullproxy's kernel TLS counters: (connections offloaded, bytes sent with sendfile).
fn offload(w: &World) -> (f64, f64) {
    let text = w.node.scrape();
    (
        sample(
            &text,
            "pullproxy_tls_kernel_offload_total{outcome=\"kernel\"}",
        ),
        sample(&text, "pullproxy_tls_kernel_sendfile_bytes_total"),
    )
}

/// The measurements of one mode took the path they were meant to: in the kernel, every body
/// went by sendfile (a warm hub hit is served from the node's copy on disk, like a cache hit);
/// in user space, none did.
fn check_path(w: &World, tls: Tls, kernel_capable: bool, before: (f64, f64), f: &Fixture) {
    if !kernel_capable {
        return;
    }
    let after = offload(w);
    let (connections, sendfile) = (after.0 - before.0, after.1 - before.1);
    match tls {
        Tls::Kernel => {
            // Two clients, each with (repeat + warm-up) hub hits and as many cache hits.
            let bodies = 2.0 * 2.0 * (warm_repeat(f.layer().size) + 1) as f64;
            assert!(connections >= 2.0, "kernel TLS connections: {connections}");
            assert_eq!(
                sendfile,
                bodies * f.layer().size as f64,
                "every cache hit body went by sendfile"
            );
        }
        _ => assert_eq!(
            (connections, sendfile),
            (0.0, 0.0),
            "user-space TLS took the kernel path"
        ),
    }
}
