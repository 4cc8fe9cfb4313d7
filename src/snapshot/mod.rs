//! Snapshots on disk: a directory with a `state` file (header, serde-encoded state, checksum) and a
//! `memory` file (guest RAM, sparse: zero pages are holes).
//!
//! ```text
//! state:  "EMBERSNP" | format version u32 | ember version (u16 length, bytes) | state length u64 |
//!         state (bincode) | CRC-64/ECMA-182 of everything before it (u64)
//! memory: guest RAM ranges back to back, in guest-physical order
//! ```
//!
//! A clone maps `memory` privately (copy-on-write): creating one copies no guest memory, and the file
//! is never written to.

pub mod working_set;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::devices::DevicesState;
use crate::vmm::memory::{self, GuestMemory, PAGE_SIZE};
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::vm_state::VmState;

pub const MAGIC: &[u8; 8] = b"EMBERSNP";
pub const FORMAT_VERSION: u32 = 2;
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// A state file is a few tens of KiB; anything far larger is not one of ours.
const MAX_STATE_LEN: u64 = 64 << 20;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{}: {}", .0.display(), .1)]
    Io(PathBuf, std::io::Error),
    #[error("{}: not an ember snapshot (bad magic)", .0.display())]
    BadMagic(PathBuf),
    #[error("{}: snapshot format version {} is not supported (this ember reads version {FORMAT_VERSION})", .0.display(), .1)]
    Version(PathBuf, u32),
    #[error("{}: the file is truncated", .0.display())]
    Truncated(PathBuf),
    #[error("{}: checksum mismatch (the file is corrupt)", .0.display())]
    Checksum(PathBuf),
    #[error("{}: cannot decode the state: {}", .0.display(), .1)]
    Decode(PathBuf, String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
    #[error("{}: is {actual} bytes, the snapshot's guest has {expected} bytes of RAM", .path.display())]
    MemorySize { path: PathBuf, expected: u64, actual: u64 },
    #[error("cannot map {}: {}", .0.display(), .1)]
    Map(PathBuf, String),
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

/// The shape of the machine a snapshot was taken of.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineInfo {
    pub vcpus: u8,
    pub mem_bytes: u64,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub machine: MachineInfo,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io(path.to_path_buf(), e)
}

impl SnapshotState {
    /// Checks what decoding cannot: the parts agree with each other.
    fn check(&self) -> Result<(), SnapshotError> {
        let m = &self.machine;
        if m.vcpus == 0 || usize::from(m.vcpus) != self.vcpus.len() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} vCPUs with {} vCPU states",
                m.vcpus,
                self.vcpus.len()
            )));
        }
        if m.mem_bytes < memory::MIN_MEM_MIB << 20 || m.mem_bytes % PAGE_SIZE != 0 {
            return Err(SnapshotError::Inconsistent(format!("guest memory of {} bytes", m.mem_bytes)));
        }
        Ok(())
    }

    /// Encodes the state file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| SnapshotError::Encode(e.to_string()))?;
        let version = env!("CARGO_PKG_VERSION").as_bytes();
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(version.len() as u16).to_le_bytes());
        out.extend_from_slice(version);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a state file's bytes; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        let truncated = || SnapshotError::Truncated(path.to_path_buf());
        let mut r = Reader { bytes, at: 0 };
        if r.take(8).ok_or_else(|| SnapshotError::BadMagic(path.to_path_buf()))? != MAGIC {
            return Err(SnapshotError::BadMagic(path.to_path_buf()));
        }
        let version = r.u32().ok_or_else(truncated)?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version(path.to_path_buf(), version));
        }
        let vlen = r.u16().ok_or_else(truncated)?;
        r.take(usize::from(vlen)).ok_or_else(truncated)?;
        let len = r.u64().ok_or_else(truncated)?;
        if len > MAX_STATE_LEN {
            return Err(SnapshotError::Decode(path.to_path_buf(), format!("state of {len} bytes is too large")));
        }
        let body = r.take(len as usize).ok_or_else(truncated)?;
        let covered = r.at;
        let crc = r.u64().ok_or_else(truncated)?;
        if CRC.checksum(&bytes[..covered]) != crc {
            return Err(SnapshotError::Checksum(path.to_path_buf()));
        }
        if r.at != bytes.len() {
            return Err(SnapshotError::Decode(path.to_path_buf(), "trailing bytes after the checksum".into()));
        }
        let (state, used): (Self, usize) = bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(|e| SnapshotError::Decode(path.to_path_buf(), e.to_string()))?;
        if used != body.len() {
            return Err(SnapshotError::Decode(path.to_path_buf(), "state has trailing bytes".into()));
        }
        state.check()?;
        Ok(state)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
}

/// A snapshot directory's two files.
#[derive(Clone, Debug)]
pub struct SnapshotPaths {
    pub dir: PathBuf,
}

impl SnapshotPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    pub fn working_set(&self) -> PathBuf {
        self.dir.join(working_set::WORKING_SET_FILE)
    }
}

/// Writes a snapshot into `dir` (created if needed). Each file is written under a temporary name
/// and renamed into place, so a failed snapshot never leaves a half-written file under the real name.
pub fn write(dir: &Path, state: &SnapshotState, mem: &GuestMemory) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let paths = SnapshotPaths::new(dir);
    let (tmp_mem, tmp_state) = (dir.join(".memory.tmp"), dir.join(".state.tmp"));
    let written = (|| {
        write_memory(&tmp_mem, mem)?;
        let bytes = state.encode()?;
        let mut f = File::create(&tmp_state).map_err(io_err(&tmp_state))?;
        f.write_all(&bytes).map_err(io_err(&tmp_state))?;
        f.sync_all().map_err(io_err(&tmp_state))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp_mem);
        let _ = std::fs::remove_file(&tmp_state);
        return Err(e);
    }
    // A working set recorded for an earlier snapshot in this directory no longer applies. Renaming
    // (rather than rewriting) also leaves running clones' mappings of an earlier memory file intact.
    let _ = std::fs::remove_file(paths.working_set());
    std::fs::rename(&tmp_mem, paths.memory()).map_err(io_err(&paths.memory()))?;
    std::fs::rename(&tmp_state, paths.state()).map_err(io_err(&paths.state()))?;
    Ok(())
}

/// Writes guest RAM to `path` as a sparse file: runs of non-zero pages are written, zero pages are
/// left as holes.
fn write_memory(path: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host =
            mem.get_host_address(region.start_addr()).map_err(|e| SnapshotError::Map(path.into(), e.to_string()))?;
        // SAFETY: `host..host+len` is the live mapping of this region, owned by `mem` for the whole
        // call; the VM is paused, so nothing writes guest memory while it is read here.
        let ram = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let page = PAGE_SIZE as usize;
        let mut run_start = None;
        for (i, p) in ram.chunks(page).enumerate() {
            let zero = p.iter().all(|&b| b == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(i * page),
                (true, Some(s)) => {
                    f.write_all_at(&ram[s..i * page], file_off + s as u64).map_err(io_err(path))?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            f.write_all_at(&ram[s..], file_off + s as u64).map_err(io_err(path))?;
        }
        file_off += len as u64;
    }
    f.set_len(file_off).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Reads and checks a snapshot's state file, and checks that its memory file has the right size.
pub fn read_state(paths: &SnapshotPaths) -> Result<SnapshotState, SnapshotError> {
    let path = paths.state();
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let state = SnapshotState::decode(&bytes, &path)?;
    let mem_path = paths.memory();
    let actual = std::fs::metadata(&mem_path).map_err(io_err(&mem_path))?.len();
    if actual != state.machine.mem_bytes {
        return Err(SnapshotError::MemorySize { path: mem_path, expected: state.machine.mem_bytes, actual });
    }
    Ok(state)
}

/// An open memory file, ready to be mapped by any number of clones.
pub struct MemoryFile {
    path: PathBuf,
    file: File,
    mem_bytes: u64,
}

impl MemoryFile {
    pub fn open(paths: &SnapshotPaths, mem_bytes: u64) -> Result<Self, SnapshotError> {
        let path = paths.memory();
        let file = File::open(&path).map_err(io_err(&path))?;
        let actual = file.metadata().map_err(io_err(&path))?.len();
        if actual != mem_bytes {
            return Err(SnapshotError::MemorySize { path, expected: mem_bytes, actual });
        }
        Ok(Self { path, file, mem_bytes })
    }

    /// Guest RAM for one clone: the file mapped private (copy-on-write) and lazily, so this costs
    /// a few mmap calls whatever the guest's size, and the clone's writes never reach the file.
    pub fn map_private(&self) -> Result<GuestMemory, SnapshotError> {
        let map_err = |e: &dyn std::fmt::Display| SnapshotError::Map(self.path.clone(), e.to_string());
        let mut regions = Vec::new();
        let mut off = 0u64;
        for (addr, size) in memory::ram_ranges(self.mem_bytes) {
            let fd = self.file.try_clone().map_err(|e| map_err(&e))?;
            let region = MmapRegionBuilder::new(size as usize)
                .with_file_offset(FileOffset::new(fd, off))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| map_err(&e))?;
            regions.push(GuestRegionMmap::new(region, addr).ok_or_else(|| map_err(&"region overflows"))?);
            off += size;
        }
        GuestMemory::from_regions(regions).map_err(|e| map_err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            machine: MachineInfo { vcpus: 1, mem_bytes: 16 << 20 },
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                cpuid: vec![],
                msrs: vec![Default::default(); 3],
                regs: kvm_bindings::kvm_regs { rip: 0x1234, ..Default::default() },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                lapic: Default::default(),
                events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
                tsc_khz: 2_000_000,
            }],
            devices: DevicesState::default(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample().encode().unwrap();
        let back = SnapshotState::decode(&bytes, Path::new("s")).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].tsc_khz, 2_000_000);
        assert_eq!(back.machine.mem_bytes, 16 << 20);
    }

    #[test]
    fn rejects_bad_files() {
        let good = sample().encode().unwrap();
        let p = Path::new("s");
        let e = |b: &[u8]| SnapshotState::decode(b, p).unwrap_err().to_string();
        assert!(e(b"").contains("bad magic"));
        assert!(e(b"NOTASNAPSHOT-----").contains("bad magic"));
        let mut v = good.clone();
        v[8] = 9;
        assert!(e(&v).contains("format version 9 is not supported"), "{}", e(&v));
        for cut in [9, 20, good.len() / 2, good.len() - 1] {
            assert!(e(&good[..cut]).contains("truncated"), "cut at {cut}: {}", e(&good[..cut]));
        }
        let mut flipped = good.clone();
        let mid = good.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(e(&flipped).contains("checksum mismatch"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(e(&longer).contains("trailing"));
        // A huge length field is refused before anything is allocated.
        let mut huge = good.clone();
        let at = 8 + 4 + 2 + env!("CARGO_PKG_VERSION").len();
        huge[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(e(&huge).contains("too large"));
    }

    #[test]
    fn inconsistent_state_is_refused() {
        let mut s = sample();
        s.machine.vcpus = 2;
        let bytes = s.encode().unwrap();
        assert!(SnapshotState::decode(&bytes, Path::new("s")).unwrap_err().to_string().contains("inconsistent"));
    }

    #[test]
    fn memory_file_is_sparse_and_maps_copy_on_write() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x1234_u32, GuestAddress(0xf0_0000)).unwrap();
        let paths = SnapshotPaths::new(dir.path());
        write_memory(&paths.memory(), &mem).unwrap();
        let meta = std::fs::metadata(paths.memory()).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 <= 64 * 1024, "two pages written, {} bytes allocated", meta.blocks() * 512);

        let file = MemoryFile::open(&paths, 16 << 20).unwrap();
        let a = file.map_private().unwrap();
        let b = file.map_private().unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef);
        a.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef, "a sibling sees the write");
        drop((a, b));
        let again = file.map_private().unwrap();
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef, "the file changed");
        assert_eq!(again.read_obj::<u32>(GuestAddress(0xf0_0000)).unwrap(), 0x1234);
        assert!(matches!(MemoryFile::open(&paths, 32 << 20), Err(SnapshotError::MemorySize { .. })));
    }
}
