//! `pp-bench`'s document: the pull suite (`bench.json`) and, from its `--only fastpath` runs, the
//! TLS fast path figure (`fastpath.json`, `fastpath-<where>.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    common::{Document, Machine, MeasuredAt, Target},
    stats::Spread,
};

/// `pp-bench`'s output: every figure it ran (a figure it did not run is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchResults {
    /// What the run was asked to do.
    pub settings: Settings,
    /// The machine it ran on.
    pub machine: Machine,
    /// The whole run's wall time, seconds.
    pub elapsed_s: f64,
    /// Figure 1a: blob throughput, a row per blob size, system and cache state.
    pub throughput: Vec<ThroughputRow>,
    /// Figure 1b: manifest `HEAD` latency, a row per system.
    pub head_latency: Vec<LatencyRow>,
    /// Figure 2: N clients pulling one cold blob, a row per N and system.
    pub concurrency: Vec<ConcurrencyRow>,
    /// pullproxy's memory (and the peers' peaks under the same concurrent load).
    pub memory: MemoryReport,
    /// The TLS fast path figure: only from a run with `--only fastpath` (runs from before the
    /// figure existed have no such field).
    #[serde(default)]
    pub fastpath: Option<Fastpath>,
    /// Figure 3 is `pp-pullbench`'s ([`crate::ContainerdResults`]): this says so.
    pub containerd: NotMeasured,
    /// The project's targets this run measured.
    pub targets: Vec<Target>,
    /// Added by `cargo xtask bench`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<MeasuredAt>,
}

impl Document for BenchResults {
    const BENCHMARK: &'static str = "pp-bench";

    fn measured_at_mut(&mut self) -> &mut Option<MeasuredAt> {
        &mut self.measured_at
    }
}

/// A figure another benchmark measures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotMeasured {
    /// Always false: the figure is not in this document.
    pub measured: bool,
    /// Which benchmark measures it instead.
    pub why: String,
}

/// What to run; `--quick` shrinks everything to a smoke run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Rounds of every figure but the concurrency one.
    pub rounds: usize,
    /// Rounds of the concurrency figure (its largest N is slow).
    pub concurrency_rounds: usize,
    /// The blob sizes, bytes (layer sizes: slightly above whole MiB).
    pub sizes: Vec<u64>,
    /// The numbers of concurrent clients of the concurrency figure.
    pub clients: Vec<usize>,
    /// Timed manifest `HEAD`s per system and round.
    pub head_requests: usize,
    /// Small blobs pushed besides the measured ones (an index that is not empty).
    pub small_blobs: usize,
    /// A `--quick` smoke run.
    pub quick: bool,
    /// Only these figures (`latency`, `throughput`, `concurrency`, `memory`, `fastpath`); all
    /// but `fastpath` if `None`.
    pub only: Option<Vec<String>>,
}

impl Settings {
    /// Whether `figure` is part of this run. The fast path runs only when asked for.
    pub fn runs(&self, figure: &str) -> bool {
        match &self.only {
            None => figure != "fastpath",
            Some(only) => only.iter().any(|o| o == figure),
        }
    }

    /// A run of the fast path figure and nothing else.
    pub fn only_fastpath(&self) -> bool {
        self.only.as_deref() == Some(&["fastpath".to_owned()][..])
    }
}

/// Peak and current memory per measured moment, bytes (`VmHWM` / `VmRSS`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryReport {
    /// pullproxy just started, nothing pulled yet.
    pub idle_start_rss: u64,
    /// Peak during a cold pull, by blob size label (`16 MiB`), one per round.
    pub cold_peak: BTreeMap<String, Vec<u64>>,
    /// Peak during warm (cache hit) pulls, by blob size label, one per round.
    pub warm_peak: BTreeMap<String, Vec<u64>>,
    /// Peak during N concurrent cold pulls, by system, for the largest N, one per round.
    pub concurrent_peak: BTreeMap<String, Vec<u64>>,
    /// That N.
    pub concurrent_clients: usize,
    /// With the cache filled past its limit (evictions happened).
    pub full_cache: Option<FullCache>,
    /// After all the figures, pullproxy restarted, idle (0: not measured).
    pub idle_end_rss: u64,
}

/// pullproxy with its cache filled past `cache.max_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullCache {
    /// The `cache.max_size` it ran with (`320MiB`).
    pub max_size: String,
    /// Blobs on disk after the fill.
    pub files: usize,
    /// Their bytes.
    pub bytes_on_disk: u64,
    /// Peak memory while filling, bytes.
    pub peak: u64,
    /// Resident memory after the fill, idle, bytes.
    pub rss_after: u64,
    /// Restarted over that cache (index rebuilt, blobs re-verified), idle, bytes.
    pub rss_restarted: u64,
}

/// Whether the caching system started empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Restarted with an empty cache just before.
    Cold,
    /// The blob already cached (for the hub and the upstream: any repeated pull).
    Warm,
}

impl State {
    /// `cold` or `warm`.
    pub fn name(self) -> &'static str {
        match self {
            State::Cold => "cold",
            State::Warm => "warm",
        }
    }
}

/// Figure 1a: one blob size, system and cache state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThroughputRow {
    /// The blob's size, bytes.
    pub size: u64,
    /// The system measured (`pullproxy cache`, `nginx proxy_cache`, ...).
    pub system: String,
    pub state: State,
    /// MiB/s per round.
    pub mib_s: Vec<f64>,
    /// Their spread, MiB/s.
    pub mib_s_spread: Spread,
    /// Throughput over the hub's (direct, plain HTTP) in the same round.
    pub vs_hub: Spread,
    /// Throughput over the upstream's (direct, TLS) in the same round.
    pub vs_upstream: Spread,
}

/// Figure 1b: manifest `HEAD` latency of one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyRow {
    /// The system measured.
    pub system: String,
    /// What the request meant for it (`tag on the hub`, ...).
    pub what: String,
    /// Median latency per round, milliseconds.
    pub p50_ms: Spread,
    /// 99th percentile per round, milliseconds.
    pub p99_ms: Spread,
    /// p50 over the hub's (direct) in the same round.
    pub p50_vs_hub: Spread,
    /// p99 over the hub's in the same round.
    pub p99_vs_hub: Spread,
    /// p99 minus the hub's p99 in the same round, milliseconds.
    pub added_p99_ms: Spread,
}

/// Figure 2: N clients pulling the same cold blob at once, one system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyRow {
    /// N.
    pub clients: usize,
    /// The system measured.
    pub system: String,
    /// Blob bytes the upstream served over the blob's size (1: one copy).
    pub upstream_x: Spread,
    /// From the common start to the last byte of the last client, seconds.
    pub wall_s: Spread,
    /// Wall time over the hub's (direct) serving the same N clients, same round.
    pub wall_vs_hub: Spread,
}

/// The TLS fast path figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fastpath {
    /// What pullproxy said about kernel TLS at start (its log line), or that it said nothing.
    pub kernel_tls: String,
    /// A row per blob size, system, place of TLS and client.
    pub rows: Vec<FastpathRow>,
}

/// Who asks, in the fast path figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// `harness::loadgen`: rustls, one thread per keep-alive connection.
    Loadgen,
    /// curl (OpenSSL), `--http1.1`, every request on one connection.
    Curl,
}

impl Client {
    /// `loadgen` or `curl`.
    pub fn name(self) -> &'static str {
        match self {
            Client::Loadgen => "loadgen",
            Client::Curl => "curl",
        }
    }
}

/// Where pullproxy's TLS ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// The hub: no TLS.
    None,
    /// rustls, in pullproxy.
    User,
    /// The kernel's `tls` module (keys from rustls).
    Kernel,
}

impl Tls {
    /// `none`, `user` or `kernel`.
    pub fn name(self) -> &'static str {
        match self {
            Tls::None => "none",
            Tls::User => "user",
            Tls::Kernel => "kernel",
        }
    }
}

/// The fast path figure: one blob size, system, place of TLS and client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastpathRow {
    /// The blob's size, bytes.
    pub size: u64,
    /// The system measured (`pullproxy cache`, `pullproxy hub hit`, the hub).
    pub system: String,
    pub tls: Tls,
    pub client: Client,
    /// MiB/s per round.
    pub mib_s: Vec<f64>,
    /// Their spread, MiB/s.
    pub mib_s_spread: Spread,
    /// Throughput over the hub's with the same client, same round.
    pub vs_hub: Spread,
    /// pullproxy's user plus system CPU seconds per GiB it served (warm-up included); none for
    /// the hub.
    pub cpu_s_per_gib: Option<Spread>,
    /// The client's user plus system CPU seconds per GiB it received (warm-up included), the
    /// hub's rows too: what the client itself spends on TLS. None in runs from before it was
    /// measured.
    #[serde(default)]
    pub client_cpu_s_per_gib: Option<Spread>,
    /// Kernel TLS over user-space TLS (same system and client, same round): throughput. Only on
    /// kernel TLS rows.
    pub vs_user: Option<Spread>,
    /// The same for CPU seconds per GiB.
    pub cpu_vs_user: Option<Spread>,
}
