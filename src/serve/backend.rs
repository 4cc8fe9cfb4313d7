//! Where clones come from: restored in the daemon itself or in the function's worker process
//! (started, and restarted after it dies with a backoff, here).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::Error;
use super::function::Function;
use super::supervisor::Supervisor;
use crate::isolation::worker::{Worker, Workers};
use crate::sys::Locked;
use crate::template::Template;

/// A handed-out clone.
/// Why a clone could not be restored.
#[derive(Debug)]
pub(super) enum RestoreError {
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

/// A worker that ended before it restored a clone, or less than this after its start, counts as
/// a quick death (see the backoff); one killed later (from outside, say) is replaced at once.
pub(super) const WORKER_STABLE: Duration = Duration::from_secs(5);

/// The delay before a worker after its second quick death in a row, doubled with each one more.
pub(super) const WORKER_BACKOFF: Duration = Duration::from_millis(200);

pub(super) const WORKER_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Supervisor {
    /// `f`'s worker: the one it has, or a new one when it has none or it ended (counted, with
    /// how it ended).
    pub(super) fn worker_of(
        &self,
        workers: &Arc<Workers>,
        f: &Function,
        template: &Template,
    ) -> Result<Arc<Worker>, RestoreError> {
        if f.deleted.load(Ordering::SeqCst) {
            return Err("the function has been deleted".into());
        }
        let _spawning = f.worker_spawn.locked();
        if let Some(w) = f.worker.locked().clone() {
            if !w.dead() {
                return Ok(w);
            }
            if !w.counted.swap(true, Ordering::SeqCst) {
                let how = w.exit().unwrap_or_else(|| "ended".into());
                tracing::warn!(function = %f.name, pid = w.pid, "the worker ended ({how}); starting another");
                f.worker_restarts.fetch_add(1, Ordering::Relaxed);
                *f.last_worker_exit.locked() = Some(how);
                // A worker that keeps dying before it serves (or soon after its start) is
                // restarted less and less often; one that served a while and was then killed is
                // replaced at once.
                let mut b = f.worker_backoff.locked();
                let served = w.served.load(Ordering::SeqCst) && w.started.elapsed() >= WORKER_STABLE;
                b.1 = if served { 0 } else { b.1 + 1 };
                let delay = if b.1 <= 1 {
                    Duration::ZERO
                } else {
                    (WORKER_BACKOFF * (1 << (b.1 - 1).min(10))).min(WORKER_BACKOFF_MAX)
                };
                b.0 = Some(Instant::now() + delay);
            }
        }
        if let Some(at) = f.worker_backoff.locked().0.filter(|at| Instant::now() < *at) {
            return Err(RestoreError::Restarting(at.saturating_duration_since(Instant::now())));
        }
        let limits = f.spec.limits.resolve(f.max_clones, f.spec.vcpus, f.spec.mem_mib);
        let w = workers.spawn(&f.name, template, &limits, f.max_clones).map_err(|e| {
            f.worker_backoff.locked().0 = Some(Instant::now() + Duration::from_secs(1));
            RestoreError::Failed(e)
        })?;
        tracing::info!(function = %f.name, pid = w.pid, uid = w.uid, jailed = w.jailed, "worker started");
        *f.worker.locked() = Some(w.clone());
        Ok(w)
    }
}
