//! The agent's side of the mailbox (layout and rules: ember_abi::mailbox): polled from user space,
//! so that an invocation costs no system call, interrupt or page fault in the guest.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use ember_abi::mailbox::*;
use ember_abi::{Status, MAX_FUNCTION_LEN};

use crate::control::ControlPage;
use crate::devmem::PhysPage;
use crate::functions::{Functions, Invocation};
use crate::managed::Log;

/// How long the agent polls for the next request after an answer before it lets the vCPU wait
/// host-side: a window between these bounds, see [`SpinWindow`].
const MAX_SPIN: std::time::Duration = std::time::Duration::from_millis(100);
const MIN_SPIN: std::time::Duration = std::time::Duration::from_millis(1);
/// Bounds of the pause between looks at whether other tasks still want the CPU (see `serve`).
/// Each look is guest kernel work; with many clones sharing few host cores, frequent looks kept
/// the guests busy enough that their other tasks never finished (64 clones on 2 cores never went
/// quiet with a 16 ms bound).
const MIN_NAP: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_NAP: std::time::Duration = std::time::Duration::from_millis(128);

pub struct Mailbox {
    region: PhysPage,
    /// Reused request and response buffers: no allocation (and no page fault) per invocation.
    request: Vec<u8>,
    response: Vec<u8>,
    /// /proc/loadavg, opened before the snapshot point (a clone's first look at it then costs no
    /// path lookup).
    loadavg: Option<std::fs::File>,
}

impl Mailbox {
    /// Maps the mailbox; None when the VMM has none (the magic is missing).
    pub fn map() -> io::Result<Option<Self>> {
        let region = PhysPage::map_range(MAILBOX_ADDR as libc::off_t, MAILBOX_SIZE as usize)?;
        if region.read::<u32>(MAGIC_OFF) != MAGIC || region.read::<u32>(VERSION_OFF) != VERSION {
            return Ok(None);
        }
        // Touched now, so that the pages are there (in the snapshot) before the first request.
        let request = vec![1u8; 64 << 10];
        let response = vec![1u8; 64 << 10];
        let loadavg = std::fs::File::open("/proc/loadavg").ok();
        Ok(Some(Self { region, request, response, loadavg }))
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is an 8-aligned header offset within the mapping (ptr checks the bounds);
        // the host accesses the same words atomically.
        unsafe { &*self.region.ptr(off, 8).cast::<AtomicU64>() }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`, 4-aligned.
        unsafe { &*self.region.ptr(off, 4).cast::<AtomicU32>() }
    }

    /// Serves requests forever: polls the request seq, runs each request, answers in place. After
    /// its [`SpinWindow`] without a request it rings the idle doorbell (the vCPU then waits
    /// host-side).
    pub fn serve(&mut self, control: &ControlPage, functions: &Mutex<Functions>) -> ! {
        let mut window = SpinWindow::default();
        // Whether the agent is in the window after an answer (a request now is one that came
        // within it).
        let mut after_answer = false;
        let mut epoch = self.u64_at(EPOCH_OFF).load(Ordering::Acquire);
        let mut seen = self.u64_at(AGENT_SEEN_OFF).load(Ordering::Acquire);
        self.u32_at(AGENT_FEATURES_OFF).store(FEATURE_RING_IF_WAITING, Ordering::Release);
        self.u32_at(AGENT_STATE_OFF).store(AGENT_POLLING, Ordering::SeqCst);
        // Before the first request, park at once: a clone waits in a pool, maybe long, and spinning
        // there would cost its host a core for MAX_SPIN and its guest kernel a timer tick every 10 ms
        // (emulated work on some hosts). After each request it spins: the next one often follows.
        let mut idle_at = crate::tsc::now();
        // The first park of a clone (or of a VM that just started serving) does not wait for
        // other tasks: nothing has asked this guest for anything yet, and a pooled clone should
        // cost nothing. Whatever was runnable runs at its first wake-up. Measured on a host that
        // emulates guest kernel mode (`ember bench restore`, serving clones): looking and
        // napping until the guest was quiet took ~2/3 of a clone's CPU from restore to park.
        let mut first_park = true;
        let mut spins = 0u32;
        let mut loadavg = self.loadavg.take();
        let mut nap = MIN_NAP;
        loop {
            let seq = self.u64_at(REQ_SEQ_OFF).load(Ordering::Acquire);
            if self.u64_at(EPOCH_OFF).load(Ordering::Relaxed) != epoch {
                // A new mailbox under us: this is a clone restored from a snapshot taken while
                // serving. Its host starts counting afresh.
                epoch = self.u64_at(EPOCH_OFF).load(Ordering::Acquire);
                seen = self.u64_at(AGENT_SEEN_OFF).load(Ordering::Acquire);
                self.u32_at(AGENT_FEATURES_OFF).store(FEATURE_RING_IF_WAITING, Ordering::Release);
                self.u32_at(AGENT_STATE_OFF).store(AGENT_POLLING, Ordering::SeqCst);
                first_park = true;
                continue;
            }
            if seq != seen {
                seen = seq;
                self.u64_at(AGENT_SEEN_OFF).store(seen, Ordering::Release);
                if self.handle(seq, functions) {
                    control.ring_response();
                }
                if std::mem::replace(&mut after_answer, true) {
                    window.request_came();
                }
                idle_at = crate::tsc::now() + crate::tsc::ticks(window.get());
                nap = MIN_NAP;
                continue;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && crate::tsc::now() > idle_at {
                if std::mem::take(&mut after_answer) {
                    window.passed();
                }
                // Parking the vCPU stops the whole guest: only when nothing else wants to run
                // (the vsock listener, the runtime, kernel workers); else let them have it.
                // Each look costs system calls, so the pause between looks doubles up to MAX_NAP
                // while others keep running (a request is then seen within that pause).
                if !first_park && others_runnable(&mut loadavg) {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(MAX_NAP);
                    continue;
                }
                nap = MIN_NAP;
                first_park = false;
                self.u32_at(AGENT_STATE_OFF).store(AGENT_IDLE, Ordering::SeqCst);
                if self.u64_at(REQ_SEQ_OFF).load(Ordering::SeqCst) == seen {
                    control.ring_idle();
                }
                self.u32_at(AGENT_STATE_OFF).store(AGENT_POLLING, Ordering::SeqCst);
                idle_at = crate::tsc::now() + crate::tsc::ticks(window.get());
            }
        }
    }

    /// Runs the request posted with `seq` and writes its response; whether to ring the response
    /// doorbell (asked for, and the host waits on it if it asked to be rung only then).
    fn handle(&mut self, seq: u64, functions: &Mutex<Functions>) -> bool {
        let mut function = [0u8; MAX_FUNCTION_LEN];
        for (i, chunk) in function.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&self.u64_at(REQ_FUNCTION_OFF + i * 8).load(Ordering::Relaxed).to_le_bytes());
        }
        let raw = RawRequest {
            id: self.u64_at(REQ_ID_OFF).load(Ordering::Relaxed),
            len: self.u32_at(REQ_LEN_OFF).load(Ordering::Relaxed),
            flags: self.u32_at(REQ_FLAGS_OFF).load(Ordering::Relaxed),
            function,
        };
        self.response.clear();
        let (id, (doorbell, if_waiting), status) = match raw.check() {
            Ok(req) => {
                self.request.resize(req.len, 0);
                // SAFETY: `req.len` was checked against MAX_PAYLOAD: the copy stays in the request area.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.region.ptr(REQ_DATA_OFF, req.len),
                        self.request.as_mut_ptr(),
                        req.len,
                    )
                };
                let mut f = functions.lock().unwrap_or_else(|p| p.into_inner());
                let status = if req.envelope {
                    enveloped(&mut f, req.function, &self.request, &mut self.response)
                } else {
                    f.call(req.function, &self.request, &mut self.response)
                };
                (req.id, (req.doorbell, req.ring_if_waiting), status)
            }
            Err(e) => {
                self.response.extend_from_slice(e.to_string().as_bytes());
                (raw.id, (raw.flags & FLAG_DOORBELL != 0, false), Status::BadRequest)
            }
        };
        let status = if self.response.len() > MAX_PAYLOAD {
            let len = self.response.len();
            self.response.clear();
            self.response.extend_from_slice(format!("response of {len} bytes exceeds {MAX_PAYLOAD}").as_bytes());
            Status::TooLarge
        } else {
            status
        };
        let len = self.response.len();
        // SAFETY: `len` <= MAX_PAYLOAD (checked above): the copy stays in the response area.
        unsafe { std::ptr::copy_nonoverlapping(self.response.as_ptr(), self.region.ptr(RESP_DATA_OFF, len), len) };
        self.u64_at(RESP_ID_OFF).store(id, Ordering::Relaxed);
        self.u32_at(RESP_LEN_OFF).store(len as u32, Ordering::Relaxed);
        self.u32_at(RESP_STATUS_OFF).store(status as u32, Ordering::Relaxed);
        self.u64_at(RESP_SEQ_OFF).store(seq, Ordering::SeqCst);
        // (The store above and this load are ordered: see ember_abi::mailbox.)
        doorbell && (!if_waiting || self.u32_at(HOST_WAITING_OFF).load(Ordering::SeqCst) != 0)
    }
}

/// Runs an envelope request (ember_abi::mailbox::FLAG_ENVELOPE): the context goes to one of
/// ember's runtimes, and the response carries the invocation's log and error report as meta
/// ahead of the result.
fn enveloped(f: &mut Functions, function: &str, request: &[u8], response: &mut Vec<u8>) -> Status {
    let env = match parse_envelope_request(request) {
        Ok(e) => e,
        Err(e) => {
            response.extend_from_slice(format!("malformed envelope: {e}").as_bytes());
            return Status::BadRequest;
        }
    };
    let mut result = Vec::new();
    let mut log = Log::default();
    let inv = Invocation {
        context: env.context,
        timeout: std::time::Duration::from_millis(u64::from(env.timeout_ms)),
        log: &mut log,
    };
    let status = match f.call_managed(function, env.event, &mut result, inv) {
        Some(s) => s,
        None => f.call(function, env.event, &mut result),
    };
    let meta = log.meta((status == Status::Error).then_some(&result[..]));
    response.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    response.extend_from_slice(meta.as_bytes());
    if status != Status::Error {
        response.extend_from_slice(&result);
    }
    status
}

/// How long the agent polls for the next request after an answer. It starts at [`MAX_SPIN`],
/// doubles (up to that) when a request comes within it and halves (down to [`MIN_SPIN`]) when it
/// passes without one: requests closer together than the window keep it open, while a clone
/// called now and then, which parks after each call anyway, stops spending a host core for
/// [`MAX_SPIN`] after each (~[`MIN_SPIN`] after a few calls).
struct SpinWindow {
    current: std::time::Duration,
}

impl Default for SpinWindow {
    fn default() -> Self {
        Self { current: MAX_SPIN }
    }
}

impl SpinWindow {
    fn get(&self) -> std::time::Duration {
        self.current
    }

    fn request_came(&mut self) {
        self.current = (self.current * 2).min(MAX_SPIN);
    }

    fn passed(&mut self) {
        self.current = (self.current / 2).max(MIN_SPIN);
    }
}

/// Whether a task other than this one is runnable, from /proc/loadavg's `running/total` field
/// (a few system calls: only asked when about to park the vCPU). True when it cannot tell.
fn others_runnable(loadavg: &mut Option<std::fs::File>) -> bool {
    use std::io::{Read, Seek};
    let Some(f) = loadavg else { return false };
    let mut s = String::new();
    if f.rewind().is_err() || f.read_to_string(&mut s).is_err() {
        return true;
    }
    let running = s.split_whitespace().nth(3).and_then(|w| w.split('/').next()).and_then(|n| n.parse::<u32>().ok());
    running.is_none_or(|n| n > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spin_window_shrinks_for_sparse_requests_and_grows_back_for_close_ones() {
        let mut w = SpinWindow::default();
        assert_eq!(w.get(), MAX_SPIN);
        // Calls further apart than the window: it halves each time, down to its floor.
        let mut last = w.get();
        for _ in 0..20 {
            w.passed();
            assert!(w.get() <= last && w.get() >= MIN_SPIN);
            last = w.get();
        }
        assert_eq!(w.get(), MIN_SPIN);
        // A burst: each request within the window doubles it, up to MAX_SPIN.
        w.request_came();
        assert_eq!(w.get(), MIN_SPIN * 2);
        for _ in 0..20 {
            w.request_came();
        }
        assert_eq!(w.get(), MAX_SPIN);
    }
}
