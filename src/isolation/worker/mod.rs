//! Worker processes: each function's clones run in a process of its own (`ember worker`), jailed
//! when the daemon has root (namespaces, its own root, its own uid, no capabilities, a cgroup,
//! seccomp on every thread), so that a VMM bug exploited from one guest, or one function's
//! resource use, reaches only that function. The supervisor keeps the pools: a handoff is still a
//! pop there. Restoring and destroying a clone are a message to its worker; invoking one is the
//! supervisor writing the clone's mailbox, which it maps itself. A worker that dies (killed, out
//! of memory, a VMM panic) costs its function's clones only: they read as ended, the pool sweep
//! drops them and refills through a new worker, and `GET /functions/{name}` says what happened.

pub mod cgroup;
mod clone;
pub mod jail;
pub mod launcher;
mod made;
pub mod process;
pub mod protocol;

use clone::{read_events, Shared};
pub use clone::{CloneVm, RemoteVm, Worker};
pub use made::MadeInWorker;

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;

use self::cgroup::{Cgroup, CgroupBase, CgroupLimits};
use self::jail::{Bind, JailSpec};
use self::launcher::{Launcher, JAIL_NAMESPACES};
use self::protocol::{FromWorker, Received, Setup, Task, ToWorker};
use crate::sys::Locked;
use crate::template::Template;

/// Why a worker could not do what the daemon asked.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The host could not give a worker what it needs (a uid slot, a directory, a cgroup, a
    /// process, a socket, a thread).
    #[error("{0}")]
    Host(String),
    /// The worker ended, or did not answer in time.
    #[error("{0}")]
    Gone(String),
    /// The worker's answer is out of protocol, or what it handed back is not acceptable (a
    /// compromised worker looks like this).
    #[error("{0}")]
    Untrusted(String),
    /// The worker did the work and it failed there (the guest's boot, a restore): its reason.
    #[error("{0}")]
    Failed(String),
}

/// How long a worker may take to set itself up, and to restore one clone.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
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

/// The environment variable that tells a worker (and any ember process) to log as JSON
/// (`json`): `ember serve --log-format json` sets it for its workers.
pub const LOG_FORMAT_ENV: &str = "EMBER_LOG_FORMAT";

/// The first uid (and gid) given to workers; each live worker has its own above it.
pub const DEFAULT_UID_BASE: u32 = 0x6d_0000;
/// A jailed worker's channel directory: a tmpfs of this size and this many files at most (its
/// clones' vsock sockets take no room).
const RUN_DIR_BYTES: u64 = 1 << 20;
const RUN_DIR_FILES: u64 = 4096;

/// Mount points at or beneath `dir`, deepest first (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // (mountinfo escapes spaces and the like as octal; such paths are not ember's.)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(&dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// How many uids (and gids) workers take from the base up.
pub const UID_SLOTS: u32 = 0x1_0000;

/// Checks that the workers' ids, `base` and the [`UID_SLOTS`] above it, are nobody else's:
/// within range and not inside a subordinate id range (`name:start:count` lines of
/// /etc/subuid and /etc/subgid, given as (file, content)), where a user's containers run.
fn check_uid_range(base: u32, subordinate: &[(&str, String)]) -> Result<(), String> {
    let end = base.checked_add(UID_SLOTS).filter(|_| base >= 1 << 16).ok_or_else(|| {
        format!("the worker uid base {base} leaves no room: it takes {UID_SLOTS} ids from 65536 up to 2^32")
    })?;
    for (file, text) in subordinate {
        for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
            let mut f = line.split(':');
            let (Some(name), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else { continue };
            let (Ok(start), Ok(count)) = (start.trim().parse::<u64>(), count.trim().parse::<u64>()) else { continue };
            if start < u64::from(end) && u64::from(base) < start + count {
                return Err(format!(
                    "the worker uids {base}..{end} overlap {name}'s subordinate ids {start}..{} in {file}: give \
                     ember serve --worker-uid-base another range",
                    start + count
                ));
            }
        }
    }
    Ok(())
}

/// Checks that no account or group (/etc/passwd, /etc/group) has an id among the workers'.
fn check_uid_range_unused(base: u32, passwd: &str, group: &str) -> Result<(), String> {
    let end = u64::from(base) + u64::from(UID_SLOTS);
    for (file, text) in [("/etc/passwd", passwd), ("/etc/group", group)] {
        for line in text.lines() {
            let mut f = line.split(':');
            let (Some(name), Some(id)) = (f.next(), f.nth(1)) else { continue };
            if id.parse::<u64>().is_ok_and(|id| (u64::from(base)..end).contains(&id)) {
                return Err(format!(
                    "{name} in {file} has id {id}, among the worker uids {base}..{end}: give ember serve \
                     --worker-uid-base another range"
                ));
            }
        }
    }
    Ok(())
}

impl Workers {
    /// Sets up for workers under `state_dir` (what a killed daemon left there goes), with the
    /// launcher confined by `filter`. To be called before the daemon confines itself.
    pub fn open(
        state_dir: &Path,
        isolation: Isolation,
        uid_base: u32,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Arc<Self>, String> {
        if isolation == Isolation::Jail {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            check_uid_range(uid_base, &[("/etc/subuid", read("/etc/subuid")), ("/etc/subgid", read("/etc/subgid"))])
                .and_then(|()| check_uid_range_unused(uid_base, &read("/etc/passwd"), &read("/etc/group")))?;
        }
        let dir = state_dir.join("workers");
        // What a killed daemon left: its workers' directories' mounts first (before the daemon
        // confines itself: it may still unmount here).
        for m in mounts_under(&dir) {
            if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
                let _ = launcher::unmount(&c);
            }
        }
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
            uid_base,
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
        // Directories of workers not followed (a template boot cut short by the stop) are
        // unmounted all the same.
        for m in mounts_under(&self.dir) {
            let _ = self.launcher.unmount(&m);
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
                // Its one writable directory: a small tmpfs of its own (its clones' sockets), so
                // that it cannot fill the state directory's file system.
                self.launcher.mount_tmpfs(&place.run_dir, RUN_DIR_BYTES, RUN_DIR_FILES, place.uid)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.release(&place, true);
            return Err(format!("{}: {e}", place.run_dir.display()));
        }
        if let (Some(base), true) = (&self.cgroups, self.jailed) {
            match base.create(&name, limits) {
                Ok(c) => place.cgroup = Some(Arc::new(c)),
                Err(e) => {
                    self.release(&place, true);
                    return Err(format!("cgroup: {e}"));
                }
            }
        }
        Ok(place)
    }

    /// Removes what [`Workers::prepare`] made and frees its uid, once its worker has ended:
    /// `reaped` says whether it is known to be gone (or never started). A uid whose process may
    /// still live is never given to another worker (that one could then signal or trace it).
    fn release(&self, place: &Place, reaped: bool) {
        if self.jailed {
            let _ = self.launcher.unmount(&place.run_dir);
        }
        // (remove_dir_all removes symlinks, never what they point at.)
        let _ = std::fs::remove_dir_all(&place.run_dir);
        let _ = std::fs::remove_dir(&place.root);
        if let Some(c) = &place.cgroup {
            c.remove();
        }
        if reaped {
            self.slots.locked().remove(&place.slot);
        } else {
            tracing::warn!(uid = place.uid, "a worker was not seen to end: its uid is not reused");
        }
    }

    /// How a worker that ended did (with its cgroup's word on its memory); None if it was not
    /// reaped within 5 s.
    fn ended(&self, pid: i32, place: &Place) -> Option<String> {
        let how = self.launcher.wait_exit(pid, Duration::from_secs(5))?;
        Some(match &place.cgroup {
            Some(c) if c.oom_kills() > 0 => {
                format!("{how} (its memory limit was reached: {} OOM kill(s))", c.oom_kills())
            }
            _ => how,
        })
    }

    /// The worker's setup: jailed in `place` with `binds` and its channel directory: bound from
    /// outside (where clones' sockets are reached), or with `private_run_dir` (bytes) a tmpfs of
    /// that size that nobody outside sees.
    #[allow(clippy::too_many_arguments)]
    fn setup(
        &self,
        function: &str,
        place: &Place,
        task: Task,
        binds: Vec<Bind>,
        proc: bool,
        max_files: u64,
        private_run_dir: Option<u64>,
    ) -> Setup {
        let run_dir = place.run_dir.display().to_string();
        let mut all = Vec::new();
        if private_run_dir.is_none() {
            all.push(Bind { path: run_dir.clone(), writable: true });
        }
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
                scratch: private_run_dir.map(|size| (run_dir.clone(), size)).into_iter().collect(),
            }),
            max_files,
        }
    }

    /// The drives a worker reads, bound into its jail: the daemon's own images are made readable
    /// (or writable, for a writable drive) to the worker's uid (they sit in the daemon's private
    /// state directory, and a worker sees only its function's). `drives` is the daemon's own
    /// record; still, a path with `..` or one that is not a regular file (a symlink) is refused,
    /// and the mode is changed on the file opened, never by path.
    fn drive_binds(&self, drives: &[crate::config::DriveConfig]) -> Result<Vec<Bind>, String> {
        let state = self.dir.parent().unwrap_or(Path::new("/"));
        drives
            .iter()
            .map(|d| {
                let p = &d.path_on_host;
                if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    return Err(format!("drive {}: {} is not a plain absolute path", d.drive_id, p.display()));
                }
                if self.jailed && p.starts_with(state) {
                    let mode = if d.is_read_only { 0o444 } else { 0o666 };
                    set_mode_nofollow(p, mode).map_err(|e| format!("drive {}: {}: {e}", d.drive_id, p.display()))?;
                }
                Ok(Bind { path: p.display().to_string(), writable: !d.is_read_only })
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
    ) -> Result<Arc<Worker>, WorkerError> {
        let place = self.prepare(function, limits).map_err(WorkerError::Host)?;
        let state = match template.state.encode() {
            Ok(s) => base64::engine::general_purpose::STANDARD.encode(s),
            Err(e) => {
                self.release(&place, true);
                return Err(WorkerError::Host(e.to_string()));
            }
        };
        let binds = match self.drive_binds(&template.state.devices.drives) {
            Ok(b) => b,
            Err(e) => {
                self.release(&place, true);
                return Err(WorkerError::Host(e));
            }
        };
        let max_files = 256 + u64::from(max_clones) * FILES_PER_CLONE;
        let setup = self.setup(function, &place, Task::Serve { state }, binds, false, max_files, None);
        let (pid, sock) = match self.launch(setup, &[template.memory.file().as_raw_fd()]) {
            Ok(r) => r,
            Err((e, reaped)) => {
                self.release(&place, reaped);
                return Err(e);
            }
        };
        let reader = match sock.try_clone() {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let reaped = self.ended(pid, &place).is_some();
                self.release(&place, reaped);
                return Err(WorkerError::Host(format!("socket: {e}")));
            }
        };
        let shared = Arc::new(Shared::default());
        let w = Arc::new(Worker {
            pid,
            started: std::time::Instant::now(),
            counted: AtomicBool::new(false),
            served: AtomicBool::new(false),
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
            let how = workers.ended(pid, &place);
            let reaped = how.is_some();
            *shared.exit.locked() = Some(how.unwrap_or_else(|| "ended".into()));
            shared.fail_everything();
            workers.release(&place, reaped);
        };
        match std::thread::Builder::new().name(format!("worker-{pid}")).spawn(follow) {
            Ok(h) => {
                let mut followers = self.followers.locked();
                followers.retain(|(_, h)| !h.is_finished());
                followers.push((pid, h));
            }
            // The worker goes with its last handle; its directories stay until the next start.
            Err(e) => return Err(WorkerError::Host(format!("cannot start the worker's reader thread: {e}"))),
        }
        Ok(w)
    }

    /// Makes `function`'s template in a worker of its own (jailed like the ones that serve, in
    /// its own directory), booting `spec` with `drives` from the open `kernel` and `initramfs`;
    /// waits for it (at most `timeout` for the guest to be ready). The guest's first run, the
    /// function's own code included, never runs in the daemon. What comes back is checked as
    /// untrusted input (see [`MadeInWorker`]), and only after the worker is dead and reaped: the
    /// daemon never reads, follows or changes anything in the worker's directory.
    #[allow(clippy::too_many_arguments)]
    pub fn make_template(
        &self,
        function: &str,
        vm: &crate::config::VmConfig,
        cpus: Option<f64>,
        images: [RawFd; 2],
        tap: Option<RawFd>,
        timeout: Duration,
    ) -> Result<MadeInWorker, WorkerError> {
        let (vcpus, mem_mib) = (vm.machine_config.vcpu_count, vm.machine_config.mem_size_mib);
        // The guest's RAM, the memory file written from it (in its tmpfs), the working-set
        // clone, the sealed copy of the memory handed back.
        let limits = CgroupLimits { memory_bytes: (mem_mib * 2 + 320) << 20, pids: vcpus * 2 + 64, cpus };
        let place = self.prepare(function, &limits).map_err(WorkerError::Host)?;
        let mut fds = images.to_vec();
        fds.extend(tap);
        let binds = self.drive_binds(&vm.drives).map_err(WorkerError::Host)?;
        let task = Task::Make { vm: Box::new(vm.clone()), timeout_s: timeout.as_secs_f64() };
        // Its template (the memory file at the guest's size, the state, the working set) is
        // written into a tmpfs of its own, bounded, and never onto the host's disk.
        let scratch = (mem_mib + 64) << 20;
        let setup = self.setup(function, &place, task, binds, true, 1024, Some(scratch));
        let (pid, sock) = match self.launch(setup, &fds) {
            Ok(r) => r,
            Err((e, reaped)) => {
                self.release(&place, reaped);
                return Err(e);
            }
        };
        let _ = protocol::set_recv_timeout(&sock, timeout + Duration::from_secs(120));
        let answer = protocol::recv::<FromWorker>(&sock);
        drop(sock);
        // Its work is done whatever it said: it goes, and is reaped, before anything it sent is
        // looked at (a worker that lingers could race the daemon's every step, and its uid is
        // given to the next worker only once it is gone).
        // SAFETY: signals our own child, not reaped yet (its pid cannot have been reused).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let how = self.ended(pid, &place);
        self.release(&place, how.is_some());
        let how = how.unwrap_or_else(|| "ended".into());
        match answer {
            Ok(Received::Message(FromWorker::Made { ready_s, working_set }, files)) => {
                let made = MadeInWorker::check(files, working_set, vm).map_err(WorkerError::Untrusted)?;
                tracing::info!(function, "template made in a worker (ready after {ready_s:.1} s)");
                Ok(made)
            }
            Ok(Received::Message(FromWorker::MakeFailed { error }, _)) => Err(WorkerError::Failed(error)),
            Ok(Received::Message(m, _)) => Err(WorkerError::Untrusted(format!("the worker said {m:?}"))),
            Ok(Received::Closed) => Err(WorkerError::Gone(format!("the worker {how} while it made the template"))),
            Ok(Received::Nothing) => Err(WorkerError::Gone("the worker did not make the template in time".into())),
            Err(e) => Err(WorkerError::Untrusted(format!("worker: {e}"))),
        }
    }

    /// Starts a worker with `setup` (and `fds` sent with it), waits until it is set up. On
    /// failure, also whether no process of it is left (none started, or it was reaped).
    fn launch(&self, setup: Setup, fds: &[RawFd]) -> Result<(i32, UnixDatagram), (WorkerError, bool)> {
        let host = |e: String| (WorkerError::Host(e), true);
        let (mine, theirs) = protocol::pair().map_err(|e| host(format!("socketpair: {e}")))?;
        let namespaces = if self.jailed { JAIL_NAMESPACES } else { 0 };
        let pid = self.launcher.start(&theirs, namespaces).map_err(|e| host(format!("cannot start a worker: {e}")))?;
        drop(theirs);
        let kill = |e: WorkerError| {
            // SAFETY: signals our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (e, self.launcher.wait_exit(pid, Duration::from_secs(5)).is_some())
        };
        protocol::send_fds(&mine, &ToWorker::Setup(Box::new(setup)), fds)
            .map_err(|e| kill(WorkerError::Host(format!("worker setup: {e}"))))?;
        protocol::set_recv_timeout(&mine, SETUP_TIMEOUT).map_err(|e| kill(WorkerError::Host(e.to_string())))?;
        match protocol::recv::<FromWorker>(&mine) {
            Ok(Received::Message(FromWorker::Ready, _)) => {}
            Ok(Received::Message(FromWorker::SetupFailed { error }, _)) => {
                return Err(kill(WorkerError::Failed(format!("the worker could not set itself up: {error}"))))
            }
            Ok(Received::Message(m, _)) => {
                return Err(kill(WorkerError::Untrusted(format!("the worker said {m:?} before it was ready"))))
            }
            Ok(Received::Closed) => {
                let how = self.launcher.wait_exit(pid, Duration::from_secs(5));
                let reaped = how.is_some();
                let why = format!("the worker {} before it was ready", how.unwrap_or_else(|| "ended".into()));
                return Err((WorkerError::Gone(why), reaped));
            }
            Ok(Received::Nothing) => {
                return Err(kill(WorkerError::Gone("the worker did not set itself up in time".into())))
            }
            Err(e) => return Err(kill(WorkerError::Untrusted(format!("worker: {e}")))),
        }
        mine.set_read_timeout(None).map_err(|e| kill(WorkerError::Host(e.to_string())))?;
        Ok((pid, mine))
    }
}

/// Sets the mode of the regular file at `path` on the file itself, opened without following a
/// symlink in its last component.
fn set_mode_nofollow(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_uids_are_nobody_elses() {
        let base = DEFAULT_UID_BASE;
        let sub = |text: &str| vec![("/etc/subuid", text.to_string())];
        assert!(check_uid_range(base, &sub("root:100000:65536\nalice:165536:65536\n")).is_ok());
        let e = check_uid_range(base, &sub("# comment\nbob:7000000:1000000\n")).unwrap_err();
        assert!(e.contains("bob") && e.contains("--worker-uid-base"), "{e}");
        // Touching the range's last id, and its first.
        assert!(check_uid_range(base, &sub(&format!("c:{}:1", base + UID_SLOTS - 1))).is_err());
        assert!(check_uid_range(base, &sub(&format!("c:{}:1", base + UID_SLOTS))).is_ok());
        assert!(check_uid_range(base, &sub(&format!("c:{}:{}", base - 10, 11))).is_err());
        assert!(check_uid_range(base, &sub("garbage\nx:y:z\n")).is_ok());
        // Too low (system and ordinary users), or past 2^32.
        assert!(check_uid_range(1000, &[]).is_err());
        assert!(check_uid_range(u32::MAX - 10, &[]).is_err());
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/usr/sbin/nologin\n";
        assert!(check_uid_range_unused(base, passwd, "root:x:0:\n").is_ok());
        let taken = format!("{passwd}svc:x:{}:100::/:/bin/false\n", base + 5);
        assert!(check_uid_range_unused(base, &taken, "").unwrap_err().contains("svc"));
        assert!(check_uid_range_unused(base, "", &format!("grp:x:{}:\n", base + 1)).unwrap_err().contains("grp"));
    }
}
