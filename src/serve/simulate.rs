//! `ember simulate`: replays an invocation trace against the real autoscaler ([`Scaler`], ticked as
//! the daemon ticks it) with a modelled restore time, and against a fixed keep-alive policy (a VM
//! is kept for a while after each use and reused), and reports cold starts and idle clone-seconds.
//!
//! A trace is CSV: `arrival_s,function,duration_s` per line (`#` comments and a header line are
//! skipped). [`generate`] makes the synthetic ones shipped in `benches/traces/`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt;

use super::pool::TICK;
use super::scaler::{Action, Load, PoolPolicy, Scaler};

#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    pub arrival: f64,
    pub function: String,
    pub duration: f64,
}

/// Parses a trace; the error names the line.
pub fn parse_trace(text: &str) -> Result<Vec<Invocation>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || (i == 0 && line.starts_with("arrival")) {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = || format!("line {}: expected `arrival_s,function,duration_s`, got {line:?}", i + 1);
        let [arrival, function, duration] = f[..] else { return Err(bad()) };
        let arrival: f64 = arrival.parse().map_err(|_| bad())?;
        let duration: f64 = duration.parse().map_err(|_| bad())?;
        if !(arrival.is_finite() && arrival >= 0.0 && duration.is_finite() && duration >= 0.0) || function.is_empty() {
            return Err(bad());
        }
        out.push(Invocation { arrival, function: function.to_string(), duration });
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(out)
}

/// What one policy did over a trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub invocations: u64,
    pub cold_starts: u64,
    /// Seconds that ready-but-unused clones existed, summed over clones.
    pub idle_clone_seconds: f64,
    /// Most clones (ready + busy) at once.
    pub peak_clones: u64,
    /// Clones restored (cold starts included).
    pub restores: u64,
}

impl Outcome {
    pub fn cold_start_rate(&self) -> f64 {
        if self.invocations == 0 {
            0.0
        } else {
            self.cold_starts as f64 / self.invocations as f64
        }
    }

    fn add(&mut self, o: &Outcome) {
        self.invocations += o.invocations;
        self.cold_starts += o.cold_starts;
        self.idle_clone_seconds += o.idle_clone_seconds;
        self.peak_clones += o.peak_clones;
        self.restores += o.restores;
    }
}

fn by_function(trace: &[Invocation]) -> BTreeMap<&str, Vec<&Invocation>> {
    let mut m: BTreeMap<&str, Vec<&Invocation>> = BTreeMap::new();
    for inv in trace {
        m.entry(&inv.function).or_default().push(inv);
    }
    m
}

/// The autoscaler over `trace`, as the daemon runs it: a clone serves up to the policy's
/// `max_uses` handoffs (1: destroyed on release), the pool is refilled at every handoff and scaled
/// at every tick, a restore decided at `t` lands at `t + restore_s`, and an arrival that finds no
/// ready clone is a cold start (it starts `restore_s` later).
pub fn autoscaler(trace: &[Invocation], policy: &PoolPolicy, restore_s: f64) -> Outcome {
    let mut total = Outcome::default();
    for invs in by_function(trace).values() {
        total.add(&autoscale_one(invs, policy, restore_s));
    }
    total
}

/// The pool of one function during a replay.
#[derive(Default)]
struct SimPool {
    /// Ready clones by the handoffs each has served; recycled ones at the front, taken first.
    ready: VecDeque<u32>,
    /// When each clone being restored becomes ready.
    restoring: BinaryHeap<Reverse<OrdF64>>,
    /// When each busy clone finishes, and its handoffs so far.
    ends: BinaryHeap<Reverse<(OrdF64, u32)>>,
    max_uses: u32,
    /// The clock.
    last: f64,
    out: Outcome,
}

impl SimPool {
    /// Moves the clock to `now`: idle time accrues, restores and invocations that finished land.
    fn advance(&mut self, now: f64) {
        loop {
            let r = self.restoring.peek().map(|x| x.0 .0).filter(|&x| x <= now);
            let e = self.ends.peek().map(|x| x.0 .0 .0).filter(|&x| x <= now);
            let at = match (r, e) {
                (Some(r), e) if e.is_none_or(|e| r <= e) => r,
                (_, Some(e)) => e,
                _ => break,
            };
            self.out.idle_clone_seconds += self.ready.len() as f64 * (at - self.last);
            self.last = at;
            if Some(at) == r {
                self.restoring.pop();
                self.ready.push_back(0);
            } else if let Some(Reverse((_, uses))) = self.ends.pop() {
                if uses < self.max_uses {
                    self.ready.push_front(uses);
                }
            }
        }
        self.out.idle_clone_seconds += self.ready.len() as f64 * (now - self.last);
        self.last = now;
    }

    fn busy(&self) -> u32 {
        self.ends.len() as u32
    }

    /// Ready, restoring: what the scaler counts as the pool.
    fn have(&self) -> u32 {
        (self.ready.len() + self.restoring.len()) as u32
    }

    fn restore(&mut self, n: u32, at: f64) {
        self.out.restores += u64::from(n);
        (0..n).for_each(|_| self.restoring.push(Reverse(OrdF64(at))));
    }

    fn note_peak(&mut self) {
        let clones = self.ready.len() + self.restoring.len() + self.ends.len();
        self.out.peak_clones = self.out.peak_clones.max(clones as u64);
    }
}

/// When the last invocation of a trace has ended (arriving at a cold start at worst): both
/// policies are accounted up to here.
fn horizon(invs: &[&Invocation], restore_s: f64) -> f64 {
    invs.iter().map(|i| i.arrival + restore_s + i.duration).fold(0.0, f64::max)
}

fn autoscale_one(invs: &[&Invocation], policy: &PoolPolicy, restore_s: f64) -> Outcome {
    let tick = TICK.as_secs_f64();
    let mut scaler = Scaler::new(policy.clone(), TICK);
    // Registered before the trace starts: the pool holds `min_ready` clones.
    let mut p =
        SimPool { max_uses: policy.max_uses, ready: vec![0; policy.min_ready as usize].into(), ..Default::default() };
    p.out.invocations = invs.len() as u64;
    let (mut handoffs, mut peak_busy) = (0u32, 0u32);
    let end = horizon(invs, restore_s);
    let mut next = invs.iter().peekable();
    let mut t = 0.0;
    while t < end {
        let tick_end = (t + tick).min(end);
        while let Some(inv) = next.next_if(|i| i.arrival < tick_end) {
            p.advance(inv.arrival);
            let (start, uses) = match p.ready.pop_front() {
                Some(uses) => (inv.arrival, uses),
                None => {
                    p.out.cold_starts += 1;
                    p.out.restores += 1;
                    (inv.arrival + restore_s, 0)
                }
            };
            p.ends.push(Reverse((OrdF64(start + inv.duration), uses + 1)));
            handoffs += 1;
            peak_busy = peak_busy.max(p.busy());
            // The daemon refills after every handoff, in the background.
            p.restore(scaler.deficit(p.have()), inv.arrival + restore_s);
            p.note_peak();
        }
        t = tick_end;
        p.advance(t);
        let load = Load {
            busy: p.busy(),
            peak_busy: std::mem::replace(&mut peak_busy, p.busy()),
            handoffs: std::mem::take(&mut handoffs),
            have: p.have(),
            refill_s: restore_s,
        };
        match scaler.tick(load) {
            Action::Grow(n) => p.restore(n, t + restore_s),
            Action::Shrink(n) => p.ready.truncate(p.ready.len().saturating_sub(n as usize)),
            Action::Hold => {}
        }
        p.note_peak();
    }
    p.out
}

/// Keep-alive over `trace`: a VM is kept `keep_alive_s` after each use and reused by the next
/// invocation; an invocation that finds none idle is a cold start (`restore_s` later).
pub fn keep_alive(trace: &[Invocation], keep_alive_s: f64, restore_s: f64) -> Outcome {
    let mut total = Outcome::default();
    for invs in by_function(trace).values() {
        let mut out = Outcome { invocations: invs.len() as u64, ..Default::default() };
        let end = horizon(invs, restore_s);
        // Idle VMs by the time they became idle; busy VMs by the time they finish.
        let mut idle: Vec<f64> = Vec::new();
        let mut ends: BinaryHeap<Reverse<OrdF64>> = BinaryHeap::new();
        for inv in invs {
            while let Some(e) = ends.peek().map(|x| x.0 .0).filter(|&e| e <= inv.arrival) {
                ends.pop();
                idle.push(e);
            }
            // VMs whose keep-alive ran out before this arrival go, after idling the whole time.
            idle.retain(|&since| {
                let keep = since + keep_alive_s > inv.arrival;
                if !keep {
                    out.idle_clone_seconds += keep_alive_s;
                }
                keep
            });
            let start = match idle.pop() {
                Some(since) => {
                    out.idle_clone_seconds += inv.arrival - since;
                    inv.arrival
                }
                None => {
                    out.cold_starts += 1;
                    out.restores += 1;
                    inv.arrival + restore_s
                }
            };
            ends.push(Reverse(OrdF64(start + inv.duration)));
            out.peak_clones = out.peak_clones.max((idle.len() + ends.len()) as u64);
        }
        // Every VM left idles until its keep-alive runs out or the trace ends.
        let left = idle.into_iter().chain(ends.into_iter().map(|e| e.0 .0));
        out.idle_clone_seconds += left.map(|since| ((since + keep_alive_s).min(end) - since).max(0.0)).sum::<f64>();
        total.add(&out);
    }
    total
}

/// An f64 that sorts (no NaNs reach it: traces are checked).
#[derive(Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl Ord for OrdF64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// The report of `ember simulate`.
pub struct Report {
    pub trace: String,
    pub restore_s: f64,
    pub keep_alive_s: f64,
    pub autoscaler: Outcome,
    pub keep_alive: Outcome,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ember simulate: {} ({} invocations), modelled restore {:.1} ms",
            self.trace,
            self.autoscaler.invocations,
            self.restore_s * 1e3
        )?;
        writeln!(
            f,
            "{:<32} {:>12} {:>14} {:>18} {:>12} {:>10}",
            "policy", "cold starts", "cold-start rate", "idle clone-seconds", "peak clones", "restores"
        )?;
        let ka = format!("keep-alive {:.0} s", self.keep_alive_s);
        for (name, o) in [("autoscaler", &self.autoscaler), (ka.as_str(), &self.keep_alive)] {
            writeln!(
                f,
                "{name:<32} {:>12} {:>13.4}% {:>18.1} {:>12} {:>10}",
                o.cold_starts,
                o.cold_start_rate() * 100.0,
                o.idle_clone_seconds,
                o.peak_clones,
                o.restores
            )?;
        }
        Ok(())
    }
}

/// The shapes of synthetic trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// A constant 20 invocations/s.
    Steady,
    /// A day compressed into the trace: 2 to 40 invocations/s along a sine.
    Diurnal,
    /// 5 invocations/s with spikes of 200/s for 5 s every 2 to 6 minutes.
    Bursty,
}

/// A small deterministic RNG (xorshift64*), so that generated traces are reproducible.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next_f64()).ln()
    }
}

/// A synthetic trace of `seconds` for function `fn`: Poisson arrivals at the shape's rate,
/// exponential durations (mean 100 ms).
pub fn generate(shape: Shape, seconds: f64, seed: u64) -> Vec<Invocation> {
    let mut rng = Rng(seed.max(1));
    let mut spikes = Vec::new();
    let mut s = 60.0;
    while s < seconds {
        spikes.push(s);
        s += 120.0 + rng.next_f64() * 240.0;
    }
    let rate = |t: f64| match shape {
        Shape::Steady => 20.0,
        Shape::Diurnal => 21.0 - 19.0 * (2.0 * std::f64::consts::PI * t / seconds).cos(),
        Shape::Bursty => {
            if spikes.iter().any(|&s| (s..s + 5.0).contains(&t)) {
                200.0
            } else {
                5.0
            }
        }
    };
    // Thinning: arrivals at the peak rate, kept with probability rate(t) / peak.
    let peak = 200.0;
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        t += rng.exp(1.0 / peak);
        if t >= seconds {
            return out;
        }
        if rng.next_f64() < rate(t) / peak {
            out.push(Invocation { arrival: t, function: "fn".into(), duration: rng.exp(0.1) });
        }
    }
}

/// Writes a trace as CSV.
pub fn to_csv(trace: &[Invocation]) -> String {
    let mut s = String::from("arrival_s,function,duration_s\n");
    for i in trace {
        s.push_str(&format!("{:.6},{},{:.6}\n", i.arrival, i.function, i.duration));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_parse_and_bad_lines_are_named() {
        let t = parse_trace("arrival_s,function,duration_s\n# c\n1.5,f,0.1\n0.5,g,0.2\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].function, "g", "sorted by arrival");
        for bad in ["1,f", "x,f,1", "1,f,-1", "1,,1", "NaN,f,1"] {
            let e = parse_trace(bad).unwrap_err();
            assert!(e.contains("line 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn generated_traces_round_trip_and_are_reproducible() {
        let a = generate(Shape::Bursty, 600.0, 7);
        assert_eq!(a, generate(Shape::Bursty, 600.0, 7));
        let back = parse_trace(&to_csv(&a)).unwrap();
        assert_eq!(back.len(), a.len());
        // Spikes: some second has far more arrivals than the base rate.
        let mut per_s = BTreeMap::new();
        for i in &a {
            *per_s.entry(i.arrival as u64).or_insert(0) += 1;
        }
        assert!(per_s.values().copied().max().unwrap() > 100, "no spike");
    }

    #[test]
    fn one_invocation_is_one_cold_start_for_keep_alive_and_none_for_a_warm_pool() {
        let t = vec![
            Invocation { arrival: 5.0, function: "f".into(), duration: 1.0 },
            Invocation { arrival: 105.0, function: "f".into(), duration: 1.0 },
        ];
        let ka = keep_alive(&t, 600.0, 0.05);
        // The first is a cold start (it ends at 6.05 s); its VM idles until the second, then until
        // the trace's horizon (106.05 s: the last arrival had it been a cold start, + its duration).
        assert_eq!(ka.cold_starts, 1);
        assert!((ka.idle_clone_seconds - (98.95 + 0.05)).abs() < 1e-9, "{ka:?}");
        let p = PoolPolicy { min_ready: 1, ..PoolPolicy::default() };
        let a = autoscaler(&t, &p, 0.05);
        assert_eq!(a.cold_starts, 0);
        assert!(a.idle_clone_seconds > 4.0, "{a:?}");
    }

    #[test]
    fn keep_alive_reuses_idle_vms() {
        let t: Vec<Invocation> =
            (0..10).map(|i| Invocation { arrival: f64::from(i) * 10.0, function: "f".into(), duration: 1.0 }).collect();
        let ka = keep_alive(&t, 600.0, 0.05);
        assert_eq!(ka.cold_starts, 1);
        assert_eq!(ka.peak_clones, 1);
    }

    fn burst(at: f64) -> impl Iterator<Item = Invocation> {
        // 100 arrivals in half a second.
        (0..100).map(move |i| Invocation { arrival: at + f64::from(i) * 0.005, function: "f".into(), duration: 0.05 })
    }

    #[test]
    fn a_second_burst_finds_the_reserve_the_first_one_left() {
        let one: Vec<Invocation> = burst(10.0).collect();
        let two: Vec<Invocation> = burst(10.0).chain(burst(200.0)).collect();
        let p = PoolPolicy::default();
        let first = autoscaler(&one, &p, 0.05).cold_starts;
        assert!(first > 0, "a first burst from an idle pool has cold starts");
        assert_eq!(autoscaler(&two, &p, 0.05).cold_starts, first, "the second burst had cold starts");
        // Without the reserve the second burst starts from min_ready again.
        let p = PoolPolicy { burst_window_s: 0.0, ..p };
        assert!(autoscaler(&two, &p, 0.05).cold_starts > autoscaler(&one, &p, 0.05).cold_starts);
    }

    #[test]
    fn recycled_clones_serve_many_invocations() {
        let t: Vec<Invocation> =
            (0..100).map(|i| Invocation { arrival: f64::from(i), function: "f".into(), duration: 0.5 }).collect();
        let single = autoscaler(&t, &PoolPolicy::default(), 0.05);
        assert!(single.restores >= 100, "{single:?}");
        let reused = autoscaler(&t, &PoolPolicy { max_uses: 1000, ..Default::default() }, 0.05);
        assert_eq!(reused.cold_starts, 0);
        assert!(reused.restores * 10 < single.restores, "{reused:?}");
        let twice = autoscaler(&t, &PoolPolicy { max_uses: 2, ..Default::default() }, 0.05);
        assert!((50..60).contains(&twice.restores), "{twice:?}");
    }

    #[test]
    fn the_autoscaler_covers_a_steady_load() {
        let t = generate(Shape::Steady, 300.0, 3);
        let a = autoscaler(&t, &PoolPolicy::default(), 0.05);
        assert!(a.cold_start_rate() < 0.01, "{a:?}");
    }
}
