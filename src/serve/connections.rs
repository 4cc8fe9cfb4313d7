//! The API socket's connections: who may connect (the daemon's own user and root), how many at
//! once (in all and per client process), and which door each goes to (the lean protocol's or
//! HTTP's, by its first bytes).

use std::sync::Arc;

use super::lean;
use super::supervisor::Supervisor;

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
    let app = super::api::router(sup);
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
