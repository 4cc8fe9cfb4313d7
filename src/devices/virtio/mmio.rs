//! The virtio-mmio transport (virtio 1.x, "version 2" registers): the guest's view of any ember
//! virtio device. It keeps the negotiation state and the queues' configuration; once the driver
//! sets DRIVER_OK the device is activated with the queues and its interrupt, and runs on its own
//! thread from then on. It knows nothing of KVM: the VMM wires the device's queue events to the
//! QueueNotify register (ioeventfds) and its interrupt to an irqfd, so the register protocol is
//! unit-tested here with a test device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{Interrupt, QueueSnapshot, VirtioDevice, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::devices::{BusDevice, DeviceError, GuestRequest, Persist};
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = u32::from_le_bytes(*b"EMBR");

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

// Device status bits.
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// The transport's state, as saved in a snapshot, with the device's own.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    /// Which device this is (a snapshot restores only into the same kind).
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: Vec<u8>,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    active: bool,
}

/// What a transport needs besides its state: the device behind it, guest memory and the
/// device's interrupt line.
pub struct MmioArgs {
    pub device: Box<dyn VirtioDevice>,
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
}

impl MmioTransport {
    /// Puts `device` behind a fresh transport (the driver has not touched it yet). The caller
    /// registers the device's queue events as ioeventfds on [`REG_QUEUE_NOTIFY`] (one per queue,
    /// datamatch = queue index), so that a guest notification never exits to ember.
    pub fn new(args: MmioArgs) -> Result<Self, DeviceError> {
        let MmioArgs { device, mem, interrupt } = args;
        let sizes = device.queue_max_sizes().to_vec();
        if device.queue_events().len() != sizes.len() {
            return Err(DeviceError::BadState(format!(
                "device {}: {} queues but {} queue events",
                device.device_type(),
                sizes.len(),
                device.queue_events().len()
            )));
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(i, &max)| Queue::new(max).map_err(|e| DeviceError::BadState(format!("virtio queue {i}: {e:?}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            active: false,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Stops the device's thread.
    pub fn shutdown(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn activate(&mut self) {
        // The device gets its own copies of the queues (virtio-queue's Queue is not Clone).
        let queues: Result<Vec<Queue>, DeviceError> =
            self.queues.iter().map(|q| QueueSnapshot::of(q).queue()).collect();
        let result = queues.and_then(|q| self.device.activate(self.mem.clone(), q, self.interrupt.clone()));
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!("virtio device {} failed to activate: {e}", self.device.device_type());
                self.status |= STATUS_FAILED;
                self.interrupt.trigger(INT_CONFIG);
            }
        }
    }

    fn reset(&mut self) {
        self.shutdown();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(INT_USED_RING | INT_CONFIG);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let was = self.status;
        if v & STATUS_FEATURES_OK != 0 && was & STATUS_FEATURES_OK == 0 {
            // The driver must take VERSION_1 and nothing the device did not offer.
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && was & STATUS_DRIVER_OK == 0 && !self.active {
            if self.queues.iter().filter(|q| q.ready()).any(|q| !q.is_valid(&self.mem)) {
                tracing::warn!("virtio: the driver set DRIVER_OK with an invalid queue");
                self.status |= STATUS_FAILED;
                return;
            }
            self.activate();
        }
    }
}

impl Persist for MmioTransport {
    type State = MmioState;
    type Args = MmioArgs;

    fn save(&self) -> MmioState {
        let queues = match self.device.queue_snapshots() {
            Some(q) if self.active => q,
            _ => self.queues.iter().map(QueueSnapshot::of).collect(),
        };
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
            device: self.device.save_state(),
        }
    }

    /// A transport in a snapshot's state, its device given its own state back; a device that was
    /// running is activated again.
    fn restore(args: MmioArgs, state: &MmioState) -> Result<Self, DeviceError> {
        let mut t = Self::new(args)?;
        let kind = t.device.device_type();
        if state.device_type != kind {
            return Err(DeviceError::BadState(format!(
                "virtio device {} in the snapshot, {kind} here",
                state.device_type
            )));
        }
        if state.queues.len() != t.queues.len() {
            return Err(DeviceError::BadState(format!(
                "virtio device {kind}: {} queues in the snapshot, {} here",
                state.queues.len(),
                t.queues.len()
            )));
        }
        t.queues = state.queues.iter().map(QueueSnapshot::queue).collect::<Result<_, _>>()?;
        t.device.restore_state(&state.device)?;
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        if state.interrupt_status != 0 {
            t.interrupt.trigger(state.interrupt_status);
        }
        if t.status & STATUS_DRIVER_OK != 0 {
            t.activate();
        }
        Ok(t)
    }
}

fn set_half(v: u64, high: bool, w: u32) -> u64 {
    if high {
        (v & 0xffff_ffff) | (u64::from(w) << 32)
    } else {
        (v & !0xffff_ffff) | u64::from(w)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queue().map(|q| q.max_size()).unwrap_or(0).into(),
            REG_QUEUE_READY => self.queue().map(|q| q.ready()).unwrap_or(false).into(),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return None;
        }
        if data.len() != 4 {
            return None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue configuration may only change before the driver is done.
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = set_half(self.driver_features, false, v),
                1 => self.driver_features = set_half(self.driver_features, true, v),
                _ => {}
            },
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    let high = offset == REG_QUEUE_DESC_HIGH;
                    q.set_desc_table_address((!high).then_some(v), high.then_some(v));
                }
            }
            REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    let high = offset == REG_QUEUE_AVAIL_HIGH;
                    q.set_avail_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    let high = offset == REG_QUEUE_USED_HIGH;
                    q.set_used_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            // Notifications normally go to the ioeventfd; a write that reaches here (no ioeventfd
            // support) is passed on the same way.
            REG_QUEUE_NOTIFY => {
                if let Some(fd) = self.device.queue_events().get(v as usize) {
                    let _ = fd.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            other => tracing::debug!("virtio-mmio: ignored write of {v:#x} to {other:#x}"),
        }
        None
    }
}
