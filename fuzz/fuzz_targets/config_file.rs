//! A Firecracker-shaped config file: parsing and validation never panic, and what validates is a
//! machine ember can build.
#![no_main]

use ember::config::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<VmConfig>(data) {
        if c.validate().is_ok() {
            assert!(c.vcpus() >= 1 && c.mem_bytes() >= 16 << 20);
            let _ = c.cmdline();
        }
    }
});
