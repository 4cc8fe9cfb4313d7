//! The pool supervisor: registered functions, their templates and pools of ready clones, the
//! handoff of clones to callers, and the background loop that scales pools and replaces crashed
//! clones. Synchronous: the HTTP layer (`api.rs`) calls into it from blocking tasks.
//!
//! On disk, under the state directory:
//!
//! ```text
//! functions/<name>/spec.json     the registration, as accepted
//! functions/<name>/template/     the template snapshot (state, memory, working-set)
//! vms/<id>.mailbox, <id>.vsock   each live clone's channels (removed with the clone)
//! ```
//!
//! A restart loads every `spec.json`, restores pools from the saved templates without booting, and
//! boots again only a function whose template is missing or unreadable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use super::scaler::{Action, Load, PoolPolicy, Scaler};
use crate::config::{BootSource, MachineConfig, VmConfig};
use crate::mailbox::{CallOptions, Response};
use crate::sys::Locked;
use crate::template::{MakeOptions, Template};
use crate::vmm::{Channels, RunOptions, RunningVm};

/// How often the background loop scales pools (it also refills them after every handoff).
pub const TICK: Duration = Duration::from_millis(100);
/// Most clones starting at once, all functions together (restored, agent not serving yet). A
/// clone's start is guest kernel work; too many at once on few host cores starve each other's
/// timer ticks and none finishes (64 at once on 2 cores where guest kernel mode is emulated never
/// did).
const MAX_WARMING: usize = 8;
/// How long `invoke` polls for the agent's answer before sleeping until the agent rings.
const INVOKE_SPIN: Duration = Duration::from_micros(50);
/// The refill time assumed until a clone of the function has been seen starting.
const INITIAL_REFILL_S: f64 = 0.1;
/// The longest a registration's boot may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A function's registration (`PUT /functions/{name}`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The initramfs with ember's agent and the function's runtime.
    pub initramfs: PathBuf,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// The function the agent runs for `invoke` when the request names none: a built-in or the
    /// image's runtime (named in the image's /etc/ember/runtime).
    #[serde(default = "default_handler")]
    pub handler: String,
    /// The function's runtime inside the guest, `NAME COMMAND [ARGS...]` (the format of an image's
    /// /etc/ember/runtime, which it replaces): started by the agent before the template is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default)]
    pub pool: PoolPolicy,
}

/// The longest `runtime` command line.
const MAX_RUNTIME_LEN: usize = 512;

/// Checks a registration's runtime command: it travels on the kernel command line, in quotes.
fn check_runtime(runtime: &str) -> Result<(), String> {
    if runtime.len() > MAX_RUNTIME_LEN {
        return Err(format!("runtime is longer than {MAX_RUNTIME_LEN} bytes"));
    }
    if let Some(c) = runtime.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ') || matches!(c, '"' | '\\')) {
        return Err(format!("runtime: {c:?} is not allowed (printable ASCII without quotes or backslashes)"));
    }
    let mut words = runtime.split_whitespace();
    let (Some(name), Some(_command)) = (words.next(), words.next()) else {
        return Err("runtime: expected `NAME COMMAND [ARGS...]`".into());
    };
    ember_abi::check_function(name.as_bytes()).map_err(|e| format!("runtime name {name:?}: {e}"))?;
    Ok(())
}

fn default_vcpus() -> u8 {
    1
}
fn default_mem() -> u64 {
    crate::config::DEFAULT_MEM_MIB
}
fn default_handler() -> String {
    "echo".into()
}

/// Why a request was refused: the HTTP status follows from the kind.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    /// The VM or the agent failed (502), or did not answer in time (504).
    BadGateway(String),
    Timeout(String),
    Internal(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Refusal::BadRequest(m)
        | Refusal::NotFound(m)
        | Refusal::Conflict(m)
        | Refusal::BadGateway(m)
        | Refusal::Timeout(m)
        | Refusal::Internal(m)) = self;
        f.write_str(m)
    }
}

impl FunctionSpec {
    /// Checks what can be checked without booting: names, files, sizes, the pool policy.
    pub fn validate(&self) -> Result<(), Refusal> {
        for (what, p) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !p.is_file() {
                return Err(Refusal::BadRequest(format!("{what} {} does not exist or is not a file", p.display())));
            }
        }
        let machine = MachineConfig { vcpu_count: self.vcpus.into(), mem_size_mib: self.mem_mib };
        self.vm_config_with(machine).validate().map_err(|e| Refusal::BadRequest(e.to_string()))?;
        ember_abi::check_function(self.handler.as_bytes()).map_err(|e| Refusal::BadRequest(format!("handler: {e}")))?;
        if let Some(r) = &self.runtime {
            check_runtime(r).map_err(Refusal::BadRequest)?;
        }
        self.pool.validate().map_err(Refusal::BadRequest)
    }

    fn vm_config_with(&self, machine_config: MachineConfig) -> VmConfig {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: self.kernel.clone(),
                initrd_path: Some(self.initramfs.clone()),
                // The kernel hands `NAME=value` words it does not know to init as environment.
                boot_args: self
                    .runtime
                    .as_ref()
                    .map(|r| format!("{} EMBER_RUNTIME=\"{}\"", crate::config::default_cmdline(), r.trim())),
            },
            machine_config,
        }
    }

    fn vm_config(&self) -> VmConfig {
        self.vm_config_with(MachineConfig { vcpu_count: self.vcpus.into(), mem_size_mib: self.mem_mib })
    }
}

/// Checks a function name: 1 to 64 characters of `[a-z0-9_-]` (it names a directory).
pub fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Refusal::BadRequest(format!("bad function name {name:?}: use 1 to 64 characters of [a-z0-9_-]")))
    }
}

/// Where a function is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum FunctionState {
    /// Booting the guest to make the template.
    Creating,
    Ready,
    /// The template could not be made.
    Failed(String),
}

/// A clone: a restored VM and its channels.
pub struct PooledVm {
    pub id: u64,
    vm: RunningVm,
    pub mailbox: PathBuf,
    pub vsock: PathBuf,
    /// Handoffs so far.
    uses: u32,
    restored: Instant,
}

#[derive(Default)]
struct Pool {
    ready: VecDeque<PooledVm>,
    /// Restored clones whose agent is not serving yet.
    warming: VecDeque<PooledVm>,
    /// Clones being restored by the background loop.
    restoring: u32,
    /// Clones handed out and not yet released.
    busy: u32,
    /// The most clones handed out at once since the scaler last looked.
    peak_busy: u32,
    /// Handoffs since the scaler last looked.
    handoffs: u32,
}

impl Pool {
    /// Every clone not handed out (ready and warming), for destroying outside the lock.
    fn take_idle(&mut self) -> Vec<PooledVm> {
        let warming: Vec<PooledVm> = self.warming.drain(..).collect();
        self.ready.drain(..).chain(warming).collect()
    }

    /// Ready, starting and being restored: the pool as the scaler counts it.
    fn have(&self) -> u32 {
        (self.ready.len() + self.warming.len()) as u32 + self.restoring
    }

    fn mark_busy(&mut self) {
        self.busy += 1;
        self.peak_busy = self.peak_busy.max(self.busy);
        self.handoffs += 1;
    }
}

/// Counters of one function (exported in /metrics and GET /functions/{name}).
#[derive(Default)]
struct Counters {
    handoffs: AtomicU64,
    cold_starts: AtomicU64,
    invocations: AtomicU64,
    invocation_errors: AtomicU64,
    replaced: AtomicU64,
    recycled: AtomicU64,
}

pub struct Function {
    name: String,
    spec: FunctionSpec,
    dir: PathBuf,
    state: Mutex<FunctionState>,
    template: Mutex<Option<Arc<Template>>>,
    pool: Mutex<Pool>,
    scaler: Mutex<Scaler>,
    counters: Counters,
    deleted: AtomicBool,
    /// Restore to agent serving, seconds (an EWMA of what was seen): the scaler's refill time.
    refill_s: Mutex<f64>,
}

/// What `GET /functions/{name}` shows.
#[derive(Debug, Serialize)]
pub struct FunctionInfo {
    pub name: String,
    #[serde(flatten)]
    pub state: FunctionState,
    pub spec: FunctionSpec,
    pub ready: u32,
    /// Restored, agent still starting.
    pub warming: u32,
    pub busy: u32,
    pub restoring: u32,
    pub target_ready: u32,
    pub handoffs: u64,
    pub cold_starts: u64,
    pub invocations: u64,
    pub invocation_errors: u64,
    pub replaced_clones: u64,
    /// Released clones that went back to the pool (`pool.max_uses` > 1).
    pub recycled_clones: u64,
    /// Restore to agent serving, as the scaler assumes it now (seconds).
    pub refill_s: f64,
}

/// What `acquire` hands over.
#[derive(Debug, Serialize)]
pub struct Handoff {
    pub id: u64,
    pub function: String,
    pub mailbox: PathBuf,
    pub vsock: PathBuf,
    /// Restored on the spot because the pool was empty.
    pub cold_start: bool,
}

/// A handed-out clone.
struct Handed {
    function: Arc<Function>,
    clone: PooledVm,
}

pub struct Supervisor {
    state_dir: PathBuf,
    functions: Mutex<BTreeMap<String, Arc<Function>>>,
    handed: Mutex<HashMap<u64, Handed>>,
    next_id: AtomicU64,
    pub metrics: Metrics,
    stopping: AtomicBool,
    /// Pools are not scaled while set (benchmarks measure the handoff path alone).
    scaling_paused: AtomicBool,
    /// Set by a handoff to have the background loop refill pools before its next tick.
    refill_wanted: Mutex<bool>,
    refill_signal: Condvar,
}

impl Function {
    fn template(&self) -> Option<Arc<Template>> {
        self.template.locked().clone()
    }

    fn info(&self) -> FunctionInfo {
        let pool = self.pool.locked();
        let c = &self.counters;
        FunctionInfo {
            name: self.name.clone(),
            state: self.state.locked().clone(),
            spec: self.spec.clone(),
            ready: pool.ready.len() as u32,
            warming: pool.warming.len() as u32,
            busy: pool.busy,
            restoring: pool.restoring,
            target_ready: self.scaler.locked().target(),
            handoffs: c.handoffs.load(Ordering::Relaxed),
            cold_starts: c.cold_starts.load(Ordering::Relaxed),
            invocations: c.invocations.load(Ordering::Relaxed),
            invocation_errors: c.invocation_errors.load(Ordering::Relaxed),
            replaced_clones: c.replaced.load(Ordering::Relaxed),
            recycled_clones: c.recycled.load(Ordering::Relaxed),
            refill_s: *self.refill_s.locked(),
        }
    }
}

impl Supervisor {
    /// Opens (or creates) the state directory and loads every registered function.
    pub fn open(state_dir: &Path) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(state_dir.join("functions"))?;
        // Channels of clones from a previous run (a daemon killed with SIGKILL) are stale.
        let vms = state_dir.join("vms");
        let _ = std::fs::remove_dir_all(&vms);
        std::fs::create_dir_all(&vms)?;
        let sup = Arc::new(Self {
            state_dir: state_dir.to_path_buf(),
            functions: Mutex::new(BTreeMap::new()),
            handed: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: Metrics::default(),
            stopping: AtomicBool::new(false),
            scaling_paused: AtomicBool::new(false),
            refill_wanted: Mutex::new(false),
            refill_signal: Condvar::new(),
        });
        let mut names: Vec<String> = std::fs::read_dir(state_dir.join("functions"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let dir = state_dir.join("functions").join(&name);
            let spec = std::fs::read_to_string(dir.join("spec.json"))
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<FunctionSpec>(&s).map_err(|e| e.to_string()));
            match spec {
                Ok(spec) => {
                    let f = sup.insert(&name, spec);
                    match load_template(&f.dir) {
                        Ok(t) => {
                            *f.template.locked() = Some(Arc::new(t));
                            *f.state.locked() = FunctionState::Ready;
                            tracing::info!(function = %name, "loaded with its saved template");
                        }
                        Err(e) => {
                            tracing::warn!(function = %name, "saved template unusable ({e}); booting again");
                            sup.spawn_template(f);
                        }
                    }
                }
                Err(e) => tracing::error!("{}: cannot load spec.json: {e}; skipped", dir.display()),
            }
        }
        Ok(sup)
    }

    fn insert(&self, name: &str, spec: FunctionSpec) -> Arc<Function> {
        let f = Arc::new(Function {
            name: name.to_string(),
            dir: self.state_dir.join("functions").join(name),
            scaler: Mutex::new(Scaler::new(spec.pool.clone(), TICK)),
            spec,
            state: Mutex::new(FunctionState::Creating),
            template: Mutex::new(None),
            pool: Mutex::new(Pool::default()),
            counters: Counters::default(),
            deleted: AtomicBool::new(false),
            refill_s: Mutex::new(INITIAL_REFILL_S),
        });
        self.functions.locked().insert(name.to_string(), f.clone());
        f
    }

    fn function(&self, name: &str) -> Result<Arc<Function>, Refusal> {
        self.functions.locked().get(name).cloned().ok_or_else(|| Refusal::NotFound(format!("no function {name:?}")))
    }

    /// Registers a function: saves its spec, then boots its template in the background.
    pub fn register(self: &Arc<Self>, name: &str, spec: FunctionSpec) -> Result<FunctionInfo, Refusal> {
        check_name(name)?;
        spec.validate()?;
        if self.functions.locked().contains_key(name) {
            return Err(Refusal::Conflict(format!("function {name:?} is already registered; DELETE it first")));
        }
        let dir = self.state_dir.join("functions").join(name);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join("spec.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&spec).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, dir.join("spec.json"))
        };
        write().map_err(|e| Refusal::Internal(format!("cannot save the registration: {e}")))?;
        let f = self.insert(name, spec);
        self.spawn_template(f.clone());
        Ok(f.info())
    }

    /// Boots the function's guest to "ready" and snapshots it, on a thread of its own.
    fn spawn_template(self: &Arc<Self>, f: Arc<Function>) {
        let started = std::thread::Builder::new().name(format!("template-{}", f.name)).spawn(move || {
            let t = Instant::now();
            let result = make_template(&f.spec, &f.dir);
            match result {
                Ok(template) => {
                    *f.template.locked() = Some(Arc::new(template));
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

    pub fn list(&self) -> Vec<FunctionInfo> {
        self.functions.locked().values().map(|f| f.info()).collect()
    }

    pub fn get(&self, name: &str) -> Result<FunctionInfo, Refusal> {
        Ok(self.function(name)?.info())
    }

    /// Unregisters a function: its ready clones go now, handed-out ones when released; its files go.
    pub fn delete(&self, name: &str) -> Result<(), Refusal> {
        let f =
            self.functions.locked().remove(name).ok_or_else(|| Refusal::NotFound(format!("no function {name:?}")))?;
        f.deleted.store(true, Ordering::SeqCst);
        let drained = f.pool.locked().take_idle();
        drop(drained);
        std::fs::remove_dir_all(&f.dir)
            .map_err(|e| Refusal::Internal(format!("cannot remove {}: {e}", f.dir.display())))
    }

    /// Restores a new clone of `f`'s template with its own channels.
    fn restore_clone(&self, f: &Function) -> Result<PooledVm, String> {
        let template = f.template().ok_or("the function has no template yet")?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let vms = self.state_dir.join("vms");
        let (mailbox, vsock) = (vms.join(format!("{id}.mailbox")), vms.join(format!("{id}.vsock")));
        let channels =
            Channels { mailbox: Some(mailbox.clone()), vsock: Some(vsock.clone()), serve: true, ..Default::default() };
        let t = Instant::now();
        let vm = template
            .restore(id, &channels, Box::new(std::io::sink()))
            .and_then(|vm| vm.start(RunOptions::default()))
            .map_err(|e| format!("restore: {e}"))?;
        self.metrics.restore.observe(t.elapsed());
        Ok(PooledVm { id, vm, mailbox, vsock, uses: 0, restored: t })
    }

    /// Hands a ready clone of `name` over; restores one on the spot (a cold start) when the pool is
    /// empty. No clone is ever handed out twice: it leaves the pool under the pool's lock.
    pub fn acquire(&self, name: &str) -> Result<Handoff, Refusal> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        if let Some(c) = self.take_warm(&f) {
            return Ok(self.hand_over(f, c, false, t));
        }
        // (`take_warm` has already asked for a refill.)
        f.pool.locked().mark_busy();
        let c = self.restore_clone(&f).map_err(|e| {
            f.pool.locked().busy -= 1;
            Refusal::Internal(e)
        })?;
        tracing::info!(function = %name, id = c.id, "cold start: the pool was empty");
        Ok(self.hand_over(f, c, true, t))
    }

    /// The warm half of [`Supervisor::acquire`]: a ready clone if the pool has one (microseconds,
    /// no system call), `None` when a cold start would be needed.
    pub fn acquire_warm(&self, name: &str) -> Result<Option<Handoff>, Refusal> {
        let t = Instant::now();
        let f = self.ready_function(name)?;
        Ok(self.take_warm(&f).map(|c| self.hand_over(f, c, false, t)))
    }

    fn ready_function(&self, name: &str) -> Result<Arc<Function>, Refusal> {
        let f = self.function(name)?;
        let state = f.state.locked().clone();
        if state != FunctionState::Ready {
            return Err(Refusal::Conflict(format!("function {name:?} is not ready ({state:?})")));
        }
        Ok(f)
    }

    /// Takes a live clone out of the pool (ended ones are dropped and counted), marking it busy: a
    /// ready one, else one still starting (restored already, so still no cold start).
    fn take_warm(&self, f: &Function) -> Option<PooledVm> {
        let mut pool = f.pool.locked();
        let mut crashed = 0;
        let mut warm = None;
        while let Some(c) = pool.ready.pop_front().or_else(|| pool.warming.pop_front()) {
            if c.vm.exit().is_none() {
                warm = Some(c);
                break;
            }
            crashed += 1;
        }
        if warm.is_some() {
            pool.mark_busy();
        }
        let have = pool.have();
        drop(pool);
        f.counters.replaced.fetch_add(crashed, Ordering::Relaxed);
        self.want_refill(f, have);
        warm
    }

    /// Asks the background loop to refill pools now rather than at its next tick, if `f`'s pool
    /// (`have` clones ready, starting or being restored) is short of its target.
    fn want_refill(&self, f: &Function, have: u32) {
        if self.scaling_paused.load(Ordering::Relaxed) || f.scaler.locked().deficit(have) == 0 {
            return;
        }
        let mut wanted = self.refill_wanted.locked();
        if !*wanted {
            *wanted = true;
            self.refill_signal.notify_one();
        }
    }

    fn hand_over(&self, f: Arc<Function>, mut clone: PooledVm, cold_start: bool, t: Instant) -> Handoff {
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
        };
        self.handed.locked().insert(clone.id, Handed { function: f, clone });
        self.metrics.handoff.observe(t.elapsed());
        handoff
    }

    /// The ids of every handed-out VM.
    pub fn handed_ids(&self) -> Vec<u64> {
        self.handed.locked().keys().copied().collect()
    }

    /// Takes a handed-out VM back. It goes back to the pool when the function's policy reuses
    /// clones (`max_uses`), it has uses left, `destroy` is not asked for, and it is sound: running,
    /// its agent serving, no request in flight. Otherwise it is destroyed. Returns whether it was
    /// recycled.
    pub fn release(&self, id: u64, destroy: bool) -> Result<bool, Refusal> {
        let h = self.handed.locked().remove(&id).ok_or_else(|| Refusal::NotFound(format!("no handed-out VM {id}")))?;
        let (f, clone) = (h.function, h.clone);
        let recycle = !destroy
            && clone.uses < f.spec.pool.max_uses
            && !f.deleted.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
            && clone.vm.exit().is_none()
            && clone.vm.mailbox().quiescent();
        let mut pool = f.pool.locked();
        pool.busy -= 1;
        if recycle {
            // Taken first by the next acquire: its agent is the most likely to still be polling.
            pool.ready.push_front(clone);
            drop(pool);
            f.counters.recycled.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        drop(pool);
        // Stopping joins the vCPU threads: off the caller's path.
        let _ = std::thread::Builder::new().name("release".into()).spawn(move || drop(clone.vm.stop("released")));
        Ok(false)
    }

    /// acquire + invoke through the mailbox + release.
    pub fn invoke(
        &self,
        name: &str,
        handler: Option<&str>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Response, Refusal> {
        let handoff = self.acquire(name)?;
        let f = self.function(name)?;
        let handler = handler.unwrap_or(&f.spec.handler).to_string();
        let result = {
            let handed = self.handed.locked();
            handed.get(&handoff.id).map(|h| h.clone.vm.mailbox())
        };
        let Some(mailbox) = result else { return Err(Refusal::Internal("the handed-out VM vanished".into())) };
        // Many invocations wait at once on few cores: poll briefly, then sleep until the agent
        // rings, so that waiting callers do not take the CPU the guests need to answer.
        let r = mailbox.call(&handler, payload, CallOptions { timeout, doorbell: true, spin: INVOKE_SPIN });
        // A clone that did not answer is not handed to anyone again.
        let _ = self.release(handoff.id, r.is_err());
        f.counters.invocations.fetch_add(1, Ordering::Relaxed);
        r.map_err(|e| {
            f.counters.invocation_errors.fetch_add(1, Ordering::Relaxed);
            match e {
                crate::mailbox::InvokeError::Timeout(_) => Refusal::Timeout(e.to_string()),
                crate::mailbox::InvokeError::BadFunction(_) | crate::mailbox::InvokeError::PayloadTooLarge(_) => {
                    Refusal::BadRequest(e.to_string())
                }
                _ => Refusal::BadGateway(e.to_string()),
            }
        })
    }

    /// Stops or restarts the scaling of pools (the background loop keeps running).
    pub fn pause_scaling(&self, paused: bool) {
        self.scaling_paused.store(paused, Ordering::SeqCst);
    }

    /// The functions the background loop looks after: ready and not deleted.
    fn live_functions(&self) -> Vec<Arc<Function>> {
        let functions: Vec<Arc<Function>> = self.functions.locked().values().cloned().collect();
        functions
            .into_iter()
            .filter(|f| *f.state.locked() == FunctionState::Ready && !f.deleted.load(Ordering::SeqCst))
            .collect()
    }

    /// Drops clones that have ended and moves clones whose agent now serves from warming to ready
    /// (learning the refill time from them).
    fn sweep(&self, f: &Function) {
        let (mut dead, mut started) = (Vec::new(), Vec::new());
        let mut pool = f.pool.locked();
        // In place: the common pass (nothing ended, nothing started) allocates and moves nothing,
        // and holds the lock the handoff path needs as briefly as possible.
        let mut i = 0;
        while i < pool.ready.len() {
            if pool.ready[i].vm.exit().is_some() {
                dead.extend(pool.ready.remove(i));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < pool.warming.len() {
            let c = &pool.warming[i];
            if c.vm.exit().is_some() {
                dead.extend(pool.warming.remove(i));
            } else if c.vm.mailbox().agent_serving() {
                started.extend(pool.warming.remove(i));
            } else {
                i += 1;
            }
        }
        for c in started {
            let took = c.restored.elapsed();
            self.metrics.clone_start.observe(took);
            let mut refill = f.refill_s.locked();
            *refill = 0.8 * *refill + 0.2 * took.as_secs_f64();
            drop(refill);
            pool.ready.push_back(c);
        }
        drop(pool);
        if !dead.is_empty() {
            f.counters.replaced.fetch_add(dead.len() as u64, Ordering::Relaxed);
            tracing::warn!(function = %f.name, "{} ready clones had ended; replacing them", dead.len());
        }
    }

    /// Clones starting now, all functions together.
    fn warming_total(&self, functions: &[Arc<Function>]) -> usize {
        functions
            .iter()
            .map(|f| {
                let pool = f.pool.locked();
                pool.warming.len() + pool.restoring as usize
            })
            .sum()
    }

    /// Restores up to `n` clones of `f` into its warming queue, within the host-wide limit of
    /// clones starting at once; the rest follows on later passes, as clones finish starting.
    fn grow(&self, f: &Function, n: u32, warming: &mut usize) {
        let n = (n as usize).min(MAX_WARMING.saturating_sub(*warming)) as u32;
        *warming += n as usize;
        f.pool.locked().restoring += n;
        for _ in 0..n {
            let c = self.restore_clone(f);
            let mut pool = f.pool.locked();
            pool.restoring -= 1;
            match c {
                Ok(c) if !f.deleted.load(Ordering::SeqCst) => pool.warming.push_back(c),
                Ok(_) => {}
                Err(e) => tracing::error!(function = %f.name, "cannot refill the pool: {e}"),
            }
        }
    }

    /// What both passes of the background loop start with: unless scaling is paused, every live
    /// function with its pool swept, and the clones starting host-wide.
    fn swept_functions(&self) -> Option<(Vec<Arc<Function>>, usize)> {
        if self.scaling_paused.load(Ordering::SeqCst) {
            return None;
        }
        let functions = self.live_functions();
        functions.iter().for_each(|f| self.sweep(f));
        let warming = self.warming_total(&functions);
        Some((functions, warming))
    }

    /// One tick of the background loop: sweep every pool, then scale it.
    pub fn tick(&self) {
        let Some((functions, mut warming)) = self.swept_functions() else { return };
        for f in &functions {
            let load = {
                let mut pool = f.pool.locked();
                let busy = pool.busy;
                Load {
                    busy,
                    peak_busy: std::mem::replace(&mut pool.peak_busy, busy),
                    handoffs: std::mem::take(&mut pool.handoffs),
                    have: pool.have(),
                    refill_s: *f.refill_s.locked(),
                }
            };
            let action = f.scaler.locked().tick(load);
            match action {
                Action::Grow(n) => self.grow(f, n, &mut warming),
                Action::Shrink(n) => {
                    let mut pool = f.pool.locked();
                    let mut gone = Vec::new();
                    for _ in 0..n {
                        match pool.warming.pop_back().or_else(|| pool.ready.pop_back()) {
                            Some(c) => gone.push(c),
                            None => break,
                        }
                    }
                    drop(pool);
                    drop(gone);
                }
                Action::Hold => {}
            }
        }
    }

    /// Between ticks, after handoffs: restores what pools lack against their last target.
    pub fn refill(&self) {
        let Some((functions, mut warming)) = self.swept_functions() else { return };
        for f in &functions {
            let have = f.pool.locked().have();
            let n = f.scaler.locked().deficit(have);
            if n > 0 {
                self.grow(f, n, &mut warming);
            }
        }
    }

    /// Runs [`Supervisor::tick`] every [`TICK`], and [`Supervisor::refill`] whenever a handoff
    /// asks for it in between, on a thread until [`Supervisor::shutdown`].
    pub fn start_scaling(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let sup = self.clone();
        std::thread::Builder::new().name("scaler".into()).spawn(move || {
            let mut next_tick = Instant::now();
            while !sup.stopping.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= next_tick {
                    sup.tick();
                    next_tick = (next_tick + TICK).max(now);
                    continue;
                }
                let wanted = {
                    let guard = sup.refill_wanted.locked();
                    let (mut guard, _) = sup
                        .refill_signal
                        .wait_timeout_while(guard, next_tick - now, |w| !*w)
                        .unwrap_or_else(|p| p.into_inner());
                    std::mem::take(&mut *guard)
                };
                if wanted {
                    sup.refill();
                }
            }
        })
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
    }

    /// Prometheus text for /metrics.
    pub fn prometheus(&self) -> String {
        let infos = self.list();
        self.metrics.render(&infos)
    }
}

/// Boots `spec`'s guest to its agent's "ready" and makes its template in `dir`/template (anything
/// there before is removed first).
fn make_template(spec: &FunctionSpec, dir: &Path) -> Result<Template, String> {
    let dir = dir.join("template");
    let _ = std::fs::remove_dir_all(&dir);
    let opts = MakeOptions { timeout: BOOT_TIMEOUT, ..Default::default() };
    Template::make(&spec.vm_config(), &dir, opts).map(|m| m.template).map_err(|e| e.to_string())
}

fn load_template(dir: &Path) -> Result<Template, String> {
    Template::open(&dir.join("template")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_commands_are_checked() {
        assert!(check_runtime("flip /init --example-runtime").is_ok());
        for (bad, why) in [
            ("flip", "expected"),
            ("", "expected"),
            ("a\"b /init", "not allowed"),
            ("a /init\n--x", "not allowed"),
            ("a\\b /init", "not allowed"),
            ("bad/name /init", "runtime name"),
        ] {
            let e = check_runtime(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_runtime(&format!("f /{}", "x".repeat(600))).unwrap_err().contains("longer"));
    }

    #[test]
    fn the_runtime_rides_on_the_kernel_command_line() {
        let spec: FunctionSpec =
            serde_json::from_str(r#"{"kernel": "/k", "initramfs": "/i", "runtime": "flip /init --example-runtime"}"#)
                .unwrap();
        let cmdline = spec.vm_config().cmdline();
        assert!(cmdline.ends_with(r#" EMBER_RUNTIME="flip /init --example-runtime""#), "{cmdline}");
        let spec: FunctionSpec = serde_json::from_str(r#"{"kernel": "/k", "initramfs": "/i"}"#).unwrap();
        assert_eq!(spec.vm_config().cmdline(), crate::config::default_cmdline());
    }
}
