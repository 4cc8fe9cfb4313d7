//! How a real guest ends a VM, through the `ember` binary: a kernel panic is a crash (exit status 3,
//! the reason and RIP printed), a reboot is a clean end (status 0). Each boots the guest once.

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
