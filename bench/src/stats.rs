//! Summaries for the benchmarks: min/median/max over rounds, percentiles of samples, and the
//! machine's load average (a busy machine makes every number suspect).

use serde::{Deserialize, Serialize};

/// Min, median and max of one quantity over the rounds of a run, in the quantity's unit (the
/// field holding a spread names it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (at least one).
    pub fn of(values: &[f64]) -> Spread {
        assert!(!values.is_empty(), "a spread of nothing");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Spread {
            min: v[0],
            median: percentile_sorted(&v, 0.5),
            max: v[v.len() - 1],
        }
    }
}

/// Min, quartiles and max of one quantity over many samples (`pp-hookbench`'s block pairs), in
/// the quantity's unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quartiles {
    pub min: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub max: f64,
}

impl Quartiles {
    /// Its min, median and max.
    pub fn spread(&self) -> Spread {
        Spread {
            min: self.min,
            median: self.median,
            max: self.max,
        }
    }
}

/// The `p` quantile (0..=1) of `values`, nearest rank on the sorted values, the median of an
/// even count being the mean of the middle two.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    if (p - 0.5).abs() < f64::EPSILON && v.len().is_multiple_of(2) {
        return (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }
}
