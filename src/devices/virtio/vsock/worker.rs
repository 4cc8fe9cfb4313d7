//! The vsock device's thread: one epoll loop over the queue notifications, the host listener and
//! every host stream. It takes the guest's TX packets, moves bytes between connections and the
//! guest's RX buffers within each side's credit, and answers with control packets.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, ConnState, Control, Key, Pending};
use super::packet::{take_tx_packet, Packet};
use super::*;
use crate::devices::virtio::thread::{self, Commands, DeviceWorker};
use crate::devices::virtio::INT_USED_RING;
use crate::sys::Locked;

/// TX packets handled per wakeup of the worker (see `process_tx`).
const TX_BUDGET: usize = 64;
/// RX descriptor chains taken per wakeup (see `fill_rx`): a guest that posts malformed chains as
/// fast as they are taken gets a share of the thread, never all of it.
const RX_BUDGET: usize = 256;
/// Control packets (resets, responses, credit updates) waiting for a receive buffer, at most
/// (Firecracker's bound); more are dropped: a guest that posts no receive buffers cannot grow it.
const MAX_CONTROL: usize = 256;
/// Connections per VM, guest- and host-initiated together.
const MAX_CONNS: usize = 256;
/// Host streams that have connected but not yet named a port.
const MAX_PENDING: usize = 64;
/// How often a worker that holds host connection requests after a transport reset looks whether
/// the guest has handled it, and how long it holds them at most (a guest that never gives its
/// event buffer back gets them anyway, as it would have without the hold).
const HELD_POLL_MS: i32 = 5;
const RESET_HOLD_MAX: Duration = Duration::from_secs(3);

// Epoll tokens: the fixed fds, then one per host stream.
const TOKEN_QUEUE: u64 = 1; // + queue index
const TOKEN_LISTENER: u64 = 8;
const TOKEN_COMMAND: u64 = 9;
const FIRST_STREAM_TOKEN: u64 = 16;

/// What the device works with once the driver has activated it.
struct Active {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
}

pub(super) struct Worker {
    active: Option<Active>,
    notify: Vec<EventFd>,
    epoll: Epoll,
    listener: Option<UnixListener>,
    path: Option<PathBuf>,
    conns: HashMap<Key, Conn>,
    pending: HashMap<u64, Pending>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    control: VecDeque<Control>,
    next_local_port: u32,
    /// The guest gave no receive buffer the last time one was needed.
    rx_starved: bool,
    reset_pending: bool,
    /// A transport reset was delivered and the guest has not yet given its event buffer back
    /// (which its driver does once it has reset its connections): the event queue's available
    /// index then, and when. Host connection requests wait in `held` meanwhile: one the guest
    /// took before handling the reset would be reset with the rest, silently (no RST reaches the
    /// host), and its host side would wait for nothing.
    reset_unacked: Option<(u16, Instant)>,
    held: Vec<Key>,
    /// Bytes read from a host stream on their way into a receive buffer.
    scratch: Vec<u8>,
}

impl Worker {
    /// The worker for a device with `queue_events` (it keeps its own copies), listening on
    /// `listener` at `path`.
    pub(super) fn new(
        listener: Option<UnixListener>,
        path: Option<&std::path::Path>,
        queue_events: &[EventFd],
    ) -> std::io::Result<Self> {
        let mut worker = Worker {
            active: None,
            notify: queue_events.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>()?,
            epoll: Epoll::new()?,
            listener,
            path: path.map(|p| p.to_path_buf()),
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            control: VecDeque::new(),
            next_local_port: 1 << 30,
            rx_starved: false,
            reset_pending: false,
            reset_unacked: None,
            held: Vec::new(),
            scratch: Vec::new(),
        };
        worker.register_fixed()?;
        Ok(worker)
    }

    fn register_fixed(&mut self) -> std::io::Result<()> {
        let add = |fd: i32, token: u64| self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        for (i, n) in self.notify.iter().enumerate() {
            add(n.as_raw_fd(), TOKEN_QUEUE + i as u64)?;
        }
        if let Some(l) = &self.listener {
            add(l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        Ok(())
    }

    /// Serves the queues, the host sockets and the front end's `commands` until told to stop.
    pub(super) fn run(mut self, commands: Commands<Activation, super::VsockState>) {
        if let Err(e) = commands.watch(&self.epoll, TOKEN_COMMAND) {
            tracing::error!("vsock: epoll: {e}");
            return;
        }
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            // While requests are held, the guest's event queue is looked at every few ms too:
            // the buffer back is what releases them, whether or not its notification is seen.
            let timeout = if self.held.is_empty() { -1 } else { HELD_POLL_MS };
            let Some(ready) = thread::wait_for(&self.epoll, &mut events, timeout, "vsock") else { return };
            for ev in ready {
                match ev.data() {
                    TOKEN_COMMAND => {
                        if !commands.serve(&mut self) {
                            return;
                        }
                    }
                    t if (TOKEN_QUEUE..TOKEN_QUEUE + 3).contains(&t) => {
                        let q = (t - TOKEN_QUEUE) as usize;
                        let _ = self.notify[q].read();
                        if self.active.is_none() {
                            continue;
                        }
                        match q {
                            TXQ => self.process_tx(),
                            RXQ => self.rx_starved = false,
                            _ if self.reset_pending => self.send_reset_event(),
                            _ => {}
                        }
                    }
                    TOKEN_LISTENER => self.accept(),
                    t if self.pending.contains_key(&t) => self.read_connect_line(t),
                    t => {
                        if let Some(key) = self.tokens.get(&t).copied() {
                            if ev.event_set().contains(EventSet::OUT) {
                                self.flush_out(key);
                            }
                        }
                    }
                }
            }
            if self.reset_unacked.is_some() {
                self.release_if_reset_handled();
            }
            self.fill_rx();
            self.update_interests();
        }
    }
}

impl DeviceWorker for Worker {
    type Activation = Activation;
    type Saved = super::VsockState;

    fn activate(&mut self, a: Activation) {
        let Activation { mem, queues, interrupt, reset } = a;
        self.active = Some(Active { mem, queues, interrupt });
        self.reset_pending = reset;
        if reset {
            self.send_reset_event();
        }
        self.process_tx();
    }

    /// Whether the guest may hold connections: any the device tracks, a control packet not yet
    /// delivered (a reset or response for one), or a transport reset still owed.
    fn saved(&self) -> super::VsockState {
        let connections = !self.conns.is_empty() || !self.control.is_empty() || self.reset_pending;
        super::VsockState { connections }
    }

    /// The driver reset the device: every connection goes.
    fn deactivate(&mut self) {
        self.active = None;
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        self.control.clear();
        self.rx_starved = false;
        self.reset_unacked = None;
        self.held.clear();
    }
}

impl Worker {
    fn send_reset_event(&mut self) {
        let Some(a) = &self.active else { return };
        let (mem, queues) = (a.mem.clone(), a.queues.clone());
        let mut queues = queues.locked();
        let q = &mut queues[EVQ];
        let Some(mut chain) = q.pop_descriptor_chain(&mem) else { return };
        let avail = q.avail_idx(&mem, std::sync::atomic::Ordering::Acquire).map(|i| i.0).unwrap_or(0);
        let head = chain.head_index();
        let written = match chain.next() {
            Some(d) if d.is_write_only() && d.len() >= 4 => {
                mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()).map(|_| 4).unwrap_or(0)
            }
            _ => 0,
        };
        if q.add_used(&mem, head, written).is_ok() {
            notify_guest(a, q);
        }
        drop(queues);
        self.reset_pending = false;
        self.reset_unacked = Some((avail, Instant::now()));
        tracing::debug!("vsock: transport reset sent to the guest");
    }

    /// Once the guest has handled the transport reset (its event queue has a buffer more than
    /// when the reset was sent: the driver gives the reset's back when it is done), or after
    /// [`RESET_HOLD_MAX`] whatever it did, the host connection requests held meanwhile go to it.
    fn release_if_reset_handled(&mut self) {
        let Some((avail, since)) = self.reset_unacked else { return };
        let Some(a) = &self.active else { return };
        let now = {
            let queues = a.queues.locked();
            queues[EVQ].avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire).map(|i| i.0).unwrap_or(avail)
        };
        if now == avail {
            if since.elapsed() < RESET_HOLD_MAX || self.held.is_empty() {
                return;
            }
            crate::log_limited!(
                warn,
                "vsock: the guest has not handled the transport reset in {} ms; its held connection requests go now",
                RESET_HOLD_MAX.as_millis()
            );
        }
        self.reset_unacked = None;
        for key in std::mem::take(&mut self.held) {
            if self.conns.contains_key(&key) {
                self.push_control(Control { local_port: key.0, peer_port: key.1, op: OP_REQUEST, flags: 0 });
            }
        }
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            match l.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING || self.conns.len() >= MAX_CONNS {
                        // Refused by closing it: the client sees EOF instead of `OK`.
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.next_token;
                    self.next_token += 1;
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), ev).is_ok() {
                        self.pending.insert(token, Pending { stream, line: Vec::new() });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::log_limited!(warn, "vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a host stream's `CONNECT <port>\n`; then asks the guest for the connection.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else { return };
        let mut b = [0u8; 1];
        loop {
            match p.stream.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // EOF, an error, or a line too long: drop the stream.
                _ => {
                    self.drop_pending(token);
                    return;
                }
            }
        }
        let Some(p) = self.pending.remove(&token) else { return };
        let port = std::str::from_utf8(&p.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(port) = port else {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
            tracing::debug!("vsock: bad connect line {:?}", String::from_utf8_lossy(&p.line));
            return;
        };
        let local = self.alloc_local_port();
        let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        let key = (local, port);
        self.insert_conn(key, Conn::new(p.stream, token, ConnState::Connecting));
        match self.reset_unacked {
            Some(_) => {
                let conns = &self.conns;
                self.held.retain(|k| conns.contains_key(k));
                self.held.push(key);
                // A restored guest's agent parks its vCPU at once, before its kernel has run the
                // reset's work: woken, it runs it (and gives the event buffer back).
                if let Some(a) = &self.active {
                    a.interrupt.wake_guest();
                }
            }
            None => self.push_control(Control { local_port: local, peer_port: port, op: OP_REQUEST, flags: 0 }),
        }
    }

    fn drop_pending(&mut self, token: u64) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(1 << 30);
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    fn insert_conn(&mut self, key: Key, conn: Conn) {
        self.tokens.insert(conn.token, key);
        self.conns.insert(key, conn);
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if !c.interest.is_empty() {
                let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            }
        }
    }

    /// Queues a control packet for the guest, unless [`MAX_CONTROL`] are waiting already.
    fn push_control(&mut self, c: Control) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(c);
        } else {
            crate::log_limited!(debug, "vsock: control queue full, packet dropped (op {})", c.op);
        }
    }

    fn rst(&mut self, key: Key) {
        self.push_control(Control { local_port: key.0, peer_port: key.1, op: OP_RST, flags: 0 });
    }

    /// Takes every packet the guest has sent.
    /// Takes what the guest has sent, one packet at a time, each handled before the next is
    /// taken: at most [`TX_BUDGET`] per wakeup. When more is waiting, the TX queue's event is
    /// signalled again, so the rest is taken on the next turn of the loop, after the host streams
    /// and the RX queue have had theirs: a guest that keeps re-posting TX buffers gets a share of
    /// the thread, never all of it, and never more memory than one packet.
    fn process_tx(&mut self) {
        let mut taken = 0;
        let more = loop {
            if taken == TX_BUDGET {
                break true;
            }
            let Some(a) = &self.active else { return };
            let next = take_tx_packet(&a.mem, &mut a.queues.locked()[TXQ]);
            match next {
                None => break false,
                Some(Some(p)) => self.handle(p),
                Some(None) => {}
            }
            taken += 1;
        };
        if let (Some(a), true) = (&self.active, taken > 0) {
            notify_guest(a, &mut a.queues.locked()[TXQ]);
        }
        if more {
            let _ = self.notify[TXQ].write(1);
        }
    }

    fn handle(&mut self, p: Packet) {
        let key = (p.dst_port, p.src_port);
        tracing::trace!(
            "vsock: guest op {} {}:{} -> {}:{} len {}",
            p.op,
            p.src_cid,
            p.src_port,
            p.dst_cid,
            p.dst_port,
            p.data.len()
        );
        if p.src_cid != GUEST_CID || p.dst_cid != HOST_CID || p.type_ != TYPE_STREAM {
            if p.op != OP_RST {
                self.rst(key);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = p.buf_alloc;
            c.peer_fwd_cnt = p.fwd_cnt;
        }
        match p.op {
            OP_REQUEST => self.guest_connect(key),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else { return self.rst(key) };
                if c.state != ConnState::Connecting {
                    return;
                }
                c.state = ConnState::Established;
                let ok = format!("OK {}\n", key.0);
                // A fresh stream takes a few bytes without blocking.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.remove_conn(key);
                    self.rst(key);
                }
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else { return self.rst(key) };
                if c.state != ConnState::Established || c.out.len() + p.data.len() > BUF_ALLOC as usize {
                    // Data before the connection exists, or past the credit ember gave.
                    self.remove_conn(key);
                    return self.rst(key);
                }
                c.out.extend_from_slice(&p.data);
                self.flush_out(key);
            }
            OP_SHUTDOWN => {
                if p.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND) {
                    self.remove_conn(key);
                    self.rst(key);
                } else if p.flags & SHUTDOWN_SEND != 0 {
                    if let Some(c) = self.conns.get(&key) {
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            OP_RST => self.remove_conn(key),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.push_control(Control { local_port: key.0, peer_port: key.1, op: OP_CREDIT_UPDATE, flags: 0 });
                }
            }
            _ => {
                self.remove_conn(key);
                self.rst(key);
            }
        }
    }

    /// The guest connects to host port `key.0`: the Unix socket `<path>_<port>`.
    fn guest_connect(&mut self, key: Key) {
        if self.conns.contains_key(&key) {
            self.remove_conn(key);
            return self.rst(key);
        }
        if self.conns.len() >= MAX_CONNS {
            return self.rst(key);
        }
        let Some(path) = &self.path else { return self.rst(key) };
        let target = format!("{}_{}", path.display(), key.0);
        match connect_nonblocking(Path::new(&target)) {
            Ok(stream) => {
                let token = self.next_token;
                self.next_token += 1;
                self.insert_conn(key, Conn::new(stream, token, ConnState::Established));
                self.push_control(Control { local_port: key.0, peer_port: key.1, op: OP_RESPONSE, flags: 0 });
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to {target} refused: {e}");
                self.rst(key);
            }
        }
    }

    /// Writes what the guest sent to the host stream, as far as it takes it.
    fn flush_out(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        let mut written = 0;
        while written < c.out.len() {
            match c.stream.write(&c.out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.remove_conn(key);
                    return self.rst(key);
                }
            }
        }
        c.out.drain(..written);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(written as u32);
        // Tell the guest about freed space once a good part of its window is free again.
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.push_control(Control { local_port: key.0, peer_port: key.1, op: OP_CREDIT_UPDATE, flags: 0 });
        }
    }

    /// Fills the guest's receive buffers: control packets first, then data from host streams.
    fn fill_rx(&mut self) {
        if self.rx_starved || (self.control.is_empty() && !self.conns.values().any(|c| self.wants_read(c))) {
            return;
        }
        let Some(a) = &self.active else { return };
        let (mem, queues, interrupt) = (a.mem.clone(), a.queues.clone(), a.interrupt.clone());
        let mut queues = queues.locked();
        let q = &mut queues[RXQ];
        let mut used = false;
        let mut buf = std::mem::take(&mut self.scratch);
        // Data: each readable connection in turn, within the guest's credit.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        let mut readable: VecDeque<Key> = keys.into_iter().filter(|k| self.wants_read(&self.conns[k])).collect();
        if buf.is_empty() && !readable.is_empty() {
            // Made for the first data (a clone that never has a connection never needs it).
            buf = vec![0u8; MAX_PKT_DATA as usize];
        }
        let mut budget = RX_BUDGET;
        let mut again = false;
        loop {
            let next_control = self.control.front().copied();
            if next_control.is_none() && readable.is_empty() {
                break;
            }
            if budget == 0 {
                // The rest on the next turn of the loop (the RX queue's event says so).
                again = true;
                break;
            }
            budget -= 1;
            let Some(mut chain) = q.pop_descriptor_chain(&mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("vsock: malformed RX descriptor chain dropped: {e}");
                    let _ = q.add_used(&mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let (key, op, flags, len) = if let Some(c) = next_control {
                self.control.pop_front();
                ((c.local_port, c.peer_port), c.op, c.flags, 0)
            } else {
                let Some(key) = readable.pop_front() else { break };
                let Some(c) = self.conns.get_mut(&key) else { continue };
                let room = pkt.data_slice().map(|s| s.len()).unwrap_or(0);
                if room == 0 {
                    // A buffer with no room for data (read into it, it would look like EOF):
                    // given back empty; the connection waits for a real one.
                    let _ = q.add_used(&mem, head, 0);
                    used = true;
                    readable.push_front(key);
                    continue;
                }
                let max = room.min(c.peer_credit() as usize).min(buf.len());
                match c.stream.read(&mut buf[..max]) {
                    Ok(0) => {
                        c.eof = true;
                        (key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0)
                    }
                    Ok(n) => {
                        let wrote = pkt.data_slice().map(|s| s.write_slice(&buf[..n], 0).is_ok()).unwrap_or(false);
                        if !wrote {
                            let _ = q.add_used(&mem, head, 0);
                            used = true;
                            continue;
                        }
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        if self.wants_read(&self.conns[&key]) {
                            readable.push_back(key);
                        }
                        (key, OP_RW, 0, n as u32)
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        q.go_to_previous_position();
                        continue;
                    }
                    Err(_) => {
                        q.go_to_previous_position();
                        self.remove_conn(key);
                        self.rst(key);
                        continue;
                    }
                }
            };
            // Every packet carries the credit; remember what the guest was last told.
            let fwd_cnt = self.conns.get_mut(&key).map_or(0, |c| {
                c.fwd_cnt_sent = c.fwd_cnt;
                c.fwd_cnt
            });
            tracing::trace!("vsock: to guest op {op} {}:{} -> {}:{} len {len}", HOST_CID, key.0, GUEST_CID, key.1);
            pkt.set_src_cid(HOST_CID)
                .set_dst_cid(GUEST_CID)
                .set_src_port(key.0)
                .set_dst_port(key.1)
                .set_type(TYPE_STREAM)
                .set_op(op)
                .set_flags(flags)
                .set_len(len)
                .set_buf_alloc(BUF_ALLOC)
                .set_fwd_cnt(fwd_cnt);
            let _ = q.add_used(&mem, head, PKT_HEADER_SIZE as u32 + len);
            used = true;
        }
        self.scratch = buf;
        if used && q.needs_notification(&mem).unwrap_or(true) {
            interrupt.trigger(INT_USED_RING);
        }
        drop(queues);
        if again {
            let _ = self.notify[RXQ].write(1);
        }
    }

    fn wants_read(&self, c: &Conn) -> bool {
        c.state == ConnState::Established && !c.eof && c.peer_credit() > 0
    }

    /// Watches each host stream for what the connection can use now.
    fn update_interests(&mut self) {
        let starved = self.rx_starved;
        for c in self.conns.values_mut() {
            let mut want = EventSet::empty();
            if !starved && c.state == ConnState::Established && !c.eof && c.peer_credit() > 0 {
                want |= EventSet::IN;
            }
            if !c.out.is_empty() {
                want |= EventSet::OUT;
            }
            if want == c.interest {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let r = match (c.interest.is_empty(), want.is_empty()) {
                (true, false) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, c.token)),
                (false, true) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                _ => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, c.token)),
            };
            if r.is_ok() {
                c.interest = want;
            }
        }
    }
}

/// Signals the guest if the queue wants it.
fn notify_guest(a: &Active, q: &mut Queue) {
    if q.needs_notification(&a.mem).unwrap_or(true) {
        a.interrupt.trigger(INT_USED_RING);
    }
}

/// Feeds the connection state machine a sequence of guest packets that `data` describes (12 bytes
/// each: host port, guest port, op, flags, payload length, with ports folded onto a few
/// connections), over three host streams set up first (established, connecting, established),
/// checking after each packet that the control queue and the connections stay within their
/// bounds. The fuzz target's entry point.
pub fn drive_packets(data: &[u8]) {
    let events: Result<Vec<EventFd>, _> = (0..QUEUES).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect();
    let Ok(events) = events else { return };
    let Ok(mut w) = Worker::new(None, None, &events) else { return };
    let mut peers = Vec::new();
    for (i, state) in [ConnState::Established, ConnState::Connecting, ConnState::Established].into_iter().enumerate() {
        let Ok((ours, theirs)) = UnixStream::pair() else { return };
        if ours.set_nonblocking(true).is_err() {
            return;
        }
        let token = w.next_token;
        w.next_token += 1;
        w.insert_conn((1000 + i as u32, 2000 + i as u32), Conn::new(ours, token, state));
        peers.push(theirs);
    }
    for p in data.chunks_exact(12) {
        let word = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
        let len = usize::from(word(10) % 4096);
        w.handle(Packet {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 2000 + u32::from(word(2) % 4),
            dst_port: 1000 + u32::from(word(0) % 4),
            type_: TYPE_STREAM,
            op: word(4) % 9,
            flags: u32::from(word(6) % 4),
            buf_alloc: u32::from(word(8)) << 4,
            fwd_cnt: u32::from(word(8)),
            data: vec![0x5a; len],
        });
        assert!(w.control.len() <= MAX_CONTROL, "control queue past its bound");
        assert!(w.conns.len() <= MAX_CONNS, "connections past their bound");
        assert!(w.conns.values().all(|c| c.out.len() <= BUF_ALLOC as usize), "a connection buffered past its credit");
    }
}

/// Connects to the Unix socket at `path` without ever blocking the device thread: a listener
/// whose backlog is full refuses the connection (EAGAIN) instead of making the thread wait.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd that we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that is not running, for driving its parts directly.
    fn worker(path: Option<&Path>) -> (Worker, ()) {
        let events: Vec<EventFd> = (0..QUEUES).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        (Worker::new(None, path, &events).unwrap(), ())
    }

    #[test]
    fn random_packet_sequences_keep_every_bound() {
        let mut rng = crate::sys::TestRng::new(23);
        for _ in 0..200 {
            let n = 12 * (1 + rng.below(100));
            let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            drive_packets(&data);
        }
    }

    fn says_connections(w: &Worker) -> bool {
        w.saved().connections
    }

    #[test]
    fn a_snapshot_says_whether_the_guest_may_hold_connections() {
        let (mut w, _tx) = worker(None);
        assert!(!says_connections(&w), "a device with no connection");
        // A control packet not yet delivered (here a reset for a refused connection).
        w.rst((1, 2));
        assert!(says_connections(&w));
        w.control.clear();
        // A transport reset still owed.
        w.reset_pending = true;
        assert!(says_connections(&w));
        w.reset_pending = false;
        // A connection.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let token = w.next_token;
        w.insert_conn((1000, 2000), Conn::new(ours, token, ConnState::Established));
        assert!(says_connections(&w));
        w.deactivate();
        assert!(!says_connections(&w), "a reset device holds none");
    }

    #[test]
    fn an_rx_buffer_with_no_room_for_data_is_given_back_not_taken_for_eof() {
        use crate::devices::virtio::ring;
        let (mut w, _tx) = worker(None);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let token = w.next_token;
        w.next_token += 1;
        let mut conn = Conn::new(ours, token, ConnState::Established);
        conn.peer_buf_alloc = 1 << 16;
        w.insert_conn((1000, 2000), conn);
        theirs.write_all(b"for the guest").unwrap();
        // Two chains made available: a header-sized buffer (no data room), then a proper one.
        const WRITE: u16 = 2;
        let hdr = PKT_HEADER_SIZE as u32;
        let image = ring::image(&[(0x4000, hdr, WRITE, 0), (0x5000, hdr + 4096, WRITE, 0)], &[0, 1], 2);
        let (mem, q) = ring::queue_on(&image).unwrap();
        let mailbox = Arc::new(crate::channel::mailbox::Mailbox::create(None).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(crate::devices::virtio::Interrupt::new(irq, mailbox));
        let queues = Arc::new(Mutex::new(vec![q, Queue::new(16).unwrap(), Queue::new(16).unwrap()]));
        w.active = Some(Active { mem: mem.clone(), queues, interrupt });
        w.fill_rx();
        let c = &w.conns[&(1000, 2000)];
        assert!(!c.eof, "a buffer with no data room was read as the end of the stream");
        // The data went into the second buffer, after its header.
        let mut got = [0u8; 13];
        mem.read_slice(&mut got, vm_memory::GuestAddress(0x5000 + u64::from(hdr))).unwrap();
        assert_eq!(&got, b"for the guest");
        assert_eq!(c.tx_cnt, 13);
    }

    #[test]
    fn the_control_queue_is_bounded() {
        let (mut w, _tx) = worker(None);
        // A guest that sends bad packets and posts no receive buffer asks for a reset each time.
        for port in 0..10_000 {
            w.rst((1, port));
        }
        assert_eq!(w.control.len(), MAX_CONTROL);
    }

    #[test]
    fn guest_connections_are_capped_and_never_block() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        // A host service that never accepts: its backlog fills, and then connecting would block.
        let _listener = UnixListener::bind(format!("{}_{}", base.display(), 5000)).unwrap();
        let (mut w, _tx) = worker(Some(&base));
        let t = std::time::Instant::now();
        for guest_port in 0..1000 {
            w.guest_connect((5000, guest_port));
        }
        assert!(w.conns.len() <= MAX_CONNS, "{} connections", w.conns.len());
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "connecting blocked the device thread");
        assert!(w.control.len() <= MAX_CONTROL);
        // Once at the cap, a new connection is refused with a reset.
        w.control.clear();
        w.guest_connect((5000, 5000));
        assert_eq!(w.control.back().map(|c| c.op), Some(OP_RST));
    }
}
