//! What every result document shares: when it was measured, on what machine, and the targets.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::stats::{Spread, loadavg};

/// A document one benchmark prints and `cargo xtask bench` stores, stamped with
/// [`MeasuredAt`].
pub trait Document: Serialize + DeserializeOwned {
    /// The binary that prints it.
    const BENCHMARK: &'static str;

    /// Where the stamp goes.
    fn measured_at_mut(&mut self) -> &mut Option<MeasuredAt>;
}

/// When and from what a result was measured: `cargo xtask bench` adds it to a benchmark's
/// output, so a report rendered later still says where each figure came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasuredAt {
    /// `git describe --always --dirty` of the working tree the benchmark was built from.
    pub commit: String,
    /// UTC date and time of the stamp, `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
}

/// The machine a run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// CPUs the benchmark could use (`available_parallelism`).
    pub cpus: usize,
    /// The kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: String,
    /// The 1-, 5- and 15-minute load averages when the run started.
    pub load_before: Vec<f64>,
    /// The same when it ended.
    pub load_after: Vec<f64>,
    /// `pp-clusterbench` only: the 1-minute load average right after each measurement, over
    /// all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_1m_during: Option<Spread>,
}

impl Machine {
    /// This machine, at the end of a run that started with the load averages `load_before`.
    pub fn now(load_before: Vec<f64>) -> Machine {
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            load_before,
            load_after: loadavg(),
            load_1m_during: None,
        }
    }
}

/// One of the project's targets, with what was measured against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// What is measured, with its unit where it has one (`... (MiB)`).
    pub name: String,
    /// The goal, as text (`>= 0.8x`, `< 2 ms`).
    pub goal: String,
    /// The measured spread over rounds, in the unit of `name`.
    pub value: Spread,
    /// Whether the measurement meets the goal (most goals judge the median).
    pub met: bool,
}

/// A blob size as the report and the memory figure's keys name it: `16 MiB`, `1 GiB` (whole
/// units, rounded down).
pub fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
