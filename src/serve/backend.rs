//! Where clones and templates come from, behind one trait ([`Backend`]): [`Machines`] boots
//! templates and restores clones on this host's KVM, in the daemon itself or in each function's
//! worker process (started here, and restarted with a backoff after it dies); the unit tests put
//! a stub in its place (`serve/stub.rs`) and run the whole core without KVM.
//!
//! A clone is held as a [`CloneHandle`]: whether it ended, its mailbox, and a way to stop it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::Error;
use super::images::ImageDirs;
use super::model::{FunctionSpec, WorkerInfo};
use super::registry::{Registry, RegistryError};
use crate::channel::mailbox::Mailbox;
use crate::config::DriveConfig;
use crate::isolation::network::Slot;
use crate::isolation::worker::{CloneVm, Worker, Workers};
use crate::sys::Locked;
use crate::template::Template;
use crate::vmm::{Channels, RunOptions};

/// Why a clone could not be restored.
#[derive(Debug)]
pub enum RestoreError {
    /// The function's worker is being restarted (its last one died before it served, or could
    /// not start): none for this long.
    Restarting(Duration),
    Failed(String),
}

impl RestoreError {
    pub(super) fn refusal(self) -> Error {
        match self {
            Self::Restarting(d) => {
                let msg = format!("the function's worker is being restarted: try again in {:.1} s", d.as_secs_f64());
                Error::restarting(msg, d)
            }
            Self::Failed(e) => Error::internal(e),
        }
    }
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Restarting(d) => {
                write!(f, "no worker for {:.1} s (the last one ended or could not start)", d.as_secs_f64())
            }
            Self::Failed(e) => f.write_str(e),
        }
    }
}

impl From<String> for RestoreError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl From<&str> for RestoreError {
    fn from(e: &str) -> Self {
        Self::Failed(e.to_string())
    }
}

/// A clone as the pools hold it, whatever runs it.
pub trait CloneHandle: Send {
    /// Whether it has ended (its guest, or the process it ran in).
    fn ended(&self) -> bool;
    /// Waits up to `timeout` for it to end: whether it has (an exit event, not a poll: the
    /// mailbox's VM state word is woken when the VM ends).
    fn wait_ended(&self, timeout: Duration) -> bool {
        self.mailbox().wait_ended(timeout)
    }
    fn mailbox(&self) -> Arc<Mailbox>;
    /// Makes it leave its guest at once, without waiting; it is destroyed when dropped.
    fn request_stop(&self, why: &str);
}

impl CloneHandle for CloneVm {
    fn ended(&self) -> bool {
        CloneVm::ended(self)
    }

    fn mailbox(&self) -> Arc<Mailbox> {
        CloneVm::mailbox(self)
    }

    fn request_stop(&self, why: &str) {
        CloneVm::request_stop(self, why)
    }
}

/// A template to make: `spec`'s guest booted with `drives` to its agent's "ready" and
/// snapshotted into the registry's directory for `name` (its next version's with `next`),
/// labelled with `version`.
pub struct TemplateJob<'a> {
    pub name: &'a str,
    pub spec: &'a FunctionSpec,
    pub version: &'a str,
    pub drives: Vec<DriveConfig>,
    pub next: bool,
    pub registry: &'a Registry,
    pub images: &'a ImageDirs,
    /// A networked guest boots with its card on a prepared namespace's TAP, as its clones will.
    pub net: Option<&'a Slot>,
}

/// A clone to restore: clone `id` of function `name` (its registration, template and worker
/// slot), on `net`'s TAP; `channels` are where a clone restored in the daemon puts its mailbox
/// and vsock socket.
pub struct RestoreJob<'a> {
    pub name: &'a str,
    pub spec: &'a FunctionSpec,
    /// Most clones of the function at once (its worker is sized for them).
    pub max_clones: u32,
    /// Whether the function has been deleted meanwhile (no new worker then).
    pub deleted: bool,
    pub template: Option<Arc<Template>>,
    pub worker: &'a WorkerSlot,
    pub id: u64,
    pub net: Option<&'a Slot>,
    pub channels: (PathBuf, PathBuf),
}

/// A restored clone.
pub struct Restored {
    pub vm: Box<dyn CloneHandle>,
    pub mailbox: PathBuf,
    pub vsock: PathBuf,
    /// When its restore began, and how long the restore itself took.
    pub at: Instant,
    pub took: Duration,
}

/// Where templates and clones come from.
pub trait Backend: Send + Sync {
    /// Makes a template (blocks for the guest's boot). `None`: the backend restores clones
    /// without one (the stub).
    fn make_template(&self, job: TemplateJob<'_>) -> Result<Option<Arc<Template>>, RegistryError>;
    /// Restores a clone of the function's template and starts it.
    fn restore(&self, job: RestoreJob<'_>) -> Result<Restored, RestoreError>;
    /// Waits (at most `timeout`) for the processes clones ran in to end, once every handle on
    /// them is gone (the daemon stops).
    fn wait_all(&self, timeout: Duration);
}

/// This host's KVM: templates booted and clones restored in the daemon itself (`workers` None)
/// or in worker processes.
pub struct Machines {
    pub workers: Option<Arc<Workers>>,
}

impl Backend for Machines {
    fn make_template(&self, job: TemplateJob<'_>) -> Result<Option<Arc<Template>>, RegistryError> {
        let workers = self.workers.as_deref();
        let TemplateJob { name, spec, version, drives, next, registry, images, net } = job;
        let t = registry.make_template(name, spec, version, drives, images, next, workers, net)?;
        Ok(Some(Arc::new(t)))
    }

    fn restore(&self, job: RestoreJob<'_>) -> Result<Restored, RestoreError> {
        let template = job.template.clone().ok_or("the function has no template yet")?;
        let (id, net) = (job.id, job.net);
        if let Some(workers) = &self.workers {
            let worker = job.worker.get_or_start(workers, &job, &template)?;
            let at = Instant::now();
            // A worker that ended under the restore is replaced by the next one: come back then.
            let (vm, mailbox, vsock) = worker.restore(id, net.map(|n| n.tap())).map_err(|e| {
                if worker.dead() {
                    RestoreError::Restarting(Duration::from_secs(1))
                } else {
                    RestoreError::Failed(e.to_string())
                }
            })?;
            let vm: Box<dyn CloneHandle> = Box::new(CloneVm::Remote(vm));
            return Ok(Restored { vm, mailbox, vsock, at, took: at.elapsed() });
        }
        let (mailbox, vsock) = job.channels;
        let taps = match net {
            Some(n) => vec![Arc::new(n.dup_tap().map_err(|e| format!("TAP: {e}"))?)],
            None => Vec::new(),
        };
        let channels = Channels {
            mailbox: Some(mailbox.clone()),
            vsock: Some(vsock.clone()),
            serve: true,
            quiet: true,
            taps,
            ..Default::default()
        };
        let at = Instant::now();
        let vm = template
            .restore(id, &channels, Box::new(std::io::sink()))
            .and_then(|vm| vm.start(RunOptions::default()))
            .map_err(|e| format!("restore: {e}"))?;
        let vm: Box<dyn CloneHandle> = Box::new(CloneVm::Local(Box::new(vm)));
        Ok(Restored { vm, mailbox, vsock, at, took: at.elapsed() })
    }

    fn wait_all(&self, timeout: Duration) {
        if let Some(w) = &self.workers {
            w.wait_all(timeout);
        }
    }
}

/// A worker that ended before it restored a clone, or less than this after its start, counts as
/// a quick death (see [`Backoff`]); one killed later (from outside, say) is replaced at once.
const WORKER_STABLE: Duration = Duration::from_secs(5);
/// The delay before a worker after its second quick death in a row, doubled with each one more.
const WORKER_BACKOFF: Duration = Duration::from_millis(200);
const WORKER_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The delay before another try after a worker could not start at all.
const WORKER_START_RETRY: Duration = Duration::from_secs(1);

/// When a function's next worker may start: a worker that keeps dying before it serves (or soon
/// after its start) is restarted less and less often; one that served a while and was then
/// killed is replaced at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    until: Option<Instant>,
    /// Workers in a row that ended soon after they started.
    quick_deaths: u32,
}

impl Backoff {
    /// A worker ended; `served_long`: it had served for [`WORKER_STABLE`] or more.
    pub fn worker_ended(&mut self, served_long: bool, now: Instant) {
        self.quick_deaths = if served_long { 0 } else { self.quick_deaths + 1 };
        let delay = if self.quick_deaths <= 1 {
            Duration::ZERO
        } else {
            (WORKER_BACKOFF * (1 << (self.quick_deaths - 1).min(10))).min(WORKER_BACKOFF_MAX)
        };
        self.until = Some(now + delay);
    }

    /// A worker could not start at all.
    pub fn start_failed(&mut self, now: Instant) {
        self.until = Some(now + WORKER_START_RETRY);
    }

    /// How long until the next worker may start (none: now).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.until.and_then(|at| at.checked_duration_since(now)).filter(|d| !d.is_zero())
    }
}

/// A function's worker process: the one running, how many ended without being asked to and how
/// the last did, and when the next may start.
#[derive(Default)]
pub struct WorkerSlot {
    current: Mutex<Option<Arc<Worker>>>,
    restarts: AtomicU64,
    last_exit: Mutex<Option<String>>,
    backoff: Mutex<Backoff>,
    /// Held while a worker is started (`current` itself only for a moment: GET reads it).
    spawning: Mutex<()>,
}

impl WorkerSlot {
    /// The function's worker: the one it has, or a new one when it has none or it ended (counted,
    /// with how it ended), unless its [`Backoff`] says to wait.
    fn get_or_start(
        &self,
        workers: &Arc<Workers>,
        job: &RestoreJob<'_>,
        template: &Template,
    ) -> Result<Arc<Worker>, RestoreError> {
        if job.deleted {
            return Err("the function has been deleted".into());
        }
        let _spawning = self.spawning.locked();
        if let Some(w) = self.current.locked().clone() {
            if !w.dead() {
                return Ok(w);
            }
            if !w.counted.swap(true, Ordering::SeqCst) {
                let how = w.exit().unwrap_or_else(|| "ended".into());
                tracing::warn!(function = %job.name, pid = w.pid, "the worker ended ({how}); starting another");
                self.restarts.fetch_add(1, Ordering::Relaxed);
                *self.last_exit.locked() = Some(how);
                let served = w.served.load(Ordering::SeqCst) && w.started.elapsed() >= WORKER_STABLE;
                self.backoff.locked().worker_ended(served, Instant::now());
            }
        }
        if let Some(wait) = self.backoff.locked().wait(Instant::now()) {
            return Err(RestoreError::Restarting(wait));
        }
        let spec = job.spec;
        let limits = spec.limits.resolve(job.max_clones, spec.vcpus, spec.mem_mib);
        let w = workers.spawn(job.name, template, &limits, job.max_clones).map_err(|e| {
            self.backoff.locked().start_failed(Instant::now());
            RestoreError::Failed(e.to_string())
        })?;
        tracing::info!(function = %job.name, pid = w.pid, uid = w.uid, jailed = w.jailed, "worker started");
        *self.current.locked() = Some(w.clone());
        Ok(w)
    }

    /// The CPU its live worker has used so far, microseconds (from its cgroup; none without a
    /// worker, a live one or a cgroup).
    pub fn cpu_used_us(&self) -> Option<u64> {
        let w = self.current.locked().clone()?;
        if w.dead() {
            return None;
        }
        w.cpu_used_us()
    }

    /// Lets the worker go: it exits once its last clone is gone.
    pub fn release(&self) {
        self.current.locked().take();
    }

    /// The worker as `GET /functions/{name}` shows it (none before the first).
    pub fn info(&self) -> Option<WorkerInfo> {
        let w = self.current.locked().clone()?;
        let (restarts, mut last_exit) = (self.restarts.load(Ordering::Relaxed), self.last_exit.locked().clone());
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
            restarting_in_s: self.backoff.locked().wait(Instant::now()).map(|d| d.as_secs_f64()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_that_die_young_wait_longer_each_time_and_one_that_served_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.wait(t0), None, "the first worker starts at once");
        b.worker_ended(false, t0);
        assert_eq!(b.wait(t0), None, "one quick death: replaced at once");
        let mut waits = Vec::new();
        for _ in 0..12 {
            b.worker_ended(false, t0);
            waits.push(b.wait(t0).unwrap());
        }
        assert_eq!(waits[0], WORKER_BACKOFF * 2);
        assert_eq!(waits[1], WORKER_BACKOFF * 4);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), WORKER_BACKOFF_MAX, "capped");
        assert_eq!(b.wait(t0 + WORKER_BACKOFF_MAX), None, "over once the time has passed");
        b.worker_ended(true, t0);
        assert_eq!(b.wait(t0), None, "a worker that served a while is replaced at once");
        b.worker_ended(false, t0);
        assert_eq!(b.wait(t0), None, "and the count of quick deaths starts again");
        b.start_failed(t0);
        assert_eq!(b.wait(t0), Some(WORKER_START_RETRY));
    }
}
