//! `pp-clusterbench`'s document (`cluster.json`): a cluster of nodes pulling one image,
//! pullproxy with the hub against a registry mirror (figure 4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    common::{Document, Machine, MeasuredAt},
    stats::Spread,
};

/// `pp-clusterbench`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterResults {
    /// What was measured, in words.
    pub what: String,
    /// Nodes in the cluster.
    pub nodes: usize,
    pub rounds: usize,
    /// A `--quick` smoke run.
    pub quick: bool,
    /// How a node pulls, in words.
    pub pull: String,
    /// The staggered pattern, in words.
    pub staggered: String,
    /// The simultaneous pattern, in words.
    pub simultaneous: String,
    /// The image pulled.
    pub image: ClusterImage,
    /// The cluster's start, seconds.
    pub bring_up_s: f64,
    /// The machine, with the load during the measurements.
    pub machine: Machine,
    /// The whole run's wall time, seconds.
    pub elapsed_s: f64,
    /// A row per system and pattern.
    pub results: Vec<ClusterRow>,
    /// Added by `cargo xtask bench`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<MeasuredAt>,
}

impl Document for ClusterResults {
    const BENCHMARK: &'static str = "pp-clusterbench";

    fn measured_at_mut(&mut self) -> &mut Option<MeasuredAt> {
        &mut self.measured_at
    }
}

/// The public image the nodes pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterImage {
    /// Its manifest's digest.
    pub digest: String,
    /// Each layer's size, bytes.
    pub layers: Vec<u64>,
    /// Its blobs' bytes (config and layers).
    pub blob_bytes: u64,
}

/// What serves the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// pullproxy on every node with the shared hub and write-back.
    Pullproxy,
    /// containerd with a `hosts.toml` mirror: distribution's pull-through proxy.
    Mirror,
}

impl System {
    /// `pullproxy` or `mirror`.
    pub fn name(self) -> &'static str {
        match self {
            System::Pullproxy => "pullproxy",
            System::Mirror => "mirror",
        }
    }
}

/// When the nodes pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// One node after the other, each once the one before settled.
    Staggered,
    /// All nodes at once.
    Simultaneous,
}

impl Pattern {
    /// `staggered` or `simultaneous`.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Staggered => "staggered",
            Pattern::Simultaneous => "simultaneous",
        }
    }
}

/// One system and pattern: spreads over the rounds, and the rounds themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRow {
    pub system: System,
    pub pattern: Pattern,
    /// Blob bytes the internet served over the image's blob bytes (1: one copy).
    pub upstream_x: Spread,
    /// Blob bytes the internet served.
    pub upstream_bytes: Spread,
    /// Blob bytes the hub (pullproxy) or the mirror served the nodes over the image's.
    pub served_x: Spread,
    /// First pull's start to last pull's end, less the settle wait, seconds.
    pub total_s: Spread,
    /// First pull's start to last pull's end, seconds.
    pub wall_s: Spread,
    /// Staggered: how long node 2 waited for node 1's pull to settle, seconds.
    pub settle_wait_s: Spread,
    /// Each node's pull time, seconds, in node order.
    pub node_s: Vec<Spread>,
    /// Every measurement.
    pub samples: Vec<ClusterSample>,
}

/// One measurement: a system and a pattern, from empty state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSample {
    /// The round, from 0.
    pub round: usize,
    /// Its place among the round's measurements, from 0.
    pub position: usize,
    /// Blob bytes the internet served (sum over the image's blobs).
    pub upstream_bytes: u64,
    /// The same over the image's blob bytes.
    pub upstream_x: f64,
    /// Blob downloads the internet served.
    pub upstream_requests: usize,
    /// Blob bytes the hub (pullproxy) or the mirror served the nodes, over the image's blob
    /// bytes.
    pub served_x: f64,
    /// Wall time from the first pull's start to the last pull's end, less `settle_wait_s`,
    /// seconds.
    pub total_s: f64,
    /// Wall time from the first pull's start to the last pull's end, seconds.
    pub wall_s: f64,
    /// Staggered: how long node 2 waited for node 1's pull to settle into the shared store
    /// (pullproxy: its write-back into the hub; the mirror: its storage), seconds.
    pub settle_wait_s: f64,
    /// Each node's pull start, seconds from the first start.
    pub node_start_s: Vec<f64>,
    /// Each node's pull time, seconds.
    pub node_s: Vec<f64>,
    /// pullproxy: where each node's blob requests were answered from (`upstream`, `hub`, ...),
    /// with counts.
    pub sources: Vec<BTreeMap<String, usize>>,
    /// pullproxy, staggered: node 1's write-back outcomes (`pullproxy_writebacks_total`).
    pub writeback: String,
    /// The 1-minute load average right after the measurement.
    pub load_1m: f64,
}
