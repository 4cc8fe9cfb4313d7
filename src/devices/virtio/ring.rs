//! One 16-entry queue on a 64 KiB guest memory whose bytes come from an image: descriptor table at
//! 0, available ring at [`AVAIL`], used ring at [`USED`], buffers anywhere beyond. What the fuzz
//! targets and unit tests drive each device's queue path with (vsock's TX chains, virtio-blk's
//! requests).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// The guest memory's size.
pub const MEMORY: usize = 0x1_0000;
pub const AVAIL: usize = 0x1000;
pub const USED: usize = 0x2000;
const SIZE: u16 = 16;
/// The fuzz input's compact layout: this much descriptor table, then this much available ring.
const FUZZ_TABLE: usize = 16 * 16;
const FUZZ_AVAIL: usize = 4 + 2 * SIZE as usize;

/// The guest memory holding `image` (at most [`MEMORY`] bytes of it) and a ready queue over it.
pub fn queue_on(image: &[u8]) -> Option<(GuestMemory, Queue)> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY)]).ok()?;
    let n = image.len().min(MEMORY);
    mem.write_slice(&image[..n], GuestAddress(0)).ok()?;
    let mut q = Queue::new(SIZE).ok()?;
    q.set_size(SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    Some((mem, q))
}

/// Lays a fuzz input out as an image: its first 256 bytes as the descriptor table, the next 36 as
/// the available ring, the rest from `buffers_at`.
pub fn fuzz_image(data: &[u8], buffers_at: usize) -> Vec<u8> {
    let mut image = vec![0u8; MEMORY];
    let (table, rest) = data.split_at(data.len().min(FUZZ_TABLE));
    let (avail, buffers) = rest.split_at(rest.len().min(FUZZ_AVAIL));
    image[..table.len()].copy_from_slice(table);
    image[AVAIL..AVAIL + avail.len()].copy_from_slice(avail);
    let n = buffers.len().min(MEMORY - buffers_at);
    image[buffers_at..buffers_at + n].copy_from_slice(&buffers[..n]);
    image
}

/// An image with descriptors `(addr, len, flags, next)`, the `heads` made available and the
/// available ring's index at `avail_idx`.
#[cfg(test)]
pub fn image(descs: &[(u64, u32, u16, u16)], heads: &[u16], avail_idx: u16) -> Vec<u8> {
    let mut m = vec![0u8; MEMORY];
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = &mut m[i * 16..i * 16 + 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
    }
    m[AVAIL + 2..AVAIL + 4].copy_from_slice(&avail_idx.to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        m[AVAIL + 4 + 2 * i..AVAIL + 6 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    m
}
