//! What stands between a clone and the host: the processes clones run in ([`worker`]: their
//! launch, jail, cgroup, and the worker's own side) and the clones' networks ([`network`]: a
//! namespace each, prepared ahead, the host's nftables rules). It knows nothing of the daemon's
//! API: the daemon asks it for a worker or a namespace and gets bytes and descriptors back.

pub mod network;
pub mod worker;
