//! Frames between descriptor chains and host buffers, every descriptor checked: a transmit chain
//! is gathered from device-readable descriptors, a received frame is scattered over
//! device-writable ones. Shared with the unit tests (and any fuzz target) through plain
//! `(address, length, device-writable)` lists.

use vm_memory::{Bytes, GuestAddress};

use super::tap::{Tap, VNET_HDR_LEN};
use crate::memory::GuestMemory;

/// The largest frame, virtio-net header included: a 64 KiB TSO packet with its Ethernet header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535;

/// Why a chain was not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a device-writable descriptor in a transmit chain")]
    Writable,
    #[error("a device-readable descriptor in a receive chain")]
    Readable,
    #[error("longer than {MAX_FRAME} bytes")]
    TooLong,
    #[error("shorter than the virtio-net header")]
    TooShort,
    #[error("a descriptor outside guest memory ({0:#x}, {1} bytes)")]
    OutsideMemory(u64, u32),
    #[error("the receive buffers hold {0} bytes, the frame {1}")]
    NoRoom(usize, usize),
    #[error("the header asks for an offload that was not negotiated (flags {0:#x}, GSO type {1:#x})")]
    Offload(u8, u8),
}

/// Gathers a transmit chain's bytes (header and frame) into `out`.
pub fn gather(mem: &GuestMemory, descs: &[(GuestAddress, u32, bool)], out: &mut Vec<u8>) -> Result<(), FrameError> {
    out.clear();
    for &(addr, len, writable) in descs {
        if writable {
            return Err(FrameError::Writable);
        }
        let len = len as usize;
        if out.len() + len > MAX_FRAME {
            return Err(FrameError::TooLong);
        }
        let at = out.len();
        out.resize(at + len, 0);
        mem.read_slice(&mut out[at..], addr).map_err(|_| FrameError::OutsideMemory(addr.0, len as u32))?;
    }
    if out.len() < VNET_HDR_LEN {
        return Err(FrameError::TooShort);
    }
    Ok(())
}

/// `struct virtio_net_hdr`'s flag and GSO type values a transmitted frame may carry.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;

/// Checks a transmitted frame's `virtio_net_hdr` against what the driver negotiated (`csum`:
/// VIRTIO_NET_F_CSUM, `tso4`: VIRTIO_NET_F_HOST_TSO4): the TAP acts on the header, so a guest
/// must not get from it an offload (or a kind of one) that was never agreed.
pub fn check_tx_header(frame: &[u8], csum: bool, tso4: bool) -> Result<(), FrameError> {
    let (flags, gso) = match frame {
        [flags, gso, ..] => (*flags, *gso),
        _ => return Err(FrameError::TooShort),
    };
    let ok = match (flags, gso) {
        (0, GSO_NONE) => true,
        (HDR_F_NEEDS_CSUM, GSO_NONE) => csum,
        (HDR_F_NEEDS_CSUM, GSO_TCPV4) => csum && tso4,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(FrameError::Offload(flags, gso))
    }
}

/// Writes `frame` (header included) over a receive chain's buffers: the bytes written.
pub fn scatter(mem: &GuestMemory, descs: &[(GuestAddress, u32, bool)], frame: &[u8]) -> Result<u32, FrameError> {
    let room: usize = descs.iter().map(|d| d.1 as usize).sum();
    if descs.iter().any(|d| !d.2) {
        return Err(FrameError::Readable);
    }
    if room < frame.len() {
        return Err(FrameError::NoRoom(room, frame.len()));
    }
    let mut rest = frame;
    for &(addr, len, _) in descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(len as usize);
        mem.write_slice(&rest[..n], addr).map_err(|_| FrameError::OutsideMemory(addr.0, len))?;
        rest = &rest[n..];
    }
    Ok(frame.len() as u32)
}

/// The one received frame the device holds while it looks for a receive buffer.
#[derive(Default)]
pub struct RxBuffer {
    buf: Vec<u8>,
    len: usize,
}

impl RxBuffer {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn frame(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Reads the TAP's next frame; false when it has none. The header's `num_buffers` is set to 1
    /// (one chain per frame: mergeable receive buffers are not offered).
    pub fn fill(&mut self, tap: &Tap) -> std::io::Result<bool> {
        if self.buf.is_empty() {
            self.buf = vec![0; MAX_FRAME];
        }
        // A frame shorter than the header (the TAP never makes one) is skipped.
        for _ in 0..super::FRAME_BUDGET {
            match tap.read_frame(&mut self.buf)? {
                Some(n) if n >= VNET_HDR_LEN => {
                    self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                    self.len = n;
                    return Ok(true);
                }
                Some(_) => continue,
                None => return Ok(false),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn a_transmit_chain_is_gathered_and_checked() {
        let m = mem();
        m.write_slice(&[1u8; 12], GuestAddress(0x100)).unwrap();
        m.write_slice(&[2u8; 60], GuestAddress(0x800)).unwrap();
        let mut out = Vec::new();
        gather(&m, &[(GuestAddress(0x100), 12, false), (GuestAddress(0x800), 60, false)], &mut out).unwrap();
        assert_eq!(out.len(), 72);
        assert_eq!((out[0], out[71]), (1, 2));
        let bad = |d: &[(GuestAddress, u32, bool)]| gather(&m, d, &mut Vec::new()).unwrap_err();
        assert_eq!(bad(&[(GuestAddress(0x100), 12, true)]), FrameError::Writable);
        assert_eq!(bad(&[(GuestAddress(0x100), 8, false)]), FrameError::TooShort);
        assert_eq!(bad(&[(GuestAddress(0xfff0), 0x20, false)]), FrameError::OutsideMemory(0xfff0, 0x20));
        let huge: Vec<_> = (0..20).map(|_| (GuestAddress(0), 0x1000u32, false)).collect();
        assert_eq!(bad(&huge), FrameError::TooLong);
        assert_eq!(bad(&[]), FrameError::TooShort);
    }

    #[test]
    fn a_transmitted_header_gets_only_the_offloads_negotiated() {
        let hdr = |flags: u8, gso: u8| [flags, gso, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(check_tx_header(&hdr(0, 0), false, false), Ok(()));
        assert_eq!(check_tx_header(&hdr(1, 0), true, false), Ok(()));
        assert_eq!(check_tx_header(&hdr(1, 1), true, true), Ok(()));
        for (flags, gso, csum, tso4) in [
            (1, 0, false, false),  // checksum offload not taken
            (1, 1, true, false),   // TSO not taken
            (0, 1, true, true),    // TSO without a checksum to complete
            (1, 3, true, true),    // UDP fragmentation, never offered
            (1, 4, true, true),    // TCPv6, never offered
            (1, 0x81, true, true), // ECN
            (2, 0, true, true),    // DATA_VALID is a receive flag
        ] {
            assert_eq!(check_tx_header(&hdr(flags, gso), csum, tso4), Err(FrameError::Offload(flags, gso)));
        }
    }

    #[test]
    fn a_received_frame_is_scattered_over_the_buffers() {
        let m = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        let descs = [(GuestAddress(0x1000), 40, true), (GuestAddress(0x3000), 100, true)];
        assert_eq!(scatter(&m, &descs, &frame), Ok(100));
        let mut back = [0u8; 60];
        m.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back[0], 40);
        assert_eq!(back[59], 99);
        assert_eq!(scatter(&m, &descs[..1], &frame), Err(FrameError::NoRoom(40, 100)));
        assert_eq!(scatter(&m, &[(GuestAddress(0x1000), 200, false)], &frame), Err(FrameError::Readable));
        assert_eq!(
            scatter(&m, &[(GuestAddress(0xffc0), 200, true)], &frame),
            Err(FrameError::OutsideMemory(0xffc0, 200))
        );
    }
}
