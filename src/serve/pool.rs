//! Pools of clones and their scaling: what a function holds (ready and starting clones, counters,
//! its autoscaler), taking a clone for a handoff, and the background loop that sweeps ended clones,
//! promotes started ones and grows or shrinks each pool towards the target the host's allocation
//! (`fleet.rs`, the same code `ember simulate` runs) gives it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::model::{FunctionInfo, FunctionSpec, FunctionState, WorkerInfo};
use super::supervisor::Supervisor;
use crate::isolation::worker::{CloneVm, Worker};
use crate::scale::fleet::{self, Host};
use crate::scale::scaler::{Action, Load, Scaler};
use crate::sys::Locked;
use crate::template::Template;

pub use crate::scale::TICK;
/// Most clones starting at once, all functions together (restored, agent not serving yet). A
/// clone's start is guest kernel work; too many at once on few host cores starve each other's
/// timer ticks and none finishes (64 at once on 2 cores where guest kernel mode is emulated never
/// did).
const MAX_WARMING: usize = 8;
/// The refill time assumed until a clone of the function has been seen starting.
const INITIAL_REFILL_S: f64 = 0.1;

/// The daemon's clock for the scaler: seconds since its first reading.
pub(super) fn clock_s() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// This machine, as the scaler's host (read once).
pub(super) fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(Host::this_machine)
}

/// A clone: a restored VM and its channels.
pub struct PooledVm {
    pub id: u64,
    pub(super) vm: CloneVm,
    pub mailbox: PathBuf,
    pub vsock: PathBuf,
    /// Handoffs so far.
    pub(super) uses: u32,
    pub(super) restored: Instant,
    /// The clone's network namespace (last: it goes after the clone).
    pub(super) net: Option<crate::isolation::network::Slot>,
}

#[derive(Default)]
pub(super) struct Pool {
    pub(super) ready: VecDeque<PooledVm>,
    /// Restored clones whose agent is not serving yet.
    pub(super) warming: VecDeque<PooledVm>,
    /// Clones being restored by the background loop.
    pub(super) restoring: u32,
    /// Clones handed out and not yet released.
    pub(super) busy: u32,
}

impl Pool {
    /// Every clone not handed out (ready and warming), for destroying outside the lock.
    pub(super) fn take_idle(&mut self) -> Vec<PooledVm> {
        let warming: Vec<PooledVm> = self.warming.drain(..).collect();
        self.ready.drain(..).chain(warming).collect()
    }

    /// Ready, starting and being restored: the pool as the scaler counts it.
    pub(super) fn have(&self) -> u32 {
        (self.ready.len() + self.warming.len()) as u32 + self.restoring
    }

    pub(super) fn mark_busy(&mut self) {
        self.busy += 1;
    }
}

/// Counters of one function (exported in /metrics and GET /functions/{name}).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) handoffs: AtomicU64,
    pub(super) cold_starts: AtomicU64,
    pub(super) invocations: AtomicU64,
    pub(super) invocation_errors: AtomicU64,
    pub(super) replaced: AtomicU64,
    pub(super) recycled: AtomicU64,
    pub(super) expired_leases: AtomicU64,
    /// Invocations of the function in flight now.
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
}

pub struct Function {
    pub(super) name: String,
    pub(super) spec: FunctionSpec,
    pub(super) state: Mutex<FunctionState>,
    pub(super) template: Mutex<Option<Arc<Template>>>,
    pub(super) pool: Mutex<Pool>,
    /// Signalled (with `pool`) when a clone joins the pool or a place under `max` frees up.
    pub(super) pool_changed: Condvar,
    pub(super) scaler: Mutex<Scaler>,
    pub(super) counters: Counters,
    pub(super) deleted: AtomicBool,
    /// Restore to agent serving, seconds (an EWMA of what was seen): the scaler's refill time.
    pub(super) refill_s: Mutex<f64>,
    /// The version of its template (see `Supervisor::version_of`), once made.
    pub(super) version: Mutex<Option<String>>,
    /// Most clones (ready, starting, restoring and in use) at once: the policy's `max`, or as
    /// many of its guests as the host's memory holds.
    pub(super) max_clones: u32,
    /// The process its clones run in (with worker isolation), once started.
    pub(super) worker: Mutex<Option<Arc<Worker>>>,
    /// Workers that ended without being asked to, and how the last one did.
    pub(super) worker_restarts: AtomicU64,
    pub(super) last_worker_exit: Mutex<Option<String>>,
    /// When a new worker may start, and how many in a row ended soon after they started.
    pub(super) worker_backoff: Mutex<(Option<Instant>, u32)>,
    /// Held while a worker is started (`worker` itself only for a moment: GET reads it).
    pub(super) worker_spawn: Mutex<()>,
}

impl Function {
    pub(super) fn new(name: &str, spec: FunctionSpec) -> Self {
        let scaler = Scaler::new(spec.pool.clone(), TICK, clock_s(), host().clone_limit(spec.mem_mib as f64));
        Self {
            name: name.to_string(),
            max_clones: scaler.limit(),
            scaler: Mutex::new(scaler),
            spec,
            state: Mutex::new(FunctionState::Creating),
            template: Mutex::new(None),
            pool: Mutex::new(Pool::default()),
            pool_changed: Condvar::new(),
            counters: Counters::default(),
            deleted: AtomicBool::new(false),
            refill_s: Mutex::new(INITIAL_REFILL_S),
            version: Mutex::new(None),
            worker: Mutex::new(None),
            worker_restarts: AtomicU64::new(0),
            last_worker_exit: Mutex::new(None),
            worker_backoff: Mutex::new((None, 0)),
            worker_spawn: Mutex::new(()),
        }
    }

    pub(super) fn template(&self) -> Option<Arc<Template>> {
        self.template.locked().clone()
    }

    pub(super) fn info(&self) -> FunctionInfo {
        let pool = self.pool.locked();
        // One lock of the scaler (a second in the same expression would wait on the first).
        let (target_ready, predicted_arrivals_per_s) = {
            let scaler = self.scaler.locked();
            (scaler.target(), scaler.predicted_rate())
        };
        let c = &self.counters;
        FunctionInfo {
            name: self.name.clone(),
            state: self.state.locked().clone(),
            spec: self.spec.clone(),
            version: self.version.locked().clone(),
            update: None,
            ready: pool.ready.len() as u32,
            warming: pool.warming.len() as u32,
            busy: pool.busy,
            restoring: pool.restoring,
            target_ready,
            predicted_arrivals_per_s,
            max_clones: self.max_clones,
            handoffs: c.handoffs.load(Ordering::Relaxed),
            cold_starts: c.cold_starts.load(Ordering::Relaxed),
            invocations: c.invocations.load(Ordering::Relaxed),
            invocation_errors: c.invocation_errors.load(Ordering::Relaxed),
            replaced_clones: c.replaced.load(Ordering::Relaxed),
            recycled_clones: c.recycled.load(Ordering::Relaxed),
            expired_leases: c.expired_leases.load(Ordering::Relaxed),
            refill_s: *self.refill_s.locked(),
            worker: self.worker_info(),
            network: None,
        }
    }
}

impl Function {
    fn worker_info(&self) -> Option<WorkerInfo> {
        let w = self.worker.locked().clone()?;
        let (restarts, mut last_exit) =
            (self.worker_restarts.load(Ordering::Relaxed), self.last_worker_exit.locked().clone());
        let alive = !w.dead();
        if !alive {
            // Ended, not replaced yet (the next restore replaces it).
            last_exit = w.exit().or(last_exit);
        }
        Some(WorkerInfo {
            pid: alive.then_some(w.pid),
            uid: w.uid,
            jailed: w.jailed,
            cgroup: w.cgroup_path.clone(),
            memory_limit_bytes: w.memory_limit,
            cpu_throttled_periods: w.cpu_throttled(),
            cpu_used_us: w.cpu_used_us(),
            restarts: restarts + u64::from(!alive && !w.counted.load(Ordering::SeqCst)),
            last_exit,
            restarting_in_s: self
                .worker_backoff
                .locked()
                .0
                .and_then(|at| at.checked_duration_since(Instant::now()))
                .map(|d| d.as_secs_f64()),
        })
    }
}

impl Supervisor {
    /// Takes a live clone out of the pool (ended ones are dropped and counted), marking it busy: a
    /// ready one, else one still starting (restored already, so still no cold start). `arrival`:
    /// the scaler counts this as a request (false on an acquire's later tries).
    pub(super) fn take_warm(&self, f: &Function, arrival: bool) -> Option<PooledVm> {
        let mut pool = f.pool.locked();
        let mut crashed = Vec::new();
        let mut warm = None;
        while let Some(c) = pool.ready.pop_front().or_else(|| pool.warming.pop_front()) {
            if !c.vm.ended() {
                warm = Some(c);
                break;
            }
            crashed.push(c);
        }
        if warm.is_some() {
            pool.mark_busy();
        }
        let have = pool.have();
        drop(pool);
        // Every handoff, warm or cold (the cold path comes here first), is an arrival.
        if arrival {
            f.scaler.locked().arrival(clock_s(), warm.is_none());
        }
        f.counters.replaced.fetch_add(crashed.len() as u64, Ordering::Relaxed);
        // Dropping a VM joins its threads: never on the caller's (async) thread.
        self.discard(crashed);
        self.want_refill(f, have);
        warm
    }

    /// Asks the background loop to refill pools now rather than at its next tick, if `f`'s pool
    /// (`have` clones ready, starting or being restored) is short of its target.
    pub(super) fn want_refill(&self, f: &Function, have: u32) {
        if self.scaling_paused.load(Ordering::Relaxed) || f.scaler.locked().deficit(have) == 0 {
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
        drop(pool);
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
        let n = {
            let mut pool = f.pool.locked();
            let n = n.min(f.max_clones.saturating_sub(pool.busy + pool.have()));
            pool.restoring += n;
            n
        };
        *warming += n as usize;
        for _ in 0..n {
            let c = self.restore_clone(f);
            let mut pool = f.pool.locked();
            pool.restoring -= 1;
            match c {
                Ok(c) if !f.deleted.load(Ordering::SeqCst) => pool.warming.push_back(c),
                Ok(_) => {}
                // (A guest can make this happen: its worker killed over and over. Rate-limited.)
                Err(e) => crate::log_limited!(error, "cannot refill the pool of {}: {e}", f.name),
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
            let load = {
                let pool = f.pool.locked();
                Load { busy: pool.busy, have: pool.have(), refill_s: *f.refill_s.locked() }
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
            let have = f.pool.locked().have();
            let n = f.scaler.locked().deficit(have);
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
