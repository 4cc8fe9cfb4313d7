//! The autoscaler: how many ready clones a function should have, from the concurrency the handoff
//! path reports. Pure logic on scripted inputs (unit-tested here; `ember simulate` would drive it
//! with a modelled restore time).
//!
//! Every tick it takes the current concurrency (clones handed out and not yet released) and the
//! handoffs since the last tick, and keeps
//! - a fast EWMA of the concurrency, and its peak over a recent window (the short-term trend: a
//!   burst is met by the peak at once instead of waiting for the average to climb);
//! - the peak of handoffs per tick over the same window: clones are used once, so the pool must
//!   also cover what arrives before the next refill, which short invocations at a high rate need
//!   even at low concurrency;
//! - demand = the largest of those; target ready clones = ceil(demand x headroom), at least
//!   `min_ready`, and never more than `max` minus the clones in use.
//!
//! Scale-out is immediate (the pool restores what is missing in the background). Scale-in waits
//! until the target has stayed below the pool size for `scale_in_delay`, then removes at most
//! `scale_in_step` clones per `scale_in_delay`, so that oscillating load does not churn clones.

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
    /// Most clones removed per scale-in step.
    pub scale_in_step: u32,
    /// The window of the recent peak, in seconds.
    pub peak_window_s: f64,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self { min_ready: 1, max: 64, headroom: 1.5, scale_in_delay_s: 30.0, scale_in_step: 1, peak_window_s: 10.0 }
    }
}

impl PoolPolicy {
    /// Checks the policy; the message is for a 400 response.
    pub fn validate(&self) -> Result<(), String> {
        if self.max == 0 {
            return Err("pool.max must be at least 1".into());
        }
        if self.max < self.min_ready {
            return Err(format!("pool.max ({}) is less than pool.min_ready ({})", self.max, self.min_ready));
        }
        if !(self.headroom.is_finite() && self.headroom >= 1.0 && self.headroom <= 100.0) {
            return Err("pool.headroom must be between 1 and 100".into());
        }
        for (name, v) in [("scale_in_delay_s", self.scale_in_delay_s), ("peak_window_s", self.peak_window_s)] {
            if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
                return Err(format!("pool.{name} must be between 0 and 86400 seconds"));
            }
        }
        if self.scale_in_step == 0 {
            return Err("pool.scale_in_step must be at least 1".into());
        }
        Ok(())
    }
}

/// The scaler's state for one function.
#[derive(Debug)]
pub struct Scaler {
    policy: PoolPolicy,
    tick: Duration,
    ewma: f64,
    /// (concurrency, handoffs) per tick over the peak window.
    recent: VecDeque<(u32, u32)>,
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
        Self { policy, tick, ewma: 0.0, recent: VecDeque::new(), below_for: Duration::ZERO }
    }

    pub fn policy(&self) -> &PoolPolicy {
        &self.policy
    }

    /// The ready clones wanted for the concurrency seen so far.
    pub fn target(&self, busy: u32) -> u32 {
        let peak = self.recent.iter().map(|&(c, a)| c.max(a)).max().unwrap_or(0);
        let demand = self.ewma.max(f64::from(peak));
        let want = ((demand * self.policy.headroom).ceil() as u32).max(self.policy.min_ready);
        want.min(self.policy.max.saturating_sub(busy))
    }

    /// One tick: `busy` clones in use now, `handoffs` since the last tick, `ready` in the pool
    /// (counting those being restored).
    pub fn tick(&mut self, busy: u32, handoffs: u32, ready: u32) -> Action {
        self.ewma = EWMA_ALPHA * f64::from(busy) + (1.0 - EWMA_ALPHA) * self.ewma;
        self.recent.push_back((busy, handoffs));
        let window = (self.policy.peak_window_s / self.tick.as_secs_f64()).ceil().max(1.0) as usize;
        while self.recent.len() > window {
            self.recent.pop_front();
        }
        let target = self.target(busy);
        if target > ready {
            self.below_for = Duration::ZERO;
            return Action::Grow(target - ready);
        }
        if target == ready {
            self.below_for = Duration::ZERO;
            return Action::Hold;
        }
        self.below_for += self.tick;
        let delay = Duration::from_secs_f64(self.policy.scale_in_delay_s);
        if self.below_for < delay {
            return Action::Hold;
        }
        // One step now, the next one after another delay.
        self.below_for = Duration::ZERO;
        Action::Shrink((ready - target).min(self.policy.scale_in_step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn policy() -> PoolPolicy {
        PoolPolicy { min_ready: 2, max: 20, headroom: 1.5, scale_in_delay_s: 1.0, scale_in_step: 1, peak_window_s: 2.0 }
    }

    #[test]
    fn idle_keeps_min_ready() {
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(0, 0, 0), Action::Grow(2));
        assert_eq!(s.tick(0, 0, 2), Action::Hold);
    }

    #[test]
    fn a_burst_scales_out_at_once_from_the_peak() {
        let mut s = Scaler::new(policy(), TICK);
        s.tick(0, 0, 2);
        // 8 in use suddenly: the peak, not the slow average, sets the target: ceil(8 x 1.5) = 12.
        assert_eq!(s.tick(8, 8, 2), Action::Grow(10));
    }

    #[test]
    fn many_short_invocations_are_covered_by_the_handoff_rate() {
        let mut s = Scaler::new(policy(), TICK);
        // 10 handoffs per tick, each done before the tick ends: concurrency stays 0.
        assert_eq!(s.tick(0, 10, 2), Action::Grow(13));
    }

    #[test]
    fn max_caps_ready_plus_busy() {
        let mut s = Scaler::new(policy(), TICK);
        assert_eq!(s.tick(18, 0, 0), Action::Grow(2));
        assert_eq!(s.tick(20, 0, 0), Action::Hold);
    }

    #[test]
    fn scale_in_waits_for_the_delay_and_goes_in_steps() {
        let mut s = Scaler::new(policy(), TICK);
        for _ in 0..5 {
            s.tick(6, 0, 9);
        }
        // Load gone: the peak window (2 s) keeps the target up first, then the delay (1 s) runs,
        // then one clone goes per delay.
        let mut ready = 9;
        let mut shrinks = Vec::new();
        for t in 0..100 {
            if let Action::Shrink(n) = s.tick(0, 0, ready) {
                assert_eq!(n, 1);
                ready -= n;
                shrinks.push(t);
            }
        }
        assert_eq!(ready, 2, "down to min_ready");
        assert!(shrinks[0] >= 20, "scaled in before the peak window and the delay: {shrinks:?}");
        assert!(shrinks.windows(2).all(|w| w[1] - w[0] >= 10), "more than one step per delay: {shrinks:?}");
    }

    #[test]
    fn oscillating_load_does_not_churn() {
        let mut s = Scaler::new(policy(), TICK);
        let mut ready = 0u32;
        let (mut grown, mut shrunk) = (0, 0);
        for t in 0..600 {
            let busy = if (t / 5) % 2 == 0 { 6 } else { 0 };
            match s.tick(busy, 0, ready) {
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
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(policy().validate().is_ok());
    }
}
