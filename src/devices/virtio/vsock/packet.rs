//! Packets from the guest's TX queue, parsed by rust-vmm's virtio-vsock: every field is checked
//! before use and a malformed chain is returned to the guest unused. Public for the fuzz target.

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;

use super::MAX_PKT_DATA;
use crate::memory::GuestMemory;

/// A packet from the guest, copied out of its descriptors.
#[derive(Debug)]
pub struct Packet {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub data: Vec<u8>,
}

/// Takes the next chain the guest has made available on the TX queue `q`, if there is one, and
/// returns it to the guest as used: `Some(Some(packet))` for a well-formed chain (its payload
/// copied out, at most MAX_PKT_DATA bytes), `Some(None)` for a malformed one (dropped), `None`
/// when the queue is empty. One chain per call: the caller bounds the work per wakeup.
pub fn take_tx_packet(mem: &GuestMemory, q: &mut Queue) -> Option<Option<Packet>> {
    let mut chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let packet = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
        Ok(pkt) => {
            // virtio-vsock has checked `len` against MAX_PKT_DATA.
            let mut data = vec![0u8; pkt.len() as usize];
            match pkt.data_slice() {
                Some(s) => {
                    let n = data.len().min(s.len());
                    if s.read_slice(&mut data[..n], 0).is_err() {
                        data.clear();
                    }
                    data.truncate(n);
                }
                None => data.clear(),
            }
            Some(Packet {
                src_cid: pkt.src_cid(),
                dst_cid: pkt.dst_cid(),
                src_port: pkt.src_port(),
                dst_port: pkt.dst_port(),
                type_: pkt.type_(),
                op: pkt.op(),
                flags: pkt.flags(),
                buf_alloc: pkt.buf_alloc(),
                fwd_cnt: pkt.fwd_cnt(),
                data,
            })
        }
        Err(e) => {
            tracing::debug!("vsock: malformed TX descriptor chain dropped: {e}");
            None
        }
    };
    if q.add_used(mem, head, 0).is_err() {
        tracing::debug!("vsock: cannot return a TX chain");
    }
    Some(packet)
}

/// Takes at most `budget` chains from the TX queue `q` (see [`take_tx_packet`]); the well-formed
/// ones as packets.
pub fn take_tx_packets(mem: &GuestMemory, q: &mut Queue, budget: usize) -> Vec<Packet> {
    std::iter::from_fn(|| take_tx_packet(mem, q)).take(budget).flatten().collect()
}

/// Runs [`take_tx_packets`] on a 64 KiB guest memory that starts with `image`: a 16-entry TX queue
/// whose descriptor table is at 0, available ring at 0x1000 and used ring at 0x2000, and whatever
/// the image holds beyond. The fuzz target's entry point, and the unit tests'.
pub fn parse_tx_image(image: &[u8]) -> Vec<Packet> {
    let Some((mem, mut q)) = crate::devices::virtio::ring::queue_on(image) else { return Vec::new() };
    take_tx_packets(&mem, &mut q, 64)
}

#[cfg(test)]
mod tests {
    use super::super::{GUEST_CID, HOST_CID, OP_RW, TYPE_STREAM};
    use super::*;
    use crate::devices::virtio::ring::image;
    use virtio_vsock::packet::PKT_HEADER_SIZE;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A packet header at `at` in `m`: guest 3:1234 -> host 2:52, RW, `len` bytes.
    fn header(m: &mut [u8], at: usize, len: u32) {
        let h = &mut m[at..at + PKT_HEADER_SIZE];
        h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        h[16..20].copy_from_slice(&1234u32.to_le_bytes());
        h[20..24].copy_from_slice(&52u32.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        h[30..32].copy_from_slice(&OP_RW.to_le_bytes());
    }

    #[test]
    fn random_rings_and_headers_are_parsed_within_bounds() {
        let mut good = image(&[(0x4000, 44, NEXT, 1), (0x5000, 5, 0, 0)], &[0], 1);
        header(&mut good, 0x4000, 5);
        let mut rng = crate::sys::TestRng::new(3);
        for _ in 0..3_000 {
            let mut m = good.clone();
            // Scribble on the descriptor table, the available ring and the packet header.
            for _ in 0..1 + rng.below(12) {
                let at = match rng.below(3) {
                    0 => rng.below(64),
                    1 => 0x1000 + rng.below(16),
                    _ => 0x4000 + rng.below(44),
                };
                m[at] = rng.next() as u8;
            }
            let p = parse_tx_image(&m);
            assert!(p.len() <= 64, "more packets than the budget");
            assert!(p.iter().all(|p| p.data.len() <= MAX_PKT_DATA as usize));
        }
    }

    #[test]
    fn a_well_formed_packet_is_read() {
        let mut m = image(&[(0x4000, 44, NEXT, 1), (0x5000, 5, 0, 0)], &[0], 1);
        header(&mut m, 0x4000, 5);
        m[0x5000..0x5005].copy_from_slice(b"hello");
        let p = parse_tx_image(&m);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].src_port, p[0].dst_port, p[0].op, p[0].data.as_slice()), (1234, 52, OP_RW, &b"hello"[..]));
    }

    #[test]
    fn malformed_chains_are_dropped_without_a_panic_or_a_hang() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("header outside guest memory", image(&[(0xffff_ff00, 44, 0, 0)], &[0], 1)),
            ("data outside guest memory", {
                let mut m = image(&[(0x4000, 44, NEXT, 1), (0x7fff_0000, 4096, 0, 0)], &[0], 1);
                header(&mut m, 0x4000, 4096);
                m
            }),
            ("header too short", image(&[(0x4000, 8, 0, 0)], &[0], 1)),
            ("write-only header", image(&[(0x4000, 44, WRITE, 0)], &[0], 1)),
            ("length over the limit", {
                let mut m = image(&[(0x4000, 44, NEXT, 1), (0x5000, 16, 0, 0)], &[0], 1);
                header(&mut m, 0x4000, u32::MAX);
                m
            }),
            ("a descriptor loop", image(&[(0x4000, 44, NEXT, 1), (0x5000, 16, NEXT, 0)], &[0], 1)),
            ("next out of the table", image(&[(0x4000, 44, NEXT, 200)], &[0], 1)),
            ("head out of the table", image(&[], &[300], 1)),
            ("available index far ahead", image(&[(0x4000, 44, 0, 0)], &[0], 40_000)),
        ];
        for (what, m) in cases {
            let p = parse_tx_image(&m);
            assert!(p.iter().all(|p| p.data.len() <= MAX_PKT_DATA as usize), "{what}");
            assert!(p.iter().all(|p| p.data.is_empty()), "{what}: {p:?}");
        }
    }
}
