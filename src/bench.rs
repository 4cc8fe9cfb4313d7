//! Measurements behind `ember bench`. Figures are medians and tails over many runs, never asserted.

use std::fmt;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::devices::boot_timer::BootEvent;
use crate::vmm::{Vm, VmError};

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

/// The result of `ember bench boot`.
pub struct BootReport {
    pub runs: usize,
    pub failures: Vec<String>,
    pub rows: Vec<(&'static str, Option<Summary>)>,
}

impl fmt::Display for BootReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ember bench boot: {} runs, {} failed", self.runs, self.failures.len())?;
        writeln!(
            f,
            "{:<44} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "milestone (ms)", "n", "p50", "p90", "p99", "min", "max"
        )?;
        for (name, s) in &self.rows {
            match s {
                Some(s) => writeln!(
                    f,
                    "{name:<44} {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                    s.n, s.p50, s.p90, s.p99, s.min, s.max
                )?,
                None => writeln!(f, "{name:<44} {:>5}", 0)?,
            }
        }
        for e in &self.failures {
            writeln!(f, "failure: {e}")?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Boots `cfg` `runs` times (console off) and summarises where the time went.
pub fn boot(cfg: &VmConfig, runs: usize, timeout: Duration) -> Result<BootReport, VmError> {
    type Pick = fn(&BootEvent) -> f64;
    let mut first_insn = Vec::new();
    let mut setup = Vec::new();
    let mut kernel_start = Vec::new();
    let mut run_init = Vec::new();
    let mut timer = Vec::new();
    let mut timer_cpu = Vec::new();
    let mut failures = Vec::new();
    let since_vm: Pick = |e| ms(e.since_vm);
    for i in 0..runs {
        let start = Instant::now();
        let vm = Vm::boot(cfg, Box::new(std::io::sink()), start)?;
        let out = vm.run(Some(timeout))?;
        let t = out.timeline;
        if !out.exit.is_clean() {
            failures.push(format!("run {i}: {}", out.exit));
        }
        if let Some(e) = t.first_instruction {
            first_insn.push(ms(e.since_process));
            setup.push(since_vm(&e));
        }
        kernel_start.extend(t.kernel_start.as_ref().map(since_vm));
        run_init.extend(t.run_init.as_ref().map(since_vm));
        if let Some(e) = t.boot_timer {
            timer.push(since_vm(&e));
            timer_cpu.push(ms(e.cpu));
        }
    }
    Ok(BootReport {
        runs,
        failures,
        rows: vec![
            ("boot start -> first guest instruction", Summary::of(&first_insn)),
            ("VM start -> first guest instruction", Summary::of(&setup)),
            ("VM start -> kernel start (port 0x80)", Summary::of(&kernel_start)),
            ("VM start -> kernel runs init (port 0x80)", Summary::of(&run_init)),
            ("VM start -> boot timer (guest user space)", Summary::of(&timer)),
            ("VMM CPU time at boot timer", Summary::of(&timer_cpu)),
        ],
    })
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
