//! What the API speaks about: a function's registration and its checks, why a request was
//! refused, where a function is in its life, what `GET /functions` and `acquire` answer. No
//! behaviour beyond validation: the supervisor acts on these.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::error::{Error, ErrorKind};
use crate::config::{BootSource, MachineConfig, VmConfig};
use crate::scale::scaler::PoolPolicy;

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
    /// With one of ember's runtimes (`runtime: "python3"` or `"exec"`): its entry point
    /// (`module.function` for python3, the executable's path for exec). Otherwise the function the
    /// agent runs for `invoke` when the request names none: a built-in or the image's runtime
    /// (named in the image's /etc/ember/runtime).
    #[serde(default = "default_handler")]
    pub handler: String,
    /// The function's runtime inside the guest: one of ember's runtimes by name (`python3`,
    /// `exec`: runtime protocol 2, the code layer at /var/task), or a custom runtime process,
    /// `NAME COMMAND [ARGS...]` (the format of an image's /etc/ember/runtime, which it replaces;
    /// protocol 1). Started by the agent before the template is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Shared layers (`PUT /layers/{name}`), bottom to top: the function's root is these stacked
    /// with overlayfs under a private writable layer in guest RAM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// The function's own code: a directory, tar archive or OCI image beneath an image directory,
    /// built into a layer on top of `layers` when the function is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<PathBuf>,
    #[serde(default)]
    pub pool: PoolPolicy,
    /// Caps on the function's worker process (its cgroup): all its clones together.
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    /// What the function's clones may reach over a network card of their own (see
    /// isolation/network); absent: no network card at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::isolation::network::NetworkPolicy>,
    /// How long the guest may take to signal ready when its template is made (seconds, 1 to
    /// [`MAX_BOOT_TIMEOUT_S`], which is also the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout_s: Option<f64>,
}

/// The longest a registration's boot may take.
pub const MAX_BOOT_TIMEOUT_S: f64 = 600.0;

/// Caps on a function's worker (`limits` in a registration); each absent one has a default worked
/// out from the pool (see [`Limits::resolve`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory of the worker: the guest pages its clones have written and its own (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// CPU time, in CPUs (e.g. 0.5); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Threads of the worker (each clone has one per vCPU and one per device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Limits {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.memory_mib {
            if !(32..=1 << 20).contains(&m) {
                return Err(format!("limits.memory_mib: {m}, expected 32 to {}", 1 << 20));
            }
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && (0.01..=1024.0).contains(&c)) {
                return Err(format!("limits.cpus: {c}, expected 0.01 to 1024"));
            }
        }
        if let Some(p) = self.pids {
            if !(16..=1 << 20).contains(&p) {
                return Err(format!("limits.pids: {p}, expected 16 to {}", 1 << 20));
            }
        }
        Ok(())
    }

    /// The caps of a worker holding up to `max_clones` clones of `vcpus` vCPUs and `mem_mib` MiB:
    /// what was asked, else room for every clone to write all its memory, and its threads.
    pub fn resolve(&self, max_clones: u32, vcpus: u8, mem_mib: u64) -> crate::isolation::worker::cgroup::CgroupLimits {
        let clones = u64::from(max_clones.max(1));
        crate::isolation::worker::cgroup::CgroupLimits {
            memory_bytes: self.memory_mib.unwrap_or(clones * (mem_mib + 16) + 128) << 20,
            pids: self.pids.unwrap_or(clones * (u64::from(vcpus) + 4) + 64),
            cpus: self.cpus,
        }
    }
}

/// Layers per function, at most (each is a drive; `code` is one more).
pub const MAX_LAYERS: usize = 16;
/// The drive id of a function's code layer; shared layers are `l0`, `l1`, ... bottom to top.
pub const CODE_DRIVE: &str = "code";

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

impl FunctionSpec {
    /// Checks what can be checked without booting: names, files, sizes, the pool policy.
    /// Checks everything but the image files (the supervisor opens those beneath its image
    /// directories): also what a saved registration must still satisfy when the daemon loads it
    /// again.
    pub fn validate(&self) -> Result<(), Error> {
        let machine = MachineConfig { vcpu_count: self.vcpus.into(), mem_size_mib: self.mem_mib };
        self.vm_config_with(machine).validate().map_err(|e| Error::bad_request(e.to_string()))?;
        match (self.known_runtime(), &self.runtime) {
            (Some(known), _) => ember_abi::runtime::check_handler(known, &self.handler).map_err(Error::bad_request)?,
            (None, r) => {
                ember_abi::check_function(self.handler.as_bytes())
                    .map_err(|e| Error::bad_request(format!("handler: {e}")))?;
                if let Some(r) = r {
                    check_runtime(r).map_err(Error::bad_request)?;
                }
            }
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(Error::bad_request(format!("{} layers, at most {MAX_LAYERS}", self.layers.len())));
        }
        for (i, l) in self.layers.iter().enumerate() {
            check_name(l).map_err(|_| Error::bad_request(format!("bad layer name {l:?}")))?;
            if self.layers[..i].contains(l) {
                return Err(Error::bad_request(format!("layer {l:?} is named twice")));
            }
        }
        if self.code.as_ref().is_some_and(|c| c.as_os_str().is_empty()) {
            return Err(Error::bad_request("code: an empty path"));
        }
        self.limits.validate().map_err(Error::bad_request)?;
        if let Some(t) = self.boot_timeout_s.filter(|t| !(1.0..=MAX_BOOT_TIMEOUT_S).contains(t)) {
            return Err(Error::bad_request(format!("boot_timeout_s {t} is not in [1, {MAX_BOOT_TIMEOUT_S}]")));
        }
        if let Some(n) = &self.network {
            n.validate().map_err(Error::bad_request)?;
        }
        self.pool.validate().map_err(Error::bad_request)
    }

    /// How long the template's boot may take.
    pub fn boot_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.boot_timeout_s.unwrap_or(MAX_BOOT_TIMEOUT_S))
    }

    /// The name of ember's runtime the registration selects (`runtime: "python3"`), if it does.
    pub fn known_runtime(&self) -> Option<&str> {
        self.runtime.as_deref().map(str::trim).filter(|r| ember_abi::runtime::is_known(r))
    }

    /// The function `invoke` runs when the request names none: ember's runtime by its name, else
    /// the handler.
    pub fn default_function(&self) -> &str {
        self.known_runtime().unwrap_or(&self.handler)
    }

    /// Where the code layer's tree is placed in the function's root: /var/task for ember's
    /// runtimes, the root itself for custom ones.
    pub fn code_prefix(&self) -> &'static str {
        if self.known_runtime().is_some() {
            "var/task"
        } else {
            ""
        }
    }

    /// The VM that boots this function with `drives` (its layers, bottom to top, the code layer
    /// last, as [`FunctionSpec::drive_ids`] names them).
    pub(super) fn vm_config_with_drives(&self, drives: Vec<crate::config::DriveConfig>) -> VmConfig {
        self.vm_config().with_layers(drives)
    }

    /// The drive ids of the function's layers, bottom to top (the code layer last).
    pub fn drive_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = (0..self.layers.len()).map(|i| format!("l{i}")).collect();
        if self.code.is_some() {
            ids.push(CODE_DRIVE.to_string());
        }
        ids
    }

    fn vm_config_with(&self, machine_config: MachineConfig) -> VmConfig {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: self.kernel.clone(),
                initrd_path: Some(self.initramfs.clone()),
                // The kernel hands `NAME=value` words it does not know to init as environment.
                boot_args: self.runtime.as_ref().map(|r| {
                    let mut args = format!("{} EMBER_RUNTIME=\"{}\"", crate::config::default_cmdline(), r.trim());
                    if self.known_runtime().is_some() {
                        args.push_str(&format!(" EMBER_HANDLER=\"{}\"", self.handler));
                    }
                    args
                }),
            },
            machine_config,
            drives: Vec::new(),
            // Every clone keeps the template's card; its namespace gives it a network of its own.
            network_interfaces: self.network.iter().map(|_| crate::isolation::network::guest_interface()).collect(),
        }
    }

    pub(super) fn vm_config(&self) -> VmConfig {
        self.vm_config_with(MachineConfig { vcpu_count: self.vcpus.into(), mem_size_mib: self.mem_mib })
    }
}

/// Checks a function's or a layer's name: 1 to 64 characters of `[a-z0-9_-]` (it names a
/// directory or a file).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!("bad name {name:?}: use 1 to 64 characters of [a-z0-9_-]")))
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

/// What `GET /functions/{name}` shows.
#[derive(Debug, Serialize)]
pub struct FunctionInfo {
    pub name: String,
    #[serde(flatten)]
    pub state: FunctionState,
    pub spec: FunctionSpec,
    /// The version serving: a digest of the code, the layers, the runtime and the settings the
    /// template was made with (absent until the first template is made).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A new registration of the function being made (or that failed) while this one serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateInfo>,
    pub ready: u32,
    /// Restored, agent still starting.
    pub warming: u32,
    pub busy: u32,
    pub restoring: u32,
    pub target_ready: u32,
    /// Arrivals the autoscaler expects now, per second.
    pub predicted_arrivals_per_s: f64,
    /// Most clones at once: `pool.max`, or what the host's memory holds.
    pub max_clones: u32,
    pub handoffs: u64,
    pub cold_starts: u64,
    pub invocations: u64,
    pub invocation_errors: u64,
    pub replaced_clones: u64,
    /// Released clones that went back to the pool (`pool.max_uses` > 1).
    pub recycled_clones: u64,
    /// Handed-out clones destroyed because their lease ran out (`pool.lease_s`).
    pub expired_leases: u64,
    /// Restore to agent serving, as the scaler assumes it now (seconds).
    pub refill_s: f64,
    /// Clones restored (for the pool and for cold starts).
    pub restores: u64,
    /// The CPU one restore costs, restore to agent serving, as measured in the function's worker
    /// (seconds; the scaler prices restores with it).
    pub restore_cpu_s: f64,
    /// The CPU all its restores cost, as estimated when each was made (seconds).
    pub restore_cpu_seconds: f64,
    /// The process its clones run in (absent when the daemon runs them itself, or before the
    /// first clone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerInfo>,
    /// With a network: its pool of prepared namespaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::isolation::network::NetInfo>,
}

/// A function's worker process, as `GET /functions/{name}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerInfo {
    /// Its pid (in the daemon's pid namespace); absent while none runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The uid it runs as.
    pub uid: u32,
    /// Whether it is jailed (namespaces, its own root, no capabilities); false when the daemon
    /// has no root to jail it with.
    pub jailed: bool,
    /// Its memory cgroup, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Scheduler periods in which its CPU cap (`limits.cpus`) throttled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttled_periods: Option<u64>,
    /// CPU time it used so far, in microseconds (its cgroup's count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_used_us: Option<u64>,
    /// Workers of the function that ended without being asked to, and were replaced.
    pub restarts: u64,
    /// How the last of those ended (e.g. "killed by SIGKILL (memory limit reached: 1 OOM kill)").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// While the function waits to restart its worker (its last ones died before serving): in how
    /// many seconds it will. Its clones' requests are answered 503 with Retry-After meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarting_in_s: Option<f64>,
}

/// A new version of a function on its way (`PUT /functions/{name}` of a registered name).
#[derive(Clone, Debug, Serialize)]
pub struct UpdateInfo {
    #[serde(flatten)]
    pub state: FunctionState,
    pub spec: FunctionSpec,
}

/// What `acquire` hands over.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub id: u64,
    pub function: String,
    pub mailbox: PathBuf,
    pub vsock: PathBuf,
    /// Restored on the spot because the pool was empty.
    pub cold_start: bool,
    /// The handoff's lease token: `release` must present it.
    pub lease: String,
    /// With a network: the address the clone's traffic has on the host's side (its own
    /// namespace's; a function's `egress_ip` or private address replaces it further on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_and_mutated_registrations_are_refused_without_a_panic() {
        let good = br#"{"kernel": "vmlinux", "initramfs": "i.cpio", "vcpus": 1, "mem_mib": 128, "handler": "echo",
            "runtime": "flip /init --x", "pool": {"min_ready": 1, "max": 8, "headroom": 1.5, "lease_s": 60, "max_uses": 2, "cold_start_cost_s": 600}}"#;
        let mut rng = crate::sys::TestRng::new(13);
        for _ in 0..20_000 {
            let input = rng.mutate(good);
            if let Ok(spec) = serde_json::from_slice::<FunctionSpec>(&input) {
                if spec.validate().is_ok() {
                    let max = spec.pool.max.unwrap_or(crate::scale::scaler::MAX_POOL);
                    assert!(max >= spec.pool.min_ready && max <= crate::scale::scaler::MAX_POOL);
                    assert!(spec.pool.cold_start_cost_s.is_finite() && spec.pool.cold_start_cost_s >= 1.0);
                    assert!(spec.pool.headroom.is_finite() && spec.pool.lease_s > 0.0);
                }
            }
        }
    }

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
    fn known_runtimes_take_an_entry_point_and_their_code_goes_to_var_task() {
        let spec: FunctionSpec = serde_json::from_str(
            r#"{"kernel": "/k", "initramfs": "/i", "runtime": "python3", "handler": "app.handler"}"#,
        )
        .unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.default_function(), "python3");
        assert_eq!(spec.boot_timeout(), std::time::Duration::from_secs(600));
        for (t, ok) in [(0.5, false), (1.0, true), (600.0, true), (601.0, false), (f64::NAN, false)] {
            let s = FunctionSpec { boot_timeout_s: Some(t), ..spec.clone() };
            assert_eq!(s.validate().is_ok(), ok, "boot_timeout_s {t}");
        }
        assert_eq!(spec.code_prefix(), "var/task");
        let cmdline = spec.vm_config().cmdline();
        assert!(cmdline.ends_with(r#" EMBER_RUNTIME="python3" EMBER_HANDLER="app.handler""#), "{cmdline}");
        for bad in ["handler", "app.handler()", "a b.c", "app.\"x"] {
            let s = FunctionSpec { handler: bad.into(), ..spec.clone() };
            assert!(s.validate().as_ref().err().map(|e| e.kind()) == Some(ErrorKind::BadRequest), "{bad:?}");
        }
        let exec = FunctionSpec { runtime: Some("exec".into()), handler: "bin/fn".into(), ..spec.clone() };
        exec.validate().unwrap();
        let custom = FunctionSpec { runtime: Some("flip /init --x".into()), handler: "flip".into(), ..spec };
        custom.validate().unwrap();
        assert_eq!((custom.default_function(), custom.code_prefix()), ("flip", ""));
    }

    #[test]
    fn worker_limits_are_checked_and_default_from_the_pool() {
        let with = |limits: &str| -> Result<FunctionSpec, String> {
            let spec: FunctionSpec =
                serde_json::from_str(&format!(r#"{{"kernel": "/k", "initramfs": "/i", "limits": {limits}}}"#))
                    .map_err(|e| e.to_string())?;
            spec.validate().map_err(|e| e.to_string())?;
            Ok(spec)
        };
        for bad in [r#"{"memory_mib": 1}"#, r#"{"cpus": 0}"#, r#"{"cpus": 2000}"#, r#"{"pids": 2}"#, r#"{"swap": 1}"#] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let l = with(r#"{"memory_mib": 64, "cpus": 0.5}"#).unwrap().limits.resolve(4, 2, 128);
        assert_eq!((l.memory_bytes, l.cpus, l.pids), (64 << 20, Some(0.5), 4 * 6 + 64));
        let d = with("{}").unwrap();
        assert_eq!(d.limits, Limits::default());
        assert!(!serde_json::to_string(&d).unwrap().contains("limits"));
        assert_eq!(d.limits.resolve(2, 1, 128).memory_bytes, (2 * (128 + 16) + 128) << 20);
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
