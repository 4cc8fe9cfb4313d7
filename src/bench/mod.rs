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
pub mod firecracker;
pub mod handoff;
pub mod invoke;
pub mod layers;
pub mod net;
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

/// Percentiles of a sample (in the unit of its report), and the sample itself, sorted.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    /// Every value, sorted (empty where only the percentiles are known, e.g. measured in a guest).
    pub samples: Vec<f64>,
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
            samples: v,
        })
    }

    /// As JSON: the percentiles and the sample.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n, "p50": self.p50, "p90": self.p90, "p99": self.p99, "min": self.min, "max": self.max,
            "samples": self.samples,
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

impl TableReport {
    /// The unit of the figures, from the first column's heading (`latency (us)` -> `us`); empty
    /// where each measure names its own.
    pub fn unit(&self) -> &str {
        match (self.heading.find('('), self.heading.rfind(')')) {
            (Some(a), Some(b)) if a < b => &self.heading[a + 1..b],
            _ => "",
        }
    }

    /// The report as JSON: title, unit, one object per measure (percentiles and every sample) and
    /// the notes (ratios against the baselines measured in the same run among them).
    pub fn to_json(&self) -> serde_json::Value {
        let measures: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|(name, s)| {
                let mut m = s.as_ref().map(Summary::to_json).unwrap_or_else(|| serde_json::json!({"n": 0}));
                m["measure"] = serde_json::Value::from(name.as_str());
                m
            })
            .collect();
        serde_json::json!({
            "benchmark": self.title,
            "unit": self.unit(),
            "measures": measures,
            "notes": self.notes,
        })
    }

    /// The latency distributions as an SVG plot: a row per measure on one log-scale axis, every
    /// sample a dot, p50 a bar, p90 and p99 ticks, so that a shift or a longer tail shows at a
    /// glance.
    pub fn svg(&self) -> String {
        use crate::svg::{decades, Doc};
        let rows: Vec<(&str, &Summary)> = self
            .rows
            .iter()
            .filter_map(|(n, s)| Some((n.as_str(), s.as_ref()?)))
            .filter(|(_, s)| s.max > 0.0)
            .collect();
        let (left, right, top, bottom, row_h) = (430.0, 40.0, 50.0, 60.0, 26.0);
        let (pw, ph) = (640.0, row_h * rows.len().max(1) as f64);
        let (w, h) = (left + pw + right, top + ph + bottom);
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let lo = rows.iter().flat_map(|(_, s)| [s.min, s.p50]).filter(|&v| positive(v)).fold(f64::INFINITY, f64::min);
        let hi = rows.iter().map(|(_, s)| s.max).filter(|&v| positive(v)).fold(0.0, f64::max);
        let (x0, x1) = if lo.is_finite() && hi > 0.0 { decades(lo, hi) } else { (0.0, 1.0) };
        let x = |v: f64| left + (v.max(10f64.powf(x0)).log10() - x0) / (x1 - x0) * pw;
        let mut doc = Doc::new(w, h, &self.title, left + pw / 2.0);
        let unit = self.unit().to_string();
        // Every decade labelled; 2 and 5 too where there is room.
        let crowded = x1 - x0 > 3.0;
        doc.log_x_grid((x0, x1), x, (top, ph), |m, d, v| match (crowded && m != 1.0, v >= 1e4) {
            (true, _) => String::new(),
            (false, true) => format!("{m}e{d}"),
            (false, false) => format!("{v}"),
        });
        doc.raw(format_args!(r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#));
        let axis = if unit.is_empty() { "value (unit in each measure's name)".to_string() } else { unit };
        doc.text(left + pw / 2.0, h - 16.0, "middle", "", &axis);
        for (i, (name, s)) in rows.iter().enumerate() {
            let mid = top + row_h * (i as f64 + 0.5);
            if i % 2 == 1 {
                let y = top + row_h * i as f64;
                doc.raw(format_args!(r##"<rect x="{left}" y="{y}" width="{pw}" height="{row_h}" fill="#f4f4f4"/>"##));
            }
            doc.text(left - 8.0, mid + 4.0, "end", r#" font-size="11""#, name);
            // Dots jittered across the row by a fixed pattern (the plot is the same run to run).
            let step = (s.samples.len() / 2000).max(1);
            for (k, v) in s.samples.iter().enumerate().step_by(step) {
                let jitter = ((k * 7919) % 17) as f64 / 16.0 - 0.5;
                let y = mid + jitter * row_h * 0.6;
                doc.raw(format_args!(
                    r##"<circle cx="{:.1}" cy="{y:.1}" r="1.6" fill="#1f77b4" fill-opacity="0.35"/>"##,
                    x(*v)
                ));
            }
            let (y0, y1) = (mid - row_h * 0.4, mid + row_h * 0.4);
            for (v, colour, width) in [(s.p50, "#d62728", 3.0), (s.p90, "#333", 1.5), (s.p99, "#333", 1.5)] {
                let px = x(v);
                doc.raw(format_args!(
                    r#"<line x1="{px:.1}" y1="{y0:.1}" x2="{px:.1}" y2="{y1:.1}" stroke="{colour}" stroke-width="{width}"/>"#
                ));
            }
        }
        doc.text(left + pw, top - 8.0, "end", r#" font-size="11""#, "dots: samples; red: p50; black: p90, p99");
        doc.finish()
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

    #[test]
    fn reports_as_json_and_svg() {
        let r = TableReport {
            title: "ember bench x".into(),
            heading: "latency (us)",
            width: 10,
            rows: vec![("a <b>".into(), Summary::of(&[3.0, 1.0, 2.0])), ("absent".into(), None)],
            notes: vec!["a note".into()],
        };
        let j = r.to_json();
        assert_eq!(j["unit"], "us");
        assert_eq!(j["measures"][0]["measure"], "a <b>");
        assert_eq!(j["measures"][0]["samples"], serde_json::json!([1.0, 2.0, 3.0]));
        assert_eq!(j["measures"][1]["n"], 0);
        assert_eq!(j["notes"][0], "a note");
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        assert!(svg.contains("a &lt;b&gt;") && !svg.contains("absent"), "{svg}");
    }
}
