//! How a real guest ends a VM, through the `ember` binary: a kernel panic is a crash (exit status 3,
//! the reason and RIP printed), a reboot is a clean end (status 0); a 2-vCPU guest boots. Each boots
//! the guest once.

mod common;

use common::{ember, text};
use ember::vmm::boot::cmdline::default_cmdline;

fn run_guest(test: &str, extra_cmdline: &str) -> Option<std::process::Output> {
    if !common::kvm_usable(test) {
        return None;
    }
    let (kernel, initrd) = common::images(test)?;
    let cmdline = format!("{} {extra_cmdline}", default_cmdline());
    Some(ember(&[
        "run",
        "--kernel",
        kernel.to_str()?,
        "--initrd",
        initrd.to_str()?,
        "--cmdline",
        &cmdline,
        "--timeout",
        "300",
    ]))
}

#[test]
fn guest_kernel_panic_is_a_crash_with_rip() {
    let Some(out) = run_guest("guest_kernel_panic_is_a_crash_with_rip", "ember_exit=panic") else { return };
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("Kernel panic"), "console: {stdout}");
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains("guest kernel panic (vCPU 0, RIP 0x"), "stderr: {stderr}");
}

#[test]
fn guest_reboot_ends_the_vm_cleanly() {
    let Some(out) = run_guest("guest_reboot_ends_the_vm_cleanly", "ember_exit=reboot") else { return };
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("EMBER_GUEST_READY"), "console: {stdout}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("the guest reset the VM"), "stderr: {stderr}");
}

#[test]
fn two_vcpu_guest_boots_to_init() {
    let test = "two_vcpu_guest_boots_to_init";
    if !common::kvm_usable(test) {
        return;
    }
    let Some((kernel, initrd)) = common::images(test) else { return };
    let out = ember(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        "2",
        "--timeout",
        "300",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("smp: Brought up 1 node, 2 CPUs"), "console: {stdout}");
    assert!(stdout.contains("EMBER_GUEST_READY"), "console: {stdout}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
}
