//! The hybrid-histogram keep-alive policy of "Serverless in the Wild" (Shahrad et al., USENIX
//! ATC'20), the second baseline of `ember simulate`, as implemented here:
//!
//! - per function, a histogram of idle times (from the end of the function's last invocation to
//!   the next arrival; 0 while one is still running) over 4 hours in 1-minute bins, and a count of
//!   the idle times beyond it (out of bounds);
//! - when a clone finishes an invocation, the function's windows are taken from the histogram:
//!   pre-warm = the 5th percentile's bin x 0.9 (10% margin, down), keep-alive = (the 99th
//!   percentile's bin + 1) x 1.1 (up). With a pre-warm window the clone is unloaded at once and one
//!   is restored pre-warm later, kept for the keep-alive window; without one the clone stays for
//!   the keep-alive window;
//! - the histogram is not representative while the coefficient of variation of its bin counts is
//!   below 2 (no idle time yet, or idle times spread evenly): then the standard keep-alive, no
//!   pre-warm and a keep-alive of the histogram's range (4 hours);
//! - when half or more of the idle times are out of bounds the paper forecasts the next idle time
//!   with ARIMA; here instead (simpler, and what departs from the paper): the geometric mean of
//!   the last 8 idle times, pre-warm = 0.85 x that, keep-alive = 0.3 x that (the paper's 15%
//!   margin either side).
//!
//! Cold starts and idle time are counted as for the other policies: a restore takes the modelled
//! restore time (a pre-warmed clone is ready that long after its pre-warm window starts), an
//! arrival that finds no ready clone is a cold start, and idle clone-seconds run from ready to
//! used or unloaded.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::trace::{by_function, horizon, total, Invocation, OrdF64, Outcome};

/// The policy's parameters (the paper's, see the module's description).
#[derive(Clone, Debug, PartialEq)]
pub struct HybridParams {
    pub range_s: f64,
    pub bin_s: f64,
    pub head: f64,
    pub tail: f64,
    pub margin: f64,
    pub cv_threshold: f64,
    pub oob_threshold: f64,
    pub forecast_margin: f64,
}

impl Default for HybridParams {
    fn default() -> Self {
        Self {
            range_s: 4.0 * 3600.0,
            bin_s: 60.0,
            head: 0.05,
            tail: 0.99,
            margin: 0.1,
            cv_threshold: 2.0,
            oob_threshold: 0.5,
            forecast_margin: 0.15,
        }
    }
}

/// A function's idle-time histogram.
struct Histogram {
    bins: Vec<u32>,
    total: u64,
    sum_sq: f64,
    out_of_bounds: u64,
    /// The last idle times, for the forecast.
    recent: VecDeque<f64>,
}

const RECENT: usize = 8;

impl Histogram {
    fn new(p: &HybridParams) -> Self {
        let n = (p.range_s / p.bin_s).round().max(1.0) as usize;
        Self { bins: vec![0; n], total: 0, sum_sq: 0.0, out_of_bounds: 0, recent: VecDeque::new() }
    }

    fn add(&mut self, idle: f64, p: &HybridParams) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(idle.max(1e-3));
        let bin = (idle / p.bin_s) as usize;
        match self.bins.get_mut(bin) {
            Some(c) => {
                self.sum_sq += f64::from(2 * *c + 1);
                *c += 1;
                self.total += 1;
            }
            None => self.out_of_bounds += 1,
        }
    }

    /// The coefficient of variation of the bin counts.
    fn cv(&self) -> f64 {
        let n = self.bins.len() as f64;
        if self.total == 0 || n < 2.0 {
            return 0.0;
        }
        let mean = self.total as f64 / n;
        let var = (self.sum_sq - n * mean * mean) / (n - 1.0);
        var.max(0.0).sqrt() / mean
    }

    fn percentile_bin(&self, q: f64) -> usize {
        let mut seen = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            seen += u64::from(c);
            if seen as f64 >= q * self.total as f64 {
                return i;
            }
        }
        self.bins.len() - 1
    }

    /// (pre-warm, keep-alive) windows, in seconds.
    fn windows(&self, p: &HybridParams) -> (f64, f64) {
        let seen = self.total + self.out_of_bounds;
        if seen > 0 && self.out_of_bounds as f64 >= p.oob_threshold * seen as f64 {
            let mean_ln = self.recent.iter().map(|x| x.ln()).sum::<f64>() / self.recent.len().max(1) as f64;
            let forecast = mean_ln.exp();
            return (forecast * (1.0 - p.forecast_margin), forecast * 2.0 * p.forecast_margin);
        }
        if self.cv() < p.cv_threshold {
            return (0.0, p.range_s);
        }
        let head = self.percentile_bin(p.head) as f64 * p.bin_s;
        let tail = (self.percentile_bin(p.tail) + 1) as f64 * p.bin_s;
        let prewarm = head * (1.0 - p.margin);
        (prewarm, (tail * (1.0 + p.margin) - prewarm).max(p.bin_s))
    }
}

/// A clone that is ready (or will be) and unloaded at a given time.
#[derive(Clone, Copy)]
struct Idle {
    ready: f64,
    until: f64,
}

/// The hybrid-histogram policy over `trace` (see the module's description).
pub fn hybrid(trace: &[Invocation], p: &HybridParams, restore_s: f64) -> Outcome {
    total(&hybrid_by_function(trace, p, restore_s))
}

/// [`hybrid`] per function (by name).
pub fn hybrid_by_function(trace: &[Invocation], p: &HybridParams, restore_s: f64) -> Vec<(String, Outcome)> {
    by_function(trace).into_iter().map(|(name, invs)| (name.to_string(), one(&invs, p, restore_s))).collect()
}

fn one(invs: &[&Invocation], p: &HybridParams, restore_s: f64) -> Outcome {
    let mut out = Outcome { invocations: invs.len() as u64, ..Default::default() };
    let end = horizon(invs, restore_s);
    let mut hist = Histogram::new(p);
    // Clones kept or pre-warmed, and busy ones by the time they finish.
    let mut idle: Vec<Idle> = Vec::new();
    let mut busy: BinaryHeap<Reverse<OrdF64>> = BinaryHeap::new();
    let mut last_end: Option<f64> = None;
    // A clone finished at `at`: kept, or unloaded and pre-warmed later.
    let finish = |at: f64, hist: &Histogram, idle: &mut Vec<Idle>, out: &mut Outcome| {
        let (prewarm, keep) = hist.windows(p);
        if prewarm > 0.0 {
            // Unloaded now, restored pre-warm later.
            out.restores += 1;
            out.change(at, -1);
            out.change(at + prewarm, 1);
            idle.push(Idle { ready: at + prewarm + restore_s, until: at + prewarm + keep });
        } else {
            idle.push(Idle { ready: at, until: at + keep });
        }
    };
    for inv in invs {
        let now = inv.arrival;
        while let Some(e) = busy.peek().map(|x| x.0 .0).filter(|&e| e <= now) {
            busy.pop();
            last_end = Some(last_end.map_or(e, |l: f64| l.max(e)));
            finish(e, &hist, &mut idle, &mut out);
        }
        // Clones unloaded before this arrival go, after idling their whole time.
        idle.retain(|c| {
            let keep = c.until > now;
            if !keep {
                out.idle_clone_seconds += (c.until - c.ready).max(0.0);
                out.change(c.until, -1);
            }
            keep
        });
        if let Some(l) = last_end {
            hist.add(if busy.is_empty() { (now - l).max(0.0) } else { 0.0 }, p);
        }
        // The ready clone that became ready last (the most recently used).
        let pick = idle
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ready <= now)
            .max_by(|a, b| a.1.ready.total_cmp(&b.1.ready))
            .map(|(i, _)| i);
        let start = match pick {
            Some(i) => {
                let c = idle.swap_remove(i);
                out.idle_clone_seconds += now - c.ready;
                now
            }
            None => {
                out.cold_starts += 1;
                out.restores += 1;
                out.change(now, 1);
                now + restore_s
            }
        };
        busy.push(Reverse(OrdF64(start + inv.duration)));
        out.peak_clones = out.peak_clones.max((idle.len() + busy.len()) as u64);
    }
    // Busy clones finish and are kept or pre-warmed by the windows as they stand; everything is
    // counted up to the horizon.
    while let Some(Reverse(OrdF64(e))) = busy.pop() {
        finish(e, &hist, &mut idle, &mut out);
    }
    out.idle_clone_seconds += idle.iter().map(|c| (c.until.min(end) - c.ready).max(0.0)).sum::<f64>();
    // (A clone pre-warmed beyond the horizon goes as it comes.)
    idle.iter().for_each(|c| out.change(c.until.min(end).max(c.ready - restore_s), -1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(times: &[f64], duration: f64) -> Vec<Invocation> {
        times.iter().map(|&t| Invocation { arrival: t, function: "f".into(), duration }).collect()
    }

    #[test]
    fn the_windows_follow_the_histogram() {
        let p = HybridParams::default();
        let mut h = Histogram::new(&p);
        assert_eq!(h.windows(&p), (0.0, 4.0 * 3600.0), "no idle time yet: standard keep-alive");
        // Idle times of 10 to 11 minutes: pre-warm 9 minutes (bin 10 x 0.9), keep-alive up to
        // 12.1 minutes after the invocation ((bin 10 + 1) x 1.1 minutes).
        for i in 0..50 {
            h.add(600.0 + f64::from(i), &p);
        }
        let (prewarm, keep) = h.windows(&p);
        assert!((prewarm - 540.0).abs() < 1e-9 && (prewarm + keep - 726.0).abs() < 1e-9, "{prewarm} {keep}");
        // Idle times spread over every bin: not representative.
        let mut h = Histogram::new(&p);
        for i in 0..2400 {
            h.add(f64::from(i) * 6.0, &p);
        }
        assert_eq!(h.windows(&p), (0.0, 4.0 * 3600.0), "cv {}", h.cv());
        // Mostly beyond the range: the forecast.
        let mut h = Histogram::new(&p);
        for _ in 0..5 {
            h.add(20_000.0, &p);
        }
        let (prewarm, keep) = h.windows(&p);
        assert!((prewarm - 17_000.0).abs() < 1e-6 && (keep - 6_000.0).abs() < 1e-6, "{prewarm} {keep}");
    }

    #[test]
    fn a_periodic_function_is_pre_warmed_and_not_kept_between_calls() {
        // Every 10 minutes for 10 hours, 1 s each.
        let t = at(&(0..60).map(|i| f64::from(i) * 600.0).collect::<Vec<_>>(), 1.0);
        let o = hybrid(&t, &HybridParams::default(), 0.05);
        // The first call is cold; the second finds the clone the standard keep-alive kept; then
        // the clone is unloaded after each call and pre-warmed 9 minutes later.
        assert_eq!(o.cold_starts, 1, "{o:?}");
        assert!(o.idle_clone_seconds < 60.0 * 140.0, "{o:?}");
        assert!(o.idle_clone_seconds > 60.0 * 50.0, "{o:?}");
    }

    #[test]
    fn concurrent_calls_get_clones_of_their_own() {
        let t = at(&[0.0, 0.1, 0.2], 5.0);
        let o = hybrid(&t, &HybridParams::default(), 0.05);
        assert_eq!((o.cold_starts, o.peak_clones), (3, 3), "{o:?}");
    }
}
