//! Boot timing: the boot-timer MMIO device (the guest's init writes 123 at its base, Firecracker's
//! protocol), and the timeline that it, the kernel's port-0x80 markers and the VMM itself fill in.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{BusDevice, GuestRequest};
use crate::sys::Locked;

/// The byte the guest writes to signal that user space is up.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// CPU time this process has used so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A moment of the boot: wall time since process start and since VM start, and process CPU time.
#[derive(Clone, Copy, Debug)]
pub struct BootEvent {
    pub since_process: Duration,
    pub since_vm: Duration,
    /// CPU time the whole process used since the VM started (all of its threads: vCPUs included),
    /// when its clock follows it (a booted VM's; not a clone's).
    pub cpu: Option<Duration>,
}

/// The boot's milestones, each recorded the first time it happens.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTimeline {
    /// vCPU 0 is about to enter the guest for the first time.
    pub first_instruction: Option<BootEvent>,
    /// The kernel's start_kernel() (port 0x80 marker 0x40, ember's guest kernel).
    pub kernel_start: Option<BootEvent>,
    /// The kernel is about to run init (port 0x80 marker 0x41).
    pub run_init: Option<BootEvent>,
    /// The guest's init wrote the boot-timer byte.
    pub boot_timer: Option<BootEvent>,
    /// The guest's first port or MMIO access: for a restored clone, its first observable action.
    pub first_io: Option<BootEvent>,
}

/// The clock boot events are measured against, shared by the VMM and its timing devices.
pub struct BootClock {
    process_start: Instant,
    vm_start: Instant,
    /// The process's CPU time at VM start, when followed: reading it costs a walk over every
    /// thread of the process (microseconds each), so a clone's clock, read on its restore and
    /// first entry in processes that hold thousands of threads, leaves it out.
    cpu_start: Option<Duration>,
    timeline: Mutex<BootTimeline>,
}

impl BootClock {
    /// A booted VM's clock: its events carry the process's CPU time too.
    pub fn new(process_start: Instant) -> Arc<Self> {
        Self::with_cpu(process_start, Some(process_cpu_time()))
    }

    /// A clone's clock (started now): wall time only.
    pub fn wall_only() -> Arc<Self> {
        Self::with_cpu(Instant::now(), None)
    }

    fn with_cpu(process_start: Instant, cpu_start: Option<Duration>) -> Arc<Self> {
        Arc::new(Self { process_start, vm_start: Instant::now(), cpu_start, timeline: Mutex::default() })
    }

    pub fn now(&self) -> BootEvent {
        let now = Instant::now();
        BootEvent {
            since_process: now.duration_since(self.process_start),
            since_vm: now.duration_since(self.vm_start),
            cpu: self.cpu_start.map(|c| process_cpu_time().saturating_sub(c)),
        }
    }

    /// Records `field` now unless it was already recorded; returns the event when it is new.
    pub fn record(&self, field: fn(&mut BootTimeline) -> &mut Option<BootEvent>) -> Option<BootEvent> {
        let mut t = self.timeline.locked();
        let slot = field(&mut t);
        if slot.is_some() {
            return None;
        }
        let e = self.now();
        *slot = Some(e);
        Some(e)
    }

    pub fn timeline(&self) -> BootTimeline {
        *self.timeline.locked()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl std::fmt::Display for BootEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} ms since VM start, {:.3} ms since process start", ms(self.since_vm), ms(self.since_process))?;
        match self.cpu {
            Some(cpu) => write!(f, ", {:.3} ms CPU since VM start", ms(cpu)),
            None => Ok(()),
        }
    }
}

/// The boot-timer MMIO device.
pub struct BootTimer {
    clock: Arc<BootClock>,
}

impl BootTimer {
    pub fn new(clock: Arc<BootClock>) -> Self {
        Self { clock }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestRequest> {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            if let Some(e) = self.clock.record(|t| &mut t.boot_timer) {
                tracing::info!("guest boot timer: {e}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let clock = BootClock::new(Instant::now());
        let mut t = BootTimer::new(clock.clone());
        t.write(0, &[1]);
        t.write(8, &[BOOT_TIMER_MAGIC]);
        assert!(clock.timeline().boot_timer.is_none());
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = clock.timeline().boot_timer.unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(clock.timeline().boot_timer.unwrap().since_vm, first.since_vm);
        assert!(first.since_process >= first.since_vm);
    }
}
