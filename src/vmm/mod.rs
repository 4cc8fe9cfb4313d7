//! One VM: assembled from a [`VmConfig`] (boot) or from a snapshot (restore), run on one thread per
//! vCPU, paused and saved, ended by the guest or by ember.
//!
//! - [`devices`]: every device of a VM, assembled in one place.
//! - [`control`]: the pause/stop state machine the vCPU threads and the controlling thread share.
//! - [`vcpu`]: the KVM_RUN loop; [`vcpu_state`], [`vm_state`] and [`persist`]: the state a
//!   snapshot keeps.
//! - [`boot`]: loading the kernel and the state the vCPUs start in; [`exit`]: why a VM ended.

pub mod boot;
pub mod control;
pub mod devices;
pub mod exit;
pub mod persist;
pub mod shell;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm_state;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use crate::sys::Locked;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::channel::mailbox::{CallOptions, InvokeError, Mailbox, MailboxError, Response};
use crate::config::{ConfigError, VmConfig};
use crate::devices::boot_timer::{BootClock, BootTimeline};
use crate::devices::console_input::ConsoleInputLoop;
use crate::devices::serial::ConsoleOut;
use crate::devices::DeviceError;
use crate::memory::{self, GuestMemory};
use crate::seccomp;
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::{MemoryFile, SnapshotError};
use boot::BootError;
use control::VmControl;
use devices::{DeviceArgs, Devices};
use exit::VmExit;
use persist::{MachineInfo, SnapshotState};
use shell::{ShellSpec, VmShell};
use vcpu::{ParkedThread, Vcpu, VcpuContext};
use vm_state::VmState;

/// Where [`Vm::with_payload`] loads its code.
pub const PAYLOAD_START: u64 = 0x10_0000;

/// Where KVM puts the TSS on Intel hosts (three pages just below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    KvmOpen(std::io::Error),
    #[error("{0} failed: {err}", err = std::io::Error::from_raw_os_error(*.1))]
    Kvm(&'static str, i32),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory { mib: u64, source: vm_memory::mmap::FromRangesError },
    #[error("cannot set up devices: {0}")]
    Devices(#[from] DeviceError),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot build the vCPU seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot save the VM's state: {0}")]
    NotPaused(String),
    /// A device's state could not be saved: no snapshot is taken.
    #[error("cannot save the devices' state: {0}")]
    SaveDevices(DeviceError),
    #[error("working set: {0}")]
    WorkingSet(std::io::Error),
    #[error("cannot register guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("the VM is not running (it ended: {0})")]
    Ended(VmExit),
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error("VM shell: {0}")]
    Shell(String),
}

/// How the host reaches the guest agent: the mailbox (always there; a file at `mailbox` so that
/// other processes can use it, else a memfd) and whether the agent should serve invocations after
/// "ready" (without, it powers the VM off there: a one-shot boot).
#[derive(Clone, Debug)]
pub struct Channels {
    pub mailbox: Option<std::path::PathBuf>,
    /// The vsock device's host socket (Firecracker's hybrid vsock); none: guest connections to
    /// the host are refused.
    pub vsock: Option<std::path::PathBuf>,
    pub serve: bool,
    /// The VM's console is discarded: the guest agent is told to print nothing of its own there.
    pub quiet: bool,
    /// Confine device threads (vsock) with seccomp; on unless debugging (`--no-seccomp`).
    pub device_seccomp: bool,
    /// Open TAP devices for the VM's network interfaces, in order (`ember serve` hands a clone the
    /// one it prepared in the clone's network namespace); an interface without one opens its
    /// `host_dev_name`.
    pub taps: Vec<Arc<OwnedFd>>,
}

impl Default for Channels {
    fn default() -> Self {
        Self { mailbox: None, vsock: None, serve: false, quiet: false, device_seccomp: true, taps: Vec::new() }
    }
}

/// Maps a failed KVM ioctl `what` to a [`VmError`] (every KVM call in `vmm` goes through this).
pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e.errno())
}

/// A VM that is assembled and ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs and devices before the VM fd, guest memory last.
    /// vCPU threads made ahead (a shell's), one per vCPU, or none.
    parked: Vec<ParkedThread>,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    clock: Arc<BootClock>,
    vm: VmFd,
    /// A clone made without a PIT (its snapshot's guest had left it unused): the snapshot's PIT
    /// state, which the clone's own snapshots save as it was.
    absent_pit: Option<Box<kvm_pit_state2>>,
    mailbox: Arc<Mailbox>,
    mem: GuestMemory,
    mem_bytes: u64,
}

/// How to run a VM.
#[derive(Debug)]
pub struct RunOptions {
    /// Stop the VM if the guest has not ended it after this long.
    pub timeout: Option<Duration>,
    /// Confine every vCPU thread with its [`seccomp::vcpu_filter`] (on by default).
    pub seccomp: bool,
    /// Bytes read from this fd go to the guest console (the UART's receive FIFO).
    pub console_input: Option<OwnedFd>,
    /// Pause the VM the moment the guest signals ready (the snapshot point), so that it has run
    /// nothing past it when [`RunningVm::snapshot`] saves it.
    pub pause_on_ready: bool,
    /// Start paused: the vCPU threads park before running any guest code (resume or snapshot next).
    pub start_paused: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { timeout: None, seccomp: true, console_input: None, pause_on_ready: false, start_paused: false }
    }
}

/// How a run ended, with the boot's timeline.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit: VmExit,
    pub timeline: BootTimeline,
}

/// The memory slots of a VM whose RAM is `mem` and whose mailbox is mapped at `mailbox`:
/// (guest address, size, host address), RAM first.
fn memory_slots(mem: &GuestMemory, mailbox: u64) -> Vec<(u64, u64, u64)> {
    let mut slots: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64)).collect();
    slots.push((memory::MAILBOX_ADDR, memory::MAILBOX_SIZE, mailbox));
    slots
}

impl Vm {
    /// Builds a VM that boots `config`'s kernel. `process_start` anchors the boot timeline.
    pub fn boot(
        config: &VmConfig,
        channels: &Channels,
        console: ConsoleOut,
        process_start: Instant,
    ) -> Result<Self, VmError> {
        config.validate()?;
        let clock = BootClock::new(process_start);
        let vcpu_count = config.vcpus();
        let mem_bytes = config.mem_bytes();

        // Guest memory and the guest's software first: bad input fails before KVM is touched.
        let mem = guest_memory(mem_bytes)?;
        // What can wait is left to a thread that fills it from the guest's first fault on
        // (boot::lazy).
        let mut loader = boot::lazy::Loader::new(&mem);
        let kernel = boot::load_kernel(&mem, &config.boot_source.kernel_image_path, &mut loader)?;
        let initrd = match &config.boot_source.initrd_path {
            Some(p) => Some(boot::load_initrd(&mem, mem_bytes, kernel.kernel_end, p, &mut loader)?),
            None => None,
        };
        loader
            .start(channels.device_seccomp)
            .map_err(|source| BootError::KernelRead { path: config.boot_source.kernel_image_path.clone(), source })?;
        let drives = crate::config::ordered_drives(&config.drives);
        let nets = &config.network_interfaces;
        let vm = Self::assemble(mem, vcpu_count, kernel.entry, (&drives, nets), channels, console, clock)?;
        // The command line names every virtio device the VM was assembled with.
        let cmdline = format!("{} {}", config.cmdline(), devices::virtio_cmdline(vm.devices.virtio_count()));
        let cmdline_size = boot::load_command_line(&vm.mem, &cmdline)?;
        boot::write_boot_parameters(&vm.mem, mem_bytes, &kernel, cmdline_size, initrd, vcpu_count)?;
        boot::regs::write_boot_tables(&vm.mem, kernel.entry).map_err(|e| BootError::Params(e.to_string()))?;
        Ok(vm)
    }

    /// Builds a VM whose vCPUs all start in 64-bit mode at `code` (loaded at [`PAYLOAD_START`]),
    /// without a kernel: RBX holds the vCPU's index and RCX the vCPU count. Used to exercise the
    /// VMM itself (every vCPU running, exits, devices) independently of a guest kernel.
    pub fn with_payload(code: &[u8], vcpu_count: u8, console: ConsoleOut) -> Result<Self, VmError> {
        boot::mptable::build(0, vcpu_count).map_err(|e| BootError::MpTable(e.to_string()))?;
        let mem_bytes = memory::MIN_MEM_MIB << 20;
        let mem = guest_memory(mem_bytes)?;
        let entry = boot::EntryPoint::Linux64(PAYLOAD_START);
        mem.write_slice(code, vm_memory::GuestAddress(PAYLOAD_START)).map_err(|e| BootError::Params(e.to_string()))?;
        boot::regs::write_boot_tables(&mem, entry).map_err(|e| BootError::Params(e.to_string()))?;
        let clock = BootClock::new(Instant::now());
        let vm = Self::assemble(mem, vcpu_count, entry, (&[], &[]), &Channels::default(), console, clock)?;
        for v in &vm.vcpus {
            v.start_payload(vcpu_count)?;
        }
        Ok(vm)
    }

    /// Creates the KVM VM around prepared guest memory: irqchip, PIT, devices, configured vCPUs.
    fn assemble(
        mem: GuestMemory,
        vcpu_count: u8,
        entry: boot::EntryPoint,
        (drives, nets): (&[crate::config::DriveConfig], &[crate::config::NetConfig]),
        channels: &Channels,
        console: ConsoleOut,
        clock: Arc<BootClock>,
    ) -> Result<Self, VmError> {
        let mem_bytes = mem.iter().map(|r| r.len()).sum();
        let mailbox = Arc::new(Mailbox::create(channels.mailbox.as_deref())?);
        // SAFETY: `mem` and the mailbox are owned by the Vm made here, which drops them after
        // the VM fd.
        // A booting guest gets a PIT: a kernel may need it to calibrate its clocks.
        let (kvm, vm) = unsafe { create_vm(&memory_slots(&mem, mailbox.host_addr()), true) }?;
        let args = DeviceArgs {
            vm: &vm,
            mem: &mem,
            mailbox: &mailbox,
            console,
            clock: &clock,
            channels,
            clone_id: 0,
            drives,
            nets,
            parked: Vec::new(),
            irqfds: Vec::new(),
        };
        let devices = Devices::create(args, None)?;
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for i in 0..vcpu_count {
            let mut v = Vcpu::new(&vm, i)?;
            v.configure_boot(&supported, vcpu_count, entry)?;
            vcpus.push(v);
        }
        Ok(Self { parked: Vec::new(), vcpus, devices, clock, vm, absent_pit: None, mailbox, mem, mem_bytes })
    }

    /// Builds a clone of a snapshot: a new VM whose RAM maps `memory` copy-on-write, with every
    /// vCPU, VM and device state of the snapshot restored, ready to run from the snapshot point.
    /// `clone_id` (1 and up) is what the guest reads from its control page, with fresh seed material.
    pub fn restore(
        state: &SnapshotState,
        memory: &MemoryFile,
        clone_id: u64,
        channels: &Channels,
        console: ConsoleOut,
    ) -> Result<Self, VmError> {
        Self::restore_in(None, state, memory, clone_id, channels, console)
    }

    /// [`Vm::restore`] into `shell`, a VM made ahead for this snapshot (one made now when none is
    /// given or it does not fit): what is left is mapping the memory and loading the state.
    pub fn restore_in(
        shell: Option<VmShell>,
        state: &SnapshotState,
        memory: &MemoryFile,
        clone_id: u64,
        channels: &Channels,
        console: ConsoleOut,
    ) -> Result<Self, VmError> {
        let clock = BootClock::wall_only();
        let mut shell = match shell {
            Some(s) if s.fits(state) => s,
            // Threads made ahead are confined: a clone without seccomp starts its own.
            _ => VmShell::new(&ShellSpec { threads_ahead: channels.device_seccomp, ..ShellSpec::of(state) })?,
        };
        let mem = shell.map_template(memory)?;
        let mailbox = Arc::new(shell.take_mailbox(channels.mailbox.as_deref())?);
        let VmShell { parked, devices: parked_devices, vcpus: shell_vcpus, held, irqfds, vm, spec, .. } = shell;
        state.vm.restore(&vm, spec.pit)?;
        let absent_pit = (!spec.pit).then(|| Box::new(state.vm.pit));
        let (drives, nets) = (&state.devices.drives, &state.devices.nets);
        let args = DeviceArgs {
            vm: &vm,
            mem: &mem,
            mailbox: &mailbox,
            console,
            clock: &clock,
            channels,
            clone_id,
            drives,
            nets,
            parked: parked_devices,
            irqfds,
        };
        let devices = Devices::create(args, Some(&state.devices))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (((v, s), preloaded), held) in shell_vcpus.into_iter().zip(&state.vcpus).zip(&spec.vcpus).zip(&held) {
            if preloaded.is_none() {
                s.preload_over(&v.fd, held.as_ref())?;
            }
            let tsc = s.finish(&v.fd)?;
            s.anchor_kvmclock(&mem, state.vm.clock.clock, tsc)?;
            vcpus.push(v);
        }
        Ok(Self { parked, vcpus, devices, clock, vm, absent_pit, mailbox, mem, mem_bytes: state.machine.mem_bytes })
    }

    /// Faults a snapshot's working set into this (restored, not yet started) VM's memory from the
    /// host side, so that the guest does not fault it in page by page.
    pub fn populate(&self, ws: &WorkingSet) -> std::io::Result<()> {
        ws.populate(&self.mem)
    }

    /// Runs the VM until the guest ends it or `timeout` passes; stops every vCPU thread before
    /// returning.
    pub fn run(self, timeout: Option<Duration>) -> Result<RunOutcome, VmError> {
        self.run_with(RunOptions { timeout, ..RunOptions::default() })
    }

    /// Runs the VM with `options` until it ends.
    pub fn run_with(self, options: RunOptions) -> Result<RunOutcome, VmError> {
        let timeout = options.timeout;
        Ok(self.start(options)?.wait(timeout))
    }

    /// Starts the vCPU threads and returns a handle to the running VM.
    pub fn start(self, options: RunOptions) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler()?;
        // What a vCPU thread needs to save its state when paused, worked out before it is confined.
        if let Some(v) = self.vcpus.first() {
            vcpu_state::prepare(&v.fd)?;
        }
        let Vm { parked, vcpus, devices, clock, vm, absent_pit, mailbox, mem, mem_bytes } = self;
        // Taken before the devices start: an interrupt they raise from now on wakes the vCPUs
        // from the agent's idle park, however soon it comes.
        let wake_seen = mailbox.wake_generation();
        devices.start();
        // Threads made ahead (confined already) when there is one per vCPU and seccomp is on;
        // otherwise one thread per vCPU now, with one filter each: each may reach its own vCPU fd
        // only.
        let mut parked = match options.seccomp && parked.len() == vcpus.len() {
            true => parked.into_iter().map(Some).collect(),
            false => Vec::new(),
        };
        parked.resize_with(vcpus.len(), || None);
        let filters = vcpus
            .iter()
            .zip(&parked)
            .map(|(v, p)| (options.seccomp && p.is_none()).then(|| seccomp::vcpu_filter(v.fd.as_raw_fd())).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let ctl = Arc::new(VmControl::new(vcpus.len()));
        ctl.set_pause_on_ready(options.pause_on_ready);
        if options.start_paused {
            ctl.request_pause();
        }
        let input = match options.console_input {
            Some(fd) => {
                Some(ConsoleInputLoop::start(fd, devices.serial.clone()).map_err(DeviceError::io("console input"))?)
            }
            None => None,
        };
        let mut running = RunningVm {
            ctl: ctl.clone(),
            threads: Vec::new(),
            input,
            devices,
            clock: clock.clone(),
            vm,
            absent_pit,
            mailbox: mailbox.clone(),
            mem: mem.clone(),
            mem_bytes,
        };
        for ((v, filter), parked) in vcpus.into_iter().zip(filters).zip(parked) {
            let cx = VcpuContext {
                pio: running.devices.pio.clone(),
                mmio: running.devices.mmio.clone(),
                ctl: ctl.clone(),
                clock: Some(clock.clone()),
                mem: mem.clone(),
                mailbox: mailbox.clone(),
                seccomp: filter,
                wake_seen,
            };
            let (v, cx) = match parked {
                Some(p) => match p.start((v, cx)) {
                    Ok(t) => {
                        running.threads.push(t);
                        continue;
                    }
                    // The thread made ahead is gone: this vCPU gets a new one, confined as usual.
                    Err((v, mut cx)) => {
                        cx.seccomp = Some(seccomp::vcpu_filter(v.fd.as_raw_fd())?);
                        (v, cx)
                    }
                },
                None => (v, cx),
            };
            match std::thread::Builder::new().name(format!("vcpu{}", v.index)).spawn(move || v.run(cx)) {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    ctl.end(VmExit::Stopped("a vCPU thread could not start".into()));
                    running.shutdown();
                    return Err(VmError::Thread(e));
                }
            }
        }
        Ok(running)
    }
}

/// A VM whose vCPU threads are running (or paused).
pub struct RunningVm {
    ctl: Arc<VmControl>,
    threads: Vec<JoinHandle<()>>,
    input: Option<ConsoleInputLoop>,
    // Drop order: threads are joined (shutdown) before devices, the VM fd and memory go.
    devices: Devices,
    clock: Arc<BootClock>,
    vm: VmFd,
    /// A clone made without a PIT (its snapshot's guest had left it unused): the snapshot's PIT
    /// state, which the clone's own snapshots save as it was.
    absent_pit: Option<Box<kvm_pit_state2>>,
    mailbox: Arc<Mailbox>,
    mem: GuestMemory,
    mem_bytes: u64,
}

impl RunningVm {
    /// Waits until the guest ends the VM or `timeout` passes (then ember stops it), and stops every
    /// vCPU thread.
    pub fn wait(mut self, timeout: Option<Duration>) -> RunOutcome {
        let exit = self.ctl.wait(timeout).unwrap_or_else(|| {
            let why = match timeout {
                Some(t) => format!("timed out after {:.1} s", t.as_secs_f64()),
                None => "stopped".into(),
            };
            self.ctl.end(VmExit::Stopped(why.clone()));
            VmExit::Stopped(why)
        });
        self.shutdown();
        RunOutcome { exit, timeline: self.clock.timeline() }
    }

    /// Stops the VM now.
    pub fn stop(self, why: &str) -> RunOutcome {
        self.ctl.end(VmExit::Stopped(why.into()));
        self.wait(Some(Duration::ZERO))
    }

    /// Waits until the guest rings the control page's doorbell ("ready"); false if the VM ended or
    /// `timeout` passed first.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.ctl.wait_ready(timeout)
    }

    /// Waits up to `timeout` for the VM to end; why it ended, if it has.
    pub fn poll(&self, timeout: Duration) -> Option<VmExit> {
        self.ctl.wait(Some(timeout))
    }

    /// Why the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.ctl.exit()
    }

    /// Whether KVM emulates a PIT for this VM (a clone has one only when its snapshot's guest may
    /// use it: [`VmState::pit_in_use`]).
    pub fn has_pit(&self) -> bool {
        self.vm.get_pit2().is_ok()
    }

    /// Pauses every vCPU: each leaves KVM_RUN, completes the I/O it was in the middle of, saves its
    /// state and parks; then every device thread. Returns once all have stopped.
    pub fn pause(&self) -> Result<(), VmError> {
        self.ctl.request_pause();
        self.mailbox.wake();
        let kick = || {
            for t in &self.threads {
                let _ = t.kill(vcpu::kick_signal());
            }
        };
        kick();
        while !self.ctl.wait_parked(Duration::from_millis(1)) {
            if let Some(e) = self.ctl.exit() {
                return Err(VmError::Ended(e));
            }
            kick();
        }
        // Then the devices' own threads: nothing writes guest memory or the rings while the VM's
        // state is read.
        self.devices.pause();
        Ok(())
    }

    /// Lets a paused VM run again: its devices, then its vCPUs.
    pub fn resume(&self) {
        self.devices.resume();
        self.ctl.resume();
    }

    /// Serves drive `drive_id` from the file at `path` from now on, paused or running
    /// (Firecracker's `PATCH /drives/{id}`).
    pub fn replace_drive(&self, drive_id: &str, path: &std::path::Path) -> Result<(), VmError> {
        Ok(self.devices.replace_drive(drive_id, path)?)
    }

    /// Presses Ctrl+Alt+Del on the VM's keyboard (a Linux guest with the keyboard driver reboots,
    /// which ends the VM).
    pub fn send_ctrl_alt_del(&self) -> Result<(), crate::devices::i8042::I8042Error> {
        self.devices.ctrl_alt_del()
    }

    /// The VM's counters since they were last taken (vCPU exits, each device's work), by
    /// Firecracker's metric group names (`vcpu`, `block`, `block_ID`, `net`, `net_ID`).
    pub fn take_counters(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.devices.take_counters();
        m.insert("vcpu".into(), self.ctl.exits.take().into());
        m
    }

    /// The state of the paused VM (vCPUs as saved when they parked; VM and devices now).
    pub fn state(&self) -> Result<SnapshotState, VmError> {
        let vcpus = self.ctl.parked_states()?;
        Ok(SnapshotState {
            machine: MachineInfo { vcpus: vcpus.len() as u8, mem_bytes: self.mem_bytes },
            vm: VmState::save(&self.vm, self.absent_pit.as_deref())?,
            vcpus,
            devices: self.devices.save().map_err(VmError::SaveDevices)?,
        })
    }

    /// Writes `state` (this paused VM's, as [`RunningVm::state`] read it) and the VM's memory to
    /// the files `state_path` and `memory_path`.
    pub fn write_snapshot(
        &self,
        state: &SnapshotState,
        state_path: &std::path::Path,
        memory_path: &std::path::Path,
    ) -> Result<(), VmError> {
        state.write_files(state_path, memory_path, &self.mem)?;
        Ok(())
    }

    /// Snapshots the paused VM into `dir` (`state` and `memory` files).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), VmError> {
        self.state()?.write(dir, &self.mem)?;
        Ok(())
    }

    /// The guest pages this VM has touched so far (for a clone: its working set).
    pub fn record_working_set(&self) -> std::io::Result<WorkingSet> {
        WorkingSet::record(&self.mem)
    }

    /// Invokes `function` in the guest through the mailbox and waits for its answer.
    pub fn invoke(&self, function: &str, payload: &[u8], opts: CallOptions) -> Result<Response, InvokeError> {
        self.mailbox.call(function, payload, opts)
    }

    /// The VM's mailbox, for callers on other threads.
    pub fn mailbox(&self) -> Arc<Mailbox> {
        self.mailbox.clone()
    }

    /// The boot / restore timeline so far.
    pub fn timeline(&self) -> BootTimeline {
        self.clock.timeline()
    }

    /// Asks the VM to stop and returns without waiting: each vCPU is kicked out of KVM_RUN once and
    /// leaves the guest there (dropping the VM then joins its threads and frees it). For a VM that
    /// is handed to another thread to be destroyed: its guest does not go on using a core (and
    /// faulting pages under the process's memory lock) while it waits there.
    pub fn request_stop(&self, why: &str) {
        if !self.ctl.should_stop() {
            self.ctl.end(VmExit::Stopped(why.into()));
        }
        self.mailbox.vm_ended();
        for t in &self.threads {
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    /// How many of the VM's vCPU threads have not ended yet.
    pub fn vcpu_threads_running(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    fn shutdown(&mut self) {
        self.request_stop("stopped");
        stop_vcpus(&self.ctl, std::mem::take(&mut self.threads));
        self.devices.shutdown();
        if let Some(l) = self.input.take() {
            l.stop();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Guest RAM of `mem_bytes` (anonymous, lazily populated).
fn guest_memory(mem_bytes: u64) -> Result<GuestMemory, VmError> {
    memory::create_guest_memory(mem_bytes).map_err(|source| VmError::Memory { mib: mem_bytes >> 20, source })
}

/// Creates a KVM VM with `slots` (guest address, size, host address) registered as its memory,
/// then the TSS, the in-kernel irqchip and, when `pit`, the PIT.
///
/// # Safety
/// Every slot's host range must be mapped, and stay mapped (whatever is mapped there) until the
/// VM fd is closed.
unsafe fn create_vm(slots: &[(u64, u64, u64)], pit: bool) -> Result<(&'static Kvm, VmFd), VmError> {
    let kvm = kvm()?;
    drop(PREPARING.locked());
    let spare = SPARE_VM.locked().take();
    let vm = match spare {
        Some(vm) => vm,
        None => kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?,
    };
    // Memory before the TSS, irqchip and PIT: the other order is much slower on some hosts
    // (registering a slot after the irqchip measured several milliseconds here).
    for (slot, &(guest_phys_addr, memory_size, userspace_addr)) in slots.iter().enumerate() {
        let r =
            kvm_userspace_memory_region { slot: slot as u32, flags: 0, guest_phys_addr, memory_size, userspace_addr };
        // SAFETY: the caller keeps each range mapped until the VM fd is closed.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    if pit {
        let config = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(config).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }
    Ok((kvm, vm))
}

/// A VM made ahead by [`prepare_ahead`] (no memory, no irqchip yet), which the process's next VM
/// takes instead of making its own.
static SPARE_VM: Mutex<Option<VmFd>> = Mutex::new(None);
/// Held while [`prepare_ahead`] runs: a VM made meanwhile waits for what it prepares instead of
/// doing the same work beside it.
static PREPARING: Mutex<()> = Mutex::new(());

/// Does ahead, off the critical path, what a process's first VM would otherwise do on it: opens
/// /dev/kvm, compiles the device threads' seccomp filter, and makes one VM (`KVM_CREATE_VM`) for
/// the next VM to take. For a process that makes one VM soon, at a time it does not know yet
/// (`ember firecracker` before its InstanceStart or snapshot load).
pub fn prepare_ahead() -> Result<(), VmError> {
    let _preparing = PREPARING.locked();
    let kvm = kvm()?;
    seccomp::shared_device_filter().map_err(|e| VmError::Shell(format!("device filter: {e}")))?;
    vcpu::install_kick_handler()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    *SPARE_VM.locked() = Some(vm);
    Ok(())
}

/// This process's handle on /dev/kvm, opened on first use and kept (one handle creates any number
/// of VMs; a jailed worker opens it before it drops the rights to).
pub fn kvm() -> Result<&'static Kvm, VmError> {
    static KVM: OnceLock<Kvm> = OnceLock::new();
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let k = Kvm::new().map_err(|e| VmError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(KVM.get_or_init(|| k))
}

/// Kicks every vCPU thread out of KVM_RUN until it has exited, then joins it.
fn stop_vcpus(ctl: &VmControl, threads: Vec<JoinHandle<()>>) {
    debug_assert!(ctl.should_stop());
    ctl.resume();
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_micros(50));
        }
        let _ = t.join();
    }
}
