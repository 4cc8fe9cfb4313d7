//! Seccomp filters, one per kind of thread, with argument rules where a call's arguments decide
//! what it can reach:
//!
//! - **vCPU threads** run guest code and handle every exit the guest causes: named KVM ioctls on
//!   their own vCPU fd only (never another VM's), writes (console, eventfds, logs), futexes,
//!   memory management without PROT_EXEC, the kick signal's return, close and exit.
//! - **device threads** (vsock's event loop) move bytes between the guest's queues and host
//!   sockets: the thread runtime, reads and writes, epoll, and AF_UNIX stream sockets only.
//! - **the daemon** (`ember serve`, every thread it starts inherits it): what making and running
//!   VMs and serving the API need, and nothing that starts a program or a process, traces one, or
//!   opens a network socket.
//!
//! A call outside a filter fails with an error (EPERM; ENOSYS for the daemon, so that glibc falls
//! back from clone3 to clone, whose flags the filter can check) instead of killing the process:
//! a vCPU or device thread that is refused ends its own VM, never the daemon or another tenant.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BackendError, BpfProgram, Error, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What any ember thread needs to run Rust code at all: memory (glibc's per-thread arenas grow with
/// mprotect), futex-backed locks, the kick signal's return, clocks, and exit. `mmap` and
/// `mprotect` are added with their no-PROT_EXEC rule.
const THREAD_RUNTIME: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_rseq,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
];

/// The ioctl "type" byte of every KVM ioctl.
const KVMIO: u64 = 0xae;

/// The KVM ioctls a vCPU thread issues, as whole request numbers (linux/kvm.h: direction, size,
/// type and number; a rule that compared the number alone would also pass another ioctl of that
/// number with another direction or size, e.g. KVM_ENABLE_CAP for KVM_GET_TSC_KHZ): running, and
/// reading the state it saves when it parks or reports when the VM fails.
mod vcpu_ioctls {
    #![allow(non_snake_case)]
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    use super::KVMIO;
    const KVMIO_TYPE: u32 = KVMIO as u32;
    ioctl_io_nr!(KVM_RUN, KVMIO_TYPE, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO_TYPE, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO_TYPE, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO_TYPE, 0x85, kvm_translation);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO_TYPE, 0x88, kvm_msrs);
    // The first wake from the idle park moves an overdue TSC deadline.
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO_TYPE, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO_TYPE, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO_TYPE, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO_TYPE, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO_TYPE, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO_TYPE, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO_TYPE, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO_TYPE, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO_TYPE, 0xa6, kvm_xcrs);

    pub fn all() -> [u64; 14] {
        [
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_TRANSLATE(),
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// `mmap` and `mprotect`, never with PROT_EXEC: no confined thread maps code.
fn add_memory_rules(rules: &mut BTreeMap<i64, Vec<SeccompRule>>) -> Result<(), Error> {
    let no_exec = || -> Result<Vec<SeccompRule>, BackendError> {
        Ok(vec![SeccompRule::new(vec![cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?])?])
    };
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    Ok(())
}

fn allow_all(calls: &[i64]) -> BTreeMap<i64, Vec<SeccompRule>> {
    calls.iter().chain(THREAD_RUNTIME).map(|s| (*s, vec![])).collect()
}

/// A filter's rules by call number, and what a call outside them gets.
type Rules = (BTreeMap<i64, Vec<SeccompRule>>, SeccompAction);

fn compile((rules, refused): Rules) -> Result<BpfProgram, Error> {
    search_by_number(rules, refused)
}

/// seccompiler's program for `rules` (it tests the call's number against each listed call, one
/// after another).
fn compile_linear(rules: BTreeMap<i64, Vec<SeccompRule>>, refused: SeccompAction) -> Result<BpfProgram, Error> {
    Ok(SeccompFilter::new(rules, refused, SeccompAction::Allow, TargetArch::x86_64)?.try_into()?)
}

/// The vCPU filter as seccompiler's own (linear) program: the baseline `ember bench restore`
/// measures thread confinement against.
pub fn vcpu_filter_linear(vcpu_fd: RawFd) -> Result<BpfProgram, Error> {
    let (rules, refused) = vcpu_rules(vcpu_fd)?;
    compile_linear(rules, refused)
}

// Classic BPF opcodes (linux/bpf_common.h) of the instructions [`search_by_number`] adds.
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;

fn insn(code: u16, k: u32, jt: u8, jf: u8) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// Compiles `rules` into a program that finds a call by a binary search on its number: the arch
/// check and the number load of seccompiler's program, a search tree whose leaves allow a call
/// without conditions at once, then the conditions of each call that has some, exactly as
/// seccompiler compiles them for that call alone.
///
/// Why: when a thread installs a filter, the kernel converts and JIT-compiles it, then runs it
/// once for every system call number (to cache the calls it always allows), under the process's
/// signal lock. A linear program of n calls costs O(n) instructions per number there (~0.9 us
/// per instruction of the program on this host: ~100 us for the vCPU filter); with the search,
/// O(log n). Every vCPU and device thread installs its filter. The search also shortens the
/// filter's run on each call the kernel does not cache (ioctls, mmap).
fn search_by_number(rules: BTreeMap<i64, Vec<SeccompRule>>, refused: SeccompAction) -> Result<BpfProgram, Error> {
    if rules.is_empty() {
        return compile_linear(rules, refused);
    }
    // A program without rules is the arch check and the refusal.
    let mut prog = compile_linear(BTreeMap::new(), refused.clone())?;
    let Some(refuse) = prog.pop() else {
        return Err(BackendError::FilterTooLarge(0).into());
    };
    let prologue = prog.len();
    let mut calls: Vec<(u32, Option<BpfProgram>)> = Vec::with_capacity(rules.len());
    for (nr, chain) in rules {
        // (Call numbers are never negative; seccompiler itself would panic on one.)
        let number = u32::try_from(nr).map_err(|_| BackendError::FilterTooLarge(usize::MAX))?;
        if calls.is_empty() || !chain.is_empty() {
            // One call's program: [arch check][load the number][its block][refusal].
            let one = compile_linear(BTreeMap::from([(nr, chain.clone())]), refused.clone())?;
            if calls.is_empty() {
                prog.push(one[prologue].clone());
            }
            if !chain.is_empty() {
                calls.push((number, Some(one[prologue + 1..one.len() - 1].to_vec())));
                continue;
            }
        }
        calls.push((number, None));
    }
    let allow = insn(BPF_RET_K, u32::from(SeccompAction::Allow), 0, 0);
    let (tree, jumps) = search_tree(&calls, 0, &allow, &refuse);
    let tree_at = prog.len();
    prog.extend(tree);
    let mut starts = vec![0; calls.len()];
    for (i, (_, block)) in calls.into_iter().enumerate() {
        if let Some(block) = block {
            starts[i] = prog.len();
            prog.extend(block);
            // A block left without a decision (only if its own number test failed: never, when
            // the search led there) is refused.
            prog.push(refuse.clone());
        }
    }
    for (at, call) in jumps {
        let at = tree_at + at;
        prog[at].k = (starts[call] - at - 1) as u32;
    }
    if prog.len() >= 4096 {
        return Err(BackendError::FilterTooLarge(prog.len()).into());
    }
    Ok(prog)
}

/// The search over `calls` (sorted by number; the first is call `first`), and where its jumps to
/// the calls' conditions are (index in the returned instructions, call), to be aimed once the
/// conditions are placed. A leaf tests its number, then allows, refuses or jumps to the call's
/// conditions; a node sends numbers at or above its middle to its right half.
fn search_tree(
    calls: &[(u32, Option<BpfProgram>)],
    first: usize,
    allow: &seccompiler::sock_filter,
    refuse: &seccompiler::sock_filter,
) -> (BpfProgram, Vec<(usize, usize)>) {
    if let [(nr, block)] = calls {
        let mut leaf = vec![insn(BPF_JMP_JEQ_K, *nr, 0, 1)];
        let mut jumps = Vec::new();
        match block {
            None => leaf.push(allow.clone()),
            Some(_) => {
                jumps.push((leaf.len(), first));
                leaf.push(insn(BPF_JMP_JA, 0, 0, 0));
            }
        }
        leaf.push(refuse.clone());
        return (leaf, jumps);
    }
    let mid = calls.len() / 2;
    let (left, left_jumps) = search_tree(&calls[..mid], first, allow, refuse);
    let (right, right_jumps) = search_tree(&calls[mid..], first + mid, allow, refuse);
    let mut node = match u8::try_from(left.len()) {
        Ok(over_left) => vec![insn(BPF_JMP_JGE_K, calls[mid].0, over_left, 0)],
        Err(_) => vec![insn(BPF_JMP_JGE_K, calls[mid].0, 0, 1), insn(BPF_JMP_JA, left.len() as u32, 0, 0)],
    };
    let left_at = node.len();
    let right_at = left_at + left.len();
    node.extend(left);
    node.extend(right);
    let jumps = left_jumps.into_iter().map(|(at, c)| (left_at + at, c));
    let jumps = jumps.chain(right_jumps.into_iter().map(|(at, c)| (right_at + at, c))).collect();
    (node, jumps)
}

/// Builds the filter of the vCPU thread that owns `vcpu_fd`.
pub fn vcpu_filter(vcpu_fd: RawFd) -> Result<BpfProgram, Error> {
    compile(vcpu_rules(vcpu_fd)?)
}

fn vcpu_rules(vcpu_fd: RawFd) -> Result<Rules, Error> {
    let mut rules = allow_all(&[
        libc::SYS_write,
        libc::SYS_writev,
        // A vCPU thread owns its vCPU fd and drops it when the VM ends.
        libc::SYS_close,
    ]);
    add_memory_rules(&mut rules)?;
    let kvm = vcpu_ioctls::all()
        .into_iter()
        .map(|request| {
            SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, vcpu_fd as u64)?, cond(1, SeccompCmpOp::Eq, request)?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, kvm);
    // Rust's debug builds check that an fd is open before closing it.
    rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)?])?]);
    Ok((rules, SeccompAction::Errno(libc::EPERM as u32)))
}

/// Builds the filter of a fresh boot's loader thread (`vmm::boot::lazy`), which fills guest RAM
/// from the kernel and initramfs files through its userfaultfd `uffd`: waiting for and reading its
/// events, reading the files, its own ioctls, writes for its log lines, and closing what it holds
/// when it ends.
pub fn loader_filter(uffd: RawFd) -> Result<BpfProgram, Error> {
    compile(loader_rules(uffd)?)
}

fn loader_rules(uffd: RawFd) -> Result<Rules, Error> {
    let mut rules = allow_all(&[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
    ]);
    add_memory_rules(&mut rules)?;
    rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, uffd as u64)?])?]);
    Ok((rules, SeccompAction::Errno(libc::EPERM as u32)))
}

/// Builds the filter for a device's own thread (the vsock device's event loop): it handles what
/// the guest puts in the device's queues and moves bytes between them and host Unix sockets.
pub fn device_filter() -> Result<BpfProgram, Error> {
    compile(device_rules()?)
}

fn device_rules() -> Result<Rules, Error> {
    let mut rules = allow_all(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        // virtio-blk: its drive's file (opened before the thread is confined).
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_close,
    ]);
    add_memory_rules(&mut rules)?;
    // Only Unix stream sockets (a guest's connections to the host go to `<socket>_<port>`).
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![
            cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
            cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_STREAM as u64)?,
        ])?],
    );
    // set_nonblocking, and virtio-net's TAP offloads (set once the driver has taken its features).
    let ioctls = [libc::FIONBIO, tun::TUNSETOFFLOAD]
        .iter()
        .map(|op| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *op)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    // The fd-flag reads and writes of std and vmm-sys-util.
    let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
        .iter()
        .map(|op| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *op as u64)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    Ok((rules, SeccompAction::Errno(libc::EPERM as u32)))
}

/// [`device_filter`], compiled once per process (every device thread of every VM shares it).
pub fn shared_device_filter() -> Result<std::sync::Arc<BpfProgram>, Error> {
    static FILTER: std::sync::OnceLock<std::sync::Arc<BpfProgram>> = std::sync::OnceLock::new();
    if let Some(f) = FILTER.get() {
        return Ok(f.clone());
    }
    let f = std::sync::Arc::new(device_filter()?);
    Ok(FILTER.get_or_init(|| f).clone())
}

/// Builds the filter `ember serve` confines itself with before it starts any thread (so every
/// thread it ever runs has it): the calls traced from a daemon that registers functions, boots
/// their templates, restores, hands out, invokes, recycles and deletes clones, and serves its API.
pub fn daemon_filter() -> Result<BpfProgram, Error> {
    compile((daemon_rules()?, SeccompAction::Errno(libc::ENOSYS as u32)))
}

/// Builds the filter `ember firecracker` confines its API and VMM thread with (every thread it
/// starts afterwards inherits it; vCPU and device threads add their own): the daemon's calls,
/// plus opening the TAP devices its network interfaces name.
pub fn firecracker_filter() -> Result<BpfProgram, Error> {
    let mut rules = daemon_rules()?;
    let ioctls = rules.entry(libc::SYS_ioctl).or_default();
    for op in tun::TUN_IOCTLS {
        ioctls.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, op)?])?);
    }
    compile((rules, SeccompAction::Errno(libc::ENOSYS as u32)))
}

/// Builds the filter of the daemon's layer builder thread (started before the daemon confines
/// itself, and the only thread of it that may start a process): the daemon's calls, plus what
/// unpacking archives into a directory tree and running `mkfs.erofs` (which inherits the filter)
/// take. No guest input reaches this thread: it builds what the API's client names.
pub fn builder_filter() -> Result<BpfProgram, Error> {
    compile((builder_filter_rules()?, SeccompAction::Errno(libc::ENOSYS as u32)))
}

fn builder_filter_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut rules = daemon_rules()?;
    for call in [
        // Starting mkfs.erofs and waiting for it (any clone flags: posix_spawn's vfork).
        libc::SYS_clone,
        libc::SYS_vfork,
        libc::SYS_execve,
        libc::SYS_wait4,
        libc::SYS_pipe2,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_rt_sigprocmask,
        libc::SYS_getppid,
        libc::SYS_rseq,
        libc::SYS_brk,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_umask,
        libc::SYS_getcwd,
        libc::SYS_chdir,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_ioctl,
        // Unpacking a tree and reading it back.
        libc::SYS_mkdirat,
        libc::SYS_symlink,
        libc::SYS_symlinkat,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_fchmodat,
        libc::SYS_utimensat,
        libc::SYS_lstat,
        libc::SYS_stat,
        libc::SYS_llistxattr,
        libc::SYS_listxattr,
        libc::SYS_lgetxattr,
        libc::SYS_getxattr,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        // mkfs.erofs's dynamic loader maps its libraries executable.
        libc::SYS_mmap,
        libc::SYS_mprotect,
    ] {
        rules.insert(call, vec![]);
    }
    Ok(rules)
}

/// Builds the filter of the daemon's network thread (started before the daemon confines itself;
/// see isolation/network): the daemon's calls, plus entering new network namespaces and coming back,
/// netlink sockets (rtnetlink, libnftables), opening TAP devices and their ioctls. No guest input
/// reaches this thread: it acts on registrations and on clones' ends.
pub fn network_filter() -> Result<BpfProgram, Error> {
    compile(network_rules()?)
}

fn network_rules() -> Result<Rules, Error> {
    let mut rules = daemon_rules()?;
    // (libnftables polls its netlink socket with pselect6.)
    for call in [libc::SYS_unshare, libc::SYS_setns, libc::SYS_getsockname, libc::SYS_getpid, libc::SYS_pselect6] {
        rules.insert(call, vec![]);
    }
    let family =
        |f: i32| -> Result<SeccompRule, BackendError> { SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, f as u64)?]) };
    rules.insert(libc::SYS_socket, vec![family(libc::AF_UNIX)?, family(libc::AF_NETLINK)?]);
    let tun = tun::TUN_IOCTLS
        .iter()
        .chain(&[libc::FIONBIO])
        .map(|op| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *op)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, tun);
    Ok((rules, SeccompAction::Errno(libc::ENOSYS as u32)))
}

/// Builds the filter of the daemon's launcher thread (the one that starts and reaps worker
/// processes), which every worker inherits and then narrows to the daemon's filter once it has
/// jailed itself: the builder's calls, plus starting a process in new namespaces and what a worker
/// does to jail itself (mounts, pivot_root, dropping its uid and capabilities, rlimits).
pub fn launcher_filter() -> Result<BpfProgram, Error> {
    compile(launcher_rules()?)
}

fn launcher_rules() -> Result<Rules, Error> {
    let mut rules = builder_filter_rules()?;
    for call in [
        libc::SYS_execveat,
        libc::SYS_kill,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_sethostname,
        libc::SYS_setgroups,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setrlimit,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_getppid,
        libc::SYS_poll,
        libc::SYS_sigaltstack,
        libc::SYS_fchown,
        libc::SYS_fchownat,
    ] {
        rules.insert(call, vec![]);
    }
    Ok((rules, SeccompAction::Errno(libc::ENOSYS as u32)))
}

/// Builds the filter a worker (`ember worker`) confines itself with once it has jailed itself:
/// the daemon's calls, less what only the daemon needs of them. A worker signals no process (no
/// `kill`; `tgkill` only to its own threads, process `tgid`: the vCPU kick), and `prctl` only
/// names a thread or sets no-new-privileges (what confining a new thread takes).
pub fn worker_filter(tgid: u32) -> Result<BpfProgram, Error> {
    compile((worker_rules(tgid)?, SeccompAction::Errno(libc::ENOSYS as u32)))
}

fn worker_rules(tgid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut rules = daemon_rules()?;
    rules.remove(&libc::SYS_kill);
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, u64::from(tgid))?])?]);
    let prctl = [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_SET_NO_NEW_PRIVS]
        .into_iter()
        .map(|op| SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, op as u64)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    Ok(rules)
}

fn daemon_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut rules = allow_all(&[
        // Files: the state directory, templates, mailboxes, images.
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_access,
        libc::SYS_getdents64,
        libc::SYS_mkdir,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rmdir,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        // Handing a worker its channel directory.
        libc::SYS_chown,
        libc::SYS_fchownat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_flock,
        libc::SYS_memfd_create,
        libc::SYS_fcntl,
        // Threads and waiting.
        libc::SYS_set_robust_list,
        libc::SYS_set_tid_address,
        libc::SYS_arch_prctl,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_geteuid,
        libc::SYS_getuid,
        libc::SYS_tgkill,
        libc::SYS_rt_sigaction,
        libc::SYS_sched_getaffinity,
        libc::SYS_prlimit64,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_getrandom,
        libc::SYS_exit_group,
        // Confining a thread further (vCPU and device threads add their own filters).
        libc::SYS_prctl,
        libc::SYS_seccomp,
        // The API and the clones' sockets (AF_UNIX only, below).
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_getsockopt,
        // Receive timeouts on a worker's socket.
        libc::SYS_setsockopt,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
    ]);
    add_memory_rules(&mut rules)?;
    let unix_only = || -> Result<Vec<SeccompRule>, BackendError> {
        Ok(vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?])
    };
    rules.insert(libc::SYS_socket, unix_only()?);
    rules.insert(libc::SYS_socketpair, unix_only()?);
    // SIGKILL to a worker that did not set itself up (or make its template) in time.
    rules.insert(libc::SYS_kill, vec![SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::SIGKILL as u64)?])?]);
    // Threads, never processes: clone must carry CLONE_THREAD. (clone3's flags are behind a
    // pointer the filter cannot read: it is refused with ENOSYS and glibc falls back to clone.)
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // KVM's ioctls (on /dev/kvm, VM and vCPU fds), FIONBIO, and checking a TAP handed over for
    // a network card (never creating one).
    let mut ioctls = vec![
        SeccompRule::new(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)?])?,
        SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)?])?,
    ];
    for op in tun::TAP_CHECK_IOCTLS {
        ioctls.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, op)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    Ok(rules)
}

/// Confines the calling thread, after priming the allocator (see `prime_allocator`).
pub fn apply(filter: &BpfProgram) -> Result<(), Error> {
    prime_allocator();
    seccompiler::apply_filter(filter)
}

/// [`apply`] for a filter under which the thread may open files (the Firecracker door's process
/// filter): glibc's first-use reads of files are allowed there, so nothing is primed (priming
/// faults in a megabyte: most of a millisecond on a process's start path on some hosts). The
/// first [`apply`] of a filter that allows no opening primes as usual.
pub fn apply_allowing_files(filter: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(filter)
}

/// glibc's malloc reads files the first time some paths run: /sys/devices/system/cpu/online when
/// it sets up arenas, /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks (both
/// cached process-wide after that). The vCPU and device filters allow no opening of files, so those
/// paths run here, on the thread about to be confined, before the filter: a thread arena is set
/// up, grown past the trim threshold and freed.
fn prime_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let blocks: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 4096]).collect();
        drop(std::hint::black_box(blocks));
    });
    drop(std::hint::black_box(Vec::<u8>::with_capacity(64)));
}

/// The TUN/TAP driver's ioctls (linux/if_tun.h): what the filters allow on TAP devices, and what
/// the TAP device (devices/virtio/net/tap.rs) calls.
pub mod tun {
    // _IOW('T', ..., int) and _IOR('T', ..., unsigned int).
    pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    /// The ioctls opening a TAP takes.
    pub const TUN_IOCTLS: [libc::c_ulong; 3] = [TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ];
    /// The ioctls a TAP handed over takes (checking it, its header size, its offloads).
    pub const TAP_CHECK_IOCTLS: [libc::c_ulong; 3] = [TUNGETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD];
    /// Offloads the guest may receive (TUNSETOFFLOAD's argument).
    pub const TUN_F_CSUM: u32 = 0x01;
    pub const TUN_F_TSO4: u32 = 0x02;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a new thread confined with `filter`.
    fn confined<T: Send + 'static>(filter: BpfProgram, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            apply(&filter).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// Runs a classic BPF program made of the instructions seccompiler and [`search_by_number`]
    /// emit on one call (`data`: `struct seccomp_data` as 32-bit words); returns its action and
    /// how many instructions it ran.
    fn run_filter(prog: &[seccompiler::sock_filter], data: &[u32; 16]) -> (u32, usize) {
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = &prog[pc];
            steps += 1;
            pc += 1;
            let taken = |t: bool| usize::from(if t { i.jt } else { i.jf });
            match i.code {
                0x20 => a = data[(i.k / 4) as usize],
                0x54 => a &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += taken(a == i.k),
                0x25 => pc += taken(a > i.k),
                0x35 => pc += taken(a >= i.k),
                0x45 => pc += taken(a & i.k != 0),
                0x06 => return (i.k, steps),
                c => panic!("instruction {c:#x} at {}", pc - 1),
            }
        }
    }

    fn every_filter() -> Vec<(&'static str, Rules)> {
        let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
        vec![
            ("vcpu", vcpu_rules(99).unwrap()),
            ("loader", loader_rules(7).unwrap()),
            ("device", device_rules().unwrap()),
            ("daemon", (daemon_rules().unwrap(), enosys.clone())),
            ("worker", (worker_rules(4242).unwrap(), enosys.clone())),
            ("builder", (builder_filter_rules().unwrap(), enosys)),
            ("network", network_rules().unwrap()),
            ("launcher", launcher_rules().unwrap()),
        ]
    }

    #[test]
    fn the_search_decides_every_call_as_seccompilers_program_does() {
        for (name, (rules, refused)) in every_filter() {
            let with_conditions: Vec<u32> =
                rules.iter().filter(|(_, chain)| !chain.is_empty()).map(|(nr, _)| *nr as u32).collect();
            let linear = compile_linear(rules.clone(), refused.clone()).unwrap();
            let searched = search_by_number(rules, refused).unwrap();
            // Argument values worth trying: every constant the rules compare with, and edges.
            let mut values: Vec<u32> = linear.iter().map(|i| i.k).chain([0, 1, 2, 0xffff, u32::MAX]).collect();
            values.sort_unstable();
            values.dedup();
            let check = |data: &[u32; 16]| {
                assert_eq!(run_filter(&linear, data).0, run_filter(&searched, data).0, "{name}: {data:?}");
            };
            for arch in [0xc000_003e, 0x4000_0003] {
                for nr in (0..600).chain([0x4000_0000, u32::MAX]) {
                    let mut data = [0u32; 16];
                    (data[0], data[1]) = (nr, arch);
                    check(&data);
                    if !with_conditions.contains(&nr) {
                        continue;
                    }
                    for word in 4..16 {
                        for v in &values {
                            let mut d = data;
                            d[word] = *v;
                            check(&d);
                        }
                    }
                    // Two arguments at once (an fd and an ioctl, a domain and a type).
                    for v0 in &values {
                        for v1 in &values {
                            let mut d = data;
                            (d[4], d[6]) = (*v0, *v1);
                            check(&d);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_search_runs_logarithmically_few_instructions_for_a_call_it_does_not_list() {
        for (name, (rules, refused)) in every_filter() {
            let listed = rules.len();
            let depth = usize::BITS - (listed - 1).leading_zeros();
            let linear = compile_linear(rules.clone(), refused.clone()).unwrap();
            let searched = search_by_number(rules.clone(), refused).unwrap();
            let unlisted = (0..600u32).filter(|nr| !rules.contains_key(&i64::from(*nr)));
            let steps = |prog: &[seccompiler::sock_filter]| {
                unlisted
                    .clone()
                    .map(|nr| {
                        let mut data = [0u32; 16];
                        (data[0], data[1]) = (nr, 0xc000_003e);
                        run_filter(prog, &data).1
                    })
                    .max()
                    .unwrap_or(0)
            };
            let most = steps(&searched);
            // The arch check, the load, at most two per level, the leaf's test and its refusal.
            assert!(most <= 4 + 2 * depth as usize + 2, "{name}: {most} instructions for {listed} calls");
            assert!(steps(&linear) > 2 * listed, "{name}: seccompiler's program is not linear");
        }
    }

    #[test]
    fn a_confined_vcpu_thread_keeps_its_allowed_calls() {
        let n = confined(vcpu_filter(99).unwrap(), || {
            // Allowed: allocation, a futex-backed lock, writing.
            let v: Vec<u8> = vec![1; 1 << 20];
            let m = std::sync::Mutex::new(v.len());
            let n = *m.lock().unwrap();
            use std::io::Write;
            std::io::stderr().write_all(b"").unwrap();
            n
        });
        assert_eq!(n, 1 << 20);
    }

    #[test]
    fn a_vcpu_thread_reaches_no_fd_but_its_own_and_maps_no_code() {
        let (other_fd, not_kvm, exec, open) = confined(vcpu_filter(99).unwrap(), || {
            // SAFETY: raw system calls with scalar arguments and null pointers, expected to be
            // refused by the filter before the kernel looks at them.
            unsafe {
                let other_fd = errno_of(libc::ioctl(98, (KVMIO << 8 | 0x80) as _) as _);
                let not_kvm = errno_of(libc::ioctl(99, libc::FIONBIO, std::ptr::null_mut::<u8>()) as _);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                let exec = if p == libc::MAP_FAILED { errno_of(-1) } else { 0 };
                let open = errno_of(libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) as _);
                (other_fd, not_kvm, exec, open)
            }
        });
        assert_eq!((other_fd, not_kvm, exec, open), (libc::EPERM, libc::EPERM, libc::EPERM, libc::EPERM));
    }

    #[test]
    fn a_vcpu_thread_gets_its_ioctls_by_whole_request_number() {
        // KVM_ENABLE_CAP (_IOW(KVMIO, 0xa3, struct kvm_enable_cap)) shares its number with
        // KVM_GET_TSC_KHZ (_IO(KVMIO, 0xa3)): only the allowed request passes the filter (and
        // then fails in the kernel, fd 99 being no vCPU here).
        vmm_sys_util::ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO as u32, 0xa3, kvm_bindings::kvm_enable_cap);
        let (enable_cap, tsc_khz) = confined(vcpu_filter(99).unwrap(), || {
            // SAFETY: ioctls on an fd that is not open, with a null argument: refused by the
            // filter or by the kernel (EBADF) before anything is read.
            unsafe {
                (
                    errno_of(libc::ioctl(99, KVM_ENABLE_CAP() as _, std::ptr::null_mut::<u8>()) as _),
                    errno_of(libc::ioctl(99, vcpu_ioctls::KVM_GET_TSC_KHZ() as _) as _),
                )
            }
        });
        assert_eq!((enable_cap, tsc_khz), (libc::EPERM, libc::EBADF));
        assert_eq!(vcpu_ioctls::KVM_RUN(), 0xae80);
        assert_eq!(vcpu_ioctls::KVM_GET_REGS(), 0x8090_ae81);
    }

    #[test]
    fn a_device_thread_gets_unix_stream_sockets_only() {
        let (unix, inet, udp) = confined(device_filter().unwrap(), || {
            // SAFETY: socket() takes scalars; a successful one is closed at once.
            unsafe {
                let try_socket = |d, t| {
                    let fd = libc::socket(d, t, 0);
                    let e = errno_of(fd as _);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    e
                };
                (
                    try_socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC),
                    try_socket(libc::AF_INET, libc::SOCK_STREAM),
                    try_socket(libc::AF_UNIX, libc::SOCK_DGRAM),
                )
            }
        });
        assert_eq!((unix, inet, udp), (0, libc::EPERM, libc::EPERM));
    }

    #[test]
    fn the_daemon_starts_threads_but_no_programs_or_network_sockets() {
        let (thread_ok, inet, exec, fork) = confined(daemon_filter().unwrap(), || {
            let thread_ok = std::thread::spawn(|| 7).join().ok() == Some(7);
            // SAFETY: scalar arguments and valid NUL-terminated strings; each call is expected to
            // be refused before it does anything.
            unsafe {
                let inet = errno_of(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as _);
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let exec = errno_of(libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) as _);
                let fork = errno_of(libc::syscall(libc::SYS_fork));
                (thread_ok, inet, exec, fork)
            }
        });
        assert!(thread_ok, "a confined daemon thread could not start a thread");
        assert_eq!((inet, exec, fork), (libc::ENOSYS, libc::ENOSYS, libc::ENOSYS));
    }

    #[test]
    fn a_worker_signals_no_process_and_only_names_threads_with_prctl() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let me = std::process::id();
        let (kill, other_tgid, own, dumpable, name) = confined(worker_filter(me).unwrap(), move || {
            // SAFETY: scalar arguments; signals the child this test started (refused), and this
            // process's own thread with signal 0 (no signal is sent).
            unsafe {
                let tid = libc::gettid();
                (
                    errno_of(libc::kill(pid, libc::SIGKILL) as _),
                    errno_of(libc::syscall(libc::SYS_tgkill, pid, pid, 0)),
                    errno_of(libc::syscall(libc::SYS_tgkill, me, tid, 0)),
                    errno_of(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) as _),
                    errno_of(libc::prctl(libc::PR_SET_NAME, c"w".as_ptr(), 0, 0, 0) as _),
                )
            }
        });
        assert_eq!((kill, other_tgid, own, dumpable, name), (libc::ENOSYS, libc::ENOSYS, 0, libc::ENOSYS, 0));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_daemon_may_kill_a_worker_and_send_no_other_signal() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let (term, kill) = confined(daemon_filter().unwrap(), move || {
            // SAFETY: scalar arguments; signals the child this test started.
            unsafe { (errno_of(libc::kill(pid, libc::SIGTERM) as _), errno_of(libc::kill(pid, libc::SIGKILL) as _)) }
        });
        assert_eq!((term, kill), (libc::ENOSYS, 0));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
