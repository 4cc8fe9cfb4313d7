//! virtio devices: the contract every device meets ([`VirtioDevice`]) and the virtio-mmio
//! transport ([`mmio`]) that shows any of them to the guest. Rings come from virtio-queue; the
//! guest's queue notifications arrive on ioeventfds (no exit to ember) and interrupts go in
//! through irqfds.
//!
//! A device is a folder here (`vsock/`, `net/`): its front end implements [`VirtioDevice`] and
//! [`Persist`](super::Persist) (its own typed snapshot state and error), its state is one variant
//! of [`VirtioState`] (which `save_state` / `restore_state` carry through the transport), and it
//! is assembled with one line in `vmm::devices`.

pub mod block;
pub mod mmio;
pub mod net;
pub mod ring;
pub mod thread;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::channel::mailbox::Mailbox;
use crate::memory::GuestMemory;

/// The virtio 1.x feature every ember device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a virtio device provides to the transport. The device creates its queue notification
/// eventfds (and any thread that waits on them) with itself, before any vCPU runs and is confined;
/// the VMM registers those eventfds as ioeventfds on the transport's QueueNotify register.
pub trait VirtioDevice: Send {
    /// The virtio device id (19: vsock, 2: block, 1: net).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the guest notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// The features the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads the device's configuration space (zeros past its end).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device's configuration space (ignored by devices whose configuration is
    /// read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The features the driver took, told before [`VirtioDevice::activate`] (also on a restore).
    fn negotiated(&mut self, _features: u64) {}
    /// Starts the device with the driver's queues. Called on a (confined) vCPU thread: a device
    /// prepares its thread and file descriptors when it is created, and only hands work over here.
    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), DeviceError>;
    /// Stops the device (driver reset, or the VM ends).
    fn reset(&mut self);
    /// Stops touching the queues and guest memory (the VM is paused to be saved); returns once
    /// the device's own thread has stopped. A device without a thread has nothing to do.
    fn pause(&mut self) {}
    /// Goes on after [`VirtioDevice::pause`].
    fn resume(&mut self) {}
    /// The live queues' state, while the device runs.
    fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>>;
    /// The device's own state for a snapshot, beyond the transport's negotiation and queues: its
    /// [`Persist::save`](super::Persist::save), in its variant. An error fails the snapshot.
    fn save_state(&self) -> Result<VirtioState, VirtioStateError>;
    /// The device (as made for the new VM) given its own state back from a snapshot, before the
    /// transport activates it again: its [`Persist::restore`](super::Persist::restore). A state of
    /// another kind of device is refused. Called on every restored device: one whose host side
    /// does not survive a restore (vsock's connections) prepares to tell the guest.
    fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError>;
    /// Serves the device from another host file from now on (a drive's backing file); devices
    /// without one refuse.
    fn replace_file(&mut self, _path: &std::path::Path) -> Result<(), DeviceError> {
        let source = std::io::Error::new(std::io::ErrorKind::Unsupported, "it has no backing file to replace");
        Err(DeviceError::Io { what: DeviceKind(self.device_type()).to_string(), source })
    }
    /// The device's counters since they were last taken, under the name its group is reported
    /// by (`block_ID`, `net_ID`); devices without counters have none.
    fn take_counters(&self) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
        None
    }
}

/// A virtio device's own state in a snapshot: one variant per kind of device, each the device's
/// [`Persist::State`](super::Persist::State).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioState {
    Block(block::BlockState),
    Net(net::NetState),
    Vsock(vsock::VsockState),
    /// A device with no state of its own (the transport's stand-in device, [`mmio::drive_registers`]).
    Stateless,
    /// The transport's unit-test device.
    #[cfg(test)]
    Test(u32),
}

impl VirtioState {
    /// The kind of device the state is of, in words.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Block(_) => BLOCK,
            Self::Net(_) => NET,
            Self::Vsock(_) => VSOCK,
            Self::Stateless => "stateless",
            #[cfg(test)]
            Self::Test(_) => "test",
        }
    }
}

const BLOCK: &str = "virtio-blk";
const NET: &str = "virtio-net";
const VSOCK: &str = "vsock";

/// A virtio device id, shown as the kind of device it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceKind(pub u32);

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            block::BLOCK_DEVICE_ID => f.write_str(BLOCK),
            net::NET_DEVICE_ID => f.write_str(NET),
            vsock::VSOCK_DEVICE_ID => f.write_str(VSOCK),
            other => write!(f, "virtio device {other}"),
        }
    }
}

/// Why a virtio device's own state could not be saved or restored: the device's own error, or a
/// state of another kind of device.
#[derive(Debug, Error)]
pub enum VirtioStateError {
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Vsock(#[from] vsock::VsockError),
    /// The snapshot holds another kind of device's state.
    #[error("the snapshot holds {saved} state for this {here} device")]
    Mismatch { saved: &'static str, here: &'static str },
    /// The transport's unit-test device failed.
    #[cfg(test)]
    #[error("test device: {0}")]
    Test(String),
}

impl VirtioStateError {
    /// `state` is not the state of a `here` device.
    pub fn mismatch(state: &VirtioState, here: &'static str) -> Self {
        Self::Mismatch { saved: state.kind(), here }
    }
}

impl From<std::convert::Infallible> for VirtioStateError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status the guest reads and acknowledges, and the irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// A vCPU parked by the agent's idle doorbell must go back to the guest to take the interrupt.
    mailbox: Arc<Mailbox>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd, mailbox: Arc<Mailbox>) -> Self {
        Self { status: AtomicU32::new(0), irqfd, mailbox }
    }

    /// Raises the interrupt for `why` (INT_*).
    pub fn trigger(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            crate::log_limited!(warn, "virtio: cannot signal the irqfd: {e}");
        }
        self.mailbox.wake();
    }

    /// Wakes the guest's vCPU from its agent's idle park without an interrupt: to let its kernel
    /// run work it has pending (the park stops the whole guest).
    pub fn wake_guest(&self) {
        self.mailbox.wake();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Queue state as saved in a snapshot (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(q: &virtio_queue::Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// The queue, checked by virtio-queue (a snapshot is input like any other).
    pub fn queue(&self) -> Result<virtio_queue::Queue, virtio_queue::Error> {
        let s = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        virtio_queue::Queue::try_from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_are_named() {
        let names: Vec<String> = [2, 1, 19, 42].map(|t| DeviceKind(t).to_string()).into();
        assert_eq!(names, ["virtio-blk", "virtio-net", "vsock", "virtio device 42"]);
        let vsock = VirtioState::Vsock(vsock::VsockState { connections: true });
        assert_eq!((vsock.kind(), VirtioState::Stateless.kind()), ("vsock", "stateless"));
    }

    #[test]
    fn every_kind_of_state_round_trips_and_garbage_is_refused_without_a_panic() {
        let states = [
            VirtioState::Block(block::BlockState {
                drive_id: "rootfs".into(),
                read_only: false,
                identity: block::DriveIdentity { dev: 1, ino: 2, size: 4096, mtime_ns: -5 },
            }),
            VirtioState::Net(net::NetState { iface_id: "eth0".into(), mac: [2, 0xee, 0, 0, 0, 2] }),
            VirtioState::Vsock(vsock::VsockState { connections: true }),
            VirtioState::Stateless,
        ];
        let config = bincode::config::standard();
        for s in &states {
            let bytes = bincode::serde::encode_to_vec(s, config).unwrap();
            let (back, used): (VirtioState, _) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!((&back, used), (s, bytes.len()));
        }
        // A variant that does not exist, and random bytes: errors.
        assert!(bincode::serde::decode_from_slice::<VirtioState, _>(&[200], config).is_err());
        let mut rng = crate::sys::TestRng::new(11);
        for _ in 0..2000 {
            let _ = bincode::serde::decode_from_slice::<VirtioState, _>(&rng.bytes(32), config.with_limit::<4096>());
        }
    }
}
