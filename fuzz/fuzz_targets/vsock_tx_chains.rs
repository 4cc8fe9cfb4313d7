//! The vsock device's TX path on guest memory the fuzzer writes: descriptor table, available ring
//! and buffers are all guest-controlled. It must never panic, hang or copy more than a packet may
//! hold. The input is laid out compactly: 256 bytes of descriptor table (16 entries, at 0), 36 bytes
//! of available ring (at 0x1000), the rest as buffers at 0x4000.
#![no_main]

use ember::devices::virtio::ring;
use ember::devices::virtio::vsock::packet::parse_tx_image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let image = ring::fuzz_image(data, 0x4000);
    for p in parse_tx_image(&image) {
        assert!(p.data.len() <= 64 << 10);
    }
});
