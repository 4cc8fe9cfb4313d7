//! The one microVM of an `ember firecracker` process, as Firecracker's API sees it: configured
//! piece by piece before `InstanceStart` (boot source, machine, drives, network interfaces,
//! vsock), then running or paused until its guest ends it. Each request is checked against the
//! state it applies to, with Firecracker's fault messages.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::metrics::Metrics;
use super::model;
use super::model::{
    unsupported, BootSource, Drive, Fault, InstanceInfo, MachineConfig, MachineConfigBody, MetricsConfig,
    NetworkInterface, PartialDrive, PartialNetworkInterface, SnapshotCreate, SnapshotLoad, Vsock,
    FIRECRACKER_API_VERSION,
};
use crate::config::{DriveConfig, NetConfig, VmConfig};
use crate::devices::serial::ConsoleOut;
use crate::sys::Locked;
use crate::vmm::exit::VmExit;
use crate::vmm::persist::SnapshotState;
use crate::vmm::shell::VmShell;
use crate::vmm::{Channels, RunOptions, RunningVm, Vm};

/// Firecracker's words for a request made in the wrong state.
pub const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
pub const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// The guest CID of ember's vsock device (Firecracker's own examples use it too).
const GUEST_CID: u32 = 3;

/// An interface as ember's VMM takes it.
fn net_config(n: &NetworkInterface) -> NetConfig {
    NetConfig {
        iface_id: n.iface_id.clone(),
        host_dev_name: n.host_dev_name.clone(),
        guest_mac: n.guest_mac.clone(),
        guest_ip: None,
        gateway: None,
    }
}

/// The process's console, shared by every VM it tries to start (one runs).
struct SharedConsole(Arc<std::sync::Mutex<ConsoleOut>>);

impl std::io::Write for SharedConsole {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.locked().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.locked().flush()
    }
}

/// Firecracker's default machine: one vCPU, 128 MiB.
pub const DEFAULT_VCPUS: u64 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;

/// The microVM and what it was configured with.
pub struct Machine {
    id: String,
    boot_source: Option<BootSource>,
    vcpu_count: u64,
    mem_size_mib: u64,
    /// Drives in the order they were first put (a root drive goes first when booted).
    drives: Vec<(Drive, PathBuf)>,
    nets: Vec<NetworkInterface>,
    vsock: Option<Vsock>,
    running: Option<RunningVm>,
    paused: bool,
    /// Whether any pre-boot configuration was accepted (a snapshot then cannot be loaded).
    configured: bool,
    /// Where the guest's serial console goes (a boot or load that fails can be tried again).
    console: Arc<std::sync::Mutex<ConsoleOut>>,
    seccomp: bool,
    process_start: Instant,
    metrics: Arc<Metrics>,
    /// A failure the process ends on once it has answered (a snapshot load that failed).
    fatal: Option<VmExit>,
    /// The thread preparing ahead, whose VM shell a snapshot load takes (when the snapshot fits
    /// it); dropped once the microVM is booted or loaded.
    ahead: Option<std::thread::JoinHandle<Option<VmShell>>>,
}

impl Machine {
    pub fn new(id: String, console: ConsoleOut, seccomp: bool, process_start: Instant, metrics: Arc<Metrics>) -> Self {
        Self {
            id,
            boot_source: None,
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            running: None,
            paused: false,
            configured: false,
            console: Arc::new(std::sync::Mutex::new(console)),
            seccomp,
            process_start,
            metrics,
            fatal: None,
            ahead: None,
        }
    }

    /// The thread preparing ahead for the process's microVM (see the field).
    pub fn set_ahead(&mut self, ahead: std::thread::JoinHandle<Option<VmShell>>) {
        self.ahead = Some(ahead);
    }

    /// When the process started (for its start-up time).
    pub fn process_start(&self) -> Instant {
        self.process_start
    }

    /// The serial console's writer for a VM (each attempt at a boot or load gets one).
    fn console(&self) -> ConsoleOut {
        Box::new(SharedConsole(self.console.clone()))
    }

    /// Refuses a pre-boot-only request once the microVM started.
    pub fn check_not_started(&self) -> Result<(), Fault> {
        self.before_start()
    }

    fn before_start(&self) -> Result<(), Fault> {
        match self.running {
            None => Ok(()),
            Some(_) => Err(Fault::new(AFTER_START)),
        }
    }

    fn after_start(&self) -> Result<&RunningVm, Fault> {
        self.running.as_ref().ok_or_else(|| Fault::new(BEFORE_START))
    }

    /// `GET /`.
    pub fn info(&self) -> InstanceInfo {
        let state = match (&self.running, self.paused) {
            (None, _) => "Not started",
            (Some(_), false) => "Running",
            (Some(_), true) => "Paused",
        };
        InstanceInfo {
            app_name: "ember",
            id: self.id.clone(),
            state,
            vmm_version: format!("{} (ember {})", FIRECRACKER_API_VERSION, env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn put_boot_source(&mut self, b: BootSource) -> Result<(), Fault> {
        self.before_start()?;
        b.check()?;
        self.configured = true;
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT` (every required field) or `PATCH` (any) `/machine-config`.
    pub fn set_machine_config(&mut self, m: MachineConfigBody, patch: bool) -> Result<(), Fault> {
        self.before_start()?;
        m.check()?;
        if patch && m == MachineConfigBody::default() {
            return Err(Fault::new("Empty PATCH request."));
        }
        if !patch && (m.vcpu_count.is_none() || m.mem_size_mib.is_none()) {
            return Err(Fault::new("vcpu_count and mem_size_mib are required"));
        }
        let vcpus = m.vcpu_count.unwrap_or(self.vcpu_count);
        if !(1..=u64::from(crate::memory::MAX_VCPUS)).contains(&vcpus) {
            return Err(Fault::new(format!("The vCPU number is invalid: {vcpus} (1 to {})", crate::memory::MAX_VCPUS)));
        }
        let mem = m.mem_size_mib.unwrap_or(self.mem_size_mib);
        if mem < crate::memory::MIN_MEM_MIB {
            return Err(Fault::new(format!("The memory size (MiB) is invalid: {mem}")));
        }
        (self.vcpu_count, self.mem_size_mib) = (vcpus, mem);
        self.configured = true;
        Ok(())
    }

    /// `GET /machine-config`.
    pub fn machine_config(&self) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            smt: false,
            track_dirty_pages: false,
            huge_pages: "None",
        }
    }

    /// `PUT /drives/{id}`: a new drive, or one that replaces the drive of that id.
    pub fn put_drive(&mut self, id: &str, d: Drive) -> Result<(), Fault> {
        self.before_start()?;
        if d.drive_id != id {
            return Err(Fault::new("The id from the path does not match the id from the body!"));
        }
        model::checked_id(id)?;
        let path = d.check()?;
        let mode = std::fs::OpenOptions::new().read(true).write(d.is_read_only != Some(true)).open(&path);
        mode.map_err(|e| Fault::new(format!("Unable to create the block device: {}: {e}", path.display())))?;
        if d.is_root_device && self.drives.iter().any(|(o, _)| o.is_root_device && o.drive_id != id) {
            return Err(Fault::new("A root block device already exists!"));
        }
        match self.drives.iter_mut().find(|(o, _)| o.drive_id == id) {
            Some(slot) => *slot = (d, path),
            None => self.drives.push((d, path)),
        }
        self.configured = true;
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_net(&mut self, id: &str, n: NetworkInterface) -> Result<(), Fault> {
        self.before_start()?;
        if n.iface_id != id {
            return Err(Fault::new("The id from the path does not match the id from the body!"));
        }
        model::checked_id(id)?;
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(unsupported("a network interface's rate limiters"));
        }
        if n.mtu.is_some() {
            return Err(unsupported("a network interface's mtu"));
        }
        if self.nets.iter().any(|o| o.iface_id != id) {
            return Err(unsupported("a second network interface"));
        }
        net_config(&n).check().map_err(|e| Fault::new(format!("Could not create the network device: {e}")))?;
        // The TAP must be there and usable now, as Firecracker opens it here.
        crate::devices::virtio::net::Tap::open(&n.host_dev_name)
            .map_err(|e| Fault::new(format!("Could not create the network device: TAP {:?}: {e}", n.host_dev_name)))?;
        self.nets.retain(|o| o.iface_id != id);
        self.nets.push(n);
        self.configured = true;
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&mut self, v: Vsock) -> Result<(), Fault> {
        self.before_start()?;
        if v.guest_cid != GUEST_CID {
            return Err(unsupported(&format!("guest_cid {} (ember's vsock device is CID {GUEST_CID})", v.guest_cid)));
        }
        // Firecracker binds the socket here: it must not exist, and its directory must.
        let dir = v.uds_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if v.uds_path.symlink_metadata().is_ok() || !dir.is_dir() {
            return Err(Fault::new(format!(
                "Cannot create backend for vsock device: cannot bind {} (it exists, or its directory does not)",
                v.uds_path.display()
            )));
        }
        self.vsock = Some(v);
        self.configured = true;
        Ok(())
    }

    /// `PATCH /drives/{id}` (after InstanceStart): serves the drive from `path_on_host` from now
    /// on; the guest is told its capacity may have changed (what it cached is its own to drop).
    pub fn patch_drive(&mut self, id: &str, d: PartialDrive) -> Result<(), Fault> {
        let running = self.running.as_ref().ok_or_else(|| Fault::new(BEFORE_START))?;
        if d.drive_id != id {
            return Err(Fault::new("The id from the path does not match the id from the body!"));
        }
        if d.rate_limiter.is_some() {
            return Err(unsupported("a drive's rate_limiter"));
        }
        let Some((body, path)) = self.drives.iter_mut().find(|(o, _)| o.drive_id == id) else {
            return Err(Fault::new(format!("Unable to patch the block device: no drive {id:?}")));
        };
        let Some(new) = d.path_on_host else {
            return Err(Fault::new("Unable to patch the block device: nothing to change (path_on_host)"));
        };
        running.replace_drive(id, &new).map_err(|e| Fault::new(format!("Unable to patch the block device: {e}")))?;
        tracing::info!(id = %self.id, drive = %id, path = %new.display(), "drive replaced");
        (body.path_on_host, *path) = (Some(new.clone()), new);
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` (after InstanceStart): only rate limiters change there,
    /// which ember does not have; a body without one changes nothing.
    pub fn patch_net(&mut self, id: &str, n: PartialNetworkInterface) -> Result<(), Fault> {
        self.after_start()?;
        if n.iface_id != id {
            return Err(Fault::new("The id from the path does not match the id from the body!"));
        }
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(unsupported("a network interface's rate limiters"));
        }
        if !self.nets.iter().any(|o| o.iface_id == id) {
            return Err(Fault::new(format!("Unable to update the net device: no network interface {id:?}")));
        }
        Ok(())
    }

    /// `SendCtrlAltDel` (after InstanceStart): Ctrl+Alt+Del on the guest's keyboard; a Linux guest
    /// with the i8042 keyboard driver reboots, and the process ends with it.
    pub fn send_ctrl_alt_del(&self) -> Result<(), Fault> {
        let running = self.after_start()?;
        running.send_ctrl_alt_del().map_err(|e| Fault::new(format!("Failed to send CTRL+ALT+DEL: {e}")))?;
        tracing::info!(id = %self.id, "Ctrl+Alt+Del sent");
        Ok(())
    }

    /// `PUT /metrics` (before InstanceStart, once).
    pub fn configure_metrics(&mut self, c: MetricsConfig) -> Result<(), Fault> {
        self.before_start()?;
        self.metrics.configure(&c)
    }

    /// `FlushMetrics` (after InstanceStart): one line now.
    pub fn flush_metrics(&self) -> Result<(), Fault> {
        self.after_start()?;
        self.write_metrics().map(|_| ())
    }

    /// One metrics line (the VM's counters once it runs), if metrics are configured.
    pub fn write_metrics(&self) -> Result<bool, Fault> {
        self.metrics.flush(&self.id, self.running.as_ref().map(RunningVm::take_counters))
    }

    /// The VM as ember describes it (Firecracker's config-file shape, which ember reads).
    fn vm_config(&self) -> Result<VmConfig, Fault> {
        let Some(b) = &self.boot_source else {
            return Err(Fault::new("Cannot start microvm without kernel configuration."));
        };
        let mut drives: Vec<DriveConfig> = self
            .drives
            .iter()
            .map(|(d, path)| DriveConfig {
                drive_id: d.drive_id.clone(),
                path_on_host: path.clone(),
                is_root_device: d.is_root_device,
                is_read_only: d.is_read_only.unwrap_or(false),
            })
            .collect();
        // The root drive is /dev/vda, as in Firecracker.
        drives.sort_by_key(|d| !d.is_root_device);
        let network_interfaces = self.nets.iter().map(net_config).collect();
        let cfg = VmConfig {
            boot_source: crate::config::BootSource {
                kernel_image_path: b.kernel_image_path.clone(),
                initrd_path: b.initrd_path.clone(),
                boot_args: b.boot_args.clone(),
            },
            machine_config: crate::config::MachineConfig {
                vcpu_count: self.vcpu_count,
                mem_size_mib: self.mem_size_mib,
            },
            drives,
            network_interfaces,
        };
        cfg.validate().map_err(|e| Fault::new(e.to_string()))?;
        Ok(cfg)
    }

    /// `GET /vm/config`: the whole configuration, as a config file would give it.
    pub fn full_config(&self) -> serde_json::Value {
        serde_json::json!({
            "boot-source": self.boot_source,
            "machine-config": self.machine_config(),
            "drives": self.drives.iter().map(|(d, _)| d).collect::<Vec<_>>(),
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "balloon": null,
            "logger": null,
            "metrics": null,
            "mmds-config": null,
            "entropy": null,
        })
    }

    /// `InstanceStart`: boots the guest.
    pub fn start(&mut self) -> Result<(), Fault> {
        self.before_start()?;
        let cfg = self.vm_config()?;
        // With a vsock device, ember's guest agent (in an image that has it) serves invocations
        // over it instead of ending the guest once it is ready.
        let channels = Channels {
            vsock: self.vsock.as_ref().map(|v| v.uds_path.clone()),
            serve: self.vsock.is_some(),
            device_seccomp: self.seccomp,
            ..Default::default()
        };
        let vm = Vm::boot(&cfg, &channels, self.console(), self.process_start)
            .map_err(|e| Fault::new(format!("Failed to start microVM: {e}")))?;
        let options = RunOptions { seccomp: self.seccomp, ..Default::default() };
        let running = vm.start(options).map_err(|e| Fault::new(format!("Failed to start microVM: {e}")))?;
        tracing::info!(id = %self.id, "microVM started");
        self.running = Some(running);
        // (The shell made ahead is for loads: dropped, or by its thread when it ends.)
        self.ahead = None;
        Ok(())
    }

    /// `PATCH /vm`: `Paused` or `Resumed`.
    pub fn set_state(&mut self, state: &str) -> Result<(), Fault> {
        let t = Instant::now();
        let running = self.after_start()?;
        let what = match state {
            "Paused" => {
                running.pause().map_err(|e| Fault::new(format!("Failed to pause the microVM: {e}")))?;
                self.paused = true;
                ("pause_vm", "vmm_pause_vm")
            }
            "Resumed" => {
                running.resume();
                self.paused = false;
                ("resume_vm", "vmm_resume_vm")
            }
            other => return Err(Fault::new(format!("unknown variant `{other}`, expected `Paused` or `Resumed`"))),
        };
        self.latencies(what, t, t);
        Ok(())
    }

    /// `PUT /snapshot/create`: a Full snapshot of the paused microVM, its state to
    /// `snapshot_path` (ember's own format) and its memory to `mem_file_path`.
    pub fn create_snapshot(&self, c: SnapshotCreate) -> Result<(), Fault> {
        let t = Instant::now();
        let running = self.after_start()?;
        if c.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
            return Err(unsupported("a Diff snapshot"));
        }
        if !self.paused {
            return Err(Fault::new("Cannot create a snapshot of a running microVM: pause it first (PATCH /vm)"));
        }
        let vmm = Instant::now();
        let mut state = running.state().map_err(|e| Fault::new(format!("Cannot save the microVM's state: {e}")))?;
        state.devices.vsock_path = self.vsock.as_ref().map(|v| v.uds_path.clone());
        running
            .write_snapshot(&state, &c.snapshot_path, &c.mem_file_path)
            .map_err(|e| Fault::new(format!("Cannot write the snapshot: {e}")))?;
        self.latencies(("full_create_snapshot", "vmm_full_create_snapshot"), t, vmm);
        tracing::info!(id = %self.id, state = %c.snapshot_path.display(), "snapshot created");
        Ok(())
    }

    /// `PUT /snapshot/load`: the microVM restored from a snapshot ember made (state and memory
    /// files), its network interfaces on `network_overrides`' TAPs, its vsock on
    /// `vsock_override`'s path (else the one it had); paused unless `resume_vm`.
    pub fn load_snapshot(&mut self, l: SnapshotLoad) -> Result<(), Fault> {
        let t = Instant::now();
        self.before_start()?;
        if self.configured {
            return Err(Fault::new(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let mem_path = l.memory()?.to_path_buf();
        // From here on a failure ends the process once it has answered, as in Firecracker (a
        // restore that failed may leave it in a state it cannot go on from).
        self.restore_snapshot(l, &mem_path, t).inspect_err(|f| {
            self.fatal = Some(VmExit::Stopped(format!("the snapshot load failed: {}", f.0)));
        })
    }

    /// The part of a load after its checks: the state and memory read, the microVM restored and
    /// started.
    fn restore_snapshot(&mut self, l: SnapshotLoad, mem_path: &std::path::Path, t: Instant) -> Result<(), Fault> {
        let bytes = crate::snapshot::read_limited(&l.snapshot_path, crate::snapshot::MAX_STATE_LEN + 4096)
            .map_err(|e| Fault::new(format!("Cannot read the snapshot: {e}")))?;
        let mut state = SnapshotState::decode(&bytes, &l.snapshot_path).map_err(|e| {
            Fault::new(format!(
                "{} is not a snapshot ember can load ({e}); ember loads the snapshots it made, not Firecracker's",
                l.snapshot_path.display()
            ))
        })?;
        for o in &l.network_overrides {
            let n = state.devices.nets.iter_mut().find(|n| n.iface_id == o.iface_id);
            let n = n.ok_or_else(|| Fault::new(format!("Invalid network override: no interface {:?}", o.iface_id)))?;
            n.host_dev_name = o.host_dev_name.clone();
        }
        let vmm = Instant::now();
        let memory = crate::snapshot::MemoryFile::open(mem_path, state.machine.mem_bytes)
            .map_err(|e| Fault::new(format!("Cannot load the guest memory: {e}")))?;
        let vsock = l.vsock_override.as_ref().map(|v| v.uds_path.clone()).or(state.devices.vsock_path.clone());
        let channels = Channels {
            vsock: vsock.clone(),
            serve: vsock.is_some(),
            device_seccomp: self.seccomp,
            ..Default::default()
        };
        // Into the shell made ahead (waiting for it when it is still being made), when it fits.
        let shell = self.ahead.take().and_then(|t| t.join().ok().flatten());
        let into_shell = shell.as_ref().is_some_and(|s| s.fits(&state));
        let vm = Vm::restore_in(shell, &state, &memory, 1, &channels, self.console())
            .map_err(|e| Fault::new(format!("Cannot restore the microVM: {e}")))?;
        let paused = l.resume_vm != Some(true);
        let options = RunOptions { seccomp: self.seccomp, start_paused: paused, ..Default::default() };
        let running = vm.start(options).map_err(|e| Fault::new(format!("Cannot start the restored microVM: {e}")))?;
        // What GET /machine-config and /vm/config show from now on.
        (self.vcpu_count, self.mem_size_mib) = (u64::from(state.machine.vcpus), state.machine.mem_bytes >> 20);
        self.drives = state
            .devices
            .drives
            .iter()
            .map(|d| {
                let body = Drive {
                    drive_id: d.drive_id.clone(),
                    path_on_host: Some(d.path_on_host.clone()),
                    is_root_device: d.is_root_device,
                    is_read_only: Some(d.is_read_only),
                    partuuid: None,
                    cache_type: None,
                    rate_limiter: None,
                    io_engine: None,
                    socket: None,
                };
                (body, d.path_on_host.clone())
            })
            .collect();
        self.nets = state
            .devices
            .nets
            .iter()
            .map(|n| NetworkInterface {
                iface_id: n.iface_id.clone(),
                host_dev_name: n.host_dev_name.clone(),
                guest_mac: n.guest_mac.clone(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                mtu: None,
            })
            .collect();
        self.vsock = vsock.map(|uds_path| Vsock { guest_cid: GUEST_CID, uds_path, vsock_id: None });
        self.running = Some(running);
        self.paused = paused;
        self.latencies(("load_snapshot", "vmm_load_snapshot"), t, vmm);
        tracing::info!(id = %self.id, paused, into_shell, "snapshot loaded");
        Ok(())
    }

    /// Records an operation's latencies: the whole request's from `whole`, the VMM's from `vmm`.
    fn latencies(&self, (name, vmm_name): (&'static str, &'static str), whole: Instant, vmm: Instant) {
        self.metrics.latency(vmm_name, vmm.elapsed());
        self.metrics.latency(name, whole.elapsed());
    }

    /// How the guest ended, once it has.
    pub fn ended(&self) -> Option<VmExit> {
        self.fatal.clone().or_else(|| self.running.as_ref().and_then(|r| r.exit()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine::new("t".into(), Box::new(std::io::sink()), false, Instant::now(), Default::default())
    }

    fn drive(id: &str, root: bool) -> Drive {
        let path = std::env::temp_dir().join(format!("ember-fc-unit-{}.img", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        serde_json::from_value(serde_json::json!({"drive_id": id, "path_on_host": path, "is_root_device": root}))
            .unwrap()
    }

    #[test]
    fn pre_boot_requests_are_checked_as_firecracker_checks_them() {
        let mut m = machine();
        let missing: BootSource =
            serde_json::from_value(serde_json::json!({"kernel_image_path": "/no/vmlinux"})).unwrap();
        assert!(m.put_boot_source(missing).unwrap_err().0.contains("The kernel file cannot be opened"));
        let mut gone = drive("gone", false);
        gone.path_on_host = Some("/no/such.img".into());
        assert!(m.put_drive("gone", gone).unwrap_err().0.contains("Unable to create the block device"));
        assert!(m.put_drive("a-b", drive("a-b", false)).unwrap_err().0.contains("alphanumeric"));
        assert_eq!(m.set_machine_config(MachineConfigBody::default(), true).unwrap_err().0, "Empty PATCH request.");
        assert_eq!(m.info().state, "Not started");
        assert_eq!(m.set_state("Paused").unwrap_err().0, BEFORE_START);
        assert!(m.start().unwrap_err().0.contains("without kernel configuration"));
        m.put_drive("root", drive("root", true)).unwrap();
        assert!(m.put_drive("other", drive("other", true)).unwrap_err().0.contains("root block device already"));
        m.put_drive("root", drive("root", false)).unwrap();
        m.put_drive("other", drive("other", true)).unwrap();
        assert_eq!(m.drives.len(), 2, "a drive put again replaces itself");
        assert!(m.put_drive("x", drive("y", false)).unwrap_err().0.contains("does not match"));
        let patch = MachineConfigBody { mem_size_mib: Some(512), ..Default::default() };
        m.set_machine_config(patch.clone(), true).unwrap();
        assert_eq!((m.machine_config().vcpu_count, m.machine_config().mem_size_mib), (1, 512));
        assert!(m.set_machine_config(patch, false).unwrap_err().0.contains("required"));
        let many = MachineConfigBody { vcpu_count: Some(64), mem_size_mib: Some(128), ..Default::default() };
        assert!(m.set_machine_config(many, false).unwrap_err().0.contains("vCPU number"));
        let mtu: NetworkInterface =
            serde_json::from_value(serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 9000}))
                .unwrap();
        assert!(m.put_net("eth0", mtu).unwrap_err().0.contains("mtu is not supported by ember"));
        let v: Vsock = serde_json::from_value(serde_json::json!({"guest_cid": 52, "uds_path": "/v"})).unwrap();
        assert!(m.put_vsock(v).unwrap_err().0.contains("CID 3"));
        let v: Vsock =
            serde_json::from_value(serde_json::json!({"guest_cid": 3, "uds_path": "/no/dir/v.sock"})).unwrap();
        assert!(m.put_vsock(v).unwrap_err().0.contains("Cannot create backend for vsock device"));
        // Configured: a snapshot no longer loads into it.
        let load: SnapshotLoad =
            serde_json::from_value(serde_json::json!({"snapshot_path": "/s", "mem_file_path": "/m"})).unwrap();
        assert!(m.load_snapshot(load).unwrap_err().0.contains("not allowed after configuring"));
    }

    #[test]
    fn a_load_names_what_it_cannot_do_and_needs_one_memory_file() {
        let l = |v: serde_json::Value| serde_json::from_value::<SnapshotLoad>(v).unwrap();
        let uffd = l(
            serde_json::json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}),
        );
        assert!(uffd.memory().unwrap_err().0.contains("Uffd"));
        let both = l(serde_json::json!({"snapshot_path": "/s", "mem_file_path": "/m",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"}}));
        assert!(both.memory().unwrap_err().0.contains("Exactly one"));
        let neither = l(serde_json::json!({"snapshot_path": "/s"}));
        assert!(neither.memory().is_err());
        let dirty = l(serde_json::json!({"snapshot_path": "/s", "mem_file_path": "/m", "track_dirty_pages": true}));
        assert!(dirty.memory().unwrap_err().0.contains("Diff"));
        let mut m = machine();
        let missing = l(serde_json::json!({"snapshot_path": "/nonexistent/s", "mem_file_path": "/m"}));
        assert!(m.load_snapshot(missing).unwrap_err().0.contains("Cannot read the snapshot"));
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("firecracker.snap");
        std::fs::write(&foreign, b"not ember's").unwrap();
        let load = l(serde_json::json!({"snapshot_path": foreign, "mem_file_path": "/m"}));
        assert!(m.load_snapshot(load).unwrap_err().0.contains("not a snapshot ember can load"));
    }
}
