//! One page of guest-physical address space mapped through /dev/mem: how the agent reaches ember's
//! MMIO devices (the boot timer, the control page). Every access to such a page is an MMIO exit.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

pub const PAGE: usize = 4096;

/// A mapping of one physical page, unmapped on drop; accessed only with volatile reads and writes.
pub struct PhysPage {
    base: *mut u8,
}

impl PhysPage {
    pub fn map(addr: libc::off_t) -> io::Result<Self> {
        let f = fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
        // SAFETY: maps one page of /dev/mem at `addr`; the mapping lives until `self` is dropped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                addr,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::other(format!("mmap /dev/mem: {}", io::Error::last_os_error())));
        }
        Ok(Self { base: p.cast() })
    }

    /// A volatile read of a `T` at `off`; panics if it would not lie within the page.
    pub fn read<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= PAGE);
        // SAFETY: in bounds (checked above); the mapping is live; callers use aligned offsets.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<T>()) }
    }

    /// A volatile write of `v` at `off`; panics if it would not lie within the page.
    pub fn write<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= PAGE);
        // SAFETY: in bounds (checked above); the mapping is live and writable.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<T>(), v) }
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.base.cast(), PAGE) };
    }
}
