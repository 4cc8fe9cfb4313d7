//! The pool supervisor: the daemon's state (registered functions, handed-out clones, the
//! backends clones come from) and what it does at start and stop. Synchronous: the doors call it
//! through `command.rs`. Its work is in rooms of its own: registrations and versions in
//! `registration.rs`, handoffs and leases in `handoff.rs`, invocations in `invoke.rs`, where clones
//! come from in `backend.rs`, pools and their scaling in `scaling.rs`, one function's state in
//! `function.rs`, the files on disk in `registry.rs`.
//!
//! A restart loads every saved registration, restores pools from the saved templates without
//! booting, and boots again only a function whose template is missing or unreadable.
//!
//! Registering a name again makes a new version: its template is made while the current version
//! keeps serving, then the pools switch (the new pool restored first); invocations in flight on
//! the old version finish there, and its clones are destroyed as they come back.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::backend::{Backend, RestoreError, RestoreJob};
use super::function::{Function, Handed, PooledVm};
use super::images::ImageDirs;
use super::layers::{Builder, Layers};
use super::metrics::Metrics;
use super::model::{Error, FunctionInfo, FunctionSpec, FunctionState, UpdateInfo};
use super::registry::Registry;
use crate::isolation::network::Network;
use crate::sys::Locked;

/// The time leases are counted in: the host's monotonic clock ([`SystemClock`]), or one a test
/// moves forward.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

pub struct Supervisor {
    pub(super) registry: Registry,
    pub(super) layers: Layers,
    pub(super) images: ImageDirs,
    pub(super) functions: Mutex<BTreeMap<String, Arc<Function>>>,
    /// New versions being made (or that failed), by name: not serving yet.
    pub(super) updates: Mutex<BTreeMap<String, Arc<Function>>>,
    pub(super) handed: Mutex<HashMap<u64, Handed>>,
    pub(super) next_id: AtomicU64,
    pub metrics: Metrics,
    pub(super) stopping: AtomicBool,
    /// Pools are not scaled while set (benchmarks measure the handoff path alone).
    pub(super) scaling_paused: AtomicBool,
    /// Set by a handoff to have the background loop refill pools before its next tick.
    pub(super) refill_wanted: Mutex<bool>,
    pub(super) refill_signal: Condvar,
    pub(super) invokes: Arc<AtomicUsize>,
    /// Template boots running now.
    /// When each template boot in progress started.
    pub(super) template_boots: Mutex<Vec<Instant>>,
    pub(super) template_boot_done: Condvar,
    /// Where templates and clones come from.
    pub(super) backend: Arc<dyn Backend>,
    /// The time leases are counted in.
    pub(super) clock: Arc<dyn Clock>,
    /// Clones' networks (their namespaces, the host's rules).
    pub(super) network: Network,
    /// Where discarded clones are destroyed ([`Supervisor::discard`]).
    pub(super) discarded: crate::sys::Reaper<Vec<PooledVm>>,
}

/// How long a clone's restore waits for a prepared network namespace when its pool is empty.
pub(super) const NETWORK_WAIT: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Opens (or creates) the state directory and loads every registered function; layers are
    /// built by `builder` (see [`Builder`]).
    pub fn open(
        state_dir: &Path,
        images: ImageDirs,
        builder: Builder,
        backend: Arc<dyn Backend>,
        network: Network,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Arc<Self>> {
        let registry = Registry::open(state_dir)?;
        let saved = registry.load()?;
        let layers = Layers::open(state_dir, builder)?;
        let sup = Arc::new(Self {
            registry,
            layers,
            images,
            functions: Mutex::new(BTreeMap::new()),
            updates: Mutex::new(BTreeMap::new()),
            handed: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: Metrics::default(),
            stopping: AtomicBool::new(false),
            scaling_paused: AtomicBool::new(false),
            refill_wanted: Mutex::new(false),
            refill_signal: Condvar::new(),
            invokes: Arc::new(AtomicUsize::new(0)),
            template_boots: Mutex::new(Vec::new()),
            template_boot_done: Condvar::new(),
            backend,
            clock,
            network,
            discarded: crate::sys::Reaper::start("discard"),
        });
        for (name, spec) in saved {
            // (Names come from distinct directory entries: no conflict is possible here.)
            match spec.and_then(|s| sup.insert(&name, s).map_err(|e| e.to_string())) {
                Ok(f) => {
                    if let Err(e) = sup.attach_network(&f.name, &f.spec) {
                        tracing::error!(function = %name, "its network cannot be set up: {e}");
                        *f.state.locked() = FunctionState::Failed(format!("network: {e}"));
                        continue;
                    }
                    match sup.registry.open_template(&name, &f.spec) {
                        Ok((t, version)) => {
                            *f.template.locked() = Some(Arc::new(t));
                            *f.version.locked() = Some(version);
                            *f.state.locked() = FunctionState::Ready;
                            tracing::info!(function = %name, "loaded with its saved template");
                        }
                        Err(e) => {
                            tracing::warn!(function = %name, "saved template unusable ({e}); booting again");
                            sup.spawn_template(f, false);
                        }
                    }
                }
                Err(e) => tracing::error!("cannot load a registration: {e}; skipped"),
            }
        }
        Ok(sup)
    }

    /// Adds a function, checking and claiming its name in one step: two registrations of one name
    /// never share a directory.
    pub(super) fn insert(&self, name: &str, spec: FunctionSpec) -> Result<Arc<Function>, Error> {
        let mut functions = self.functions.locked();
        if functions.contains_key(name) {
            return Err(Error::conflict(format!("function {name:?} is already registered; DELETE it first")));
        }
        // Under the functions' lock: a layer cannot be deleted between this check and the
        // function becoming its user.
        for l in &spec.layers {
            self.layers.resolve(l)?;
        }
        let f = Arc::new(Function::new(name, spec));
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    pub(super) fn function(&self, name: &str) -> Result<Arc<Function>, Error> {
        self.functions.locked().get(name).cloned().ok_or_else(|| Error::not_found(format!("no function {name:?}")))
    }

    pub fn list(&self) -> Vec<FunctionInfo> {
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        functions.iter().map(|f| self.info(f)).collect()
    }

    pub fn get(&self, name: &str) -> Result<FunctionInfo, Error> {
        let f = self.function(name)?;
        Ok(self.info(&f))
    }

    pub(super) fn info(&self, f: &Function) -> FunctionInfo {
        let mut info = f.info();
        let update = self.updates.locked().get(&f.name).cloned();
        info.update = update.map(|u| UpdateInfo { state: u.state.locked().clone(), spec: u.spec.clone() });
        if f.spec.network.is_some() {
            info.network = self.network.info(&f.name);
        }
        info
    }

    /// Restores a new clone of `f` with its own channels (and its network, when it has one).
    pub(super) fn restore_clone(&self, f: &Function) -> Result<PooledVm, RestoreError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A clone counts as ready only with its network attached: a prepared namespace's TAP.
        let net = match &f.spec.network {
            Some(_) => Some(self.network.take(&f.name, NETWORK_WAIT).map_err(|e| RestoreError::Failed(e.to_string()))?),
            None => None,
        };
        let job = RestoreJob {
            name: &f.name,
            spec: &f.spec,
            max_clones: f.max_clones,
            deleted: f.deleted.load(Ordering::SeqCst),
            template: f.template(),
            worker: &f.worker,
            id,
            net: net.as_ref(),
            channels: self.registry.channels(id),
        };
        let r = self.backend.restore(job)?;
        self.metrics.restore.observe(r.took);
        let cpu_us = (*f.restore_cpu_s.locked() * 1e6) as u64;
        f.counters.restores.fetch_add(1, Ordering::Relaxed);
        f.counters.restore_cpu_us.fetch_add(cpu_us, Ordering::Relaxed);
        Ok(PooledVm { id, vm: r.vm, mailbox: r.mailbox, vsock: r.vsock, uses: 0, restored: r.at, net })
    }

    /// Destroys clones on the discard thread: stopping a VM joins its threads and closes its KVM
    /// VM, which must never happen on an async worker or under a pool's lock (a clone in a
    /// worker is a message to it).
    pub(super) fn discard(&self, clones: Vec<PooledVm>) {
        if !clones.is_empty() {
            // Their guests stop now, not when the thread gets to them.
            clones.iter().for_each(|c| c.vm.request_stop("discarded"));
            self.discarded.reap(clones);
        }
    }

    /// Stops every VM (pools and handed-out clones); registrations and templates stay on disk.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        for f in functions {
            let gone = f.pool.locked().take_idle();
            drop(gone);
        }
        let handed: Vec<Handed> = self.handed.locked().drain().map(|(_, h)| h).collect();
        drop(handed);
        // Workers exit once the last handle on each goes; wait for them (and their cgroups).
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        for f in functions.iter().chain(self.updates.locked().values()) {
            f.worker.release();
        }
        self.backend.wait_all(Duration::from_secs(10));
        self.network.shutdown();
    }

    /// Prometheus text for /metrics.
    pub fn prometheus(&self) -> String {
        let infos = self.list();
        self.metrics.render(&infos)
    }
}
