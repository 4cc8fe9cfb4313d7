//! The i8042 keyboard controller, as far as a guest's reset goes (vm-superio): the 0xfe command on
//! port 0x64 pulses the reset line, which ends the VM.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::{I8042Device, Trigger};

use super::{BusDevice, GuestRequest};

pub const I8042_DATA_PORT: u64 = 0x60;
/// Ports 0x60-0x64: data at offset 0, command/status at offset 4.
pub const I8042_PORTS: u64 = 5;

#[derive(Default)]
pub struct ResetLine(AtomicBool);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl Default for I8042 {
    fn default() -> Self {
        Self { dev: I8042Device::new(ResetLine::default()) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(o), [b, ..]) = (u8::try_from(offset), &mut *data) {
            *b = self.dev.read(o);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if let (Ok(o), [b, ..]) = (u8::try_from(offset), data) {
            let _ = self.dev.write(o, *b);
        }
        self.dev.reset_evt().0.swap(false, Ordering::Relaxed).then_some(GuestRequest::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset() {
        let mut k = I8042::default();
        let mut status = [0xffu8];
        k.read(4, &mut status);
        assert_eq!(status[0] & 0x02, 0, "input buffer must read as empty");
        assert_eq!(k.write(4, &[0xfe]), Some(GuestRequest::Reset));
        assert_eq!(k.write(4, &[0x20]), None);
    }
}
