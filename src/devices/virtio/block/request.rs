//! virtio-blk requests: parsed from a descriptor chain (everything in it checked before use) and
//! carried out against the drive's file, straight between the file and guest memory (no host
//! buffer, so a request's size costs the host no memory).
//!
//! A request is a device-readable header (`le32 type, le32 reserved, le64 sector`), the data
//! descriptors (device-writable for reads and get-id, device-readable for writes) and a
//! device-writable status byte in the last descriptor.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::metrics::{self, BlockCounters};
use crate::memory::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
/// Data descriptors per request, at most (advertised to the driver as `seg_max`).
pub const MAX_SEGMENTS: u32 = 128;
/// The largest data descriptor (advertised as `size_max`).
pub const MAX_SEGMENT_SIZE: u32 = 1 << 20;
/// The length of a drive's id (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

const HEADER_LEN: u32 = 16;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

/// A well-formed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// The data descriptors: guest address and length, each checked against guest memory.
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

/// Why a chain is not a request (it is returned to the guest unused).
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    NoHeader,
    HeaderWritable,
    HeaderTooShort(u32),
    HeaderUnreadable,
    NoStatus,
    StatusNotWritable,
    TooManySegments,
    SegmentTooLarge(u32),
    SegmentOutsideMemory(u64, u32),
    WrongDirection,
    NotSectorAligned(u64),
}

/// Parses one chain's descriptors (`descs`: address, length, device-writable) into a request.
pub fn parse(mem: &GuestMemory, descs: &[(GuestAddress, u32, bool)]) -> Result<Request, ParseError> {
    let (&(head, head_len, head_w), rest) = descs.split_first().ok_or(ParseError::NoHeader)?;
    if head_w {
        return Err(ParseError::HeaderWritable);
    }
    if head_len < HEADER_LEN {
        return Err(ParseError::HeaderTooShort(head_len));
    }
    let kind: u32 = mem.read_obj(head).map_err(|_| ParseError::HeaderUnreadable)?;
    let sector_at = head.checked_add(8).ok_or(ParseError::HeaderUnreadable)?;
    let sector: u64 = mem.read_obj(sector_at).map_err(|_| ParseError::HeaderUnreadable)?;
    let kind = match u32::from_le(kind) {
        T_IN => Kind::In,
        T_OUT => Kind::Out,
        T_FLUSH => Kind::Flush,
        T_GET_ID => Kind::GetId,
        other => Kind::Unsupported(other),
    };
    let (&(status, status_len, status_w), data) = rest.split_last().ok_or(ParseError::NoStatus)?;
    if !status_w || status_len < 1 {
        return Err(ParseError::StatusNotWritable);
    }
    if !mem.check_range(status, 1) {
        return Err(ParseError::SegmentOutsideMemory(status.raw_value(), 1));
    }
    if data.len() > MAX_SEGMENTS as usize {
        return Err(ParseError::TooManySegments);
    }
    let mut total = 0u64;
    for &(addr, len, writable) in data {
        if len > MAX_SEGMENT_SIZE {
            return Err(ParseError::SegmentTooLarge(len));
        }
        if !mem.check_range(addr, len as usize) {
            return Err(ParseError::SegmentOutsideMemory(addr.raw_value(), len));
        }
        let expect_writable = match kind {
            Kind::In | Kind::GetId => Some(true),
            Kind::Out => Some(false),
            Kind::Flush | Kind::Unsupported(_) => None,
        };
        if expect_writable.is_some_and(|w| w != writable) {
            return Err(ParseError::WrongDirection);
        }
        total += u64::from(len);
    }
    if matches!(kind, Kind::In | Kind::Out) && total % SECTOR_SIZE != 0 {
        return Err(ParseError::NotSectorAligned(total));
    }
    Ok(Request { kind, sector: u64::from_le(sector), data: data.iter().map(|&(a, l, _)| (a, l)).collect(), status })
}

/// What a request is carried out against.
pub struct Disk<'a> {
    pub file: &'a mut File,
    pub read_only: bool,
    /// The drive's size in sectors.
    pub capacity: u64,
    pub id: &'a [u8; ID_BYTES],
    pub counters: &'a BlockCounters,
}

impl Request {
    /// Carries the request out; returns the status written and the bytes written into guest
    /// memory (the used length, status byte included).
    pub fn execute(&self, mem: &GuestMemory, disk: &mut Disk<'_>) -> (u8, u32) {
        let (status, written) = match self.kind {
            Kind::In | Kind::Out => match self.transfer(mem, disk) {
                Ok(n) => (S_OK, n),
                Err(()) => (S_IOERR, 0),
            },
            Kind::Flush if disk.read_only => (S_OK, 0),
            Kind::Flush => match disk.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            Kind::GetId => match self.data.first() {
                Some(&(addr, len)) => {
                    let n = (len as usize).min(ID_BYTES);
                    match mem.write_slice(&disk.id[..n], addr) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                None => (S_IOERR, 0),
            },
            Kind::Unsupported(_) => (S_UNSUPP, 0),
        };
        if mem.write_obj(status, self.status).is_err() {
            return (status, written);
        }
        (status, written.saturating_add(1))
    }

    /// Counts a served request in the device's counters.
    fn count(&self, status: u8, c: &BlockCounters) {
        if status != S_OK {
            metrics::inc(&c.execute_fails);
            return;
        }
        let bytes: u64 = self.data.iter().map(|&(_, len)| u64::from(len)).sum();
        let (count, total) = match self.kind {
            Kind::In => (&c.read_count, Some(&c.read_bytes)),
            Kind::Out => (&c.write_count, Some(&c.write_bytes)),
            Kind::Flush => (&c.flush_count, None),
            Kind::GetId | Kind::Unsupported(_) => return,
        };
        metrics::inc(count);
        if let Some(total) = total {
            metrics::add(total, bytes);
        }
    }

    /// Reads or writes the data segments at the request's sector; the bytes written into guest
    /// memory (0 for a write).
    fn transfer(&self, mem: &GuestMemory, disk: &mut Disk<'_>) -> Result<u32, ()> {
        if self.kind == Kind::Out && disk.read_only {
            return Err(());
        }
        let total: u64 = self.data.iter().map(|&(_, len)| u64::from(len)).sum();
        let end = self.sector.checked_add(total / SECTOR_SIZE).ok_or(())?;
        if end > disk.capacity {
            return Err(());
        }
        let mut offset = self.sector * SECTOR_SIZE;
        for &(addr, len) in &self.data {
            disk.file.seek(SeekFrom::Start(offset)).map_err(|_| ())?;
            let r = match self.kind {
                Kind::In => mem.read_exact_volatile_from(addr, disk.file, len as usize),
                _ => mem.write_all_volatile_to(addr, disk.file, len as usize),
            };
            r.map_err(|_| ())?;
            offset += u64::from(len);
        }
        Ok(if self.kind == Kind::In { total as u32 } else { 0 })
    }
}

/// Takes the next chain from `q` and serves it: `None` when the queue is empty, else whether the
/// chain was a request (a malformed chain is returned unused, with no status written).
pub fn serve_next(mem: &GuestMemory, q: &mut Queue, disk: &mut Disk<'_>) -> Option<bool> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    // The chain's iterator stops at the queue size and at loops: at most 256 descriptors here.
    let descs: Vec<_> = chain.map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
    let (used, ok) = match parse(mem, &descs) {
        Ok(req) => {
            let (status, used) = req.execute(mem, disk);
            req.count(status, disk.counters);
            tracing::trace!("virtio-blk: {:?} sector {} -> status {status}, {used} bytes", req.kind, req.sector);
            (used, true)
        }
        Err(e) => {
            metrics::inc(&disk.counters.invalid_reqs_count);
            crate::log_limited!(warn, "virtio-blk: malformed request returned unused: {e:?}");
            (0, false)
        }
    };
    if q.add_used(mem, head, used).is_err() {
        crate::log_limited!(warn, "virtio-blk: cannot return a request to the guest");
    }
    Some(ok)
}

/// Serves every chain of a 16-entry queue in a 64 KiB guest memory that starts with `image`
/// (descriptor table at 0, available ring at 0x1000, used ring at 0x2000), against a 64-sector
/// drive in `file` (read-only when the image's last byte is odd). The fuzz target's entry point,
/// and the unit tests': returns each chain's outcome.
pub fn serve_image(image: &[u8], file: &mut File) -> Vec<bool> {
    let Some((mem, mut q)) = crate::devices::virtio::ring::queue_on(image) else { return Vec::new() };
    let id = *b"fuzz-drive\0\0\0\0\0\0\0\0\0\0";
    let read_only = image.last().is_some_and(|b| b & 1 == 1);
    let counters = BlockCounters::default();
    let mut disk = Disk { file, read_only, capacity: 64, id: &id, counters: &counters };
    std::iter::from_fn(|| serve_next(&mem, &mut q, &mut disk)).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A guest memory image with `descs`, every head in `heads` made available.
    fn image(descs: &[(u64, u32, u16, u16)], heads: &[u16]) -> Vec<u8> {
        crate::devices::virtio::ring::image(descs, heads, heads.len() as u16)
    }

    fn header(m: &mut [u8], at: usize, kind: u32, sector: u64) {
        m[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        m[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    }

    /// A 64-sector drive whose byte i is i % 251.
    fn drive() -> File {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..64 * 512).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        f
    }

    fn used_len(m: &GuestMemory, i: u64) -> u32 {
        m.read_obj(GuestAddress(0x2004 + 8 * i + 4)).unwrap()
    }

    /// Serves every chain of `img`; the guest memory afterwards, to see what the device wrote.
    fn run(img: &[u8], file: &mut File) -> (Vec<bool>, GuestMemory) {
        let (mem, mut q) = crate::devices::virtio::ring::queue_on(img).unwrap();
        let id = *b"layer-0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let counters = BlockCounters::default();
        let mut disk = Disk { file, read_only: img.last() == Some(&1), capacity: 64, id: &id, counters: &counters };
        let out = std::iter::from_fn(|| serve_next(&mem, &mut q, &mut disk)).collect();
        (out, mem)
    }

    #[test]
    fn reads_writes_flushes_and_ids() {
        let mut f = drive();
        // 0: read sectors 2-3 into 0x4000; 1: write sector 5 from 0x5000; 2: flush; 3: get-id.
        let mut m = image(
            &[
                (0x3000, 16, NEXT, 1),
                (0x4000, 1024, NEXT | WRITE, 2),
                (0x3f00, 1, WRITE, 0),
                (0x3010, 16, NEXT, 4),
                (0x5000, 512, NEXT, 5),
                (0x3f01, 1, WRITE, 0),
                (0x3020, 16, NEXT, 7),
                (0x3f02, 1, WRITE, 0),
                (0x3030, 16, NEXT, 9),
                (0x6000, 20, NEXT | WRITE, 10),
                (0x3f03, 1, WRITE, 0),
            ],
            &[0, 3, 6, 8],
        );
        header(&mut m, 0x3000, T_IN, 2);
        header(&mut m, 0x3010, T_OUT, 5);
        header(&mut m, 0x3020, T_FLUSH, 0);
        header(&mut m, 0x3030, T_GET_ID, 0);
        m[0x5000..0x5200].fill(0xee);
        m[0x3f00..0x3f04].fill(0xff);
        let (out, mem) = run(&m, &mut f);
        assert_eq!(out, [true; 4]);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        let want: Vec<u8> = (1024..2048).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        let mut status = [9u8; 4];
        mem.read_slice(&mut status, GuestAddress(0x3f00)).unwrap();
        assert_eq!(status, [S_OK; 4]);
        assert_eq!([used_len(&mem, 0), used_len(&mem, 1), used_len(&mem, 2), used_len(&mem, 3)], [1025, 1, 1, 21]);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x6000)).unwrap();
        assert_eq!(&id[..7], b"layer-0");
        let mut sector5 = vec![0u8; 512];
        f.seek(SeekFrom::Start(5 * 512)).unwrap();
        f.read_exact(&mut sector5).unwrap();
        assert_eq!(sector5, vec![0xee; 512]);
    }

    #[test]
    fn bad_requests_fail_with_a_status_or_are_returned_unused() {
        let mut f = drive();
        let mut m = image(
            &[
                // 0: read past the end (sector 63, two sectors): IOERR.
                (0x3000, 16, NEXT, 1),
                (0x4000, 1024, NEXT | WRITE, 2),
                (0x3f00, 1, WRITE, 0),
                // 3: unknown type 77: UNSUPP.
                (0x3010, 16, NEXT, 4),
                (0x3f01, 1, WRITE, 0),
                // 5: a read whose data is device-readable: malformed.
                (0x3020, 16, NEXT, 6),
                (0x4000, 512, NEXT, 7),
                (0x3f02, 1, WRITE, 0),
                // 8: a header outside guest memory: malformed.
                (0xffff_0000, 16, NEXT, 9),
                (0x3f03, 1, WRITE, 0),
                // 10: a read of 100 bytes: malformed.
                (0x3040, 16, NEXT, 11),
                (0x4000, 100, NEXT | WRITE, 12),
                (0x3f04, 1, WRITE, 0),
                // 13: a status that is not writable: malformed.
                (0x3050, 16, 0, 0),
            ],
            &[0, 3, 5, 8, 10, 13],
        );
        header(&mut m, 0x3000, T_IN, 63);
        header(&mut m, 0x3010, 77, 0);
        header(&mut m, 0x3020, T_IN, 0);
        header(&mut m, 0x3040, T_IN, 0);
        m[0x3f00..0x3f05].fill(0xff);
        let (out, mem) = run(&m, &mut f);
        assert_eq!(out, [true, true, false, false, false, false]);
        let mut status = [0u8; 5];
        mem.read_slice(&mut status, GuestAddress(0x3f00)).unwrap();
        assert_eq!(status, [S_IOERR, S_UNSUPP, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn a_read_only_drive_refuses_writes() {
        let mut f = drive();
        let mut m = image(&[(0x3000, 16, NEXT, 1), (0x5000, 512, NEXT, 2), (0x3f00, 1, WRITE, 0)], &[0]);
        header(&mut m, 0x3000, T_OUT, 0);
        m[0x5000..0x5200].fill(0xee);
        *m.last_mut().unwrap() = 1;
        let (out, mem) = run(&m, &mut f);
        assert_eq!(out, [true]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3f00)).unwrap(), S_IOERR);
        let mut first = [0u8; 4];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut first).unwrap();
        assert_eq!(first, [0, 1, 2, 3]);
    }

    #[test]
    fn random_rings_are_served_within_bounds() {
        let mut f = drive();
        let mut rng = crate::sys::TestRng::new(41);
        for _ in 0..2_000 {
            let mut m = vec![0u8; 0x4000];
            for b in m.iter_mut().take(16 * 16) {
                *b = rng.next() as u8;
            }
            m[0x1002] = rng.below(20) as u8;
            for i in 0..16 {
                m[0x1004 + 2 * i] = rng.below(18) as u8;
            }
            for b in m[0x3000..0x3100].iter_mut() {
                *b = rng.next() as u8;
            }
            let out = serve_image(&m, &mut f);
            assert!(out.len() <= 64);
            assert_eq!(f.metadata().unwrap().len(), 64 * 512, "a request grew the drive");
        }
    }
}
