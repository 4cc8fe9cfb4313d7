//! `ember simulate`: replays an invocation trace against the real autoscaler ([`Scaler`], ticked as
//! the daemon ticks it) with a modelled restore time, and against a fixed keep-alive policy (a VM
//! is kept for a while after each use and reused), and reports what each costs ([`Bill`]): cold
//! starts, idle clone-seconds, restores and their CPU, the peaks.
//!
//! A trace is CSV: `arrival_s,function,duration_s` per line (`#` comments and a header line are
//! skipped). [`generate`] makes the synthetic ones shipped in `benches/traces/`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;

use super::fleet::{self, Host};
use super::scaler::{Action, Load, PoolPolicy, Scaler};
use super::trace::{by_function, horizon, OrdF64, Rng};
pub use super::trace::{parse_trace, to_csv, total, Invocation, Outcome};
use super::TICK;

/// The host `ember simulate` models: its memory, and each clone's (the guest memory of a
/// registration's default, 128 MiB).
#[derive(Clone, Debug, PartialEq)]
pub struct SimHost {
    pub host: Host,
    pub clone_mib: f64,
    /// The CPU one restore costs, seconds (from restore to the clone serving).
    pub restore_cpu_s: f64,
}

/// The CPU a restore costs by default, seconds: what a clone of the default guest took on the
/// host ember is developed on, from restore to its agent serving (docs/autoscaler.md).
pub const RESTORE_CPU_S: f64 = 0.013;

impl Default for SimHost {
    /// A 512 GiB host (one that can run a fleet of a few thousand 128 MiB clones at once), half of
    /// it for idle clones of 128 MiB: 2048 of them, 4096 clones at most per function.
    fn default() -> Self {
        Self {
            host: Host::with_memory(524_288.0),
            clone_mib: crate::config::DEFAULT_MEM_MIB as f64,
            restore_cpu_s: RESTORE_CPU_S,
        }
    }
}

/// What the autoscaler did beyond the [`Outcome`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostStats {
    /// Ticks at which the idle budget was binding.
    pub budget_binding_ticks: u64,
    pub ticks: u64,
    /// The most memory the targets held, MiB.
    pub peak_budget_used_mib: f64,
}

/// The autoscaler over `trace`, as the daemon runs it: every function's [`Scaler`], targets set
/// every tick by the host's allocation ([`fleet::allocate`]) under its idle budget, a clone
/// serving up to `uses_allowed(true)` invocations (the trace's invocations are the daemon's
/// `invoke`s), the pool refilled at every handoff and scaled at every tick, a restore decided at
/// `t` landing at `t + restore_s`, an arrival that finds no ready clone a cold start (it starts
/// `restore_s` later). Each function is counted up to its own horizon, as for keep-alive.
pub fn autoscaler(trace: &[Invocation], policy: &PoolPolicy, host: &SimHost, restore_s: f64) -> (Outcome, HostStats) {
    let (rows, stats) = autoscaler_by_function(trace, policy, host, restore_s);
    (total(&rows), stats)
}

/// [`autoscaler`] per function (by name).
pub fn autoscaler_by_function(
    trace: &[Invocation],
    policy: &PoolPolicy,
    host: &SimHost,
    restore_s: f64,
) -> (Vec<(String, Outcome)>, HostStats) {
    let tick = TICK.as_secs_f64();
    let groups = by_function(trace);
    let index: HashMap<&str, usize> = groups.keys().enumerate().map(|(i, &n)| (n, i)).collect();
    let limit = host.host.clone_limit(host.clone_mib);
    let uses = policy.uses_allowed(true);
    let restore_cost_s = host.host.restore_cost_s(host.restore_cpu_s, host.clone_mib);
    let load = |p: &mut SimPool| {
        let (ended, came_back) = (std::mem::take(&mut p.ended), std::mem::take(&mut p.came_back));
        Load { busy: p.busy(), have: p.have(), refill_s: restore_s, restore_cost_s, ended, came_back }
    };
    let mut fns: Vec<SimFn> = groups
        .values()
        .map(|invs| {
            // Registered before the trace starts: the pool holds what the scaler wants for a
            // function just registered (min_ready, or what it makes of knowing nothing yet).
            let mut scaler = Scaler::new(policy.clone(), TICK, -tick, limit);
            let mut pool = SimPool { max_uses: uses, ..Default::default() };
            scaler.observe(load(&mut pool), 0.0);
            let ready = scaler.wanted(policy.price());
            scaler.decide(ready, ready);
            pool.ready = vec![0; ready as usize].into();
            pool.out.change(0.0, ready as i32);
            pool.out.invocations = invs.len() as u64;
            SimFn { scaler, pool, horizon: horizon(invs, restore_s) }
        })
        .collect();
    let end = fns.iter().map(|f| f.horizon).fold(0.0, f64::max);
    let mut stats = HostStats::default();
    let mut next = trace.iter().peekable();
    let mut live: Vec<usize> = (0..fns.len()).collect();
    let mut t = 0.0;
    while t < end {
        let tick_end = (t + tick).min(end);
        while let Some(inv) = next.next_if(|i| i.arrival < tick_end) {
            let f = &mut fns[index[inv.function.as_str()]];
            let p = &mut f.pool;
            p.advance(inv.arrival);
            let (start, uses, cold) = match p.ready.pop_front() {
                Some(uses) => (inv.arrival, uses, false),
                None => {
                    p.out.cold_starts += 1;
                    p.out.restores += 1;
                    p.out.change(inv.arrival, 1);
                    (inv.arrival + restore_s, 0, true)
                }
            };
            p.ends.push(Reverse((OrdF64(start + inv.duration), uses + 1)));
            f.scaler.arrival(inv.arrival, cold);
            // The daemon refills after every handoff, in the background.
            p.restore(f.scaler.deficit(p.have(), p.busy()), inv.arrival, restore_s);
            p.note_peak();
        }
        t = tick_end;
        // Functions past their horizon are done: counted no further, and out of the budget.
        live.retain(|&i| {
            let f = &mut fns[i];
            f.pool.advance(t.min(f.horizon));
            f.horizon > t
        });
        for &i in &live {
            let f = &mut fns[i];
            f.scaler.observe(load(&mut f.pool), t);
        }
        let alloc = fleet::allocate_with(
            &host.host,
            live.len(),
            |_| host.clone_mib,
            |k, price| fns[live[k]].scaler.wanted(price),
            |k| fns[live[k]].scaler.policy().price(),
        );
        stats.ticks += 1;
        stats.budget_binding_ticks += u64::from(alloc.price_per_mib > 0.0);
        stats.peak_budget_used_mib = stats.peak_budget_used_mib.max(alloc.used_mib);
        for (&i, &target) in live.iter().zip(&alloc.targets) {
            let f = &mut fns[i];
            let p = &mut f.pool;
            match f.scaler.decide(target, p.have()) {
                Action::Grow(n) => p.restore(n, t, restore_s),
                Action::Shrink(n) => p.shrink(n),
                Action::Hold => {}
            }
            p.note_peak();
        }
    }
    let rows = groups
        .keys()
        .zip(&mut fns)
        .map(|(name, f)| {
            let p = &mut f.pool;
            p.advance(f.horizon);
            // Counted no further: its clones go at its horizon.
            let left = p.ready.len() + p.restoring.len() + p.ends.len();
            p.out.change(f.horizon, -(left as i32));
            (name.to_string(), std::mem::take(&mut p.out))
        })
        .collect();
    (rows, stats)
}

/// One function during a replay.
struct SimFn {
    scaler: Scaler,
    pool: SimPool,
    horizon: f64,
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
    /// Handoffs that ended since the last tick, and those whose clone came back.
    ended: u32,
    came_back: u32,
    /// The clock.
    last: f64,
    out: Outcome,
}

impl SimPool {
    /// Moves the clock to `now`: idle time accrues, restores and invocations that finished land.
    fn advance(&mut self, now: f64) {
        if now <= self.last {
            return;
        }
        loop {
            let r = self.restoring.peek().map(|x| x.0 .0).filter(|&x| x <= now);
            let e = self.ends.peek().map(|x| x.0 .0 .0).filter(|&x| x <= now);
            let at = match (r, e) {
                (Some(r), e) if e.is_none_or(|e| r <= e) => r,
                (_, Some(e)) => e,
                _ => break,
            };
            self.out.idle_clone_seconds += self.ready.len() as f64 * (at - self.last).max(0.0);
            self.last = self.last.max(at);
            if Some(at) == r {
                self.restoring.pop();
                self.ready.push_back(0);
            } else if let Some(Reverse((_, uses))) = self.ends.pop() {
                self.ended += 1;
                if uses < self.max_uses {
                    self.came_back += 1;
                    self.ready.push_front(uses);
                } else {
                    self.out.change(at, -1);
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

    /// Restores `n` clones at `now`, ready `restore_s` later.
    fn restore(&mut self, n: u32, now: f64, restore_s: f64) {
        if n > 0 {
            self.out.restores += u64::from(n);
            self.out.change(now, n as i32);
        }
        (0..n).for_each(|_| self.restoring.push(Reverse(OrdF64(now + restore_s))));
    }

    /// Destroys `n` clones: restoring ones first (the daemon destroys starting clones first),
    /// then the ready ones taken last.
    fn shrink(&mut self, n: u32) {
        let gone = (n as usize).min(self.have() as usize);
        if gone > 0 {
            self.out.change(self.last, -(gone as i32));
        }
        let mut n = n as usize;
        if n > 0 && !self.restoring.is_empty() {
            let mut r = std::mem::take(&mut self.restoring).into_sorted_vec();
            // Sorted by Reverse: the latest to land first.
            let k = n.min(r.len());
            r.drain(..k);
            n -= k;
            self.restoring = r.into_iter().collect();
        }
        self.ready.truncate(self.ready.len().saturating_sub(n));
    }

    fn note_peak(&mut self) {
        let clones = self.ready.len() + self.restoring.len() + self.ends.len();
        self.out.peak_clones = self.out.peak_clones.max(clones as u64);
    }
}

/// Keep-alive over `trace`: a VM is kept `keep_alive_s` after each use and reused by the next
/// invocation; an invocation that finds none idle is a cold start (`restore_s` later).
pub fn keep_alive(trace: &[Invocation], keep_alive_s: f64, restore_s: f64) -> Outcome {
    total(&keep_alive_by_function(trace, keep_alive_s, restore_s))
}

/// [`keep_alive`] per function (by name).
pub fn keep_alive_by_function(trace: &[Invocation], keep_alive_s: f64, restore_s: f64) -> Vec<(String, Outcome)> {
    let mut rows = Vec::new();
    for (name, invs) in by_function(trace) {
        let mut out = Outcome { invocations: invs.len() as u64, ..Default::default() };
        let end = horizon(&invs, restore_s);
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
                    out.change(since + keep_alive_s, -1);
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
                    out.change(inv.arrival, 1);
                    inv.arrival + restore_s
                }
            };
            ends.push(Reverse(OrdF64(start + inv.duration)));
            out.peak_clones = out.peak_clones.max((idle.len() + ends.len()) as u64);
        }
        // Every VM left idles until its keep-alive runs out or the trace ends.
        let left: Vec<f64> = idle.into_iter().chain(ends.into_iter().map(|e| e.0 .0)).collect();
        out.idle_clone_seconds +=
            left.iter().map(|since| ((since + keep_alive_s).min(end) - since).max(0.0)).sum::<f64>();
        left.iter().for_each(|since| out.change((since + keep_alive_s).min(end).max(*since), -1));
        rows.push((name.to_string(), out));
    }
    rows
}

/// The report of `ember simulate`: one row per policy, with what the host pays for each (see
/// [`Bill`]).
pub struct Report {
    pub trace: String,
    pub restore_s: f64,
    pub host: SimHost,
    pub rows: Vec<(String, Outcome)>,
}

/// What a policy's outcome costs the host: idle clone-seconds, restores' CPU, the peak's memory,
/// and the two first together in idle clone-seconds (restores priced by
/// [`Host::restore_cost_s`]: the scaler's own objective, cold starts aside).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bill {
    pub policy: String,
    pub invocations: u64,
    pub cold_starts: u64,
    pub cold_start_rate: f64,
    pub idle_clone_seconds: f64,
    pub restores: u64,
    pub restores_per_invocation: f64,
    pub restore_cpu_seconds: f64,
    /// Most clones at once per function, summed over functions.
    pub peak_clones: u64,
    /// Most clones at once, all functions together, and their memory.
    pub host_peak_clones: u64,
    pub host_peak_memory_mib: f64,
    pub bill_clone_seconds: f64,
}

impl SimHost {
    /// What `o` costs on this host.
    pub fn bill(&self, policy: &str, o: &Outcome) -> Bill {
        let restore_cost_s = self.host.restore_cost_s(self.restore_cpu_s, self.clone_mib);
        Bill {
            policy: policy.to_string(),
            invocations: o.invocations,
            cold_starts: o.cold_starts,
            cold_start_rate: o.cold_start_rate(),
            idle_clone_seconds: o.idle_clone_seconds,
            restores: o.restores,
            restores_per_invocation: if o.invocations == 0 { 0.0 } else { o.restores as f64 / o.invocations as f64 },
            restore_cpu_seconds: o.restores as f64 * self.restore_cpu_s,
            peak_clones: o.peak_clones,
            host_peak_clones: o.host_peak_clones,
            host_peak_memory_mib: o.host_peak_clones as f64 * self.clone_mib,
            bill_clone_seconds: o.idle_clone_seconds + o.restores as f64 * restore_cost_s,
        }
    }
}

impl Report {
    pub fn bills(&self) -> Vec<Bill> {
        self.rows.iter().map(|(name, o)| self.host.bill(name, o)).collect()
    }

    /// The report as JSON: the trace, the host's prices, a [`Bill`] per policy.
    pub fn json(&self, curve: Option<&[Point]>) -> serde_json::Value {
        let h = &self.host;
        let curve: Option<Vec<serde_json::Value>> = curve.map(|c| {
            c.iter()
                .map(|p| {
                    let mut v = serde_json::to_value(h.bill(p.policy, &p.outcome)).unwrap_or_default();
                    v["setting"] = p.setting.clone().into();
                    v
                })
                .collect()
        });
        serde_json::json!({
            "trace": self.trace,
            "restore_ms": self.restore_s * 1e3,
            "restore_cpu_ms": h.restore_cpu_s * 1e3,
            "clone_mib": h.clone_mib,
            "core_mib": h.host.core_mib,
            "restore_cost_clone_seconds": h.host.restore_cost_s(h.restore_cpu_s, h.clone_mib),
            "policies": self.bills(),
            "curve": curve,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let invocations = self.rows.first().map_or(0, |r| r.1.invocations);
        let h = &self.host;
        writeln!(
            f,
            "ember simulate: {} ({} invocations), modelled restore {:.1} ms, {:.1} ms of CPU each ({:.2} idle clone-seconds of {:.0} MiB)",
            self.trace,
            invocations,
            self.restore_s * 1e3,
            h.restore_cpu_s * 1e3,
            h.host.restore_cost_s(h.restore_cpu_s, h.clone_mib),
            h.clone_mib,
        )?;
        writeln!(
            f,
            "{:<24} {:>11} {:>10} {:>13} {:>9} {:>10} {:>9} {:>9} {:>9} {:>13}",
            "policy",
            "cold starts",
            "cold rate",
            "idle clone-s",
            "restores",
            "restore/inv",
            "CPU-s",
            "peak",
            "host peak",
            "bill clone-s"
        )?;
        for b in self.bills() {
            writeln!(
                f,
                "{:<24} {:>11} {:>9.4}% {:>13.1} {:>9} {:>10.2}% {:>9.1} {:>9} {:>9} {:>13.1}",
                b.policy,
                b.cold_starts,
                b.cold_start_rate * 100.0,
                b.idle_clone_seconds,
                b.restores,
                b.restores_per_invocation * 100.0,
                b.restore_cpu_seconds,
                b.peak_clones,
                b.host_peak_clones,
                b.bill_clone_seconds
            )?;
        }
        writeln!(
            f,
            "(peak: most clones at once per function, summed; host peak: all functions together, {:.1} GiB for ember)",
            self.rows.first().map_or(0.0, |r| r.1.host_peak_clones as f64 * h.clone_mib / 1024.0)
        )
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
    /// A fleet of functions shaped after the Azure Functions trace (see `traces::fleet`).
    Fleet,
}

/// A synthetic trace of `seconds`: for the single-function shapes, function `fn` with Poisson
/// arrivals at the shape's rate and exponential durations (mean 100 ms); for `Fleet`, the default
/// fleet over `seconds`.
pub fn generate(shape: Shape, seconds: f64, seed: u64) -> Vec<Invocation> {
    if shape == Shape::Fleet {
        return super::traces::fleet(&super::traces::FleetParams { seconds, seed, ..Default::default() });
    }
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
        Shape::Fleet => 0.0,
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

/// One point of a trade-off curve: a policy at one setting.
#[derive(Clone, Debug)]
pub struct Point {
    /// The policy (the curve's name).
    pub policy: &'static str,
    pub setting: String,
    pub outcome: Outcome,
}

/// The trade-off between cold starts, idle clone-seconds, restores and the peak over `trace`:
/// the autoscaler (with `policy`, on `host`) at several `cold_start_cost_s` and at several prices
/// of a restore (its CPU), keep-alive at several windows, the hybrid-histogram policy at several
/// keep-alive percentiles and histogram ranges. The runs go on as many threads as there are
/// policies.
pub fn tradeoff(trace: &[Invocation], policy: &PoolPolicy, host: &SimHost, restore_s: f64) -> Vec<Point> {
    let mut costs = vec![60.0, 300.0, 900.0, 3600.0, 14_400.0, 57_600.0];
    if !costs.contains(&policy.cold_start_cost_s) {
        costs.push(policy.cold_start_cost_s);
        costs.sort_by(f64::total_cmp);
    }
    // The restore's CPU at a quarter of the host's to thirty times it.
    let restore_prices = [0.25, 1.0, 3.0, 10.0, 30.0];
    let windows = [60.0, 300.0, 600.0, 1200.0, 3600.0, 14_400.0];
    // The hybrid policy's keep-alive percentile (the paper's is the 99th), and a shorter
    // histogram range (on traces of an hour, the range barely matters).
    let hybrids = [(0.9, 14_400.0), (0.99, 600.0), (0.99, 14_400.0), (0.999, 14_400.0)];
    std::thread::scope(|s| {
        let ours = s.spawn(|| {
            costs
                .iter()
                .map(|&c| {
                    let p = PoolPolicy { cold_start_cost_s: c, ..policy.clone() };
                    let outcome = autoscaler(trace, &p, host, restore_s).0;
                    let run = if c == policy.cold_start_cost_s { " (as run)" } else { "" };
                    Point { policy: "ember", setting: format!("cold_start_cost_s {c}{run}"), outcome }
                })
                .collect::<Vec<_>>()
        });
        let priced = s.spawn(|| {
            restore_prices
                .iter()
                .map(|&k| {
                    let h = SimHost { restore_cpu_s: host.restore_cpu_s * k, ..host.clone() };
                    let outcome = autoscaler(trace, policy, &h, restore_s).0;
                    let run = if k == 1.0 { " (as run)" } else { "" };
                    let setting = format!("restore CPU {:.1} ms{run}", h.restore_cpu_s * 1e3);
                    Point { policy: "ember, restore priced", setting, outcome }
                })
                .collect::<Vec<_>>()
        });
        let hybrid = s.spawn(|| {
            hybrids
                .iter()
                .map(|&(tail, range_s)| {
                    let p = super::hybrid::HybridParams { tail, range_s, ..Default::default() };
                    let outcome = super::hybrid::hybrid(trace, &p, restore_s);
                    let setting = format!("keep-alive p{}, range {} min", tail * 100.0, range_s / 60.0);
                    Point { policy: "hybrid histogram", setting, outcome }
                })
                .collect::<Vec<_>>()
        });
        let mut out: Vec<Point> = windows
            .iter()
            .map(|&w| Point {
                policy: "keep-alive",
                setting: format!("{w} s"),
                outcome: keep_alive(trace, w, restore_s),
            })
            .collect();
        out.extend(ours.join().unwrap_or_default());
        out.extend(priced.join().unwrap_or_default());
        out.extend(hybrid.join().unwrap_or_default());
        out
    })
}

/// The trade-off curve as a table (the restores' CPU at `host`'s price, whatever the point's).
pub fn curve_table(points: &[Point], host: &SimHost) -> String {
    let mut s = format!(
        "{:<22} {:<34} {:>11} {:>10} {:>13} {:>11} {:>9} {:>9}\n",
        "policy", "setting", "cold starts", "cold rate", "idle clone-s", "restore/inv", "peak", "host peak"
    );
    for p in points {
        let b = host.bill(p.policy, &p.outcome);
        s.push_str(&format!(
            "{:<22} {:<34} {:>11} {:>9.4}% {:>13.0} {:>10.2}% {:>9} {:>9}\n",
            p.policy,
            p.setting,
            b.cold_starts,
            b.cold_start_rate * 100.0,
            b.idle_clone_seconds,
            b.restores_per_invocation * 100.0,
            b.peak_clones,
            b.host_peak_clones
        ));
    }
    s
}

/// The trade-off curve as an SVG plot: three panels over the same axis of idle clone-seconds
/// (log): the cold-start rate (log), restores per invocation (log) and the host's peak clones; a
/// line per policy, each point labelled with its setting in the first panel.
pub fn curve_svg(points: &[Point], title: &str) -> String {
    use crate::svg::{decades, Doc};
    let (w, left, right, top, panel_h, gap, bottom) = (860.0, 80.0, 240.0, 50.0, 300.0, 50.0, 60.0);
    let h = top + 3.0 * panel_h + 2.0 * gap + bottom;
    let pw = w - left - right;
    let idle = |p: &Point| p.outcome.idle_clone_seconds.max(1.0);
    let (x0, x1) =
        decades(points.iter().map(idle).fold(f64::INFINITY, f64::min), points.iter().map(idle).fold(1.0, f64::max));
    let x = |v: f64| left + (v.log10() - x0) / (x1 - x0) * pw;
    let mut doc = Doc::new(w, h, title, left + pw / 2.0);
    let colours = [
        ("ember", "#d62728"),
        ("ember, restore priced", "#ff7f0e"),
        ("keep-alive", "#1f77b4"),
        ("hybrid histogram", "#2ca02c"),
    ];
    let rate =
        |v: u64, p: &Point| if p.outcome.invocations == 0 { 0.0 } else { v as f64 / p.outcome.invocations as f64 };
    type Measure<'a> = Box<dyn Fn(&Point) -> f64 + 'a>;
    let panels: [(&str, bool, Measure); 3] = [
        ("cold-start rate", true, Box::new(|p: &Point| p.outcome.cold_start_rate())),
        ("restores per invocation", true, Box::new(move |p: &Point| rate(p.outcome.restores, p))),
        ("host peak clones", false, Box::new(|p: &Point| p.outcome.host_peak_clones as f64)),
    ];
    for (i, (name, log, measure)) in panels.iter().enumerate() {
        let ptop = top + i as f64 * (panel_h + gap);
        // On a log axis 0 is drawn a decade below the lowest other value.
        let lowest = points.iter().map(measure).filter(|&r| r > 0.0).fold(1.0, f64::min);
        let floor = if *log { 10f64.powf(lowest.log10().floor() - 1.0) } else { 0.0 };
        let v = |p: &Point| measure(p).max(floor);
        let top_v = points.iter().map(&v).fold(if *log { floor * 10.0 } else { 1.0 }, f64::max);
        let (y0, y1) = if *log { decades(floor, top_v) } else { (0.0, top_v * 1.1) };
        let y = |val: f64| {
            let frac = if *log { (val.log10() - y0) / (y1 - y0) } else { (val - y0) / (y1 - y0) };
            ptop + panel_h - frac * panel_h
        };
        doc.log_x_grid(
            (x0, x1),
            x,
            (ptop, panel_h),
            |m, d, _| if m == 1.0 { format!("1e{d}") } else { format!("{m}e{d}") },
        );
        let ticks: Vec<(f64, String)> = if *log {
            (y0 as i32..=y1 as i32)
                .map(|d| {
                    let at = 10f64.powi(d);
                    let label = if d == y0 as i32 { "0".to_string() } else { format!("{}%", 10f64.powi(d + 2)) };
                    (at, label)
                })
                .collect()
        } else {
            (0..=4).map(|k| (y1 * f64::from(k) / 4.0, format!("{:.0}", y1 * f64::from(k) / 4.0))).collect()
        };
        for (at, label) in ticks {
            let py = y(at);
            doc.raw(format_args!(r##"<line x1="{left}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/>"##, left + pw));
            doc.text(left - 6.0, py + 4.0, "end", "", &label);
        }
        doc.raw(format_args!(
            r#"<rect x="{left}" y="{ptop}" width="{pw}" height="{panel_h}" fill="none" stroke="black"/>"#
        ));
        let mid = ptop + panel_h / 2.0;
        doc.text(18.0, mid, "middle", &format!(r#" transform="rotate(-90 18 {mid})""#), name);
        for (name, colour) in colours.iter() {
            let mut series: Vec<&Point> = points.iter().filter(|p| p.policy == *name).collect();
            series.sort_by(|a, b| idle(a).total_cmp(&idle(b)));
            let path: Vec<String> = series.iter().map(|p| format!("{:.1},{:.1}", x(idle(p)), y(v(p)))).collect();
            doc.raw(format_args!(
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            ));
            let mut labelled: Vec<(f64, f64)> = Vec::new();
            for p in &series {
                let (px, py) = (x(idle(p)), y(v(p)));
                doc.raw(format_args!(r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{colour}"/>"#));
                // Settings in the first panel only; one label where points coincide.
                if i > 0 || labelled.iter().any(|&(lx, ly)| (lx - px).abs() < 40.0 && (ly - py).abs() < 10.0) {
                    continue;
                }
                labelled.push((px, py));
                doc.text(px + 6.0, py - 6.0, "start", &format!(r#" fill="{colour}" font-size="10""#), &p.setting);
            }
        }
    }
    doc.text(left + pw / 2.0, h - 16.0, "middle", "", "idle clone-seconds");
    for (i, (name, colour)) in colours.iter().enumerate() {
        let ly = top + 20.0 + 22.0 * i as f64;
        let lx = left + pw + 16.0;
        doc.raw(format_args!(
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 24.0
        ));
        doc.text(lx + 30.0, ly + 4.0, "start", "", name);
    }
    doc.finish()
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
        let mut per_s = std::collections::BTreeMap::new();
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
        let a = autoscaler(&t, &p, &SimHost::default(), 0.05).0;
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
        let cold = |t: &[Invocation], p: &PoolPolicy| autoscaler(t, p, &SimHost::default(), 0.05).0.cold_starts;
        let first = cold(&one, &p);
        assert!(first > 0, "a first burst from an idle pool has cold starts");
        assert_eq!(cold(&two, &p), first, "the second burst had cold starts");
        // Without the reserve the second burst starts from nothing again.
        let p = PoolPolicy { burst_window_s: 0.0, ..p };
        assert!(cold(&two, &p) > cold(&one, &p));
    }

    #[test]
    fn recycled_clones_serve_many_invocations() {
        // 200 a second, 0.1 s each.
        let t: Vec<Invocation> = (0..20_000)
            .map(|i| Invocation { arrival: f64::from(i) * 0.005, function: "f".into(), duration: 0.1 })
            .collect();
        let run =
            |max_uses| autoscaler(&t, &PoolPolicy { max_uses, ..Default::default() }, &SimHost::default(), 0.05).0;
        let single = run(Some(1));
        assert!(single.restores >= 20_000, "{single:?}");
        // Recycling is the default for invocations.
        let reused = run(None);
        assert!(reused.cold_starts <= 5, "only as it starts: {reused:?}");
        assert!(reused.restores * 10 < single.restores, "{reused:?}");
        let twice = run(Some(2));
        assert!((10_000..12_000).contains(&twice.restores), "{twice:?}");
    }

    #[test]
    fn a_steady_function_does_not_churn() {
        // 20 a second, 100 ms each, 10 minutes: a few clones in use at once, recycled.
        let t = generate(Shape::Steady, 600.0, 3);
        let a = autoscaler(&t, &PoolPolicy::default(), &SimHost::default(), 0.05).0;
        assert_eq!(a.cold_starts, 0, "{a:?}");
        // (A restore for every 3.6 invocations before clones in use counted as the pool's.)
        assert!((a.restores as f64) < 0.03 * t.len() as f64, "{} restores for {} invocations", a.restores, t.len());
        // Never one clone per invocation: the clones in use stay a handful.
        assert!(a.peak_clones < 30, "{a:?}");
    }

    #[test]
    fn a_burst_reuses_its_recycled_clones() {
        // A quiet function (one call a minute), then 400 calls in 4 s, 200 ms each: about 20 in
        // use at once, each clone serving many of them.
        let mut t: Vec<Invocation> =
            (0..10).map(|i| Invocation { arrival: f64::from(i) * 60.0, function: "f".into(), duration: 0.2 }).collect();
        t.extend((0..400).map(|i| Invocation {
            arrival: 600.0 + f64::from(i) * 0.01,
            function: "f".into(),
            duration: 0.2,
        }));
        let a = autoscaler(&t, &PoolPolicy::default(), &SimHost::default(), 0.05).0;
        assert!(a.restores < 150, "{a:?}");
        assert!(a.peak_clones < 60, "{a:?}");
        // Without recycling, each call of the burst is a restore.
        let single = PoolPolicy { max_uses: Some(1), ..Default::default() };
        assert!(autoscaler(&t, &single, &SimHost::default(), 0.05).0.restores >= 400);
    }

    #[test]
    fn dearer_restores_mean_fewer_of_them_and_more_idle_clones() {
        let t = generate(Shape::Diurnal, 600.0, 5);
        let run = |cpu_ms: f64| {
            let host = SimHost { restore_cpu_s: cpu_ms / 1e3, ..SimHost::default() };
            autoscaler(&t, &PoolPolicy::default(), &host, 0.05).0
        };
        let (cheap, dear) = (run(1.0), run(400.0));
        assert!(dear.restores < cheap.restores, "{cheap:?} {dear:?}");
        assert!(dear.idle_clone_seconds > cheap.idle_clone_seconds, "{cheap:?} {dear:?}");
        assert_eq!((cheap.cold_starts, dear.cold_starts), (0, 0));
    }

    #[test]
    fn a_small_fleet_keeps_its_cold_starts_and_stops_churning() {
        let p = super::super::traces::FleetParams { functions: 40, seconds: 900.0, seed: 5, ..Default::default() };
        let t = super::super::traces::fleet(&p);
        let a = autoscaler(&t, &PoolPolicy::default(), &SimHost::default(), 0.05).0;
        let ka = keep_alive(&t, 600.0, 0.05);
        assert!(a.cold_start_rate() < 1e-4, "{a:?}");
        // (35 to 40% of invocations before clones in use counted as the pool's.)
        assert!((a.restores as f64) < 0.12 * a.invocations as f64, "{a:?}");
        assert!(a.idle_clone_seconds < ka.idle_clone_seconds, "{a:?} {ka:?}");
    }

    #[test]
    fn the_host_peak_counts_every_function_at_once() {
        // Two functions busy at different times: each has its peak, the host the larger one.
        let mut t: Vec<Invocation> = (0..5)
            .map(|i| Invocation { arrival: 1.0 + f64::from(i) * 0.01, function: "a".into(), duration: 10.0 })
            .collect();
        t.extend((0..3).map(|i| Invocation {
            arrival: 2000.0 + f64::from(i) * 0.01,
            function: "b".into(),
            duration: 10.0,
        }));
        t.sort_by(|x, y| x.arrival.total_cmp(&y.arrival));
        let ka = keep_alive(&t, 60.0, 0.05);
        assert_eq!((ka.peak_clones, ka.host_peak_clones), (8, 5), "{ka:?}");
        let h = super::super::hybrid::hybrid(&t, &Default::default(), 0.05);
        assert_eq!(h.peak_clones, 8, "{h:?}");
        assert!(h.host_peak_clones < 8 && h.host_peak_clones >= 5, "{h:?}");
        let a = autoscaler(&t, &PoolPolicy::default(), &SimHost::default(), 0.05).0;
        assert!(a.host_peak_clones < a.peak_clones, "{a:?}");
    }

    #[test]
    fn the_report_bills_restores_and_the_peak() {
        let t = generate(Shape::Steady, 120.0, 2);
        let host = SimHost::default();
        let rows = vec![("ember".to_string(), autoscaler(&t, &PoolPolicy::default(), &host, 0.05).0)];
        let report = Report { trace: "steady".into(), restore_s: 0.05, host: host.clone(), rows };
        let b = &report.bills()[0];
        assert!((b.restore_cpu_seconds - b.restores as f64 * RESTORE_CPU_S).abs() < 1e-9, "{b:?}");
        assert!((b.host_peak_memory_mib - b.host_peak_clones as f64 * 128.0).abs() < 1e-9, "{b:?}");
        let cost = host.host.restore_cost_s(RESTORE_CPU_S, 128.0);
        assert!((b.bill_clone_seconds - b.idle_clone_seconds - b.restores as f64 * cost).abs() < 1e-6, "{b:?}");
        let json = report.json(None);
        assert_eq!(json["policies"][0]["restores"], b.restores);
        assert!(report.to_string().contains("host peak"), "{report}");
    }

    #[test]
    fn the_autoscaler_covers_a_steady_load() {
        let t = generate(Shape::Steady, 300.0, 3);
        let a = autoscaler(&t, &PoolPolicy::default(), &SimHost::default(), 0.05).0;
        assert!(a.cold_start_rate() < 0.01, "{a:?}");
    }
}
