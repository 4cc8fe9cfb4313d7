//! The memory file: guest RAM written sparse (zero pages are holes), mapped copy-on-write by every
//! clone, never written to after it is made.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{io_err, SnapshotError};
use crate::memory::{self, GuestMemory, PAGE_SIZE};

/// Writes guest RAM to `path` as a sparse file: runs of non-zero pages are written, zero pages are
/// left as holes.
pub fn write_memory(path: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let f = crate::sys::private_file().write(true).create(true).truncate(true).open(path).map_err(io_err(path))?;
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

/// An open memory file, ready to be mapped by any number of clones.
pub struct MemoryFile {
    path: PathBuf,
    file: File,
    mem_bytes: u64,
}

impl MemoryFile {
    pub fn open(path: &Path, mem_bytes: u64) -> Result<Self, SnapshotError> {
        let path = path.to_path_buf();
        let file = File::open(&path).map_err(io_err(&path))?;
        let actual = file.metadata().map_err(io_err(&path))?.len();
        if actual != mem_bytes {
            return Err(SnapshotError::MemorySize { path, expected: mem_bytes, actual });
        }
        Ok(Self { path, file, mem_bytes })
    }

    /// The same memory in a sealed memfd that nothing can shrink, grow or write: clones map it
    /// instead of the file, so a file truncated or rewritten on disk under live clones can never
    /// fault (SIGBUS) in the process that touches their memory. Costs one copy of the file's
    /// data, in memory; its holes stay holes.
    pub fn sealed(&self) -> Result<Self, SnapshotError> {
        let err = |e: std::io::Error| SnapshotError::Io(self.path.clone(), e);
        let memfd = crate::sys::memfd(c"ember-template", true).map_err(err)?;
        memfd.set_len(self.mem_bytes).map_err(err)?;
        self.copy_data_to(&memfd).map_err(err)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int; the memfd is ours and has no shared writable mapping.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Self { path: self.path.clone(), file: memfd, mem_bytes: self.mem_bytes })
    }

    /// Copies the file's data (not its holes) into `to`, at the same offsets: `to` must be
    /// `mem_bytes` long and read as zeros where it was not written.
    fn copy_data_to(&self, to: &File) -> std::io::Result<()> {
        let src = self.file.as_raw_fd();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0i64;
        while (at as u64) < self.mem_bytes {
            // SAFETY: lseek on an fd we own; it only moves the file offset, which nothing else uses.
            let data = unsafe { libc::lseek(src, at, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data past `at`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(src, data, libc::SEEK_HOLE) }.min(self.mem_bytes as i64);
            let mut off = data;
            while off < hole {
                let n = ((hole - off) as usize).min(buf.len());
                self.file.read_exact_at(&mut buf[..n], off as u64)?;
                to.write_all_at(&buf[..n], off as u64)?;
                off += n as i64;
            }
            at = hole;
        }
        Ok(())
    }

    /// Writes the memory to a new file at `path` (sparse: holes stay holes), under a temporary
    /// name first that is always a new file (never written through a file or symlink that had
    /// its name), synced and renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        let tmp = path.with_file_name(".memory.tmp");
        let written = (|| {
            let f = super::new_temp_file(&tmp)?;
            f.set_len(self.mem_bytes)?;
            self.copy_data_to(&f)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(SnapshotError::Io(tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }

    /// The open file (a worker gets a sealed template's memfd through its socket).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The guest RAM size the file holds.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Another handle on the same file.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self { path: self.path.clone(), file: self.file.try_clone()?, mem_bytes: self.mem_bytes })
    }

    /// Which file this is (device and inode): two handles on one file have the same.
    pub fn identity(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// A memory file handed over by another process: accepted only as a memfd sealed the way
    /// [`MemoryFile::sealed`] seals one (nothing can write, grow or shrink it, so mapping it can
    /// never fault), of exactly `mem_bytes`.
    pub fn from_sealed(file: File, mem_bytes: u64) -> Result<Self, SnapshotError> {
        let path = PathBuf::from("(sealed memfd)");
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: F_GET_SEALS on a descriptor we own; no pointer is passed.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & want != want {
            return Err(SnapshotError::Io(path, std::io::Error::other("the memory file is not a sealed memfd")));
        }
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

    #[test]
    fn memory_file_is_sparse_and_maps_copy_on_write() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x1234_u32, GuestAddress(0xf0_0000)).unwrap();
        let path = dir.path().join("memory");
        write_memory(&path, &mem).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 <= 64 * 1024, "two pages written, {} bytes allocated", meta.blocks() * 512);

        let file = MemoryFile::open(&path, 16 << 20).unwrap();
        let a = file.map_private().unwrap();
        let b = file.map_private().unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef);
        a.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef, "a sibling sees the write");
        drop((a, b));
        let again = file.map_private().unwrap();
        assert_eq!(again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0xdead_beef, "the file changed");
        assert_eq!(again.read_obj::<u32>(GuestAddress(0xf0_0000)).unwrap(), 0x1234);
        assert!(matches!(MemoryFile::open(&path, 32 << 20), Err(SnapshotError::MemorySize { .. })));
    }

    #[test]
    fn a_sealed_copy_survives_its_file_and_cannot_change() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xfeed_u32, GuestAddress(0x7000)).unwrap();
        mem.write_obj(0xbeef_u32, GuestAddress(0xff_f000)).unwrap();
        let path = dir.path().join("memory");
        write_memory(&path, &mem).unwrap();
        let sealed = MemoryFile::open(&path, 16 << 20).unwrap().sealed().unwrap();
        // The file on disk is truncated under it: clones of the sealed copy never notice.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        let clone = sealed.map_private().unwrap();
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0x7000)).unwrap(), 0xfeed);
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0xff_f000)).unwrap(), 0xbeef);
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(), 0, "a hole reads zeros");
        clone.write_obj(1u32, GuestAddress(0x7000)).unwrap();
        assert_eq!(sealed.map_private().unwrap().read_obj::<u32>(GuestAddress(0x7000)).unwrap(), 0xfeed);
        // And nobody can shrink or write it.
        assert!(sealed.file.set_len(4096).is_err());
        assert!(sealed.file.write_all_at(b"x", 0).is_err());
    }
}
