//! Shared helpers for the integration tests: KVM availability, the guest images, running `ember`.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ember::config::{BootSource, MachineConfig, VmConfig};
use ember::template::{MakeOptions, Template};

pub mod api;
pub mod netns;

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

/// Serialises the tests of a binary that must not overlap (those that count the process's fds and
/// threads, or load the host's few cores): each holds the guard for its whole run.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's open file descriptors and threads.
pub fn fds_and_threads() -> (usize, usize) {
    api::fds_and_threads(std::process::id())
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap()
}

/// How long the one real boot of a test binary may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn scratch_root() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let name = exe.as_ref().and_then(|e| e.file_stem()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let binary = name.split('-').next().unwrap_or("test").to_string();
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ember-test-{binary}-{}", std::process::id()))
}

/// A fresh scratch directory for this test binary's run (under the target dir).
pub fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Boots the guest to its agent's "ready" doorbell and snapshots it there, once per test binary:
/// the template every test of the binary restores clones of.
pub fn template(test: &str) -> Option<&'static Path> {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    if !kvm_usable(test) {
        return None;
    }
    let (kernel, initrd) = images(test)?;
    Some(TEMPLATE.get_or_init(|| {
        // Earlier runs' scratch directories (snapshots are large) go first.
        let root = scratch_root();
        let prefix = root.file_name().unwrap().to_string_lossy().rsplit_once('-').unwrap().0.to_string();
        for e in std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{prefix}-")) && e.path() != root {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = scratch("template");
        let cfg = VmConfig {
            boot_source: BootSource { kernel_image_path: kernel, initrd_path: Some(initrd), boot_args: None },
            machine_config: MachineConfig::default(),
            drives: Vec::new(),
            network_interfaces: Vec::new(),
        };
        let cap = Capture::default();
        let opts = MakeOptions { console: Box::new(cap.clone()), timeout: BOOT_TIMEOUT, ..Default::default() };
        match Template::make(&cfg, &dir, opts) {
            Ok(made) => assert!(made.working_set.is_some()),
            Err(e) => panic!("cannot make the template: {e}\n{}", cap.text()),
        }
        assert!(cap.text().contains("EMBER_GUEST_READY"), "{}", cap.text());
        assert!(!cap.text().contains("EMBER_CLONE"), "the template ran past its snapshot point");
        dir
    }))
}
