//! virtio-vsock with its host side on a Unix socket, compatible with Firecracker's hybrid vsock:
//!
//! - host -> guest: connect to the socket at `path`, send `CONNECT <port>\n`; once the guest
//!   accepts, ember answers `OK <host port>\n` and the stream carries the connection's bytes. If
//!   nothing listens on the port in the guest, ember closes the stream.
//! - guest -> host: a connection to host (CID 2) port P is connected to the Unix socket
//!   `<path>_<P>`.
//!
//! Packets are parsed by rust-vmm's virtio-vsock from the guest's descriptor chains; everything
//! in them (addresses, lengths, ports, operations) is checked before use, and a malformed chain is
//! returned to the guest unused. Flow control follows the virtio-vsock credit scheme in both
//! directions. After a restore of a snapshot taken while the guest held connections, the device
//! sends the guest a transport reset: those connections are reset (their host sides are gone) and
//! new ones work. A host connection made before the guest has handled the reset (it gives its
//! event buffer back) waits until it has, and wakes the guest to do it: taken before, it would be
//! reset with the others, silently. A snapshot with none (a template at its ready point)
//! restores without one, so a clone does not begin by handling an interrupt. Which it is ([`VsockState`]) is what the
//! device's thread saw when it paused; a running device's thread that did not pause cannot say,
//! and its save fails ([`VsockError`]) rather than guess.
//!
//! The device is four parts: this front end (what the transport sees), the `worker` thread that
//! serves the queues and host sockets, the connections' state (`conn`) and the TX packet parser
//! ([`packet`], shared with the fuzz target).

mod conn;
pub mod packet;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::thread::{DeviceThread, NotPaused, QueueFront, Threads};
use super::{Interrupt, QueueSnapshot, VirtioDevice, VirtioState, VirtioStateError, VIRTIO_F_VERSION_1, VSOCK};
use crate::devices::{DeviceError, Persist};
use crate::memory::GuestMemory;
pub use worker::drive_packets;
use worker::Worker;

pub const VSOCK_DEVICE_ID: u32 = 19;
pub const HOST_CID: u64 = 2;
pub const GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const QUEUES: usize = 3;
/// The largest packet payload ember accepts from the guest (Linux sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 << 10;
/// The receive buffer ember advertises per connection.
const BUF_ALLOC: u32 = 256 << 10;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The vsock device. Its host socket, queue events and thread are created with it (before any
/// vCPU runs and is confined), so that activation, which happens on a vCPU thread, only hands the
/// queues over.
pub struct Vsock {
    path: Option<PathBuf>,
    queue_events: Vec<EventFd>,
    /// A restored device tells the guest to reset its connections when it starts.
    reset_on_start: bool,
    front: QueueFront<Activation, VsockState>,
}

/// vsock's own state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest may hold connections (or a reset is still owed to it): a restored device tells
    /// the guest to reset them.
    pub connections: bool,
}

/// Why vsock's state could not be saved (any saved state restores).
#[derive(Debug, Error)]
pub enum VsockError {
    /// The device runs and its thread has not told what it holds: it was not paused, or did not
    /// answer the pause in time.
    #[error("cannot tell whether the guest holds connections: {0}")]
    NotPaused(#[from] NotPaused),
}

/// What activation hands the worker thread.
struct Activation {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
    /// Tell the guest to reset its connections first (a restored device).
    reset: bool,
}

impl Vsock {
    /// The name of the device's thread.
    pub const THREAD: &'static str = "vsock";

    /// A device whose host side listens at `path` (none: guest connections are refused), its
    /// thread from `threads`.
    pub fn new(path: Option<&Path>, threads: &Threads) -> Result<Self, DeviceError> {
        let listener = match path {
            Some(p) => {
                // Only its owner may connect to the guest.
                let l =
                    crate::sys::listen_private(p).map_err(DeviceError::io(format!("vsock socket {}", p.display())))?;
                Some(l)
            }
            None => None,
        };
        let setup = DeviceError::io("vsock setup");
        let make = || -> std::io::Result<_> {
            let queue_events: Vec<EventFd> =
                (0..QUEUES).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<_, _>>()?;
            let worker = Worker::new(listener, path, &queue_events)?;
            let thread = DeviceThread::spawn(Vsock::THREAD, threads, move |commands| worker.run(commands))?;
            Ok((queue_events, thread))
        };
        let (queue_events, thread) = make().map_err(setup)?;
        Ok(Self {
            path: path.map(Path::to_path_buf),
            queue_events,
            reset_on_start: false,
            front: QueueFront::new(thread),
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The thread stops (and is joined) when `thread` drops, after this.
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cid = GUEST_CID.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| cid.get(o.checked_add(i)?)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), DeviceError> {
        let reset_on_start = &mut self.reset_on_start;
        self.front.activate("vsock", QUEUES, queues, |queues| Activation {
            mem,
            queues,
            interrupt,
            reset: std::mem::take(reset_on_start),
        })
    }

    fn reset(&mut self) {
        self.front.reset();
    }

    fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
        self.front.queue_snapshots()
    }

    fn pause(&mut self) {
        self.front.pause();
    }

    fn resume(&mut self) {
        self.front.resume();
    }

    fn save_state(&self) -> Result<VirtioState, VirtioStateError> {
        Ok(VirtioState::Vsock(self.save()?))
    }

    fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError> {
        let VirtioState::Vsock(state) = state else { return Err(VirtioStateError::mismatch(state, VSOCK)) };
        Ok(Box::new(Self::restore(*self, state)?))
    }
}

impl Persist for Vsock {
    type State = VsockState;
    /// The device as made for the new VM ([`Vsock::new`]: its socket bound, its thread started).
    type Args = Vsock;
    type Error = VsockError;

    /// Whether the guest may hold connections: for a running device, as its thread saw it when it
    /// paused (an error when it did not pause: nothing stands in for what it would have said);
    /// for one the driver has not activated (or reset), only whether a reset is still owed to
    /// the guest (a restored device not yet started).
    fn save(&self) -> Result<VsockState, VsockError> {
        if !self.front.is_active() {
            return Ok(VsockState { connections: self.reset_on_start });
        }
        Ok(self.front.paused_state()?.clone())
    }

    /// The connections' host ends do not survive a restore: a restored device resets the
    /// guest's connections when it starts if the snapshot says the guest may hold any.
    fn restore(mut dev: Vsock, state: &VsockState) -> Result<Self, VsockError> {
        dev.reset_on_start = state.connections;
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn config_space_reads_the_cid_and_nothing_past_it() {
        let dev = Vsock::new(None, &Threads::new(None)).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), GUEST_CID);
        dev.read_config(4, &mut b);
        assert_eq!(b, [0; 8]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn a_restored_device_resets_the_guests_connections_only_when_it_may_hold_some() {
        let restored = |state: &VsockState| {
            let dev = Vsock::restore(Vsock::new(None, &Threads::new(None)).unwrap(), state).unwrap();
            dev.reset_on_start
        };
        assert!(!restored(&VsockState { connections: false }));
        assert!(restored(&VsockState { connections: true }));
    }

    #[test]
    fn the_typed_state_round_trips() {
        for connections in [false, true] {
            let state = VsockState { connections };
            let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard()).unwrap();
            let (decoded, _): (VsockState, _) =
                bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
            assert_eq!(decoded, state);
            // Restored and not yet started: saved again as it came (a reset still owed).
            let boxed: Box<dyn VirtioDevice> = Box::new(Vsock::new(None, &Threads::new(None)).unwrap());
            let dev = boxed.restore_state(&VirtioState::Vsock(decoded)).unwrap();
            assert_eq!(dev.save_state().unwrap(), VirtioState::Vsock(state));
        }
        // Another kind of device's state: refused.
        let boxed: Box<dyn VirtioDevice> = Box::new(Vsock::new(None, &Threads::new(None)).unwrap());
        let e = boxed.restore_state(&VirtioState::Stateless).err().unwrap();
        assert!(matches!(e, VirtioStateError::Mismatch { saved: "stateless", here: "vsock" }), "{e}");
    }

    #[test]
    fn a_running_device_is_saved_only_once_its_thread_paused() {
        let mut dev = Vsock::new(None, &Threads::new(None)).unwrap();
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let mailbox = Arc::new(crate::channel::mailbox::Mailbox::create(None).unwrap());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), mailbox));
        let queues = (0..QUEUES).map(|_| Queue::new(QUEUE_SIZE).unwrap()).collect();
        dev.activate(mem, queues, interrupt).unwrap();
        // Running, not paused: an error, not a state made up for it.
        let e = dev.save().unwrap_err();
        assert!(matches!(e, VsockError::NotPaused(NotPaused::Running)), "{e}");
        assert!(dev.save_state().is_err());
        // Paused: what its thread saw (no connection here).
        dev.pause();
        assert_eq!(dev.save().unwrap(), VsockState { connections: false });
        dev.resume();
        assert!(dev.save().is_err(), "resumed, it runs again");
        // Reset by the driver: it holds no connection.
        dev.reset();
        assert_eq!(dev.save().unwrap(), VsockState { connections: false });
    }
}
