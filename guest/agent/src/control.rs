//! ember's control page (src/devices/control.rs on the host), reached through /dev/mem: the clone id,
//! fresh seed material for the kernel RNG, and the "ready" doorbell. Every access is an MMIO exit, so
//! the page is read once after boot and once after a restore.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

const CONTROL_ADDR: libc::off_t = 0xd000_1000;
const MAGIC: u32 = u32::from_le_bytes(*b"EMBR");
const CLONE_ID_OFFSET: usize = 0x08;
const SEED_OFFSET: usize = 0x10;
const SEED_LEN: usize = 32;
const DOORBELL_OFFSET: usize = 0x100;
const PAGE: usize = 4096;

pub struct ControlPage {
    base: *mut u8,
}

impl ControlPage {
    /// Maps the page; None when the VMM has no control page (the magic is missing).
    pub fn map() -> io::Result<Option<Self>> {
        let f = fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
        // SAFETY: maps one page of /dev/mem at the control page's guest-physical address; the
        // mapping lives until `self` is dropped, and is only accessed with volatile reads/writes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                CONTROL_ADDR,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::other(format!("mmap /dev/mem: {}", io::Error::last_os_error())));
        }
        let page = Self { base: p.cast() };
        Ok((page.read_u32(0) == MAGIC).then_some(page))
    }

    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: `off + 4 <= PAGE` for every caller; the mapping is live.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u32>()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: `off + 8 <= PAGE` for every caller; the mapping is live and 8-byte aligned there.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u64>()) }
    }

    pub fn clone_id(&self) -> u64 {
        self.read_u64(CLONE_ID_OFFSET)
    }

    pub fn seed(&self) -> [u8; SEED_LEN] {
        let mut seed = [0u8; SEED_LEN];
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&self.read_u64(SEED_OFFSET + i * 8).to_le_bytes());
        }
        seed
    }

    /// Tells the VMM that the guest is ready: the snapshot point. When ember snapshots here, every
    /// clone resumes right after this write.
    pub fn ring_ready(&self) {
        // SAFETY: DOORBELL_OFFSET + 4 <= PAGE; the mapping is live.
        unsafe { std::ptr::write_volatile(self.base.add(DOORBELL_OFFSET).cast::<u32>(), 1) }
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.base.cast(), PAGE) };
    }
}

/// Mixes `seed` into the kernel's RNG, credits it as full entropy and reseeds the CRNG at once, so
/// that getrandom() neither blocks nor repeats what a sibling clone produces.
pub fn seed_kernel_rng(seed: &[u8; SEED_LEN]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + SEED_LEN);
    info.extend_from_slice(&((SEED_LEN * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(SEED_LEN as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of 8 + buf_size bytes, which `info` holds.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::other(format!("RNDADDENTROPY: {}", io::Error::last_os_error())));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::other(format!("RNDRESEEDCRNG: {}", io::Error::last_os_error())));
    }
    Ok(())
}
