//! The virtio-mmio transport (virtio 1.x, "version 2" registers): the guest's view of any ember
//! virtio device. It keeps the negotiation state and the queues' configuration; once the driver
//! sets DRIVER_OK the device is activated with the queues and its interrupt, and runs on its own
//! thread from then on. It knows nothing of KVM: the VMM wires the device's queue events to the
//! QueueNotify register (ioeventfds) and its interrupt to an irqfd, so the register protocol is
//! unit-tested here with a test device.
//!
//! Its snapshot state ([`MmioState`]) is the negotiation, the queues and the device's own typed
//! state; a restore refuses a state of another kind of device, or with other queues
//! ([`MmioError`]).

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};

use super::{
    DeviceKind, Interrupt, QueueSnapshot, VirtioDevice, VirtioState, VirtioStateError, INT_CONFIG, INT_USED_RING,
    VIRTIO_F_VERSION_1,
};
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    pub device: VirtioState,
}

/// Why a transport could not be made, saved or restored.
#[derive(Debug, Error)]
pub enum MmioError {
    /// The device's queues and queue events do not match (a device's bug).
    #[error("{kind}: {queues} queues but {events} queue events")]
    QueueEvents { kind: DeviceKind, queues: usize, events: usize },
    /// A queue virtio-queue refuses: a size the device cannot have, or a snapshot's queue that no
    /// driver could have set up.
    #[error("{kind}: virtio queue {index}: {source}")]
    Queue {
        kind: DeviceKind,
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// The snapshot's device is another kind of device.
    #[error("{saved} in the snapshot, {here} here")]
    OtherDevice { saved: DeviceKind, here: DeviceKind },
    /// The snapshot's device has another number of queues.
    #[error("{kind}: {saved} queues in the snapshot, {here} here")]
    QueueCount { kind: DeviceKind, saved: usize, here: usize },
    /// The device's own state could not be saved, or does not fit the device.
    #[error("{kind}: {source}")]
    Device {
        kind: DeviceKind,
        #[source]
        source: VirtioStateError,
    },
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
    /// Restored running: activated when the VM starts ([`MmioTransport::start`]).
    start_pending: bool,
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
    pub fn new(args: MmioArgs) -> Result<Self, MmioError> {
        let MmioArgs { device, mem, interrupt } = args;
        let kind = DeviceKind(device.device_type());
        let sizes = device.queue_max_sizes().to_vec();
        if device.queue_events().len() != sizes.len() {
            return Err(MmioError::QueueEvents { kind, queues: sizes.len(), events: device.queue_events().len() });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &max)| Queue::new(max).map_err(|source| MmioError::Queue { kind, index, source }))
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
            start_pending: false,
        })
    }

    /// The VM is starting: a device restored running is activated now (its thread gets its
    /// queues and does what a restored device does first, such as vsock's transport reset). A
    /// clone that is restored and held without running has its devices do nothing: their first
    /// writes to guest memory (copy-on-write faults, which run every MMU notifier of the
    /// process) wait for the guest.
    pub fn start(&mut self) {
        if std::mem::take(&mut self.start_pending) {
            self.activate();
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Pauses a running device (see [`VirtioDevice::pause`]).
    /// The device, to change what it serves from (a drive's file) while the VM runs.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn pause(&mut self) {
        if self.active {
            self.device.pause();
        }
    }

    /// Resumes a paused device.
    pub fn resume(&mut self) {
        if self.active {
            self.device.resume();
        }
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
        let queues: Result<Vec<Queue>, DeviceError> = self
            .queues
            .iter()
            .map(|q| QueueSnapshot::of(q).queue().map_err(|e| DeviceError::BadState(format!("virtio queue: {e}"))))
            .collect();
        self.device.negotiated(self.driver_features);
        let result = queues.and_then(|q| self.device.activate(self.mem.clone(), q, self.interrupt.clone()));
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                crate::log_limited!(warn, "virtio device {} failed to activate: {e}", self.device.device_type());
                self.status |= STATUS_FAILED;
                self.interrupt.trigger(INT_CONFIG);
            }
        }
    }

    fn reset(&mut self) {
        self.start_pending = false;
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
        if v & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK == 0 {
            // DRIVER_OK before the features were accepted: the driver broke the protocol.
            self.status = v | STATUS_FAILED;
            return;
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && was & STATUS_DRIVER_OK == 0 && !self.active {
            if self.queues.iter().filter(|q| q.ready()).any(|q| !q.is_valid(&self.mem)) {
                crate::log_limited!(warn, "virtio: the driver set DRIVER_OK with an invalid queue");
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
    type Error = MmioError;

    /// The transport's state with the device's own; fails when the device's does.
    fn save(&self) -> Result<MmioState, MmioError> {
        let kind = DeviceKind(self.device.device_type());
        let device = self.device.save_state().map_err(|source| MmioError::Device { kind, source })?;
        let queues = match self.device.queue_snapshots() {
            Some(q) if self.active => q,
            _ => self.queues.iter().map(QueueSnapshot::of).collect(),
        };
        Ok(MmioState {
            device_type: kind.0,
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
            device,
        })
    }

    /// A transport in a snapshot's state, its device given its own state back; a device that was
    /// running is activated again when the VM starts.
    fn restore(args: MmioArgs, state: &MmioState) -> Result<Self, MmioError> {
        let MmioArgs { device, mem, interrupt } = args;
        let kind = DeviceKind(device.device_type());
        if state.device_type != kind.0 {
            return Err(MmioError::OtherDevice { saved: DeviceKind(state.device_type), here: kind });
        }
        let here = device.queue_max_sizes().len();
        if state.queues.len() != here {
            return Err(MmioError::QueueCount { kind, saved: state.queues.len(), here });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| q.queue().map_err(|source| MmioError::Queue { kind, index, source }))
            .collect::<Result<_, _>>()?;
        let device = device.restore_state(&state.device).map_err(|source| MmioError::Device { kind, source })?;
        let mut t = Self::new(MmioArgs { device, mem, interrupt })?;
        t.queues = queues;
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        if state.interrupt_status != 0 {
            t.interrupt.trigger(state.interrupt_status);
        }
        t.start_pending = t.status & STATUS_DRIVER_OK != 0;
        Ok(t)
    }
}

/// A device with two queues and nothing behind them, for [`drive_registers`].
struct NullDevice(Vec<vmm_sys_util::eventfd::EventFd>);

impl VirtioDevice for NullDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        &self.0
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _: GuestMemory, _: Vec<Queue>, _: Arc<Interrupt>) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
        None
    }
    fn save_state(&self) -> Result<VirtioState, VirtioStateError> {
        self.save()?;
        Ok(VirtioState::Stateless)
    }
    fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError> {
        let VirtioState::Stateless = state else { return Err(VirtioStateError::mismatch(state, "stateless")) };
        Ok(Box::new(Self::restore(*self, &())?))
    }
}

/// Nothing to save, nothing that can fail.
impl Persist for NullDevice {
    type State = ();
    type Args = NullDevice;
    type Error = std::convert::Infallible;
    fn save(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn restore(dev: NullDevice, _: &()) -> Result<Self, Self::Error> {
        Ok(dev)
    }
}

/// Drives a transport (over a device that does nothing) with the register accesses `ops`
/// describes, 13 bytes each: kind (even: read), offset (u32), width (1, 2, 4 or 8 from the low
/// bits), value (u64); then saves and restores its state. The fuzz target's entry point: it must
/// never panic, whatever the guest writes.
pub fn drive_registers(ops: &[u8]) {
    let events = (0..2).map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)).collect();
    let (Ok(events), Ok(mem)) = (events, crate::memory::create_guest_memory(16 << 20)) else { return };
    let Ok(irq) = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK) else { return };
    let Ok(mailbox) = crate::channel::mailbox::Mailbox::create(None) else { return };
    let interrupt = Arc::new(Interrupt::new(irq, Arc::new(mailbox)));
    let args =
        |events| MmioArgs { device: Box::new(NullDevice(events)), mem: mem.clone(), interrupt: interrupt.clone() };
    let Ok(mut t) = MmioTransport::new(args(events)) else { return };
    for op in ops.chunks_exact(13) {
        let offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], op[4]]));
        let width = 1usize << (op[5] & 3);
        let value = u64::from_le_bytes([op[6], op[7], op[8], op[9], op[10], op[11], op[12], 0]);
        if op[0] % 2 == 0 {
            let mut data = [0u8; 8];
            t.read(offset, &mut data[..width]);
        } else {
            let _ = t.write(offset, &value.to_le_bytes()[..width]);
        }
    }
    let Ok(state) = t.save() else { return };
    let events = (0..2).map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)).collect();
    if let Ok(events) = events {
        let _ = MmioTransport::restore(args(events), &state);
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::channel::mailbox::Mailbox;
    use crate::sys::Locked;

    /// What the test device saw.
    #[derive(Default)]
    struct Seen {
        activations: Vec<Vec<u16>>,
        resets: u32,
        restored: Option<u32>,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    /// A device with two queues (sizes 16 and 8), one feature besides VERSION_1, an 8-byte
    /// configuration space and state of its own (a number, 7 unless restored).
    struct TestDevice {
        events: Vec<EventFd>,
        seen: Arc<Mutex<Seen>>,
        fail_activation: bool,
        fail_save: bool,
        state: u32,
    }

    #[derive(Debug, Error)]
    #[error("{0}")]
    struct TestError(&'static str);

    /// A state the test device refuses.
    const BAD_STATE: u32 = 666;

    impl Persist for TestDevice {
        type State = u32;
        type Args = TestDevice;
        type Error = TestError;
        fn save(&self) -> Result<u32, TestError> {
            match self.fail_save {
                true => Err(TestError("cannot read its state")),
                false => Ok(self.state),
            }
        }
        fn restore(mut dev: TestDevice, state: &u32) -> Result<Self, TestError> {
            if *state == BAD_STATE {
                return Err(TestError("not a state it can be in"));
            }
            dev.seen.locked().restored = Some(*state);
            dev.state = *state;
            Ok(dev)
        }
    }

    const TEST_FEATURE: u64 = 1 << 3;

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | TEST_FEATURE
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = 0x1122_3344_5566_7788u64.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.seen.locked().config_writes.push((offset, data.to_vec()));
        }
        fn activate(&mut self, _: GuestMemory, queues: Vec<Queue>, _: Arc<Interrupt>) -> Result<(), DeviceError> {
            if self.fail_activation {
                return Err(DeviceError::BadState("test device refuses".into()));
            }
            self.seen.locked().activations.push(queues.iter().map(|q| q.size()).collect());
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.locked().resets += 1;
        }
        fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
            None
        }
        fn save_state(&self) -> Result<VirtioState, VirtioStateError> {
            self.save().map(VirtioState::Test).map_err(|e| VirtioStateError::Test(e.to_string()))
        }
        fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError> {
            let VirtioState::Test(state) = state else { return Err(VirtioStateError::mismatch(state, "test")) };
            Ok(Box::new(Self::restore(*self, state).map_err(|e| VirtioStateError::Test(e.to_string()))?))
        }
    }

    fn args(fail_activation: bool) -> (MmioArgs, Arc<Mutex<Seen>>, Arc<Interrupt>) {
        test_args(fail_activation, false)
    }

    fn test_args(fail_activation: bool, fail_save: bool) -> (MmioArgs, Arc<Mutex<Seen>>, Arc<Interrupt>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let events = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let device = Box::new(TestDevice { events, seen: seen.clone(), fail_activation, fail_save, state: 7 });
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let mailbox = Arc::new(Mailbox::create(None).unwrap());
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), mailbox));
        (MmioArgs { device, mem, interrupt: interrupt.clone() }, seen, interrupt)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        assert_eq!(t.write(offset, &v.to_le_bytes()), None);
    }

    /// Sets up queue `q` of size `size` with its rings in guest memory, and marks it ready.
    fn setup_queue(t: &mut MmioTransport, q: u32, size: u32) {
        write(t, REG_QUEUE_SEL, q);
        write(t, REG_QUEUE_NUM, size);
        let base = 0x10_0000 + u64::from(q) * 0x1_0000;
        for (reg, addr) in
            [(REG_QUEUE_DESC_LOW, base), (REG_QUEUE_AVAIL_LOW, base + 0x1000), (REG_QUEUE_USED_LOW, base + 0x2000)]
        {
            write(t, reg, addr as u32);
            write(t, reg + 4, (addr >> 32) as u32);
        }
        write(t, REG_QUEUE_READY, 1);
    }

    /// The driver's side of a negotiation up to DRIVER_OK, taking `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        write(t, REG_STATUS, 1 | 2); // ACKNOWLEDGE | DRIVER
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, features as u32);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write(t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK);
        read(t, REG_STATUS)
    }

    #[test]
    fn identity_and_feature_registers() {
        let (a, _, _) = args(false);
        let mut t = MmioTransport::new(a).unwrap();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(read(&mut t, REG_VENDOR_ID), VENDOR);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), TEST_FEATURE as u32);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 8);
        write(&mut t, REG_QUEUE_SEL, 9);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "a queue that does not exist");
        // Configuration space: the device's, any width; writes go to the device.
        let mut b = [0u8; 2];
        t.read(REG_CONFIG + 1, &mut b);
        assert_eq!(b, [0x77, 0x66]);
        assert_eq!(t.write(REG_CONFIG + 4, &[1, 2]), None);
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        for bad in [TEST_FEATURE, VIRTIO_F_VERSION_1 | 1 << 5] {
            let (a, seen, _) = args(false);
            let mut t = MmioTransport::new(a).unwrap();
            let status = negotiate(&mut t, bad);
            assert_eq!(status & STATUS_FEATURES_OK, 0, "features {bad:#x} accepted");
            write(&mut t, REG_STATUS, 1 | 2 | STATUS_DRIVER_OK);
            assert!(seen.locked().activations.is_empty());
            assert_ne!(read(&mut t, REG_STATUS) & STATUS_FAILED, 0, "DRIVER_OK without FEATURES_OK");
        }
    }

    #[test]
    fn driver_ok_activates_the_device_with_its_queues_and_reset_stops_it() {
        let (a, seen, _) = args(false);
        let mut t = MmioTransport::new(a).unwrap();
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1 | TEST_FEATURE);
        assert_ne!(status & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 4);
        write(&mut t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(seen.locked().activations, vec![vec![16, 4]]);
        // Queue configuration is frozen once the driver is done.
        write(&mut t, REG_QUEUE_SEL, 1);
        write(&mut t, REG_QUEUE_NUM, 8);
        let saved = t.save().unwrap();
        assert_eq!(saved.queues[1].size, 4);
        // A guest notification that reaches the transport goes to the queue's event.
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.device().queue_events()[1].read().unwrap(), 1);
        write(&mut t, REG_QUEUE_NOTIFY, 99);
        // Reset: the device stops, the negotiation starts over.
        write(&mut t, REG_STATUS, 0);
        assert_eq!(seen.locked().resets, 1);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn an_invalid_queue_or_a_failed_activation_fails_the_device() {
        let (a, seen, _) = args(false);
        let mut t = MmioTransport::new(a).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, 0xffff_f000);
        write(&mut t, REG_QUEUE_DESC_HIGH, 0xffff_ffff);
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        assert!(seen.locked().activations.is_empty());

        let (a, _, interrupt) = args(true);
        let mut t = MmioTransport::new(a).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        write(&mut t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FAILED, 0);
        assert_ne!(interrupt.status() & INT_CONFIG, 0, "the driver is told");
        write(&mut t, REG_INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn random_register_sequences_never_panic_and_keep_the_protocol() {
        let mut rng = crate::sys::TestRng::new(5);
        for _ in 0..200 {
            let (a, seen, _) = args(rng.below(4) == 0);
            let mut t = MmioTransport::new(a).unwrap();
            for _ in 0..200 {
                let offset = match rng.below(4) {
                    0 => rng.next() % 0x200,
                    1 => [REG_STATUS, REG_QUEUE_SEL, REG_QUEUE_NUM, REG_QUEUE_READY, REG_DRIVER_FEATURES][rng.below(5)],
                    2 => 0x80 + 4 * rng.below(10) as u64,
                    _ => rng.next(),
                };
                let len = [1, 2, 4, 8][rng.below(4)];
                if rng.below(2) == 0 {
                    let mut d = vec![0u8; len];
                    t.read(offset, &mut d);
                } else {
                    let v = match rng.below(3) {
                        0 => rng.next() as u32,
                        1 => [0, 1, 3, 7, 11, 15, 0x80][rng.below(7)],
                        _ => rng.below(20) as u32,
                    };
                    let _ = t.write(offset, &v.to_le_bytes()[..len.min(4)]);
                }
                let status = read(&mut t, REG_STATUS);
                // The device runs only after a complete negotiation.
                if !seen.locked().activations.is_empty() && status & STATUS_FAILED == 0 && status != 0 {
                    assert_ne!(status & STATUS_FEATURES_OK, 0, "active without FEATURES_OK: {status:#x}");
                }
            }
            assert!(t.save().is_ok());
        }
    }

    #[test]
    fn bad_accesses_read_zero_and_change_nothing() {
        let (a, _, _) = args(false);
        let mut t = MmioTransport::new(a).unwrap();
        let mut narrow = [0xffu8; 2];
        t.read(REG_MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0], "registers are 32-bit only");
        assert_eq!(t.write(REG_STATUS, &[1]), None);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(read(&mut t, 0x0f0), 0, "an unknown register");
        write(&mut t, 0x0f0, 5);
        let mut far = [0xffu8; 4];
        t.read(u64::MAX - 2, &mut far);
    }

    #[test]
    fn state_round_trips_and_a_running_device_is_activated_again_when_the_vm_starts() {
        let (a, _, _) = args(false);
        let mut t = MmioTransport::new(a).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        setup_queue(&mut t, 1, 8);
        write(&mut t, REG_STATUS, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let saved = t.save().unwrap();
        assert_eq!((saved.device_type, &saved.device), (42, &VirtioState::Test(7)));
        // The typed state survives the snapshot's encoding unchanged.
        let bytes = bincode::serde::encode_to_vec(&saved, bincode::config::standard()).unwrap();
        let (decoded, _): (MmioState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, saved);

        let (a, seen, _) = args(false);
        let mut r = MmioTransport::restore(a, &decoded).unwrap();
        assert_eq!(seen.locked().restored, Some(7));
        // Activated when the VM starts, once; saved alike before and after.
        assert!(seen.locked().activations.is_empty(), "activated before the VM starts");
        assert_eq!(read(&mut r, REG_STATUS), read(&mut t, REG_STATUS));
        assert_eq!(r.save().unwrap(), saved);
        r.start();
        r.start();
        assert_eq!(seen.locked().activations, vec![vec![16, 8]]);
        assert_eq!(r.save().unwrap().queues.len(), 2);

        // A device the driver reset before the VM started stays inactive.
        let (a, seen, _) = args(false);
        let mut reset = MmioTransport::restore(a, &saved).unwrap();
        write(&mut reset, REG_STATUS, 0);
        reset.start();
        assert!(seen.locked().activations.is_empty());

        // A snapshot of another device, or with other queues, is refused.
        let (a, _, _) = args(false);
        let other = MmioState { device_type: 19, ..saved.clone() };
        let e = MmioTransport::restore(a, &other).err().unwrap();
        assert!(matches!(e, MmioError::OtherDevice { .. }), "{e}");
        assert_eq!(e.to_string(), "vsock in the snapshot, virtio device 42 here");
        let (a, _, _) = args(false);
        let fewer = MmioState { queues: saved.queues[..1].to_vec(), ..saved.clone() };
        assert!(matches!(MmioTransport::restore(a, &fewer), Err(MmioError::QueueCount { saved: 1, here: 2, .. })));
        let (a, _, _) = args(false);
        let mut broken = saved.clone();
        broken.queues[0].size = 1000;
        let e = MmioTransport::restore(a, &broken).err().unwrap();
        assert!(matches!(e, MmioError::Queue { index: 0, .. }), "a queue larger than its maximum: {e}");
    }

    #[test]
    fn a_device_state_that_does_not_fit_the_device_is_refused() {
        let (a, _, _) = args(false);
        let saved = MmioTransport::new(a).unwrap().save().unwrap();
        // Another kind of device's state under this device's id: refused, naming both.
        let (a, seen, _) = args(false);
        let other = MmioState {
            device: VirtioState::Vsock(super::super::vsock::VsockState { connections: true }),
            ..saved.clone()
        };
        let e = MmioTransport::restore(a, &other).err().unwrap();
        assert!(
            matches!(e, MmioError::Device { source: VirtioStateError::Mismatch { saved: "vsock", here: "test" }, .. }),
            "{e}"
        );
        assert_eq!(e.to_string(), "virtio device 42: the snapshot holds vsock state for this test device");
        assert_eq!(seen.locked().restored, None);
        // A state of the right kind that the device refuses.
        let (a, _, _) = args(false);
        let bad = MmioState { device: VirtioState::Test(BAD_STATE), ..saved };
        let e = MmioTransport::restore(a, &bad).err().unwrap();
        assert!(matches!(e, MmioError::Device { source: VirtioStateError::Test(_), .. }), "{e}");
    }

    #[test]
    fn a_device_that_cannot_be_saved_fails_the_save() {
        let (a, _, _) = test_args(false, true);
        let mut t = MmioTransport::new(a).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        let e = t.save().err().unwrap();
        assert!(matches!(e, MmioError::Device { kind: DeviceKind(42), source: VirtioStateError::Test(_) }), "{e}");
        assert_eq!(e.to_string(), "virtio device 42: test device: cannot read its state");
    }
}
