//! The 8250 UART on COM1 (vm-superio), raising IRQ 4 through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, GuestRequest, Persist};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const UART_PORTS: u64 = 8;

/// Raises the UART's interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, in a serde-encodable shape).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Why the UART's state could not be restored (saving it cannot fail).
#[derive(Debug, Error)]
pub enum SerialError {
    /// A state no UART can be in (vm-superio refuses it: a receive FIFO past its size).
    #[error("the UART's state in the snapshot is not one a UART can be in: {0}")]
    BadState(String),
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self { uart: Serial::new(IrqTrigger(irq), out) }
    }

    /// Input for the guest (its console's receive FIFO); returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl Persist for SerialDevice {
    type State = UartState;
    /// The interrupt's irqfd and where the console goes.
    type Args = (EventFd, ConsoleOut);
    type Error = SerialError;

    fn save(&self) -> Result<UartState, SerialError> {
        Ok(self.uart.state().into())
    }

    /// A UART in a snapshot's state; fails if the state is not one a UART can be in.
    fn restore((irq, out): Self::Args, state: &UartState) -> Result<Self, SerialError> {
        let uart = Serial::from_state(&SerialState::from(state), IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(Self { uart })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(o), [b, ..]) = (u8::try_from(offset), &mut *data) {
            *b = self.uart.read(o);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if let (Ok(o), [b, ..]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(o, *b) {
                tracing::debug!("serial write failed: {e:?}");
            }
            if o == 0 && *b == b'\n' {
                let _ = self.uart.writer_mut().flush();
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_the_interrupt_when_enabled() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the "transmitter holding register empty" interrupt (IER bit 1).
        s.write(1, &[0x02]);
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn state_round_trip() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(1, &[0x02]);
        s.write(7, &[0x5a]);
        s.enqueue_input(b"xy");
        let st = s.save().unwrap();
        let mut r = SerialDevice::restore((irq.try_clone().unwrap(), Box::new(std::io::sink())), &st).unwrap();
        assert_eq!(r.save().unwrap(), st);
        let mut d = [0u8];
        r.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        r.read(0, &mut d);
        assert_eq!(d[0], b'x');
        // The typed state survives the snapshot's encoding unchanged.
        let bytes = bincode::serde::encode_to_vec(&st, bincode::config::standard()).unwrap();
        let (decoded, _): (UartState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, st);
        // A state no UART can be in: a typed error, no panic.
        let bad = UartState { in_buffer: vec![0; 4096], ..st };
        let e = SerialDevice::restore((irq, Box::new(std::io::sink())), &bad).err().unwrap();
        assert!(matches!(e, SerialError::BadState(_)), "{e}");
    }

    #[test]
    fn receives_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(std::io::sink()));
        assert_eq!(s.enqueue_input(b"ab"), 2);
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'a');
    }
}
