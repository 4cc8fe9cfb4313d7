//! The seccomp filter that confines vCPU threads: the threads that run guest code and handle every
//! exit the guest causes. They may only run KVM ioctls, write (console, eventfds, logs), wait on
//! futexes, manage memory, return from the kick signal, close their vCPU fd, and exit. Device threads
//! (vsock) get socket I/O and epoll besides. Anything else kills the process (SIGSYS): a thread
//! asking for it means something has gone badly wrong.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// What any ember thread needs to run Rust code at all: memory (glibc's per-thread arenas grow with
/// mprotect), futex-backed locks, the kick signal's return, clocks, and exit.
const THREAD_RUNTIME: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_rseq,
    libc::SYS_exit,
];

/// The ioctl "type" byte of every KVM ioctl.
const KVMIO: u64 = 0xae;

/// Builds the vCPU thread filter.
pub fn vcpu_filter() -> Result<BpfProgram, seccompiler::Error> {
    let kvm_ioctl = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?;
    let allowed = [
        libc::SYS_write,
        libc::SYS_writev,
        // A vCPU thread owns its vCPU fd and drops it when the VM ends.
        libc::SYS_close,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.iter().chain(THREAD_RUNTIME).map(|s| (*s, vec![])).collect();
    rules.insert(libc::SYS_ioctl, vec![kvm_ioctl]);
    // Rust's debug builds check that an fd is open before closing it.
    let getfd = SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )?])?;
    rules.insert(libc::SYS_fcntl, vec![getfd]);
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Builds the filter for a device's own thread (the vsock device's event loop): it handles what
/// the guest puts in the device's queues and moves bytes between them and host sockets.
pub fn device_filter() -> Result<BpfProgram, seccompiler::Error> {
    let allowed = [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_accept4,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
    ];
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed.iter().chain(THREAD_RUNTIME).map(|s| (*s, vec![])).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Confines the calling thread, after priming the allocator (see [`prime_allocator`]).
pub fn apply(filter: &BpfProgram) -> Result<(), seccompiler::Error> {
    prime_allocator();
    seccompiler::apply_filter(filter)
}

/// glibc's malloc reads files the first time some paths run: /sys/devices/system/cpu/online when
/// it sets up arenas, /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks (both
/// cached process-wide after that). No filter allows opening files, so those paths run here, on the
/// thread about to be confined, before the filter: a thread arena is set up, grown past the trim
/// threshold and freed.
fn prime_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let blocks: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 4096]).collect();
        drop(std::hint::black_box(blocks));
    });
    drop(std::hint::black_box(Vec::<u8>::with_capacity(64)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles() {
        assert!(!vcpu_filter().unwrap().is_empty());
    }

    #[test]
    fn a_confined_thread_keeps_its_allowed_calls() {
        let filter = vcpu_filter().unwrap();
        let t = std::thread::spawn(move || {
            apply(&filter).unwrap();
            // Allowed: allocation, a futex-backed lock, writing.
            let v: Vec<u8> = vec![1; 1 << 20];
            let m = std::sync::Mutex::new(v.len());
            let n = *m.lock().unwrap();
            use std::io::Write;
            std::io::stderr().write_all(b"").unwrap();
            n
        });
        assert_eq!(t.join().unwrap(), 1 << 20);
    }
}
