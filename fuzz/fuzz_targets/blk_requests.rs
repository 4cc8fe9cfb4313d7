//! The virtio-blk request path on guest memory the fuzzer writes: descriptor table, available ring,
//! request headers and buffers are all guest-controlled, served against a 64-sector drive. It must
//! never panic, hang, write past the drive or outside guest memory. The input is laid out
//! compactly: 256 bytes of descriptor table (16 entries, at 0), 36 bytes of available ring (at
//! 0x1000), the rest at 0x3000 (headers, status bytes and data buffers).
#![no_main]

use std::sync::OnceLock;

use ember::devices::virtio::block::request::serve_image;
use ember::devices::virtio::ring;
use libfuzzer_sys::fuzz_target;

fn drive() -> std::fs::File {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-blk-{}", std::process::id()));
        std::fs::write(&p, vec![0xa5u8; 64 * 512]).expect("write the fuzz drive");
        p
    });
    std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open the fuzz drive")
}

fuzz_target!(|data: &[u8]| {
    let image = ring::fuzz_image(data, 0x3000);
    let mut file = drive();
    let served = serve_image(&image, &mut file);
    assert!(served.len() <= 64);
    assert_eq!(file.metadata().map(|m| m.len()).unwrap_or(0), 64 * 512, "a request changed the drive's size");
});
