//! pullproxy's benchmarks: the typed schema of every JSON document they write (what
//! `cargo xtask bench` stores under `results/` and renders into `results/bench.md`) and the
//! statistics behind the numbers. The library needs only serde; the benchmark binaries, behind
//! the `run` feature, need the test harness.
//!
//! The documents: [`BenchResults`] (`pp-bench`: `bench.json`, and `fastpath*.json` from its
//! `--only fastpath` runs), [`HookResults`] (`pp-hookbench`: `hook.json`),
//! [`ContainerdResults`] (`pp-pullbench`: `containerd.json`) and [`ClusterResults`]
//! (`pp-clusterbench`: `cluster.json`). Every struct rejects fields it does not know, so a
//! renamed field is an error when the results are read, not a silent gap in the report.

mod cluster;
mod common;
mod containerd;
mod hook;
pub mod stats;
mod suite;

pub use cluster::{ClusterImage, ClusterResults, ClusterRow, ClusterSample, Pattern, System};
pub use common::{Document, Machine, MeasuredAt, Target, size_label};
pub use containerd::{ContainerdImage, ContainerdResults, PullComparison, PullSamples};
pub use hook::{
    HookRate, HookResults, ImpliedSlowdown, KernelPhases, KernelProgramCost, LatencyPercentiles,
    ProgramCost, RedirectedConnect,
};
pub use stats::{Quartiles, Spread};
pub use suite::{
    BenchResults, Client, ConcurrencyRow, Fastpath, FastpathRow, FullCache, LatencyRow,
    MemoryReport, NotMeasured, Settings, State, ThroughputRow, Tls,
};

#[cfg(test)]
mod tests;
