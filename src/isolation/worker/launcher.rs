//! The daemon's launcher: the one thread of `ember serve` that may start processes (workers), and
//! the one that reaps them. It is started before the daemon confines itself and has a filter of
//! its own (which its workers inherit, then narrow); it starts a worker with a bare `clone` that
//! creates the worker's namespaces and runs ember's own binary (opened once at start, so a binary
//! replaced on disk never mixes versions) as `ember worker`.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sys::Locked;

/// The namespaces a jailed worker starts in.
pub const JAIL_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;

pub use super::protocol::WORKER_FD;

enum Job {
    Start {
        /// Raw descriptor of the worker's end of its socket (kept open by the caller until
        /// answered).
        socket: RawFd,
        namespaces: libc::c_int,
        reply: Sender<std::io::Result<i32>>,
    },
    /// Mount a tmpfs on `dir` with the mount options `data`.
    Mount {
        dir: CString,
        data: CString,
        reply: Sender<std::io::Result<()>>,
    },
    Unmount {
        dir: CString,
        reply: Sender<std::io::Result<()>>,
    },
}

fn path_c(p: &std::path::Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
}

/// `mount -t tmpfs -o nosuid,nodev,noexec,DATA tmpfs DIR`.
fn mount_tmpfs(dir: &CString, data: &CString) -> std::io::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    let r = unsafe { libc::mount(c"tmpfs".as_ptr(), dir.as_ptr(), c"tmpfs".as_ptr(), flags, data.as_ptr().cast()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detaches whatever is mounted on `dir`.
pub(super) fn unmount(dir: &CString) -> std::io::Result<()> {
    // SAFETY: `dir` is a NUL-terminated string alive for the call.
    if unsafe { libc::umount2(dir.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Default)]
struct Exits {
    /// How each reaped worker ended, by pid (kept until asked for).
    ended: Mutex<HashMap<i32, String>>,
    changed: Condvar,
}

pub struct Launcher {
    jobs: Mutex<Sender<Job>>,
    exits: Arc<Exits>,
}

fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let name = match sig {
            libc::SIGKILL => "SIGKILL".to_string(),
            libc::SIGSEGV => "SIGSEGV".to_string(),
            libc::SIGABRT => "SIGABRT".to_string(),
            libc::SIGSYS => "SIGSYS".to_string(),
            libc::SIGTERM => "SIGTERM".to_string(),
            n => format!("signal {n}"),
        };
        format!("killed by {name}")
    } else {
        format!("ended (status {status:#x})")
    }
}

impl Launcher {
    /// Starts the launcher thread, confined with `filter`.
    pub fn spawn(filter: Option<seccompiler::BpfProgram>) -> std::io::Result<Self> {
        let opened: OwnedFd = std::fs::File::open("/proc/self/exe")?.into();
        // Above the descriptor a worker's socket is moved to, so that moving it never replaces
        // the binary about to be run.
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; a non-negative result is a new one.
        let fd = unsafe { libc::fcntl(opened.as_raw_fd(), libc::F_DUPFD_CLOEXEC, WORKER_FD + 1) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let exe = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        drop(opened);
        let (tx, rx) = channel::<Job>();
        let exits = Arc::new(Exits::default());
        let ex = exits.clone();
        // Everything exec needs, built before any clone: after it, the child only calls
        // async-signal-safe functions.
        let argv0 = CString::new("ember").map_err(std::io::Error::other)?;
        let argv1 = CString::new("worker").map_err(std::io::Error::other)?;
        let mut env: Vec<CString> = Vec::new();
        let keys = ["RUST_LOG", "RUST_BACKTRACE", "EMBER_LOG", super::LOG_FORMAT_ENV];
        // A test build's workers may be told to act as compromised ones (see `process::hostile`).
        #[cfg(debug_assertions)]
        let keys = [keys[0], keys[1], keys[2], keys[3], super::process::HOSTILE_ENV];
        for key in keys {
            if let Some(v) = std::env::var_os(key) {
                let mut kv = format!("{key}=").into_bytes();
                kv.extend_from_slice(v.as_encoded_bytes());
                env.push(CString::new(kv).map_err(std::io::Error::other)?);
            }
        }
        std::thread::Builder::new().name("launcher".into()).spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = crate::seccomp::apply(&f) {
                    tracing::error!("launcher: cannot apply the seccomp filter: {e}");
                    return;
                }
            }
            let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
            let envp: Vec<*const libc::c_char> =
                env.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
            let mut live: Vec<i32> = Vec::new();
            loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(Job::Start { socket, namespaces, reply }) => {
                        let r = start(exe.as_raw_fd(), &argv, &envp, socket, namespaces);
                        if let Ok(pid) = r {
                            live.push(pid);
                        }
                        let _ = reply.send(r);
                    }
                    Ok(Job::Mount { dir, data, reply }) => {
                        let _ = reply.send(mount_tmpfs(&dir, &data));
                    }
                    Ok(Job::Unmount { dir, reply }) => {
                        let _ = reply.send(unmount(&dir));
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if live.is_empty() => return,
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(20)),
                }
                live.retain(|&pid| {
                    let mut status = 0;
                    // SAFETY: waits for our own child without blocking.
                    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                    if r == pid {
                        ex.ended.locked().insert(pid, describe(status));
                        ex.changed.notify_all();
                        return false;
                    }
                    r == 0
                });
            }
        })?;
        Ok(Self { jobs: Mutex::new(tx), exits })
    }

    /// Starts `ember worker` with `socket` as its descriptor 3, in new `namespaces` (0: none).
    pub fn start(&self, socket: &impl AsRawFd, namespaces: libc::c_int) -> std::io::Result<i32> {
        self.ask(|reply| Job::Start { socket: socket.as_raw_fd(), namespaces, reply })
    }

    /// Mounts a tmpfs of at most `size` bytes and `inodes` files on `dir` (in the daemon's mount
    /// namespace), its root owned by `uid` and 0700: a worker's directory, bounded, off the disk.
    /// (The launcher's thread is the one of the daemon that may mount.)
    pub fn mount_tmpfs(&self, dir: &std::path::Path, size: u64, inodes: u64, uid: u32) -> std::io::Result<()> {
        let data = CString::new(format!("size={size},nr_inodes={inodes},mode=0700,uid={uid},gid={uid}"))
            .map_err(std::io::Error::other)?;
        let dir = path_c(dir)?;
        self.ask(|reply| Job::Mount { dir, data, reply })
    }

    /// Unmounts what [`Launcher::mount_tmpfs`] mounted on `dir`.
    pub fn unmount(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let dir = path_c(dir)?;
        self.ask(|reply| Job::Unmount { dir, reply })
    }

    /// Hands the launcher's thread the job `job` makes with its reply channel, and waits for the
    /// answer.
    fn ask<T>(&self, job: impl FnOnce(Sender<std::io::Result<T>>) -> Job) -> std::io::Result<T> {
        let (reply, answer) = channel();
        let gone = || std::io::Error::other("the launcher thread has stopped");
        self.jobs.locked().send(job(reply)).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// How worker `pid` ended, waiting up to `timeout` for it to be reaped.
    pub fn wait_exit(&self, pid: i32, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut ended = self.exits.ended.locked();
        loop {
            if let Some(s) = ended.remove(&pid) {
                return Some(s);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            ended = self.exits.changed.wait_timeout(ended, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Clones the launcher into a new process (in new namespaces when asked) that runs ember's binary
/// as `ember worker` with the job's socket as descriptor 3.
fn start(
    exe: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    socket: RawFd,
    namespaces: libc::c_int,
) -> std::io::Result<i32> {
    let flags = (namespaces | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a clone without CLONE_VM is a fork: the child has its own copy of this thread's
    // memory and runs only the async-signal-safe calls below (dup2, fcntl, execveat, _exit) on
    // data prepared before the clone; the parent gets the child's pid or -1.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: plain descriptor calls and exec on valid, NUL-terminated arrays.
        unsafe {
            if socket == WORKER_FD {
                libc::fcntl(WORKER_FD, libc::F_SETFD, 0);
            } else {
                libc::dup2(socket, WORKER_FD);
            }
            libc::syscall(libc::SYS_execveat, exe, c"".as_ptr(), argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH);
            libc::_exit(127);
        }
    }
    Ok(pid as i32)
}
