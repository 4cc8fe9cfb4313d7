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
    // The guest serves after "ready" (it never powers off by itself), and each signal is sent once
    // ember's log shows the state it applies to: nothing here depends on how fast the guest boots.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()])
        .args(["--console", "off", "--timeout", "300", "--serve"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ember");
    let pid = child.id() as libc::pid_t;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) => {
                    let found = l.contains(needle);
                    seen.push(l);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no {needle:?} in ember's log: {seen:#?}"),
            }
        }
    };
    // (Its signal handlers are set right after the VM starts, long before the guest runs init.)
    wait_for("guest kernel runs init");
    // SAFETY: kill() on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    wait_for("VM paused");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    wait_for("VM resumed");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait for ember");
    reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{seen:#?}");
}
