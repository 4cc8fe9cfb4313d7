//! AF_VSOCK sockets in the guest: the calls the listener (`vsock.rs`) and the guest-initiated
//! `vsock-ping` built-in share.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

pub fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

pub const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// The `vsock-ping` built-in: connects to the host (CID 2) on the port named in `payload`, sends
/// `ping\n` and returns what the host answers before closing (at most 4 KiB): a check of
/// guest-initiated connections.
pub fn ping_host(payload: &[u8]) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let port: u32 = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| io::Error::other("vsock-ping takes a port number"))?;
    let sock = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_HOST, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) } != 0 {
        return Err(io::Error::other(format!("connect to host port {port}: {}", io::Error::last_os_error())));
    }
    let mut conn = std::fs::File::from(sock);
    conn.write_all(b"ping\n")?;
    let mut answer = Vec::new();
    conn.take(4096).read_to_end(&mut answer)?;
    Ok(answer)
}
