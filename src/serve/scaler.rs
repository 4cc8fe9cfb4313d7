//! The autoscaler: how many ready clones a function should have, from the concurrency and the
//! arrivals the handoff path reports. Pure logic on scripted inputs (unit-tested here; `ember
//! simulate` drives it with a modelled restore time, the daemon with the measured one).
//!
//! Every tick it takes the clones in use now and at most during the tick (the concurrency), the
//! handoffs during the tick (the arrivals), and how long a refill takes (restore to agent serving),
//! and keeps
//! - a fast EWMA of the concurrency, and its peak over a recent window (the short-term trend: a
//!   burst is met by the peak at once instead of waiting for the average to climb);
//! - the peak of arrivals per tick over the same window, scaled to the refill time: what arrives
//!   before a refill started now can land (the pool is refilled on every handoff, not only at
//!   ticks, so this is what the ready clones must cover);
//! - the same arrival peak over a long window (`burst_window_s`): a reserve for the bursts this
//!   function has had lately, so that the next one starts from a pool that covers its first
//!   refill time instead of draining it;
//! - target ready clones = the largest of `min_ready`, the burst reserve x headroom and
//!   ceil(headroom x the larger of concurrency and recent arrivals) (less the clones in use when
//!   they come back: `max_uses` > 1), and never more than `max` minus the clones in use.
//!
//! Scale-out is immediate (the pool restores what is missing in the background). Scale-in waits
//! until the target has stayed below the pool size for `scale_in_delay`, then removes at most
//! `scale_in_step` clones per tick while it stays below, so that oscillating load does not churn
//! clones and a pool left large by a burst goes back down in seconds, not minutes.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A function's pool policy (part of its registration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolPolicy {
    /// Ready clones kept even with no load.
    pub min_ready: u32,
    /// Most clones (ready + in use) at once.
    pub max: u32,
    /// Ready clones per unit of demand (1.5 = 50% more than the recent concurrency).
    pub headroom: f64,
    /// How long the target must stay below the pool before it shrinks, in seconds.
    pub scale_in_delay_s: f64,
    /// Most clones removed per tick once scale-in has begun.
    pub scale_in_step: u32,
    /// The window of the recent peak, in seconds.
    pub peak_window_s: f64,
    /// How long the largest burst of arrivals sets the reserve of ready clones, in seconds
    /// (0: no reserve).
    pub burst_window_s: f64,
    /// Handoffs one clone serves. 1: every handoff gets a fresh clone of the template and released
    /// clones are destroyed; more: a released clone whose agent is idle and serving goes back to
    /// the pool until it has served this many.
    pub max_uses: u32,
    /// How long a handed-out clone may stay out, in seconds: a clone not released by then is
    /// destroyed (its lease expires), so a scheduler that lost track of one does not hold it
    /// forever.
    pub lease_s: f64,
}

/// The largest `max` a pool may have.
pub const MAX_POOL: u32 = 10_000;

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            min_ready: 1,
            max: 64,
            headroom: 1.5,
            scale_in_delay_s: 30.0,
            scale_in_step: 1,
            peak_window_s: 10.0,
            burst_window_s: 600.0,
            max_uses: 1,
            lease_s: 3600.0,
        }
    }
}

impl PoolPolicy {
    /// Checks the policy; the message is for a 400 response.
    pub fn validate(&self) -> Result<(), String> {
        if self.max == 0 || self.max > MAX_POOL {
            return Err(format!("pool.max must be between 1 and {MAX_POOL}"));
        }
        if !(self.lease_s.is_finite() && self.lease_s > 0.0 && self.lease_s <= 7.0 * 86_400.0) {
            return Err("pool.lease_s must be more than 0 and at most 604800 seconds".into());
        }
        if self.max < self.min_ready {
            return Err(format!("pool.max ({}) is less than pool.min_ready ({})", self.max, self.min_ready));
        }
        if !(self.headroom.is_finite() && self.headroom >= 1.0 && self.headroom <= 100.0) {
            return Err("pool.headroom must be between 1 and 100".into());
        }
        for (name, v) in [
            ("scale_in_delay_s", self.scale_in_delay_s),
            ("peak_window_s", self.peak_window_s),
            ("burst_window_s", self.burst_window_s),
        ] {
            if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                return Err(format!("pool.{name} must be between 0 and 86400 seconds"));
            }
        }
        if self.scale_in_step == 0 {
            return Err("pool.scale_in_step must be at least 1".into());
        }
        if self.max_uses == 0 {
            return Err("pool.max_uses must be at least 1".into());
        }
        Ok(())
    }

    /// Released clones go back to the pool.
    pub fn recycles(&self) -> bool {
        self.max_uses > 1
    }
}

/// What the pool reports at a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Clones in use now.
    pub busy: u32,
    /// The most clones in use at once since the last tick.
    pub peak_busy: u32,
    /// Handoffs since the last tick.
    pub handoffs: u32,
    /// Clones ready, starting or being restored.
    pub have: u32,
    /// How long a clone takes from "restore" to serving, in seconds.
    pub refill_s: f64,
}

/// The maximum over a sliding window of ticks (a monotonic queue: O(1) per tick amortised).
#[derive(Debug, Default)]
struct WindowMax {
    /// (tick, value), values strictly decreasing.
    q: VecDeque<(u64, u32)>,
}

impl WindowMax {
    fn push(&mut self, tick: u64, v: u32, window: u64) {
        while self.q.back().is_some_and(|&(_, b)| b <= v) {
            self.q.pop_back();
        }
        self.q.push_back((tick, v));
        while self.q.front().is_some_and(|&(t, _)| t + window <= tick) {
            self.q.pop_front();
        }
    }

    fn max(&self) -> u32 {
        self.q.front().map_or(0, |&(_, v)| v)
    }
}

/// The scaler's state for one function.
#[derive(Debug)]
pub struct Scaler {
    policy: PoolPolicy,
    tick: Duration,
    ticks: u64,
    ewma: f64,
    peak_busy: WindowMax,
    arrivals: WindowMax,
    burst: WindowMax,
    /// The ready clones wanted, as of the last tick.
    target: u32,
    /// How long the target has been below the pool size.
    below_for: Duration,
}

/// What the pool should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Restore this many clones.
    Grow(u32),
    /// Destroy this many ready clones.
    Shrink(u32),
    Hold,
}

const EWMA_ALPHA: f64 = 0.3;

impl Scaler {
    pub fn new(policy: PoolPolicy, tick: Duration) -> Self {
        Self {
            target: policy.min_ready,
            policy,
            tick,
            ticks: 0,
            ewma: 0.0,
            peak_busy: WindowMax::default(),
            arrivals: WindowMax::default(),
            burst: WindowMax::default(),
            below_for: Duration::ZERO,
        }
    }

    pub fn policy(&self) -> &PoolPolicy {
        &self.policy
    }

    /// The ready clones wanted, as of the last tick.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Clones to restore now for a pool that has `have` (ready, starting or being restored): what
    /// the pool refills between ticks, after handoffs.
    pub fn deficit(&self, have: u32) -> u32 {
        self.target.saturating_sub(have)
    }

    fn ticks_in(&self, seconds: f64) -> u64 {
        (seconds / self.tick.as_secs_f64()).ceil().max(1.0) as u64
    }

    /// One tick: computes the target from `load` and says how the pool should change.
    pub fn tick(&mut self, load: Load) -> Action {
        let p = &self.policy;
        self.ticks += 1;
        let (short, long) = (self.ticks_in(p.peak_window_s), self.ticks_in(p.burst_window_s));
        let peak_busy = load.peak_busy.max(load.busy);
        self.ewma = EWMA_ALPHA * f64::from(peak_busy) + (1.0 - EWMA_ALPHA) * self.ewma;
        self.peak_busy.push(self.ticks, peak_busy, short);
        self.arrivals.push(self.ticks, load.handoffs, short);
        if p.burst_window_s > 0.0 {
            self.burst.push(self.ticks, load.handoffs, long);
        }
        // Arrivals per tick -> arrivals within one refill.
        let per_refill = load.refill_s / self.tick.as_secs_f64();
        let arrivals = f64::from(self.arrivals.max()) * per_refill;
        let reserve = (f64::from(self.burst.max()) * per_refill * p.headroom).ceil() as u32;
        let demand = self.ewma.max(f64::from(self.peak_busy.max())).max(arrivals);
        let mut want = (demand * p.headroom).ceil() as u32;
        if p.recycles() {
            want = want.saturating_sub(load.busy);
        }
        self.target = want.max(reserve).max(p.min_ready).min(p.max.saturating_sub(load.busy));

        let (target, ready) = (self.target, load.have);
        if target > ready {
            self.below_for = Duration::ZERO;
            return Action::Grow(target - ready);
        }
        if target == ready {
            self.below_for = Duration::ZERO;
            return Action::Hold;
        }
        self.below_for += self.tick;
        if self.below_for < Duration::from_secs_f64(p.scale_in_delay_s) {
            return Action::Hold;
        }
        // Below for the whole delay: one step per tick from now on, while it stays below.
        Action::Shrink((ready - target).min(p.scale_in_step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn policy() -> PoolPolicy {
        PoolPolicy {
            min_ready: 2,
            max: 20,
            headroom: 1.5,
            scale_in_delay_s: 1.0,
            scale_in_step: 1,
            peak_window_s: 2.0,
            burst_window_s: 0.0,
            max_uses: 1,
            lease_s: 60.0,
        }
    }

    /// A tick's load, with a refill that takes one tick.
    fn load(busy: u32, handoffs: u32, have: u32) -> Load {
        Load { busy, peak_busy: busy, handoffs, have, refill_s: 0.1 }
    }

    #[test]
    fn idle_keeps_min_ready() {
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(load(0, 0, 0)), Action::Grow(2));
        assert_eq!(s.tick(load(0, 0, 2)), Action::Hold);
    }

    #[test]
    fn a_burst_scales_out_at_once_from_the_peak() {
        let mut s = Scaler::new(policy(), TICK);
        s.tick(load(0, 0, 2));
        // 8 in use suddenly: the peak, not the slow average, sets the target: ceil(8 x 1.5) = 12.
        assert_eq!(s.tick(load(8, 8, 2)), Action::Grow(10));
        // The peak within the tick counts even when the clones are back by its end.
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(Load { peak_busy: 8, ..load(0, 0, 2) }), Action::Grow(10));
    }

    #[test]
    fn many_short_invocations_are_covered_by_the_handoff_rate() {
        let mut s = Scaler::new(policy(), TICK);
        // 10 handoffs per tick, each done before the tick ends: concurrency stays 0.
        assert_eq!(s.tick(load(0, 10, 2)), Action::Grow(13));
    }

    #[test]
    fn a_slow_refill_covers_the_arrivals_until_it_lands() {
        let mut s = Scaler::new(policy(), TICK);
        // 4 arrivals per tick and half a second to refill: 20 arrive before a refill lands.
        assert_eq!(s.tick(Load { refill_s: 0.5, ..load(0, 4, 0) }), Action::Grow(20));
        assert_eq!(s.target(), 20, "capped by max - busy");
        assert_eq!(s.deficit(15), 5);
        assert_eq!(s.deficit(25), 0);
    }

    #[test]
    fn recycled_clones_in_use_count_towards_the_target() {
        let mut s = Scaler::new(PoolPolicy { max_uses: 100, ..policy() }, TICK);
        // ceil(8 x 1.5) = 12 clones wanted, 8 of them in use and coming back: 4 more ready.
        assert_eq!(s.tick(load(8, 0, 0)), Action::Grow(4));
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(load(8, 0, 0)), Action::Grow(12), "single-use clones do not come back");
    }

    #[test]
    fn the_burst_reserve_outlasts_the_peak_window() {
        let mut s = Scaler::new(PoolPolicy { burst_window_s: 60.0, ..policy() }, TICK);
        s.tick(load(0, 10, 0));
        let mut targets = Vec::new();
        for _ in 0..700 {
            s.tick(load(0, 0, s.target()));
            targets.push(s.target());
        }
        // 10 arrivals in a tick, x 1.5 headroom: kept ready for the burst window (60 s), then back
        // to min_ready.
        assert_eq!(targets[100], 15);
        assert_eq!(targets[580], 15);
        assert_eq!(targets[650], 2);
    }

    #[test]
    fn max_caps_ready_plus_busy() {
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(load(18, 0, 0)), Action::Grow(2));
        assert_eq!(s.tick(load(20, 0, 0)), Action::Hold);
    }

    #[test]
    fn scale_in_waits_for_the_delay_and_goes_in_steps() {
        let mut s = Scaler::new(policy(), TICK);
        for _ in 0..5 {
            s.tick(load(6, 0, 9));
        }
        // Load gone: the peak window (2 s) keeps the target up first, then the delay (1 s) runs,
        // then one clone goes per tick.
        let mut ready = 9;
        let mut shrinks = Vec::new();
        for t in 0..100 {
            if let Action::Shrink(n) = s.tick(load(0, 0, ready)) {
                assert_eq!(n, 1);
                ready -= n;
                shrinks.push(t);
            }
        }
        assert_eq!(ready, 2, "down to min_ready");
        assert!(shrinks[0] >= 20, "scaled in before the peak window and the delay: {shrinks:?}");
        assert!(shrinks.windows(2).all(|w| w[1] - w[0] == 1), "not one step per tick: {shrinks:?}");
        // A target back above the pool restarts the delay.
        s.tick(load(6, 6, ready));
        for _ in 0..25 {
            assert!(!matches!(s.tick(load(0, 0, 9)), Action::Shrink(_)), "shrank within the window and delay");
        }
    }

    #[test]
    fn oscillating_load_does_not_churn() {
        let mut s = Scaler::new(policy(), TICK);
        let mut ready = 0u32;
        let (mut grown, mut shrunk) = (0, 0);
        for t in 0..600 {
            let busy = if (t / 5) % 2 == 0 { 6 } else { 0 };
            match s.tick(load(busy, 0, ready)) {
                Action::Grow(n) => {
                    ready += n;
                    grown += n;
                }
                Action::Shrink(n) => {
                    ready -= n;
                    shrunk += n;
                }
                Action::Hold => {}
            }
        }
        assert_eq!(shrunk, 0, "clones destroyed under oscillating load");
        assert_eq!(grown, 9, "ceil(6 x 1.5) ready clones, made once");
    }

    #[test]
    fn bad_policies_are_refused() {
        let bad = [
            PoolPolicy { max: 1, min_ready: 2, ..policy() },
            PoolPolicy { max: 0, min_ready: 0, ..policy() },
            PoolPolicy { headroom: 0.5, ..policy() },
            PoolPolicy { headroom: f64::NAN, ..policy() },
            PoolPolicy { scale_in_step: 0, ..policy() },
            PoolPolicy { scale_in_delay_s: -1.0, ..policy() },
            PoolPolicy { burst_window_s: 1e9, ..policy() },
            PoolPolicy { max_uses: 0, ..policy() },
            PoolPolicy { max: MAX_POOL + 1, ..policy() },
            PoolPolicy { lease_s: 0.0, ..policy() },
            PoolPolicy { lease_s: f64::INFINITY, ..policy() },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(policy().validate().is_ok());
    }
}
