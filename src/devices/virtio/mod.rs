//! virtio devices over the virtio-mmio transport ([`mmio`]), written once for every device ember
//! has (vsock now). Rings come from virtio-queue; the guest's queue notifications arrive on
//! ioeventfds (no exit to ember) and interrupts go in through irqfds.

pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::mailbox::Mailbox;

/// Where virtio-mmio devices live: one 4 KiB window each, after the control page.
pub const VIRTIO_MMIO_BASE: u64 = crate::vmm::memory::MMIO_GAP_START + 0x2000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first device's GSI (IOAPIC pin); COM1 has 4.
pub const VIRTIO_FIRST_IRQ: u32 = 5;

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
            tracing::warn!("virtio: cannot signal the irqfd: {e}");
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
    pub fn queue(&self) -> Result<virtio_queue::Queue, String> {
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
        virtio_queue::Queue::try_from(s).map_err(|e| format!("bad virtio queue state: {e:?}"))
    }
}
