//! The pool supervisor: registered functions and their templates, the handoff of clones to
//! callers (acquire, release, invoke) and shutdown. Synchronous: the HTTP layer (`api.rs`) calls
//! into it from blocking tasks. Pools and their scaling are in `pool.rs`, the files on disk in
//! `registry.rs`.
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

use super::images::{ImageDirs, ImageError};
use super::layers::{Builder, LayerInfo, Layers};
use super::metrics::Metrics;
use super::model::{check_name, Error, ErrorKind, FunctionInfo, FunctionSpec, FunctionState, Handoff, UpdateInfo};
use super::pool::{Function, PooledVm};
use super::registry::Registry;
use crate::channel::mailbox::{check_request, CallOptions, InvokeError, Mailbox, PendingCall};
use crate::config::DriveConfig;
use crate::isolation::network::{Network, NetworkError};
use crate::isolation::worker::{CloneVm, Worker, Workers};
use crate::sys::Locked;
use crate::template::Template;
use crate::vmm::{Channels, RunOptions};
use ember_abi::mailbox::{envelope_request, parse_envelope_response};

/// How long `invoke` polls for the agent's answer before sleeping until the agent rings.
pub const INVOKE_SPIN: Duration = Duration::from_micros(50);

/// How long past its timeout an invocation keeps its clone from the lease sweep.
const INVOKE_LEASE_MARGIN: Duration = Duration::from_secs(1);

/// A handed-out clone.
/// Why a clone could not be restored.
#[derive(Debug)]
pub(super) enum RestoreError {
    /// The function's worker is being restarted (its last one died before it served, or could
    /// not start): none for this long.
    Restarting(Duration),
    Failed(String),
}

impl RestoreError {
    fn refusal(self) -> Error {
        match self {
            Self::Restarting(d) => {
                let msg = format!("the function's worker is being restarted: try again in {:.1} s", d.as_secs_f64());
                Error::restarting(msg, d)
            }
            Self::Failed(e) => Error::internal(e),
        }
    }
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Restarting(d) => {
                write!(f, "no worker for {:.1} s (the last one ended or could not start)", d.as_secs_f64())
            }
            Self::Failed(e) => f.write_str(e),
        }
    }
}

impl From<String> for RestoreError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl From<&str> for RestoreError {
    fn from(e: &str) -> Self {
        Self::Failed(e.to_string())
    }
}

struct Handed {
    function: Arc<Function>,
    clone: PooledVm,
    /// What the caller must present to release it.
    lease: String,
    /// When the lease runs out and the clone is destroyed.
    expires: Instant,
}

/// Invocations in flight at once, all functions together; more get 429. Each holds a thread of
/// the blocking pool for up to its timeout.
const MAX_INVOKES: usize = 256;
/// Invocations in flight at once for one function: a function whose guests hang cannot take every
/// invocation slot.
const MAX_INVOKES_PER_FUNCTION: usize = 64;
/// Templates booting at once (each is a guest boot: minutes of emulated guest kernel on some
/// hosts); more registrations wait their turn in `creating`.
const MAX_TEMPLATE_BOOTS: usize = 2;
/// A template boot that has run this long stops holding one of those slots.
const SLOW_BOOT: Duration = Duration::from_secs(60);

/// A fresh lease token: 128 bits from the host's RNG, as hex. VM ids are small integers that
/// restart after a daemon restart and survive recycling; the lease names one handoff.
fn new_lease() -> Result<String, Error> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = [0u8; 16];
    crate::sys::getrandom(&mut b).map_err(|e| Error::internal(format!("getrandom: {e}")))?;
    let mut lease = String::with_capacity(32);
    for x in b {
        lease.push(HEX[usize::from(x >> 4)] as char);
        lease.push(HEX[usize::from(x & 15)] as char);
    }
    Ok(lease)
}

/// Compares lease tokens in time independent of where they differ.
fn same_lease(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct Supervisor {
    registry: Registry,
    layers: Layers,
    images: ImageDirs,
    pub(super) functions: Mutex<BTreeMap<String, Arc<Function>>>,
    /// New versions being made (or that failed), by name: not serving yet.
    updates: Mutex<BTreeMap<String, Arc<Function>>>,
    handed: Mutex<HashMap<u64, Handed>>,
    pub(super) next_id: AtomicU64,
    pub metrics: Metrics,
    pub(super) stopping: AtomicBool,
    /// Pools are not scaled while set (benchmarks measure the handoff path alone).
    pub(super) scaling_paused: AtomicBool,
    /// Set by a handoff to have the background loop refill pools before its next tick.
    pub(super) refill_wanted: Mutex<bool>,
    pub(super) refill_signal: Condvar,
    invokes: Arc<AtomicUsize>,
    /// Template boots running now.
    /// When each template boot in progress started.
    template_boots: Mutex<Vec<Instant>>,
    template_boot_done: Condvar,
    /// Worker processes for clones; None: clones run in this process.
    workers: Option<Arc<Workers>>,
    /// Clones' networks (their namespaces, the host's rules).
    pub(super) network: Network,
    /// Where discarded clones are destroyed ([`Supervisor::discard`]).
    discarded: crate::sys::Reaper<Vec<PooledVm>>,
}

/// A worker that ended before it restored a clone, or less than this after its start, counts as
/// a quick death (see the backoff); one killed later (from outside, say) is replaced at once.
const WORKER_STABLE: Duration = Duration::from_secs(5);
/// The delay before a worker after its second quick death in a row, doubled with each one more.
const WORKER_BACKOFF: Duration = Duration::from_millis(200);
const WORKER_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a clone's restore waits for a prepared network namespace when its pool is empty.
const NETWORK_WAIT: Duration = Duration::from_secs(10);
/// How long an acquire at `max` waits for one of the clones being restored before it is refused.
const AT_MAX_WAIT: Duration = Duration::from_secs(5);

/// An invocation's place among the daemon's (at most `MAX_INVOKES`) and its function's (at
/// most `MAX_INVOKES_PER_FUNCTION`) in flight, given back when dropped (on every way out of a
/// call).
pub struct InvokeSlots {
    all: Arc<AtomicUsize>,
    f: Arc<Function>,
}

impl InvokeSlots {
    fn take(all: &Arc<AtomicUsize>, f: &Arc<Function>) -> Result<Self, Error> {
        if all.fetch_add(1, Ordering::SeqCst) >= MAX_INVOKES {
            all.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::busy(format!("{MAX_INVOKES} invocations in flight; try again")));
        }
        if f.counters.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_INVOKES_PER_FUNCTION {
            f.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
            all.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::busy(format!(
                "function {:?} has {MAX_INVOKES_PER_FUNCTION} invocations in flight; try again",
                f.name
            )));
        }
        Ok(Self { all: all.clone(), f: f.clone() })
    }
}

impl Drop for InvokeSlots {
    fn drop(&mut self) {
        self.f.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.all.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What [`Supervisor::invoke_begin`] is asked to invoke.
#[derive(Clone, Copy)]
pub struct InvokeCall<'a> {
    pub name: &'a str,
    /// The handler (the function's own when `None`).
    pub handler: Option<&'a str>,
    pub payload: &'a [u8],
    pub timeout: Duration,
    pub request_id: &'a str,
}

/// Which clone an invocation may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// A ready one, or none (no cold start, no wait).
    Warm,
    /// As [`Supervisor::acquire_cold`], after `Warm` found none.
    Cold,
}

/// Where an invocation's request stands.
enum CallState {
    Posted(PendingCall<Arc<Mailbox>>),
    /// Not posted yet: the clone's mailbox was held by another caller when it was tried.
    Waiting {
        mailbox: Arc<Mailbox>,
        handler: String,
        request: Vec<u8>,
        opts: CallOptions,
    },
    /// Refused before it reached the guest.
    Failed(InvokeError),
}

/// An invocation with its clone taken (and, usually, its request posted), its answer not read:
/// [`InvokeInFlight::answered`] looks for the answer without blocking for long, and
/// [`Supervisor::invoke_finish`] completes it (on any thread).
pub struct InvokeInFlight {
    f: Arc<Function>,
    _slots: InvokeSlots,
    id: u64,
    lease: String,
    version: Option<String>,
    /// Whether it runs the function's own handler (only then is the clone recycled).
    own: bool,
    managed: bool,
    request_id: String,
    state: CallState,
}

impl InvokeInFlight {
    /// Whether the answer can be read without waiting, looking for it for at most `spin`.
    pub fn answered(&self, spin: Duration) -> bool {
        match &self.state {
            CallState::Posted(p) => p.poll(spin),
            CallState::Waiting { .. } => false,
            CallState::Failed(_) => true,
        }
    }
}

/// The functions whose registration (or new version) names layer `name`.
fn users_of<'a>(functions: impl IntoIterator<Item = &'a Arc<Function>>, name: &str) -> Vec<String> {
    let mut users: Vec<String> =
        functions.into_iter().filter(|f| f.spec.layers.iter().any(|l| l == name)).map(|f| f.name.clone()).collect();
    users.dedup();
    users
}

/// What an invocation through the daemon answered.
#[derive(Debug)]
pub struct Invoked {
    pub status: ember_abi::Status,
    /// The result (for an error of one of ember's runtimes: nothing; see `error`).
    pub payload: Vec<u8>,
    /// The clone that ran it.
    pub clone_id: u64,
    pub version: Option<String>,
    /// With one of ember's runtimes: the invocation's output (bounded by the agent).
    pub logs: Option<String>,
    pub logs_truncated: bool,
    /// With one of ember's runtimes, when the handler failed: `{type, message, traceback}`.
    pub error: Option<serde_json::Value>,
}

/// The meta of an envelope response, as the agent writes it.
#[derive(serde::Deserialize)]
struct Meta {
    #[serde(default)]
    logs: String,
    #[serde(default)]
    logs_truncated: bool,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// The most log lines of one invocation that go to the daemon's own log.
const MAX_LOGGED_LINES: usize = 64;

impl Invoked {
    fn from_response(
        r: crate::channel::mailbox::Response,
        envelope: bool,
        clone_id: u64,
        version: Option<String>,
    ) -> Result<Self, Error> {
        let mut inv = Invoked {
            status: r.status,
            payload: Vec::new(),
            clone_id,
            version,
            logs: None,
            logs_truncated: false,
            error: None,
        };
        // Statuses the agent gives before the envelope is read (a malformed request) carry text.
        if !envelope || matches!(r.status, ember_abi::Status::BadRequest | ember_abi::Status::TooLarge) {
            inv.payload = r.payload;
            return Ok(inv);
        }
        let bad = |why: String| Error::guest_failed(format!("the guest answered out of protocol: {why}"));
        let (meta, result) = parse_envelope_response(&r.payload).map_err(|e| bad(e.to_string()))?;
        let meta: Meta = serde_json::from_slice(meta).map_err(|e| bad(format!("meta: {e}")))?;
        inv.payload = result.to_vec();
        inv.logs = Some(meta.logs);
        inv.logs_truncated = meta.logs_truncated;
        if r.status == ember_abi::Status::Error {
            let error =
                meta.error.filter(|e| e.is_object()).ok_or_else(|| bad("an error without its report".into()))?;
            inv.error = Some(error);
        }
        Ok(inv)
    }

    /// Writes the invocation's output to the daemon's log, each line with the function, version,
    /// clone and request id (at most [`MAX_LOGGED_LINES`] lines, and rate-limited).
    fn log_lines(&self, function: &str, request_id: &str) {
        let Some(logs) = &self.logs else { return };
        let version = self.version.as_deref().unwrap_or("");
        for line in logs.lines().take(MAX_LOGGED_LINES) {
            crate::log_limited!(info, function, version, clone = self.clone_id, request_id, "{line}");
        }
    }
}

/// A template made for a function: the template, whether it is a new one (in `template.next`
/// for a new version), and the digest of its code layer.
type Made = (Arc<crate::template::Template>, bool, Option<String>);

/// The layer ember's `python3` runtime needs (built by scripts/build-python-layer.sh).
pub const PYTHON_LAYER: &str = "python3";

/// A function's version: a digest of its registration but the pool policy (the runtime, the
/// handler, the settings, the image paths) and of the images of its layers and code (their file
/// names in the store are their digests).
fn version_of(spec: &FunctionSpec, drives: &[DriveConfig]) -> String {
    use sha2::{Digest, Sha256};
    let mut guest = serde_json::to_value(spec).unwrap_or_default();
    if let Some(o) = guest.as_object_mut() {
        o.remove("pool");
        o.remove("limits");
        // The guest sees whether it has a network card, not what its namespace lets through.
        if o.remove("network").is_some() {
            o.insert("network".into(), true.into());
        }
    }
    let mut h = Sha256::new();
    h.update(guest.to_string().as_bytes());
    for d in drives {
        h.update(b"\n");
        h.update(d.drive_id.as_bytes());
        h.update(b"=");
        h.update(d.path_on_host.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What an image that cannot be used is to the API's caller.
fn image_refusal(e: ImageError) -> Error {
    match e {
        ImageError::NotAllowed(m) => Error::forbidden(m),
        ImageError::NotFound(m) => Error::not_found(m),
    }
}

/// What a network that cannot be set up is to the API's caller: the policy's fault, or the
/// daemon's.
fn network_refusal(e: NetworkError) -> Error {
    if e.is_refusal() {
        Error::bad_request(e.to_string())
    } else {
        Error::internal(format!("network: {e}"))
    }
}

/// What a failed invocation is to the API's caller.
fn invoke_refusal(e: InvokeError) -> Error {
    match e {
        InvokeError::Timeout(_) => Error::guest_timeout(e.to_string()),
        InvokeError::BadFunction(_) | InvokeError::PayloadTooLarge(_) => Error::bad_request(e.to_string()),
        _ => Error::guest_failed(e.to_string()),
    }
}

impl Supervisor {
    /// Opens (or creates) the state directory and loads every registered function; layers are
    /// built by `builder` (see [`Builder`]).
    pub fn open(
        state_dir: &Path,
        images: ImageDirs,
        builder: Builder,
        workers: Option<Arc<Workers>>,
        network: Network,
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
            workers,
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
    fn insert(&self, name: &str, spec: FunctionSpec) -> Result<Arc<Function>, Error> {
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

    fn function(&self, name: &str) -> Result<Arc<Function>, Error> {
        self.functions.locked().get(name).cloned().ok_or_else(|| Error::not_found(format!("no function {name:?}")))
    }

    /// Registers a function: saves its spec, then boots its template in the background. A name
    /// registered already gets a new version (see the module's docs).
    pub fn register(self: &Arc<Self>, name: &str, mut spec: FunctionSpec) -> Result<FunctionInfo, Error> {
        check_name(name)?;
        // ember's Python runtime runs on its layer, at the bottom, unless the registration places it.
        if spec.known_runtime() == Some("python3") && !spec.layers.iter().any(|l| l == PYTHON_LAYER) {
            if self.layers.resolve(PYTHON_LAYER).is_err() {
                self.provide_runtime_layer(PYTHON_LAYER).map_err(|e| {
                    Error::bad_request(format!(
                        "runtime python3 needs the layer {PYTHON_LAYER:?}, and none could be made ({e}): build \
                         its tree with scripts/build-python-layer.sh (it writes images/layers/{PYTHON_LAYER}; \
                         start the daemon with --images images) or PUT /layers/{PYTHON_LAYER}"
                    ))
                })?;
            }
            spec.layers.insert(0, PYTHON_LAYER.to_string());
        }
        spec.validate()?;
        for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
            self.images.open_image(what, path).map_err(image_refusal)?;
        }
        if let Some(code) = &spec.code {
            self.images.open_source("code", code).map_err(image_refusal)?;
        }
        if self.functions.locked().contains_key(name) {
            self.attach_network(name, &spec).map_err(network_refusal)?;
            return self.update(name, spec);
        }
        // The network first: a policy the host cannot carry refuses the registration, with
        // nothing half made.
        self.attach_network(name, &spec).map_err(network_refusal)?;
        let f = match self.insert(name, spec) {
            Ok(f) => f,
            Err(e) => {
                // (A conflict: a registration of this name won a race, and the network is its.)
                if e.kind() != ErrorKind::Conflict {
                    self.network.detach(name);
                }
                return Err(e);
            }
        };
        if let Err(e) = self.registry.save(name, &f.spec) {
            self.functions.locked().remove(name);
            self.network.detach(name);
            return Err(Error::internal(format!("cannot save the registration: {e}")));
        }
        self.spawn_template(f.clone(), false);
        Ok(f.info())
    }

    /// Sets up `spec`'s network policy for `name` (nothing for a function without one).
    fn attach_network(&self, name: &str, spec: &FunctionSpec) -> Result<(), NetworkError> {
        let Some(policy) = &spec.network else { return Ok(()) };
        let spare = spec.pool.min_ready as usize + 2;
        self.network.attach(name, policy, spare)
    }

    /// Starts making a new version of a registered function; the current one keeps serving.
    fn update(self: &Arc<Self>, name: &str, spec: FunctionSpec) -> Result<FunctionInfo, Error> {
        let current = self.function(name)?;
        if *current.state.locked() == FunctionState::Creating {
            return Err(Error::conflict(format!(
                "function {name:?} is still being created; wait until it is ready (or DELETE it)"
            )));
        }
        let new = {
            // Under the functions' lock, as for a registration: its layers cannot go meanwhile.
            let functions = self.functions.locked();
            let mut updates = self.updates.locked();
            if updates.get(name).is_some_and(|u| *u.state.locked() == FunctionState::Creating) {
                return Err(Error::conflict(format!("a new version of {name:?} is being made already")));
            }
            if !functions.contains_key(name) {
                return Err(Error::not_found(format!("no function {name:?}")));
            }
            for l in &spec.layers {
                self.layers.resolve(l)?;
            }
            let new = Arc::new(Function::new(name, spec));
            updates.insert(name.to_string(), new.clone());
            new
        };
        tracing::info!(function = %name, "making a new version");
        self.spawn_template(new, true);
        self.get(name)
    }
    /// Boots the function's guest to "ready" and snapshots it, on a thread of its own; for a new
    /// version (`update`) then switches to it.
    fn spawn_template(self: &Arc<Self>, f: Arc<Function>, update: bool) {
        let sup = self.clone();
        let started = std::thread::Builder::new().name(format!("template-{}", f.name)).spawn(move || {
            // Wait for a boot slot; the function stays `creating` meanwhile. A boot that has taken
            // longer than SLOW_BOOT (a guest that never says ready, say) no longer holds its
            // slot: other tenants' boots go ahead.
            let t = {
                let mut boots = sup.template_boots.locked();
                loop {
                    let now = Instant::now();
                    if boots.iter().filter(|b| now.duration_since(**b) < SLOW_BOOT).count() < MAX_TEMPLATE_BOOTS {
                        break;
                    }
                    let (b, _) = sup
                        .template_boot_done
                        .wait_timeout(boots, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                    boots = b;
                }
                let t = Instant::now();
                boots.push(t);
                t
            };
            let result = sup.drives(&f).and_then(|d| {
                let version = version_of(&f.spec, &d);
                *f.version.locked() = Some(version.clone());
                let code = d
                    .iter()
                    .find(|d| d.drive_id == super::model::CODE_DRIVE)
                    .and_then(|d| d.path_on_host.file_stem())
                    .map(|s| format!("sha256:{}", s.to_string_lossy()));
                // A new registration that changes nothing the guest sees (the pool policy, say)
                // keeps the template it has.
                let current = if update { sup.functions.locked().get(&f.name).cloned() } else { None };
                if let Some(cur) = current.filter(|c| c.version.locked().as_deref() == Some(version.as_str())) {
                    if let Some(t) = cur.template() {
                        return Ok((t, false, code));
                    }
                }
                // A networked guest boots with its card on a prepared namespace's TAP, as its
                // clones will.
                let net = match &f.spec.network {
                    Some(_) => Some(sup.network.take(&f.name, NETWORK_WAIT).map_err(|e| e.to_string())?),
                    None => None,
                };
                let t = sup.registry.make_template(
                    &f.name,
                    &f.spec,
                    &version,
                    d,
                    &sup.images,
                    update,
                    sup.workers.as_deref(),
                    net.as_ref(),
                )?;
                Ok((Arc::new(t), update, code))
            });
            {
                let mut boots = sup.template_boots.locked();
                if let Some(i) = boots.iter().position(|b| *b == t) {
                    boots.swap_remove(i);
                }
            }
            sup.template_boot_done.notify_all();
            if update {
                sup.finish_update(f, result, t);
                return;
            }
            let result = result.map(|(t, _, _)| t);
            if f.deleted.load(Ordering::SeqCst) {
                // Deleted while it booted: what the boot wrote goes too, unless the name has been
                // registered again meanwhile (that boot replaces the template directory itself).
                if !sup.functions.locked().contains_key(&f.name) {
                    let _ = sup.registry.remove(&f.name);
                }
                return;
            }
            match result {
                Ok(template) => {
                    *f.template.locked() = Some(template);
                    *f.state.locked() = FunctionState::Ready;
                    tracing::info!(function = %f.name, "template ready in {:.1} s", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::error!(function = %f.name, "cannot make the template: {e}");
                    *f.state.locked() = FunctionState::Failed(e);
                }
            }
        });
        if let Err(e) = started {
            tracing::error!("cannot start a template thread: {e}");
        }
    }

    /// The drives of `f`'s template: its shared layers, bottom to top, then its code, built now.
    fn drives(&self, f: &Function) -> Result<Vec<DriveConfig>, String> {
        let ids = f.spec.drive_ids();
        let mut paths = Vec::with_capacity(ids.len());
        for l in &f.spec.layers {
            paths.push(self.layers.resolve(l).map_err(|e| e.to_string())?.path);
        }
        if let Some(code) = &f.spec.code {
            let source = self.images.open_source("code", code).map_err(|e| e.to_string())?;
            let prefix = Path::new(f.spec.code_prefix());
            paths.push(self.layers.build_code(&f.name, &source.path(), prefix)?.path);
        }
        Ok(ids.into_iter().zip(paths).map(|(id, path)| DriveConfig::read_only(id, path)).collect())
    }

    /// Switches `name` to its new version `new` once its template is made (`made`: the template,
    /// and whether it is a new one in `template.next`): the new pool is restored first, then the
    /// registration, the template and the map entry change in one step under the functions'
    /// lock, and the old version's idle clones go (busy ones when they come back).
    fn finish_update(&self, new: Arc<Function>, made: Result<Made, String>, t: Instant) {
        let name = new.name.clone();
        let (template, fresh, code) = match made {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(function = %name, "the new version failed: {e}; the current one keeps serving");
                *new.state.locked() = FunctionState::Failed(e);
                self.registry.discard_next(&name);
                return;
            }
        };
        *new.template.locked() = Some(template);
        // Clones of the new version before it takes over: the switch costs no cold start.
        let old = self.functions.locked().get(&name).cloned();
        let want = old.as_ref().map_or(0, |o| o.pool.locked().ready.len()).max(new.spec.pool.min_ready as usize).min(8);
        let mut prepared = Vec::new();
        for _ in 0..want {
            match self.restore_clone(&new) {
                Ok(c) => prepared.push(c),
                Err(e) => tracing::warn!(function = %name, "cannot prepare a clone of the new version: {e}"),
            }
        }
        let mut functions = self.functions.locked();
        let still_wanted = !new.deleted.load(Ordering::SeqCst)
            && self.updates.locked().get(&name).is_some_and(|u| Arc::ptr_eq(u, &new))
            && functions.contains_key(&name);
        if !still_wanted {
            drop(functions);
            self.registry.discard_next(&name);
            self.discard(prepared);
            return;
        }
        // A template kept from the current version is relabelled with the new registration (a
        // restart then finds them matching).
        let version = new.version.locked().clone().unwrap_or_default();
        let switched =
            (if fresh { self.registry.promote(&name) } else { self.registry.relabel(&name, &new.spec, &version) })
                .and_then(|()| self.registry.save(&name, &new.spec));
        if let Err(e) = switched {
            drop(functions);
            tracing::error!(function = %name, "cannot switch to the new version: {e}");
            *new.state.locked() = FunctionState::Failed(format!("cannot switch to it: {e}"));
            self.discard(prepared);
            return;
        }
        new.pool.locked().warming.extend(prepared);
        *new.state.locked() = FunctionState::Ready;
        let old = functions.insert(name.clone(), new.clone());
        self.updates.locked().remove(&name);
        drop(functions);
        if let Some(old) = old {
            old.deleted.store(true, Ordering::SeqCst);
            let idle = old.pool.locked().take_idle();
            self.discard(idle);
        }
        // The new version's code layer is now the function's only one.
        self.layers.keep_code(&name, code.as_deref());
        tracing::info!(
            function = %name,
            version = new.version.locked().as_deref().unwrap_or(""),
            "switched to the new version in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    /// Builds a layer from `source` (beneath an image directory) and names it.
    /// Builds ember's runtime layer `name` (the python3 one) from the tree setup wrote,
    /// `layers/NAME` in an image directory, unless a layer of that name exists.
    pub fn provide_runtime_layer(&self, name: &str) -> Result<(), Error> {
        if self.layers.resolve(name).is_ok() {
            return Ok(());
        }
        let (info, _) = self.put_layer(name, &Path::new("layers").join(name))?;
        tracing::info!(layer = %name, digest = %info.digest, "ember's runtime layer provided from its image directory");
        Ok(())
    }

    /// Provides ember's runtime layers that the image directories have trees for (see
    /// [`Supervisor::provide_runtime_layer`]), on a thread of its own: `GET /layers` lists them
    /// once built, and a registration that needs one first builds it itself.
    pub fn provide_runtime_layers(self: &Arc<Self>) {
        let sup = self.clone();
        let spawned = std::thread::Builder::new().name("runtime-layers".into()).spawn(move || {
            let tree = Path::new("layers").join(PYTHON_LAYER);
            if sup.images.open_source("layer", &tree).is_ok() {
                if let Err(e) = sup.provide_runtime_layer(PYTHON_LAYER) {
                    tracing::warn!(layer = PYTHON_LAYER, "cannot provide ember's runtime layer: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the runtime layers' thread: {e}");
        }
    }

    pub fn put_layer(&self, name: &str, source: &Path) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        let opened = self.images.open_source("layer source", source).map_err(image_refusal)?;
        let (mut info, created) = self.layers.put(name, &opened.path(), source)?;
        info.users = self.layer_users(name);
        Ok((info, created))
    }

    /// Builds a layer from an uploaded archive (a tar, possibly gzip-compressed, or an OCI or
    /// `docker save` tarball) and names it.
    pub fn put_layer_upload(&self, name: &str, archive: &[u8]) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        let (mut info, created) = self.layers.put_upload(name, archive)?;
        info.users = self.layer_users(name);
        Ok((info, created))
    }

    fn layer_users(&self, name: &str) -> Vec<String> {
        let functions = self.functions.locked();
        let updates = self.updates.locked();
        users_of(functions.values().chain(updates.values()), name)
    }

    pub fn get_layer(&self, name: &str) -> Result<LayerInfo, Error> {
        self.layers.get(name, self.layer_users(name))
    }

    pub fn list_layers(&self) -> Vec<LayerInfo> {
        self.layers.names().iter().filter_map(|n| self.get_layer(n).ok()).collect()
    }

    /// Deletes a layer no function uses.
    pub fn delete_layer(&self, name: &str) -> Result<(), Error> {
        // Under the functions' lock: no registration can start using it meanwhile.
        let functions = self.functions.locked();
        let users = users_of(functions.values().chain(self.updates.locked().values()), name);
        if !users.is_empty() {
            self.layers.resolve(name)?;
            return Err(Error::conflict(format!("layer {name:?} is used by {}", users.join(", "))));
        }
        self.layers.delete(name)
    }

    pub fn list(&self) -> Vec<FunctionInfo> {
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        functions.iter().map(|f| self.info(f)).collect()
    }

    pub fn get(&self, name: &str) -> Result<FunctionInfo, Error> {
        let f = self.function(name)?;
        Ok(self.info(&f))
    }

    fn info(&self, f: &Function) -> FunctionInfo {
        let mut info = f.info();
        let update = self.updates.locked().get(&f.name).cloned();
        info.update = update.map(|u| UpdateInfo { state: u.state.locked().clone(), spec: u.spec.clone() });
        if f.spec.network.is_some() {
            info.network = self.network.info(&f.name);
        }
        info
    }

    /// Unregisters a function: its ready clones go now, handed-out ones when released; its files go.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        let f = self.function(name)?;
        // The files first: if they cannot go, the function stays registered as it was.
        self.registry.remove(name).map_err(Error::internal)?;
        self.functions.locked().remove(name);
        if let Some(u) = self.updates.locked().remove(name) {
            u.deleted.store(true, Ordering::SeqCst);
        }
        // Its code layer goes with it, unless something else uses that image too.
        self.layers.collect();
        f.deleted.store(true, Ordering::SeqCst);
        let drained = f.pool.locked().take_idle();
        self.discard(drained);
        if f.spec.network.is_some() {
            self.network.detach(name);
        }
        // Its worker exits when its last clone is gone.
        f.worker.locked().take();
        Ok(())
    }

    /// Restores a new clone of `f`'s template with its own channels.
    pub(super) fn restore_clone(&self, f: &Function) -> Result<PooledVm, RestoreError> {
        let template = f.template().ok_or("the function has no template yet")?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A clone counts as ready only with its network attached: a prepared namespace's TAP.
        let net = match &f.spec.network {
            Some(_) => Some(self.network.take(&f.name, NETWORK_WAIT).map_err(|e| RestoreError::Failed(e.to_string()))?),
            None => None,
        };
        if let Some(workers) = &self.workers {
            let worker = self.worker_of(workers, f, &template)?;
            let t = Instant::now();
            // A worker that ended under the restore is replaced by the next one: come back then.
            let (vm, mailbox, vsock) = worker.restore(id, net.as_ref().map(|n| n.tap())).map_err(|e| {
                if worker.dead() {
                    RestoreError::Restarting(Duration::from_secs(1))
                } else {
                    RestoreError::Failed(e)
                }
            })?;
            self.metrics.restore.observe(t.elapsed());
            return Ok(PooledVm { id, vm: CloneVm::Remote(vm), mailbox, vsock, uses: 0, restored: t, net });
        }
        let (mailbox, vsock) = self.registry.channels(id);
        let taps = match &net {
            Some(n) => vec![Arc::new(n.dup_tap().map_err(|e| format!("TAP: {e}"))?)],
            None => Vec::new(),
        };
        let channels = Channels {
            mailbox: Some(mailbox.clone()),
            vsock: Some(vsock.clone()),
            serve: true,
            quiet: true,
            taps,
            ..Default::default()
        };
        let t = Instant::now();
        let vm = template
            .restore(id, &channels, Box::new(std::io::sink()))
            .and_then(|vm| vm.start(RunOptions::default()))
            .map_err(|e| format!("restore: {e}"))?;
        self.metrics.restore.observe(t.elapsed());
        Ok(PooledVm { id, vm: CloneVm::Local(Box::new(vm)), mailbox, vsock, uses: 0, restored: t, net })
    }

    /// `f`'s worker: the one it has, or a new one when it has none or it ended (counted, with
    /// how it ended).
    fn worker_of(
        &self,
        workers: &Arc<Workers>,
        f: &Function,
        template: &Template,
    ) -> Result<Arc<Worker>, RestoreError> {
        if f.deleted.load(Ordering::SeqCst) {
            return Err("the function has been deleted".into());
        }
        let _spawning = f.worker_spawn.locked();
        if let Some(w) = f.worker.locked().clone() {
            if !w.dead() {
                return Ok(w);
            }
            if !w.counted.swap(true, Ordering::SeqCst) {
                let how = w.exit().unwrap_or_else(|| "ended".into());
                tracing::warn!(function = %f.name, pid = w.pid, "the worker ended ({how}); starting another");
                f.worker_restarts.fetch_add(1, Ordering::Relaxed);
                *f.last_worker_exit.locked() = Some(how);
                // A worker that keeps dying before it serves (or soon after its start) is
                // restarted less and less often; one that served a while and was then killed is
                // replaced at once.
                let mut b = f.worker_backoff.locked();
                let served = w.served.load(Ordering::SeqCst) && w.started.elapsed() >= WORKER_STABLE;
                b.1 = if served { 0 } else { b.1 + 1 };
                let delay = if b.1 <= 1 {
                    Duration::ZERO
                } else {
                    (WORKER_BACKOFF * (1 << (b.1 - 1).min(10))).min(WORKER_BACKOFF_MAX)
                };
                b.0 = Some(Instant::now() + delay);
            }
        }
        if let Some(at) = f.worker_backoff.locked().0.filter(|at| Instant::now() < *at) {
            return Err(RestoreError::Restarting(at.saturating_duration_since(Instant::now())));
        }
        let limits = f.spec.limits.resolve(f.max_clones, f.spec.vcpus, f.spec.mem_mib);
        let w = workers.spawn(&f.name, template, &limits, f.max_clones).map_err(|e| {
            f.worker_backoff.locked().0 = Some(Instant::now() + Duration::from_secs(1));
            RestoreError::Failed(e)
        })?;
        tracing::info!(function = %f.name, pid = w.pid, uid = w.uid, jailed = w.jailed, "worker started");
        *f.worker.locked() = Some(w.clone());
        Ok(w)
    }

    /// Hands a ready clone of `name` over; restores one on the spot (a cold start) when the pool is
    /// empty. No clone is ever handed out twice: it leaves the pool under the pool's lock.
    pub fn acquire(&self, name: &str) -> Result<Handoff, Error> {
        self.acquire_in(name, true)
    }

    /// [`Supervisor::acquire`] after [`Supervisor::acquire_warm`] found no clone (that request
    /// has been counted).
    pub fn acquire_cold(&self, name: &str) -> Result<Handoff, Error> {
        self.acquire_in(name, false)
    }

    fn acquire_in(&self, name: &str, arrival: bool) -> Result<Handoff, Error> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        let deadline = t + AT_MAX_WAIT;
        let mut arrival = arrival;
        loop {
            if let Some(c) = self.take_warm(&f, arrival) {
                return self.hand_over(f, c, false, t);
            }
            arrival = false;
            // (`take_warm` has already asked for a refill.)
            let mut pool = f.pool.locked();
            // A cold start adds a clone: never past `max` (in use, ready, starting and restoring).
            if pool.busy + pool.have() < f.max_clones {
                pool.mark_busy();
                break;
            }
            // At `max` with clones being restored: one of them is sooner than a refusal and the
            // caller's retry (a single caller in a loop meets this while the pool refills).
            let now = Instant::now();
            if pool.restoring == 0 || now >= deadline {
                return Err(Error::busy(format!(
                    "function {name:?} is at its pool.max of {} clones; try again",
                    f.max_clones
                )));
            }
            if pool.ready.is_empty() && pool.warming.is_empty() {
                drop(f.pool_changed.wait_timeout(pool, deadline - now));
            }
        }
        let c = self.restore_clone(&f).map_err(|e| {
            f.pool.locked().busy -= 1;
            e.refusal()
        })?;
        tracing::info!(function = %name, id = c.id, "cold start: the pool was empty");
        self.hand_over(f, c, true, t)
    }

    /// The warm half of [`Supervisor::acquire`]: a ready clone if the pool has one (microseconds,
    /// no system call), `None` when a cold start would be needed.
    pub fn acquire_warm(&self, name: &str) -> Result<Option<Handoff>, Error> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        self.take_warm(&f, true).map(|c| self.hand_over(f, c, false, t)).transpose()
    }

    fn ready_function(&self, name: &str) -> Result<Arc<Function>, Error> {
        let f = self.function(name)?;
        let state = f.state.locked().clone();
        if state != FunctionState::Ready {
            return Err(Error::conflict(format!("function {name:?} is not ready ({state:?})")));
        }
        Ok(f)
    }

    fn hand_over(&self, f: Arc<Function>, mut clone: PooledVm, cold_start: bool, t: Instant) -> Result<Handoff, Error> {
        let lease = match new_lease() {
            Ok(l) => l,
            Err(e) => {
                f.pool.locked().busy -= 1;
                return Err(e);
            }
        };
        clone.uses += 1;
        f.counters.handoffs.fetch_add(1, Ordering::Relaxed);
        if cold_start {
            f.counters.cold_starts.fetch_add(1, Ordering::Relaxed);
        }
        let handoff = Handoff {
            id: clone.id,
            function: f.name.clone(),
            mailbox: clone.mailbox.clone(),
            vsock: clone.vsock.clone(),
            cold_start,
            lease: lease.clone(),
            address: clone.net.as_ref().map(|n| n.address),
        };
        let expires = Instant::now() + Duration::from_secs_f64(f.spec.pool.lease_s);
        self.handed.locked().insert(clone.id, Handed { function: f, clone, lease, expires });
        self.metrics.handoff.observe(t.elapsed());
        Ok(handoff)
    }

    /// The ids of every handed-out VM.
    pub fn handed_ids(&self) -> Vec<u64> {
        self.handed.locked().keys().copied().collect()
    }

    /// Takes a handed-out VM back. It goes back to the pool when the function's policy reuses
    /// clones (`max_uses`), it has uses left, `destroy` is not asked for, and it is sound: running,
    /// its agent serving, no request in flight. Otherwise it is destroyed. Returns whether it was
    /// recycled.
    pub fn release(&self, id: u64, lease: &str, destroy: bool) -> Result<bool, Error> {
        self.release_after(id, lease, destroy, false)
    }

    /// [`Supervisor::release`] after an `acquire` (`invoked` false) or an `invoke` (true): with
    /// `max_uses` unset only the latter recycles ([`PoolPolicy::uses_allowed`]).
    ///
    /// [`PoolPolicy::uses_allowed`]: crate::scale::scaler::PoolPolicy::uses_allowed
    fn release_after(&self, id: u64, lease: &str, destroy: bool, invoked: bool) -> Result<bool, Error> {
        let h = {
            let mut handed = self.handed.locked();
            let h = handed.get(&id).ok_or_else(|| Error::not_found(format!("no handed-out VM {id}")))?;
            if !same_lease(&h.lease, lease) {
                return Err(Error::forbidden(format!("VM {id}: the lease does not match this handoff")));
            }
            let h = handed.remove(&id).ok_or_else(|| Error::not_found(format!("no handed-out VM {id}")))?;
            // A lease ends at its deadline, whether or not the scaler's tick has come round to
            // it yet: a release after it is refused as one after the tick would be.
            if h.expires <= Instant::now() {
                drop(handed);
                self.expire(vec![h]);
                return Err(Error::not_found(format!("no handed-out VM {id} (its lease expired)")));
            }
            h
        };
        let (f, clone) = (h.function, h.clone);
        let recycle = !destroy
            && clone.uses < f.spec.pool.uses_allowed(invoked)
            && !f.deleted.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
            && !clone.vm.ended()
            && clone.vm.mailbox().quiescent();
        let mut pool = f.pool.locked();
        pool.busy -= 1;
        f.pool_changed.notify_all();
        if recycle {
            // Taken first by the next acquire: its agent is the most likely to still be polling.
            pool.ready.push_front(clone);
            drop(pool);
            f.counters.recycled.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        drop(pool);
        self.discard(vec![clone]);
        Ok(false)
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

    /// Destroys handed-out clones whose lease ran out (`pool.lease_s`): their release is then
    /// refused as for any unknown VM.
    pub(super) fn expire_leases(&self) {
        let now = Instant::now();
        let expired: Vec<Handed> = {
            let mut handed = self.handed.locked();
            let ids: Vec<u64> = handed.iter().filter(|(_, h)| h.expires <= now).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| handed.remove(id)).collect()
        };
        self.expire(expired);
    }

    /// Destroys the clones of leases that ended, counting them.
    fn expire(&self, expired: Vec<Handed>) {
        let clones = expired
            .into_iter()
            .map(|h| {
                tracing::warn!(function = %h.function.name, id = h.clone.id, "lease expired; the clone is destroyed");
                h.function.pool.locked().busy -= 1;
                h.function.counters.expired_leases.fetch_add(1, Ordering::Relaxed);
                h.clone
            })
            .collect();
        self.discard(clones);
    }

    /// acquire (a clone as `take` says) + invoke through the mailbox + release. With one of
    /// ember's runtimes the invocation carries its context (`request_id` among it) and comes back
    /// with its log and, for a handler's error, the runtime's report. Blocks (a cold start, a slow
    /// function).
    pub fn invoke(&self, call: &InvokeCall<'_>, take: Take) -> Result<Invoked, Error> {
        let inflight = self.invoke_begin(call, take)?.ok_or_else(|| Error::busy("no ready clone"))?;
        self.invoke_finish(inflight)
    }

    /// The first half of [`Supervisor::invoke`], for a caller that must not block: with `Warm`,
    /// `None` when the pool has no ready clone (nothing taken; the arrival is counted, so the
    /// caller goes on with `Cold`). Otherwise the request is posted to the clone if its mailbox is
    /// free now (it is left to [`Supervisor::invoke_finish`] if not). Microseconds, no waiting.
    pub fn invoke_begin(&self, call: &InvokeCall<'_>, take: Take) -> Result<Option<InvokeInFlight>, Error> {
        let InvokeCall { name, handler, payload, timeout, request_id } = *call;
        let f = self.function(name)?;
        // Bounded: a refusal now beats a caller waiting on a blocking pool that hung guests fill.
        let slots = InvokeSlots::take(&self.invokes, &f)?;
        // What can be checked without a clone is checked before one is taken.
        let handler = handler.unwrap_or(f.spec.default_function()).to_string();
        let managed = f.spec.known_runtime() == Some(handler.as_str());
        check_request(&handler, payload).map_err(invoke_refusal)?;
        let handoff = match take {
            Take::Warm => match self.acquire_warm(name)? {
                Some(h) => h,
                None => return Ok(None),
            },
            Take::Cold => self.acquire_cold(name)?,
        };
        // The version of the clone's function (a switch may have happened since `f` was looked up).
        let (mailbox, version) = {
            let mut handed = self.handed.locked();
            match handed.get_mut(&handoff.id) {
                Some(h) => {
                    // The invocation is bounded by its own timeout, not by the pool's lease (which
                    // is for clients that acquire a clone): a `timeout_s` longer than `lease_s`
                    // must not lose the clone mid-call.
                    h.expires = h.expires.max(Instant::now() + timeout + INVOKE_LEASE_MARGIN);
                    (h.clone.vm.mailbox(), h.function.version.locked().clone())
                }
                None => return Err(Error::internal("the handed-out VM vanished")),
            }
        };
        let request = if managed {
            let context = serde_json::json!({
                "request_id": request_id,
                "function": name,
                "version": version,
                "clone_id": handoff.id,
                "memory_mib": f.spec.mem_mib,
                "timeout_ms": timeout.as_millis() as u64,
            });
            let ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
            envelope_request(ms, context.to_string().as_bytes(), payload)
        } else {
            payload.to_vec()
        };
        // Many invocations wait at once on few cores: poll briefly, then sleep until the agent
        // rings, so that waiting callers do not take the CPU the guests need to answer.
        let opts = CallOptions { timeout, doorbell: true, spin: INVOKE_SPIN, envelope: managed, ..Default::default() };
        let own = handler == f.spec.default_function();
        let state = match check_request(&handler, &request) {
            Err(e) => CallState::Failed(e),
            Ok(_) => match Mailbox::try_begin(mailbox.clone(), &handler, &request, opts) {
                Ok(Some(p)) => CallState::Posted(p),
                Ok(None) => CallState::Waiting { mailbox, handler, request, opts },
                Err(e) => CallState::Failed(e),
            },
        };
        let (id, lease, request_id) = (handoff.id, handoff.lease, request_id.to_string());
        Ok(Some(InvokeInFlight { f, _slots: slots, id, lease, version, own, managed, request_id, state }))
    }

    /// The second half of [`Supervisor::invoke`]: waits for the answer (blocks, at most the
    /// call's timeout), releases the clone and counts the invocation.
    pub fn invoke_finish(&self, inflight: InvokeInFlight) -> Result<Invoked, Error> {
        let InvokeInFlight { f, _slots, id, lease, version, own, managed, request_id, state } = inflight;
        let response = match state {
            CallState::Posted(p) => p.finish(),
            CallState::Waiting { mailbox, handler, request, opts } => {
                Mailbox::begin(mailbox, &handler, &request, opts).and_then(|p| p.finish())
            }
            CallState::Failed(e) => Err(e),
        };
        let r = response.map_err(invoke_refusal);
        let r = r.and_then(|resp| Invoked::from_response(resp, managed, id, version));
        // A clone that did not answer (or answered out of protocol) is not handed to anyone again;
        // nor is one whose runtime (one of ember's) broke: it answers `failed` only then.
        let broken = managed && r.as_ref().is_ok_and(|i| i.status == ember_abi::Status::Failed);
        // Recycled (by the policy) only when it ran the function's own handler.
        let _ = self.release_after(id, &lease, r.is_err() || broken, own);
        f.counters.invocations.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(inv) => {
                if inv.status != ember_abi::Status::Ok {
                    f.counters.invocation_errors.fetch_add(1, Ordering::Relaxed);
                }
                inv.log_lines(&f.name, &request_id);
            }
            Err(_) => {
                f.counters.invocation_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
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
            f.worker.locked().take();
        }
        if let Some(w) = &self.workers {
            w.wait_all(Duration::from_secs(10));
        }
        self.network.shutdown();
    }

    /// Prometheus text for /metrics.
    pub fn prometheus(&self) -> String {
        let infos = self.list();
        self.metrics.render(&infos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unguessable_and_compared_whole() {
        let (a, b) = (new_lease().unwrap(), new_lease().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same_lease(&a, &a.clone()));
        assert!(!same_lease(&a, &b));
        assert!(!same_lease(&a, &a[..31]));
        assert!(!same_lease(&a, ""));
    }
}
