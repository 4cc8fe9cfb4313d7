//! The pause/stop state machine a VM's vCPU threads and its controlling thread share: why the VM
//! ended (the first reason wins), the stop and pause requests, the guest's "ready" doorbell, and
//! the state each vCPU saved when it parked.
//!
//! A vCPU thread checks `should_stop` and `pause_requested` around every KVM_RUN; to pause, it
//! completes its pending I/O, saves its state and calls `park`, which blocks until the VM is
//! resumed or stopped. The controlling thread asks (`request_pause`, `end`) and waits
//! (`wait_parked`, `wait`, `wait_ready`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use super::exit::VmExit;
use super::vcpu_state::VcpuState;
use super::VmError;
use crate::sys::Locked;

/// What the VM's vCPU threads and the thread controlling the VM share: the stop and pause flags,
/// the first reason the VM ended for, and the parked vCPUs' saved state.
pub struct VmControl {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Pause as soon as the guest rings the doorbell, before it runs another instruction.
    pause_on_ready: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    ended: Condvar,
    park: Mutex<Park>,
    park_changed: Condvar,
    /// The vCPUs' exits, counted as they are handled.
    pub exits: crate::devices::metrics::VcpuCounters,
}

struct Park {
    ready: bool,
    parked: usize,
    /// Per vCPU: the state it saved when it last parked.
    states: Vec<Option<Result<VcpuState, String>>>,
}

impl VmControl {
    pub fn new(vcpus: usize) -> Self {
        Self {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            pause_on_ready: AtomicBool::new(false),
            exit: Mutex::new(None),
            ended: Condvar::new(),
            park: Mutex::new(Park { ready: false, parked: 0, states: (0..vcpus).map(|_| None).collect() }),
            park_changed: Condvar::new(),
            exits: Default::default(),
        }
    }

    /// Records why the VM ended (the first reason wins) and tells every vCPU to stop.
    pub fn end(&self, reason: VmExit) {
        let mut e = self.exit.locked();
        if e.is_none() {
            *e = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.ended.notify_all();
        drop(e);
        let _g = self.park.locked();
        self.park_changed.notify_all();
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn exit(&self) -> Option<VmExit> {
        self.exit.locked().clone()
    }

    /// Waits until the VM ends or `timeout` passes; the reason, if it ended.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> Option<VmExit> {
        let guard = self.exit.locked();
        let guard = match timeout {
            Some(t) => self.ended.wait_timeout_while(guard, t, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()).0,
            None => self.ended.wait_while(guard, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()),
        };
        guard.clone()
    }

    pub fn set_pause_on_ready(&self, on: bool) {
        self.pause_on_ready.store(on, Ordering::SeqCst);
    }

    /// The guest rang the doorbell.
    pub(super) fn set_ready(&self) {
        if self.pause_on_ready.load(Ordering::SeqCst) {
            self.request_pause();
        }
        self.park.locked().ready = true;
        self.park_changed.notify_all();
    }

    /// Waits for the doorbell; false if the VM ended or `timeout` passed first.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let g = self.park.locked();
        let g = self
            .park_changed
            .wait_timeout_while(g, timeout, |p| !p.ready && !self.should_stop())
            .unwrap_or_else(|p| p.into_inner())
            .0;
        g.ready
    }

    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for every vCPU to park.
    pub fn wait_parked(&self, timeout: std::time::Duration) -> bool {
        let g = self.park.locked();
        let n = g.states.len();
        let g = self
            .park_changed
            .wait_timeout_while(g, timeout, |p| p.parked < n && !self.should_stop())
            .unwrap_or_else(|p| p.into_inner())
            .0;
        g.parked == n
    }

    /// The state each parked vCPU saved when it parked (a copy: snapshots of one pause are alike).
    pub fn parked_states(&self) -> Result<Vec<VcpuState>, VmError> {
        let g = self.park.locked();
        if g.parked != g.states.len() || !self.pause_requested() {
            return Err(VmError::NotPaused("the VM is not paused".into()));
        }
        g.states
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(VmError::NotPaused(format!("vCPU {i}: {e}"))),
                None => Err(VmError::NotPaused(format!("vCPU {i} saved no state"))),
            })
            .collect()
    }

    pub fn resume(&self) {
        let _g = self.park.locked();
        self.pause.store(false, Ordering::SeqCst);
        self.park_changed.notify_all();
    }

    /// Called by a vCPU thread: records its state and blocks while the VM is paused.
    pub(super) fn park(&self, index: usize, state: Result<VcpuState, String>) {
        let mut g = self.park.locked();
        if let Some(slot) = g.states.get_mut(index) {
            *slot = Some(state);
        }
        g.parked += 1;
        self.park_changed.notify_all();
        let mut g = self
            .park_changed
            .wait_while(g, |_| self.pause_requested() && !self.should_stop())
            .unwrap_or_else(|p| p.into_inner());
        g.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn state(rip: u64) -> VcpuState {
        VcpuState { regs: kvm_bindings::kvm_regs { rip, ..Default::default() }, ..Default::default() }
    }

    /// A stand-in for a vCPU thread: parks whenever a pause is asked for, until the VM stops.
    fn vcpu(ctl: Arc<VmControl>, index: usize) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            let mut parks = 0;
            while !ctl.should_stop() {
                if ctl.pause_requested() {
                    ctl.park(index, Ok(state(0x1000 + index as u64)));
                    parks += 1;
                } else {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            parks
        })
    }

    #[test]
    fn the_first_reason_to_end_wins_and_wakes_waiters() {
        let ctl = Arc::new(VmControl::new(1));
        assert_eq!(ctl.wait(Some(Duration::from_millis(5))), None);
        let c = ctl.clone();
        let waiter = std::thread::spawn(move || c.wait(None));
        ctl.end(VmExit::PowerOff);
        ctl.end(VmExit::Reset);
        assert_eq!(waiter.join().unwrap(), Some(VmExit::PowerOff));
        assert!(ctl.should_stop());
        assert_eq!(ctl.exit(), Some(VmExit::PowerOff));
    }

    #[test]
    fn pause_parks_every_vcpu_with_its_state_and_resume_lets_them_go() {
        let ctl = Arc::new(VmControl::new(2));
        let threads: Vec<_> = (0..2).map(|i| vcpu(ctl.clone(), i)).collect();
        assert!(ctl.parked_states().is_err(), "not paused");
        ctl.request_pause();
        assert!(ctl.wait_parked(Duration::from_secs(30)));
        let states = ctl.parked_states().unwrap();
        assert_eq!(states.iter().map(|s| s.regs.rip).collect::<Vec<_>>(), vec![0x1000, 0x1001]);
        let again = ctl.parked_states().unwrap();
        assert_eq!(again[1].regs.rip, 0x1001, "a second snapshot of the same pause");
        ctl.resume();
        let t = std::time::Instant::now();
        while ctl.park.locked().parked > 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "resumed vCPUs never left their park");
            std::thread::yield_now();
        }
        ctl.request_pause();
        assert!(ctl.wait_parked(Duration::from_secs(30)), "parked again after a resume");
        assert_eq!(ctl.parked_states().unwrap().len(), 2, "each vCPU saved its state anew");
        ctl.end(VmExit::Stopped("test".into()));
        // A stop releases parked vCPUs.
        assert!(threads.into_iter().all(|t| t.join().unwrap() >= 2));
    }

    #[test]
    fn a_vcpu_that_could_not_save_its_state_fails_the_snapshot() {
        let ctl = Arc::new(VmControl::new(1));
        ctl.request_pause();
        let c = ctl.clone();
        let t = std::thread::spawn(move || c.park(0, Err("KVM_GET_REGS failed".into())));
        assert!(ctl.wait_parked(Duration::from_secs(30)));
        let e = ctl.parked_states().unwrap_err().to_string();
        assert!(e.contains("vCPU 0: KVM_GET_REGS failed"), "{e}");
        ctl.end(VmExit::PowerOff);
        t.join().unwrap();
    }

    #[test]
    fn ready_pauses_when_asked_and_is_seen_by_waiters() {
        let ctl = Arc::new(VmControl::new(1));
        assert!(!ctl.wait_ready(Duration::from_millis(5)));
        ctl.set_pause_on_ready(true);
        ctl.set_ready();
        assert!(ctl.wait_ready(Duration::ZERO));
        assert!(ctl.pause_requested(), "the doorbell asked for a pause before the guest runs on");
        // An ended VM never becomes ready.
        let ended = VmControl::new(1);
        ended.end(VmExit::PowerOff);
        assert!(!ended.wait_ready(Duration::from_secs(5)));
        assert!(!ended.wait_parked(Duration::from_secs(5)));
    }
}
