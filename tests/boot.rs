//! Booting ember's own guest kernel on this machine's KVM: the guest reaches its init, which makes
//! real system calls and prints its marker; the boot timer and kernel markers arrive; the VM ends
//! cleanly. Guest boots are slow on hosts that emulate guest kernel mode, so one boot is shared by
//! several tests.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Capture;
use ember::config::{BootSource, MachineConfig, VmConfig};
use ember::vmm::exit::VmExit;
use ember::vmm::{RunOutcome, Vm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const MARKER: &str = "EMBER_GUEST_READY";

struct Booted {
    console: String,
    outcome: RunOutcome,
}

/// Boots the default guest once per test binary; None when KVM tests are skipped.
fn booted(test: &str) -> Option<&'static Booted> {
    static BOOT: OnceLock<Booted> = OnceLock::new();
    if !common::kvm_usable(test) {
        return None;
    }
    let (kernel, initrd) = common::images(test)?;
    Some(BOOT.get_or_init(|| {
        let cfg = VmConfig {
            boot_source: BootSource { kernel_image_path: kernel, initrd_path: Some(initrd), boot_args: None },
            machine_config: MachineConfig::default(),
            drives: Vec::new(),
            network_interfaces: Vec::new(),
        };
        let cap = Capture::default();
        let vm = Vm::boot(&cfg, &ember::vmm::Channels::default(), Box::new(cap.clone()), Instant::now())
            .expect("build the VM");
        let outcome = vm.run(Some(BOOT_TIMEOUT)).expect("run the VM");
        let console = cap.text();
        eprintln!("--- guest console ---\n{console}\n--- end ({}) ---", outcome.exit);
        Booted { console, outcome }
    }))
}

#[test]
fn guest_reaches_init_and_powers_off() {
    let Some(b) = booted("guest_reaches_init_and_powers_off") else { return };
    assert!(b.console.contains("Run /init as init process"), "kernel did not start init");
    assert!(b.console.contains(MARKER), "init marker missing");
    assert_eq!(b.outcome.exit, VmExit::PowerOff);
}

#[test]
fn guest_system_calls_work() {
    let Some(b) = booted("guest_system_calls_work") else { return };
    let line = b.console.lines().find(|l| l.contains(MARKER)).expect("marker line");
    // The agent forked and exec'd itself and saw the child's exit status, read /proc/uptime and
    // got random bytes: each of those is a system call finished by the guest kernel.
    assert!(line.contains("child_exit=42"), "{line}");
    assert!(b.console.contains("ember-agent: child pid"), "the child's own output is missing");
    let uptime: f64 =
        line.split("uptime=").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()).expect("uptime");
    assert!(uptime > 0.0, "{line}");
    let random = line.split("random=").nth(1).expect("random");
    assert_eq!(random.trim().len(), 32, "{line}");
}

#[test]
fn boot_timer_and_kernel_markers_arrive_in_order() {
    let Some(b) = booted("boot_timer_and_kernel_markers_arrive_in_order") else { return };
    let t = b.outcome.timeline;
    let first = t.first_instruction.expect("first instruction").since_vm;
    let kernel = t.kernel_start.expect("kernel start marker (port 0x80)").since_vm;
    let init = t.run_init.expect("run-init marker (port 0x80)").since_vm;
    let timer = t.boot_timer.expect("boot timer write").since_vm;
    assert!(first <= kernel && kernel <= init && init <= timer, "{t:?}");
}
