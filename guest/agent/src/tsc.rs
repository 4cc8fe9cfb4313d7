//! Time from the TSC: reading the clock through the kernel would put a system call (slow on some
//! hosts) into the mailbox's polling loop.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn now() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per microsecond, measured once (against the kernel's clock, over 20 ms).
fn per_us() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let (t0, c0) = (Instant::now(), now());
        std::thread::sleep(Duration::from_millis(20));
        let (dt, dc) = (t0.elapsed(), now().wrapping_sub(c0));
        (dc / (dt.as_micros() as u64).max(1)).max(1)
    })
}

/// Measures the TSC rate now (before the snapshot, so clones do not).
pub fn calibrate() {
    per_us();
}

pub fn ticks(d: Duration) -> u64 {
    per_us().saturating_mul(d.as_micros() as u64)
}
