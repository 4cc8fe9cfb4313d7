//! A template's working set: the guest pages a clone reads and writes in its first moments after a
//! restore, recorded once and populated host-side for every pooled clone before it is handed out.
//!
//! On hosts where a guest-triggered page fault is expensive (the guest waits for the host to fault
//! the page in, then to map it), a clone that finds its working set already present in the host's
//! page tables starts much faster. Pages only read are populated read-only (MADV_POPULATE_READ), so
//! they stay shared with the memory file's page cache; pages the clone writes are populated as
//! private copies (MADV_POPULATE_WRITE), which a clone would have made anyway.
//!
//! Recording reads /proc/self/pagemap over a clone's RAM after it ran: a present page that still
//! maps the file was only read; a present anonymous page is a copy-on-write copy: it was written.
//!
//! File format (`working-set` in the snapshot directory): "EMBERWS1", u64 page count of each list,
//! then the read list and the write list as (first page, page count) pairs, all little endian, and a
//! CRC-64 of everything before it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::{GuestMemory, PAGE_SIZE};

use super::format::CRC;

pub const WORKING_SET_FILE: &str = "working-set";
const MAGIC: &[u8; 8] = b"EMBERWS1";
const MADV_POPULATE_READ: libc::c_int = 22;
const MADV_POPULATE_WRITE: libc::c_int = 23;
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// Runs of guest RAM pages, as (first page, page count), page numbers counted from the start of guest
/// RAM as laid out in the memory file.
pub type PageRuns = Vec<(u64, u64)>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pub read: PageRuns,
    pub written: PageRuns,
}

fn push_page(runs: &mut PageRuns, page: u64) {
    match runs.last_mut() {
        Some((first, n)) if *first + *n == page => *n += 1,
        _ => runs.push((page, 1)),
    }
}

fn count(runs: &PageRuns) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

/// Each RAM region of `mem`: its host address, length, and first page number in the memory file.
fn regions(mem: &GuestMemory) -> Vec<(usize, u64, u64)> {
    let mut first_page = 0;
    mem.iter()
        .filter_map(|r| {
            let host = mem.get_host_address(r.start_addr()).ok()? as usize;
            let out = (host, r.len(), first_page);
            first_page += r.len() / PAGE_SIZE;
            Some(out)
        })
        .collect()
}

impl WorkingSet {
    pub fn read_pages(&self) -> u64 {
        count(&self.read)
    }

    pub fn written_pages(&self) -> u64 {
        count(&self.written)
    }

    /// The pages of `mem` (a clone's RAM, mapped from a memory file) that are present in this
    /// process's page tables, split into read-only and written ones.
    pub fn record(mem: &GuestMemory) -> std::io::Result<Self> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut ws = WorkingSet::default();
        for (host, len, first_page) in regions(mem) {
            let pages = (len / PAGE_SIZE) as usize;
            let mut buf = vec![0u8; pages * 8];
            pagemap.read_exact_at(&mut buf, (host as u64 / PAGE_SIZE) * 8)?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if e & PM_PRESENT == 0 {
                    continue;
                }
                let list = if e & PM_FILE != 0 { &mut ws.read } else { &mut ws.written };
                push_page(list, first_page + i as u64);
            }
        }
        Ok(ws)
    }

    /// Faults the working set into a clone's RAM from the host side: read pages shared, written
    /// pages as private copies. Runs before the clone is handed out, never on the handoff path.
    pub fn populate(&self, mem: &GuestMemory) -> std::io::Result<()> {
        let regions = regions(mem);
        for (runs, advice) in [(&self.read, MADV_POPULATE_READ), (&self.written, MADV_POPULATE_WRITE)] {
            for &(first, n) in runs {
                let Some(&(host, len, region_first)) =
                    regions.iter().find(|(_, len, f)| first >= *f && first + n <= *f + len / PAGE_SIZE)
                else {
                    return Err(std::io::Error::other(format!("pages {first}+{n} are outside guest RAM")));
                };
                let _ = len;
                let addr = host + ((first - region_first) * PAGE_SIZE) as usize;
                // SAFETY: the range lies inside a live mapping of `mem` (checked above); populating
                // pages changes no contents.
                let rc = unsafe { libc::madvise(addr as *mut libc::c_void, (n * PAGE_SIZE) as usize, advice) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.read.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.written.len() as u64).to_le_bytes());
        for &(a, b) in self.read.iter().chain(&self.written) {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a working-set file, checking it against guest RAM of `mem_bytes`.
    pub fn decode(bytes: &[u8], mem_bytes: u64, path: &Path) -> Result<Self, SnapshotError> {
        let bad = |why: &str| SnapshotError::Decode(path.to_path_buf(), why.to_string());
        if bytes.len() < 8 + 16 + 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic(path.to_path_buf()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 8);
        if CRC.checksum(body).to_le_bytes() != crc {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        let word = |i: usize| -> u64 {
            let b = &body[8 + i * 8..16 + i * 8];
            u64::from_le_bytes(b.try_into().unwrap_or_default())
        };
        let (nr, nw) = (word(0), word(1));
        let pairs = nr.checked_add(nw).ok_or_else(|| bad("run counts overflow"))?;
        if (body.len() as u64 - 24) != pairs.checked_mul(16).ok_or_else(|| bad("run counts overflow"))? {
            return Err(SnapshotError::Truncated(path.to_path_buf()));
        }
        let total_pages = mem_bytes / PAGE_SIZE;
        let mut ws = WorkingSet::default();
        for i in 0..pairs as usize {
            let (first, n) = (word(2 + 2 * i), word(3 + 2 * i));
            if n == 0 || first.checked_add(n).is_none_or(|end| end > total_pages) {
                return Err(bad("a page run lies outside guest RAM"));
            }
            if (i as u64) < nr { &mut ws.read } else { &mut ws.written }.push((first, n));
        }
        Ok(ws)
    }

    /// Writes the working set to `path` (atomically: never a half-written file).
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        super::write_atomic(path, &self.encode())
    }

    /// Loads a snapshot's working set; Ok(None) when it has none.
    pub fn load(path: &Path, mem_bytes: u64) -> Result<Option<Self>, SnapshotError> {
        if !path.exists() {
            return Ok(None);
        }
        // At most one run per page of RAM, two lists: anything longer is not a working set.
        let limit = 32 + 2 * 16 * (mem_bytes / PAGE_SIZE);
        let bytes = super::read_limited(path, limit)?;
        Self::decode(&bytes, mem_bytes, path).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory_file::{write_memory, MemoryFile};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn records_read_and_written_pages_and_populates_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let src = crate::memory::create_guest_memory(16 << 20).unwrap();
        src.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        write_memory(&path, &src).unwrap();
        let file = MemoryFile::open(&path, 16 << 20).unwrap();

        let clone = file.map_private().unwrap();
        let _: u64 = clone.read_obj(GuestAddress(0x3000)).unwrap();
        let _: u64 = clone.read_obj(GuestAddress(0x4000)).unwrap();
        clone.write_obj(2u64, GuestAddress(0x10_0000)).unwrap();
        clone.write_obj(2u64, GuestAddress(0x10_1000)).unwrap();
        let ws = WorkingSet::record(&clone).unwrap();
        // The kernel maps neighbouring page-cache pages on a read fault (fault-around), so the read
        // set may be larger than what was read.
        let covers = |runs: &PageRuns, page: u64| runs.iter().any(|&(f, n)| page >= f && page < f + n);
        assert!(covers(&ws.read, 3) && covers(&ws.read, 4), "{ws:?}");
        assert_eq!(ws.written, vec![(0x100, 2)], "{ws:?}");
        assert!(!covers(&ws.read, 0x100), "{ws:?}");

        let back = WorkingSet::decode(&ws.encode(), 16 << 20, Path::new("w")).unwrap();
        assert_eq!(back, ws);

        let fresh = file.map_private().unwrap();
        ws.populate(&fresh).unwrap();
        let again = WorkingSet::record(&fresh).unwrap();
        assert!(covers(&again.read, 3) && covers(&again.read, 4), "{again:?}");
        assert_eq!(again.written, ws.written, "{again:?}");
        assert_eq!(fresh.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 1, "populating changed contents");
    }

    #[test]
    fn random_and_mutated_working_sets_are_refused_without_a_panic() {
        let good = WorkingSet { read: vec![(1, 2), (9, 3)], written: vec![(10, 1)] }.encode();
        let mut rng = crate::sys::TestRng::new(11);
        for _ in 0..20_000 {
            let input = if rng.below(4) == 0 { rng.bytes(128) } else { rng.mutate(&good) };
            if let Ok(ws) = WorkingSet::decode(&input, 64 * PAGE_SIZE, Path::new("w")) {
                let end = ws.read.iter().chain(&ws.written).map(|r| r.0 + r.1).max().unwrap_or(0);
                assert!(end <= 64, "a run outside guest RAM was accepted: {ws:?}");
            }
        }
    }

    #[test]
    fn bad_files_are_refused() {
        let ws = WorkingSet { read: vec![(1, 2)], written: vec![(10, 1)] };
        let good = ws.encode();
        let p = Path::new("w");
        assert!(matches!(WorkingSet::decode(b"junk", 1 << 20, p), Err(SnapshotError::BadMagic(_))));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(matches!(WorkingSet::decode(&flipped, 1 << 20, p), Err(SnapshotError::Checksum(_))));
        // A run beyond guest RAM (here: 8 pages of RAM).
        assert!(WorkingSet::decode(&good, 8 * PAGE_SIZE, p).is_err());
        assert!(WorkingSet::decode(&good, 1 << 20, p).is_ok());
    }
}
