//! One VM: assembled from a [`VmConfig`] (boot), run on one thread per vCPU, ended by the guest or by
//! ember.

pub mod boot;
pub mod exit;
pub mod memory;
pub mod seccomp;
pub mod vcpu;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::config::{ConfigError, VmConfig};
use crate::devices::boot_timer::{BootClock, BootTimeline, BootTimer};
use crate::devices::bus::Bus;
use crate::devices::console_input::ConsoleInputLoop;
use crate::devices::debug_port::{DebugPort, ExitPort, DEBUG_PORT, EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_DATA_PORT, I8042_PORTS};
use crate::devices::serial::{ConsoleOut, SerialDevice, COM1_IRQ, COM1_PORT, UART_PORTS};
use boot::BootError;
use exit::VmExit;
use memory::{GuestMemory, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE};
use vcpu::{Vcpu, VcpuContext, VmControl};

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
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error("cannot set up devices: {0}")]
    Devices(String),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot build the vCPU seccomp filter: {0}")]
    Seccomp(String),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e.errno())
}

/// A VM that is assembled and ready to run.
pub struct Vm {
    // Field order is drop order: vCPUs and devices before the VM fd, guest memory last.
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    clock: Arc<BootClock>,
    _vm: VmFd,
    mem: GuestMemory,
}

/// How to run a VM.
#[derive(Debug)]
pub struct RunOptions {
    /// Stop the VM if the guest has not ended it after this long.
    pub timeout: Option<Duration>,
    /// Confine every vCPU thread with [`seccomp::vcpu_filter`] (on by default).
    pub seccomp: bool,
    /// Bytes read from this fd go to the guest console (the UART's receive FIFO).
    pub console_input: Option<OwnedFd>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { timeout: None, seccomp: true, console_input: None }
    }
}

/// How a run ended, with the boot's timeline.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit: VmExit,
    pub timeline: BootTimeline,
}

/// Registers every region of `mem` with the VM, slot by slot.
fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|e| VmError::Memory(0, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which the Vm
        // keeps (and drops after the VM fd), so KVM never sees it unmapped.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl Vm {
    /// Builds a VM that boots `config`'s kernel. `process_start` anchors the boot timeline.
    pub fn boot(config: &VmConfig, console: ConsoleOut, process_start: Instant) -> Result<Self, VmError> {
        config.validate()?;
        let clock = BootClock::new(process_start);
        let vcpu_count = config.vcpus();
        let mem_bytes = config.mem_bytes();

        // Guest memory and the guest's software first: bad input fails before KVM is touched.
        let mem =
            memory::create_guest_memory(mem_bytes).map_err(|e| VmError::Memory(mem_bytes >> 20, e.to_string()))?;
        let kernel = boot::load_kernel(&mem, &config.boot_source.kernel_image_path)?;
        let initrd = match &config.boot_source.initrd_path {
            Some(p) => Some(boot::load_initrd(&mem, mem_bytes, kernel.kernel_end, p)?),
            None => None,
        };
        let cmdline_size = boot::load_command_line(&mem, &config.cmdline())?;
        boot::write_boot_parameters(&mem, mem_bytes, &kernel, cmdline_size, initrd, vcpu_count)?;
        boot::regs::write_boot_tables(&mem, kernel.entry).map_err(|e| BootError::Params(e.to_string()))?;

        Self::assemble(mem, vcpu_count, kernel.entry, console, clock)
    }

    /// Builds a VM whose vCPUs all start in 64-bit mode at `code` (loaded at [`PAYLOAD_START`]),
    /// without a kernel: RBX holds the vCPU's index and RCX the vCPU count. Used to exercise the
    /// VMM itself (every vCPU running, exits, devices) independently of a guest kernel.
    pub fn with_payload(code: &[u8], vcpu_count: u8, console: ConsoleOut) -> Result<Self, VmError> {
        boot::mptable::build(0, vcpu_count).map_err(|e| BootError::MpTable(e.to_string()))?;
        let mem_bytes = memory::MIN_MEM_MIB << 20;
        let mem =
            memory::create_guest_memory(mem_bytes).map_err(|e| VmError::Memory(mem_bytes >> 20, e.to_string()))?;
        let entry = boot::EntryPoint::Linux64(PAYLOAD_START);
        mem.write_slice(code, vm_memory::GuestAddress(PAYLOAD_START)).map_err(|e| BootError::Params(e.to_string()))?;
        boot::regs::write_boot_tables(&mem, entry).map_err(|e| BootError::Params(e.to_string()))?;
        let vm = Self::assemble(mem, vcpu_count, entry, console, BootClock::new(Instant::now()))?;
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
        console: ConsoleOut,
        clock: Arc<BootClock>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Memory before the TSS, irqchip and PIT: the other order is measurably slower on some hosts.
        register_memory(&vm, &mem)?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Devices.
        let dev_err = |e: &dyn std::fmt::Display| VmError::Devices(e.to_string());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| dev_err(&e))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
        let mut pio = Bus::new();
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
        pio.insert(COM1_PORT, UART_PORTS, serial.clone()).map_err(|e| dev_err(&e))?;
        pio.insert(I8042_DATA_PORT, I8042_PORTS, Arc::new(Mutex::new(I8042::default()))).map_err(|e| dev_err(&e))?;
        pio.insert(DEBUG_PORT, 1, Arc::new(Mutex::new(DebugPort::new(clock.clone())))).map_err(|e| dev_err(&e))?;
        pio.insert(EXIT_PORT, 1, Arc::new(Mutex::new(ExitPort))).map_err(|e| dev_err(&e))?;
        let mut mmio = Bus::new();
        mmio.insert(BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, Arc::new(Mutex::new(BootTimer::new(clock.clone()))))
            .map_err(|e| dev_err(&e))?;

        // vCPUs.
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for i in 0..vcpu_count {
            let mut v = Vcpu::new(&vm, i)?;
            v.configure_boot(&supported, vcpu_count, entry)?;
            vcpus.push(v);
        }
        Ok(Self { vcpus, serial, pio: Arc::new(pio), mmio: Arc::new(mmio), clock, _vm: vm, mem })
    }

    /// Runs the VM until the guest ends it or `timeout` passes; stops every vCPU thread before
    /// returning.
    pub fn run(self, timeout: Option<Duration>) -> Result<RunOutcome, VmError> {
        self.run_with(RunOptions { timeout, ..RunOptions::default() })
    }

    /// Runs the VM with `options`.
    pub fn run_with(self, options: RunOptions) -> Result<RunOutcome, VmError> {
        let timeout = options.timeout;
        vcpu::install_kick_handler()?;
        let filter = match options.seccomp {
            true => Some(Arc::new(seccomp::vcpu_filter().map_err(|e| VmError::Seccomp(e.to_string()))?)),
            false => None,
        };
        let ctl = Arc::new(VmControl::default());
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let Vm { vcpus, serial, pio, mmio, clock, _vm, mem } = self;
        let input = match options.console_input {
            Some(fd) => Some(ConsoleInputLoop::start(fd, serial).map_err(|e| VmError::Devices(e.to_string()))?),
            None => None,
        };
        let mut spawn_error = None;
        for v in vcpus {
            let cx = VcpuContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                ctl: ctl.clone(),
                clock: Some(clock.clone()),
                mem: mem.clone(),
                seccomp: filter.clone(),
            };
            match std::thread::Builder::new().name(format!("vcpu{}", v.index)).spawn(move || v.run(cx)) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(VmError::Thread(e));
                    ctl.end(VmExit::Stopped("a vCPU thread could not start".into()));
                    break;
                }
            }
        }
        let exit = match spawn_error {
            Some(_) => None,
            None => ctl.wait(timeout),
        };
        let exit = exit.unwrap_or_else(|| {
            let why = match timeout {
                Some(t) => format!("timed out after {:.1} s", t.as_secs_f64()),
                None => "stopped".into(),
            };
            ctl.end(VmExit::Stopped(why.clone()));
            VmExit::Stopped(why)
        });
        stop_vcpus(&ctl, threads);
        if let Some(l) = input {
            l.stop();
        }
        if let Some(e) = spawn_error {
            return Err(e);
        }
        Ok(RunOutcome { exit, timeline: clock.timeline() })
    }
}

/// Kicks every vCPU thread out of KVM_RUN until it has exited, then joins it.
fn stop_vcpus(ctl: &VmControl, threads: Vec<JoinHandle<()>>) {
    debug_assert!(ctl.should_stop());
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_micros(50));
        }
        let _ = t.join();
    }
}
