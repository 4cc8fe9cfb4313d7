//! virtio devices: the contract every device meets ([`VirtioDevice`]) and the virtio-mmio
//! transport ([`mmio`]) that shows any of them to the guest. Rings come from virtio-queue; the
//! guest's queue notifications arrive on ioeventfds (no exit to ember) and interrupts go in
//! through irqfds.
//!
//! A device is a folder here (`vsock/`, `net/`): its front end implements [`VirtioDevice`], its own
//! snapshot state (if any) travels through `save_state` / `restore_state`, and it is assembled
//! with one line in `vmm::devices`.

pub mod block;
pub mod mmio;
pub mod net;
pub mod ring;
pub mod thread;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

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
    /// The device's own state for a snapshot, beyond the transport's negotiation and queues
    /// (empty for a device that has none).
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back the device's own state from a snapshot, before the transport activates it
    /// again. Called on every restored device: one whose host side does not survive a restore
    /// (vsock's connections) prepares to tell the guest.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), DeviceError>;
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

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Queue state as saved in a snapshot (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
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
    pub fn queue(&self) -> Result<virtio_queue::Queue, DeviceError> {
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
        virtio_queue::Queue::try_from(s).map_err(|e| DeviceError::BadState(format!("virtio queue: {e:?}")))
    }
}
