//! `ember serve`: the pool supervisor behind a Unix-socket HTTP API, for a function scheduler.
//!
//! - [`model`]: registrations, refusals, what the API answers.
//! - [`supervisor`]: functions and their templates, handoff, release, invoke.
//! - [`pool`]: pools of clones and the background loop that scales them.
//! - [`registry`]: the state directory's files.
//! - [`images`]: the image directories registrations may boot from.

//! - [`layers`]: shared layers by name, functions' code layers, the layer builder thread.
//! - [`api`]: the HTTP routes (axum), errors as JSON.
//! - [`metrics`]: Prometheus text.
//! - [`notify`]: systemd's readiness and watchdog notifications.

pub mod api;
pub mod images;
pub mod layers;
pub mod lean;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pool;
pub mod registry;
pub mod supervisor;

use std::path::Path;
use std::sync::Arc;

use crate::isolation::{network, worker};

use supervisor::Supervisor;

/// How many threads serve the HTTP API by default (`ember serve --api-threads`).
pub const DEFAULT_API_THREADS: usize = 1;

/// The runtime the HTTP API runs on: `threads` workers. Every request the API takes is served
/// where it is read (what may take long goes to the runtime's blocking pool, lean-protocol
/// connections have threads of their own), so one worker answers soonest: with more, a worker
/// that takes a request wakes another to look for work, which costs the request a cross-core
/// wake-up (1-client acquire round trip 11.8-12.0 us p50 with one worker, 29.5-33.5 us with two,
/// on the development host; `ember bench handoff --api-threads N`).
pub fn api_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("ember-api")
        .enable_all()
        .build()
}

/// Serves the API on `socket` until SIGINT or SIGTERM, then stops every VM and removes the socket:
/// `ember serve` embedded in another program (which then gets the daemon's seccomp filter on
/// the calling thread and every thread it starts afterwards).
///
/// ```no_run
/// use std::path::{Path, PathBuf};
/// use ember::isolation::worker::{Isolation, DEFAULT_UID_BASE};
///
/// # fn main() -> Result<(), String> {
/// ember::serve::run(
///     Path::new("/run/ember/api.sock"),
///     Path::new("/var/lib/ember"),
///     &[PathBuf::from("/srv/ember/images")],
///     Isolation::default_for_this_user(),
///     DEFAULT_UID_BASE,
///     true, // public egress masqueraded
///     ember::serve::DEFAULT_API_THREADS,
/// )
/// # }
/// ```
pub fn run(
    socket: &Path,
    state_dir: &Path,
    images: &[std::path::PathBuf],
    isolation: worker::Isolation,
    worker_uid_base: u32,
    masquerade: bool,
    api_threads: usize,
) -> Result<(), String> {
    let images = images::ImageDirs::open(images)?;
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket; not touching it", socket.display()));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(format!("{} is in use by a running server", socket.display()));
        }
        // A socket left by a server that was killed.
        std::fs::remove_file(socket).map_err(|e| format!("cannot remove stale socket {}: {e}", socket.display()))?;
    }
    // The layer builder, the one thread that may start a process (mkfs.erofs), confined with its
    // own filter; then, before any other thread starts, the daemon itself: every other thread
    // inherits its filter.
    let state_err = |e: std::io::Error| format!("state directory {}: {e}", state_dir.display());
    crate::sys::private_dir(state_dir).map_err(state_err)?;
    let builder_filter =
        crate::seccomp::builder_filter().map_err(|e| format!("cannot build the seccomp filter: {e}"))?;
    let builder =
        layers::Builder::spawn(&layers::Layers::store_dir(state_dir), Some(builder_filter)).map_err(state_err)?;
    // The one /dev/kvm handle the daemon keeps (template boots, clones run here); a host without
    // KVM still gets a daemon that answers (every boot then fails with the reason).
    if let Err(e) = crate::vmm::kvm() {
        tracing::warn!("{e}");
    }
    let workers = start_workers(state_dir, isolation, worker_uid_base)?;
    // The network thread, confined with its own filter (networked functions are refused, with the
    // reason, where it cannot run).
    let network = network::Network::start(state_dir, masquerade);
    notify::init();
    let filter = crate::seccomp::daemon_filter().map_err(|e| format!("cannot build the seccomp filter: {e}"))?;
    crate::seccomp::apply(&filter).map_err(|e| format!("cannot confine the daemon with seccomp: {e}"))?;
    let sup = Supervisor::open(state_dir, images, builder, workers, network).map_err(state_err)?;
    sup.provide_runtime_layers();
    let scaler = sup.start_scaling().map_err(|e| format!("cannot start the scaler: {e}"))?;
    let rt = api_runtime(api_threads).map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(serve(socket, sup.clone()));
    sup.shutdown();
    let _ = scaler.join();
    let _ = std::fs::remove_file(socket);
    result
}

/// Sets up worker processes (their launcher confined with its own filter), unless clones are to
/// run in the daemon itself. Before the daemon confines itself.
pub fn start_workers(
    state_dir: &Path,
    isolation: worker::Isolation,
    uid_base: u32,
) -> Result<Option<Arc<worker::Workers>>, String> {
    if isolation == worker::Isolation::None {
        return Ok(None);
    }
    let filter = crate::seccomp::launcher_filter().map_err(|e| format!("cannot build the seccomp filter: {e}"))?;
    let w = worker::Workers::open(state_dir, isolation, uid_base, Some(filter))?;
    tracing::info!("clones run in worker processes ({isolation:?})");
    Ok(Some(w))
}

async fn serve(socket: &Path, sup: Arc<Supervisor>) -> Result<(), String> {
    let listener =
        tokio::net::UnixListener::bind(socket).map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    // Only the daemon's own user (and root) may connect; checked again per connection below.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", socket.display()))?;
    tracing::info!("serving on {}", socket.display());
    // The socket accepts (connections wait in its backlog until the server takes them): ready.
    notify::notify("READY=1");
    if let Some(every) = notify::watchdog_every() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                notify::notify("WATCHDOG=1");
            }
        });
    }
    serve_api(listener, sup, stop_signal()).await.map_err(|e| format!("server: {e}"))
}

/// Serves the API on `listener` until `stop` resolves: HTTP, and the lean protocol
/// ([`lean`]) on connections that open with its hello; connections only from processes of the
/// daemon's own user or root.
pub async fn serve_api(
    listener: tokio::net::UnixListener,
    sup: Arc<Supervisor>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accepting = tokio::spawn(accept(listener, tx, sup.clone()));
    let app = api::router(sup);
    let result = axum::serve(HttpConnections { rx }, app).with_graceful_shutdown(stop).await;
    accepting.abort();
    result
}

/// The most API connections open at once, and from one client process: each holds a descriptor
/// (and a thread, for a lean one) until its client closes it.
const MAX_CONNECTIONS: usize = 1024;
const MAX_CONNECTIONS_PER_PEER: usize = 256;
/// How long a new connection may take to send its first bytes.
const OPENING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Open connections, in all and by client process: a [`ConnectionSlot`] each.
#[derive(Default)]
struct Connections {
    by_peer: std::sync::Mutex<std::collections::HashMap<i32, usize>>,
}

impl Connections {
    /// A slot for a connection of process `pid`, if neither cap is reached.
    fn take(self: &Arc<Self>, pid: i32) -> Option<ConnectionSlot> {
        use crate::sys::Locked;
        let mut by_peer = self.by_peer.locked();
        let total: usize = by_peer.values().sum();
        let mine = by_peer.entry(pid).or_default();
        if total >= MAX_CONNECTIONS || *mine >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *mine += 1;
        Some(ConnectionSlot { connections: self.clone(), pid })
    }
}

/// One open connection's place in [`Connections`], given back when the connection is dropped.
struct ConnectionSlot {
    connections: Arc<Connections>,
    pid: i32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        use crate::sys::Locked;
        let mut by_peer = self.connections.by_peer.locked();
        if let Some(n) = by_peer.get_mut(&self.pid) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.pid);
            }
        }
    }
}

/// An HTTP connection with its slot: the slot goes when the server drops the connection.
struct Counted {
    stream: tokio::net::UnixStream,
    _slot: ConnectionSlot,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections from the daemon's own user (and root: SO_PEERCRED), whatever the socket
/// file's mode became, within [`MAX_CONNECTIONS`] open at once and [`MAX_CONNECTIONS_PER_PEER`]
/// from one process, and sorts them by their first bytes (which must come within
/// [`OPENING_TIMEOUT`]): lean ones get a thread, HTTP ones go to the HTTP server.
async fn accept(
    listener: tokio::net::UnixListener,
    http: tokio::sync::mpsc::Sender<HttpConnection>,
    sup: Arc<Supervisor>,
) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let connections = Arc::new(Connections::default());
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => match stream.peer_cred() {
                Ok(c) if c.uid() == me || c.uid() == 0 => {
                    let Some(slot) = connections.take(c.pid().unwrap_or(0)) else {
                        crate::log_limited!(warn, "refused a connection: too many open (pid {:?})", c.pid());
                        continue;
                    };
                    let (http, sup) = (http.clone(), sup.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(OPENING_TIMEOUT, lean::opening(&stream)).await {
                            Err(_) => crate::log_limited!(info, "closed a connection that sent nothing"),
                            Ok(lean::Opening::Lean) => lean::serve(stream, sup, slot),
                            Ok(lean::Opening::Http) => {
                                let _ = http.send((Counted { stream, _slot: slot }, addr)).await;
                            }
                        }
                    });
                }
                Ok(c) => crate::log_limited!(warn, "refused a connection from uid {}", c.uid()),
                Err(e) => crate::log_limited!(warn, "refused a connection without credentials: {e}"),
            },
            Err(e) => {
                // Out of fds, most likely: wait a little rather than spin.
                crate::log_limited!(warn, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

type HttpConnection = (Counted, tokio::net::unix::SocketAddr);

/// The HTTP server's listener: the connections [`accept`] found to be HTTP.
struct HttpConnections {
    rx: tokio::sync::mpsc::Receiver<HttpConnection>,
}

impl axum::serve::Listener for HttpConnections {
    type Io = Counted;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task is gone (the server is stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    /// Not asked by the server (and getsockname is not among the daemon's system calls).
    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    notify::notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_per_client_and_in_all_and_given_back() {
        let c = Arc::new(Connections::default());
        let mine: Vec<_> = (0..MAX_CONNECTIONS_PER_PEER).map(|_| c.take(7).expect("within the cap")).collect();
        assert!(c.take(7).is_none(), "past one client's cap");
        let others: Vec<_> = (0..MAX_CONNECTIONS - MAX_CONNECTIONS_PER_PEER)
            .map(|i| c.take(1000 + (i / MAX_CONNECTIONS_PER_PEER) as i32).expect("within the total"))
            .collect();
        assert!(c.take(99).is_none(), "past the total");
        drop(mine);
        assert!(c.take(7).is_some() && c.take(99).is_some(), "slots given back");
        drop(others);
        assert!(c.by_peer.lock().unwrap().is_empty());
    }
}
