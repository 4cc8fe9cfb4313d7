//! Devices the guest reaches through port I/O and MMIO exits, and the bus that dispatches to them.
//!
//! Every device with state implements [`Persist`] beside itself: `save` is the typed state that
//! goes into a snapshot (or a typed error: a device that cannot be saved fails the snapshot),
//! `restore` rebuilds the device from it. virtio devices implement [`virtio::VirtioDevice`] and sit
//! behind the [`virtio::mmio`] transport, their states one variant each of
//! [`virtio::VirtioState`]; a new one is a folder under `virtio/`, a variant there and one line in
//! `vmm::devices`.

pub mod boot_timer;
pub mod bus;
pub mod console_input;
pub mod control;
pub mod debug_port;
pub mod i8042;
pub mod metrics;
pub mod pit;
pub mod serial;
pub mod virtio;

use thiserror::Error;

/// What a device write asks of the VM, beyond the write itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRequest {
    /// The guest asked for a reset (i8042 reset line): the VM ends cleanly.
    Reset,
    /// The guest powered off (ember's exit port): the VM ends cleanly.
    PowerOff,
    /// The guest kernel panicked (ember's exit port).
    Panic,
    /// The guest agent is ready: the snapshot point (the control page's doorbell).
    Ready,
    /// The agent answered a mailbox request that asked for the response doorbell.
    MailboxResponse,
    /// The agent has nothing to do: wait host-side for the next mailbox request.
    Idle,
}

/// The state of every device that has state worth keeping, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: serial::UartState,
    /// Every virtio device, in slot order: transport, queues and the device's own (typed) state.
    pub virtio: Vec<virtio::mmio::MmioState>,
    /// The drives the VM's block devices serve, in slot order (a restore opens them again).
    pub drives: Vec<crate::config::DriveConfig>,
    /// The network interfaces, in slot order after the drives (a restore opens or is handed a TAP
    /// for each).
    pub nets: Vec<crate::config::NetConfig>,
    /// Where the vsock device listened, when the snapshot's maker records it (Firecracker's API
    /// restores a VM's vsock on its own path; ember's clones get theirs from whoever restores them).
    pub vsock_path: Option<std::path::PathBuf>,
}

/// A component whose state goes into snapshots (the shape of Firecracker's `Persist`): `save`
/// reads the live component's state, `restore` builds a component from a saved state and what it
/// needs from the new VM (`Args`). A saved state is input like any other: `restore` checks it.
/// Both can fail, with the component's own error: a save that fails fails the snapshot (nothing
/// stands in for the state it could not read).
pub trait Persist: Sized {
    /// What goes into a snapshot.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What a restore needs from the new VM besides the state.
    type Args;
    /// Why a save or a restore failed.
    type Error: std::error::Error + Send + Sync + 'static;
    fn save(&self) -> Result<Self::State, Self::Error>;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Why a device could not be created, restored or started.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0} failed: {err}", err = std::io::Error::from_raw_os_error(*.1))]
    Kvm(&'static str, i32),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// A snapshot's device state that this VM's devices cannot take.
    #[error("device state in the snapshot: {0}")]
    BadState(String),
    #[error("cannot build the device seccomp filter: {0}")]
    Seccomp(String),
    /// The serial port's state could not be saved or restored.
    #[error("serial port: {0}")]
    Serial(#[from] serial::SerialError),
    /// The virtio device in slot `slot` (its transport, queues or own state) could not be made,
    /// saved or restored.
    #[error("virtio slot {slot}: {source}")]
    Virtio {
        slot: usize,
        #[source]
        source: virtio::mmio::MmioError,
    },
}

impl DeviceError {
    /// An I/O error, with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// A device on the port-I/O or MMIO bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest>;
}
