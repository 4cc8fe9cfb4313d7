//! Why a VM ended, and what that means for ember's exit status.

use std::fmt;

/// The reason a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset line, or a KVM reset event).
    Reset,
    /// The guest powered off (ember's exit port, or a KVM shutdown event).
    PowerOff,
    /// The guest kernel panicked.
    Panic { vcpu: u8, rip: u64 },
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8, rip: u64 },
    /// KVM could not run the guest's instruction (KVM_EXIT_INTERNAL_ERROR).
    InternalError { vcpu: u8, suberror: u32, rip: u64, code: Vec<u8> },
    /// KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry { vcpu: u8, reason: u64, rip: u64 },
    /// An exit ember does not handle.
    Unexpected { vcpu: u8, what: String, rip: u64 },
    /// KVM_RUN itself failed.
    VcpuError { vcpu: u8, errno: i32 },
    /// ember stopped the VM (timeout, API).
    Stopped(String),
    /// The user asked ember to stop (SIGINT, SIGTERM): a clean end.
    StoppedBySignal(String),
}

impl VmExit {
    /// True when the guest ended the VM on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::PowerOff | VmExit::StoppedBySignal(_))
    }
}

fn hex(code: &[u8]) -> String {
    code.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "the guest reset the VM"),
            VmExit::PowerOff => write!(f, "the guest powered off"),
            VmExit::Panic { vcpu, rip } => write!(f, "guest kernel panic (vCPU {vcpu}, RIP {rip:#x})"),
            VmExit::TripleFault { vcpu, rip } => write!(f, "guest triple fault (vCPU {vcpu}, RIP {rip:#x})"),
            VmExit::InternalError { vcpu, suberror, rip, code } => write!(
                f,
                "KVM internal error {suberror} (emulation failure when 1) on vCPU {vcpu} at RIP {rip:#x}, code: [{}]",
                hex(code)
            ),
            VmExit::FailEntry { vcpu, reason, rip } => {
                write!(f, "KVM failed to enter the guest (hardware reason {reason:#x}) on vCPU {vcpu} at RIP {rip:#x}")
            }
            VmExit::Unexpected { vcpu, what, rip } => {
                write!(f, "unexpected exit on vCPU {vcpu} at RIP {rip:#x}: {what}")
            }
            VmExit::VcpuError { vcpu, errno } => {
                write!(f, "KVM_RUN failed on vCPU {vcpu}: {}", std::io::Error::from_raw_os_error(*errno))
            }
            VmExit::Stopped(why) => write!(f, "stopped by ember: {why}"),
            VmExit::StoppedBySignal(sig) => write!(f, "stopped on {sig}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_and_unclean() {
        assert!(VmExit::Reset.is_clean());
        assert!(VmExit::PowerOff.is_clean());
        assert!(!VmExit::Panic { vcpu: 0, rip: 1 }.is_clean());
        assert!(!VmExit::Stopped("timeout".into()).is_clean());
    }

    #[test]
    fn internal_error_names_rip_and_code() {
        let e = VmExit::InternalError { vcpu: 0, suberror: 1, rip: 0xffffffff81000000, code: vec![0xcc, 0x90] };
        let s = e.to_string();
        assert!(s.contains("0xffffffff81000000") && s.contains("cc 90"), "{s}");
    }
}
