//! Signals while VMs run: SIGINT / SIGTERM stop them cleanly, SIGUSR1 / SIGUSR2 pause and resume
//! `ember run`'s VM.

use std::sync::atomic::{AtomicU8, Ordering};

/// What SIGUSR1 / SIGUSR2 asked for: 1 pause, 2 resume.
static PAUSE_REQUEST: AtomicU8 = AtomicU8::new(0);
/// The signal (SIGINT, SIGTERM) that asked ember to stop its VMs, or 0.
static STOP_SIGNAL: AtomicU8 = AtomicU8::new(0);

extern "C" fn on_pause_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    PAUSE_REQUEST.store(if sig == libc::SIGUSR1 { 1 } else { 2 }, Ordering::SeqCst);
}

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(sig as u8, Ordering::SeqCst);
}

/// SIGINT and SIGTERM stop the VMs cleanly (their mailbox files are removed) instead of killing
/// ember.
pub(crate) fn handle_stop_signals() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    Ok(())
}

/// Why ember was asked to stop, if it was.
pub(crate) fn stop_requested() -> Option<&'static str> {
    match i32::from(STOP_SIGNAL.load(Ordering::SeqCst)) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

/// Takes what SIGUSR1 / SIGUSR2 asked for since the last call: 1 pause, 2 resume, 0 nothing.
pub(crate) fn take_pause_request() -> u8 {
    PAUSE_REQUEST.swap(0, Ordering::SeqCst)
}

/// SIGUSR1 pauses, SIGUSR2 resumes (see [`take_pause_request`]).
pub(crate) fn handle_pause_signals() -> Result<(), String> {
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        vmm_sys_util::signal::register_signal_handler(sig, on_pause_signal)
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    Ok(())
}
