//! `pp-hookbench`'s document (`hook.json`): the kernel hook's cost to connections.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    common::{Document, MeasuredAt},
    stats::Quartiles,
};

/// `pp-hookbench`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookResults {
    /// Connections per round and situation.
    pub connections_per_round: usize,
    pub rounds: usize,
    /// Each round's connections are measured in this many blocks, each once with and once
    /// without the programs, back to back.
    pub blocks_per_round: usize,
    /// Connections to a port no registry uses.
    pub non_matching_port: HookRate,
    /// Connections to a registry port from a cgroup that is not a target.
    pub registry_port_not_target: HookRate,
    /// The programs' own run time, from the kernel's statistics.
    pub kernel_program_cost: KernelProgramCost,
    /// The latency a redirected connect() adds.
    pub redirected_connect: RedirectedConnect,
    /// Added by `cargo xtask bench`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<MeasuredAt>,
}

impl Document for HookResults {
    const BENCHMARK: &'static str = "pp-hookbench";

    fn measured_at_mut(&mut self) -> &mut Option<MeasuredAt> {
        &mut self.measured_at
    }
}

/// The connect()+accept() rate of connections the hook does not redirect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRate {
    /// The situation, in words.
    pub what: String,
    /// The rate with no programs attached, connections per second, over the blocks.
    pub baseline_rate_per_s: Quartiles,
    /// The rate with the programs attached over the rate without, over the block pairs.
    pub ratio_with_programs: Quartiles,
    /// The slowdown the programs' in-kernel time implies.
    pub from_kernel_stats: ImpliedSlowdown,
}

/// The programs' in-kernel time per connection against a connection's time without them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpliedSlowdown {
    /// The programs' run time per connection, nanoseconds (BPF statistics).
    pub in_kernel_ns_per_connection: f64,
    /// A connection's time without programs (one over the median baseline rate), nanoseconds.
    pub baseline_ns_per_connection: f64,
    /// The first over the second.
    pub implied_slowdown: f64,
}

/// The programs' run time per situation (`BPF_ENABLE_STATS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelProgramCost {
    /// What was measured, in words.
    pub what: String,
    pub phases: KernelPhases,
}

/// Per situation: each program that ran, by name (`pp_connect4`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPhases {
    pub non_matching_port: BTreeMap<String, ProgramCost>,
    pub registry_port_not_target: BTreeMap<String, ProgramCost>,
    /// Connections redirected to the proxy.
    pub redirected: BTreeMap<String, ProgramCost>,
}

/// One program's cost in one situation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramCost {
    /// Run time per run, nanoseconds.
    pub ns_per_run: f64,
    /// Runs per connection.
    pub runs_per_connection: f64,
}

impl ProgramCost {
    /// Run time per connection, nanoseconds.
    pub fn ns_per_connection(&self) -> f64 {
        self.ns_per_run * self.runs_per_connection
    }
}

/// connect() latency of a redirected connection against a direct one to the same listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectedConnect {
    /// What was measured, in words.
    pub what: String,
    /// The direct connect(), no programs attached, microseconds.
    pub direct_us: LatencyPercentiles,
    /// The redirected connect(), microseconds.
    pub redirected_us: LatencyPercentiles,
    /// Redirected p50 minus direct p50, microseconds.
    pub added_us_p50: f64,
}

/// Median and 99th percentile of a latency, in the unit its field names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyPercentiles {
    pub p50: f64,
    pub p99: f64,
}
