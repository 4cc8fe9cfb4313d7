//! The daemon's side of a running worker: its events (restores answered, clones ended, its own
//! end), the handle on it ([`Worker`]), and its clones as the pools hold them ([`RemoteVm`],
//! [`CloneVm`] for one in the daemon or in a worker).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use super::cgroup::Cgroup;
use super::protocol::{self, FromWorker, Received, ToWorker};
use super::{WorkerError, RESTORE_TIMEOUT};
use crate::channel::mailbox::Mailbox;
use crate::sys::Locked;
use crate::vmm::RunningVm;

/// A worker's answer to a restore: the descriptors that came with it (the clone's mailbox).
type RestoreAnswer = Result<Vec<std::os::fd::OwnedFd>, WorkerError>;

#[derive(Default)]
pub(super) struct Shared {
    /// Restores waiting for their answer, by clone id.
    pub(super) pending: Mutex<HashMap<u64, Sender<RestoreAnswer>>>,
    /// Every live clone's mailbox, by id (marked ended when the clone or the worker ends).
    pub(super) clones: Mutex<HashMap<u64, Arc<Mailbox>>>,
    pub(super) dead: AtomicBool,
    /// How the worker ended, once it has.
    pub(super) exit: Mutex<Option<String>>,
}

impl Shared {
    pub(super) fn fail_everything(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for (_, tx) in self.pending.locked().drain() {
            let _ = tx.send(Err(WorkerError::Gone("the worker ended".into())));
        }
        for (_, m) in self.clones.locked().drain() {
            m.vm_ended();
        }
    }
}

/// Reads what the worker reports until it closes its end (it ended).
pub(super) fn read_events(sock: &UnixDatagram, shared: &Shared) {
    loop {
        match protocol::recv::<FromWorker>(sock) {
            Ok(Received::Message(m, fds)) => match m {
                FromWorker::Restored { id } => {
                    if let Some(tx) = shared.pending.locked().remove(&id) {
                        let _ = tx.send(Ok(fds));
                    }
                }
                FromWorker::Failed { id, error } => {
                    if let Some(tx) = shared.pending.locked().remove(&id) {
                        let _ = tx.send(Err(WorkerError::Failed(error)));
                    }
                }
                FromWorker::Exited { id, why } => {
                    crate::log_limited!(info, "clone {id} ended: {why}");
                    if let Some(m) = shared.clones.locked().remove(&id) {
                        m.vm_ended();
                    }
                }
                other => crate::log_limited!(warn, "worker: unexpected {other:?}"),
            },
            Ok(Received::Nothing) => {}
            Ok(Received::Closed) => return,
            Err(e) => {
                crate::log_limited!(warn, "worker: {e}; stopping it");
                return;
            }
        }
    }
}

/// One worker process, as the supervisor holds it. Dropping the last handle (the function's and
/// its clones') closes the socket: the worker stops its clones and exits.
pub struct Worker {
    pub pid: i32,
    pub started: std::time::Instant,
    /// Set once the supervisor has counted this worker's end (as a restart).
    pub counted: AtomicBool,
    /// Set once it has restored a clone (a worker that dies before that may be a crash loop).
    pub served: AtomicBool,
    pub uid: u32,
    pub jailed: bool,
    pub(super) sock: UnixDatagram,
    pub(super) shared: Arc<Shared>,
    pub(super) run_dir: PathBuf,
    pub cgroup_path: Option<String>,
    pub memory_limit: Option<u64>,
    pub(super) cgroup: Option<Arc<Cgroup>>,
}

impl Worker {
    /// Whether the process has ended.
    pub fn dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Periods its CPU cap throttled it in, so far (with a cgroup).
    pub fn cpu_throttled(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(|c| c.cpu_throttled())
    }

    /// CPU time it used so far, in microseconds (with a cgroup).
    pub fn cpu_used_us(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(|c| c.cpu_used_us())
    }

    /// How it ended (once it has and was reaped).
    pub fn exit(&self) -> Option<String> {
        self.shared.exit.locked().clone()
    }

    /// Restores clone `id` in the worker (its network card on the TAP `tap`, when it has one) and
    /// maps its mailbox, which the worker hands over as a memfd whose size is sealed (never a
    /// path: the daemon opens nothing in a directory a worker can write, and maps nothing a
    /// worker could truncate under it). Returns its channels' paths too: for the mailbox, the
    /// daemon's own descriptor of it under /proc (see `mailbox_path`).
    pub fn restore(self: &Arc<Self>, id: u64, tap: Option<RawFd>) -> Result<(RemoteVm, PathBuf, PathBuf), WorkerError> {
        let (tx, rx) = channel();
        self.shared.pending.locked().insert(id, tx);
        if self.dead() {
            self.shared.pending.locked().remove(&id);
            return Err(WorkerError::Gone("the worker has ended".into()));
        }
        if let Err(e) = protocol::send(&self.sock, &ToWorker::Restore { id }, tap) {
            self.shared.pending.locked().remove(&id);
            return Err(WorkerError::Gone(format!("worker: {e}")));
        }
        let answer = rx.recv_timeout(RESTORE_TIMEOUT);
        self.shared.pending.locked().remove(&id);
        let mut fds = answer.map_err(|_| WorkerError::Gone("the worker did not answer in time".into()))??;
        let handed = fds
            .pop()
            .filter(|_| fds.is_empty())
            .ok_or_else(|| WorkerError::Untrusted("the worker sent no mailbox with the clone".into()));
        let sealed = |fd: std::os::fd::OwnedFd| {
            Mailbox::from_sealed(fd.into()).map_err(|e| WorkerError::Untrusted(format!("the clone's mailbox: {e}")))
        };
        let m = match handed.and_then(sealed) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = protocol::send(&self.sock, &ToWorker::Stop { id }, None);
                return Err(e);
            }
        };
        let (mailbox, vsock) = (mailbox_path(&m), self.run_dir.join(format!("{id}.vsock")));
        self.shared.clones.locked().insert(id, m.clone());
        self.served.store(true, Ordering::SeqCst);
        // A worker that ended meanwhile has marked every clone it knew: look once more.
        if self.dead() {
            m.vm_ended();
        }
        Ok((RemoteVm { id, mailbox: m, worker: self.clone() }, mailbox, vsock))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: shutdown on our own socket; the worker reads end-of-file and exits.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Where a scheduler maps a worker clone's mailbox: the daemon's own descriptor of the sealed
/// memfd, `/proc/<daemon>/fd/<n>` (readable only by the daemon's user; valid while the clone is
/// handed out, so it is opened while the lease is held, as `ember invoke --mailbox` does).
fn mailbox_path(m: &Mailbox) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), m.fd().as_raw_fd()))
}

/// A clone running in a worker.
pub struct RemoteVm {
    id: u64,
    mailbox: Arc<Mailbox>,
    worker: Arc<Worker>,
}

impl Drop for RemoteVm {
    fn drop(&mut self) {
        self.worker.shared.clones.locked().remove(&self.id);
        self.mailbox.vm_ended();
        if !self.worker.dead() {
            let _ = protocol::send(&self.worker.sock, &ToWorker::Stop { id: self.id }, None);
        }
    }
}

/// A clone, wherever it runs.
pub enum CloneVm {
    Local(Box<RunningVm>),
    Remote(RemoteVm),
}

impl CloneVm {
    /// Whether the clone has ended (its guest, or its worker).
    pub fn ended(&self) -> bool {
        match self {
            Self::Local(vm) => vm.exit().is_some(),
            Self::Remote(r) => r.worker.dead() || r.mailbox.ended(),
        }
    }

    pub fn mailbox(&self) -> Arc<Mailbox> {
        match self {
            Self::Local(vm) => vm.mailbox(),
            Self::Remote(r) => r.mailbox.clone(),
        }
    }

    /// Makes a clone that runs here leave its guest at once, without waiting (see
    /// [`RunningVm::request_stop`]); a clone in a worker is stopped there when it is dropped.
    pub fn request_stop(&self, why: &str) {
        if let Self::Local(vm) = self {
            vm.request_stop(why);
        }
    }

    /// Stops and destroys the clone (joins its threads when it runs here).
    pub fn stop(self, why: &str) {
        match self {
            Self::Local(vm) => drop((*vm).stop(why)),
            Self::Remote(r) => drop(r),
        }
    }
}
