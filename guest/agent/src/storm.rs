//! `storm`: a guest that misbehaves on purpose, for the tests that check a hostile guest costs
//! only itself. Any guest could do this; the built-in only makes it repeatable.
//!
//! - `doorbell MS`: for MS milliseconds, rings the control page's response doorbell, writes to
//!   addresses no device claims, and notifies vsock's TX queue and a queue that does not exist,
//!   as fast as the vCPU goes.
//! - `vsock N`: opens N connections to host ports nobody serves, without waiting for any of them
//!   (the host answers each with a reset).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ember_abi::control::{CONTROL_ADDR, RESPONSE_DOORBELL};

use crate::devmem::PhysPage;

/// The longest storm, in milliseconds.
const MAX_MS: u64 = 60_000;
/// The most connections one `vsock` storm opens.
const MAX_CONNECTIONS: u32 = 100_000;
/// ember's first virtio-mmio device (vsock) and its QueueNotify register.
const VIRTIO_MMIO_BASE: libc::off_t = 0xd000_2000;
const QUEUE_NOTIFY: usize = 0x50;
/// A page of the MMIO gap no device claims.
const UNCLAIMED: libc::off_t = 0xd00f_0000;

/// Runs a storm; what it did, for the caller.
pub fn run(payload: &[u8]) -> io::Result<String> {
    let text = std::str::from_utf8(payload).map_err(|_| io::Error::other("storm takes text"))?;
    let mut words = text.split_whitespace();
    let (kind, n) = (words.next(), words.next().and_then(|w| w.parse::<u64>().ok()));
    match (kind, n) {
        (Some("doorbell"), Some(ms)) if ms <= MAX_MS => doorbells(Duration::from_millis(ms)),
        (Some("vsock"), Some(n)) if n <= u64::from(MAX_CONNECTIONS) => connections(n as u32),
        _ => Err(io::Error::other(format!(
            "storm takes `doorbell MS` (MS <= {MAX_MS}) or `vsock N` (N <= {MAX_CONNECTIONS})"
        ))),
    }
}

fn doorbells(how_long: Duration) -> io::Result<String> {
    let control = PhysPage::map(CONTROL_ADDR as libc::off_t)?;
    let virtio = PhysPage::map(VIRTIO_MMIO_BASE)?;
    let nothing = PhysPage::map(UNCLAIMED)?;
    let start = Instant::now();
    let mut rings = 0u64;
    while start.elapsed() < how_long {
        for _ in 0..64 {
            control.write(RESPONSE_DOORBELL as usize, 1u32);
            control.write(0x800, 0xdead_beef_u32);
            nothing.write(0, 0xdead_beef_u32);
            virtio.write(QUEUE_NOTIFY, 1u32);
            virtio.write(QUEUE_NOTIFY, 7u32);
            rings += 5;
        }
    }
    Ok(format!("{rings} doorbell and notify writes in {} ms", start.elapsed().as_millis()))
}

fn connections(n: u32) -> io::Result<String> {
    let mut refused = 0;
    for i in 0..n {
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_HOST;
        addr.svm_port = 40_000 + i % 1000;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        if unsafe { libc::connect(sock.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) } != 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS)
        {
            refused += 1;
        }
    }
    Ok(format!("{n} connections attempted ({refused} failed at once)"))
}
