//! The scaling of pools: taking a clone for a handoff, and the background loop that sweeps ended
//! clones, promotes started ones and grows or shrinks each pool towards the target the host's
//! allocation (`scale::fleet`, the same code `ember simulate` runs) gives it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::function::{clock_s, host, Busy, CpuSample, Function, PooledVm};
use super::model::FunctionState;
use super::supervisor::Supervisor;
use crate::scale::fleet;
use crate::scale::scaler::{Action, Load};
use crate::scale::TICK;
use crate::sys::Locked;

/// Most clones starting at once, all functions together (restored, agent not serving yet). A
/// clone's start is guest kernel work; too many at once on few host cores starve each other's
/// timer ticks and none finishes (64 at once on 2 cores where guest kernel mode is emulated never
/// did).
const MAX_WARMING: usize = 8;
/// The most CPU one restore is believed to take, seconds: a measure beyond it is not one.
const MAX_RESTORE_CPU_S: f64 = 10.0;

impl Supervisor {
    /// Takes a live clone out of the pool (ended ones are dropped and counted), marking it busy: a
    /// ready one, else one still starting (restored already, so still no cold start). `arrival`:
    /// the scaler counts this as a request (false on an acquire's later tries).
    pub(super) fn take_warm(&self, f: &Arc<Function>, arrival: bool) -> Option<(PooledVm, Busy)> {
        let mut pool = f.pool.locked();
        let mut crashed = Vec::new();
        let mut warm = None;
        while let Some(c) = pool.ready.pop_front().or_else(|| pool.warming.pop_front()) {
            if !c.vm.ended() {
                warm = Some((c, Busy::take(f, &mut pool)));
                break;
            }
            crashed.push(c);
        }
        let (have, busy) = (pool.have(), pool.busy);
        drop(pool);
        // Every handoff, warm or cold (the cold path comes here first), is an arrival.
        if arrival {
            f.scaler.locked().arrival(clock_s(), warm.is_none());
        }
        f.counters.replaced.fetch_add(crashed.len() as u64, Ordering::Relaxed);
        // Dropping a VM joins its threads: never on the caller's (async) thread.
        self.discard(crashed);
        self.want_refill(f, have, busy);
        warm
    }

    /// Asks the background loop to refill pools now rather than at its next tick, if `f`'s pool
    /// (`have` clones ready, starting or being restored) is short of its target.
    pub(super) fn want_refill(&self, f: &Function, have: u32, busy: u32) {
        if self.scaling_paused.load(Ordering::Relaxed) || f.scaler.locked().deficit(have, busy) == 0 {
            return;
        }
        let mut wanted = self.refill_wanted.locked();
        if !*wanted {
            *wanted = true;
            self.refill_signal.notify_one();
        }
    }

    /// Stops or restarts the scaling of pools (the background loop keeps running).
    pub fn pause_scaling(&self, paused: bool) {
        self.scaling_paused.store(paused, Ordering::SeqCst);
    }

    /// The functions the background loop looks after: ready and not deleted.
    pub(super) fn live_functions(&self) -> Vec<Arc<Function>> {
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        functions
            .into_iter()
            .filter(|f| *f.state.locked() == FunctionState::Ready && !f.deleted.load(Ordering::SeqCst))
            .collect()
    }

    /// Drops clones that have ended and moves clones whose agent now serves from warming to ready
    /// (learning the refill time from them).
    pub(super) fn sweep(&self, f: &Function) {
        let (mut dead, mut started) = (Vec::new(), Vec::new());
        let mut pool = f.pool.locked();
        // In place: the common pass (nothing ended, nothing started) allocates and moves nothing,
        // and holds the lock the handoff path needs as briefly as possible.
        let mut i = 0;
        while i < pool.ready.len() {
            if pool.ready[i].vm.ended() {
                dead.extend(pool.ready.remove(i));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < pool.warming.len() {
            let c = &pool.warming[i];
            if c.vm.ended() {
                dead.extend(pool.warming.remove(i));
            } else if c.vm.mailbox().agent_serving() {
                started.extend(pool.warming.remove(i));
            } else {
                i += 1;
            }
        }
        for c in started {
            let took = c.restored.elapsed();
            self.metrics.clone_start.observe(took);
            let mut refill = f.refill_s.locked();
            *refill = 0.8 * *refill + 0.2 * took.as_secs_f64();
            drop(refill);
            pool.ready.push_back(c);
        }
        // A measure of restores' CPU ends when its clones all serve, and is dropped if anything
        // else ran in the worker meanwhile.
        let sample = match pool.sample {
            Some(s) if s.handoffs != handoffs(f) || pool.busy > 0 || !dead.is_empty() => {
                pool.sample = None;
                None
            }
            Some(_) if pool.warming.is_empty() && pool.restoring == 0 => pool.sample.take(),
            _ => None,
        };
        drop(pool);
        if let (Some(s), Some(now)) = (sample, f.worker.cpu_used_us()) {
            let each = now.saturating_sub(s.cpu_us) as f64 / 1e6 / f64::from(s.clones.max(1));
            // (Bounded: a worker restarted meanwhile counts from 0, and is no measure.)
            if each > 0.0 && each < MAX_RESTORE_CPU_S && now >= s.cpu_us {
                let mut cpu = f.restore_cpu_s.locked();
                *cpu = 0.7 * *cpu + 0.3 * each;
            }
        }
        if !dead.is_empty() {
            f.counters.replaced.fetch_add(dead.len() as u64, Ordering::Relaxed);
            tracing::warn!(function = %f.name, "{} ready clones had ended; replacing them", dead.len());
        }
    }

    /// Clones starting now, all functions together.
    pub(super) fn warming_total(&self, functions: &[Arc<Function>]) -> usize {
        functions
            .iter()
            .map(|f| {
                let pool = f.pool.locked();
                pool.warming.len() + pool.restoring as usize
            })
            .sum()
    }

    /// Restores up to `n` clones of `f` into its warming queue, within the host-wide limit of
    /// clones starting at once and the function's `max`; the rest follows on later passes, as
    /// clones finish starting.
    pub(super) fn grow(&self, f: &Function, n: u32, warming: &mut usize) {
        let n = (n as usize).min(MAX_WARMING.saturating_sub(*warming)) as u32;
        // Never past `max` with what is in use now (the scaler's targets are as of its last tick).
        // Nothing else running in the worker: a measure of these restores' CPU (its cgroup read
        // only then).
        let quiet = |pool: &super::function::Pool| {
            pool.busy == 0 && pool.warming.is_empty() && pool.restoring == 0 && pool.sample.is_none()
        };
        let cpu_us = if quiet(&f.pool.locked()) { f.worker.cpu_used_us() } else { None };
        let n = {
            let mut pool = f.pool.locked();
            let n = n.min(f.max_clones.saturating_sub(pool.busy + pool.have()));
            if let (Some(cpu_us), true, true) = (cpu_us, quiet(&pool), n > 0) {
                pool.sample = Some(CpuSample { cpu_us, handoffs: handoffs(f), clones: n });
            }
            pool.restoring += n;
            n
        };
        *warming += n as usize;
        let mut reserved = Reserved { f, left: n };
        for _ in 0..n {
            let c = self.restore_clone(f);
            let mut pool = f.pool.locked();
            // In one step with the clone's arrival: the pool never counts one clone fewer.
            pool.restoring -= 1;
            reserved.left -= 1;
            match c {
                Ok(c) if !f.deleted.load(Ordering::SeqCst) => pool.warming.push_back(c),
                Ok(_) => {}
                // (A guest can make this happen: its worker killed over and over. Rate-limited.)
                Err(e) => {
                    pool.sample = None;
                    crate::log_limited!(error, "cannot refill the pool of {}: {e}", f.name)
                }
            }
            drop(pool);
            f.pool_changed.notify_all();
        }
    }

    /// What both passes of the background loop start with: unless scaling is paused, every live
    /// function with its pool swept, and the clones starting host-wide.
    pub(super) fn swept_functions(&self) -> Option<(Vec<Arc<Function>>, usize)> {
        if self.scaling_paused.load(Ordering::SeqCst) {
            return None;
        }
        let functions = self.live_functions();
        functions.iter().for_each(|f| self.sweep(f));
        let warming = self.warming_total(&functions);
        Some((functions, warming))
    }

    /// One tick of the background loop: sweep every pool, then scale it: every function's scaler
    /// sees its pool, the host's allocation sets the targets under the idle budget, each pool
    /// grows or shrinks towards its own.
    pub fn tick(&self) {
        self.expire_leases();
        let Some((functions, mut warming)) = self.swept_functions() else { return };
        let now = clock_s();
        for f in &functions {
            let restore_cost_s = host().restore_cost_s(*f.restore_cpu_s.locked(), f.spec.mem_mib as f64);
            let refill_s = *f.refill_s.locked();
            let load = {
                let mut pool = f.pool.locked();
                let (ended, came_back) = (std::mem::take(&mut pool.ended), std::mem::take(&mut pool.came_back));
                Load { busy: pool.busy, have: pool.have(), refill_s, restore_cost_s, ended, came_back }
            };
            f.scaler.locked().observe(load, now);
        }
        let alloc = fleet::allocate_with(
            host(),
            functions.len(),
            |i| functions[i].spec.mem_mib as f64,
            |i, price| functions[i].scaler.locked().wanted(price),
            |i| functions[i].spec.pool.price(),
        );
        self.metrics.host.set(host().idle_budget_mib, alloc.used_mib);
        for (f, &target) in functions.iter().zip(&alloc.targets) {
            let have = f.pool.locked().have();
            let action = f.scaler.locked().decide(target, have);
            match action {
                Action::Grow(n) => self.grow(f, n, &mut warming),
                Action::Shrink(n) => {
                    let mut pool = f.pool.locked();
                    let mut gone = Vec::new();
                    for _ in 0..n {
                        match pool.warming.pop_back().or_else(|| pool.ready.pop_back()) {
                            Some(c) => gone.push(c),
                            None => break,
                        }
                    }
                    drop(pool);
                    drop(gone);
                }
                Action::Hold => {}
            }
        }
    }

    /// Between ticks, after handoffs: restores what pools lack against their last target.
    pub fn refill(&self) {
        let Some((functions, mut warming)) = self.swept_functions() else { return };
        for f in &functions {
            let (have, busy) = {
                let pool = f.pool.locked();
                (pool.have(), pool.busy)
            };
            let n = f.scaler.locked().deficit(have, busy);
            if n > 0 {
                self.grow(f, n, &mut warming);
            }
        }
    }

    /// Runs [`Supervisor::tick`] every [`TICK`], and [`Supervisor::refill`] whenever a handoff
    /// asks for it in between, on a thread until [`Supervisor::shutdown`].
    pub fn start_scaling(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let sup = self.clone();
        std::thread::Builder::new().name("scaler".into()).spawn(move || {
            let mut next_tick = Instant::now();
            while !sup.stopping.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= next_tick {
                    // One function's bad state must not stop pool maintenance for everyone: a
                    // panic in a tick is logged and the loop goes on.
                    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sup.tick())) {
                        crate::log_limited!(error, "the scaling loop's tick panicked: {:?}", p.downcast_ref::<&str>());
                    }
                    next_tick = (next_tick + TICK).max(now);
                    continue;
                }
                let wanted = {
                    let guard = sup.refill_wanted.locked();
                    let (mut guard, _) = sup
                        .refill_signal
                        .wait_timeout_while(guard, next_tick - now, |w| !*w)
                        .unwrap_or_else(|p| p.into_inner());
                    std::mem::take(&mut *guard)
                };
                if wanted {
                    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sup.refill())) {
                        crate::log_limited!(error, "a refill panicked: {:?}", p.downcast_ref::<&str>());
                    }
                }
            }
        })
    }
}

/// The function's handoffs so far (a handoff in flight is also one in use, `Pool::busy`).
fn handoffs(f: &Function) -> u64 {
    f.counters.handoffs.load(Ordering::SeqCst)
}

/// Places reserved in a pool for restores still to come (`Pool::restoring`, which `max` counts),
/// given back on every way out of [`Supervisor::grow`], a panic in a restore included (the
/// scaling loop goes on after one).
struct Reserved<'a> {
    f: &'a Function,
    left: u32,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.left > 0 {
            self.f.pool.locked().restoring -= self.left;
            self.f.pool_changed.notify_all();
        }
    }
}
