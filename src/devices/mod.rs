//! Devices the guest reaches through port I/O and MMIO exits, and the bus that dispatches to them.
//!
//! Every device with state implements [`Persist`] beside itself: `save` is what goes into a
//! snapshot, `restore` rebuilds the device from it. virtio devices implement
//! [`virtio::VirtioDevice`] and sit behind the [`virtio::mmio`] transport; a new one is a folder
//! under `virtio/` plus one line in `vmm::devices`.

pub mod boot_timer;
pub mod bus;
pub mod console_input;
pub mod control;
pub mod debug_port;
pub mod i8042;
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
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: serial::UartState,
    /// Every virtio device, in slot order: transport, queues and the device's own state.
    pub virtio: Vec<virtio::mmio::MmioState>,
    /// The drives the VM's block devices serve, in slot order (a restore opens them again).
    pub drives: Vec<crate::config::DriveConfig>,
    /// The network interfaces, in slot order after the drives (a restore opens or is handed a TAP
    /// for each).
    pub nets: Vec<crate::config::NetConfig>,
}

/// A component whose state goes into snapshots (the shape of Firecracker's `Persist`): `save`
/// reads the live component's state, `restore` builds a component from a saved state and what it
/// needs from the new VM (`Args`). A saved state is input like any other: `restore` checks it.
pub trait Persist: Sized {
    type State;
    type Args;
    fn save(&self) -> Self::State;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, DeviceError>;
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
    /// A drive's file is not the one the snapshot was taken with.
    #[error("{0}")]
    DriveChanged(String),
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
