//! Sequences of guest register accesses on the virtio-mmio transport, then a snapshot and a
//! restore of what they left: no panic, whatever the guest writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ember::devices::virtio::mmio::drive_registers(data);
});
