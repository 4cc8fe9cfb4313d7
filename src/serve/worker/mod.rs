//! Worker processes: each function's clones run in a process of its own (`ember worker`), jailed
//! when the daemon has root (namespaces, its own root, its own uid, no capabilities, a cgroup,
//! seccomp on every thread), so that a VMM bug exploited from one guest, or one function's
//! resource use, reaches only that function. The supervisor keeps the pools: a handoff is still a
//! pop there. Restoring and destroying a clone are a message to its worker; invoking one is the
//! supervisor writing the clone's mailbox, which it maps itself. A worker that dies (killed, out
//! of memory, a VMM panic) costs its function's clones only: they read as ended, the pool sweep
//! drops them and refills through a new worker, and `GET /functions/{name}` says what happened.

pub mod cgroup;
pub mod jail;
pub mod launcher;
pub mod process;
pub mod protocol;

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;

use self::cgroup::{Cgroup, CgroupBase, CgroupLimits};
use self::jail::{Bind, JailSpec};
use self::launcher::{Launcher, JAIL_NAMESPACES};
use self::protocol::{FromWorker, Received, Setup, ToWorker};
use crate::channel::mailbox::Mailbox;
use crate::sys::Locked;
use crate::template::Template;
use crate::vmm::RunningVm;

/// How long a worker may take to set itself up, and to restore one clone.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Files a worker may hold open: a clone needs about a dozen (VM, vCPUs, eventfds, mailbox, vsock).
const FILES_PER_CLONE: u64 = 24;

/// Where clones run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// In the daemon's own process (tests, or explicitly asked for).
    None,
    /// A worker process per function, not jailed (a daemon without root).
    Process,
    /// A jailed worker process per function (a daemon with root).
    Jail,
}

impl Isolation {
    /// What the daemon can do as the user it runs as.
    pub fn default_for_this_user() -> Self {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            Self::Jail
        } else {
            Self::Process
        }
    }
}

/// The daemon's side of all workers: the launcher, uids, cgroups, channel directories.
pub struct Workers {
    launcher: Launcher,
    jailed: bool,
    /// Each worker's channel directory and jail root go under here.
    dir: PathBuf,
    cgroups: Option<CgroupBase>,
    uid_base: u32,
    /// Uid slots in use (a uid per live worker).
    slots: Mutex<BTreeSet<u32>>,
    serial: AtomicU64,
    /// The threads that follow each worker until it has ended and been cleaned up after.
    followers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The first uid (and gid) given to workers; each live worker has its own above it.
pub const DEFAULT_UID_BASE: u32 = 0x6d_0000;
const UID_SLOTS: u32 = 0x1_0000;

impl Workers {
    /// Sets up for workers under `state_dir` (what a killed daemon left there goes), with the
    /// launcher confined by `filter`. To be called before the daemon confines itself.
    pub fn open(
        state_dir: &Path,
        isolation: Isolation,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Arc<Self>, String> {
        let dir = state_dir.join("workers");
        let _ = std::fs::remove_dir_all(&dir);
        crate::sys::private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let jailed = isolation == Isolation::Jail;
        let cgroups = if jailed {
            let id = state_id(state_dir);
            match CgroupBase::open(&id) {
                Ok(b) => {
                    b.remove_stale();
                    Some(b)
                }
                Err(e) => {
                    tracing::warn!("workers get no cgroup (no limits on their memory, tasks and CPU): {e}");
                    None
                }
            }
        } else {
            None
        };
        let launcher = Launcher::spawn(filter).map_err(|e| format!("cannot start the launcher: {e}"))?;
        Ok(Arc::new(Self {
            launcher,
            jailed,
            dir,
            cgroups,
            uid_base: DEFAULT_UID_BASE,
            slots: Mutex::new(BTreeSet::new()),
            serial: AtomicU64::new(1),
            followers: Mutex::new(Vec::new()),
        }))
    }

    /// Waits up to `timeout` for every worker to end and be cleaned up after (at shutdown, once
    /// the handles on them are gone).
    pub fn wait_all(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let followers: Vec<_> = self.followers.locked().drain(..).collect();
        for h in followers {
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    fn take_slot(&self) -> Result<u32, String> {
        let mut slots = self.slots.locked();
        let slot = (0..UID_SLOTS).find(|s| !slots.contains(s)).ok_or("every worker uid is in use")?;
        slots.insert(slot);
        Ok(slot)
    }

    /// Starts a worker for `function`'s `template`, capped at `limits`, holding up to
    /// `max_clones` clones.
    pub fn spawn(
        self: &Arc<Self>,
        function: &str,
        template: &Template,
        limits: &CgroupLimits,
        max_clones: u32,
    ) -> Result<Arc<Worker>, String> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let slot = self.take_slot()?;
        let uid = self.uid_base + slot;
        let name = format!("{serial}-{function}");
        let run_dir = self.dir.join(&name);
        let root = self.dir.join(format!("{name}.root"));
        let cleanup = |cg: Option<&Cgroup>| {
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = std::fs::remove_dir(&root);
            if let Some(c) = cg {
                c.remove();
            }
            self.slots.locked().remove(&slot);
        };
        let made = (|| -> std::io::Result<()> {
            crate::sys::private_dir(&run_dir)?;
            if self.jailed {
                crate::sys::private_dir(&root)?;
                std::os::unix::fs::chown(&run_dir, Some(uid), Some(uid))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            cleanup(None);
            return Err(format!("{}: {e}", run_dir.display()));
        }
        let cgroup = match (&self.cgroups, self.jailed) {
            (Some(base), true) => match base.create(&name, limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    cleanup(None);
                    return Err(format!("cgroup: {e}"));
                }
            },
            _ => None,
        };
        let cgroup = cgroup.map(Arc::new);
        let result = self.start(function, template, &name, uid, &run_dir, &root, cgroup.as_deref(), max_clones);
        match result {
            Ok((pid, sock)) => {
                let shared = Arc::new(Shared::default());
                let w = Arc::new(Worker {
                    pid,
                    started: std::time::Instant::now(),
                    counted: AtomicBool::new(false),
                    uid,
                    jailed: self.jailed,
                    sock,
                    shared: shared.clone(),
                    run_dir: run_dir.clone(),
                    cgroup_path: cgroup.as_deref().map(Cgroup::path),
                    memory_limit: cgroup.as_deref().and_then(Cgroup::memory_limit),
                    cgroup: cgroup.clone(),
                });
                let reader = w.sock.try_clone().map_err(|e| format!("socket: {e}"));
                let reader = match reader {
                    Ok(r) => r,
                    Err(e) => {
                        drop(w);
                        return Err(e);
                    }
                };
                let workers = self.clone();
                let spawned = std::thread::Builder::new().name(format!("worker-{pid}")).spawn(move || {
                    read_events(&reader, &shared);
                    shared.fail_everything();
                    let how = workers.launcher.wait_exit(pid, Duration::from_secs(5)).unwrap_or_else(|| "ended".into());
                    let how = match &cgroup {
                        Some(c) if c.oom_kills() > 0 => {
                            format!("{how} (its memory limit was reached: {} OOM kill(s))", c.oom_kills())
                        }
                        _ => how,
                    };
                    *shared.exit.locked() = Some(how);
                    let _ = std::fs::remove_dir_all(&run_dir);
                    let _ = std::fs::remove_dir(&root);
                    if let Some(c) = &cgroup {
                        c.remove();
                    }
                    workers.slots.locked().remove(&slot);
                });
                match spawned {
                    Ok(h) => {
                        let mut followers = self.followers.locked();
                        followers.retain(|h| !h.is_finished());
                        followers.push(h);
                    }
                    Err(e) => return Err(format!("cannot start the worker's reader thread: {e}")),
                }
                Ok(w)
            }
            Err(e) => {
                cleanup(cgroup.as_deref());
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        function: &str,
        template: &Template,
        name: &str,
        uid: u32,
        run_dir: &Path,
        root: &Path,
        cgroup: Option<&Cgroup>,
        max_clones: u32,
    ) -> Result<(i32, UnixDatagram), String> {
        let state = template.state.encode().map_err(|e| e.to_string())?;
        let mut binds = vec![Bind { path: run_dir.display().to_string(), writable: true }];
        for d in &template.state.devices.drives {
            if self.jailed {
                // The worker reads its drives as its own uid: the daemon's images are made
                // readable (they sit in its private state directory, and a worker sees only its
                // function's).
                if d.path_on_host.starts_with(self.dir.parent().unwrap_or(Path::new("/"))) {
                    let _ = std::fs::set_permissions(
                        &d.path_on_host,
                        std::os::unix::fs::PermissionsExt::from_mode(if d.is_read_only { 0o444 } else { 0o666 }),
                    );
                }
            }
            binds.push(Bind { path: d.path_on_host.display().to_string(), writable: !d.is_read_only });
        }
        let jail = self.jailed.then(|| JailSpec {
            root: root.display().to_string(),
            uid,
            gid: uid,
            binds,
            cgroups: cgroup.map(Cgroup::procs).unwrap_or_default(),
        });
        let setup = Setup {
            function: function.to_string(),
            state: base64::engine::general_purpose::STANDARD.encode(state),
            run_dir: run_dir.display().to_string(),
            jail,
            max_files: 256 + u64::from(max_clones) * FILES_PER_CLONE,
        };
        let (mine, theirs) = protocol::pair().map_err(|e| format!("socketpair: {e}"))?;
        let namespaces = if self.jailed { JAIL_NAMESPACES } else { 0 };
        let pid = self.launcher.start(&theirs, namespaces).map_err(|e| format!("cannot start a worker: {e}"))?;
        drop(theirs);
        let kill = |e: String| {
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = self.launcher.wait_exit(pid, Duration::from_secs(1));
            e
        };
        protocol::send(&mine, &ToWorker::Setup(Box::new(setup)), Some(template.memory.file().as_raw_fd()))
            .map_err(|e| kill(format!("worker {name}: setup: {e}")))?;
        protocol::set_recv_timeout(&mine, SETUP_TIMEOUT).map_err(|e| kill(e.to_string()))?;
        match protocol::recv::<FromWorker>(&mine) {
            Ok(Received::Message(FromWorker::Ready, _)) => {}
            Ok(Received::Message(FromWorker::SetupFailed { error }, _)) => {
                return Err(kill(format!("the worker could not set itself up: {error}")))
            }
            Ok(Received::Message(m, _)) => return Err(kill(format!("the worker said {m:?} before it was ready"))),
            Ok(Received::Closed) => {
                let how = self.launcher.wait_exit(pid, Duration::from_secs(1)).unwrap_or_else(|| "ended".into());
                return Err(format!("the worker {how} before it was ready"));
            }
            Ok(Received::Nothing) => return Err(kill("the worker did not set itself up in time".into())),
            Err(e) => return Err(kill(format!("worker: {e}"))),
        }
        mine.set_read_timeout(None).map_err(|e| kill(e.to_string()))?;
        Ok((pid, mine))
    }
}

/// A short stable name for a state directory (its cgroups are named after it).
fn state_id(state_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let p = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    Sha256::digest(p.as_os_str().as_encoded_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Shared {
    /// Restores waiting for their answer, by clone id.
    pending: Mutex<HashMap<u64, Sender<Result<(), String>>>>,
    /// Every live clone's mailbox, by id (marked ended when the clone or the worker ends).
    clones: Mutex<HashMap<u64, Arc<Mailbox>>>,
    dead: AtomicBool,
    /// How the worker ended, once it has.
    exit: Mutex<Option<String>>,
}

impl Shared {
    fn fail_everything(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for (_, tx) in self.pending.locked().drain() {
            let _ = tx.send(Err("the worker ended".into()));
        }
        for (_, m) in self.clones.locked().drain() {
            m.vm_ended();
        }
    }
}

/// Reads what the worker reports until it closes its end (it ended).
fn read_events(sock: &UnixDatagram, shared: &Shared) {
    loop {
        match protocol::recv::<FromWorker>(sock) {
            Ok(Received::Message(m, _)) => match m {
                FromWorker::Restored { id } => {
                    if let Some(tx) = shared.pending.locked().remove(&id) {
                        let _ = tx.send(Ok(()));
                    }
                }
                FromWorker::Failed { id, error } => {
                    if let Some(tx) = shared.pending.locked().remove(&id) {
                        let _ = tx.send(Err(error));
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
    pub uid: u32,
    pub jailed: bool,
    sock: UnixDatagram,
    shared: Arc<Shared>,
    run_dir: PathBuf,
    pub cgroup_path: Option<String>,
    pub memory_limit: Option<u64>,
    cgroup: Option<Arc<Cgroup>>,
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

    /// How it ended (once it has and was reaped).
    pub fn exit(&self) -> Option<String> {
        self.shared.exit.locked().clone()
    }

    /// Restores clone `id` in the worker and maps its mailbox; returns its channels' paths too.
    pub fn restore(self: &Arc<Self>, id: u64) -> Result<(RemoteVm, PathBuf, PathBuf), String> {
        let (tx, rx) = channel();
        self.shared.pending.locked().insert(id, tx);
        if self.dead() {
            self.shared.pending.locked().remove(&id);
            return Err("the worker has ended".into());
        }
        if let Err(e) = protocol::send(&self.sock, &ToWorker::Restore { id }, None) {
            self.shared.pending.locked().remove(&id);
            return Err(format!("worker: {e}"));
        }
        let answer = rx.recv_timeout(RESTORE_TIMEOUT).map_err(|_| "the worker did not answer in time".to_string());
        self.shared.pending.locked().remove(&id);
        answer??;
        let (mailbox, vsock) = (self.run_dir.join(format!("{id}.mailbox")), self.run_dir.join(format!("{id}.vsock")));
        let m = match Mailbox::open(&mailbox) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = protocol::send(&self.sock, &ToWorker::Stop { id }, None);
                return Err(format!("the clone's mailbox: {e}"));
            }
        };
        self.shared.clones.locked().insert(id, m.clone());
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
    Local(RunningVm),
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

    /// Stops and destroys the clone (joins its threads when it runs here).
    pub fn stop(self, why: &str) {
        match self {
            Self::Local(vm) => drop(vm.stop(why)),
            Self::Remote(r) => drop(r),
        }
    }
}
