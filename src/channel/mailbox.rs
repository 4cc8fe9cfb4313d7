//! The host side of the mailbox (layout and rules: `ember_abi::mailbox`): a region the guest sees
//! as reserved physical memory and ember maps shared, so that an invocation is a few stores and
//! loads on each side, with no exit, guest interrupt or guest system call on its path.
//!
//! The region is a file: a memfd by default, or a path given by the user so that another process
//! (`ember invoke --mailbox PATH`) can map it too. Waiting is done with futexes on the shared
//! mapping, which work across processes: the idle vCPU waits on the host wake word, a caller that
//! asked for the response doorbell waits on the response seq.

use std::fs::File;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ember_abi::mailbox::*;
use ember_abi::{AbiError, Status, MAX_FUNCTION_LEN};

use crate::sys::{futex_wait, futex_wake};
use thiserror::Error;

/// Host-only word: whether the VM behind the mailbox still runs (a caller in another process has
/// no other way to learn that it ended).
const VM_STATE_OFF: usize = 0x104;
const VM_RUNNING: u32 = 1;
const VM_ENDED: u32 = 2;

#[derive(Debug, Error)]
pub enum MailboxError {
    #[error("mailbox {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0} is not an ember mailbox (bad magic or version)")]
    NotAMailbox(String),
    #[error("{0} already exists; remove it or choose another path (ember will not overwrite it)")]
    Exists(String),
    #[error("{0} is not a mailbox whose size is sealed (a memfd of the mailbox's size that cannot shrink or grow)")]
    NotSealed(String),
}

/// Seals `file`'s size (it must be a memfd made with `MFD_ALLOW_SEALING`): false on failure, with
/// the error in errno.
fn seal_size(file: &File) -> bool {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int on a descriptor we own.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) == 0 }
}

/// What a call can be refused for before anything reaches the guest: the function's name and the
/// payload's size. [`Mailbox::call`] checks it; a caller that takes resources first (a clone)
/// checks it before. Returns the request's function field.
pub fn check_request(function: &str, payload: &[u8]) -> Result<[u8; MAX_FUNCTION_LEN], InvokeError> {
    let name = function_field(function).map_err(|_| InvokeError::BadFunction(function.to_string()))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(InvokeError::PayloadTooLarge(payload.len()));
    }
    Ok(name)
}

#[derive(Debug, Error)]
pub enum InvokeError {
    #[error("payload of {0} bytes exceeds the mailbox's limit of {MAX_PAYLOAD} bytes")]
    PayloadTooLarge(usize),
    #[error("bad function name {0:?}: function names are 1 to {MAX_FUNCTION_LEN} characters of [A-Za-z0-9_.-]")]
    BadFunction(String),
    #[error("no response after {0:.3} s (is the guest agent serving?)")]
    Timeout(f64),
    #[error("the VM ended before the function answered")]
    VmEnded,
    #[error("the guest agent wrote a malformed response: {0}")]
    Malformed(AbiError),
    #[error("cannot lock the mailbox: {0}")]
    Lock(std::io::Error),
}

/// What a function answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub payload: Vec<u8>,
}

/// How to wait for a response.
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    pub timeout: Duration,
    /// Ask the agent to ring the response doorbell and sleep until it does, instead of polling.
    pub doorbell: bool,
    /// With `doorbell`: poll this long first (a quick answer is seen without a wake-up; a slow
    /// one costs no host CPU after this).
    pub spin: Duration,
    /// The payload is an envelope and so will the response be (ember_abi::mailbox::FLAG_ENVELOPE).
    pub envelope: bool,
    /// With `doorbell`: have the agent ring even when the answer is found by polling (as agents
    /// without FEATURE_RING_IF_WAITING do; a benchmark's baseline).
    pub ring_always: bool,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            doorbell: false,
            spin: Duration::ZERO,
            envelope: false,
            ring_always: false,
        }
    }
}

/// A mapped mailbox region.
pub struct Mailbox {
    file: File,
    base: *mut u8,
    /// The file to remove when the VM's mailbox goes (only for one ember created at a path).
    owned_path: Option<PathBuf>,
    /// Whether a call holds this handle (one at a time; other processes are kept out with flock).
    calling: AtomicBool,
    /// The last request id this handle used.
    last_id: AtomicU64,
    /// Response doorbells the agent rang (seen by this process's vCPU thread).
    rung: AtomicU64,
    /// Calls through this handle that set the host-waiting word (asked to be rung if they sleep).
    announced: AtomicU64,
    /// Calls through this handle that set it and then found no answer, so slept on the doorbell.
    slept: AtomicU64,
}

// SAFETY: the mapping is shared memory accessed only through atomics and volatile copies; the
// pointer stays valid for the Mailbox's life.
unsafe impl Send for Mailbox {}
// SAFETY: as above; concurrent callers are serialized by `calling`.
unsafe impl Sync for Mailbox {}

fn io_err(path: &str) -> impl Fn(std::io::Error) -> MailboxError + '_ {
    move |err| MailboxError::Io { path: path.to_string(), err }
}

impl Mailbox {
    /// Creates the region for a new VM: a memfd, or a new file at `path` (never an existing one).
    pub fn create(path: Option<&Path>) -> Result<Self, MailboxError> {
        // SAFETY: no address given: the mapping goes where the kernel puts it.
        unsafe { Self::create_at(path, None) }
    }

    /// [`Mailbox::create`], mapped over `at` when given.
    ///
    /// # Safety
    /// `at` must be the start of a mapping of [`MAILBOX_SIZE`] bytes that the caller gives up: the
    /// mailbox maps over it and unmaps it when dropped (also when this fails).
    pub unsafe fn create_at(path: Option<&Path>, at: Option<*mut u8>) -> Result<Self, MailboxError> {
        let give_up = || {
            if let Some(p) = at {
                // SAFETY: the caller handed the range over; nothing uses it after a failure.
                unsafe { libc::munmap(p.cast(), MAILBOX_SIZE as usize) };
            }
        };
        let (file, name) = match path {
            None => match crate::sys::memfd(c"ember-mailbox", true) {
                Ok(f) => (f, "memfd".to_string()),
                Err(e) => {
                    give_up();
                    return Err(io_err("memfd")(e));
                }
            },
            Some(p) => {
                let name = p.display().to_string();
                let f = crate::sys::private_file().read(true).write(true).create_new(true).open(p).map_err(|e| {
                    give_up();
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        MailboxError::Exists(name.clone())
                    } else {
                        io_err(&name)(e)
                    }
                })?;
                (f, name)
            }
        };
        let cleanup = |e| {
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
            e
        };
        if let Err(e) = file.set_len(MAILBOX_SIZE) {
            give_up();
            return Err(cleanup(io_err(&name)(e)));
        }
        // An anonymous mailbox's size is sealed: whoever it is handed to (a worker's mailboxes
        // go to the daemon) can map it without fearing that another holder truncates it under
        // the mapping (a SIGBUS in the reader).
        if path.is_none() && !seal_size(&file) {
            give_up();
            return Err(io_err(&name)(std::io::Error::last_os_error()));
        }
        // SAFETY: `at`, if any, is handed over by our caller (see above).
        let mut m = unsafe { Self::map(file, &name, at) }.map_err(cleanup)?;
        m.owned_path = path.map(Path::to_path_buf);
        let mut epoch = [0u8; 8];
        crate::sys::getrandom(&mut epoch).map_err(io_err(&name)).map_err(cleanup)?;
        m.word64(EPOCH_OFF).store(u64::from_le_bytes(epoch), Ordering::Relaxed);
        m.store32(VERSION_OFF, VERSION);
        m.store32(VM_STATE_OFF, VM_RUNNING);
        m.word32(MAGIC_OFF).store(MAGIC, Ordering::Release);
        Ok(m)
    }

    /// Opens the mailbox of a VM that another ember process runs.
    pub fn open(path: &Path) -> Result<Self, MailboxError> {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_err(&name))?;
        let len = file.metadata().map_err(io_err(&name))?.len();
        if len != MAILBOX_SIZE {
            return Err(MailboxError::NotAMailbox(name));
        }
        Self::map_existing(file, name)
    }

    /// Maps the file of a mailbox another process made: refused without the mailbox's magic and
    /// version.
    fn map_existing(file: File, name: String) -> Result<Self, MailboxError> {
        // SAFETY: no address given: the mapping goes where the kernel puts it.
        let m = unsafe { Self::map(file, &name, None) }?;
        if m.word32(MAGIC_OFF).load(Ordering::Acquire) != MAGIC
            || m.word32(VERSION_OFF).load(Ordering::Acquire) != VERSION
        {
            return Err(MailboxError::NotAMailbox(name));
        }
        Ok(m)
    }

    /// Takes a mailbox handed over by another process (a worker's clone's): accepted only as a
    /// file of the mailbox's size that nobody can shrink or grow (a memfd with those seals, as
    /// [`Mailbox::create`] makes one), so that mapping it can never fault, and only with the
    /// mailbox's magic and version.
    pub fn from_sealed(file: File) -> Result<Self, MailboxError> {
        let name = "a mailbox handed over".to_string();
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_GET_SEALS on a descriptor we own; no pointer is passed.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let meta = file.metadata().map_err(io_err(&name))?;
        if seals < 0 || seals & want != want || !meta.is_file() || meta.len() != MAILBOX_SIZE {
            return Err(MailboxError::NotSealed(name));
        }
        Self::map_existing(file, name)
    }

    /// The mailbox's file, to hand to another process (see [`Mailbox::from_sealed`]).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    /// Maps the mailbox file; over `at` (a range of MAILBOX_SIZE bytes given up by the caller,
    /// unmapped even on failure) when given.
    unsafe fn map(file: File, name: &str, at: Option<*mut u8>) -> Result<Self, MailboxError> {
        let (addr, fixed) = match at {
            Some(p) => (p.cast(), libc::MAP_FIXED),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: maps MAILBOX_SIZE bytes of a file of that size, shared, either where the kernel
        // chooses or over a range our caller gave up; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                addr,
                MAILBOX_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | fixed,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if !addr.is_null() {
                // SAFETY: the range was given up to us and holds nothing anyone uses.
                unsafe { libc::munmap(addr, MAILBOX_SIZE as usize) };
            }
            return Err(io_err(name)(e));
        }
        Ok(Self {
            file,
            base: p.cast(),
            owned_path: None,
            calling: AtomicBool::new(false),
            last_id: AtomicU64::new(0),
            rung: AtomicU64::new(0),
            announced: AtomicU64::new(0),
            slept: AtomicU64::new(0),
        })
    }

    /// Whether the mailbox is a file ember created at a path (removed when it goes).
    pub fn is_named(&self) -> bool {
        self.owned_path.is_some()
    }

    /// Moves a named mailbox's file to `to`, which must not exist (the mapping stays as it is).
    pub fn rename(&mut self, to: &Path) -> Result<(), MailboxError> {
        let Some(from) = &self.owned_path else {
            return Err(io_err("an anonymous mailbox")(std::io::ErrorKind::Unsupported.into()));
        };
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other);
        let name = to.display().to_string();
        let (from_c, to_c) = (c(from).map_err(io_err(&name))?, c(to).map_err(io_err(&name))?);
        // SAFETY: both paths are NUL-terminated strings we own; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => MailboxError::Exists(name),
                _ => io_err(&name)(e),
            });
        }
        self.owned_path = Some(to.to_path_buf());
        Ok(())
    }

    /// Closes the mailbox (removing its file, if named) but leaves its mapping, whose range is
    /// returned: the caller owns it (to map over it, [`Mailbox::create_at`]) and must unmap it.
    pub fn into_range(mut self) -> *mut u8 {
        std::mem::replace(&mut self.base, std::ptr::null_mut())
    }

    /// The host address of the region (for KVM's memory slot).
    pub fn host_addr(&self) -> u64 {
        self.base as u64
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= HOST_WAKE_OFF + 8);
        // SAFETY: `off` is an aligned header offset inside the live mapping; shared memory is only
        // accessed atomically here.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= HOST_WAKE_OFF);
        // SAFETY: as in `word32`, 8-byte aligned.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn store32(&self, off: usize, v: u32) {
        self.word32(off).store(v, Ordering::Relaxed);
    }

    /// Marks the VM as ended (callers in other processes stop waiting) and wakes every waiter.
    pub fn vm_ended(&self) {
        self.store32(VM_STATE_OFF, VM_ENDED);
        futex_wake(self.word32(VM_STATE_OFF));
        futex_wake(self.word32(RESP_SEQ_OFF));
        self.wake();
    }

    /// Waits up to `timeout` for the VM to be marked ended ([`Mailbox::vm_ended`], in this
    /// process or another that maps the mailbox): whether it has.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let word = self.word32(VM_STATE_OFF);
        loop {
            let state = word.load(Ordering::Acquire);
            if state == VM_ENDED {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            futex_wait(word, state, Some(left));
        }
    }

    /// Whether the VM behind the mailbox has ended (as its VMM, or a supervisor, marked it).
    pub fn ended(&self) -> bool {
        self.word32(VM_STATE_OFF).load(Ordering::Acquire) == VM_ENDED
    }

    /// Wakes a vCPU waiting in [`Mailbox::idle_wait`] (it re-checks why it waits).
    pub fn wake(&self) {
        self.word32(HOST_WAKE_OFF).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.word32(HOST_WAKE_OFF));
    }

    /// Whether the guest agent has reached its serving loop (it polls or has parked the vCPU).
    pub fn agent_serving(&self) -> bool {
        self.word32(AGENT_STATE_OFF).load(Ordering::Acquire) != AGENT_ABSENT
    }

    /// Whether the agent has parked its vCPU (rung the idle doorbell) and not been woken since.
    pub fn agent_idle(&self) -> bool {
        self.word32(AGENT_STATE_OFF).load(Ordering::Acquire) == AGENT_IDLE
    }

    /// Whether the agent serves and has answered every request posted so far (nothing in flight:
    /// the clone can be handed to someone else).
    pub fn quiescent(&self) -> bool {
        !self.ended()
            && self.agent_serving()
            && self.word64(REQ_SEQ_OFF).load(Ordering::SeqCst) == self.word64(RESP_SEQ_OFF).load(Ordering::SeqCst)
    }

    /// The wake generation now (a vCPU thread starts with it; see [`Mailbox::idle_wait`]).
    pub fn wake_generation(&self) -> u32 {
        self.word32(HOST_WAKE_OFF).load(Ordering::SeqCst)
    }

    /// Called by a vCPU thread when the agent rings the idle doorbell: blocks until a request the
    /// agent has not seen is posted, the agent is no longer idle, `interrupted()` (a stop, a pause)
    /// says to go back, or anyone calls [`Mailbox::wake`] (e.g. a device raising an interrupt the
    /// guest must take). `seen` is the wake generation this vCPU last acted on: a wake that came
    /// while the vCPU was still on its way here is not lost.
    pub fn idle_wait(&self, seen: &mut u32, interrupted: impl Fn() -> bool) {
        let wake = self.word32(HOST_WAKE_OFF);
        loop {
            let generation = wake.load(Ordering::SeqCst);
            if generation != *seen
                || interrupted()
                || self.word64(REQ_SEQ_OFF).load(Ordering::SeqCst) != self.word64(AGENT_SEEN_OFF).load(Ordering::SeqCst)
                || self.word32(AGENT_STATE_OFF).load(Ordering::SeqCst) != AGENT_IDLE
            {
                *seen = generation;
                return;
            }
            // A periodic re-check bounds what a lost wake-up could cost.
            futex_wait(wake, generation, Some(Duration::from_secs(1)));
        }
    }

    /// Called by a vCPU thread when the agent rings the response doorbell.
    pub fn response_rung(&self) {
        self.rung.fetch_add(1, Ordering::Relaxed);
        futex_wake(self.word32(RESP_SEQ_OFF));
    }

    /// How many times the agent rang the response doorbell.
    pub fn responses_rung(&self) -> u64 {
        self.rung.load(Ordering::Relaxed)
    }

    /// How many calls through this handle asked to be rung (set the host-waiting word) and how
    /// many of those then found no answer and slept. The protocol's promise, in these counts: the
    /// agent rings for every call that slept and for no call that did not ask, so over any stretch
    /// of calls without [`CallOptions::ring_always`], `slept <= responses rung <= announced` (a
    /// ring is counted when the vCPU thread handles its exit, before the agent can see the next
    /// request).
    pub fn doorbell_waits(&self) -> (u64, u64) {
        (self.announced.load(Ordering::Relaxed), self.slept.load(Ordering::Relaxed))
    }

    /// Invokes `function` with `payload` and waits for its response.
    pub fn call(&self, function: &str, payload: &[u8], opts: CallOptions) -> Result<Response, InvokeError> {
        Mailbox::begin(self, function, payload, opts)?.finish()
    }

    /// Posts a request and returns without waiting for its answer: [`PendingCall::poll`] looks for
    /// it, [`PendingCall::finish`] waits for it as `opts` says. Waits for another caller's call to
    /// end (at most `opts.timeout`).
    pub fn begin<M: Deref<Target = Mailbox>>(
        this: M,
        function: &str,
        payload: &[u8],
        opts: CallOptions,
    ) -> Result<PendingCall<M>, InvokeError> {
        let name = check_request(function, payload)?;
        this.take_call(opts.timeout)?;
        Self::post(this, name, payload, opts)
    }

    /// [`Mailbox::begin`] only if no other call holds the mailbox now (`None` otherwise, nothing
    /// posted): for a caller that must not wait.
    pub fn try_begin<M: Deref<Target = Mailbox>>(
        this: M,
        function: &str,
        payload: &[u8],
        opts: CallOptions,
    ) -> Result<Option<PendingCall<M>>, InvokeError> {
        let name = check_request(function, payload)?;
        match this.take_call(Duration::ZERO) {
            Ok(()) => Self::post(this, name, payload, opts).map(Some),
            Err(InvokeError::Lock(e)) if e.kind() == std::io::ErrorKind::TimedOut => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the right to call: one call at a time through this handle (`calling`), and across
    /// processes (flock; threads of one process share the open file, so flock alone would not
    /// keep them apart). Waits at most `timeout` for each. Released by [`PendingCall`]'s drop.
    fn take_call(&self, timeout: Duration) -> Result<(), InvokeError> {
        let deadline = Instant::now() + timeout;
        let free = || self.calling.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok();
        if crate::sys::retry_for(timeout, || free().then_some(())).is_none() {
            let busy = std::io::Error::new(std::io::ErrorKind::TimedOut, "another call holds the mailbox");
            return Err(InvokeError::Lock(busy));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = crate::sys::flock_exclusive(&self.file, left) {
            self.calling.store(false, Ordering::Release);
            return Err(InvokeError::Lock(e));
        }
        Ok(())
    }

    fn release_call(&self) {
        crate::sys::funlock(&self.file);
        self.calling.store(false, Ordering::Release);
    }

    /// Writes the request (the caller holds the call, which the returned [`PendingCall`] or this
    /// failure releases) and makes it visible to the agent.
    fn post<M: Deref<Target = Mailbox>>(
        this: M,
        name: [u8; MAX_FUNCTION_LEN],
        payload: &[u8],
        opts: CallOptions,
    ) -> Result<PendingCall<M>, InvokeError> {
        if this.ended() {
            this.release_call();
            return Err(InvokeError::VmEnded);
        }
        let id = this.last_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1) ^ (u64::from(std::process::id()) << 32);
        // SAFETY: the request area lies inside the mapping and holds MAX_PAYLOAD bytes (checked by
        // `check_request`); the guest does not write it (a guest that does only corrupts its own
        // request).
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), this.base.add(REQ_DATA_OFF), payload.len()) };
        this.word64(REQ_ID_OFF).store(id, Ordering::Relaxed);
        this.store32(REQ_LEN_OFF, payload.len() as u32);
        // An agent that can ring only when the caller sleeps is asked to: a caller that finds the
        // answer while it polls then costs the guest no exit (during which it cannot see the next
        // request).
        let if_waiting = opts.doorbell
            && !opts.ring_always
            && this.word32(AGENT_FEATURES_OFF).load(Ordering::Acquire) & FEATURE_RING_IF_WAITING != 0;
        let flags = if opts.doorbell { FLAG_DOORBELL } else { 0 }
            | if if_waiting { FLAG_RING_IF_WAITING } else { 0 }
            | if opts.envelope { FLAG_ENVELOPE } else { 0 };
        this.store32(REQ_FLAGS_OFF, flags);
        for (i, chunk) in name.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            this.word64(REQ_FUNCTION_OFF + i * 8).store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        let seq = this.word64(REQ_SEQ_OFF).load(Ordering::Relaxed).wrapping_add(1);
        this.word64(REQ_SEQ_OFF).store(seq, Ordering::SeqCst);
        if this.word32(AGENT_STATE_OFF).load(Ordering::SeqCst) == AGENT_IDLE {
            this.wake();
        }
        Ok(PendingCall { start: Instant::now(), mailbox: this, id, seq, opts, if_waiting })
    }
}

/// A request posted through [`Mailbox::begin`], its answer not read yet. Holds the mailbox's call
/// (no other caller posts until it is dropped) and may move to another thread to be finished.
pub struct PendingCall<M: Deref<Target = Mailbox>> {
    mailbox: M,
    id: u64,
    seq: u64,
    opts: CallOptions,
    if_waiting: bool,
    /// When the request was posted: `opts.spin` and `opts.timeout` count from here.
    start: Instant,
}

impl<M: Deref<Target = Mailbox>> PendingCall<M> {
    fn answered(&self) -> bool {
        self.mailbox.word64(RESP_SEQ_OFF).load(Ordering::Acquire) == self.seq
    }

    /// Whether the answer is there, looking for it for at most `spin`.
    pub fn poll(&self, spin: Duration) -> bool {
        let start = Instant::now();
        while !self.answered() {
            if start.elapsed() >= spin {
                return false;
            }
            std::hint::spin_loop();
        }
        true
    }

    /// Waits for the answer as the call's options say and reads it.
    pub fn finish(self) -> Result<Response, InvokeError> {
        let (m, opts, seq) = (&*self.mailbox, self.opts, self.seq);
        let deadline = self.start + opts.timeout;
        if opts.doorbell && !opts.spin.is_zero() {
            self.poll(opts.spin.saturating_sub(self.start.elapsed()));
        }
        let resp_seq = m.word64(RESP_SEQ_OFF);
        let mut spins = 0u32;
        // Cleared however the wait ends.
        let waiting = Waiting(m.word32(HOST_WAITING_OFF));
        let (mut announced, mut slept) = (false, false);
        while resp_seq.load(Ordering::Acquire) != seq {
            if opts.doorbell {
                let low = resp_seq.load(Ordering::Acquire) as u32;
                if self.if_waiting && !std::mem::replace(&mut announced, true) {
                    waiting.0.store(1, Ordering::SeqCst);
                    m.announced.fetch_add(1, Ordering::Relaxed);
                }
                if resp_seq.load(Ordering::SeqCst) != seq {
                    if !std::mem::replace(&mut slept, true) {
                        m.slept.fetch_add(1, Ordering::Relaxed);
                    }
                    futex_wait(m.word32(RESP_SEQ_OFF), low, Some(Duration::from_millis(10)));
                }
            } else {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins & 1023 != 0 {
                    continue;
                }
            }
            if m.ended() {
                return Err(InvokeError::VmEnded);
            }
            if Instant::now() >= deadline {
                return Err(InvokeError::Timeout(opts.timeout.as_secs_f64()));
            }
        }
        drop(waiting);
        let raw = RawResponse {
            id: m.word64(RESP_ID_OFF).load(Ordering::Acquire),
            len: m.word32(RESP_LEN_OFF).load(Ordering::Acquire),
            status: m.word32(RESP_STATUS_OFF).load(Ordering::Acquire),
        };
        let (status, len) = raw.check(self.id).map_err(InvokeError::Malformed)?;
        let mut out = vec![0u8; len];
        // SAFETY: `len` was checked against MAX_PAYLOAD, so the copy stays within the response
        // area of the live mapping; the guest may still be writing it (its own response).
        unsafe { std::ptr::copy_nonoverlapping(m.base.add(RESP_DATA_OFF), out.as_mut_ptr(), len) };
        Ok(Response { status, payload: out })
    }
}

impl<M: Deref<Target = Mailbox>> Drop for PendingCall<M> {
    fn drop(&mut self) {
        self.mailbox.release_call();
    }
}

/// The host-waiting word while a call may sleep on the response doorbell: cleared when the call
/// is done waiting, answered or not.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: unmaps the mapping made in `map` (not given up by `into_range`); nothing
            // else refers to it once we are dropped (KVM's memory slot is gone with the VM fd,
            // which the VM drops first).
            unsafe { libc::munmap(self.base.cast(), MAILBOX_SIZE as usize) };
        }
        if let Some(p) = &self.owned_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
impl Mailbox {
    /// Marks the agent as serving (polling), as the agent does once it is up (unit tests).
    pub(crate) fn agent_polls(&self) {
        self.store32(AGENT_STATE_OFF, AGENT_POLLING);
    }

    /// Plays the agent on the host, for unit tests of what drives clones: marks it serving, then
    /// answers each request with its own payload (echo), until the VM is marked ended.
    pub(crate) fn echo_until_ended(&self) {
        self.agent_polls();
        while !self.ended() {
            let seq = self.word64(REQ_SEQ_OFF).load(Ordering::Acquire);
            if seq == self.word64(RESP_SEQ_OFF).load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            self.word64(AGENT_SEEN_OFF).store(seq, Ordering::SeqCst);
            let len = (self.word32(REQ_LEN_OFF).load(Ordering::Acquire) as usize).min(MAX_PAYLOAD);
            // SAFETY: both areas are within the mapping and MAX_PAYLOAD long; they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(self.base.add(REQ_DATA_OFF), self.base.add(RESP_DATA_OFF), len) };
            let id = self.word64(REQ_ID_OFF).load(Ordering::Acquire);
            self.word64(RESP_ID_OFF).store(id, Ordering::Relaxed);
            self.store32(RESP_LEN_OFF, len as u32);
            self.store32(RESP_STATUS_OFF, 0);
            self.word64(RESP_SEQ_OFF).store(seq, Ordering::Release);
            futex_wake(self.word32(RESP_SEQ_OFF));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Plays the agent's part on the host: answers one request the way the agent does.
    fn answer(m: &Mailbox, status: u32, body: &[u8], id_delta: u64) {
        let seq = m.word64(REQ_SEQ_OFF).load(Ordering::Acquire);
        let id = m.word64(REQ_ID_OFF).load(Ordering::Acquire);
        // SAFETY: test writes within the response area.
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), m.base.add(RESP_DATA_OFF), body.len()) };
        m.word64(RESP_ID_OFF).store(id.wrapping_add(id_delta), Ordering::Relaxed);
        m.store32(RESP_LEN_OFF, body.len() as u32);
        m.store32(RESP_STATUS_OFF, status);
        m.word64(RESP_SEQ_OFF).store(seq, Ordering::Release);
    }

    fn serve_once(m: &'static Mailbox, status: u32, body: &'static [u8], id_delta: u64) -> std::thread::JoinHandle<()> {
        let start = m.word64(REQ_SEQ_OFF).load(Ordering::Acquire);
        std::thread::spawn(move || {
            while m.word64(REQ_SEQ_OFF).load(Ordering::Acquire) == start {
                std::hint::spin_loop();
            }
            answer(m, status, body, id_delta);
        })
    }

    fn leak(m: Mailbox) -> &'static Mailbox {
        Box::leak(Box::new(m))
    }

    #[test]
    fn the_end_of_the_vm_wakes_who_waits_for_it() {
        let m = Arc::new(Mailbox::create(None).unwrap());
        assert!(!m.wait_ended(Duration::from_millis(20)), "not ended: the wait times out");
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || m.wait_ended(Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(20));
        m.vm_ended();
        assert!(waiter.join().unwrap());
        assert!(m.ended() && m.wait_ended(Duration::ZERO));
    }

    #[test]
    fn a_call_round_trips_and_checks_what_comes_back() {
        let m = leak(Mailbox::create(None).unwrap());
        let t = serve_once(m, 0, b"pong", 0);
        let r = m.call("echo", b"ping", CallOptions::default()).unwrap();
        t.join().unwrap();
        assert_eq!(r, Response { status: Status::Ok, payload: b"pong".to_vec() });

        let t = serve_once(m, 77, b"", 0);
        let e = m.call("echo", b"", CallOptions::default()).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, InvokeError::Malformed(AbiError::BadStatus(77))), "{e}");

        let t = serve_once(m, 0, b"", 1);
        let e = m.call("echo", b"", CallOptions::default()).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, InvokeError::Malformed(AbiError::WrongId { .. })), "{e}");
    }

    #[test]
    fn bad_calls_are_refused_and_silence_times_out() {
        let m = Mailbox::create(None).unwrap();
        assert!(matches!(m.call("no spaces", b"", CallOptions::default()), Err(InvokeError::BadFunction(_))));
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(m.call("echo", &big, CallOptions::default()), Err(InvokeError::PayloadTooLarge(_))));
        for doorbell in [false, true] {
            let opts = CallOptions { timeout: Duration::from_millis(30), doorbell, ..Default::default() };
            assert!(matches!(m.call("echo", b"x", opts), Err(InvokeError::Timeout(_))));
        }
        m.vm_ended();
        assert!(matches!(m.call("echo", b"x", CallOptions::default()), Err(InvokeError::VmEnded)));
    }

    #[test]
    fn another_process_opens_it_by_path_and_an_existing_file_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mbox");
        let m = Mailbox::create(Some(&p)).unwrap();
        assert!(matches!(Mailbox::create(Some(&p)), Err(MailboxError::Exists(_))));
        let other = leak(Mailbox::open(&p).unwrap());
        let t = serve_once(other, 0, b"seen", 0);
        assert_eq!(m.call("echo", b"", CallOptions::default()).unwrap().payload, b"seen");
        t.join().unwrap();
        drop(m);
        assert!(!p.exists(), "the mailbox file outlived its VM");
        std::fs::write(&p, b"not a mailbox").unwrap();
        assert!(matches!(Mailbox::open(&p), Err(MailboxError::NotAMailbox(_))));
    }

    #[test]
    fn a_named_mailbox_moves_to_a_new_name_but_never_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        let mut m = Mailbox::create(Some(&a)).unwrap();
        m.rename(&b).unwrap();
        assert!(!a.exists());
        let other = leak(Mailbox::open(&b).unwrap());
        let t = serve_once(other, 0, b"moved", 0);
        assert_eq!(m.call("echo", b"", CallOptions::default()).unwrap().payload, b"moved");
        t.join().unwrap();
        std::fs::write(&c, b"someone else's").unwrap();
        assert!(matches!(m.rename(&c), Err(MailboxError::Exists(_))));
        assert_eq!(std::fs::read(&c).unwrap(), b"someone else's");
        assert!(Mailbox::create(None).unwrap().rename(&dir.path().join("d")).is_err(), "an anonymous one");
        drop(m);
        assert!(!b.exists(), "the moved file outlived its mailbox");
        // Given up as a range, a named mailbox's file goes with it.
        let m = Mailbox::create(Some(&a)).unwrap();
        let range = m.into_range();
        assert!(!a.exists());
        // SAFETY: the range was given up to us above and nothing else uses it.
        unsafe { libc::munmap(range.cast(), MAILBOX_SIZE as usize) };
    }

    #[test]
    fn a_posted_call_holds_the_mailbox_and_is_finished_on_another_thread() {
        let m = Arc::new(Mailbox::create(None).unwrap());
        let p = Mailbox::begin(m.clone(), "echo", b"one", CallOptions::default()).unwrap();
        assert!(!p.poll(Duration::from_micros(50)), "answered before the agent wrote anything");
        // While it is posted no other call gets in: one that must not wait posts nothing, one
        // that may wait gives up at its timeout.
        let seq = m.word64(REQ_SEQ_OFF).load(Ordering::SeqCst);
        assert!(Mailbox::try_begin(&*m, "echo", b"two", CallOptions::default()).unwrap().is_none());
        let short = CallOptions { timeout: Duration::from_millis(5), ..Default::default() };
        assert!(matches!(m.call("echo", b"two", short), Err(InvokeError::Lock(_))));
        assert_eq!(m.word64(REQ_SEQ_OFF).load(Ordering::SeqCst), seq, "a refused call posted a request");
        answer(&m, 0, b"first", 0);
        assert!(p.poll(Duration::ZERO));
        let r = std::thread::spawn(move || p.finish()).join().unwrap().unwrap();
        assert_eq!(r.payload, b"first");
        // Finished (and dropped), it lets the next call in.
        let next = Mailbox::try_begin(&*m, "echo", b"three", CallOptions::default()).unwrap().expect("free");
        answer(&m, 0, b"second", 0);
        assert_eq!(next.finish().unwrap().payload, b"second");
        // Dropped unanswered, it frees the mailbox too.
        drop(Mailbox::begin(&*m, "echo", b"", CallOptions::default()).unwrap());
        assert!(Mailbox::try_begin(&*m, "echo", b"", CallOptions::default()).unwrap().is_some());
    }

    #[test]
    fn a_mailbox_handed_over_is_taken_only_with_its_size_sealed() {
        let m = Mailbox::create(None).unwrap();
        let handed = File::from(m.fd().try_clone_to_owned().unwrap());
        // Nobody holding it can cut it under a mapping (the reader's SIGBUS).
        assert!(handed.set_len(4096).is_err(), "an anonymous mailbox could be truncated");
        assert!(handed.set_len(MAILBOX_SIZE * 2).is_err(), "an anonymous mailbox could be grown");
        let other = leak(Mailbox::from_sealed(handed).unwrap());
        let t = serve_once(other, 0, b"over", 0);
        assert_eq!(m.call("echo", b"", CallOptions::default()).unwrap().payload, b"over");
        t.join().unwrap();
        // An unsealed memfd, a regular file, a sealed one of another size: refused.
        let dir = tempfile::tempdir().unwrap();
        let named = Mailbox::create(Some(&dir.path().join("named"))).unwrap();
        let plain = File::from(named.fd().try_clone_to_owned().unwrap());
        assert!(matches!(Mailbox::from_sealed(plain), Err(MailboxError::NotSealed(_))));
        let memfd = |sealable| crate::sys::memfd(c"t", sealable).unwrap();
        let unsealed = memfd(false);
        unsealed.set_len(MAILBOX_SIZE).unwrap();
        assert!(matches!(Mailbox::from_sealed(unsealed), Err(MailboxError::NotSealed(_))));
        let small = memfd(true);
        small.set_len(4096).unwrap();
        assert!(seal_size(&small));
        assert!(matches!(Mailbox::from_sealed(small), Err(MailboxError::NotSealed(_))));
        // Sealed, of the right size, but not a mailbox.
        let blank = memfd(true);
        blank.set_len(MAILBOX_SIZE).unwrap();
        assert!(seal_size(&blank));
        assert!(matches!(Mailbox::from_sealed(blank), Err(MailboxError::NotAMailbox(_))));
    }

    #[test]
    fn a_caller_that_sleeps_on_the_doorbell_is_counted_and_woken_by_the_ring() {
        let m = leak(Mailbox::create(None).unwrap());
        m.store32(AGENT_FEATURES_OFF, FEATURE_RING_IF_WAITING);
        let opts = CallOptions { doorbell: true, ..Default::default() };
        let t = std::thread::spawn(move || m.call("echo", b"", opts));
        // The caller announces that it sleeps, finds no answer and sleeps: then the agent's part
        // (which sees the host-waiting word set) answers and rings.
        while m.doorbell_waits() != (1, 1) {
            std::thread::yield_now();
        }
        assert_eq!(m.word32(HOST_WAITING_OFF).load(Ordering::SeqCst), 1);
        answer(m, 0, b"rung", 0);
        m.response_rung();
        assert_eq!(t.join().unwrap().unwrap().payload, b"rung");
        assert_eq!((m.responses_rung(), m.word32(HOST_WAITING_OFF).load(Ordering::SeqCst)), (1, 0));
        // A caller that finds the answer while it polls announces nothing.
        let t = serve_once(m, 0, b"polled", 0);
        let spin = CallOptions { spin: Duration::from_secs(60), ..opts };
        assert_eq!(m.call("echo", b"", spin).unwrap().payload, b"polled");
        t.join().unwrap();
        assert_eq!(m.doorbell_waits(), (1, 1));
    }

    #[test]
    fn idle_wait_returns_for_a_new_request() {
        let m = leak(Mailbox::create(None).unwrap());
        m.store32(AGENT_STATE_OFF, AGENT_IDLE);
        let t = std::thread::spawn(move || m.idle_wait(&mut m.wake_generation(), || false));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        let _ = m.call("echo", b"", CallOptions { timeout: Duration::from_millis(1), ..Default::default() });
        t.join().unwrap();
        // A wake that came before the wait returns it at once.
        let mut seen = m.wake_generation();
        m.wake();
        m.idle_wait(&mut seen, || false);
        assert_eq!(seen, m.wake_generation());
    }
}
