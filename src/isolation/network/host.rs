//! The network thread: the one thread of the daemon that changes the host's network. It prepares
//! clones' namespaces (entering each new namespace itself, then coming back), keeps the daemon's
//! nftables table and the functions' tunnels, and forgets namespaces their clones are done with.
//! Started before the daemon confines itself, it confines itself with a filter of its own (the
//! daemon's calls plus namespaces, netlink sockets and the TAP's ioctls). No guest input reaches
//! it: it acts on registrations and on clones' ends.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};
use serde_json::Value;

use super::nft::{cmd, Nft};
use super::policy::NetworkPolicy;
use super::{transit, FnPool, Request, Shared, Slot, GATEWAY, GUEST_ADDR, GUEST_LINK, MAX_SLOTS, TAP_MAC, TAP_NAME};
use crate::devices::virtio::net::Tap;
use crate::sys::Locked;

/// The VXLAN port (IANA).
const VXLAN_PORT: u16 = 4789;
/// How long a function whose namespaces cannot be prepared waits before the next try.
const RETRY: Duration = Duration::from_secs(2);

/// What the host keeps for one networked function.
struct FnNet {
    id: u32,
    policy: NetworkPolicy,
    /// The tunnel's interface, with a private network.
    tunnel: Option<String>,
    retry_at: Option<Instant>,
}

pub(super) struct Host {
    nft: Nft,
    rt: tokio::runtime::Runtime,
    /// rtnetlink in the host's namespace.
    nl: Handle,
    host_ns: OwnedFd,
    /// Names this daemon's interfaces and table (from its state directory).
    id: String,
    /// Public egress leaves with the host's address.
    masquerade: bool,
    table: String,
    /// Whether the table exists (made for the first networked function).
    table_made: bool,
    functions: BTreeMap<String, FnNet>,
    next_fn: u32,
    next_slot: u32,
    free: VecDeque<u32>,
    shared: Arc<Shared>,
    tx: Sender<Request>,
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Writes a sysctl of the calling thread's network namespace.
fn sysctl(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{path}: {e}"))
}

fn this_thread_ns() -> Result<OwnedFd, String> {
    let f = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    Ok(f.into())
}

fn setns(fd: RawFd) -> Result<(), String> {
    // SAFETY: setns takes a namespace descriptor we hold.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(errno("setns"));
    }
    Ok(())
}

async fn index(h: &Handle, name: &str) -> Result<u32, String> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(format!("no interface {name}")),
        Err(e) => Err(format!("interface {name}: {e}")),
    }
}

async fn up(h: &Handle, index: u32, mac: Option<[u8; 6]>) -> Result<(), String> {
    let mut m = LinkUnspec::new_with_index(index).up();
    if let Some(mac) = mac {
        m = m.address(mac.to_vec());
    }
    h.link().set(m.build()).execute().await.map_err(|e| format!("link {index} up: {e}"))
}

async fn address(h: &Handle, index: u32, a: Ipv4Addr, prefix: u8) -> Result<(), String> {
    h.address().add(index, IpAddr::V4(a), prefix).execute().await.map_err(|e| format!("address {a}/{prefix}: {e}"))
}

impl Host {
    /// Starts the thread; returns once it has set the host up (or could not).
    pub(super) fn start(
        state_dir: &Path,
        masquerade: bool,
        rx: Receiver<Request>,
        tx: Sender<Request>,
        shared: Arc<Shared>,
    ) -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("clone networks need root (network namespaces, TAP devices, nftables)".into());
        }
        let nft = Nft::load()?;
        let id = {
            use sha2::{Digest, Sha256};
            let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
            let h = Sha256::digest(dir.as_os_str().as_encoded_bytes());
            format!("{:02x}{:02x}", h[0], h[1])
        };
        let filter = crate::seccomp::network_filter().map_err(|e| format!("seccomp: {e}"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ember-net".into())
            .spawn(move || {
                let host = match Host::open(nft, id, masquerade, tx, shared) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = crate::seccomp::apply(&filter) {
                    let _ = ready_tx.send(Err(format!("cannot confine the network thread: {e}")));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                host.run(rx);
            })
            .map_err(|e| format!("cannot start the network thread: {e}"))?;
        ready_rx.recv_timeout(Duration::from_secs(30)).map_err(|_| "the network thread did not start".to_string())?
    }

    fn open(nft: Nft, id: String, masquerade: bool, tx: Sender<Request>, shared: Arc<Shared>) -> Result<Self, String> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("runtime: {e}"))?;
        let nl = {
            let _g = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
            rt.spawn(conn);
            handle
        };
        let host_ns = this_thread_ns()?;
        let table = format!("ember_{id}");
        let mut host = Self {
            nft,
            rt,
            nl,
            host_ns,
            id,
            masquerade,
            table,
            table_made: false,
            functions: BTreeMap::new(),
            next_fn: 1,
            next_slot: 0,
            free: VecDeque::new(),
            shared,
            tx,
        };
        // What a daemon killed on this state directory left: its table and its interfaces.
        host.remove_leftovers()?;
        Ok(host)
    }

    /// Makes the host's side (forwarding on, this daemon's table) before the first networked
    /// function: a daemon that has none leaves the host's network as it found it.
    fn ensure_table(&mut self) -> Result<(), String> {
        if self.table_made {
            return Ok(());
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim() == "0").unwrap_or(true) {
            sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
            tracing::info!("IPv4 forwarding enabled (clones' traffic is routed through this host)");
        }
        let t = self.table.clone();
        let mut commands = vec![
            cmd::add(cmd::table(&t)),
            cmd::add(cmd::chain(&t, "forward", "filter", "forward", 0, "accept")),
            cmd::add(cmd::chain(&t, "input", "filter", "input", 0, "accept")),
            cmd::add(cmd::chain(&t, "post", "nat", "postrouting", 100, "accept")),
        ];
        commands.extend(self.rules());
        self.nft.run(commands)?;
        self.table_made = true;
        tracing::info!(table = %t, "clone networking set up on this host");
        Ok(())
    }

    /// Deletes this daemon's table and interfaces, if a previous run left them.
    fn remove_leftovers(&mut self) -> Result<(), String> {
        let t = self.table.clone();
        self.nft.run(vec![cmd::add(cmd::table(&t)), cmd::delete(cmd::table(&t))])?;
        let prefixes = [format!("em{}-", self.id), format!("et{}-", self.id)];
        let nl = self.nl.clone();
        let stale: Vec<(u32, String)> = self.rt.block_on(async {
            let mut links = nl.link().get().execute();
            let mut found = Vec::new();
            while let Ok(Some(l)) = links.try_next().await {
                for a in &l.attributes {
                    if let LinkAttribute::IfName(n) = a {
                        if prefixes.iter().any(|p| n.starts_with(p.as_str())) {
                            found.push((l.header.index, n.clone()));
                        }
                    }
                }
            }
            found
        });
        for (index, name) in stale {
            tracing::info!("removing {name}, left by a previous run");
            let _ = self.rt.block_on(self.nl.link().del(index).execute());
        }
        Ok(())
    }

    fn run(mut self, rx: Receiver<Request>) {
        loop {
            let wanted = self.wanted();
            let wait = if wanted.is_some() { Duration::ZERO } else { Duration::from_millis(500) };
            match rx.recv_timeout(wait) {
                Ok(r) => {
                    if self.handle(r).is_break() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.teardown();
                    return;
                }
            }
            if let Some(f) = wanted {
                self.refill(&f);
            }
        }
    }

    /// Carries out one request; `Break` after a stop (everything torn down).
    fn handle(&mut self, r: Request) -> std::ops::ControlFlow<()> {
        match r {
            Request::Attach { function, policy, spare, reply } => {
                let result = self.attach(&function, policy, spare);
                let _ = reply.send(result);
            }
            Request::Detach { function } => self.detach(&function),
            Request::Release { n, function, address, ns, tap } => {
                drop((ns, tap));
                if let Some(f) = self.functions.get(&function) {
                    let set = format!("f{}", f.id);
                    let _ = self.nft.run(vec![cmd::delete(cmd::element(&self.table, &set, address))]);
                }
                self.free.push_back(n);
            }
            Request::Stop(done) => {
                self.teardown();
                let _ = done.send(());
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    /// The function whose pool most needs a namespace now.
    fn wanted(&self) -> Option<String> {
        let now = Instant::now();
        let pools = self.shared.pools.locked();
        pools
            .iter()
            .filter(|(name, p)| {
                p.ready.len() < p.spare
                    && self.functions.get(*name).is_some_and(|f| f.retry_at.is_none_or(|t| now >= t))
            })
            .max_by_key(|(_, p)| p.spare - p.ready.len())
            .map(|(name, _)| name.clone())
    }

    fn refill(&mut self, function: &str) {
        let Some(fid) = self.functions.get(function).map(|f| f.id) else { return };
        let Some(n) = self.free_slot() else {
            self.fail(function, "every transit address is in use".into());
            return;
        };
        let t = Instant::now();
        let (_, address) = transit(n);
        let prepared = self.prepare(n).and_then(|fds| {
            let set = format!("f{fid}");
            self.nft.run(vec![cmd::add(cmd::element(&self.table, &set, address))]).map(|_| fds)
        });
        match prepared {
            Ok((ns, tap)) => {
                let slot =
                    Slot { n, function: function.to_string(), fds: Some((ns, tap)), tx: self.tx.clone(), address };
                let mut pools = self.shared.pools.locked();
                match pools.get_mut(function) {
                    Some(p) => {
                        p.ready.push_back(slot);
                        p.info.prepared += 1;
                        p.info.last_prepare_ms = t.elapsed().as_secs_f64() * 1e3;
                        p.error = None;
                    }
                    // Detached meanwhile: the slot goes back (its drop sends it to this thread).
                    None => drop(slot),
                }
                self.shared.changed.notify_all();
                if let Some(f) = self.functions.get_mut(function) {
                    f.retry_at = None;
                }
            }
            Err(e) => {
                self.free.push_back(n);
                self.fail(function, e);
            }
        }
    }

    /// A slot number whose namespace is gone: a released slot whose host-side veth end has
    /// disappeared (the kernel removes it with the namespace, once nothing holds the namespace),
    /// else a new one.
    fn free_slot(&mut self) -> Option<u32> {
        for _ in 0..self.free.len() {
            let Some(n) = self.free.pop_front() else { break };
            let peer = format!("em{}-{n:x}", self.id);
            let nl = self.nl.clone();
            if self.rt.block_on(index(&nl, &peer)).is_err() {
                return Some(n);
            }
            self.free.push_back(n);
        }
        let n = (self.next_slot < MAX_SLOTS).then_some(self.next_slot)?;
        self.next_slot += 1;
        Some(n)
    }

    fn fail(&mut self, function: &str, e: String) {
        crate::log_limited!(warn, function, "cannot prepare a network namespace: {e}");
        if let Some(f) = self.functions.get_mut(function) {
            f.retry_at = Some(Instant::now() + RETRY);
        }
        if let Some(p) = self.shared.pools.locked().get_mut(function) {
            p.error = Some(e);
        }
        self.shared.changed.notify_all();
    }

    /// A new namespace for slot `n`, with its TAP, veth pair, routes and rules: its descriptor and
    /// the TAP's.
    fn prepare(&mut self, n: u32) -> Result<(OwnedFd, OwnedFd), String> {
        let (host_addr, _) = transit(n);
        let peer = format!("em{}-{n:x}", self.id);
        // SAFETY: unshare takes no pointers; it moves this thread alone into a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(errno("unshare(CLONE_NEWNET)"));
        }
        let inside = self.inside(n, &peer);
        if let Err(e) = setns(self.host_ns.as_raw_fd()) {
            // Stuck in the clone's namespace: nothing more can be made here.
            tracing::error!("the network thread cannot go back to the host's namespace: {e}");
            std::process::abort();
        }
        let (ns, tap) = inside?;
        let nl = self.nl.clone();
        self.rt.block_on(async {
            let i = index(&nl, &peer).await?;
            address(&nl, i, host_addr, 30).await?;
            up(&nl, i, None).await
        })?;
        Ok((ns, tap))
    }

    /// What is made inside the new namespace (the calling thread is in it).
    fn inside(&mut self, n: u32, peer: &str) -> Result<(OwnedFd, OwnedFd), String> {
        let (host_addr, ns_addr) = transit(n);
        // No IPv6 chatter at the guest (its kernel has no IPv6); absent without IPv6 support.
        let _ = sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let _ = sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        // Strict reverse-path filtering: a packet from the TAP whose source is not routed back
        // through the TAP (a guest forging another clone's or function's address) is dropped.
        sysctl("/proc/sys/net/ipv4/conf/all/rp_filter", "1")?;
        sysctl("/proc/sys/net/ipv4/conf/default/rp_filter", "1")?;
        let ns = this_thread_ns()?;
        let tap = Tap::open(TAP_NAME).map_err(|e| e.to_string())?;
        let host_ns = self.host_ns.as_raw_fd();
        self.rt.block_on(async {
            let (conn, h, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
            let task = tokio::spawn(conn);
            let r = async {
                up(&h, index(&h, "lo").await?, None).await?;
                let t = index(&h, TAP_NAME).await?;
                address(&h, t, GATEWAY, GUEST_LINK.prefix).await?;
                up(&h, t, Some(TAP_MAC)).await?;
                h.link()
                    .add(LinkVeth::new("veth0", peer).build())
                    .execute()
                    .await
                    .map_err(|e| format!("veth pair: {e}"))?;
                let v = index(&h, "veth0").await?;
                address(&h, v, ns_addr, 30).await?;
                up(&h, v, None).await?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(host_addr).build();
                h.route().add(route).execute().await.map_err(|e| format!("default route: {e}"))?;
                let p = index(&h, peer).await?;
                h.link()
                    .set(LinkUnspec::new_with_index(p).setns_by_fd(host_ns).build())
                    .execute()
                    .await
                    .map_err(|e| format!("moving {peer} to the host: {e}"))
            }
            .await;
            task.abort();
            r
        })?;
        // The guest's address leaves as the namespace's own; nothing comes in that the guest did
        // not start; nothing from the TAP passes or reaches the namespace with another source
        // than the guest's address (the host tells functions apart by their clones' sources).
        let t = "ember";
        let guest = || cmd::ip("saddr", GUEST_ADDR.to_string().into());
        let not_guest = cmd::ip_not("saddr", GUEST_ADDR.to_string().into());
        self.nft.run(vec![
            cmd::add(cmd::table(t)),
            cmd::add(cmd::chain(t, "post", "nat", "postrouting", 100, "accept")),
            cmd::add(cmd::chain(t, "forward", "filter", "forward", 0, "drop")),
            cmd::add(cmd::chain(t, "input", "filter", "input", 0, "accept")),
            cmd::add(cmd::rule(t, "input", vec![cmd::meta("iifname", TAP_NAME), not_guest, cmd::verdict("drop")])),
            cmd::add(cmd::rule(t, "post", vec![cmd::meta("oifname", "veth0"), guest(), cmd::snat(ns_addr)])),
            cmd::add(cmd::rule(
                t,
                "forward",
                vec![cmd::meta("iifname", TAP_NAME), cmd::meta("oifname", "veth0"), guest(), cmd::verdict("accept")],
            )),
            cmd::add(cmd::rule(
                t,
                "forward",
                vec![
                    cmd::meta("iifname", "veth0"),
                    cmd::meta("oifname", TAP_NAME),
                    cmd::established(),
                    cmd::verdict("accept"),
                ],
            )),
        ])?;
        Ok((ns, tap.into_fd()))
    }

    /// The host table's rules for every function's policy (after flushing its chains).
    fn rules(&self) -> Vec<Value> {
        let t = &self.table;
        let clones = format!("em{}-*", self.id);
        let tunnels = format!("et{}-*", self.id);
        let set = |f: &FnNet| Value::from(format!("@f{}", f.id));
        let mut out = vec![
            cmd::flush(cmd::chain_ref(t, "forward")),
            cmd::flush(cmd::chain_ref(t, "input")),
            cmd::flush(cmd::chain_ref(t, "post")),
        ];
        let mut forward = vec![
            vec![cmd::established(), cmd::verdict("accept")],
            // Clones never reach each other.
            vec![cmd::meta("iifname", &clones), cmd::meta("oifname", &clones), cmd::verdict("drop")],
        ];
        let mut post = Vec::new();
        for f in self.functions.values() {
            if let (Some(tunnel), Some(p)) = (&f.tunnel, &f.policy.private) {
                forward.push(vec![cmd::ip("saddr", set(f)), cmd::meta("oifname", tunnel), cmd::verdict("accept")]);
                if let Ok(own) = p.own_address() {
                    post.push(vec![cmd::ip("saddr", set(f)), cmd::meta("oifname", tunnel), cmd::snat(own)]);
                }
            }
        }
        // Nobody else's tunnel.
        forward.push(vec![cmd::meta("iifname", &clones), cmd::meta("oifname", &tunnels), cmd::verdict("drop")]);
        // Egress is to the public internet: what a function's policy allows beyond it first,
        // then nothing else that is not public.
        for f in self.functions.values().filter(|f| f.policy.has_egress()) {
            for net in f.policy.allowed().unwrap_or_default() {
                let to = cmd::prefix(net.base(), net.prefix);
                forward.push(vec![cmd::ip("saddr", set(f)), cmd::ip("daddr", to), cmd::verdict("accept")]);
            }
        }
        for net in super::policy::NOT_PUBLIC {
            let to = cmd::prefix(net.base(), net.prefix);
            forward.push(vec![cmd::meta("iifname", &clones), cmd::ip("daddr", to), cmd::verdict("drop")]);
        }
        for f in self.functions.values() {
            if f.policy.has_egress() {
                forward.push(vec![cmd::ip("saddr", set(f)), cmd::verdict("accept")]);
                if let Some(ip) = f.policy.egress_ip {
                    post.push(vec![cmd::ip("saddr", set(f)), cmd::snat(ip)]);
                }
            }
        }
        forward.push(vec![cmd::meta("iifname", &clones), cmd::verdict("drop")]);
        if self.masquerade {
            let transit = cmd::prefix(super::TRANSIT.base(), super::TRANSIT.prefix);
            post.push(vec![cmd::ip("saddr", transit), cmd::verdict("masquerade")]);
        }
        // The host's own addresses: only answers to what the host started.
        let input = [
            vec![cmd::meta("iifname", &clones), cmd::established(), cmd::verdict("accept")],
            vec![cmd::meta("iifname", &clones), cmd::verdict("drop")],
        ];
        out.extend(forward.into_iter().map(|e| cmd::add(cmd::rule(t, "forward", e))));
        out.extend(input.into_iter().map(|e| cmd::add(cmd::rule(t, "input", e))));
        out.extend(post.into_iter().map(|e| cmd::add(cmd::rule(t, "post", e))));
        out
    }

    /// Checks `policy` against the host and the other functions, then sets it up.
    fn attach(&mut self, function: &str, policy: NetworkPolicy, spare: usize) -> Result<(), String> {
        self.ensure_table()?;
        if let Some(p) = &policy.private {
            let net = p.net()?;
            for (other, f) in self.functions.iter().filter(|(n, _)| n.as_str() != function) {
                let Some(q) = &f.policy.private else { continue };
                if q.net().is_ok_and(|o| o.overlaps(&net)) {
                    return Err(format!("network.private.subnet {net} overlaps function {other:?}'s {}", q.subnet));
                }
                if q.vni == p.vni {
                    return Err(format!("network.private.vni {} is function {other:?}'s already", p.vni));
                }
            }
        }
        if let Some(ip) = policy.egress_ip {
            if !self.host_has(ip)? {
                return Err(format!("network.egress_ip {ip} is not an address of this host"));
            }
        }
        let existing = self.functions.get(function);
        let fresh = existing.is_none();
        let id = existing.map(|f| f.id).unwrap_or(self.next_fn);
        let old_tunnel = existing.and_then(|f| f.tunnel.clone());
        let same_private = existing.is_some_and(|f| f.policy.private == policy.private);
        let set = format!("f{id}");
        self.nft.run(vec![cmd::add(cmd::set(&self.table, &set))])?;
        let tunnel = match (&policy.private, same_private) {
            (_, true) => old_tunnel.clone(),
            (None, false) => None,
            (Some(p), false) => match self.make_tunnel(id, p) {
                Ok(t) => Some(t),
                Err(e) => {
                    if fresh {
                        let _ = self.nft.run(vec![cmd::delete(cmd::set(&self.table, &set))]);
                    }
                    return Err(e);
                }
            },
        };
        if fresh {
            self.next_fn += 1;
        }
        let previous =
            self.functions.insert(function.to_string(), FnNet { id, policy, tunnel: tunnel.clone(), retry_at: None });
        if let Err(e) = self.nft.run(self.rules()) {
            // Back to how it was.
            match previous {
                Some(p) => {
                    self.functions.insert(function.to_string(), p);
                }
                None => {
                    self.functions.remove(function);
                    let _ = self.nft.run(vec![cmd::delete(cmd::set(&self.table, &set))]);
                }
            }
            if tunnel != old_tunnel {
                if let Some(t) = tunnel {
                    self.delete_link(&t);
                }
            }
            return Err(e);
        }
        if tunnel != old_tunnel {
            if let Some(t) = old_tunnel {
                self.delete_link(&t);
            }
        }
        let mut pools = self.shared.pools.locked();
        let pool = pools.entry(function.to_string()).or_insert_with(FnPool::default);
        pool.spare = spare;
        pool.error = None;
        Ok(())
    }

    fn make_tunnel(&mut self, id: u32, p: &super::PrivateNetwork) -> Result<String, String> {
        let name = format!("et{}-{id:x}", self.id);
        let net = p.net()?;
        let own = p.own_address()?;
        let nl = self.nl.clone();
        let made = self.rt.block_on(async {
            let m = LinkVxlan::new(&name, p.vni).remote(p.proxy).port(VXLAN_PORT).build();
            nl.link().add(m).execute().await.map_err(|e| format!("VXLAN tunnel to {}: {e}", p.proxy))?;
            let i = index(&nl, &name).await?;
            address(&nl, i, own, net.prefix).await?;
            up(&nl, i, None).await
        });
        if let Err(e) = made {
            self.delete_link(&name);
            return Err(e);
        }
        tracing::info!(tunnel = %name, "VXLAN {} to {} for {net} (leaving as {own})", p.vni, p.proxy);
        Ok(name)
    }

    fn delete_link(&mut self, name: &str) {
        let nl = self.nl.clone();
        let _ = self.rt.block_on(async {
            let i = index(&nl, name).await?;
            nl.link().del(i).execute().await.map_err(|e| e.to_string())
        });
    }

    /// Whether `ip` is one of the host's addresses.
    fn host_has(&mut self, ip: Ipv4Addr) -> Result<bool, String> {
        let nl = self.nl.clone();
        self.rt.block_on(async {
            let mut addrs = nl.address().get().execute();
            while let Some(a) = addrs.try_next().await.map_err(|e| format!("addresses: {e}"))? {
                let found = a.attributes.iter().any(|x| {
                    matches!(x, AddressAttribute::Local(IpAddr::V4(v)) | AddressAttribute::Address(IpAddr::V4(v)) if *v == ip)
                });
                if found {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn detach(&mut self, function: &str) {
        let Some(f) = self.functions.remove(function) else { return };
        let set = format!("f{}", f.id);
        let mut commands = self.rules();
        commands.push(cmd::delete(cmd::set(&self.table, &set)));
        if let Err(e) = self.nft.run(commands) {
            tracing::warn!(function, "removing the function's network rules: {e}");
        }
        if let Some(t) = f.tunnel {
            self.delete_link(&t);
        }
    }

    /// Removes everything this daemon made on the host (its namespaces go with their holders).
    fn teardown(&mut self) {
        self.shared.pools.locked().clear();
        let names: Vec<String> = self.functions.keys().cloned().collect();
        for n in names {
            if let Some(t) = self.functions.remove(&n).and_then(|f| f.tunnel) {
                self.delete_link(&t);
            }
        }
        let t = self.table.clone();
        if self.table_made {
            if let Err(e) = self.nft.run(vec![cmd::delete(cmd::table(&t))]) {
                tracing::warn!("removing the table {t}: {e}");
            }
        }
    }
}
