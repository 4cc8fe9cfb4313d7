//! Every vCPU of a multi-vCPU VM runs guest code: a kernel-less 64-bit payload in which each vCPU
//! announces itself on port 0x80 and atomically increments a shared counter; the vCPU that brings the
//! counter to the vCPU count powers the VM off through ember's exit port. The VM can only power off
//! if every vCPU ran.

mod common;

use std::time::{Duration, Instant};

use ember::vmm::exit::VmExit;
use ember::vmm::{RunOptions, Vm};

/// mov al, bl; add al, 0x50; out 0x80, al; lock inc qword [0x2000]; cmp [0x2000], rcx;
/// jne halt; xor eax, eax; out 0xf4, al; halt: hlt; jmp halt
const PAYLOAD: [u8; 32] = [
    0x88, 0xd8, 0x04, 0x50, 0xe6, 0x80, 0xf0, 0x48, 0xff, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0x48, 0x39, 0x0c, 0x25,
    0x00, 0x20, 0x00, 0x00, 0x75, 0x04, 0x31, 0xc0, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
];

fn run_payload(vcpus: u8) -> VmExit {
    let vm = Vm::with_payload(&PAYLOAD, vcpus, Box::new(std::io::sink())).expect("build the VM");
    vm.run(Some(Duration::from_secs(60))).expect("run the VM").exit
}

#[test]
fn every_vcpu_runs_guest_code() {
    if !common::kvm_usable("every_vcpu_runs_guest_code") {
        return;
    }
    for n in [1, 2, 4, 8] {
        assert_eq!(run_payload(n), VmExit::PowerOff, "{n} vCPUs");
    }
}

#[test]
fn a_halted_vm_is_stopped_by_the_timeout() {
    if !common::kvm_usable("a_halted_vm_is_stopped_by_the_timeout") {
        return;
    }
    // Code that only halts: the VM never ends by itself, and ember must still stop it.
    let vm = Vm::with_payload(&[0xf4, 0xeb, 0xfd], 2, Box::new(std::io::sink())).unwrap();
    let exit = vm.run(Some(Duration::from_millis(300))).unwrap().exit;
    assert!(matches!(exit, VmExit::Stopped(ref why) if why.contains("timed out")), "{exit}");
}

#[test]
fn an_invalid_instruction_is_reported_with_rip() {
    if !common::kvm_usable("an_invalid_instruction_is_reported_with_rip") {
        return;
    }
    // ud2 with no IDT: #UD -> #DF -> triple fault, or an emulation failure on hosts that emulate
    // guest kernel mode. Either way the VM dies with the vCPU's RIP in the reason.
    let vm = Vm::with_payload(&[0x0f, 0x0b], 1, Box::new(std::io::sink())).unwrap();
    let exit = vm.run(Some(Duration::from_secs(30))).unwrap().exit;
    eprintln!("ud2 ended the VM with: {exit}");
    assert!(!exit.is_clean(), "{exit}");
    assert!(exit.to_string().contains("RIP 0x"), "{exit}");
    assert!(!matches!(exit, VmExit::Stopped(_)), "{exit}");
}

#[test]
fn a_stop_request_takes_the_vcpus_out_of_the_guest_at_once() {
    if !common::kvm_usable("a_stop_request_takes_the_vcpus_out_of_the_guest_at_once") {
        return;
    }
    // jmp $: guest code that never exits to the VMM by itself, so only the stop request's kick
    // takes each vCPU out of KVM_RUN (before the VM is dropped, which would join its threads).
    let vm = Vm::with_payload(&[0xeb, 0xfe], 2, Box::new(std::io::sink())).unwrap();
    let running = vm.start(RunOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(running.vcpu_threads_running(), 2, "the payload ended by itself: {:?}", running.exit());
    running.request_stop("asked to");
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.vcpu_threads_running() > 0 {
        assert!(Instant::now() < deadline, "vCPU threads still running 30 s after the stop request");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(running.exit(), Some(VmExit::Stopped("asked to".into())));
}
