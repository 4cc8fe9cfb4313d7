//! virtio-blk: a host file shown to the guest as a disk, read-only or read-write, with flush and
//! get-id (the guest reads the drive's id as `/sys/block/vdX/serial`).
//!
//! The file is opened when the device is created (before any vCPU runs and is confined) and served
//! by the device's own thread, confined with the device seccomp filter. Requests are parsed by
//! [`request`] with every field checked; a malformed chain goes back to the guest unused. At most
//! [`REQUEST_BUDGET`] requests are served per wakeup, so one guest's queue never holds the thread.
//!
//! The file can be replaced while the guest runs ([`Block::replace_file`], Firecracker's `PATCH
//! /drives/{id}`): the new file is opened on the caller's thread and handed to the device thread,
//! which serves every later request from it and then tells the driver that the configuration (the
//! capacity) changed.
//!
//! A snapshot keeps the drive's id, mode and identity (device, inode, size, modification time:
//! [`BlockState`]): a restore whose file changed or vanished since is refused ([`BlockError`]), so
//! a clone never reads a disk that differs from its template's.

pub mod request;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::thread::{self, Commands, DeviceThread, DeviceWorker, QueueFront, Threads};
use super::{
    Interrupt, QueueSnapshot, VirtioDevice, VirtioState, VirtioStateError, BLOCK, INT_CONFIG, INT_USED_RING,
    VIRTIO_F_VERSION_1,
};
use crate::config::DriveConfig;
use crate::devices::metrics::{self, BlockCounters};
use crate::devices::{DeviceError, Persist};
use crate::memory::GuestMemory;
use crate::sys::Locked;
use request::{Disk, ID_BYTES, MAX_SEGMENTS, MAX_SEGMENT_SIZE, SECTOR_SIZE};

pub const BLOCK_DEVICE_ID: u32 = 2;
const QUEUE_SIZE: u16 = 256;
/// Requests served per wakeup of the device thread; more wait for the next round.
pub const REQUEST_BUDGET: usize = 256;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const TOKEN_COMMAND: u64 = 1;
const TOKEN_QUEUE: u64 = 2;

/// What identifies a drive's file: a snapshot restores only onto the same, unchanged file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl DriveIdentity {
    fn of(file: &File) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }

    /// What changed between a snapshot's identity and now, in words.
    fn difference(&self, now: &Self) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it was replaced by another file".into())
        } else if self.size != now.size {
            Some(format!("its size changed from {} to {} bytes", self.size, now.size))
        } else if self.mtime_ns != now.mtime_ns {
            Some("it was modified".into())
        } else {
            None
        }
    }
}

/// The device's own snapshot state: which drive it served, how, and its file's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive_id: String,
    pub read_only: bool,
    pub identity: DriveIdentity,
}

/// Why a snapshot's block state does not fit this device (saving it cannot fail).
#[derive(Debug, Error)]
pub enum BlockError {
    /// The snapshot's drive is another one, or was served in another mode.
    #[error(
        "drive {saved:?} (read-only: {saved_read_only}) in the snapshot, {here:?} (read-only: {here_read_only}) here"
    )]
    OtherDrive { saved: String, saved_read_only: bool, here: String, here_read_only: bool },
    /// The drive's file is not the one the snapshot was taken with.
    #[error("drive {drive:?} ({}) changed since the snapshot: {why}", path.display())]
    Changed { drive: String, path: PathBuf, why: String },
}

/// What activation hands the device thread.
struct Activation {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
}

/// A backing file handed to the device thread, and its capacity in sectors.
type Replacement = Arc<Mutex<Option<(File, u64)>>>;

/// A virtio-blk device.
pub struct Block {
    drive_id: String,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    identity: DriveIdentity,
    queue_events: Vec<EventFd>,
    front: QueueFront<Activation>,
    replacement: Replacement,
    counters: Arc<BlockCounters>,
}

/// Opens a drive's file in its mode: a regular file, and what identifies it.
fn open_drive(path: &Path, read_only: bool, what: impl Fn() -> String) -> Result<(File, DriveIdentity), DeviceError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(DeviceError::io(what()))?;
    let identity = DriveIdentity::of(&file).map_err(DeviceError::io(what()))?;
    if !file.metadata().map_err(DeviceError::io(what()))?.is_file() {
        return Err(DeviceError::Io { what: what(), source: std::io::Error::other("not a regular file") });
    }
    Ok((file, identity))
}

impl Block {
    /// The name of the device's thread.
    pub const THREAD: &'static str = "virtio-blk";

    /// Opens `drive`'s file and starts the device thread (from `threads`).
    pub fn new(drive: &DriveConfig, threads: &Threads) -> Result<Self, DeviceError> {
        let path = &drive.path_on_host;
        let what = || format!("drive {:?} ({})", drive.drive_id, path.display());
        let (file, identity) = open_drive(path, drive.is_read_only, what)?;
        let mut id = [0u8; ID_BYTES];
        let n = drive.drive_id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&drive.drive_id.as_bytes()[..n]);
        let capacity = identity.size / SECTOR_SIZE;
        // Everything the thread needs is created here: once confined, it may not make new fds.
        let setup = || -> std::io::Result<_> {
            let queue_event = EventFd::new(libc::EFD_NONBLOCK)?;
            let notify = queue_event.try_clone()?;
            let epoll = Epoll::new()?;
            epoll.ctl(ControlOperation::Add, notify.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_QUEUE))?;
            Ok((queue_event, notify, epoll))
        };
        let (queue_event, notify, epoll) = setup().map_err(DeviceError::io("virtio-blk setup"))?;
        let replacement = Replacement::default();
        let counters = Arc::new(BlockCounters::default());
        let worker = Worker {
            file,
            read_only: drive.is_read_only,
            capacity,
            id,
            notify,
            epoll,
            active: None,
            replacement: replacement.clone(),
            counters: counters.clone(),
        };
        let thread = DeviceThread::spawn(Block::THREAD, threads, move |commands| worker.run(commands))
            .map_err(DeviceError::io("virtio-blk thread"))?;
        Ok(Self {
            drive_id: drive.drive_id.clone(),
            path: path.clone(),
            read_only: drive.is_read_only,
            capacity,
            identity,
            queue_events: vec![queue_event],
            front: QueueFront::new(thread),
            replacement,
            counters,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the drive from the file at `path` from now on, in the same mode (Firecracker's
    /// `PATCH /drives/{id}`). The device thread takes the file before the next request it serves
    /// and tells the driver that the capacity may have changed; what the guest cached of the old
    /// file is the guest's to drop.
    pub fn replace_file(&mut self, path: &Path) -> Result<(), DeviceError> {
        let what = || format!("drive {:?} ({})", self.drive_id, path.display());
        let (file, identity) = open_drive(path, self.read_only, what).inspect_err(|_| {
            metrics::inc(&self.counters.update_fails);
        })?;
        metrics::inc(&self.counters.update_count);
        let capacity = identity.size / SECTOR_SIZE;
        *self.replacement.locked() = Some((file, capacity));
        if let Some(evt) = self.queue_events.first() {
            evt.write(1).map_err(DeviceError::io("virtio-blk: waking the device thread"))?;
        }
        (self.path, self.capacity, self.identity) = (path.to_path_buf(), capacity, identity);
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; ... }
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity.to_le_bytes());
        config[8..12].copy_from_slice(&MAX_SEGMENT_SIZE.to_le_bytes());
        config[12..16].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| config.get(o.checked_add(i)?)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), DeviceError> {
        self.front.activate("virtio-blk", 1, queues, |queues| Activation { mem, queues, interrupt })
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
        Ok(VirtioState::Block(self.save()?))
    }

    fn restore_state(self: Box<Self>, state: &VirtioState) -> Result<Box<dyn VirtioDevice>, VirtioStateError> {
        let VirtioState::Block(state) = state else { return Err(VirtioStateError::mismatch(state, BLOCK)) };
        Ok(Box::new(Self::restore(*self, state)?))
    }

    fn replace_file(&mut self, path: &Path) -> Result<(), DeviceError> {
        Block::replace_file(self, path)
    }

    fn take_counters(&self) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
        Some((format!("block_{}", self.drive_id), self.counters.take()))
    }
}

impl Persist for Block {
    type State = BlockState;
    /// The device as made for the new VM's drive ([`Block::new`]: its file open, its thread
    /// started), which the state is checked against.
    type Args = Block;
    type Error = BlockError;

    /// The drive's id, mode and its file's identity as the device opened it.
    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(BlockState { drive_id: self.drive_id.clone(), read_only: self.read_only, identity: self.identity.clone() })
    }

    /// Refuses a snapshot of another drive, or of this drive's file before it changed.
    fn restore(dev: Block, saved: &BlockState) -> Result<Self, BlockError> {
        if saved.drive_id != dev.drive_id || saved.read_only != dev.read_only {
            return Err(BlockError::OtherDrive {
                saved: saved.drive_id.clone(),
                saved_read_only: saved.read_only,
                here: dev.drive_id.clone(),
                here_read_only: dev.read_only,
            });
        }
        if let Some(why) = saved.identity.difference(&dev.identity) {
            return Err(BlockError::Changed { drive: dev.drive_id.clone(), path: dev.path.clone(), why });
        }
        Ok(dev)
    }
}

/// What the device thread works with once the driver has activated the device.
struct Active {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
}

struct Worker {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    /// The queue's notification eventfd (a copy): also signalled by the thread itself when the
    /// budget ran out with requests left.
    notify: EventFd,
    epoll: Epoll,
    active: Option<Active>,
    /// A new backing file from [`Block::replace_file`], taken at the next wakeup.
    replacement: Replacement,
    counters: Arc<BlockCounters>,
}

impl DeviceWorker for Worker {
    type Activation = Activation;
    type Saved = ();

    fn activate(&mut self, a: Activation) {
        self.active = Some(Active { mem: a.mem, queues: a.queues, interrupt: a.interrupt });
        // Requests made available before a snapshot are served now.
        let _ = self.notify.write(1);
    }

    fn deactivate(&mut self) {
        self.active = None;
    }

    /// The thread keeps none of the device's state.
    fn saved(&self) {}
}

impl Worker {
    fn run(mut self, commands: Commands<Activation>) {
        if let Err(e) = commands.watch(&self.epoll, TOKEN_COMMAND) {
            tracing::error!("virtio-blk: epoll: {e}");
            return;
        }
        let mut events = [EpollEvent::default(); 4];
        loop {
            let Some(ready) = thread::wait(&self.epoll, &mut events, "virtio-blk") else { return };
            for ev in ready {
                match ev.data() {
                    TOKEN_COMMAND => {
                        if !commands.serve(&mut self) {
                            return;
                        }
                    }
                    _ => {
                        let _ = self.notify.read();
                        metrics::inc(&self.counters.queue_event_count);
                        self.take_replacement();
                        self.process_queue();
                    }
                }
            }
        }
    }

    /// Serves from a replaced file from now on, and tells the driver its configuration changed.
    fn take_replacement(&mut self) {
        let Some((file, capacity)) = self.replacement.locked().take() else { return };
        (self.file, self.capacity) = (file, capacity);
        if let Some(a) = &self.active {
            a.interrupt.trigger(INT_CONFIG);
        }
    }

    /// Serves up to [`REQUEST_BUDGET`] requests, then tells the guest.
    fn process_queue(&mut self) {
        let Some(a) = &self.active else { return };
        let mut disk = Disk {
            file: &mut self.file,
            read_only: self.read_only,
            capacity: self.capacity,
            id: &self.id,
            counters: &self.counters,
        };
        let mut q = a.queues.locked();
        let Some(q) = q.first_mut() else { return };
        let mut served = 0;
        while served < REQUEST_BUDGET {
            if request::serve_next(&a.mem, q, &mut disk).is_none() {
                break;
            }
            served += 1;
        }
        if served > 0 && q.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.trigger(INT_USED_RING);
        }
        if served == REQUEST_BUDGET {
            let _ = self.notify.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(dir: &Path, ro: bool) -> DriveConfig {
        let path = dir.join("disk.img");
        if !path.exists() {
            std::fs::write(&path, vec![7u8; 8192 + 100]).unwrap();
        }
        DriveConfig { drive_id: "layer-0".into(), path_on_host: path, is_root_device: false, is_read_only: ro }
    }

    #[test]
    fn config_space_features_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Block::new(&drive(dir.path(), true), &Threads::new(None)).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 16, "capacity in whole sectors");
        let mut w = [0u8; 4];
        dev.read_config(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), MAX_SEGMENTS);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
        assert_ne!(dev.features() & F_RO, 0);
        let rw = Block::new(&drive(dir.path(), false), &Threads::new(None)).unwrap();
        assert_eq!(rw.features() & F_RO, 0);
    }

    fn new(cfg: &DriveConfig) -> Block {
        Block::new(cfg, &Threads::new(None)).unwrap()
    }

    #[test]
    fn the_typed_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = drive(dir.path(), true);
        let dev = new(&cfg);
        let state = dev.save().unwrap();
        assert_eq!((state.drive_id.as_str(), state.read_only, state.identity.size), ("layer-0", true, 8192 + 100));
        // Through the snapshot's encoding, and through the transport's side of the device.
        let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard()).unwrap();
        let (decoded, _): (BlockState, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(decoded, state);
        assert_eq!(dev.save_state().unwrap(), VirtioState::Block(state.clone()));
        let restored = Block::restore(new(&cfg), &decoded).unwrap();
        assert_eq!(restored.save().unwrap(), state);
        let boxed: Box<dyn VirtioDevice> = Box::new(new(&cfg));
        let restored = boxed.restore_state(&VirtioState::Block(state.clone())).unwrap();
        assert_eq!(restored.save_state().unwrap(), VirtioState::Block(state));
    }

    #[test]
    fn another_kind_of_devices_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = drive(dir.path(), true);
        for state in [
            VirtioState::Vsock(crate::devices::virtio::vsock::VsockState { connections: false }),
            VirtioState::Stateless,
        ] {
            let boxed: Box<dyn VirtioDevice> = Box::new(new(&cfg));
            let e = boxed.restore_state(&state).err().unwrap();
            assert!(matches!(e, VirtioStateError::Mismatch { here: "virtio-blk", .. }), "{e}");
            assert!(e.to_string().contains(state.kind()), "{e}");
        }
    }

    #[test]
    fn a_replaced_file_changes_the_capacity_and_identity_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = new(&drive(dir.path(), false));
        let bigger = dir.path().join("bigger.img");
        std::fs::write(&bigger, vec![0u8; 1 << 20]).unwrap();
        dev.replace_file(&bigger).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048, "the new capacity");
        assert_eq!((dev.path(), dev.save().unwrap().identity.size), (bigger.as_path(), 1 << 20));
        let e = dev.replace_file(&dir.path().join("missing.img")).unwrap_err().to_string();
        assert!(e.contains("missing.img"), "{e}");
        assert_eq!(dev.path(), bigger.as_path(), "a refused replacement changes nothing");
        let c = dev.take_counters().unwrap();
        assert_eq!(
            (c.0.as_str(), c.1["update_count"].as_u64(), c.1["update_fails"].as_u64()),
            ("block_layer-0", Some(1), Some(1))
        );
    }

    #[test]
    fn a_snapshot_restores_only_onto_the_unchanged_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = drive(dir.path(), true);
        let state = new(&cfg).save().unwrap();
        Block::restore(new(&cfg), &state).unwrap();

        // Another drive id, or read-write instead of read-only: refused.
        let other = DriveConfig { drive_id: "layer-1".into(), ..cfg.clone() };
        let e = Block::restore(new(&other), &state).err().unwrap();
        assert!(matches!(e, BlockError::OtherDrive { .. }), "{e}");
        let rw = DriveConfig { is_read_only: false, ..cfg.clone() };
        assert!(matches!(Block::restore(new(&rw), &state), Err(BlockError::OtherDrive { .. })));

        // The file grew: refused, with what changed.
        std::fs::OpenOptions::new().append(true).open(&cfg.path_on_host).unwrap().set_len(9000).unwrap();
        let e = Block::restore(new(&cfg), &state).err().unwrap().to_string();
        assert!(e.contains("changed since the snapshot") && e.contains("size"), "{e}");

        // Replaced by another file of the same size: refused.
        let state = new(&cfg).save().unwrap();
        let copy = dir.path().join("copy.img");
        std::fs::copy(&cfg.path_on_host, &copy).unwrap();
        std::fs::rename(&copy, &cfg.path_on_host).unwrap();
        let e = Block::restore(new(&cfg), &state).err().unwrap().to_string();
        assert!(e.contains("replaced"), "{e}");

        // Gone: the device cannot be created.
        std::fs::remove_file(&cfg.path_on_host).unwrap();
        assert!(Block::new(&cfg, &Threads::new(None)).is_err());
    }
}
