//! What the supervisor and a worker say to each other: one JSON message per packet of a
//! `SOCK_SEQPACKET` pair (so a message is never split or merged, and a closed peer reads as
//! end-of-file), at most [`MAX_MESSAGE`] bytes; the template's memory rides along the setup
//! message once, as a sealed memfd.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 256 << 10;

/// What a worker serves and how it is confined (the first message it reads).
#[derive(Debug, Serialize, Deserialize)]
pub struct Setup {
    pub function: String,
    /// The template's state file, base64 (its memory is the memfd sent with this message).
    pub state: String,
    /// Where clones' mailboxes and vsock sockets go: the same path inside the jail and outside.
    pub run_dir: String,
    /// None: the worker is not jailed (it still confines itself with seccomp and rlimits).
    pub jail: Option<super::jail::JailSpec>,
    /// Most open files the worker may have.
    pub max_files: u64,
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
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("message of {} bytes is over {MAX_MESSAGE}", bytes.len())));
    }
    match fd {
        Some(fd) => {
            sock.send_with_fd(&bytes[..], fd).map(|_| ()).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        }
        None => sock.send(&bytes).map(|_| ()),
    }
}

/// What [`recv`] read.
pub enum Received<T> {
    Message(T, Option<OwnedFd>),
    /// The peer closed its end.
    Closed,
    /// Nothing before the socket's receive timeout.
    Nothing,
}

/// Receives one message (and the descriptor sent with it, if any).
pub fn recv<T: for<'de> Deserialize<'de>>(sock: &UnixDatagram) -> std::io::Result<Received<T>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, file): (usize, Option<File>) = match sock.recv_with_fd(&mut buf) {
        Ok(r) => r,
        Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => return Ok(Received::Nothing),
        Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
    };
    if n == 0 && file.is_none() {
        return Ok(Received::Closed);
    }
    let msg = serde_json::from_slice(&buf[..n]).map_err(|e| std::io::Error::other(format!("bad message: {e}")))?;
    Ok(Received::Message(msg, file.map(OwnedFd::from)))
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

    #[test]
    fn messages_and_a_descriptor_cross_and_a_closed_peer_reads_as_closed() {
        let (a, b) = pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        send(&a, &ToWorker::Restore { id: 7 }, Some(f.as_raw_fd())).unwrap();
        match recv::<ToWorker>(&b).unwrap() {
            Received::Message(ToWorker::Restore { id: 7 }, Some(_)) => {}
            _ => panic!("wrong message"),
        }
        send(&b, &FromWorker::Exited { id: 7, why: "poweroff".into() }, None).unwrap();
        match recv::<FromWorker>(&a).unwrap() {
            Received::Message(m, None) => assert_eq!(m, FromWorker::Exited { id: 7, why: "poweroff".into() }),
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
