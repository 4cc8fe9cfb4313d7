//! A working-set file: what decodes lies inside guest RAM.
#![no_main]

use ember::snapshot::working_set::WorkingSet;
use libfuzzer_sys::fuzz_target;

const MEM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(ws) = WorkingSet::decode(data, MEM, std::path::Path::new("working-set")) {
        for (first, n) in ws.read.iter().chain(&ws.written) {
            assert!(first + n <= MEM / 4096);
        }
    }
});
