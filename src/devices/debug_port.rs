//! ember's guest -> VMM ports, written by ember's guest kernel (guest/kernel/patches/0004):
//! - port 0x80, boot progress markers: 0x40 when start_kernel() runs, 0x41 just before init. The
//!   VMM timestamps them so kernel time and user-space time can be told apart.
//! - port 0xf4, the exit port: 0 powers the VM off, 1 reports a kernel panic.

use std::sync::Arc;

use super::boot_timer::BootClock;
use super::{BusDevice, GuestRequest};

pub const DEBUG_PORT: u64 = 0x80;
pub const EXIT_PORT: u64 = 0xf4;

pub const MARKER_KERNEL_START: u8 = 0x40;
pub const MARKER_RUN_INIT: u8 = 0x41;
pub const EXIT_POWER_OFF: u8 = 0;
pub const EXIT_PANIC: u8 = 1;

/// Port 0x80: boot progress markers.
pub struct DebugPort {
    clock: Arc<BootClock>,
}

impl DebugPort {
    pub fn new(clock: Arc<BootClock>) -> Self {
        Self { clock }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<GuestRequest> {
        let recorded = match data.first() {
            Some(&MARKER_KERNEL_START) => self.clock.record(|t| &mut t.kernel_start).map(|e| ("kernel start", e)),
            Some(&MARKER_RUN_INIT) => self.clock.record(|t| &mut t.run_init).map(|e| ("kernel runs init", e)),
            Some(code) => {
                tracing::debug!("debug port: {code:#04x}");
                None
            }
            None => None,
        };
        if let Some((what, e)) = recorded {
            tracing::info!("guest {what}: {e}");
        }
        None
    }
}

/// Port 0xf4: the guest ends the VM.
#[derive(Default)]
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<GuestRequest> {
        match data.first() {
            Some(&EXIT_POWER_OFF) => Some(GuestRequest::PowerOff),
            Some(&EXIT_PANIC) => Some(GuestRequest::Panic),
            Some(code) => {
                crate::log_limited!(warn, "exit port: unknown code {code:#04x} ignored");
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn markers_are_timestamped() {
        let clock = BootClock::new(Instant::now());
        let mut p = DebugPort::new(clock.clone());
        p.write(0, &[0x12]);
        assert!(clock.timeline().kernel_start.is_none());
        p.write(0, &[MARKER_KERNEL_START]);
        p.write(0, &[MARKER_RUN_INIT]);
        let t = clock.timeline();
        assert!(t.kernel_start.unwrap().since_vm <= t.run_init.unwrap().since_vm);
    }

    #[test]
    fn exit_codes() {
        let mut p = ExitPort;
        assert_eq!(p.write(0, &[0]), Some(GuestRequest::PowerOff));
        assert_eq!(p.write(0, &[1]), Some(GuestRequest::Panic));
        assert_eq!(p.write(0, &[9]), None);
        assert_eq!(p.write(0, &[]), None);
    }
}
