//! What the supervisor and a worker say to each other: one JSON message per packet of a
//! `SOCK_SEQPACKET` pair (so a message is never split or merged, and a closed peer reads as
//! end-of-file), at most [`MAX_MESSAGE`] bytes. Files cross as descriptors, never as paths: the
//! template's memory rides along the setup message once, as a sealed memfd; each clone's
//! mailbox comes back with `Restored`, a template made by a worker with `Made`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 256 << 10;

/// What a worker serves and how it is confined (the first message it reads).
/// The descriptor a worker finds its socket on.
pub const WORKER_FD: std::os::fd::RawFd = 3;

#[derive(Debug, Serialize, Deserialize)]
pub struct Setup {
    pub function: String,
    /// What the worker does: serve clones of a template, or make one.
    pub task: Task,
    /// Where clones' mailboxes and vsock sockets go: the same path inside the jail and outside.
    pub run_dir: String,
    /// None: the worker is not jailed (it still confines itself with seccomp and rlimits).
    pub jail: Option<super::jail::JailSpec>,
    /// Most open files the worker may have.
    pub max_files: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Task {
    /// Restore clones of the template whose state file this is (base64; its memory is the sealed
    /// memfd sent with the setup).
    Serve { state: String },
    /// Boot the function's guest (its kernel and initramfs are the two descriptors sent with the
    /// setup) to ready and make its template (in the worker's own directory); answer `Made` or
    /// `MakeFailed`, then exit.
    Make { vm: Box<crate::config::VmConfig>, timeout_s: f64 },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Setup(Box<Setup>),
    /// Restore clone `id` with its channels in `run_dir` and start it.
    Restore {
        id: u64,
    },
    /// Stop and destroy clone `id`.
    Stop {
        id: u64,
    },
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub enum FromWorker {
    /// Set up, confined, serving.
    Ready,
    SetupFailed {
        error: String,
    },
    Restored {
        id: u64,
    },
    Failed {
        id: u64,
        error: String,
    },
    /// Clone `id` ended on its own (its guest powered off or crashed); the worker has dropped it.
    Exited {
        id: u64,
        why: String,
    },
    /// The template is made (the guest signalled ready after `ready_s`): sent with its state
    /// file's bytes and its memory as a sealed memfd, then its working set's bytes if
    /// `working_set`. The supervisor checks all of it as untrusted input.
    Made {
        ready_s: f64,
        working_set: bool,
    },
    MakeFailed {
        error: String,
    },
}

/// A new connected `SOCK_SEQPACKET` pair, close-on-exec.
pub fn pair() -> std::io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else. A datagram
    // socket's calls (send, recv, sendmsg, recvmsg) are what a seqpacket socket takes.
    Ok(unsafe { (UnixDatagram::from_raw_fd(fds[0]), UnixDatagram::from_raw_fd(fds[1])) })
}

/// Sends `msg`, with `fd` attached if given.
pub fn send<T: Serialize>(sock: &UnixDatagram, msg: &T, fd: Option<RawFd>) -> std::io::Result<()> {
    send_fds(sock, msg, fd.as_slice())
}

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Sends `msg` with `fds` attached (at most [`MAX_FDS`]).
pub fn send_fds<T: Serialize>(sock: &UnixDatagram, msg: &T, fds: &[RawFd]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "message of {} bytes and {} fds is too big",
            bytes.len(),
            fds.len()
        )));
    }
    if fds.is_empty() {
        return sock.send(&bytes).map(|_| ());
    }
    sock.send_with_fds(&[&bytes[..]], fds).map(|_| ()).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What [`recv`] read.
pub enum Received<T> {
    /// A message and the descriptors sent with it.
    Message(T, Vec<OwnedFd>),
    /// The peer closed its end.
    Closed,
    /// Nothing before the socket's receive timeout.
    Nothing,
}

/// Receives one message (and the descriptor sent with it, if any).
pub fn recv<T: for<'de> Deserialize<'de>>(sock: &UnixDatagram) -> std::io::Result<Received<T>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut raw = [-1; MAX_FDS];
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
    // SAFETY: the iovec points at `buf`, which any bytes may be written to, for its length.
    let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
        Ok(r) => r,
        Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => return Ok(Received::Nothing),
        Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
    };
    // SAFETY: the first `nfds` descriptors were just received and are owned by nothing else.
    let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    if n == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|e| std::io::Error::other(format!("bad message: {e}")))?;
    Ok(Received::Message(msg, fds))
}

/// Makes `recv` on `sock` give up after `timeout`.
pub fn set_recv_timeout(sock: &UnixDatagram, timeout: std::time::Duration) -> std::io::Result<()> {
    sock.set_read_timeout(Some(timeout))
}

/// The raw descriptor of a socket end (for handing it to a new process).
pub fn raw(sock: &UnixDatagram) -> RawFd {
    sock.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn messages_and_a_descriptor_cross_and_a_closed_peer_reads_as_closed() {
        let (a, b) = pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        send(&a, &ToWorker::Restore { id: 7 }, Some(f.as_raw_fd())).unwrap();
        match recv::<ToWorker>(&b).unwrap() {
            Received::Message(ToWorker::Restore { id: 7 }, fds) if fds.len() == 1 => {}
            _ => panic!("wrong message"),
        }
        send(&b, &FromWorker::Exited { id: 7, why: "poweroff".into() }, None).unwrap();
        match recv::<FromWorker>(&a).unwrap() {
            Received::Message(m, fds) if fds.is_empty() => {
                assert_eq!(m, FromWorker::Exited { id: 7, why: "poweroff".into() })
            }
            _ => panic!("wrong message"),
        }
        b.send(b"{not json").unwrap();
        assert!(recv::<FromWorker>(&a).is_err());
        set_recv_timeout(&a, std::time::Duration::from_millis(10)).unwrap();
        assert!(matches!(recv::<FromWorker>(&a).unwrap(), Received::Nothing));
        drop(b);
        assert!(matches!(recv::<FromWorker>(&a).unwrap(), Received::Closed));
    }
}
