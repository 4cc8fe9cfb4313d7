//! A TAP device: the host end of a guest's network card. Opened with `IFF_VNET_HDR`, so every
//! frame read or written carries the 12-byte virtio-net header in front (checksum and
//! segmentation offload travel with it), non-blocking, close-on-exec.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The virtio-net header of virtio 1.x (`struct virtio_net_hdr_v1`, num_buffers included).
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
pub use crate::seccomp::tun::{TAP_CHECK_IOCTLS, TUNSETOFFLOAD, TUN_F_CSUM, TUN_F_TSO4, TUN_IOCTLS};
use crate::seccomp::tun::{TUNGETIFF, TUNSETIFF, TUNSETVNETHDRSZ};

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) || bytes.contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?} (1 to {} bytes)", IFNAMSIZ - 1),
            ));
        }
        let mut r = Self { name: [0; IFNAMSIZ], flags, _pad: [0; 22] };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Opens (or creates, with CAP_NET_ADMIN) the TAP device `name` in the calling thread's
    /// network namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TAP device {name:?}: {e}")));
        }
        Self::from_fd(file.into())
    }

    /// Takes an open TAP descriptor (handed over by another process): checked to be a TAP with the
    /// virtio-net header, its header size set.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the descriptor is not a TAP device"));
        }
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the TAP device must be opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR",
            ));
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Non-blocking whatever the sender chose: the device thread must never block on it.
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    /// Any descriptor, unchecked, standing in for a TAP: for unit tests of a device that is never
    /// activated (its thread never touches the descriptor).
    #[cfg(test)]
    pub(crate) fn unchecked(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// The interface's name.
    pub fn name(&self) -> io::Result<String> {
        let mut req = IfReq { name: [0; IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        Ok(String::from_utf8_lossy(&req.name[..n]).into_owned())
    }

    /// Sets which offloads the guest accepts on frames it receives (TUN_F_*).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Another descriptor of the same TAP queue.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()? })
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Reads one frame (header included) into `buf`: its length, or `None` when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (header included); false when the TAP could not take it now.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: write reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

pub use crate::config::{format_mac, parse_mac};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(parse_mac("02:ee:00:00:00:01"), Some([2, 0xee, 0, 0, 0, 1]));
        assert_eq!(format_mac(&[2, 0xee, 0, 0, 0, 1]), "02:ee:00:00:00:01");
        for bad in ["", "02:ee:00:00:00", "02:ee:00:00:00:01:02", "2:ee:00:00:00:01", "zz:ee:00:00:00:01"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for bad in ["", "a-name-that-is-too-long", "a/b"] {
            assert!(Tap::open(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = tempfile::tempfile().unwrap();
        let e = Tap::from_fd(f.into()).unwrap_err();
        assert!(e.to_string().contains("not a TAP"), "{e}");
    }
}
