//! VM shells: the parts of a clone that do not depend on which clone it is, made ahead of the
//! restore that needs them.
//!
//! A shell is a KVM VM with its guest RAM and mailbox memory slots registered over the shell's
//! mappings (RAM anonymous and unpopulated, or the template's memory file, see below; the mailbox
//! the clone's own, made with the shell), the TSS, the in-kernel irqchip, the PIT when the
//! template's guest may use it
//! ([`VmState::pit_in_use`](super::vm_state::VmState::pit_in_use)), and its vCPUs created and
//! loaded with the part of the template's vCPU state that every clone shares (CPUID, TSC
//! frequency, registers, FPU, MSRs: [`VcpuState::preload`]). Each vCPU's thread and each device's
//! thread are started with the shell too, confined with their seccomp filters, and wait. A restore
//! maps the template's memory file over the anonymous RAM range (`MAP_FIXED | MAP_PRIVATE`: KVM
//! follows the change through its MMU notifier), and loads what depends on when the clone starts
//! (clock, PIT, interrupt controllers, local APICs, TSCs, pending events) and its devices, on their
//! threads.
//!
//! The slots are registered before the irqchip exists, which keeps KVM_SET_USER_MEMORY_REGION
//! cheap (registering them after it is several milliseconds on some hosts), and KVM_CREATE_VM,
//! whose cost grows with the number of VMs a process holds, leaves the restore path.
//!
//! Made for a template whose memory file is known (what `Template::shell_spec` gives), a shell
//! maps that file when it is made and takes the copy-on-write fault of each vCPU's kvm-clock page
//! (which the restore writes), so that the restore changes no mapping of the process: each
//! `mmap`, `munmap`, `mprotect` (a new thread's guard pages among them) or copy-on-write fault of
//! a mapped page runs the MMU notifier of every VM in the process, which costs milliseconds in a
//! process that holds a thousand.
//!
//! [`ShellMaker`] keeps a few shells of one template ready on a thread of its own.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::persist::SnapshotState;
use super::vcpu::{ParkedThread, Vcpu};
use super::vcpu_state::{Held, VcpuState};
use super::VmError;
use crate::channel::mailbox::Mailbox;
use crate::devices::virtio::thread::{ParkedDevice, Threads};
use crate::memory::GuestMemory;
use crate::snapshot::MemoryFile;
use crate::sys::Locked;

/// What a shell is made for: the machine's RAM and each vCPU's state (of which the shell loads
/// the part every clone shares), and the template's memory when known (the shell then maps it
/// when it is made, and the restore has no mapping left to do).
#[derive(Clone)]
pub struct ShellSpec {
    pub mem_bytes: u64,
    /// Each vCPU's state, whose shared part the shell loads; `None` for a shell made before its
    /// snapshot is known ([`ShellSpec::generic`]): the restore loads it.
    pub vcpus: Vec<Option<VcpuState>>,
    pub memory: Option<Arc<MemoryFile>>,
    /// The clone's device threads, by name (started ahead, confined with the device filter).
    pub device_threads: Vec<&'static str>,
    /// Where the clones' mailboxes are named files (a worker's run directory): the shell makes
    /// its mailbox there under a name of its own, which the restore renames.
    pub mailbox_dir: Option<std::path::PathBuf>,
    /// Whether the clones get a PIT ([`VmState::pit_in_use`](super::vm_state::VmState::pit_in_use)).
    pub pit: bool,
    /// How many virtio devices the clones have (their interrupt lines are wired ahead).
    pub virtio_devices: usize,
    /// Whether the shell starts the clone's vCPU and device threads, confined (a clone that runs
    /// without seccomp starts its own: threads made ahead are confined).
    pub threads_ahead: bool,
}

impl std::fmt::Debug for ShellSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellSpec")
            .field("mem_bytes", &self.mem_bytes)
            .field("vcpus", &self.vcpus.len())
            .field("pit", &self.pit)
            .field("threads_ahead", &self.threads_ahead)
            .field("memory", &self.memory.is_some())
            .field("device_threads", &self.device_threads)
            .field("mailbox_dir", &self.mailbox_dir)
            .finish()
    }
}

impl ShellSpec {
    /// The shell a clone of `state` needs (its memory mapped at the restore).
    pub fn of(state: &SnapshotState) -> Self {
        let device_threads = super::devices::device_threads(state.devices.drives.len(), state.devices.nets.len());
        Self {
            mem_bytes: state.machine.mem_bytes,
            vcpus: state.vcpus.iter().cloned().map(Some).collect(),
            memory: None,
            device_threads,
            mailbox_dir: None,
            pit: state.vm.pit_in_use(),
            virtio_devices: state.devices.virtio.len(),
            threads_ahead: true,
        }
    }

    /// A shell made before its snapshot is known, for a guest of `mem_bytes` and `vcpus` vCPUs
    /// that uses no PIT (a Linux guest after boot) and has a vsock device: what a process that
    /// will load some snapshot soon can make while it waits (`ember firecracker`, Firecracker's
    /// default machine). A snapshot of another shape restores into a shell made for it.
    pub fn generic(mem_bytes: u64, vcpus: usize) -> Self {
        Self {
            mem_bytes,
            vcpus: vec![None; vcpus],
            memory: None,
            device_threads: super::devices::device_threads(0, 0),
            mailbox_dir: None,
            pit: false,
            virtio_devices: 1,
            threads_ahead: true,
        }
    }
}

/// A VM made ahead of a restore (see the module's documentation).
pub struct VmShell {
    // Drop order: vCPUs and the VM fd before the memory its slots point at.
    /// A thread per vCPU, started and confined, waiting for the VM to start.
    pub(super) parked: Vec<ParkedThread>,
    /// A thread per device that has one, started and confined, waiting for its device.
    pub(super) devices: Vec<ParkedDevice>,
    pub(super) vcpus: Vec<Vcpu>,
    /// What each vCPU the spec had no state for holds: a guest of this shape's boot CPUID, the
    /// host's TSC rate.
    pub(super) held: Vec<Option<Held>>,
    /// The clone's interrupt lines, wired ([`super::devices::irqfds_ahead`]).
    pub(super) irqfds: Vec<(u32, vmm_sys_util::eventfd::EventFd)>,
    pub(super) vm: VmFd,
    pub(super) spec: ShellSpec,
    /// Guest RAM: the template's memory mapped private when the spec had it, else anonymous until
    /// the restore maps the template over it.
    ram: GuestMemory,
    /// The memory file `ram` maps (device, inode), if any.
    mapped: Option<(u64, u64)>,
    /// The clone's mailbox, mapped where the memory slot points: anonymous, or a file in the
    /// spec's `mailbox_dir` (see [`VmShell::take_mailbox`]).
    mailbox: Option<Mailbox>,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell").field("vcpus", &self.vcpus.len()).field("mem_bytes", &self.spec.mem_bytes).finish()
    }
}

impl VmShell {
    /// Makes a shell for clones of `spec`.
    pub fn new(spec: &ShellSpec) -> Result<Self, VmError> {
        let (ram, mapped) = match &spec.memory {
            Some(m) if m.mem_bytes() == spec.mem_bytes => {
                let id = m.identity().map_err(|e| VmError::Shell(format!("the template's memory: {e}")))?;
                (m.map_private()?, Some(id))
            }
            // Anonymous and unpopulated until the restore maps the template over it.
            _ => (super::guest_memory(spec.mem_bytes)?, None),
        };
        let named = spec.mailbox_dir.as_ref().map(|d| {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            d.join(format!(".shell-{}-{n}.mailbox", std::process::id()))
        });
        let mailbox = Mailbox::create(named.as_deref())?;
        // SAFETY: the RAM and mailbox ranges stay mapped (the shell's, then the clone's
        // mappings over them) until after the VM fd is closed: the shell, and the Vm made from
        // it, drop the VM fd first.
        let (kvm, vm) = unsafe { super::create_vm(&super::memory_slots(&ram, mailbox.host_addr()), spec.pit) }?;
        let mut vcpus = Vec::with_capacity(spec.vcpus.len());
        let mut parked = Vec::with_capacity(spec.vcpus.len());
        let mut held = Vec::with_capacity(spec.vcpus.len());
        let count = u8::try_from(spec.vcpus.len()).map_err(|_| VmError::Shell("too many vCPUs".into()))?;
        let supported = match spec.vcpus.iter().any(Option::is_none) {
            true => Some(
                kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(super::kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
            ),
            false => None,
        };
        for (i, state) in spec.vcpus.iter().enumerate() {
            let v = Vcpu::new(&vm, i as u8)?;
            let holds = match (state, &supported) {
                (Some(state), _) => {
                    state.preload(&v.fd)?;
                    None
                }
                (None, None) => None,
                // The CPUID a guest of this shape boots with: a snapshot of one holds it but for
                // the bits KVM derives, and its restore then need not load it (a slow ioctl).
                (None, Some(supported)) => {
                    let cpuid = super::boot::cpuid::for_vcpu(supported, i as u8, count);
                    v.fd.set_cpuid2(&cpuid).map_err(super::kvm_err("KVM_SET_CPUID2"))?;
                    // As KVM holds it (what a snapshot's vCPU state has from KVM_GET_CPUID2).
                    let cpuid =
                        v.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                            .map_err(super::kvm_err("KVM_GET_CPUID2"))?
                            .as_slice()
                            .to_vec();
                    let tsc_khz = v.fd.get_tsc_khz().map_err(super::kvm_err("KVM_GET_TSC_KHZ"))?;
                    Some(Held { cpuid, tsc_khz })
                }
            };
            held.push(holds);
            if spec.threads_ahead {
                parked.push(super::vcpu::park(i as u8, crate::seccomp::vcpu_filter(v.fd.as_raw_fd())?)?);
            }
            if let (Some(state), Some(_)) = (state, mapped) {
                // Its copy-on-write fault taken now, not at the restore (which writes it).
                state.copy_kvmclock_page(&ram)?;
            }
            vcpus.push(v);
        }
        let devices = match spec.threads_ahead {
            true => {
                let filter = crate::seccomp::shared_device_filter()
                    .map_err(|e| VmError::Shell(format!("device filter: {e}")))?;
                Threads::park(&spec.device_threads, &filter).map_err(VmError::Thread)?
            }
            false => Vec::new(),
        };
        let irqfds = super::devices::irqfds_ahead(&vm, spec.virtio_devices)
            .map_err(|e| VmError::Shell(format!("interrupt lines: {e}")))?;
        Ok(Self { parked, devices, vcpus, held, irqfds, vm, ram, mapped, mailbox: Some(mailbox), spec: spec.clone() })
    }

    /// How many threads the shell started (its vCPUs' and devices', confined, waiting).
    pub fn threads_ahead(&self) -> usize {
        self.parked.len() + self.devices.len()
    }

    /// Whether this shell can take a clone of `state`.
    pub fn fits(&self, state: &SnapshotState) -> bool {
        let s = &self.spec;
        s.mem_bytes == state.machine.mem_bytes
            && s.pit == state.vm.pit_in_use()
            && s.vcpus.len() == state.vcpus.len()
            && s.vcpus.iter().zip(&state.vcpus).all(|(a, b)| a.as_ref().is_none_or(|a| a.preloads_as(b)))
    }

    /// Whether the restore of `state` into this shell finds each vCPU's CPUID loaded already
    /// (by the spec's state, or as a generic shell's boot CPUID that the snapshot still has).
    pub fn holds_cpuid_of(&self, state: &SnapshotState) -> bool {
        self.spec.vcpus.len() == state.vcpus.len()
            && self.spec.vcpus.iter().zip(&self.held).zip(&state.vcpus).all(|((spec, held), s)| match (spec, held) {
                (Some(spec), _) => spec.cpuid == s.cpuid,
                (None, Some(held)) => super::boot::cpuid::holds(&held.cpuid, &s.cpuid),
                (None, None) => false,
            })
    }

    /// Maps `memory` copy-on-write over the shell's RAM (the guest sees the template's pages from
    /// its first access; KVM drops whatever it had mapped there) and returns the clone's RAM;
    /// nothing to do when the shell was made with that very file mapped (its guest never ran, so
    /// the mapping is as the file is).
    pub(super) fn map_template(&self, memory: &MemoryFile) -> Result<GuestMemory, VmError> {
        if self.mapped.is_some() && memory.identity().ok() == self.mapped {
            return Ok(self.ram.clone());
        }
        let mut off = 0u64;
        for r in self.ram.iter() {
            // SAFETY: replaces the shell's own anonymous mapping of exactly this range (owned by
            // `self.ram`, which the clone keeps) with a private mapping of the template file; the
            // guest has not run, and nothing else refers to the range's old contents.
            let p = unsafe {
                libc::mmap(
                    r.as_ptr().cast(),
                    r.len() as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    memory.file().as_raw_fd(),
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(VmError::Shell(format!("cannot map the template: {}", std::io::Error::last_os_error())));
            }
            off += r.len();
        }
        Ok(self.ram.clone())
    }

    /// The clone's mailbox at `path` (none: anonymous): the shell's, renamed to `path` when it
    /// made a named one; else a new one mapped over the shell's.
    pub(super) fn take_mailbox(&mut self, path: Option<&std::path::Path>) -> Result<Mailbox, VmError> {
        let made = match (path, self.mailbox.take()) {
            (None, Some(m)) if !m.is_named() => return Ok(m),
            (Some(p), Some(mut m)) if m.is_named() => match m.rename(p) {
                Ok(()) => return Ok(m),
                Err(e) => {
                    tracing::debug!("the shell's mailbox cannot become {}: {e}", p.display());
                    Some(m)
                }
            },
            (_, made) => made,
        };
        // SAFETY: the range is the shell's mailbox mapping, given up to the new mailbox; the
        // shell's memory slot for it follows the new mapping.
        Ok(unsafe { Mailbox::create_at(path, made.map(Mailbox::into_range)) }?)
    }
}

/// Keeps up to `ahead` shells of one spec ready, made on a thread of its own.
pub struct ShellMaker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<MakerState>,
    wake: Condvar,
}

struct MakerState {
    ready: Vec<VmShell>,
    stop: bool,
    /// The last failure to make one (the maker backs off and tries again).
    failed: Option<String>,
}

/// How long the maker waits after a failure before trying again.
const RETRY: Duration = Duration::from_secs(1);

impl ShellMaker {
    /// Starts a thread that keeps `ahead` shells for `spec` ready.
    pub fn start(spec: ShellSpec, ahead: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(MakerState { ready: Vec::with_capacity(ahead), stop: false, failed: None }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread =
            std::thread::Builder::new().name("vm-shells".into()).spawn(move || make_ahead(&s, &spec, ahead))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// A ready shell, if there is one (the maker makes another).
    pub fn take(&self) -> Option<VmShell> {
        let mut st = self.shared.state.locked();
        let shell = st.ready.pop();
        self.shared.wake.notify_one();
        shell
    }

    /// How many shells are ready now.
    pub fn ready(&self) -> usize {
        self.shared.state.locked().ready.len()
    }

    /// The last error making a shell, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.state.locked().failed.clone()
    }

    /// Waits until `n` shells are ready (or `timeout` passes); whether they are.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.ready() < n {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
}

impl Drop for ShellMaker {
    fn drop(&mut self) {
        self.shared.state.locked().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn make_ahead(shared: &Shared, spec: &ShellSpec, ahead: usize) {
    let mut st = shared.state.locked();
    loop {
        if st.stop {
            return;
        }
        if st.ready.len() >= ahead {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        drop(st);
        let made = VmShell::new(spec);
        st = shared.state.locked();
        match made {
            Ok(shell) => {
                st.ready.push(shell);
                st.failed = None;
            }
            Err(e) => {
                crate::log_limited!(warn, "cannot make a VM shell ahead: {e}");
                st.failed = Some(e.to_string());
                st = shared.wake.wait_timeout(st, RETRY).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
    }
}
