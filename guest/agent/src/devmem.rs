//! Guest-physical address space mapped through /dev/mem: how the agent reaches ember's MMIO devices
//! (the boot timer, the control page; every access is an MMIO exit) and the mailbox (memory the host
//! shares; accesses cost nothing).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

pub const PAGE: usize = 4096;

/// A mapping of physical pages, unmapped on drop; accessed only with volatile reads and writes.
pub struct PhysPage {
    base: *mut u8,
    len: usize,
}

impl PhysPage {
    /// Maps one page.
    pub fn map(addr: libc::off_t) -> io::Result<Self> {
        Self::map_range(addr, PAGE)
    }

    /// Maps `len` bytes (a multiple of the page size) at `addr`.
    pub fn map_range(addr: libc::off_t, len: usize) -> io::Result<Self> {
        let f = fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
        // SAFETY: maps one page of /dev/mem at `addr`; the mapping lives until `self` is dropped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                addr,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::other(format!("mmap /dev/mem: {}", io::Error::last_os_error())));
        }
        Ok(Self { base: p.cast(), len })
    }

    /// A volatile read of a `T` at `off`; panics if it would not lie within the mapping.
    pub fn read<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds (checked above); the mapping is live; callers use aligned offsets.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<T>()) }
    }

    /// A volatile write of `v` at `off`; panics if it would not lie within the mapping.
    pub fn write<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds (checked above); the mapping is live and writable.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<T>(), v) }
    }

    /// The address of the byte at `off`, for atomics and bulk copies; panics if `off + len` would
    /// not lie within the mapping.
    pub fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above).
        unsafe { self.base.add(off) }
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
