//! Address-range dispatch for port I/O and MMIO.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::{BusDevice, GuestRequest};
use crate::sys::Locked;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

/// No device claims the address of an access.
#[derive(Debug, PartialEq, Eq)]
pub struct Unclaimed;

struct Slot {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges. Built once, then shared read-only by every vCPU thread.
#[derive(Default)]
pub struct Bus {
    slots: Vec<Slot>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        if self.slots.iter().any(|s| base < s.base + s.len && s.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.slots.partition_point(|s| s.base < base);
        self.slots.insert(at, Slot { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Slot, u64)> {
        let i = self.slots.partition_point(|s| s.base <= addr).checked_sub(1)?;
        let s = &self.slots[i];
        (addr - s.base < s.len).then_some((s, addr - s.base))
    }

    /// Reads from the device at `addr`; false (and `data` untouched) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((slot, offset)) => {
                slot.device.locked().read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `Err(Unclaimed)` when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<GuestRequest>, Unclaimed> {
        match self.find(addr) {
            Some((slot, offset)) => Ok(slot.device.locked().write(offset, data)),
            None => Err(Unclaimed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
            self.last = Some((offset, data.to_vec()));
            None
        }
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x3f7, &mut d));
        assert_eq!(bus.write(0x3f9, &[7]), Ok(None));
        assert_eq!(a.lock().unwrap().last, Some((1, vec![7])));
        assert_eq!(bus.write(0x61, &[7]), Err(Unclaimed));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::Overlap { base: 0x10f, len: 1 })
        );
        assert_eq!(
            bus.insert(0xf8, 0x10, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::Overlap { base: 0xf8, len: 0x10 })
        );
        assert!(bus.insert(0x110, 1, Arc::new(Mutex::new(Recorder::default()))).is_ok());
        assert!(bus.insert(0x200, 0, Arc::new(Mutex::new(Recorder::default()))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Recorder::default()))).is_err());
    }
}
