//! What the autoscaler knows of a function's arrivals: the model behind its targets. Pure logic,
//! fed the time of every handoff and asked, at each tick, what the k-th ready clone is worth: the
//! cold starts it is expected to save per second.
//!
//! A pool is refilled after every handoff, so a cold start is an arrival that comes while the
//! refills of earlier ones are still restoring: with n ready clones, an arrival is cold when n
//! others arrived within one refill time before it. The k-th ready clone is therefore worth the
//! rate of arrivals that find k - 1 others within a refill before them. Two estimates of it, the
//! larger one counts:
//!
//! - **now** (hot functions): the arrival rate over the last `peak_window_s` (its arrivals less
//!   one: one arrival alone says nothing of a rate), or over the last tick, 2 ticks or second
//!   when that is well beyond it (more than 4 standard deviations of Poisson arrivals at the
//!   longer rate, and 1: the onset of a burst, seen within a tick; and between ticks, at every
//!   arrival, the rate since the last tick when it is as far beyond, or when the arrival found the
//!   pool empty), Poisson within a refill: the
//!   k-th clone is worth rate x P(k - 1 arrivals within a refill);
//! - **between clusters** (rare and bursty functions, the pool a quiet function should keep):
//!   arrivals less than a refill apart form a cluster (one invocation, a queue's batch, the start
//!   of a burst). The k-th clone is worth the rate of clusters x the share of recent clusters that
//!   needed k clones before a tick could react (arrivals within one refill, in a cluster's first
//!   refill + tick; with one cluster more than seen, k deep with probability 2^(1 - k) for a
//!   function just registered, a belief in deep clusters that fades with a half-life of a minute
//!   of its age). The rate of clusters is
//!   - for a **periodic** function (its last three gaps between clusters agree to within 2%, or
//!     within the refill and a tick): one arrival spread over a window around the next predicted
//!     one (four times the spread of those gaps, 0.5% of the period, a refill and a tick, either
//!     side), nothing before
//!     it (the clone is restored ahead of the arrival, unloaded after);
//!   - otherwise the clusters seen per second of history, both forgotten with a half-life (the
//!     policy's `burst_window_s`; 0 turns this estimate off); with none seen yet, what a rate spread log-uniformly over 9 decades (from once a
//!     month to a thousand a second, the spread of the Azure Functions trace) leaves after that
//!     long without one: about 1 / (T ln(1 / (T x once a month))).
//!
//! So a quiet function keeps a clone while it is called more often than the price asks, a timer
//! has one only around its firing, and a function that had bursts keeps a reserve for their
//! onsets that decays as time passes without one.

use std::collections::VecDeque;

/// The rarest rate the prior allows: once a month.
const RAREST: f64 = 1.0 / (30.0 * 86_400.0);
/// The largest cluster depth recorded (deeper ones count as this deep).
const MAX_DEPTH: usize = 256;
/// The weight of the prior on clusters' depths, in clusters, at registration, and its half-life.
const PRIOR_CLUSTERS: f64 = 1.0;
const PRIOR_HALF_LIFE_S: f64 = 60.0;
/// Gaps between clusters kept for the periodicity check.
const GAPS: usize = 3;
/// A tick's arrival counts kept for the short windows (60 s of 100 ms ticks at most).
const MAX_TICKS: usize = 600;
/// The half-life of what is remembered of how long a clone stays in use per handoff.
const OCCUPANCY_HALF_LIFE_S: f64 = 300.0;
/// The half-life of the arrivals a pool's level of recycled clones follows.
const LEVEL_HALF_LIFE_S: f64 = 30.0;

/// Exponentially forgotten counts (lazily: decayed to `at` when touched), with a half-life.
#[derive(Clone, Debug)]
struct Decayed {
    value: f64,
    at: f64,
    half_life: f64,
}

impl Decayed {
    fn new(at: f64, half_life: f64) -> Self {
        Self { value: 0.0, at, half_life: half_life.max(1e-3) }
    }

    fn factor(&self, from: f64, to: f64) -> f64 {
        (-(to - from).max(0.0) * std::f64::consts::LN_2 / self.half_life).exp()
    }

    fn get(&self, now: f64) -> f64 {
        self.value * self.factor(self.at, now)
    }

    fn add(&mut self, now: f64, v: f64) {
        self.value = self.get(now) + v;
        self.at = now.max(self.at);
    }
}

/// What the model expects of the next cluster (for metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// No cluster seen yet.
    Unknown,
    /// Clusters at this rate (per second).
    Rate(f64),
    /// Periodic: the next one is expected at this time, give or take this much.
    Periodic { next: f64, within: f64 },
}

/// The model of one function's arrivals.
#[derive(Debug)]
pub struct ArrivalModel {
    /// When the function was registered (its history starts).
    born: f64,
    /// Arrival counts of the last ticks (newest last), and the tick's own count so far.
    ticks: VecDeque<u32>,
    this_tick: u32,
    /// The windows of the rate now, in ticks (1, 2, 1 s and the longest), and their arrivals.
    windows: [usize; 4],
    sums: [u64; 4],
    /// Arrivals within the last refill time (their times).
    recent: VecDeque<f64>,
    /// The cluster under way: when it started, the deepest it got in its first refill + tick.
    cluster: Option<(f64, u32)>,
    last_arrival: Option<f64>,
    /// Clusters seen (forgotten with the half-life), and how many needed at least k clones
    /// (depths[k - 1]).
    clusters: Decayed,
    depths: Vec<f64>,
    depths_at: f64,
    /// Starts of the last clusters, for the periodicity check.
    starts: VecDeque<f64>,
    /// The refill time and tick last seen, and when the last tick was.
    refill_s: f64,
    tick_s: f64,
    ticked_at: f64,
    /// Whether clusters are remembered at all (a half-life above 0).
    remembers: bool,
    /// Whether it has been ticked yet.
    ticked: bool,
    /// Clone-seconds in use and handoffs, both forgotten with [`OCCUPANCY_HALF_LIFE_S`]: their
    /// ratio is how long a handoff keeps a clone (Little's law), whatever the handoffs do.
    busy_s: Decayed,
    handoffs: Decayed,
    /// Handoffs forgotten with a half-life of [`LEVEL_HALF_LIFE_S`]: the rate a pool's level is
    /// set by.
    lately: Decayed,
    /// Handoffs that ended, and those whose clone came back (recycled), forgotten alike.
    ended: Decayed,
    came_back: Decayed,
}

impl ArrivalModel {
    /// A function registered at `now`, ticked every `tick_s`, remembering clusters with a
    /// half-life of `memory_s` (0: not at all), its rate now taken over `window_s` at most.
    pub fn new(now: f64, tick_s: f64, memory_s: f64, window_s: f64) -> Self {
        let ticks = |s: f64| ((s / tick_s).round() as usize).clamp(1, MAX_TICKS);
        let longest = ticks(window_s).max(ticks(1.0));
        Self {
            born: now,
            ticks: VecDeque::with_capacity(longest + 1),
            this_tick: 0,
            windows: [1, 2.min(longest), ticks(1.0), longest],
            sums: [0; 4],
            recent: VecDeque::new(),
            cluster: None,
            last_arrival: None,
            clusters: Decayed::new(now, memory_s),
            depths: Vec::new(),
            depths_at: now,
            starts: VecDeque::with_capacity(GAPS + 2),
            refill_s: 0.0,
            tick_s,
            ticked_at: now,
            remembers: memory_s > 0.0,
            ticked: false,
            busy_s: Decayed::new(now, OCCUPANCY_HALF_LIFE_S),
            handoffs: Decayed::new(now, OCCUPANCY_HALF_LIFE_S),
            lately: Decayed::new(now, LEVEL_HALF_LIFE_S),
            ended: Decayed::new(now, OCCUPANCY_HALF_LIFE_S),
            came_back: Decayed::new(now, OCCUPANCY_HALF_LIFE_S),
        }
    }

    /// A handoff at `now` (warm or cold).
    pub fn arrival(&mut self, now: f64) {
        self.this_tick = self.this_tick.saturating_add(1);
        self.handoffs.add(now, 1.0);
        self.lately.add(now, 1.0);
        let r = self.refill_s.max(1e-6);
        while self.recent.front().is_some_and(|&t| t <= now - r) {
            self.recent.pop_front();
        }
        // (Bounded: a clone per arrival within a refill would be beyond any pool anyway.)
        if self.recent.len() < MAX_DEPTH {
            self.recent.push_back(now);
        }
        let depth = self.recent.len() as u32;
        let gap = self.last_arrival.map_or(f64::INFINITY, |l| now - l);
        self.last_arrival = Some(now);
        // A surge within a cluster whose early part is over (a burst on a busy function) counts as
        // a cluster of its own: its onset is what a reserve would have to cover.
        let early = |start: f64| now - start <= r + self.tick_s;
        let surging = self.cluster.is_some_and(|(start, _)| !early(start)) && self.surge(now, false).is_some();
        match &mut self.cluster {
            Some((start, deepest)) if gap < r && !surging => {
                if now - *start <= r + self.tick_s {
                    *deepest = (*deepest).max(depth);
                }
            }
            _ => {
                self.close_cluster(now);
                self.cluster = Some((now, depth));
                self.clusters.add(now, 1.0);
                if self.starts.len() == GAPS + 1 {
                    self.starts.pop_front();
                }
                self.starts.push_back(now);
            }
        }
    }

    /// Records the finished cluster's depth.
    fn close_cluster(&mut self, now: f64) {
        let Some((_, deepest)) = self.cluster.take() else { return };
        let f = self.clusters.factor(self.depths_at, now);
        self.depths.iter_mut().for_each(|d| *d *= f);
        self.depths_at = now.max(self.depths_at);
        let k = (deepest as usize).clamp(1, MAX_DEPTH);
        if self.depths.len() < k {
            self.depths.resize(k, 0.0);
        }
        self.depths[..k].iter_mut().for_each(|d| *d += 1.0);
    }

    /// A tick at `now`: closes the tick's count; `refill_s` is how long a refill takes now, `busy`
    /// the clones in use (since the last tick, as far as the model knows). The function's history
    /// starts at its first tick (a function whose template is still being made is not ticked),
    /// unless an arrival came first.
    pub fn tick(&mut self, now: f64, refill_s: f64, busy: u32) {
        if self.ticked {
            self.busy_s.add(now, f64::from(busy) * (now - self.ticked_at).max(0.0));
        }
        if !self.ticked && self.last_arrival.is_none() {
            self.born = now;
            self.clusters = Decayed::new(now, self.clusters.half_life);
        }
        self.ticked = true;
        self.refill_s = refill_s.max(0.0);
        self.ticked_at = now;
        let c = std::mem::take(&mut self.this_tick);
        self.ticks.push_back(c);
        let n = self.ticks.len();
        for (sum, &w) in self.sums.iter_mut().zip(&self.windows) {
            *sum += u64::from(c);
            if n > w {
                *sum -= u64::from(self.ticks[n - 1 - w]);
            }
        }
        if n > self.windows[3] {
            self.ticks.pop_front();
        }
        // A cluster whose early part is over is recorded now, so that its depth counts at once.
        if let Some((start, _)) = self.cluster {
            if now - start > self.refill_s + self.tick_s {
                self.close_cluster(now);
            }
        }
    }

    /// Arrivals per second over the last half-minutes (forgotten with a half-life of
    /// 30 s), as of the last tick.
    pub fn rate_level(&self) -> f64 {
        let r = &self.lately;
        let history = r.half_life / std::f64::consts::LN_2 * (1.0 - r.factor(self.born, self.ticked_at));
        r.get(self.ticked_at) / history.max(self.tick_s)
    }

    /// Arrivals per second over the longest window (its arrivals less one).
    pub fn rate_long(&self) -> f64 {
        let w = self.windows[3].min(self.ticks.len().max(1)) as f64 * self.tick_s;
        self.sums[3].saturating_sub(1) as f64 / w
    }

    /// Arrivals per second now: the rate over the longest window, or a shorter window's when it
    /// is well beyond that (see the module's description).
    pub fn rate_now(&self) -> f64 {
        let have = self.ticks.len().max(1);
        let rate = |i: usize| {
            let w = self.windows[i].min(have) as f64 * self.tick_s;
            (self.sums[i].saturating_sub(1) as f64 / w, w)
        };
        let (long, _) = rate(3);
        let mut best = long;
        for i in 0..3 {
            let (r, w) = rate(i);
            if beyond(self.sums[i], long * w) {
                best = best.max(r);
            }
        }
        best
    }

    /// The arrival rate since the last tick, at `now`, when it is well beyond the rate now (the
    /// onset of a burst between ticks: then as low as the arrivals seen make likely, their count
    /// less one and less two standard deviations, at least one, so that a chance cluster on a
    /// busy function is not taken for a burst's full rate), or whatever it is when the pool ran
    /// dry (`cold`: demand beyond what the pool was sized for, whatever the statistics say);
    /// `None` otherwise.
    pub fn surge(&self, now: f64, cold: bool) -> Option<f64> {
        let elapsed = (now - self.ticked_at).max(self.refill_s).max(1e-3);
        let long = self.rate_now();
        let k = u64::from(self.this_tick);
        if cold {
            return Some(k as f64 / elapsed);
        }
        beyond(k, long * elapsed).then(|| (k.saturating_sub(1) as f64 - 2.0 * (k as f64).sqrt()).max(1.0) / elapsed)
    }

    /// How long a refill takes, as of the last tick.
    pub fn refill_s(&self) -> f64 {
        self.refill_s
    }

    /// The clones expected back within a refill of `busy` in use that come back: each done within
    /// it with the probability an exponential occupancy of the mean seen gives.
    pub fn returns_within_refill(&self, busy: f64) -> f64 {
        match self.occupancy_s() {
            Some(d) if busy > 0.0 && d > 0.0 => busy * (1.0 - (-self.refill_s / d).exp()),
            _ => 0.0,
        }
    }

    /// `ended` handoffs that ended by `now`, `came_back` of them with their clone back in the
    /// pool.
    pub fn released(&mut self, now: f64, ended: u32, came_back: u32) {
        if ended > 0 {
            self.ended.add(now, f64::from(ended));
            self.came_back.add(now, f64::from(came_back.min(ended)));
        }
    }

    /// The share of handoffs whose clone comes back (0 until one has ended).
    pub fn return_share(&self) -> f64 {
        let ended = self.ended.get(self.ticked_at);
        if ended <= 0.0 {
            return 0.0;
        }
        (self.came_back.get(self.ticked_at) / ended).clamp(0.0, 1.0)
    }

    /// How long a handoff keeps its clone, on average (clone-seconds in use per handoff, as of
    /// the last tick); `None` before enough handoffs to say (the equivalent of one, forgotten).
    pub fn occupancy_s(&self) -> Option<f64> {
        let n = self.handoffs.get(self.ticked_at);
        (n >= 1.0).then(|| self.busy_s.get(self.ticked_at) / n)
    }

    /// The pattern of clusters as of `now`.
    pub fn pattern(&self, now: f64) -> Pattern {
        let seen = self.clusters.get(now);
        if self.starts.is_empty() {
            return Pattern::Unknown;
        }
        if self.starts.len() == GAPS + 1 {
            let mut gaps = [0.0; GAPS];
            for (g, (a, b)) in gaps.iter_mut().zip(self.starts.iter().zip(self.starts.iter().skip(1))) {
                *g = b - a;
            }
            gaps.sort_by(f64::total_cmp);
            let period = gaps[GAPS / 2];
            let spread = gaps[GAPS - 1] - gaps[0];
            let slack = (0.02 * period).max(self.refill_s + self.tick_s);
            let last = self.starts.back().copied().unwrap_or(now);
            // The window: four times the spread seen, 0.5% of the period, a refill and a tick.
            let within = 4.0 * spread + 0.005 * period + self.refill_s + self.tick_s;
            if spread <= slack && now <= last + period + within {
                return Pattern::Periodic { next: last + period, within };
            }
        }
        // Clusters per second of (forgotten) history since the function was registered.
        let c = &self.clusters;
        let history = c.half_life / std::f64::consts::LN_2 * (1.0 - c.factor(self.born, now));
        Pattern::Rate(seen / history.max(self.tick_s))
    }

    /// Clusters expected per second around `now`: the pattern's rate, or with no cluster yet the
    /// prior's (see the module's description).
    pub fn cluster_rate(&self, now: f64) -> f64 {
        match self.pattern(now) {
            Pattern::Unknown => {
                let t = (now - self.born).max(1.0);
                1.0 / (t * ((1.0 / (RAREST * t)).ln() - 0.577).max(1.0))
            }
            Pattern::Rate(r) => r,
            Pattern::Periodic { next, within } => {
                // Ready from a refill and a tick before the window opens until it closes.
                let lead = self.refill_s + self.tick_s;
                if now + lead >= next - within && now <= next + within {
                    1.0 / (2.0 * within)
                } else {
                    0.0
                }
            }
        }
    }

    /// The share of recent clusters that needed at least `k` clones (1 for k = 1).
    fn deeper(&self, k: usize, prior: f64) -> f64 {
        if k <= 1 {
            return 1.0;
        }
        let all = self.depths.first().copied().unwrap_or(0.0);
        let seen = self.depths.get(k - 1).copied().unwrap_or(0.0);
        (seen + prior * 0.5f64.powi(k as i32 - 1)) / (all + PRIOR_CLUSTERS)
    }

    /// How many ready clones are worth at least `price` cold starts saved per second each, with
    /// arrival rates multiplied by `headroom`, up to `cap`, by the two estimates: (now, between
    /// clusters); `busy` clones in use that come back when done (0: none does).
    pub fn wanted_parts(&self, now: f64, price: f64, headroom: f64, cap: u32, busy: f64) -> (u32, u32) {
        let price = price.max(1e-12);
        // Now: Poisson arrivals within a refill at the current rate, less the clones in use
        // expected back within it (each done within a refill with the probability an
        // exponential occupancy of the mean seen gives).
        let rate = self.rate_now() * headroom;
        let now_n = net_wanted(rate, self.refill_s, self.returns_within_refill(busy), price, cap);
        (now_n, self.reserve(now, price, headroom, cap))
    }

    /// The ready clones worth `price` between clusters (see the module's description).
    pub fn reserve(&self, now: f64, price: f64, headroom: f64, cap: u32) -> u32 {
        // Between clusters: their rate x the share that went at least k deep.
        let clusters = if self.remembers { self.cluster_rate(now) * headroom } else { 0.0 };
        // One cluster more than seen, k deep with probability 2^(1 - k) for a function just
        // registered, a belief in deep clusters that fades with a half-life of a minute of its
        // age (the cluster itself stays: one cluster no deeper than 1).
        let prior = PRIOR_CLUSTERS * 0.5f64.powf((now - self.born) / PRIOR_HALF_LIFE_S);
        let mut quiet_n = 0u32;
        while quiet_n < cap && clusters * self.deeper(quiet_n as usize + 1, prior) >= price {
            quiet_n += 1;
        }
        quiet_n
    }

    /// Arrivals expected per second now: the larger of the rate now and the clusters' rate (for
    /// /metrics).
    pub fn predicted_rate(&self, now: f64) -> f64 {
        self.rate_now().max(self.cluster_rate(now))
    }
}

/// Whether `count` arrivals are well beyond `expected` (more than 4 standard deviations of
/// Poisson arrivals, and 1).
fn beyond(count: u64, expected: f64) -> bool {
    count.saturating_sub(1) as f64 > expected + 4.0 * expected.sqrt() + 1.0
}

/// The ready clones worth `price` for Poisson arrivals at `rate` refilled in `refill_s`, up to
/// `cap`: the k-th is worth rate x P(k - 1 arrivals within a refill). Up to the most likely count
/// those values rise: the clones below it are needed together, and each is counted at that
/// count's value (the concave envelope), so that a higher price never asks for more.
pub fn poisson_wanted(rate: f64, refill_s: f64, price: f64, cap: u32) -> u32 {
    let mean = rate * refill_s;
    let mode = mean.floor();
    let mut ln_pmf = -mean + mode * mean.max(1e-300).ln() - ln_factorial(mode);
    let mut n = 0u32;
    if rate * ln_pmf.exp() >= price {
        n = (mode as u32).min(cap);
        while n < cap && rate * ln_pmf.exp() >= price {
            n += 1;
            ln_pmf += mean.max(1e-300).ln() - f64::from(n).ln();
        }
    }
    n
}

/// [`poisson_wanted`] for a pool whose clones in use come back: Poisson arrivals at `rate` less
/// Poisson returns with mean `returns` within a refill of `refill_s`. The k-th ready clone is
/// worth rate x P(arrivals - returns = k - 1 within a refill) (a Skellam distribution), with the
/// same envelope; with no returns this is [`poisson_wanted`].
pub fn net_wanted(rate: f64, refill_s: f64, returns: f64, price: f64, cap: u32) -> u32 {
    if returns < 1e-3 {
        return poisson_wanted(rate, refill_s, price, cap);
    }
    let mean = rate * refill_s;
    // Returns beyond this many are too unlikely to count.
    let most = (returns + 8.0 * returns.sqrt() + 8.0).ceil() as usize;
    let pmf = |mean: f64, n: usize| -> Vec<f64> {
        let mut p = Vec::with_capacity(n + 1);
        let mut v = (-mean).exp();
        for k in 0..=n {
            if k > 0 {
                v *= mean / k as f64;
            }
            p.push(v);
        }
        p
    };
    let back = pmf(returns, most);
    let net = |j: u32, arrivals: &[f64]| -> f64 {
        back.iter().enumerate().map(|(r, pr)| pr * arrivals.get(j as usize + r).copied().unwrap_or(0.0)).sum()
    };
    // Arrivals within a refill up to what any k asked for needs.
    let top = (mean + 12.0 * mean.sqrt() + 16.0).ceil() as usize;
    let arrivals = pmf(mean, top + most);
    // The most likely net count is 0 or the arrivals' mode less the returns' mean.
    let mode = (mean - returns).floor().max(0.0) as u32;
    let mut n = 0u32;
    if rate * net(mode, &arrivals) >= price {
        n = mode.min(cap);
        while n < cap && (n as usize) < top && rate * net(n, &arrivals) >= price {
            n += 1;
        }
    }
    n
}

/// The clones worth counting on for a pool whose clones in use come back: arrivals at `rate`
/// each keep one for `occupancy_s`, so that the clones in use are Poisson around rate x
/// occupancy (an M/G/infinity queue). With k counted on, an arrival that finds k in use costs a
/// restore; the k-th is kept while the restores it saves (rate x P(k - 1 in use)), worth
/// `restore_cost` each, pay for the time it is idle (P(at most k - 1 in use)). Up to `cap`.
pub fn recycled_wanted(rate: f64, occupancy_s: f64, restore_cost: f64, cap: u32) -> u32 {
    let mean = rate * occupancy_s;
    let value = rate * restore_cost;
    if !(mean > 0.0 && value >= 1.0) {
        return 0;
    }
    // Far below the mean the ratio P(k - 1) / P(<= k - 1) is large: start there.
    let start = (mean - 8.0 * mean.sqrt()).floor().max(0.0);
    let mut pmf = (-mean + start * mean.ln() - ln_factorial(start)).exp();
    // P(<= start), summed downwards from `start` (below the mean the terms fall as they go).
    let (mut cdf, mut term) = (0.0, pmf);
    let mut j = start;
    while j >= 0.0 && term > cdf * 1e-15 {
        cdf += term;
        term *= j / mean;
        j -= 1.0;
    }
    let mut k = start as u32;
    // The (k + 1)-th is worth keeping while value x P(k) >= P(<= k).
    while k < cap && value * pmf >= cdf {
        k += 1;
        pmf *= mean / f64::from(k);
        cdf = (cdf + pmf).min(1.0);
    }
    k
}

/// E[(level - X)+] for X Poisson with `mean`: the clones of a pool of `level` left idle on
/// average when X are in use.
pub fn poisson_shortfall(mean: f64, level: u32) -> f64 {
    if level == 0 {
        return 0.0;
    }
    // Summed downwards from level - 1 while the terms count.
    let top = f64::from(level - 1);
    let mut pmf = (-mean + top * mean.max(1e-300).ln() - ln_factorial(top)).exp();
    let (mut sum, mut b) = (0.0, top);
    while b >= 0.0 {
        let add = (f64::from(level) - b) * pmf;
        sum += add;
        if b < mean && add < sum * 1e-12 {
            break;
        }
        pmf *= b / mean.max(1e-300);
        b -= 1.0;
    }
    sum
}

/// P(X >= k) for X Poisson with `mean`.
pub fn poisson_tail(mean: f64, k: u32) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if mean <= 0.0 {
        return 0.0;
    }
    // From k upward while the terms count (beyond the mode they fall at least geometrically).
    let kf = f64::from(k);
    let mut term = (-mean + kf * mean.ln() - ln_factorial(kf)).exp();
    let mut sum = 0.0;
    let mut i = kf;
    while term > sum * 1e-12 && i < kf + 10_000.0 {
        sum += term;
        i += 1.0;
        term *= mean / i;
        if i > mean && term < 1e-300 {
            break;
        }
    }
    sum.min(1.0)
}

/// ln(n!) (Stirling's series beyond small n).
fn ln_factorial(n: f64) -> f64 {
    if n < 16.0 {
        (2..=n as u32).map(|k| f64::from(k).ln()).sum()
    } else {
        n * n.ln() - n + 0.5 * (2.0 * std::f64::consts::PI * n).ln() + 1.0 / (12.0 * n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: f64 = 0.1;
    const REFILL: f64 = 0.05;

    /// The ready clones the model wants with nothing in use: the larger of its two estimates.
    fn wanted(m: &ArrivalModel, now: f64, price: f64, headroom: f64, cap: u32) -> u32 {
        let (now_n, reserve) = m.wanted_parts(now, price, headroom, cap, 0.0);
        now_n.max(reserve)
    }

    /// Feeds arrivals (sorted) up to `until`, ticking every 100 ms; calls `each` after every tick.
    fn run(m: &mut ArrivalModel, arrivals: &[f64], from: f64, until: f64, mut each: impl FnMut(&ArrivalModel, f64)) {
        let mut next = arrivals.iter().copied().filter(|&a| a >= from).peekable();
        let mut t = from;
        while t < until {
            t += TICK;
            while let Some(a) = next.next_if(|&a| a < t) {
                m.arrival(a);
            }
            m.tick(t, REFILL, 0);
            each(m, t);
        }
    }

    #[test]
    fn a_new_function_keeps_a_clone_for_minutes_then_lets_it_go() {
        let m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        // Worth a clone at an hour's price for a few minutes after registration (more in the
        // first minutes: see the prior below), not after 20.
        let price = 1.0 / 3600.0;
        assert!(wanted(&m, 60.0, price, 1.0, 100) >= 1);
        assert_eq!(wanted(&m, 300.0, price, 1.0, 100), 1);
        assert_eq!(wanted(&m, 1200.0, price, 1.0, 100), 0);
        assert_eq!(m.pattern(1200.0), Pattern::Unknown);
    }

    #[test]
    fn a_function_just_registered_is_assumed_bursty_for_a_minute_or_so() {
        // One arrival right after registration: the prior's clusters (half of them at least 2
        // deep, a quarter 3...) ask for a few clones; minutes later, with every cluster seen one
        // deep, one clone.
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        run(&mut m, &[0.05], 0.0, 0.2, |_, _| {});
        let early = wanted(&m, 0.2, 1.0 / 3600.0, 1.0, 100);
        assert!(early >= 4, "{early}");
        let arrivals: Vec<f64> = (0..20).map(|i| 0.05 + f64::from(i) * 30.0).collect();
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        run(&mut m, &arrivals, 0.0, 600.0, |_, _| {});
        assert_eq!(wanted(&m, 600.0, 1.0 / 3600.0, 1.0, 100), 1);
    }

    #[test]
    fn a_surge_between_ticks_is_seen_at_once_and_a_cold_start_always_counts() {
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        // A quiet second (one arrival), then 3 arrivals within 10 ms of a tick.
        run(&mut m, &[0.5], 0.0, 1.0, |_, _| {});
        m.arrival(1.001);
        assert_eq!(m.surge(1.001, false), None, "one arrival is no surge");
        assert!(m.surge(1.001, true).is_some(), "a cold start is");
        m.arrival(1.005);
        m.arrival(1.009);
        let rate = m.surge(1.009, false).expect("a surge");
        // 3 arrivals within a refill (50 ms): at least 1 (3 - 1 less two standard deviations).
        assert!((rate - 20.0).abs() < 1e-9, "{rate}");
        let n = poisson_wanted(rate, REFILL, 1.0 / 3600.0, 1000);
        assert!((5..=10).contains(&n), "{n}");
        // Twenty: (20 - 1 - 2 sqrt(20)) / 0.05.
        (0..17).for_each(|i| m.arrival(1.01 + 0.001 * f64::from(i)));
        let rate = m.surge(1.03, false).expect("a surge");
        assert!((rate - (19.0 - 2.0 * 20f64.sqrt()) / 0.05).abs() < 1e-9, "{rate}");
    }

    /// P(X = k) for X Poisson with `mean`, by the definition.
    fn pmf(mean: f64, k: u32) -> f64 {
        (-mean + f64::from(k) * mean.ln() - ln_factorial(f64::from(k))).exp()
    }

    #[test]
    fn poisson_tails_and_shortfalls_are_their_sums() {
        for mean in [0.3, 4.0, 40.0, 300.0] {
            for k in [0u32, 1, 3, (mean * 0.8) as u32, mean as u32, (mean * 1.3) as u32 + 2] {
                let tail: f64 = (k..k + 2000).map(|j| pmf(mean, j)).sum();
                // (Both use Stirling's series for ln(k!): agreement to 1e-6.)
                assert!((poisson_tail(mean, k) - tail).abs() < 1e-6, "{mean} {k}: {} {tail}", poisson_tail(mean, k));
                let short: f64 = (0..k).map(|b| f64::from(k - b) * pmf(mean, b)).sum();
                assert!((poisson_shortfall(mean, k) - short).abs() < 1e-6 * short.max(1.0), "{mean} {k}");
            }
        }
    }

    #[test]
    fn clones_counted_on_cover_those_in_use_as_far_as_restores_are_worth() {
        // 33 arrivals a second kept 1.2 s each: about 40 in use.
        let n = |cost: f64| recycled_wanted(33.0, 1.2, cost, 10_000);
        // A restore worth less than the time between arrivals: none counted on.
        assert_eq!(n(0.01), 0);
        // Worth an idle clone-second or so: about the clones in use and some of their spread.
        assert!((40..=55).contains(&n(1.0)), "{}", n(1.0));
        // Dearer restores, more clones counted on; never past the cap.
        assert!(n(100.0) > n(1.0) && n(100.0) < 80, "{}", n(100.0));
        assert_eq!(recycled_wanted(33.0, 1.2, 100.0, 20), 20);
        // The k-th is kept while the restores it saves pay for its idle time.
        let k = n(1.0);
        let at = |k: u32| 33.0 * pmf(39.6, k - 1) >= (0..k).map(|j| pmf(39.6, j)).sum::<f64>();
        assert!(at(k) && !at(k + 1), "{k}");
    }

    #[test]
    fn clones_due_back_within_a_refill_lower_the_floor() {
        let price = 1.0 / 3600.0;
        assert_eq!(net_wanted(20.0, REFILL, 0.0, price, 1000), poisson_wanted(20.0, REFILL, price, 1000));
        let (none, some, many) = (
            net_wanted(20.0, REFILL, 0.0, price, 1000),
            net_wanted(20.0, REFILL, 2.0, price, 1000),
            net_wanted(20.0, REFILL, 20.0, price, 1000),
        );
        assert!(none > some && some > many, "{none} {some} {many}");
    }

    #[test]
    fn the_occupancy_is_clone_seconds_in_use_per_handoff() {
        // 10 arrivals a second, each in use for half a second: 5 in use at every tick.
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        assert_eq!(m.occupancy_s(), None);
        let mut t = 0.0;
        for _ in 0..600 {
            t += TICK;
            m.arrival(t - 0.05);
            m.tick(t, REFILL, 5);
            m.released(t, 1, 1);
        }
        let d = m.occupancy_s().unwrap();
        assert!((d - 0.5).abs() < 0.02, "{d}");
        assert!((m.return_share() - 1.0).abs() < 1e-9);
        // Handoffs whose clones are destroyed: none comes back.
        m.released(t, 100_000, 0);
        assert!(m.return_share() < 0.01, "{}", m.return_share());
    }

    #[test]
    fn a_rare_function_is_kept_warm_when_it_is_called_more_often_than_the_price() {
        // Every 5 to 15 minutes (not periodic).
        let arrivals: Vec<f64> = [0.0, 300.0, 1200.0, 1700.0, 2600.0, 3000.0].to_vec();
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        let mut dropped = Vec::new();
        run(&mut m, &arrivals, 0.0, 3600.0, |m, t| {
            if wanted(m, t, 1.0 / 3600.0, 1.0, 100) == 0 {
                dropped.push(t);
            }
        });
        assert!(dropped.is_empty(), "dropped at {:?}", &dropped[..dropped.len().min(3)]);
        assert!(matches!(m.pattern(3600.0), Pattern::Rate(r) if (1.0 / 900.0..1.0 / 400.0).contains(&r)));
        // At a price of one cold start per minute of idle clone it is not worth keeping.
        assert_eq!(wanted(&m, 3600.0, 1.0 / 60.0, 1.0, 100), 0);
    }

    #[test]
    fn a_periodic_function_is_warmed_just_ahead_of_its_next_call() {
        // Every 5 minutes, up to 0.3 s late.
        let arrivals: Vec<f64> = (0..12).map(|i| f64::from(i) * 300.0 + 0.3 * f64::from(i % 2)).collect();
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        let mut warm = Vec::new();
        run(&mut m, &arrivals, 0.0, 3590.0, |m, t| {
            if t > 1000.0 && wanted(m, t, 1.0 / 3600.0, 1.0, 100) > 0 {
                warm.push(t);
            }
        });
        assert!(matches!(m.pattern(3590.0), Pattern::Periodic { next, .. } if (next - 3600.0).abs() < 1.0));
        // Warm only within seconds of each call: a few seconds in every 300.
        let before: Vec<f64> = warm.iter().copied().filter(|t| (1480.0..1500.0).contains(t)).collect();
        assert!(!before.is_empty() && before[0] > 1490.0, "warm from {before:?}");
        assert!(warm.len() < 9 * 100, "{} warm ticks", warm.len());
        // A missed call ends the prediction: back to the rate.
        assert!(matches!(m.pattern(3700.0), Pattern::Rate(_)));
    }

    #[test]
    fn a_burst_leaves_a_reserve_that_decays() {
        // One arrival a minute, and a burst of 200 within a second at 600 s.
        let mut arrivals: Vec<f64> = (0..60).map(|i| f64::from(i) * 60.0 + 7.0).collect();
        arrivals.extend((0..200).map(|i| 600.0 + f64::from(i) * 0.005));
        arrivals.sort_by(f64::total_cmp);
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        let price = 1.0 / 3600.0;
        let mut at = std::collections::BTreeMap::new();
        run(&mut m, &arrivals, 0.0, 3600.0, |m, t| {
            at.insert((t * 10.0).round() as u64, wanted(m, t, price, 1.0, 1000));
        });
        let wanted_at = |tenths: u64| at[&tenths];
        assert!(wanted_at(3000) <= 1, "before the burst: {}", wanted_at(3000));
        // During the burst: the arrivals within a refill at 200/s, with Poisson headroom.
        assert!(wanted_at(6005) >= 15, "{}", wanted_at(6005));
        // After it: a reserve for the onset of the next one (~10 arrivals within a refill), which
        // shrinks as time passes without another.
        let reserve: Vec<u32> = [6600, 12_000, 24_000, 35_900].iter().map(|&s| wanted_at(s)).collect();
        assert!(reserve[0] >= 5, "{reserve:?}");
        assert!(reserve.windows(2).all(|w| w[1] <= w[0]), "{reserve:?}");
        assert!(reserve[3] < reserve[0], "{reserve:?}");
        // At a higher price the reserve is gone sooner.
        assert!(wanted(&m, 3590.0, 1.0 / 600.0, 1.0, 1000) < reserve[3].max(2));
    }

    #[test]
    fn a_steady_hot_function_wants_the_arrivals_within_a_refill_with_poisson_headroom() {
        // 100 arrivals a second, evenly: 5 within a refill.
        let arrivals: Vec<f64> = (0..6000).map(|i| f64::from(i) * 0.01).collect();
        let mut m = ArrivalModel::new(0.0, TICK, 3600.0, 10.0);
        run(&mut m, &arrivals, 0.0, 60.0, |_, _| {});
        let n = wanted(&m, 60.0, 1.0 / 3600.0, 1.0, 1000);
        assert!((12..=20).contains(&n), "{n}");
        assert!(wanted(&m, 60.0, 1.0 / 3600.0, 1.0, 10) == 10, "capped");
        assert!((m.rate_now() - 100.0).abs() < 15.0, "{}", m.rate_now());
    }
}
