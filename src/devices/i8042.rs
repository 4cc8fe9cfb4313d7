//! The i8042 keyboard controller, as much of it as a microVM uses: the reset line (command 0xfe on
//! port 0x64 ends the VM) and a keyboard that can press Ctrl+Alt+Del (Firecracker's
//! `SendCtrlAltDel`: a Linux guest with the i8042 and AT keyboard drivers reboots, which ends the
//! VM). The guest's driver probes the controller through its command/status port and reads bytes
//! from its data port, one per keyboard interrupt (IRQ 1).
//!
//! Like Firecracker's, this controller keeps no state in snapshots: a restored guest's driver finds
//! it as a booted driver leaves it (keyboard interrupt on, output buffer empty).

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, GuestRequest};
use crate::channel::mailbox::Mailbox;

pub const I8042_DATA_PORT: u64 = 0x60;
/// Ports 0x60-0x64: data at offset 0, command/status at offset 4.
pub const I8042_PORTS: u64 = 5;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

const OFS_DATA: u64 = 0;
const OFS_COMMAND: u64 = 4;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
/// The last write to port 0x64 was a command whose parameter comes next on port 0x60.
const STATUS_COMMAND_DATA: u8 = 0x08;
/// The keyboard is not locked.
const STATUS_UNLOCKED: u8 = 0x10;

// Control register (CTR) bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;

// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;

/// Ctrl, Alt and Delete pressed, in scan code set 2 (an untranslated AT keyboard's codes).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// The controller's output buffer, in bytes.
const BUFFER: usize = 16;

/// Why a key press could not be delivered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the i8042's output buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
}

/// The controller and its keyboard.
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    /// A command waiting for its parameter byte.
    pending: Option<u8>,
    out: VecDeque<u8>,
    /// IRQ 1, and the mailbox whose parked vCPU must go back to the guest to take it.
    irq: Option<(EventFd, Arc<Mailbox>)>,
}

impl Default for I8042 {
    /// A controller without a keyboard interrupt wired (unit tests).
    fn default() -> Self {
        Self { ctr: CTR_SYSTEM | CTR_KBD_INTERRUPT, output_port: 0, pending: None, out: VecDeque::new(), irq: None }
    }
}

impl I8042 {
    /// A controller whose keyboard interrupts go to `irq` (an irqfd for [`KBD_IRQ`]).
    pub fn new(irq: EventFd, mailbox: Arc<Mailbox>) -> Self {
        Self { irq: Some((irq, mailbox)), ..Self::default() }
    }

    /// Presses Ctrl+Alt+Del on the keyboard.
    pub fn ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUFFER - self.out.len() < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        self.out.extend(CTRL_ALT_DEL);
        self.interrupt();
        Ok(())
    }

    fn status(&self) -> u8 {
        let full = if self.out.is_empty() { 0 } else { STATUS_OUTPUT_FULL };
        let command = if self.pending.is_some() { STATUS_COMMAND_DATA } else { 0 };
        STATUS_SYSTEM | STATUS_UNLOCKED | full | command
    }

    /// Raises the keyboard interrupt, if the guest enabled it (one byte per interrupt).
    fn interrupt(&self) {
        if self.ctr & CTR_KBD_INTERRUPT == 0 || self.out.is_empty() {
            return;
        }
        if let Some((irq, mailbox)) = &self.irq {
            if let Err(e) = irq.write(1) {
                crate::log_limited!(warn, "i8042: cannot signal the keyboard interrupt: {e}");
            }
            mailbox.wake();
        }
    }

    /// A controller command's answer: what the output buffer holds now.
    fn answer(&mut self, byte: u8) {
        self.out.clear();
        self.out.push_back(byte);
    }

    fn command(&mut self, cmd: u8) -> Option<GuestRequest> {
        match cmd {
            CMD_RESET_CPU => return Some(GuestRequest::Reset),
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.answer(0x55),
            CMD_KBD_TEST => self.answer(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            // The auxiliary (mouse) port and everything else: there is nothing behind them.
            _ => {}
        }
        None
    }

    /// A byte written to the data port: a pending command's parameter, else a byte for the
    /// keyboard, which acknowledges it (and answers a reset with its self-test result).
    fn data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(_) => self.output_port = byte,
            None => {
                self.out.clear();
                self.out.push_back(KBD_ACK);
                if byte == 0xff {
                    self.out.push_back(KBD_SELF_TEST_PASSED);
                }
                self.interrupt();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            OFS_COMMAND => self.status(),
            OFS_DATA => {
                let byte = self.out.pop_front().unwrap_or(0);
                // The next byte gets its own interrupt.
                self.interrupt();
                byte
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        let &b = data.first()?;
        match offset {
            OFS_COMMAND => self.command(b),
            OFS_DATA => {
                self.data(b);
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(k: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        k.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_a_reset() {
        let mut k = I8042::default();
        assert_eq!(read(&mut k, 4) & 0x02, 0, "input buffer must read as empty");
        assert_eq!(k.write(4, &[0xfe]), Some(GuestRequest::Reset));
        assert_eq!(k.write(4, &[0x20]), None);
    }

    #[test]
    fn a_drivers_probe_is_answered() {
        let mut k = I8042::default();
        k.write(4, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut k, 4) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut k, 0), 0x55);
        assert_eq!(read(&mut k, 4) & STATUS_OUTPUT_FULL, 0);
        // The control register, written and read back.
        k.write(4, &[CMD_WRITE_CTR]);
        assert_ne!(read(&mut k, 4) & STATUS_COMMAND_DATA, 0);
        k.write(0, &[0x45]);
        k.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut k, 0), 0x45);
        // A byte for the keyboard is acknowledged; a reset also passes its self-test.
        k.write(0, &[0xff]);
        assert_eq!((read(&mut k, 0), read(&mut k, 0)), (KBD_ACK, KBD_SELF_TEST_PASSED));
    }

    #[test]
    fn ctrl_alt_del_is_pressed_until_the_buffer_is_full() {
        let mut k = I8042::default();
        for _ in 0..BUFFER / CTRL_ALT_DEL.len() {
            k.ctrl_alt_del().unwrap();
        }
        assert_eq!(k.ctrl_alt_del(), Err(I8042Error::BufferFull));
        let bytes: Vec<u8> = (0..4).map(|_| read(&mut k, 0)).collect();
        assert_eq!(bytes, CTRL_ALT_DEL);
    }
}
