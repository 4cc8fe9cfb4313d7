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
pub mod backend;
pub mod client;
pub mod command;
mod connections;
pub mod error;
pub mod function;
pub mod handoff;
pub mod images;
pub mod invoke;
pub mod layers;
pub mod lean;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod registration;
pub mod registry;
pub mod scaling;
#[cfg(test)]
mod stub;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::isolation::{network, worker};

pub use connections::serve_api;
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

/// What a daemon is started with (`ember serve`'s settings, resolved).
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where the API listens.
    pub socket: PathBuf,
    /// Registrations, templates, layers.
    pub state_dir: PathBuf,
    /// The directories registrations may boot from and build layers from.
    pub images: Vec<PathBuf>,
    pub isolation: worker::Isolation,
    pub worker_uid_base: u32,
    /// Clones' networks: public egress masqueraded (`Some(true)`), routed (`Some(false)`), or
    /// none at all (`None`: networked functions are refused).
    pub network: Option<bool>,
    pub api_threads: usize,
    /// Each thread confined with its seccomp filter: the daemon's, the layer builder's, the
    /// worker launcher's (off only where the daemon runs inside another program that must keep
    /// its own system calls, a benchmark).
    pub confine: bool,
    /// SIGINT and SIGTERM stop the daemon (off where it runs inside another program).
    pub stop_on_signals: bool,
}

impl DaemonConfig {
    /// A daemon on `socket` over `state_dir`, everything else as `ember serve` defaults it.
    pub fn new(socket: &Path, state_dir: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            images: Vec::new(),
            isolation: worker::Isolation::default_for_this_user(),
            worker_uid_base: worker::DEFAULT_UID_BASE,
            network: Some(true),
            api_threads: DEFAULT_API_THREADS,
            confine: true,
            stop_on_signals: true,
        }
    }
}

/// A running daemon: its core, its scaling loop, its API on the socket.
pub struct Daemon {
    sup: Arc<Supervisor>,
    scaler: Option<std::thread::JoinHandle<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    socket: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
}

impl Daemon {
    /// Starts the daemon: its state directory, the layer builder, worker processes' launcher, the
    /// network thread, then (confined with its filter, which every later thread inherits) the
    /// core, its scaling loop and the API on the socket. Ready when it returns: the socket
    /// accepts. It serves until SIGINT or SIGTERM ([`Daemon::wait`]) or [`Daemon::stop`].
    pub fn start(cfg: &DaemonConfig) -> Result<Self, String> {
        let images = images::ImageDirs::open(&cfg.images)?;
        let (socket, state_dir) = (cfg.socket.as_path(), cfg.state_dir.as_path());
        check_socket(socket)?;
        let state_err = |e: std::io::Error| format!("state directory {}: {e}", state_dir.display());
        crate::sys::private_dir(state_dir).map_err(state_err)?;
        let filter = |f: Result<seccompiler::BpfProgram, _>| -> Result<Option<_>, String> {
            match cfg.confine {
                true => f.map(Some).map_err(|e| format!("cannot build the seccomp filter: {e}")),
                false => Ok(None),
            }
        };
        // The layer builder, the one thread that may start a process (mkfs.erofs), confined with
        // its own filter.
        let store = layers::Layers::store_dir(state_dir);
        let builder = layers::Builder::spawn(&store, filter(crate::seccomp::builder_filter())?).map_err(state_err)?;
        // The one /dev/kvm handle the daemon keeps (template boots, clones run here); a host
        // without KVM still gets a daemon that answers (every boot then fails with the reason).
        if let Err(e) = crate::vmm::kvm() {
            tracing::warn!("{e}");
        }
        let workers = match cfg.isolation {
            worker::Isolation::None => None,
            isolation => {
                let launcher = filter(crate::seccomp::launcher_filter())?;
                let w = worker::Workers::open(state_dir, isolation, cfg.worker_uid_base, launcher)?;
                tracing::info!("clones run in worker processes ({isolation:?})");
                Some(w)
            }
        };
        // The network thread, confined with its own filter (networked functions are refused, with
        // the reason, where it cannot run).
        let network = match cfg.network {
            Some(masquerade) => network::Network::start(state_dir, masquerade),
            None => network::Network::unavailable("this daemon runs without clone networks".into()),
        };
        notify::init();
        // Before any other thread starts: every later one inherits the daemon's filter.
        if let Some(f) = filter(crate::seccomp::daemon_filter())? {
            crate::seccomp::apply(&f).map_err(|e| format!("cannot confine the daemon with seccomp: {e}"))?;
        }
        let backend = Arc::new(backend::Machines { workers });
        let clock = Arc::new(supervisor::SystemClock);
        let sup = Supervisor::open(state_dir, images, builder, backend, network, clock).map_err(state_err)?;
        sup.provide_runtime_layers();
        let scaler = sup.start_scaling().map_err(|e| format!("cannot start the scaler: {e}"))?;
        let mut daemon = Self { sup, scaler: Some(scaler), server: None, stop: None, socket: socket.into(), rt: None };
        let rt = api_runtime(cfg.api_threads).map_err(|e| format!("cannot start the runtime: {e}"))?;
        let listener = rt.block_on(async { listen(socket) })?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let signals = cfg.stop_on_signals;
        let stop = async move {
            tokio::select! {
                _ = stop_signal(), if signals => {}
                _ = stop_rx => {}
            }
        };
        daemon.server = Some(rt.spawn(serve_api(listener, daemon.sup.clone(), stop)));
        daemon.stop = Some(stop_tx);
        tracing::info!("serving on {}", socket.display());
        // The socket accepts (connections wait in its backlog until the server takes them): ready.
        notify::notify("READY=1");
        if let Some(every) = notify::watchdog_every() {
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    notify::notify("WATCHDOG=1");
                }
            });
        }
        daemon.rt = Some(rt);
        Ok(daemon)
    }

    /// The daemon's core, for a caller in the same process (a benchmark, a test).
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.sup
    }

    /// Serves until SIGINT or SIGTERM, then stops every VM and removes the socket.
    pub fn wait(mut self) -> Result<(), String> {
        let result = match (self.server.take(), &self.rt) {
            (Some(server), Some(rt)) => match rt.block_on(server) {
                Ok(r) => r.map_err(|e| format!("server: {e}")),
                Err(e) => Err(format!("server: {e}")),
            },
            _ => Ok(()),
        };
        self.shut_down();
        result
    }

    /// Stops serving now: every VM stops, the socket goes.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(server), Some(rt)) = (self.server.take(), &self.rt) {
            let _ = rt.block_on(server);
        }
        if let Some(scaler) = self.scaler.take() {
            self.sup.shutdown();
            let _ = scaler.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Serves the API on `cfg.socket` until SIGINT or SIGTERM, then stops every VM and removes the
/// socket: `ember serve` embedded in another program (which then gets the daemon's seccomp filter
/// on the calling thread and every thread it starts afterwards).
///
/// ```no_run
/// use std::path::{Path, PathBuf};
///
/// # fn main() -> Result<(), String> {
/// let mut cfg = ember::serve::DaemonConfig::new(Path::new("/run/ember/api.sock"), Path::new("/var/lib/ember"));
/// cfg.images = vec![PathBuf::from("/srv/ember/images")];
/// ember::serve::run(&cfg)
/// # }
/// ```
pub fn run(cfg: &DaemonConfig) -> Result<(), String> {
    Daemon::start(cfg)?.wait()
}

/// Refuses a socket path that is something else, or a socket a running server listens on; removes
/// a socket left by a server that was killed.
fn check_socket(socket: &Path) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket; not touching it", socket.display()));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(format!("{} is in use by a running server", socket.display()));
        }
        std::fs::remove_file(socket).map_err(|e| format!("cannot remove stale socket {}: {e}", socket.display()))?;
    }
    Ok(())
}

/// Listens on `socket`, which only the daemon's own user (and root) may connect to (checked again
/// per connection).
fn listen(socket: &Path) -> Result<tokio::net::UnixListener, String> {
    crate::sys::listen_private(socket)
        .and_then(tokio::net::UnixListener::from_std)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))
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
