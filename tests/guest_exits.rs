//! How a real guest ends a VM, through the `ember` binary: a kernel panic is a crash (exit status 3,
//! the reason and RIP printed), a reboot is a clean end (status 0); a 2-vCPU guest boots. Each boots
//! the guest once.

mod common;

use common::{ember, text};
use ember::config::default_cmdline;

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

#[test]
fn sigusr1_pauses_and_sigusr2_resumes_a_running_guest() {
    let test = "sigusr1_pauses_and_sigusr2_resumes_a_running_guest";
    if !common::kvm_usable(test) {
        return;
    }
    let Some((kernel, initrd)) = common::images(test) else { return };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()])
        .args(["--console", "off", "--timeout", "300"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ember");
    let pid = child.id() as libc::pid_t;
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: kill() on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    let out = child.wait_with_output().expect("wait for ember");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let paused = stderr.find("VM paused").unwrap_or_else(|| panic!("no pause: {stderr}"));
    let resumed = stderr.find("VM resumed").unwrap_or_else(|| panic!("no resume: {stderr}"));
    let ended = stderr.find("the guest powered off").unwrap_or_else(|| panic!("no power-off: {stderr}"));
    assert!(paused < resumed && resumed < ended, "{stderr}");
}
