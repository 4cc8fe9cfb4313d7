//! ember: a minimal KVM microVM manager.
//!
//! - [`config`]: the machine description (Firecracker-shaped JSON or CLI flags).
//! - [`vmm`]: one VM: memory, boot, vCPUs, KVM state.
//! - [`devices`]: what the guest talks to: UART, i8042, boot timer, ember's debug and exit ports.
//! - [`bench`]: measurements behind `ember bench`.

pub mod bench;
pub mod config;
pub mod devices;
pub mod snapshot;
pub mod vmm;
