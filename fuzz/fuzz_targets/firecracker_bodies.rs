//! Firecracker's API bodies and command line, as ember's Firecracker-compatible door reads them:
//! any bytes parse and are checked without a panic.
#![no_main]

use ember::firecracker::args::Args;
use ember::firecracker::model::{Drive, MachineConfigBody, SnapshotLoad};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = serde_json::from_slice::<Drive>(data) {
        let _ = d.check();
    }
    if let Ok(m) = serde_json::from_slice::<MachineConfigBody>(data) {
        let _ = m.check();
    }
    if let Ok(l) = serde_json::from_slice::<SnapshotLoad>(data) {
        let _ = l.memory();
    }
    // The command line: the bytes as words.
    let words: Vec<String> = String::from_utf8_lossy(data).split(' ').map(str::to_string).collect();
    if let Ok(a) = Args::parse(&words) {
        let _ = a.number("http-api-max-payload-size");
    }
});
