//! ember's control page (layout: ember_abi::control), reached through /dev/mem: the clone id, fresh
//! seed material for the kernel RNG, the host's flags, and the doorbells. Every access is an MMIO
//! exit, so the page is read once after boot and once after a restore.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use crate::devmem::PhysPage;

use ember_abi::control::{
    CLONE_ID_OFFSET, CONTROL_ADDR, FLAGS_OFFSET, FLAG_QUIET, FLAG_SERVE, IDLE_DOORBELL, MAGIC, READY_DOORBELL,
    REALTIME_OFFSET, RESPONSE_DOORBELL, SEED_LEN, SEED_OFFSET,
};

pub struct ControlPage {
    page: PhysPage,
}

impl ControlPage {
    /// Maps the page; None when the VMM has no control page (the magic is missing).
    pub fn map() -> io::Result<Option<Self>> {
        let page = PhysPage::map(CONTROL_ADDR as libc::off_t)?;
        Ok((page.read::<u32>(0) == MAGIC).then_some(Self { page }))
    }

    pub fn clone_id(&self) -> u64 {
        self.page.read(CLONE_ID_OFFSET as usize)
    }

    /// Whether the host wants invocations served after "ready".
    pub fn serve(&self) -> bool {
        self.page.read::<u64>(FLAGS_OFFSET as usize) & FLAG_SERVE != 0
    }

    /// Whether the host discards the console (the agent then prints nothing of its own).
    pub fn quiet(&self) -> bool {
        self.page.read::<u64>(FLAGS_OFFSET as usize) & FLAG_QUIET != 0
    }

    /// The host's wall-clock time in ns since the epoch; 0 from a VMM that does not tell it.
    pub fn realtime_ns(&self) -> u64 {
        self.page.read(REALTIME_OFFSET as usize)
    }

    pub fn seed(&self) -> [u8; SEED_LEN] {
        let mut seed = [0u8; SEED_LEN];
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&self.page.read::<u64>(SEED_OFFSET as usize + i * 8).to_le_bytes());
        }
        seed
    }

    /// Tells the VMM that the guest is ready: the snapshot point. When ember snapshots here, every
    /// clone resumes right after this write.
    pub fn ring_ready(&self) {
        self.page.write(READY_DOORBELL as usize, 1u32);
    }

    /// Tells the host that a mailbox response is written (requests that asked for it).
    pub fn ring_response(&self) {
        self.page.write(RESPONSE_DOORBELL as usize, 1u32);
    }

    /// Tells the host that the agent has nothing to do: the vCPU waits host-side (this write
    /// returns) until the next mailbox request or an interrupt for the guest.
    pub fn ring_idle(&self) {
        self.page.write(IDLE_DOORBELL as usize, 1u32);
    }
}

/// Mixes `seed` into the kernel's RNG, credits it as full entropy and reseeds the CRNG at once, so
/// that getrandom() neither blocks nor repeats what a sibling clone produces.
/// `urandom` is /dev/urandom opened for writing (a clone uses the one its template opened).
pub fn seed_kernel_rng(urandom: &fs::File, seed: &[u8; SEED_LEN]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + SEED_LEN);
    info.extend_from_slice(&((SEED_LEN * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(SEED_LEN as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = urandom;
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

/// Opens /dev/urandom for [`seed_kernel_rng`].
pub fn open_urandom() -> io::Result<fs::File> {
    fs::OpenOptions::new().write(true).open("/dev/urandom")
}

/// Sets the guest's wall clock to `ns` since the epoch (a clone's clock goes on from its
/// snapshot's, so its wall-clock time is the snapshot's until set). Nothing to do for 0.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    if ns == 0 {
        return Ok(());
    }
    let ts =
        libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::other(format!("clock_settime: {}", io::Error::last_os_error())));
    }
    Ok(())
}
