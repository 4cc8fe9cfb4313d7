//! A snapshot's state file as a corrupted or hostile disk may hold it: decoding never panics,
//! never allocates past the file's limit, and what passes is consistent.
#![no_main]

use ember::vmm::persist::SnapshotState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SnapshotState::decode(data, std::path::Path::new("state")) {
        assert_eq!(usize::from(s.machine.vcpus), s.vcpus.len());
    }
});
