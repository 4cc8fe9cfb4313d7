//! Confining a worker, as Firecracker's jailer confines a VMM: the process is started (by the
//! daemon's launcher) in new mount, pid, ipc, uts and network namespaces; here it joins its
//! cgroups, builds a root of its own (a small tmpfs holding bind mounts of exactly the files its
//! clones need, at the paths they have outside, read-only but for its channel directory), pivots
//! into it, drops every capability and its root uid for the function's own, and sets
//! no_new_privs and its rlimits. What it needs from outside (/dev/kvm, the template's memory) is
//! opened before, and kept.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How one worker is jailed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailSpec {
    /// An empty directory (outside) on which the worker mounts its new root.
    pub root: String,
    pub uid: u32,
    pub gid: u32,
    /// Files and directories visible inside, at the same path as outside.
    pub binds: Vec<Bind>,
    /// `cgroup.procs` files the worker joins (one per hierarchy on cgroup v1; one on v2).
    pub cgroups: Vec<String>,
    /// A /proc of its own pid namespace (a worker that makes a template reads its own pagemap).
    pub proc: bool,
    /// Writable directories of its own that nobody outside sees (path inside, size in bytes): a
    /// tmpfs each, owned by the worker's uid, so that what it writes there is bounded and never
    /// lands on the host's disk.
    #[serde(default)]
    pub scratch: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bind {
    pub path: String,
    pub writable: bool,
}

fn check(what: &str, r: libc::c_int) -> Result<(), String> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| format!("{}: a NUL in the path", p.display()))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(ptr(&src), target_c.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    check(&format!("mount {}", target.display()), r)
}

/// Joins the cgroups, builds the new root and enters it, then drops privileges: after this the
/// process sees only its root and can gain nothing back. Called single-threaded, as root, right
/// after the setup message was read.
pub fn enter(spec: &JailSpec, max_files: u64) -> Result<(), String> {
    for procs in &spec.cgroups {
        std::fs::write(procs, "0").map_err(|e| format!("joining the cgroup {procs}: {e}"))?;
    }
    // Nothing mounted here propagates back to the host's namespace.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    let root = PathBuf::from(&spec.root);
    mount(
        Some(Path::new("tmpfs")),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )?;
    for b in &spec.binds {
        let src = Path::new(&b.path);
        if !src.is_absolute() {
            return Err(format!("bind {}: not an absolute path", b.path));
        }
        let inside = root.join(src.strip_prefix("/").unwrap_or(src));
        let meta = std::fs::metadata(src).map_err(|e| format!("bind {}: {e}", b.path))?;
        if let Some(parent) = inside.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&inside).map_err(|e| format!("{}: {e}", inside.display()))?;
        } else {
            std::fs::write(&inside, b"").map_err(|e| format!("{}: {e}", inside.display()))?;
        }
        mount(Some(src), &inside, None, libc::MS_BIND, None)?;
        let ro = if b.writable { 0 } else { libc::MS_RDONLY };
        mount(
            None,
            &inside,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | ro,
            None,
        )?;
    }
    for (path, size) in &spec.scratch {
        let inside = root.join(Path::new(path).strip_prefix("/").unwrap_or(Path::new(path)));
        std::fs::create_dir_all(&inside).map_err(|e| format!("{}: {e}", inside.display()))?;
        let data = format!("size={size},nr_inodes=4096,mode=0700,uid={},gid={}", spec.uid, spec.gid);
        mount(
            Some(Path::new("tmpfs")),
            &inside,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&data),
        )?;
    }
    if spec.proc {
        let p = root.join("proc");
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        mount(Some(Path::new("proc")), &p, Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)?;
    }
    // The new root's own tmpfs read-only from now on.
    pivot_into(&root)?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let host = b"ember-worker";
    // SAFETY: `host` is valid for its length.
    check("sethostname", unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) })?;
    set_limits(max_files)?;
    // A worker that reads its own /proc (its pagemap) stays dumpable: /proc/self of a
    // non-dumpable process is root's.
    drop_privileges(spec.uid, spec.gid, !spec.proc)
}

/// pivot_root(2) into `root` and detach the old root.
fn pivot_into(root: &Path) -> Result<(), String> {
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    // SAFETY: "." is a valid string; pivot_root with new_root == put_old stacks the old root
    // under the new one, detached right after (as runc does).
    check("pivot_root", unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int })?;
    // SAFETY: "." is a valid string.
    check("detaching the old root", unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

fn set_limits(max_files: u64) -> Result<(), String> {
    for (what, resource, value) in [
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, max_files),
        ("RLIMIT_CORE", libc::RLIMIT_CORE, 0),
        ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK, 64 << 10),
    ] {
        let l = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: `l` is a valid rlimit.
        check(what, unsafe { libc::setrlimit(resource, &l) })?;
    }
    Ok(())
}

/// Drops the capability bounding set, every supplementary group and root for `uid`/`gid` (which
/// clears the permitted and effective capabilities), then sets no_new_privs and (if asked) makes
/// the process non-dumpable. The parent-death signal is set last: a credential change clears it.
pub fn drop_privileges(uid: u32, gid: u32, non_dumpable: bool) -> Result<(), String> {
    if uid == 0 || gid == 0 {
        return Err("a worker never runs as uid or gid 0".into());
    }
    let mut cap = 0;
    // SAFETY: prctl with integer arguments; EINVAL past the last capability ends the loop.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        // SAFETY: as above.
        check("dropping a capability", unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) })?;
        cap += 1;
    }
    // SAFETY: setgroups with an empty list; the set*id calls take plain integers.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(gid, gid, gid))?;
        check("setresuid", libc::setresuid(uid, uid, uid))?;
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        check("PR_CAP_AMBIENT", libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
        check("PR_SET_NO_NEW_PRIVS", libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // (A uid change has just made the process non-dumpable; a worker that reads its own /proc
        // is made dumpable again.)
        let dumpable = if non_dumpable { 0 } else { 1 };
        check("PR_SET_DUMPABLE", libc::prctl(libc::PR_SET_DUMPABLE, dumpable, 0, 0, 0))?;
    }
    die_with_parent()
}

/// Has the kernel kill this process when the thread that started it (the daemon's launcher)
/// ends: a daemon killed with SIGKILL takes its workers with it.
pub fn die_with_parent() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    check("PR_SET_PDEATHSIG", unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
    // The parent may have gone before the signal was asked for (then this process has been
    // reparented).
    // SAFETY: getppid has no arguments.
    if unsafe { libc::getppid() } == 1 && std::process::id() != 1 {
        return Err("the daemon is gone".into());
    }
    Ok(())
}

/// What an unjailed worker (a daemon without root) still does: no_new_privs, rlimits, and dying
/// with the daemon.
pub fn confine_unjailed(max_files: u64) -> Result<(), String> {
    set_limits(max_files)?;
    // SAFETY: prctl with integer arguments.
    check("PR_SET_NO_NEW_PRIVS", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    die_with_parent()
}
