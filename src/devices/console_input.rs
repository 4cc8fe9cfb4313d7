//! Console input: bytes from the host (ember's stdin) fed into the UART's receive FIFO, on an
//! event-manager loop that runs beside the vCPU threads for as long as the VM runs.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::serial::SerialDevice;
use crate::sys::Locked;

const DATA_INPUT: u32 = 1;
const DATA_STOP: u32 = 2;

struct ConsoleInput {
    input: std::fs::File,
    serial: Arc<Mutex<SerialDevice>>,
    stop: EventFd,
    stopped: bool,
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.input, DATA_INPUT, EventSet::IN));
        let _ = ops.add(Events::with_data(&self.stop, DATA_STOP, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_STOP => self.stopped = true,
            _ => {
                let mut buf = [0u8; 64];
                match self.input.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let taken = self.serial.locked().enqueue_input(&buf[..n]);
                        if taken < n {
                            tracing::debug!("console input: guest FIFO full, {} bytes dropped", n - taken);
                        }
                    }
                    // End of input (or an error): stop watching it; the VM keeps running.
                    _ => {
                        let _ = ops.remove(events);
                    }
                }
            }
        }
    }
}

/// A running console-input loop; dropping it does not stop it, [`ConsoleInputLoop::stop`] does.
pub struct ConsoleInputLoop {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl ConsoleInputLoop {
    /// Starts forwarding `input` to `serial`.
    pub fn start(input: OwnedFd, serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let sub = Arc::new(Mutex::new(ConsoleInput {
            input: std::fs::File::from(input),
            serial,
            stop: stop.try_clone()?,
            stopped: false,
        }));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        manager.add_subscriber(sub.clone());
        let thread = std::thread::Builder::new().name("console-input".into()).spawn(move || loop {
            if manager.run().is_err() || sub.lock().map(|s| s.stopped).unwrap_or(true) {
                break;
            }
        })?;
        Ok(Self { stop, thread })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

/// A duplicate of this process's stdin, for [`ConsoleInputLoop::start`].
pub fn stdin() -> std::io::Result<OwnedFd> {
    use std::os::fd::AsFd;
    std::io::stdin().as_fd().try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn forwards_input_to_the_uart_until_stopped() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, Box::new(std::io::sink()))));
        let (r, mut w) = std::io::pipe().unwrap();
        let l = ConsoleInputLoop::start(OwnedFd::from(r), serial.clone()).unwrap();
        w.write_all(b"x").unwrap();
        let mut got = [0u8];
        // (A generous bound on the input thread's one forwarded byte: a loaded machine may not
        // run it for a while.)
        for _ in 0..6000 {
            // Line status bit 0: data ready.
            let mut lsr = [0u8];
            crate::devices::BusDevice::read(&mut *serial.lock().unwrap(), 5, &mut lsr);
            if lsr[0] & 1 == 1 {
                crate::devices::BusDevice::read(&mut *serial.lock().unwrap(), 0, &mut got);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(&got, b"x");
        drop(w);
        l.stop();
    }
}
