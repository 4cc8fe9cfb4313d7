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
use std::os::fd::{AsRawFd, RawFd};
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
use self::protocol::{FromWorker, Received, Setup, Task, ToWorker};
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
    /// Each worker's pid and the thread that follows it (reaps it, removes its cgroup).
    followers: Mutex<Vec<(i32, std::thread::JoinHandle<()>)>>,
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
        let wait = |followers: &[(i32, std::thread::JoinHandle<()>)], deadline: std::time::Instant| {
            while followers.iter().any(|(_, h)| !h.is_finished()) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let followers: Vec<_> = self.followers.locked().drain(..).collect();
        wait(&followers, std::time::Instant::now() + timeout);
        // A worker still stopping its clones (slowly, under its CPU cap, say) is killed, so that
        // its follower can reap it and remove its cgroup before the daemon goes. (Not reaped yet:
        // its pid cannot have been reused.)
        for (pid, h) in &followers {
            if !h.is_finished() {
                // SAFETY: signals our own unreaped child.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        wait(&followers, std::time::Instant::now() + Duration::from_secs(5));
        for (_, h) in followers {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        if let Some(c) = &self.cgroups {
            c.remove();
        }
    }

    fn take_slot(&self) -> Result<u32, String> {
        let mut slots = self.slots.locked();
        let slot = (0..UID_SLOTS).find(|s| !slots.contains(s)).ok_or("every worker uid is in use")?;
        slots.insert(slot);
        Ok(slot)
    }

    /// Takes a uid and makes a worker's channel directory, jail root and cgroup.
    fn prepare(&self, function: &str, limits: &CgroupLimits) -> Result<Place, String> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let slot = self.take_slot()?;
        let name = format!("{serial}-{function}");
        let mut place = Place {
            slot,
            // SAFETY: geteuid has no arguments. (An unjailed worker keeps the daemon's uid.)
            uid: if self.jailed { self.uid_base + slot } else { unsafe { libc::geteuid() } },
            run_dir: self.dir.join(&name),
            root: self.dir.join(format!("{name}.root")),
            cgroup: None,
        };
        let made = (|| -> std::io::Result<()> {
            crate::sys::private_dir(&place.run_dir)?;
            if self.jailed {
                crate::sys::private_dir(&place.root)?;
                std::os::unix::fs::chown(&place.run_dir, Some(place.uid), Some(place.uid))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.release(&place);
            return Err(format!("{}: {e}", place.run_dir.display()));
        }
        if let (Some(base), true) = (&self.cgroups, self.jailed) {
            match base.create(&name, limits) {
                Ok(c) => place.cgroup = Some(Arc::new(c)),
                Err(e) => {
                    self.release(&place);
                    return Err(format!("cgroup: {e}"));
                }
            }
        }
        Ok(place)
    }

    /// Removes what [`Workers::prepare`] made (once the worker has ended) and frees its uid.
    fn release(&self, place: &Place) {
        let _ = std::fs::remove_dir_all(&place.run_dir);
        let _ = std::fs::remove_dir(&place.root);
        if let Some(c) = &place.cgroup {
            c.remove();
        }
        self.slots.locked().remove(&place.slot);
    }

    /// How a worker that ended did (with its cgroup's word on its memory).
    fn ended(&self, pid: i32, place: &Place) -> String {
        let how = self.launcher.wait_exit(pid, Duration::from_secs(5)).unwrap_or_else(|| "ended".into());
        match &place.cgroup {
            Some(c) if c.oom_kills() > 0 => {
                format!("{how} (its memory limit was reached: {} OOM kill(s))", c.oom_kills())
            }
            _ => how,
        }
    }

    /// The worker's setup: jailed in `place` with `binds` (besides its channel directory).
    fn setup(&self, function: &str, place: &Place, task: Task, binds: Vec<Bind>, proc: bool, max_files: u64) -> Setup {
        let mut all = vec![Bind { path: place.run_dir.display().to_string(), writable: true }];
        all.extend(binds);
        Setup {
            function: function.to_string(),
            task,
            run_dir: place.run_dir.display().to_string(),
            jail: self.jailed.then(|| JailSpec {
                root: place.root.display().to_string(),
                uid: place.uid,
                gid: place.uid,
                binds: all,
                cgroups: place.cgroup.as_deref().map(Cgroup::procs).unwrap_or_default(),
                proc,
            }),
            max_files,
        }
    }

    /// The drives a worker reads, bound into its jail: the daemon's own images are made readable
    /// to the worker's uid (they sit in the daemon's private state directory, and a worker sees
    /// only its function's).
    fn drive_binds(&self, drives: &[crate::config::DriveConfig]) -> Vec<Bind> {
        let state = self.dir.parent().unwrap_or(Path::new("/"));
        drives
            .iter()
            .map(|d| {
                if self.jailed && d.path_on_host.starts_with(state) {
                    let mode = if d.is_read_only { 0o444 } else { 0o666 };
                    let _ =
                        std::fs::set_permissions(&d.path_on_host, std::os::unix::fs::PermissionsExt::from_mode(mode));
                }
                Bind { path: d.path_on_host.display().to_string(), writable: !d.is_read_only }
            })
            .collect()
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
        let place = self.prepare(function, limits)?;
        let state = match template.state.encode() {
            Ok(s) => base64::engine::general_purpose::STANDARD.encode(s),
            Err(e) => {
                self.release(&place);
                return Err(e.to_string());
            }
        };
        let binds = self.drive_binds(&template.state.devices.drives);
        let max_files = 256 + u64::from(max_clones) * FILES_PER_CLONE;
        let setup = self.setup(function, &place, Task::Serve { state }, binds, false, max_files);
        let (pid, sock) = match self.launch(setup, &[template.memory.file().as_raw_fd()]) {
            Ok(r) => r,
            Err(e) => {
                self.release(&place);
                return Err(e);
            }
        };
        let reader = match sock.try_clone() {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = self.ended(pid, &place);
                self.release(&place);
                return Err(format!("socket: {e}"));
            }
        };
        let shared = Arc::new(Shared::default());
        let w = Arc::new(Worker {
            pid,
            started: std::time::Instant::now(),
            counted: AtomicBool::new(false),
            uid: place.uid,
            jailed: self.jailed,
            sock,
            shared: shared.clone(),
            run_dir: place.run_dir.clone(),
            cgroup_path: place.cgroup.as_deref().map(Cgroup::path),
            memory_limit: place.cgroup.as_deref().and_then(Cgroup::memory_limit),
            cgroup: place.cgroup.clone(),
        });
        let workers = self.clone();
        let follow = move || {
            read_events(&reader, &shared);
            // How it ended first (it is reaped within milliseconds of closing its socket), so that
            // whoever sees it dead also sees why.
            *shared.exit.locked() = Some(workers.ended(pid, &place));
            shared.fail_everything();
            workers.release(&place);
        };
        match std::thread::Builder::new().name(format!("worker-{pid}")).spawn(follow) {
            Ok(h) => {
                let mut followers = self.followers.locked();
                followers.retain(|(_, h)| !h.is_finished());
                followers.push((pid, h));
            }
            // The worker goes with its last handle; its directories stay until the next start.
            Err(e) => return Err(format!("cannot start the worker's reader thread: {e}")),
        }
        Ok(w)
    }

    /// Makes `function`'s template in `dir` in a worker of its own (jailed like the ones that
    /// serve, with `dir` writable), booting `spec` with `drives` from the open `kernel` and
    /// `initramfs`; waits for it (at most `timeout` for the guest to be ready). The guest's first
    /// run, the function's own code included, never runs in the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn make_template(
        &self,
        function: &str,
        spec: &crate::serve::model::FunctionSpec,
        drives: &[crate::config::DriveConfig],
        dir: &Path,
        images: [RawFd; 2],
        tap: Option<RawFd>,
        timeout: Duration,
    ) -> Result<(), String> {
        // The guest's RAM, the memory file written from it, the working-set clone.
        let limits = CgroupLimits {
            memory_bytes: (spec.mem_mib * 2 + 256) << 20,
            pids: u64::from(spec.vcpus) * 2 + 64,
            cpus: spec.limits.cpus,
        };
        let place = self.prepare(function, &limits)?;
        let mut fds = images.to_vec();
        fds.extend(tap);
        let result = self.make_in(function, spec, drives, dir, &fds, timeout, &place);
        if self.jailed {
            // The template's files are the daemon's again.
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let _ = std::os::unix::fs::chown(e.path(), Some(0), Some(0));
            }
            let _ = std::os::unix::fs::chown(dir, Some(0), Some(0));
        }
        self.release(&place);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn make_in(
        &self,
        function: &str,
        spec: &crate::serve::model::FunctionSpec,
        drives: &[crate::config::DriveConfig],
        dir: &Path,
        fds: &[RawFd],
        timeout: Duration,
        place: &Place,
    ) -> Result<(), String> {
        crate::sys::private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if self.jailed {
            std::os::unix::fs::chown(dir, Some(place.uid), Some(place.uid))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut binds = self.drive_binds(drives);
        binds.push(Bind { path: dir.display().to_string(), writable: true });
        let task = Task::Make {
            spec: Box::new(spec.clone()),
            drives: drives.to_vec(),
            dir: dir.display().to_string(),
            timeout_s: timeout.as_secs_f64(),
        };
        let setup = self.setup(function, place, task, binds, true, 1024);
        let (pid, sock) = self.launch(setup, fds)?;
        let _ = protocol::set_recv_timeout(&sock, timeout + Duration::from_secs(120));
        let answer = match protocol::recv::<FromWorker>(&sock) {
            Ok(Received::Message(FromWorker::Made { ready_s }, _)) => {
                tracing::info!(function, "template made in a worker (ready after {ready_s:.1} s)");
                Ok(())
            }
            Ok(Received::Message(FromWorker::MakeFailed { error }, _)) => Err(error),
            Ok(Received::Message(m, _)) => Err(format!("the worker said {m:?}")),
            Ok(Received::Closed) => Err(format!("the worker {} while it made the template", self.ended(pid, place))),
            Ok(Received::Nothing) => Err("the worker did not make the template in time".into()),
            Err(e) => Err(format!("worker: {e}")),
        };
        drop(sock);
        if answer.is_err() {
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.ended(pid, place);
        answer
    }

    /// Starts a worker with `setup` (and `fds` sent with it), waits until it is set up.
    fn launch(&self, setup: Setup, fds: &[RawFd]) -> Result<(i32, UnixDatagram), String> {
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
        protocol::send_fds(&mine, &ToWorker::Setup(Box::new(setup)), fds)
            .map_err(|e| kill(format!("worker setup: {e}")))?;
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

/// Where one worker lives: its uid, channel directory, jail root and cgroup.
struct Place {
    slot: u32,
    uid: u32,
    run_dir: PathBuf,
    root: PathBuf,
    cgroup: Option<Arc<Cgroup>>,
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

    /// Restores clone `id` in the worker (its network card on the TAP `tap`, when it has one) and
    /// maps its mailbox; returns its channels' paths too.
    pub fn restore(self: &Arc<Self>, id: u64, tap: Option<RawFd>) -> Result<(RemoteVm, PathBuf, PathBuf), String> {
        let (tx, rx) = channel();
        self.shared.pending.locked().insert(id, tx);
        if self.dead() {
            self.shared.pending.locked().remove(&id);
            return Err("the worker has ended".into());
        }
        if let Err(e) = protocol::send(&self.sock, &ToWorker::Restore { id }, tap) {
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
