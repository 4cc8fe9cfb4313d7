//! /metrics in Prometheus text format: per-function counters and gauges from the supervisor (the
//! autoscaler's predicted arrivals and target among them), the host's idle budget, and latency
//! histograms for restores and handoffs.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::model::FunctionInfo;

/// Bucket upper bounds, in seconds: 1 us to 10 s.
const BUCKETS: [f64; 15] = [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0, 10.0];

/// A latency histogram (cumulative on output, as Prometheus wants).
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            total += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {total}");
        }
        total += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The host's idle budget and how much of it the autoscaler's targets hold (f64 bits, MiB).
#[derive(Default)]
pub struct HostGauges {
    budget_mib: AtomicU64,
    used_mib: AtomicU64,
}

impl HostGauges {
    pub fn set(&self, budget_mib: f64, used_mib: f64) {
        self.budget_mib.store(budget_mib.to_bits(), Ordering::Relaxed);
        self.used_mib.store(used_mib.to_bits(), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let mib = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed)) * 1024.0 * 1024.0;
        for (name, help, v) in [
            (
                "ember_idle_budget_bytes",
                "Memory the host lets ready clones hold, all functions together.",
                &self.budget_mib,
            ),
            (
                "ember_idle_budget_used_bytes",
                "Memory the autoscaler's targets hold (clones at their guest memory).",
                &self.used_mib,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", mib(v));
        }
    }
}

/// The daemon's histograms and host gauges.
#[derive(Default)]
pub struct Metrics {
    /// Restoring a clone (new VM with the template's state, started).
    pub restore: Histogram,
    /// Acquire: request in the supervisor to the handoff ready (cold starts included).
    pub handoff: Histogram,
    /// A clone's start: restore to its agent serving (as seen by the background loop, which looks
    /// after every handoff and every tick).
    pub clone_start: Histogram,
    /// The idle budget, set by the scaling loop's ticks.
    pub host: HostGauges,
}

impl Metrics {
    pub fn render(&self, functions: &[FunctionInfo]) -> String {
        let mut out = String::new();
        type Pick = fn(&FunctionInfo) -> f64;
        let series: [(&str, &str, &str, Pick); 16] = [
            ("ember_handoffs_total", "counter", "Clones handed out (acquire and invoke).", |f| f.handoffs as f64),
            ("ember_cold_starts_total", "counter", "Handoffs that had to restore a clone on the spot.", |f| {
                f.cold_starts as f64
            }),
            ("ember_cold_start_ratio", "gauge", "Cold starts per handoff so far.", |f| {
                if f.handoffs == 0 {
                    0.0
                } else {
                    f.cold_starts as f64 / f.handoffs as f64
                }
            }),
            ("ember_invocations_total", "counter", "Invocations through POST /functions/{name}/invoke.", |f| {
                f.invocations as f64
            }),
            ("ember_invocation_errors_total", "counter", "Invocations that got no answer.", |f| {
                f.invocation_errors as f64
            }),
            ("ember_clones_ready", "gauge", "Ready clones in the pool.", |f| f64::from(f.ready)),
            ("ember_clones_busy", "gauge", "Clones handed out and not released.", |f| f64::from(f.busy)),
            ("ember_clones_target_ready", "gauge", "Ready clones the autoscaler wants.", |f| f64::from(f.target_ready)),
            ("ember_clones_max", "gauge", "Most clones at once (pool.max, or what the host's memory holds).", |f| {
                f64::from(f.max_clones)
            }),
            ("ember_predicted_arrivals_per_second", "gauge", "Arrivals the autoscaler expects now, per second.", |f| {
                f.predicted_arrivals_per_s
            }),
            ("ember_clones_recycled_total", "counter", "Released clones that went back to the pool.", |f| {
                f.recycled_clones as f64
            }),
            ("ember_restores_total", "counter", "Clones restored (for the pool and for cold starts).", |f| {
                f.restores as f64
            }),
            (
                "ember_restore_cpu_seconds_total",
                "counter",
                "CPU its restores cost (restore to serving), as estimated when each was made.",
                |f| f.restore_cpu_seconds,
            ),
            (
                "ember_restore_cpu_seconds",
                "gauge",
                "CPU one restore costs now, as measured in the function's worker (the scaler's price of a restore).",
                |f| f.restore_cpu_s,
            ),
            ("ember_worker_restarts_total", "counter", "Workers that ended without being asked to.", |f| {
                f.worker.as_ref().map_or(0.0, |w| w.restarts as f64)
            }),
            (
                "ember_worker_restarting",
                "gauge",
                "1 while the function waits to restart its worker (requests for a new clone get 503).",
                |f| f64::from(u8::from(f.worker.as_ref().is_some_and(|w| w.restarting_in_s.is_some()))),
            ),
        ];
        for (name, kind, help, pick) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for f in functions {
                let _ = writeln!(out, "{name}{{function=\"{}\"}} {}", f.name, pick(f));
            }
        }
        self.host.render(&mut out);
        self.restore.render(&mut out, "ember_restore_seconds", "Time to restore and start a clone.");
        self.handoff.render(&mut out, "ember_handoff_seconds", "Time to hand a clone over (acquire).");
        self.clone_start.render(
            &mut out,
            "ember_clone_start_seconds",
            "Time from restore to the clone's agent serving.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.000005\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.005\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"), "{s}");
        assert!(s.contains("x_count 3"), "{s}");
    }

    #[test]
    fn the_idle_budget_is_in_bytes() {
        let m = Metrics::default();
        m.host.set(1024.0, 128.0);
        let s = m.render(&[]);
        assert!(s.contains("\nember_idle_budget_bytes 1073741824\n"), "{s}");
        assert!(s.contains("\nember_idle_budget_used_bytes 134217728\n"), "{s}");
        assert!(s.contains("# TYPE ember_predicted_arrivals_per_second gauge"), "{s}");
        assert!(s.contains("# TYPE ember_clones_max gauge"), "{s}");
    }
}
