//! Networking for clones: every clone of a networked function gets a network namespace of its
//! own, prepared ahead of time, and its network card's TAP lives there.
//!
//! Every clone of a snapshot wakes up with the template's address ([`GUEST_ADDR`] behind the
//! gateway [`GATEWAY`], the TAP's MAC the same everywhere), so nothing in the guest changes after
//! a restore. Inside a clone's namespace that address is private: a veth pair joins the namespace
//! to the host with a transit address of its own (a /30 of [`TRANSIT`]) and the namespace's
//! nftables rules translate the guest's address to it and let nothing in that the guest did not
//! start. On the host, one nftables table per daemon (`ember_<id>`) applies each function's
//! policy to its clones' transit addresses (a set per function): public egress (masqueraded, or
//! with the function's `egress_ip`), a private subnet through the function's VXLAN tunnel to its
//! proxy (leaving with the function's address there), and never another clone nor the host's own
//! addresses.
//!
//! All of it is made by one thread, `host`, with netlink (rtnetlink) and libnftables' JSON
//! interface ([`nft`]); namespaces are prepared in the background into a pool per function, so
//! attaching a network to a restored clone is handing its worker an open TAP descriptor. A
//! namespace lives as long as its descriptors: when a clone ends (or the daemon is killed and its
//! workers with it) the kernel removes the namespace, its TAP and both ends of its veth pair; the
//! host table and the tunnels are removed at shutdown and, after a SIGKILL, when the daemon
//! starts again on the same state directory.

mod host;
pub mod nft;
pub mod policy;

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::NetConfig;
use crate::sys::Locked;
pub use policy::{Net, NetworkPolicy, PrivateNetwork};

/// The link between a guest and its namespace: the guest's address and its gateway (the TAP).
pub const GUEST_LINK: Net = Net::new(Ipv4Addr::new(172, 16, 0, 0), 30);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// Where the clones' namespaces get their transit addresses, a /30 each.
pub const TRANSIT: Net = Net::new(Ipv4Addr::new(10, 199, 0, 0), 16);
/// The TAP's name inside a clone's namespace.
pub const TAP_NAME: &str = "tap0";
/// The TAP's MAC address in every namespace: what a clone's guest has in its neighbour table.
pub const TAP_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];
/// Prepared namespaces a function keeps, at most.
pub const MAX_SPARE: usize = 64;

/// The network card a networked function's guest boots with (and every clone keeps).
pub fn guest_interface() -> NetConfig {
    NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: TAP_NAME.into(),
        guest_mac: None,
        guest_ip: Some(format!("{GUEST_ADDR}/{}", GUEST_LINK.prefix)),
        gateway: Some(GATEWAY.to_string()),
    }
}

/// The transit addresses of slot `n`: the host's end and the namespace's.
pub fn transit(n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(TRANSIT.base()) + 4 * n;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// Slots in the transit range.
pub const MAX_SLOTS: u32 = 1 << (32 - TRANSIT.prefix as u32 - 2);

/// A prepared namespace: its descriptor and its TAP's. Dropping it hands it back to the network
/// thread, which forgets it (the kernel removes the namespace once nothing holds it).
pub struct Slot {
    n: u32,
    function: String,
    fds: Option<(OwnedFd, OwnedFd)>,
    tx: Sender<Request>,
    /// The clone's address on the host's side (its traffic leaves with it, unless the policy
    /// says otherwise).
    pub address: Ipv4Addr,
}

impl Slot {
    /// The TAP's descriptor (for the clone's network card).
    pub fn tap(&self) -> RawFd {
        self.fds.as_ref().map(|f| f.1.as_raw_fd()).unwrap_or(-1)
    }

    /// The namespace's descriptor (benchmarks run a server in it).
    pub fn namespace(&self) -> RawFd {
        self.fds.as_ref().map(|f| f.0.as_raw_fd()).unwrap_or(-1)
    }

    /// Another descriptor of the TAP (for a clone in this process).
    pub fn dup_tap(&self) -> std::io::Result<OwnedFd> {
        match &self.fds {
            Some((_, tap)) => tap.try_clone(),
            None => Err(std::io::Error::other("the namespace was released")),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ns, tap)) = self.fds.take() {
            let _ = self.tx.send(Request::Release {
                n: self.n,
                function: std::mem::take(&mut self.function),
                address: self.address,
                ns,
                tap,
            });
        }
    }
}

/// Why the network could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// This daemon has no network thread (no root, no nftables, ...): no networked functions.
    #[error("networking is unavailable: {0}")]
    Unavailable(String),
    /// The host cannot carry this policy (it conflicts with another function's, say).
    #[error("{0}")]
    Refused(String),
    /// The network thread stopped, or did not answer in time.
    #[error("the network thread {0}")]
    Thread(&'static str),
    #[error("no network for function {0:?}")]
    NoNetwork(String),
    /// Preparing the function's namespaces failed: why.
    #[error("cannot prepare a network namespace: {0}")]
    Prepare(String),
    #[error("no network namespace ready within {0:.1} s")]
    NotReady(f64),
}

impl NetworkError {
    /// Whether the request itself is at fault (its policy), rather than the host or the daemon.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Refused(_))
    }
}

enum Request {
    Attach {
        function: String,
        policy: NetworkPolicy,
        spare: usize,
        reply: Sender<Result<(), String>>,
    },
    Detach {
        function: String,
    },
    Release {
        n: u32,
        function: String,
        address: Ipv4Addr,
        ns: OwnedFd,
        tap: OwnedFd,
    },
    /// Remove everything made on the host; answer once done.
    Stop(Sender<()>),
}

/// What a function's namespace pool shows (`GET /functions/{name}`'s `network`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct NetInfo {
    /// Prepared namespaces waiting for a clone.
    pub ready_namespaces: usize,
    /// Namespaces prepared so far, and how long the last one took (ms).
    pub prepared: u64,
    pub last_prepare_ms: f64,
    /// Clones that found the pool empty and waited for a namespace.
    pub waited: u64,
}

#[derive(Default)]
struct FnPool {
    ready: VecDeque<Slot>,
    spare: usize,
    info: NetInfo,
    /// Set when preparing failed: why (a clone that waits gets it).
    error: Option<String>,
}

#[derive(Default)]
struct Shared {
    pools: Mutex<HashMap<String, FnPool>>,
    changed: Condvar,
}

/// The daemon's handle on the network thread (or why there is none).
pub struct Network {
    tx: Option<Mutex<Sender<Request>>>,
    shared: Arc<Shared>,
    unavailable: String,
}

impl Network {
    /// Starts the network thread for the daemon of `state_dir` (before the daemon confines
    /// itself); a daemon that cannot have one gets a handle that says why.
    /// `masquerade`: public egress leaves with the host's address (else with each clone's transit
    /// address, routed back to this host from beyond it).
    pub fn start(state_dir: &Path, masquerade: bool) -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = channel();
        match host::Host::start(state_dir, masquerade, rx, tx.clone(), shared.clone()) {
            Ok(()) => Self { tx: Some(Mutex::new(tx)), shared, unavailable: String::new() },
            Err(e) => {
                tracing::info!("clone networking unavailable: {e}");
                Self::unavailable(e)
            }
        }
    }

    /// A handle that refuses every networked function with `why`.
    pub fn unavailable(why: String) -> Self {
        Self { tx: None, shared: Arc::default(), unavailable: why }
    }

    fn send(&self, r: Request) -> Result<(), NetworkError> {
        let tx = self.tx.as_ref().ok_or_else(|| NetworkError::Unavailable(self.unavailable.clone()))?;
        tx.locked().send(r).map_err(|_| NetworkError::Thread("has stopped"))
    }

    /// Sets `function`'s policy up on the host (its set, rules and tunnel), checked against the
    /// host and the other functions, and starts preparing `spare` namespaces for it. Nothing is
    /// left half made when it fails.
    pub fn attach(&self, function: &str, policy: &NetworkPolicy, spare: usize) -> Result<(), NetworkError> {
        let (reply, rx) = channel();
        let spare = spare.clamp(1, MAX_SPARE);
        self.send(Request::Attach { function: function.into(), policy: policy.clone(), spare, reply })?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| NetworkError::Thread("did not answer"))?
            .map_err(NetworkError::Refused)
    }

    /// Removes `function`'s policy, tunnel and prepared namespaces.
    pub fn detach(&self, function: &str) {
        self.shared.pools.locked().remove(function);
        let _ = self.send(Request::Detach { function: function.into() });
    }

    /// A prepared namespace for a clone of `function`; waits up to `timeout` for one when the
    /// pool is empty.
    pub fn take(&self, function: &str, timeout: Duration) -> Result<Slot, NetworkError> {
        let deadline = Instant::now() + timeout;
        let mut pools = self.shared.pools.locked();
        let mut waited = false;
        loop {
            let pool = pools.get_mut(function).ok_or_else(|| NetworkError::NoNetwork(function.into()))?;
            if let Some(s) = pool.ready.pop_front() {
                if waited {
                    pool.info.waited += 1;
                }
                return Ok(s);
            }
            if let Some(e) = &pool.error {
                return Err(NetworkError::Prepare(e.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetworkError::NotReady(timeout.as_secs_f64()));
            }
            waited = true;
            pools = self.shared.changed.wait_timeout(pools, left).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Removes the host table and the tunnels (the daemon stops); prepared namespaces go with
    /// their descriptors.
    pub fn shutdown(&self) {
        let (done, rx) = channel();
        if self.send(Request::Stop(done)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Whether networked functions can be registered.
    pub fn available(&self) -> bool {
        self.tx.is_some()
    }

    /// `function`'s namespace pool.
    pub fn info(&self, function: &str) -> Option<NetInfo> {
        let pools = self.shared.pools.locked();
        pools.get(function).map(|p| NetInfo { ready_namespaces: p.ready.len(), ..p.info.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_addresses_are_distinct_per_slot() {
        assert_eq!(transit(0), (Ipv4Addr::new(10, 199, 0, 1), Ipv4Addr::new(10, 199, 0, 2)));
        assert_eq!(transit(64), (Ipv4Addr::new(10, 199, 1, 1), Ipv4Addr::new(10, 199, 1, 2)));
        assert_eq!(MAX_SLOTS, 16384);
        assert!(TRANSIT.contains(transit(MAX_SLOTS - 1).1));
        assert!(GUEST_LINK.contains(GUEST_ADDR) && GUEST_LINK.contains(GATEWAY));
        assert!(guest_interface().check().is_ok());
    }

    #[test]
    fn an_unavailable_network_says_why() {
        let n = Network::unavailable("it needs root".into());
        let e = n.attach("f", &NetworkPolicy::default(), 1).unwrap_err();
        assert!(e.to_string().contains("it needs root") && e.is_refusal(), "{e}");
        assert!(matches!(n.take("f", Duration::ZERO), Err(NetworkError::NoNetwork(_))));
        // The daemon's own failures are not the request's.
        assert!(!NetworkError::Thread("did not answer").is_refusal());
    }
}
