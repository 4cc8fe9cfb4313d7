//! Ctrl+Alt+Del on the VM's keyboard (the host's `SendCtrlAltDel`, Firecracker's API) reboots the
//! guest, which ends the VM: what an init does on that key press. The i8042 keyboard's presses
//! arrive as input events on `/dev/input/event*`, read by a thread that sleeps in `read` until
//! a key is pressed (no polling, nothing to do in a clone until then).

use std::io::Read;

/// `struct input_event` on x86-64: a timeval, then type, code and value.
const EVENT_BYTES: usize = 24;
const EV_KEY: u16 = 1;
const KEY_LEFTCTRL: u16 = 29;
const KEY_LEFTALT: u16 = 56;
const KEY_RIGHTCTRL: u16 = 97;
const KEY_RIGHTALT: u16 = 100;
const KEY_DELETE: u16 = 111;

/// Which modifier keys are down.
#[derive(Default)]
struct Keys {
    ctrl: bool,
    alt: bool,
}

impl Keys {
    /// Takes one event; true when it completes Ctrl+Alt+Del.
    fn event(&mut self, e: &[u8; EVENT_BYTES]) -> bool {
        let kind = u16::from_ne_bytes([e[16], e[17]]);
        let code = u16::from_ne_bytes([e[18], e[19]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        if kind != EV_KEY {
            return false;
        }
        let down = value != 0;
        match code {
            KEY_LEFTCTRL | KEY_RIGHTCTRL => self.ctrl = down,
            KEY_LEFTALT | KEY_RIGHTALT => self.alt = down,
            KEY_DELETE => return down && self.ctrl && self.alt,
            _ => {}
        }
        false
    }
}

/// Watches the keyboard (when the kernel has one) on a thread of its own; calls `reboot` on
/// Ctrl+Alt+Del.
pub fn watch(reboot: fn() -> !) {
    let _ = std::thread::Builder::new().name("keyboard".into()).spawn(move || {
        // The keyboard registers as the kernel boots; a kernel without one has no event device.
        let Some(mut dev) = (0..4).find_map(|i| std::fs::File::open(format!("/dev/input/event{i}")).ok()) else {
            return;
        };
        let mut keys = Keys::default();
        let mut e = [0u8; EVENT_BYTES];
        while dev.read_exact(&mut e).is_ok() {
            if keys.event(&e) {
                println!("ember-agent: Ctrl+Alt+Del, rebooting");
                reboot();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u16, value: i32) -> [u8; EVENT_BYTES] {
        let mut e = [0u8; EVENT_BYTES];
        e[16..18].copy_from_slice(&EV_KEY.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_ctrl_alt_del_reboots() {
        let mut k = Keys::default();
        assert!(!k.event(&key(KEY_DELETE, 1)), "Delete alone");
        assert!(!k.event(&key(KEY_LEFTCTRL, 1)));
        assert!(!k.event(&key(KEY_DELETE, 1)), "Ctrl+Delete");
        assert!(!k.event(&key(KEY_RIGHTALT, 1)));
        assert!(k.event(&key(KEY_DELETE, 1)), "Ctrl+Alt+Del");
        assert!(!k.event(&key(KEY_LEFTCTRL, 0)));
        assert!(!k.event(&key(KEY_DELETE, 1)), "Ctrl released");
    }
}
