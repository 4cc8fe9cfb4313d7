//! The autoscaler: how many ready clones a function should have. Pure logic on scripted inputs
//! (unit-tested here; `ember simulate` drives it with a modelled restore time, the daemon with the
//! measured one, both through the host's allocation in `fleet.rs`).
//!
//! The handoff path reports every arrival; every tick the pool reports the clones in use and the
//! pool's size and how long a refill takes (restore to serving). From the arrivals the function's
//! [`ArrivalModel`] says what each ready clone is worth: the cold starts it is expected to save
//! per second (the rate of arrivals that would find it needed). A clone is kept while it is worth
//! its idle time at the function's price, `1 / cold_start_cost_s` (a cold start is worth that many
//! idle clone-seconds), and while the host's idle budget has room for it (the host raises the
//! price when it has not: clones go where they save the most per MiB). So
//! - a hot function keeps the arrivals within a refill at its current rate, with the Poisson
//!   headroom its price buys (not a fixed multiple of its concurrency);
//! - a rare function keeps one clone while it is called more often than its price, none otherwise,
//!   and a periodic one has a clone restored ahead of its next predicted call and unloaded after;
//! - a function that had bursts keeps a reserve for their onsets, which decays as time passes
//!   without one.
//!
//! Clones in use that come back (recycled) are the cheapest refill there is, and every restore
//! costs CPU. So the bill is priced in idle clone-seconds throughout (a cold start at
//! `cold_start_cost_s`, a restore at [`Load::restore_cost_s`]), and a pool whose clones come back
//! *counts on* some of them: the k-th is kept while the restores it saves (the arrivals that find
//! k - 1 in use, the clones in use being Poisson around rate x the occupancy seen: an
//! M/G/infinity queue) pay for the time it is idle. Its *level* is those plus the ready clones a
//! refill's arrivals need once they are all in use (less the clones due back within the refill,
//! priced for how often that happens); it refills its whole size up to the level (a handoff moves
//! a clone from ready to in use, and starts no restore), keeps the clones that come back up to the
//! level held, and below that refills its ready clones up to a *floor* once all those counted on
//! are in use. It counts on them only when that is the smaller bill than refilling after every
//! handoff; a function whose clones never come back is refilled as before.
//!
//! Scale-out is immediate (the pool restores what is missing in the background, and refills after
//! every handoff). Scale-in is delayed and stepwise: the pool is held at its largest target until
//! the target has stayed below that for `scale_in_delay_s`, then the held level comes down by at
//! most `scale_in_step` clones per tick while the target stays below, so that oscillating load
//! does not churn clones. Clones beyond the held level (recycled clones coming back) go a quarter
//! of them per tick (at least a step), and a pool whose target is 0 (the next call is not expected soon enough to be worth a clone) is
//! unloaded at once.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::arrivals::ArrivalModel;

/// A function's pool policy (part of its registration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolPolicy {
    /// Ready clones kept even with no load.
    pub min_ready: u32,
    /// Most clones (ready + in use) at once; by default as many as the host's memory holds (a
    /// safety limit: the scaler and the host's idle budget keep pools far below it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// A factor on the arrival rates the scaler sees (1.5 = plan for 50% more than seen).
    pub headroom: f64,
    /// How long the target must stay below the pool before it shrinks, in seconds.
    pub scale_in_delay_s: f64,
    /// Most clones removed per tick once scale-in has begun.
    pub scale_in_step: u32,
    /// The longest window of the recent arrival rate, in seconds.
    pub peak_window_s: f64,
    /// The half-life of what is remembered of the function's arrivals between bursts (how often
    /// it is called, how deep its bursts went), in seconds; it sets how long a burst keeps a
    /// reserve and how long a quiet function stays warm (0: nothing remembered, no reserve).
    pub burst_window_s: f64,
    /// Handoffs one clone serves. 1: every handoff gets a fresh clone of the template and released
    /// clones are destroyed; more: a released clone whose agent is idle and serving goes back to
    /// the pool until it has served this many. Unset: clones that served an `invoke` are recycled
    /// (up to [`AUTO_MAX_USES`] times), clones handed out by `acquire` are not (see
    /// [`PoolPolicy::uses_allowed`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// How long a handed-out clone may stay out, in seconds: a clone not released by then is
    /// destroyed (its lease expires), so a scheduler that lost track of one does not hold it
    /// forever.
    pub lease_s: f64,
    /// What one cold start of this function is worth, in idle clone-seconds: a ready clone is kept
    /// while it is expected to save at least one cold start per this many seconds.
    pub cold_start_cost_s: f64,
}

/// The least share of arrivals the floor above a pool's recycled clones is priced for: the
/// Poisson model of the clones in use says how often all of them are, but rates change faster
/// than it knows (a diurnal rise, a batch), so it is trusted to 1 in 20 at most.
const MIN_BEYOND: f64 = 0.05;

/// The largest `max` a pool may have.
pub const MAX_POOL: u32 = 10_000;
/// The handoffs a recycled clone serves when `max_uses` is unset (then it is replaced by a fresh
/// one, so that whatever a long-lived guest accumulates does not grow without bound).
pub const AUTO_MAX_USES: u32 = 1000;

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            min_ready: 0,
            max: None,
            headroom: 1.0,
            scale_in_delay_s: 30.0,
            scale_in_step: 1,
            peak_window_s: 10.0,
            burst_window_s: 3600.0,
            max_uses: None,
            lease_s: 3600.0,
            cold_start_cost_s: 3600.0,
        }
    }
}

impl PoolPolicy {
    /// Checks the policy; the message is for a 400 response.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(max) = self.max {
            if max == 0 || max > MAX_POOL {
                return Err(format!("pool.max must be between 1 and {MAX_POOL}"));
            }
            if max < self.min_ready {
                return Err(format!("pool.max ({max}) is less than pool.min_ready ({})", self.min_ready));
            }
        }
        if self.min_ready > MAX_POOL {
            return Err(format!("pool.min_ready must be at most {MAX_POOL}"));
        }
        if !(self.lease_s.is_finite() && self.lease_s > 0.0 && self.lease_s <= 7.0 * 86_400.0) {
            return Err("pool.lease_s must be more than 0 and at most 604800 seconds".into());
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
        if !(self.cold_start_cost_s.is_finite() && self.cold_start_cost_s >= 1.0 && self.cold_start_cost_s <= 1e7) {
            return Err("pool.cold_start_cost_s must be between 1 and 10000000 seconds".into());
        }
        if self.scale_in_step == 0 {
            return Err("pool.scale_in_step must be at least 1".into());
        }
        if self.max_uses == Some(0) {
            return Err("pool.max_uses must be at least 1".into());
        }
        Ok(())
    }

    /// The handoffs a clone may serve before it is destroyed. With `max_uses` unset: a clone that
    /// served an `invoke` (`invoked`) is recycled, because then the daemon saw the whole call (the
    /// agent ran the function's own handler, answered, and has nothing in flight), while one
    /// handed out by `acquire` is not, because the daemon cannot tell what its scheduler did in
    /// it. A function whose invocations must never share a guest (state one caller must not see
    /// of another's) sets `max_uses` to 1.
    pub fn uses_allowed(&self, invoked: bool) -> u32 {
        match self.max_uses {
            Some(n) => n,
            None if invoked => AUTO_MAX_USES,
            None => 1,
        }
    }

    /// The price of a ready clone: the cold starts per second it must save to be kept.
    pub fn price(&self) -> f64 {
        1.0 / self.cold_start_cost_s
    }
}

/// What the pool reports at a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Clones in use now.
    pub busy: u32,
    /// Clones ready, starting or being restored.
    pub have: u32,
    /// How long a clone takes from "restore" to serving, in seconds.
    pub refill_s: f64,
    /// What one restore costs, in idle clone-seconds (its CPU at the host's price of CPU against
    /// memory: see [`fleet::Host::restore_cost_s`](super::fleet::Host::restore_cost_s)).
    pub restore_cost_s: f64,
    /// Handoffs that ended since the last tick, and how many of their clones came back to the
    /// pool (recycled).
    pub ended: u32,
    pub came_back: u32,
}

/// The scaler's state for one function.
#[derive(Debug)]
pub struct Scaler {
    policy: PoolPolicy,
    tick: Duration,
    model: ArrivalModel,
    /// Most clones (ready + in use): the policy's `max`, or the host's limit.
    limit: u32,
    busy: u32,
    now: f64,
    /// The ready clones wanted, as of the last tick.
    target: u32,
    /// The ready clones a surge of arrivals since the last tick wants (refilled at once).
    surge: u32,
    /// The level the pool is held at while scale-in waits (see the module's description).
    held: u32,
    /// How long the target has been below the held level.
    below_for: Duration,
    /// The ready clones the pool refills up to between ticks once all those it counts on are in
    /// use (the arrivals within a refill, less the clones due back within it; the reserve for
    /// clusters), the clones in use it counts on coming back, and the level of its whole size
    /// (ready + those in use) (see the module's description), as of the last tick.
    floor: u32,
    recycled: u32,
    level: u32,
    /// What a restore costs, in idle clone-seconds, as of the last tick.
    restore_cost_s: f64,
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

impl Scaler {
    /// A function registered at `now` (seconds on the caller's clock), at most `host_limit`
    /// clones unless its policy sets `max`.
    pub fn new(policy: PoolPolicy, tick: Duration, now: f64, host_limit: u32) -> Self {
        let limit = policy.max.unwrap_or(host_limit).clamp(1, MAX_POOL).max(policy.min_ready);
        let model = ArrivalModel::new(now, tick.as_secs_f64(), policy.burst_window_s, policy.peak_window_s);
        let target = policy.min_ready;
        Self {
            target,
            surge: 0,
            held: target,
            policy,
            tick,
            model,
            limit,
            busy: 0,
            now,
            below_for: Duration::ZERO,
            floor: target,
            recycled: 0,
            level: target,
            restore_cost_s: 1.0,
        }
    }

    pub fn policy(&self) -> &PoolPolicy {
        &self.policy
    }

    /// Most clones (ready + in use) at once.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The ready clones wanted, as of the last tick.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Arrivals expected per second, as of the last tick (for /metrics).
    pub fn predicted_rate(&self) -> f64 {
        self.model.predicted_rate(self.now)
    }

    pub fn model(&self) -> &ArrivalModel {
        &self.model
    }

    /// The clones in use the pool counts on coming back, as of the last tick (for /metrics).
    pub fn recycled(&self) -> u32 {
        self.recycled
    }

    /// Clones to restore now for a pool that has `have` (ready, starting or being restored) and
    /// `busy` in use: what the pool refills between ticks, after handoffs. Its ready clones are
    /// refilled up to the floor (or a surge's), its whole size up to the level (a handoff moves
    /// a clone from ready to in use, and the pool counts on it coming back).
    pub fn deficit(&self, have: u32, busy: u32) -> u32 {
        let ready = self.surge.max(self.floor).saturating_sub(have);
        ready.max(self.level.saturating_sub(have + busy.min(self.recycled)))
    }

    /// A handoff at `now`, `cold` when it found the pool empty. A surge of arrivals since the last
    /// tick (the onset of a burst, or any arrival that found the pool empty) raises what
    /// [`Scaler::deficit`] refills at once, at the function's own price.
    pub fn arrival(&mut self, now: f64, cold: bool) {
        self.model.arrival(now);
        if let Some(rate) = self.model.surge(now, cold) {
            let p = &self.policy;
            let room = self.limit.saturating_sub(self.busy);
            let back = self.model.returns_within_refill(f64::from(self.busy) * self.model.return_share());
            let n = super::arrivals::net_wanted(rate * p.headroom, self.model.refill_s(), back, p.price(), room);
            self.surge = self.surge.max(n);
        }
    }

    /// The first half of a tick: what the pool reports at `now`.
    pub fn observe(&mut self, load: Load, now: f64) {
        self.now = now;
        self.surge = 0;
        self.model.tick(now, load.refill_s, self.busy);
        self.model.released(now, load.ended, load.came_back);
        self.busy = load.busy;
        self.restore_cost_s = load.restore_cost_s.max(1e-6);
        let price = self.policy.price();
        (self.floor, self.recycled, _) = self.parts(price);
    }

    /// At `price`: the ready floor, the clones in use counted on coming back, and the pool's
    /// level (see the module's description).
    fn parts(&self, price: f64) -> (u32, u32, u32) {
        let p = &self.policy;
        let room = self.limit.saturating_sub(self.busy);
        let share = self.model.return_share();
        // The arrivals within a refill at `price` less what `busy` in use give back within it.
        let refill_at = |busy: u32, price: f64| {
            self.model.wanted_parts(self.now, price, p.headroom, room, f64::from(busy) * share).0
        };
        let reserve = self.model.reserve(self.now, price, p.headroom, room);
        // Without counting on any: the arrivals within a refill (or the reserve) ready, and a
        // restore per handoff.
        let long_rate = self.model.rate_long();
        let restore_cost = self.restore_cost_s * p.price() / price;
        let refilled = refill_at(0, price).max(reserve);
        let refilling_bill = f64::from(refilled) + long_rate * restore_cost;
        let counted = self.model.occupancy_s().filter(|_| share > 0.0).and_then(|d| {
            // The k-th clone counted on is worth the restores it saves while it is idle, at the
            // price of a restore, which falls as the host raises the price of a clone.
            let rate = self.model.rate_level().max(long_rate) * p.headroom * share;
            let n = super::arrivals::recycled_wanted(rate, d, restore_cost, self.limit);
            let beyond = super::arrivals::poisson_tail(rate * d, n);
            // The level: those counted on, and the refill's arrivals they would leave (needed
            // only as often as that many are in use), or the reserve for clusters if more.
            let level = (n + refill_at(n, price / beyond.max(MIN_BEYOND))).max(reserve);
            // Counting on them when that is the smaller bill: the clones idle on average, and a
            // restore for each arrival that finds them all in use.
            let bill = super::arrivals::poisson_shortfall(rate * d, level) + rate * beyond * restore_cost;
            (n > 0 && bill < refilling_bill).then_some((n, level))
        });
        let (recycled, level) = counted.unwrap_or((0, refilled));
        // The floor, once as many are in use as are counted on: the reserve, or the arrivals
        // within a refill.
        let floor = if self.busy >= recycled { reserve.max(refill_at(self.busy, price)) } else { 0 };
        (floor, recycled, level)
    }

    /// The ready clones worth at least `price` cold starts saved per second each, as of the last
    /// [`Scaler::observe`], within `min_ready` and the limit.
    pub fn wanted(&self, price: f64) -> u32 {
        let p = &self.policy;
        let room = self.limit.saturating_sub(self.busy);
        let (floor, _, level) = self.parts(price);
        let n = floor.max(level.saturating_sub(self.busy));
        n.max(p.min_ready).min(room)
    }

    /// The second half of a tick: the target (from [`Scaler::wanted`] at the price the host set)
    /// for a pool that has `have` clones, and how the pool should change.
    pub fn decide(&mut self, target: u32, have: u32) -> Action {
        let p = &self.policy;
        self.target = target.min(self.limit.saturating_sub(self.busy)).max(p.min_ready.min(self.limit));
        let target = self.target;
        self.floor = self.floor.min(target);
        let counted = self.busy.min(self.recycled);
        self.level = target + counted;
        let level = self.level;
        if target == 0 {
            // Not worth a clone: unloaded now, not in steps.
            self.held = 0;
            self.below_for = Duration::ZERO;
        } else if level >= self.held {
            self.held = level;
            self.below_for = Duration::ZERO;
        } else {
            self.below_for += self.tick;
            if self.below_for >= Duration::from_secs_f64(p.scale_in_delay_s) {
                // Below for the whole delay: one step per tick from now on, while it stays below.
                self.held = self.held.saturating_sub(p.scale_in_step).max(level);
            }
        }
        if have < target {
            return Action::Grow(target - have);
        }
        let keep = self.held.saturating_sub(counted).max(target);
        if have <= keep {
            return Action::Hold;
        }
        // Beyond the held level: recycled clones that came back, a quarter of them per tick, at
        // least a step.
        let beyond = have - keep;
        Action::Shrink(beyond.div_ceil(4).max(p.scale_in_step.min(beyond)))
    }

    /// A whole tick for a function on its own, at its own price (no host budget).
    pub fn tick(&mut self, load: Load, now: f64) -> Action {
        self.observe(load, now);
        let target = self.wanted(self.policy.price());
        self.decide(target, load.have)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn policy() -> PoolPolicy {
        PoolPolicy { min_ready: 2, max: Some(40), scale_in_delay_s: 1.0, peak_window_s: 2.0, ..PoolPolicy::default() }
    }

    /// A tick's load, with a refill that takes 50 ms.
    fn load(busy: u32, have: u32) -> Load {
        Load { busy, have, refill_s: 0.05, restore_cost_s: 1.0, ended: 0, came_back: 0 }
    }

    /// `n` arrivals spread over the tick that ends at `t`.
    fn arrivals(s: &mut Scaler, t: f64, n: u32) {
        (0..n).for_each(|i| s.arrival(t - 0.1 + 0.1 * f64::from(i) / f64::from(n), false));
    }

    #[test]
    fn idle_keeps_min_ready() {
        // (Nothing remembered of the arrivals between bursts, so no prior either.)
        let mut s = Scaler::new(PoolPolicy { burst_window_s: 0.0, ..policy() }, TICK, 0.0, 100);
        assert_eq!(s.tick(load(0, 0), 0.1), Action::Grow(2));
        assert_eq!(s.tick(load(0, 2), 0.2), Action::Hold);
        // Hours later, nothing having come: still min_ready, with or without the model.
        assert_eq!(s.tick(load(0, 2), 7200.0), Action::Hold);
        let mut s = Scaler::new(policy(), TICK, 0.0, 100);
        assert!(matches!(s.tick(load(0, 0), 0.1), Action::Grow(n) if n >= 2));
        s.tick(load(0, 2), 7200.0);
        assert_eq!(s.target(), 2);
    }

    #[test]
    fn a_burst_scales_out_at_once_and_stays_within_max() {
        let mut s = Scaler::new(policy(), TICK, 0.0, 100);
        s.tick(load(0, 2), 0.1);
        // 30 arrivals in a tick (300/s): 15 within a refill, with Poisson headroom.
        arrivals(&mut s, 0.2, 30);
        let Action::Grow(n) = s.tick(load(10, 2), 0.2) else { panic!("no scale-out") };
        assert!((20..=28).contains(&(n + 2)), "target {}", n + 2);
        // max (40) caps ready + busy.
        arrivals(&mut s, 0.3, 30);
        s.tick(load(30, 10), 0.3);
        assert_eq!(s.target(), 10);
        assert_eq!(s.deficit(4, 30), 6);
        assert_eq!(s.deficit(12, 30), 0);
    }

    #[test]
    fn the_host_limit_applies_unless_the_policy_sets_max() {
        let p = PoolPolicy { max: None, ..policy() };
        assert_eq!(Scaler::new(p.clone(), TICK, 0.0, 300).limit(), 300);
        assert_eq!(Scaler::new(policy(), TICK, 0.0, 300).limit(), 40);
        // Never below min_ready, never 0.
        assert_eq!(Scaler::new(PoolPolicy { min_ready: 5, ..p.clone() }, TICK, 0.0, 3).limit(), 5);
        assert_eq!(Scaler::new(PoolPolicy { min_ready: 0, ..p }, TICK, 0.0, 0).limit(), 1);
    }

    #[test]
    fn scale_in_waits_for_the_delay_and_goes_in_steps() {
        // (Nothing remembered of the arrivals between bursts: no reserve to scale in to.)
        let mut s = Scaler::new(PoolPolicy { burst_window_s: 0.0, ..policy() }, TICK, 0.0, 100);
        let mut t = 0.0;
        for _ in 0..5 {
            t += 0.1;
            arrivals(&mut s, t, 20);
            s.tick(load(0, 20), t);
        }
        let mut ready = s.target();
        assert!(ready > 10, "{ready}");
        // Load gone: the target falls (over the rate windows, 2 s at most); the pool is held
        // until the target has been below it for the delay (1 s), then one clone goes per tick,
        // down to min_ready.
        let (mut shrinks, mut first_below) = (Vec::new(), None);
        for i in 0..200 {
            t += 0.1;
            let a = s.tick(load(0, ready), t);
            if s.target() < ready && first_below.is_none() {
                first_below = Some(i);
            }
            if let Action::Shrink(n) = a {
                assert_eq!(n, 1);
                ready -= n;
                shrinks.push(i);
            }
        }
        assert_eq!(ready, 2, "down to min_ready");
        let first_below = first_below.unwrap();
        assert!(shrinks[0] >= first_below + 9, "scaled in before the delay: {first_below} {shrinks:?}");
        assert!(shrinks.windows(2).all(|w| w[1] - w[0] == 1), "not one step per tick: {shrinks:?}");
    }

    #[test]
    fn a_pool_not_worth_a_clone_is_unloaded_at_once() {
        let p = PoolPolicy { min_ready: 0, ..policy() };
        let mut s = Scaler::new(p, TICK, 0.0, 100);
        // Registered, never called: warm for a few minutes at the default price (a few clones for
        // a minute or so, then one), then unloaded in one step (no delay: nothing suggests a call
        // is coming).
        let Action::Grow(mut ready) = s.tick(load(0, 0), 0.1) else { panic!("not warmed") };
        let mut t = 0.1;
        let unloaded = loop {
            t += 0.1;
            match s.tick(load(0, ready), t) {
                Action::Shrink(n) if n == ready => break t,
                Action::Shrink(n) => ready -= n,
                Action::Hold => {}
                Action::Grow(n) => panic!("grew by {n} at {t}"),
            }
        };
        assert_eq!(ready, 1, "unloaded from {ready}");
        assert!((120.0..900.0).contains(&unloaded), "{unloaded}");
    }

    #[test]
    fn oscillating_load_does_not_churn() {
        // Load that comes and goes faster than the scale-in delay (5 s).
        let mut s = Scaler::new(PoolPolicy { scale_in_delay_s: 5.0, ..policy() }, TICK, 0.0, 100);
        let mut ready = 0u32;
        let (mut grown, mut shrunk) = (0, 0);
        for i in 0..600 {
            let t = f64::from(i + 1) * 0.1;
            // 1 s on at 100/s, 1 s off.
            if (i / 10) % 2 == 0 {
                arrivals(&mut s, t, 10);
            }
            match s.tick(load(0, ready), t) {
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
        assert!(grown < 30, "{grown} clones made");
    }

    /// A pool ticked for a minute under 20 arrivals a second, each keeping its clone half a
    /// second (10 in use), with `came_back` of every 2 that end back in the pool.
    fn steady(came_back: u32) -> Scaler {
        let p = PoolPolicy { min_ready: 0, max: None, ..policy() };
        let mut s = Scaler::new(p, TICK, 0.0, 1000);
        let mut t = 0.0;
        for _ in 0..600 {
            t += 0.1;
            arrivals(&mut s, t, 2);
            s.observe(Load { busy: 10, have: 10, refill_s: 0.05, restore_cost_s: 1.0, ended: 2, came_back }, t);
            let target = s.wanted(s.policy().price());
            s.decide(target, 10);
        }
        s
    }

    #[test]
    fn a_pool_whose_clones_come_back_refills_its_whole_size() {
        let s = steady(2);
        let ready = s.target();
        assert!(s.recycled() >= 10, "{s:?}");
        // A handoff moves a clone from ready to in use: nothing to restore, unless the pool's
        // whole size falls short.
        assert_eq!(s.deficit(ready - 1, 11), 0);
        assert_eq!(s.deficit(ready - 3, 10), 3);
        // Clones destroyed after use (acquires): a restore for each handoff, as without recycling.
        let s = steady(0);
        assert_eq!(s.recycled(), 0);
        assert_eq!(s.deficit(s.target() - 1, 11), 1);
    }

    #[test]
    fn recycled_clones_that_come_back_stay_within_the_held_level() {
        let mut s = steady(2);
        // Clones in use come back between ticks: none is destroyed while the pool is at its level.
        let ready = s.target();
        let back = s.decide(ready, ready);
        assert_eq!(back, Action::Hold);
        // Far beyond the level: a quarter of the surplus per tick.
        let have = ready + 40;
        assert!(matches!(s.decide(ready, have), Action::Shrink(n) if n >= 8), "{s:?}");
    }

    #[test]
    fn a_higher_price_keeps_fewer_clones() {
        let mut s = Scaler::new(PoolPolicy { min_ready: 0, ..policy() }, TICK, 0.0, 1000);
        for i in 0..100 {
            let t = f64::from(i + 1) * 0.1;
            arrivals(&mut s, t, 5);
            s.observe(load(0, 0), t);
        }
        let (cheap, dear) = (s.wanted(1e-6), s.wanted(1.0));
        assert!(cheap > dear, "{cheap} {dear}");
        assert!(dear >= 1);
    }

    #[test]
    fn recycling_is_on_for_invocations_unless_a_function_opts_out() {
        let auto = PoolPolicy::default();
        assert_eq!((auto.uses_allowed(true), auto.uses_allowed(false)), (AUTO_MAX_USES, 1));
        let single = PoolPolicy { max_uses: Some(1), ..auto.clone() };
        assert_eq!((single.uses_allowed(true), single.uses_allowed(false)), (1, 1));
        let many = PoolPolicy { max_uses: Some(50), ..auto };
        assert_eq!((many.uses_allowed(true), many.uses_allowed(false)), (50, 50));
    }

    #[test]
    fn bad_policies_are_refused() {
        let bad = [
            PoolPolicy { max: Some(1), min_ready: 2, ..policy() },
            PoolPolicy { max: Some(0), min_ready: 0, ..policy() },
            PoolPolicy { max: Some(MAX_POOL + 1), ..policy() },
            PoolPolicy { min_ready: MAX_POOL + 1, max: None, ..policy() },
            PoolPolicy { headroom: 0.5, ..policy() },
            PoolPolicy { headroom: f64::NAN, ..policy() },
            PoolPolicy { scale_in_step: 0, ..policy() },
            PoolPolicy { scale_in_delay_s: -1.0, ..policy() },
            PoolPolicy { burst_window_s: 1e9, ..policy() },
            PoolPolicy { max_uses: Some(0), ..policy() },
            PoolPolicy { lease_s: 0.0, ..policy() },
            PoolPolicy { lease_s: f64::INFINITY, ..policy() },
            PoolPolicy { cold_start_cost_s: 0.0, ..policy() },
            PoolPolicy { cold_start_cost_s: f64::NAN, ..policy() },
            PoolPolicy { cold_start_cost_s: 1e12, ..policy() },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(policy().validate().is_ok());
        assert!(PoolPolicy::default().validate().is_ok());
        // Unset fields stay unset in JSON; set ones come back.
        let json = serde_json::to_string(&PoolPolicy::default()).unwrap();
        assert!(!json.contains("\"max\"") && !json.contains("\"max_uses\""), "{json}");
        let p: PoolPolicy = serde_json::from_str(r#"{"max": 8, "max_uses": 3}"#).unwrap();
        assert_eq!((p.max, p.max_uses), (Some(8), Some(3)));
        assert!(serde_json::from_str::<PoolPolicy>(r#"{"max": -1}"#).is_err());
        assert!(serde_json::from_str::<PoolPolicy>(r#"{"bogus": 1}"#).is_err());
    }
}
