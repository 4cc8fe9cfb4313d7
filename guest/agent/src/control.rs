//! ember's control page (src/devices/control.rs on the host), reached through /dev/mem: the clone id,
//! fresh seed material for the kernel RNG, and the "ready" doorbell. Every access is an MMIO exit, so
//! the page is read once after boot and once after a restore.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use crate::devmem::PhysPage;

const CONTROL_ADDR: libc::off_t = 0xd000_1000;
const MAGIC: u32 = u32::from_le_bytes(*b"EMBR");
const CLONE_ID_OFFSET: usize = 0x08;
const SEED_OFFSET: usize = 0x10;
const SEED_LEN: usize = 32;
const DOORBELL_OFFSET: usize = 0x100;

pub struct ControlPage {
    page: PhysPage,
}

impl ControlPage {
    /// Maps the page; None when the VMM has no control page (the magic is missing).
    pub fn map() -> io::Result<Option<Self>> {
        let page = PhysPage::map(CONTROL_ADDR)?;
        Ok((page.read::<u32>(0) == MAGIC).then_some(Self { page }))
    }

    pub fn clone_id(&self) -> u64 {
        self.page.read(CLONE_ID_OFFSET)
    }

    pub fn seed(&self) -> [u8; SEED_LEN] {
        let mut seed = [0u8; SEED_LEN];
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&self.page.read::<u64>(SEED_OFFSET + i * 8).to_le_bytes());
        }
        seed
    }

    /// Tells the VMM that the guest is ready: the snapshot point. When ember snapshots here, every
    /// clone resumes right after this write.
    pub fn ring_ready(&self) {
        self.page.write(DOORBELL_OFFSET, 1u32);
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
