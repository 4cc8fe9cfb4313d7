//! Measurements behind `ember bench`, one file per benchmark and one report type: figures are
//! medians and tails over many runs, never asserted.
//!
//! - [`boot`]: boot milestones of a fresh guest.
//! - [`restore`]: snapshot, restore and clone density against a fresh boot measured in the same run.
//! - [`invoke`]: the round trip of a no-op invocation per channel.
//! - [`handoff`]: acquire and invoke through `ember serve`'s API.
//! - [`layers`]: functions whose files are layers: image builds, restore -> first answer,
//!   virtio-blk reads, memory of clones sharing a layer.

pub mod boot;
pub mod handoff;
pub mod invoke;
pub mod layers;
pub mod python;
pub mod restore;

use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::snapshot::SnapshotError;
use crate::template::TemplateError;
use crate::vmm::VmError;

/// Why a benchmark could not be run.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A measurement that could not be made (the guest did not answer, the daemon refused).
    #[error("{0}")]
    Failed(String),
}

/// Percentiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted `v` (0 < p <= 100).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// Writes a table of summaries, one row per measure, the first column `width` wide.
fn write_table<'a>(
    f: &mut fmt::Formatter<'_>,
    heading: &str,
    width: usize,
    rows: impl Iterator<Item = (&'a str, &'a Option<Summary>)>,
) -> fmt::Result {
    writeln!(f, "{heading:<width$} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10}", "n", "p50", "p90", "p99", "min", "max")?;
    for (name, s) in rows {
        match s {
            Some(s) => writeln!(
                f,
                "{name:<width$} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                s.n, s.p50, s.p90, s.p99, s.min, s.max
            )?,
            None => writeln!(f, "{name:<width$} {:>5}", 0)?,
        }
    }
    Ok(())
}

/// The result of every `ember bench`: a titled table and notes.
pub struct TableReport {
    pub title: String,
    /// The first column's heading (with the unit) and width.
    pub heading: &'static str,
    pub width: usize,
    pub rows: Vec<(String, Option<Summary>)>,
    pub notes: Vec<String>,
}

impl fmt::Display for TableReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.title)?;
        write_table(f, self.heading, self.width, self.rows.iter().map(|(n, s)| (n.as_str(), s)))?;
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        Ok(())
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.min, s.max), (50.0, 90.0, 99.0, 1.0, 100.0));
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.p50, s.p99), (2.0, 3.0));
        assert!(Summary::of(&[]).is_none());
    }
}
