//! The control page: a small MMIO device (every access is an exit) through which the agent learns
//! who it is and tells ember what it is doing.
//!
//! ```text
//! offset 0x00  u32  magic "EMBR" (reads only)
//! offset 0x08  u64  clone id: 0 in a VM that booted, 1.. in clones restored from a snapshot
//! offset 0x10  32 bytes of seed material for the guest's RNG, fresh from the host for every VM
//! offset 0x30  u64  flags from the host (FLAG_SERVE, FLAG_QUIET)
//! offset 0x38  u64  the host's wall-clock time (CLOCK_REALTIME, ns since the epoch), read at the
//!                   moment of the access: a clone sets its clock from it (its own clock goes on
//!                   from the snapshot's)
//! offset 0x100      doorbell "ready": the snapshot point
//! offset 0x108      doorbell "response": a mailbox response is written (when the request asked)
//! offset 0x110      doorbell "idle": the agent has nothing to do; the vCPU waits host-side for the
//!                   next mailbox request or a device interrupt
//! ```

/// Guest-physical address of the control page.
pub const CONTROL_ADDR: u64 = 0xd000_1000;
pub const CONTROL_SIZE: u64 = 0x1000;

pub const MAGIC: u32 = u32::from_le_bytes(*b"EMBR");
pub const CLONE_ID_OFFSET: u64 = 0x08;
pub const SEED_OFFSET: u64 = 0x10;
pub const SEED_LEN: usize = 32;
pub const FLAGS_OFFSET: u64 = 0x30;
pub const REALTIME_OFFSET: u64 = 0x38;
/// Size of the readable registers.
pub const REGS_LEN: usize = 0x40;

pub const READY_DOORBELL: u64 = 0x100;
pub const RESPONSE_DOORBELL: u64 = 0x108;
pub const IDLE_DOORBELL: u64 = 0x110;

/// The host wants the agent to serve invocations (on the mailbox and vsock) after "ready". Without
/// it the agent powers the VM off after "ready" (a one-shot boot: ember's boot check).
pub const FLAG_SERVE: u64 = 1;
/// The host discards the VM's console: the agent writes no line of its own there (a clone's
/// marker line is serial-port work, interrupts and all, that nobody would read).
pub const FLAG_QUIET: u64 = 2;
