//! Shared helpers for the integration tests: KVM availability, the guest images, running `ember`.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// A guest console captured in memory.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// True when `EMBER_REQUIRE_KVM=1`: a test that cannot run here must fail, not skip.
pub fn kvm_required() -> bool {
    std::env::var("EMBER_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Whether KVM tests can run; prints why not (and fails under EMBER_REQUIRE_KVM=1).
pub fn kvm_usable(test: &str) -> bool {
    let why = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm is missing".to_string())
    } else if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Some(format!("/dev/kvm cannot be opened: {e}"))
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if kvm_required() => panic!("{test}: {why}, and EMBER_REQUIRE_KVM=1"),
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest kernel and initramfs built by scripts/setup.sh (or EMBER_KERNEL / EMBER_INITRD).
pub fn images(test: &str) -> Option<(PathBuf, PathBuf)> {
    let kernel = std::env::var_os("EMBER_KERNEL").map(PathBuf::from).unwrap_or_else(|| repo().join("images/vmlinux"));
    let initrd =
        std::env::var_os("EMBER_INITRD").map(PathBuf::from).unwrap_or_else(|| repo().join("images/initramfs.cpio"));
    if kernel.exists() && initrd.exists() {
        return Some((kernel, initrd));
    }
    let why = format!("{} or {} is missing (run scripts/setup.sh)", kernel.display(), initrd.display());
    if kvm_required() {
        panic!("{test}: {why}, and EMBER_REQUIRE_KVM=1");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Runs the ember binary with `args`.
pub fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().expect("run ember")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
