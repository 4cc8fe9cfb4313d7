//! Devices the guest reaches through port I/O and MMIO exits, and the bus that dispatches to them.

pub mod boot_timer;
pub mod bus;
pub mod console_input;
pub mod control;
pub mod debug_port;
pub mod i8042;
pub mod serial;
pub mod virtio;

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

/// The state of every device that has state worth keeping, as saved in a snapshot. A device with
/// state adds its field here and nowhere else.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: serial::UartState,
    pub vsock: virtio::mmio::MmioState,
}

/// A device on the port-I/O or MMIO bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest>;
}
