//! The virtio-blk request path on guest memory the fuzzer writes: descriptor table, available ring,
//! request headers and buffers are all guest-controlled, served against a 64-sector drive. It must
//! never panic, hang, write past the drive or outside guest memory. The input is laid out
//! compactly: 256 bytes of descriptor table (16 entries, at 0), 36 bytes of available ring (at
//! 0x1000), the rest at 0x3000 (headers, status bytes and data buffers).
#![no_main]

use std::sync::OnceLock;

use ember::devices::virtio::block::request::serve_image;
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
    let mut image = vec![0u8; 0x1_0000];
    let (table, rest) = data.split_at(data.len().min(256));
    let (avail, buffers) = rest.split_at(rest.len().min(36));
    image[..table.len()].copy_from_slice(table);
    image[0x1000..0x1000 + avail.len()].copy_from_slice(avail);
    let n = buffers.len().min(0xd000);
    image[0x3000..0x3000 + n].copy_from_slice(&buffers[..n]);
    let mut file = drive();
    let served = serve_image(&image, &mut file);
    assert!(served.len() <= 64);
    assert_eq!(file.metadata().map(|m| m.len()).unwrap_or(0), 64 * 512, "a request changed the drive's size");
});
