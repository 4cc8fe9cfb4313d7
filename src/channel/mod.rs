//! The host ends of the channels to a guest's agent: the [`mailbox`] (shared memory, polled from
//! guest user space: no guest kernel on the path) and [`vsock`] (Firecracker's hybrid vsock, a
//! Unix socket on the host).

pub mod mailbox;
pub mod vsock;
