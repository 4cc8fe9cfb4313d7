//! The control page: a small MMIO device through which ember's guest agent learns who it is and tells
//! ember what it is doing (layout: `ember_abi::control`).
//!
//! Every access is an MMIO exit, so the agent reads the page once after boot and once after a
//! restore; it is not a data channel. The page is per VM and never part of a snapshot: a clone gets
//! its own id and seed.

pub use ember_abi::control::*;

use super::{BusDevice, GuestRequest};

/// A VM's control page.
pub struct ControlPage {
    regs: [u8; REGS_LEN],
}

impl ControlPage {
    /// A page for the VM with `clone_id`, with fresh seed material from the host's RNG.
    pub fn new(clone_id: u64, flags: u64) -> std::io::Result<Self> {
        let mut seed = [0u8; SEED_LEN];
        crate::sys::getrandom(&mut seed)?;
        Ok(Self::with_seed(clone_id, flags, seed))
    }

    pub fn with_seed(clone_id: u64, flags: u64, seed: [u8; SEED_LEN]) -> Self {
        let mut regs = [0u8; REGS_LEN];
        regs[FLAGS_OFFSET as usize..][..8].copy_from_slice(&flags.to_le_bytes());
        regs[..4].copy_from_slice(&MAGIC.to_le_bytes());
        regs[CLONE_ID_OFFSET as usize..][..8].copy_from_slice(&clone_id.to_le_bytes());
        regs[SEED_OFFSET as usize..][..SEED_LEN].copy_from_slice(&seed);
        Self { regs }
    }
}

/// The host's CLOCK_REALTIME in nanoseconds since the epoch (0 if the clock is before it).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl BusDevice for ControlPage {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The wall clock is read when the guest asks, not when the page was made (a clone's page
        // is made at restore; a pooled clone may read it much later).
        if offset == REALTIME_OFFSET && data.len() == 8 {
            data.copy_from_slice(&realtime_ns().to_le_bytes());
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, _data: &[u8]) -> Option<GuestRequest> {
        match offset {
            READY_DOORBELL => Some(GuestRequest::Ready),
            RESPONSE_DOORBELL => Some(GuestRequest::MailboxResponse),
            IDLE_DOORBELL => Some(GuestRequest::Idle),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_doorbell() {
        let mut p = ControlPage::with_seed(7, FLAG_SERVE, [0xab; SEED_LEN]);
        let mut w = [0u8; 4];
        p.read(0, &mut w);
        assert_eq!(u32::from_le_bytes(w), MAGIC);
        let mut q = [0u8; 8];
        p.read(CLONE_ID_OFFSET, &mut q);
        assert_eq!(u64::from_le_bytes(q), 7);
        p.read(FLAGS_OFFSET, &mut q);
        assert_eq!(u64::from_le_bytes(q), FLAG_SERVE);
        p.read(SEED_OFFSET + 24, &mut q);
        assert_eq!(q, [0xab; 8]);
        // The wall clock, as of the read.
        let before = realtime_ns();
        p.read(REALTIME_OFFSET, &mut q);
        assert!((before..=realtime_ns()).contains(&u64::from_le_bytes(q)));
        // Past the registers: zeros, never a panic.
        p.read(0xff8, &mut q);
        assert_eq!(q, [0; 8]);
        p.read(u64::MAX, &mut q);
        assert_eq!(q, [0; 8]);
        assert_eq!(p.write(READY_DOORBELL, &[1]), Some(GuestRequest::Ready));
        assert_eq!(p.write(RESPONSE_DOORBELL, &[1]), Some(GuestRequest::MailboxResponse));
        assert_eq!(p.write(IDLE_DOORBELL, &[1]), Some(GuestRequest::Idle));
        assert_eq!(p.write(0, &[1]), None);
    }

    #[test]
    fn every_page_gets_its_own_seed() {
        let (mut a, mut b) = (ControlPage::new(1, 0).unwrap(), ControlPage::new(1, 0).unwrap());
        let (mut sa, mut sb) = ([0u8; SEED_LEN], [0u8; SEED_LEN]);
        a.read(SEED_OFFSET, &mut sa);
        b.read(SEED_OFFSET, &mut sb);
        assert_ne!(sa, sb);
    }
}
