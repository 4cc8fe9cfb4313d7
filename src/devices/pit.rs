//! The PIT's ports (0x40-0x43) in a clone made without a PIT (its snapshot's guest had left the
//! PIT stopped: see `VmState::pit_in_use` in the VMM). Where KVM emulates the PIT, its accesses
//! never leave the kernel and this device sees none. Reads answer 0xff, as for any unclaimed port,
//! and writes are ignored; the first access of a VM is logged, so that a guest that goes back to
//! its PIT after the snapshot shows up in ember's log.

use super::{BusDevice, GuestRequest};

pub const PIT_PORT: u64 = 0x40;
/// Channels 0-2 and the mode/command register.
pub const PIT_PORTS: u64 = 4;

#[derive(Default)]
pub struct AbsentPit {
    reported: bool,
}

impl AbsentPit {
    fn report(&mut self, what: &str, offset: u64) {
        if !std::mem::replace(&mut self.reported, true) {
            tracing::warn!(
                "the guest {what} port {:#x} of a PIT this VM lacks (its snapshot's guest had left the PIT \
                 stopped with its interrupt masked): ignored, as every later access",
                PIT_PORT + offset
            );
        }
    }

    /// Whether an access was reported.
    pub fn reported(&self) -> bool {
        self.reported
    }
}

impl BusDevice for AbsentPit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.report("read", offset);
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, _data: &[u8]) -> Option<GuestRequest> {
        self.report("wrote", offset);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_answer_all_ones_and_the_first_access_is_reported() {
        let mut p = AbsentPit::default();
        assert!(!p.reported());
        let mut d = [0u8; 1];
        p.read(0, &mut d);
        assert_eq!(d, [0xff]);
        assert!(p.reported());
        assert_eq!(p.write(3, &[0x34]), None);
    }
}
