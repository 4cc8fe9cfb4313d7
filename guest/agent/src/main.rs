//! ember-agent: PID 1 of ember's guest initramfs.
//!
//! Today it brings the guest up and proves that user space works on ember: it mounts /dev, /proc and
//! /sys, signals the boot timer, runs real system calls (console writes, reading /proc/uptime,
//! fork + exec of itself, getrandom), prints its marker line, and powers the VM off.
//!
//! The kernel passes unknown `key=value` command-line parameters to init as environment variables:
//! - `ember_exit=panic`: exit instead of powering off (the kernel then panics: a guest-crash test).
//! - `ember_exit=reboot`: reboot (i8042 reset) instead of powering off.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::process::Command;

/// The boot timer: writing this byte at this guest-physical address marks "user space is up".
const BOOT_TIMER_ADDR: libc::off_t = 0xd000_0000;
const BOOT_TIMER_MAGIC: u8 = 123;
/// The marker the host looks for on the console.
const MARKER: &str = "EMBER_GUEST_READY";
const CHILD_ARG: &str = "--ember-child";
const CHILD_EXIT_CODE: i32 = 42;

fn main() {
    if std::env::args().nth(1).as_deref() == Some(CHILD_ARG) {
        println!("ember-agent: child pid {} running", std::process::id());
        std::process::exit(CHILD_EXIT_CODE);
    }
    if let Err(e) = init() {
        eprintln!("ember-agent: error: {e}");
    }
    let action = std::env::var("ember_exit").unwrap_or_default();
    match action.as_str() {
        "panic" => {
            println!("ember-agent: exiting as PID 1 (ember_exit=panic)");
            std::process::exit(1);
        }
        "reboot" => shutdown(libc::RB_AUTOBOOT),
        _ => shutdown(libc::RB_POWER_OFF),
    }
}

fn init() -> io::Result<()> {
    mount("devtmpfs", "/dev", "devtmpfs")?;
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    boot_timer()?;

    let uptime = fs::read_to_string("/proc/uptime")?;
    let uptime = uptime.split_whitespace().next().unwrap_or("?").to_owned();

    // fork + exec + wait: a child that is this same binary.
    let status = Command::new("/init").arg(CHILD_ARG).status()?;
    if status.code() != Some(CHILD_EXIT_CODE) {
        return Err(io::Error::other(format!("child exited with {status}, expected {CHILD_EXIT_CODE}")));
    }

    // GRND_INSECURE: this early the kernel's CRNG may not be initialised yet, and waiting for it
    // means waiting for timer-jitter entropy (seconds of emulated kernel work on some hosts). The
    // bytes only show that getrandom works; a workload that needs secrets gets a seeded CRNG.
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes at most `random.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), libc::GRND_INSECURE) };
    if n != random.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();

    let mut out = io::stdout().lock();
    writeln!(out, "{MARKER} uptime={uptime} child_exit={CHILD_EXIT_CODE} random={random}")?;
    out.flush()
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (src, tgt, fst) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::other(format!("mount {target}: {e}")));
        }
    }
    Ok(())
}

/// Writes the boot-timer byte through /dev/mem.
fn boot_timer() -> io::Result<()> {
    let f = fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
    use std::os::fd::AsRawFd;
    // SAFETY: maps one page of /dev/mem at the boot timer's address; the mapping is used for a single
    // volatile byte store below and unmapped right after.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            BOOT_TIMER_ADDR,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::other(format!("mmap /dev/mem: {}", io::Error::last_os_error())));
    }
    // SAFETY: `p` is a live, writable mapping of at least one byte.
    unsafe {
        std::ptr::write_volatile(p.cast::<u8>(), BOOT_TIMER_MAGIC);
        libc::munmap(p, 4096);
    }
    Ok(())
}

fn shutdown(how: libc::c_int) -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 we may reboot.
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    // reboot() only returns on failure.
    eprintln!("ember-agent: reboot failed: {}", io::Error::last_os_error());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
