//! virtio-net on a TAP device: the guest's network card.
//!
//! Two queues (receive, transmit), the guest's MAC address in configuration space, checksum and
//! TCP segmentation offload in both directions when the driver takes them (the TAP is opened with
//! the virtio-net header, so offloaded frames pass through unchanged; TUNSETOFFLOAD tells the TAP
//! what the guest accepts). The TAP is opened (or handed over, already open) when the device is
//! created, before any vCPU runs; the device's own thread, confined with the device seccomp
//! filter, moves frames between the queues and the TAP.
//!
//! Bounded: at most [`FRAME_BUDGET`] frames per direction per wakeup (more wait for the next
//! round), one frame held host-side while the guest has no receive buffers (the TAP is not read
//! until it posts some: the host kernel's queue, not ember, absorbs or drops the rest), and two
//! frame buffers per device. A malformed chain is returned to the guest unused.
//!
//! A snapshot keeps the interface's id and MAC with the queues ([`NetState`]; a restore onto
//! another interface is refused, [`NetError`]); a clone gets the TAP its restorer hands it
//! (`ember serve`: one prepared in the clone's own network namespace).

pub mod frames;
pub mod tap;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::thread::{self, Commands, DeviceThread, DeviceWorker, QueueFront, Threads};
use super::{
    Interrupt, QueueSnapshot, VirtioDevice, VirtioState, VirtioStateError, INT_USED_RING, NET, VIRTIO_F_VERSION_1,
};
use crate::devices::metrics::{self, NetCounters};
use crate::devices::{DeviceError, Persist};
use crate::memory::GuestMemory;
use crate::sys::Locked;
pub use tap::Tap;

pub const NET_DEVICE_ID: u32 = 1;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Frames moved per direction per wakeup of the device thread.
pub const FRAME_BUDGET: usize = 64;

// Feature bits (virtio 1.x, 5.1.3).
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_HOST_TSO4: u64 = 1 << 11;

const TOKEN_COMMAND: u64 = 1;
const TOKEN_RXQ: u64 = 2;
const TOKEN_TXQ: u64 = 3;
const TOKEN_TAP: u64 = 4;

/// The device's own snapshot state: which interface it was, with which MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub iface_id: String,
    pub mac: [u8; 6],
}

/// Why a snapshot's network state does not fit this device (saving it cannot fail).
#[derive(Debug, Error)]
pub enum NetError {
    /// The snapshot's interface is another one, or had another MAC: a clone's guest keeps the MAC
    /// it booted with.
    #[error("network interface {saved:?} ({}) in the snapshot, {here:?} ({}) here", tap::format_mac(.saved_mac), tap::format_mac(.here_mac))]
    OtherInterface { saved: String, saved_mac: [u8; 6], here: String, here_mac: [u8; 6] },
}

/// What activation hands the device thread.
struct Activation {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
    features: u64,
}

/// A virtio-net device.
pub struct Net {
    iface_id: String,
    mac: [u8; 6],
    acked: u64,
    queue_events: Vec<EventFd>,
    front: QueueFront<Activation>,
    counters: Arc<NetCounters>,
}

impl Net {
    /// The name of the device's thread.
    pub const THREAD: &'static str = "virtio-net";

    /// A device for interface `iface_id` with `mac`, on `tap`; its thread from `threads`.
    pub fn new(iface_id: &str, mac: [u8; 6], tap: Tap, threads: &Threads) -> Result<Self, DeviceError> {
        // Everything the thread needs is created here: once confined, it may not make new fds.
        let setup = || -> std::io::Result<_> {
            let rx = EventFd::new(libc::EFD_NONBLOCK)?;
            let tx = EventFd::new(libc::EFD_NONBLOCK)?;
            let (rx_notify, tx_notify) = (rx.try_clone()?, tx.try_clone()?);
            let epoll = Epoll::new()?;
            epoll.ctl(ControlOperation::Add, rx_notify.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_RXQ))?;
            epoll.ctl(ControlOperation::Add, tx_notify.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_TXQ))?;
            Ok((vec![rx, tx], rx_notify, tx_notify, epoll))
        };
        let (queue_events, rx_notify, tx_notify, epoll) = setup().map_err(DeviceError::io("virtio-net setup"))?;
        let counters = Arc::new(NetCounters::default());
        let worker = Worker {
            tap,
            rx_notify,
            tx_notify,
            epoll,
            tap_watched: false,
            active: None,
            rx: frames::RxBuffer::default(),
            tx: Vec::new(),
            counters: counters.clone(),
        };
        let thread = DeviceThread::spawn(Net::THREAD, threads, move |commands| worker.run(commands))
            .map_err(DeviceError::io("virtio-net thread"))?;
        Ok(Self {
            iface_id: iface_id.to_owned(),
            mac,
            acked: 0,
            queue_events,
            front: QueueFront::new(thread),
            counters,
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4 | F_GUEST_TSO4
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }: only the MAC is offered.
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| self.mac.get(o.checked_add(i)?)).copied().unwrap_or(0);
        }
    }

    fn negotiated(&mut self, features: u64) {
        self.acked = features;
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), DeviceError> {
        let features = self.acked;
        self.front.activate("virtio-net", 2, queues, |queues| Activation { mem, queues, interrupt, features })
    }

    fn reset(&mut self) {
        self.front.reset();
    }

    fn pause(&mut self) {
        self.front.pause();
    }

    fn resume(&mut self) {
        self.front.resume();
    }

    fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
        self.front.queue_snapshots()
    }

    fn save_state(&self) -> Result<VirtioState, VirtioStateError> {
        Ok(VirtioState::Net(self.save()?))
    }

    fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError> {
        let VirtioState::Net(state) = state else { return Err(VirtioStateError::mismatch(state, NET)) };
        Ok(Box::new(Self::restore(*self, state)?))
    }

    fn take_counters(&self) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
        Some((format!("net_{}", self.iface_id), self.counters.take()))
    }
}

impl Persist for Net {
    type State = NetState;
    /// The device as made for the new VM's interface ([`Net::new`]: its TAP open, its thread
    /// started), which the state is checked against.
    type Args = Net;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState { iface_id: self.iface_id.clone(), mac: self.mac })
    }

    /// Refuses a snapshot of another interface: a clone's guest keeps the MAC it booted with.
    fn restore(dev: Net, saved: &NetState) -> Result<Self, NetError> {
        if saved.iface_id != dev.iface_id || saved.mac != dev.mac {
            return Err(NetError::OtherInterface {
                saved: saved.iface_id.clone(),
                saved_mac: saved.mac,
                here: dev.iface_id.clone(),
                here_mac: dev.mac,
            });
        }
        Ok(dev)
    }
}

/// What the device thread works with once the driver has activated the device.
struct Active {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
    /// The features the driver took.
    features: u64,
}

struct Worker {
    tap: Tap,
    /// Copies of the queues' notification eventfds: also signalled by the thread itself when a
    /// budget ran out with work left.
    rx_notify: EventFd,
    tx_notify: EventFd,
    epoll: Epoll,
    /// Whether the TAP is in the epoll set (not while the guest has no receive buffers).
    tap_watched: bool,
    active: Option<Active>,
    rx: frames::RxBuffer,
    tx: Vec<u8>,
    counters: Arc<NetCounters>,
}

impl DeviceWorker for Worker {
    type Activation = Activation;
    type Saved = ();

    fn activate(&mut self, a: Activation) {
        let mut offload = 0;
        if a.features & F_GUEST_CSUM != 0 {
            offload |= tap::TUN_F_CSUM;
            if a.features & F_GUEST_TSO4 != 0 {
                offload |= tap::TUN_F_TSO4;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            crate::log_limited!(warn, "virtio-net: TUNSETOFFLOAD: {e}");
        }
        self.active = Some(Active { mem: a.mem, queues: a.queues, interrupt: a.interrupt, features: a.features });
        self.watch_tap(true);
        // Frames queued before a snapshot go out now; receive buffers posted then are used.
        let _ = self.tx_notify.write(1);
        let _ = self.rx_notify.write(1);
    }

    fn deactivate(&mut self) {
        self.active = None;
        self.rx.clear();
        self.watch_tap(false);
    }

    /// The thread keeps none of the device's state.
    fn saved(&self) {}
}

impl Worker {
    fn run(mut self, commands: Commands<Activation>) {
        if let Err(e) = commands.watch(&self.epoll, TOKEN_COMMAND) {
            tracing::error!("virtio-net: epoll: {e}");
            return;
        }
        let mut events = [EpollEvent::default(); 8];
        loop {
            let Some(ready) = thread::wait(&self.epoll, &mut events, "virtio-net") else { return };
            let tokens: Vec<u64> = ready.iter().map(|e| e.data()).collect();
            for token in tokens {
                match token {
                    TOKEN_COMMAND => {
                        if !commands.serve(&mut self) {
                            return;
                        }
                    }
                    TOKEN_TXQ => {
                        let _ = self.tx_notify.read();
                        self.process_tx();
                    }
                    TOKEN_RXQ => {
                        let _ = self.rx_notify.read();
                        self.process_rx();
                    }
                    _ => self.process_rx(),
                }
            }
        }
    }

    fn watch_tap(&mut self, on: bool) {
        if on == self.tap_watched || (on && self.active.is_none()) {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let r = match on {
            true => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, TOKEN_TAP)),
            false => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
        };
        match r {
            Ok(()) => self.tap_watched = on,
            Err(e) => crate::log_limited!(warn, "virtio-net: epoll on the TAP: {e}"),
        }
    }

    /// Sends up to [`FRAME_BUDGET`] of the guest's frames to the TAP.
    fn process_tx(&mut self) {
        let Some(a) = &self.active else { return };
        let mut q = a.queues.locked();
        let Some(q) = q.get_mut(TXQ) else { return };
        let mut served = 0;
        while served < FRAME_BUDGET {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let descs: Vec<_> = chain.map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
            let (csum, tso4) = (a.features & F_CSUM != 0, a.features & F_HOST_TSO4 != 0);
            let frame = frames::gather(&a.mem, &descs, &mut self.tx)
                .and_then(|()| frames::check_tx_header(&self.tx, csum, tso4));
            match frame {
                Ok(()) => match self.tap.write_frame(&self.tx) {
                    Ok(true) => {
                        metrics::inc(&self.counters.tx_packets_count);
                        metrics::add(&self.counters.tx_bytes_count, self.tx.len() as u64);
                    }
                    Ok(false) => {
                        metrics::inc(&self.counters.tx_fails);
                        crate::log_limited!(debug, "virtio-net: the TAP is full, a frame dropped")
                    }
                    Err(e) => {
                        metrics::inc(&self.counters.tx_fails);
                        crate::log_limited!(warn, "virtio-net: TAP write: {e}")
                    }
                },
                Err(e) => {
                    metrics::inc(&self.counters.tx_malformed_frames);
                    crate::log_limited!(warn, "virtio-net: malformed transmit chain returned unused: {e}")
                }
            }
            if q.add_used(&a.mem, head, 0).is_err() {
                crate::log_limited!(warn, "virtio-net: cannot return a transmit chain to the guest");
            }
            served += 1;
        }
        if served > 0 && q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.trigger(INT_USED_RING);
        }
        if served == FRAME_BUDGET {
            let _ = self.tx_notify.write(1);
        }
    }

    /// Moves up to [`FRAME_BUDGET`] frames from the TAP into the guest's receive buffers.
    fn process_rx(&mut self) {
        let Some((served, starved)) = self.receive() else { return };
        // No receive buffers: the TAP waits (the guest's next refill notifies the queue).
        self.watch_tap(!starved);
        if served == FRAME_BUDGET {
            let _ = self.rx_notify.write(1);
        }
    }

    /// The frames moved, and whether the TAP must wait for the guest's next refill (it ran out of
    /// receive buffers, or the TAP failed).
    fn receive(&mut self) -> Option<(usize, bool)> {
        let a = self.active.as_ref()?;
        let mut q = a.queues.locked();
        let q = q.get_mut(RXQ)?;
        let mut served = 0;
        let mut starved = false;
        while served < FRAME_BUDGET {
            if self.rx.is_empty() {
                match self.rx.fill(&self.tap) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        // Not read again until the guest's next refill: a failing TAP never spins
                        // the thread.
                        crate::log_limited!(warn, "virtio-net: TAP read: {e}");
                        starved = true;
                        break;
                    }
                }
            }
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                starved = true;
                break;
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
            let used = match frames::scatter(&a.mem, &descs, self.rx.frame()) {
                Ok(n) => {
                    metrics::inc(&self.counters.rx_packets_count);
                    metrics::add(&self.counters.rx_bytes_count, self.rx.frame().len() as u64);
                    n
                }
                Err(e) => {
                    metrics::inc(&self.counters.rx_fails);
                    crate::log_limited!(warn, "virtio-net: a received frame dropped: {e}");
                    0
                }
            };
            self.rx.clear();
            if q.add_used(&a.mem, head, used).is_err() {
                crate::log_limited!(warn, "virtio-net: cannot return a receive buffer to the guest");
            }
            served += 1;
        }
        if served > 0 && q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.trigger(INT_USED_RING);
        }
        Some((served, starved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 7];

    /// A device over a stand-in TAP (never activated, so never read or written).
    fn net(iface: &str, mac: [u8; 6]) -> Net {
        let fd = std::fs::File::open("/dev/null").unwrap();
        Net::new(iface, mac, Tap::unchecked(fd.into()), &Threads::new(None)).unwrap()
    }

    #[test]
    fn the_typed_state_round_trips() {
        let state = net("eth0", MAC).save().unwrap();
        assert_eq!(state, NetState { iface_id: "eth0".into(), mac: MAC });
        let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard()).unwrap();
        let (decoded, _): (NetState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, state);
        assert_eq!(Net::restore(net("eth0", MAC), &decoded).unwrap().save().unwrap(), state);
        let boxed: Box<dyn VirtioDevice> = Box::new(net("eth0", MAC));
        let restored = boxed.restore_state(&VirtioState::Net(state.clone())).unwrap();
        assert_eq!(restored.save_state().unwrap(), VirtioState::Net(state));
    }

    #[test]
    fn another_interface_or_another_kind_of_devices_state_is_refused() {
        let state = net("eth0", MAC).save().unwrap();
        for (iface, mac) in [("eth1", MAC), ("eth0", [2, 0xee, 0, 0, 0, 8])] {
            let e = Net::restore(net(iface, mac), &state).err().unwrap();
            assert!(matches!(e, NetError::OtherInterface { .. }), "{e}");
            assert!(e.to_string().contains("02:ee:00:00:00:07"), "{e}");
        }
        let boxed: Box<dyn VirtioDevice> = Box::new(net("eth0", MAC));
        let block = crate::devices::virtio::block::BlockState {
            drive_id: "eth0".into(),
            read_only: true,
            identity: crate::devices::virtio::block::DriveIdentity { dev: 1, ino: 2, size: 3, mtime_ns: 4 },
        };
        let e = boxed.restore_state(&VirtioState::Block(block)).err().unwrap();
        assert!(matches!(e, VirtioStateError::Mismatch { saved: "virtio-blk", here: "virtio-net" }), "{e}");
    }
}
