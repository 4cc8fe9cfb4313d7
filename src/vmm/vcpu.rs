//! A vCPU: its boot configuration and the thread that runs it (KVM_RUN loop and exit dispatch).

use std::cell::Cell;
use std::sync::{Arc, Once};

use kvm_bindings::{kvm_lapic_state, kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use vm_memory::{Bytes, GuestAddress};

use super::boot::{cpuid, msr, regs, EntryPoint};
use super::control::VmControl;
use super::exit::VmExit;
use super::vcpu_state::VcpuState;
use super::{kvm_err, VmError};
use crate::devices::boot_timer::BootClock;
use crate::devices::bus::Bus;
use crate::devices::metrics::{self, VcpuCounters};
use crate::devices::GuestRequest;
use crate::memory::GuestMemory;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while its VcpuFd lives and
        // cleared before it is dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(kvm_err("sigaction"));
    });
    result
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let b = &mut lapic.regs[reg..reg + 4];
    let v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
    let v = (v & !0x700) | (mode << 8);
    for (d, s) in b.iter_mut().zip(v.to_le_bytes()) {
        *d = s as libc::c_char;
    }
}

/// A vCPU thread started ahead of its VM (by a [`super::shell::VmShell`]), already confined with
/// its vCPU's seccomp filter, waiting for its vCPU and context: starting the VM then costs a
/// wakeup instead of a thread creation and a filter installation (together ~0.3 ms here).
pub type ParkedThread = crate::sys::Parked<(Vcpu, VcpuContext)>;

/// Starts the parked thread for vCPU `index`, confined with `filter` (the filter of that vCPU's
/// fd).
pub fn park(index: u8, filter: seccompiler::BpfProgram) -> Result<ParkedThread, VmError> {
    install_kick_handler()?;
    let confine = move || match crate::seccomp::apply(&filter) {
        Ok(()) => true,
        Err(e) => {
            crate::log_limited!(warn, "a vCPU thread made ahead cannot confine itself: {e}");
            false
        }
    };
    // A vCPU that will not run ends its VM at once (not at its owner's readiness timeout).
    let refused = |(v, cx): (Vcpu, VcpuContext)| {
        cx.ctl.end(VmExit::Stopped(format!("vCPU {}'s thread could not confine itself", v.index)))
    };
    // Woken, the thread first yields: the thread that woke it (the one restoring the VM, which
    // still has its answer to send) goes on where it ran, instead of waiting on the same core
    // behind a guest that started running (milliseconds on a host with few cores).
    let run = |(v, cx): (Vcpu, VcpuContext)| {
        std::thread::yield_now();
        v.run(cx)
    };
    ParkedThread::spawn(format!("vcpu{index}"), confine, run, refused).map_err(VmError::Thread)
}

/// What a vCPU thread needs besides its vCPU.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub ctl: Arc<VmControl>,
    pub clock: Option<Arc<BootClock>>,
    pub mem: GuestMemory,
    pub mailbox: Arc<crate::channel::mailbox::Mailbox>,
    /// The seccomp filter to confine this thread with, if any.
    pub seccomp: Option<seccompiler::BpfProgram>,
    /// The mailbox's wake generation before the VM's devices started: a wake since (a device's
    /// interrupt, a vsock connection for the guest) is one the vCPU has yet to act on, even when
    /// it came before the vCPU's thread ran (see [`Mailbox::idle_wait`](crate::channel::mailbox::Mailbox::idle_wait)).
    pub wake_seen: u32,
}

/// How long after a vCPU's first wake from the idle park a timer interrupt that fell due while it
/// was parked is delivered (one tick of ember's guest kernel, HZ=100). A no-op call's answer takes
/// 0.5-5 ms on a host that emulates guest kernel mode; with 1 ms, about one first call in 25 took
/// the tick, and the guest kernel's work behind it, before its answer (50-90 ms in all).
const FIRST_WAKE_GRACE_MS: u64 = 10;

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VmError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        Ok(Self { index, fd })
    }

    /// Sets up the state the vCPU enters the kernel with.
    pub fn configure_boot(&mut self, supported_cpuid: &CpuId, count: u8, entry: EntryPoint) -> Result<(), VmError> {
        let cpuid = cpuid::for_vcpu(supported_cpuid, self.index, count);
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs().map_err(|_| VmError::Kvm("KVM_SET_MSRS", libc::ENOMEM))?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != msrs.as_slice().len() {
            return Err(VmError::Kvm("KVM_SET_MSRS", libc::EINVAL));
        }
        self.fd.set_fpu(&regs::boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        self.fd.set_regs(&regs::boot_regs(entry)).map_err(kvm_err("KVM_SET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        self.fd.set_sregs(&regs::boot_sregs(sregs, entry)).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        set_apic_delivery_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_apic_delivery_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Makes the vCPU run a kernel-less payload: RBX = its index, RCX = the vCPU count, and
    /// runnable at once (application processors otherwise wait for INIT/SIPI).
    pub fn start_payload(&self, count: u8) -> Result<(), VmError> {
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rbx = u64::from(self.index);
        regs.rcx = u64::from(count);
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        self.fd.set_mp_state(runnable).map_err(kvm_err("KVM_SET_MP_STATE"))
    }

    /// Runs the vCPU until the VM stops. Every exit the guest causes is handled here; anything that
    /// ends the VM is reported through `ctl`.
    pub fn run(mut self, cx: VcpuContext) {
        let VcpuContext { pio, mmio, ctl, clock, mem, mailbox, seccomp, mut wake_seen } = cx;
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Some(filter) = seccomp {
            if let Err(e) = crate::seccomp::apply(&filter) {
                ctl.end(VmExit::Stopped(format!("vCPU {}: cannot apply the seccomp filter: {e}", self.index)));
                return;
            }
        }
        if let Some(c) = &clock {
            if self.index == 0 {
                if let Some(e) = c.record(|t| &mut t.first_instruction) {
                    tracing::debug!("vCPU 0 enters the guest: {e}");
                }
            }
        }
        let mut first_io = true;
        // The first wake from the idle park answers the call before the timer interrupt that fell
        // due meanwhile (see `defer_overdue_deadline`): it comes FIRST_WAKE_GRACE_MS later.
        let mut first_wake = true;
        while !ctl.should_stop() {
            if ctl.pause_requested() {
                self.park(&ctl);
                continue;
            }
            let request = match self.fd.run() {
                Ok(exit) => {
                    if first_io
                        && matches!(
                            exit,
                            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
                        )
                    {
                        first_io = false;
                        if let Some(c) = &clock {
                            c.record(|t| &mut t.first_io);
                        }
                    }
                    match handle_exit(exit, &pio, &mmio, &ctl.exits) {
                        Ok(r) => r,
                        Err(reason) => {
                            metrics::inc(&ctl.exits.failures);
                            let reason = self.describe(&mem, reason);
                            ctl.end(reason);
                            break;
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => {
                    ctl.end(VmExit::VcpuError { vcpu: self.index, errno: e.errno() });
                    break;
                }
            };
            if let Some(r) = request {
                let reason = match r {
                    GuestRequest::Reset => VmExit::Reset,
                    GuestRequest::PowerOff => VmExit::PowerOff,
                    GuestRequest::Panic => VmExit::Panic { vcpu: self.index, rip: self.rip() },
                    GuestRequest::Ready => {
                        ctl.set_ready();
                        continue;
                    }
                    GuestRequest::MailboxResponse => {
                        mailbox.response_rung();
                        continue;
                    }
                    GuestRequest::Idle => {
                        mailbox.idle_wait(&mut wake_seen, || ctl.should_stop() || ctl.pause_requested());
                        if std::mem::take(&mut first_wake) {
                            let deferred = self.fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ")).and_then(|khz| {
                                super::vcpu_state::defer_overdue_deadline(
                                    &self.fd,
                                    u64::from(khz) * FIRST_WAKE_GRACE_MS,
                                )
                            });
                            if let Err(e) = deferred {
                                tracing::debug!("vCPU {}: its timer stays as it was: {e}", self.index);
                            }
                        }
                        continue;
                    }
                };
                ctl.end(reason);
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        // Callers waiting on the mailbox (in this process or another) learn at once.
        mailbox.vm_ended();
        let timed_out = matches!(ctl.exit(), Some(VmExit::Stopped(why)) if why.starts_with("timed out"));
        if timed_out || tracing::enabled!(tracing::Level::DEBUG) {
            // Where the guest was when ember stopped it: the first clue to a hung guest.
            let (cs, cr2) = self.fd.get_sregs().map(|s| (s.cs.selector, s.cr2)).unwrap_or_default();
            let regs = self.fd.get_regs().unwrap_or_default();
            tracing::info!(
                "vCPU {} stopped at RIP {:#x} (CS {cs:#x}, CR2 {cr2:#x}, RSP {:#x}, RCX {:#x}, RAX {:#x})",
                self.index,
                regs.rip,
                regs.rsp,
                regs.rcx,
                regs.rax
            );
        }
    }

    /// Parks this vCPU while the VM is paused. KVM_RUN with immediate_exit first completes any I/O
    /// the vCPU was in the middle of, so the saved state is consistent.
    fn park(&mut self, ctl: &VmControl) {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ()).or_else(|e| if e.errno() == libc::EINTR { Ok(()) } else { Err(e) });
        self.fd.set_kvm_immediate_exit(0);
        let state = match completed {
            Ok(()) => VcpuState::save(&self.fd).map_err(|e| e.to_string()),
            Err(e) => Err(format!("KVM_RUN to complete pending I/O failed: {e}")),
        };
        ctl.park(usize::from(self.index), state);
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Fills in the vCPU's view of a fatal exit: RIP and the code bytes there.
    fn describe(&mut self, mem: &GuestMemory, reason: FatalExit) -> VmExit {
        let rip = self.rip();
        match reason {
            FatalExit::Shutdown => VmExit::TripleFault { vcpu: self.index, rip },
            FatalExit::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is the
                // one KVM filled in.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                VmExit::InternalError { vcpu: self.index, suberror, rip, code: self.code_at(mem, rip) }
            }
            FatalExit::FailEntry(reason) => VmExit::FailEntry { vcpu: self.index, reason, rip },
            FatalExit::Unexpected(what) => VmExit::Unexpected { vcpu: self.index, what, rip },
        }
    }

    /// Up to 16 code bytes at guest virtual address `rip`, through KVM's address translation.
    fn code_at(&self, mem: &GuestMemory, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        (0..16u64).map_while(|i| mem.read_obj::<u8>(GuestAddress(t.physical_address + i)).ok()).collect()
    }
}

/// An exit that ends the VM, before the vCPU's registers are added to it.
enum FatalExit {
    Shutdown,
    InternalError,
    FailEntry(u64),
    Unexpected(String),
}

fn handle_exit(
    exit: VcpuExit<'_>,
    pio: &Bus,
    mmio: &Bus,
    counters: &VcpuCounters,
) -> Result<Option<GuestRequest>, FatalExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            metrics::inc(&counters.exit_io_in);
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            tracing::trace!("in {port:#x} -> {data:02x?}");
            Ok(None)
        }
        VcpuExit::IoOut(port, data) => {
            metrics::inc(&counters.exit_io_out);
            tracing::trace!("out {port:#x} <- {data:02x?}");
            Ok(pio.write(u64::from(port), data).unwrap_or(None))
        }
        VcpuExit::MmioRead(addr, data) => {
            metrics::inc(&counters.exit_mmio_read);
            if !mmio.read(addr, data) {
                tracing::trace!("MMIO read from {addr:#x}: nothing there");
                data.fill(0xff);
            }
            Ok(None)
        }
        VcpuExit::MmioWrite(addr, data) => {
            metrics::inc(&counters.exit_mmio_write);
            Ok(mmio.write(addr, data).unwrap_or_else(|_| {
                tracing::trace!("MMIO write to {addr:#x}: nothing there");
                None
            }))
        }
        VcpuExit::Shutdown => Err(FatalExit::Shutdown),
        VcpuExit::InternalError => Err(FatalExit::InternalError),
        VcpuExit::FailEntry(reason, _cpu) => Err(FatalExit::FailEntry(reason)),
        VcpuExit::Hlt => Err(FatalExit::Unexpected("the vCPU halted (HLT exit)".into())),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some(GuestRequest::PowerOff)),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(Some(GuestRequest::Reset)),
            other => Err(FatalExit::Unexpected(format!("system event {other}"))),
        },
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Ok(None),
        other => Err(FatalExit::Unexpected(format!("{other:?}"))),
    }
}
