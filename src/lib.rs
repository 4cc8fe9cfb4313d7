//! ember: a minimal KVM microVM manager.
//!
//! - [`config`]: the machine description (Firecracker-shaped JSON or CLI flags).
//! - [`vmm`]: one VM: memory, boot, vCPUs, KVM state.
//! - [`devices`]: what the guest talks to: UART, i8042, boot timer, ember's debug and exit ports.
//! - [`mailbox`]: the host side of the mailbox, the invocation path that skips the guest kernel.
//! - [`vsock`]: invocations over a VM's vsock socket (the host side of Firecracker's hybrid vsock).
//! - [`serve`]: `ember serve`, the pool supervisor and its Unix-socket API.
//! - [`bench`]: measurements behind `ember bench`.

pub mod bench;
pub mod config;
pub mod devices;
pub mod mailbox;
pub mod memory;
pub mod seccomp;
pub mod serve;
pub mod snapshot;
pub mod sys;
pub mod template;
pub mod vmm;
pub mod vsock;
