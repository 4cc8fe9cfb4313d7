//! Small system helpers every layer may use: the host's RNG, futexes, file locks, poison-free
//! mutexes and threads started ahead of their work. Ground floor: imports nothing of ember.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Fills `buf` from the host kernel's RNG.
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into memory we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Waits while `word` holds `expected` (a shared futex: works across processes), at most `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos().into() });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT reads the aligned u32 at `word` (live memory we borrow) and the timespec.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, tsp) };
}

/// Wakes every waiter on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// Calls `attempt` until it answers (`Some`) or `timeout` has passed (`None`), pausing between
/// tries from 20 us, doubling up to 5 ms: for a resource whose holder lets go soon, without
/// spinning on it or hanging on one that does not.
pub fn retry_for<T>(timeout: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(20);
    loop {
        if let Some(v) = attempt() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Takes an exclusive flock on `f` (one holder at a time across processes; released by
/// [`funlock`] or by closing the file), waiting for it at most `timeout` (another holder never
/// hangs the caller): `ErrorKind::TimedOut` when it stays taken.
pub fn flock_exclusive(f: &File, timeout: Duration) -> std::io::Result<()> {
    let taken = retry_for(timeout, || {
        // SAFETY: flock on an fd we borrow; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(Ok(()));
        }
        let e = std::io::Error::last_os_error();
        let held = e.raw_os_error() == Some(libc::EWOULDBLOCK) || e.kind() == std::io::ErrorKind::Interrupted;
        (!held).then_some(Err(e))
    });
    taken.unwrap_or_else(|| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "another caller holds the lock")))
}

/// Releases a lock taken with [`flock_exclusive`].
pub fn funlock(f: &File) {
    // SAFETY: flock on an fd we borrow; no memory is passed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
}

/// Locking that survives a poisoned mutex: a thread that panicked while holding the lock leaves
/// data that is still consistent for every ember structure (each update is one assignment or one
/// container operation), and one failed thread must not take every later caller down with it.
pub trait Locked<T: ?Sized> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A rate limit for log lines a guest can trigger: at most `per_second` pass in any one-second
/// window; the rest are counted, and the next line that passes says how many were dropped. A
/// stalled or flooded log must never slow the vCPU and device threads that write it.
pub struct RateLimit {
    /// The current window, in seconds since the process's first check (+1; 0: none yet).
    window: AtomicU64,
    passed: AtomicU32,
    dropped: AtomicU64,
}

impl RateLimit {
    pub const fn new() -> Self {
        Self { window: AtomicU64::new(0), passed: AtomicU32::new(0), dropped: AtomicU64::new(0) }
    }

    /// Whether a line may be logged now: `Some(lines dropped since the last one that passed)`.
    pub fn check(&self, per_second: u32) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.passed.store(0, Ordering::Relaxed);
        }
        if self.passed.fetch_add(1, Ordering::Relaxed) < per_second {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs at `level` (a `tracing` macro: `warn`, `info`, ...) at most 10 lines a second from this
/// call site, process-wide; for every log line a guest can cause.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::sys::RateLimit = $crate::sys::RateLimit::new();
        if let Some(dropped) = LIMIT.check(10) {
            if dropped > 0 {
                tracing::$level!(dropped, $($arg)+);
            } else {
                tracing::$level!($($arg)+);
            }
        }
    }};
}

/// Creates `dir` and its missing parents, each new one only its owner can enter (0700), and makes
/// `dir` itself 0700 if it existed: ember's directories hold guest RAM, payloads and sockets.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// openat2(2) beneath `dir`, never through a symlink.
pub fn open_beneath(
    dir: &std::os::fd::OwnedFd,
    rel: &std::path::Path,
    flags: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let name = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(rel.as_os_str()))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain old data; all zeros is valid, and the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the directory fd is open, `name` is NUL-terminated and `how` is a valid open_how of
    // the size passed; a non-negative result is a new fd that nothing else owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(dir),
            name.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// A new memfd named `name` (close-on-exec), whose seals can be added when `sealable`.
pub fn memfd(name: &std::ffi::CStr, sealable: bool) -> std::io::Result<std::fs::File> {
    let flags = libc::MFD_CLOEXEC | if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: the name is NUL-terminated; a non-negative result is a new fd that we own.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Reads all of `file` (from its start) if it is a regular file of at most `limit` bytes: what
/// another process handed over, read without trusting its size.
pub fn read_file_limited(file: &std::fs::File, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > limit {
        return Err(std::io::Error::other(format!("not a regular file of at most {limit} bytes")));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let mut at = 0u64;
    let mut buf = [0u8; 64 << 10];
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        at += n as u64;
        if at > limit {
            return Err(std::io::Error::other(format!("grew past {limit} bytes while read")));
        }
    }
    Ok(bytes)
}

/// Options that create a new file only its owner can read and write (0600).
pub fn private_file() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.mode(0o600);
    o
}

/// Listens on a new Unix socket at `path` that only this process's user (and root) may connect
/// to: the socket is made owner-only before it is bound, so its file is never there with wider
/// permissions (no window between bind and a chmod; one path walk fewer). The umask applies on
/// top, as to any file the process makes. Non-blocking.
pub fn listen_private(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::fd::AsRawFd;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.nonblocking(), None)?;
    // SAFETY: fchmod on a socket fd this function owns; no memory is passed.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(128)?;
    Ok(std::os::fd::OwnedFd::from(socket).into())
}

/// A thread started ahead of its work: it prepares itself at once (confines itself, say), then
/// waits for the one value its work needs. Starting work on it is then a wakeup, not a thread
/// creation, whose stack and guard-page mappings cost a pass over every MMU notifier of the
/// process (each VM's). Dropped unstarted, the thread ends.
pub struct Parked<T> {
    /// Until started: the channel its work comes through, whether its preparation failed (it
    /// ends then), and the thread.
    inner: Option<(std::sync::mpsc::SyncSender<T>, std::sync::Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl<T: Send + 'static> Parked<T> {
    /// Starts thread `name`: it runs `prepare` and, if that succeeds, waits to `run` what
    /// [`Parked::start`] hands it. Work handed over while it was still preparing, when that then
    /// fails, goes to `refused` instead (never to `run`): its owner learns that it will not run.
    pub fn spawn(
        name: String,
        prepare: impl FnOnce() -> bool + Send + 'static,
        run: impl FnOnce(T) + Send + 'static,
        refused: impl FnOnce(T) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<T>(1);
        let failed = std::sync::Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            if !prepare() {
                f.store(true, Ordering::Release);
                if let Ok(work) = rx.try_recv() {
                    tracing::error!("a thread made ahead could not prepare itself after its work was handed over");
                    refused(work);
                }
                return;
            }
            // Nothing sent: never started; the thread ends.
            if let Ok(work) = rx.recv() {
                run(work);
            }
        })?;
        Ok(Self { inner: Some((tx, failed, handle)) })
    }

    /// Hands the thread its work (without waiting for it to wake, or to finish preparing) and
    /// returns the running thread; the work back when its preparation has failed. (A thread
    /// still preparing when handed its work and failing then gives it to its `refused`.)
    pub fn start(mut self, work: T) -> Result<std::thread::JoinHandle<()>, T> {
        let Some((tx, failed, handle)) = self.inner.take() else { return Err(work) };
        if failed.load(Ordering::Acquire) {
            self.inner = Some((tx, failed, handle));
            return Err(work);
        }
        match tx.send(work) {
            Ok(()) => Ok(handle),
            Err(std::sync::mpsc::SendError(back)) => {
                let _ = handle.join();
                Err(back)
            }
        }
    }
}

impl<T> Parked<T> {
    /// Whether its preparation is known to have failed.
    #[cfg(test)]
    pub(crate) fn failed(&self) -> bool {
        self.inner.as_ref().is_none_or(|(_, failed, _)| failed.load(Ordering::Acquire))
    }
}

impl<T> Drop for Parked<T> {
    fn drop(&mut self) {
        if let Some((tx, _, handle)) = self.inner.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Drops what it is handed on a thread of its own, in the order handed: destroying a VM joins its
/// threads and closes its KVM VM, which waits for RCU grace periods (milliseconds when many VMs
/// end), and must not hold up a caller that serves requests. One thread, started once (a thread
/// started per drop costs passes over every MMU notifier of a process that holds VMs); what is
/// handed over when it could not start is dropped in place. Dropping the reaper waits until it
/// has dropped everything.
pub struct Reaper<T: Send + 'static> {
    inner: Option<(std::sync::mpsc::Sender<T>, std::thread::JoinHandle<()>)>,
}

impl<T: Send + 'static> Reaper<T> {
    /// Starts thread `name` (confined as the calling thread is: it inherits its seccomp filter).
    pub fn start(name: &str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<T>();
        match std::thread::Builder::new().name(name.into()).spawn(move || rx.into_iter().for_each(drop)) {
            Ok(handle) => Self { inner: Some((tx, handle)) },
            Err(e) => {
                tracing::warn!("cannot start the {name} thread ({e}): what it would drop is dropped in place");
                Self { inner: None }
            }
        }
    }

    /// Hands `value` over to be dropped (here, when the thread is gone).
    pub fn reap(&self, value: T) {
        match &self.inner {
            Some((tx, _)) => {
                if let Err(std::sync::mpsc::SendError(v)) = tx.send(value) {
                    drop(v);
                }
            }
            None => drop(value),
        }
    }
}

impl<T: Send + 'static> Drop for Reaper<T> {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.inner.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Raises the soft open-file limit to the hard one: many VMs hold a few thousand fds.
pub fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A small deterministic generator (xorshift64*) for the tests that feed decoders and devices
/// random and mutated input: the same seed gives the same run, so a failure can be replayed.
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub(crate) fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// `v` with a few bytes flipped, inserted, removed or set to an edge value.
    pub(crate) fn mutate(&mut self, v: &[u8]) -> Vec<u8> {
        let mut m = v.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(m.len());
            match self.below(5) {
                0 if !m.is_empty() => m[at] ^= 1 << self.below(8),
                1 if !m.is_empty() => m[at] = [0, 0xff, 0x7f, 0x80][self.below(4)],
                2 => m.insert(at.min(m.len()), self.next() as u8),
                3 if !m.is_empty() => drop(m.remove(at)),
                _ => m.truncate(at),
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaper_drops_on_its_thread_in_order_and_waits_for_them_when_dropped() {
        struct Noted(u32, std::sync::Arc<Mutex<Vec<(u32, String)>>>);
        impl Drop for Noted {
            fn drop(&mut self) {
                let name = std::thread::current().name().unwrap_or_default().to_string();
                self.1.locked().push((self.0, name));
            }
        }
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let reaper = Reaper::start("test-reaper");
        for i in 0..3 {
            reaper.reap(Noted(i, seen.clone()));
        }
        drop(reaper);
        let seen = seen.locked().clone();
        let want: Vec<(u32, String)> = (0..3).map(|i| (i, "test-reaper".to_string())).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_parked_thread_runs_what_it_is_handed_or_ends_unstarted() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t =
            Parked::spawn("parked".into(), || true, move |n: u32| tx.send(n * 2).unwrap(), |_| unreachable!()).unwrap();
        t.start(21).unwrap().join().unwrap();
        assert_eq!(rx.recv().unwrap(), 42);
        // Dropped unstarted: the thread ends (drop joins it) and its work never runs.
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        drop(Parked::spawn("parked".into(), || true, move |n: u32| tx.send(n).unwrap(), |_| unreachable!()).unwrap());
        assert!(rx.recv().is_err());
        // A thread whose preparation failed is gone: the work comes back.
        let t = Parked::spawn("parked".into(), || false, |_: u32| unreachable!(), |_| unreachable!()).unwrap();
        while !t.failed() {
            std::thread::yield_now();
        }
        assert_eq!(t.start(7).unwrap_err(), 7);
        // Handed its work while preparing, then failing: the work is refused, not run.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let prepare = move || wait.recv().is_ok();
        let (tx, refused) = std::sync::mpsc::channel::<u32>();
        let t = Parked::spawn("parked".into(), prepare, |_: u32| unreachable!(), move |n| tx.send(n).unwrap()).unwrap();
        let handle = t.start(8).unwrap();
        drop(go);
        assert!(handle.join().is_ok(), "the work ran on a thread that failed to prepare");
        assert_eq!(refused.try_recv(), Ok(8));
    }

    #[test]
    fn random_bytes_differ() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        getrandom(&mut a).unwrap();
        getrandom(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }

    #[test]
    fn a_rate_limit_passes_a_few_lines_a_second_and_counts_the_rest() {
        let limit = RateLimit::new();
        let passed: Vec<u64> = (0..1000).filter_map(|_| limit.check(10)).collect();
        // All 1000 within one or two one-second windows: at most 20 pass.
        assert!((10..=20).contains(&passed.len()), "{} passed", passed.len());
        std::thread::sleep(Duration::from_millis(1100));
        let dropped = limit.check(10).expect("a new window lets a line through");
        // Every dropped line is reported once, by the next line that passes (however the 1000
        // calls fell into windows).
        let reported: u64 = passed.iter().sum::<u64>() + dropped;
        assert_eq!(reported, 1000 - passed.len() as u64, "dropped lines reported: {passed:?} then {dropped}");
    }

    #[test]
    fn private_dirs_and_files_are_their_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        private_dir(&d).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&d), mode(&t.path().join("a"))), (0o700, 0o700));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700, "an existing directory is made private");
        let f = d.join("f");
        private_file().write(true).create_new(true).open(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn a_file_lock_held_elsewhere_times_out() {
        let f = tempfile::tempfile().unwrap();
        flock_exclusive(&f, Duration::ZERO).unwrap();
        // flock locks belong to the open file description: a second open of it contends.
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let other = File::open(path).unwrap();
        let e = flock_exclusive(&other, Duration::from_millis(20)).err().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        funlock(&f);
        assert!(flock_exclusive(&other, Duration::from_millis(20)).is_ok());
    }

    #[test]
    fn futex_wait_times_out_and_returns_on_a_changed_word() {
        let w = AtomicU32::new(1);
        let t = std::time::Instant::now();
        futex_wait(&w, 1, Some(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(15));
        // The word no longer holds the expected value: no wait at all.
        futex_wait(&w, 2, None);
        futex_wake(&w);
    }
}
