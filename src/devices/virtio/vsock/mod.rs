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
//! new ones work. A snapshot with none (a template at its ready point) restores without one, so a
//! clone does not begin by handling an interrupt.
//!
//! The device is four parts: this front end (what the transport sees), the `worker` thread that
//! serves the queues and host sockets, the connections' state (`conn`) and the TX packet parser
//! ([`packet`], shared with the fuzz target).

mod conn;
pub mod packet;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use std::os::unix::net::UnixListener;

use super::thread::{DeviceThread, QueueFront, Threads};
use super::{Interrupt, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::DeviceError;
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
    front: QueueFront<Activation>,
}

/// vsock's own state in a snapshot.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct VsockState {
    /// The guest may hold connections (or a reset is still owed to it): a restored device tells
    /// the guest to reset them.
    connections: bool,
}

impl VsockState {
    fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    fn decode(state: &[u8]) -> Result<Self, DeviceError> {
        bincode::serde::decode_from_slice(state, bincode::config::standard().with_limit::<64>())
            .map(|(s, _)| s)
            .map_err(|e| DeviceError::BadState(format!("virtio-vsock: {e}")))
    }
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
                let l = UnixListener::bind(p).map_err(DeviceError::io(format!("vsock socket {}", p.display())))?;
                // Only its owner may connect to the guest.
                std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(DeviceError::io(format!("vsock socket {}", p.display())))?;
                l.set_nonblocking(true).map_err(DeviceError::io("vsock socket"))?;
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

    /// Whether the guest may hold connections, as the device's thread saw it when it paused
    /// (empty when it did not answer: the restored device then resets).
    fn save_state(&self) -> Vec<u8> {
        self.front.paused_state().map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// The connections' host ends do not survive a restore: a restored device resets the
    /// guest's connections when it starts if the snapshot says the guest may hold any, or says
    /// nothing (a snapshot made before this was saved).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        self.reset_on_start = match state {
            [] => true,
            _ => VsockState::decode(state)?.connections,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut dev = Vsock::new(None, &Threads::new(None)).unwrap();
        let restored = |dev: &mut Vsock, state: &[u8]| dev.restore_state(state).map(|()| dev.reset_on_start);
        assert!(!restored(&mut dev, &VsockState { connections: false }.encode()).unwrap());
        assert!(restored(&mut dev, &VsockState { connections: true }.encode()).unwrap());
        // A snapshot that does not say (made before this was saved): reset.
        assert!(restored(&mut dev, &[]).unwrap());
        assert!(restored(&mut dev, &[0xff; 9]).is_err(), "a malformed state is refused");
        // What a paused device saves: what its thread saw (no connection here).
        dev.pause();
        assert_eq!(VsockState::decode(&dev.save_state()).unwrap(), VsockState { connections: false });
        dev.resume();
        assert!(dev.save_state().is_empty(), "a running device has no state to save");
    }
}
