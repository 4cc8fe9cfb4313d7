//! What the daemon holds of one registered function: its registration, state and template, its
//! pool of clones (ready, starting, being restored, handed out), its autoscaler, its counters and
//! its worker process.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::backend::{CloneHandle, WorkerSlot};
use super::model::{FunctionInfo, FunctionSpec, FunctionState};
use crate::scale::fleet::Host;
use crate::scale::scaler::Scaler;
use crate::scale::TICK;
use crate::sys::Locked;
use crate::template::Template;

/// The refill time assumed until a clone of the function has been seen starting.
const INITIAL_REFILL_S: f64 = 0.1;
use crate::scale::simulate::RESTORE_CPU_S;

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
    pub(super) vm: Box<dyn CloneHandle>,
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
    /// Handoffs that ended since the scaler's last tick, and how many of their clones came back
    /// (recycled).
    pub(super) ended: u32,
    pub(super) came_back: u32,
    /// A restore's CPU being measured (see [`CpuSample`]).
    pub(super) sample: Option<CpuSample>,
}

/// A measure of what restores cost in CPU: the function's worker's CPU (its cgroup's count,
/// which the kernel keeps and the worker cannot change) from before a batch of restores to the
/// moment the last of them serves, taken only while nothing else runs in the worker (no clone in
/// use, no other clone starting, no handoff meanwhile), divided among the batch.
#[derive(Clone, Copy, Debug)]
pub(super) struct CpuSample {
    pub(super) cpu_us: u64,
    /// The function's handoffs so far (`Counters::handoffs`) when it began.
    pub(super) handoffs: u64,
    pub(super) clones: u32,
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
}

/// A clone's place among its function's handed-out ones (`Pool::busy`, which the function's
/// `max` counts): taken with [`Busy::take`], given back (and waiters told) when dropped, on every
/// way out; [`Busy::give_back`] under a pool lock the caller holds.
pub(super) struct Busy {
    f: Option<Arc<Function>>,
}

impl Busy {
    /// Counts one more busy clone of `f` in `pool`, `f`'s pool as locked by the caller.
    pub(super) fn take(f: &Arc<Function>, pool: &mut Pool) -> Self {
        pool.busy += 1;
        Self { f: Some(f.clone()) }
    }

    /// Gives the place back under the caller's lock of the function's pool (the caller tells the
    /// waiters).
    pub(super) fn give_back(mut self, pool: &mut Pool) {
        if self.f.take().is_some() {
            pool.busy -= 1;
            pool.ended += 1;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            let mut pool = f.pool.locked();
            pool.busy -= 1;
            pool.ended += 1;
            drop(pool);
            f.pool_changed.notify_all();
        }
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
    /// Clones restored, and their CPU as estimated when each was restored, microseconds.
    pub(super) restores: AtomicU64,
    pub(super) restore_cpu_us: AtomicU64,
    /// Invocations of the function in flight now.
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
}

/// One registered function (or a new version of one being made).
///
/// Lock order (a lock may be taken while holding only those before it; the daemon's own come
/// first): `Supervisor::functions` -> `Supervisor::updates` -> `Supervisor::handed` ->
/// `worker.spawning` -> `pool` -> the rest (`state`, `template`, `scaler`, `refill_s`, `restore_cpu_s`,
/// `version`, and `worker`'s own: each held alone, never two at once). A clone
/// is never stopped (its threads joined) under any of them: it goes to the discard thread.
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
    /// The CPU one restore costs, restore to agent serving, seconds: an EWMA of what its worker
    /// was measured to use ([`CpuSample`]), [`RESTORE_CPU_S`] until the first measure.
    pub(super) restore_cpu_s: Mutex<f64>,
    /// The version of its template (see `Supervisor::version_of`), once made.
    pub(super) version: Mutex<Option<String>>,
    /// Most clones (ready, starting, restoring and in use) at once: the policy's `max`, or as
    /// many of its guests as the host's memory holds.
    pub(super) max_clones: u32,
    /// The process its clones run in (with worker isolation), its restarts and backoff.
    pub(super) worker: WorkerSlot,
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
            restore_cpu_s: Mutex::new(RESTORE_CPU_S),
            version: Mutex::new(None),
            worker: WorkerSlot::default(),
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
            restores: c.restores.load(Ordering::Relaxed),
            restore_cpu_s: *self.restore_cpu_s.locked(),
            restore_cpu_seconds: c.restore_cpu_us.load(Ordering::Relaxed) as f64 / 1e6,
            worker: self.worker.info(),
            network: None,
        }
    }
}

/// A handed-out clone, with its place among its function's busy ones.
pub(super) struct Handed {
    pub(super) function: Arc<Function>,
    pub(super) clone: PooledVm,
    pub(super) busy: Busy,
    /// What the caller must present to release it.
    pub(super) lease: String,
    /// When the lease runs out and the clone is destroyed.
    pub(super) expires: Instant,
}
