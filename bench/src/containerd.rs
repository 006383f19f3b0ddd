//! `pp-pullbench`'s document (`containerd.json`): containerd pulling through pullproxy against
//! containerd with a `hosts.toml` mirror (figure 3).

use serde::{Deserialize, Serialize};

use crate::{
    common::{Document, MeasuredAt},
    stats::Spread,
};

/// `pp-pullbench`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerdResults {
    /// What was measured, in words.
    pub what: String,
    /// The image pulled.
    pub image: ContainerdImage,
    pub rounds: usize,
    /// `ctr images pull`: ctr fetches.
    pub ctr: PullComparison,
    /// CRI `PullImage`: the daemon fetches, as for the kubelet.
    pub cri: PullComparison,
    /// Added by `cargo xtask bench`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<MeasuredAt>,
}

impl Document for ContainerdResults {
    const BENCHMARK: &'static str = "pp-pullbench";

    fn measured_at_mut(&mut self) -> &mut Option<MeasuredAt> {
        &mut self.measured_at
    }
}

/// The image `pp-pullbench` pulls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerdImage {
    /// Its manifest's digest.
    pub digest: String,
    /// How many layers it has.
    pub layers: usize,
    /// Its blobs' bytes (config and layers).
    pub blob_bytes: u64,
}

/// Cold pull wall times (fetch and unpack) through pullproxy and through the mirror.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullComparison {
    /// Through pullproxy, seconds.
    pub pullproxy_s: Spread,
    /// Through the mirror, seconds.
    pub mirror_s: Spread,
    /// pullproxy's time over the mirror's, same round.
    pub ratio_pullproxy_over_mirror: Spread,
    /// That ratio in the first round.
    pub first_round_ratio: f64,
    /// Every round's times.
    pub samples: PullSamples,
}

/// Every round's pull time, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullSamples {
    pub pullproxy_s: Vec<f64>,
    pub mirror_s: Vec<f64>,
}
