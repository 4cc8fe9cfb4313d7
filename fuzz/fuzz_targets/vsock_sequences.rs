//! Sequences of guest packets through the vsock connection state machine (requests, responses,
//! data, shutdowns, resets, credit updates and requests on established, connecting and unknown
//! connections): no panic, and the control queue, the connections and each connection's buffer
//! stay within their bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember::devices::virtio::vsock::drive_packets(data);
});
