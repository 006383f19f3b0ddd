//! Benchmark of the kernel hook's cost, run by `cargo xtask bench` (as root):
//!
//! - connect()+accept() rate of connections the hook does not redirect, with and without the
//!   programs attached (in short blocks, alternating, so both see the same machine state);
//! - connect() latency of a redirected connection vs a direct connect to the same listener with
//!   no programs attached.
//!
//! Everything happens inside a network namespace and cgroups of its own; the redirect is
//! installed with pullproxy's own loader. Prints JSON (ratios with min/median/max over the
//! attached/detached block pairs of all rounds).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use harness::{bpffs::Bpffs, cgroup::Cgroup, netns::NetNs};
use pullproxy::{
    accept::original_dst::{ClientAddr, ListenAddr, OriginalDstSource},
    redirect::{self, RedirectSettings, Redirector, Targets},
};
use pullproxy_bench::{
    HookRate, HookResults, ImpliedSlowdown, KernelPhases, KernelProgramCost, LatencyPercentiles,
    ProgramCost, Quartiles, RedirectedConnect, stats::percentile,
};

const PROXY_PORT: u16 = 15443;

/// Each round's connections are measured in this many blocks, each block once with and once
/// without the programs, back to back: a ratio compares two measurements a second apart, which
/// a shared machine's drifting speed (rates vary tenfold between rounds) leaves comparable.
const BLOCKS: usize = 10;

/// The kernel record source while the programs are installed, shared with the accept thread.
type SharedRecords = Arc<std::sync::Mutex<Option<Arc<dyn OriginalDstSource>>>>;
const REGISTRY: &str = "10.203.0.1:443";
const OTHER_PORT: &str = "10.203.0.1:8080";

struct Args {
    rounds: usize,
    connections: usize,
}

fn main() {
    assert!(
        harness::privileged::is_root(),
        "pp-hookbench needs root (BPF, namespaces, cgroups)"
    );
    let mut args = Args {
        rounds: 7,
        connections: 20_000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair
            .get(1)
            .and_then(|v| v.parse().ok())
            .expect("numeric value");
        match pair[0].as_str() {
            "--rounds" => args.rounds = value,
            "--connections" => args.connections = value,
            other => panic!("unknown argument {other}"),
        }
    }
    let ns = NetNs::new("pp-hookbench");
    ns.add_addr("10.203.0.1/32");
    let report = ns.run_in(|| bench(&args));
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}

/// Moves the process back to the cgroup it started in when dropped: declared after the bench's
/// cgroups, it drops before their guards, which kill whatever is still inside.
struct ReturnHome(PathBuf);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.procs"), std::process::id().to_string());
    }
}

fn bench(args: &Args) -> HookResults {
    let cgroup2 = pullproxy::redirect::cgroup::Cgroup2::discover().expect("cgroup2");
    let home = pullproxy::redirect::cgroup::own_cgroup(&cgroup2, None).expect("own cgroup");
    let home = cgroup2.dir(&home).expect("cgroup path");
    let root = Cgroup::new_root("pp-hookbench");
    let setup = root.child("setup");
    let other = root.child("other");
    let client = root.child("client");
    let _home = ReturnHome(home);
    move_self(&setup);
    let bpffs = Bpffs::mount(std::env::temp_dir().join(root.name()));
    let pins = bpffs.path().join("pullproxy");
    let settings = RedirectSettings {
        enabled: true,
        attach_cgroup: root.path().to_owned(),
        pin_dir: pins.clone(),
        ports: vec![443, 80],
        proxy_port: PROXY_PORT,
        guarded_ports: vec![PROXY_PORT],
        exclude: Vec::new(),
        targets: Targets::Paths(vec![client.path().to_owned()]),
        rescan_interval: Duration::from_secs(3600),
        kernel_log: false,
    };

    for addr in [REGISTRY, OTHER_PORT] {
        sink(TcpListener::bind(addr).expect("bind"), None);
    }
    let proxy_listener = TcpListener::bind(("127.0.0.1", PROXY_PORT)).expect("bind proxy port");
    let records: SharedRecords = Default::default();
    sink(proxy_listener, Some(records.clone()));

    let attach = |on: bool| {
        if on {
            let (redirector, source) = Redirector::install(settings.clone()).expect("install");
            *records.lock().expect("records") = Some(Arc::new(source));
            Some(redirector)
        } else {
            *records.lock().expect("records") = None;
            redirect::uninstall(&pins).expect("uninstall");
            None
        }
    };

    let mut rate_other_port = Vec::new();
    let mut rate_registry_port = Vec::new();
    let mut redirected = Vec::new();
    let mut direct = Vec::new();
    let block = (args.connections / BLOCKS).max(1);
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for b in 0..BLOCKS {
            // Alternate the order so neither mode always runs first.
            let order = if (round * BLOCKS + b).is_multiple_of(2) {
                [false, true]
            } else {
                [true, false]
            };
            let mut rates = [[0.0; 2]; 2];
            for on in order {
                let _redirector = attach(on);
                move_self(&other);
                rates[0][usize::from(on)] = rate(OTHER_PORT, block);
                rates[1][usize::from(on)] = rate(REGISTRY, block);
                move_self(&client);
                if on {
                    redirected.extend(latencies(REGISTRY, block));
                } else {
                    direct.extend(latencies(&format!("127.0.0.1:{PROXY_PORT}"), block));
                }
                move_self(&setup);
                drop(_redirector);
                let _ = redirect::uninstall(&pins);
            }
            rate_other_port.push(rates[0]);
            rate_registry_port.push(rates[1]);
        }
    }
    let _ = redirect::uninstall(&pins);

    // The programs' own cost, from the kernel's run-time statistics (exact, not disturbed by
    // scheduling): nanoseconds per run in each situation.
    let kernel = {
        let _redirector = attach(true);
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
        let [
            non_matching_port,
            registry_port_not_target,
            redirected_phase,
        ] = [
            (&other, OTHER_PORT),
            (&other, REGISTRY),
            (&client, REGISTRY),
        ]
        .map(|(cgroup, dst)| {
            move_self(cgroup);
            let before = program_stats(&pins);
            rate(dst, args.connections);
            let after = program_stats(&pins);
            move_self(&setup);
            after
                .iter()
                .zip(&before)
                .filter(|((_, _, count), (_, _, count0))| count > count0)
                .map(|((name, time, count), (_, time0, count0))| {
                    let cost = ProgramCost {
                        ns_per_run: (*time - *time0).as_nanos() as f64 / (count - count0) as f64,
                        runs_per_connection: (count - count0) as f64 / args.connections as f64,
                    };
                    ((*name).to_owned(), cost)
                })
                .collect::<BTreeMap<_, _>>()
        });
        let _ = redirect::uninstall(&pins);
        KernelPhases {
            non_matching_port,
            registry_port_not_target,
            redirected: redirected_phase,
        }
    };

    // The slowdown the kernel cost implies for a non-matching connection: in-kernel time per
    // connection over the baseline's time per connection (robust against a busy machine, unlike
    // the rate ratios, which need a quiet one).
    let baseline_ns = |v: &[[f64; 2]]| {
        let rates: Vec<f64> = v.iter().map(|r| r[0]).collect();
        1e9 / percentile(&rates, 0.5)
    };
    let implied = |phase: &BTreeMap<String, ProgramCost>, v: &[[f64; 2]]| {
        let in_kernel: f64 = phase.values().map(ProgramCost::ns_per_connection).sum();
        ImpliedSlowdown {
            in_kernel_ns_per_connection: in_kernel,
            baseline_ns_per_connection: baseline_ns(v),
            implied_slowdown: in_kernel / baseline_ns(v),
        }
    };

    let ratio = |v: &[[f64; 2]]| spread(v.iter().map(|r| r[1] / r[0]).collect());
    let base = |v: &[[f64; 2]]| spread(v.iter().map(|r| r[0]).collect());
    let redirected_med = percentile(&redirected, 0.5);
    let direct_med = percentile(&direct, 0.5);
    HookResults {
        connections_per_round: args.connections,
        rounds: args.rounds,
        blocks_per_round: BLOCKS,
        non_matching_port: HookRate {
            what: "connect()+accept() rate to 10.203.0.1:8080 from a non-target cgroup, programs \
                   attached vs none"
                .to_owned(),
            baseline_rate_per_s: base(&rate_other_port),
            ratio_with_programs: ratio(&rate_other_port),
            from_kernel_stats: implied(&kernel.non_matching_port, &rate_other_port),
        },
        registry_port_not_target: HookRate {
            what: "connect()+accept() rate to 10.203.0.1:443 from a non-target cgroup (walks the \
                   cgroup ancestry), attached vs none"
                .to_owned(),
            baseline_rate_per_s: base(&rate_registry_port),
            ratio_with_programs: ratio(&rate_registry_port),
            from_kernel_stats: implied(&kernel.registry_port_not_target, &rate_registry_port),
        },
        kernel_program_cost: KernelProgramCost {
            what: "in-kernel time per program run (BPF_ENABLE_STATS), per situation".to_owned(),
            phases: kernel,
        },
        redirected_connect: RedirectedConnect {
            what: "connect() latency to 10.203.0.1:443 redirected to 127.0.0.1:15443, vs a \
                   direct connect to 127.0.0.1:15443 with no programs"
                .to_owned(),
            direct_us: LatencyPercentiles {
                p50: direct_med,
                p99: percentile(&direct, 0.99),
            },
            redirected_us: LatencyPercentiles {
                p50: redirected_med,
                p99: percentile(&redirected, 0.99),
            },
            added_us_p50: redirected_med - direct_med,
        },
        measured_at: None,
    }
}

/// (program name, total run time, run count) of each pinned program.
fn program_stats(pins: &std::path::Path) -> Vec<(&'static str, Duration, u64)> {
    redirect::pinned_links(pins)
        .into_iter()
        .filter_map(|(name, link)| {
            let id = link?.prog_id;
            let info = aya::programs::loaded_programs()
                .flatten()
                .find(|p| p.id() == id)?;
            Some((name, info.run_time(), info.run_count()))
        })
        .collect()
}

/// Moves this whole process into `cgroup`.
fn move_self(cgroup: &Cgroup) {
    std::fs::write(
        cgroup.dir().join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("move into cgroup");
}

/// Accepts and drops connections; for the proxy port, also takes the kernel record as pullproxy
/// does on accept, so the tuple map stays as small as in production.
fn sink(listener: TcpListener, records: Option<SharedRecords>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Some(records) = &records
                && let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr())
                && let Some(source) = records.lock().expect("records").clone()
            {
                let _ = source.take(ClientAddr(peer), ListenAddr(local));
            }
        }
    });
}

/// Connects `n` times (closing with RST so no TIME_WAIT piles up); connections per second.
fn rate(dst: &str, n: usize) -> f64 {
    let dst: SocketAddr = dst.parse().expect("addr");
    let started = Instant::now();
    for _ in 0..n {
        close_with_reset(TcpStream::connect(dst).expect("connect"));
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The duration of each of `n` connect() calls, in microseconds.
fn latencies(dst: &str, n: usize) -> Vec<f64> {
    let dst: SocketAddr = dst.parse().expect("addr");
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let s = TcpStream::connect(dst).expect("connect");
            let us = t.elapsed().as_secs_f64() * 1e6;
            close_with_reset(s);
            us
        })
        .collect()
}

#[expect(unsafe_code, reason = "SO_LINGER: std has no stable setter for it")]
fn close_with_reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a live socket with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn spread(v: Vec<f64>) -> Quartiles {
    Quartiles {
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        p25: percentile(&v, 0.25),
        median: percentile(&v, 0.5),
        p75: percentile(&v, 0.75),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}
