//! A vCPU's complete KVM state, as saved into a snapshot and restored into a clone.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::boot::cpuid;
use super::{kvm_err, VmError};
use crate::memory::GuestMemory;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// What a vCPU made before its snapshot was known holds already: the CPUID it was given (as KVM
/// holds it) and its TSC rate (see [`VcpuState::preload_over`]).
#[derive(Clone, Debug)]
pub struct Held {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: u32,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    /// The guest TSC frequency; a clone on a host with another frequency gets this one (when KVM can
    /// scale the TSC) so that guest time keeps its pace.
    pub tsc_khz: u32,
}

/// The TSC-deadline MSR (KVM interprets it against the TSC it has when it is set).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_TSC: u32 = 0x10;
/// Where the guest asked KVM to keep this vCPU's kvm-clock page (bit 0: enabled): the current
/// and the legacy MSR.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// Where the guest asked KVM to write the host's boot time (the current and the legacy MSR).
/// Setting them makes KVM write that page of guest memory at once; the guest reads it when its
/// kernel starts or resumes only, and a clone's wall clock is set by its agent: a restore leaves
/// them unset, and the page (a copy-on-write fault, running every MMU notifier of the process)
/// untouched.
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_WALL_CLOCK: u32 = 0x11;

/// `struct pvclock_vcpu_time_info`: the fields of a kvm-clock page that anchor it.
const PVCLOCK_VERSION: u64 = 0;
const PVCLOCK_TSC_TIMESTAMP: u64 = 8;
const PVCLOCK_SYSTEM_TIME: u64 = 16;
const PVCLOCK_LEN: u64 = 32;

/// The most entries one KVM_GET_MSRS reads.
const MSR_BATCH: usize = 255;

/// The MSRs this host's KVM can save for a vCPU: its MSR index list, less those that fail to read
/// (KVM lists some that a given vCPU model rejects). Worked out once per process.
fn saveable_msrs(vcpu: &VcpuFd) -> Result<&'static [u32], VmError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l);
    }
    let kvm = super::kvm()?;
    let listed = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    // KVM_GET_MSRS reads entries in order and stops at the first it cannot: each call takes
    // the readable run up to the next unreadable MSR, which is left out (a few calls, not one per
    // MSR).
    let mut ok = Vec::new();
    let mut rest = listed.as_slice();
    while !rest.is_empty() {
        // (KVM reads at most 256 entries per call.)
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmError::Kvm("KVM_GET_MSRS", libc::ENOMEM))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?.min(batch.len());
        ok.extend_from_slice(&batch[..n]);
        // The one at `n` could not be read (unless the whole batch was).
        rest = &rest[(n + usize::from(n < batch.len())).min(rest.len())..];
    }
    Ok(LIST.get_or_init(|| ok))
}

/// Sets `entries`; every one must be taken.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VmError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| VmError::Kvm("KVM_SET_MSRS", libc::E2BIG))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        tracing::error!("KVM refused MSR {:#x} of the snapshot", entries[n].index);
        return Err(VmError::Kvm("KVM_SET_MSRS", libc::EINVAL));
    }
    Ok(())
}

/// The MSRs `indices` as KVM has them now, in one KVM_GET_MSRS.
fn get_msrs<const N: usize>(vcpu: &VcpuFd, indices: [u32; N]) -> Result<[u64; N], VmError> {
    let mut msrs = Msrs::from_entries(&indices.map(|index| kvm_msr_entry { index, ..Default::default() }))
        .map_err(|_| VmError::Kvm("KVM_GET_MSRS", libc::ENOMEM))?;
    if vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))? != N {
        return Err(VmError::Kvm("KVM_GET_MSRS", libc::EINVAL));
    }
    let read = msrs.as_slice();
    Ok(std::array::from_fn(|i| read[i].data))
}

/// The guest's TSC as KVM has it now.
fn guest_tsc(vcpu: &VcpuFd) -> Result<u64, VmError> {
    get_msrs(vcpu, [MSR_IA32_TSC]).map(|[tsc]| tsc)
}

/// A snapshot's TSC deadline `deadline` (0: disarmed), saved when the TSC read `then`, for a
/// clone whose TSC reads `now`: as far ahead of `now` as it was of `then`, at once (1) if it had
/// passed. Where KVM can give a clone the snapshot's TSC, `now` is `then` plus the few
/// microseconds since it was set; where it cannot (the guest reads the host's TSC), `now` is
/// ahead by the snapshot's age, and the deadline as saved would have passed long ago: the clone
/// would begin by taking a stale timer interrupt, its kernel's tick, before anything else.
fn shifted_deadline(deadline: u64, then: Option<u64>, now: u64) -> u64 {
    let Some(then) = then.filter(|_| deadline != 0) else { return deadline };
    let due_in = i128::from(deadline) - i128::from(then);
    (i128::from(now) + due_in).clamp(1, i128::from(u64::MAX)) as u64
}

/// Where a vCPU's TSC deadline `deadline` (0: disarmed) had passed when its TSC read `tsc`: the
/// deadline `grace` ticks from `tsc` (see [`defer_overdue_deadline`]).
fn deferred_deadline(tsc: u64, deadline: u64, grace: u64) -> Option<u64> {
    (deadline != 0 && deadline <= tsc).then(|| tsc.saturating_add(grace))
}

/// Moves the vCPU's TSC deadline `grace` TSC ticks ahead when it has passed (whether it did).
/// For a vCPU woken from the agent's idle park for the first time: a clone parks at once after
/// its restore, so its timer falls due while it waits in a pool, and at its first call the guest
/// would take that interrupt, then run the work its restore left (reseeding, woken tasks) before
/// the agent sees the call. Moved, the agent answers first and the tick follows `grace` later.
pub fn defer_overdue_deadline(vcpu: &VcpuFd, grace: u64) -> Result<bool, VmError> {
    let [tsc, deadline] = get_msrs(vcpu, [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE])?;
    let Some(moved) = deferred_deadline(tsc, deadline, grace) else { return Ok(false) };
    set_msrs(vcpu, &[kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: moved, ..Default::default() }])?;
    Ok(true)
}

/// Works out what saving needs from outside a confined vCPU thread (the MSR list needs /dev/kvm).
pub fn prepare(vcpu: &VcpuFd) -> Result<(), VmError> {
    saveable_msrs(vcpu).map(|_| ())
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (paused, with its pending I/O completed).
    pub fn save(vcpu: &VcpuFd) -> Result<Self, VmError> {
        let indices = saveable_msrs(vcpu)?;
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmError::Kvm("KVM_GET_MSRS", libc::ENOMEM))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(VmError::Kvm("KVM_GET_MSRS", libc::EINVAL));
        }
        Ok(Self {
            cpuid: vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?.as_slice().to_vec(),
            msrs: msrs.as_slice().to_vec(),
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            tsc_khz: vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?,
        })
    }

    /// Loads the part of this state that every clone of the snapshot shares into a vCPU made
    /// ahead of the restore (see [`super::shell`]): TSC frequency, CPUID, MP state, registers,
    /// FPU/XSAVE, XCRs, debug registers and the MSRs but the wall-clock ones, the TSC and its
    /// deadline. [`VcpuState::finish`] loads the rest. The order follows what KVM needs: CPUID first (it
    /// shapes what the rest may contain), MSRs after the registers.
    pub fn preload(&self, vcpu: &VcpuFd) -> Result<(), VmError> {
        self.preload_over(vcpu, None)
    }

    /// [`VcpuState::preload`] into a vCPU that holds `held` already (a shell's made before its
    /// snapshot was known): the CPUID is loaded again only where `held`'s would not end up as
    /// this state's ([`cpuid::holds`]; KVM takes a vCPU's CPUID again until it first runs), the
    /// TSC rate only where it differs.
    pub fn preload_over(&self, vcpu: &VcpuFd, held: Option<&Held>) -> Result<(), VmError> {
        let tsc_khz = match held {
            Some(h) => Some(h.tsc_khz),
            None => vcpu.get_tsc_khz().ok(),
        };
        if tsc_khz != Some(self.tsc_khz) {
            if let Err(e) = vcpu.set_tsc_khz(self.tsc_khz) {
                crate::log_limited!(
                    warn,
                    "cannot set the guest TSC to {} kHz ({e}); guest time may drift",
                    self.tsc_khz
                );
            }
        }
        if !held.is_some_and(|h| cpuid::holds(&h.cpuid, &self.cpuid)) {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VmError::Kvm("KVM_SET_CPUID2", libc::E2BIG))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }
        vcpu.set_mp_state(self.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer came from KVM_GET_XSAVE, legacy size: ember never enables XSAVE2-only
        // (AMX) state in a guest's CPUID, so no larger buffer is needed.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        let msrs: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|e| {
                !matches!(e.index, MSR_KVM_WALL_CLOCK_NEW | MSR_KVM_WALL_CLOCK | MSR_IA32_TSC | MSR_IA32_TSC_DEADLINE)
            })
            .copied()
            .collect();
        set_msrs(vcpu, &msrs)
    }

    /// Loads the part of the state that depends on when the clone starts: the local APIC (its
    /// timer counts from when it is set), the TSC, the TSC deadline (after the APIC, whose timer
    /// mode decides whether KVM takes a deadline, and moved with the TSC) and the pending events
    /// last. Returns the guest's TSC as KVM has it once set.
    pub fn finish(&self, vcpu: &VcpuFd) -> Result<u64, VmError> {
        vcpu.set_lapic(&self.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        if let Some(tsc) = self.msr(MSR_IA32_TSC) {
            set_msrs(vcpu, &[kvm_msr_entry { index: MSR_IA32_TSC, data: tsc, ..Default::default() }])?;
        }
        let now = guest_tsc(vcpu)?;
        // (A vCPU's deadline is 0, disarmed, until set.)
        if let Some(deadline) = self.msr(MSR_IA32_TSC_DEADLINE).filter(|&d| d != 0) {
            let deadline = shifted_deadline(deadline, self.msr(MSR_IA32_TSC), now);
            set_msrs(vcpu, &[kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: deadline, ..Default::default() }])?;
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(now)
    }

    /// Whether this vCPU's TSC deadline (its kernel's tick) had passed when it was saved: every
    /// clone then takes that timer interrupt before anything else.
    pub fn timer_was_due(&self) -> bool {
        matches!((self.msr(MSR_IA32_TSC_DEADLINE), self.msr(MSR_IA32_TSC)), (Some(d), Some(tsc)) if d != 0 && d <= tsc)
    }

    /// The saved value of MSR `index`, if the snapshot has it.
    fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }

    /// Whether a vCPU preloaded with `self` ([`VcpuState::preload`]) holds `other`'s shared part.
    pub fn preloads_as(&self, other: &VcpuState) -> bool {
        self.tsc_khz == other.tsc_khz
            && self.cpuid == other.cpuid
            && self.mp_state == other.mp_state
            && self.regs == other.regs
            && self.sregs == other.sregs
            && self.xsave.region == other.xsave.region
            && self.xcrs == other.xcrs
            && self.debugregs == other.debugregs
            && self.msrs == other.msrs
    }

    /// Re-anchors this vCPU's kvm-clock page (in the clone's memory) at the snapshot's clock:
    /// `tsc`, the guest's TSC as KVM has it now ([`VcpuState::finish`]), maps to `clock_ns`, the
    /// kvm-clock value when the snapshot was taken. KVM rewrites the page itself on the vCPU's
    /// first entry where it can; where the host cannot offset a guest's TSC (the guest reads the
    /// host's), the page from the snapshot would otherwise put the clone's clock ahead by the snapshot's age, and the guest kernel
    /// would replay that gap timer by timer before anything else. Nothing to do when the guest has
    /// no kvm-clock.
    pub fn anchor_kvmclock(&self, mem: &GuestMemory, clock_ns: u64, tsc: u64) -> Result<(), VmError> {
        let Some(page) = self.kvmclock_page(mem)? else { return Ok(()) };
        let at = |offset| page.unchecked_add(offset);
        // A write first: the page (the template's, mapped copy-on-write) is then copied on a
        // fault that maps nothing before. Read first, it would be mapped read-only and then
        // copied on a write fault, which runs every MMU notifier of the process (each VM's),
        // milliseconds in a process that holds a thousand clones. The guest is not running.
        mem.write_obj(tsc, at(PVCLOCK_TSC_TIMESTAMP)).map_err(VmError::GuestMemory)?;
        let version: u32 = mem.read_obj(at(PVCLOCK_VERSION)).map_err(VmError::GuestMemory)?;
        // Even: no update in progress; changed: a reader that raced nothing still sees a new page.
        mem.write_obj((version & !1).wrapping_add(2), at(PVCLOCK_VERSION)).map_err(VmError::GuestMemory)?;
        mem.write_obj(clock_ns, at(PVCLOCK_SYSTEM_TIME)).map_err(VmError::GuestMemory)?;
        Ok(())
    }

    /// Where this vCPU's kvm-clock page is, if the guest enabled one.
    fn kvmclock_page(&self, mem: &GuestMemory) -> Result<Option<GuestAddress>, VmError> {
        let Some(msr) = self.msrs.iter().find(|e| e.index == MSR_KVM_SYSTEM_TIME_NEW || e.index == MSR_KVM_SYSTEM_TIME)
        else {
            return Ok(None);
        };
        if msr.data & 1 == 0 {
            return Ok(None);
        }
        let page = GuestAddress(msr.data & !1);
        // The page's address is the guest's choice: outside its RAM, the snapshot is refused.
        if !mem.check_range(page, PVCLOCK_LEN as usize) {
            return Err(VmError::Kvm("kvm-clock page outside guest memory", libc::EFAULT));
        }
        Ok(Some(page))
    }

    /// Takes the copy-on-write fault of this vCPU's kvm-clock page in `mem` (a VM shell's view of
    /// the template) now, writing one word of it back as it is, so that the restore that
    /// re-anchors it ([`VcpuState::anchor_kvmclock`]) writes a private page: made with the shell
    /// (KVM may have mapped the page read-only when the preloaded MSRs were set), the fault runs
    /// every MMU notifier of the process, off the restore path.
    pub fn copy_kvmclock_page(&self, mem: &GuestMemory) -> Result<(), VmError> {
        let Some(page) = self.kvmclock_page(mem)? else { return Ok(()) };
        let at = page.unchecked_add(PVCLOCK_TSC_TIMESTAMP);
        let tsc: u64 = mem.read_obj(at).map_err(VmError::GuestMemory)?;
        mem.write_obj(tsc, at).map_err(VmError::GuestMemory)
    }
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            xsave: kvm_xsave { region: self.xsave.region, ..Default::default() },
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_keeps_its_distance_from_the_tsc() {
        // Disarmed stays disarmed.
        assert_eq!(shifted_deadline(0, Some(1_000), 5_000_000), 0);
        // Due 300 ticks after the snapshot's TSC: 300 ticks after the clone's, whichever way the
        // TSC moved (a host that could not offset it, a host whose TSC restarted).
        assert_eq!(shifted_deadline(1_300, Some(1_000), 5_000_000), 5_000_300);
        assert_eq!(shifted_deadline(5_000_300, Some(5_000_000), 1_000), 1_300);
        assert_eq!(shifted_deadline(1_300, Some(1_000), 1_000), 1_300);
        // Passed at the snapshot: due at once, never wrapped into the far future or disarmed.
        assert!(shifted_deadline(900, Some(1_000), 5_000_000) <= 5_000_000);
        assert_eq!(shifted_deadline(900, Some(100_000), 1_000), 1);
        assert_eq!(shifted_deadline(u64::MAX, Some(0), 10), u64::MAX);
        // No TSC in the snapshot: the deadline as it was saved.
        assert_eq!(shifted_deadline(1_300, None, 5_000_000), 1_300);
    }

    #[test]
    fn only_an_armed_deadline_that_has_passed_is_deferred() {
        assert_eq!(deferred_deadline(1_000, 0, 50), None, "disarmed");
        assert_eq!(deferred_deadline(1_000, 1_001, 50), None, "not due yet");
        assert_eq!(deferred_deadline(1_000, 1_000, 50), Some(1_050));
        assert_eq!(deferred_deadline(1_000, 3, 50), Some(1_050));
        assert_eq!(deferred_deadline(u64::MAX - 1, 5, 50), Some(u64::MAX));
    }

    #[test]
    fn a_snapshot_says_whether_its_timer_was_due() {
        let state = |deadline: u64| VcpuState {
            msrs: vec![
                kvm_msr_entry { index: MSR_IA32_TSC, data: 1_000, ..Default::default() },
                kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: deadline, ..Default::default() },
            ],
            ..Default::default()
        };
        assert!(state(900).timer_was_due());
        assert!(!state(1_300).timer_was_due());
        assert!(!state(0).timer_was_due(), "disarmed");
        assert!(!VcpuState::default().timer_was_due());
    }
}
