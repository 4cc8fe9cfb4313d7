//! The vocabulary every policy and the simulator share: an invocation trace (CSV in and out),
//! what a policy did over one ([`Outcome`]), and the small helpers the policies' replays use
//! (per-function split, the accounting horizon, a sortable f64, a reproducible RNG).

use std::collections::BTreeMap;

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

/// Writes a trace as CSV.
pub fn to_csv(trace: &[Invocation]) -> String {
    let mut s = String::from("arrival_s,function,duration_s\n");
    for i in trace {
        s.push_str(&format!("{:.6},{},{:.6}\n", i.arrival, i.function, i.duration));
    }
    s
}

/// What one policy did over a trace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub invocations: u64,
    pub cold_starts: u64,
    /// Seconds that ready-but-unused clones existed, summed over clones.
    pub idle_clone_seconds: f64,
    /// Most clones (ready + busy) at once, summed over functions.
    pub peak_clones: u64,
    /// Clones restored (cold starts included).
    pub restores: u64,
    /// Most clones at once, all functions together (set by [`total`]; 0 in one function's
    /// row).
    pub host_peak_clones: u64,
    /// When clones came (+1) and went (-1): what the host's peak is taken from.
    pub(super) changes: Vec<(f64, i32)>,
}

impl Outcome {
    pub fn cold_start_rate(&self) -> f64 {
        if self.invocations == 0 {
            0.0
        } else {
            self.cold_starts as f64 / self.invocations as f64
        }
    }

    pub(super) fn add(&mut self, o: &Outcome) {
        self.invocations += o.invocations;
        self.cold_starts += o.cold_starts;
        self.idle_clone_seconds += o.idle_clone_seconds;
        self.peak_clones += o.peak_clones;
        self.restores += o.restores;
    }

    /// A clone came (`+1`) or went (`-1`) at `at`.
    pub(super) fn change(&mut self, at: f64, by: i32) {
        self.changes.push((at, by));
    }
}

/// The most clones at once over `changes` (at one instant, those going go first).
fn peak_of<'a>(changes: impl Iterator<Item = &'a (f64, i32)>) -> u64 {
    let mut all: Vec<(f64, i32)> = changes.copied().collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i64, 0i64);
    for (_, by) in all {
        now += i64::from(by);
        most = most.max(now);
    }
    most as u64
}

pub(super) fn by_function(trace: &[Invocation]) -> BTreeMap<&str, Vec<&Invocation>> {
    let mut m: BTreeMap<&str, Vec<&Invocation>> = BTreeMap::new();
    for inv in trace {
        m.entry(&inv.function).or_default().push(inv);
    }
    m
}

/// When the last invocation of a trace has ended (arriving at a cold start at worst): every
/// policy is accounted up to here.
pub(super) fn horizon(invs: &[&Invocation], restore_s: f64) -> f64 {
    invs.iter().map(|i| i.arrival + restore_s + i.duration).fold(0.0, f64::max)
}

/// The sum of per-function outcomes.
pub fn total(rows: &[(String, Outcome)]) -> Outcome {
    let mut t = Outcome::default();
    rows.iter().for_each(|r| t.add(&r.1));
    t.host_peak_clones = peak_of(rows.iter().flat_map(|r| r.1.changes.iter()));
    t
}

/// An f64 that sorts (no NaNs reach it: traces are checked).
#[derive(Clone, Copy, PartialEq)]
pub(super) struct OrdF64(pub(super) f64);
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

/// A small deterministic RNG (xorshift64*), so that generated traces are reproducible.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        // Distinct seeds give unrelated streams: splitmix the seed first.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)).max(1))
    }

    pub(super) fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(super) fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next_f64()).ln()
    }

    /// A standard normal (Box-Muller).
    pub(super) fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.next_f64(), self.next_f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n.saturating_sub(1))
    }

    pub(super) fn poisson(&mut self, mean: f64) -> u32 {
        // Small means only (batch sizes): by inversion.
        let (mut k, mut p, l) = (0u32, 1.0, (-mean).exp());
        loop {
            p *= self.next_f64();
            if p <= l || k >= 10_000 {
                return k;
            }
            k += 1;
        }
    }
}
