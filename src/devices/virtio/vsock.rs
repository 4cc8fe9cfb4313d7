//! virtio-vsock with its host side on a Unix socket, compatible with Firecracker's hybrid vsock:
//!
//! - host -> guest: connect to the socket at `path`, send `CONNECT <port>\n`; once the guest
//!   accepts, ember answers `OK <host port>\n` and the stream carries the connection's bytes. If
//!   nothing listens on the port in the guest, ember closes the stream.
//! - guest -> host: a connection to host (CID 2) port P is connected to the Unix socket
//!   `<path>_<P>`.
//!
//! Packets are parsed by rust-vmm's virtio-vsock from the guest's descriptor chains; everything
//! in them (addresses, lengths, ports, operations) is checked before use, and a malformed chain is
//! returned to the guest unused. Flow control follows the virtio-vsock credit scheme in both
//! directions. After a restore the device sends the guest a transport reset: connections from
//! before the snapshot are reset (their host sides are gone) and new ones work.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{VirtioDevice, VIRTIO_F_VERSION_1};
use super::{Interrupt, QueueSnapshot, INT_USED_RING};
use crate::vmm::memory::GuestMemory;

pub const VSOCK_DEVICE_ID: u32 = 19;
pub const HOST_CID: u64 = 2;
pub const GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// The largest packet payload ember accepts from the guest (Linux sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 << 10;
/// The receive buffer ember advertises per connection.
const BUF_ALLOC: u32 = 256 << 10;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The vsock device. Its host socket and its thread are created with it (before any vCPU runs and
/// is confined), so that activation, which happens on a vCPU thread, only hands the queues over.
pub struct Vsock {
    path: Option<PathBuf>,
    commands: std::sync::mpsc::Sender<Command>,
    command_evt: EventFd,
    queues: Option<Arc<Mutex<Vec<Queue>>>>,
    /// A restored device tells the guest to reset its connections when it starts.
    reset_on_start: bool,
    thread: Option<JoinHandle<()>>,
}

enum Command {
    Activate { mem: GuestMemory, queues: Arc<Mutex<Vec<Queue>>>, interrupt: Arc<Interrupt>, reset: bool },
    Deactivate,
    Stop,
}

impl Vsock {
    /// A device whose host side listens at `path` (none: guest connections are refused), its
    /// thread confined with `seccomp`. Returns the device and the queue notification eventfds for
    /// the transport.
    pub fn new(
        path: Option<&Path>,
        restored: bool,
        seccomp: Option<Arc<seccompiler::BpfProgram>>,
    ) -> std::io::Result<(Self, Vec<EventFd>)> {
        let listener = match path {
            Some(p) => {
                let l = UnixListener::bind(p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let notify: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<_, _>>()?;
        let worker_notify = notify.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>()?;
        let command_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut worker = Worker {
            active: None,
            commands: rx,
            command_evt: command_evt.try_clone()?,
            notify: worker_notify,
            epoll: Epoll::new()?,
            listener,
            path: path.map(Path::to_path_buf),
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            control: VecDeque::new(),
            next_local_port: 1 << 30,
            rx_starved: false,
            reset_pending: false,
            scratch: Vec::new(),
        };
        worker.register_fixed()?;
        let thread = std::thread::Builder::new().name("vsock".into()).spawn(move || {
            if let Some(f) = seccomp {
                if let Err(e) = crate::vmm::seccomp::apply(&f) {
                    tracing::error!("vsock: cannot apply the seccomp filter: {e}");
                    return;
                }
            }
            worker.run();
        })?;
        let dev = Self {
            path: path.map(Path::to_path_buf),
            commands: tx,
            command_evt,
            queues: None,
            reset_on_start: restored,
            thread: Some(thread),
        };
        Ok((dev, notify))
    }

    fn send(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            let _ = self.command_evt.write(1);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cid = GUEST_CID.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| cid.get(o.checked_add(i)?)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<Interrupt>) -> Result<(), String> {
        if queues.len() != 3 {
            return Err("vsock needs 3 queues".into());
        }
        let queues = Arc::new(Mutex::new(queues));
        self.queues = Some(queues.clone());
        let reset = std::mem::take(&mut self.reset_on_start);
        self.send(Command::Activate { mem, queues, interrupt, reset });
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.send(Command::Deactivate);
    }

    fn queue_snapshots(&self) -> Option<Vec<QueueSnapshot>> {
        let q = self.queues.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        Some(q.iter().map(QueueSnapshot::of).collect())
    }
}

// Epoll tokens: the fixed fds, then one per host stream.
const TOKEN_QUEUE: u64 = 1; // + queue index
const TOKEN_LISTENER: u64 = 8;
const TOKEN_COMMAND: u64 = 9;
const FIRST_STREAM_TOKEN: u64 = 16;

/// A packet with no payload, waiting for a receive buffer.
#[derive(Clone, Copy, Debug)]
struct Control {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// (host port, guest port)
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest delivered to the host stream.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Bytes from the guest the host stream has not taken yet.
    out: Vec<u8>,
    /// The host stream ended (EOF): the guest has been told.
    eof: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            out: Vec::new(),
            eof: false,
            interest: EventSet::empty(),
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host stream that has connected but not yet sent its `CONNECT <port>` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What the device works with once the driver has activated it.
struct Active {
    mem: GuestMemory,
    queues: Arc<Mutex<Vec<Queue>>>,
    interrupt: Arc<Interrupt>,
}

struct Worker {
    active: Option<Active>,
    commands: std::sync::mpsc::Receiver<Command>,
    command_evt: EventFd,
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
    /// Bytes read from a host stream on their way into a receive buffer.
    scratch: Vec<u8>,
}

impl Worker {
    fn register_fixed(&mut self) -> std::io::Result<()> {
        let add = |fd: i32, token: u64| self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.command_evt.as_raw_fd(), TOKEN_COMMAND)?;
        for (i, n) in self.notify.iter().enumerate() {
            add(n.as_raw_fd(), TOKEN_QUEUE + i as u64)?;
        }
        if let Some(l) = &self.listener {
            add(l.as_raw_fd(), TOKEN_LISTENER)?;
        }
        Ok(())
    }

    fn run(&mut self) {
        self.scratch = vec![0u8; MAX_PKT_DATA as usize];
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_COMMAND => {
                        let _ = self.command_evt.read();
                        while let Ok(c) = self.commands.try_recv() {
                            match c {
                                Command::Stop => return,
                                Command::Deactivate => self.deactivate(),
                                Command::Activate { mem, queues, interrupt, reset } => {
                                    self.deactivate();
                                    self.active = Some(Active { mem, queues, interrupt });
                                    self.reset_pending = reset;
                                    if reset {
                                        self.send_reset_event();
                                    }
                                    self.process_tx();
                                }
                            }
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
            self.fill_rx();
            self.update_interests();
        }
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
    }

    fn send_reset_event(&mut self) {
        let Some(a) = &self.active else { return };
        let (mem, queues) = (a.mem.clone(), a.queues.clone());
        let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
        let q = &mut queues[EVQ];
        let Some(mut chain) = q.pop_descriptor_chain(&mem) else { return };
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
        tracing::debug!("vsock: transport reset sent to the guest");
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            match l.accept() {
                Ok((stream, _)) => {
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
                    tracing::warn!("vsock: accept: {e}");
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
        self.control.push_back(Control { local_port: local, peer_port: port, op: OP_REQUEST, flags: 0 });
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

    fn rst(&mut self, key: Key) {
        self.control.push_back(Control { local_port: key.0, peer_port: key.1, op: OP_RST, flags: 0 });
    }

    /// Takes every packet the guest has sent.
    fn process_tx(&mut self) {
        let Some(a) = &self.active else { return };
        let handled;
        {
            let mut queues = a.queues.lock().unwrap_or_else(|p| p.into_inner());
            let q = &mut queues[TXQ];
            handled = take_tx_packets(&a.mem, q);
            notify_guest(a, q);
        }
        for p in handled {
            self.handle(p);
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
                    self.control.push_back(Control {
                        local_port: key.0,
                        peer_port: key.1,
                        op: OP_CREDIT_UPDATE,
                        flags: 0,
                    });
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
        let Some(path) = &self.path else { return self.rst(key) };
        let target = format!("{}_{}", path.display(), key.0);
        match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let token = self.next_token;
                self.next_token += 1;
                self.insert_conn(key, Conn::new(stream, token, ConnState::Established));
                self.control.push_back(Control { local_port: key.0, peer_port: key.1, op: OP_RESPONSE, flags: 0 });
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
            self.control.push_back(Control { local_port: key.0, peer_port: key.1, op: OP_CREDIT_UPDATE, flags: 0 });
        }
    }

    /// Fills the guest's receive buffers: control packets first, then data from host streams.
    fn fill_rx(&mut self) {
        if self.rx_starved || (self.control.is_empty() && !self.conns.values().any(|c| self.wants_read(c))) {
            return;
        }
        let Some(a) = &self.active else { return };
        let (mem, queues, interrupt) = (a.mem.clone(), a.queues.clone(), a.interrupt.clone());
        let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
        let q = &mut queues[RXQ];
        let mut used = false;
        let mut buf = std::mem::take(&mut self.scratch);
        // Data: each readable connection in turn, within the guest's credit.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        let mut readable: VecDeque<Key> = keys.into_iter().filter(|k| self.wants_read(&self.conns[k])).collect();
        loop {
            let next_control = self.control.front().copied();
            if next_control.is_none() && readable.is_empty() {
                break;
            }
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

/// A packet from the guest, copied out of its descriptors.
#[derive(Debug)]
pub struct Packet {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub data: Vec<u8>,
}

/// Takes every chain the guest has made available on the TX queue `q`: each well-formed one
/// becomes a [`Packet`] (its payload copied out, at most MAX_PKT_DATA bytes), a malformed one is
/// dropped; every chain is returned to the guest as used. Public for the fuzz target.
pub fn take_tx_packets(mem: &GuestMemory, q: &mut Queue) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Some(mut chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                // virtio-vsock has checked `len` against MAX_PKT_DATA.
                let mut data = vec![0u8; pkt.len() as usize];
                match pkt.data_slice() {
                    Some(s) => {
                        let n = data.len().min(s.len());
                        if s.read_slice(&mut data[..n], 0).is_err() {
                            data.clear();
                        }
                        data.truncate(n);
                    }
                    None => data.clear(),
                }
                packets.push(Packet {
                    src_cid: pkt.src_cid(),
                    dst_cid: pkt.dst_cid(),
                    src_port: pkt.src_port(),
                    dst_port: pkt.dst_port(),
                    type_: pkt.type_(),
                    op: pkt.op(),
                    flags: pkt.flags(),
                    buf_alloc: pkt.buf_alloc(),
                    fwd_cnt: pkt.fwd_cnt(),
                    data,
                });
            }
            Err(e) => tracing::debug!("vsock: malformed TX descriptor chain dropped: {e}"),
        }
        if q.add_used(mem, head, 0).is_err() {
            tracing::debug!("vsock: cannot return a TX chain");
        }
    }
    packets
}

/// Runs [`take_tx_packets`] on a 64 KiB guest memory that starts with `image`: a 16-entry TX queue
/// whose descriptor table is at 0, available ring at 0x1000 and used ring at 0x2000, and whatever
/// the image holds beyond. The fuzz target's entry point, and the unit tests'.
pub fn parse_tx_image(image: &[u8]) -> Vec<Packet> {
    use vm_memory::GuestAddress;
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else { return Vec::new() };
    let n = image.len().min(0x1_0000);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return Vec::new();
    }
    let Ok(mut q) = Queue::new(16) else { return Vec::new() };
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    take_tx_packets(&mem, &mut q)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A guest memory image: descriptors `(addr, len, flags, next)`, the heads made available.
    fn image(descs: &[(u64, u32, u16, u16)], heads: &[u16], avail_idx: u16) -> Vec<u8> {
        let mut m = vec![0u8; 0x1_0000];
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = &mut m[i * 16..i * 16 + 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
        }
        m[0x1002..0x1004].copy_from_slice(&avail_idx.to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            m[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&h.to_le_bytes());
        }
        m
    }

    /// A packet header at `at` in `m`: guest 3:1234 -> host 2:52, RW, `len` bytes.
    fn header(m: &mut [u8], at: usize, len: u32) {
        let h = &mut m[at..at + PKT_HEADER_SIZE];
        h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        h[16..20].copy_from_slice(&1234u32.to_le_bytes());
        h[20..24].copy_from_slice(&52u32.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        h[30..32].copy_from_slice(&OP_RW.to_le_bytes());
    }

    #[test]
    fn a_well_formed_packet_is_read() {
        let mut m = image(&[(0x4000, 44, NEXT, 1), (0x5000, 5, 0, 0)], &[0], 1);
        header(&mut m, 0x4000, 5);
        m[0x5000..0x5005].copy_from_slice(b"hello");
        let p = parse_tx_image(&m);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].src_port, p[0].dst_port, p[0].op, p[0].data.as_slice()), (1234, 52, OP_RW, &b"hello"[..]));
    }

    #[test]
    fn malformed_chains_are_dropped_without_a_panic_or_a_hang() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("header outside guest memory", image(&[(0xffff_ff00, 44, 0, 0)], &[0], 1)),
            ("data outside guest memory", {
                let mut m = image(&[(0x4000, 44, NEXT, 1), (0x7fff_0000, 4096, 0, 0)], &[0], 1);
                header(&mut m, 0x4000, 4096);
                m
            }),
            ("header too short", image(&[(0x4000, 8, 0, 0)], &[0], 1)),
            ("write-only header", image(&[(0x4000, 44, WRITE, 0)], &[0], 1)),
            ("length over the limit", {
                let mut m = image(&[(0x4000, 44, NEXT, 1), (0x5000, 16, 0, 0)], &[0], 1);
                header(&mut m, 0x4000, u32::MAX);
                m
            }),
            ("a descriptor loop", image(&[(0x4000, 44, NEXT, 1), (0x5000, 16, NEXT, 0)], &[0], 1)),
            ("next out of the table", image(&[(0x4000, 44, NEXT, 200)], &[0], 1)),
            ("head out of the table", image(&[], &[300], 1)),
            ("available index far ahead", image(&[(0x4000, 44, 0, 0)], &[0], 40_000)),
        ];
        for (what, m) in cases {
            let p = parse_tx_image(&m);
            assert!(p.iter().all(|p| p.data.len() <= MAX_PKT_DATA as usize), "{what}");
            assert!(p.iter().all(|p| p.data.is_empty()), "{what}: {p:?}");
        }
    }

    #[test]
    fn config_space_reads_the_cid_and_nothing_past_it() {
        let (dev, _) = Vsock::new(None, false, None).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), GUEST_CID);
        dev.read_config(4, &mut b);
        assert_eq!(b, [0; 8]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
