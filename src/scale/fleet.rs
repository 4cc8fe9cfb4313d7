//! The host's side of the autoscaler: one memory budget for the idle (ready) clones of every
//! function, spent where a ready clone saves the most expected cold starts per MiB-second, and the
//! per-function safety limit derived from the host's memory. The daemon's scaling loop and `ember
//! simulate` both call [`allocate`] every tick with every function's [`Scaler`].
//!
//! Each function's k-th ready clone is worth v_k cold starts saved per second (its
//! [`ArrivalModel`](super::arrivals::ArrivalModel)), and one cold start of it is worth
//! `cold_start_cost_s` idle clone-seconds. It is kept when v_k x cold_start_cost_s >= 1 (it pays
//! for its own idle time) and, when the budget cannot hold every such clone, when
//! v_k x cold_start_cost_s / MiB >= mu, the budget's price per MiB: the greedy choice (clones by
//! decreasing value per MiB until the budget is spent), found as the lowest mu at which the
//! clones kept fit. A function's `min_ready` is always kept, budget or not.

use super::scaler::{Scaler, MAX_POOL};

/// The host: its memory and the part of it that idle clones may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// The host's memory, MiB.
    pub memory_mib: f64,
    /// Memory for ready clones, all functions together, MiB.
    pub idle_budget_mib: f64,
    /// The memory that costs as much as one core, MiB: the host's price of CPU against memory,
    /// which turns a restore's CPU into idle clone-seconds ([`Host::restore_cost_s`]).
    pub core_mib: f64,
}

/// The default price of a core in memory: 9.1 GB (AWS Fargate's list prices, $0.04048 per
/// vCPU-hour against $0.004445 per GB-hour: one a serverless platform itself pays for both).
pub const CORE_MIB: f64 = 9.1e9 / 1_048_576.0;

impl Host {
    /// A host with `memory_mib` of memory, half of it for idle clones.
    pub fn with_memory(memory_mib: f64) -> Self {
        Self { memory_mib, idle_budget_mib: memory_mib / 2.0, core_mib: CORE_MIB }
    }

    /// What a restore that takes `cpu_s` of CPU costs, in idle seconds of a clone of
    /// `clone_mib`.
    pub fn restore_cost_s(&self, cpu_s: f64, clone_mib: f64) -> f64 {
        cpu_s * self.core_mib / clone_mib.max(1.0)
    }

    /// This machine (`MemTotal` of /proc/meminfo), half of its memory for idle clones; 16 GiB when
    /// that cannot be read.
    pub fn this_machine() -> Self {
        let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<f64>().ok()
        });
        Self::with_memory(total_kib.map_or(16_384.0, |k| k / 1024.0))
    }

    /// A function's most clones at once when its policy sets no `max`: as many of its guests as
    /// the host's memory holds.
    pub fn clone_limit(&self, clone_mib: f64) -> u32 {
        (self.memory_mib / clone_mib.max(1.0)).floor().clamp(1.0, f64::from(MAX_POOL)) as u32
    }
}

/// What [`allocate`] decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    /// Ready clones per function, in the order given.
    pub targets: Vec<u32>,
    /// The budget's price per MiB (0 when it was not binding).
    pub price_per_mib: f64,
    /// Memory the targets hold, MiB.
    pub used_mib: f64,
}

/// One function as the allocation sees it.
pub struct Claim<'a> {
    pub scaler: &'a Scaler,
    /// Memory of one of its clones, MiB.
    pub clone_mib: f64,
}

/// The targets of every function under the host's budget (see the module's description).
pub fn allocate(host: &Host, claims: &[Claim<'_>]) -> Allocation {
    allocate_with(
        host,
        claims.len(),
        |i| claims[i].clone_mib,
        |i, price| claims[i].scaler.wanted(price),
        |i| claims[i].scaler.policy().price(),
    )
}

/// [`allocate`] over functions reached through closures (the daemon's sit behind locks): `mib(i)`
/// of a clone, `wanted(i, price)` ready clones at a price, `floor(i)` the function's own price.
pub fn allocate_with(
    host: &Host,
    n: usize,
    mib: impl Fn(usize) -> f64,
    wanted: impl Fn(usize, f64) -> u32,
    floor: impl Fn(usize) -> f64,
) -> Allocation {
    let at = |mu: f64| -> (Vec<u32>, f64) {
        let mut used = 0.0;
        let targets = (0..n)
            .map(|i| {
                let t = wanted(i, floor(i) * (mu * mib(i)).max(1.0));
                used += f64::from(t) * mib(i);
                t
            })
            .collect();
        (targets, used)
    };
    let (targets, used_mib) = at(0.0);
    if used_mib <= host.idle_budget_mib {
        return Allocation { targets, price_per_mib: 0.0, used_mib };
    }
    // Binding: the lowest price per MiB at which the targets fit (found in log steps; at the top
    // of the range only min_ready is left).
    let (mut lo, mut hi) = (1e-9f64, 1e12f64);
    for _ in 0..60 {
        let mid = (lo * hi).sqrt();
        if at(mid).1 <= host.idle_budget_mib {
            hi = mid;
        } else {
            lo = mid;
        }
        if hi / lo < 1.01 {
            break;
        }
    }
    let (targets, used_mib) = at(hi);
    Allocation { targets, price_per_mib: hi, used_mib }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scale::scaler::{Load, PoolPolicy};

    const TICK: Duration = Duration::from_millis(100);

    /// A function called `per_tick` times a tick for 10 s, then ticked once more.
    fn busy(per_tick: u32, policy: PoolPolicy) -> Scaler {
        let mut s = Scaler::new(policy, TICK, 0.0, 10_000);
        for i in 1..=100 {
            let t = f64::from(i) * 0.1;
            (0..per_tick).for_each(|k| s.arrival(t - 0.1 + 0.1 * f64::from(k) / f64::from(per_tick), false));
            s.observe(Load { busy: 0, have: 0, refill_s: 0.05, restore_cost_s: 1.0, ended: 0, came_back: 0 }, t);
        }
        s
    }

    #[test]
    fn an_ample_budget_gives_every_function_what_it_is_worth() {
        let (a, b) = (busy(10, PoolPolicy::default()), busy(1, PoolPolicy::default()));
        let host = Host { idle_budget_mib: 1e6, ..Host::with_memory(1e6) };
        let claims = [Claim { scaler: &a, clone_mib: 128.0 }, Claim { scaler: &b, clone_mib: 128.0 }];
        let alloc = allocate(&host, &claims);
        assert_eq!(alloc.price_per_mib, 0.0);
        assert_eq!(alloc.targets, vec![a.wanted(a.policy().price()), b.wanted(b.policy().price())]);
        assert!(alloc.targets[0] > alloc.targets[1], "{alloc:?}");
        assert_eq!(alloc.used_mib, 128.0 * f64::from(alloc.targets[0] + alloc.targets[1]));
    }

    #[test]
    fn a_tight_budget_goes_where_clones_save_the_most_per_mib() {
        // Two functions called alike, the second's clones 4x bigger: under a budget that cannot
        // hold both, the small clones go first, and the targets fit.
        let (small, big) = (busy(20, PoolPolicy::default()), busy(20, PoolPolicy::default()));
        let full = small.wanted(small.policy().price());
        assert!(full >= 8, "{full}");
        let claims = [Claim { scaler: &small, clone_mib: 128.0 }, Claim { scaler: &big, clone_mib: 512.0 }];
        for budget in [128.0 * f64::from(full), 512.0 * f64::from(full), 600.0 * f64::from(full)] {
            let host = Host { idle_budget_mib: budget, ..Host::with_memory(1e6) };
            let alloc = allocate(&host, &claims);
            assert!(alloc.price_per_mib > 0.0, "{alloc:?}");
            assert!(alloc.used_mib <= budget, "{alloc:?}");
            assert!(alloc.targets[0] >= alloc.targets[1], "{alloc:?}");
            assert!(alloc.targets[0] > 0, "{alloc:?}");
        }
        // A budget that holds nothing holds nothing; one that holds everything, everything.
        let alloc = allocate(&Host { idle_budget_mib: 0.0, ..Host::with_memory(1e6) }, &claims);
        assert_eq!(alloc.targets, vec![0, 0]);
        let alloc = allocate(&Host { idle_budget_mib: 1e9, ..Host::with_memory(1e6) }, &claims);
        assert_eq!(alloc.targets, vec![full, full]);
    }

    #[test]
    fn a_budget_short_of_one_function_trims_its_least_valuable_clones() {
        let s = busy(20, PoolPolicy::default());
        let full = s.wanted(s.policy().price());
        let host = Host { idle_budget_mib: 128.0 * f64::from(full - 2), ..Host::with_memory(1e6) };
        let alloc = allocate(&host, &[Claim { scaler: &s, clone_mib: 128.0 }]);
        assert!(alloc.targets[0] <= full - 2 && alloc.targets[0] >= full / 2, "{alloc:?} of {full}");
    }

    #[test]
    fn min_ready_is_kept_whatever_the_budget() {
        let a = busy(5, PoolPolicy { min_ready: 3, ..Default::default() });
        let host = Host { idle_budget_mib: 0.0, ..Host::with_memory(1e6) };
        let alloc = allocate(&host, &[Claim { scaler: &a, clone_mib: 128.0 }]);
        assert_eq!(alloc.targets, vec![3]);
    }

    #[test]
    fn the_limit_follows_the_host() {
        let host = Host::with_memory(65_536.0);
        assert_eq!(host.idle_budget_mib, 32_768.0);
        assert_eq!(host.clone_limit(128.0), 512);
        assert_eq!(host.clone_limit(1e9), 1);
        assert_eq!(Host::with_memory(1e12).clone_limit(1.0), MAX_POOL);
        let here = Host::this_machine();
        assert!(here.memory_mib > 0.0 && here.idle_budget_mib > 0.0);
    }
}
