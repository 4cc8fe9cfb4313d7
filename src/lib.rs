//! ember: a minimal KVM microVM manager. The modules, from the ground up, as the data flows:
//!
//! - [`memory`], [`sys`], [`seccomp`], [`request_body`]: the ground floor (the guest's physical
//!   layout, small system helpers, seccomp filters, how the HTTP APIs read bodies); they import
//!   nothing of ember.
//! - [`config`]: the machine description (Firecracker-shaped JSON or CLI flags) and the default
//!   kernel command line.
//! - [`snapshot`]: snapshot files as bytes (state format, memory file, working set).
//! - [`image`]: read-only EROFS layer images built from directories, tars and OCI / docker images.
//! - [`channel`]: the host ends of the guest channels (mailbox, vsock).
//! - [`devices`]: what the guest talks to: UART, i8042, boot timer, ember's ports and control page,
//!   virtio devices behind the virtio-mmio transport.
//! - [`vmm`]: one VM: boot, restore, vCPUs, pause, its snapshot state.
//! - [`template`]: make a template (boot -> ready -> snapshot) and open it to restore clones.
//! - [`scale`]: the autoscaler, the host's idle budget, and the simulator that replays traces
//!   against it (pure computation).
//! - [`isolation`]: worker processes (jail, cgroup) and clones' network namespaces.
//! - [`serve`]: `ember serve`, the pool supervisor and its Unix-socket API.
//! - [`firecracker`]: Firecracker's command line and per-VM API over the same VMM.
//! - [`bench`](mod@bench): measurements behind `ember bench`.
//!
//! No module imports one above it (`tests/layers.rs` checks).

pub mod bench;
pub mod channel;
pub mod config;
pub mod devices;
pub mod firecracker;
pub mod image;
pub mod isolation;
pub mod memory;
pub mod request_body;
pub mod scale;
pub mod seccomp;
pub mod serve;
pub mod snapshot;
pub mod svg;
pub mod sys;
pub mod template;
pub mod vmm;
